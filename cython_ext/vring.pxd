# Split virtqueues over guest memory: the structures the engine keeps per
# ring and the nogil operations on them (chain walk, used push/publish,
# notification suppression).  Every function here runs on a worker thread
# with the ring's owner lock held, and returns a code instead of raising.
#
# Names: `_gpa` guest-physical, `_uva` the front-end's virtual address,
# `_hva` ours.  `last_avail_idx`/`last_used_idx` are our cursors; the guest's
# avail->idx is `avail_idx`.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy, memmove
from atomics cimport *
from linux cimport write
from virtio cimport *
from counters cimport RingCounters, VFE_COUNTERS

cdef enum:
    # One dirty-log bit covers this many bytes of guest memory (the vhost-user
    # spec's VHOST_LOG_PAGE; vfe.vhost.messages.LOG_PAGE, checked by
    # tests/unit/virtio/test_virtio_c_side.py).
    VHOST_LOG_PAGE = 4096

cdef enum:
    MAX_REGIONS = 64
    MAX_IOV = 1024           # descriptors (or region pieces) of one chain
    BURST = 32

# Ring error codes: a negative code stops the ring (vq.broken = -code).
cdef enum:
    E_HEAD = -1        # head index >= queue size
    E_NEXT = -2        # next index >= table size
    E_LOOP = -3        # chain longer than its table: a loop
    E_ADDR = -4        # address not inside guest memory
    E_INDIRECT = -5    # bad indirect table (size, alignment, flags, not negotiated)
    E_NESTED = -6      # indirect inside indirect
    E_DIR = -7         # device-writable descriptor where readable expected, or reverse
    E_IOV = -8         # too many pieces
    E_LEN = -9         # zero or oversized chain
    E_AVAIL = -10      # avail index moved by more than the queue size
    E_RING = -11       # ring addresses not mapped

ctypedef struct Region:
    uint64_t gpa
    uint64_t size
    uint64_t uva
    uint64_t hva

ctypedef struct MemTable:
    int n
    Region r[MAX_REGIONS]
    uint64_t fault_addr      # != 0: SIGBUS there, the memory vanished (fault.pxd); a new table clears it

ctypedef struct Iov:
    uint8_t *base
    uint32_t len
    uint64_t gpa             # where base is in guest-physical space (for the dirty log)

ctypedef struct DirtyLog:
    # QEMU's migration bitmap (SET_LOG_BASE): one bit per 4 KiB guest page.
    uint8_t *base
    uint64_t size            # bytes
    int active               # VHOST_F_LOG_ALL negotiated and a log mapped

ctypedef struct PackedUsed:
    # a packed ring's used descriptor waiting for the publish (packed.pxd)
    uint32_t len
    uint16_t slot
    uint16_t id
    uint16_t flags


ctypedef struct Vring:
    # hot fields first
    int lock                 # taken by whoever writes the ring from outside its worker (RX delivery)
    void *publisher          # RX: the Worker that publishes its pushed used entries at its burst's end (under lock)
    int ready                # started: addresses translated, may be processed
    int enabled              # SET_VRING_ENABLE
    int broken               # 0, or -E_* of the error that stopped it
    uint16_t size
    uint16_t mask
    uint16_t last_avail_idx
    uint16_t last_used_idx
    uint16_t flushed_used_idx  # used->idx as last published (for need_event)
    uint16_t shadow_avail_idx  # avail->idx as last read: re-read only when we run short
    int event_idx
    int indirect
    int notify_enabled       # adaptive mode: guest kicks currently wanted
    int stopping             # a stop is draining the ring: take no new avail entries
    RingCounters *cnt        # one block per counting thread, [Worker.id] (counters.pxd)
    uint8_t *desc
    uint16_t *avail          # [flags, idx, ring[size], used_event]
    uint8_t *used            # flags u16, idx u16, ring[size] {u32 id, u32 len}, avail_event u16
    MemTable *mem
    DirtyLog *log
    int log_used             # SET_VRING_ADDR asked for used-ring logging
    uint64_t log_guest_addr  # the used ring's guest-physical address
    int kick_fd
    int call_fd
    int64_t stall_ns
    uint64_t errors          # ring errors: rare, so not per worker (counters.pxd)
    uint64_t calls           # interrupts sent: next to call_fd, which the publisher just read
    uint64_t desc_uva
    uint64_t avail_uva
    uint64_t used_uva
    int index
    int worker
    int reported             # Python has logged `broken`
    int kind                 # RING_NET (dev is a NetDev, TX/RX) or RING_BLK (a BlkDev request queue)
    void *dev
    # packed rings (packed.pxd says what the fields above mean for them)
    int packed               # VIRTIO_F_RING_PACKED negotiated: this ring is packed
    int avail_wrap           # the wrap counter of last_avail_idx's lap
    int used_wrap            # the wrap counter of last_used_idx's lap
    int flushed_used_wrap    # used_wrap as last published (interrupt decisions)
    PackedUsed *pending      # the unpublished batch's used descriptors, in push order
    uint32_t npending        # how many (<= size): none is written into the ring before the publish
    uint32_t pending_span    # slots the unpublished batch covers (dirty log)
    uint16_t *id_ndesc       # per buffer id: slots its chain took (blk), then its inflight entry; RX scratch
    uint8_t *id_out          # blk, per buffer id: taken, its used descriptor not yet published
    uint64_t desc_gpa        # the descriptor ring's guest-physical address (dirty log)
    uint64_t dev_event_gpa   # the device event suppression area's (dirty log)


