"""RFC 6962 Merkle arithmetic against the RFC's definitions and known test vectors."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from archive import merkle

# The leaf data of the Certificate Transparency reference tests (RFC 6962 implementations).
CT_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    b"\x50\x51\x52\x53\x54\x55\x56\x57",
    b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
]


def mth(data: list[bytes]) -> bytes:
    """RFC 6962 §2.1, literally."""
    n = len(data)
    if n == 0:
        return hashlib.sha256(b"").digest()
    if n == 1:
        return merkle.leaf_hash(data[0])
    k = 1
    while k << 1 < n:
        k <<= 1
    return merkle.node_hash(mth(data[:k]), mth(data[k:]))


def store_of(leaves: list[bytes]) -> dict[tuple[int, int], bytes]:
    f = merkle.Frontier()
    nodes: dict[tuple[int, int], bytes] = {}
    for d in leaves:
        for level, index, h in f.append(merkle.leaf_hash(d)):
            nodes[(level, index)] = h
    return nodes


def test_known_roots() -> None:
    assert merkle.tree_head(0, lambda n: b"") == bytes.fromhex(
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )
    nodes = store_of(CT_LEAVES)
    assert merkle.tree_head(1, nodes.__getitem__).hex() == (
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
    )
    assert merkle.tree_head(8, nodes.__getitem__).hex() == (
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"
    )


@pytest.mark.parametrize("size", range(1, 40))
def test_heads_proofs_and_frontier_agree_with_the_definition(size: int) -> None:
    data = [bytes([i]) * (i % 5) for i in range(size)]
    nodes = store_of(data)
    get = nodes.__getitem__
    root = mth(data)
    assert merkle.tree_head(size, get) == root
    assert merkle.Frontier.at(size, get).root() == root
    assert merkle.root_of([merkle.leaf_hash(d) for d in data]) == root
    for m in range(size):
        proof = merkle.inclusion_proof(m, size, get)
        assert merkle.verify_inclusion(merkle.leaf_hash(data[m]), m, size, proof, root)
        assert not merkle.verify_inclusion(merkle.leaf_hash(b"x" + data[m]), m, size, proof, root)
        if size > 1:
            assert not merkle.verify_inclusion(merkle.leaf_hash(data[m]), m, size, proof[:-1], root)
    for old in range(1, size + 1):
        proof = merkle.consistency_proof(old, size, get)
        old_root = mth(data[:old])
        assert merkle.verify_consistency(old, size, old_root, root, proof)
        if old < size:
            assert not merkle.verify_consistency(
                old, size, mth([*data[: old - 1], b"?"]), root, proof
            )
            assert not merkle.verify_consistency(
                old, size, old_root, mth([*data[:-1], b"?"]), proof
            )


def test_nodes_for_names_exactly_what_a_proof_reads() -> None:
    data = [i.to_bytes(2, "big") for i in range(1000)]
    nodes = store_of(data)
    read: set[tuple[int, int]] = set()

    def get(node: tuple[int, int]) -> bytes:
        read.add(node)
        return nodes[node]

    merkle.inclusion_proof(617, 1000, get)
    assert read == merkle.nodes_for(merkle.inclusion_ranges(617, 1000))
    assert len(read) < 40  # a few per level, not a scan


@given(st.integers(1, 300), st.data())
def test_a_changed_hash_anywhere_breaks_the_proof(size: int, data: st.DataObject) -> None:
    leaves = [i.to_bytes(2, "big") for i in range(size)]
    nodes = store_of(leaves)
    m = data.draw(st.integers(0, size - 1))
    proof = merkle.inclusion_proof(m, size, nodes.__getitem__)
    root = merkle.tree_head(size, nodes.__getitem__)
    if proof:
        i = data.draw(st.integers(0, len(proof) - 1))
        bad = list(proof)
        bad[i] = bytes([proof[i][0] ^ 1]) + proof[i][1:]
        assert not merkle.verify_inclusion(merkle.leaf_hash(leaves[m]), m, size, bad, root)
    other = (m + 1) % size
    if other != m:
        assert not merkle.verify_inclusion(merkle.leaf_hash(leaves[other]), m, size, proof, root)
