"""Request/response and long-lived stream protocols over libp2p streams and the validators' direct links: the
handlers a node serves, and the requests it makes (one framed request, a response of any size piece by piece)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .frames import (
    CHUNK,
    FRAME_HEADER,
    MAX_PROTOCOL_ID,
    MAX_REQUEST,
    Handler,
    NetError,
    Stream,
    StreamedResponse,
    StreamHandler,
    read_exactly,
    read_frame,
    write_frame,
    write_streamed,
)

log = logging.getLogger("flnode.net")


class Requests:
    """The request side of a P2PNode. `host()` is the running libp2p host or None; `count` bumps a counter."""

    def __init__(self, host: Callable[[], Any], count: Callable[[str], None]) -> None:
        self._host_of = host
        self._count = count
        self._handlers: dict[str, tuple[Handler, int]] = {}
        self._stream_handlers: dict[str, StreamHandler] = {}
        # A stream for one request to a validator over a direct link, or None (then libp2p carries it): set by
        # the consensus transport, which knows the direct addresses.
        self.open_direct: Callable[[str], Awaitable[Any]] | None = None

    @property
    def _host(self) -> Any:
        return self._host_of()

    def install_all(self) -> None:
        """The host just started: give it every handler set so far."""
        for protocol_id in self._handlers:
            self._install_handler(protocol_id)
        for protocol_id in self._stream_handlers:
            self._install_stream_handler(protocol_id)


    def set_handler(self, protocol_id: str, handler: Handler, *, max_request: int = MAX_REQUEST) -> None:
        self._handlers[protocol_id] = (handler, max_request)
        if self._host is not None:
            self._install_handler(protocol_id)

    def _install_handler(self, protocol_id: str) -> None:
        from libp2p.custom_types import TProtocol

        handler, max_request = self._handlers[protocol_id]

        async def on_stream(stream: Any) -> None:
            # (p1) an exception escaping a stream handler kills the host: serve_request catches everything
            await self._serve(stream, stream.muxed_conn.peer_id.to_base58(), protocol_id, handler, max_request)

        self._host.set_stream_handler(TProtocol(protocol_id), on_stream)

    async def _serve(self, stream: Any, peer: str, protocol_id: str, handler: Handler, max_request: int) -> None:
        """One framed request and its response; any failure resets the stream and is counted."""
        try:
            with trio.fail_after(30):
                request = await read_frame(stream, max_request)
                response = await handler(peer, request)
                if not isinstance(response, StreamedResponse):
                    await write_frame(stream, response)
            if isinstance(response, StreamedResponse):
                with trio.fail_after(response.timeout):
                    await write_streamed(stream, response)
            await stream.close()
            self._count("requests_served")
        except Exception as exc:
            self._count("handler_errors")
            log.debug("stream handler failed", extra={"protocol": protocol_id, "error": repr(exc)[:200]})
            try:
                await stream.reset()
            except Exception:
                pass

    async def serve_direct_request(self, peer: str, stream: Any) -> None:
        """A request that came over a direct link: its first frame names the protocol, then as over libp2p."""
        try:
            with trio.fail_after(10):
                protocol_id = (await read_frame(stream, MAX_PROTOCOL_ID)).decode()
        except (NetError, trio.TooSlowError, UnicodeDecodeError):
            self._count("handler_errors")
            return
        entry = self._handlers.get(protocol_id)
        if entry is None:
            self._count("direct_unknown_protocol")
            return
        self._count("direct_requests_served")
        await self._serve(stream, peer, protocol_id, *entry)

    def set_stream_handler(self, protocol_id: str, handler: StreamHandler) -> None:
        """A long-lived stream protocol: `handler(peer, stream)` owns the stream until it returns."""
        self._stream_handlers[protocol_id] = handler
        if self._host is not None:
            self._install_stream_handler(protocol_id)

    def _install_stream_handler(self, protocol_id: str) -> None:
        from libp2p.custom_types import TProtocol

        handler = self._stream_handlers[protocol_id]

        async def on_stream(raw: Any) -> None:
            stream = None
            try:  # (p1) nothing may escape into libp2p
                stream = Stream(raw, raw.muxed_conn.peer_id.to_base58())
                await handler(stream.peer, stream)
            except Exception as exc:
                self._count("handler_errors")
                log.debug("stream handler failed", extra={"protocol": protocol_id, "error": repr(exc)[:200]})
            finally:
                await (stream or Stream(raw, "")).reset()

        self._host.set_stream_handler(TProtocol(protocol_id), on_stream)

    async def open_stream(self, peer: str, protocol_id: str, *, timeout: float) -> Stream:
        """A new long-lived stream to a peer; the caller resets it when done."""
        if self._host is None:  # checked first: these imports would load all of libp2p on the event loop
            raise NetError("not running")
        from libp2p.custom_types import TProtocol
        from libp2p.peer.id import ID

        pid = ID.from_base58(peer)
        try:
            with trio.fail_after(timeout):
                raw = await self._host.new_stream(pid, [TProtocol(protocol_id)])
        except trio.TooSlowError:
            await self._close_stale_connections(pid)
            raise NetError(f"opening a stream to {peer[:16]} timed out after {timeout}s") from None
        except Exception as exc:
            await self._close_stale_connections(pid)
            raise NetError(f"opening a stream to {peer[:16]} failed: {exc!r}"[:300]) from None
        return Stream(raw, peer)

    async def _close_stale_connections(self, pid: Any) -> None:
        """(p24) after a peer restarts, its dead connection can stay listed next to the new one and
        new_stream may pick it and hang: keep only the newest connection."""
        try:
            conns = self._host.get_network().get_connections(pid)
            for conn in conns[:-1]:
                with trio.move_on_after(1):
                    await conn.close()
                self._count("stale_connections_closed")
        except Exception as exc:
            log.debug("closing stale connections failed", extra={"error": repr(exc)[:200]})

    async def request(self, peer: str, protocol_id: str, payload: bytes, *, max_response: int, timeout: float) -> bytes:
        """One framed request and its whole response (small ones: directory, status, blocks); errors as NetError."""
        buf = bytearray()

        async def collect(chunk: bytes) -> None:
            buf.extend(chunk)

        await self.request_into(peer, protocol_id, payload, collect, max_response=max_response, timeout=timeout)
        return bytes(buf)

    async def request_into(
        self, peer: str, protocol_id: str, payload: bytes, sink: Callable[[bytes], Awaitable[None]], *,
        max_response: int, timeout: float, idle_timeout: float | None = None,
    ) -> int:
        """A request whose response is passed to `sink` piece by piece as it arrives (never held whole); returns
        its size (0: the peer has nothing). Same framing as request(); errors as NetError. `idle_timeout`: the
        longest wait for the next bytes, so a slow but moving transfer is not cut off by a tight total timeout
        (on a busy machine a retry from scratch only adds load). To a validator with a direct link the request
        takes a direct connection of its own, else a libp2p stream."""
        stream = None
        try:
            with trio.fail_after(timeout):
                if self.open_direct is not None:
                    stream = await self.open_direct(peer)  # None: no direct link to it
                if stream is not None:
                    await write_frame(stream, protocol_id.encode())
                    self._count("direct_requests")
                else:
                    if self._host is None:  # checked first: these imports would load all of libp2p on the loop
                        raise NetError("not running")
                    from libp2p.custom_types import TProtocol
                    from libp2p.peer.id import ID

                    stream = await self._host.new_stream(ID.from_base58(peer), [TProtocol(protocol_id)])
                await write_frame(stream, payload)
                size = int.from_bytes(await read_exactly(stream, FRAME_HEADER), "big")
                if size > max_response:
                    raise NetError(f"frame of {size} bytes exceeds the cap of {max_response}")
                got = 0
                while got < size:
                    with trio.fail_after(idle_timeout if idle_timeout is not None else timeout):
                        chunk = await stream.read(min(size - got, CHUNK))
                    if not chunk:
                        raise NetError(f"stream ended after {got} of {size} bytes")
                    got += len(chunk)
                    await sink(bytes(chunk))
                await stream.close()
                return size
        except NetError:
            raise
        except trio.TooSlowError:
            raise NetError(f"request to {peer[:16]} timed out after {timeout}s") from None
        except Exception as exc:
            raise NetError(f"request to {peer[:16]} failed: {exc!r}"[:300]) from None
        finally:
            if stream is not None:
                try:
                    with trio.move_on_after(1):
                        await stream.reset()
                except Exception:
                    pass
