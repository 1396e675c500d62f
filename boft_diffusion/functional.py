"""Pure tensor math of BOFT (Orthogonal Butterfly finetuning, Liu et al., arXiv 2311.06243).

Notation (PEFT-compatible): an adapted axis of size ``d`` holds ``m`` butterfly factors, each
block-diagonal with ``r`` blocks of size ``b`` (``r * b = d``). Factor ``i`` is
``F_i = P_i · blockdiag(R_i1..R_ir) · P_i^T`` with ``P_i[j, perm_i[j]] = 1`` (PEFT's
``block_butterfly_perm``), the layer's rotation is ``M = F_{m-1} ⋯ F_0`` and inputs rotate as
``x -> x M``.

Each block is the Cayley transform ``R = (I - Q)(I + Q)^-1`` of a skew-symmetric ``Q``. Only the
``b(b-1)/2`` free entries of ``Q`` are stored ("packed" generators, shape ``(m, r, b(b-1)/2)``);
:func:`pack_skew` / :func:`unpack_skew` convert exactly to and from PEFT's full ``b × b`` layout.

Nothing here builds a dense ``d × d`` matrix except :func:`dense_rotation` (merge and export only).
``M`` is block-diagonal with blocks of size ``S = b · 2^(m-1)`` (each factor mixes only within
aligned groups of ``b · 2^i``): for the usual small ``S`` those blocks are built from the factors
(cost independent of the input) and the input goes through one batched ``S × S`` product, no
gather; deep butterflies go factor by factor, one fused permutation plus one batched ``b × b``
product each. Both run on the transposed layout ``(d, n)``, where gathers and products are contiguous.
Butterfly permutations are digit permutations of the index (``perm_i`` is the view
``unflatten(-1, (-1, 2^i, 2, b/2)).transpose(-3, -2).flatten(-4)``), so each fused permutation is
a permute of a view and one strided copy, no index tensor (:class:`_View`); other permutations keep
index gathers. Under ``torch.compile`` the plan and permutations are constants of the graph.
The rotation and the Cayley transform have hand-written backward passes: the rotation saves only
its input and recomputes the rest, and the Cayley transform's derivative is closed-form.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

__all__ = [
    "apply_rotation",
    "block_rotations",
    "butterfly_permutation",
    "collapse_rotation",
    "butterfly_view_permutation",
    "cayley",
    "dense_rotation",
    "factor_permutations",
    "multiplicative_dropout",
    "num_free_entries",
    "block_size_of",
    "pack_skew",
    "unpack_skew",
]


def num_free_entries(block_size: int) -> int:
    """Free entries of a ``b × b`` skew-symmetric matrix: ``b(b-1)/2``."""
    return block_size * (block_size - 1) // 2


def block_size_of(free_entries: int) -> int | None:
    """The block size ``b`` with ``b(b-1)/2 == free_entries`` (the inverse of :func:`num_free_entries`),
    or ``None`` when no ``b`` has that many."""
    if free_entries < 0:
        return None
    b = (1 + math.isqrt(1 + 8 * free_entries)) // 2
    return b if num_free_entries(b) == free_entries else None


@functools.lru_cache(maxsize=64)
def _triu_indices(block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(block_size, block_size, offset=1)
    return rows, cols


def _skew_positions(block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat positions of pair ``k``'s two entries in a ``b × b`` matrix: ``i*b+j`` (upper), ``j*b+i`` (lower).

    Cached per device; under ``torch.compile`` made in the graph (a constant there) instead.
    """
    if torch.compiler.is_compiling():
        rows, cols = torch.triu_indices(block_size, block_size, offset=1, device=device)
        return rows * block_size + cols, cols * block_size + rows
    return _cached_skew_positions(block_size, device)


