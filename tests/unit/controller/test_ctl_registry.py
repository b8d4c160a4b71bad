"""The function registry: kinds register with the inventory and bring their
RPC verbs; the virtnet verbs reach a function's own kind; a kind's records
go through its codec in the one recovery store, and a record of a kind no
codec serves is refused; the RPC server's table is the inventory's plus the
controller's own verbs."""
import errno
import logging
import selectors
import types

import pytest

from vfe.controller.bdevs import Bdev
from vfe.controller.blk_kind import BlkFunction, BlkKind
from vfe.controller.blk_recovery import BdevRecord, BlkCodec, BlkControllerRecord
from vfe.controller.control import ControlServer
from vfe.controller.inventory import Inventory
from vfe.controller.kind import InventoryError
from vfe.controller.net_kind import NetKind
from vfe.controller.net_recovery import NetCodec, RecoveryRecord
from vfe.controller.nvconfig import blk_limits
from vfe.controller.recovery import RecoveryError, RecoveryProblem, RecoveryStore
from vfe.controller.service import ServiceError, restore
from vfe.rpc.protocol import RpcError


VIRTNET_VERBS = ("list", "query", "modify", "unplug", "vf_state", "stats")


class Fn:
    def __init__(self, kind, vuid, pf_id, vf_id=-1):
        self.kind, self.vuid, self.pf_id, self.vf_id = kind, vuid, pf_id, vf_id

    def list_entry(self):
        return {"vuid": self.vuid, "by": self.kind}


class Kind:
    """A kind that answers every virtnet verb with (its name, the verb, the VUID)."""

    def __init__(self, name, *, numbered=True, verbs=(), reverse=False):
        self.name = name
        self.numbered_by_virtnet = numbered
        self.verbs = {v: (lambda p, v=v: (name, v, p)) for v in verbs}
        self.reverse = reverse
        self.shut = 0

    def methods(self):
        return self.verbs

    def summary(self):
        return {f"{self.name}_functions": "yes"}

    def in_list_order(self, functions):
        return sorted(functions, key=lambda f: f.vuid, reverse=self.reverse)

    def query_entry(self, f, brief):
        return {"vuid": f.vuid, "by": self.name, "brief": brief}

    def modify(self, f, p):
        return (self.name, "modify", f.vuid)

    def unplug(self, f, p):
        return (self.name, "unplug", f.vuid)

    def vf_state(self, f, p):
        return (self.name, "vf_state", f.vuid)

    def shutdown(self):
        self.shut += 1


@pytest.fixture
def inv():
    inv = Inventory()
    inv.register(Kind("a", verbs=("a_create",)))
    inv.register(Kind("b", numbered=False, verbs=("b_create", "b_delete"), reverse=True))
    for f in (Fn("a", "A1", 0), Fn("b", "B1", 0), Fn("a", "A0", 1), Fn("b", "B2", 1), Fn("a", "A2", 0, 3)):
        inv.add(f)
    return inv


# -- registering ------------------------------------------------------------------------

def test_a_kind_registers_its_verbs(inv):
    m = inv.methods()
    assert sorted(m) == sorted(VIRTNET_VERBS + ("a_create", "b_create", "b_delete"))
    assert m["b_delete"]({"x": 1}) == ("b", "b_delete", {"x": 1})
    with pytest.raises(ValueError, match="RPC method.*b_create.*registered already"):
        inv.register(Kind("c", verbs=("c_create", "b_create")))
    with pytest.raises(ValueError, match="query"):
        inv.register(Kind("d", verbs=("query",)))            # the inventory's own verbs too
    with pytest.raises(ValueError, match="kind named 'a'"):
        inv.register(Kind("a"))
    assert "c_create" not in inv.methods() and list(inv.kinds) == ["a", "b"]


def test_the_real_kinds_bring_their_verbs(tmp_path):
    inv = Inventory()
    store = RecoveryStore(tmp_path, [NetCodec(), BlkCodec()])
    inv.register(NetKind(inv, None, None, None, None, {}, store, None))
    inv.register(BlkKind(inv, None, None, store, blk_limits({})))
    assert sorted(inv.methods()) == sorted(VIRTNET_VERBS + (
        "hotplug", "sriov_numvfs",
        "bdev_null_create", "bdev_malloc_create", "bdev_aio_create", "bdev_get_bdevs",
        "bdev_null_delete", "bdev_malloc_delete", "bdev_aio_delete",
        "controller_virtio_blk_create", "controller_list", "controller_virtio_blk_delete"))


def test_a_function_of_an_unregistered_kind_is_refused(inv):
    with pytest.raises(ValueError, match="no function kind 'scsi'"):
        inv.add(Fn("scsi", "S0", 0))
    assert [f.vuid for f in inv.functions] == ["A1", "B1", "A0", "B2", "A2"]


# -- the virtnet verbs route by kind -------------------------------------------------------

