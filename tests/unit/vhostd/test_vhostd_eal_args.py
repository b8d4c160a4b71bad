"""vfe-vhostd takes the seed's dpdk-vfe-vdpa command line: EAL options before
`--` checked and noted (only --log-level acts), the application's after."""
import os
import signal
import subprocess
import sys
import time

import pytest

from vfe.vhostd import eal_args

SEED_EAL = ["-a", "0000:00:00.0", "--log-level=.,8", "--vfio-vf-token=cdc786f0-59d4-41d9-b554-fed36ff5e89f"]


def test_the_seeds_line():
    eal = eal_args.parse([*SEED_EAL, "--", "--client"])
    assert eal.app_argv == ["--client"]
    assert eal.options == ["-a", "--log-level", "--vfio-vf-token"]
    assert eal.log_level == "debug"
    assert "-a --log-level --vfio-vf-token; --log-level: logging at debug" in eal.note()
    assert "cdc786f0" not in eal.note()            # the token is a credential: named, not shown


def test_without_double_dash_everything_is_the_applications():
    assert eal_args.parse(["--client", "-a"]).app_argv == ["--client", "-a"]
    assert eal_args.parse(["--client"]).note() == ""


@pytest.mark.parametrize("argv,level", [
    (["--log-level", "8"], "debug"), (["--log-level=*:7"], "info"), (["--log-level=.,6"], "info"),
    (["--log-level=4"], "err"), (["--log-level=lib.eal:8"], None),     # per-type: not ours
    (["-l", "0-1", "-n", "4", "--no-huge", "-m", "512", "--file-prefix", "x"], None),
    (["-a0000:af:00.2", "--in-memory"], None),
])
def test_accepted(argv, level):
    eal = eal_args.parse([*argv, "--"])
    assert eal.log_level == level and eal.app_argv == []


@pytest.mark.parametrize("argv,needle", [
    (["--bogus"], "unknown EAL option '--bogus'"), (["-x"], "unknown EAL option '-x'"),
    (["-a"], "-a needs a value"), (["--no-huge=1"], "takes no value"),
    (["--log-level=.,9"], "invalid log level '9'"), (["--log-level=debug"], "invalid log level"),
])
def test_refused(argv, needle):
    with pytest.raises(eal_args.EalError, match=needle):
        eal_args.parse([*argv, "--", "--client"])


def test_refused_eal_exits_2_before_anything(capsys):
    from vfe.cli import vhostd
    assert vhostd.main(["--bogus", "--", "--client"]) == 2
    assert "unknown EAL option '--bogus'" in capsys.readouterr().err


def test_daemon_runs_the_seeds_line(tmp_path):
    """The seed's arguments, binary name changed: it serves, in client mode,
    at debug level, and says what it did not use."""
    sock = tmp_path / "run" / "vhostd.sock"
    env = dict(os.environ, VFE_ROOT=str(tmp_path))
    p = subprocess.Popen([sys.executable, "-m", "vfe.cli.vhostd", *SEED_EAL, "--", "--client",
                          "--socket", str(sock)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.05)
        assert sock.exists(), "vfe-vhostd did not start"
    finally:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "EAL options accepted, not used" in err and "-a --log-level --vfio-vf-token" in err
    assert "(client mode" in err and "--log-level: logging at debug" in err
