"""One error family for everything a peer or a file can get wrong.

Split by blame, as h11 does: ProtocolError means the input was bad (log, count, drop);
anything else escaping a decoder is our bug.
"""


class ProtocolError(Exception):
    """Base of every rejection of outside input."""

    reason: str = "protocol"


class DecodeError(ProtocolError):
    reason = "malformed"


class OversizeError(ProtocolError):
    reason = "oversize"


class SignatureError(ProtocolError):
    reason = "bad_signature"


class ValidationError(ProtocolError):
    reason = "invalid"


class GenesisError(ProtocolError):
    reason = "bad_genesis"
