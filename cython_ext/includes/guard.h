/* Surviving SIGBUS on guest memory.
 *
 * Guest memory is a file the front-end shares with us (a memfd, a file in
 * /dev/shm or on hugetlbfs).  If the front-end truncates it after
 * SET_MEM_TABLE, every page past the new end is gone and the next load or
 * store there raises SIGBUS -- which by default kills the whole daemon and
 * every VM it serves.  QEMU seals its memfds against shrinking, but nothing
 * forces a front-end to.
 *
 * So code that touches guest memory runs "guarded": vfe_guarded(fn, arg,
 * ctx, match) sets a per-thread recovery point (sigsetjmp), calls fn(arg)
 * and disarms.  The process-wide SIGBUS handler installed by the engine
 * checks the faulting thread's guard: armed, a real fault (not a kill), and
 * the address is guest memory (match(ctx, addr), the engine's device
 * memory tables; no match function: any address) -> record the address
 * and siglongjmp back, where vfe_guarded returns VFE_FAULTED and the caller
 * breaks the device whose memory it was.  Anything else -- a fault outside
 * a guarded section, or on an address that is no guest's -- is a bug:
 * the previous disposition is put back and the fault repeats, so the
 * process dies of SIGBUS (with a core) as it would have without us.
 *
 * Cost: one sigsetjmp without the signal mask (no syscall) per guarded
 * call, i.e. per worker iteration, not per packet.  The handler runs with
 * SA_NODEFER (SIGBUS stays unblocked after the jump, as sigsetjmp(.., 0)
 * does not restore masks) and SA_ONSTACK (worker and I/O threads get an
 * alternate signal stack: vfe_thread_guard_init).
 *
 * The per-thread state is a heap block found through one initial-exec TLS
 * pointer: a dlopen'ed module may only use a few bytes of static TLS, and
 * the dynamic TLS model may allocate on first access, which a signal
 * handler must not do.  A thread that never armed has a NULL pointer, so
 * its faults are not ours.
 */
#ifndef VFE_GUARD_H
#define VFE_GUARD_H
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>

#define VFE_FAULTED (-0x7ff0)            /* vfe_guarded: fn was cut short by a fault */
#define VFE_ALTSTACK_SIZE (64 * 1024)

typedef int (*vfe_match_fn)(void *ctx, uint64_t addr);
typedef int (*vfe_guarded_fn)(void *arg);

typedef struct {
    sigjmp_buf jb;
    volatile sig_atomic_t armed;
    void *ctx;                           /* what `match` searches */
    vfe_match_fn match;                  /* NULL: every fault while armed is guest memory */
    volatile uint64_t addr;              /* where the last caught fault hit */
    void *altstack;                      /* ours to free, or NULL */
} vfe_guard_t;

static __thread vfe_guard_t *vfe_tls_guard __attribute__((tls_model("initial-exec")));
static struct sigaction vfe_old_sigbus;
static int vfe_sigbus_installed;
static pthread_key_t vfe_guard_key;
static pthread_once_t vfe_guard_once = PTHREAD_ONCE_INIT;

static void vfe_guard_free(void *p)
{
    vfe_guard_t *g = (vfe_guard_t *)p;
    stack_t off;
    if (g == NULL)
        return;
    vfe_tls_guard = NULL;
    if (g->altstack != NULL) {
        off.ss_sp = NULL;
        off.ss_size = 0;
        off.ss_flags = SS_DISABLE;
        sigaltstack(&off, NULL);
        free(g->altstack);
    }
    free(g);
}

static void vfe_guard_key_make(void)
{ pthread_key_create(&vfe_guard_key, vfe_guard_free); }

/* This thread's guard, made on first use (freed when the thread ends). */
static inline vfe_guard_t *vfe_guard_get(void)
{
    vfe_guard_t *g = vfe_tls_guard;
    if (g != NULL)
        return g;
    pthread_once(&vfe_guard_once, vfe_guard_key_make);
    g = (vfe_guard_t *)calloc(1, sizeof(vfe_guard_t));
    if (g == NULL)
        return NULL;
    pthread_setspecific(vfe_guard_key, g);
    vfe_tls_guard = g;
    return g;
}

