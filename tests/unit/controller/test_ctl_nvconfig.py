"""The emulated NV configuration: keys, types, ranges, next/current, cold reboot, limits."""
import json

import pytest

from vfe.controller import nvconfig
from vfe.controller.nvconfig import (DEFAULT_DEVICE, DEFAULTS, PORT1_DEVICE, NvConfig, NvConfigError,
                                     canonical_device, cross_check, limits, queue_pairs_for_msix,
                                     service_check)

SEED_KEYS = [
    "INTERNAL_CPU_MODEL", "PF_BAR2_ENABLE", "PER_PF_NUM_SF", "PCI_SWITCH_EMULATION_ENABLE",
    "PCI_SWITCH_EMULATION_NUM_PORT", "VIRTIO_NET_EMULATION_ENABLE", "VIRTIO_NET_EMULATION_NUM_VF",
    "VIRTIO_NET_EMULATION_NUM_PF", "VIRTIO_NET_EMULATION_NUM_MSIX", "ECPF_ESWITCH_MANAGER",
    "ECPF_PAGE_SUPPLIER", "SRIOV_EN", "PF_SF_BAR_SIZE", "PF_TOTAL_SF", "NUM_OF_VFS",
    "VIRTIO_NET_EMULATION_PF_PCI_LAYOUT", "VIRTIO_EMULATION_HOTPLUG_TRANS",
    "VIRTIO_BLK_EMULATION_ENABLE", "VIRTIO_BLK_EMULATION_NUM_PF", "VIRTIO_BLK_EMULATION_NUM_VF",
    "VIRTIO_BLK_EMULATION_NUM_MSIX", "NUM_VF_MSIX",
]


@pytest.fixture
def nv(tmp_path):
    return NvConfig.load(tmp_path)


def test_every_seed_key_exists(nv):
    for k in SEED_KEYS:
        assert k in nv.current and k in nv.next


def test_fresh_defaults_are_ready_to_use(nv, tmp_path):
    c = nv.current
    assert c["VIRTIO_NET_EMULATION_ENABLE"] == 1
    assert c["VIRTIO_NET_EMULATION_NUM_PF"] == 2
    assert c["VIRTIO_NET_EMULATION_NUM_VF"] == 0
    assert c["PCI_SWITCH_EMULATION_ENABLE"] == 1
    assert c["PCI_SWITCH_EMULATION_NUM_PORT"] == 16
    assert c["VIRTIO_NET_EMULATION_NUM_MSIX"] == 10
    assert c["PF_TOTAL_SF"] == 64
    assert c["SRIOV_EN"] == 0
    assert c["VIRTIO_NET_EMULATION_PF_PCI_LAYOUT"] == 0
    assert c["VIRTIO_EMULATION_HOTPLUG_TRANS"] == 0
    assert service_check(nv) is None
    assert cross_check(nv.current) == []
    # loading writes nothing
    assert not (tmp_path / "nvconfig").exists()


def test_show_like_mlxconfig(nv):
    assert nv.show("SRIOV_EN", 1) == "True(1)"
    assert nv.show("SRIOV_EN", 0) == "False(0)"
    assert nv.show("INTERNAL_CPU_MODEL", 1) == "EMBEDDED_CPU(1)"
    assert nv.show("ECPF_ESWITCH_MANAGER", 1) == "ECPF(1)"
    assert nv.show("PF_TOTAL_SF", 508) == "508"


@pytest.mark.parametrize("raw,want", [("1", 1), ("0", 0), ("True", 1), ("false", 0),
                                      ("TRUE(1)", 1), ("False(0)", 0), (True, 1), (0, 0)])
def test_bool_values(nv, raw, want):
    nv.set(SRIOV_EN=raw)
    assert nv.next["SRIOV_EN"] == want


@pytest.mark.parametrize("raw", ["EMBEDDED_CPU", "embedded_cpu", "1", "EMBEDDED_CPU(1)"])
def test_enum_values(nv, raw):
    nv.set(INTERNAL_CPU_MODEL="SEPARATED_HOST")
    nv.set(INTERNAL_CPU_MODEL=raw)
    assert nv.next["INTERNAL_CPU_MODEL"] == 1


