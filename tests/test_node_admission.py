"""The node's defences against a Byzantine member or relayer, in process: a block body bound to its header, the
admission gate (right proposer, round window, one update per author, proposal floods, per-peer budgets,
byte-bounded cache), the proposer's collection wait on trio's clock, and no wall-clock value in a trio deadline."""

from __future__ import annotations

import ast
import os
from dataclasses import replace
from pathlib import Path

import pytest
import trio
from flnode.cli.node_cmd import _task_and_rules, create_testnet
from flnode.consensus import ValidatorSet
from flnode.node.admission import ROUND_WINDOW, AdmissionGate, ByteLRU, PeerBudget
from flnode.node.app import genesis_state, make_update, participant_data
from flnode.node.app.blocks import build_block
from flnode.node.chain.store import ChainStore
from flnode.node.config import home_paths, load_config
from flnode.node.daemon import Daemon
from flnode.node.metrics import Metrics
from flnode.protocol.crypto import NodeKey
from flnode.protocol.errors import DecodeError
from flnode.protocol.genesis import Genesis
from flnode.protocol.hashing import digest
from flnode.protocol.messages import (
    Block,
    BlockResponse,
    CommitCertificate,
    Proposal,
    UpdateAnnouncement,
    UpdateBundle,
    Vote,
    VoteType,
    decode_gossip,
    encode_gossip,
)
from flnode.protocol.topics import Topics

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Genesis, list[NodeKey]]:
    d = tmp_path_factory.mktemp("testnet")
    create_testnet(
        d, 4, chain_id="adm-test", host="127.0.0.1", listen_host="127.0.0.1", ports=[1, 2, 3, 4],
        task_rules=_task_and_rules("logreg", "digits", "iid", 0.5, "fedavg", 0, 100.0, 1, 0.1, 600), force=True,
    )
    genesis = Genesis.load(d / "node0" / "genesis.json")
    keys = [NodeKey.load(home_paths(d / f"node{i}", load_config(d / f"node{i}", {}, {}).config).node_key)
            for i in range(4)]
    by_pub = {k.public_key: k for k in keys}
    return d, genesis, [by_pub[v.key_bytes] for v in genesis.validators]


def _updates(genesis: Genesis, keys: list[NodeKey]) -> list[tuple[UpdateAnnouncement, bytes]]:
    state = genesis_state(genesis)
    out = []
    for i, k in enumerate(keys):
        data = participant_data(genesis.task, len(keys), i, None)
        ann, blob, _ = make_update(genesis, k, state, data, i)
        out.append((ann, blob))
    return out


def _proposal(genesis: Genesis, keys: list[NodeKey], candidates: list[tuple[UpdateAnnouncement, bytes]],
              height: int = 1, round_: int = 0) -> Proposal:
    vs = ValidatorSet(genesis.powers)
    proposer = next(k for k in keys if k.public_key == vs.proposer(height, round_))
    state = genesis_state(genesis)
    block, _, _ = build_block(
        genesis, state, prev_block_hash=digest(genesis.canonical_bytes()), last_commit=None,
        proposer=proposer.public_key, time_ms=0, candidates=candidates,
    )
    return Proposal(height, round_, -1, block, proposer.public_key).signed(proposer, genesis.chain_id)


# ------------------------------------------------------------------ defect 1: body bound to header


def test_swapped_body_under_a_valid_proposal_signature_does_not_decode(net: tuple[Path, Genesis, list[NodeKey]]) -> None:
    _, genesis, keys = net
    ups = _updates(genesis, keys)
    real = _proposal(genesis, keys, ups)
    assert decode_gossip(encode_gossip(real)) == real
    # A relayer keeps the signed header and swaps the body: drops an update, or replaces the list.
    for body in (real.block.updates[:-1], (), tuple(reversed(real.block.updates))):
        swapped = replace(real, block=replace(real.block, updates=body))
        assert swapped.verify(genesis.chain_id)  # the signature covers only the header hash
        with pytest.raises(DecodeError, match="not match the header"):
            decode_gossip(encode_gossip(swapped))
    # Same for block sync: a certified header with a fake body is refused at decode.
    fake = replace(real.block, updates=real.block.updates[:1])
    cert = CommitCertificate(1, 0, real.block.hash(), ())
    with pytest.raises(DecodeError):
        BlockResponse.decode(BlockResponse(((fake, cert),)).encode())
    with pytest.raises(DecodeError):
        Block.decode(fake.encode())


# ------------------------------------------------------------------ defect 6: admission


