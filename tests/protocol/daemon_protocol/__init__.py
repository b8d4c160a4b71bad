"""vhost-user protocol tests against a real virtio-net-controller process:
the Python front-end (vfe.testing.frontend, QEMU's part) over real unix
sockets with real fds (memfds, eventfds).

One daemon serves the whole package (devices a: 2 queue pairs, b: 2 queue
pairs, c: 1 queue pair; net0, net1, net2 in the log).  Every test gets
fresh front-ends on b and c (``peers``); ``daemon_guard`` fails a test
after which the daemon died or logged a traceback (conftest.py).

Acceptance: each handler QEMU uses answers correctly; fd passing works;
wrong sizes, unknown and out-of-order requests get REPLY_ACK failures where
negotiated (else the connection is dropped), never a crash; a front-end
that disconnects at any step leaves the daemon serving the other devices
and the socket ready for a new front-end; fds and mappings do not leak.
"""
