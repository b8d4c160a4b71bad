"""fds and mappings return to their baseline after many front-end cycles."""
from __future__ import annotations

import os
import time

import pytest

from tests.protocol.daemon_helpers import (
    MiB, Cut, Memfd, ack_value, close_frontend, cut_after, exchange, expect_dropped,
    open_frontend,
)
from tests.protocol.daemon_protocol.bad_requests import BAD, send_bad
from tests.protocol.daemon_protocol.helpers import eventfd
from vfe.vhost.messages import Request, VringFile


def _cycle_plain(daemon, peers):
    a = open_frontend(daemon, "a", 2)
    exchange(a, peers.b)
    close_frontend(daemon, a)


def _cycle_mem_table_and_log(daemon, peers):
    a = open_frontend(daemon, "a", 2, regions=4, use_add_mem_reg=False)
    log = Memfd(8192)
    a.set_log_base(log.fd, 8192)
    log.close()
    efd = eventfd()
    a.send_message(Request.SET_LOG_FD, b"", [efd])
    os.close(efd)
    exchange(a, peers.b)
    close_frontend(daemon, a)


def _cycle_stop_restart(daemon, peers):
    a = open_frontend(daemon, "a", 2)
    exchange(a, peers.b)
    a.stop()
    for i in range(4):
        a.setup_ring(i, 256, call=True)
        a.set_vring_enable(i, True)
    err = eventfd()
    a.set_vring_err(1, err)
    os.close(err)
    a.sync()
    exchange(a, peers.b)
    a.rem_mem_reg(a.memory.regions[0])       # rings stop: their memory is gone
    close_frontend(daemon, a)


def _cycle_nacks_with_fds(daemon, peers):
    a = open_frontend(daemon, "a", 2)
    for name in ("mem-table-fewer-fds-than-regions", "call-with-two-fds", "kick-fd-with-nofd-bit",
                 "overlapping-region-added-while-running"):
        assert ack_value(send_bad(a, BAD[name], need_reply=True)) == 1
    exchange(a, peers.b)
    close_frontend(daemon, a)


def _cycle_dropped_with_fds(daemon, peers):
    a = open_frontend(daemon, "a", 2)
    send_bad(a, BAD["mem-table-overlapping-regions"], need_reply=False)   # no NEED_REPLY: drop
    expect_dropped(a)
    close_frontend(daemon, a)


def _cycle_too_many_fds(daemon, peers):
    a = open_frontend(daemon, "a", 2)
    fds = [eventfd() for _ in range(40)]
    try:
        a.conn.send_message(Request.SET_VRING_CALL, VringFile(0, False).encode(), fds)
    finally:
        for fd in fds:
            os.close(fd)
    expect_dropped(a)
    close_frontend(daemon, a)


def _cycle_cut_mid_start(daemon, peers):
    a = open_frontend(daemon, "a", 2, start=False)
    cut_after(a, 20)
    with pytest.raises(Cut):
        a.start(queue_pairs=2, queue_size=256, mem_size=8 * MiB)
    close_frontend(daemon, a)


CYCLES = [_cycle_plain, _cycle_mem_table_and_log, _cycle_stop_restart, _cycle_nacks_with_fds,
          _cycle_dropped_with_fds, _cycle_too_many_fds, _cycle_cut_mid_start]


def test_fds_and_mappings_return_to_baseline_after_20_cycles(daemon, peers):
    for cycle in CYCLES:                       # warm-up: every path once
        cycle(daemon, peers)
    fds0, fdmap0 = daemon.fd_count(), daemon.fds()
    maps0, guest0 = len(daemon.maps()), len(daemon.guest_maps())
    for i in range(20):
        CYCLES[i % len(CYCLES)](daemon, peers)
    exchange(peers.b, peers.c)

    def leaked():
        now = daemon.fds()
        return {fd: now[fd] for fd in set(now) - set(fdmap0)}
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if (daemon.fd_count(), len(daemon.maps()), len(daemon.guest_maps())) == (fds0, maps0, guest0):
            break
        time.sleep(0.05)
    assert daemon.fd_count() == fds0, f"fds leaked: {leaked()}"
    assert len(daemon.guest_maps()) == guest0, "guest memory stays mapped:\n" + "\n".join(
        daemon.guest_maps())
    assert len(daemon.maps()) == maps0, "mappings leaked"
