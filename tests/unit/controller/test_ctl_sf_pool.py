"""SF pool: numbers >= 1000, PF_TOTAL_SF bound, pool percent, force destroy, persistence."""
import json

import pytest

from vfe.controller.sf_pool import (SF_NUM_MAX, SF_NUM_MIN, SfInUse, SfPool, SfPoolError,
                                    SfPoolExhausted, pool_target)


class Hooks:
    def __init__(self):
        self.created, self.destroyed = [], []
        self.fail_create = set()

    def create(self, n):
        if n in self.fail_create:
            raise OSError(f"cannot create SF {n}")
        self.created.append(n)

    def destroy(self, n):
        self.destroyed.append(n)


def pool(tmp_path, total=4, percent=0, force=False, hooks=None, **kw):
    h = hooks or Hooks()
    return SfPool(tmp_path, total, percent, force, create=h.create, destroy=h.destroy, **kw), h


def test_numbers_start_at_1000(tmp_path):
    p, h = pool(tmp_path)
    p.start()
    assert [p.reserve(vuid=f"V{i}") for i in range(3)] == [1000, 1001, 1002]
    assert h.created == [1000, 1001, 1002]
    assert p.user_of(1001) == "V1"


def test_exhaustion(tmp_path):
    p, _ = pool(tmp_path, total=2)
    p.start()
    p.reserve()
    p.reserve()
    with pytest.raises(SfPoolExhausted, match="PF_TOTAL_SF=2") as ei:
        p.reserve()
    assert "mlx5_0" in str(ei.value)
    assert p.created == 2


def test_zero_total(tmp_path):
    p, _ = pool(tmp_path, total=0)
    p.start()
    with pytest.raises(SfPoolExhausted):
        p.reserve()


def test_release_pools_and_reuses_without_destroying(tmp_path):
    p, h = pool(tmp_path)
    p.start()
    a = p.reserve()
    b = p.reserve()
    p.release(a)
    assert p.pooled == {a} and h.destroyed == []
    assert p.reserve() == a            # from the pool, not newly created
    assert h.created == [a, b]
    with pytest.raises(SfPoolError, match="not in use"):
        p.release(4242)


def test_preferred_number(tmp_path):
    p, h = pool(tmp_path)
    p.start()
    assert p.reserve(2000, vuid="VNETS1D0F0") == 2000
    assert p.reserve() == 1000
    with pytest.raises(SfInUse, match="VNETS1D0F0"):
        p.reserve(2000)
    p.release(2000)
    assert p.reserve(2000) == 2000
    assert h.created == [2000, 1000]


@pytest.mark.parametrize("n,needle", [(999, ">= 1000"), (0, ">= 1000"), (SF_NUM_MAX + 1, "interface name"),
                                      ("1001", "integer"), (True, "integer")])
def test_preferred_number_bounds(tmp_path, n, needle):
    p, _ = pool(tmp_path)
    p.start()
    with pytest.raises(SfPoolError, match=needle):
        p.reserve(n)
    assert p.created == 0


def test_preferred_evicts_idle_pooled_sf_when_full(tmp_path):
    p, h = pool(tmp_path, total=2)
    p.start()
    a, b = p.reserve(), p.reserve()
    p.release(b)
    assert p.reserve(3000) == 3000
    assert h.destroyed == [b] and p.pooled == frozenset()
    assert p.created == 2
    p.release(3000)
    p.release(a)
    # full of in-use SFs: a new number is refused
    p.reserve(), p.reserve()
    with pytest.raises(SfPoolExhausted):
        p.reserve(3001)


def test_failed_create_records_nothing(tmp_path):
    h = Hooks()
    h.fail_create.add(1000)
    p, _ = pool(tmp_path, hooks=h)
    p.start()
    with pytest.raises(OSError):
        p.reserve()
    assert p.created == 0 and p.in_use == {}
    assert SfPool(tmp_path, 4).created == 0


def test_failed_create_of_preferred_keeps_pool(tmp_path):
    h = Hooks()
    p, _ = pool(tmp_path, total=1, hooks=h)
    p.start()
    p.release(p.reserve())
    h.fail_create.add(5000)
    with pytest.raises(OSError):
        p.reserve(5000)
    assert p.pooled == {1000} and h.destroyed == []


def test_cancel_undoes_reserve_exactly(tmp_path):
    p, h = pool(tmp_path)
    p.start()
    fresh = p.reserve()
    p.cancel(fresh)                 # created for it: destroyed, nothing left
    assert p.created == 0 and h.destroyed == [fresh]
    p.release(p.reserve())          # 1000 now pooled
    taken = p.reserve()
    p.cancel(taken)                 # from the pool: back to the pool
    assert p.pooled == {taken} and h.destroyed == [fresh]


@pytest.mark.parametrize("total,percent,want", [(64, 0, 0), (64, 5, 4), (64, 100, 64), (64, 1, 1),
                                                (508, 10, 51), (0, 50, 0), (3, 50, 2)])
def test_pool_target(total, percent, want):
    assert pool_target(total, percent) == want


def test_percent_pre_creates_pool(tmp_path):
    p, h = pool(tmp_path, total=20, percent=25)
    report = p.start()
    assert report["created"] == [1000, 1001, 1002, 1003, 1004]
    assert p.pooled == set(range(1000, 1005)) and p.in_use == {}
    assert p.reserve() == 1000 and h.created == list(range(1000, 1005))   # no new creation
    assert p.stats() == {"ib_dev": "mlx5_0", "total": 20, "in_use": 1, "pooled": 4,
                         "available": 19, "pool_target": 5}


