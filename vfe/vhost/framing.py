"""Split a vhost-user byte stream into messages, and encode messages.

A message is a 12-byte header (request, flags, size; native u32s) followed
by ``size`` bytes of payload.  File descriptors travel as SCM_RIGHTS
ancillary data attached to the ``sendmsg`` that carried the message (every
known front-end sends one message per ``sendmsg``).

Which message do the fds of one ``recvmsg`` belong to?  Linux (see
unix_stream_read_generic) keeps appending queued sends to one read and stops
right *after* a send that carries fds.  Sends without fds may therefore come
first in the same chunk, and the fd-carrying send is the last one in it.  So:
the fds of a chunk belong to the **last message whose header starts in that
chunk**; if no header starts in it (a sender attaching fds mid-message), to
the message that was being assembled when the chunk arrived.

Sans-I/O: ``FrameAssembler`` never touches sockets or closes fds.  When it
raises ``ProtocolError`` it keeps every fd it was given and not yet handed
out in a message; ``take_pending_fds()`` returns them to the caller to close.
"""
from __future__ import annotations

from dataclasses import replace

from .messages import (
    Config,
    HEADER,
    HEADER_SIZE,
    Message,
    ProtocolError,
    REPLY_FLAGS,
    VERSION,
    request_name,
)

__all__ = ["FrameAssembler", "Message", "MAX_PAYLOAD_SIZE", "encode_message", "encode_reply"]

#: Largest payload accepted: a page, plus room for the biggest GET/SET_CONFIG.
MAX_PAYLOAD_SIZE = 4096 + Config.HEAD_SIZE
#: Most fds one message may carry (SET_MEM_TABLE: 8; kept a bit wider so the
#: protocol, not the framer, reports the count error with the request name).
MAX_FDS_PER_MESSAGE = 32


class FrameAssembler:
    """Incremental framer: ``feed(data, fds)`` returns complete messages."""

    def __init__(self, max_payload: int = MAX_PAYLOAD_SIZE) -> None:
        self._max_payload = max_payload
        self._buf = bytearray()                 # bytes of the message being assembled
        self._header: tuple[int, int, int] | None = None
        self._fds: list[int] = []               # fds for the message being assembled
        self._broken: ProtocolError | None = None

    # -- public --------------------------------------------------------------

    def feed(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> list[Message]:
        """Add bytes (and the fds received with them); return complete messages."""
        fds = list(fds)
        if self._broken is not None:
            self._fds.extend(fds)
            raise ProtocolError(f"stream already failed: {self._broken}")
        out: list[Message] = []
        # Did the message in progress start in this chunk?  Only if nothing of
        # it was buffered before.
        started_here = self.at_boundary
        started: list[bool] = []                # per completed message
        self._buf += data
        try:
            while True:
                msg = self._next()
                if msg is None:
                    break
                out.append(msg)
                started.append(started_here)
                # Leftover bytes came from this chunk: the next header starts here.
                started_here = bool(self._buf)
            if fds:
                self._give_fds(out, started, started_here, fds)
            for msg in out:
                if len(msg.fds) > MAX_FDS_PER_MESSAGE:
                    raise ProtocolError(f"{request_name(msg.request)}: {len(msg.fds)} fds")
        except ProtocolError as exc:
            # Keep ownership of everything not yet handed out, for closing.
            for msg in out:
                self._fds.extend(msg.fds)
            if fds and not any(fd in self._fds for fd in fds):
                self._fds.extend(fds)
            self._broken = exc
            raise
        return out

    def take_pending_fds(self) -> list[int]:
        """Fds held for a message not complete yet (or kept after an error);
        the caller now owns them (normally: closes them)."""
        fds, self._fds = self._fds, []
        return fds

    @property
    def pending_fds(self) -> tuple[int, ...]:
        """Fds held for the message being assembled (still owned here)."""
        return tuple(self._fds)

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete message held."""
        return len(self._buf) + (HEADER_SIZE if self._header is not None else 0)

    @property
    def at_boundary(self) -> bool:
        """True when no partial message is buffered (a clean place for EOF)."""
        return not self._buf and self._header is None

    # -- internals -----------------------------------------------------------

    def _give_fds(self, out: list[Message], started: list[bool], partial_started: bool,
                  fds: list[int]) -> None:
        if self._header is not None or self._buf:
            if partial_started:
                self._fds.extend(fds)           # the partial message started here
                return
        for i in range(len(out) - 1, -1, -1):
            if started[i]:
                out[i] = replace(out[i], fds=out[i].fds + tuple(fds))
                return
        # No header started in this chunk: the message in progress when it came.
        if out:
            out[0] = replace(out[0], fds=out[0].fds + tuple(fds))
        else:
            self._fds.extend(fds)

    def _next(self) -> Message | None:
        if self._header is None:
            if len(self._buf) < HEADER_SIZE:
                return None
            request, flags, size = HEADER.unpack_from(self._buf)
            if size > self._max_payload:
                raise ProtocolError(
                    f"{request_name(request)}: payload size {size} exceeds {self._max_payload}")
            self._header = (request, flags, size)
            del self._buf[:HEADER_SIZE]
        request, flags, size = self._header
        if len(self._buf) < size:
            return None
        payload = bytes(self._buf[:size])
        del self._buf[:size]
        fds, self._fds = tuple(self._fds), []
        self._header = None
        return Message(request, flags, payload, fds)


def encode_message(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    """Header + payload bytes for one message (fds travel separately)."""
    payload = bytes(payload)
    return HEADER.pack(int(request), int(flags), len(payload)) + payload


def encode_reply(request: int, payload: bytes = b"") -> bytes:
    """A back-end reply: flags are exactly version 1 | REPLY (0x5)."""
    return encode_message(request, payload, REPLY_FLAGS)
