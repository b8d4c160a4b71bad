# cython: language_level=3
"""The poll-mode engine: workers (lcores) that own rings and move packets
between net devices through the in-engine switch, without the GIL.

Python decides (which ring on which worker, when a ring starts and stops);
the nogil loop below does.  Control operations "stop the world": they take
every worker's lock, which a worker holds for exactly one poll iteration, so
when a control op runs no burst is in flight anywhere.  That is what makes
GET_VRING_BASE exact and lets memory tables change under running rings.

Lock order: worker locks (ascending index) before ring locks.  A worker
holds only its own lock plus, briefly, one destination RX ring lock.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset
from libc.errno cimport errno
from atomics cimport *
from linux cimport *
from vring cimport *
from netpath cimport *
from switch cimport *
from netdata cimport *
from blk cimport *
from inflight cimport *
from blk_aio cimport *

import os
import threading

ENGINE_ABI = VFE_ENGINE_ABI

# Numba kernels, set once at start-up (vfe.kernels); NULL = slow path drops.
cdef csum_fn_t g_csum = NULL
cdef gso_fn_t g_gso = NULL

ERROR_NAMES = {
    -E_HEAD: "descriptor head index out of range",
    -E_NEXT: "descriptor next index out of range",
    -E_LOOP: "descriptor chain loops or is longer than its table",
    -E_ADDR: "descriptor address outside guest memory",
    -E_INDIRECT: "bad indirect descriptor table",
    -E_NESTED: "nested indirect descriptor table",
    -E_DIR: "descriptor has the wrong direction",
    -E_IOV: "descriptor chain has too many pieces",
    -E_LEN: "zero or oversized descriptor chain",
    -E_AVAIL: "avail index moved by more than the queue size",
    -E_RING: "ring addresses are not in guest memory",
    -E_BLK_HDR: "block request shorter than its 16-byte header",
    -E_BLK_STATUS: "block request has no device-writable status byte",
}


def set_kernels(uint64_t csum_addr, uint64_t gso_addr):
    """Install the Numba cfunc pointers for software checksum and GSO."""
    global g_csum, g_gso
    g_csum = <csum_fn_t><void *>csum_addr
    g_gso = <gso_fn_t><void *>gso_addr


# ---------------------------------------------------------------- blk request queues

cdef uint8_t blk_submit(Worker *w, Vring *vq, BlkDev *d, uint16_t head, int nread, int niov,
                        uint64_t rbytes, uint32_t kind, uint64_t offset, uint32_t nranges,
                        uint32_t data_in) noexcept nogil:
    """Queue a validated file request on the device's pool (blk_aio.pxd).
    BLK_ASYNC once queued; IOERR if its data pieces do not fit a slot (more
    than seg_max allows: a guest bug)."""
    cdef AioRing *ar = &d.aio[vq.index]
    cdef AioReq *r = &ar.slots[head]
    cdef Iov *last = &w.iov[niov - 1]        # the status byte is the chain's last writable byte
    cdef int i
    r.ring = <void *>ar
    r.head = head
    r.status_ptr = last.base + last.len - 1
    r.status_gpa = last.gpa + last.len - 1
    r.data_in = data_in
    r.offset = offset
    r.direct = 0
    if kind == BLK_T_IN:
        r.op = AIO_READ
        r.length = data_in
        r.n = aio_slice(&w.iov[nread], niov - nread, 0, data_in, aio_pieces(r), AIO_MAX_PIECES)
    elif kind == BLK_T_OUT:
        r.op = AIO_WRITE
        r.length = rbytes - BLK_HDR_LEN
        r.n = aio_slice(w.iov, nread, BLK_HDR_LEN, r.length, aio_pieces(r), AIO_MAX_PIECES)
    elif kind == BLK_T_FLUSH:
        r.op = AIO_FLUSH
        r.n = 0
    else:
        r.op = <uint8_t>kind                 # AIO_DISCARD / AIO_WRITE_ZEROES
        memcpy(r.store, w.lin, nranges * sizeof(AioRange))
        r.n = <int>nranges
    if r.n < 0:
        vfe_add_u64(&d.ioerrs, 1)
        return BLK_S_IOERR
    if (r.op == AIO_READ or r.op == AIO_WRITE) and d.pool.dfd >= 0:
        # O_DIRECT wants sector-aligned buffers; anything else goes buffered
        r.direct = 1
        for i in range(r.n):
            if ((<uint64_t>aio_pieces(r)[i].base) | aio_pieces(r)[i].len) & (BLK_SECTOR - 1):
                r.direct = 0
                break
    aio_submit(d.pool, r)
    return BLK_ASYNC


cdef void blk_answer(BlkDev *d, Vring *vq, uint16_t head, uint32_t data_in, uint8_t status,
                     uint64_t nbytes) noexcept nogil:
    """The request at `head` is done (its status byte written and logged):
    its used entry, the last-batch list, the ring's counters."""
    used_push(vq, head, data_in + 1)
    inflight_link(&d.inflight[vq.index], head)
    vq.packets += 1
    vq.bytes += nbytes
    if status != BLK_S_OK:
        vq.dropped += 1


cdef int blk_serve(Worker *w, Vring *vq, BlkDev *d, uint16_t head) noexcept nogil:
    """Serve the request at `head`: walk its chain, run it against the
    backend, write the status byte, log what we wrote into guest memory
    when migrating, and push its used entry (published by the caller).
    Returns 1 if answered, 0 if queued for the I/O threads (answered when
    reaped), or the E_* code that stopped the ring."""
    cdef int c, rc, niov = 0, nread = 0
    cdef uint64_t rbytes = 0, wbytes = 0, offset = 0
    cdef uint32_t data_in, kind = 0, nranges = 0
    cdef uint8_t status
    cdef Iov st
    rc = walk_chain_rw(vq, head, w.iov, MAX_IOV, &niov, &nread, &rbytes, &wbytes)
    if rc == 0 and rbytes < BLK_HDR_LEN:
        rc = E_BLK_HDR
    if rc == 0 and wbytes == 0:
        rc = E_BLK_STATUS
    if rc < 0:
        break_ring(w, vq, rc)
        return rc
    status = blk_request(d, w.iov, nread, niov - nread, rbytes, wbytes, w.lin, &data_in,
                         &kind, &offset, &nranges)
    if status == BLK_ASYNC:
        status = blk_submit(w, vq, d, head, nread, niov, rbytes, kind, offset, nranges, data_in)
        if status == BLK_ASYNC:
            return 0
        data_in = 0
    st.base = &status
    st.len = 1
    sg_copy(&w.iov[nread], niov - nread, <uint32_t>(wbytes - 1), &st, 1, 0, 1)
    if d.log.active:
        vfe_fence()
        for c in range(nread, niov):
            log_pages(&d.log, w.iov[c].gpa, w.iov[c].len)
    blk_answer(d, vq, head, data_in, status,
               data_in if data_in else (rbytes - BLK_HDR_LEN if status == BLK_S_OK else 0))
    return 1


