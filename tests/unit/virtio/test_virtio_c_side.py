"""The engine's C-level virtio facts (cython_ext/virtio.pxd) are vfe.virtio's.

The compiled loop cannot import Python constants, so virtio.pxd repeats the
ones it needs; here every constant it declares must exist in vfe.virtio with
the same value, and its ring-area arithmetic must give vfe.virtio.layouts'
sizes (read back through the compiled module)."""
import re
from pathlib import Path

import pytest

from vfe import _engine
from vfe.virtio import constants
from vfe.virtio.layouts import ring_area_sizes

PXD = Path(__file__).resolve().parents[3] / "cython_ext" / "virtio.pxd"
# A feature bit's C name is the spec's: VIRTIO_NET_F_MRG_RXBUF is F.NET_MRG_RXBUF,
# VIRTIO_F_VERSION_1 is F.VERSION_1, VHOST_F_LOG_ALL is F.VHOST_LOG_ALL.
_FEATURE = re.compile(r"(?:VIRTIO_)?(?P<kind>(?:NET|BLK|RING|VHOST)_)?F_(?P<name>\w+)")


def c_constants(text: str) -> dict[str, int]:
    """NAME = value for every line of the .pxd's `cdef enum:` blocks."""
    out, in_enum = {}, False
    for line in text.splitlines():
        if line.startswith("cdef enum:"):
            in_enum = True
        elif in_enum and (m := re.match(r"\s+(\w+) = (0x[0-9a-fA-F]+|\d+)\b", line)):
            out[m.group(1)] = int(m.group(2), 0)
        elif line and not line[0].isspace():
            in_enum = False
    return out


def python_value(c_name: str) -> int | None:
    """vfe.virtio's value for the C constant ``c_name`` (None: it has none)."""
    if hasattr(constants, c_name):
        return int(getattr(constants, c_name))
    m = _FEATURE.fullmatch(c_name)
    if m is not None:
        member = (m.group("kind") or "") + m.group("name")
        if member in constants.F.__members__:
            return int(constants.F[member])
    return None


def test_the_pxd_declares_constants():
    names = c_constants(PXD.read_text())
    assert {"VRING_DESC_F_NEXT", "VIRTIO_F_VERSION_1", "VIRTIO_BLK_T_IN",
            "VIRTIO_NET_HDR_MRG_LEN"} <= set(names)


@pytest.mark.parametrize("name, value", sorted(c_constants(PXD.read_text()).items()))
def test_c_constant_is_vfe_virtio_value(name, value):
    assert python_value(name) == value, f"cython_ext/virtio.pxd {name} = {value}"


def test_python_value_fails_on_a_wrong_name_or_value():
    """The check above can fail: a name vfe.virtio lacks, and a different value."""
    assert python_value("VIRTIO_NET_F_NO_SUCH_BIT") is None
    assert python_value("VIRTIO_F_VERSION_1") == 32 != 31
    assert c_constants("cdef enum:\n    A = 1\n    B = 0x10\nx = 3\n") == {"A": 1, "B": 16}


@pytest.mark.parametrize("event_idx", [False, True])
@pytest.mark.parametrize("size", [1, 2, 256, 1024, 32768])
def test_ring_area_sizes_agree_with_the_engine(size, event_idx):
    assert _engine.ring_area_sizes(size, event_idx) == tuple(ring_area_sizes(size, event_idx))


def test_ring_area_sizes():
    assert ring_area_sizes(256, False) == (4096, 4 + 512, 4 + 2048)
    assert ring_area_sizes(256, True) == (4096, 4 + 512 + 2, 4 + 2048 + 2)
