# Inflight I/O tracking of split rings (vhost-user INFLIGHT_SHMFD, QEMU
# docs/interop/vhost-user.rst "Inflight I/O tracking"): a request queue
# records in a region QEMU keeps which descriptor heads it has taken and
# not yet completed, so that a new process after a crash (kill -9) can
# complete each of them exactly once.  The layout is described in
# vfe/vhost/inflight.py.
#
# The writes here are ordered for a crash at *any* instruction, not for
# another CPU: a killed process's stores are all in the shared pages, but
# the compiler must not move a flag before the data it vouches for.  Hence
# release stores on the fields recovery trusts (inflight flag,
# last_batch_head, used_idx).
#
# Runtime (the ring's worker, inside its burst):
#   taken from avail:  counter, then inflight = 1           (inflight_take)
#   used entry written: next = last_batch_head, head = it    (inflight_link)
#   used->idx published: inflight = 0 for the batch, then used_idx = used->idx
#                                                            (inflight_clear)
# Recovery (ring start, world stopped): inflight_recover.
#
# The region is the front-end's memory: every field in it (version,
# desc_num, last_batch_head, used_idx, the flags, counters and next links)
# may hold anything, and may change while we read it.  Nothing read from
# it is used as an index without a check against the ring size, and the
# ring size is checked against what the region holds (its queue size and
# its length in the ring's layout, split or packed) before anything is
# written: ring_start refuses a ring that does not fit, and from then on
# every index into the region is bounded by the ring size (`ndesc`).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport qsort
from atomics cimport *

# Sizes and field offsets; the engine's inflight_layout() hands them to
# tests/unit/virtio/test_virtio_c_side.py, which checks them against
# vfe/vhost/inflight.py's structs.
cdef enum:
    IF_HDR = 16                 # QueueRegionSplit header
    IF_DESC = 16                # one DescStateSplit
    IF_VERSION = 8
    IF_DESC_NUM = 10
    IF_LAST_BATCH = 12
    IF_USED_IDX = 14
    IF_D_INFLIGHT = 0
    IF_D_NEXT = 6
    IF_D_COUNTER = 8

# inflight_recover results (besides a count >= 0)
cdef enum:
    IF_FRESH = -1               # version 0: initialised now, the front-end's base stands
    IF_BAD_SIZE = -2            # desc_num differs from the ring size
    IF_BAD_VERSION = -3         # a version we do not know (not 0 or 1)
    IF_CORRUPT = -5             # packed: a cursor or a chain out of range, a free list that loops

# The packed layout (QueueRegionPacked, DescStatePacked): inflight_layout(packed=True)
# hands these to the same unit test.
cdef enum:
    PIF_HDR = 32
    PIF_DESC = 32
    PIF_VERSION = 8
    PIF_DESC_NUM = 10
    PIF_FREE_HEAD = 12
    PIF_OLD_FREE_HEAD = 14
    PIF_USED_IDX = 16
    PIF_OLD_USED_IDX = 18
    PIF_USED_WRAP = 20
    PIF_OLD_USED_WRAP = 21
    PIF_D_INFLIGHT = 0
    PIF_D_NEXT = 2
    PIF_D_LAST = 4
    PIF_D_NUM = 6
    PIF_D_COUNTER = 8
    PIF_D_ID = 16
    PIF_D_FLAGS = 18
    PIF_D_LEN = 20
    PIF_D_ADDR = 24

ctypedef struct InflightQueue:
    uint8_t *region             # this queue's QueueRegionSplit/Packed; NULL: not tracked
    uint64_t stride             # its bytes (set_inflight): how many entries fit depends on the layout
    uint32_t queue_size         # the entries per queue the front-end sized it for
    uint32_t ndesc              # entries in use: the ring's size once started (bounds every index)
    uint64_t counter            # next fetch counter
    uint16_t *resubmit          # heads left inflight, in counter order (malloc'd at start) ...
    uint16_t *resubmit_num      # ... and, packed, the slots of each as recovery counted (same block)
    int nresubmit
    int resubmit_pos            # next one to serve
    # packed rings: the chain being taken (pinflight_record)
    uint32_t take_head          # its first entry
    uint32_t take_last          # its latest entry
    int take_bad                # the free list ran out or is corrupt: not recorded


