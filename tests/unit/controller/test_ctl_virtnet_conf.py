"""virtnet.conf: defaults, the seed's examples, and an error naming the key for every rule."""
import json

import pytest

from vfe.controller.virtnet_conf import ConfigError, VirtnetConf, load_virtnet_conf, parse_virtnet_conf

SEED_NON_LAG = {
    "ib_dev_p0": "mlx5_0", "ib_dev_p1": "mlx5_1", "ib_dev_for_static_pf": "mlx5_0", "is_lag": 0,
    "pf_mac": "00:11:22:33:44:55", "recovery": 1, "sf_pool_percent": 0, "sf_pool_force_destroy": 0,
}
SEED_LAG = {
    "ib_dev_lag": "mlx5_bond_0", "ib_dev_for_static_pf": "mlx5_bond_0", "is_lag": 1,
    "pf_mac": "00:11:22:33:44:55", "recovery": 1, "sf_pool_percent": 0, "sf_pool_force_destroy": 0,
}


def parse(obj) -> VirtnetConf:
    return parse_virtnet_conf(json.dumps(obj))


def err(obj) -> ConfigError:
    with pytest.raises(ConfigError) as ei:
        parse_virtnet_conf(obj if isinstance(obj, str) else json.dumps(obj))
    return ei.value


def test_missing_file_is_all_defaults(tmp_path):
    c = load_virtnet_conf(tmp_path / "virtnet.conf")
    assert (c.ib_dev_p0, c.ib_dev_p1, c.ib_dev_lag) == ("mlx5_0", "mlx5_1", "mlx5_bond_0")
    assert c.ib_dev_for_static_pf == "mlx5_0" and c.static_pf_device == "mlx5_0"
    assert c.is_lag is False and c.recovery is True
    assert c.sf_pool_percent == 0 and c.sf_pool_force_destroy is False and c.single_port is False
    assert c.pf_mac is None and c.static_pf_mac(0) is None
    assert c.emu_manager == "mlx5_0"
    assert c.sf_devices == ("mlx5_0", "mlx5_1")
    assert c.path is None


def test_empty_object_and_empty_file(tmp_path):
    assert parse({}).recovery is True
    f = tmp_path / "virtnet.conf"
    f.write_text("  \n")
    assert load_virtnet_conf(f).ib_dev_for_static_pf == "mlx5_0"


def test_seed_non_lag_example(tmp_path):
    f = tmp_path / "virtnet.conf"
    f.write_text(json.dumps(SEED_NON_LAG, indent=1))
    c = load_virtnet_conf(f)
    assert c.path == str(f)
    assert c.static_pf_device == "mlx5_0" and c.pf_num("mlx5_0") == 0 and c.pf_num("mlx5_1") == 1
    assert c.static_pf_mac(0) == "00:11:22:33:44:55"
    assert c.static_pf_mac(1) == "00:11:22:33:44:56"
    assert c.given == frozenset(SEED_NON_LAG)


def test_seed_lag_example():
    c = parse(SEED_LAG)
    assert c.is_lag and c.emu_manager == "mlx5_bond_0"
    assert c.sf_devices == ("mlx5_bond_0",) and c.pf_num("mlx5_bond_0") == 0
    with pytest.raises(ValueError):
        c.pf_num("mlx5_0")


def test_lag_defaults_static_pf_to_lag_device():
    assert parse({"is_lag": 1}).static_pf_device == "mlx5_bond_0"


def test_static_pf_macs_count_up_from_pf_mac():
    assert parse({"pf_mac": "0C:C4:7A:FF:22:93"}).static_pf_mac(2) == "0c:c4:7a:ff:22:95"


def test_mac_only_length_and_form_are_checked():
    # not unicast, all zero, broadcast: accepted (the seed: the user must ensure validity)
    for mac in ("01:00:5e:00:00:01", "00:00:00:00:00:00", "ff:ff:ff:ff:ff:ff"):
        assert parse({"pf_mac": mac}).pf_mac == mac