def test_int_values_decimal_and_hex(nv):
    nv.set(PF_TOTAL_SF="508", NUM_VF_MSIX="0x40")
    assert nv.next["PF_TOTAL_SF"] == 508
    assert nv.next["NUM_VF_MSIX"] == 64


def test_keys_are_case_insensitive(nv):
    nv.set({"pf_total_sf": 100})
    assert nv.next["PF_TOTAL_SF"] == 100


@pytest.mark.parametrize("kv,key", [
    ({"PCI_SWITCH_EMULATION_NUM_PORT": 17}, "PCI_SWITCH_EMULATION_NUM_PORT"),
    ({"VIRTIO_NET_EMULATION_NUM_VF": 127}, "VIRTIO_NET_EMULATION_NUM_VF"),
    ({"VIRTIO_NET_EMULATION_NUM_PF": 5}, "VIRTIO_NET_EMULATION_NUM_PF"),
    ({"VIRTIO_NET_EMULATION_NUM_MSIX": 2}, "VIRTIO_NET_EMULATION_NUM_MSIX"),
    ({"VIRTIO_NET_EMULATION_NUM_MSIX": 2049}, "VIRTIO_NET_EMULATION_NUM_MSIX"),
    ({"SRIOV_EN": "2"}, "SRIOV_EN"),
    ({"SRIOV_EN": "yes"}, "SRIOV_EN"),
    ({"INTERNAL_CPU_MODEL": "ARM"}, "INTERNAL_CPU_MODEL"),
    ({"INTERNAL_CPU_MODEL": "TRUE(1)"}, "INTERNAL_CPU_MODEL"),
    ({"PF_TOTAL_SF": "many"}, "PF_TOTAL_SF"),
    ({"PF_TOTAL_SF": -1}, "PF_TOTAL_SF"),
    ({"VFE_IO_PORT_SPACE_KB": 10}, "VFE_IO_PORT_SPACE_KB"),
    ({"VFE_IO_PORT_SPACE_KB": 68}, "VFE_IO_PORT_SPACE_KB"),
    ({"NO_SUCH_KEY": 1}, "NO_SUCH_KEY"),
])
def test_bad_values_name_the_key_and_write_nothing(nv, tmp_path, kv, key):
    with pytest.raises(NvConfigError) as ei:
        nv.set(PF_TOTAL_SF=100, **kv) if "PF_TOTAL_SF" not in kv else nv.set(kv)
    assert ei.value.key == key
    assert key in str(ei.value)
    assert not NvConfig.file_for(tmp_path).exists()
    assert nv.next["PF_TOTAL_SF"] == 64


def test_range_error_explains(nv):
    with pytest.raises(NvConfigError, match=r"0\.\.16.*16 downstream ports"):
        nv.set(PCI_SWITCH_EMULATION_NUM_PORT=17)


def test_set_writes_next_only_and_persists(nv, tmp_path):
    changes = nv.set(VIRTIO_NET_EMULATION_NUM_PF=4, PF_TOTAL_SF=64)
    assert changes == {"VIRTIO_NET_EMULATION_NUM_PF": (2, 4)}      # unchanged keys are not changes
    assert nv.current["VIRTIO_NET_EMULATION_NUM_PF"] == 2
    again = NvConfig.load(tmp_path)
    assert again.next["VIRTIO_NET_EMULATION_NUM_PF"] == 4
    assert again.current["VIRTIO_NET_EMULATION_NUM_PF"] == 2
    assert again.pending() == {"VIRTIO_NET_EMULATION_NUM_PF": (2, 4)}


def test_cold_reboot_applies_next(nv, tmp_path):
    nv.set(VIRTIO_NET_EMULATION_NUM_PF=1, PCI_SWITCH_EMULATION_NUM_PORT=4)
    fresh = NvConfig.load(tmp_path)
    assert fresh.apply_pending() == {"VIRTIO_NET_EMULATION_NUM_PF": (2, 1),
                                     "PCI_SWITCH_EMULATION_NUM_PORT": (16, 4)}
    assert fresh.current["PCI_SWITCH_EMULATION_NUM_PORT"] == 4
    assert NvConfig.load(tmp_path).current["VIRTIO_NET_EMULATION_NUM_PF"] == 1
    assert NvConfig.load(tmp_path).apply_pending() == {}