cdef inline void blk_flush_done(Vring *vq, InflightQueue *iq, uint16_t *done, int *ndone) noexcept nogil:
    """Publish used->idx for the answered heads, then clear their inflight marks."""
    used_publish(vq)
    inflight_clear(iq, done, ndone[0], vq.last_used_idx)
    ndone[0] = 0


cdef int blk_reap(Vring *vq, BlkDev *d, uint16_t *done, int *ndone) noexcept nogil:
    """Answer the ring's requests the I/O threads have finished."""
    cdef AioRing *ar
    cdef AioReq *r
    cdef int k, n = 0
    cdef Iov *p
    if d.aio == NULL:
        return 0
    ar = &d.aio[vq.index]
    r = aio_take_done(ar)
    while r != NULL:
        vfe_store_u8(r.status_ptr, r.status)
        if d.log.active:
            vfe_fence()
            if r.op == AIO_READ and r.status == BLK_S_OK:
                p = aio_pieces(r)
                for k in range(r.n):
                    log_pages(&d.log, p[k].gpa, p[k].len)
            log_pages(&d.log, r.status_gpa, 1)
        if r.status != BLK_S_OK:
            vfe_add_u64(&d.ioerrs, 1)
        blk_answer(d, vq, r.head, r.data_in, r.status,
                   r.length if r.status == BLK_S_OK and r.op <= AIO_WRITE else 0)
        ar.pending -= 1
        done[ndone[0]] = r.head
        ndone[0] += 1
        if ndone[0] == BURST:
            blk_flush_done(vq, &d.inflight[vq.index], done, ndone)
        n += 1
        r = r.next
    return n


cdef void blk_quiesce(Worker *w, Vring *vq) noexcept nogil:
    """Before a blk queue stops (world stopped, `w` is scratch): serve the
    resubmissions still queued and wait for every request at the I/O
    threads.  Taken heads must be answered before the stop reports its
    index, and no thread may write into guest memory after it."""
    cdef BlkDev *d = <BlkDev *>vq.dev
    cdef InflightQueue *iq = &d.inflight[vq.index]
    cdef AioRing *ar = &d.aio[vq.index] if d.aio != NULL else NULL
    while True:
        blk_burst(w, vq, 0)
        if ((iq.resubmit_pos >= iq.nresubmit or vq.broken)
                and (ar == NULL or ar.pending == 0)):
            break
        if ar != NULL and ar.pending > 0:
            aio_nap()


cdef inline bint blk_has_work(Vring *vq) noexcept nogil:
    """Something for blk_burst besides new avail entries."""
    cdef BlkDev *d = <BlkDev *>vq.dev
    cdef InflightQueue *iq = &d.inflight[vq.index]
    if iq.resubmit_pos < iq.nresubmit:
        return True
    return d.aio != NULL and vfe_load_acquire_u64(<uint64_t *>&d.aio[vq.index].done) != 0


cdef int blk_burst(Worker *w, Vring *vq, bint take_new=1) noexcept nogil:
    """One pass over a virtio-blk queue (blk.pxd): answer what the I/O
    threads finished, serve the heads a previous process left inflight
    (resubmitted in fetch order), then up to BURST new avail entries;
    publish used->idx, then clear the answered heads' inflight marks."""
    cdef BlkDev *d = <BlkDev *>vq.dev
    cdef InflightQueue *iq = &d.inflight[vq.index]
    cdef uint16_t done[BURST]
    cdef int n, k, rc, ndone = 0, work
    cdef uint16_t head
    work = blk_reap(vq, d, done, &ndone)
    k = 0
    while iq.resubmit_pos < iq.nresubmit and k < BURST and not vq.broken:
        head = inflight_next_resubmit(iq)
        rc = blk_serve(w, vq, d, head)
        if rc < 0:
            break
        k += 1
        if rc > 0:
            done[ndone] = head
            ndone += 1
            if ndone == BURST:
                blk_flush_done(vq, iq, done, &ndone)
    work += k
    if take_new and k < BURST and not vq.broken:
        n = avail_count(vq)
        if n < 0:
            break_ring(w, vq, n)
            n = 0
        if n > BURST - k:
            n = BURST - k
        for k in range(n):
            head = avail_head(vq, vq.last_avail_idx)
            # marked before anything else happens to it: a crash from here
            # on leaves it for the next process to serve
            inflight_take(iq, head)
            rc = blk_serve(w, vq, d, head)
            if rc < 0:
                break
            vq.last_avail_idx += 1
            work += 1
            if rc > 0:
                done[ndone] = head
                ndone += 1
                if ndone == BURST:
                    blk_flush_done(vq, iq, done, &ndone)
    blk_flush_done(vq, iq, done, &ndone)
    return work


# ---------------------------------------------------------------- worker loop

cdef void worker_loop(Worker *w) noexcept nogil:
    """Poll owned TX rings; in adaptive mode sleep on their kick eventfds
    after spin_ns without work (re-checking after re-enabling kicks)."""
    cdef epoll_event evs[64]
    cdef int i, n, work, pending
    cdef int64_t idle_since = 0, t
    cdef uint64_t val
    cdef Vring *vq
    while not vfe_load_acquire_int(&w.stop):
        vfe_spin_lock(&w.lock)
        w.blocked = 0
        work = 0
        for i in range(w.nrings):
            vq = w.rings[i]
            if vq.kind == RING_BLK:
                if ring_usable(vq):
                    work += blk_burst(w, vq)
            elif ring_usable(vq) and not (<NetDev *>vq.dev).paused:
                work += net_tx_burst(w, vq)
        for i in range(w.ntaps):
            if not w.taps[i].paused:
                work += tap_in(w, w.taps[i])
        w.iterations += 1
        vfe_spin_unlock(&w.lock)
        if work:
            idle_since = 0
            continue
        if w.mode == 0:
            vfe_cpu_relax()
            continue
        t = now_ns()
        if idle_since == 0:
            idle_since = t
        if t - idle_since < w.spin_ns:
            vfe_cpu_relax()
            continue
        vfe_spin_lock(&w.lock)
        for i in range(w.nrings):
            if ring_usable(w.rings[i]):
                notify_enable(w.rings[i])
        vfe_fence()
        pending = 0
        for i in range(w.nrings):
            vq = w.rings[i]
            if ring_usable(vq) and (avail_count(vq) != 0
                                    or (vq.kind == RING_BLK and blk_has_work(vq))):
                pending = 1
        vfe_spin_unlock(&w.lock)
        if not pending:
            w.sleeps += 1
            n = epoll_wait(w.epfd, evs, 64, 1 if w.blocked else 1000)
            for i in range(n if n > 0 else 0):
                if evs[i].data.fd >= 0:       # kick/wake eventfds; TAP fds are read by tap_in
                    read(evs[i].data.fd, &val, 8)
        vfe_spin_lock(&w.lock)
        for i in range(w.nrings):
            if w.rings[i].ready:
                notify_disable(w.rings[i])
        vfe_spin_unlock(&w.lock)
        idle_since = 0


