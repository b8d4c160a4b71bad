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
from rx_ring cimport *
from blk cimport *
from inflight cimport *
from blk_aio cimport *
from fault cimport *
from guard cimport *
from virtio cimport *
from packed cimport *
from packed_tx cimport net_burst
from counters cimport *

import os
import threading

from vfe.macaddr import format_mac, parse_mac

ENGINE_ABI = VFE_ENGINE_ABI
# False in a build with the per-queue counters compiled out (VFE_ENGINE_COUNTERS=0,
# scripts/bench --counters-ab): every counter then reads 0
ENGINE_COUNTERS = bool(VFE_COUNTERS)
# What counters.pxd's layout relies on, checked once here since Cython has no
# static assert: blocks on cache lines of their own, and every ReqType fits
# the by[] array sized for the DropReasons.
if sizeof(RingCounters) % 64 or <int>NREQ > <int>NDROP:
    raise ImportError(f"RingCounters: {sizeof(RingCounters)} bytes, {<int>NREQ} request types, "
                      f"{<int>NDROP} drop reasons: counters.pxd's layout is broken")

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
    -E_DUP: "descriptor head posted again while its request is outstanding",
    -E_FAULT: "guest memory vanished",
    -E_PACKED_CHAIN: "packed descriptor chain continues into a slot not made available",
    -E_PACKED_ID: "packed buffer id out of range",
}

# How long a blk queue's stop waits for requests at the I/O threads (with
# the world running) before it abandons them: long enough for a healthy
# disk's slowest FLUSH, short for a ring the guest broke (it must reset the
# device anyway, and GET_VRING_BASE should not wait on it).
cdef enum:
    QUIESCE_MS = 10000
    QUIESCE_BROKEN_MS = 500


cdef str fault_text(MemTable *mt):
    """Where a device's memory faulted: our address and the guest's."""
    cdef int i
    cdef uint64_t a = mt.fault_addr
    where = ""
    for i in range(mt.n):
        if a >= mt.r[i].hva and a - mt.r[i].hva < mt.r[i].size:
            where = f", guest-physical {mt.r[i].gpa + (a - mt.r[i].hva):#x}"
    return f"SIGBUS at {a:#x}{where}: the front-end shrank the file it shared"


cdef str ring_error(Vring *vq):
    """Why a ring stopped, for the log: the engine's reason, and for a
    vanished memory where it faulted."""
    text = ERROR_NAMES.get(vq.broken, f"error {vq.broken}")
    if vq.broken == -E_FAULT and vq.mem != NULL and vq.mem.fault_addr:
        text += f" ({fault_text(vq.mem)})"
    return text


ctypedef struct _Copy:
    uint8_t *dst
    const uint8_t *src
    size_t n


cdef int _copy(void *arg) noexcept nogil:
    cdef _Copy *c = <_Copy *>arg
    memcpy(c.dst, c.src, c.n)
    return 0


def read_guarded(uint64_t hva, size_t length):
    """`length` bytes at our address `hva` of a shared file mapping, or None
    if they vanished under us (the file was shrunk: SIGBUS, caught).  For
    tests and tools; installs the engine's SIGBUS handler."""
    cdef _Copy c
    cdef int rc
    out = bytearray(length)
    if vfe_sigbus_install() != 0:
        raise OSError(errno, "cannot install the SIGBUS handler")
    c.dst, c.src, c.n = <uint8_t *><char *>out, <const uint8_t *>hva, length
    with nogil:
        rc = vfe_guarded(_copy, &c, NULL, NULL)
    return None if rc == VFE_FAULTED else bytes(out)


def set_kernels(uint64_t csum_addr, uint64_t gso_addr):
    """Install the Numba cfunc pointers for software checksum and GSO."""
    global g_csum, g_gso
    g_csum = <csum_fn_t><void *>csum_addr
    g_gso = <gso_fn_t><void *>gso_addr


include "blk_queue.pxi"
include "packed_blk.pxi"


# ---------------------------------------------------------------- worker loop

