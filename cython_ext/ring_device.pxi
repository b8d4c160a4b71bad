# RingDevice: the ring control every device shares (start, stop, enable, state).
# Included by engine.pyx (one compiled module: the worker loop calls these
# directly, and the device classes share its cdef helpers).

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
    cdef FaultDomain *fdom          # its mappings, for the SIGBUS recovery (fault.pxd)
    cdef RingCounters *counters     # nslots blocks per ring, ring i's at i * nslots (counters.pxd)
    cdef int nslots                 # the engine's workers + its control scratch
    cdef public int slot
    cdef public object model        # the device model these rings belong to (vfe/devices/), for log lines

    def __cinit__(self, *args, **kwargs):
        self.vqs = NULL
        self.fdom = NULL
        self.counters = NULL

    def __dealloc__(self):
        # after the subclass's: no ring points at the blocks any more
        free(self.counters)

    cdef int _register_faults(self) except -1:
        """Called by a subclass once vqs/nvqs/mem/log point at its struct;
        also gives every ring its counter blocks, one per thread that may
        count on it (Worker.id: each worker, then the control scratch).
        The device keeps them for its life: they survive reconnects."""
        cdef int i
        self.nslots = self.engine.nworkers + 1
        self.counters = <RingCounters *>vfe_counters_alloc(self.nvqs * self.nslots,
                                                           sizeof(RingCounters))
        if self.counters == NULL:
            raise MemoryError()
        for i in range(self.nvqs):
            self.vqs[i].cnt = self.counters + i * self.nslots
        self.fdom = <FaultDomain *>calloc(1, sizeof(FaultDomain))
        if self.fdom == NULL:
            raise MemoryError()
        self.fdom.mem, self.fdom.log, self.fdom.vqs, self.fdom.nvqs = \
            self.mem, self.log, self.vqs, self.nvqs
        self.engine._add_fault_domain(self.fdom)
        return 0

    cdef void _unregister_faults(self):
        """Before the subclass frees what the domain points at."""
        if self.fdom != NULL and self.engine is not None:
            self.engine._remove_fault_domain(self.fdom)
        free(self.fdom)
        self.fdom = NULL

    @property
    def memory_fault(self):
        """Where the device's guest memory faulted (our address), 0 if it did not."""
        return self.mem.fault_addr if self.mem != NULL else 0

    cdef RingCounters _counted(self, int index) except *:
        """Ring `index`'s counters: its blocks summed (read while workers
        may be counting: each field is a value it had a moment ago)."""
        cdef RingCounters total
        count_sum(self._ring(index).cnt, self.nslots, &total)
        return total

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
        rings are re-translated; one that no longer maps stops (E_RING).
        A new table also forgets that the old one's memory vanished."""
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
            retranslate_rings(self.vqs, self.nvqs)
            e.start_world()

    def set_log(self, uint64_t hva, uint64_t size):
        """Use the dirty log mapped at hva (0 to stop).  The caller unmaps the
        previous log only after this returns."""
        cdef Engine e = self.engine
        with nogil:
            e.stop_world()
            self.log.base = <uint8_t *>hva
            self.log.size = size if hva else 0
            self.log.active = ((self.features[0] >> VHOST_F_LOG_ALL) & 1) and hva != 0
            e.start_world()

    def start_ring(self, int index, int size, uint64_t desc_uva, uint64_t avail_uva,
                   uint64_t used_uva, uint64_t base, int kick_fd, int call_fd, bint enabled,
                   bint log_used=False, uint64_t log_guest_addr=0):
        """Start a ring at avail index `base`.  Raises ValueError if its
        addresses are not inside the memory table.  Returns what ring_start
        says about an inflight region (None: not tracked)."""
        return ring_start(self.engine, self._ring(index), index, size, desc_uva, avail_uva,
                          used_uva, base, kick_fd, call_fd, enabled, log_used, log_guest_addr,
                          self._polled(index), self._inflight(index))

    def run_burst(self, int index):
        """One poll pass over ring `index` in the calling thread, with the
        world stopped: what its worker's loop does for it once (a net TX
        burst through the switch, or a blk burst).  For tests and fuzzing
        of the ring code without worker threads; the engine need not be
        started.  Returns the work done (chains or requests)."""
        cdef Vring *vq = self._ring(index)
        cdef Engine e = self.engine
        cdef Worker *w = e.workers[vq.worker]
        cdef int work = 0
        if not self._polled(index):
            raise ValueError(f"ring {index} is not polled (an RX ring is filled by senders)")
        with nogil:
            e.stop_world()
            w.csum = g_csum
            w.gso = g_gso
            if ring_usable(vq):
                if vq.kind == RING_BLK:
                    work = blk_burst(w, vq, not vq.stopping)
                elif not (<NetDev *>vq.dev).paused:
                    work = net_burst(w, vq)
            e.start_world()
        return work

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
            "error": ring_error(vq) if vq.broken else "",
            "last_avail_idx": vq.last_avail_idx, "last_used_idx": vq.last_used_idx,
            "worker": vq.worker,
            "packed": bool(vq.packed),
            "avail_wrap": vq.avail_wrap if vq.packed else None,
            "used_wrap": vq.used_wrap if vq.packed else None,
        }
