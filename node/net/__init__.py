"""The libp2p adapter: gossip topics with validators, framed request/response streams, reconnects."""

from .host import InboundMessage, NetError, P2PNode, peer_id_of, read_frame, write_frame

__all__ = ["InboundMessage", "NetError", "P2PNode", "peer_id_of", "read_frame", "write_frame"]