class View:
    def __init__(self, genesis: Genesis) -> None:
        self.genesis = genesis
        self.vs = ValidatorSet(genesis.powers)
        self.height = 1
        self.round = 0

    def next_height(self) -> int:
        return self.height

    def consensus_round(self) -> int:
        return self.round

    def validator_set(self, height: int) -> ValidatorSet | None:
        return self.vs

    def announcement_problem(self, ann: UpdateAnnouncement) -> str | None:
        if ann.author not in self.genesis.powers:
            return "not_participant"
        if ann.height == self.height and not ann.verify(self.genesis.chain_id):
            return "bad_signature"
        return None


def _gate(genesis: Genesis, clock: list[float], **kw: object) -> tuple[AdmissionGate, Metrics]:
    t = Topics.for_chain(genesis.chain_id)
    m = Metrics()
    gate = AdmissionGate(
        genesis.chain_id, t.consensus, t.updates, View(genesis), m, lambda: clock[0],
        max_bytes={t.consensus: 2 << 20, t.updates: 1 << 20}, **kw,  # type: ignore[arg-type]
    )
    return gate, m


def test_gate_admits_only_the_proposer_of_the_round_within_the_window(net: tuple[Path, Genesis, list[NodeKey]]) -> None:
    _, genesis, keys = net
    gate, m = _gate(genesis, [0.0])
    topic = Topics.for_chain(genesis.chain_id).consensus
    good = _proposal(genesis, keys, [])
    assert gate.admit(topic, encode_gossip(good), "peerA") == good
    # validly signed by a member that is not the proposer of (1, 0)
    other = next(k for k in keys if k.public_key != good.proposer)
    wrong = replace(good, proposer=other.public_key).signed(other, genesis.chain_id)
    assert gate.admit(topic, encode_gossip(wrong), "peerA") is None
    assert m.counters["rejected_wrong_proposer"] == 1
    # the right proposer for a round far ahead
    far = ROUND_WINDOW + 5
    vs = ValidatorSet(genesis.powers)
    pk = next(k for k in keys if k.public_key == vs.proposer(1, far))
    blk = good.block
    ahead = Proposal(1, far, -1, blk, pk.public_key).signed(pk, genesis.chain_id)
    assert gate.admit(topic, encode_gossip(ahead), "peerA") is None
    assert m.counters["rejected_round_too_far"] == 1


def test_gate_refuses_a_proposal_flood_and_a_second_update(net: tuple[Path, Genesis, list[NodeKey]]) -> None:
    _, genesis, keys = net
    gate, m = _gate(genesis, [0.0])
    t = Topics.for_chain(genesis.chain_id)
    base = _proposal(genesis, keys, [])
    proposer = next(k for k in keys if k.public_key == base.proposer)
    admitted = 0
    for i in range(20):  # distinct blocks for one (height, round), each validly signed by the right proposer
        blk = replace(base.block, header=replace(base.block.header, time_ms=i + 1))
        p = Proposal(1, 0, -1, blk, proposer.public_key).signed(proposer, genesis.chain_id)
        admitted += gate.admit(t.consensus, encode_gossip(p), "peerA") is not None
    assert admitted == 2  # the second is equivocation evidence; the rest is a flood
    assert m.counters["rejected_proposal_flood"] == 18
    ups = _updates(genesis, keys)
    ann, blob = ups[0]
    assert gate.admit(t.updates, encode_gossip(UpdateBundle(ann, blob)), "peerA") is not None
    assert gate.admit(t.updates, encode_gossip(ann), "peerB") is not None  # the same update, other form
    second = replace(ann, num_samples=ann.num_samples + 1).signed(keys[0], genesis.chain_id)
    assert gate.admit(t.updates, encode_gossip(second), "peerA") is None
    assert m.counters["rejected_second_update"] == 1


def test_gate_per_peer_budget_and_byte_bounded_cache(net: tuple[Path, Genesis, list[NodeKey]]) -> None:
    _, genesis, keys = net
    clock = [100.0]
    gate, m = _gate(genesis, clock, budget=PeerBudget(msgs_per_s=10, bytes_per_s=1 << 20, burst_s=1.0),
                    cache_bytes=4096)
    t = Topics.for_chain(genesis.chain_id)
    junk = [os.urandom(50) for _ in range(30)]
    for j in junk:
        gate.admit(t.consensus, j, "flooder")
    assert m.counters["rejected_peer_budget"] == 20  # burst of 10, then nothing until time passes
    assert m.counters["rejected_malformed"] == 10
    assert gate.admit(t.consensus, junk[0], "honest") is None and m.counters["rejected_malformed"] == 11
    clock[0] += 1.0
    gate.admit(t.consensus, junk[1], "flooder")
    assert m.counters["rejected_malformed"] == 12  # refilled
    lru = ByteLRU(1000)
    for i in range(100):
        lru.put(bytes([i]) * 32, None, 100)  # type: ignore[arg-type]
    assert lru.bytes <= 1000 and len(lru) == 10


