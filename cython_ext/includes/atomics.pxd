from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "atomics.h" nogil:
    uint16_t vfe_load_acquire_u16(const uint16_t *p)
    uint16_t vfe_load_u16(const uint16_t *p)
    uint32_t vfe_load_u32(const uint32_t *p)
    uint64_t vfe_load_u64(const uint64_t *p)
    void vfe_store_release_u16(uint16_t *p, uint16_t v)
    void vfe_store_u16(uint16_t *p, uint16_t v)
    void vfe_store_u32(uint32_t *p, uint32_t v)
    void vfe_fence()
    uint64_t vfe_load_acquire_u64(const uint64_t *p)
    int vfe_cas_u64(uint64_t *p, uint64_t expected, uint64_t desired)
    void vfe_store_release_u64(uint64_t *p, uint64_t v)
    void vfe_fetch_or_u8(uint8_t *p, uint8_t v)
    void vfe_add_u64(uint64_t *p, uint64_t v)
    int vfe_load_acquire_int(const int *p)
    void vfe_store_release_int(int *p, int v)
    void vfe_cpu_relax()
    void vfe_spin_lock(int *l)
    void vfe_spin_unlock(int *l)
    void vfe_read_desc(const void *d, uint64_t *addr, uint32_t *len, uint16_t *flags, uint16_t *next)
    int VFE_ENGINE_ABI
