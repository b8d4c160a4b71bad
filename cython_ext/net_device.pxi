# NetDevice: a virtio-net device inside the engine (rings, switch port, TAP).
# Included by engine.pyx (one compiled module: the worker loop calls these
# directly, and the device classes share its cdef helpers).

ctypedef struct _Inject:
    Worker *w
    NetDev *dev
    int pair
    Iov *src


cdef int _inject(void *arg) noexcept nogil:
    cdef _Inject *a = <_Inject *>arg
    if a.dev.tap_fd >= 0:
        # a device on a representor is off the switch: the frame leaves
        # where its guest's frames leave (a RARP after a migration must
        # reach OVS, which moves the port on it)
        tap_send(a.w, a.dev, a.src, 1, a.src.len)
    else:
        switch_frame(a.w, a.dev, a.pair, a.src, 1, a.src.len)
        flush_rx(a.w)
    return 0


# The drop reasons each ring direction counts (counters.pxd DropReason):
# a sender's TX ring every fate of its frames, an RX ring what happened
# to frames on their way into it.
TX_DROPS = {"short": DROP_SHORT, "spoofed": DROP_SPOOFED, "no_room": DROP_NO_ROOM,
            "no_ring": DROP_NO_RING, "too_big": DROP_TOO_BIG, "offload": DROP_OFFLOAD,
            "ring_error": DROP_RING_ERROR, "tap": DROP_TAP}
RX_DROPS = {"too_big": DROP_TOO_BIG, "offload": DROP_OFFLOAD, "no_room": DROP_NO_ROOM}


