"""Test a vhost-user back-end from Python, as QEMU would drive it (docs/testing.md).

    from vfe.testing.frontend import Frontend

    with Frontend.connect("/run/my-backend.sock") as fe:
        fe.start(queue_pairs=1, queue_size=256)
        fe.post_rx_buffers(0)
        fe.send_frame(0, frame)
        frames = fe.recv_frames(0, timeout=2)

frontend: ``Frontend``, the front-end with guest memory, rings and the
virtio-net data path; channel: ``FrontendChannel`` (one method per request,
replies checked as QEMU checks them) and ``NackError``; guest_ram:
``GuestRam``, memfd-backed guest RAM; ring: ``DriverRing``, the driver side
of a split virtqueue.  Real sockets, real fds.
"""