cdef inline void tune_poll(Worker *w, int64_t idle_ns) noexcept nogil:
    """Adaptive mode: how long to poll an idle worker before it sleeps, tuned
    from how long the last idle spell lasted (as QEMU's iothreads tune their
    poll time).  Work that came back within the window: keep it.  Work that
    came back after we had gone to sleep, but sooner than spin_ns: polling a
    little longer would have caught it without a wake-up: double the window.
    An idle spell longer than spin_ns: polling was wasted CPU -- which on a
    machine shared with the guests' vCPUs is taken from them: halve it."""
    if idle_ns <= w.poll_ns:
        return
    if idle_ns > w.spin_ns:
        w.poll_ns = w.poll_ns // 2 if w.poll_ns > 4000 else 0
    elif w.poll_ns < w.spin_ns:
        w.poll_ns = w.poll_ns * 2 if w.poll_ns else 4000
        if w.poll_ns > w.spin_ns:
            w.poll_ns = w.spin_ns


# Each stretch of the loop that touches guest memory runs guarded
# (includes/guard.h): a front-end that shrinks its memory file under a
# running ring makes the touching access fault, and instead of dying the
# worker comes back here, breaks only the device whose memory it was
# (fault.pxd) and carries on with everyone else.

cdef int iter_serve(void *arg) noexcept nogil:
    """One poll iteration's work (worker lock held): the owned rings' bursts
    and the representors' frames.  Returns how much was done."""
    cdef Worker *w = <Worker *>arg
    cdef int i, work = 0
    cdef Vring *vq
    for i in range(w.nrings):
        vq = w.rings[i]
        if vq.kind == RING_BLK:
            if ring_usable(vq):
                w.cur = vq
                vfe_signal_fence()
                work += blk_burst(w, vq, not vq.stopping)
        elif ring_usable(vq) and not (<NetDev *>vq.dev).paused:
            w.cur = vq
            vfe_signal_fence()
            work += net_burst(w, vq)
    vfe_signal_fence()
    w.cur = NULL
    for i in range(w.ntaps):
        if not w.taps[i].paused:
            work += tap_in(w, w.taps[i])
    return work


cdef int iter_arm(void *arg) noexcept nogil:
    """Before sleeping: ask for kicks, then look again (1: work came in)."""
    cdef Worker *w = <Worker *>arg
    cdef int i, pending = 0
    cdef Vring *vq
    for i in range(w.nrings):
        if ring_usable(w.rings[i]):
            ring_notify_enable(w.rings[i])
    vfe_fence()
    for i in range(w.nrings):
        vq = w.rings[i]
        if ring_usable(vq) and ((ring_pending(vq) and not vq.stopping)
                                or (vq.kind == RING_BLK and blk_has_work(vq))):
            pending = 1
    return pending


cdef int iter_disarm(void *arg) noexcept nogil:
    """Awake again: polling, so no kicks wanted.  The kicks the sleep read
    are counted on their rings (count_kicks)."""
    cdef Worker *w = <Worker *>arg
    cdef int i
    if VFE_COUNTERS:
        count_kicks(w)
    for i in range(w.nrings):
        if w.rings[i].ready and not mem_gone(w.rings[i]):
            ring_notify_disable(w.rings[i])
    return 0


cdef inline void count_kicks(Worker *w) noexcept nogil:
    """Add the values the sleep read from kick eventfds (each is the number
    of kicks since the last read) to the rings whose kick fd they were,
    worker lock held: a ring stopped meanwhile is no longer in w.rings."""
    cdef int i, j
    for j in range(w.nwoke):
        for i in range(w.nrings):
            if w.rings[i].kick_fd == w.woke_fd[j]:
                w.rings[i].cnt[w.id].kicks += w.woke_val[j]
                break
    w.nwoke = 0


cdef int after_fault(void *arg) noexcept nogil:
    """What a burst cut short by a fault left undone for the devices still
    running: the used entries pushed into RX rings and into the ring being
    served are published.  (A frame being switched when another device's
    memory vanished is switched again at the next burst: peers it had
    reached may see it twice.)"""
    cdef Worker *w = <Worker *>arg
    cdef Vring *vq = w.cur
    w.cur = NULL
    flush_rx(w)
    if vq != NULL and vq.kind == RING_NET and vq.ready and not mem_gone(vq):
        ring_publish(vq)
    return 0


