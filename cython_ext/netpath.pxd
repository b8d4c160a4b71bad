# The net data path's shared structures: a net device as the engine sees it,
# the in-engine L2 switch, and the per-worker scratch state.  The functions
# live in engine.pyx; this file is the map of what they touch.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int64_t
from vring cimport Vring, MemTable, Iov, DirtyLog, MAX_IOV
from counters cimport RingCounters
from virtio cimport VIRTIO_NET_HDR_MRG_LEN
from fault cimport FaultRegistry

cdef enum:
    MAX_PORTS = 4096
    SW_TABLE = 16384          # MAC table slots (power of two)
    SW_PROBE = 16
    # Source MACs one port may add to the table (until its guest goes).  A
    # guest normally shows one; bridged nested guests, containers (macvlan)
    # or VRRP show a few more, and 256 leaves them room.  It is 1/64 of the
    # table, so a guest sending from random MACs fills a sliver of it and
    # stops there (the rest is counted, not learned) instead of pushing
    # others out.
    MAC_LEARN_LIMIT = 256
    MAX_WORKER_RINGS = 4096
    LIN_CAP = 65536 + 256     # largest frame we linearize (a TSO frame + headers)
    SEG_CAP = 1 << 20         # software GSO output
    MAX_SEGS = 1024

# NetDev.notices: security events Python has not logged yet
cdef enum:
    NOTICE_SPOOF = 1
    NOTICE_CAPPED = 2
    NOTICE_FULL = 4

# Delivery results
cdef enum:
    R_OK = 0                  # delivered (or deliberately dropped: nothing to retry)
    R_DROP = 1                # could not deliver; why is in Worker.drop_reason (counters.pxd)
    R_NO_ROOM = 2             # destination ring full: the sender may retry later

ctypedef struct NetDev:
    int port                  # switch port; -1 when detached
    int num_vqs
    Vring *vqs
    MemTable *mem
    DirtyLog log
    int hdr_len               # 10 or 12 (virtio_net_hdr[_mrg_rxbuf])
    int mrg_rxbuf
    int packed                # VIRTIO_F_RING_PACKED: every ring of the device is packed (vq.packed)
    int guest_csum
    int guest_tso4
    int guest_tso6
    int guest_ecn
    uint64_t features
    uint64_t sw_csum          # frames whose checksum we finished for this device
    uint64_t sw_gso           # TSO frames we segmented for this device
    int paused                # quiesced/frozen (vhostmgmt vf -o 2/3): no TX taken, no RX given
    int tap_fd                # >= 0: connected to a representor instead of the switch
    uint64_t tap_rx_dropped   # frames from the representor the guest had no room for
    # switch port security (switch.pxd)
    uint64_t port_mac         # the configured MAC (mac=); 0: none, the port learns any source
    uint64_t learned          # MACs it added to the table since its guest came (port_mac aside)
    uint64_t learn_limit      # most it may add (MAC_LEARN_LIMIT); moves of known MACs are free
    uint64_t spoofed          # frames dropped: a source MAC not port_mac, or another port's port_mac
    uint64_t learn_capped     # source MACs not learned: the port was at learn_limit
    uint64_t table_full       # source MACs not learned: their probe window was full
    uint64_t spoof_src        # the first spoofed source MAC since the re-arm (for the log)
    uint8_t notices           # NOTICE_* bits: Python logs each once per front-end (security_notices)

ctypedef struct Switch:
    uint64_t table[SW_TABLE]  # (mac << 16) | (port + 1); 0 = empty; port field 0 = forgotten
    NetDev *ports[MAX_PORTS]
    int nports                # highest used port + 1

ctypedef int32_t (*csum_fn_t)(uint8_t *frame, int32_t length, int32_t csum_start,
                              int32_t csum_offset) noexcept nogil
ctypedef int32_t (*gso_fn_t)(uint8_t *frame, int32_t length, int32_t gso_type,
                             int32_t hdr_len, int32_t gso_size, int32_t csum_start,
                             int32_t csum_offset, uint8_t *out, int32_t out_cap,
                             int32_t *seg_offsets, int32_t *seg_lens,
                             int32_t max_segs) noexcept nogil

ctypedef struct Worker:
    int lock                  # held for a whole poll iteration; control ops take it to stop the world
    int id                    # its counter block in every ring (counters.pxd): 0..workers-1, the control scratch after them
    int stop
    int mode                  # 0 poll, 1 adaptive
    int epfd
    int wake_fd
    int event_fd              # written when a ring breaks (Python logs it)
    int64_t spin_ns           # adaptive: the longest idle time before sleeping (--spin-us)
    int64_t poll_ns           # adaptive: the idle time before sleeping now, 0..spin_ns (self-tuned)
    int blocked               # a TX ring waits for room in a destination
    int nrings
    Vring *rings[MAX_WORKER_RINGS]
    Switch *sw
    csum_fn_t csum            # the Numba kernels (vfe.kernels), copied in at Engine.start
    gso_fn_t gso
    int ntaps                 # representor-attached devices whose TAP this worker reads
    NetDev *taps[MAX_WORKER_RINGS]
    uint8_t *tap_buf
    int ndirty                # RX rings filled this burst, published at its end
    Vring *dirty[64]
    uint64_t iterations
    uint64_t sleeps
    int drop_reason           # why the frame being sent was dropped (DropReason, for the sender's count)
    int nwoke                 # kick eventfds the last sleep read: counted on their rings under the lock
    int woke_fd[64]
    uint64_t woke_val[64]
    uint8_t hdr_in[VIRTIO_NET_HDR_MRG_LEN]
    uint8_t hdr_out[VIRTIO_NET_HDR_MRG_LEN]
    Iov iov[MAX_IOV]
    Iov rx_iov[MAX_IOV]
    uint16_t rx_head[MAX_IOV]
    uint32_t rx_cap[MAX_IOV]
    uint8_t *lin
    uint8_t *seg
    int32_t seg_off[MAX_SEGS]
    int32_t seg_len[MAX_SEGS]
    # SIGBUS recovery (includes/guard.h, fault.pxd)
    FaultRegistry *faults     # the engine's guest mappings, to find whose memory vanished
    Vring *cur                # the ring being served (its used entries are published after a fault)
    Vring *rx_held            # the destination RX ring whose lock this thread holds, or NULL
    # the run of deliveries rx_held serves (netdata.pxd rx_acquire): its destination
    NetDev *rx_dev
    int rx_pair
    int rx_fresh              # the run's first delivery: read avail->idx afresh
    RingCounters *rx_cnt      # this worker's counter block of rx_held (counters.pxd)
    # the source MAC this burst learned last and the table slot it is in (switch.pxd sw_known)
    NetDev *learn_dev         # NULL: none yet this burst
    uint64_t learn_mac
    uint64_t *learn_slot
    uint64_t learn_entry
    # the destination MAC this burst looked up last and the port found (-1: none)
    int lookup_valid
    int lookup_port
    uint64_t lookup_mac
