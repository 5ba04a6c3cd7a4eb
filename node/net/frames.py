"""Frames on a byte stream (a 4-byte big-endian length, then the body), the errors of the network layer, and
a libp2p stream behind a small interface. Shared by libp2p requests, direct links and the consensus transport."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import trio

FRAME_HEADER = 4
CHUNK = 1 << 20
MAX_REQUEST = 64 << 10
MAX_PROTOCOL_ID = 128


class StreamedResponse:
    """A response too large to hold: `size` bytes produced by `chunks()` (written as one frame, piece by piece).
    `timeout`: how long writing it may take (the handler's usual 30 s does not fit a 400 MB blob)."""

    def __init__(self, size: int, chunks: Callable[[], AsyncIterator[bytes]], timeout: float) -> None:
        self.size = size
        self.chunks = chunks
        self.timeout = timeout


Handler = Callable[[str, bytes], Awaitable["bytes | StreamedResponse"]]
StreamHandler = Callable[[str, "Stream"], Awaitable[None]]


class NetError(Exception):
    """A request failed: timeout, reset, refused, oversize, or the peer is unknown."""


async def read_exactly(stream: Any, n: int) -> bytes:
    """Our own read loop (p10: libp2p's read_exactly fails above ~6.6 MB)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(min(n - len(buf), CHUNK))
        if not chunk:
            raise NetError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def read_frame(stream: Any, max_size: int) -> bytes:
    header = await read_exactly(stream, FRAME_HEADER)
    size = int.from_bytes(header, "big")
    if size > max_size:
        raise NetError(f"frame of {size} bytes exceeds the cap of {max_size}")
    return await read_exactly(stream, size) if size else b""


async def write_frame(stream: Any, data: bytes) -> None:
    await stream.write(len(data).to_bytes(FRAME_HEADER, "big"))
    view = memoryview(data)
    for start in range(0, len(data), CHUNK):
        await stream.write(bytes(view[start : start + CHUNK]))


async def write_streamed(stream: Any, response: StreamedResponse) -> None:
    """One frame whose body comes from response.chunks(); a body of the wrong length is an error (reset)."""
    await stream.write(response.size.to_bytes(FRAME_HEADER, "big"))
    sent = 0
    async for piece in response.chunks():
        sent += len(piece)
        if sent > response.size:
            break
        view = memoryview(piece)
        for start in range(0, len(piece), CHUNK):
            await stream.write(bytes(view[start : start + CHUNK]))
    if sent != response.size:
        raise NetError(f"streamed response of {sent} bytes, announced {response.size}")


def encode_frames(items: Sequence[bytes]) -> bytes:
    """Several frames in one buffer (same wire format as write_frame), so a batch is one write."""
    return b"".join(len(d).to_bytes(FRAME_HEADER, "big") + d for d in items)


class Stream:
    """A long-lived libp2p stream behind a small interface: every libp2p error becomes NetError."""

    def __init__(self, raw: Any, peer: str) -> None:
        self._raw = raw
        self.peer = peer

    async def read(self, n: int) -> bytes:
        try:
            return bytes(await self._raw.read(n))
        except Exception as exc:
            raise NetError(f"read failed: {exc!r}"[:200]) from None

    async def write(self, data: bytes) -> None:
        try:
            view = memoryview(data)
            for start in range(0, len(data), CHUNK):
                await self._raw.write(bytes(view[start : start + CHUNK]))
        except Exception as exc:
            raise NetError(f"write failed: {exc!r}"[:200]) from None

    async def reset(self) -> None:
        await close_quietly(self._raw.reset)


async def close_quietly(close: Callable[[], Awaitable[object]]) -> None:
    """Best effort and bounded, even inside a cancelled scope: closing a stream must never hang or raise."""
    with trio.CancelScope(shield=True), trio.move_on_after(1):
        try:
            await close()
        except Exception:
            pass
