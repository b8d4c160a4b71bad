"""Return codes and constants of the packet kernels (pure Python, no numba).

Every kernel returns ``>= 0`` on success and one of the negative ``E_*`` codes
below on failure. They are part of the C ABI the Cython loop sees, so their
values never change; ``vfe/kernels/_numba.py`` repeats them as literals (numba
bakes globals into its cached machine code) and refuses to import if the two
copies disagree.
"""
from vfe.virtio.constants import (
    VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE,
    VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
    VIRTIO_NET_HDR_GSO_UDP_L4,
)

# Errors (negative int32 return values)
E_BOUNDS = -1       # an offset/length lies outside the frame or a caller buffer
E_PARSE = -2        # headers unparseable or inconsistent with the request
E_SPACE = -3        # output buffer (out_cap) too small
E_UNSUPPORTED = -4  # valid but not handled: UFO/USO, IPv6 extension headers, QinQ
E_INVAL = -5        # bad argument: gso_size <= 0, unknown gso_type, segment too big
E_SEGS = -6         # more segments than max_segs
E_CSUM = -7         # a checksum does not validate (ipv4_header_ok)

ERROR_NAMES = {
    E_BOUNDS: "E_BOUNDS",
    E_PARSE: "E_PARSE",
    E_SPACE: "E_SPACE",
    E_UNSUPPORTED: "E_UNSUPPORTED",
    E_INVAL: "E_INVAL",
    E_SEGS: "E_SEGS",
    E_CSUM: "E_CSUM",
}

# gso_type values (virtio 1.2, 5.1.6), under the kernels' short names
GSO_NONE = VIRTIO_NET_HDR_GSO_NONE
GSO_TCPV4 = VIRTIO_NET_HDR_GSO_TCPV4
GSO_UDP = VIRTIO_NET_HDR_GSO_UDP
GSO_TCPV6 = VIRTIO_NET_HDR_GSO_TCPV6
GSO_UDP_L4 = VIRTIO_NET_HDR_GSO_UDP_L4
GSO_ECN = VIRTIO_NET_HDR_GSO_ECN

__all__ = [
    "E_BOUNDS", "E_PARSE", "E_SPACE", "E_UNSUPPORTED", "E_INVAL", "E_SEGS", "E_CSUM",
    "GSO_NONE", "GSO_TCPV4", "GSO_UDP", "GSO_TCPV6", "GSO_UDP_L4", "GSO_ECN",
]
