"""The Merkle log's arithmetic: RFC 6962 hashing, tree heads, inclusion and consistency proofs.

Pure and storage-agnostic. A log of ``size`` leaves is the Merkle Tree Hash (MTH) of RFC 6962
§2.1 over the leaf data in arrival order, with the domain-separated hashes

    leaf_hash(d)   = SHA-256(0x00 || d)
    node_hash(l,r) = SHA-256(0x01 || l || r)

A store keeps every *complete* subtree, addressed as ``(level, index)``: the MTH of leaves
``[index·2^level, (index+1)·2^level)``; level 0 are the leaf hashes. :class:`Frontier` says
which nodes an append completes (one per leaf, amortised), and every hash a proof or a tree
head needs is a handful of such nodes (:func:`nodes_for`), fetched in one query.

Proofs are lists of hashes in the order of RFC 6962 §2.1.1 (PATH) and §2.1.2 (PROOF);
verification follows RFC 9162 §2.1.3.2 and §2.1.4.2, so any CT-style verifier agrees.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

HASH_SIZE = 32
#: The MTH of an empty log (RFC 6962 §2.1).
EMPTY_ROOT = hashlib.sha256(b"").digest()

Node = tuple[int, int]  # (level, index)
NodeLookup = Callable[[Node], bytes]


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes | bytearray, right: bytes | bytearray) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than ``n`` (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


# --- ranges and the nodes that make them ---------------------------------------------------------


def _blocks(start: int, end: int) -> list[Node]:
    """The complete subtrees whose MTHs combine into MTH(D[start:end])."""
    n = end - start
    if n & (n - 1) == 0 and start % n == 0:
        return [(n.bit_length() - 1, start // n)]
    k = _split(n)
    return _blocks(start, start + k) + _blocks(start + k, end)


def range_hash(start: int, end: int, node: NodeLookup) -> bytes:
    """MTH(D[start:end]) from stored complete subtrees (RFC 6962 §2.1's recursion)."""
    n = end - start
    if n <= 0:
        raise ValueError("empty range")
    if n & (n - 1) == 0 and start % n == 0:
        return node((n.bit_length() - 1, start // n))
    k = _split(n)
    return node_hash(range_hash(start, start + k, node), range_hash(start + k, end, node))


def _path(m: int, start: int, end: int) -> list[tuple[int, int]]:
    n = end - start
    if n == 1:
        return []
    k = _split(n)
    if m - start < k:
        return [*_path(m, start, start + k), (start + k, end)]
    return [*_path(m, start + k, end), (start, start + k)]


def _subproof(m: int, start: int, end: int, complete: bool) -> list[tuple[int, int]]:
    n = end - start
    if m == n:
        return [] if complete else [(start, end)]
    k = _split(n)
    if m <= k:
        return [*_subproof(m, start, start + k, complete), (start + k, end)]
    return [*_subproof(m - k, start + k, end, False), (start, start + k)]


def inclusion_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """The leaf ranges whose MTHs form the audit path of leaf ``index`` (RFC 6962 PATH)."""
    if not 0 <= index < size:
        raise ValueError(f"leaf {index} is not in a log of {size}")
    return _path(index, 0, size)


def consistency_ranges(old: int, new: int) -> list[tuple[int, int]]:
    """The ranges whose MTHs prove a log of ``old`` leaves is a prefix of ``new`` (PROOF)."""
    if not 0 < old <= new:
        raise ValueError(f"no consistency proof from size {old} to {new}")
    return [] if old == new else _subproof(old, 0, new, True)


def nodes_for(ranges: Iterable[tuple[int, int]]) -> set[Node]:
    """Every stored node needed to compute the MTHs of ``ranges`` (for one batched fetch)."""
    out: set[Node] = set()
    for start, end in ranges:
        out.update(_blocks(start, end))
    return out


def head_ranges(size: int) -> list[tuple[int, int]]:
    return [(0, size)] if size else []


def tree_head(size: int, node: NodeLookup) -> bytes:
    return range_hash(0, size, node) if size else EMPTY_ROOT


def inclusion_proof(index: int, size: int, node: NodeLookup) -> list[bytes]:
    return [range_hash(a, b, node) for a, b in inclusion_ranges(index, size)]


def consistency_proof(old: int, new: int, node: NodeLookup) -> list[bytes]:
    return [range_hash(a, b, node) for a, b in consistency_ranges(old, new)]


# --- verification (RFC 9162) ---------------------------------------------------------------------


def verify_inclusion(
    leaf: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """RFC 9162 §2.1.3.2: does ``proof`` show leaf hash ``leaf`` at ``index`` under ``root``?"""
    if not 0 <= index < size:
        return False
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = node_hash(r, p)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and r == root


def verify_consistency(
    old: int, new: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> bool:
    """RFC 9162 §2.1.4.2: is the log of ``old`` leaves a prefix of the log of ``new``?"""
    if old == new:
        return not proof and old_root == new_root
    if not 0 < old < new or not proof:
        return False
    path = list(proof)
    if old & (old - 1) == 0:
        path.insert(0, old_root)
    fn, sn = old - 1, new - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr, sr = node_hash(c, fr), node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = node_hash(sr, c)
        fn, sn = fn >> 1, sn >> 1
    return sn == 0 and fr == old_root and sr == new_root


# --- appending -----------------------------------------------------------------------------------


@dataclass
class Frontier:
    """The right edge of the tree: the roots of its maximal complete subtrees, largest first.

    :meth:`append` returns the nodes it completes (the leaf itself and every subtree it
    closes), which is what a store must write; :meth:`root` is the tree head.
    """

    size: int = 0
    stack: list[tuple[int, bytes]] = field(default_factory=list)  # (level, hash)

    @classmethod
    def at(cls, size: int, node: NodeLookup) -> Frontier:
        """The frontier of a stored log of ``size`` leaves."""
        stack = []
        start = 0
        for level in reversed(range(size.bit_length())):
            if size >> level & 1:
                stack.append((level, node((level, start >> level))))
                start += 1 << level
        return cls(size, stack)

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        index = self.size
        completed = [(0, index, leaf)]
        level, h = 0, leaf
        while self.stack and self.stack[-1][0] == level:
            _, left = self.stack.pop()
            h = node_hash(left, h)
            level += 1
            completed.append((level, index >> level, h))
        self.stack.append((level, h))
        self.size += 1
        return completed

    def root(self) -> bytes:
        if not self.stack:
            return EMPTY_ROOT
        h = self.stack[-1][1]
        for _, left in reversed(self.stack[:-1]):
            h = node_hash(left, h)
        return h


def root_of(leaves: Sequence[bytes]) -> bytes:
    """MTH over leaf hashes (for tests and offline checks of small logs)."""
    f = Frontier()
    for leaf in leaves:
        f.append(leaf)
    return f.root()
