"""MAC addresses as users write them: six hex octets separated by ':'
("52:54:00:12:34:56", either case).  The one parser and formatter; a leaf
every layer may import (the CLIs, the engine's port security)."""
from __future__ import annotations

import re

__all__ = ["format_mac", "parse_mac"]

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