cdef inline uint8_t *if_desc(uint8_t *q, uint32_t head) noexcept nogil:
    return q + IF_HDR + IF_DESC * head


cdef inline void inflight_take(InflightQueue *iq, uint16_t head) noexcept nogil:
    """Head `head` was just read from the avail ring."""
    cdef uint8_t *d
    if iq.region == NULL or head >= iq.ndesc:
        return
    d = if_desc(iq.region, head)
    vfe_store_u64(<uint64_t *>(d + IF_D_COUNTER), iq.counter)
    iq.counter += 1
    vfe_store_release_u8(d + IF_D_INFLIGHT, 1)


cdef inline void inflight_link(InflightQueue *iq, uint16_t head) noexcept nogil:
    """Head `head`'s used entry is written (not yet published): put it on
    the last-batch list recovery walks if used->idx got ahead of used_idx."""
    cdef uint8_t *d
    cdef uint16_t *lbh
    if iq.region == NULL or head >= iq.ndesc:
        return
    d = if_desc(iq.region, head)
    lbh = <uint16_t *>(iq.region + IF_LAST_BATCH)
    vfe_store_u16(<uint16_t *>(d + IF_D_NEXT), vfe_load_u16(lbh))
    vfe_store_release_u16(lbh, head)


cdef inline void inflight_clear(InflightQueue *iq, uint16_t *heads, int n,
                                uint16_t used_idx) noexcept nogil:
    """used->idx (now `used_idx`) was published with `heads` in it."""
    cdef int i
    if iq.region == NULL or n == 0:
        return
    for i in range(n):
        if heads[i] < iq.ndesc:
            vfe_store_release_u8(if_desc(iq.region, heads[i]) + IF_D_INFLIGHT, 0)
    vfe_store_release_u16(<uint16_t *>(iq.region + IF_USED_IDX), used_idx)


cdef inline uint16_t inflight_next_resubmit(InflightQueue *iq) noexcept nogil:
    cdef uint16_t head = iq.resubmit[iq.resubmit_pos]
    iq.resubmit_pos += 1
    return head


ctypedef struct _IfEntry:
    uint64_t counter
    uint32_t head
    uint32_t num                # packed: the chain's slots


cdef inline int _if_cmp(const void *a, const void *b) noexcept nogil:
    cdef uint64_t x = (<_IfEntry *>a).counter, y = (<_IfEntry *>b).counter
    return -1 if x < y else (1 if x > y else 0)


