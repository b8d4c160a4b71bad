# The virtio-blk data path (virtio 1.2, 5.2): a block device as the engine
# sees it and a request against the device's backend (null, malloc, or a
# file handed to the I/O threads of blk_aio.pxd).  Its
# chain (readable header and data, then writable data and the status byte)
# is walked by vring.pxd's walk_chain, READABLE_THEN_WRITABLE.  Everything here is nogil and creates
# no Python object; the worker glue (blk_burst) lives in engine.pyx.
#
# Every value the guest wrote is untrusted.  A chain we cannot even answer
# (bad descriptors, shorter than the 16-byte header, no device-writable
# byte for the status) stops the ring like a bad net chain does; a request
# we can answer but not serve (sector out of range, length not a multiple
# of 512, write to a read-only disk, bad discard ranges) gets IOERR, and a
# type we do not implement (or did not negotiate) gets UNSUPP.
#
# Guest memory is little-endian (VERSION_1) and so is every host we build
# for (x86-64, like the rest of the engine): fields are read with memcpy.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from atomics cimport *
from vring cimport *
from virtio cimport *
from inflight cimport InflightQueue
from blk_aio cimport AioPool, AioRing, AioRange

cdef enum:
    RING_NET = 0             # Vring.kind: what vq.dev points to
    RING_BLK = 1

cdef enum:
    BLK_MAX_RANGES = 256     # discard/write-zeroes ranges we ever accept in one request
    BACKEND_NULL = 0
    BACKEND_MALLOC = 1
    BACKEND_FILE = 2         # a file served asynchronously (blk_aio.pxd)
    BLK_ASYNC = 0xFF         # blk_request: validated, the I/O goes to the pool (not a status)

# A request chain longer than this is a guest bug (we offer seg_max * size_max
# far below it): the ring stops, as for a net chain over NET_MAX_CHAIN.
cdef enum:
    BLK_MAX_CHAIN = 64 * 1024 * 1024

# Ring errors of blk chains (continue vring.pxd's E_* codes)
cdef enum:
    E_BLK_HDR = -12          # fewer than 16 device-readable bytes: no request header
    E_BLK_STATUS = -13       # no device-writable byte for the status
    E_DUP = -14              # a head taken again while its request is still outstanding

ctypedef struct BlkDev:
    int num_vqs
    Vring *vqs
    MemTable *mem
    DirtyLog log
    uint64_t features
    uint64_t capacity        # 512-byte sectors
    uint32_t block_size      # logical block size (config blk_size)
    int read_only
    int in_order             # --force_in_order: answer each queue's requests in take order
    int backend              # BACKEND_NULL / BACKEND_MALLOC / BACKEND_FILE
    uint8_t *data            # malloc: capacity * 512 bytes (the BlkBackend's: shared, borrowed)
    int fd                   # file backend: the file (-1 otherwise; the BlkBackend's)
    AioPool *pool            # file backend: its I/O threads
    AioRing *aio             # file backend: per queue, requests at the pool
    InflightQueue *inflight  # per queue (num_vqs); region NULL until SET_INFLIGHT_FD
    uint8_t serial[20]       # GET_ID answer, NUL-padded
    uint32_t max_discard_sectors
    uint32_t max_discard_seg
    uint32_t max_write_zeroes_sectors
    uint32_t max_write_zeroes_seg
    # totals over all queues (several workers: atomic adds)
    uint64_t reads
    uint64_t writes
    uint64_t flushes
    uint64_t get_ids
    uint64_t discards
    uint64_t write_zeroes
    uint64_t read_bytes
    uint64_t write_bytes
    uint64_t ioerrs
    uint64_t unsupps


cdef inline void sg_zero(Iov *dst, int ndst, uint64_t length) noexcept nogil:
    """Zero the first `length` bytes of the dst iovecs."""
    cdef int i = 0
    cdef uint64_t n
    while length > 0 and i < ndst:
        n = dst[i].len
        if n > length:
            n = length
        memset(dst[i].base, 0, n)
        length -= n
        i += 1


