"""`--device blk,...` parsing and the virtio-blk model's offer (no daemon)."""
from __future__ import annotations

import argparse
import struct

import pytest

from vfe.cli.controller import parse_device
from vfe.devices.blk import BLK_PROTOCOL_FEATURES, CONFIG_SIZE, BlkConfig, BlkDeviceModel
from vfe.devices.net import NetConfig
from vfe.engine import Engine
from vfe.vhost.messages import ProtocolFeature
from vfe.virtio.constants import F, bit


def test_blk_device_options():
    cfg = parse_device("blk,socket=/tmp/d.sock,bdev=null,size=1024,block-size=4096,queues=4,"
                       "ro=on,serial=abc,client=on")
    assert isinstance(cfg, BlkConfig)
    assert (cfg.socket, cfg.bdev, cfg.size_mb, cfg.block_size, cfg.queues, cfg.read_only,
            cfg.serial, cfg.client) == ("/tmp/d.sock", "null", 1024, 4096, 4, True, "abc", True)
    assert isinstance(parse_device("net,socket=/tmp/n.sock"), NetConfig)


def test_blk_file_direct_option(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(2 << 20))
    cfg = parse_device(f"blk,socket=/s,bdev=file,path={img},direct=on")
    assert (cfg.bdev, cfg.path, cfg.size_mb, cfg.direct) == ("file", str(img), 2, True)
    assert parse_device(f"blk,socket=/s,bdev=file,path={img}").direct is False
    with pytest.raises(argparse.ArgumentTypeError, match="direct=on is for file bdevs"):
        parse_device("blk,socket=/s,bdev=malloc,size=1,direct=on")
    # the engine's side: an O_DIRECT fd next to the buffered one, I/O threads
    engine = Engine()
    model = BlkDeviceModel(engine, cfg)
    try:
        assert model.rings.backend == "file" and model.rings.direct
        assert model.rings.aio_stats() == {"threads": 4, "submitted": 0, "direct": 0, "errors": 0}
        assert model.rings.read_backend(0, 16) == bytes(16)
    finally:
        model.close()


@pytest.mark.parametrize("spec", [
    "blk,bdev=null,size=1",                          # no socket
    "blk,socket=/s,size=1",                          # no bdev
    "blk,socket=/s,bdev=null",                       # no size
    "blk,socket=/s,bdev=file,size=1",
    "blk,socket=/s,bdev=null,size=1,block-size=1000",
    "blk,socket=/s,bdev=null,size=1,block-size=8192",
    "blk,socket=/s,bdev=null,size=1,queues=0",
    "blk,socket=/s,bdev=null,size=1,ro=maybe",
    "blk,socket=/s,bdev=null,size=1,serial=" + "x" * 21,
    "blk,socket=/s,bdev=null,size=1,mac=52:54:00:00:00:01",
    "scsi,socket=/s",
])
def test_bad_blk_device_options(spec):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_device(spec)


def test_model_offer_and_config_space():
    engine = Engine()
    model = BlkDeviceModel(engine, BlkConfig(socket="/s", bdev="malloc", size_mb=2, block_size=4096,
                                             queues=3, read_only=True, name="blk7"))
    try:
        spec = model.spec()
        assert spec.features & bit(F.BLK_RO) and spec.features & bit(F.BLK_MQ)
        assert spec.protocol_features & bit(ProtocolFeature.CONFIG)
        assert BLK_PROTOCOL_FEATURES & bit(ProtocolFeature.MQ)
        assert (spec.queue_num, spec.max_queues) == (3, 3)
        cfg = spec.config
        assert len(cfg) == CONFIG_SIZE == 72
        assert struct.unpack_from("<Q", cfg, 0)[0] == 2 * 2048
        assert struct.unpack_from("<I", cfg, 20)[0] == 4096
        assert struct.unpack_from("<H", cfg, 34)[0] == 3
        assert struct.unpack_from("<I", cfg, 44)[0] == 8           # discard alignment: one block
        assert model.rings.num_rings == 3 and model.rings.capacity == 4096
        assert model.rings.read_backend(0, 16) == bytes(16)
        assert "requests per queue 0/0/0" in model.summary()
    finally:
        model.close()


def test_engine_rejects_bad_geometry():
    engine = Engine()
    with pytest.raises(ValueError):
        engine.new_blk_device(1, 1000, 512)                  # not whole blocks
    with pytest.raises(ValueError):
        engine.new_blk_device(1, 4096, 3000)
    with pytest.raises(ValueError):
        engine.new_blk_device(0, 4096, 512)
    with pytest.raises(ValueError):
        engine.new_blk_device(1, 4096, 512, backend="file")
    with pytest.raises(ValueError):
        engine.new_blk_device(1, 4096, 512, serial="x" * 21)


def test_blk_file_path_is_not_followed_and_must_be_a_file(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(bytes(2 << 20))
    link = tmp_path / "link.img"
    link.symlink_to(img)
    with pytest.raises(argparse.ArgumentTypeError, match="is a symlink, not a regular file or a block device"):
        parse_device(f"blk,socket=/s,bdev=file,path={link}")
    with pytest.raises(argparse.ArgumentTypeError, match="is a directory"):
        parse_device(f"blk,socket=/s,bdev=file,path={tmp_path}")
    # with size= the file is checked when the engine opens it
    cfg = parse_device(f"blk,socket=/s,bdev=file,path={link},size=2")
    with pytest.raises(OSError, match="is a symlink"):
        BlkDeviceModel(Engine(), cfg)


def test_blk_file_size_grows_the_image_as_documented(tmp_path):
    """`path=IMG,size=MB` is documented as "grown to size= if shorter": the
    one place a file is extended (an aio bdev's never is)."""
    img = tmp_path / "d.img"
    img.write_bytes(b"")
    cfg = parse_device(f"blk,socket=/s,bdev=file,path={img},size=3")
    assert cfg.grow
    BlkDeviceModel(Engine(), cfg).close()
    assert img.stat().st_size == 3 << 20