cdef int guarded_run(Worker *w, vfe_guarded_fn fn, void *arg) noexcept nogil:
    """fn(arg) on thread-owned scratch `w` (a worker, or the engine's
    control scratch), recovering from SIGBUS on guest memory: the RX lock
    held at the fault is released, the device the address belongs to is
    broken (E_FAULT), and after_fault tidies up.  Returns fn's result, or
    VFE_FAULTED.  Each fault breaks one more device, and nothing touches a
    broken device's memory again, so the loop ends."""
    cdef int rc = vfe_guarded(fn, arg, <void *>w.faults, fault_match)
    cdef FaultDomain *dom
    cdef uint64_t addr
    if rc != VFE_FAULTED:
        return rc
    while True:
        addr = vfe_guard_addr()
        if w.rx_held != NULL:
            vfe_spin_unlock(&w.rx_held.lock)
            w.rx_held = NULL
        dom = fault_find(w.faults, addr)
        if dom != NULL:
            fault_mark(dom, addr, w.event_fd)
        if vfe_guarded(after_fault, <void *>w, <void *>w.faults, fault_match) != VFE_FAULTED:
            return VFE_FAULTED


cdef void worker_loop(Worker *w) noexcept nogil:
    """Poll owned TX rings; in adaptive mode sleep on their kick eventfds
    after poll_ns without work (re-checking after re-enabling kicks); poll_ns
    tunes itself between 0 and spin_ns (tune_poll)."""
    cdef epoll_event evs[64]
    cdef int i, n, work, pending
    cdef int64_t idle_since = 0, t
    cdef uint64_t val
    while not vfe_load_acquire_int(&w.stop):
        vfe_spin_lock(&w.lock)
        w.blocked = 0
        work = guarded_run(w, iter_serve, <void *>w)
        if work == VFE_FAULTED:
            work = 1                        # go round again at once
        w.iterations += 1
        vfe_spin_unlock(&w.lock)
        if work:
            if idle_since:                  # found by polling, within the window
                tune_poll(w, now_ns() - idle_since)
            idle_since = 0
            continue
        if w.mode == 0:
            vfe_cpu_relax()
            continue
        t = now_ns()
        if idle_since == 0:
            idle_since = t
        if t - idle_since < w.poll_ns:
            vfe_cpu_relax()
            continue
        vfe_spin_lock(&w.lock)
        pending = guarded_run(w, iter_arm, <void *>w)
        vfe_spin_unlock(&w.lock)
        if not pending:
            w.sleeps += 1
            n = epoll_wait(w.epfd, evs, 64, 1 if w.blocked else 1000)
            for i in range(n if n > 0 else 0):
                if evs[i].data.fd >= 0:       # kick/wake eventfds; TAP fds are read by tap_in
                    if (read(evs[i].data.fd, &val, 8) == 8 and VFE_COUNTERS
                            and evs[i].data.fd != w.wake_fd and w.nwoke < 64):
                        w.woke_fd[w.nwoke] = evs[i].data.fd      # counted by iter_disarm (count_kicks)
                        w.woke_val[w.nwoke] = val
                        w.nwoke += 1
        vfe_spin_lock(&w.lock)
        guarded_run(w, iter_disarm, <void *>w)
        vfe_spin_unlock(&w.lock)
        tune_poll(w, now_ns() - idle_since)
        idle_since = 0