cdef inline uint64_t contig_hva(MemTable *mt, uint64_t addr, uint64_t length, bint by_uva) noexcept nogil:
    """Translate a range that must lie inside one region -- the front-end's
    virtual addresses (ring areas, by_uva) or guest-physical ones (indirect
    tables) -- to our address; 0 if it does not."""
    cdef int i
    cdef Region *r
    cdef uint64_t start
    for i in range(mt.n):
        r = &mt.r[i]
        start = r.uva if by_uva else r.gpa
        if addr >= start and addr - start < r.size:
            if length > r.size - (addr - start):
                return 0
            return r.hva + (addr - start)
    return 0


cdef inline int map_gpa(MemTable *mt, uint64_t gpa, uint64_t length, Iov *iov,
                        int max_iov, int *niov, int *last) noexcept nogil:
    """Append iovecs covering [gpa, gpa+length), one per region it spans;
    *last: the index of the region of its last byte."""
    cdef int i, found
    cdef Region *r
    cdef uint64_t off, chunk
    if gpa + length < gpa:
        return E_ADDR
    while length > 0:
        found = 0
        for i in range(mt.n):
            r = &mt.r[i]
            if gpa >= r.gpa and gpa - r.gpa < r.size:
                found = 1
                break
        if not found:
            return E_ADDR
        off = gpa - r.gpa
        chunk = r.size - off
        if chunk > length:
            chunk = length
        if niov[0] >= max_iov:
            return E_IOV
        iov[niov[0]].base = <uint8_t *>(r.hva + off)
        iov[niov[0]].len = <uint32_t>chunk
        iov[niov[0]].gpa = gpa
        niov[0] += 1
        last[0] = i
        gpa += chunk
        length -= chunk
    return 0


cdef inline uint8_t *indirect_table(Vring *vq, uint64_t addr, uint32_t dlen, uint16_t flags,
                                    int in_indirect, int *err) noexcept nogil:
    """Validate an INDIRECT descriptor and map its table (one region, 16-byte
    aligned, a whole number of descriptors); NULL with *err set if not."""
    cdef uint64_t thva
    err[0] = E_INDIRECT
    if in_indirect:
        err[0] = E_NESTED
        return NULL
    if not vq.indirect or (flags & VRING_DESC_F_NEXT):
        return NULL
    if dlen == 0 or dlen % VRING_DESC_SIZE or dlen // VRING_DESC_SIZE > MAX_QUEUE_SIZE:
        return NULL
    thva = contig_hva(vq.mem, addr, dlen, False)
    if thva == 0 or (thva & 15):
        return NULL
    return <uint8_t *>thva


