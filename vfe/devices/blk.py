"""The virtio-blk device model: what it offers through vhost-user (features,
protocol features, the config space QEMU reads with GET_CONFIG), and its
request queues inside the engine (cython_ext/blk.pxd); a VhostDevice
(vfe/devices/interface.py)."""
from __future__ import annotations

import struct
from dataclasses import dataclass

from vfe.vhost.actions import DeviceSpec
from vfe.vhost.messages import ProtocolFeature
from vfe.virtio.constants import VIRTIO_BLK_SECTOR_SIZE, F, bit, mask

# Offered to every blk front-end.  QEMU 7.2's vhost-user-blk passes through
# the bits in its user_feature_bits (SIZE_MAX .. WRITE_ZEROES, MQ, RO, the
# ring bits); RO is offered only for a read-only disk.
BLK_FEATURES = mask(
    F.BLK_SIZE_MAX, F.BLK_SEG_MAX, F.BLK_BLK_SIZE, F.BLK_TOPOLOGY, F.BLK_FLUSH,
    F.BLK_CONFIG_WCE, F.BLK_DISCARD, F.BLK_WRITE_ZEROES, F.BLK_MQ,
    F.NOTIFY_ON_EMPTY, F.RING_INDIRECT_DESC, F.RING_EVENT_IDX,
    F.VERSION_1, F.RING_PACKED, F.VHOST_LOG_ALL, F.VHOST_USER_PROTOCOL_FEATURES,
)

# CONFIG is mandatory for QEMU's vhost-user-blk (it refuses a back-end
# without it); MQ makes QEMU ask GET_QUEUE_NUM; INFLIGHT_SHMFD makes it keep
# an inflight region across our restarts (reconnect without losing requests).
BLK_PROTOCOL_FEATURES = mask(
    ProtocolFeature.MQ, ProtocolFeature.CONFIG, ProtocolFeature.LOG_SHMFD,
    ProtocolFeature.REPLY_ACK, ProtocolFeature.CONFIGURE_MEM_SLOTS, ProtocolFeature.STATUS,
    ProtocolFeature.INFLIGHT_SHMFD,
)

# struct virtio_blk_config (virtio 1.2, 5.2.4), little-endian, through
# unused1[3]; then the secure-erase fields (zero: not offered).  76 bytes
# would be the full 1.2 struct; we serve 72 so that any GET_CONFIG size a
# front-end computes from the offered features fits.
_CONFIG = struct.Struct(
    "<Q"      # 0  capacity (512-byte sectors)
    "I"       # 8  size_max
    "I"       # 12 seg_max
    "HBB"     # 16 geometry: cylinders, heads, sectors (GEOMETRY not offered)
    "I"       # 20 blk_size
    "BBHI"    # 24 topology: physical_block_exp, alignment_offset, min_io_size, opt_io_size
    "B"       # 32 writeback
    "B"       # 33 unused0
    "H"       # 34 num_queues
    "I"       # 36 max_discard_sectors
    "I"       # 40 max_discard_seg
    "I"       # 44 discard_sector_alignment
    "I"       # 48 max_write_zeroes_sectors
    "I"       # 52 max_write_zeroes_seg
    "B"       # 56 write_zeroes_may_unmap
    "3x"      # 57 unused1[3]
    "III"     # 60 max_secure_erase_sectors, max_secure_erase_seg, secure_erase_sector_alignment
)
CONFIG_SIZE = _CONFIG.size   # 72


@dataclass
class BlkConfig:
    """A blk device as declared on the command line."""

    socket: str
    client: bool = False
    bdev: str = "malloc"        # null | malloc | file
    path: str = ""              # file: the image, served by I/O threads
    grow: bool = False          # file: extend a shorter image to size= (the command line's
                                # documented semantics; an aio bdev's file is never grown)
    direct: bool = False        # file: sector-aligned reads/writes with O_DIRECT
    size_mb: int = 64
    block_size: int = 512
    queues: int = 1
    queue_size: int = 1024      # largest ring the device accepts
    read_only: bool = False
    serial: str = ""            # GET_ID (20 bytes at most); default: the device name
    name: str = ""
    incoming: str | None = None # a second socket for a live migration's destination QEMU
    size_max: int = 65536       # largest segment (config size_max)
    seg_max: int = 126          # segments per request (config seg_max)
    max_discard_sectors: int = 65536
    max_discard_seg: int = 32
    max_write_zeroes_sectors: int = 65536
    max_write_zeroes_seg: int = 32
    in_order: bool = False      # --force_in_order: used entries in the order requests were taken
    # what to change for more queues, logged when a front-end leaves because
    # it wants more than `queues` (DeviceSpec.queues_hint)
    queues_hint: str = "serve it with a larger queues= (--device blk,...,queues=N)"

    @property
    def capacity_bytes(self) -> int:
        return self.size_mb << 20


