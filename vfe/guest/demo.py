"""The README's demo: a virtio-net-controller with two devices, two QEMU
guests on its vhost-user sockets, a ping each way and a TCP throughput
figure; everything is torn down afterwards, also on failure or Ctrl-C.

    python3 -m vfe.guest.demo [--mb N] [--queues N] [--keep]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from vfe.guest import guest_image
from vfe.guest.controller_process import ControllerProcess
from vfe.guest.vm import VM, NetDev


def step(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="vfe-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=int, default=32, help="MiB to stream for the throughput figure (default 32)")
    p.add_argument("--queues", type=int, default=1, help="queue pairs per NIC (default 1)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    args = p.parse_args(argv)
    if not 1 <= args.mb <= 200:
        p.error("--mb must be in 1..200 (the guests keep the data in RAM)")

    work = Path(tempfile.mkdtemp(prefix="vfe-demo-", dir="/tmp"))
    socks = [str(work / "vm1.sock"), str(work / "vm2.sock")]
    ctl = ControllerProcess([f"net,socket={s},queues={args.queues}" for s in socks], work)
    vms: list[VM] = []
    try:
        step("building/checking the test guest image")
        image = guest_image.build()
        step(f"starting virtio-net-controller (log: {ctl.log_path})")
        ctl.start()
        for i, sock in enumerate(socks, 1):
            vm = VM(f"vm{i}", work, memory_mb=256 + 2 * args.mb, smp=args.queues, image=image,
                    nics=[NetDev(sock, mac=f"52:54:00:de:00:0{i}", queues=args.queues)])
            vms.append(vm)
            step(f"booting vm{i} on {sock}")
            vm.start()
        for i, vm in enumerate(vms, 1):
            t = vm.wait_booted(120)
            vm.run(f"vfe-netup eth0 10.0.0.{i}/24", timeout=30, check=True)
            step(f"vm{i} up in {t:.1f}s, eth0 10.0.0.{i}")
        for src, dst in ((0, 2), (1, 1)):
            rc, out = vms[src].run(f"ping -c 3 -W 3 10.0.0.{dst}", timeout=30)
            summary = [l for l in out.splitlines() if "packets transmitted" in l or "round-trip" in l]
            step(f"vm{src + 1} -> 10.0.0.{dst}: " + ("; ".join(summary) or out.strip()))
            if rc != 0:
                raise RuntimeError("ping failed")
        step(f"streaming {args.mb} MiB over TCP vm1 -> vm2")
        src_sum = vms[0].run(f"vfe-mkdata /tmp/data {args.mb * 1024}", timeout=600, check=True)[1].strip()
        recv = vms[1].run_bg("vfe-recv 5001 /tmp/got")
        t0 = time.monotonic()
        vms[0].run("vfe-send 10.0.0.2 5001 /tmp/data", timeout=900, check=True)
        recv.wait(timeout=120)
        dt = time.monotonic() - t0
        got_sum, got_size = recv.output().split()
        ok = got_sum == src_sum and int(got_size) == args.mb << 20
        step(f"received {int(got_size) >> 20} MiB, md5 {'matches' if ok else 'DIFFERS'}")
        print(f"\nTCP throughput vm1 -> vm2: {args.mb / dt:.1f} MiB/s "
              f"({args.mb * 8.388608 / dt:.0f} Mbit/s) under {vms[0].accel.upper()}\n", flush=True)
        return 0 if ok else 1
    except KeyboardInterrupt:
        step("interrupted")
        return 130
    except Exception as exc:
        step(f"failed: {exc}")
        return 1
    finally:
        step("tearing down")
        for vm in vms:
            vm.shutdown()
        ctl.stop()
        if args.keep:
            step(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
