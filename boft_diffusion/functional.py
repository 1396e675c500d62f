"""Pure tensor math of BOFT (Orthogonal Butterfly finetuning, Liu et al., arXiv 2311.06243).

Notation (PEFT-compatible): an adapted axis of size ``d`` holds ``m`` butterfly factors, each
block-diagonal with ``r`` blocks of size ``b`` (``r * b = d``). Factor ``i`` is
``F_i = P_i · blockdiag(R_i1..R_ir) · P_i^T`` with ``P_i[j, perm_i[j]] = 1`` (PEFT's
``block_butterfly_perm``), the layer's rotation is ``M = F_{m-1} ⋯ F_0`` and inputs rotate as
``x -> x M``.

Each block is the Cayley transform ``R = (I - Q)(I + Q)^-1`` of a skew-symmetric ``Q``. Only the
``b(b-1)/2`` free entries of ``Q`` are stored ("packed" generators, shape ``(m, r, b(b-1)/2)``);
:func:`pack_skew` / :func:`unpack_skew` convert exactly to and from PEFT's full ``b × b`` layout.

Nothing here builds a dense ``d × d`` matrix except :func:`dense_rotation` (merge and export only):
each factor is applied as one gather plus one batched ``b × b`` matmul over the ``r`` blocks, and
the gathers of consecutive factors are fused.
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "apply_rotation",
    "block_rotations",
    "butterfly_permutation",
    "cayley",
    "dense_rotation",
    "factor_permutations",
    "multiplicative_dropout",
    "num_free_entries",
    "pack_skew",
    "unpack_skew",
]


def num_free_entries(block_size: int) -> int:
    """Free entries of a ``b × b`` skew-symmetric matrix: ``b(b-1)/2``."""
    return block_size * (block_size - 1) // 2


@functools.lru_cache(maxsize=64)
def _triu_indices(block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.triu_indices(block_size, block_size, offset=1)
    return rows, cols


def unpack_skew(packed: torch.Tensor, block_size: int) -> torch.Tensor:
    """Packed generators ``(..., b(b-1)/2)`` -> skew-symmetric ``Q`` ``(..., b, b)``.

    ``packed[..., k]`` is ``Q[i, j]`` for the k-th pair ``i < j`` in row-major order.
    """
    rows, cols = _triu_indices(block_size)
    upper = packed.new_zeros(*packed.shape[:-1], block_size, block_size)
    upper[..., rows.to(packed.device), cols.to(packed.device)] = packed
    return upper - upper.transpose(-1, -2)


def pack_skew(matrix: torch.Tensor) -> torch.Tensor:
    """Full generators ``A`` ``(..., b, b)`` -> packed free entries of ``Q = (A - A^T) / 2``.

    This is exactly PEFT's convention (``cayley_batch`` skew-symmetrises its ``boft_R``), so
    ``unpack_skew(pack_skew(A))`` is the ``Q`` PEFT uses, and ``pack_skew(Q) == Q[triu]``.
    """
    block_size = matrix.shape[-1]
    rows, cols = _triu_indices(block_size)
    skew = 0.5 * (matrix - matrix.transpose(-1, -2))
    return skew[..., rows.to(matrix.device), cols.to(matrix.device)]


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """Cayley transform ``R = (I - Q)(I + Q)^-1`` of skew-symmetric ``Q`` ``(..., b, b)``.

    Computed in float32 by a linear solve (``X (I + Q) = I - Q``), never an explicit inverse.
    ``I + Q`` is always invertible for real skew ``Q`` (its eigenvalues are ``1 + iλ``).
    Returns float32 orthogonal blocks of the same shape.
    """
    q = skew.float()
    eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
    return torch.linalg.solve(eye + q, eye - q, left=False)


def block_rotations(packed: torch.Tensor, block_size: int, strength: float = 1.0) -> torch.Tensor:
    """Packed generators ``(m, r, b(b-1)/2)`` -> orthogonal blocks ``(m, r, b, b)`` in float32.

    ``strength`` ``w`` scales the generator, ``R(w) = Cayley(w Q)``: orthogonal for every ``w``,
    the identity at ``w = 0``.
    """
    skew = unpack_skew(packed.float(), block_size)
    if strength != 1.0:
        skew = skew * strength
    return cayley(skew)


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


@functools.lru_cache(maxsize=256)
def factor_permutations(
    dim: int, block_num: int, block_size: int, n_factors: int
) -> tuple[tuple[int, ...], ...]:
    """The ``m`` butterfly permutations ``perm_i`` of one layer, PEFT's index order.

    Factor ``i`` uses ``butterfly_permutation(dim, block_num / 2^i, block_size / 2, m > 1)``.
    """
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


@functools.lru_cache(maxsize=256)
def _gather_plan(perms: tuple[tuple[int, ...], ...], transpose: bool) -> tuple[tuple[int, ...] | None, ...]:
    """Fused gathers around the block products: ``len(perms) + 1`` index lists (``None`` = identity).

    Row vectors ``x`` go through ``x M = x F_{m-1} ⋯ F_0`` and ``x F_i = ((x P_i) B_i) P_i^T``, where
    ``x P_i`` is ``x[..., inv(perm_i)]`` and ``y P_i^T`` is ``y[..., perm_i]``. For ``x M^T`` the
    factors run ``F_0^T ⋯ F_{m-1}^T`` with transposed blocks. Gathers between two block products fuse.
    """
    order = list(range(len(perms)))
    if not transpose:
        order.reverse()
    plan: list[tuple[int, ...]] = []
    pending = tuple(range(len(perms[0])))
    for i in order:
        plan.append(_compose(pending, _inverse(perms[i])))
        pending = perms[i]
    plan.append(pending)
    identity = tuple(range(len(perms[0])))
    return tuple(None if p == identity else p for p in plan)


_INDEX_CACHE: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def _index(perm: tuple[int, ...], device: torch.device) -> torch.Tensor:
    key = (perm, device)
    index = _INDEX_CACHE.get(key)
    if index is None:
        index = torch.tensor(perm, dtype=torch.long, device=device)
        _INDEX_CACHE[key] = index
    return index


def _block_product(x: torch.Tensor, blocks: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``x`` ``(n, r*b)`` times ``blockdiag(blocks)`` (or its transpose), blocks ``(r, b, b)``."""
    n = x.shape[0]
    r, b, _ = blocks.shape
    if transpose:
        blocks = blocks.transpose(-1, -2)
    out = torch.bmm(x.view(n, r, b).transpose(0, 1), blocks)  # (r, n, b)
    return out.transpose(0, 1).reshape(n, r * b)