def blk_config_space(cfg: BlkConfig) -> bytes:
    """The GET_CONFIG bytes for a device (virtio 1.2 5.2.4)."""
    lbs = cfg.block_size // VIRTIO_BLK_SECTOR_SIZE
    return _CONFIG.pack(
        cfg.capacity_bytes // VIRTIO_BLK_SECTOR_SIZE,
        cfg.size_max, cfg.seg_max,
        0, 0, 0,
        cfg.block_size,
        0, 0, 1, 0,                      # physical = logical block, aligned, min_io 1 block
        1,                               # writeback: the driver sends FLUSH
        0,
        cfg.queues,
        cfg.max_discard_sectors, cfg.max_discard_seg, lbs,
        cfg.max_write_zeroes_sectors, cfg.max_write_zeroes_seg, 1,
        0, 0, 0,
    )


class BlkDeviceModel:
    """One virtio-blk device: its offer, its config space and its engine
    queues.  ``storage`` (a vfe.engine.BlkBackend) is the bdev it serves,
    which other devices may serve too; without it the device gets storage
    of its own as ``config`` describes (bdev, path, direct, grow)."""

    def __init__(self, engine, config: BlkConfig, storage=None):
        self.config = config
        serial = config.serial or config.name
        self.rings = engine.new_blk_device(
            config.queues, config.capacity_bytes, config.block_size,
            backend=config.bdev if storage is None else storage, in_order=config.in_order,
            read_only=config.read_only, serial=serial[:20],
            max_discard_sectors=config.max_discard_sectors, max_discard_seg=config.max_discard_seg,
            max_write_zeroes_sectors=config.max_write_zeroes_sectors,
            max_write_zeroes_seg=config.max_write_zeroes_seg,
            **({"path": config.path, "direct": config.direct, "grow": config.grow}
               if config.bdev == "file" and storage is None else {}))
        self.rings.model = self
        self.features = BLK_FEATURES | (bit(F.BLK_RO) if config.read_only else 0)
        self.config_space = blk_config_space(config)
        self.status = 0
        self.mtu = 0                  # not a net device (Session sets it only with the MTU feature)
        self.driving_session = None   # the Session driving the engine (vfe/devices/adapter.py)

    def spec(self) -> DeviceSpec:
        return DeviceSpec(
            features=self.features,
            protocol_features=BLK_PROTOCOL_FEATURES,
            queue_num=self.config.queues,
            max_queues=self.config.queues,
            max_queue_size=self.config.queue_size,
            config=self.config_space,
            queues_hint=self.config.queues_hint,
        )

    # -- the rest of VhostDevice (vfe/devices/interface.py)

    def rearm_notices(self) -> None:
        """Nothing to re-arm: the switch's security notices are net ports'."""

    def forget_learned(self) -> None:
        """Nothing learned: a blk device has no switch port."""

    def set_inflight(self, hva: int, stride: int, num_queues: int, queue_size: int,
                     length: int) -> None:
        self.rings.set_inflight(hva, stride, num_queues, queue_size, length)

    def send_rarp(self, mac: bytes) -> None:
        """Nothing to announce: blk does not offer the RARP protocol
        feature, so the protocol refuses SEND_RARP before it gets here."""

    def stats(self) -> list[dict]:
        out = []
        for i in range(self.rings.num_rings):
            s = self.rings.ring_state(i) | self.rings.ring_stats(i)
            s["kind"] = "req"
            out.append(s)
        return out

    def counters(self) -> dict:
        """What `virtnet stats` and /metrics show: per request queue, the
        engine's counters; per device, requests and bytes by type and the
        file backend's I/O threads."""
        queues = []
        for i in range(self.rings.num_rings):
            s = dict(self.rings.ring_stats(i))
            s["requests"] = s.pop("packets")       # a blk ring's "packets" are requests
            s["failed"] = s.pop("dropped")         # answered with an error status
            queues.append({"queue": i, "direction": "req"} | s)
        aio = {f"aio_{k}": v for k, v in self.rings.aio_stats().items()}
        return {"queues": queues, "device": self.rings.blk_stats() | aio}

    def summary(self) -> str:
        """One line of totals for the log (at disconnect and shutdown)."""
        s = self.rings.blk_stats()
        per_queue = "/".join(str(q["packets"]) for q in self.stats())
        return (f"{s['reads']} reads {s['read_bytes']} bytes, {s['writes']} writes "
                f"{s['write_bytes']} bytes, {s['flushes']} flushes, {s['discards']} discards, "
                f"{s['write_zeroes']} write-zeroes, {s['get_ids']} get-id, "
                f"{s['ioerrs']} I/O errors, {s['unsupps']} unsupported; "
                f"requests per queue {per_queue}" + self._aio_summary())

    def _aio_summary(self) -> str:
        a = self.rings.aio_stats()
        if not a:
            return ""
        return (f"; file I/O: {a['threads']} threads, {a['submitted']} requests, "
                f"{a['direct']} with O_DIRECT, {a['errors']} failed")

    def close(self) -> None:
        self.rings.close()
        # rings.model points back at us: without this the pair is a reference
        # cycle, and the engine device's C memory waits for a full GC pass
        self.rings.model = None
