"""vfe-systemd-units: the units name this installation's entry points, pass
`systemd-analyze verify`, and do not restart a controller that refused its
configuration."""
import configparser
import os
import subprocess

import pytest

from vfe.cli import units
from vfe.cli import vhostd as vhostd_cli


def unit_file(text):
    """The unit as systemd reads it (repeated keys are not expected here)."""
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    cp.optionxform = str
    cp.read_string(text)
    return cp


@pytest.fixture
def bindir(tmp_path):
    """A bin directory that holds executables named like the entry points."""
    d = tmp_path / "venv" / "bin"
    d.mkdir(parents=True)
    for name in units.UNITS:
        (d / name).write_text("#!/bin/sh\nexit 0\n")
        (d / name).chmod(0o755)
    return d


@pytest.mark.parametrize("unit", units.UNITS)
def test_exec_start_is_the_given_bindir(bindir, unit):
    text = units.render(unit, bindir)
    assert "@BINDIR@" not in text
    assert unit_file(text)["Service"]["ExecStart"].split()[0] == str(bindir / unit)


@pytest.mark.parametrize("unit", units.UNITS)
def test_a_refused_configuration_is_not_restarted(unit):
    """systemd restarts on failure; EX_CONFIG (and argparse's 2) must stop that."""
    service = unit_file(units.template(unit))["Service"]
    assert service["Restart"] in ("on-failure", "always")
    assert {str(os.EX_CONFIG), "2"} <= set(service["RestartPreventExitStatus"].split())


def test_default_bindir_holds_the_installed_entry_points():
    for unit in units.UNITS:
        assert os.access(units.default_bindir() / unit, os.X_OK), unit


@pytest.mark.parametrize("unit", units.UNITS)
def test_systemd_analyze_verify(tmp_path, unit):
    """The unit written for the installed entry points verifies; the same
    template pointing at a bin directory without them does not (what a
    hard-coded /usr/local/bin did to a venv install)."""
    assert units.main(["--dir", str(tmp_path)]) == 0
    path = tmp_path / f"{unit}.service"
    r = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / f"{unit}.service").write_text(units.template(unit).replace("@BINDIR@", "/nonexistent/bin"))
    r = subprocess.run(["systemd-analyze", "verify", str(broken / f"{unit}.service")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "/nonexistent/bin" in r.stderr


def test_missing_entry_point_refused_and_nothing_written(tmp_path, bindir, capsys):
    (bindir / "vfe-vhostd").unlink()
    out = tmp_path / "units"
    out.mkdir()
    assert units.main(["--dir", str(out), "--bindir", str(bindir)]) == 1
    err = capsys.readouterr().err
    assert f"{bindir}/vfe-vhostd is not an executable" in err
    assert list(out.iterdir()) == []          # the controller's unit was not written alone either


def test_relative_bindir_refused(capsys):
    assert units.main(["--print", "vfe-vhostd", "--bindir", "venv/bin"]) == 1
    assert "absolute" in capsys.readouterr().err


def test_print(bindir, capsys):
    assert units.main(["--print", "virtio-net-controller", "--bindir", str(bindir)]) == 0
    assert f"ExecStart={bindir}/virtio-net-controller\n" in capsys.readouterr().out


def test_vhostd_bad_iface_exits_ex_config():
    assert vhostd_cli.main(["--iface", "/" + "x" * 120]) == os.EX_CONFIG
