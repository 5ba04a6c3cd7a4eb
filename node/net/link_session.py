"""One consensus link to one peer: a writer that sends the peer's queue in batches, and a reader that checks each
frame against the peer's budget and hands it on. The transport (consensus_stream.py) owns the sessions."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from .flow import FrameDecoder, FrameTooBig, PeerQueue, RateBudget
from .frames import NetError, encode_frames

log = logging.getLogger("flnode.net.consensus")

READ_CHUNK = 256 << 10
HELLO = b""  # the first frame each side sends; a session counts as connected once the peer's hello arrived


class LinkStream(Protocol):
    """A libp2p stream (frames.Stream) or a direct link (direct.DirectStream)."""

    async def read(self, n: int) -> bytes: ...

    async def write(self, data: bytes) -> None: ...

    async def reset(self) -> None: ...


class _CutOff(Exception):
    pass


@dataclass(frozen=True)
class LinkLimits:
    max_frame: int
    write_timeout: float
    tick: float  # 0: write what one scheduling pass queued; else wait this long to batch more


@dataclass(eq=False)
class Session:
    peer: str
    stream: LinkStream
    queue: PeerQueue
    budget: RateBudget
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    wakeup: trio.Event = field(default_factory=trio.Event)
    subscriber: bool = False  # a non-validator that only listens (an observer, a trainer)

    async def run(self, limits: LinkLimits, counters: dict[str, int], *, on_hello: Callable[[Session], None],
                  on_frame: Callable[[str, bytes], None], cut_off: Callable[[str, str], None]) -> None:
        """Until either side fails or `scope` is cancelled. `on_hello` once the peer's hello arrived, `on_frame`
        for each frame after it; `cut_off(peer, reason)` for a peer that broke the rules."""
        with self.scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._writer, limits, counters)
                nursery.start_soon(self._reader, limits, counters, on_hello, on_frame, cut_off)

    async def _writer(self, limits: LinkLimits, counters: dict[str, int]) -> None:
        try:
            with trio.fail_after(limits.write_timeout):
                await self.stream.write(encode_frames([HELLO]))
            while True:
                await self.wakeup.wait()
                if limits.tick:
                    await trio.sleep(limits.tick)
                else:  # one scheduling pass: what the same consensus step queues joins this write (a sleep that
                    await trio.lowlevel.checkpoint()  # expires costs ~0.1 ms of CPU per write, per peer)
                self.wakeup = trio.Event()
                batch = self.queue.take_all()
                if not batch:
                    continue
                buf = encode_frames(batch)
                with trio.fail_after(limits.write_timeout):
                    await self.stream.write(buf)
                counters["sent"] += len(batch)
                counters["bytes_out"] += len(buf)
                counters["writes"] += 1
        except trio.TooSlowError:
            # (p9) a peer that stops reading stalls our writes; its queue keeps dropping meanwhile
            counters["write_timeouts"] += 1
        except NetError as exc:
            log.debug("consensus stream write failed", extra={"peer": self.peer[:16], "error": str(exc)[:200]})
        self.scope.cancel()

    async def _reader(self, limits: LinkLimits, counters: dict[str, int], on_hello: Callable[[Session], None],
                      on_frame: Callable[[str, bytes], None], cut_off: Callable[[str, str], None]) -> None:
        decoder = FrameDecoder(limits.max_frame)
        hello = False
        try:
            with trio.fail_after(limits.write_timeout) as hello_deadline:
                while True:
                    chunk = await self.stream.read(READ_CHUNK)
                    if not chunk:
                        raise NetError("stream ended")
                    counters["bytes_in"] += len(chunk)
                    for frame in decoder.feed(chunk):
                        if not self.budget.spend(len(frame), trio.current_time()):
                            raise _CutOff("over its message or byte budget")
                        if not hello:
                            if frame != HELLO:
                                raise _CutOff("no hello")
                            hello = True
                            hello_deadline.deadline = float("inf")
                            on_hello(self)
                        elif self.subscriber:
                            raise _CutOff("a subscriber sends nothing after its hello")
                        else:
                            on_frame(self.peer, frame)
        except (FrameTooBig, _CutOff) as exc:
            cut_off(self.peer, str(exc))
        except trio.TooSlowError:
            log.debug("consensus peer sent no hello", extra={"peer": self.peer[:16]})
        except NetError as exc:
            log.debug("consensus stream read failed", extra={"peer": self.peer[:16], "error": str(exc)[:200]})
        self.scope.cancel()