# ------------------------------------------------------------------ the proposer's clock


async def test_proposer_waits_on_trios_clock_without_spinning(net: tuple[Path, Genesis, list[NodeKey]]) -> None:
    d, genesis, keys = net
    home = d / "node0"
    cfg = load_config(home, {}, {}).config
    key = NodeKey.load(home_paths(home, cfg).node_key)
    store = ChainStore.open(d / "spin.sqlite", genesis_hash=genesis.hash())
    daemon = Daemon(genesis, key, cfg, store)
    sent: list[object] = []

    async def drain() -> None:
        async for ev in daemon.driver.events:
            sent.append(ev)

    async with trio.open_nursery() as n:
        n.start_soon(drain)
        t0 = trio.current_time()
        daemon.timing.begin(t0, False)
        await daemon.proposer.propose(1, 0)  # no update ever arrives: waits the collection timeout, then proposes
        elapsed = trio.current_time() - t0
        n.cancel_scope.cancel()
    store.close()
    assert 0.5 <= elapsed < 3.0, elapsed
    assert daemon.proposer.collect_passes <= 3, daemon.proposer.collect_passes  # woken only by arrivals or the deadline
    assert len(sent) == 1


DEADLINE_CALLS = {"move_on_at", "fail_at", "sleep_until"}
WALL_CLOCKS = {"monotonic", "time", "perf_counter", "monotonic_ns", "time_ns"}


def _uses_wall_clock(node: ast.AST, tainted: set[str]) -> bool:
    """Whether an expression's value comes from a wall clock: time.<clock>() itself, arithmetic on it, or a name
    or attribute assigned from one (results of other calls are not followed)."""
    if isinstance(node, ast.Call):
        f = node.func
        if isinstance(f, ast.Attribute) and f.attr in WALL_CLOCKS and isinstance(f.value, ast.Name) and f.value.id == "time":
            return True
        return isinstance(f, ast.Name) and f.id in {"min", "max"} and any(_uses_wall_clock(a, tainted) for a in node.args)
    if isinstance(node, ast.Name):
        return node.id in tainted
    if isinstance(node, ast.Attribute):
        return node.attr in tainted
    if isinstance(node, ast.BinOp):
        return _uses_wall_clock(node.left, tainted) or _uses_wall_clock(node.right, tainted)
    if isinstance(node, ast.UnaryOp):
        return _uses_wall_clock(node.operand, tainted)
    if isinstance(node, ast.IfExp):
        return _uses_wall_clock(node.body, tainted) or _uses_wall_clock(node.orelse, tainted)
    return False


