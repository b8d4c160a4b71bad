"""What a virtio-blk function and a bdev may be: the limits, the names
allowed, and a blk function's identity.  Pure data, imported by the blk kind
(blk_kind.py, bdevs.py) and by its recovery files (blk_recovery.py).

Identity (our convention, mirroring functions.py for the net functions):

    PF  pf_id N   VUID VBLKS0D<d>F<f>, d,f = divmod(N + 2, 8)   (VBLKS0D0F2 for PF 0)
                  BDF  (0xA0 + N):00.0                          (a0:00.0 for PF 0)
    VF  vf_id M   VUID <the PF's VUID>VF<M + 1>                 (VBLKS0D0F2VF1)
                  BDF  (0xB0 + N):<d>.<f>, d,f = divmod(M, 8)   (b0:00.0 for VF 0 of PF 0)

so PF ids 0..15 and VF ids 0..127; the buses (0xA0..0xBF) are clear of the
net functions' (0x84 static PFs, 0x85.. hot-plug ports, 0x90.. net VFs).
The `VBLK` prefix keeps blk VUIDs apart from the net ones (`VNET...`).  The
controller name is SNAP's: VblkEmu<n>pf<N> / VblkEmu<n>pf<N>vf<M>, <n> from
the emulation manager mlx5_<n>.
"""
from __future__ import annotations

import re
from typing import Any

from vfe.controller.functions import bdf_raw

BLK_PF_BUS = 0xA0
BLK_VF_BUS = 0xB0
BLK_PF_FIRST_FN = 2
MAX_PF_ID = 15
MAX_VF_ID = 127
BLK_MAX_QUEUES = 64
BLK_MAX_QUEUE_SIZE = 1024
DEFAULT_QUEUE_SIZE = 128
BLOCK_SIZES = (512, 1024, 2048, 4096)
MAX_MALLOC_MB = 16384
BDEV_TYPES = ("null", "malloc", "aio")
PRODUCT = {"null": "Null disk", "malloc": "Malloc disk", "aio": "AIO disk"}
# names from RPC and recovery files: always fullmatch() (`$` would also
# match before a trailing newline)
IB_DEV_RE = re.compile(r"mlx5_(\d+)")
NAME_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def valid_bdev_name(name: Any) -> bool:
    return isinstance(name, str) and bool(NAME_RE.fullmatch(name)) and name not in (".", "..")


def blk_pf_location(pf_id: int) -> tuple[str, int]:
    dev, fn = divmod(BLK_PF_FIRST_FN + pf_id, 8)
    return f"VBLKS0D{dev}F{fn}", bdf_raw(BLK_PF_BUS + pf_id, 0, 0)


def blk_vf_location(pf_id: int, vf_id: int) -> tuple[str, int]:
    pf_vuid, _ = blk_pf_location(pf_id)
    dev, fn = divmod(vf_id, 8)
    return f"{pf_vuid}VF{vf_id + 1}", bdf_raw(BLK_VF_BUS + pf_id, dev, fn)


def blk_identity(manager_index: str | int, pf_id: int, vf_id: int) -> tuple[str, str, int]:
    """(controller name, VUID, bdf_raw) of the blk function (pf_id, vf_id;
    -1 for the PF) on emulation manager mlx5_<manager_index>."""
    if vf_id < 0:
        vuid, raw = blk_pf_location(pf_id)
        return f"VblkEmu{manager_index}pf{pf_id}", vuid, raw
    vuid, raw = blk_vf_location(pf_id, vf_id)
    return f"VblkEmu{manager_index}pf{pf_id}vf{vf_id}", vuid, raw
