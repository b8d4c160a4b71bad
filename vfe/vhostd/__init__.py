"""vfe-vhostd: the host-side service of the VFE vDPA design (the seed's
``dpdk-vfe-vdpa``), and what ``vhostmgmt`` talks to.

    QEMU --vhost-user--> vfe-vhostd --relay--> virtio-net-controller endpoint
                         (JSON-RPC on 127.0.0.1:12190)

- ``relay``   one provisioned VF: the QEMU-side socket (connect with
              ``--client``, else listen), the controller-side connection
              (VFE_RELAY_HELLO / VFE_RELAY_RESUME), and the message-by-message
              relay between them, fds included.  The data path never passes
              through here: guest memory and eventfds go on to the controller.
- ``service`` management PFs and provisioned VFs, the ``mgmtpf`` / ``vf`` /
              ``version`` methods and the reference's errno table.
- ``rpc``     JSON-RPC 2.0 over TCP, one JSON object per request/response.

The daemon is ``vfe/cli/vhostd.py``, the CLI ``vfe/cli/vhostmgmt.py``; see
docs/vfe-vdpa.md.
"""

DEFAULT_PORT = 12190
DEFAULT_ADDRESS = "127.0.0.1"