def test_apply_pending_on_fresh_device_writes_file(tmp_path):
    nv = NvConfig.load(tmp_path)
    assert nv.apply_pending() == {}
    data = json.loads(NvConfig.file_for(tmp_path).read_text())
    assert data["device"] == DEFAULT_DEVICE
    assert data["current"] == data["next"] == dict(DEFAULTS)


def test_set_sees_other_writers(tmp_path):
    a = NvConfig.load(tmp_path)
    b = NvConfig.load(tmp_path)
    a.set(PF_TOTAL_SF=100)
    b.set(SRIOV_EN=1)
    final = NvConfig.load(tmp_path)
    assert final.next["PF_TOTAL_SF"] == 100 and final.next["SRIOV_EN"] == 1


def test_reset_returns_next_to_defaults(nv, tmp_path):
    nv.set(PF_TOTAL_SF=100, SRIOV_EN=1)
    nv.apply_pending()
    assert nv.reset() == {"PF_TOTAL_SF": (100, 64), "SRIOV_EN": (1, 0)}
    again = NvConfig.load(tmp_path)
    assert again.next["PF_TOTAL_SF"] == 64 and again.current["PF_TOTAL_SF"] == 100


def test_views_are_read_only(nv):
    with pytest.raises(TypeError):
        nv.current["PF_TOTAL_SF"] = 1


def test_cross_key_total_vfs(tmp_path, monkeypatch):
    # 4 x 126 = 504 is the maximum and is accepted (the seed's SR-IOV configuration)
    nv = NvConfig.load(tmp_path)
    nv.set(PCI_SWITCH_EMULATION_ENABLE=0, PCI_SWITCH_EMULATION_NUM_PORT=0, VIRTIO_NET_EMULATION_ENABLE=1,
           VIRTIO_NET_EMULATION_NUM_VF=126, VIRTIO_NET_EMULATION_NUM_PF=4, VIRTIO_NET_EMULATION_NUM_MSIX=4,
           ECPF_ESWITCH_MANAGER=1, ECPF_PAGE_SUPPLIER=1, SRIOV_EN=1, PF_SF_BAR_SIZE=8, PF_TOTAL_SF=508,
           NUM_OF_VFS=0)
    nv.apply_pending()
    lim = limits(nv)
    assert (lim.static_pfs, lim.vfs_per_pf, lim.total_vfs, lim.hotplug_ports) == (4, 126, 504, 0)
    assert nv.warnings() == []
    # a product over 504 is refused (only reachable if the per-key bounds were wider)
    with pytest.raises(NvConfigError, match="504"):
        cross_check(dict(DEFAULTS, VIRTIO_NET_EMULATION_NUM_PF=5, VIRTIO_NET_EMULATION_NUM_VF=126))


def test_warnings_for_settings_without_effect(nv):
    _, w = nv.check(VIRTIO_NET_EMULATION_NUM_VF=8)
    assert any("SRIOV_EN" in x for x in w)
    _, w = nv.check(VIRTIO_EMULATION_HOTPLUG_TRANS=1)
    assert any("VIRTIO_NET_EMULATION_PF_PCI_LAYOUT" in x for x in w)
    _, w = nv.check(PCI_SWITCH_EMULATION_ENABLE=0)
    assert any("hot-plugged" in x for x in w)
    _, w = nv.check(PF_TOTAL_SF=10)
    assert any("PF_TOTAL_SF=10" in x for x in w)
    _, w = nv.check(VIRTIO_NET_EMULATION_ENABLE=0)
    assert any("will not run" in x for x in w)