@functools.lru_cache(maxsize=64)
def _cached_skew_positions(block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = _triu_indices(block_size)
    return (rows * block_size + cols).to(device), (cols * block_size + rows).to(device)


def unpack_skew(packed: torch.Tensor, block_size: int) -> torch.Tensor:
    """Packed generators ``(..., b(b-1)/2)`` -> skew-symmetric ``Q`` ``(..., b, b)``.

    ``packed[..., k]`` is ``Q[i, j]`` for the k-th pair ``i < j`` in row-major order, ``-Q[j, i]``
    too. Two index copies, O(b²) in time and memory (exact: every entry of ``Q`` is one generator
    or zero); their backward is a gather.
    """
    upper, lower = _skew_positions(block_size, packed.device)
    flat = packed.new_zeros(*packed.shape[:-1], block_size * block_size)
    flat = flat.index_copy(-1, upper, packed).index_copy(-1, lower, -packed)
    return flat.unflatten(-1, (block_size, block_size))


def pack_skew(matrix: torch.Tensor) -> torch.Tensor:
    """Full generators ``A`` ``(..., b, b)`` -> packed free entries of ``Q = (A - A^T) / 2``.

    This is exactly PEFT's convention (``cayley_batch`` skew-symmetrises its ``boft_R``), so
    ``unpack_skew(pack_skew(A))`` is the ``Q`` PEFT uses, and ``pack_skew(Q) == Q[triu]``.
    """
    block_size = matrix.shape[-1]
    rows, cols = _triu_indices(block_size)
    skew = 0.5 * (matrix - matrix.transpose(-1, -2))
    return skew[..., rows.to(matrix.device), cols.to(matrix.device)]


MAX_BATCHED_CPU_SOLVE = 64
"""Largest block size ``b`` whose Cayley solve runs batched on the CPU; larger blocks go one at a time."""


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """Cayley transform ``R = (I - Q)(I + Q)^-1`` of skew-symmetric ``Q`` ``(..., b, b)``.

    Computed in float32 by a linear solve, never an explicit inverse: ``I - Q`` and ``(I + Q)^-1``
    commute, so ``R = (I + Q)^-1 (I - Q)`` solves ``(I + Q) R = I - Q``. ``I + Q`` is always
    invertible for real skew ``Q`` (its eigenvalues are ``1 + iλ``), so the solve skips the
    singularity check. Returns float32 orthogonal blocks of the same shape. Every Cayley block of
    the package (training, cached sampling rotations, merge, export, inspection) is solved here.
    """
    q = skew.float()
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    return _solve(eye + q, eye - q)


def _solve(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``X`` with ``lhs X = rhs`` for invertible ``lhs`` ``(..., b, b)``, ``rhs`` ``(..., b, b)``.

    One batched ``solve_ex``, except on the CPU for ``b >`` :data:`MAX_BATCHED_CPU_SOLVE`, where each
    matrix is solved on its own (issue #29): batched CPU LU (``solve_ex``, ``lu_factor``, ``inv``; float32
    and float64) is broken in torch 2.13 + oneMKL 2024.2 once ``torch.set_num_threads`` has been called
    (conftest, the benchmark, accelerate do). From ``b = 150`` on, batch 2 or more, it raises (MKL
    ``SLASWP`` parameter 6, "Pivots given to lu_solve"), hangs, or with 4 threads returns blocks off by
    0.1 without a word; one matrix at a time is right in every case tried (b up to 2880, 1-4 threads).
    """
    # Measured on 2 cores (min of repeats): the loop against the batched solve, solve only, batch × b:
    # 160×8 17x, 80×16 5x, 40×32 2.4x, 20×64 1.5x, 10×96 1.4x, 8×160 1.4x, 4×320 1.2x, 4×720 1.14x;
    # Cayley forward + backward (scripts/bench_cayley.py --large): 1.0-1.4x for b = 80..720. So the
    # blocks training uses (b ≤ 64) keep the batched solve (bench_cayley: 0.99-1.01x of the code before),
    # and the loop starts well below the failing sizes (MKL's threshold may differ on other CPUs).
    # Cholesky of I - Q² = (I + Q)^T (I + Q), the other factorisation tried, batches without failing
    # but is 1.1-1.5x slower than the loop for b ≥ 160 with 3-4x its error (it squares the condition
    # number). A torch.set_num_threads(1) section also avoids the failure, but it changes the whole
    # process (other threads, the caller's setting) and set_num_threads is the trigger itself.
    # CUDA and other devices: the batched solve, as before.
    size = lhs.shape[-1]
    if size <= MAX_BATCHED_CPU_SOLVE or lhs.device.type != "cpu" or lhs.numel() == 0:
        return torch.linalg.solve_ex(lhs, rhs)[0]
    pairs = zip(lhs.reshape(-1, size, size), rhs.reshape(-1, size, size))
    return torch.stack([torch.linalg.solve_ex(a, b)[0] for a, b in pairs]).view(lhs.shape)


class _PackedCayley(torch.autograd.Function):
    """``Cayley(w Q)`` of packed generators, with the closed-form derivative as its backward.

    With ``A = I + wQ``, ``R = 2 A^-1 - I``, so ``dR = -2 A^-1 (w dQ) A^-1`` with ``A^-1 = (I + R) / 2``:
    ``dL/dQ = -w/2 (I + R)^T G (I + R)^T``, two batched ``b × b`` matmuls instead of the solves that
    autograd would run, then a gather of each pair's two entries onto the packed generator.
    """

    @staticmethod
    def forward(ctx, packed, block_size, strength):  # noqa: D102
        blocks = cayley(_scaled_skew(packed, block_size, strength))
        ctx.save_for_backward(blocks)
        ctx.block_size, ctx.strength, ctx.dtype = block_size, strength, packed.dtype
        return blocks

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        (blocks,) = ctx.saved_tensors
        b = ctx.block_size
        half = (blocks + torch.eye(b, device=blocks.device, dtype=blocks.dtype)).transpose(-1, -2)
        grad_skew = (half @ grad.to(blocks.dtype) @ half).flatten(-2)
        upper, lower = _skew_positions(b, blocks.device)
        grad_packed = (grad_skew[..., upper] - grad_skew[..., lower]) * (-0.5 * ctx.strength)
        return grad_packed.to(ctx.dtype), None, None


def block_rotations(packed: torch.Tensor, block_size: int, strength: float = 1.0) -> torch.Tensor:
    """Packed generators ``(m, r, b(b-1)/2)`` -> orthogonal blocks ``(m, r, b, b)`` in float32.

    ``strength`` ``w`` scales the generator, ``R(w) = Cayley(w Q)``: orthogonal for every ``w``,
    the identity at ``w = 0``. All ``m · r`` blocks are one batched solve.
    """
    if torch.is_grad_enabled() and packed.requires_grad:
        return _PackedCayley.apply(packed, block_size, float(strength))
    return cayley(_scaled_skew(packed, block_size, strength))


def _scaled_skew(packed: torch.Tensor, block_size: int, strength: float) -> torch.Tensor:
    skew = unpack_skew(packed.float(), block_size)
    return skew if strength == 1.0 else skew * strength


def multiplicative_dropout(
    blocks: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace ``int(p * r)`` random blocks of one random factor by the identity (the paper's dropout).

    ``blocks``: ``(m, r, b, b)``. Returns a tensor of the same shape (differentiable in the kept
    blocks). Same sampling as PEFT's ``MultiplicativeDropoutLayer``.
    """
    m, r, b, _ = blocks.shape
    num_drop = int(p * r)
    if num_drop == 0:
        return blocks
    device = blocks.device
    factor = int(torch.randint(0, m, (1,), generator=generator).item())
    dropped = torch.randperm(r, generator=generator)[:num_drop].to(device)
    mask = torch.zeros(m, r, 1, 1, device=device, dtype=blocks.dtype)
    mask[factor, dropped] = 1.0
    eye = torch.eye(b, device=device, dtype=blocks.dtype)
    return blocks * (1.0 - mask) + eye * mask


@functools.lru_cache(maxsize=256)
def butterfly_permutation(dim: int, num_blocks: int, half_block: int, butterfly: bool) -> tuple[int, ...]:
    """PEFT's ``BOFTLayer.block_butterfly_perm(dim, num_blocks, half_block, n_butterfly_factor)``.

    Splits ``dim`` into ``num_blocks`` groups; inside each group the chunks of ``half_block``
    indices are reordered even-numbered first, then odd-numbered. With ``butterfly=False`` (a single
    factor, plain OFT) it is the identity. Returned as a tuple (cached, device-free).
    """
    if not butterfly:
        return tuple(range(dim))
    if num_blocks * half_block * 2 > dim:
        raise ValueError(
            f"Invalid butterfly permutation: {num_blocks} blocks of 2 x {half_block} exceed dim {dim}"
        )
    group = dim // num_blocks
    chunks = group // half_block
    order = list(range(0, chunks, 2)) + list(range(1, chunks, 2))
    within = [c * half_block + k for c in order for k in range(half_block)]
    return tuple(start + j for start in range(0, dim, group) for j in within)


@torch.compiler.assume_constant_result
def factor_permutations(
    dim: int, block_num: int, block_size: int, n_factors: int
) -> tuple[tuple[int, ...], ...]:
    """The ``m`` butterfly permutations ``perm_i`` of one layer, PEFT's index order.

    Factor ``i`` uses ``butterfly_permutation(dim, block_num / 2^i, block_size / 2, m > 1)``.
    Cached; under ``torch.compile`` a constant of the graph (computed at trace time).
    """
    return _factor_permutations(dim, block_num, block_size, n_factors)


@functools.lru_cache(maxsize=256)
def _factor_permutations(
    dim: int, block_num: int, block_size: int, n_factors: int
) -> tuple[tuple[int, ...], ...]:
    return tuple(
        butterfly_permutation(dim, block_num // 2**i, block_size // 2, n_factors > 1)
        for i in range(n_factors)
    )


def _inverse(perm: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for j, p in enumerate(perm):
        inv[p] = j
    return tuple(inv)


def _compose(first: tuple[int, ...], then: tuple[int, ...]) -> tuple[int, ...]:
    """Index list of gathering by ``first`` and then by ``then``: ``x[first][then] == x[result]``."""
    return tuple(first[j] for j in then)


class _View(NamedTuple):
    """A gather written as a view: ``x[index] == x.unflatten(0, shape).permute(*dims, ...).flatten(0, -2)``.

    Butterfly permutations (and their inverses and products) only reorder the mixed-radix digits of
    an index, so on the ``(d, n)`` layout each one is a permute of a view, and the copy that the
    following block product needs anyway (``reshape``) is the only data movement: no index tensor,
    and a transposed ``(n, d)`` input is permuted and made contiguous in the same copy.
    """

    shape: tuple[int, ...]
    dims: tuple[int, ...]

    def inverse(self) -> _View:
        inverse = [0] * len(self.dims)
        for k, dim in enumerate(self.dims):
            inverse[dim] = k
        return _View(tuple(self.shape[dim] for dim in self.dims), tuple(inverse))


def butterfly_view_permutation(dim: int, factor: int, half_block: int) -> tuple[int, ...]:
    """``perm_i`` as the view ``unflatten(-1, (-1, 2^i, 2, b/2)).transpose(-3, -2).flatten(-4)``.

    Equal to ``factor_permutations(...)[i]`` for every layout :class:`~boft_diffusion.config.BOFTConfig`
    accepts (``b`` and ``r`` even, ``2^(m-1) | r`` when ``m > 1``; a test checks a grid of them).
    """
    index = torch.arange(dim).unflatten(-1, (-1, 2**factor, 2, half_block)).transpose(-3, -2)
    return tuple(index.flatten(-4).tolist())


def _butterfly_radices(perms: tuple[tuple[int, ...], ...]) -> tuple[int, ...] | None:
    """Digit sizes ``(d / (b 2^m), 2, …, 2, b / 2)`` (size-1 digits dropped) of which every
    ``perm_i`` is a digit permutation, or ``None`` when ``perms`` are not of that form (the layer
    then keeps index gathers)."""
    m, dim = len(perms), len(perms[0])
    if m < 2:
        return None
    half = next((j for j in range(1, dim) if perms[1][j] != j), 0)
    if not half or dim % (half * 2**m):
        return None
    if any(perm != butterfly_view_permutation(dim, i, half) for i, perm in enumerate(perms)):
        return None
    return tuple(size for size in (dim // (half * 2**m), *(2,) * m, half) if size > 1)


def _as_view(gather: tuple[int, ...], radices: tuple[int, ...]) -> _View | None:
    """``gather`` as a permute of the digits ``radices`` (adjacent digits merged), or ``None``.

    The digits of the output, innermost first, are found from the index steps (each digit of the
    input has its own stride), then the whole index list is checked against the view.
    """
    dim, strides = len(gather), [1] * len(radices)
    for k in reversed(range(len(radices) - 1)):
        strides[k] = strides[k + 1] * radices[k + 1]
    order, span, left = [], 1, set(range(len(radices)))
    while left:
        step = gather[span] - gather[0] if span < dim else None
        digit = next((k for k in left if strides[k] == step), None)
        if digit is None:
            return None
        order.insert(0, digit)
        span *= radices[digit]
        left.remove(digit)
    index = torch.arange(dim).view(radices).permute(order).flatten()
    if tuple(index.tolist()) != gather:
        return None
    runs = [[order[0]]]  # output digits that stay adjacent and in order merge into one
    for digit in order[1:]:
        if digit == runs[-1][-1] + 1:
            runs[-1].append(digit)
        else:
            runs.append([digit])
    by_input = sorted(range(len(runs)), key=lambda k: runs[k][0])
    shape = tuple(math.prod(radices[d] for d in runs[k]) for k in by_input)
    rank = {k: j for j, k in enumerate(by_input)}
    return _View(shape, tuple(rank[k] for k in range(len(runs))))


class _Plan:
    """How to apply ``M`` (or ``M^T``) for one set of permutations: factor order and fused gathers.

    Row vectors go through ``x M = x F_{m-1} ⋯ F_0`` and ``x F_i = ((x P_i) B_i) P_i^T``, where
    ``x P_i`` is ``x[..., inv(perm_i)]`` and ``y P_i^T`` is ``y[..., perm_i]``; for ``x M^T`` the
    factors run ``F_0^T ⋯ F_{m-1}^T`` with transposed blocks. The gathers between two block products
    fuse into one, leaving ``m + 1`` index lists (``None`` where one is the identity).

    Chosen once per plan: butterfly permutations become :class:`_View` permutes (``views=True``
    and every fused gather is one); any other permutation keeps index gathers.
    """

    def __init__(self, perms: tuple[tuple[int, ...], ...], transpose: bool, views: bool = True) -> None:
        self.perms, self.transpose = perms, transpose
        self.order = tuple(range(len(perms))) if transpose else tuple(reversed(range(len(perms))))
        identity = tuple(range(len(perms[0])))
        gathers, pending = [], identity
        for i in self.order:
            gathers.append(_compose(pending, _inverse(perms[i])))
            pending = perms[i]
        gathers.append(pending)
        self.gathers = tuple(None if g == identity else g for g in gathers)
        self.views: tuple[tuple, tuple] | None = None
        radices = _butterfly_radices(perms) if views else None
        if radices is not None:
            found = [None if g is None else _as_view(g, radices) for g in self.gathers]
            if all((v is None) == (g is None) for v, g in zip(found, self.gathers)):
                self.views = tuple(found), tuple(None if v is None else v.inverse() for v in found)
        self.index_tensors: dict[torch.device, tuple[list, list]] = {}


def _plan_indices(plan: _Plan, device: torch.device) -> tuple[Sequence, Sequence]:
    """The gathers of ``plan`` and their inverses (for the backward pass): views, or index tensors
    on ``device`` (made once per device). Functions, not methods: under ``torch.compile`` the plan is
    a constant whose attributes are read at trace time."""
    if plan.views is not None:
        return plan.views
    if device not in plan.index_tensors:
        as_tensor = lambda g: None if g is None else torch.tensor(g, dtype=torch.long, device=device)  # noqa: E731
        plan.index_tensors[device] = (
            [as_tensor(g) for g in plan.gathers],
            [as_tensor(None if g is None else _inverse(g)) for g in plan.gathers],
        )
    return plan.index_tensors[device]


def _plan_factors(plan: _Plan, blocks: torch.Tensor) -> torch.Tensor:
    """Left factors of the block products on columns: ``(x B)^T = B^T x^T``, ``(x B^T)^T = B x^T``."""
    return blocks if plan.transpose else blocks.transpose(-1, -2)


@functools.lru_cache(maxsize=256)
def _cached_plan(perms: tuple[tuple[int, ...], ...], transpose: bool) -> _Plan:
    return _Plan(perms, transpose)


@torch.compiler.assume_constant_result
def _plan(perms: tuple[tuple[int, ...], ...], transpose: bool) -> _Plan:
    """The cached plan of ``perms``; under ``torch.compile`` it is made at trace time, a constant."""
    return _cached_plan(perms, transpose)


def _gather(cols: torch.Tensor, index: torch.Tensor | _View | None) -> torch.Tensor:
    """Rows of ``cols`` in ``index`` order, contiguous. A :class:`_View` is one strided copy
    (whatever the layout of ``cols``; contiguous even from an expanded gradient, which ``bmm``
    would otherwise take one batch entry at a time). For an index tensor, from a transposed view,
    transposing first and then gathering whole rows is about twice as fast as gathering strided rows."""
    if index is None:
        return cols
    if isinstance(index, _View):
        return (
            cols.unflatten(0, index.shape).permute(*index.dims, len(index.dims)).contiguous().view(cols.shape)
        )
    return cols.contiguous().index_select(0, index)


def _rotate_columns(
    cols: torch.Tensor, blocks: torch.Tensor, plan: _Plan, inputs_only: bool = False
) -> torch.Tensor | list[torch.Tensor]:
    """``(x M)^T`` (or ``(x M^T)^T``) from ``cols = x^T`` ``(d, n)``: the rotation on the transposed layout.

    With the rotated axis first, each gather moves whole rows (contiguous runs of ``n``) and each
    block product is one batched ``(r, b, b) @ (r, b, n)`` matmul on contiguous memory (about 3x
    faster on CPU than the same product on rows). ``inputs_only`` returns the inputs of the ``m``
    block products instead (for the gradient of the blocks).
    """
    d, n = cols.shape
    r, b = blocks.shape[1], blocks.shape[2]
    gathers, _ = _plan_indices(plan, cols.device)
    factors = _plan_factors(plan, blocks)
    inputs = []
    for step, i in enumerate(plan.order):
        cols = _gather(cols, gathers[step])
        if inputs_only:
            inputs.append(cols)
            if len(inputs) == len(plan.order):
                return inputs
        cols = torch.bmm(factors[i], cols.reshape(r, b, n)).view(d, n)
    return _gather(cols, gathers[-1])


class _Rotation(torch.autograd.Function):
    """``x M`` (or ``x M^T``) with a hand-written backward that saves only ``x`` and the blocks.

    Backward walks the factors in reverse: the gradient at each block product's output gives that
    factor's block gradient (against its recomputed input) and, through the transposed blocks and
    the inverse gathers, the gradient of ``x`` (``g M^T``). Recomputing the product inputs costs
    ``m - 1`` small products; saving them would cost ``m`` copies of ``x`` per layer.
    """

    @staticmethod
    def forward(ctx, rows, blocks, plan):  # noqa: D102
        ctx.save_for_backward(rows, blocks)
        ctx.plan = plan
        return _rotate_columns(rows.t(), blocks, plan).t()

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        rows, blocks = ctx.saved_tensors
        plan = ctx.plan
        # Autocast / checkpointing may hand back a gradient in another dtype: work in the rows' dtype.
        grad, work_blocks = grad.to(rows.dtype), blocks.to(rows.dtype)
        need_rows, need_blocks = ctx.needs_input_grad[:2]
        if not need_blocks:  # the gradient of x M is g M^T
            return (
                _rotate_columns(grad.t(), work_blocks, _plan(plan.perms, not plan.transpose)).t(),
                None,
                None,
            )
        inputs = _rotate_columns(rows.t(), work_blocks, plan, inputs_only=True)
        _, inverse = _plan_indices(plan, grad.device)
        m, r, b, _ = blocks.shape
        factors = _plan_factors(plan, work_blocks)
        # Contiguous, whatever the blocks' layout (LAPACK returns column-major): bmm writes into
        # a strided output one batch entry at a time, ten times slower.
        # In the activations' dtype (bf16/fp16 under mixed precision); cast to the blocks' at the end.
        grad_blocks = torch.empty(blocks.shape, dtype=grad.dtype, device=grad.device)
        g = _gather(grad.t(), inverse[-1])
        for step in reversed(range(m)):
            i, n = plan.order[step], g.shape[1]
            g3, x3 = g.reshape(r, b, n), inputs[step].reshape(r, b, n)
            # Per block, y^T = B^T x^T gives dB = x^T g^T; y^T = B x^T (transposed) gives dB = g x^T.
            left, right = (g3, x3) if plan.transpose else (x3, g3)
            torch.bmm(left, right.transpose(1, 2), out=grad_blocks[i])
            if step or need_rows:
                g = _gather(torch.bmm(factors[i].transpose(1, 2), g3).view(-1, n), inverse[step])
        return (g.t() if need_rows else None), grad_blocks.to(blocks.dtype), None


def _factored_rotation(rows: torch.Tensor, blocks: torch.Tensor, plan: _Plan) -> torch.Tensor:
    if torch.is_grad_enabled() and (rows.requires_grad or blocks.requires_grad):
        return _Rotation.apply(rows, blocks, plan)
    return _rotate_columns(rows.t(), blocks, plan).t()


MAX_COLLAPSED_BLOCK = 64
"""Largest ``b · 2^(m-1)`` for which :func:`apply_rotation` applies ``M`` as one block product."""


@functools.lru_cache(maxsize=256)
def _cached_identity_permutations(dim: int) -> tuple[tuple[int, ...], ...]:
    return (tuple(range(dim)),)


@torch.compiler.assume_constant_result
def _identity_permutations(dim: int) -> tuple[tuple[int, ...], ...]:
    return _cached_identity_permutations(dim)


def _collapsed_blocks(
    blocks: torch.Tensor, perms: tuple[tuple[int, ...], ...], transpose: bool
) -> torch.Tensor:
    """The diagonal blocks ``(1, d/S, S, S)`` of ``M`` (or ``M^T``), ``S = b · 2^(m-1)``.

    Factor ``i`` permutes only within groups of ``b · 2^i`` consecutive indices and its blocks stay
    inside those groups, so ``M = F_{m-1} ⋯ F_0`` is block-diagonal with blocks of size ``S``. They
    are the rows of a comb of identities rotated by the factored path: ``C = [I_S I_S ⋯] M`` holds
    block ``k`` in columns ``kS … kS + S - 1``. Cost ``O(S · d · b · m)``, independent of the input.
    """
    m, r, b, _ = blocks.shape
    size, dim = b * 2 ** (m - 1), r * b
    comb = torch.eye(size, device=blocks.device, dtype=blocks.dtype).repeat(1, dim // size)
    rows = _factored_rotation(comb, blocks, _plan(perms, transpose))
    return rows.reshape(size, dim // size, size).transpose(0, 1).unsqueeze(0)


def apply_rotation(
    x: torch.Tensor,
    blocks: torch.Tensor,
    perms: tuple[tuple[int, ...], ...],
    transpose: bool = False,
) -> torch.Tensor:
    """Rotate the last axis of ``x``: ``x M`` (or ``x M^T`` with ``transpose=True``).

    ``x``: ``(..., d)``; ``blocks``: ``(m, r, b, b)`` orthogonal blocks; ``perms``: the ``m``
    permutations of :func:`factor_permutations`. No ``d × d`` tensor. When ``M``'s diagonal blocks
    are small (``S = b · 2^(m-1) ≤`` :data:`MAX_COLLAPSED_BLOCK`) they are built first
    (:func:`_collapsed_blocks`) and ``x`` goes through one block product, ``O(n · d · S)`` and no
    gather: a single pass over ``x`` instead of ``m`` block products and ``m`` gathers, which on
    CPU is what costs. Deeper butterflies run factor by factor, ``O(n · d · b · m)``.
    The blocks are cast to ``x.dtype`` (so fp16/bf16 activations stay in their dtype). The result
    may be a transposed view (rows as the columns of a contiguous ``(d, n)`` buffer): matmuls take
    it as it is.
    """
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    m, _, b, _ = blocks.shape
    if rows.shape[0] > b * 2 ** (m - 1):
        # Built in the wider of the two dtypes (float32 blocks for bf16 inputs), then cast.
        blocks, perms, transpose = collapse_rotation(
            blocks.to(torch.promote_types(blocks.dtype, rows.dtype)), perms, transpose
        )
    out = _factored_rotation(rows, blocks.to(rows.dtype), _plan(perms, transpose))
    return out.reshape(shape)


def collapse_rotation(
    blocks: torch.Tensor, perms: tuple[tuple[int, ...], ...], transpose: bool = False
) -> tuple[torch.Tensor, tuple[tuple[int, ...], ...], bool]:
    """The same rotation as one block product where that is cheaper: ``(blocks, perms, transpose)``
    for :func:`apply_rotation`.

    When ``m > 1`` and ``S = b · 2^(m-1) ≤`` :data:`MAX_COLLAPSED_BLOCK`, ``M``'s (or ``M^T``'s)
    diagonal blocks ``(1, d/S, S, S)`` with the identity permutation (:func:`_collapsed_blocks`);
    otherwise the arguments unchanged. ``apply_rotation`` does this itself for inputs of more than
    ``S`` rows; a caller that applies the same rotation many times (unmerged inference) does it once.
    """
    m, r, b, _ = blocks.shape
    if m == 1 or b * 2 ** (m - 1) > MAX_COLLAPSED_BLOCK:
        return blocks, perms, transpose
    return _collapsed_blocks(blocks, perms, transpose), _identity_permutations(r * b), False


def dense_rotation(blocks: torch.Tensor, perms: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """The dense ``d × d`` rotation ``M = F_{m-1} ⋯ F_0`` (for merge and export only).

    Built by rotating the identity's rows: ``I M = M``, same cost class as one merge.
    """
    d = blocks.shape[1] * blocks.shape[2]
    eye = torch.eye(d, device=blocks.device, dtype=blocks.dtype)
    return apply_rotation(eye, blocks, perms)
