# Asynchronous file I/O for virtio-blk file bdevs: a small pthread pool per
# device that runs preadv/pwritev/fdatasync/fallocate straight into and out
# of guest memory, so a request whose I/O blocks (a page fault on the file,
# a slow disk, an fsync) holds neither its worker nor any other queue.
#
# Why threads and not io_uring: one code path that works wherever the
# daemon runs.  io_uring is often unavailable (kernel.io_uring_disabled,
# container seccomp profiles), so a thread pool would be needed as the
# fallback anyway; a blocking syscall per request costs a context switch,
# which is small next to what a guest's request costs here.
#
# Who touches what:
# - the ring's worker (or the control thread with the world stopped) fills
#   the request slot of head h (AioRing.slots[h]: a slot per head needs no
#   allocation) and queues it on the pool (mutex + condvar).  A guest may
#   post a head again while its request is still here: `busy` says so, and
#   that stops the ring (E_DUP) before the slot is touched -- reusing it
#   would link the request into the pool's list twice;
# - a pool thread runs it, sets its status, pushes it on the ring's done
#   list (spinlock) and writes the worker's wake eventfd;
# - the worker reaps the done list at the start of the ring's next burst:
#   status byte, dirty log, used entry, inflight marks (engine.pyx).
# A ring stops once `pending` is 0: no pool thread writes into guest memory
# after GET_VRING_BASE answers or the memory is unmapped.  The stop waits
# with the world running (engine.pyx ring_stop) and for a bounded time: I/O
# still running after it is abandoned (a new `epoch`), and its late
# completion is dropped without touching guest memory (blk_reap).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memset
from libc.errno cimport errno, EINTR, EOPNOTSUPP, EFAULT
from atomics cimport *
from guard cimport vfe_guarded, vfe_thread_guard_init, vfe_thread_guard_fini, VFE_FAULTED
from linux cimport iovec, write, now_ns
from vring cimport Iov, Vring
from virtio cimport VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_DISCARD, \
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_IOERR

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_cond_t:
        pass
    int pthread_create(pthread_t *t, const void *attr, void *(*fn)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t t, void **ret)
    int pthread_mutex_init(pthread_mutex_t *m, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *m)
    int pthread_mutex_lock(pthread_mutex_t *m)
    int pthread_mutex_unlock(pthread_mutex_t *m)
    int pthread_cond_init(pthread_cond_t *c, const void *attr)
    int pthread_cond_destroy(pthread_cond_t *c)
    int pthread_cond_wait(pthread_cond_t *c, pthread_mutex_t *m)
    int pthread_cond_broadcast(pthread_cond_t *c)
    int pthread_cond_signal(pthread_cond_t *c)

cdef extern from "<sys/uio.h>" nogil:
    ssize_t preadv(int fd, const iovec *iov, int iovcnt, long offset)
    ssize_t pwritev(int fd, const iovec *iov, int iovcnt, long offset)

cdef extern from "<fcntl.h>" nogil:
    int fallocate(int fd, int mode, long offset, long length)

cdef extern from "<unistd.h>" nogil:
    int fdatasync(int fd)
    ssize_t pwrite(int fd, const void *buf, size_t count, long offset)

cdef extern from "<time.h>" nogil:
    struct timespec:
        long tv_sec
        long tv_nsec
    int nanosleep(const timespec *req, timespec *rem)

cdef enum:
    FALLOC_PUNCH_HOLE = 0x02     # FALLOC_FL_PUNCH_HOLE
    FALLOC_KEEP_SIZE = 0x01      # FALLOC_FL_KEEP_SIZE
    FALLOC_ZERO_RANGE = 0x10     # FALLOC_FL_ZERO_RANGE
    AIO_STORE = 8192             # per-slot bytes: Iov pieces (341) or ranges (512)
    AIO_MAX_PIECES = 340         # AIO_STORE // sizeof(Iov) (24)
    AIO_MAX_THREADS = 16
    AIO_ZERO_BUF = 65536