cdef inline int inflight_recover(InflightQueue *iq, uint16_t size, uint16_t used_idx,
                                 _IfEntry *scratch) noexcept nogil:
    """A ring of `size` entries starts with this queue's region and the
    guest's used->idx `used_idx` (the front-end's SET_VRING_BASE is not
    trusted after a crash: QEMU falls back to its own idea of used_idx).

    (ring_start checked that the region has room for the ring.)  A
    version other than 0 and 1: IF_BAD_VERSION, nothing written.
    Version 0 (never used): initialise the header; IF_FRESH.  desc_num
    other than `size`: IF_BAD_SIZE, nothing changed.  Otherwise finish a
    batch the dead process published but did not clear (used->idx ahead of
    the region's used_idx: walk that many entries of the last-batch list),
    then collect the heads still inflight into iq.resubmit (caller-sized
    `size` entries) in counter order and return how many; the ring's next
    avail index is used_idx + that count."""
    cdef uint8_t *q = iq.region
    cdef uint16_t *hdr_used = <uint16_t *>(q + IF_USED_IDX)
    cdef uint16_t n, h
    cdef uint32_t i, steps
    cdef int count = 0
    cdef uint64_t top = 0
    cdef uint16_t version
    version = vfe_load_u16(<uint16_t *>(q + IF_VERSION))
    if version > 1:
        return IF_BAD_VERSION
    if version == 0:
        for i in range(size):
            vfe_store_u8(if_desc(q, i) + IF_D_INFLIGHT, 0)
        vfe_store_u16(<uint16_t *>(q + IF_DESC_NUM), size)
        vfe_store_u16(<uint16_t *>(q + IF_LAST_BATCH), 0)
        vfe_store_u16(hdr_used, used_idx)
        vfe_store_release_u16(<uint16_t *>(q + IF_VERSION), 1)
        iq.counter = 0
        iq.nresubmit = 0
        iq.resubmit_pos = 0
        return IF_FRESH
    if vfe_load_u16(<uint16_t *>(q + IF_DESC_NUM)) != size:
        return IF_BAD_SIZE
    n = <uint16_t>(used_idx - vfe_load_u16(hdr_used))
    if n:
        h = vfe_load_u16(<uint16_t *>(q + IF_LAST_BATCH))
        steps = 0
        # a list longer than the ring is corrupt: stop there
        while n > 0 and steps < size and h < size:
            vfe_store_u8(if_desc(q, h) + IF_D_INFLIGHT, 0)
            h = vfe_load_u16(<uint16_t *>(if_desc(q, h) + IF_D_NEXT))
            n -= 1
            steps += 1
        vfe_store_release_u16(hdr_used, used_idx)
    for i in range(size):
        if vfe_load_u8(if_desc(q, i) + IF_D_INFLIGHT) == 1:
            scratch[count].head = i
            scratch[count].counter = vfe_load_u64(<uint64_t *>(if_desc(q, i) + IF_D_COUNTER))
            if scratch[count].counter >= top:
                top = scratch[count].counter + 1
            count += 1
    qsort(scratch, count, sizeof(_IfEntry), _if_cmp)
    for i in range(count):
        iq.resubmit[i] = <uint16_t>scratch[i].head
    iq.nresubmit = count
    iq.resubmit_pos = 0
    iq.counter = top
    return count


# ---------------------------------------------------------------- packed rings
#
# A packed ring's slots are overwritten by used descriptors, so the region
# keeps a copy of every descriptor taken (addr, len, flags, id) in entries
# drawn from a free list; a chain's first entry also holds inflight, its
# counter, `num` (its slots) and `last` (its last entry).  free_head and
# used_idx/used_wrap_counter move as we go; old_free_head, old_used_idx and
# old_used_wrap_counter are their values at the last commit point (a whole
# chain taken, or a batch of used descriptors published), to which
# recovery rolls back unless the guest already saw the batch.
#
# Runtime:
#   taking a chain:  each ring descriptor copied into the next free entry
#                    (pinflight_record); then the first entry's num, last,
#                    counter, inflight = 1, then old_free_head = free_head
#                    (pinflight_take_done)
#   used written:    nothing yet (the request's entries are known by id)
#   batch published: pinflight_return before the publish (entries back on
#                    the free list, used_idx/wrap), pinflight_commit after
#                    the used descriptors are visible and before the
#                    interrupt (inflight = 0, the old_* fields = the current ones)
# Recovery (ring start, world stopped): pinflight_recover.

cdef inline uint8_t *pif_desc(uint8_t *q, uint32_t e) noexcept nogil:
    return q + PIF_HDR + PIF_DESC * e


cdef inline void pinflight_record(InflightQueue *iq, uint32_t k, uint64_t addr, uint32_t dlen,
                                  uint16_t flags, uint16_t id) noexcept nogil:
    """Descriptor k (0: the chain's first) of the chain being taken."""
    cdef uint8_t *q = iq.region
    cdef uint32_t e
    cdef uint8_t *d
    if q == NULL:
        return
    if k == 0:
        iq.take_bad = 0
    if iq.take_bad:
        return
    e = vfe_load_u16(<uint16_t *>(q + PIF_FREE_HEAD))
    if e >= iq.ndesc:
        iq.take_bad = 1               # the front-end broke its region: the chain goes untracked
        return
    d = pif_desc(q, e)
    vfe_store_u64(<uint64_t *>(d + PIF_D_ADDR), addr)
    vfe_store_u32(<uint32_t *>(d + PIF_D_LEN), dlen)
    vfe_store_u16(<uint16_t *>(d + PIF_D_FLAGS), flags)
    vfe_store_u16(<uint16_t *>(d + PIF_D_ID), id)
    if k == 0:
        iq.take_head = e
    iq.take_last = e
    vfe_store_u16(<uint16_t *>(q + PIF_FREE_HEAD), vfe_load_u16(<uint16_t *>(d + PIF_D_NEXT)))