@pytest.mark.parametrize("mac", ["00:11:22:33:44:5", "00:11:22:33:44:555", "", "0011.2233.4455"])
def test_mac_wrong_length(mac):
    e = err({"pf_mac": mac})
    assert e.key == "pf_mac" and "characters" in e.message


def test_mac_not_hex():
    e = err({"pf_mac": "zz:11:22:33:44:55"})
    assert e.key == "pf_mac"
    e = err({"pf_mac": 1234})
    assert e.key == "pf_mac" and "string" in e.message


def test_static_pf_and_vf_sections():
    c = parse({"static_pf": {"mac_base": "00:00:00:00:10:00", "features": "0x230047082b"},
               "vf": {"mac_base": "00:00:00:00:20:00", "features": 12345, "vfs_per_pf": 4}})
    assert c.static_pf.features == 0x230047082B and c.vf.features == 12345
    assert c.static_pf_mac(3) == "00:00:00:00:10:03"
    assert c.vf_mac(0, 0, num_vf=126) == "00:00:00:00:20:00"
    assert c.vf_mac(1, 2, num_vf=126) == "00:00:00:00:20:06"      # 1 * 4 + 2
    assert c.vf_mac(0, 4, num_vf=126) is None                      # beyond vfs_per_pf
    d = parse({"vf": {"mac_base": "00:00:00:00:20:00"}})
    assert d.vf_mac(1, 2, num_vf=16) == "00:00:00:00:20:12"        # stride = NUM_VF
    assert d.vf.features is None and parse({}).vf_mac(0, 0, 16) is None


@pytest.mark.parametrize("obj,key,needle", [
    ({"ib_dev_lag": "mlx5_bond_0", "ib_dev_p0": "mlx5_0", "is_lag": 1}, "ib_dev_lag", "simultaneously"),
    ({"ib_dev_lag": "mlx5_bond_0", "ib_dev_p1": "mlx5_1", "is_lag": 1}, "ib_dev_lag", "simultaneously"),
    ({"is_lag": 1, "ib_dev_p0": "mlx5_0"}, "is_lag", "LAG device"),
    ({"is_lag": 0, "ib_dev_lag": "mlx5_bond_0"}, "ib_dev_lag", "is_lag is 0"),
    ({"is_lag": 1, "ib_dev_for_static_pf": "mlx5_0"}, "ib_dev_for_static_pf", "LAG device"),
    ({"ib_dev_for_static_pf": "mlx5_7"}, "ib_dev_for_static_pf", "mlx5_7"),
    ({"ib_dev_for_static_pf": "mlx5_bond_0"}, "ib_dev_for_static_pf", "ib_dev_p0"),
    ({"single_port": 1, "ib_dev_for_static_pf": "mlx5_1"}, "ib_dev_for_static_pf", "single_port"),
    ({"single_port": 1, "is_lag": 1}, "single_port", "LAG"),
    ({"single_port": 1, "ib_dev_p1": "mlx5_1"}, "ib_dev_p1", "single_port"),
    ({"ib_dev_p0": "mlx5_1"}, "ib_dev_p1", "both"),
    ({"sf_pool_percent": 101}, "sf_pool_percent", "[0, 100]"),
    ({"sf_pool_percent": -1}, "sf_pool_percent", "[0, 100]"),
    ({"sf_pool_percent": 5.5}, "sf_pool_percent", "integer"),
    ({"sf_pool_percent": "5"}, "sf_pool_percent", "integer"),
    ({"sf_pool_percent": True}, "sf_pool_percent", "integer"),
    ({"is_lag": 2}, "is_lag", "0 or 1"),
    ({"recovery": "1"}, "recovery", "0 or 1"),
    ({"sf_pool_force_destroy": None}, "sf_pool_force_destroy", "null"),
    ({"single_port": [1]}, "single_port", "list"),
    ({"ib_dev_p0": 0}, "ib_dev_p0", "RDMA device"),
    ({"ib_dev_p1": ""}, "ib_dev_p1", "RDMA device"),
    ({"ib_dev_lag": "mlx5 bond", "is_lag": 1}, "ib_dev_lag", "RDMA device"),
    ({"recover": 1}, "recover", "did you mean 'recovery'"),
    ({"PF_MAC": "00:11:22:33:44:55"}, "PF_MAC", "did you mean 'pf_mac'"),
    ({"static_pf": {"mac": "00:11:22:33:44:55"}}, "static_pf.mac", "did you mean 'mac_base'"),
    ({"static_pf": "00:11:22:33:44:55"}, "static_pf", "object"),
    ({"static_pf": {"mac_base": "00:11:22:33:44"}}, "static_pf.mac_base", "characters"),
    ({"static_pf": {"features": "fast"}}, "static_pf.features", "hex string"),
    ({"static_pf": {"features": -1}}, "static_pf.features", "64"),
    ({"static_pf": {"features": 1 << 64}}, "static_pf.features", "64"),
    ({"static_pf": {"features": 1.5}}, "static_pf.features", "number"),
    ({"vf": {"features": True}}, "vf.features", "number"),
    ({"vf": {"vfs_per_pf": 0}}, "vf.vfs_per_pf", "[1, 126]"),
    ({"vf": {"vfs_per_pf": 127}}, "vf.vfs_per_pf", "[1, 126]"),
    ({"vf": {"vfs_per_pf": "4"}}, "vf.vfs_per_pf", "integer"),
    ({"vf": {"mac_base": "00:11:22:33:44:55:66"}}, "vf.mac_base", "characters"),
    ({"vf": {"count": 1}}, "vf.count", "unknown key"),
    ({"vf": []}, "vf", "object"),
    ({"pf_mac": "00:11:22:33:44:55", "static_pf": {"mac_base": "00:11:22:33:44:66"}},
     "static_pf.mac_base", "keep one"),
])
def test_rules_name_the_key(obj, key, needle):
    e = err(obj)
    assert e.key == key
    assert needle in e.message
    assert str(e).startswith(f"{key}: ")


