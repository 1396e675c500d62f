"""Math: orthogonality, dense references from the paper's definitions, PEFT's permutations."""

from __future__ import annotations

import pytest
import torch

from boft_diffusion.functional import (
    apply_rotation,
    block_rotations,
    butterfly_permutation,
    cayley,
    dense_rotation,
    factor_permutations,
    multiplicative_dropout,
    num_free_entries,
    pack_skew,
    unpack_skew,
)

LAYOUTS = [
    (16, 4, 1),
    (16, 4, 2),
    (32, 4, 3),
    (64, 8, 2),
    (64, 4, 4),
    (320, 8, 2),
    (320, 4, 4),
    (48, 6, 2),
    (24, 2, 3),
    (12, 3, 1),
]


def paper_rotation(blocks: torch.Tensor, dim: int) -> torch.Tensor:
    """``M = F_{m-1} ⋯ F_0`` with ``F_i = P_i blockdiag(R_i) P_i^T``, dense permutation matrices."""
    m, r, b, _ = blocks.shape
    rotation = torch.eye(dim, dtype=torch.float64)
    for i, perm in enumerate(factor_permutations(dim, r, b, m)):
        p = torch.zeros(dim, dim, dtype=torch.float64)
        p[torch.arange(dim), torch.tensor(perm)] = 1.0
        rotation = p @ torch.block_diag(*blocks[i].double()) @ p.T @ rotation
    return rotation


def random_blocks(m: int, r: int, b: int, scale: float = 0.5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return block_rotations(torch.randn(m, r, num_free_entries(b), generator=g) * scale, b)


def test_cayley_blocks_are_orthogonal():
    blocks = random_blocks(3, 5, 8, scale=2.0)
    eye = torch.eye(8).expand_as(blocks)
    assert blocks.dtype == torch.float32
    torch.testing.assert_close(blocks @ blocks.transpose(-1, -2), eye, atol=1e-5, rtol=0)
    assert torch.allclose(torch.linalg.det(blocks), torch.ones(3, 5), atol=1e-4)  # Cayley: det = +1


def test_cayley_matches_definition():
    q = unpack_skew(torch.randn(4, num_free_entries(6), dtype=torch.float64), 6)
    eye = torch.eye(6, dtype=torch.float64)
    expected = (eye - q) @ torch.linalg.inv(eye + q)
    torch.testing.assert_close(cayley(q).double(), expected, atol=1e-5, rtol=0)


def test_pack_unpack_round_trip_and_peft_convention():
    a = torch.randn(2, 3, 5, 5)
    q = unpack_skew(pack_skew(a), 5)
    torch.testing.assert_close(q, 0.5 * (a - a.transpose(-1, -2)))  # PEFT's skew part of A
    torch.testing.assert_close(pack_skew(q), pack_skew(a))


def test_zero_generators_give_identity():
    blocks = block_rotations(torch.zeros(2, 4, num_free_entries(4)), 4)
    x = torch.randn(3, 16)
    assert torch.equal(apply_rotation(x, blocks, factor_permutations(16, 4, 4, 2)), x)


@pytest.mark.parametrize(("dim", "b", "m"), LAYOUTS)
def test_structured_rotation_equals_paper_definition(dim, b, m):
    blocks = random_blocks(m, dim // b, b).double()
    perms = factor_permutations(dim, dim // b, b, m)
    reference = paper_rotation(blocks, dim)
    x = torch.randn(7, dim, dtype=torch.float64)
    torch.testing.assert_close(apply_rotation(x, blocks, perms), x @ reference, atol=1e-12, rtol=0)
    torch.testing.assert_close(
        apply_rotation(x, blocks, perms, transpose=True), x @ reference.T, atol=1e-12, rtol=0
    )
    torch.testing.assert_close(dense_rotation(blocks, perms), reference, atol=1e-12, rtol=0)
    torch.testing.assert_close(
        reference @ reference.T, torch.eye(dim, dtype=torch.float64), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize(("dim", "b", "m"), LAYOUTS)
def test_permutations_equal_peft(dim, b, m):
    layer = pytest.importorskip("peft.tuners.boft.layer")
    r = dim // b
    for i, perm in enumerate(factor_permutations(dim, r, b, m)):
        peft_perm = layer.BOFTLayer.block_butterfly_perm(None, dim, r // 2**i, b // 2, m - 1)
        assert list(perm) == peft_perm.tolist()


def test_butterfly_permutation_is_a_permutation():
    perm = butterfly_permutation(64, 4, 4, True)
    assert sorted(perm) == list(range(64))


@pytest.mark.parametrize("strength", [0.0, 0.3, 1.0, 2.5, -1.0])
def test_strength_keeps_rotation_orthogonal(strength):
    packed = torch.randn(2, 4, num_free_entries(4))
    blocks = block_rotations(packed, 4, strength)
    torch.testing.assert_close(
        blocks @ blocks.transpose(-1, -2), torch.eye(4).expand_as(blocks), atol=1e-5, rtol=0
    )
    if strength == 0.0:
        assert torch.equal(blocks, torch.eye(4).expand_as(blocks))
    if strength == 1.0:
        assert torch.equal(blocks, block_rotations(packed, 4))


def test_multiplicative_dropout_replaces_blocks_of_one_factor():
    blocks = random_blocks(3, 10, 4)
    dropped = multiplicative_dropout(blocks, 0.5, generator=torch.Generator().manual_seed(1))
    is_eye = torch.isclose(dropped, torch.eye(4)).all(dim=(-1, -2))
    changed = (dropped != blocks).any(dim=(-1, -2))
    assert changed.sum() == 5 and (changed <= is_eye).all()
    assert changed.any(dim=1).sum() == 1  # one factor only
    assert torch.equal(multiplicative_dropout(blocks, 0.05), blocks)  # int(0.05 * 10) == 0 blocks


def test_gradients_flow_through_structured_path():
    packed = torch.randn(2, 8, num_free_entries(4), requires_grad=True)
    x = torch.randn(5, 32)
    y = apply_rotation(x, block_rotations(packed, 4), factor_permutations(32, 8, 4, 2))
    y.square().sum().backward()
    assert packed.grad is not None and torch.isfinite(packed.grad).all() and packed.grad.abs().sum() > 0