cdef inline uint32_t pinflight_take_done(InflightQueue *iq, uint16_t nslots) noexcept nogil:
    """The chain pinflight_record copied is taken: mark it inflight and
    commit the free list.  Returns its first entry (the request's handle
    for pinflight_return), or iq.ndesc if it is not tracked."""
    cdef uint8_t *q = iq.region
    cdef uint8_t *h
    if q == NULL or iq.take_bad:
        return iq.ndesc
    h = pif_desc(q, iq.take_head)
    vfe_store_u16(<uint16_t *>(h + PIF_D_NUM), nslots)
    vfe_store_u16(<uint16_t *>(h + PIF_D_LAST), <uint16_t>iq.take_last)
    vfe_store_u64(<uint64_t *>(h + PIF_D_COUNTER), iq.counter)
    iq.counter += 1
    vfe_store_release_u8(h + PIF_D_INFLIGHT, 1)
    vfe_store_release_u16(<uint16_t *>(q + PIF_OLD_FREE_HEAD),
                          vfe_load_u16(<uint16_t *>(q + PIF_FREE_HEAD)))
    return iq.take_head


cdef inline void pinflight_take_abort(InflightQueue *iq) noexcept nogil:
    """The chain pinflight_record copied is not taken (the ring stops on
    it): its entries back on the free list, which is as the last commit
    left it (takes and batches commit as they finish)."""
    if iq.region != NULL:
        vfe_store_u16(<uint16_t *>(iq.region + PIF_FREE_HEAD),
                      vfe_load_u16(<uint16_t *>(iq.region + PIF_OLD_FREE_HEAD)))


cdef inline void pinflight_return(InflightQueue *iq, uint16_t *entries, int n, uint16_t used_idx,
                                  int used_wrap) noexcept nogil:
    """Before the batch whose requests' first entries are `entries` is
    published: their entries back on the free list, and the used cursor
    it publishes."""
    cdef uint8_t *q = iq.region
    cdef uint16_t *free_head
    cdef uint32_t e, last
    cdef int i
    if q == NULL or n == 0:
        return
    free_head = <uint16_t *>(q + PIF_FREE_HEAD)
    for i in range(n):
        e = entries[i]
        if e >= iq.ndesc:
            continue                   # untracked (pinflight_take_done said so)
        last = vfe_load_u16(<uint16_t *>(pif_desc(q, e) + PIF_D_LAST))
        if last >= iq.ndesc:
            continue
        vfe_store_u16(<uint16_t *>(pif_desc(q, last) + PIF_D_NEXT), vfe_load_u16(free_head))
        vfe_store_u16(free_head, <uint16_t>e)
    vfe_store_u16(<uint16_t *>(q + PIF_USED_IDX), used_idx)
    vfe_store_release_u8(q + PIF_USED_WRAP, <uint8_t>used_wrap)


cdef inline void pinflight_commit(InflightQueue *iq, uint16_t *entries, int n) noexcept nogil:
    """The batch is published: its requests are no longer inflight, and
    the region's current state becomes the one recovery keeps."""
    cdef uint8_t *q = iq.region
    cdef int i
    if q == NULL or n == 0:
        return
    for i in range(n):
        if entries[i] < iq.ndesc:
            vfe_store_release_u8(pif_desc(q, entries[i]) + PIF_D_INFLIGHT, 0)
    vfe_store_u16(<uint16_t *>(q + PIF_OLD_FREE_HEAD), vfe_load_u16(<uint16_t *>(q + PIF_FREE_HEAD)))
    vfe_store_u16(<uint16_t *>(q + PIF_OLD_USED_IDX), vfe_load_u16(<uint16_t *>(q + PIF_USED_IDX)))
    vfe_store_release_u8(q + PIF_OLD_USED_WRAP, vfe_load_u8(q + PIF_USED_WRAP))