def test_seed_pf_configuration_applies(nv):
    nv.set(INTERNAL_CPU_MODEL=1)
    nv.set(PF_BAR2_ENABLE=0, PER_PF_NUM_SF=1)
    nv.set(PCI_SWITCH_EMULATION_ENABLE=1, PCI_SWITCH_EMULATION_NUM_PORT=16, VIRTIO_NET_EMULATION_ENABLE=1,
           VIRTIO_NET_EMULATION_NUM_VF=0, VIRTIO_NET_EMULATION_NUM_PF=0, VIRTIO_NET_EMULATION_NUM_MSIX=10,
           ECPF_ESWITCH_MANAGER=1, ECPF_PAGE_SUPPLIER=1, SRIOV_EN=0, PF_SF_BAR_SIZE=10, PF_TOTAL_SF=64)
    nv.apply_pending()
    lim = limits(nv)
    assert (lim.static_pfs, lim.hotplug_ports, lim.pf_max_queue_pairs) == (0, 16, 4)


def test_vfe_seed_vdpa_configuration_applies(nv):
    nv.set(VIRTIO_NET_EMULATION_ENABLE=1, VIRTIO_NET_EMULATION_NUM_PF=1, VIRTIO_NET_EMULATION_NUM_VF=16,
           VIRTIO_BLK_EMULATION_ENABLE=1, VIRTIO_BLK_EMULATION_NUM_PF=1, VIRTIO_BLK_EMULATION_NUM_VF=16,
           VIRTIO_NET_EMULATION_NUM_MSIX=64, VIRTIO_BLK_EMULATION_NUM_MSIX=64, NUM_VF_MSIX=64)
    assert nv.next["NUM_VF_MSIX"] == 64


# -- port 1 -----------------------------------------------------------------------

def test_port1_has_per_port_keys_only(tmp_path):
    p1 = NvConfig.load(tmp_path, PORT1_DEVICE)
    assert set(p1.current) == nvconfig.PORT_KEYS
    p1.set(PF_TOTAL_SF=1, PF_SF_BAR_SIZE=8)        # the seed's step for pciconf0.1
    assert NvConfig.load(tmp_path, PORT1_DEVICE).next["PF_TOTAL_SF"] == 1
    assert NvConfig.load(tmp_path).next["PF_TOTAL_SF"] == 64      # port 0 untouched
    with pytest.raises(NvConfigError, match="global parameter.*pciconf0$") as ei:
        p1.set(VIRTIO_NET_EMULATION_NUM_PF=1)
    assert ei.value.key == "VIRTIO_NET_EMULATION_NUM_PF"
    with pytest.raises(ValueError):
        limits(p1)


@pytest.mark.parametrize("name,want", [
    ("/dev/mst/mt41686_pciconf0", DEFAULT_DEVICE), ("mt41686_pciconf0", DEFAULT_DEVICE),
    ("03:00.0", DEFAULT_DEVICE), ("0000:03:00.1", PORT1_DEVICE), ("/dev/mst/mt41686_pciconf0.1", PORT1_DEVICE),
])
def test_device_names(name, want):
    assert canonical_device(name) == want


def test_unknown_device(tmp_path):
    with pytest.raises(NvConfigError, match="Failed to open device: /dev/mst/mt4119_pciconf0"):
        NvConfig.load(tmp_path, "/dev/mst/mt4119_pciconf0")


def test_corrupt_file_is_reported(tmp_path):
    f = NvConfig.file_for(tmp_path)
    f.parent.mkdir(parents=True)
    f.write_text("{nope")
    with pytest.raises(NvConfigError, match="corrupt.*line 1"):
        NvConfig.load(tmp_path)
    f.write_text(json.dumps({"current": {"PF_TOTAL_SF": 99999}, "next": {}}))
    with pytest.raises(NvConfigError, match="PF_TOTAL_SF") as ei:
        NvConfig.load(tmp_path)
    assert ei.value.key == "PF_TOTAL_SF"