cdef Worker *worker_new(Switch *sw, int mode, int64_t spin_ns, int event_fd) except NULL:
    cdef Worker *w = <Worker *>calloc(1, sizeof(Worker))
    cdef epoll_event ev
    if w == NULL:
        raise MemoryError()
    w.lin = <uint8_t *>malloc(LIN_CAP)
    w.seg = <uint8_t *>malloc(SEG_CAP)
    w.tap_buf = <uint8_t *>malloc(LIN_CAP + 12)
    w.sw = sw
    w.mode = mode
    w.spin_ns = spin_ns
    w.event_fd = event_fd
    w.epfd = epoll_create1(EPOLL_CLOEXEC)
    w.wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
    if w.lin == NULL or w.seg == NULL or w.tap_buf == NULL or w.epfd < 0 or w.wake_fd < 0:
        worker_free(w)
        raise OSError(errno, "worker set-up failed")
    ev.events = EPOLLIN
    ev.data.fd = w.wake_fd
    epoll_ctl(w.epfd, EPOLL_CTL_ADD, w.wake_fd, &ev)
    return w


cdef void worker_free(Worker *w) noexcept nogil:
    if w.epfd > 0:
        close(w.epfd)
    if w.wake_fd > 0:
        close(w.wake_fd)
    free(w.lin)
    free(w.seg)
    free(w.tap_buf)
    free(w)


cdef void worker_wake(Worker *w) noexcept nogil:
    cdef uint64_t one = 1
    write(w.wake_fd, &one, 8)


# ---------------------------------------------------------------- Python API

cdef class Engine:
    """Workers plus the switch that joins the net devices.

    Engine(workers=1, mode="adaptive"|"poll", spin_us=50)
    """
    cdef Switch *sw
    cdef Worker **workers
    cdef Worker *ctl          # scratch for frames injected from Python (RARP)
    cdef readonly int nworkers
    cdef readonly str mode
    cdef readonly int event_fd
    cdef object threads
    cdef object devices
    cdef object blk_devices
    cdef object _lock
    cdef int next_slot

    def __cinit__(self, int workers=1, str mode="adaptive", int spin_us=50):
        cdef int i
        if workers < 1 or workers > 64:
            raise ValueError("workers must be in 1..64")
        if mode not in ("poll", "adaptive"):
            raise ValueError("mode must be 'poll' or 'adaptive'")
        self.mode = mode
        self.nworkers = workers
        self.threads = []
        self.devices = []
        self.blk_devices = []
        self._lock = threading.RLock()
        self.event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        self.sw = <Switch *>calloc(1, sizeof(Switch))
        self.workers = <Worker **>calloc(workers, sizeof(Worker *))
        if self.sw == NULL or self.workers == NULL:
            raise MemoryError()
        for i in range(workers):
            self.workers[i] = worker_new(self.sw, 0 if mode == "poll" else 1,
                                         <int64_t>spin_us * 1000, self.event_fd)
        self.ctl = worker_new(self.sw, 1, 0, self.event_fd)

    def __dealloc__(self):
        cdef int i
        self._join()
        if self.workers != NULL:
            for i in range(self.nworkers):
                if self.workers[i] != NULL:
                    worker_free(self.workers[i])
            free(self.workers)
        if self.ctl != NULL:
            worker_free(self.ctl)
        free(self.sw)
        if self.event_fd >= 0:
            close(self.event_fd)

    def start(self):
        """Start one thread per worker (named vfe-lcoreN)."""
        cdef int i
        if self.threads:
            return
        for i in range(self.nworkers):
            self.workers[i].csum = g_csum
            self.workers[i].gso = g_gso
        self.ctl.csum = g_csum
        self.ctl.gso = g_gso
        for i in range(self.nworkers):
            t = threading.Thread(target=self._run, args=(i,), name=f"vfe-lcore{i}", daemon=True)
            self.threads.append(t)
            t.start()

    def _run(self, int i):
        cdef Worker *w = self.workers[i]
        with nogil:
            worker_loop(w)

    def stop(self):
        """Stop the workers and wait for them.  Rings stay as they are."""
        self._join()

    cdef _join(self):
        cdef int i
        if self.workers == NULL:
            return
        for i in range(self.nworkers):
            vfe_store_release_int(&self.workers[i].stop, 1)
            worker_wake(self.workers[i])
        for t in self.threads or ():
            t.join()
        self.threads = []
        for i in range(self.nworkers):
            self.workers[i].stop = 0

    cdef void stop_world(self) noexcept nogil:
        cdef int i
        for i in range(self.nworkers):
            vfe_spin_lock(&self.workers[i].lock)

    cdef void start_world(self) noexcept nogil:
        cdef int i
        for i in range(self.nworkers - 1, -1, -1):
            vfe_spin_unlock(&self.workers[i].lock)

    def new_net_device(self, int num_queues):
        """A net device with `num_queues` rings (RX 2k, TX 2k+1), on a new switch port."""
        return NetDevice(self, num_queues)

    def new_blk_device(self, int num_queues, uint64_t capacity_bytes, int block_size=512,
                       str backend="null", bint read_only=False, serial="", **limits):
        # backend "file" needs limits["path"]: the file is mapped MAP_SHARED and
        # served like RAM; FLUSH msyncs it
        """A virtio-blk device with `num_queues` request queues over a null
        (reads zeros, drops writes) or malloc (RAM) backend of
        `capacity_bytes`.  `limits`: max_discard_sectors, max_discard_seg,
        max_write_zeroes_sectors, max_write_zeroes_seg (the config space's)."""
        return BlkDevice(self, num_queues, capacity_bytes, block_size, backend, read_only,
                         serial, **limits)

    def broken_rings(self):
        """Rings that stopped on a guest error since the last call:
        [(device, ring index, reason)].  Drains the engine's event fd."""
        cdef uint64_t val
        cdef NetDevice d
        cdef Vring *vq
        cdef int i
        read(self.event_fd, &val, 8)
        out = []
        with self._lock:
            for d in list(self.devices):
                if d.d == NULL:
                    continue
                for i in range(d.d.num_vqs):
                    vq = &d.d.vqs[i]
                    if vq.broken and not vq.reported:
                        vq.reported = 1
                        out.append((d, i, ERROR_NAMES.get(vq.broken, f"error {vq.broken}")))
            for b in list(self.blk_devices):
                out.extend(b._broken())
        return out

    def worker_stats(self):
        return [{"worker": i, "rings": self.workers[i].nrings,
                 "iterations": self.workers[i].iterations,
                 "sleeps": self.workers[i].sleeps} for i in range(self.nworkers)]

    cdef int _attach(self, NetDevice dev) except -1:
        cdef int p
        with self._lock:
            for p in range(MAX_PORTS):
                if self.sw.ports[p] == NULL:
                    break
            else:
                raise RuntimeError("switch has no free port")
            with nogil:
                self.stop_world()
                sw_forget_port(self.sw, p)
                self.sw.ports[p] = dev.d
                if p + 1 > self.sw.nports:
                    self.sw.nports = p + 1
                self.start_world()
            dev.d.port = p
            self.devices.append(dev)
            dev.slot = self.next_slot
            self.next_slot += 1
        return 0

    cdef _detach(self, NetDevice dev):
        cdef int p = dev.d.port
        with self._lock:
            with nogil:
                self.stop_world()
                if p >= 0:
                    self.sw.ports[p] = NULL
                    sw_forget_port(self.sw, p)
                    while self.sw.nports > 0 and self.sw.ports[self.sw.nports - 1] == NULL:
                        self.sw.nports -= 1
                self.start_world()
            dev.d.port = -1
            if dev in self.devices:
                self.devices.remove(dev)


