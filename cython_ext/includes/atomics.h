/* Memory-ordering primitives for the ring engine.
 *
 * Guest memory is shared with another process (QEMU, the guest's vCPUs), so
 * every access to a ring index or a descriptor goes through one of these:
 * the compiler may neither tear, repeat nor reorder them.  The guest writes
 * descriptors, then release-stores avail->idx; we acquire-load avail->idx
 * and only then read entries.  We write used entries, then release-store
 * used->idx.  Before asking "does the guest want an interrupt" we need a
 * full fence (store used->idx, load used_event must not be reordered), the
 * same pairing as virtio_mb() in the Linux driver.
 */
#ifndef VFE_ATOMICS_H
#define VFE_ATOMICS_H
#include <stdint.h>

static inline uint16_t vfe_load_acquire_u16(const uint16_t *p)
{ return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

static inline uint16_t vfe_load_u16(const uint16_t *p)
{ return __atomic_load_n(p, __ATOMIC_RELAXED); }

static inline uint32_t vfe_load_u32(const uint32_t *p)
{ return __atomic_load_n(p, __ATOMIC_RELAXED); }

static inline uint64_t vfe_load_u64(const uint64_t *p)
{ return __atomic_load_n(p, __ATOMIC_RELAXED); }

static inline void vfe_store_release_u16(uint16_t *p, uint16_t v)
{ __atomic_store_n(p, v, __ATOMIC_RELEASE); }

static inline void vfe_store_u16(uint16_t *p, uint16_t v)
{ __atomic_store_n(p, v, __ATOMIC_RELAXED); }

static inline void vfe_store_u32(uint32_t *p, uint32_t v)
{ __atomic_store_n(p, v, __ATOMIC_RELAXED); }

static inline void vfe_store_u64(uint64_t *p, uint64_t v)
{ __atomic_store_n(p, v, __ATOMIC_RELAXED); }

static inline uint8_t vfe_load_u8(const uint8_t *p)
{ return __atomic_load_n(p, __ATOMIC_RELAXED); }

static inline void vfe_store_u8(uint8_t *p, uint8_t v)
{ __atomic_store_n(p, v, __ATOMIC_RELAXED); }

static inline void vfe_store_release_u8(uint8_t *p, uint8_t v)
{ __atomic_store_n(p, v, __ATOMIC_RELEASE); }

static inline void vfe_fence(void)
{ __atomic_thread_fence(__ATOMIC_SEQ_CST); }

static inline uint64_t vfe_load_acquire_u64(const uint64_t *p)
{ return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

static inline int vfe_cas_u64(uint64_t *p, uint64_t expected, uint64_t desired)
{ return __atomic_compare_exchange_n(p, &expected, desired, 0,
                                     __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE); }

static inline void vfe_store_release_u64(uint64_t *p, uint64_t v)
{ __atomic_store_n(p, v, __ATOMIC_RELEASE); }

static inline void vfe_fetch_or_u8(uint8_t *p, uint8_t v)
{ __atomic_fetch_or(p, v, __ATOMIC_RELAXED); }

static inline void vfe_add_u64(uint64_t *p, uint64_t v)
{ __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }

static inline int vfe_load_acquire_int(const int *p)
{ return __atomic_load_n(p, __ATOMIC_ACQUIRE); }

static inline void vfe_store_release_int(int *p, int v)
{ __atomic_store_n(p, v, __ATOMIC_RELEASE); }

/* A test-and-test-and-set spinlock: held for a burst at most (microseconds),
 * never across a sleep or a syscall that can block. */
static inline void vfe_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static inline void vfe_spin_lock(int *l)
{
    for (;;) {
        if (!__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE))
            return;
        while (__atomic_load_n(l, __ATOMIC_RELAXED))
            vfe_cpu_relax();
    }
}

static inline void vfe_spin_unlock(int *l)
{ __atomic_store_n(l, 0, __ATOMIC_RELEASE); }

/* Read one split-ring descriptor exactly once (the guest may be rewriting
 * it under our feet; we validate the copy, never the live entry). */
static inline void vfe_read_desc(const void *d, uint64_t *addr, uint32_t *len,
                                 uint16_t *flags, uint16_t *next)
{
    const uint8_t *b = (const uint8_t *)d;
    *addr = __atomic_load_n((const uint64_t *)b, __ATOMIC_RELAXED);
    *len = __atomic_load_n((const uint32_t *)(b + 8), __ATOMIC_RELAXED);
    *flags = __atomic_load_n((const uint16_t *)(b + 12), __ATOMIC_RELAXED);
    *next = __atomic_load_n((const uint16_t *)(b + 14), __ATOMIC_RELAXED);
}

/* Build identity of the compiled engine; a live update compares it (read
 * with pyelftools from the .so) before handing over any device. */
#define VFE_ENGINE_ABI 7   /* 2: Vring.kind, blk devices; 3: BlkDev inflight tracking;
                              4: Vring.stopping, InflightQueue.ndesc, AioReq.busy/epoch;
                              5: MemTable.fault_addr, Worker fault state, AioRing.reaping,
                                 NetDev port security;
                              6: packed rings (Vring.packed ...), Vring.publisher,
                                 Worker RX run and learn state;
                              7: per-worker counter blocks (Vring.cnt, Worker.id,
                                 counters.pxd), ring_stats' new keys */
#define VFE_STR_(x) #x
#define VFE_STR(x) VFE_STR_(x)
/* The same identity as a string in .rodata under an exported symbol: a
 * running controller reads it from another build's file
 * (vfe/engine/abi.py) without loading that build.  `used` keeps it although
 * no C code refers to it; this header is compiled into one module only. */
__attribute__((used, visibility("default")))
const char vfe_engine_abi[] = "vfe-engine-abi=" VFE_STR(VFE_ENGINE_ABI);
#endif