cdef inline uint32_t rd_le32(uint8_t *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef inline uint64_t rd_le64(uint8_t *p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v


cdef inline bint blk_in_range(BlkDev *d, uint64_t sector, uint64_t nsect) noexcept nogil:
    return sector <= d.capacity and nsect <= d.capacity - sector


cdef inline uint8_t blk_ranges(BlkDev *d, int kind, Iov *riov, int nread, uint64_t data_len,
                               uint8_t *scratch, uint32_t *nout) noexcept nogil:
    """DISCARD or WRITE_ZEROES: copy the range array once (the guest may
    change it under us), validate every range, then apply them all -- or,
    for a file, leave them in `scratch` as AioRange (bytes) and return
    BLK_ASYNC with their count in *nout."""
    cdef uint32_t nranges, max_seg, max_sect, i, num, flags
    cdef uint64_t sector
    cdef Iov s
    cdef uint8_t *r
    if data_len == 0 or data_len % VIRTIO_BLK_DISCARD_WZ_SIZE:
        return VIRTIO_BLK_S_IOERR
    nranges = <uint32_t>(data_len // VIRTIO_BLK_DISCARD_WZ_SIZE)
    if kind == VIRTIO_BLK_T_DISCARD:
        max_seg, max_sect = d.max_discard_seg, d.max_discard_sectors
    else:
        max_seg, max_sect = d.max_write_zeroes_seg, d.max_write_zeroes_sectors
    if nranges > max_seg or nranges > BLK_MAX_RANGES:
        return VIRTIO_BLK_S_IOERR
    s.base = scratch
    s.len = nranges * VIRTIO_BLK_DISCARD_WZ_SIZE
    sg_copy(&s, 1, 0, riov, nread, VIRTIO_BLK_REQ_HDR_SIZE, s.len)
    for i in range(nranges):
        r = scratch + VIRTIO_BLK_DISCARD_WZ_SIZE * i
        sector = rd_le64(r)
        num = rd_le32(r + 8)
        flags = rd_le32(r + 12)
        if flags & ~(<uint32_t>VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP):
            return VIRTIO_BLK_S_UNSUPP          # reserved flag bits
        if kind == VIRTIO_BLK_T_DISCARD and (flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP):
            return VIRTIO_BLK_S_UNSUPP          # 5.2.6.2: unmap is not valid for discard
        if num > max_sect or not blk_in_range(d, sector, num):
            return VIRTIO_BLK_S_IOERR
    if d.read_only:
        return VIRTIO_BLK_S_IOERR
    vfe_add_u64(&d.discards if kind == VIRTIO_BLK_T_DISCARD else &d.write_zeroes, 1)
    if d.backend == BACKEND_FILE:
        # in place: range i's 16 bytes become AioRange i's 16 (read before written)
        for i in range(nranges):
            r = scratch + VIRTIO_BLK_DISCARD_WZ_SIZE * i
            sector = rd_le64(r)
            num = rd_le32(r + 8)
            (<AioRange *>r).offset = sector * VIRTIO_BLK_SECTOR_SIZE
            (<AioRange *>r).length = <uint64_t>num * VIRTIO_BLK_SECTOR_SIZE
        nout[0] = nranges
        return BLK_ASYNC
    if d.backend == BACKEND_MALLOC:
        # discarded ranges read back as zeros too: simple and deterministic
        for i in range(nranges):
            r = scratch + VIRTIO_BLK_DISCARD_WZ_SIZE * i
            memset(d.data + rd_le64(r) * VIRTIO_BLK_SECTOR_SIZE, 0, <uint64_t>rd_le32(r + 8) * VIRTIO_BLK_SECTOR_SIZE)
    return VIRTIO_BLK_S_OK


cdef inline uint8_t blk_request(BlkDev *d, Iov *iov, int nread, int nwrite, uint64_t rbytes,
                                uint64_t wbytes, uint8_t *scratch, uint32_t *data_in,
                                uint32_t *kind_out, uint64_t *offset_out,
                                uint32_t *n_out) noexcept nogil:
    """Serve one request whose chain has >= 16 readable and >= 1 writable
    bytes.  Returns the status byte to write; *data_in is how many bytes of
    data went into the guest's writable buffers (before the status).

    A file backend's I/O (IN, OUT, FLUSH, DISCARD, WRITE_ZEROES) is only
    validated here: BLK_ASYNC, with *kind_out the type, *offset_out the
    byte offset (IN/OUT) and, for the range types, *n_out ranges left in
    `scratch`; the caller queues it (engine.pyx, blk_aio.pxd)."""
    cdef uint8_t hdr[VIRTIO_BLK_REQ_HDR_SIZE]
    cdef uint8_t ident[VIRTIO_BLK_ID_BYTES]
    cdef Iov h, b
    cdef Iov *wiov = iov + nread
    cdef uint32_t kind
    cdef uint64_t sector, length
    cdef uint64_t in_len = wbytes - 1          # writable bytes before the status byte
    cdef uint64_t out_len = rbytes - VIRTIO_BLK_REQ_HDR_SIZE
    data_in[0] = 0
    h.base = hdr
    h.len = VIRTIO_BLK_REQ_HDR_SIZE
    sg_copy(&h, 1, 0, iov, nread, 0, VIRTIO_BLK_REQ_HDR_SIZE)
    kind = rd_le32(hdr)
    sector = rd_le64(hdr + 8)
    kind_out[0] = kind
    offset_out[0] = sector * VIRTIO_BLK_SECTOR_SIZE
    if kind == VIRTIO_BLK_T_IN:
        length = in_len
        if length % VIRTIO_BLK_SECTOR_SIZE or not blk_in_range(d, sector, length // VIRTIO_BLK_SECTOR_SIZE):
            vfe_add_u64(&d.ioerrs, 1)
            return VIRTIO_BLK_S_IOERR
        data_in[0] = <uint32_t>length
        vfe_add_u64(&d.reads, 1)
        vfe_add_u64(&d.read_bytes, length)
        if d.backend == BACKEND_FILE:
            return BLK_ASYNC
        if d.backend == BACKEND_MALLOC:
            b.base = d.data + sector * VIRTIO_BLK_SECTOR_SIZE
            b.len = <uint32_t>length
            sg_copy(wiov, nwrite, 0, &b, 1, 0, <uint32_t>length)
        else:
            sg_zero(wiov, nwrite, length)
        return VIRTIO_BLK_S_OK
    if kind == VIRTIO_BLK_T_OUT:
        length = out_len
        if d.read_only or length % VIRTIO_BLK_SECTOR_SIZE or not blk_in_range(d, sector, length // VIRTIO_BLK_SECTOR_SIZE):
            vfe_add_u64(&d.ioerrs, 1)
            return VIRTIO_BLK_S_IOERR
        vfe_add_u64(&d.writes, 1)
        vfe_add_u64(&d.write_bytes, length)
        if d.backend == BACKEND_FILE:
            return BLK_ASYNC
        if d.backend == BACKEND_MALLOC:
            b.base = d.data + sector * VIRTIO_BLK_SECTOR_SIZE
            b.len = <uint32_t>length
            sg_copy(&b, 1, 0, iov, nread, VIRTIO_BLK_REQ_HDR_SIZE, <uint32_t>length)
        return VIRTIO_BLK_S_OK
    if kind == VIRTIO_BLK_T_FLUSH:
        # null and RAM have no cache to write back; a file's dirty pages go to disk
        vfe_add_u64(&d.flushes, 1)
        if d.backend == BACKEND_FILE:
            return BLK_ASYNC
        return VIRTIO_BLK_S_OK
    if kind == VIRTIO_BLK_T_GET_ID:
        length = in_len if in_len < VIRTIO_BLK_ID_BYTES else VIRTIO_BLK_ID_BYTES
        memcpy(ident, d.serial, VIRTIO_BLK_ID_BYTES)
        b.base = ident
        b.len = VIRTIO_BLK_ID_BYTES
        sg_copy(wiov, nwrite, 0, &b, 1, 0, <uint32_t>length)
        data_in[0] = <uint32_t>length
        vfe_add_u64(&d.get_ids, 1)
        return VIRTIO_BLK_S_OK
    if ((kind == VIRTIO_BLK_T_DISCARD and (d.features >> VIRTIO_BLK_F_DISCARD) & 1)
            or (kind == VIRTIO_BLK_T_WRITE_ZEROES and (d.features >> VIRTIO_BLK_F_WRITE_ZEROES) & 1)):
        kind = blk_ranges(d, kind, iov, nread, out_len, scratch, n_out)
        if kind == VIRTIO_BLK_S_IOERR:
            vfe_add_u64(&d.ioerrs, 1)
        elif kind == VIRTIO_BLK_S_UNSUPP:
            vfe_add_u64(&d.unsupps, 1)
        return <uint8_t>kind
    vfe_add_u64(&d.unsupps, 1)
    return VIRTIO_BLK_S_UNSUPP
