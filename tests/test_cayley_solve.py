"""Issue #29: Cayley blocks of any size on the CPU, after ``torch.set_num_threads``.

In torch 2.13 + oneMKL, once ``torch.set_num_threads`` has been called, the batched CPU LU solve of
``b × b`` matrices (``b ≥ 150``, batch ≥ 2) raises, hangs or returns wrong blocks. Every test here
calls ``set_num_threads`` first and compares with a float64 reference built from the definition
``R = (I - Q)(I + Q)^-1``, one matrix at a time (``torch.linalg.inv`` on one matrix is unaffected):
the blocks, the training forward and backward, the cached sampling rotation and the merged weight.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from boft_diffusion import BOFTConfig, BOFTModel
from boft_diffusion.functional import cayley, factor_permutations, num_free_entries, unpack_skew
from boft_diffusion.inject import boft_layers
from boft_diffusion.layers import BOFTLayer


@pytest.fixture(autouse=True)
def set_num_threads():
    """The call that breaks the batched solve: with the number of threads already in force."""
    torch.set_num_threads(torch.get_num_threads())


def reference_blocks(packed: torch.Tensor, block_size: int) -> torch.Tensor:
    """``R = (I - Q)(I + Q)^-1`` per block in float64, one matrix at a time: ``(m, r, b, b)``."""
    q = unpack_skew(packed.double(), block_size)
    eye = torch.eye(block_size, dtype=torch.float64)
    flat = [(eye - qk) @ torch.linalg.inv(eye + qk) for qk in q.reshape(-1, block_size, block_size)]
    return torch.stack(flat).view(q.shape)


def reference_weight_rows(layer, blocks: torch.Tensor, name: str = "default") -> torch.Tensor:
    """``W M^T ⊙ s`` in float64 from :func:`reference_blocks` ``blocks`` ``(m, r, b, b)`` (differentiable).

    ``M = F_{m-1} ⋯ F_0`` with ``F_i = P_i · blockdiag(R_i1..R_ir) · P_i^T``, ``P_i[j, perm_i[j]] = 1``,
    so ``W M^T = W F_0^T ⋯ F_{m-1}^T``; ``(P B P^T)[j, k] = B[perm[j], perm[k]]`` (indexing, no d × d product).
    """
    layout = layer.layouts[name]
    perms = factor_permutations(layout.dim, layout.block_num, layout.block_size, layout.n_factors)
    rows = layer.weight_rows().detach().double()
    for i, perm in enumerate(perms):
        rows = rows @ torch.block_diag(*blocks[i])[list(perm)][:, list(perm)].T
    return rows * layer.boft_s[name].detach().double()[:, None]


def reference_layer(layer, rows: torch.Tensor) -> nn.Module:
    """The base layer in float64 with weight rows ``rows`` (its bias kept)."""
    base = layer.base_layer
    if isinstance(base, nn.Linear):
        reference = nn.Linear(base.in_features, base.out_features, dtype=torch.float64)
    else:
        reference = nn.Conv2d(
            base.in_channels, base.out_channels, base.kernel_size, padding=base.padding, dtype=torch.float64
        )
    del reference.weight
    reference.weight = layer.weight_from_rows(rows)
    with torch.no_grad():
        reference.bias.copy_(base.bias)
    return reference


def adapted(case: str) -> tuple[BOFTModel, BOFTLayer]:
    """Case ``case`` of :data:`LARGE_LAYERS` with its adapter, generators and scale randomised."""
    make_base, config = LARGE_LAYERS[case]
    torch.manual_seed(0)
    model = BOFTModel(nn.Sequential(make_base()), BOFTConfig(target_modules=["0"], **config))
    layer = boft_layers(model.model)["0"]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.boft_R["default"].normal_(0.0, 0.1, generator=g)
        layer.boft_s["default"].copy_(1 + 0.1 * torch.randn(layer.boft_s["default"].shape, generator=g))
    layout = layer.layouts["default"]
    assert layout.block_size >= 150 and layout.n_factors * layout.block_num >= 2  # the failing sizes
    return model, layer


def layer_input(layer, tokens: int = 3) -> torch.Tensor:
    """Linear: ``(tokens, d)`` (fewer rows than outputs: the input-rotation path); Conv2d: ``(1, c, 5, 5)``."""
    d = layer.layouts["default"].dim
    return torch.randn((tokens, d) if isinstance(layer.base_layer, nn.Linear) else (1, d // 9, 5, 5))


# Linear and Conv2d (axis in_channels · 9), m = 1 and 2, each with 2 or more blocks per factor.
LARGE_LAYERS = {
    "linear-b1024-m1": (lambda: nn.Linear(2048, 8), dict(boft_block_size=1024)),
    "linear-b256-m2": (lambda: nn.Linear(1024, 8), dict(boft_block_size=256, boft_n_butterfly_factor=2)),
    "linear-b160-m2": (
        lambda: nn.Linear(640, 8),
        dict(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2),
    ),
    "conv3x3-b288-m1": (lambda: nn.Conv2d(64, 4, 3, padding=1), dict(boft_block_size=0, boft_block_num=2)),
    "conv3x3-b288-m2": (
        lambda: nn.Conv2d(64, 4, 3, padding=1),
        dict(boft_block_size=0, boft_block_num=2, boft_n_butterfly_factor=2),
    ),
    "conv3x3-b576-m1": (lambda: nn.Conv2d(128, 2, 3), dict(boft_block_size=0, boft_block_num=2)),
}
"""``(base layer, config)`` per case."""


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((2, 160), torch.float32),  # b = 150 (the smallest failing size) hangs the old code: not used
        ((2, 288), torch.float64),
        ((3, 1, 200), torch.float32),
        ((2, 1024), torch.float32),
    ],
    ids=["2x160-f32", "2x288-f64", "3x1x200-f32", "2x1024-f32"],
)
def test_cayley_of_large_block_batches_matches_definition(shape, dtype):
    *batch, b = shape
    packed = torch.randn(*batch, num_free_entries(b), generator=torch.Generator().manual_seed(0)) * 0.1
    blocks = cayley(unpack_skew(packed.to(dtype), b))
    assert blocks.shape == (*batch, b, b) and blocks.dtype == torch.float32
    torch.testing.assert_close(blocks.double(), reference_blocks(packed, b), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", list(LARGE_LAYERS))
def test_large_blocks_sample_and_merge_as_defined(case):
    """The layer's blocks, its sampling forward (no gradients: the cached rotation) and
    ``merge_and_unload``'s merged weight, against the float64 definition."""
    model, layer = adapted(case)
    blocks = reference_blocks(layer.boft_R["default"].detach(), layer.layouts["default"].block_size)
    torch.testing.assert_close(layer.rotation("default")[0].double(), blocks, atol=1e-5, rtol=0)
    rows = reference_weight_rows(layer, blocks)
    reference = reference_layer(layer, rows)
    x = layer_input(layer)
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), reference(x.double()), atol=1e-5, rtol=0)
        torch.testing.assert_close(model(x).double(), reference(x.double()), atol=1e-5, rtol=0)  # cached
    merged = model.merge_and_unload()[0]
    assert type(merged) is type(layer.base_layer)
    torch.testing.assert_close(merged.weight.double(), layer.weight_from_rows(rows), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", ["linear-b256-m2", "conv3x3-b288-m2", "conv3x3-b576-m1"])
def test_large_blocks_train_as_defined(case):
    """Training forward and backward (the packed Cayley's closed-form gradient) against float64
    autograd through the definition."""
    model, layer = adapted(case)
    model.train()
    x = layer_input(layer)
    out = model(x)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    (out * target).sum().backward()

    packed = layer.boft_R["default"].detach().double().requires_grad_()
    blocks = reference_blocks(packed, layer.layouts["default"].block_size)
    expected = reference_layer(layer, reference_weight_rows(layer, blocks))(x.double())
    (expected * target).sum().backward()
    torch.testing.assert_close(out.double(), expected.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(layer.boft_R["default"].grad.double(), packed.grad, atol=1e-4, rtol=1e-4)


def test_small_blocks_keep_one_batched_solve(monkeypatch):
    """The blocks training uses (``b`` 4 to 64) stay one batched solve on the CPU: the large-block
    workaround costs them nothing (``scripts/bench_cayley.py`` measures it)."""
    calls = []
    solve = torch.linalg.solve_ex
    monkeypatch.setattr(torch.linalg, "solve_ex", lambda a, b: calls.append(a.shape) or solve(a, b))
    for b in (4, 8, 16, 32, 64):
        cayley(unpack_skew(torch.randn(2, 40, num_free_entries(b)), b))
    assert calls == [(2, 40, b, b) for b in (4, 8, 16, 32, 64)]