cdef class NetDevice(RingDevice):
    """The engine's side of one virtio-net device: its rings, its memory
    table and its switch port.  Methods are called by the device adapter
    (vfe/devices/net.py) from the daemon's control thread."""
    cdef NetDev *d
    cdef uint8_t _logged         # notices already logged since rearm_notices

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
        self.d.hdr_len = VIRTIO_NET_HDR_MRG_LEN
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
        self.d.learn_limit = MAC_LEARN_LIMIT
        self.vqs, self.nvqs, self.mem = self.d.vqs, num_queues, self.d.mem
        self.log, self.features = &self.d.log, &self.d.features
        self._register_faults()
        engine._attach(self)

    def __dealloc__(self):
        self._unregister_faults()
        self.vqs = NULL
        if self.d != NULL:
            packed_free(self.d.vqs, self.d.num_vqs)
            free(self.d.vqs)
            free(self.d.mem)
            free(self.d)
            self.d = NULL

    @property
    def port(self):
        return self.d.port if self.d != NULL else -1

    def set_features(self, uint64_t features):
        """Apply negotiated virtio features (header length, offloads, ring
        features).  RuntimeError, nothing applied, if RING_PACKED would
        change the layout of a started ring (packed_layout_fits)."""
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
        cdef int v1 = (features >> VIRTIO_F_VERSION_1) & 1
        cdef int mrg = (features >> VIRTIO_NET_F_MRG_RXBUF) & 1
        self.d.features = features
        self.d.mrg_rxbuf = mrg
        self.d.packed = packed
        self.d.hdr_len = VIRTIO_NET_HDR_MRG_LEN if (v1 or mrg) else VIRTIO_NET_HDR_LEN
        self.d.guest_csum = (features >> VIRTIO_NET_F_GUEST_CSUM) & 1
        self.d.guest_tso4 = (features >> VIRTIO_NET_F_GUEST_TSO4) & 1
        self.d.guest_tso6 = (features >> VIRTIO_NET_F_GUEST_TSO6) & 1
        self.d.guest_ecn = (features >> VIRTIO_NET_F_GUEST_ECN) & 1
        self.d.log.active = ((features >> VHOST_F_LOG_ALL) & 1) and self.d.log.base != NULL
        for i in range(self.d.num_vqs):
            self.d.vqs[i].event_idx = (features >> VIRTIO_RING_F_EVENT_IDX) & 1
            self.d.vqs[i].indirect = (features >> VIRTIO_RING_F_INDIRECT_DESC) & 1
            self.d.vqs[i].packed = packed
        retranslate_rings(self.d.vqs, self.d.num_vqs)

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
                    self.d.learned = 0
            elif p >= 0:
                e.sw.ports[p] = self.d
                self._claim_port_mac()
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

    # -- port security (switch.pxd)

    cdef void _claim_port_mac(self) noexcept nogil:
        """World stopped: install the configured MAC's owned entry if the
        device is on the switch."""
        if self.d.port_mac != 0 and self.d.port >= 0 and self.d.tap_fd < 0:
            sw_claim(self.engine.sw, self.d)

    def set_port_mac(self, mac):
        """Port security: the device's configured MAC ("52:54:00:12:34:56" or
        6 bytes), or None for none.  With one, frames from any other source
        MAC are dropped and counted, and the MAC's switch entry is this
        port's for good.  Without, the port learns any source MAC (up to
        learn_limit)."""
        cdef Engine e = self.engine
        cdef uint64_t value = 0, prev
        if mac is not None:
            raw = parse_mac(mac) if isinstance(mac, str) else bytes(mac)
            if len(raw) != 6:
                raise ValueError(f"bad MAC address {mac!r}")
            if raw[0] & 1:
                raise ValueError(f"{mac!r} is a multicast address, not a port's MAC")
            value = int.from_bytes(raw, "big")
        with nogil:
            e.stop_world()
            prev = self.d.port_mac
            if prev != 0 and prev != value and self.d.port >= 0:
                sw_forget_mac(e.sw, prev, self.d.port)
            self.d.port_mac = value
            self._claim_port_mac()
            e.start_world()

    def forget_learned(self):
        """The guest went away (its front-end disconnected or reset the
        device): drop the MACs it taught the switch; the configured one
        stays this port's."""
        cdef Engine e = self.engine
        if self.d.port < 0 or self.d.tap_fd >= 0:
            return
        with nogil:
            e.stop_world()
            sw_forget_port(e.sw, self.d.port)
            self.d.learned = 0
            self._claim_port_mac()
            e.start_world()

    @property
    def port_mac(self):
        """The configured MAC ("xx:xx:..."), or None."""
        if self.d.port_mac == 0:
            return None
        return format_mac(self.d.port_mac)

    @property
    def learn_limit(self):
        return self.d.learn_limit

    @learn_limit.setter
    def learn_limit(self, uint64_t n):
        """Most source MACs the port may have in the table (MAC_LEARN_LIMIT)."""
        self.d.learn_limit = n

    def switch_stats(self):
        """Port security counters: frames dropped for their source MAC
        (spoofed), source MACs not learned (the port's limit; a full probe
        window), and how many MACs the port added to the table since its
        guest arrived (learned; at most learn_limit)."""
        return {"spoofed": self.d.spoofed, "learn_capped": self.d.learn_capped,
                "table_full": self.d.table_full, "learned": <int64_t>self.d.learned}

    def rearm_notices(self):
        """Let the switch report security events again (a new front-end)."""
        self.d.notices = 0
        self._logged = 0

    def _take_notices(self):
        """Log lines for the events noted since the last re-arm, each once."""
        cdef uint8_t bits = self.d.notices & ~self._logged
        out = []
        if not bits:
            return out
        self._logged |= bits
        limit = self.d.learn_limit
        if bits & NOTICE_SPOOF:
            src = format_mac(self.d.spoof_src)
            own = self.port_mac
            out.append(f"port security: dropping frames from source MAC {src}"
                       + (f" (the device's MAC is {own})" if own and own != src
                          else " (another device's configured MAC)")
                       + "; further ones are counted, not logged")
        if bits & NOTICE_CAPPED:
            out.append(f"switch: the device has {limit} source MACs in the MAC table, its "
                       "limit; new ones are not learned (counted, not logged)")
        if bits & NOTICE_FULL:
            out.append("switch: a MAC table window is full; new source MACs there are not "
                       "learned (counted, not logged)")
        return out

    def tap_stats(self):
        return {"tap_rx_dropped": self.d.tap_rx_dropped}

    def offload_stats(self):
        """Frames whose offloads this device did not negotiate, finished in software."""
        return {"sw_csum": self.d.sw_csum, "sw_gso": self.d.sw_gso}

    def ring_stats(self, int index):
        """Ring `index`'s counters (docs/metrics.md): frames and bytes, drops
        (the total and dropped_<reason>, DropReason), ring errors,
        interrupts; RX rings the buffers used, TX rings the kicks read."""
        cdef Vring *vq = self._ring(index)
        cdef RingCounters c = self._counted(index)
        reasons = RX_DROPS if index % 2 == 0 else TX_DROPS
        out = {"packets": c.packets, "bytes": c.bytes, "errors": vq.errors,
               "dropped": sum(c.by[r] for r in reasons.values()), "interrupts": vq.calls}
        if index % 2 == 0:
            out["buffers"] = c.buffers
        else:
            out["kicks"] = c.kicks
        for name, r in reasons.items():
            out["dropped_" + name] = c.by[r]
        return out

    def inject(self, bytes frame, int pair=0):
        """Switch one frame as if the guest had sent it on queue pair `pair`
        (used for SEND_RARP: the switch learns the MAC and floods it); a
        device on a representor writes it to the representor instead."""
        cdef Engine e = self.engine
        cdef Worker *w = e.ctl
        cdef _Inject inj
        cdef Iov src
        cdef uint8_t buf[VIRTIO_NET_HDR_MRG_LEN + 1518]
        cdef uint32_t n = len(frame)
        if n < 14 or n > 1518:
            raise ValueError("frame must be 14..1518 bytes")
        memset(buf, 0, VIRTIO_NET_HDR_MRG_LEN + n)
        memcpy(buf + self.d.hdr_len, <char *>frame, n)
        src.base = buf
        src.len = self.d.hdr_len + n
        inj.w, inj.dev, inj.pair, inj.src = w, self.d, pair, &src
        with e._lock:
            with nogil:
                # into other guests' memory: if one of them vanished, that
                # device is broken and the frame flooded again past it
                while guarded_run(w, _inject, <void *>&inj) == VFE_FAULTED:
                    pass

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
