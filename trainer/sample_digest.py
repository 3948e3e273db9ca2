"""An order-independent digest of a multiset of sample keys (trainer/exactly_once.py checks epochs with it).

(count, sum of h(key) mod 2^64, XOR of h(key)), h = the first 8 bytes of sha256 of the key
(common.io.stable_hash). Digests of parts (data workers, ranks, the halves of a resumed epoch) add
up to the digest of the whole, in any order. A missing, repeated or foreign sample changes the sum;
a repeat that hides a missing sample (same count) would need two 64-bit hashes to collide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from common.io import stable_hash

_MASK = (1 << 64) - 1


@dataclass
class SampleDigest:
    """Order-independent digest of a multiset of sample keys (see the module doc)."""

    count: int = 0
    sum: int = 0
    xor: int = 0

    @classmethod
    def of(cls, keys: Iterable[str]) -> "SampleDigest":
        d = cls()
        for key in keys:
            d.add(key)
        return d

    def add(self, key: str) -> None:
        h = stable_hash(key)
        self.count += 1
        self.sum = (self.sum + h) & _MASK
        self.xor ^= h

    def __add__(self, other: "SampleDigest") -> "SampleDigest":
        return SampleDigest(self.count + other.count, (self.sum + other.sum) & _MASK, self.xor ^ other.xor)

    @property
    def hex(self) -> str:
        return f"{self.sum:016x}{self.xor:016x}"

    def as_dict(self) -> dict:
        return {"count": self.count, "digest": self.hex}

    @classmethod
    def from_dict(cls, d: dict) -> "SampleDigest":
        h = d["digest"]
        return cls(int(d["count"]), int(h[:16], 16), int(h[16:], 16))


def combine(parts: Iterable[SampleDigest]) -> SampleDigest:
    total = SampleDigest()
    for p in parts:
        total = total + p
    return total