def test_no_wall_clock_value_reaches_a_trio_deadline() -> None:
    """trio deadlines are on trio.current_time(); a time.monotonic() value there fires at once (or never)."""
    offenders = []
    for folder in ("node", "cli", "consensus", "protocol"):
        for path in (ROOT / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            tainted: set[str] = set()
            while True:  # names and attributes assigned from a wall clock (or from those), to a fixed point
                before = len(tainted)
                for sub in ast.walk(tree):
                    if isinstance(sub, ast.Assign) and _uses_wall_clock(sub.value, tainted):
                        for tgt in sub.targets:
                            for n in ast.walk(tgt):
                                if isinstance(n, ast.Name):
                                    tainted.add(n.id)
                                elif isinstance(n, ast.Attribute):
                                    tainted.add(n.attr)
                if len(tainted) == before:
                    break
            for sub in ast.walk(tree):
                if not isinstance(sub, ast.Call):
                    continue
                name = sub.func.attr if isinstance(sub.func, ast.Attribute) else getattr(sub.func, "id", "")
                args = list(sub.args)
                if name == "CancelScope":
                    args = [k.value for k in sub.keywords if k.arg == "deadline"]
                elif name not in DEADLINE_CALLS:
                    continue
                if any(_uses_wall_clock(a, tainted) for a in args):
                    offenders.append(f"{path.relative_to(ROOT)}:{sub.lineno}")
    assert not offenders, f"wall-clock values used as trio deadlines: {offenders}"


def test_gate_tells_a_message_too_far_ahead_from_a_stale_one(net: tuple[Path, Genesis, list[NodeKey]]) -> None:
    """Both are refused, under different reasons: one too far ahead shows the sender is past us (the router starts a
    sync on it), a stale one shows nothing."""
    _, genesis, keys = net
    gate, m = _gate(genesis, [0.0])
    gate.view.height = 5  # type: ignore[attr-defined]
    topic = Topics.for_chain(genesis.chain_id).consensus
    k = keys[0]
    for h, reason in ((7, "ahead_height"), (3, "stale_height")):
        v = Vote(VoteType.PREVOTE, h, 0, None, k.public_key).signed(k, genesis.chain_id)
        assert gate.admit(topic, encode_gossip(v), "peerA") is None
        assert gate.last_reason == reason and m.counters[f"rejected_{reason}"] == 1
    for h in (4, 5, 6):  # the window: the last height, ours, the next
        v = Vote(VoteType.PREVOTE, h, 0, None, k.public_key).signed(k, genesis.chain_id)
        assert gate.admit(topic, encode_gossip(v), "peerA") == v


def test_gate_keeps_updates_two_heights_past_the_next(net: tuple[Path, Genesis, list[NodeKey]]) -> None:
    """A node two heights behind still admits the updates of the height its sync brings it to (the pool's window);
    one height further is too far ahead."""
    _, genesis, keys = net
    gate, m = _gate(genesis, [0.0])
    topic = Topics.for_chain(genesis.chain_id).updates
    ann, _ = _updates(genesis, keys)[0]
    k = next(k for k in keys if k.public_key == ann.author)
    for h, ok in ((1, True), (2, True), (3, True), (4, False)):  # the gate's view is at height 1
        a = replace(ann, height=h).signed(k, genesis.chain_id)
        assert (gate.admit(topic, encode_gossip(a), "peerA") == a) is ok, h
    assert gate.last_reason == "ahead_height" and m.counters["rejected_ahead_height"] == 1


def test_an_update_too_far_ahead_is_kept_and_admitted_once_its_height_is_near(
        net: tuple[Path, Genesis, list[NodeKey]]) -> None:
    """A validator link sends each frame once: an update refused as too far ahead (its receiver was syncing) is
    kept, and after the commits that bring its height within the gate's window it goes through the gate."""
    from flnode.node.admission import UPDATES_AHEAD
    from flnode.node.early_updates import EarlyUpdates

    _, genesis, keys = net
    gate, _ = _gate(genesis, [0.0])
    ann, _ = _updates(genesis, keys)[0]
    k = next(k for k in keys if k.public_key == ann.author)
    early = EarlyUpdates()
    late = encode_gossip(replace(ann, height=5).signed(k, genesis.chain_id))
    assert gate.admit(None, late, "peerA") is None and gate.last_reason == "ahead_height"
    refused = gate.last_refused
    assert isinstance(refused, UpdateAnnouncement) and refused.height == 5
    assert early.park("peerA", refused.height, late, gate.view.next_height())
    assert not early.park("peerA", refused.height, late, 1)  # kept once
    assert early.due(1, UPDATES_AHEAD) == []  # height 5 is still past 1 + 2
    view = gate.view
    assert isinstance(view, View)
    view.height = 3  # two commits later
    assert early.due(3, UPDATES_AHEAD) == [("peerA", late)] and len(early) == 0
    assert gate.admit(None, late, "peerA") == refused


def test_kept_early_updates_are_bounded_per_sender_in_bytes_and_in_reach() -> None:
    from flnode.node.early_updates import EarlyUpdates

    early = EarlyUpdates(max_ahead=4, max_per_peer=2, max_bytes=100)
    assert not early.park("a", 1, b"x" * 10, 1)  # the next height itself is the gate's, not early
    assert not early.park("a", 6, b"x" * 10, 1)  # past the reach: a sync brings those blocks
    assert early.park("a", 2, b"a1" * 5, 1) and early.park("a", 3, b"a2" * 5, 1)
    assert not early.park("a", 4, b"a3" * 5, 1) and early.dropped == 1  # a sender's share is full
    assert early.park("b", 4, b"b" * 60, 1) and early.nbytes == 80
    assert early.park("c", 5, b"c" * 30, 1)  # over 100 bytes: the oldest (a1) goes
    assert early.nbytes == 100 and len(early) == 3
    assert early.due(4, 1) == [("b", b"b" * 60), ("c", b"c" * 30)] and early.nbytes == 0  # a2's height passed
    early.park("d", 9, b"d", 5)
    assert early.due(10, 2) == [] and len(early) == 0  # a height already passed is forgotten
