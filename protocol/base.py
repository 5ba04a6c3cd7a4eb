"""The base of every wire message (encode, decode, hash) and the height bound all of them share."""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar

from .encoding import pack_trusted, unpack
from .hashing import digest

MAX_HEIGHT = (1 << 62)

T = TypeVar("T", bound="Message")


class Message:
    MAX_SIZE: ClassVar[int] = 4096
    KIND: ClassVar[str] = "message"

    def to_list(self) -> list[Any]:
        raise NotImplementedError

    @classmethod
    def from_list(cls: type[T], value: Any) -> T:
        raise NotImplementedError

    def encode(self) -> bytes:
        return pack_trusted(self.to_list())

    @classmethod
    def decode(cls: type[T], data: bytes) -> T:
        return cls.from_list(unpack(data, max_size=cls.MAX_SIZE))

    def hash(self) -> bytes:
        """Cached: a message is frozen, and pools sort and index by this on every arrival."""
        h: bytes | None = self.__dict__.get("_hash_cache")
        if h is None:
            h = digest(self.encode())
            self.__dict__["_hash_cache"] = h  # beside the dataclass fields: not compared, not encoded
        return h