cdef enum:
    AIO_READ = VIRTIO_BLK_T_IN           # preadv into the writable pieces
    AIO_WRITE = VIRTIO_BLK_T_OUT         # pwritev from the readable pieces
    AIO_FLUSH = VIRTIO_BLK_T_FLUSH       # fdatasync
    AIO_DISCARD = VIRTIO_BLK_T_DISCARD   # fallocate(PUNCH_HOLE | KEEP_SIZE) per range
    AIO_WRITE_ZEROES = VIRTIO_BLK_T_WRITE_ZEROES  # fallocate(ZERO_RANGE), else pwrite of zeros

ctypedef struct AioRange:
    uint64_t offset              # bytes
    uint64_t length

ctypedef struct AioReq:
    AioReq *next                 # pool queue, then the ring's done list
    void *ring                   # its AioRing
    uint16_t head
    uint8_t op
    uint8_t status               # VIRTIO_BLK_S_* once done
    uint8_t busy                 # queued, running or done but not reaped: head h is outstanding
    uint32_t epoch               # AioRing.epoch when queued (older: abandoned by a stop)
    uint8_t *status_ptr          # the status byte in guest memory
    uint64_t status_gpa
    uint64_t offset              # bytes (read/write)
    uint64_t length              # data bytes (read/write)
    uint32_t data_in             # bytes the guest gets before the status (reads)
    int n                        # pieces (read/write) or ranges (discard/write-zeroes)
    int direct                   # use the O_DIRECT fd
    uint8_t *store               # AIO_STORE bytes: Iov[n] or AioRange[n]
    # --force_in_order (blk_queue.pxi blk_answer_in_order): the worker's only
    uint8_t finished             # done (status byte written), its used entry not pushed yet
    uint64_t nbytes              # the ring's byte count when answered
    int order_next               # the next head taken after this one, or -1

ctypedef struct AioPool:
    pthread_mutex_t mu
    pthread_cond_t cv
    AioReq *head                 # FIFO of queued requests
    AioReq *tail
    int stop
    int nthreads
    int fd                       # the file, buffered
    int dfd                      # the file with O_DIRECT, or -1
    int no_zero_range            # ZERO_RANGE unsupported here: write zeros
    uint64_t submitted
    uint64_t direct_ios          # reads/writes done with O_DIRECT
    uint64_t errors              # syscalls that failed (the request got IOERR)
    pthread_t threads[AIO_MAX_THREADS]

ctypedef struct AioRing:
    int lock                     # the done list: pool threads push, the worker takes
    AioReq *done
    AioReq *reaping              # taken from `done`, being answered (what a fault there leaves)
    int pending                  # queued, running or done but not answered (worker / stopped world)
    uint32_t epoch               # bumped when a stop gives up waiting for `pending`
    int abandoned                # requests of older epochs not reaped yet (their slots stay busy)
    int wake_fd                  # the ring's worker's wake eventfd
    AioReq *slots                # [size], by head
    uint8_t *store               # size * AIO_STORE
    uint16_t size
    # --force_in_order: the heads not answered yet, in the order they were
    # taken (linked through AioReq.order_next; -1: empty)
    int order_first
    int order_last
    int order_given_up           # a stop stopped waiting: answer what finished, in any order


cdef inline Iov *aio_pieces(AioReq *r) noexcept nogil:
    return <Iov *>r.store


cdef inline AioRange *aio_ranges(AioReq *r) noexcept nogil:
    return <AioRange *>r.store


cdef inline int aio_slice(Iov *src, int nsrc, uint64_t skip, uint64_t length, Iov *dst,
                          int max_dst) noexcept nogil:
    """dst = the pieces of src covering [skip, skip + length); their count,
    or -1 if more than max_dst (or src is shorter)."""
    cdef int i = 0, n = 0
    cdef uint64_t take
    while i < nsrc and skip >= src[i].len:
        skip -= src[i].len
        i += 1
    while length > 0 and i < nsrc:
        if n >= max_dst:
            return -1
        take = src[i].len - skip
        if take > length:
            take = length
        dst[n].base = src[i].base + skip
        dst[n].len = <uint32_t>take
        dst[n].gpa = src[i].gpa + skip
        n += 1
        length -= take
        skip = 0
        i += 1
    return n if length == 0 else -1


