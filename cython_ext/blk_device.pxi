# BlkDevice: a virtio-blk device inside the engine (queues, backend, inflight).
# Included by engine.pyx (one compiled module: the worker loop calls these
# directly, and the device classes share its cdef helpers).

# A blk queue's requests_<type> counters (counters.pxd ReqType)
REQ_TYPES = {"in": REQ_IN, "out": REQ_OUT, "flush": REQ_FLUSH, "get_id": REQ_GET_ID,
             "discard": REQ_DISCARD, "write_zeroes": REQ_WRITE_ZEROES,
             "unsupported": REQ_UNSUPPORTED}


cdef class BlkDevice(RingDevice):
    """The engine's side of one virtio-blk device: its request queues, its
    memory table and its backend (null, malloc or file).  Same ring-control
    methods as NetDevice, so the device adapter's Session drives it alike."""
    cdef BlkDev *d
    cdef readonly BlkBackend storage    # the bdev's storage (shared with other devices on it)

    def __cinit__(self, Engine engine, int num_queues, uint64_t capacity_bytes, int block_size,
                  backend, bint read_only, serial, uint32_t max_discard_sectors=65536,
                  uint32_t max_discard_seg=32, uint32_t max_write_zeroes_sectors=65536,
                  uint32_t max_write_zeroes_seg=32, path=None, bint direct=False,
                  int aio_threads=4, bint grow=False, bint in_order=False):
        """`backend`: a BlkBackend (a bdev's storage, maybe served by other
        devices too), or "null", "malloc" or "file" for storage of this
        device's own (`path`, `direct`, `grow`: the file's).  `in_order`
        (--force_in_order): every queue answers its requests in the order
        it took them, even when the I/O threads finish them out of order."""
        cdef int i
        cdef BlkBackend store
        if num_queues < 1 or num_queues > 256:
            raise ValueError("a blk device has 1..256 queues")
        if block_size < 512 or block_size > 65536 or (block_size & (block_size - 1)):
            raise ValueError(f"block size {block_size} is not a power of two in 512..65536")
        if capacity_bytes == 0 or capacity_bytes % block_size:
            raise ValueError(f"capacity {capacity_bytes} is not a positive multiple of the block size")
        sb = serial.encode() if isinstance(serial, str) else bytes(serial)
        if len(sb) > VIRTIO_BLK_ID_BYTES:
            raise ValueError(f"serial is longer than {VIRTIO_BLK_ID_BYTES} bytes")
        if max_discard_seg > BLK_MAX_RANGES or max_write_zeroes_seg > BLK_MAX_RANGES:
            raise ValueError(f"at most {BLK_MAX_RANGES} discard/write-zeroes ranges per request")
        if aio_threads < 1 or aio_threads > AIO_MAX_THREADS:
            raise ValueError(f"aio_threads must be in 1..{AIO_MAX_THREADS}")
        if isinstance(backend, str):
            store = BlkBackend(backend, capacity_bytes, path, direct, grow, read_only)
        elif isinstance(backend, BlkBackend):
            store = backend
        else:
            raise TypeError(f"backend must be a BlkBackend or null, malloc, file; not {backend!r}")
        if capacity_bytes > store.capacity_bytes:
            raise ValueError(f"capacity {capacity_bytes} is larger than its {store.kind} storage "
                             f"({store.capacity_bytes} bytes)")
        if store.read_only and not read_only:
            raise ValueError(f"{store.path} is open read-only: the device must be read-only too")
        if store.backend == BACKEND_FILE:
            from vfe.engine.bdev_file import check_backing_size
            check_backing_size(store.fd, store.path, capacity_bytes)
        self.engine = engine
        self.storage = store
        self.d = <BlkDev *>calloc(1, sizeof(BlkDev))
        if self.d == NULL:
            raise MemoryError()
        self.d.vqs = <Vring *>calloc(num_queues, sizeof(Vring))
        self.d.mem = <MemTable *>calloc(1, sizeof(MemTable))
        self.d.inflight = <InflightQueue *>calloc(num_queues, sizeof(InflightQueue))
        if self.d.vqs == NULL or self.d.mem == NULL or self.d.inflight == NULL:
            raise MemoryError()
        self.d.num_vqs = num_queues
        # borrowed from the storage, which outlives us (self.storage)
        self.d.backend = store.backend
        self.d.data = store.data
        self.d.fd = store.fd
        if store.backend == BACKEND_FILE:
            self._start_pool(store, aio_threads)
        self.d.capacity = capacity_bytes // VIRTIO_BLK_SECTOR_SIZE
        self.d.block_size = block_size
        self.d.read_only = read_only
        self.d.in_order = in_order
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
        self._register_faults()
        with engine._lock:
            self.slot = engine.next_slot
            engine.next_slot += 1
            engine.blk_devices.append(self)

    cdef _start_pool(self, BlkBackend store, int nthreads):
        """This device's I/O threads (blk_aio.pxd) on the storage's fds:
        a pool per device, so one device's slow requests never queue
        behind another's."""
        cdef AioPool *pool = <AioPool *>calloc(1, sizeof(AioPool))
        cdef int i, rc
        self.d.aio = <AioRing *>calloc(self.d.num_vqs, sizeof(AioRing))
        if pool == NULL or self.d.aio == NULL:
            free(pool)
            raise MemoryError()
        pthread_mutex_init(&pool.mu, NULL)
        pthread_cond_init(&pool.cv, NULL)
        pool.fd = store.fd
        pool.dfd = store.dfd
        self.d.pool = pool
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
        self._unregister_faults()
        self.vqs = NULL
        if self.d != NULL:
            if self.d.pool != NULL:
                self._stop_pool()
                pthread_mutex_destroy(&self.d.pool.mu)
                pthread_cond_destroy(&self.d.pool.cv)
                free(self.d.pool)
            if self.d.aio != NULL:
                for i in range(self.d.num_vqs):
                    free(self.d.aio[i].slots)
                    free(self.d.aio[i].store)
                free(self.d.aio)
            if self.d.inflight != NULL:
                for i in range(self.d.num_vqs):
                    free(self.d.inflight[i].resubmit)
                free(self.d.inflight)
            packed_free(self.d.vqs, self.d.num_vqs)
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
    def in_order(self):
        return bool(self.d.in_order)

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
                   uint64_t used_uva, uint64_t base, int kick_fd, int call_fd, bint enabled,
                   bint log_used=False, uint64_t log_guest_addr=0):
        """RingDevice.start_ring, after giving a file bdev's queue its
        request slots (one per head; the ring is stopped, none is in use)."""
        cdef Vring *vq = self._ring(index)
        cdef AioRing *ar
        cdef int i
        if self.d.aio != NULL and not vq.ready:
            ar = &self.d.aio[index]
            aio_drop_abandoned(ar)
            if ar.size != size and 0 < size <= MAX_QUEUE_SIZE:
                if ar.abandoned:
                    # the I/O threads still hold slots of the old array
                    raise RuntimeError(f"ring {index}: {ar.abandoned} request(s) of its last "
                                       f"run are still at the I/O threads")
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
            ar.order_first = -1             # a stop answered (or dropped) every taken head
            ar.order_last = -1
            ar.order_given_up = 0
            ar.wake_fd = self.engine.workers[vq.worker].wake_fd
        return RingDevice.start_ring(self, index, size, desc_uva, avail_uva, used_uva, base,
                                     kick_fd, call_fd, enabled, log_used, log_guest_addr)

    def set_features(self, uint64_t features):
        """Apply negotiated virtio features (ring features, DISCARD/WRITE_ZEROES).
        RuntimeError, nothing applied, if RING_PACKED would change the
        layout of a started ring (packed_layout_fits)."""
        cdef int packed = (features >> VIRTIO_F_RING_PACKED) & 1
        cdef bint fits
        cdef Engine e = self.engine
        with nogil:
            e.stop_world()
            fits = packed_layout_fits(self.d.vqs, self.d.num_vqs, packed)
            if fits:
                self._apply_features(features, packed)
            e.start_world()
        if not fits:
            raise RuntimeError("SET_FEATURES would change the layout (RING_PACKED) of a started ring")

    cdef void _apply_features(self, uint64_t features, int packed) noexcept nogil:
        """set_features' work, world stopped."""
        cdef int i
        self.d.features = features
        self.d.log.active = ((features >> VHOST_F_LOG_ALL) & 1) and self.d.log.base != NULL
        for i in range(self.d.num_vqs):
            self.d.vqs[i].event_idx = (features >> VIRTIO_RING_F_EVENT_IDX) & 1
            self.d.vqs[i].indirect = (features >> VIRTIO_RING_F_INDIRECT_DESC) & 1
            self.d.vqs[i].packed = packed
        retranslate_rings(self.d.vqs, self.d.num_vqs)

    cdef InflightQueue *_inflight(self, int index):
        return &self.d.inflight[index]

    def set_inflight(self, uint64_t hva, uint64_t stride, int num_queues, int queue_size,
                     uint64_t length):
        """Track queue i (< num_queues) in the inflight region at hva + i *
        stride from its next start (hva 0: stop tracking).  The region is
        `length` bytes and holds `queue_size` entries per queue; a ring
        larger than that, or than `stride` holds in its layout, will not
        start.  The caller unmaps an old region only after this returns;
        queues the region does not cover run untracked.  The layout (split
        or packed) is the ring's at its start (inflight_layout); the
        stride is checked here against the features negotiated so far
        too.  A packed region should start zeroed (version 0: ring_start
        initialises it); one with version 1 must be a packed one."""
        cdef Engine e = self.engine
        cdef int i
        if hva != 0:
            if not 1 <= queue_size <= MAX_QUEUE_SIZE or num_queues < 0:
                raise ValueError(f"inflight region for {num_queues} queues of {queue_size} entries")
            if stride < ((PIF_HDR + PIF_DESC * <uint64_t>queue_size)
                         if (self.d.features >> VIRTIO_F_RING_PACKED) & 1
                         else (IF_HDR + IF_DESC * <uint64_t>queue_size)):
                raise ValueError(f"inflight queue regions of {stride} bytes cannot hold "
                                 f"{queue_size} entries")
            if <uint64_t>num_queues * stride > length:
                raise ValueError(f"inflight region of {length} bytes cannot hold {num_queues} "
                                 f"queues of {stride} bytes")
        with nogil:
            e.stop_world()
            self.fdom.extra_base = hva          # the front-end's file too: SIGBUS recovery
            self.fdom.extra_len = stride * num_queues if hva != 0 else 0
            for i in range(self.d.num_vqs):
                if hva != 0 and i < num_queues:
                    self.d.inflight[i].region = <uint8_t *>hva + i * stride
                    self.d.inflight[i].stride = stride
                    self.d.inflight[i].queue_size = queue_size
                    # a running ring records from now on, within its size
                    # (ring_start sets it for the others)
                    self.d.inflight[i].ndesc = (self.d.vqs[i].size if self.d.vqs[i].ready
                                                and self.d.vqs[i].size <= queue_size else 0)
                else:
                    self.d.inflight[i].region = NULL
                    self.d.inflight[i].ndesc = 0
                self.d.inflight[i].nresubmit = 0
                self.d.inflight[i].resubmit_pos = 0
            e.start_world()

    def inflight_pending(self, int index):
        """Resubmissions of ring `index` not served yet (tests, logs)."""
        cdef InflightQueue *iq = &self.d.inflight[self._ring(index).index]
        return iq.nresubmit - iq.resubmit_pos

    def ring_stats(self, int index):
        """Queue `index`'s counters (docs/metrics.md): requests answered
        (packets), data bytes, failed requests (dropped), ring errors,
        interrupts, kicks read, requests_<type> taken (ReqType) and a
        file bdev's requests taken and not answered now (inflight, a level:
        at the I/O threads, or in order behind one that is)."""
        cdef Vring *vq = self._ring(index)
        cdef RingCounters c = self._counted(index)
        out = {"packets": c.packets, "bytes": c.bytes, "errors": vq.errors,
               "dropped": c.failed, "interrupts": vq.calls, "kicks": c.kicks,
               "inflight": self.d.aio[index].pending if self.d.aio != NULL else 0}
        for name, r in REQ_TYPES.items():
            out["requests_" + name] = c.by[r]
        return out

    def blk_stats(self):
        """Totals over all queues, per request type."""
        return {"reads": self.d.reads, "writes": self.d.writes, "flushes": self.d.flushes,
                "get_ids": self.d.get_ids, "discards": self.d.discards,
                "write_zeroes": self.d.write_zeroes, "read_bytes": self.d.read_bytes,
                "write_bytes": self.d.write_bytes, "ioerrs": self.d.ioerrs,
                "unsupps": self.d.unsupps}

    def read_backend(self, uint64_t offset, uint64_t length):
        """The backend's bytes (tests, debugging); zeros for null."""
        if offset > self.d.capacity * VIRTIO_BLK_SECTOR_SIZE or length > self.d.capacity * VIRTIO_BLK_SECTOR_SIZE - offset:
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
                out.append((self, i, ring_error(vq)))
        return out

    def close(self):
        """Stop every queue and leave the engine (the storage is released
        with the object, and freed once no other device or bdev holds it)."""
        cdef int i
        if self.d == NULL:
            return
        for i in range(self.d.num_vqs):
            ring_stop(self.engine, &self.d.vqs[i], True)
        self._stop_pool()
        with self.engine._lock:
            if self in self.engine.blk_devices:
                self.engine.blk_devices.remove(self)
