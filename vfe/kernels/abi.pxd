# C view of the numba kernels, for the Cython engine (cimport vfe.kernels.abi).
#
# The pointers come from vfe.kernels.kernel_addresses() (Python ints); cast
# them once, outside the poll loop:
#     cdef abi.finish_csum_t fc = <abi.finish_csum_t><uintptr_t>addrs["finish_csum"]
# The functions never take the GIL on their normal paths, never allocate and
# may run concurrently on any thread. Return codes: docs/kernels.md.
from libc.stdint cimport int32_t, uint8_t, uint32_t

cdef enum:
    KERNEL_E_BOUNDS = -1
    KERNEL_E_PARSE = -2
    KERNEL_E_SPACE = -3
    KERNEL_E_UNSUPPORTED = -4
    KERNEL_E_INVAL = -5
    KERNEL_E_SEGS = -6
    KERNEL_E_CSUM = -7

ctypedef int32_t (*finish_csum_t)(uint8_t *frame, int32_t len, int32_t csum_start,
                                  int32_t csum_offset) noexcept nogil

ctypedef int32_t (*gso_segment_t)(uint8_t *frame, int32_t len, int32_t gso_type,
                                  int32_t hdr_len_hint, int32_t gso_size,
                                  int32_t csum_start, int32_t csum_offset,
                                  uint8_t *out, int32_t out_cap,
                                  int32_t *seg_offsets, int32_t *seg_lens,
                                  int32_t max_segs) noexcept nogil

ctypedef int32_t (*ipv4_header_ok_t)(uint8_t *frame, int32_t len, int32_t l3_off) noexcept nogil

ctypedef int32_t (*ipv4_fix_csum_t)(uint8_t *frame, int32_t len, int32_t l3_off) noexcept nogil

ctypedef uint32_t (*toeplitz_hash_t)(uint8_t *key, int32_t key_len, uint8_t *data,
                                     int32_t data_len) noexcept nogil
