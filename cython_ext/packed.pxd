# Packed virtqueues (virtio 1.2, 2.8): the layout's own structures and loop.
# One descriptor ring of 16-byte {le64 addr, le32 len, le16 id, le16 flags}
# that both sides write: the driver makes a descriptor available by setting
# its AVAIL bit to its wrap counter and USED to the opposite; the device
# answers a whole chain (a buffer) with one used descriptor written over the
# chain's first slot, AVAIL = USED = its own wrap counter, and skips the
# chain's other slots.  Each wrap counter flips whenever its index passes the
# end of the ring.  Two 4-byte event suppression areas replace flags/idx
# and used_event/avail_event: the driver's (when to interrupt it) and the
# device's (when to kick us).
#
# The per-descriptor checks are vring.pxd's (chain_start, chain_add,
# chain_end, indirect_table): this file has only the walk over consecutive
# slots.  Every Vring field keeps its meaning with packed = 1, except:
#   last_avail_idx / avail_wrap   the next slot we read and its wrap counter
#   last_used_idx / used_wrap     the next slot we write a used descriptor to
#   flushed_used_idx / flushed_used_wrap   where the guest last saw us (interrupts)
#   desc                          the descriptor ring
#   avail                         the driver's event suppression area
#   used                          the device's event suppression area
# Sizes need not be powers of two (2.8.10.1), so nothing here masks.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from atomics cimport *
from linux cimport write
from virtio cimport *
from vring cimport *
from inflight cimport InflightQueue, pinflight_record

cdef enum:
    # descriptor flags besides vring.pxd's NEXT/WRITE/INDIRECT (2.8.22)
    VRING_PACKED_DESC_F_AVAIL = 1 << 7
    VRING_PACKED_DESC_F_USED = 1 << 15
    # event suppression (2.8.14): {le16 off_wrap, le16 flags}
    VRING_PACKED_EVENT_FLAG_ENABLE = 0
    VRING_PACKED_EVENT_FLAG_DISABLE = 1
    VRING_PACKED_EVENT_FLAG_DESC = 2
    VRING_PACKED_EVENT_SIZE = 4
    PACKED_WRAP_BIT = 15          # in off_wrap and in a GET/SET_VRING_BASE half
    PACKED_DESC_ID = 12           # offsets inside a descriptor
    PACKED_DESC_FLAGS = 14

# Ring errors only a packed ring can make (continue the E_* codes; fault.pxd has -16)
cdef enum:
    E_PACKED_CHAIN = -20     # a chain's later descriptor is not marked available for its lap
    E_PACKED_ID = -21        # buffer id >= ring size


cdef inline bint packed_is_avail(uint16_t flags, int wrap) noexcept nogil:
    """A descriptor the driver made available in the lap whose wrap counter
    is `wrap`: AVAIL == wrap and USED != wrap.  Anything else (a used one, a
    previous lap's, both bits equal) is not: it never stops the ring."""
    # both bits at once: AVAIL alone in a lap of wrap counter 1, USED alone in one of 0
    return (flags & (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED)) == (
        VRING_PACKED_DESC_F_AVAIL if wrap else VRING_PACKED_DESC_F_USED)


cdef inline uint16_t *packed_flags_at(Vring *vq, uint32_t slot) noexcept nogil:
    return <uint16_t *>(vq.desc + VRING_DESC_SIZE * slot + PACKED_DESC_FLAGS)


cdef inline bint packed_pending(Vring *vq) noexcept nogil:
    """The driver made the next slot available (the kick re-check)."""
    return packed_is_avail(vfe_load_acquire_u16(packed_flags_at(vq, vq.last_avail_idx)),
                           vq.avail_wrap)


cdef inline void packed_step(Vring *vq, uint32_t *slot, int *wrap, uint32_t n) noexcept nogil:
    """Move a cursor n (<= size) slots on, flipping its wrap counter at the end."""
    slot[0] += n
    if slot[0] >= vq.size:
        slot[0] -= vq.size
        wrap[0] ^= 1