def apply_rotation(
    x: torch.Tensor,
    blocks: torch.Tensor,
    perms: tuple[tuple[int, ...], ...],
    transpose: bool = False,
) -> torch.Tensor:
    """Rotate the last axis of ``x``: ``x M`` (or ``x M^T`` with ``transpose=True``).

    ``x``: ``(..., d)``; ``blocks``: ``(m, r, b, b)`` orthogonal blocks; ``perms``: the ``m``
    permutations of :func:`factor_permutations`. Cost ``O(n · d · b · m)`` and no ``d × d`` tensor.
    The blocks are cast to ``x.dtype`` (so fp16/bf16 activations stay in their dtype).
    """
    shape = x.shape
    y = x.reshape(-1, shape[-1])
    blocks = blocks.to(y.dtype)
    plan = _gather_plan(perms, transpose)
    order = range(len(perms)) if transpose else reversed(range(len(perms)))
    for step, i in enumerate(order):
        if plan[step] is not None:
            y = y.index_select(1, _index(plan[step], y.device))
        y = _block_product(y, blocks[i], transpose)
    if plan[-1] is not None:
        y = y.index_select(1, _index(plan[-1], y.device))
    return y.reshape(shape)


def dense_rotation(blocks: torch.Tensor, perms: tuple[tuple[int, ...], ...]) -> torch.Tensor:
    """The dense ``d × d`` rotation ``M = F_{m-1} ⋯ F_0`` (for merge and export only).

    Built by rotating the identity's rows: ``I M = M``, same cost class as one merge.
    """
    d = blocks.shape[1] * blocks.shape[2]
    eye = torch.eye(d, device=blocks.device, dtype=blocks.dtype)
    return apply_rotation(eye, blocks, perms)