cdef inline int aio_rw(int fd, int op, Iov *p, int n, uint64_t offset) noexcept nogil:
    """preadv/pwritev of the whole of p[0:n] at offset, resuming after short
    transfers and EINTR.  0, or -errno.  A read past the end of the file
    (shorter than the disk) fills zeros."""
    cdef iovec v[64]
    cdef int i = 0, k
    cdef uint32_t skip = 0
    cdef ssize_t got
    while i < n:
        k = 0
        while k < 64 and i + k < n:
            v[k].iov_base = p[i + k].base + (skip if k == 0 else 0)
            v[k].iov_len = p[i + k].len - (skip if k == 0 else 0)
            k += 1
        if op == AIO_READ:
            got = preadv(fd, v, k, <long>offset)
        else:
            got = pwritev(fd, v, k, <long>offset)
        if got < 0:
            if errno == EINTR:
                continue
            return -errno
        if got == 0:
            if op != AIO_READ:
                return -5                      # EIO: a write that makes no progress
            while i < n:                       # EOF: the rest reads as zeros
                memset(p[i].base + skip, 0, p[i].len - skip)
                skip = 0
                i += 1
            return 0
        offset += <uint64_t>got
        while got > 0:
            if <uint64_t>got >= p[i].len - skip:
                got -= p[i].len - skip
                skip = 0
                i += 1
            else:
                skip += <uint32_t>got
                got = 0
    return 0


cdef inline int aio_zeroes(AioPool *pool, uint64_t offset, uint64_t length) noexcept nogil:
    """WRITE_ZEROES of one range: fallocate(ZERO_RANGE) where the file
    system has it, else plain writes of a zero buffer."""
    cdef uint8_t zeros[AIO_ZERO_BUF]
    cdef uint64_t n
    cdef ssize_t got
    if not pool.no_zero_range:
        if fallocate(pool.fd, FALLOC_ZERO_RANGE | FALLOC_KEEP_SIZE, <long>offset, <long>length) == 0:
            return 0
        if errno != EOPNOTSUPP:
            return -errno
        pool.no_zero_range = 1
    memset(zeros, 0, AIO_ZERO_BUF)
    while length > 0:
        n = length if length < AIO_ZERO_BUF else AIO_ZERO_BUF
        got = pwrite(pool.fd, zeros, n, <long>offset)
        if got < 0:
            if errno == EINTR:
                continue
            return -errno
        offset += <uint64_t>got
        length -= <uint64_t>got
    return 0


cdef inline int aio_execute(AioPool *pool, AioReq *r) noexcept nogil:
    """Run one request's syscalls; 0 or -errno."""
    cdef int i, rc = 0
    cdef AioRange *g
    if r.op == AIO_READ or r.op == AIO_WRITE:
        if r.direct:
            rc = aio_rw(pool.dfd, r.op, aio_pieces(r), r.n, r.offset)
            if rc != -22:                      # EINVAL: the device wants a larger alignment
                if rc == 0:
                    vfe_add_u64(&pool.direct_ios, 1)
                return rc
        return aio_rw(pool.fd, r.op, aio_pieces(r), r.n, r.offset)
    if r.op == AIO_FLUSH:
        return 0 if fdatasync(pool.fd) == 0 else -errno
    g = aio_ranges(r)
    for i in range(r.n):
        if r.op == AIO_DISCARD:
            if fallocate(pool.fd, FALLOC_PUNCH_HOLE | FALLOC_KEEP_SIZE,
                         <long>g[i].offset, <long>g[i].length) != 0:
                return -errno
        else:
            rc = aio_zeroes(pool, g[i].offset, g[i].length)
            if rc < 0:
                return rc
    return 0


