"""A TCP stream between two test guests, measured: what
tests/bench/test_guest_tcp.py runs against each back-end.

    pair = GuestPair("vfe", sender, receiver, "10.0.1.2")
    pair.prepare(kib=32 << 10)              # data file in the sender, md5
    run = pair.stream(port=5001)            # one timed transfer, md5-checked
    run.mib_s, run.tx_frame_bytes, run.rx_frame_bytes

Timing uses the sender guest's clock (/proc/uptime around ``vfe-send``: busybox
nc exits once the receiver has closed, so the window covers the whole
transfer); the serial console's overhead stays outside.  The guests' interface
counters before and after give the average frame size each side saw: with
TSO/GSO negotiated end to end a frame carries tens of KiB, without it at most
the MTU.  The negotiated virtio feature bits come from the guest's sysfs
(``/sys/class/net/eth0/device/features``, one 0/1 character per bit, bit 0
first): the image's busybox has no ethtool."""
from __future__ import annotations

import os
from dataclasses import dataclass

from vfe.virtio.constants import F

__all__ = ["OFFLOAD_BITS", "decode_features", "pin_process", "GuestPair", "StreamRun",
           "guest_counters"]

#: the feature bits that say which offloads a virtio-net driver accepted
OFFLOAD_BITS = [F.NET_CSUM, F.NET_GUEST_CSUM, F.NET_GUEST_TSO4, F.NET_GUEST_TSO6,
                F.NET_GUEST_ECN, F.NET_GUEST_UFO, F.NET_HOST_TSO4, F.NET_HOST_TSO6,
                F.NET_HOST_ECN, F.NET_HOST_UFO, F.NET_MRG_RXBUF, F.RING_EVENT_IDX,
                F.RING_INDIRECT_DESC, F.RING_PACKED, F.VERSION_1]


def decode_features(bits: str) -> list[str]:
    """The offload-related names set in a sysfs feature string ("1100...")."""
    bits = bits.strip()
    return [f.name.removeprefix("NET_") for f in OFFLOAD_BITS
            if f < len(bits) and bits[f] == "1"]


def pin_process(pid: int, cpus: set[int]) -> None:
    """Pin every thread of ``pid`` (threads it starts later inherit it)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, OSError):
            pass  # a thread that just ended


def guest_counters(vm) -> dict[str, int]:
    """eth0's packet and byte counters (``vfe-stats`` in the guest)."""
    rc, out = vm.run("vfe-stats eth0", timeout=30)
    if rc != 0:
        raise RuntimeError(f"{vm.name}: vfe-stats failed: {out}")
    return {k: int(v) for k, v in (line.split() for line in out.splitlines() if line.strip())}


@dataclass
class StreamRun:
    backend: str
    bytes: int
    seconds: float                  # on the sender's clock
    tx_packets: int                 # sender's eth0 during the run
    tx_bytes: int
    rx_packets: int                 # receiver's eth0 during the run
    rx_bytes: int
    backend_cores: float = 0.0      # back-end CPU time / wall time of the run
    foreign_cores: float = 0.0      # other processes (CpuWatch)

    @property
    def mib_s(self) -> float:
        return self.bytes / self.seconds / (1 << 20)

    @property
    def tx_frame_bytes(self) -> float:
        return self.tx_bytes / max(self.tx_packets, 1)

    @property
    def rx_frame_bytes(self) -> float:
        return self.rx_bytes / max(self.rx_packets, 1)


class GuestPair:
    """Two booted guests on one back-end; ``a`` sends to ``b`` at ``b_addr``."""

    def __init__(self, backend: str, a, b, b_addr: str):
        self.backend, self.a, self.b, self.b_addr = backend, a, b, b_addr
        self.md5 = ""
        self.size = 0

    def features(self) -> dict[str, list[str]]:
        out = {}
        for vm in (self.a, self.b):
            rc, bits = vm.run("cat /sys/class/net/eth0/device/features")
            if rc != 0:
                raise RuntimeError(f"{vm.name}: no virtio feature bits: {bits}")
            out[vm.name] = decode_features(bits)
        return out

    def prepare(self, kib: int) -> None:
        rc, out = self.a.run(f"vfe-mkdata /tmp/data {kib}", timeout=600)
        if rc != 0:
            raise RuntimeError(f"{self.a.name}: vfe-mkdata failed: {out}")
        self.md5, self.size = out.strip(), kib << 10

    def stream(self, port: int, timeout: float) -> StreamRun:
        """Send the data file once from a to b; check md5 and length."""
        tx0, rx0 = guest_counters(self.a), guest_counters(self.b)
        recv = self.b.run_bg(f"rm -f /tmp/got; vfe-recv {port} /tmp/got")
        # listening before the clock starts: vfe-send's connect retries
        # would otherwise count 0.2 s steps into the window
        rc, out = self.b.run(f"i=0; until netstat -ltn | grep -q ':{port} '; do "
                             f"i=$((i+1)); [ $i -gt 100 ] && exit 1; sleep 0.1; done", timeout=30)
        if rc != 0:
            recv.kill()
            raise RuntimeError(f"{self.b.name}: vfe-recv not listening on {port}: {out}")
        rc, out = self.a.run(
            "t0=$(cut -d' ' -f1 /proc/uptime); "
            f"vfe-send {self.b_addr} {port} /tmp/data || exit 1; "
            "t1=$(cut -d' ' -f1 /proc/uptime); echo elapsed $t0 $t1", timeout=timeout)
        if rc != 0:
            recv.kill()
            raise RuntimeError(f"{self.a.name}: vfe-send failed ({rc}): {out}")
        if recv.wait(timeout=timeout) != 0:
            raise RuntimeError(f"{self.b.name}: vfe-recv failed: {recv.output()}")
        got = recv.output().split()
        if got != [self.md5, str(self.size)]:
            raise AssertionError(f"{self.backend}: received {got}, sent {self.md5} {self.size}")
        t0, t1 = (float(x) for x in out.split("elapsed", 1)[1].split()[:2])
        tx1, rx1 = guest_counters(self.a), guest_counters(self.b)
        return StreamRun(self.backend, self.size, max(t1 - t0, 0.01),
                         tx1["tx_packets"] - tx0["tx_packets"], tx1["tx_bytes"] - tx0["tx_bytes"],
                         rx1["rx_packets"] - rx0["rx_packets"], rx1["rx_bytes"] - rx0["rx_bytes"])
