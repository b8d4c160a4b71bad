# The in-engine L2 switch: a lock-free MAC table shared by all workers.
# Each entry is one 64-bit word, (mac << 16) | flags | (port + 1), so a
# reader never sees half an update and a writer needs only a store or a
# CAS.  Entries are never deleted, only re-pointed (a MAC that moves) or
# forgotten (port 0) when their device leaves the switch or its guest goes;
# a forgotten slot is reused by the next new MAC of its probe window.
#
# Port security (what OVS does for OpenStack ports, what the seed's
# representors get from OVS flows): a port with a configured MAC
# (NetDev.port_mac, the device's mac=) owns it -- its entry is installed
# when the MAC is configured (sw_claim) and marked SW_OWNED, no other port
# can move it, and the port's frames with any other source MAC are dropped
# (switch_frame, netdata.pxd).  A port may add at most learn_limit MACs to
# the table, and a full probe window refuses a new MAC instead of evicting
# another's entry: a guest sending from random MACs can neither fill the
# table nor push another VM out of it.  What is refused is counted.
#
# The cost stays where it was for known MACs: a frame from a MAC already
# here is one compare; a MAC that moves (two ports forwarding each other's
# frames, as the throughput loop does) one flag test and one store.  Only
# a new MAC pays a CAS and the count.
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcpy
from atomics cimport *
from netpath cimport Switch, NetDev, SW_TABLE, SW_PROBE, MAX_PORTS

cdef enum:
    SW_PORT = 0x7FFF      # entry bits 0-14: port + 1 (0: forgotten)
    SW_OWNED = 0x8000     # entry bit 15: the port's configured MAC; nobody else may move it

cdef enum:
    LEARN_OK = 0          # known (or learned now)
    LEARN_OWNED = 1       # another port's configured MAC: refused, the frame is a spoof
    LEARN_CAPPED = 2      # the port has learn_limit entries already
    LEARN_FULL = 3        # the probe window has no free slot (nothing is evicted)


cdef extern from *:
    """
    /* The 48-bit MACs of an Ethernet header's first 12 bytes, big-endian
     * values (00:11:.. is 0x0011..), from two unaligned 8-byte loads (bytes
     * 0-7 and 4-11, both inside the 12) instead of twelve byte loads. */
    static inline void vfe_eth_macs(const uint8_t *eth, uint64_t *dst, uint64_t *src)
    {
        uint64_t a, b;
        memcpy(&a, eth, 8);
        memcpy(&b, eth + 4, 8);
        *dst = __builtin_bswap64(a) >> 16;
        *src = __builtin_bswap64(b) & 0xFFFFFFFFFFFFULL;
    }
    """
    void vfe_eth_macs(const uint8_t *eth, uint64_t *dst, uint64_t *src) noexcept nogil



cdef inline uint32_t mac_hash(uint64_t mac) noexcept nogil:
    mac ^= mac >> 23
    mac *= 0x2127599bf4325c37ULL
    mac ^= mac >> 47
    return <uint32_t>mac & (SW_TABLE - 1)


cdef inline uint64_t sw_entry(NetDev *dev, uint64_t mac) noexcept nogil:
    return (mac << 16) | <uint64_t>(dev.port + 1) | (SW_OWNED if mac == dev.port_mac else 0)


