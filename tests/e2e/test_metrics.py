"""Counters a user watches: a guest on a hot-plugged PF pings through its
representor while Prometheus-style scrapes of `--metrics` and `virtnet
stats` are taken; the per-queue counters rise by exactly what the guest's
own driver says it sent and received, and both show the same numbers."""
from __future__ import annotations

import re
import shutil
import sys
import tempfile

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness.netns import NetNs
from tests.harness.service import ControllerService
from vfe.guest.vm import NetDev

pytestmark = pytest.mark.e2e

# run inside the test's namespace, where the controller listens
SCRAPE = "import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())"


@pytest.fixture
def short_root():
    d = tempfile.mkdtemp(prefix="vfe-m-", dir="/tmp")
    yield d
    shutil.rmtree(d, ignore_errors=True)


def scrape(ns, url) -> dict:
    """{(metric name, frozenset(labels)): value} of one scrape."""
    text = ns.run(sys.executable, "-c", SCRAPE, url).stdout
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def queue_sum(samples: dict, name: str, device: str, direction: str) -> float:
    return sum(v for (n, labels), v in samples.items()
               if n == name and ("device", device) in labels and ("direction", direction) in labels)


def guest_counters(vm) -> dict:
    rc, out = vm.run("cd /sys/class/net/eth0/statistics && echo $(cat tx_packets tx_bytes rx_packets rx_bytes)",
                     timeout=20)
    assert rc == 0, out
    tx_p, tx_b, rx_p, rx_b = (int(x) for x in out.split()[-4:])
    return {"tx_packets": tx_p, "tx_bytes": tx_b, "rx_packets": rx_p, "rx_bytes": rx_b}


def test_metrics_and_virtnet_stats_follow_guest_traffic(short_root, vm_factory):
    with NetNs() as ns:
        svc = ControllerService(short_root, ns, extra=["--metrics", "127.0.0.1:0"])
        try:
            svc.start()
            m = re.search(r"serving Prometheus metrics on (http://127\.0\.0\.1:\d+/metrics)", svc.log())
            assert m, svc.log()
            url = m.group(1)
            hp = svc.virtnet_json("hotplug", "-i", "mlx5_0", "-m", "0c:c4:7a:ff:22:93", "-t", "1500",
                                  "-n", "2", "-s", "256")
            vuid = hp["vuid"]
            rep = hp["sf_rep_net_device"]
            ns.run("sysctl", "-qw", f"net.ipv6.conf.{rep}.disable_ipv6=1")   # no background traffic
            ns.run("ip", "addr", "add", "10.5.0.100/24", "dev", rep)
            ns.run("ip", "link", "set", "dev", rep, "up")
            vm = vm_factory("metrics", nics=[NetDev(svc.socket(vuid), mac="0c:c4:7a:ff:22:93")])
            vm.wait_booted(90)
            vm.run("echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6", timeout=10)
            assert vm.run("vfe-netup eth0 10.5.0.1/24", timeout=30)[0] == 0
            rc, out = vm.run("ping -c 2 -W 3 10.5.0.100", timeout=30)    # ARP settled
            assert rc == 0, out

            g0, s0 = guest_counters(vm), scrape(ns, url)
            rc, out = vm.run("ping -c 20 -i 0.05 -s 1000 -W 3 10.5.0.100", timeout=60)
            assert rc == 0 and "20 packets received" in out, out
            g1, s1 = guest_counters(vm), scrape(ns, url)

            sent = g1["tx_packets"] - g0["tx_packets"]
            got = g1["rx_packets"] - g0["rx_packets"]
            assert sent >= 20 and got >= 20
            # what left the guest's driver went through our TX rings, byte for byte
            assert queue_sum(s1, "vfe_net_packets_total", vuid, "tx") - \
                queue_sum(s0, "vfe_net_packets_total", vuid, "tx") == sent
            assert queue_sum(s1, "vfe_net_bytes_total", vuid, "tx") - \
                queue_sum(s0, "vfe_net_bytes_total", vuid, "tx") == g1["tx_bytes"] - g0["tx_bytes"]
            # and what it received came through our RX rings
            assert queue_sum(s1, "vfe_net_packets_total", vuid, "rx") - \
                queue_sum(s0, "vfe_net_packets_total", vuid, "rx") == got
            assert queue_sum(s1, "vfe_net_bytes_total", vuid, "rx") - \
                queue_sum(s0, "vfe_net_bytes_total", vuid, "rx") == g1["rx_bytes"] - g0["rx_bytes"]
            assert queue_sum(s1, "vfe_net_interrupts_total", vuid, "rx") > \
                queue_sum(s0, "vfe_net_interrupts_total", vuid, "rx")
            # the guest kicked its TX ring (the controller's default adaptive mode
            # sleeps on kicks between pings); each frame to it took >= 1 RX buffer;
            # nothing was dropped, and every drop reason is exported
            assert queue_sum(s1, "vfe_net_kicks_total", vuid, "tx") > \
                queue_sum(s0, "vfe_net_kicks_total", vuid, "tx")
            assert queue_sum(s1, "vfe_net_buffers_total", vuid, "rx") - \
                queue_sum(s0, "vfe_net_buffers_total", vuid, "rx") >= got
            assert queue_sum(s1, "vfe_net_dropped_total", vuid, "tx") == \
                queue_sum(s0, "vfe_net_dropped_total", vuid, "tx")
            reasons = {dict(labels)["reason"] for n, labels in s1 if n == "vfe_net_drops_total"}
            assert {"short", "spoofed", "no_room", "no_ring", "too_big", "offload", "ring_error",
                    "tap"} <= reasons

            # virtnet stats: the same numbers, per queue, at the same (quiet) moment
            stats = svc.virtnet_json("stats", "-u", vuid)["devices"][0]
            s2 = scrape(ns, url)
            assert stats["vuid"] == vuid and stats["kind"] == "net"
            for q in stats["queues"]:
                labels = frozenset({("device", vuid), ("queue", str(q["queue"])),
                                    ("direction", q["direction"])})
                assert s2[("vfe_net_packets_total", labels)] == q["packets"], q
                assert s2[("vfe_net_bytes_total", labels)] == q["bytes"], q
                assert s2[("vfe_net_dropped_total", labels)] == q["dropped"], q
                key = "kicks" if q["direction"] == "tx" else "buffers"
                assert s2[(f"vfe_net_{key}_total", labels)] == q[key], q
            assert sum(q["packets"] for q in stats["queues"] if q["direction"] == "tx") == \
                queue_sum(s1, "vfe_net_packets_total", vuid, "tx")
            # the controller's gauges and the process's
            assert s2[("vfe_functions", frozenset({("kind", "net"), ("type", "hotplug_pf"),
                                                   ("state", "bound")}))] == 1
            assert s2[("vfe_sf_pool_sfs", frozenset({("ib_dev", "mlx5_0"), ("state", "in_use")}))] >= 1
            assert any(name == "process_cpu_seconds_total" for name, _ in s2)
            vm.shutdown()
        finally:
            svc.stop()
