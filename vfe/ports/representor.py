"""SF representors: persistent TAP netdevs that carry an emulated function's traffic.

Every emulated virtio-net function gets a representor named
``<prefix><pf_num>sf<sf_num>`` (``en3f0pf0sf1001``).  Users put it on an Open
vSwitch bridge; the VM's frames flow guest <-> engine <-> representor fd <->
kernel netdev <-> OVS.

The netdev is a TAP created with ``IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`` (single
queue unless ``multi_queue=True``), marked persistent (``TUNSETPERSIST 1``) so
that it survives the controller: a crashed or restarted controller re-opens it
with :meth:`Representor.attach` and finds the same netdev, the same ifindex
(what ``virtnet list`` shows as ``sf_rep_net_ifindex``) and the same OVS port.
While no process holds it the kernel drops whatever OVS sends to it.

The fd contract (what the engine's nogil worker relies on)
-----------------------------------------------------------
``Representor.fd`` is a plain file descriptor, ``O_RDWR | O_NONBLOCK |
O_CLOEXEC``, owned by the Representor object (it stays open until
:meth:`close` or :meth:`destroy`; the object has no ``__del__`` that could
close it behind the engine's back).  One ``read(2)``/``readv(2)`` returns
exactly one frame, one ``write(2)``/``writev(2)`` sends exactly one frame;
both fail with ``EAGAIN`` when there is nothing to read / the queue is full.

Every frame, in both directions, starts with a 12-byte little-endian header
(``struct virtio_net_hdr_mrg_rxbuf``; ``TUNSETVNETHDRSZ 12``)::

    offset size field        read from fd (kernel -> guest RX)        write to fd (guest TX -> kernel)
    0      u8   flags        1 = NEEDS_CSUM, 2 = DATA_VALID           1 = NEEDS_CSUM (else 0)
    1      u8   gso_type     0 NONE, 1 TCPV4, 4 TCPV6, 0x80 ECN bit   0, or a GSO type for large frames
    2      u16  hdr_len      length of the headers (GSO frames)       as the guest gave it
    4      u16  gso_size     MSS (GSO frames)                         as the guest gave it
    6      u16  csum_start   offset from the Ethernet header          as the guest gave it
    8      u16  csum_offset  checksum field offset from csum_start    as the guest gave it
    10     u16  num_buffers  undefined: the engine sets it            ignored by the kernel
    12     ...  the Ethernet frame (no PI header, no FCS)

* Offloads are on (``TUNSETOFFLOAD TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6``):
  the kernel (OVS, a local socket) may hand the engine frames with a
  *partial* checksum (``flags & 1``: the 16-bit field at ``csum_start +
  csum_offset`` holds only the pseudo-header sum) and TCP frames of up to
  64 KiB with ``gso_type != 0`` and ``gso_size`` = MSS.  The engine passes
  the header through to a guest that negotiated CSUM/GUEST_TSO*, and
  otherwise finishes the checksum / segments in software
  (vfe.kernels.finish_csum, gso_segment).  Read with a buffer of at least
  :data:`MAX_READ` bytes (12 + 65535 + 14 + slack): a shorter buffer
  truncates the frame and the rest is lost.
* ``num_buffers`` (bytes 10..11): older tun drivers skip the two bytes
  (``iov_iter_advance``) and leave whatever was in the buffer; newer ones
  zero them (this machine's 6.18 does).  Treat them as undefined and
  overwrite them for a mergeable-RX guest.
* Writing: a 12-byte header of zeros sends the frame as it is (checksums
  must be complete).  A guest's header with NEEDS_CSUM and/or a GSO type may
  be passed through unchanged: the kernel validates it (``EINVAL`` for an
  inconsistent one) and finishes the checksum / segments as needed.  Beware:
  userspace OVS forwards such a frame *as it is* to its other ports (see
  docs/representors.md, checksums).  A frame shorter than 14 bytes of
  Ethernet header is rejected with ``EINVAL``.
* The device MTU (``mtu=``) is what OVS and the stack size their non-GSO
  frames by (AF_PACKET refuses to send more than MTU + 14 to it); the tun
  driver itself does not check the length of what the engine writes.

Network namespaces
------------------
A TAP is created in the network namespace of the thread that opens
``/dev/net/tun``.  A controller started with ``ip netns exec NS ...`` needs
nothing special: ``Representor.create(name)`` creates it in NS, and all the
netlink work here (pyroute2 ``IPRoute()``) runs in the current namespace too.
``netns=`` (a name under /var/run/netns, a path, or an open fd) is for callers
that live in another namespace (tests): the calling *thread* enters that
namespace only for the duration of the open/ioctl/netlink calls and returns;
the fd and the netdev stay bound to that namespace.  Deleting the namespace
deletes its representors, but only once every fd on them is closed.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import struct
from collections import namedtuple
from typing import Iterator, Union

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from vfe.virtio.constants import VIRTIO_NET_HDR_MRG_LEN

__all__ = [
    "Representor", "RepresentorError", "VnetHdr", "MAX_READ",
    "pack_vnet_hdr", "unpack_vnet_hdr", "validate_name", "representor_name",
    "parse_representor_name", "exists", "list_representors", "enter_netns",
]

# --- <linux/if_tun.h> ------------------------------------------------------
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOFFLOAD = 0x400454D0
TUNGETIFF = 0x800454D2
TUNGETVNETHDRSZ = 0x800454D7
TUNSETVNETHDRSZ = 0x400454D8
TUNSETVNETLE = 0x400454DC

IFF_TUN = 0x0001
IFF_TAP = 0x0002
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000
IFF_PERSIST = 0x0800

TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
DEFAULT_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6

#: read buffer size that never truncates a frame: header + 64 KiB GSO frame
#: (IP total length <= 65535) + Ethernet/VLAN header, rounded up.
MAX_READ = VIRTIO_NET_HDR_MRG_LEN + 65536 + 64

IFNAMSIZ = 16
_IFREQ = "16sH22x"  # struct ifreq: name, flags (union padded to 40 bytes)
_VNET = struct.Struct("<BBHHHHH")
_CLONE_NEWNET = 0x40000000
_NETNS_RUN_DIR = "/var/run/netns"

VnetHdr = namedtuple("VnetHdr",
                     "flags gso_type hdr_len gso_size csum_start csum_offset num_buffers",
                     defaults=(0, 0, 0, 0, 0, 0, 0))

NetnsSpec = Union[str, int, None]


class RepresentorError(OSError):
    """A representor operation failed; ``errno`` says why (ENODEV, EEXIST,
    EBUSY, EINVAL, ...) and the message names the device."""

    def __init__(self, err: int, message: str):
        super().__init__(err, message)


def pack_vnet_hdr(flags: int = 0, gso_type: int = 0, hdr_len: int = 0, gso_size: int = 0,
                  csum_start: int = 0, csum_offset: int = 0, num_buffers: int = 0) -> bytes:
    """The 12-byte little-endian virtio-net header that precedes every frame."""
    return _VNET.pack(flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers)


def unpack_vnet_hdr(buf) -> VnetHdr:
    """Decode the first 12 bytes of a frame read from a representor fd."""
    return VnetHdr(*_VNET.unpack_from(buf, 0))


# --- names -------------------------------------------------------------------

_BAD_CHARS = re.compile(r"[/:%\s]")


def validate_name(name: str) -> str:
    """Return ``name`` if Linux accepts it as a netdev name, else raise
    ValueError: 1..15 bytes (IFNAMSIZ - 1), not '.' or '..', no '/', ':' or
    whitespace, and no '%' (TUNSETIFF would treat it as a template)."""
    if not isinstance(name, str):
        raise ValueError(f"interface name must be a str, not {type(name).__name__}")
    raw = name.encode("utf-8", "surrogateescape")
    if not raw:
        raise ValueError("interface name is empty")
    if len(raw) >= IFNAMSIZ:
        raise ValueError(f"interface name {name!r} is {len(raw)} bytes long; "
                         f"Linux allows at most {IFNAMSIZ - 1} (IFNAMSIZ)")
    if name in (".", ".."):
        raise ValueError(f"interface name {name!r} is reserved")
    if _BAD_CHARS.search(name) or "\0" in name:
        raise ValueError(f"interface name {name!r} contains '/', ':', '%', NUL or whitespace")
    return name


def representor_name(prefix: str, pf_num: int, sf_num: int) -> str:
    """``<prefix><pf_num>sf<sf_num>``, e.g. ('en3f0pf', 0, 1001) -> 'en3f0pf0sf1001'."""
    if pf_num < 0 or sf_num < 0:
        raise ValueError("pf_num and sf_num must be >= 0")
    return validate_name(f"{prefix}{int(pf_num)}sf{int(sf_num)}")


def parse_representor_name(name: str, prefix: str) -> tuple[int, int] | None:
    """(pf_num, sf_num) for a name built by :func:`representor_name`, else None."""
    if not name.startswith(prefix):
        return None
    m = re.fullmatch(r"(\d+)sf(\d+)", name[len(prefix):])
    return (int(m.group(1)), int(m.group(2))) if m else None


# --- network namespaces ------------------------------------------------------

_libc = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _netns_path(netns: str) -> str:
    return netns if "/" in netns else os.path.join(_NETNS_RUN_DIR, netns)


@contextlib.contextmanager
def enter_netns(netns: NetnsSpec) -> Iterator[None]:
    """Run the body with the calling *thread* in network namespace ``netns``
    (a name in /var/run/netns, a path such as /proc/PID/ns/net, or an open
    fd); ``None`` = stay in the current one.  Sockets and TAP fds opened in
    the body stay in that namespace after it returns."""
    if netns is None:
        yield
        return
    if isinstance(netns, int):
        target, own = netns, False
    else:
        path = _netns_path(os.fspath(netns))
        try:
            target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise RepresentorError(errno.ENOENT, f"network namespace {netns!r} does not exist "
                                   f"({path})") from None
        own = True
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(orig)
    finally:
        os.close(orig)
        if own:
            os.close(target)


@contextlib.contextmanager
def _ipr(netns: NetnsSpec) -> Iterator[IPRoute]:
    with enter_netns(netns):
        ipr = IPRoute()  # the netlink socket is bound to the thread's netns now
    try:
        yield ipr
    finally:
        ipr.close()


def _link(ipr: IPRoute, name: str):
    """The RTM_NEWLINK message for ``name`` or None."""
    try:
        msgs = ipr.link("get", ifname=name)
    except NetlinkError as e:
        if e.code == errno.ENODEV:
            return None
        raise
    return msgs[0] if msgs else None


def _tun_info(msg) -> dict | None:
    """{'type': IFF_TAP|IFF_TUN, 'persist':, 'multi_queue':, ...} for a tun/tap link, else None."""
    li = msg.get_attr("IFLA_LINKINFO")
    if li is None or li.get_attr("IFLA_INFO_KIND") != "tun":
        return None
    data = li.get_attr("IFLA_INFO_DATA")
    attrs = dict(data["attrs"]) if data is not None else {}
    return {
        "type": attrs.get("IFLA_TUN_TYPE", 0),
        "persist": bool(attrs.get("IFLA_TUN_PERSIST", 0)),
        "multi_queue": bool(attrs.get("IFLA_TUN_MULTI_QUEUE", 0)),
        "vnet_hdr": bool(attrs.get("IFLA_TUN_VNET_HDR", 0)),
        "num_queues": attrs.get("IFLA_TUN_NUM_QUEUES"),
    }


def _kind(msg) -> str:
    li = msg.get_attr("IFLA_LINKINFO")
    kind = li.get_attr("IFLA_INFO_KIND") if li is not None else None
    return f"a {kind}" if kind else "a non-virtual"


def exists(name: str, *, netns: NetnsSpec = None) -> bool:
    """True when a netdev called ``name`` exists (any kind)."""
    with _ipr(netns) as ipr:
        return _link(ipr, name) is not None


def is_tap(name: str, *, netns: NetnsSpec = None) -> bool:
    """True when ``name`` exists and is a TAP (not a TUN, veth, ...)."""
    with _ipr(netns) as ipr:
        msg = _link(ipr, name)
        info = _tun_info(msg) if msg is not None else None
        return info is not None and info["type"] == IFF_TAP


def list_representors(prefix: str = "", *, netns: NetnsSpec = None,
                      strict: bool = False) -> list[str]:
    """Sorted names of the TAP netdevs whose name starts with ``prefix``.
    ``strict=True`` keeps only names of the form ``<prefix><pf>sf<sf>``.
    (Recovery compares this with its records to find stale representors.)"""
    out = []
    with _ipr(netns) as ipr:
        for msg in ipr.get_links():
            name = msg.get_attr("IFLA_IFNAME")
            if not name or not name.startswith(prefix):
                continue
            info = _tun_info(msg)
            if info is None or info["type"] != IFF_TAP:
                continue
            if strict and parse_representor_name(name, prefix) is None:
                continue
            out.append(name)
    return sorted(out)


# --- the representor ---------------------------------------------------------

class Representor:
    """One open queue of a persistent TAP representor.  Build it with
    :meth:`create` or :meth:`attach`; use ``.fd`` for frames (module
    docstring), ``.close()`` to let it go (netdev stays) and ``.destroy()`` to
    delete the netdev."""

    def __init__(self, name: str, fd: int, ifindex: int, mac: str, *,
                 netns: NetnsSpec = None, multi_queue: bool = False):
        self.name = name
        self.fd = fd
        self.ifindex = ifindex
        self.mac = mac
        self.netns = netns
        self.multi_queue = multi_queue

    # -- construction ------------------------------------------------------
    @staticmethod
    def _open_tun(name: str, flags: int) -> tuple[int, str]:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            ifr = bytearray(struct.pack(_IFREQ, name.encode(), flags))
            fcntl.ioctl(fd, TUNSETIFF, ifr)
            real = bytes(ifr[:IFNAMSIZ]).split(b"\0", 1)[0].decode()
        except BaseException:
            os.close(fd)
            raise
        return fd, real

    @staticmethod
    def _configure_fd(fd: int, offloads: int) -> None:
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VIRTIO_NET_HDR_MRG_LEN))
        with contextlib.suppress(OSError):  # no-op on little-endian hosts
            fcntl.ioctl(fd, TUNSETVNETLE, struct.pack("i", 1))
        fcntl.ioctl(fd, TUNSETOFFLOAD, offloads)

    @classmethod
    def create(cls, name: str, *, netns: NetnsSpec = None, mtu: int = 1500,
               mac: str | None = None, multi_queue: bool = False,
               offloads: int = DEFAULT_OFFLOADS, up: bool = False) -> "Representor":
        """Create a new persistent TAP ``name`` and open it.  Fails with
        EEXIST if a netdev of that name exists (use :meth:`attach`).  If any
        step fails nothing is left behind.  ``up=True`` also sets it up."""
        validate_name(name)
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL
        if multi_queue:
            flags |= IFF_MULTI_QUEUE
        with enter_netns(netns):
            try:
                fd, real = cls._open_tun(name, flags)
            except OSError as e:
                if e.errno == errno.EBUSY:  # IFF_TUN_EXCL: the name is taken
                    raise RepresentorError(errno.EEXIST, f"cannot create representor {name!r}: "
                                           "a netdev with that name already exists") from None
                raise RepresentorError(e.errno, f"cannot create representor {name!r}: "
                                       f"TUNSETIFF: {e.strerror}") from None
            try:
                cls._configure_fd(fd, offloads)
                ipr = IPRoute()
                try:
                    index = ipr.link_lookup(ifname=real)[0]
                    kw = {"mtu": int(mtu)}
                    if mac is not None:
                        kw["address"] = mac
                    try:
                        ipr.link("set", index=index, **kw)
                    except NetlinkError as e:
                        raise RepresentorError(e.code, f"cannot configure representor {name!r} "
                                               f"({kw}): {os.strerror(e.code)}") from None
                    if up:
                        ipr.link("set", index=index, state="up")
                    address = _link(ipr, real).get_attr("IFLA_ADDRESS")
                finally:
                    ipr.close()
                fcntl.ioctl(fd, TUNSETPERSIST, 1)  # last step: nothing can fail after it
            except BaseException:
                os.close(fd)  # a non-persistent TAP disappears with its last fd
                raise
        return cls(real, fd, index, address, netns=netns, multi_queue=multi_queue)

    @classmethod
    def attach(cls, name: str, *, netns: NetnsSpec = None,
               offloads: int = DEFAULT_OFFLOADS) -> "Representor":
        """Re-open an existing persistent TAP (after a controller restart):
        same netdev, same ifindex, same OVS port.  Raises RepresentorError
        with ENODEV if it does not exist, EINVAL if it is not a persistent
        TAP, EBUSY if another process holds its (single) queue."""
        validate_name(name)
        with enter_netns(netns):
            ipr = IPRoute()
            try:
                msg = _link(ipr, name)
                if msg is None:
                    raise RepresentorError(errno.ENODEV, f"representor {name!r} does not exist")
                info = _tun_info(msg)
                if info is None:
                    raise RepresentorError(errno.EINVAL, f"{name!r} is {_kind(msg)} device, "
                                           "not a TAP representor")
                if info["type"] != IFF_TAP:
                    raise RepresentorError(errno.EINVAL, f"{name!r} is a TUN (layer 3) device, "
                                           "not a TAP representor")
                if not info["persist"]:
                    raise RepresentorError(errno.EINVAL, f"TAP {name!r} is not persistent: it "
                                           "belongs to the process that holds it")
                index = msg["index"]
                flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
                if info["multi_queue"]:
                    flags |= IFF_MULTI_QUEUE
                try:
                    fd, real = cls._open_tun(name, flags)
                except OSError as e:
                    if e.errno == errno.EBUSY:
                        raise RepresentorError(errno.EBUSY, f"representor {name!r} is held by "
                                               "another process (single-queue TAP)") from None
                    raise RepresentorError(e.errno, f"cannot attach representor {name!r}: "
                                           f"TUNSETIFF: {e.strerror}") from None
                try:
                    # It may have vanished between the lookup and TUNSETIFF, in
                    # which case TUNSETIFF created a fresh, non-persistent one.
                    after = _link(ipr, real)
                    got = bytearray(struct.pack(_IFREQ, b"", 0))
                    fcntl.ioctl(fd, TUNGETIFF, got)
                    got_flags = struct.unpack(_IFREQ, got)[1]
                    if after is None or after["index"] != index or not got_flags & IFF_PERSIST:
                        raise RepresentorError(errno.ENODEV, f"representor {name!r} disappeared "
                                               "while attaching")
                    cls._configure_fd(fd, offloads)
                    address = after.get_attr("IFLA_ADDRESS")
                except BaseException:
                    os.close(fd)
                    raise
            finally:
                ipr.close()
        return cls(real, fd, index, address, netns=netns, multi_queue=info["multi_queue"])

    # -- lifetime ----------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self.fd < 0

    def fileno(self) -> int:
        if self.fd < 0:
            raise ValueError(f"representor {self.name!r} is closed")
        return self.fd

    def close(self) -> None:
        """Close the fd; the persistent netdev (and its OVS port) stays.  Idempotent."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)

    def destroy(self) -> None:
        """Delete the netdev (TUNSETPERSIST 0 + close).  Idempotent: a
        representor already gone is fine.  Works after :meth:`close` too
        (then by netlink, checking the ifindex so a newer netdev that reuses
        the name is left alone)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self.fd, TUNSETPERSIST, 0)
            self.close()
            if not self.multi_queue:
                return
        # closed already, or other queues may still hold it: delete by netlink
        with _ipr(self.netns) as ipr:
            msg = _link(ipr, self.name)
            if msg is None or msg["index"] != self.ifindex:
                return
            try:
                ipr.link("del", index=self.ifindex)
            except NetlinkError as e:
                if e.code != errno.ENODEV:
                    raise RepresentorError(e.code, f"cannot delete representor {self.name!r}: "
                                           f"{os.strerror(e.code)}") from None

    def __enter__(self) -> "Representor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.fd < 0 else f"fd={self.fd}"
        return f"<Representor {self.name} ifindex={self.ifindex} mac={self.mac} {state}>"

    # -- netlink -----------------------------------------------------------
    def _set(self, **kw) -> None:
        with _ipr(self.netns) as ipr:
            try:
                ipr.link("set", index=self.ifindex, **kw)
            except NetlinkError as e:
                raise RepresentorError(e.code, f"representor {self.name!r}: setting {kw}: "
                                       f"{os.strerror(e.code)}") from None

    def set_up(self) -> None:
        self._set(state="up")

    def set_down(self) -> None:
        self._set(state="down")

    def set_mtu(self, mtu: int) -> None:
        self._set(mtu=int(mtu))

    def set_mac(self, mac: str) -> None:
        self._set(address=mac)
        self.mac = self.info()["mac"]

    def rename(self, new_name: str) -> None:
        """Rename the netdev (it must be down); the ifindex is unchanged."""
        validate_name(new_name)
        self._set(ifname=new_name)
        self.name = new_name

    def info(self) -> dict:
        """From netlink: name, ifindex, mac, mtu, up, carrier, persist, multi_queue."""
        with _ipr(self.netns) as ipr:
            msgs = ipr.link("get", index=self.ifindex)
        msg = msgs[0]
        tun = _tun_info(msg) or {}
        return {
            "name": msg.get_attr("IFLA_IFNAME"),
            "ifindex": msg["index"],
            "mac": msg.get_attr("IFLA_ADDRESS"),
            "mtu": msg.get_attr("IFLA_MTU"),
            "up": bool(msg["flags"] & 1),
            "carrier": bool(msg.get_attr("IFLA_CARRIER")),
            "persist": tun.get("persist"),
            "multi_queue": tun.get("multi_queue"),
        }

    @property
    def mtu(self) -> int:
        return self.info()["mtu"]

    # -- convenience I/O (control plane and tests; the engine uses .fd) --------
    def write_frame(self, frame: bytes, hdr: bytes | None = None) -> int:
        """Write one Ethernet frame preceded by ``hdr`` (default: 12 zero bytes)."""
        return os.write(self.fileno(), (hdr if hdr is not None else bytes(VIRTIO_NET_HDR_MRG_LEN)) + frame)

    def read_frame(self, bufsize: int = MAX_READ) -> tuple[VnetHdr, bytes] | None:
        """One (header, Ethernet frame) or None when nothing is queued."""
        try:
            data = os.read(self.fileno(), bufsize)
        except BlockingIOError:
            return None
        return unpack_vnet_hdr(data), data[VIRTIO_NET_HDR_MRG_LEN:]

    # -- static helpers ------------------------------------------------------
    exists = staticmethod(exists)
    list_representors = staticmethod(list_representors)