cdef inline void _pif_keep_current(uint8_t *q) noexcept nogil:
    """Recovery: the interrupted batch reached the guest; keep it."""
    vfe_store_u16(<uint16_t *>(q + PIF_OLD_FREE_HEAD), vfe_load_u16(<uint16_t *>(q + PIF_FREE_HEAD)))
    vfe_store_u16(<uint16_t *>(q + PIF_OLD_USED_IDX), vfe_load_u16(<uint16_t *>(q + PIF_USED_IDX)))
    vfe_store_u8(q + PIF_OLD_USED_WRAP, vfe_load_u8(q + PIF_USED_WRAP))


cdef inline void _pif_roll_back(uint8_t *q) noexcept nogil:
    """Recovery: back to the last commit point (an unfinished take or batch)."""
    vfe_store_u16(<uint16_t *>(q + PIF_FREE_HEAD), vfe_load_u16(<uint16_t *>(q + PIF_OLD_FREE_HEAD)))
    vfe_store_u16(<uint16_t *>(q + PIF_USED_IDX), vfe_load_u16(<uint16_t *>(q + PIF_OLD_USED_IDX)))
    vfe_store_u8(q + PIF_USED_WRAP, vfe_load_u8(q + PIF_OLD_USED_WRAP))


cdef inline int pinflight_recover(InflightQueue *iq, uint16_t size, uint8_t *ring,
                                  uint16_t *used_idx, int *used_wrap, uint32_t *nslots,
                                  _IfEntry *scratch, uint8_t *seen) noexcept nogil:
    """A packed ring of `size` slots (descriptor ring at `ring`) starts
    with this queue's region (room for it checked by ring_start);
    *used_idx/*used_wrap hold the front-end's base; scratch and seen have
    `size` entries.  Results as inflight_recover's, and IF_CORRUPT for a
    region whose cursors or chains are out of range or whose free list
    loops (a region that is not a packed one, e.g. one initialised for a
    split ring): nothing is written before that is known.

    Version 0: initialise it (free list 0, 1, ..., the base's used cursor).
    Otherwise: if the used cursor moved since the last commit, the batch
    being published counts if the guest saw it, else it is rolled back;
    entries on the free list are not inflight; the inflight chains are
    collected into iq.resubmit (with their slots in iq.resubmit_num) in
    counter order, and *used_idx/*used_wrap become the region's, *nslots
    the slots those chains hold (the ring's avail cursor is that many
    slots further)."""
    cdef uint8_t *q = iq.region
    cdef uint16_t version, flags, num, free_head, used, old_used
    cdef uint8_t wrap, old_wrap
    cdef uint32_t i, e
    cdef uint32_t total = 0
    cdef int count = 0
    cdef uint64_t top = 0
    cdef bint keep = False
    version = vfe_load_u16(<uint16_t *>(q + PIF_VERSION))
    if version > 1:
        return IF_BAD_VERSION
    if version == 0:
        for i in range(size):
            vfe_store_u8(pif_desc(q, i) + PIF_D_INFLIGHT, 0)
            vfe_store_u16(<uint16_t *>(pif_desc(q, i) + PIF_D_NEXT), <uint16_t>(i + 1))
        vfe_store_u16(<uint16_t *>(q + PIF_DESC_NUM), size)
        vfe_store_u16(<uint16_t *>(q + PIF_FREE_HEAD), 0)
        vfe_store_u16(<uint16_t *>(q + PIF_OLD_FREE_HEAD), 0)
        vfe_store_u16(<uint16_t *>(q + PIF_USED_IDX), used_idx[0])
        vfe_store_u16(<uint16_t *>(q + PIF_OLD_USED_IDX), used_idx[0])
        vfe_store_u8(q + PIF_USED_WRAP, <uint8_t>used_wrap[0])
        vfe_store_u8(q + PIF_OLD_USED_WRAP, <uint8_t>used_wrap[0])
        vfe_store_release_u16(<uint16_t *>(q + PIF_VERSION), 1)
        iq.counter = 0
        iq.nresubmit = 0
        iq.resubmit_pos = 0
        nslots[0] = 0
        return IF_FRESH
    if vfe_load_u16(<uint16_t *>(q + PIF_DESC_NUM)) != size:
        return IF_BAD_SIZE
    # each field read once: the front-end may change the region under us
    used = vfe_load_u16(<uint16_t *>(q + PIF_USED_IDX))
    old_used = vfe_load_u16(<uint16_t *>(q + PIF_OLD_USED_IDX))
    wrap = vfe_load_u8(q + PIF_USED_WRAP)
    old_wrap = vfe_load_u8(q + PIF_OLD_USED_WRAP)
    if used >= size or old_used >= size or wrap > 1 or old_wrap > 1:
        return IF_CORRUPT
    # a batch of exactly `size` slots moves only the wrap counter
    if used != old_used or wrap != old_wrap:
        # the batch was published iff its first slot's USED bit is the
        # batch's wrap counter: it stays so when the driver, having seen the
        # used descriptor, makes the slot available for the next lap (AVAIL
        # flips, USED keeps); before the publish the slot shows the
        # driver's available descriptor of the batch's lap (USED opposite)
        flags = vfe_load_u16(<uint16_t *>(ring + 16 * old_used + 14))
        keep = ((flags & (1 << 15)) != 0) == (old_wrap != 0)
    if keep:
        free_head = vfe_load_u16(<uint16_t *>(q + PIF_FREE_HEAD))
    else:
        free_head = vfe_load_u16(<uint16_t *>(q + PIF_OLD_FREE_HEAD))
        used, wrap = old_used, old_wrap
    # entries on the free list carry nothing; a list that comes back to
    # an entry is corrupt (it would hand one entry to two chains)
    for i in range(size):
        seen[i] = 0
    e = free_head
    while e < size:
        if seen[e]:
            return IF_CORRUPT
        seen[e] = 1
        e = vfe_load_u16(<uint16_t *>(pif_desc(q, e) + PIF_D_NEXT))
    for i in range(size):
        if seen[i] or vfe_load_u8(pif_desc(q, i) + PIF_D_INFLIGHT) != 1:
            continue
        num = vfe_load_u16(<uint16_t *>(pif_desc(q, i) + PIF_D_NUM))
        total += num
        if num == 0 or total > size:
            return IF_CORRUPT
        scratch[count].head = i
        scratch[count].num = num
        scratch[count].counter = vfe_load_u64(<uint64_t *>(pif_desc(q, i) + PIF_D_COUNTER))
        if scratch[count].counter >= top:
            top = scratch[count].counter + 1
        count += 1
    # the region is sound: now write it
    if keep:
        _pif_keep_current(q)
    else:
        _pif_roll_back(q)
    for i in range(size):
        if seen[i]:
            vfe_store_u8(pif_desc(q, i) + PIF_D_INFLIGHT, 0)
    qsort(scratch, count, sizeof(_IfEntry), _if_cmp)
    for i in range(<uint32_t>count):
        iq.resubmit[i] = <uint16_t>scratch[i].head
        iq.resubmit_num[i] = <uint16_t>scratch[i].num
    iq.nresubmit = count
    iq.resubmit_pos = 0
    iq.counter = top
    used_idx[0] = used
    used_wrap[0] = wrap
    nslots[0] = total
    return count


cdef inline int pinflight_chain(InflightQueue *iq, uint32_t *entry, uint64_t *addr,
                                uint32_t *dlen, uint16_t *flags, uint16_t *id) noexcept nogil:
    """Step through a resubmitted chain's copies: *entry is the one to read
    (start at its first); its fields out, *entry moved to the next.  -1 if
    the entry is outside the ring's part of the region."""
    cdef uint8_t *d
    if entry[0] >= iq.ndesc:
        return -1
    d = pif_desc(iq.region, entry[0])
    addr[0] = vfe_load_u64(<uint64_t *>(d + PIF_D_ADDR))
    dlen[0] = vfe_load_u32(<uint32_t *>(d + PIF_D_LEN))
    flags[0] = vfe_load_u16(<uint16_t *>(d + PIF_D_FLAGS))
    id[0] = vfe_load_u16(<uint16_t *>(d + PIF_D_ID))
    entry[0] = vfe_load_u16(<uint16_t *>(d + PIF_D_NEXT))
    return 0
