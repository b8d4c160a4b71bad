# The in-engine L2 switch: a lock-free MAC table shared by all workers.
# Each entry is one 64-bit word, (mac << 16) | (port + 1), so a reader
# never sees half an update and a writer needs only a CAS.  Entries are
# never deleted, only re-pointed (a MAC that moves) or forgotten (port 0)
# when their device leaves the switch.
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from atomics cimport *
from netpath cimport Switch, SW_TABLE, SW_PROBE

cdef inline uint64_t mac48(uint8_t *p) noexcept nogil:
    return ((<uint64_t>p[0] << 40) | (<uint64_t>p[1] << 32) | (<uint64_t>p[2] << 24) |
            (<uint64_t>p[3] << 16) | (<uint64_t>p[4] << 8) | <uint64_t>p[5])


cdef inline uint32_t mac_hash(uint64_t mac) noexcept nogil:
    mac ^= mac >> 23
    mac *= 0x2127599bf4325c37ULL
    mac ^= mac >> 47
    return <uint32_t>mac & (SW_TABLE - 1)


cdef inline void sw_learn(Switch *sw, uint64_t mac, int port) noexcept nogil:
    """Lock-free: a slot is one 64-bit word (mac, port+1), written by CAS."""
    cdef uint32_t h = mac_hash(mac)
    cdef uint64_t want = (mac << 16) | <uint64_t>(port + 1)
    cdef uint64_t v
    cdef uint64_t *slot
    cdef int k
    for k in range(SW_PROBE):
        slot = &sw.table[(h + k) & (SW_TABLE - 1)]
        v = vfe_load_acquire_u64(slot)
        if v == 0:
            if vfe_cas_u64(slot, 0, want):
                return
            v = vfe_load_acquire_u64(slot)
        if (v >> 16) == mac:
            if v != want:
                vfe_store_release_u64(slot, want)
            return
    vfe_store_release_u64(&sw.table[h], want)   # window full: evict


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