cdef Worker *worker_new(int id, Switch *sw, int mode, int64_t spin_ns, int event_fd) except NULL:
    cdef Worker *w = <Worker *>calloc(1, sizeof(Worker))
    cdef epoll_event ev
    if w == NULL:
        raise MemoryError()
    w.id = id
    w.lin = <uint8_t *>malloc(LIN_CAP)
    w.seg = <uint8_t *>malloc(SEG_CAP)
    w.tap_buf = <uint8_t *>malloc(LIN_CAP + VIRTIO_NET_HDR_MRG_LEN)
    w.sw = sw
    w.mode = mode
    w.spin_ns = spin_ns
    w.poll_ns = 0                     # grows while idle spells are short (tune_poll)
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
    cdef FaultRegistry faults # every device's guest mappings (fault.pxd)
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
        if vfe_sigbus_install() != 0:
            raise OSError(errno, "cannot install the SIGBUS handler")
        self.sw = <Switch *>calloc(1, sizeof(Switch))
        self.workers = <Worker **>calloc(workers, sizeof(Worker *))
        if self.sw == NULL or self.workers == NULL:
            raise MemoryError()
        for i in range(workers):
            self.workers[i] = worker_new(i, self.sw, 0 if mode == "poll" else 1,
                                         <int64_t>spin_us * 1000, self.event_fd)
            self.workers[i].faults = &self.faults
        self.ctl = worker_new(workers, self.sw, 1, 0, self.event_fd)
        self.ctl.faults = &self.faults

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
        free(self.faults.doms)
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
            vfe_thread_guard_init()          # without it faults are still caught, on the thread's stack
            worker_loop(w)
            vfe_thread_guard_fini()

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
                       backend="null", bint read_only=False, serial="", **limits):
        """A virtio-blk device with `num_queues` request queues over a null
        (reads zeros, drops writes), malloc (RAM) or file backend of
        `capacity_bytes`.  A file backend needs limits["path"]: its requests
        go to the I/O threads (blk_aio.pxd: preadv/pwritev straight into guest
        memory, FLUSH is fdatasync), so a slow disk never holds a worker.
        `limits`: max_discard_sectors, max_discard_seg,
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
                        out.append((d, i, ring_error(vq)))
            for b in list(self.blk_devices):
                out.extend(b._broken())
        return out

    def security_notices(self):
        """Port-security events the switch noted since the device's notices
        were last re-armed (NetDevice.rearm_notices): [(device, text)]."""
        cdef NetDevice d
        out = []
        with self._lock:
            for d in list(self.devices):
                if d.d != NULL:
                    out.extend((d, text) for text in d._take_notices())
        return out

    def worker_stats(self):
        return [{"worker": i, "rings": self.workers[i].nrings,
                 "iterations": self.workers[i].iterations,
                 "sleeps": self.workers[i].sleeps,
                 "poll_ns": self.workers[i].poll_ns} for i in range(self.nworkers)]

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

    cdef int _add_fault_domain(self, FaultDomain *dom) except -1:
        """Make a device's mappings known to the SIGBUS recovery (fault.pxd)."""
        cdef FaultDomain **grown = NULL
        cdef FaultDomain **old = NULL
        with self._lock:
            if self.faults.n == self.faults.cap:
                grown = <FaultDomain **>malloc((self.faults.cap * 2 + 16) * sizeof(FaultDomain *))
                if grown == NULL:
                    raise MemoryError()
                if self.faults.n:
                    memcpy(grown, self.faults.doms, self.faults.n * sizeof(FaultDomain *))
            with nogil:
                self.stop_world()
                if grown != NULL:
                    old = self.faults.doms
                    self.faults.doms = grown
                    self.faults.cap = self.faults.cap * 2 + 16
                self.faults.doms[self.faults.n] = dom
                self.faults.n += 1
                self.start_world()
            free(old)
        return 0

    cdef void _remove_fault_domain(self, FaultDomain *dom):
        cdef int i
        lock = self._lock             # None: the garbage collector is taking us apart
        if lock is not None:
            lock.acquire()
        try:
            with nogil:
                self.stop_world()
                for i in range(self.faults.n):
                    if self.faults.doms[i] == dom:
                        self.faults.doms[i] = self.faults.doms[self.faults.n - 1]
                        self.faults.n -= 1
                        break
                self.start_world()
        finally:
            if lock is not None:
                lock.release()

    cdef _detach(self, NetDevice dev):
        cdef int p = dev.d.port
        with self._lock:
            with nogil:
                self.stop_world()
                if p >= 0:
                    self.sw.ports[p] = NULL
                    sw_forget_port(self.sw, p)
                    dev.d.learned = 0
                    while self.sw.nports > 0 and self.sw.ports[self.sw.nports - 1] == NULL:
                        self.sw.nports -= 1
                self.start_world()
            dev.d.port = -1
            if dev in self.devices:
                self.devices.remove(dev)


def ring_area_sizes(uint64_t size, bint event_idx):
    """(desc, avail, used): the bytes translate_ring maps for a ring of
    `size` entries (virtio.pxd), for the unit test that checks them against
    vfe.virtio.layouts.ring_area_sizes."""
    return (vring_desc_size(size), vring_avail_size(size, event_idx),
            vring_used_size(size, event_idx))


def log_page_size():
    """VHOST_LOG_PAGE as log_pages (vring.pxd) marks it, for the unit test
    that checks it against vfe.vhost.messages.LOG_PAGE."""
    return VHOST_LOG_PAGE