# A descriptor chain's walk, in two parts so every ring layout shares the
# checks: the per-descriptor step (chain_add: direction, mapping, byte
# limit; indirect_table checks an INDIRECT descriptor's table) and the loop
# that finds the next descriptor, which is the layout's own (walk_chain: a
# split ring's next field; a packed ring's consecutive slots would be
# another loop over chain_start, chain_add and chain_end).
#
# The direction policy is decided at compile time: each policy is an enum
# of its own and ChainDir their fused type, so Cython compiles one walk per
# policy with that policy's checks alone, and the C compiler inlines each
# into its one caller; the byte limit is a constant at every call site.
# (One walk taking the policy as a runtime value stayed out of line at
# gcc -O2 and cost about 45 more instructions a chain: callgrind, 64 B
# frames through the switch.)
cdef enum AllReadable:
    ALL_READABLE                # net TX: every descriptor device-readable
cdef enum AllWritable:
    ALL_WRITABLE                # net RX: every descriptor device-writable
cdef enum ReadableThenWritable:
    READABLE_THEN_WRITABLE      # blk request: readable ones, then writable ones (never back)
ctypedef fused ChainDir:
    AllReadable
    AllWritable
    ReadableThenWritable

ctypedef struct Chain:
    # What a walk found: iov[0:nread] readable pieces, iov[nread:niov] writable
    int niov
    int nread
    uint64_t rbytes
    uint64_t wbytes
    int writing              # a writable descriptor seen (a readable one after it is E_DIR)
    int region               # the memory region tried first for the next descriptor (the last one hit)


cdef inline void chain_start(Chain *c) noexcept nogil:
    """Nothing found yet: every walk starts here."""
    c.niov = 0
    c.nread = 0
    c.rbytes = 0
    c.wbytes = 0
    c.writing = 0
    c.region = 0


cdef inline int chain_add(MemTable *mt, Chain *c, Iov *iov, int max_iov, ChainDir direction,
                          uint64_t limit, uint64_t addr, uint32_t dlen,
                          uint16_t flags) noexcept nogil:
    """One descriptor of a chain (not an INDIRECT one): its direction against
    the policy (a zero-length one too), its bytes mapped into iov[c.niov:max_iov]
    (a zero-length one adds none), the chain's bytes against `limit`.
    Returns 0 or an E_* code."""
    cdef int rc
    cdef bint writable = (flags & VRING_DESC_F_WRITE) != 0
    cdef Region *r = &mt.r[c.region]
    cdef uint64_t off
    if ChainDir is AllReadable:
        if writable:
            return E_DIR
    elif ChainDir is AllWritable:
        if not writable:
            return E_DIR
    elif writable:
        c.writing = 1
    elif c.writing:
        return E_DIR
    if dlen == 0:
        return 0
    off = addr - r.gpa
    if c.region < mt.n and addr >= r.gpa and off < r.size and dlen <= r.size - off:
        # the whole descriptor inside the region the last one was in (with
        # one region, as testpmd's and most guests' buffers are: always)
        if c.niov >= max_iov:
            return E_IOV
        iov[c.niov].base = <uint8_t *>(r.hva + off)
        iov[c.niov].len = dlen
        iov[c.niov].gpa = addr
        c.niov += 1
    else:
        rc = map_gpa(mt, addr, dlen, iov, max_iov, &c.niov, &c.region)
        if rc < 0:
            return rc
    if writable:
        c.wbytes += dlen
    else:
        c.rbytes += dlen
        c.nread = c.niov
    if c.rbytes + c.wbytes > limit:
        return E_LEN
    return 0


cdef inline int chain_end(Chain *c, ChainDir direction) noexcept nogil:
    """A one-direction chain (net) that holds no byte is E_LEN; a request
    chain's minimum sizes are its caller's to check (blk: header, status)."""
    if ChainDir is not ReadableThenWritable and c.rbytes + c.wbytes == 0:
        return E_LEN
    return 0


