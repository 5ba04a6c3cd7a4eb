"""The libp2p adapter: gossip topics with validators, framed request/response streams, reconnects, and
direct long-lived consensus streams between validators."""

from .consensus_stream import CONSENSUS_PROTOCOL, ConsensusTransport
from .frames import NetError, Stream, StreamedResponse, encode_frames, read_frame, write_frame
from .host import InboundMessage, P2PNode, peer_id_of
from .quorum import has_quorum

__all__ = [
    "CONSENSUS_PROTOCOL",
    "ConsensusTransport",
    "InboundMessage",
    "NetError",
    "P2PNode",
    "Stream",
    "StreamedResponse",
    "encode_frames",
    "has_quorum",
    "peer_id_of",
    "read_frame",
    "write_frame",
]
