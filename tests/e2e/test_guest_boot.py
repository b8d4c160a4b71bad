"""The test guest and its launcher (vfe/guest/), before any vfe backend exists.

1. A guest without NICs boots, runs commands and reports exit codes.
2. Two guests with one vhost-user NIC each, served by DPDK's own vhost
   backend (testpmd, io forwarding between its two ports), ping each other
   and move a file over TCP. That proves the NIC arguments of vfe.guest.vm
   (shared memfd RAM, vectors=0 under TCG, sizes) against a reference
   backend.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from tests.guest_fixtures import vm_pool
from vfe.guest.console import GuestTimeout
from vfe.guest.vm import NetDev

pytestmark = pytest.mark.e2e

TESTPMD = "dpdk-testpmd"


def test_boot_and_run(vm_factory, guest_image):
    vm = vm_factory(name="plain", qmp=True)
    boot = vm.wait_booted(timeout=90)
    print(f"booted in {boot:.2f}s ({vm.accel})")

    rc, out = vm.run("uname -r")
    assert (rc, out.strip()) == (0, guest_image.kernel_version)

    rc, out = vm.run("echo to-stderr >&2; exit 7")
    assert (rc, out) == (7, "to-stderr\n")

    # Output without a trailing newline, quotes, and a syntax error that
    # must not take the shell down.
    assert vm.run("printf 'a\"b'\"'\"c") == (0, "a\"b'c")
    assert vm.run("echo 'unterminated")[0] == 2
    assert vm.run("echo still-alive") == (0, "still-alive\n")

    # A hung command times out, and the next command works again.
    with pytest.raises(GuestTimeout):
        vm.run("sleep 600", timeout=2)
    assert vm.run("echo recovered") == (0, "recovered\n")

    # Background jobs, and their output on the serial log.
    mark = vm.log_mark()
    job = vm.run_bg("for i in 1 2 3; do echo tick-$i; sleep 0.2; done; exit 5", console=True)
    vm.wait_for(r"tick-3", timeout=20, since=mark)
    assert job.wait(timeout=20) == 5
    assert job.output() == "tick-1\ntick-2\ntick-3\n"

    assert vm.qmp_command("query-status")["status"] == "running"
    assert vm.run("cat /sys/class/net/lo/operstate")[1].strip() in ("unknown", "up")


# --- DPDK's vhost backend ---------------------------------------------------------------

class DpdkVhost:
    """testpmd with net_vhost server ports, io-forwarding port 0 <-> port 1."""

    def __init__(self, sockets: list[str], log: Path):
        self.sockets = sockets
        self.log = log
        self.prefix = f"vfe-guestboot-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        cpus = sorted(os.sched_getaffinity(0))
        vdevs = []
        for i, s in enumerate(sockets):
            vdevs += ["--vdev", f"net_vhost{i},iface={s},queues=1"]
        self.argv = [TESTPMD, "--no-huge", "-m", "512", "--no-pci", "--no-shconf",
                     "--file-prefix", self.prefix, "-l", ",".join(map(str, cpus[:2])),
                     "--log-level=lib.vhost.*:warning", *vdevs, "--",
                     "--forward-mode=io", "--nb-cores=1", "--stats-period", "1",
                     "--total-num-mbufs=16384"]
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> None:
        with open(self.log, "wb") as f:
            # stdin must not be a terminal or EOF-stop it: with
            # --stats-period it loops until SIGTERM (facts.md).
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=f,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not all(os.path.exists(s) for s in self.sockets):
            if self.proc.poll() is not None:
                raise RuntimeError(f"testpmd exited {self.proc.returncode}:\n"
                                   f"{self.log.read_text(errors='replace')[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("testpmd did not create its vhost-user sockets")
            time.sleep(0.05)

    def port_rx(self) -> dict[int, int]:
        """RX-packets per port from the latest periodic stats in the log."""
        text = self.log.read_text(errors="replace")
        rx: dict[int, int] = {}
        for port, body in re.findall(r"NIC statistics for port (\d+)\s+#+(.*?)#{10}", text, re.S):
            m = re.search(r"RX-packets:\s*(\d+)", body)
            if m:
                rx[int(port)] = int(m.group(1))
        return rx

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # prints stats, exits
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(f"/var/run/dpdk/{self.prefix}", ignore_errors=True)
        for s in self.sockets:
            try:
                os.unlink(s)
            except FileNotFoundError:
                pass


@pytest.fixture(scope="module")
def dpdk_pair(guest_image, tmp_path_factory):
    if shutil.which(TESTPMD) is None:
        pytest.skip("dpdk-testpmd not installed (package dpdk-dev)")
    d = tmp_path_factory.mktemp("dpdk")
    sockets = [str(d / "a.sock"), str(d / "b.sock")]
    pmd = DpdkVhost(sockets, d / "testpmd.log")
    pmd.start()
    try:
        with vm_pool(guest_image, d) as make:
            a = make("a", nics=[NetDev(socket=sockets[0], mac="52:54:00:00:00:01")])
            b = make("b", nics=[NetDev(socket=sockets[1], mac="52:54:00:00:00:02")])
            for vm in (a, b):
                vm.wait_booted(timeout=120)
            for vm, ip in ((a, "10.0.0.1"), (b, "10.0.0.2")):
                vm.run("vfe-netup $(vfe-ifname %s) %s/24" % (vm.nics[0].mac, ip),
                       timeout=30, check=True)
            yield a, b, pmd
    finally:
        pmd.stop()


def test_ping_through_dpdk_vhost(dpdk_pair):
    a, b, pmd = dpdk_pair
    # TCG guests and a busy-polling testpmd share two cores: be patient
    # with the first reply (ARP), strict about the rest.
    rc, out = a.run("ping -c 5 -i 0.2 -w 20 10.0.0.2", timeout=40)
    print(out)
    assert rc == 0 and " 0% packet loss" in out, out
    rc, out = b.run("ping -c 5 -i 0.2 -w 20 10.0.0.1", timeout=40)
    print(out)
    assert rc == 0 and " 0% packet loss" in out, out

    # The frames went through DPDK, not some other path.
    time.sleep(1.5)  # one --stats-period
    rx = pmd.port_rx()
    assert rx.get(0, 0) >= 10 and rx.get(1, 0) >= 10, rx


def test_tcp_transfer_through_dpdk_vhost(dpdk_pair):
    a, b, _ = dpdk_pair
    md5 = a.run("vfe-mkdata /tmp/data 512", check=True)[1].strip()
    recv = b.run_bg("vfe-recv 5001 /tmp/data")
    a.run("vfe-send 10.0.0.2 5001 /tmp/data", timeout=120, check=True)
    assert recv.wait(timeout=60) == 0
    got_md5, size = recv.output().split()
    assert (got_md5, int(size)) == (md5, 512 * 1024)