cdef inline int walk_chain(Vring *vq, uint16_t head, ChainDir direction, uint64_t limit,
                           Iov *iov, int max_iov, Chain *c) noexcept nogil:
    """Follow the split ring's descriptor chain at `head` into iovecs over
    our mapping, iov[0:max_iov]; *c says what it found.

    Validates everything the guest controls: indices, flags, nesting,
    direction, lengths, that every byte lies inside a mapped region.
    Returns 0 or an E_* code.
    """
    cdef uint8_t *table = vq.desc
    cdef uint32_t table_size = vq.size
    cdef uint32_t idx = head
    cdef uint32_t steps = 0
    cdef int in_indirect = 0
    cdef uint64_t addr
    cdef uint32_t dlen
    cdef uint16_t flags, nxt
    cdef int rc
    chain_start(c)
    if head >= vq.size:
        return E_HEAD
    # every descriptor is read once, then checked: idx < table_size and the
    # step count before each read (the head's hold by the check above)
    vfe_read_desc(table + VRING_DESC_SIZE * idx, &addr, &dlen, &flags, &nxt)
    steps = 1
    while True:
        if flags & VRING_DESC_F_INDIRECT:
            table = indirect_table(vq, addr, dlen, flags, in_indirect, &rc)
            if table == NULL:
                return rc
            table_size = dlen // VRING_DESC_SIZE
            idx = 0
            steps = 0
            in_indirect = 1
        else:
            rc = chain_add(vq.mem, c, iov, max_iov, direction, limit, addr, dlen, flags)
            if rc < 0:
                return rc
            if not (flags & VRING_DESC_F_NEXT):
                break
            idx = nxt
        if idx >= table_size:
            return E_NEXT
        steps += 1
        if steps > table_size:
            return E_LOOP
        vfe_read_desc(table + VRING_DESC_SIZE * idx, &addr, &dlen, &flags, &nxt)
    return chain_end(c, direction)


cdef inline int avail_count(Vring *vq) noexcept nogil:
    """Entries the guest made available since our cursor; E_AVAIL if impossible."""
    cdef uint16_t avail_idx = vfe_load_acquire_u16(&vq.avail[1])
    cdef uint16_t n = <uint16_t>(avail_idx - vq.last_avail_idx)
    if n > vq.size:
        return E_AVAIL
    return n


cdef inline int avail_count_cached(Vring *vq, int want) noexcept nogil:
    """Like avail_count, but trusts the last value read while it covers `want`
    entries: avail->idx lives on a cache line the guest keeps writing, and a
    read per packet makes that line bounce between the cores."""
    cdef uint16_t n = <uint16_t>(vq.shadow_avail_idx - vq.last_avail_idx)
    if n >= want and n <= vq.size:
        return n
    vq.shadow_avail_idx = vfe_load_acquire_u16(&vq.avail[1])
    n = <uint16_t>(vq.shadow_avail_idx - vq.last_avail_idx)
    if n > vq.size:
        return E_AVAIL
    return n


cdef inline int avail_head(Vring *vq, uint16_t i) noexcept nogil:
    """The head the guest put in avail slot `i` (our cursor, masked), or
    E_HEAD if it is not a descriptor index.  Every consumer of the avail
    ring (net TX, net RX, blk) takes its heads from here, so nothing --
    chain walk, inflight region, request slot, used entry -- ever sees an
    unchecked one."""
    cdef uint16_t head = vfe_load_u16(&vq.avail[2 + (i & vq.mask)])
    if head >= vq.size:
        return E_HEAD
    return head


cdef inline void log_pages(DirtyLog *lg, uint64_t gpa, uint64_t length) noexcept nogil:
    """Mark the VHOST_LOG_PAGE pages of [gpa, gpa+length) dirty.  The caller fenced
    after writing the data, so QEMU never copies a page before its bit shows."""
    cdef uint64_t page, last
    if length == 0:
        return
    page = gpa // VHOST_LOG_PAGE
    last = (gpa + length - 1) // VHOST_LOG_PAGE
    while page <= last:
        if (page >> 3) < lg.size:
            vfe_fetch_or_u8(lg.base + (page >> 3), <uint8_t>(1 << (page & 7)))
        page += 1


cdef inline void log_used_ring(Vring *vq) noexcept nogil:
    """Log the used ring (flags, idx, every element, avail_event): a few
    pages at most, cheaper than tracking which elements moved."""
    if vq.log.active and vq.log_used:
        vfe_fence()
        log_pages(vq.log, vq.log_guest_addr, vring_used_size(vq.size, True))


cdef inline void log_used_bytes(Vring *vq, uint64_t off, uint64_t length) noexcept nogil:
    """Log a small write into the used ring (flags, avail_event)."""
    if vq.log.active and vq.log_used:
        vfe_fence()
        log_pages(vq.log, vq.log_guest_addr + off, length)


