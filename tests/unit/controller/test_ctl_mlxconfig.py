"""vfe-mlxconfig: mlxconfig-like query and set, confirmation, errors that write nothing."""
import io
import os
import subprocess
import sys

import pytest

from vfe.cli import mlxconfig
from vfe.controller.nvconfig import NvConfig, PORT1_DEVICE

DEV = "/dev/mst/mt41686_pciconf0"


class Tty(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("VFE_ROOT", str(tmp_path))
    return tmp_path


def state(root):
    return root / "var/lib/vfe"


def run(capsys, *argv):
    rc = mlxconfig.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def row(out, key):
    for line in out.splitlines():
        if line[9:].split(" ")[0] == key:
            return line
    raise AssertionError(f"{key} not in output:\n{out}")


def test_query_table(root, capsys):
    rc, out, err = run(capsys, "-d", DEV, "q")
    assert rc == 0 and err == ""
    assert "Device #1:" in out and f"Device:         {DEV}" in out
    header = next(l for l in out.splitlines() if l.startswith("Configurations:"))
    assert header.split()[1:] == ["Default", "Current", "Next", "Boot"]
    assert row(out, "VIRTIO_NET_EMULATION_ENABLE").split()[1:] == ["True(1)"] * 3
    assert row(out, "INTERNAL_CPU_MODEL").split()[1:] == ["EMBEDDED_CPU(1)"] * 3
    assert row(out, "PCI_SWITCH_EMULATION_NUM_PORT").split()[1:] == ["16"] * 3
    assert "'*'" not in out


def test_query_selected_keys_and_star(root, capsys):
    NvConfig.load(state(root)).set(PF_TOTAL_SF=508)
    rc, out, _ = run(capsys, "-d", DEV, "q", "PF_TOTAL_SF", "sriov_en")
    assert rc == 0
    assert row(out, "PF_TOTAL_SF").startswith("*")
    assert row(out, "PF_TOTAL_SF").split()[2:] == ["64", "64", "508"]
    assert not row(out, "SRIOV_EN").startswith("*")
    assert "VIRTIO_NET_EMULATION_NUM_PF" not in out
    assert "next value different" in out


def test_query_all_devices_without_d(root, capsys):
    rc, out, _ = run(capsys, "q")
    assert rc == 0
    assert "Device #1:" in out and "Device #2:" in out and PORT1_DEVICE in out


def test_query_unknown_key(root, capsys):
    rc, out, err = run(capsys, "-d", DEV, "q", "NOPE")
    assert rc == 1 and "-E- The Device doesn't support NOPE parameter" in err


def test_set_with_y(root, capsys):
    rc, out, err = run(capsys, "-d", DEV, "-y", "s", "PF_TOTAL_SF=508", "SRIOV_EN=1")
    assert rc == 0, err
    header = next(l for l in out.splitlines() if l.startswith("Configurations:"))
    assert header.split()[1:] == ["Next", "Boot", "New"]
    assert row(out, "PF_TOTAL_SF").split()[1:] == ["64", "508"]
    assert row(out, "SRIOV_EN").split()[1:] == ["False(0)", "True(1)"]
    assert "Apply new Configuration? (y/n) [n] : y" in out
    assert "Applying... Done!" in out
    assert "-I- Please reboot machine to load new configurations." in out
    nv = NvConfig.load(state(root))
    assert nv.next["PF_TOTAL_SF"] == 508 and nv.current["PF_TOTAL_SF"] == 64


def test_set_refuses_a_pipe_that_ends_without_an_answer(root, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    rc, out, err = run(capsys, "-d", DEV, "s", "PF_TOTAL_SF=100")
    assert rc == 1 and "-y" in err and "no answer" in err
    assert out == ""
    assert not NvConfig.file_for(state(root)).exists()


@pytest.mark.parametrize("piped", ["y\n", "yes\n", "y\ny\ny\n", "Y"])
def test_set_confirmed_from_a_pipe(root, capsys, monkeypatch, piped):
    """`yes | mlxconfig -d ... s ...` is how mlxconfig users script it."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(piped))
    rc, out, err = run(capsys, "-d", DEV, "s", "PF_TOTAL_SF=100")
    assert rc == 0, err
    assert f"Apply new Configuration? (y/n) [n] : {piped.splitlines()[0]}\n" in out and "Done!" in out
    assert NvConfig.load(state(root)).next["PF_TOTAL_SF"] == 100


@pytest.mark.parametrize("piped", ["n\n", "\n", "maybe\n"])
def test_set_declined_from_a_pipe(root, capsys, monkeypatch, piped):
    monkeypatch.setattr(sys, "stdin", io.StringIO(piped))
    rc, out, _ = run(capsys, "-d", DEV, "s", "PF_TOTAL_SF=100")
    assert rc == 1 and "Aborted" in out and "Done" not in out
    assert NvConfig.load(state(root)).next["PF_TOTAL_SF"] == 64


def test_reset_confirmed_from_a_pipe(root, capsys, monkeypatch):
    run(capsys, "-d", DEV, "-y", "s", "PF_TOTAL_SF=100")
    monkeypatch.setattr(sys, "stdin", io.StringIO("yes\n"))
    rc, out, err = run(capsys, "-d", DEV, "r")
    assert rc == 0, err
    assert NvConfig.load(state(root)).next["PF_TOTAL_SF"] == 64


@pytest.mark.parametrize("name,port1", [("mlx5_0", False), ("mlx5_1", True), ("03:00.0", False),
                                        ("0000:03:00.1", True), ("0000:03:00.1".upper(), True),
                                        ("mt41686_pciconf0.1", True)])
def test_device_names_mlxconfig_accepts(root, capsys, name, port1):
    rc, out, err = run(capsys, "-d", name, "-y", "s", "PF_SF_BAR_SIZE=12")
    assert rc == 0, err
    dev = PORT1_DEVICE if port1 else DEV
    assert f"Device:         {dev}" in out
    assert NvConfig.load(state(root), dev).next["PF_SF_BAR_SIZE"] == 12


def test_unknown_device_name_refused(root, capsys):
    rc, out, err = run(capsys, "-d", "mlx5_2", "q")
    assert rc == 1 and "Failed to open device: mlx5_2" in err and out == ""


def test_set_confirmed_on_tty(root, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", Tty("y\n"))
    rc, out, _ = run(capsys, "-d", DEV, "s", "PF_TOTAL_SF=100")
    assert rc == 0 and "Apply new Configuration? (y/n) [n] : " in out and "Done!" in out
    assert NvConfig.load(state(root)).next["PF_TOTAL_SF"] == 100


@pytest.mark.parametrize("answer", ["\n", "n\n", "no\n", ""])
def test_set_declined_on_tty(root, capsys, monkeypatch, answer):
    monkeypatch.setattr(sys, "stdin", Tty(answer))
    rc, out, _ = run(capsys, "-d", DEV, "s", "PF_TOTAL_SF=100")
    assert rc == 1 and "Aborted" in out and "Done" not in out
    assert NvConfig.load(state(root)).next["PF_TOTAL_SF"] == 64


@pytest.mark.parametrize("args,needle", [
    (["FOO=1"], "-E- The Device doesn't support FOO parameter"),
    (["PCI_SWITCH_EMULATION_NUM_PORT=17"], "PCI_SWITCH_EMULATION_NUM_PORT: 17 is out of range"),
    (["SRIOV_EN=maybe"], "Bad value for SRIOV_EN"),
    (["PF_TOTAL_SF"], "use KEY=VAL"),
    (["PF_TOTAL_SF="], "use KEY=VAL"),
    (["PF_TOTAL_SF=1", "pf_total_sf=2"], "PF_TOTAL_SF is given twice"),
    ([], "at least one KEY=VAL"),
])
def test_set_errors_write_nothing(root, capsys, args, needle):
    rc, out, err = run(capsys, "-d", DEV, "-y", "s", *args)
    assert rc == 1
    assert needle in err
    assert "Done" not in out
    assert not NvConfig.file_for(state(root)).exists()


def test_set_reports_every_bad_pair(root, capsys):
    rc, _, err = run(capsys, "-d", DEV, "-y", "s", "PF_TOTAL_SF=100", "FOO=1", "NUM_VF_MSIX=x")
    assert rc == 1
    assert "FOO" in err and "NUM_VF_MSIX" in err and err.count("-E-") == 2
    assert not NvConfig.file_for(state(root)).exists()


def test_set_needs_device(root, capsys):
    rc, _, err = run(capsys, "-y", "s", "PF_TOTAL_SF=1")
    assert rc == 1 and "-d" in err


def test_set_global_key_on_port1_refused(root, capsys):
    rc, _, err = run(capsys, "-d", PORT1_DEVICE, "-y", "s", "VIRTIO_NET_EMULATION_NUM_PF=1")
    assert rc == 1 and "global parameter" in err


def test_set_port1(root, capsys):
    rc, _, err = run(capsys, "-d", "/dev/mst/mt41686_pciconf0.1", "-y", "s", "PF_TOTAL_SF=1", "PF_SF_BAR_SIZE=8")
    assert rc == 0, err
    assert NvConfig.load(state(root), PORT1_DEVICE).next["PF_TOTAL_SF"] == 1


def test_set_warns(root, capsys):
    rc, out, _ = run(capsys, "-d", DEV, "-y", "s", "VIRTIO_NET_EMULATION_NUM_VF=8")
    assert rc == 0 and "-W- " in out and "SRIOV_EN" in out


def test_unknown_device(root, capsys):
    rc, _, err = run(capsys, "-d", "/dev/mst/nothing", "q")
    assert rc == 1 and "Failed to open device" in err


def test_reset(root, capsys):
    NvConfig.load(state(root)).set(PF_TOTAL_SF=100)
    rc, out, _ = run(capsys, "-d", DEV, "-y", "r")
    assert rc == 0 and "Done!" in out
    assert NvConfig.load(state(root)).next["PF_TOTAL_SF"] == 64


def test_describe(root, capsys):
    rc, out, _ = run(capsys, "-d", DEV, "i")
    assert rc == 0
    assert "PCI_SWITCH_EMULATION_NUM_PORT=<0..16>" in out
    assert "VFE_IO_PORT_SPACE_KB" in out and "[vfe only]" in out


def test_state_dir_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("VFE_ROOT", raising=False)
    rc, _, err = run(capsys, "--state-dir", str(tmp_path / "st"), "-d", DEV, "-y", "s", "PF_TOTAL_SF=7")
    assert rc == 0, err
    assert NvConfig.load(tmp_path / "st").next["PF_TOTAL_SF"] == 7


def test_runs_as_a_program(root):
    env = dict(os.environ, VFE_ROOT=str(root))
    p = subprocess.run([sys.executable, "-m", "vfe.cli.mlxconfig", "-d", DEV, "s", "PF_TOTAL_SF=9"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 1 and "-E-" in p.stderr
    p = subprocess.run([sys.executable, "-m", "vfe.cli.mlxconfig", "-d", DEV, "-y", "s", "PF_TOTAL_SF=9"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert NvConfig.load(state(root)).next["PF_TOTAL_SF"] == 9