cdef inline int sw_learn(Switch *sw, NetDev *dev, uint64_t mac, uint64_t **where) noexcept nogil:
    """Lock-free: a slot is one 64-bit word, written by a store (a known MAC
    moving) or a CAS (a new MAC taking the first empty or forgotten slot of
    its window).  *where: the slot found holding mac -> dev (NULL when none
    was), for sw_known."""
    cdef uint32_t h = mac_hash(mac)
    cdef uint64_t want = sw_entry(dev, mac)
    cdef uint64_t v, free_v = 0
    cdef uint64_t *slot
    cdef uint64_t *free_slot = NULL
    cdef int k
    where[0] = NULL
    for k in range(SW_PROBE):
        slot = &sw.table[(h + k) & (SW_TABLE - 1)]
        v = vfe_load_acquire_u64(slot)
        if v == want:
            where[0] = slot
            return LEARN_OK                    # the common case: known, here
        if v == 0:
            if free_slot == NULL:
                free_slot = slot
                free_v = 0
            break                              # entries are never emptied: mac is not further on
        if (v >> 16) == mac:
            if (v & SW_OWNED) and (v & SW_PORT) != <uint64_t>(dev.port + 1):
                return LEARN_OWNED             # another port's configured MAC
            vfe_store_release_u64(slot, want)  # moved here (or back after being forgotten)
            where[0] = slot
            return LEARN_OK
        if (v & SW_PORT) == 0 and free_slot == NULL:
            free_slot = slot                   # forgotten: reusable
            free_v = v
    if free_slot == NULL:
        return LEARN_FULL
    if mac != dev.port_mac:
        # signed: the counter is read racily by the port's other workers
        if <int64_t>dev.learned >= <int64_t>dev.learn_limit:
            return LEARN_CAPPED
        if vfe_cas_u64(free_slot, free_v, want):
            vfe_add_u64(&dev.learned, 1)
    else:
        vfe_cas_u64(free_slot, free_v, want)
    return LEARN_OK                            # a lost race is learned by the next frame


cdef inline bint sw_known(uint64_t *slot, uint64_t entry) noexcept nogil:
    """Whether the slot an earlier sw_learn found still holds `entry`: then
    learning the same MAC for the same port again would find it there too
    and change nothing (entries are never emptied, so every slot before it
    in the window is still taken, and no second entry for the MAC is made
    while one exists), and the hash and probe can be skipped."""
    return slot != NULL and vfe_load_acquire_u64(slot) == entry


cdef inline int sw_lookup(Switch *sw, uint64_t mac) noexcept nogil:
    cdef uint32_t h = mac_hash(mac)
    cdef uint64_t v
    cdef int k
    for k in range(SW_PROBE):
        v = vfe_load_acquire_u64(&sw.table[(h + k) & (SW_TABLE - 1)])
        if v == 0:
            return -1
        if (v >> 16) == mac:
            return <int>(v & SW_PORT) - 1
    return -1


cdef inline void sw_forget_port(Switch *sw, int port) noexcept nogil:
    cdef int i
    cdef uint64_t v
    for i in range(SW_TABLE):
        v = sw.table[i]
        if v != 0 and <int>(v & SW_PORT) == port + 1:
            vfe_store_release_u64(&sw.table[i], v & ~<uint64_t>0xFFFF)


cdef inline void sw_forget_mac(Switch *sw, uint64_t mac, int port) noexcept nogil:
    """Forget mac's entry if it points at `port` (a configured MAC replaced)."""
    cdef uint32_t h = mac_hash(mac)
    cdef uint64_t v
    cdef int k
    for k in range(SW_PROBE):
        v = sw.table[(h + k) & (SW_TABLE - 1)]
        if v == 0:
            return
        if (v >> 16) == mac:
            if <int>(v & SW_PORT) == port + 1:
                vfe_store_release_u64(&sw.table[(h + k) & (SW_TABLE - 1)], v & ~<uint64_t>0xFFFF)
            return


cdef inline bint sw_claim(Switch *sw, NetDev *dev) noexcept nogil:
    """Install dev's configured MAC as its owned entry, taking it from
    whoever learned it (world stopped).  False if its window is full:
    frames to it are then flooded, and another port could learn it once a
    slot frees -- with 16384 slots and at most 256 MACs a port, a window
    of 16 is full only when the table is."""
    cdef uint64_t mac = dev.port_mac
    cdef uint32_t h = mac_hash(mac)
    cdef uint64_t want = sw_entry(dev, mac)
    cdef uint64_t v
    cdef uint64_t *slot
    cdef uint64_t *free_slot = NULL
    cdef int k
    for k in range(SW_PROBE):
        slot = &sw.table[(h + k) & (SW_TABLE - 1)]
        v = slot[0]
        if (v >> 16) == mac and v != 0:
            vfe_store_release_u64(slot, want)
            return True
        if v == 0 or (v & SW_PORT) == 0:
            if free_slot == NULL:
                free_slot = slot
            if v == 0:
                break
    if free_slot == NULL:
        return False
    vfe_store_release_u64(free_slot, want)
    return True