cdef inline void aio_complete(AioReq *r, int rc) noexcept nogil:
    """A pool thread finished r: hand it to its ring's worker."""
    cdef AioRing *ring = <AioRing *>r.ring
    cdef uint64_t one = 1
    r.status = VIRTIO_BLK_S_OK if rc == 0 else VIRTIO_BLK_S_IOERR
    if rc != 0:
        r.data_in = 0
    vfe_spin_lock(&ring.lock)
    r.next = ring.done
    ring.done = r
    vfe_spin_unlock(&ring.lock)
    write(ring.wake_fd, &one, 8)


ctypedef struct _AioRun:
    AioPool *pool
    AioReq *r


cdef inline int _aio_run(void *arg) noexcept nogil:
    cdef _AioRun *a = <_AioRun *>arg
    return aio_execute(a.pool, a.r)


cdef inline void *aio_thread(void *arg) noexcept nogil:
    cdef AioPool *pool = <AioPool *>arg
    cdef AioReq *r
    cdef _AioRun run
    cdef int rc
    # The syscalls that move data fail with EFAULT on guest pages that
    # vanished (the front-end shrank its memory file); our own stores there
    # (zero-filling a read past the end of the file) raise SIGBUS, which the
    # guard turns into the same EFAULT: the request gets IOERR, and writing
    # its status byte breaks the device if that page is gone too.
    vfe_thread_guard_init()
    run.pool = pool
    while True:
        pthread_mutex_lock(&pool.mu)
        while pool.head == NULL and not pool.stop:
            pthread_cond_wait(&pool.cv, &pool.mu)
        if pool.head == NULL:                  # stopping, nothing left
            pthread_mutex_unlock(&pool.mu)
            vfe_thread_guard_fini()
            return NULL
        r = pool.head
        pool.head = r.next
        if pool.head == NULL:
            pool.tail = NULL
        pthread_mutex_unlock(&pool.mu)
        run.r = r
        rc = vfe_guarded(_aio_run, &run, NULL, NULL)
        if rc == VFE_FAULTED:
            rc = -EFAULT
        if rc != 0:
            vfe_add_u64(&pool.errors, 1)
        aio_complete(r, rc)


cdef inline void aio_submit(AioPool *pool, AioReq *r) noexcept nogil:
    (<AioRing *>r.ring).pending += 1
    r.next = NULL
    pthread_mutex_lock(&pool.mu)
    if pool.tail == NULL:
        pool.head = r
    else:
        pool.tail.next = r
    pool.tail = r
    pool.submitted += 1
    pthread_cond_signal(&pool.cv)
    pthread_mutex_unlock(&pool.mu)


cdef inline AioReq *aio_take_done(AioRing *ring) noexcept nogil:
    """The ring's completed requests, oldest first."""
    cdef AioReq *lst
    cdef AioReq *rev = NULL
    cdef AioReq *nx
    # a peek without the lock (a pointer is one aligned 64-bit word): most
    # bursts have nothing to reap
    if vfe_load_acquire_u64(<uint64_t *>&ring.done) == 0:
        return NULL
    vfe_spin_lock(&ring.lock)
    lst = ring.done
    ring.done = NULL
    vfe_spin_unlock(&ring.lock)
    while lst != NULL:
        nx = lst.next
        lst.next = rev
        rev = lst
        lst = nx
    return rev


cdef inline void aio_drop_abandoned(AioRing *ring) noexcept nogil:
    """Free the slots of abandoned requests that have finished (the ring is
    stopped: nothing else reaps them).  Requests of the current epoch are
    never here (a stop leaves none behind without abandoning it)."""
    cdef AioReq *r = aio_take_done(ring)
    while r != NULL:
        r.busy = 0
        ring.abandoned -= 1
        r = r.next


cdef inline void aio_nap() noexcept nogil:
    """Wait a little for a pool thread (a stop waiting for in-flight I/O)."""
    cdef timespec ts
    ts.tv_sec = 0
    ts.tv_nsec = 20000
    nanosleep(&ts, NULL)
