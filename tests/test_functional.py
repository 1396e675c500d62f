"""Math: orthogonality, dense references from the paper's definitions, PEFT's permutations."""

from __future__ import annotations

import pytest
import torch

from boft_diffusion import BOFTConfig, functional
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


@pytest.mark.parametrize("rows", [7, 70])  # few rows: factor by factor; more: collapsed blocks
@pytest.mark.parametrize(("dim", "b", "m"), LAYOUTS)
def test_structured_rotation_equals_paper_definition(dim, b, m, rows):
    blocks = random_blocks(m, dim // b, b).double()
    perms = factor_permutations(dim, dim // b, b, m)
    reference = paper_rotation(blocks, dim)
    x = torch.randn(rows, dim, dtype=torch.float64)
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


@pytest.mark.parametrize("rows", [5, 12])
@pytest.mark.parametrize(("dim", "b", "m"), [(16, 4, 1), (16, 4, 2), (32, 4, 3), (24, 2, 3), (48, 6, 2)])
@pytest.mark.parametrize("transpose", [False, True])
def test_rotation_gradients_match_finite_differences(dim, b, m, transpose, rows):
    """The hand-written backward of the structured rotation, for the input, the blocks, and both."""
    perms = factor_permutations(dim, dim // b, b, m)
    blocks = random_blocks(m, dim // b, b).double()
    x = torch.randn(rows, dim, dtype=torch.float64)
    for needs in [(True, True), (True, False), (False, True)]:
        args = (x.clone().requires_grad_(needs[0]), blocks.clone().requires_grad_(needs[1]))
        assert torch.autograd.gradcheck(lambda x, bl: apply_rotation(x, bl, perms, transpose), args)


def test_rotation_gradients_equal_dense_autograd():
    """Gradients through the structured path equal those through the dense paper definition."""
    dim, b, m = 64, 4, 3
    packed = torch.randn(m, dim // b, num_free_entries(b), dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 10, dim, dtype=torch.float64, requires_grad=True)
    target = torch.randn(3, 10, dim, dtype=torch.float64)
    perms = factor_permutations(dim, dim // b, b, m)
    (apply_rotation(x, block_rotations(packed, b), perms) * target).sum().backward()
    grads = packed.grad.clone(), x.grad.clone()
    packed.grad = x.grad = None
    (x @ paper_rotation(block_rotations(packed, b), dim) * target).sum().backward()
    torch.testing.assert_close(grads[0], packed.grad.to(grads[0].dtype), atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(grads[1], x.grad, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("strength", [1.0, 0.4, -2.0])
def test_cayley_gradient_equals_autograd_through_the_definition(strength):
    """block_rotations' closed-form backward against autograd through (I - wQ)(I + wQ)^-1 in float64."""
    packed = torch.randn(2, 3, num_free_entries(6), dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    (block_rotations(packed, 6, strength).double() * weight).sum().backward()
    ours, packed.grad = packed.grad.clone(), None
    q = unpack_skew(packed * strength, 6)
    eye = torch.eye(6, dtype=torch.float64)
    (((eye - q) @ torch.linalg.inv(eye + q)) * weight).sum().backward()
    assert ours.dtype == packed.dtype
    torch.testing.assert_close(ours, packed.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("dim", "b", "m"), [(64, 4, 4), (320, 8, 2), (48, 6, 2)])
def test_collapsed_and_factored_paths_agree(dim, b, m, monkeypatch):
    """``M`` applied as one product of its diagonal blocks equals ``M`` applied factor by factor."""
    blocks = random_blocks(m, dim // b, b)
    perms = factor_permutations(dim, dim // b, b, m)
    x = torch.randn(100, dim)
    collapsed = apply_rotation(x, blocks, perms), apply_rotation(x, blocks, perms, transpose=True)
    monkeypatch.setattr(functional, "MAX_COLLAPSED_BLOCK", 0)
    factored = apply_rotation(x, blocks, perms), apply_rotation(x, blocks, perms, transpose=True)
    for a, f in zip(collapsed, factored):
        torch.testing.assert_close(a, f, atol=1e-5, rtol=1e-5)


def config_layouts(dims):
    """Every ``(dim, b, r, m)`` with ``m > 1`` that :class:`BOFTConfig` accepts, for ``dims``."""
    for dim in dims:
        for b in range(2, dim + 1, 2):
            for m in range(2, 12):
                try:
                    layout = BOFTConfig(boft_block_size=b, boft_n_butterfly_factor=m).resolve_blocks(dim)
                except ValueError:
                    break  # deeper butterflies need even more divisibility
                yield dim, layout.block_size, layout.block_num, layout.n_factors


GRID = [*range(2, 130, 2), 192, 320, 640, 768, 1024, 1280]


def test_butterfly_permutations_are_views_on_every_config_layout():
    """``perm_i`` is ``unflatten(-1, (-1, 2^i, 2, b/2)).transpose(-3, -2).flatten(-4)`` (issue #14),
    and every fused gather of a plan (either direction) is a view, on all layouts the config allows."""
    count = 0
    for dim, b, r, m in config_layouts(GRID):
        perms = factor_permutations(dim, r, b, m)
        index = torch.arange(dim)
        for i, perm in enumerate(perms):
            view = index.unflatten(-1, (-1, 2**i, 2, b // 2)).transpose(-3, -2).flatten(-4)
            assert perm == tuple(view.tolist()) == functional.butterfly_view_permutation(dim, i, b // 2)
        for transpose in (False, True):
            plan = functional._Plan(perms, transpose)
            assert plan.views is not None, (dim, b, m, transpose)
            for gather, forward, inverse in zip(plan.gathers, *plan.views):
                if gather is None:
                    assert forward is None and inverse is None
                    continue
                cols = index[:, None].float()
                assert functional._gather(cols, forward)[:, 0].long().tolist() == list(gather)
                back = functional._gather(cols[list(gather)], inverse)
                assert back[:, 0].long().tolist() == list(range(dim))
        count += 1
    assert count > 300


def view_and_gather(x, blocks, perms, transpose):
    """Outputs and gradients (of ``x`` and the blocks) of the view path and of the gather path."""
    results = []
    for views in (True, False):
        plan = functional._Plan(perms, transpose, views=views)
        assert (plan.views is not None) == views
        xs, bl = x.clone().requires_grad_(), blocks.clone().requires_grad_()
        out = functional._factored_rotation(xs, bl, plan)
        out.backward(torch.linspace(-1, 1, out.numel()).reshape(out.shape))
        results.append((out.detach(), xs.grad, bl.grad))
    return results


VIEW_LAYOUTS = [(8, 2, 2), (16, 4, 2), (32, 4, 3), (64, 4, 4), (24, 2, 3), (48, 6, 2), (96, 6, 3)]
VIEW_LAYOUTS += [(128, 2, 7), (320, 8, 2), (320, 4, 4), (640, 8, 5)]


@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize(("dim", "b", "m"), VIEW_LAYOUTS)
def test_view_path_equals_gather_path(dim, b, m, rows):
    """Values and gradients of the view path equal the index-gather path (same products, same data)."""
    blocks = random_blocks(m, dim // b, b, seed=dim + m)
    perms = factor_permutations(dim, dim // b, b, m)
    x = torch.randn(rows, dim, generator=torch.Generator().manual_seed(rows))
    for transpose in (False, True):
        view, gather = view_and_gather(x, blocks, perms, transpose)
        for a, g in zip(view, gather):
            torch.testing.assert_close(a, g, atol=1e-6, rtol=1e-6)
    # and the transposed (n, d) view as input, as the layers pass it
    view, gather = view_and_gather(x.t().contiguous().t(), blocks, perms, False)
    torch.testing.assert_close(view[0], gather[0], atol=1e-6, rtol=1e-6)


def test_other_permutations_keep_index_gathers():
    """Permutations that are not butterfly views fall back to gathers (chosen once, in the plan)."""
    dim, b, m = 24, 4, 2
    g = torch.Generator().manual_seed(3)
    perms = tuple(tuple(torch.randperm(dim, generator=g).tolist()) for _ in range(m))
    assert functional._Plan(perms, False).views is None
    blocks = random_blocks(m, dim // b, b).double()
    x = torch.randn(5, dim, dtype=torch.float64)
    reference = torch.eye(dim, dtype=torch.float64)
    for i, perm in enumerate(perms):
        p = torch.zeros(dim, dim, dtype=torch.float64)
        p[torch.arange(dim), torch.tensor(perm)] = 1.0
        reference = p @ torch.block_diag(*blocks[i]) @ p.T @ reference
    torch.testing.assert_close(apply_rotation(x, blocks, perms), x @ reference, atol=1e-12, rtol=0)
    torch.testing.assert_close(
        apply_rotation(x, blocks, perms, transpose=True), x @ reference.T, atol=1e-12, rtol=0
    )