def test_list_is_kind_by_kind_each_in_its_order(inv):
    out = inv.methods()["list"]({})
    assert out["controller"] == {"a_functions": "yes", "b_functions": "yes"}
    assert out["devices"] == [{"vuid": v, "by": v[0].lower()} for v in ("A0", "A1", "A2", "B2", "B1")]


def test_query_modify_unplug_vf_state_reach_the_functions_kind(inv):
    m = inv.methods()
    assert m["query"]({"vuid": "B2", "brief": True}) == {"devices": [{"vuid": "B2", "by": "b", "brief": True}]}
    assert m["query"]({"vuid": "A0"}) == {"devices": [{"vuid": "A0", "by": "a", "brief": False}]}
    assert [d["vuid"] for d in m["query"]({"all": True})["devices"]] == ["A0", "A1", "A2", "B2", "B1"]
    for verb in ("modify", "unplug", "vf_state"):
        assert m[verb]({"vuid": "B1"}) == ("b", verb, "B1")
        assert m[verb]({"vuid": "A2"}) == ("a", verb, "A2")


def test_pf_and_vf_numbers_name_functions_of_a_numbered_kind(inv):
    """virtnet's -p/-v count the functions of a kind virtnet numbers (net):
    a blk PF 0 is no `-p 0`."""
    m = inv.methods()
    assert m["modify"]({"pf": 0}) == ("a", "modify", "A1")
    assert m["modify"]({"pf": "0", "vf": 3}) == ("a", "modify", "A2")
    assert m["query"]({"pf": 1})["devices"][0]["vuid"] == "A0"
    inv.discard(next(f for f in inv.functions if f.vuid == "A0"))
    with pytest.raises(InventoryError, match="no such device: PF 1$") as exc:
        m["unplug"]({"pf": 1})                               # B2 has pf_id 1, but is of kind b
    assert exc.value.code == -errno.ENODEV


def test_unknown_or_missing_device(inv):
    m = inv.methods()
    with pytest.raises(InventoryError, match="no such device: VUID X9") as exc:
        m["vf_state"]({"vuid": "X9"})
    assert exc.value.code == -errno.ENODEV
    with pytest.raises(InventoryError, match="give a device"):
        m["query"]({})
    with pytest.raises(InventoryError, match="no such device: VUID B1"):
        inv.find(vuid="B1", kind="a")                        # a kind's own lookups see only its own


def test_shutdown_asks_every_kind_last_registered_first(inv):
    order = []
    for kind in inv.kinds.values():
        kind.shutdown = lambda name=kind.name: order.append(name)
    inv.shutdown()
    assert order == ["b", "a"]


# -- records and codecs -------------------------------------------------------------------

NET_RECORD = RecoveryRecord(vuid="VNETS1D0F0", port_ib_dev="mlx5_0", pf_id=2, function_type="pf",
                            bdf_raw=0x8500, device_type="hotplug", mac="0c:c4:7a:ff:22:93", pf_num=0,
                            sf_num=1001, mq=1, mtu=1500, max_queues=3, max_queue_size=256, num_msix=4,
                            features=0x3000, legacy=True, port=0)
BDEV_RECORD = BdevRecord.of(Bdev("Aio0", "aio", 8, 4096, filename="/srv/disk.img", direct=True))
BLK_RECORD = BlkControllerRecord.of(BlkFunction("VblkEmu0pf0vf1", "mlx5_0", 0, 1, "VBLKS0D0F2VF2", 0xB001,
                                                "Aio0", 2, 128, False, True, "/run/x.sock"))


@pytest.mark.parametrize("codec,record,file_name", [
    (NetCodec(), NET_RECORD, "VNETS1D0F0.json"),
    (BlkCodec(), BDEV_RECORD, "blk/bdevs/Aio0.json"),
    (BlkCodec(), BLK_RECORD, "blk/controllers/VBLKS0D0F2VF2.json"),
])
def test_a_record_round_trips_through_its_kinds_codec(tmp_path, codec, record, file_name):
    assert record.kind == codec.kind
    assert codec.file_name(record) == file_name
    assert codec.decode(file_name, codec.encode(record)) == record
    store = RecoveryStore(tmp_path, [NetCodec(), BlkCodec()])
    assert store.save(record) == tmp_path / file_name
    if record is BLK_RECORD:
        store.save(BDEV_RECORD)               # a controller loads only with its bdev
    loaded = store.load(codec.kind)
    assert loaded.problems == []
    assert record in [*getattr(loaded, "records", []), *getattr(loaded, "bdevs", []),
                      *getattr(loaded, "controllers", [])]
    assert store.delete(record) is True and not (tmp_path / file_name).exists()


def test_a_file_of_another_kind_does_not_decode():
    with pytest.raises(RecoveryError, match="not a blk recovery file"):
        BlkCodec().decode("VNETS1D0F0.json", NET_RECORD.to_json())