cdef inline int packed_walk_table(Vring *vq, Chain *c, Iov *iov, int max_iov, ChainDir direction,
                                  uint64_t limit, uint8_t *table, uint32_t n) noexcept nogil:
    """An indirect table's n descriptors, in order (2.8.19): only WRITE
    counts among their flags, except INDIRECT, which would nest (E_NESTED)."""
    cdef uint32_t i
    cdef uint64_t addr
    cdef uint32_t dlen
    cdef uint16_t bid, flags
    cdef int rc
    for i in range(n):
        # a packed descriptor: id where a split one has flags, flags where it has next
        vfe_read_desc(table + VRING_DESC_SIZE * i, &addr, &dlen, &bid, &flags)
        if flags & VRING_DESC_F_INDIRECT:
            return E_NESTED
        rc = chain_add(vq.mem, c, iov, max_iov, direction, limit, addr, dlen,
                       flags & VRING_DESC_F_WRITE)
        if rc < 0:
            return rc
    return 0


cdef inline int packed_take_one(Vring *vq, uint32_t *slot, int *wrap, ChainDir direction,
                                uint64_t limit, Iov *iov, int max_iov, Chain *c, uint16_t *id,
                                uint16_t *ndesc) noexcept nogil:
    """packed_take's common case (a net ring's buffer in one descriptor,
    as testpmd and Linux guests post them) in fewer steps: one compare of
    the flags says available in this lap, neither NEXT nor INDIRECT, and
    the policy's direction; then id < size, 0 < len <= limit and the bytes
    inside one memory region.  Returns 1 as packed_take would, or 0 for
    anything else, nothing changed: packed_take then reads the slot afresh
    and decides with all its checks (a not-available slot, chains, tables,
    a descriptor across regions, every error).  Fields are read once, the
    flags first with acquire, and only what was checked is used.  The net
    data path calls this first and packed_take only when it declines, so
    this small function inlines into the loops and the walk need not."""
    cdef uint32_t pos = slot[0]
    cdef uint8_t *d = vq.desc + VRING_DESC_SIZE * pos
    cdef uint16_t flags = vfe_load_acquire_u16(<uint16_t *>(d + PACKED_DESC_FLAGS))
    cdef uint16_t want = VRING_PACKED_DESC_F_AVAIL if wrap[0] else VRING_PACKED_DESC_F_USED
    cdef MemTable *mt = vq.mem
    cdef Region *r
    cdef uint64_t addr, off
    cdef uint32_t dlen
    cdef uint16_t bid
    cdef int i
    if ChainDir is AllWritable:
        want |= VRING_DESC_F_WRITE
    if (flags & (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED | VRING_DESC_F_NEXT
                 | VRING_DESC_F_INDIRECT | VRING_DESC_F_WRITE)) != want:
        return 0
    addr = vfe_load_u64(<uint64_t *>d)
    dlen = vfe_load_u32(<uint32_t *>(d + 8))
    bid = vfe_load_u16(<uint16_t *>(d + PACKED_DESC_ID))
    # 0 < dlen <= limit in one compare: 0 - 1 wraps to the largest value
    if bid >= vq.size or <uint64_t>dlen - 1 >= limit or max_iov < 1:
        return 0
    for i in range(mt.n):
        r = &mt.r[i]
        off = addr - r.gpa
        if addr >= r.gpa and off < r.size:
            if dlen > r.size - off:
                return 0                 # runs into the next region: map_gpa splits it
            iov[0].base = <uint8_t *>(r.hva + off)
            iov[0].len = dlen
            iov[0].gpa = addr
            c.niov = 1
            c.region = i
            c.writing = 0
            if ChainDir is AllWritable:
                c.nread = 0
                c.rbytes = 0
                c.wbytes = dlen
            else:
                c.nread = 1
                c.rbytes = dlen
                c.wbytes = 0
            packed_step(vq, &pos, wrap, 1)
            slot[0] = pos
            id[0] = bid
            ndesc[0] = 1
            return 1
    return 0


