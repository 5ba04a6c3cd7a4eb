from flnode.protocol.crypto import NodeKey
from flnode.protocol.messages import Vote, VoteType


def test_vote_roundtrip_and_signature() -> None:
    k = NodeKey.generate()
    v = Vote(VoteType.PREVOTE, 1, 0, b"a" * 32, k.public_key).signed(k, "chain")
    assert Vote.decode(v.encode()) == v
    assert v.verify("chain")
    assert not v.verify("other-chain")
