# BlkBackend: a bdev's storage, shared by every virtio-blk device made on it.
# Included by engine.pyx before blk_device.pxi (BlkDevice holds one).

cdef class BlkBackend:
    """The storage behind one bdev: nothing (null), RAM (malloc) or a file
    (its fd, and an O_DIRECT fd of the same inode with `direct`).  Several
    BlkDevices may serve it at once (a PF's and a VF's controller on the
    same bdev, as SPDK allows): each keeps a reference, so the RAM is freed
    and the files closed only once the bdev and the last device on it are
    gone.  The devices read and write it concurrently, from their own
    workers and I/O threads; ordering between them is the guests' business,
    as on a shared disk."""
    cdef readonly str kind               # null | malloc | file
    cdef readonly uint64_t capacity_bytes
    cdef readonly bint read_only         # a file opened read-only
    cdef readonly object path
    cdef int backend                     # BACKEND_*
    cdef uint8_t *data                   # malloc: capacity_bytes of RAM
    cdef int fd                          # file: buffered
    cdef int dfd                         # file: O_DIRECT, or -1

    def __cinit__(self, str kind, uint64_t capacity_bytes, path=None, bint direct=False,
                  bint grow=False, bint read_only=False):
        self.fd = -1
        self.dfd = -1
        if capacity_bytes == 0 or capacity_bytes % VIRTIO_BLK_SECTOR_SIZE:
            raise ValueError(f"capacity {capacity_bytes} is not a positive multiple of 512 bytes")
        self.kind, self.capacity_bytes, self.read_only, self.path = kind, capacity_bytes, read_only, path
        if kind == "malloc":
            # calloc of a large block is fresh zero pages: RAM is used as written
            self.data = <uint8_t *>calloc(1, capacity_bytes)
            if self.data == NULL:
                raise MemoryError(f"cannot allocate a {capacity_bytes}-byte malloc bdev")
            self.backend = BACKEND_MALLOC
        elif kind == "file":
            if not path:
                raise ValueError("a file backend needs path=")
            self._open(path, direct, grow)
            self.backend = BACKEND_FILE
        elif kind == "null":
            self.backend = BACKEND_NULL
        else:
            raise ValueError(f"backend {kind!r}: use null, malloc or file")

    cdef _open(self, path, bint direct, bint grow):
        """The file (a regular file or a block device, never through a
        symlink; grown to the capacity if shorter only with `grow`) and,
        with `direct`, an O_DIRECT fd of the same inode.
        vfe/engine/bdev_file.py says why each check."""
        from vfe.engine.bdev_file import open_backing, open_direct
        fd, _ = open_backing(path, read_only=self.read_only, need=self.capacity_bytes, grow=grow)
        self.fd = fd
        if direct:
            self.dfd = open_direct(fd, path, self.read_only)   # __dealloc__ closes fd on failure

    def __dealloc__(self):
        free(self.data)
        self.data = NULL
        if self.fd >= 0:
            close(self.fd)
        if self.dfd >= 0:
            close(self.dfd)

    @property
    def direct(self):
        return self.dfd >= 0