cdef inline int packed_take(Vring *vq, uint32_t *slot, int *wrap, ChainDir direction,
                            uint64_t limit, Iov *iov, int max_iov, Chain *c, uint16_t *id,
                            uint16_t *ndesc, InflightQueue *track) noexcept nogil:
    """Walk the chain at cursor (*slot, *wrap) into iov[0:max_iov].

    Returns 0 if the driver has not made that slot available (nothing
    changed), 1 with the cursor moved past the chain, *id its buffer id
    (the last descriptor's, < size) and *ndesc the slots it took, or an
    E_* code.  Each descriptor is read once: its flags with acquire, then
    the rest, so no field is trusted from before the driver published it;
    every later descriptor of the chain must be available in its own lap
    (the driver writes the head's flags last).  With `track` (a blk queue's
    inflight region, else NULL) each descriptor is copied there as read."""
    cdef uint32_t pos = slot[0]
    cdef int lap = wrap[0]
    cdef uint32_t n = 0
    cdef uint8_t *d
    cdef uint8_t *table
    cdef uint16_t flags, bid = 0
    cdef uint64_t addr
    cdef uint32_t dlen
    cdef int rc
    chain_start(c)
    while True:
        d = vq.desc + VRING_DESC_SIZE * pos
        flags = vfe_load_acquire_u16(<uint16_t *>(d + PACKED_DESC_FLAGS))
        if not packed_is_avail(flags, lap):
            return 0 if n == 0 else E_PACKED_CHAIN
        addr = vfe_load_u64(<uint64_t *>d)
        dlen = vfe_load_u32(<uint32_t *>(d + 8))
        bid = vfe_load_u16(<uint16_t *>(d + PACKED_DESC_ID))
        if track != NULL:
            pinflight_record(track, n, addr, dlen, flags, bid)
        n += 1
        packed_step(vq, &pos, &lap, 1)
        if flags & VRING_DESC_F_INDIRECT:
            # never with NEXT, so it ends the chain (indirect_table refuses both)
            table = indirect_table(vq, addr, dlen, flags, 0, &rc)
            if table == NULL:
                return rc
            rc = packed_walk_table(vq, c, iov, max_iov, direction, limit, table,
                                   dlen // VRING_DESC_SIZE)
            if rc < 0:
                return rc
            break
        rc = chain_add(vq.mem, c, iov, max_iov, direction, limit, addr, dlen, flags)
        if rc < 0:
            return rc
        if not (flags & VRING_DESC_F_NEXT):
            break
        if n >= vq.size:
            return E_LOOP
    if bid >= vq.size:
        return E_PACKED_ID
    rc = chain_end(c, direction)
    if rc < 0:
        return rc
    slot[0] = pos
    wrap[0] = lap
    id[0] = bid
    ndesc[0] = <uint16_t>n
    return 1


cdef inline void packed_log_descs(Vring *vq, uint32_t first, uint32_t count) noexcept nogil:
    """Log descriptor slots [first, first+count) (mod size) of the ring."""
    cdef uint32_t tail
    if count >= vq.size:
        log_pages(vq.log, vq.desc_gpa, VRING_DESC_SIZE * vq.size)
        return
    tail = vq.size - first
    if count <= tail:
        log_pages(vq.log, vq.desc_gpa + VRING_DESC_SIZE * first, VRING_DESC_SIZE * count)
    else:
        log_pages(vq.log, vq.desc_gpa + VRING_DESC_SIZE * first, VRING_DESC_SIZE * tail)
        log_pages(vq.log, vq.desc_gpa, VRING_DESC_SIZE * (count - tail))


cdef inline bint packed_need_event(Vring *vq, uint16_t old, int old_wrap) noexcept nogil:
    """The driver's event suppression asks for an interrupt now that the
    used cursor moved from (old, old_wrap) to ours (2.8.14, 2.8.21.3)."""
    cdef uint16_t flags = vfe_load_acquire_u16(vq.avail + 1)
    cdef uint16_t off_wrap, off, new_idx = vq.last_used_idx
    if flags == VRING_PACKED_EVENT_FLAG_DISABLE:
        return False
    if flags != VRING_PACKED_EVENT_FLAG_DESC or not vq.event_idx:
        return True               # ENABLE, or a value we do not know: interrupting is safe
    # a plain load is enough: an aligned 16-bit load does not tear, the
    # acquire of flags orders it after the driver's off_wrap-then-flags
    # writes, and a driver moving off_wrap while we read it re-checks the
    # used ring after writing it, as it does for a split ring's used_event
    off_wrap = vfe_load_u16(vq.avail)
    off = off_wrap & 0x7FFF
    # both cursors onto one line: the old one a lap back if it wrapped, the
    # event offset a lap back if it names the previous lap
    if old_wrap != vq.used_wrap:
        old = <uint16_t>(old - vq.size)
    if (off_wrap >> PACKED_WRAP_BIT) != vq.used_wrap:
        off = <uint16_t>(off - vq.size)
    return need_event(off, new_idx, old)


cdef inline bint packed_expose(Vring *vq) noexcept nogil:
    """Make the batch pushed since the last publish visible: each used
    descriptor written whole, its id and len, then its flags with a
    release store, last to first, so the driver, which reads from the
    first, sees the batch at once.  All of it is written here, in one
    pass that touches each cache line once: the driver keeps reading the
    first one's line while it waits, and writes spread over the burst
    (or two passes) would take the line back from it each time (about
    10% of the 64 B rate, scripts/bench).  Log it.  False if there was
    none."""
    cdef uint32_t i = vq.npending
    cdef PackedUsed *u
    cdef uint8_t *d
    if i == 0:
        return False
    while i > 0:
        i -= 1
        u = &vq.pending[i]
        d = vq.desc + VRING_DESC_SIZE * u.slot
        vfe_store_u16(<uint16_t *>(d + PACKED_DESC_ID), u.id)
        vfe_store_u32(<uint32_t *>(d + 8), u.len)
        vfe_store_release_u16(<uint16_t *>(d + PACKED_DESC_FLAGS), u.flags)
    if vq.log.active and vq.log_used:
        vfe_fence()
        packed_log_descs(vq, vq.pending[0].slot, vq.pending_span)     # from the first one's slot
    vq.npending = 0
    vq.pending_span = 0
    return True


cdef inline void packed_signal(Vring *vq) noexcept nogil:
    """After packed_expose: interrupt the guest if its event suppression
    asks for it (the used cursor moved from where it last saw it)."""
    cdef uint64_t one = 1
    cdef uint16_t old = vq.flushed_used_idx
    cdef int old_wrap = vq.flushed_used_wrap
    vq.flushed_used_idx = vq.last_used_idx
    vq.flushed_used_wrap = vq.used_wrap
    vfe_fence()
    if not packed_need_event(vq, old, old_wrap):
        return
    if vq.call_fd >= 0:
        write(vq.call_fd, &one, 8)
        count_call(vq)


cdef inline void packed_publish(Vring *vq) noexcept nogil:
    """Publish the batch pushed since the last publish and interrupt the
    guest if it asked."""
    if packed_expose(vq):
        packed_signal(vq)


cdef inline void packed_used_put(Vring *vq, uint16_t id, uint32_t length,
                                 uint16_t ndesc) noexcept nogil:
    """packed_used_push's step, into a batch with room (npending < size):
    no call, so it inlines into the data path's loops."""
    # both AVAIL and USED set to the wrap counter: all ones or all zeros
    cdef uint16_t flags = <uint16_t>(-vq.used_wrap) & (VRING_PACKED_DESC_F_AVAIL | VRING_PACKED_DESC_F_USED)
    cdef uint32_t pos = vq.last_used_idx
    cdef uint32_t n = vq.npending
    cdef PackedUsed *u = &vq.pending[n]
    if length:
        flags |= VRING_DESC_F_WRITE
    u.slot = <uint16_t>pos
    u.id = id
    u.len = length
    u.flags = flags
    vq.npending = n + 1
    vq.pending_span += ndesc
    packed_step(vq, &pos, &vq.used_wrap, ndesc)
    vq.last_used_idx = <uint16_t>pos


cdef inline void packed_used_push(Vring *vq, uint16_t id, uint32_t length,
                                  uint16_t ndesc) noexcept nogil:
    """A used descriptor for buffer `id` (a chain of ndesc slots) at our
    used cursor, which moves past the chain; written into the ring only at
    the publish (packed_expose).  Until then the slot still shows
    the driver's available descriptor, also to a driver looking at it after
    we died: a used descriptor the guest can see is always published.  A
    batch never holds more than the ring: a driver that reposts faster
    than we publish (net rings) gets the batch so far published first (a
    blk queue never gets there: an id is outstanding until published, so
    a batch has at most one descriptor per id)."""
    if vq.npending >= vq.size:
        packed_publish(vq)
    packed_used_put(vq, id, length, ndesc)


cdef inline void packed_log_event(Vring *vq) noexcept nogil:
    if vq.log.active and vq.log_used:
        vfe_fence()
        log_pages(vq.log, vq.dev_event_gpa, VRING_PACKED_EVENT_SIZE)


cdef inline void packed_notify_disable(Vring *vq) noexcept nogil:
    vfe_store_u16(<uint16_t *>vq.used + 1, VRING_PACKED_EVENT_FLAG_DISABLE)
    packed_log_event(vq)
    vq.notify_enabled = 0


cdef inline void packed_notify_enable(Vring *vq) noexcept nogil:
    """A kick wanted: with EVENT_IDX for the next slot we read (its offset
    and wrap counter first, then the flags that make the driver look)."""
    if vq.event_idx:
        vfe_store_u16(<uint16_t *>vq.used,
                      vq.last_avail_idx | (<uint16_t>vq.avail_wrap << PACKED_WRAP_BIT))
        vfe_store_release_u16(<uint16_t *>vq.used + 1, VRING_PACKED_EVENT_FLAG_DESC)
    else:
        vfe_store_u16(<uint16_t *>vq.used + 1, VRING_PACKED_EVENT_FLAG_ENABLE)
    packed_log_event(vq)
    vq.notify_enabled = 1


# -- the operations every ring has, for either layout: the callers outside
# the layouts' own loops (worker loop, RX publish, blk completions) use these

cdef inline void ring_publish(Vring *vq) noexcept nogil:
    if vq.packed:
        packed_publish(vq)
    else:
        used_publish(vq)


cdef inline void ring_notify_enable(Vring *vq) noexcept nogil:
    if vq.packed:
        packed_notify_enable(vq)
    else:
        notify_enable(vq)


cdef inline void ring_notify_disable(Vring *vq) noexcept nogil:
    if vq.packed:
        packed_notify_disable(vq)
    else:
        notify_disable(vq)


cdef inline bint ring_pending(Vring *vq) noexcept nogil:
    """Work waiting in the ring (or a broken avail index, for the burst to report)."""
    if vq.packed:
        return packed_pending(vq)
    return avail_count(vq) != 0


cdef inline void ring_used_push(Vring *vq, uint16_t id, uint32_t length) noexcept nogil:
    """A used entry for buffer `id`; a packed ring's chain length was noted
    by its taker in vq.id_ndesc[id]."""
    if vq.packed:
        packed_used_push(vq, id, length, vq.id_ndesc[id])
    else:
        used_push(vq, id, length)


# -- control (world stopped)

cdef inline bint packed_layout_fits(Vring *vqs, int n, int packed) noexcept nogil:
    """SET_FEATURES may choose the layout of stopped rings only: a started
    ring's cursors, per-id scratch, queued resubmissions and requests at
    the I/O threads mean nothing in the other layout.  False if a started
    ring has the other one."""
    cdef int i
    for i in range(n):
        if vqs[i].ready and vqs[i].packed != packed:
            return False
    return True


cdef inline uint64_t uva_to_gpa(MemTable *mt, uint64_t uva) noexcept nogil:
    cdef int i
    for i in range(mt.n):
        if uva >= mt.r[i].uva and uva - mt.r[i].uva < mt.r[i].size:
            return mt.r[i].gpa + (uva - mt.r[i].uva)
    return 0


cdef inline int packed_translate(Vring *vq) noexcept nogil:
    """Map a packed ring's descriptor ring (16-byte aligned) and its two
    event suppression areas (4-byte aligned): E_RING if any is outside
    guest memory."""
    cdef uint64_t d = contig_hva(vq.mem, vq.desc_uva, VRING_DESC_SIZE * <uint64_t>vq.size, True)
    cdef uint64_t drv = contig_hva(vq.mem, vq.avail_uva, VRING_PACKED_EVENT_SIZE, True)
    cdef uint64_t dev = contig_hva(vq.mem, vq.used_uva, VRING_PACKED_EVENT_SIZE, True)
    if d == 0 or drv == 0 or dev == 0 or (d & 15) or (drv & 3) or (dev & 3):
        return E_RING
    vq.desc = <uint8_t *>d
    vq.avail = <uint16_t *>drv
    vq.used = <uint8_t *>dev
    vq.desc_gpa = uva_to_gpa(vq.mem, vq.desc_uva)
    vq.dev_event_gpa = uva_to_gpa(vq.mem, vq.used_uva)
    return 0


cdef inline int packed_set_base(Vring *vq, uint64_t base) noexcept nogil:
    """SET_VRING_BASE as QEMU encodes it for packed rings: bits 0-14 the
    next slot to read, 15 its wrap counter, 16-30 the next used slot, 31
    its wrap counter.  Bits 16-31 all 0 mean used = avail: DPDK's vhost
    library encodes only the avail half (and sets used = avail on
    SET_VRING_BASE), so a front-end that kept such a value sends that.
    QEMU's encoding of a used cursor of slot 0, wrap counter 0 is the same
    value; our rings stop with used = avail (a blk queue drains first), so
    the two readings agree for what packed_base answered.  -1 if an index
    is >= size or bits above 31 are set; nothing changed then."""
    cdef uint32_t avail = base & 0x7FFF, used = (base >> 16) & 0x7FFF
    cdef int avail_wrap = (base >> PACKED_WRAP_BIT) & 1, used_wrap = (base >> 31) & 1
    if base >> 32:
        return -1
    if (base >> 16) == 0:
        used, used_wrap = avail, avail_wrap
    if avail >= vq.size or used >= vq.size:
        return -1
    vq.last_avail_idx = <uint16_t>avail
    vq.avail_wrap = avail_wrap
    vq.last_used_idx = <uint16_t>used
    vq.used_wrap = used_wrap
    vq.flushed_used_idx = <uint16_t>used
    vq.flushed_used_wrap = used_wrap
    vq.npending = 0
    vq.pending_span = 0
    return 0


cdef inline uint32_t packed_base(Vring *vq) noexcept nogil:
    """GET_VRING_BASE's answer, in packed_set_base's encoding."""
    return (vq.last_avail_idx | (<uint32_t>vq.avail_wrap << PACKED_WRAP_BIT)
            | ((vq.last_used_idx | (<uint32_t>vq.used_wrap << PACKED_WRAP_BIT)) << 16))


cdef inline int packed_alloc(Vring *vq) noexcept nogil:
    """The ring's per-id scratch for a start (vq.id_ndesc: `size` chain
    lengths, then `size` inflight entries; vq.id_out: none outstanding)
    and its unpublished batch (vq.pending: `size` used descriptors); -1 if
    no memory."""
    free(vq.id_ndesc)
    free(vq.pending)
    free(vq.id_out)
    vq.id_ndesc = <uint16_t *>malloc(2 * <size_t>vq.size * sizeof(uint16_t))
    vq.pending = <PackedUsed *>malloc(<size_t>vq.size * sizeof(PackedUsed))
    vq.id_out = <uint8_t *>calloc(vq.size, 1)
    vq.npending = 0
    return 0 if vq.id_ndesc != NULL and vq.pending != NULL and vq.id_out != NULL else -1


cdef inline void packed_free(Vring *vqs, int n) noexcept nogil:
    """A device's rings are going away (vqs may be NULL: never allocated)."""
    cdef int i
    if vqs == NULL:
        return
    for i in range(n):
        free(vqs[i].id_ndesc)
        free(vqs[i].pending)
        free(vqs[i].id_out)
        vqs[i].id_ndesc = NULL
        vqs[i].pending = NULL
        vqs[i].id_out = NULL
