# The in-engine L2 switch: a lock-free MAC table shared by all workers.
# Each entry is one 64-bit word, (mac << 16) | (port + 1), so a reader
# never sees half an update and a writer needs only a CAS.  Entries are
# never deleted, only re-pointed (a MAC that moves) or forgotten (port 0)
# when their device leaves the switch; a forgotten slot is reused by the
# next new MAC of its probe window.
#
# Port security (what OVS does for OpenStack ports, what the seed's
# representors get from OVS flows): a port with a configured MAC
# (NetDev.port_mac, the device's mac=) owns it -- its entry is installed
# when the MAC is configured (sw_claim), no other port can move it, and
# the port's frames with any other source MAC are dropped (switch_frame,
# netdata.pxd).  Every port may have at most learn_limit learned entries,
# and a full probe window refuses a new MAC instead of evicting someone's
# entry: a guest sending from random MACs can neither fill the table nor
# push another VM out of it.  What is refused is counted on the port.
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from atomics cimport *
from netpath cimport Switch, NetDev, SW_TABLE, SW_PROBE, MAX_PORTS

cdef enum:
    LEARN_OK = 0          # known (or learned now)
    LEARN_OWNED = 1       # another port's configured MAC: refused, the frame is a spoof
    LEARN_CAPPED = 2      # the port has learn_limit entries already
    LEARN_FULL = 3        # the probe window has no free slot (nothing is evicted)


cdef inline uint64_t mac48(uint8_t *p) noexcept nogil:
    return ((<uint64_t>p[0] << 40) | (<uint64_t>p[1] << 32) | (<uint64_t>p[2] << 24) |
            (<uint64_t>p[3] << 16) | (<uint64_t>p[4] << 8) | <uint64_t>p[5])


cdef inline uint32_t mac_hash(uint64_t mac) noexcept nogil:
    mac ^= mac >> 23
    mac *= 0x2127599bf4325c37ULL
    mac ^= mac >> 47
    return <uint32_t>mac & (SW_TABLE - 1)


cdef inline bint sw_at_limit(NetDev *dev) noexcept nogil:
    # signed: two workers moving one entry can leave the count at -1 for a moment
    return <int64_t>dev.learned >= <int64_t>dev.learn_limit


cdef inline int sw_move(Switch *sw, NetDev *dev, uint64_t *slot, uint64_t v,
                        uint64_t want) noexcept nogil:
    """The entry `v` at `slot` has dev's source MAC for another port (or a
    forgotten one): re-point it to dev, unless that port owns the MAC."""
    cdef uint64_t mac = v >> 16
    cdef int old = <int>(v & 0xFFFF) - 1
    cdef NetDev *owner = NULL
    cdef bint own = dev.port_mac == mac
    if old >= 0 and old < MAX_PORTS:
        owner = sw.ports[old]
        if owner != NULL and owner.port_mac == mac:
            return LEARN_OWNED
    if not own and sw_at_limit(dev):
        return LEARN_CAPPED
    if vfe_cas_u64(slot, v, want):
        if not own:
            vfe_add_u64(&dev.learned, 1)
        if owner != NULL:
            vfe_add_u64(&owner.learned, <uint64_t>-1)
    return LEARN_OK


cdef inline int sw_learn(Switch *sw, NetDev *dev, uint64_t mac) noexcept nogil:
    """Lock-free: a slot is one 64-bit word (mac, port+1), written by CAS.
    A new MAC takes the first empty or forgotten slot of its window."""
    cdef uint32_t h = mac_hash(mac)
    cdef uint64_t want = (mac << 16) | <uint64_t>(dev.port + 1)
    cdef uint64_t v, free_v = 0
    cdef uint64_t *slot
    cdef uint64_t *free_slot = NULL
    cdef int k
    for k in range(SW_PROBE):
        slot = &sw.table[(h + k) & (SW_TABLE - 1)]
        v = vfe_load_acquire_u64(slot)
        if v == want:
            return LEARN_OK                    # the common case: known, here
        if v == 0:
            if free_slot == NULL:
                free_slot = slot
                free_v = 0
            break                              # entries are never emptied: mac is not further on
        if (v >> 16) == mac:
            return sw_move(sw, dev, slot, v, want)
        if (v & 0xFFFF) == 0 and free_slot == NULL:
            free_slot = slot                   # forgotten: its port left the switch
            free_v = v
    if free_slot == NULL:
        return LEARN_FULL
    if dev.port_mac != mac:
        if sw_at_limit(dev):
            return LEARN_CAPPED
        if vfe_cas_u64(free_slot, free_v, want):
            vfe_add_u64(&dev.learned, 1)
    else:
        vfe_cas_u64(free_slot, free_v, want)
    return LEARN_OK                            # a lost race is learned by the next frame


cdef inline int sw_lookup(Switch *sw, uint64_t mac) noexcept nogil:
    cdef uint32_t h = mac_hash(mac)
    cdef uint64_t v
    cdef int k
    for k in range(SW_PROBE):
        v = vfe_load_acquire_u64(&sw.table[(h + k) & (SW_TABLE - 1)])
        if v == 0:
            return -1
        if (v >> 16) == mac:
            return <int>(v & 0xFFFF) - 1
    return -1


cdef inline void sw_forget_port(Switch *sw, int port) noexcept nogil:
    cdef int i
    cdef uint64_t v
    for i in range(SW_TABLE):
        v = sw.table[i]
        if v != 0 and <int>(v & 0xFFFF) == port + 1:
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
            if <int>(v & 0xFFFF) == port + 1:
                vfe_store_release_u64(&sw.table[(h + k) & (SW_TABLE - 1)], v & ~<uint64_t>0xFFFF)
            return


cdef inline uint64_t sw_count(Switch *sw, NetDev *dev) noexcept nogil:
    """Entries pointing at dev, its configured MAC's aside (world stopped)."""
    cdef int i
    cdef uint64_t v, n = 0
    for i in range(SW_TABLE):
        v = sw.table[i]
        if v != 0 and <int>(v & 0xFFFF) == dev.port + 1 and (v >> 16) != dev.port_mac:
            n += 1
    return n


cdef inline bint sw_claim(Switch *sw, NetDev *dev) noexcept nogil:
    """Install dev's configured MAC as its entry, taking it from whoever
    learned it (world stopped; the caller recounts the ports involved).
    False if its window is full: frames to it are flooded until a slot
    frees, and only sw_move's check keeps others from learning it."""
    cdef uint64_t mac = dev.port_mac
    cdef uint32_t h = mac_hash(mac)
    cdef uint64_t want = (mac << 16) | <uint64_t>(dev.port + 1)
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
        if v == 0 or (v & 0xFFFF) == 0:
            if free_slot == NULL:
                free_slot = slot
            if v == 0:
                break
    if free_slot == NULL:
        return False
    vfe_store_release_u64(free_slot, want)
    return True