def test_persistence_across_restart(tmp_path):
    p, _ = pool(tmp_path, total=8)
    p.start()
    a = p.reserve(vuid="A")
    b = p.reserve(vuid="B")
    p.release(b)
    data = json.loads((tmp_path / "sf_pool.mlx5_0.json").read_text())
    assert data == {"ib_dev": "mlx5_0", "in_use": {str(a): "A"}, "pooled": [b]}
    q, h = pool(tmp_path, total=8)
    assert q.in_use == {a: "A"} and q.pooled == {b}
    q.start(keep={a: "A"})                       # a's function is recovered
    assert q.in_use == {a: "A"}
    assert q.reserve() == b and h.created == []  # reused, not created


def test_start_pools_unrecovered_sfs(tmp_path):
    p, _ = pool(tmp_path, total=8)
    p.start()
    a, b = p.reserve(vuid="A"), p.reserve(vuid="B")
    q, h = pool(tmp_path, total=8)
    report = q.start(keep=[a])                   # b's function was not recovered (recovery: 0, ...)
    assert report["pooled"] == [b] and report["kept"] == [a]
    assert q.in_use == {a: "A"} and q.pooled == {b} and h.destroyed == []


def test_start_keeps_unknown_recovered_sf(tmp_path):
    p, _ = pool(tmp_path)
    p.start(keep={2000: "VNETS1D0F0"})           # state file lost, recovery file knows the SF
    assert p.in_use == {2000: "VNETS1D0F0"}
    with pytest.raises(SfPoolError):
        pool(tmp_path)[0].start(keep=[5])


def test_force_destroy_on_stop_and_start(tmp_path):
    p, h = pool(tmp_path, total=10, percent=30, force=True)
    p.start()
    a = p.reserve()
    assert p.stop() == [1001, 1002]              # pooled SFs destroyed, in-use kept
    assert p.in_use.keys() == {a} and p.pooled == frozenset()
    # after a crash the next start destroys the leftover pool, then recreates it
    q, h2 = pool(tmp_path, total=10, percent=30, force=True)
    q._pooled.add(1005)                          # a pool left behind
    q.start(keep=[a])
    assert 1005 in h2.destroyed
    assert q.created == 3 and q.in_use.keys() == {a}


def test_no_force_destroy_keeps_pool(tmp_path):
    p, h = pool(tmp_path, total=10, percent=30, force=False)
    p.start()
    assert p.stop() == [] and h.destroyed == []
    q, h2 = pool(tmp_path, total=10, percent=30)
    q.start()
    assert q.pooled == {1000, 1001, 1002} and h2.created == []


def test_total_shrunk_trims_pool(tmp_path):
    p, _ = pool(tmp_path, total=10, percent=100)
    p.start()
    q, h = pool(tmp_path, total=4)
    q.start()
    assert q.created == 4 and sorted(h.destroyed) == list(range(1004, 1010))


def test_destroy_pool(tmp_path):
    p, h = pool(tmp_path, total=10, percent=50)
    p.start()
    x = p.reserve()
    assert p.destroy_pool() == [1001, 1002, 1003, 1004]
    assert p.in_use.keys() == {x} and p.available == 9


def test_pools_are_per_device(tmp_path):
    a, _ = pool(tmp_path, ib_dev="mlx5_0")
    b, _ = pool(tmp_path, ib_dev="mlx5_1")
    a.start(), b.start()
    assert a.reserve() == 1000 and b.reserve() == 1000
    assert (tmp_path / "sf_pool.mlx5_1.json").exists()


def test_corrupt_state(tmp_path):
    (tmp_path / "sf_pool.mlx5_0.json").write_text("{")
    with pytest.raises(SfPoolError, match="delete it"):
        SfPool(tmp_path, 4)
    (tmp_path / "sf_pool.mlx5_0.json").write_text('{"in_use": {"12": null}, "pooled": []}')
    with pytest.raises(SfPoolError, match="out of range"):
        SfPool(tmp_path, 4)


def test_no_hooks_needed(tmp_path):
    p = SfPool(tmp_path, total=2, percent=50)
    p.start()
    assert p.reserve() == SF_NUM_MIN


def test_batch_saves_once_at_the_end(tmp_path, monkeypatch):
    p, _ = pool(tmp_path, total=8)
    p.start()
    writes = []
    import vfe.controller.sf_pool as mod
    real = mod.atomic_write_json
    monkeypatch.setattr(mod, "atomic_write_json", lambda path, obj: (writes.append(obj), real(path, obj)))
    with p.batch():
        got = [p.reserve(None, vuid=f"VF{i}") for i in range(3)]
        with p.batch():                       # nested: still one save, at the outer end
            p.release(got[0])
        assert writes == []
        on_disk = json.loads(p.path.read_text())
        assert on_disk["in_use"] == {}        # the file is behind while the batch runs
    assert len(writes) == 1
    assert SfPool(tmp_path, total=8).in_use == {got[1]: "VF1", got[2]: "VF2"}
    # an exception inside the batch still saves what changed
    with pytest.raises(RuntimeError):
        with p.batch():
            p.release(got[1])
            raise RuntimeError("boom")
    assert len(writes) == 2 and got[1] not in SfPool(tmp_path, total=8).in_use