def inflight_layout(bint packed=False):
    """The inflight region's sizes and field offsets as inflight.pxd has
    them (split rings' QueueRegionSplit, or with `packed` the
    QueueRegionPacked layout), for the unit test that checks them against
    vfe/vhost/inflight.py."""
    if packed:
        return {"header_size": PIF_HDR, "desc_size": PIF_DESC,
                "version": PIF_VERSION, "desc_num": PIF_DESC_NUM,
                "free_head": PIF_FREE_HEAD, "old_free_head": PIF_OLD_FREE_HEAD,
                "used_idx": PIF_USED_IDX, "old_used_idx": PIF_OLD_USED_IDX,
                "used_wrap_counter": PIF_USED_WRAP, "old_used_wrap_counter": PIF_OLD_USED_WRAP,
                "desc_inflight": PIF_D_INFLIGHT, "desc_next": PIF_D_NEXT, "desc_last": PIF_D_LAST,
                "desc_num_descs": PIF_D_NUM, "desc_counter": PIF_D_COUNTER, "desc_id": PIF_D_ID,
                "desc_flags": PIF_D_FLAGS, "desc_len": PIF_D_LEN, "desc_addr": PIF_D_ADDR}
    return {"header_size": IF_HDR, "desc_size": IF_DESC,
            "version": IF_VERSION, "desc_num": IF_DESC_NUM, "last_batch_head": IF_LAST_BATCH,
            "used_idx": IF_USED_IDX,
            "desc_inflight": IF_D_INFLIGHT, "desc_next": IF_D_NEXT, "desc_counter": IF_D_COUNTER}


cdef int translate_ring(Vring *vq) noexcept nogil:
    if vq.packed:
        return packed_translate(vq)
    cdef uint64_t d = contig_hva(vq.mem, vq.desc_uva, vring_desc_size(vq.size), True)
    cdef uint64_t a = contig_hva(vq.mem, vq.avail_uva, vring_avail_size(vq.size, vq.event_idx), True)
    cdef uint64_t u = contig_hva(vq.mem, vq.used_uva, vring_used_size(vq.size, vq.event_idx), True)
    if d == 0 or a == 0 or u == 0 or (d & 15) or (a & 1) or (u & 3):
        return E_RING
    vq.desc = <uint8_t *>d
    vq.avail = <uint16_t *>a
    vq.used = <uint8_t *>u
    return 0


cdef void retranslate_rings(Vring *vqs, int n) noexcept nogil:
    """After a change to what a running ring's areas must cover (memory
    table, EVENT_IDX's extra fields): translate again; a ring whose areas
    no longer map stops (E_RING).  World stopped."""
    cdef int i
    for i in range(n):
        if vqs[i].ready and translate_ring(&vqs[i]) < 0:
            vqs[i].broken = -E_RING


# The control thread's stretches of guest memory (ring start and stop),
# guarded like the workers' (guarded_run, on the engine's control scratch).

ctypedef struct _StartRecover:
    InflightQueue *iq
    _IfEntry *scratch
    uint16_t size
    uint16_t used_idx
    int rc


cdef int _start_read_used(void *arg) noexcept nogil:
    cdef Vring *vq = <Vring *>arg
    vq.last_used_idx = vfe_load_u16(<uint16_t *>(vq.used + 2))
    vq.flushed_used_idx = vq.last_used_idx
    return 0


cdef int _start_recover(void *arg) noexcept nogil:
    cdef _StartRecover *a = <_StartRecover *>arg
    a.rc = inflight_recover(a.iq, a.size, a.used_idx, a.scratch)
    return 0


cdef int _start_quiet(void *arg) noexcept nogil:
    ring_notify_disable(<Vring *>arg)
    return 0


ctypedef struct _Quiesce:
    Worker *w
    Vring *vq


cdef int _stop_quiesced(void *arg) noexcept nogil:
    cdef _Quiesce *a = <_Quiesce *>arg
    return blk_quiesced(a.w, a.vq)


cdef int ring_touch(Engine e, Vring *vq, int index, vfe_guarded_fn fn, void *arg) except -1:
    """fn(arg) on ring `index`'s guest memory from the control thread (the
    world stopped); ValueError if that memory vanished."""
    cdef int rc
    with nogil:
        rc = guarded_run(e.ctl, fn, arg)
    if rc == VFE_FAULTED:
        vq.reported = 1                   # said by this error; the device's other rings are logged
        raise ValueError(f"ring {index}: guest memory vanished ({fault_text(vq.mem)})")
    return 0


