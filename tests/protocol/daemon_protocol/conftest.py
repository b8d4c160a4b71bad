"""One daemon for the package's tests (devices a, b, c), and the front-ends they use."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.protocol.daemon_helpers import close_frontend, daemon_fixtures, exchange, open_frontend

daemon, daemon_guard = daemon_fixtures({"a": "queues=2", "b": "queues=2", "c": ""}, scope="package")


@pytest.fixture
def peers(daemon):
    """Running front-ends on devices b (2 pairs) and c (1 pair), RX posted;
    they have talked to each other once (the switch knows their MACs)."""
    b = open_frontend(daemon, "b", 2)
    c = open_frontend(daemon, "c", 1)
    made = [b, c]
    try:
        exchange(b, c)
        yield SimpleNamespace(b=b, c=c)
    finally:
        for fe in made:
            close_frontend(daemon, fe)


@pytest.fixture
def frontends(daemon):
    """open(dev, ...) -> Frontend; every one is closed (and detached) at teardown."""
    made = []

    def open_(dev="a", queue_pairs=2, **kw):
        fe = open_frontend(daemon, dev, queue_pairs, **kw)
        made.append(fe)
        return fe

    yield open_
    for fe in made:
        close_frontend(daemon, fe)