/* A thread that runs guarded code all its life (a worker, an I/O thread):
 * its guard now, and an alternate signal stack for the handler.  0 or -1. */
static int vfe_thread_guard_init(void)
{
    vfe_guard_t *g = vfe_guard_get();
    stack_t ss;
    if (g == NULL)
        return -1;
    if (g->altstack != NULL)
        return 0;
    ss.ss_sp = malloc(VFE_ALTSTACK_SIZE);
    if (ss.ss_sp == NULL)
        return -1;
    ss.ss_size = VFE_ALTSTACK_SIZE;
    ss.ss_flags = 0;
    if (sigaltstack(&ss, NULL) != 0) {
        free(ss.ss_sp);
        return -1;
    }
    g->altstack = ss.ss_sp;
    return 0;
}

/* Before a thread that called vfe_thread_guard_init ends (the key's
 * destructor would do it too; this keeps the order explicit). */
static void vfe_thread_guard_fini(void)
{
    vfe_guard_t *g = vfe_tls_guard;
    if (g == NULL)
        return;
    pthread_setspecific(vfe_guard_key, NULL);
    vfe_guard_free(g);
}

static void vfe_sigbus_handler(int sig, siginfo_t *si, void *uc)
{
    vfe_guard_t *g = vfe_tls_guard;
    uint64_t addr = (uint64_t)(uintptr_t)si->si_addr;
    (void)sig;
    (void)uc;
    if (g != NULL && g->armed && si->si_code > 0
            && (g->match == NULL || g->match(g->ctx, addr))) {
        g->armed = 0;
        g->addr = addr;
        siglongjmp(g->jb, 1);
    }
    /* Not a guest's memory going away: whatever was there before us (the
     * default: die with a core dump; faulthandler, if it was enabled). */
    sigaction(SIGBUS, &vfe_old_sigbus, NULL);
    if (si->si_code <= 0)
        raise(SIGBUS);                   /* sent (kill, tgkill): deliver it again */
    /* a fault: returning re-runs the instruction, which faults again */
}

/* Install the handler once per process.  0, or -1 (errno set). */
static int vfe_sigbus_install(void)
{
    struct sigaction sa;
    if (vfe_sigbus_installed)
        return 0;
    sa.sa_sigaction = vfe_sigbus_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    if (sigaction(SIGBUS, &sa, &vfe_old_sigbus) != 0)
        return -1;
    vfe_sigbus_installed = 1;
    return 0;
}

/* fn(arg) with this thread's recovery point armed: its result, or
 * VFE_FAULTED if a fault on guest memory cut it short (vfe_guard_addr()
 * says where).  Nested calls run unguarded inside the outer one, which
 * catches their faults.  Never inlined: sigsetjmp's frame must be ours. */
static __attribute__((noinline)) int vfe_guarded(vfe_guarded_fn fn, void *arg, void *ctx,
                                                 vfe_match_fn match)
{
    vfe_guard_t *g = vfe_guard_get();
    int rc;
    if (g == NULL || g->armed)
        return fn(arg);
    g->ctx = ctx;
    g->match = match;
    if (sigsetjmp(g->jb, 0) != 0)
        return VFE_FAULTED;
    g->armed = 1;
    rc = fn(arg);
    g->armed = 0;
    return rc;
}

/* A compiler barrier: state the recovery path reads (which lock is held,
 * which ring is served) is in memory before the next guest access. */
static inline void vfe_signal_fence(void)
{ __atomic_signal_fence(__ATOMIC_SEQ_CST); }

/* Where the fault that made the last vfe_guarded return VFE_FAULTED hit. */
static inline uint64_t vfe_guard_addr(void)
{
    vfe_guard_t *g = vfe_tls_guard;
    return g != NULL ? g->addr : 0;
}
#endif
