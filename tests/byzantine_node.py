"""A Byzantine member: a node holding a real validator key of the testnet that attacks the others.

Run like `flnode start`, with the attacks to perform:

    python tests/byzantine_node.py --home H --attacks swap,flood,inflate,withhold,equivocate

It is the real Daemon (it votes, proposes and stays connected) with these overrides:

- swap: every proposal of another proposer it receives is re-published with a swapped body (same signed header,
  different update list). Honest nodes must refuse it at decode (rejected_malformed).
- flood: for a bounded time, publishes hundreds of signed proposals per second with distinct blocks (varying
  time_ms): for rounds far ahead, and for its own proposer slots of the current and next height.
- inflate: its update has a -50 delta on every parameter, announced with 2^40 samples (above the cap) until one
  went out in step, then on odd heights, and on even heights with the cap (then only the norm bound stands in
  the way).
- withhold: announces its updates without the inline blob and serves its blobs only to the proposer of the height.
- equivocate: every prevote/precommit it casts is followed by a second, conflicting one for the same
  (height, round) (nil <-> a made-up block hash), both gossiped.
- censor: as proposer it lists only its own update (it proposes as soon as every update is here), so that
  median, trimmed mean, Krum or FedAvg of its block is its update and it takes every reward.
- sybil: signs join requests for fresh keys (validator and trainer seats) at full rate, to buy voting power
  and fill the request and member tables under open admission.

What it did is counted in its status file (counters byz_*). Its own gossip validator lets its own messages out.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import trio
from flnode.consensus import actions as act
from flnode.node.app.limits import param_spec, samples_cap
from flnode.node.daemon import Daemon
from flnode.node.driver import Driver
from flnode.node.net import peer_id_of
from flnode.node.proposer import Proposer
from flnode.node.router import Router
from flnode.node.trainer import Trainer
from flnode.protocol.crypto import NodeKey
from flnode.protocol.hashing import digest
from flnode.protocol.membership import MembershipTx, Role
from flnode.protocol.messages import (
    BlobRequest,
    Block,
    Message,
    Proposal,
    UpdateAnnouncement,
    UpdateBundle,
    Vote,
    encode_gossip,
)
from flnode.protocol.tensors import encode_tensors
from netutil import run_until_signal

log = logging.getLogger("flnode.byzantine")

ATTACKS = ("swap", "flood", "inflate", "withhold", "equivocate", "censor", "sybil")
SYBIL_KEYS = 48
MALICIOUS_DELTA = -50.0
INFLATED_SAMPLES = 1 << 40


class ByzantineDaemon(Daemon):
    def __init__(self, *args: Any, attacks: set[str], flood_rate: float = 200.0, flood_seconds: float = 12.0,
                 swap_proposals: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for service in (self.driver, self.proposer, self.trainer, self.router):
            if service is not None:
                service.node = self  # type: ignore[union-attr]
        unknown = attacks - set(ATTACKS)
        if unknown:
            raise ValueError(f"unknown attacks: {sorted(unknown)}")
        self.attacks = attacks
        self.flood_rate = flood_rate
        self.flood_seconds = flood_seconds
        # Each swapped body gets this node cut off for 10 s, which also silences its equivocating votes: swap a
        # few proposals, then let the equivocations through so the evidence and slashing can be checked too.
        self.swap_proposals = swap_proposals
        self._over_cap_sent = False
        self._swapped_proposals = 0
        self._own_out: set[bytes] = set()  # digests of what we publish: our own gossip validator lets it out
        self._own_blobs: set[bytes] = set()
        self._template: Proposal | None = None  # a real proposal of the current height, for flood blocks
        if "withhold" in attacks:
            honest_serve = self.blobs.serve

            async def serve(peer: str, request: bytes) -> bytes:
                req = BlobRequest.decode(request)
                if req.blob_hash in self._own_blobs and peer != self._proposer_peer():
                    self.metrics.inc("byz_withheld")
                    return b""
                return await honest_serve(peer, request)

            self.blobs.serve = serve  # type: ignore[method-assign]  # installed by run() as the blob handler

    # ---------------------------------------------------------------- helpers

    def _proposer_peer(self) -> str:
        height = self.state.height + 1
        return peer_id_of(self.machine.validators.proposer(height, self.view.consensus_round()))

    async def _publish_raw(self, topic: str, data: bytes) -> None:
        self._own_out.add(digest(data))
        if len(self._own_out) > 100_000:
            self._own_out.clear()
            self._own_out.add(digest(data))
        await self.net.publish(topic, data)
        # and down the direct validator streams, the path honest validators use for both (libp2p may not be up yet)
        round_ = self.view.consensus_round() if topic == self.topics.consensus else 0
        self.transport.broadcast(data, height=self.state.height + 1, round=round_)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        honest_run = super().run
        async with trio.open_nursery() as n:
            await n.start(honest_run)
            if "flood" in self.attacks:
                n.start_soon(self._flood_loop)
            if "sybil" in self.attacks:
                n.start_soon(self._sybil_loop)
            log.warning("byzantine member running", extra={"attacks": ",".join(sorted(self.attacks))})
            task_status.started()

    # ---------------------------------------------------------------- swap

    async def _after_message(self, msg: Message) -> None:
        if not isinstance(msg, Proposal) or msg.proposer == self.me:
            return
        if msg.height == self.state.height + 1:
            self._template = msg
        if "swap" in self.attacks:
            await self._swap(msg)

    async def _swap(self, p: Proposal) -> None:
        if self._swapped_proposals >= self.swap_proposals or self.state.height < 3 or (
                "inflate" in self.attacks and not self._over_cap_sent):
            return  # a swapped body cuts our direct links off for 10 s: first an over-cap update must have gone
            # out (honest validators take it from the direct links: their libp2p starts after the first commit)
        self._swapped_proposals += 1
        b = p.block
        if b.updates:
            variants = [b.updates[:-1], b.updates[1:], tuple(reversed(b.updates))]
        else:
            variants = []
        fake = UpdateAnnouncement(p.height, self.state.model_hash, digest(b"swap"), 100, 10, 0, 0, self.me)
        variants.append(tuple(b.updates) + (fake.signed(self.key, self.chain_id),))
        for ups in variants:
            if list(ups) == list(b.updates):
                continue
            swapped = Block(b.header, tuple(ups), b.evidence, b.last_commit)  # not via decode: body != header
            data = encode_gossip(replace(p, block=swapped))
            await self._publish_raw(self.topics.consensus, data)
            self.metrics.inc("byz_swapped")

    # ---------------------------------------------------------------- flood

    async def _flood_loop(self) -> None:
        """Signed proposals at flood_rate per second for flood_seconds: its own proposer slots of this height and
        the next (distinct blocks: time_ms varies), and rounds far ahead. The body of a real proposal is reused
        with a new header, so every one decodes and carries a valid signature."""
        while self.state.height < 1 or self._template is None:
            await trio.sleep(0.2)
        start = trio.current_time()
        t_end = start + self.flood_seconds
        sent = 0
        while trio.current_time() < t_end:
            due = int((trio.current_time() - start) * self.flood_rate) - sent
            if due <= 0:
                await trio.sleep(0.01)
                continue
            tmpl = self._template
            assert tmpl is not None
            height = self.state.height + 1
            base = self.view.consensus_round()
            vs = self.machine.validators
            own = [(h, r) for h in (height, height + 1) for r in range(0, base + 17)
                   if vs.proposer(h, r) == self.me] if self.me in vs.powers else []
            slots = own + [(height, base + 1000 + k) for k in range(4)]
            for k in range(min(due, 50)):
                h, r = slots[(sent + k) % len(slots)]
                header = replace(tmpl.block.header, height=h, proposer=self.me,
                                 time_ms=int(time.time() * 1000) + sent + k)
                block = Block(header, tmpl.block.updates, tmpl.block.evidence, tmpl.block.last_commit)
                prop = Proposal(h, r, -1, block, self.me).signed(self.key, self.chain_id)
                await self._publish_raw(self.topics.consensus, encode_gossip(prop))
            sent += min(due, 50)
            self.metrics.inc("byz_flooded", min(due, 50))
            await trio.sleep(0)
        log.warning("flood over", extra={"sent": sent, "seconds": round(trio.current_time() - start, 2)})

    # ---------------------------------------------------------------- sybil

    async def _sybil_loop(self) -> None:
        """Join requests for fresh keys, a few every height, validator seats first."""
        keys = [NodeKey(digest(b"sybil" + self.me + bytes([i]))) for i in range(SYBIL_KEYS)]
        cap = max(1, self.genesis.rules.max_samples_per_update)
        sent: set[int] = set()
        while len(sent) < len(keys):
            height = self.state.height
            for i, k in enumerate(keys):
                if i in sent or len(sent) >= (height + 1) * 8:
                    continue
                role = Role.VALIDATOR if i % 2 == 0 else Role.TRAINER
                tx = MembershipTx.join(k, self.chain_id, height, role, cap, f"sybil{i}", i)
                await self._publish_raw(self.topics.updates, encode_gossip(tx))
                self.members.add(tx)  # our own proposals carry them too
                sent.add(i)
                self.metrics.inc("byz_sybil_joins")
            await trio.sleep(0.5)

    # ---------------------------------------------------------------- inflate / withhold

    def malicious_blob(self) -> bytes:
        return encode_tensors({n: np.full(s, MALICIOUS_DELTA, np.float32) for n, s in param_spec(self.genesis)})


class ByzantineRouter(Router):
    node: ByzantineDaemon

    def validate_gossip(self, topic: str, data: bytes, peer: str | None = None) -> bool:
        """Our own gossip validator lets our own messages out."""
        if digest(data) in self.node._own_out:
            return True
        return super().validate_gossip(topic, data, peer)

    async def on_message(self, msg: Message, from_peer: str | None) -> None:
        """swap: a proposal of another proposer is re-published with a swapped body."""
        await super().on_message(msg, from_peer)
        await self.node._after_message(msg)


class ByzantineDriver(Driver):
    node: ByzantineDaemon

    async def perform(self, actions: list[Any]) -> None:
        """equivocate: every vote it casts is followed by a conflicting twin."""
        await super().perform(actions)
        node = self.node
        if "equivocate" not in node.attacks:
            return
        for a in actions:
            if isinstance(a, act.Broadcast) and isinstance(a.message, Vote) and a.message.validator == node.me:
                v = a.message
                other = None if v.block_hash is not None else digest(b"byzantine" + v.sign_payload())
                twin = replace(v, block_hash=other, signature=b"").signed(node.key, node.chain_id)
                await node._publish_raw(node.topics.consensus, encode_gossip(twin))
                node.metrics.inc("byz_equivocations")


class ByzantineProposer(Proposer):
    node: ByzantineDaemon

    async def ready_updates(self, height: int) -> list[tuple[UpdateAnnouncement, Any]]:
        """censor: as proposer it lists only its own update."""
        ready = await super().ready_updates(height)
        if "censor" not in self.node.attacks:
            return ready
        own = [(a, b) for a, b in ready if a.author == self.node.me]
        if len(own) < len(ready):
            self.node.metrics.inc("byz_censored")
        return own


class ByzantineTrainer(Trainer):
    node: ByzantineDaemon

    async def run(self) -> None:
        node = self.node
        with trio.move_on_after(10):  # a first update published before the links are up reaches no one
            while len(node.transport.connected()) < len(node.genesis.validators) - 1:
                await trio.sleep(0.1)
        await trio.sleep(0.5)
        await super().run()

    async def publish(self, height: int, ann: UpdateAnnouncement, blob: bytes, loss: float) -> None:
        node = self.node
        if "inflate" in node.attacks:
            # 2^40 samples, refused at admission, until one went out in step with the others; then odd heights
            # only, and even heights the cap, so only the norm bound stands in the way. An at-cap update is
            # penalised and gets us excluded, after which refusals count as "excluded", never as over the cap.
            blob = node.malicious_blob()
            over = height % 2 == 1 or not node._over_cap_sent
            samples = INFLATED_SAMPLES if over else samples_cap(node.genesis, node.me)
            node._over_cap_sent = node._over_cap_sent or (  # sent while in step with the others: not stale
                over and bool(node.transport.connected()) and node.sync.ahead_of_us[0] <= node.state.height)
            ann = replace(ann, blob_hash=digest(blob), blob_size=len(blob), num_samples=samples,
                          signature=b"").signed(node.key, node.chain_id)
            node.metrics.inc("byz_inflated")
        node._own_blobs.add(ann.blob_hash)
        await node.blobs.put(ann.blob_hash, blob)
        if node.gate.admit(node.topics.updates, encode_gossip(ann), None) is not None:
            node.mempool.add_update(ann)  # an update our own proposals may carry
        withhold = "withhold" in node.attacks
        out = ann if withhold or len(blob) > UpdateBundle.INLINE_MAX else UpdateBundle(ann, blob)
        log.info("published update", extra={"height": height, "samples": ann.num_samples, "inline": not withhold})
        await node._publish_raw(node.topics.updates, encode_gossip(out))


ByzantineDaemon.driver_class = ByzantineDriver
ByzantineDaemon.router_class = ByzantineRouter
ByzantineDaemon.proposer_class = ByzantineProposer
ByzantineDaemon.trainer_class = ByzantineTrainer


def main(argv: list[str] | None = None) -> int:
    from flnode.node.chain.store import ChainStore
    from flnode.node.config import home_paths, load_config
    from flnode.node.logs import setup_logging
    from flnode.protocol.crypto import NodeKey
    from flnode.protocol.genesis import Genesis

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--flood-rate", type=float, default=200.0, help="flood proposals per second")
    ap.add_argument("--flood-seconds", type=float, default=12.0)
    ap.add_argument("--swap-proposals", type=int, default=1, help="how many proposals to swap bodies of")
    ap.add_argument("--log-format", default="json")
    args = ap.parse_args(argv)
    attacks = {a.strip() for a in args.attacks.split(",") if a.strip()}
    home = args.home.expanduser()
    cfg = load_config(home, {}, os.environ).config
    paths = home_paths(home, cfg)
    setup_logging(cfg.log_level, args.log_format)
    genesis = Genesis.load(paths.genesis)
    key = NodeKey.load(paths.node_key)
    store = ChainStore.open(paths.chain_db, genesis_hash=genesis.hash())
    try:
        daemon = ByzantineDaemon(genesis, key, cfg, store, status_path=paths.status, data_file=paths.data_file,
                                 attacks=attacks, flood_rate=args.flood_rate, flood_seconds=args.flood_seconds,
                                 swap_proposals=args.swap_proposals)
        run_until_signal(daemon)
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
