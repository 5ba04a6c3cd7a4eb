"""Who the validators are on the network, and what each has shown it has seen (a light form of CometBFT's peer
round state): the height it reached, and the polka behind its latest precommit for a block."""

from __future__ import annotations

from collections.abc import Callable

from flnode.consensus import ValidatorSet
from flnode.node.net import peer_id_of
from flnode.protocol.genesis import Genesis
from flnode.protocol.messages import Message, Proposal, Vote, VoteType

from .head import Head


class Peers:
    def __init__(self, genesis: Genesis, head: Head) -> None:
        self.genesis, self.head = genesis, head
        self.validator_peers = {peer_id_of(v.key_bytes): v.key_bytes for v in genesis.validators}  # peer -> key
        self.peer_of = {k: p for p, k in self.validator_peers.items()}  # validator key -> peer id
        self._member_peers: tuple[object, set[str]] = (None, set())  # (membership it was made of, their peer ids)
        self._peer_ids: dict[bytes, str] = {}
        self._height: dict[str, int] = {}
        self._polka: dict[str, tuple[int, int, bytes | None]] = {}

    def follow(self, vs: ValidatorSet, following: ValidatorSet | None) -> bool:
        """Open membership: the peers to link with are the validators of the next two heights, and genesis
        validators until they leave (a slashed one stays a peer). True if that changed."""
        state = self.head.state
        ended = state.membership.ended
        keys = [v.key_bytes for v in self.genesis.validators if ended.get(v.key_bytes, 1 << 62) > state.height + 1]
        keys += [*vs.powers, *(following.powers if following is not None else ())]
        peers = {peer_id_of(k): k for k in keys}
        if peers == self.validator_peers:
            return False
        self.validator_peers = peers
        self.peer_of = {k: p for p, k in peers.items()}
        return True

    def is_member_peer(self, peer: str) -> bool:
        """A genesis validator or a current member: first claim on the consensus listener slots."""
        ms = self.head.state.membership
        if self._member_peers[0] is not ms:  # recomputed only when a block changed the membership
            keys = [v.key_bytes for v in self.genesis.validators] + [k for k in ms.members if k not in ms.ended]
            known = self._peer_ids
            self._peer_ids = {k: known.get(k) or peer_id_of(k) for k in keys}
            self._member_peers = (ms, set(self._peer_ids.values()))
        return peer in self._member_peers[1]

    def note(self, msg: Message) -> None:
        """What a validator's own signed message proves it has seen."""
        who = msg.validator if isinstance(msg, Vote) else msg.proposer if isinstance(msg, Proposal) else None
        peer = self.peer_of.get(who) if who is not None else None
        if peer is None:
            return
        assert isinstance(msg, Vote | Proposal)
        if msg.height > self._height.get(peer, 0):
            self._height[peer] = msg.height
        if isinstance(msg, Vote) and msg.type == VoteType.PRECOMMIT and msg.block_hash is not None:
            self._polka[peer] = (msg.height, msg.round, msg.block_hash)

    def already_has(self, vote: Vote) -> Callable[[str], bool]:
        """For a relayed vote, the peers that need it no more: its signer, a peer at a later height (it decided),
        and, for a prevote, a peer whose precommit for that block in that round shows it saw that polka. A peer
        merely at a later round is not skipped: it may need the polka to accept a re-proposal (L28)."""
        signer = self.peer_of.get(vote.validator)
        polka = (vote.height, vote.round, vote.block_hash) if vote.type == VoteType.PREVOTE else None

        def has_it(peer: str) -> bool:
            return (peer == signer or self._height.get(peer, 0) > vote.height
                    or (polka is not None and self._polka.get(peer) == polka))

        return has_it
