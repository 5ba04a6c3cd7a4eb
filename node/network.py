"""The node's two networks, built together: the libp2p host (peer discovery, gossip for non-validators, requests)
and the consensus transport over it (one long-lived link per validator pair, direct where both sides have one)."""

from __future__ import annotations

from collections.abc import Callable

from flnode.node.config import NodeConfig, parse_direct_peer
from flnode.node.net import ConsensusTransport, P2PNode
from flnode.node.net.directory import DirectConfig
from flnode.protocol.crypto import NodeKey
from flnode.protocol.topics import Topics

from .peers import Peers


def direct_config(config: NodeConfig, key: NodeKey, chain_id: str) -> DirectConfig | None:
    """The direct links' listener (None: none configured); it listens on the IP of the first TCP listen address
    (docs/LIBP2P.md)."""
    if config.direct_port < 0:
        return None
    for addr in config.listen:
        parts = addr.split("/")
        if len(parts) > 4 and parts[1] in ("ip4", "ip6") and parts[3] == "tcp":
            return DirectConfig(key, chain_id, parts[2], config.direct_port)
    return None


def open_network(config: NodeConfig, key: NodeKey, chain_id: str, topics: Topics, peers: Peers, *, voting: bool,
                 validate_gossip: Callable[[str, bytes, str | None], bool],
                 on_connect: Callable[[str], None]) -> tuple[P2PNode, ConsensusTransport]:
    """`validate_gossip(topic, data, forwarder)` judges each gossip message; `on_connect(peer)` runs when a
    validator's link comes up (what was sent before never reached it)."""
    net = P2PNode(
        key.seed, list(config.listen), bootstrap=list(config.bootstrap),
        # Validators exchange consensus messages and their own update announcements over their links; gossip
        # carries only announcements from and to non-validators (trainers, observers).
        topics=[topics.updates], validator=validate_gossip,
        announce=list(config.announce) or None, max_peers=config.p2p_max_peers,
    )
    # A non-validator listens to every validator. A link delivers in order while it lives, so the same bytes are
    # never sent twice on one (a reconnect starts afresh and the machine's rebroadcast re-sends what matters).
    transport = ConsensusTransport(
        net, peers.validator_peers, dial_all=not voting, resend_after=float("inf"),
        direct=direct_config(config, key, chain_id), is_member=peers.is_member_peer,
    )
    transport.on_connect = on_connect
    transport.directory.configure([parse_direct_peer(e) for e in config.direct_peers], net.peer_id)
    return net, transport