cdef inline void count_call(Vring *vq) noexcept nogil:
    """An interrupt sent (by the ring's owner, or an RX ring's publisher
    under its lock)."""
    if VFE_COUNTERS:
        vq.calls += 1


cdef inline void used_push(Vring *vq, uint32_t id, uint32_t length) noexcept nogil:
    cdef uint8_t *e = vq.used + VRING_HEADER_SIZE + VRING_USED_ELEM_SIZE * (vq.last_used_idx & vq.mask)
    vfe_store_u32(<uint32_t *>e, id)
    vfe_store_u32(<uint32_t *>(e + 4), length)
    vq.last_used_idx += 1


cdef inline bint need_event(uint16_t event, uint16_t new_idx, uint16_t old) noexcept nogil:
    return <uint16_t>(new_idx - event - 1) < <uint16_t>(new_idx - old)


cdef inline void used_publish(Vring *vq) noexcept nogil:
    """Release-store used->idx, then interrupt the guest if it asked for one."""
    cdef uint16_t old = vq.flushed_used_idx
    cdef uint16_t new_idx = vq.last_used_idx
    cdef uint64_t one = 1
    if old == new_idx:
        return
    vfe_store_release_u16(<uint16_t *>(vq.used + 2), new_idx)
    vq.flushed_used_idx = new_idx
    log_used_ring(vq)
    vfe_fence()
    if vq.event_idx:
        if not need_event(vfe_load_u16(&vq.avail[2 + vq.size]), new_idx, old):
            return
    elif vfe_load_u16(&vq.avail[0]) & VRING_AVAIL_F_NO_INTERRUPT:
        return
    if vq.call_fd >= 0:
        write(vq.call_fd, &one, 8)
        count_call(vq)


cdef inline void notify_disable(Vring *vq) noexcept nogil:
    """Ask the guest not to kick (we are polling).  With EVENT_IDX we just stop
    moving avail_event: once the guest passes it, it stops kicking."""
    if not vq.event_idx:
        vfe_store_u16(<uint16_t *>vq.used, VRING_USED_F_NO_NOTIFY)
        log_used_bytes(vq, 0, 2)
    vq.notify_enabled = 0


cdef inline void notify_enable(Vring *vq) noexcept nogil:
    """Ask for a kick on the next avail entry.  The caller fences and re-checks
    avail->idx afterwards: the guest may have added work before seeing this."""
    if vq.event_idx:
        # avail_event: right after the used ring's elements
        vfe_store_u16(<uint16_t *>(vq.used + vring_used_size(vq.size, False)), vq.last_avail_idx)
        log_used_bytes(vq, vring_used_size(vq.size, False), VRING_EVENT_SIZE)
    else:
        vfe_store_u16(<uint16_t *>vq.used, 0)
        log_used_bytes(vq, 0, 2)
    vq.notify_enabled = 1


cdef inline int sg_copy(Iov *dst, int ndst, uint32_t dst_skip, Iov *src, int nsrc,
                        uint32_t src_skip, uint32_t length) noexcept nogil:
    """Copy `length` bytes from the src iovecs (after src_skip) to the dst
    iovecs (after dst_skip).  Returns bytes copied (short if either side ends)."""
    cdef int di = 0, si = 0
    cdef uint32_t doff = dst_skip, soff = src_skip, n, copied = 0
    while di < ndst and doff >= dst[di].len:
        doff -= dst[di].len
        di += 1
    while si < nsrc and soff >= src[si].len:
        soff -= src[si].len
        si += 1
    while length > 0 and di < ndst and si < nsrc:
        n = dst[di].len - doff
        if src[si].len - soff < n:
            n = src[si].len - soff
        if length < n:
            n = length
        # memmove: both sides are guest memory, and a guest may make them
        # overlap (memcpy on overlapping ranges is undefined; ASan's
        # memcpy-param-overlap, found by fuzzing net_ring)
        memmove(dst[di].base + doff, src[si].base + soff, n)
        copied += n
        length -= n
        doff += n
        soff += n
        if doff == dst[di].len:
            di += 1
            doff = 0
        if soff == src[si].len:
            si += 1
            soff = 0
    return copied