cdef int translate_ring(Vring *vq) noexcept nogil:
    # avail_event/used_event (2 bytes each) exist only with EVENT_IDX (2.7.6)
    cdef uint64_t sz = vq.size, ev = 2 if vq.event_idx else 0
    cdef uint64_t d = contig_hva(vq.mem, vq.desc_uva, 16 * sz, True)
    cdef uint64_t a = contig_hva(vq.mem, vq.avail_uva, 4 + 2 * sz + ev, True)
    cdef uint64_t u = contig_hva(vq.mem, vq.used_uva, 4 + 8 * sz + ev, True)
    if d == 0 or a == 0 or u == 0 or (d & 15) or (a & 1) or (u & 3):
        return E_RING
    vq.desc = <uint8_t *>d
    vq.avail = <uint16_t *>a
    vq.used = <uint8_t *>u
    return 0


cdef ring_start(Engine e, Vring *vq, int index, int size, uint64_t desc_uva, uint64_t avail_uva,
                uint64_t used_uva, int base, int kick_fd, int call_fd, bint enabled,
                bint log_used, uint64_t log_guest_addr, bint polled, InflightQueue *iq=NULL):
    """Start a ring at avail index `base` (stop-the-world).  `polled` rings
    (net TX, every blk queue) join their worker's list and its epoll set.

    With an inflight region (`iq`, blk queues after SET_INFLIGHT_FD) the
    region decides instead of `base`: heads left inflight are queued for
    resubmission and the ring continues at used->idx + their number.
    Returns None (no region), -1 (a new region, `base` stands) or the
    number of heads resubmitted."""
    cdef Worker *w = e.workers[vq.worker]
    cdef epoll_event ev
    cdef _IfEntry *scratch = NULL
    cdef uint16_t *resubmit = NULL
    cdef int rc
    recovered = None
    if size <= 0 or size > 32768 or (size & (size - 1)):
        raise ValueError(f"ring size {size} is not a power of two <= 32768")
    if vq.ready:
        raise RuntimeError(f"ring {index} is already started")
    if iq != NULL and iq.region != NULL:
        scratch = <_IfEntry *>malloc(size * sizeof(_IfEntry))
        resubmit = <uint16_t *>malloc(size * sizeof(uint16_t))
        if scratch == NULL or resubmit == NULL:
            free(scratch)
            free(resubmit)
            raise MemoryError()
    with nogil:
        e.stop_world()
    try:
        vq.size = size
        vq.mask = size - 1
        vq.desc_uva = desc_uva
        vq.avail_uva = avail_uva
        vq.used_uva = used_uva
        if translate_ring(vq) < 0:
            raise ValueError(f"ring {index}: addresses are not inside guest memory")
        vq.last_avail_idx = base
        vq.shadow_avail_idx = base
        vq.last_used_idx = vfe_load_u16(<uint16_t *>(vq.used + 2))
        vq.flushed_used_idx = vq.last_used_idx
        if resubmit != NULL:
            free(iq.resubmit)
            iq.resubmit, resubmit = resubmit, NULL
            iq.nresubmit = iq.resubmit_pos = 0
            rc = inflight_recover(iq, <uint16_t>size, vq.last_used_idx, scratch)
            if rc == IF_BAD_SIZE:
                raise ValueError(f"ring {index}: the inflight region tracks "
                                 f"{vfe_load_u16(<uint16_t *>(iq.region + IF_DESC_NUM))} "
                                 f"entries, the ring has {size}")
            if rc >= 0:
                vq.last_avail_idx = <uint16_t>(vq.last_used_idx + rc)
                vq.shadow_avail_idx = vq.last_avail_idx
            recovered = rc
        vq.kick_fd = kick_fd
        vq.call_fd = call_fd
        vq.enabled = enabled
        vq.log_used = log_used
        vq.log_guest_addr = log_guest_addr
        vq.broken = 0
        vq.reported = 0
        vq.stall_ns = 0
        notify_disable(vq)
        if polled:
            if w.nrings >= MAX_WORKER_RINGS:
                raise RuntimeError("worker has too many rings")
            w.rings[w.nrings] = vq
            w.nrings += 1
            if kick_fd >= 0:
                ev.events = EPOLLIN
                ev.data.fd = kick_fd
                epoll_ctl(w.epfd, EPOLL_CTL_ADD, kick_fd, &ev)
        vq.ready = 1
    finally:
        with nogil:
            e.start_world()
            worker_wake(w)
        free(scratch)
        free(resubmit)
    return recovered