cdef ring_start(Engine e, Vring *vq, int index, int size, uint64_t desc_uva, uint64_t avail_uva,
                uint64_t used_uva, uint64_t base, int kick_fd, int call_fd, bint enabled,
                bint log_used, uint64_t log_guest_addr, bint polled, InflightQueue *iq=NULL):
    """Start a ring at avail index `base` (< 0x10000) (stop-the-world).  `polled` rings
    (net TX, every blk queue) join their worker's list and its epoll set.

    With an inflight region (`iq`, blk queues after SET_INFLIGHT_FD) the
    region decides instead of `base`: heads left inflight are queued for
    resubmission and the ring continues at used->idx + their number.
    Returns None (no region), -1 (a new region, `base` stands) or the
    number of heads resubmitted.

    A packed ring (packed.pxd) may have any size up to MAX_QUEUE_SIZE, and
    `base` holds both its cursors and wrap counters (packed_set_base)."""
    cdef Worker *w = e.workers[vq.worker]
    cdef epoll_event ev
    cdef _IfEntry *scratch = NULL
    cdef uint16_t *resubmit = NULL
    cdef _StartRecover rec
    cdef _PackedRecover prec
    cdef int rc
    cdef uint64_t room = 0
    recovered = None
    if vq.packed:
        if size <= 0 or size > MAX_QUEUE_SIZE:
            raise ValueError(f"packed ring size {size} is not in 1..{MAX_QUEUE_SIZE}")
        if (base & 0x7FFF) >= <uint64_t>size or ((base >> 16) & 0x7FFF) >= <uint64_t>size or base >> 32:
            raise ValueError(f"ring {index}: packed base {base:#x} names a slot outside "
                             f"the ring of {size}")
    elif size <= 0 or size > MAX_QUEUE_SIZE or (size & (size - 1)):
        raise ValueError(f"ring size {size} is not a power of two <= {MAX_QUEUE_SIZE}")
    elif base > 0xFFFF:
        raise ValueError(f"ring {index}: split ring base {base:#x} is not a 16-bit index")
    if vq.ready:
        raise RuntimeError(f"ring {index} is already started")
    if vq.mem.fault_addr:
        raise ValueError(f"ring {index}: the device's guest memory vanished "
                         f"({fault_text(vq.mem)}); it needs a new memory table")
    if iq != NULL and iq.region != NULL:
        # the entries the region holds in this ring's layout: set_inflight
        # checked its length against the features of that moment only
        if vq.packed:
            room = (iq.stride - PIF_HDR) // PIF_DESC if iq.stride >= PIF_HDR else 0
        else:
            room = (iq.stride - IF_HDR) // IF_DESC if iq.stride >= IF_HDR else 0
        if room > iq.queue_size:
            room = iq.queue_size
        if <uint64_t>size > room:
            raise ValueError(f"ring {index}: the inflight region has room for {room} "
                             f"entries per queue, the ring has {size} "
                             f"({'packed' if vq.packed else 'split'} layout)")
        scratch = <_IfEntry *>malloc(size * (sizeof(_IfEntry) + 1))
        resubmit = <uint16_t *>malloc(2 * size * sizeof(uint16_t))
        if scratch == NULL or resubmit == NULL:
            free(scratch)
            free(resubmit)
            raise MemoryError()
    e._lock.acquire()            # e.ctl's scratch space (ring_touch) is shared with inject()
    with nogil:
        e.stop_world()
    try:
        vq.broken = 0
        vq.reported = 0
        vq.size = size
        vq.mask = size - 1
        vq.desc_uva = desc_uva
        vq.avail_uva = avail_uva
        vq.used_uva = used_uva
        if translate_ring(vq) < 0:
            raise ValueError(f"ring {index}: addresses are not inside guest memory")
        if vq.packed:
            if packed_alloc(vq) < 0:
                raise MemoryError()
            packed_set_base(vq, base)
        else:
            vq.last_avail_idx = base
            vq.shadow_avail_idx = base
            ring_touch(e, vq, index, _start_read_used, <void *>vq)
        if resubmit != NULL:
            free(iq.resubmit)
            iq.resubmit, resubmit = resubmit, NULL
            iq.resubmit_num = iq.resubmit + size
            iq.nresubmit = iq.resubmit_pos = 0
            iq.ndesc = size                 # every index into the region from now on
            if vq.packed:
                prec.vq, prec.iq, prec.scratch = vq, iq, scratch
                prec.seen = <uint8_t *>(scratch + size)
                ring_touch(e, vq, index, _start_recover_packed, <void *>&prec)
                rc = prec.rc
            else:
                rec.iq, rec.scratch, rec.size, rec.used_idx = iq, scratch, <uint16_t>size, vq.last_used_idx
                ring_touch(e, vq, index, _start_recover, <void *>&rec)
                rc = rec.rc
            if rc == IF_BAD_VERSION:
                raise ValueError(f"ring {index}: the inflight region has version "
                                 f"{vfe_load_u16(<uint16_t *>(iq.region + IF_VERSION))} "
                                 f"(0 or 1 expected)")
            if rc == IF_BAD_SIZE:
                raise ValueError(f"ring {index}: the inflight region tracks "
                                 f"{vfe_load_u16(<uint16_t *>(iq.region + IF_DESC_NUM))} "
                                 f"entries, the ring has {size}")
            if rc == IF_CORRUPT:
                raise ValueError(f"ring {index}: the inflight region's cursors or chains "
                                 f"are out of range, or its free list loops (not a packed "
                                 f"region)")
            if rc >= 0 and not vq.packed:
                vq.last_avail_idx = <uint16_t>(vq.last_used_idx + rc)
                vq.shadow_avail_idx = vq.last_avail_idx
            recovered = rc
        vq.kick_fd = kick_fd
        vq.call_fd = call_fd
        vq.enabled = enabled
        vq.log_used = log_used
        vq.log_guest_addr = log_guest_addr
        vq.stall_ns = 0
        vq.stopping = 0
        ring_touch(e, vq, index, _start_quiet, <void *>vq)
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
        e._lock.release()
        free(scratch)
        free(resubmit)
    return recovered


