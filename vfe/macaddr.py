"""MAC addresses as users write them: six hex octets separated by ':'
("52:54:00:12:34:56", either case).  The one parser and formatter; a leaf
every layer may import (the CLIs, the engine's port security)."""
from __future__ import annotations

import os
import re

__all__ = ["format_mac", "is_mac", "mac_add", "parse_mac", "random_local_mac"]

_SYNTAX = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")     # fullmatch() only


def parse_mac(text: str) -> bytes:
    """The six bytes ``text`` names; ValueError unless it is six hex octets
    separated by ':'."""
    if not isinstance(text, str) or not _SYNTAX.fullmatch(text):
        raise ValueError(f"bad MAC address {text!r}")
    return bytes.fromhex(text.replace(":", ""))


def format_mac(mac: bytes | int) -> str:
    """"52:54:00:12:34:56" (lower case) for six bytes or a 48-bit number."""
    raw = mac.to_bytes(6, "big") if isinstance(mac, int) else bytes(mac)
    if len(raw) != 6:
        raise ValueError(f"a MAC address is 6 bytes, not {len(raw)}")
    return ":".join(f"{b:02x}" for b in raw)


def is_mac(text: object) -> bool:
    """Whether ``text`` is a MAC address as parse_mac takes it."""
    return isinstance(text, str) and _SYNTAX.fullmatch(text) is not None


def mac_add(mac: str, n: int) -> str:
    """``mac`` + ``n`` as a 48-bit number, wrapping (virtnet.conf's pf_mac+1
    and vf.mac_base rules); lower case."""
    value = int.from_bytes(parse_mac(mac), "big") + n
    return format_mac(value & ((1 << 48) - 1))


def random_local_mac() -> str:
    """A random locally administered unicast MAC (bit 1 of the first octet
    set, bit 0 clear), as the kernel's eth_random_addr makes them."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return format_mac(bytes(raw))