def test_a_record_of_an_unknown_kind_is_refused(tmp_path):
    store = RecoveryStore(tmp_path, [NetCodec(), BlkCodec()])
    scsi = types.SimpleNamespace(kind="scsi", vuid="VSCSI0")
    for op in (store.save, store.delete):
        with pytest.raises(RecoveryError, match=r"kind: no recovery files for functions of kind 'scsi' "
                                                r"\(known: blk, net\)") as exc:
            op(scsi)
        assert exc.value.field == "kind"
    with pytest.raises(RecoveryError, match="kind 'scsi'"):
        store.load("scsi")
    with pytest.raises(RecoveryError, match="kind None"):
        store.save(object())                                  # no kind at all
    with pytest.raises(RecoveryError, match=r"kind 'blk' \(known: net\)"):
        RecoveryStore(tmp_path, [NetCodec()]).save(BDEV_RECORD)   # a kind this store has no codec for
    assert list(tmp_path.iterdir()) == []


def test_a_store_has_one_codec_per_kind(tmp_path):
    store = RecoveryStore(tmp_path)
    store.register(NetCodec())
    with pytest.raises(ValueError, match="codec for kind 'net' is registered already"):
        store.register(NetCodec())
    assert list(store.codecs) == ["net"]


# -- start-up: every kind's records loaded and checked, then each kind restores its own ------

class Restoring:
    """A kind whose codec loads ``problems`` and whose restore records what it got."""

    def __init__(self, name, log, problems=(), fails=False):
        self.name, self.log, self.fails = name, log, fails
        self.codec = types.SimpleNamespace(
            kind=name, load=lambda store: types.SimpleNamespace(source="files", problems=list(problems)))

    def restore(self, loaded):
        self.log.append((self.name, loaded.source))
        if self.fails:
            raise InventoryError("no SF left")
        return f"{self.name} back"


def kinds_and_store(tmp_path, log, **kw):
    kinds = [Restoring("a", log), Restoring("b", log, **kw)]
    store = RecoveryStore(tmp_path)
    for kind in kinds:
        store.register(kind.codec)
    return kinds, store


def test_each_kind_restores_its_own_records_in_order(tmp_path):
    log = []
    kinds, store = kinds_and_store(tmp_path, log)
    assert restore(store, kinds, None) == ["a back", "b back"]
    assert log == [("a", "files"), ("b", "files")]


def test_a_bad_file_of_any_kind_stops_the_start_before_anything_is_made(tmp_path):
    log = []
    kinds, store = kinds_and_store(tmp_path, log, problems=[RecoveryProblem(tmp_path / "x", "X", "x is bad")])
    with pytest.raises(ServiceError, match="^x is bad$"):
        restore(store, kinds, None)
    assert log == []


def test_a_live_update_hands_over_the_records_of_its_kind(tmp_path):
    log = []
    kinds, store = kinds_and_store(tmp_path, log)
    takeover = types.SimpleNamespace(handed_over=lambda kind: types.SimpleNamespace(
        source="old process", problems=[]) if kind == "a" else None)
    restore(store, kinds, takeover)
    assert log == [("a", "old process"), ("b", "files")]


def test_a_kind_that_cannot_restore_is_a_clean_refusal(tmp_path):
    log = []
    kinds, store = kinds_and_store(tmp_path, log, fails=True)
    with pytest.raises(ServiceError, match="^cannot create the functions: no SF left$"):
        restore(store, kinds, None)


# -- the RPC server's table ---------------------------------------------------------------

def test_the_control_servers_table(tmp_path, inv):
    daemon = types.SimpleNamespace(sel=selectors.DefaultSelector())
    ctl = ControlServer(daemon, str(tmp_path / "virtnet.sock"), inv, argv=[])
    try:
        assert set(ctl.methods) == set(inv.methods()) | {"log", "version", "update_start", "update_status"}
        assert ctl.handle("unplug", {"vuid": "B1"}) == ("b", "unplug", "B1")
        assert ctl.handle("a_create", None) == ("a", "a_create", {})
        with pytest.raises(RpcError) as exc:
            ctl.handle("query", {"vuid": "nope"})
        assert (exc.value.code, exc.value.message) == (-errno.ENODEV, "no such device: VUID nope")
        with pytest.raises(RpcError) as exc:
            ctl.handle("no_such_verb", {})
        assert exc.value.code == -32601
        assert set(ctl.handle("version", {})) == {"controller"}
        assert ctl.handle("update_status", {}) == {"status": "idle"}
        level = logging.getLogger().level
        try:
            assert ctl.handle("log", {"level": "err"}) == {"level": "err", "status": "success"}
            assert logging.getLogger().level == logging.ERROR
        finally:
            logging.getLogger().setLevel(level)
        with pytest.raises(RpcError, match="log level must be one of err, info, debug"):
            ctl.handle("log", {"level": "loud"})
    finally:
        ctl.close()
        daemon.sel.close()