def test_file_with_unknown_and_missing_keys(tmp_path):
    f = NvConfig.file_for(tmp_path)
    f.parent.mkdir(parents=True)
    f.write_text(json.dumps({"current": {"OLD_KEY": 3, "PF_TOTAL_SF": 100}, "next": {"PF_TOTAL_SF": 100}}))
    nv = NvConfig.load(tmp_path)
    assert "OLD_KEY" not in nv.current
    assert nv.current["PF_TOTAL_SF"] == 100
    assert nv.current["SRIOV_EN"] == 0


# -- limits -------------------------------------------------------------------------

@pytest.mark.parametrize("msix,pairs", [(3, 1), (4, 1), (5, 2), (10, 4), (64, 31), (2048, 1023)])
def test_queue_pairs_from_msix(msix, pairs):
    assert queue_pairs_for_msix(msix) == pairs


def test_limits_defaults():
    lim = limits(DEFAULTS)
    assert lim.enabled and lim.disabled_reason is None
    assert lim.static_pfs == 2
    assert lim.hotplug_ports == 16
    assert lim.vfs_per_pf == 0 and lim.total_vfs == 0
    assert lim.pf_msix == 10 and lim.pf_max_queue_pairs == 4 and lim.pf_max_queues == 8
    assert lim.transitional is False and lim.transitional_max == 0
    assert lim.pf_total_sf == 64


def test_limits_disabled_bounds_everything():
    lim = limits({"VIRTIO_NET_EMULATION_ENABLE": 0})
    assert not lim.enabled and "VIRTIO_NET_EMULATION_ENABLE" in lim.disabled_reason
    assert (lim.static_pfs, lim.hotplug_ports, lim.total_vfs, lim.pf_max_queue_pairs) == (0, 0, 0, 0)
    assert "VIRTIO_NET_EMULATION_ENABLE" in service_check({"VIRTIO_NET_EMULATION_ENABLE": 0})


def test_service_needs_embedded_cpu():
    assert "INTERNAL_CPU_MODEL" in service_check({"INTERNAL_CPU_MODEL": 0})
    assert not limits({"INTERNAL_CPU_MODEL": 0}).enabled


def test_limits_switch_disabled():
    assert limits({"PCI_SWITCH_EMULATION_ENABLE": 0}).hotplug_ports == 0
    assert limits({"PCI_SWITCH_EMULATION_NUM_PORT": 4}).hotplug_ports == 4


def test_limits_vfs_need_sriov_and_msix_is_min():
    v = {"VIRTIO_NET_EMULATION_NUM_VF": 16, "VIRTIO_NET_EMULATION_NUM_PF": 1}
    assert limits(v).vfs_per_pf == 0
    lim = limits(dict(v, SRIOV_EN=1, NUM_VF_MSIX=64, VIRTIO_NET_EMULATION_NUM_MSIX=8))
    assert (lim.vfs_per_pf, lim.total_vfs) == (16, 16)
    assert lim.vf_msix == 8 and lim.vf_max_queue_pairs == 3 and lim.vf_max_queues == 6
    assert limits(dict(v, SRIOV_EN=1, VIRTIO_NET_EMULATION_NUM_PF=0)).total_vfs == 0


@pytest.mark.parametrize("io_kb,ports,want", [(64, 16, 15), (8, 16, 1), (4, 16, 0), (64, 4, 4), (20, 16, 4)])
def test_transitional_budget(io_kb, ports, want):
    on = {"VIRTIO_NET_EMULATION_PF_PCI_LAYOUT": 1, "VIRTIO_EMULATION_HOTPLUG_TRANS": 1,
          "VFE_IO_PORT_SPACE_KB": io_kb, "PCI_SWITCH_EMULATION_NUM_PORT": ports}
    lim = limits(on)
    assert lim.transitional and lim.transitional_max == want
    assert not limits(dict(on, VIRTIO_EMULATION_HOTPLUG_TRANS=0)).transitional
    assert limits(dict(on, VIRTIO_NET_EMULATION_PF_PCI_LAYOUT=0)).transitional_max == 0


def test_limits_reads_current_not_next(nv):
    nv.set(PCI_SWITCH_EMULATION_NUM_PORT=2)
    assert limits(nv).hotplug_ports == 16
    nv.apply_pending()
    assert limits(nv).hotplug_ports == 2
