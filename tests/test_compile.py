"""``torch.compile(fullgraph=True)`` of a BOFT layer and of the functional rotation matches eager.

``fullgraph=True`` makes Dynamo refuse any graph break, which is what compatibility means here; the
``aot_eager`` backend then runs AOT autograd on the captured graph (forward and backward) without
inductor's C++ code generation, which costs about 45 s per graph on this CPU (a one-off inductor run of
both tests matched eager to the same tolerance). Tiny shapes.
"""

from __future__ import annotations

import torch

from boft_diffusion import BOFTConfig
from boft_diffusion.functional import apply_rotation, block_rotations, factor_permutations, num_free_entries
from boft_diffusion.layers import BOFTLinear

BACKEND = "aot_eager"


def _grads(*tensors):
    grads = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return grads


def test_compiled_boft_linear_matches_eager():
    """Input path (3 tokens < 8 outputs), two butterfly factors: the view path inside the custom
    autograd Functions (rotation and Cayley), plan and permutations constants of the graph."""
    torch.manual_seed(0)
    layer = BOFTLinear(torch.nn.Linear(16, 8))
    layer.add_adapter("default", BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False))
    params = (layer.boft_R["default"], layer.boft_s["default"], layer.base_layer.weight)
    x = torch.randn(3, 16, requires_grad=True)
    target = torch.randn(3, 8)

    (layer(x) * target).sum().backward()
    eager = [layer(x).detach(), *_grads(x, *params)]
    compiled = torch.compile(layer, fullgraph=True, backend=BACKEND)
    out = compiled(x)
    (out * target).sum().backward()
    for got, want in zip([out.detach(), *_grads(x, *params)], eager):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_compiled_rotation_matches_eager():
    """Generators -> blocks -> ``x M`` and ``x M^T`` on a three-factor butterfly (factor by factor)."""
    dim, b, m = 24, 2, 3
    perms = factor_permutations(dim, dim // b, b, m)
    packed = (0.5 * torch.randn(m, dim // b, num_free_entries(b))).requires_grad_()
    x = torch.randn(5, dim, requires_grad=True)

    def rotate(x, packed):
        blocks = block_rotations(packed, b, 0.7)
        return apply_rotation(x, blocks, perms) - 2.0 * apply_rotation(x, blocks, perms, transpose=True)

    weight = torch.randn(5, dim)
    (rotate(x, packed) * weight).sum().backward()
    eager = [rotate(x, packed).detach(), *_grads(x, packed)]
    out = torch.compile(rotate, fullgraph=True, backend=BACKEND)(x, packed)
    (out * weight).sum().backward()
    for got, want in zip([out.detach(), *_grads(x, packed)], eager):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