cdef uint16_t ring_stop(Engine e, Vring *vq, bint polled) noexcept:
    """Stop a ring; return the next avail index it would process.  A blk
    queue first finishes the heads it took (resubmissions not yet served),
    so the index is exact: nothing below it is left unanswered."""
    cdef Worker *w = e.workers[vq.worker]
    cdef Worker *ctl = e.ctl
    cdef int i
    cdef uint16_t base
    e._lock.acquire()            # e.ctl's scratch space is shared with inject()
    with nogil:
        e.stop_world()
        if vq.kind == RING_BLK and vq.ready:
            blk_quiesce(ctl, vq)
        vfe_spin_lock(&vq.lock)
        if vq.ready:
            vq.ready = 0
            for i in range(w.nrings):
                if w.rings[i] == vq:
                    w.rings[i] = w.rings[w.nrings - 1]
                    w.nrings -= 1
                    break
            if vq.kick_fd >= 0 and polled:
                epoll_ctl(w.epfd, EPOLL_CTL_DEL, vq.kick_fd, NULL)
        vq.kick_fd = -1
        vq.call_fd = -1
        base = vq.last_avail_idx
        vfe_spin_unlock(&vq.lock)
        e.start_world()
    e._lock.release()
    return base


cdef class RingDevice:
    """What every device's rings share: the ring control the device adapter
    (vfe/devices/adapter.py) calls from the daemon's control thread.  A
    subclass points vqs/nvqs/mem/log/features at its C struct."""
    cdef Engine engine
    cdef Vring *vqs
    cdef int nvqs
    cdef MemTable *mem
    cdef DirtyLog *log
    cdef uint64_t *features
    cdef public int slot
    cdef public object owner

    def __cinit__(self, *args, **kwargs):
        self.vqs = NULL

    cdef bint _polled(self, int index):
        """Whether a worker polls this ring (net: TX only; blk: every queue)."""
        return True

    cdef InflightQueue *_inflight(self, int index):
        """The ring's inflight tracking (blk queues), NULL if none."""
        return NULL

    cdef Vring *_ring(self, int index) except NULL:
        if self.vqs == NULL:
            raise RuntimeError("device is closed")
        if index < 0 or index >= self.nvqs:
            raise IndexError(f"ring {index} out of range 0..{self.nvqs - 1}")
        return &self.vqs[index]

    @property
    def num_rings(self):
        return self.nvqs

    @property
    def logging(self):
        """Dirty logging active (LOG_ALL acked and a log mapped)."""
        return self.log != NULL and bool(self.log.active)

    def set_memory(self, regions):
        """Replace the memory table: [(gpa, size, uva, hva), ...].  Running
        rings are re-translated; one that no longer maps stops (E_RING)."""
        cdef MemTable mt
        cdef int i = 0
        cdef Engine e = self.engine
        if len(regions) > MAX_REGIONS:
            raise ValueError(f"at most {MAX_REGIONS} memory regions")
        memset(&mt, 0, sizeof(MemTable))
        for gpa, size, uva, hva in regions:
            mt.r[i].gpa = gpa
            mt.r[i].size = size
            mt.r[i].uva = uva
            mt.r[i].hva = hva
            i += 1
        mt.n = i
        with nogil:
            e.stop_world()
            memcpy(self.mem, &mt, sizeof(MemTable))
            for i in range(self.nvqs):
                if self.vqs[i].ready and translate_ring(&self.vqs[i]) < 0:
                    self.vqs[i].broken = -E_RING
            e.start_world()

    def set_log(self, uint64_t hva, uint64_t size):
        """Use the dirty log mapped at hva (0 to stop).  The caller unmaps the
        previous log only after this returns."""
        cdef Engine e = self.engine
        with nogil:
            e.stop_world()
            self.log.base = <uint8_t *>hva
            self.log.size = size if hva else 0
            self.log.active = ((self.features[0] >> 26) & 1) and hva != 0
            e.start_world()

    def start_ring(self, int index, int size, uint64_t desc_uva, uint64_t avail_uva,
                   uint64_t used_uva, int base, int kick_fd, int call_fd, bint enabled,
                   bint log_used=False, uint64_t log_guest_addr=0):
        """Start a ring at avail index `base`.  Raises ValueError if its
        addresses are not inside the memory table.  Returns what ring_start
        says about an inflight region (None: not tracked)."""
        return ring_start(self.engine, self._ring(index), index, size, desc_uva, avail_uva,
                          used_uva, base, kick_fd, call_fd, enabled, log_used, log_guest_addr,
                          self._polled(index), self._inflight(index))

    def stop_ring(self, int index):
        """Stop a ring and return the next avail index it would process
        (the GET_VRING_BASE answer).  No worker touches it afterwards."""
        return ring_stop(self.engine, self._ring(index), self._polled(index))

    def enable_ring(self, int index, bint enabled):
        cdef Vring *vq = self._ring(index)
        cdef Engine e = self.engine
        with nogil:
            e.stop_world()
            vq.enabled = enabled
            e.start_world()
            worker_wake(e.workers[vq.worker])

    def set_call_fd(self, int index, int fd):
        cdef Vring *vq = self._ring(index)
        cdef Engine e = self.engine
        with nogil:
            e.stop_world()
            vfe_spin_lock(&vq.lock)
            vq.call_fd = fd
            vfe_spin_unlock(&vq.lock)
            e.start_world()

    def ring_state(self, int index):
        cdef Vring *vq = self._ring(index)
        return {
            "index": index, "size": vq.size, "ready": bool(vq.ready),
            "enabled": bool(vq.enabled), "broken": vq.broken,
            "error": ERROR_NAMES.get(vq.broken, "") if vq.broken else "",
            "last_avail_idx": vq.last_avail_idx, "last_used_idx": vq.last_used_idx,
            "worker": vq.worker,
        }