def test_invalid_json_has_line_and_column(tmp_path):
    f = tmp_path / "virtnet.conf"
    f.write_text('{\n  "is_lag": 0,\n  "recovery": 1,\n}\n')
    with pytest.raises(ConfigError) as ei:
        load_virtnet_conf(f)
    assert ei.value.key is None
    assert "line 4 column 1" in str(ei.value)
    assert str(ei.value).startswith(str(f))


def test_not_an_object():
    e = err("[1, 2]")
    assert e.key is None and "object" in e.message


def test_duplicate_key():
    e = err('{"is_lag": 0, "is_lag": 1}')
    assert e.key == "is_lag" and "twice" in e.message


def test_error_names_file(tmp_path):
    f = tmp_path / "virtnet.conf"
    f.write_text('{"sf_pool_percent": 200}')
    with pytest.raises(ConfigError) as ei:
        load_virtnet_conf(f)
    assert str(ei.value) == f"{f}: sf_pool_percent: 200 is out of the valid range [0, 100]"
    assert ei.value.path == str(f)


def test_directory_and_binary(tmp_path):
    with pytest.raises(ConfigError, match="directory"):
        load_virtnet_conf(tmp_path)
    f = tmp_path / "virtnet.conf"
    f.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_virtnet_conf(f)


def test_booleans_accept_json_true_false():
    c = parse({"recovery": False, "is_lag": True, "sf_pool_force_destroy": 1, "single_port": 0})
    assert c.recovery is False and c.is_lag is True and c.sf_pool_force_destroy is True


def test_single_port():
    c = parse({"single_port": 1})
    assert c.sf_devices == ("mlx5_0",)


def test_to_dict_round_trips_through_parse():
    c = parse(dict(SEED_NON_LAG, static_pf={"features": 255}, vf={"vfs_per_pf": 3}))
    d = c.to_dict()
    assert d["static_pf"]["features"] == "0xff" and d["vf"]["vfs_per_pf"] == 3
    assert d["ib_dev_for_static_pf"] == "mlx5_0"
    json.dumps(d)
