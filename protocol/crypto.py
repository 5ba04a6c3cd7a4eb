"""Ed25519 identities and domain-separated signatures.

A signature covers `flnode/v1 | chain id | message kind | canonical bytes`, so it can be replayed neither on
another chain nor as another kind of message. The 32-byte seed also seeds the libp2p identity, so a
validator's address and its peer ID are one key.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from .errors import DecodeError, SignatureError

PUBKEY_LEN = 32
SIGNATURE_LEN = 64
_PREFIX = b"flnode/v1"


def signing_bytes(chain_id: str, kind: str, payload: bytes) -> bytes:
    cid = chain_id.encode()
    k = kind.encode()
    # Length prefixes keep (chain, kind, payload) unambiguous.
    return b"".join(
        [_PREFIX, len(cid).to_bytes(2, "big"), cid, len(k).to_bytes(2, "big"), k, payload]
    )


@dataclass(frozen=True)
class NodeKey:
    seed: bytes

    def __post_init__(self) -> None:
        if len(self.seed) != 32:
            raise ValueError("an Ed25519 seed is 32 bytes")

    @classmethod
    def generate(cls) -> NodeKey:
        return cls(bytes(SigningKey.generate()))

    @property
    def _sk(self) -> SigningKey:
        return SigningKey(self.seed)

    @property
    def public_key(self) -> bytes:
        return bytes(self._sk.verify_key)

    def sign(self, chain_id: str, kind: str, payload: bytes) -> bytes:
        return self._sk.sign(signing_bytes(chain_id, kind, payload)).signature

    def save(self, path: Path) -> None:
        """Write the key file with 0600 permissions from the first byte."""
        path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"type": "ed25519", "seed": self.seed.hex(), "public_key": self.public_key.hex()})
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(body + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(path, 0o600)

    @classmethod
    def load(cls, path: Path) -> NodeKey:
        try:
            data = json.loads(Path(path).read_text())
            key = cls(bytes.fromhex(data["seed"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DecodeError(f"cannot read node key {path}: {exc}") from None
        if "public_key" in data and data["public_key"] != key.public_key.hex():
            raise DecodeError(f"node key {path}: public key does not match the seed")
        return key


# Verification is the hot path of gossip; cache VerifyKey objects per public key.
_verify_keys: dict[bytes, VerifyKey] = {}


def verify(public_key: bytes, chain_id: str, kind: str, payload: bytes, signature: bytes) -> bool:
    if len(public_key) != PUBKEY_LEN or len(signature) != SIGNATURE_LEN:
        return False
    vk = _verify_keys.get(public_key)
    if vk is None:
        try:
            vk = VerifyKey(public_key)
        except Exception:
            return False
        if len(_verify_keys) < 4096:
            _verify_keys[public_key] = vk
    try:
        vk.verify(signing_bytes(chain_id, kind, payload), signature)
    except (BadSignatureError, ValueError, TypeError):
        return False
    return True


def require_valid(public_key: bytes, chain_id: str, kind: str, payload: bytes, signature: bytes) -> None:
    if not verify(public_key, chain_id, kind, payload, signature):
        raise SignatureError(f"bad {kind} signature from {public_key.hex()[:12]}")