cdef class NetDevice(RingDevice):
    """The engine's side of one virtio-net device: its rings, its memory
    table and its switch port.  Methods are called by the device adapter
    (vfe/devices/net.py) from the daemon's control thread."""
    cdef NetDev *d

    def __cinit__(self, Engine engine, int num_queues):
        cdef int i
        if num_queues < 2 or num_queues > 256 or num_queues % 2:
            raise ValueError("a net device has 2..256 rings, an even number")
        self.engine = engine
        self.d = <NetDev *>calloc(1, sizeof(NetDev))
        if self.d == NULL:
            raise MemoryError()
        self.d.vqs = <Vring *>calloc(num_queues, sizeof(Vring))
        self.d.mem = <MemTable *>calloc(1, sizeof(MemTable))
        if self.d.vqs == NULL or self.d.mem == NULL:
            raise MemoryError()
        self.d.num_vqs = num_queues
        self.d.hdr_len = 12
        self.d.port = -1
        self.d.tap_fd = -1
        for i in range(num_queues):
            self.d.vqs[i].index = i
            self.d.vqs[i].dev = <void *>self.d
            self.d.vqs[i].mem = self.d.mem
            self.d.vqs[i].log = &self.d.log
            self.d.vqs[i].kick_fd = -1
            self.d.vqs[i].call_fd = -1
            self.d.vqs[i].worker = (engine.next_slot + i // 2) % engine.nworkers
        self.vqs, self.nvqs, self.mem = self.d.vqs, num_queues, self.d.mem
        self.log, self.features = &self.d.log, &self.d.features
        engine._attach(self)

    def __dealloc__(self):
        self.vqs = NULL
        if self.d != NULL:
            free(self.d.vqs)
            free(self.d.mem)
            free(self.d)
            self.d = NULL

    @property
    def port(self):
        return self.d.port if self.d != NULL else -1

    def set_features(self, uint64_t features):
        """Apply negotiated virtio features (header length, offloads, ring features)."""
        cdef int i
        cdef int v1 = (features >> 32) & 1
        cdef int mrg = (features >> 15) & 1
        cdef Engine e = self.engine
        with nogil:
            e.stop_world()
            self.d.features = features
            self.d.mrg_rxbuf = mrg
            self.d.hdr_len = 12 if (v1 or mrg) else 10
            self.d.guest_csum = (features >> 1) & 1
            self.d.guest_tso4 = (features >> 7) & 1
            self.d.guest_tso6 = (features >> 8) & 1
            self.d.guest_ecn = (features >> 9) & 1
            self.d.log.active = ((features >> 26) & 1) and self.d.log.base != NULL
            for i in range(self.d.num_vqs):
                self.d.vqs[i].event_idx = (features >> 29) & 1
                self.d.vqs[i].indirect = (features >> 28) & 1
            e.start_world()

    cdef bint _polled(self, int index):
        return index & 1          # workers poll the TX rings; RX rings are filled by senders

    def set_tap(self, int fd):
        """Connect the device to a representor TAP fd (non-blocking, with a
        12-byte vnet header): guest frames go to it and frames read from it
        go to the guest.  The device leaves the switch.  -1 goes back to the
        switch.  The fd stays the caller's; detach before closing it."""
        cdef Engine e = self.engine
        cdef Worker *w = e.workers[self.d.vqs[1].worker if self.d.num_vqs > 1 else 0]
        cdef epoll_event ev
        cdef int i, p = self.d.port
        with nogil:
            e.stop_world()
            if self.d.tap_fd >= 0:
                epoll_ctl(w.epfd, EPOLL_CTL_DEL, self.d.tap_fd, NULL)
                for i in range(w.ntaps):
                    if w.taps[i] == self.d:
                        w.taps[i] = w.taps[w.ntaps - 1]
                        w.ntaps -= 1
                        break
            self.d.tap_fd = fd
            if fd >= 0:
                w.taps[w.ntaps] = self.d
                w.ntaps += 1
                ev.events = EPOLLIN
                ev.data.fd = -1 - fd          # not drained by the wake-up loop: tap_in reads it
                epoll_ctl(w.epfd, EPOLL_CTL_ADD, fd, &ev)
                if p >= 0:
                    e.sw.ports[p] = NULL
                    sw_forget_port(e.sw, p)
            elif p >= 0:
                e.sw.ports[p] = self.d
            e.start_world()
            worker_wake(w)

    def set_paused(self, bint paused):
        """Quiesce (True) or resume the data path: no guest TX is taken (it
        waits in the ring, nothing lost) and nothing is delivered to the guest."""
        cdef Engine e = self.engine
        with nogil:
            e.stop_world()
            self.d.paused = paused
            e.start_world()
        for i in range(self.d.num_vqs):
            worker_wake(e.workers[self.d.vqs[i].worker])

    @property
    def paused(self):
        return bool(self.d.paused)

    def tap_stats(self):
        return {"tap_rx_dropped": self.d.tap_rx_dropped}

    def offload_stats(self):
        """Frames whose offloads this device did not negotiate, finished in software."""
        return {"sw_csum": self.d.sw_csum, "sw_gso": self.d.sw_gso}

    def ring_stats(self, int index):
        cdef Vring *vq = self._ring(index)
        return {"packets": vq.packets, "bytes": vq.bytes, "errors": vq.errors,
                "dropped": vq.dropped, "interrupts": vq.calls}

    def inject(self, bytes frame, int pair=0):
        """Switch one frame as if the guest had sent it on queue pair `pair`
        (used for SEND_RARP: the switch learns the MAC and floods it)."""
        cdef Engine e = self.engine
        cdef Worker *w = e.ctl
        cdef Iov src
        cdef uint8_t buf[12 + 1518]
        cdef uint32_t n = len(frame)
        if n < 14 or n > 1518:
            raise ValueError("frame must be 14..1518 bytes")
        memset(buf, 0, 12 + n)
        memcpy(buf + self.d.hdr_len, <char *>frame, n)
        src.base = buf
        src.len = self.d.hdr_len + n
        with e._lock:
            switch_frame(w, self.d, pair, &src, 1, src.len)
            flush_rx(w)

    def close(self):
        """Stop every ring and leave the switch."""
        cdef int i
        if self.d == NULL or self.d.port < 0:
            return
        if self.d.tap_fd >= 0:
            self.set_tap(-1)
        for i in range(self.d.num_vqs):
            self.stop_ring(i)
        self.engine._detach(self)



cdef class BlkDevice(RingDevice):
    """The engine's side of one virtio-blk device: its request queues, its
    memory table and its backend (null or malloc).  Same ring-control
    methods as NetDevice, so the device adapter's Session drives it alike."""
    cdef BlkDev *d

    def __cinit__(self, Engine engine, int num_queues, uint64_t capacity_bytes, int block_size,
                  str backend, bint read_only, serial, uint32_t max_discard_sectors=65536,
                  uint32_t max_discard_seg=32, uint32_t max_write_zeroes_sectors=65536,
                  uint32_t max_write_zeroes_seg=32, path=None, bint direct=False,
                  int aio_threads=4):
        cdef int i, rc
        if num_queues < 1 or num_queues > 256:
            raise ValueError("a blk device has 1..256 queues")
        if block_size < 512 or block_size > 65536 or (block_size & (block_size - 1)):
            raise ValueError(f"block size {block_size} is not a power of two in 512..65536")
        if capacity_bytes == 0 or capacity_bytes % block_size:
            raise ValueError(f"capacity {capacity_bytes} is not a positive multiple of the block size")
        if backend not in ("null", "malloc", "file"):
            raise ValueError(f"backend {backend!r}: use null, malloc or file")
        if backend == "file" and not path:
            raise ValueError("a file backend needs path=")
        sb = serial.encode() if isinstance(serial, str) else bytes(serial)
        if len(sb) > BLK_ID_LEN:
            raise ValueError(f"serial is longer than {BLK_ID_LEN} bytes")
        if max_discard_seg > BLK_MAX_RANGES or max_write_zeroes_seg > BLK_MAX_RANGES:
            raise ValueError(f"at most {BLK_MAX_RANGES} discard/write-zeroes ranges per request")
        self.engine = engine
        self.d = <BlkDev *>calloc(1, sizeof(BlkDev))
        if self.d == NULL:
            raise MemoryError()
        self.d.vqs = <Vring *>calloc(num_queues, sizeof(Vring))
        self.d.mem = <MemTable *>calloc(1, sizeof(MemTable))
        self.d.inflight = <InflightQueue *>calloc(num_queues, sizeof(InflightQueue))
        if self.d.vqs == NULL or self.d.mem == NULL or self.d.inflight == NULL:
            raise MemoryError()
        self.d.num_vqs = num_queues
        self.d.fd = -1
        if backend == "malloc":
            # calloc of a large block is fresh zero pages: RAM is used as written
            self.d.data = <uint8_t *>calloc(1, capacity_bytes)
            if self.d.data == NULL:
                raise MemoryError(f"cannot allocate a {capacity_bytes}-byte malloc bdev")
            self.d.backend = BACKEND_MALLOC
        elif backend == "file":
            if aio_threads < 1 or aio_threads > AIO_MAX_THREADS:
                raise ValueError(f"aio_threads must be in 1..{AIO_MAX_THREADS}")
            self._open_file(path, capacity_bytes, read_only, direct, aio_threads)
        else:
            self.d.backend = BACKEND_NULL
        self.d.num_vqs = num_queues
        self.d.capacity = capacity_bytes // BLK_SECTOR
        self.d.block_size = block_size
        self.d.read_only = read_only
        memcpy(self.d.serial, <char *>sb, len(sb))
        self.d.max_discard_sectors = max_discard_sectors
        self.d.max_discard_seg = max_discard_seg
        self.d.max_write_zeroes_sectors = max_write_zeroes_sectors
        self.d.max_write_zeroes_seg = max_write_zeroes_seg
        for i in range(num_queues):
            self.d.vqs[i].index = i
            self.d.vqs[i].kind = RING_BLK
            self.d.vqs[i].dev = <void *>self.d
            self.d.vqs[i].mem = self.d.mem
            self.d.vqs[i].log = &self.d.log
            self.d.vqs[i].kick_fd = -1
            self.d.vqs[i].call_fd = -1
            self.d.vqs[i].worker = (engine.next_slot + i) % engine.nworkers
        self.vqs, self.nvqs, self.mem = self.d.vqs, num_queues, self.d.mem
        self.log, self.features = &self.d.log, &self.d.features
        with engine._lock:
            self.slot = engine.next_slot
            engine.next_slot += 1
            engine.blk_devices.append(self)

    cdef _open_file(self, path, uint64_t capacity_bytes, bint read_only, bint direct, int nthreads):
        """The file (grown to the capacity if shorter), an O_DIRECT fd of it
        with `direct`, and the I/O threads (blk_aio.pxd)."""
        cdef AioPool *pool
        cdef int i, rc
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        fd = os.open(path, flags)
        dfd = -1
        try:
            if os.fstat(fd).st_size < capacity_bytes:
                if read_only:
                    raise ValueError(f"{path} is smaller than {capacity_bytes} bytes")
                os.ftruncate(fd, capacity_bytes)
            if direct:
                try:
                    dfd = os.open(path, flags | os.O_DIRECT)
                except OSError as exc:
                    raise OSError(exc.errno, f"{path}: O_DIRECT is not available here "
                                             f"({exc.strerror})") from None
            pool = <AioPool *>calloc(1, sizeof(AioPool))
            self.d.aio = <AioRing *>calloc(self.d.num_vqs, sizeof(AioRing))
            if pool == NULL or self.d.aio == NULL:
                free(pool)
                raise MemoryError()
        except BaseException:
            os.close(fd)
            if dfd >= 0:
                os.close(dfd)
            raise
        pthread_mutex_init(&pool.mu, NULL)
        pthread_cond_init(&pool.cv, NULL)
        pool.fd = fd
        pool.dfd = dfd
        self.d.pool = pool
        self.d.fd = fd
        self.d.backend = BACKEND_FILE
        for i in range(nthreads):
            rc = pthread_create(&pool.threads[i], NULL, aio_thread, <void *>pool)
            if rc != 0:
                raise OSError(rc, "cannot start the file bdev's I/O threads")
            pool.nthreads += 1

    cdef _stop_pool(self):
        """Stop and join the I/O threads (every ring is stopped: nothing is queued)."""
        cdef AioPool *pool = self.d.pool
        cdef int i
        if pool == NULL:
            return
        with nogil:
            pthread_mutex_lock(&pool.mu)
            pool.stop = 1
            pthread_cond_broadcast(&pool.cv)
            pthread_mutex_unlock(&pool.mu)
            for i in range(pool.nthreads):
                pthread_join(pool.threads[i], NULL)
        pool.nthreads = 0

    def __dealloc__(self):
        cdef int i
        self.vqs = NULL
        if self.d != NULL:
            if self.d.pool != NULL:
                self._stop_pool()
                pthread_mutex_destroy(&self.d.pool.mu)
                pthread_cond_destroy(&self.d.pool.cv)
                close(self.d.pool.fd)
                if self.d.pool.dfd >= 0:
                    close(self.d.pool.dfd)
                free(self.d.pool)
            if self.d.aio != NULL:
                for i in range(self.d.num_vqs):
                    free(self.d.aio[i].slots)
                    free(self.d.aio[i].store)
                free(self.d.aio)
            free(self.d.data)
            if self.d.inflight != NULL:
                for i in range(self.d.num_vqs):
                    free(self.d.inflight[i].resubmit)
                free(self.d.inflight)
            free(self.d.vqs)
            free(self.d.mem)
            free(self.d)
            self.d = NULL

    @property
    def port(self):
        return -1                 # not on the switch

    @property
    def capacity(self):
        """Size in 512-byte sectors."""
        return self.d.capacity

    @property
    def block_size(self):
        return self.d.block_size

    @property
    def read_only(self):
        return bool(self.d.read_only)

    @property
    def backend(self):
        if self.d.backend == BACKEND_FILE:
            return "file"
        return "malloc" if self.d.backend == BACKEND_MALLOC else "null"

    @property
    def direct(self):
        """The file bdev does sector-aligned reads and writes with O_DIRECT."""
        return self.d.pool != NULL and self.d.pool.dfd >= 0

    def aio_stats(self):
        """The file bdev's I/O threads: requests queued so far, failed syscalls."""
        if self.d.pool == NULL:
            return {}
        return {"threads": self.d.pool.nthreads, "submitted": self.d.pool.submitted,
                "direct": self.d.pool.direct_ios, "errors": self.d.pool.errors}

    def start_ring(self, int index, int size, uint64_t desc_uva, uint64_t avail_uva,
                   uint64_t used_uva, int base, int kick_fd, int call_fd, bint enabled,
                   bint log_used=False, uint64_t log_guest_addr=0):
        """RingDevice.start_ring, after giving a file bdev's queue its
        request slots (one per head; the ring is stopped, none is in use)."""
        cdef Vring *vq = self._ring(index)
        cdef AioRing *ar
        cdef int i
        if self.d.aio != NULL and not vq.ready:
            ar = &self.d.aio[index]
            if ar.size != size and 0 < size <= 32768:
                free(ar.slots)
                free(ar.store)
                ar.slots = <AioReq *>calloc(size, sizeof(AioReq))
                ar.store = <uint8_t *>malloc(<size_t>size * AIO_STORE)
                ar.size = 0
                if ar.slots == NULL or ar.store == NULL:
                    raise MemoryError(f"ring {index}: no memory for {size} request slots")
                for i in range(size):
                    ar.slots[i].store = ar.store + <size_t>i * AIO_STORE
                ar.size = size
            ar.wake_fd = self.engine.workers[vq.worker].wake_fd
        return RingDevice.start_ring(self, index, size, desc_uva, avail_uva, used_uva, base,
                                     kick_fd, call_fd, enabled, log_used, log_guest_addr)

    def set_features(self, uint64_t features):
        """Apply negotiated virtio features (ring features, DISCARD/WRITE_ZEROES)."""
        cdef int i
        cdef Engine e = self.engine
        with nogil:
            e.stop_world()
            self.d.features = features
            self.d.log.active = ((features >> 26) & 1) and self.d.log.base != NULL
            for i in range(self.d.num_vqs):
                self.d.vqs[i].event_idx = (features >> 29) & 1
                self.d.vqs[i].indirect = (features >> 28) & 1
            e.start_world()

    cdef InflightQueue *_inflight(self, int index):
        return &self.d.inflight[index]

    def set_inflight(self, uint64_t hva, uint64_t stride, int num_queues):
        """Track queue i (< num_queues) in the inflight region at hva + i *
        stride from its next start (0: stop tracking).  The caller unmaps an
        old region only after this returns; queues the region does not
        cover run untracked."""
        cdef Engine e = self.engine
        cdef int i
        with nogil:
            e.stop_world()
            for i in range(self.d.num_vqs):
                self.d.inflight[i].region = (<uint8_t *>hva + i * stride
                                             if hva != 0 and i < num_queues else NULL)
                self.d.inflight[i].nresubmit = 0
                self.d.inflight[i].resubmit_pos = 0
            e.start_world()

    def inflight_pending(self, int index):
        """Resubmissions of ring `index` not served yet (tests, logs)."""
        cdef InflightQueue *iq = &self.d.inflight[self._ring(index).index]
        return iq.nresubmit - iq.resubmit_pos

    def ring_stats(self, int index):
        """requests (packets), data bytes, failed requests (dropped), ring errors, interrupts."""
        cdef Vring *vq = self._ring(index)
        return {"packets": vq.packets, "bytes": vq.bytes, "errors": vq.errors,
                "dropped": vq.dropped, "interrupts": vq.calls}

    def blk_stats(self):
        """Totals over all queues, per request type."""
        return {"reads": self.d.reads, "writes": self.d.writes, "flushes": self.d.flushes,
                "get_ids": self.d.get_ids, "discards": self.d.discards,
                "write_zeroes": self.d.write_zeroes, "read_bytes": self.d.read_bytes,
                "write_bytes": self.d.write_bytes, "ioerrs": self.d.ioerrs,
                "unsupps": self.d.unsupps}

    def read_backend(self, uint64_t offset, uint64_t length):
        """The backend's bytes (tests, debugging); zeros for null."""
        if offset > self.d.capacity * BLK_SECTOR or length > self.d.capacity * BLK_SECTOR - offset:
            raise ValueError("range outside the device")
        if self.d.backend == BACKEND_FILE:
            return os.pread(self.d.fd, length, offset)
        if self.d.backend != BACKEND_MALLOC:
            return bytes(length)
        return (<char *>self.d.data)[offset:offset + length]

    def _broken(self):
        cdef int i
        cdef Vring *vq
        out = []
        if self.d == NULL:
            return out
        for i in range(self.d.num_vqs):
            vq = &self.d.vqs[i]
            if vq.broken and not vq.reported:
                vq.reported = 1
                out.append((self, i, ERROR_NAMES.get(vq.broken, f"error {vq.broken}")))
        return out

    def close(self):
        """Stop every queue and leave the engine (the backend's RAM is freed
        with the object)."""
        cdef int i
        if self.d == NULL:
            return
        for i in range(self.d.num_vqs):
            ring_stop(self.engine, &self.d.vqs[i], True)
        self._stop_pool()
        with self.engine._lock:
            if self in self.engine.blk_devices:
                self.engine.blk_devices.remove(self)
