"""The engine's C-level virtio facts (cython_ext/virtio.pxd) are vfe.virtio's.

The compiled loop cannot import Python constants, so virtio.pxd repeats the
ones it needs; here every constant it declares must exist in vfe.virtio with
the same value, and its ring-area arithmetic must give vfe.virtio.layouts'
sizes (read back through the compiled module).  Likewise the vhost-user
shared memory the engine writes: the dirty log's page (vring.pxd) and the
inflight region's layout (inflight.pxd) are vfe.vhost's."""
import re
import struct
from pathlib import Path

import pytest

from vfe import _engine
from vfe.vhost import inflight
from vfe.vhost.messages import LOG_PAGE
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


def test_dirty_log_page_agrees_with_the_engine():
    assert _engine.log_page_size() == LOG_PAGE == 4096


def test_inflight_layout_agrees_with_the_engine():
    """Fields packed by vfe/vhost/inflight.py's structs are where the
    engine's IF_* offsets read them."""
    c = _engine.inflight_layout()
    assert (c["header_size"], c["desc_size"]) == (inflight.HEADER_SIZE, inflight.DESC_SIZE) == (16, 16)
    header = inflight.QUEUE_HEADER.pack(0x1122334455667788, 0xA1A2, 0xB1B2, 0xC1C2, 0xD1D2)
    assert struct.unpack_from("<Q", header, 0)[0] == 0x1122334455667788
    for field, value in (("version", 0xA1A2), ("desc_num", 0xB1B2), ("last_batch_head", 0xC1C2),
                         ("used_idx", 0xD1D2)):
        assert struct.unpack_from("<H", header, c[field])[0] == value, field
    desc = inflight.DESC_STATE.pack(0xE1, 0xF1F2, 0x0102030405060708)
    assert desc[c["desc_inflight"]] == 0xE1
    assert struct.unpack_from("<H", desc, c["desc_next"])[0] == 0xF1F2
    assert struct.unpack_from("<Q", desc, c["desc_counter"])[0] == 0x0102030405060708
