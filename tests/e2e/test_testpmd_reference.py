"""The testpmd harness against DPDK's own vhost-user back-end.

testpmd "B" (two net_vhost server ports, io forwarding) stands where our
daemon will be; tests.harness.measure.check_forward_counts starts testpmd "A"
with two virtio_user client ports on the same sockets and checks that the
frames sent on one port arrive on the other with equal counts.  The same
function runs against virtio-net-controller in the daemon's own tests.
"""
import pytest

from tests.harness import pmd_backends
from tests.harness import pmd_measure as measure
from tests.harness import testpmd as tp

needs_testpmd = [
    pytest.mark.e2e,
    pytest.mark.skipif(not tp.testpmd_available(),
                       reason="dpdk-testpmd not installed (package dpdk-dev)"),
]


def e2e(f):
    for m in needs_testpmd:
        f = m(f)
    return f

MEM_MB = 256  # starts faster than the default 512 and is plenty here


def _backend(tmp_path_factory, queues):
    d = tmp_path_factory.mktemp(f"vhost{queues}q")
    socks = (str(d / "a.sock"), str(d / "b.sock"))
    with pmd_backends.dpdk_vhost_backend(*socks, queues=queues, mem_mb=MEM_MB):
        yield socks


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    yield from _backend(tmp_path_factory, 1)


@pytest.fixture(scope="module")
def reference_2q(tmp_path_factory):
    yield from _backend(tmp_path_factory, 2)


@e2e
@pytest.mark.parametrize("mrg_rxbuf", [True, False], ids=["mrg", "nomrg"])
@pytest.mark.parametrize("frame_size", [64, 1518])
def test_forward_counts(reference, frame_size, mrg_rxbuf):
    res = measure.check_forward_counts(*reference, frame_size=frame_size, mrg_rxbuf=mrg_rxbuf,
                                  queues=1, mem_mb=MEM_MB)
    # 4 bursts of 32 on each port, all of them accepted and delivered
    assert res.tx == {0: 128, 1: 128}
    assert res.rx == {0: 128, 1: 128}
    assert res.rx_bytes == {0: 128 * frame_size, 1: 128 * frame_size}


@e2e
def test_forward_counts_two_queues(reference_2q):
    # one stream per (port, queue): 2 x 4 bursts of 32 on each port
    res = measure.check_forward_counts(*reference_2q, frame_size=64, queues=2, mem_mb=MEM_MB)
    assert res.tx == {0: 256, 1: 256}
    assert res.rx == {0: 256, 1: 256}


# -- the parsers, on replies captured from testpmd 22.11 (no testpmd needed) --

PORT_STATS = """
  ######################## NIC statistics for port 0  ########################
  RX-packets: 47104      RX-missed: 0          RX-bytes:  3014656
  RX-errors: 0
  RX-nombuf:  0
  TX-packets: 47232      TX-errors: 0          TX-bytes:  3022848

  Throughput (since last show)
  Rx-pps:            7          Rx-bps:            9
  Tx-pps:            0          Tx-bps:            0
  ############################################################################

  ######################## NIC statistics for port 1  ########################
  RX-packets: 5      RX-missed: 1          RX-bytes:  320
  RX-errors: 2
  RX-nombuf:  3
  TX-packets: 4      TX-errors: 0          TX-bytes:  256

  Throughput (since last show)
  Rx-pps:            0          Rx-bps:            0
  Tx-pps:            0          Tx-bps:            0
  ############################################################################
"""

FWD_STATS = """Telling cores to stop...
Waiting for lcores to finish...

  ---------------------- Forward statistics for port 0  ----------------------
  RX-packets: 128            RX-dropped: 0             RX-total: 128
  TX-packets: 127            TX-dropped: 1             TX-total: 128
  ----------------------------------------------------------------------------

  ---------------------- Forward statistics for port 1  ----------------------
  RX-packets: 127            RX-dropped: 0             RX-total: 127
  TX-packets: 128            TX-dropped: 0             TX-total: 128
  ----------------------------------------------------------------------------

  +++++++++++++++ Accumulated forward statistics for all ports+++++++++++++++
  RX-packets: 255            RX-dropped: 0             RX-total: 255
  TX-packets: 255            TX-dropped: 1             TX-total: 256
  ++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++++

Done."""


def test_parse_port_stats():
    st = tp.parse_port_stats(PORT_STATS)
    assert st[0] == tp.PortStats(0, rx_packets=47104, rx_missed=0, rx_bytes=3014656, rx_errors=0,
                                 rx_nombuf=0, tx_packets=47232, tx_errors=0, tx_bytes=3022848)
    assert (st[1].rx_packets, st[1].rx_missed, st[1].rx_errors, st[1].rx_nombuf) == (5, 1, 2, 3)


def test_parse_fwd_stats():
    st = tp.parse_fwd_stats(FWD_STATS)
    assert sorted(st) == [0, 1]  # the accumulated block is not a port
    assert st[0] == tp.FwdStats(0, rx_packets=128, rx_dropped=0, rx_total=128,
                                tx_packets=127, tx_dropped=1, tx_total=128)
    assert tp.parse_fwd_stats("Packet forwarding not started") == {}


def test_vdev_strings():
    assert tp.virtio_user("/s", name="net_virtio_user0") == \
        "net_virtio_user0,path=/s,queues=1,queue_size=256,mrg_rxbuf=1"
    assert tp.virtio_user("/s", queues=2, queue_size=1024, mrg_rxbuf=False, server=True,
                          mac="02:00:00:00:00:0a", name="net_virtio_user3") == \
        ("net_virtio_user3,path=/s,queues=2,queue_size=1024,mrg_rxbuf=0,server=1,"
         "mac=02:00:00:00:00:0a")
    assert tp.vhost("/v", queues=2, client=True, name="net_vhost1") == \
        "net_vhost1,iface=/v,queues=2,client=1"
    assert tp.vhost("/v").startswith("net_vhost")
    assert pmd_backends.controller_argv(["/a", "/b"], binary="vnc", queues=2) == [
        "vnc", "--device", "net,socket=/a,queues=2", "--device", "net,socket=/b,queues=2",
        "--mode", "poll"]