cdef void blk_drain(Engine e, Vring *vq) noexcept nogil:
    """Called with the world stopped, returns with it stopped: finish the
    heads a blk queue took (resubmissions not yet served, requests at the
    I/O threads) so that its stop index is exact.  The world runs while we
    wait -- a slow FLUSH must not freeze every other ring -- and the wait
    is bounded (QUIESCE_MS, QUIESCE_BROKEN_MS once the ring broke): what is
    still at the I/O threads then is abandoned (blk_abandon)."""
    cdef int64_t start = now_ns()
    cdef _Quiesce q
    cdef int rc
    q.w, q.vq = e.ctl, vq
    vq.stopping = 1                  # its worker reaps, but takes no new entries
    while True:
        rc = guarded_run(e.ctl, _stop_quiesced, <void *>&q)
        if rc == VFE_FAULTED:
            continue                 # the device broke; its next step touches none of its memory
        if rc:
            break
        if now_ns() - start > <int64_t>(QUIESCE_BROKEN_MS if vq.broken else QUIESCE_MS) * 1000000:
            if blk_give_up_order(vq):
                # --force_in_order: what finished behind the stuck request
                # is answered first, out of order, by one more pass
                guarded_run(e.ctl, _stop_quiesced, <void *>&q)
            blk_abandon(vq)
            break
        e.start_world()
        aio_nap()
        e.stop_world()


cdef uint32_t ring_stop(Engine e, Vring *vq, bint polled) noexcept:
    """Stop a ring; return the next avail index it would process (a
    packed ring: packed_base's cursors and wrap counters).  A blk queue
    first finishes the heads it took (resubmissions not yet served), so the
    index is exact: nothing below it is left unanswered."""
    cdef Worker *w = e.workers[vq.worker]
    cdef int i
    cdef uint32_t base
    e._lock.acquire()            # e.ctl's scratch space is shared with inject()
    with nogil:
        e.stop_world()
        if vq.kind == RING_BLK and vq.ready:
            blk_drain(e, vq)
        vq.stopping = 0
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
        base = packed_base(vq) if vq.packed else vq.last_avail_idx
        vfe_spin_unlock(&vq.lock)
        e.start_world()
    e._lock.release()
    return base


include "ring_device.pxi"
include "net_device.pxi"
include "blk_backend.pxi"
include "blk_device.pxi"
