"""Multiplicative dropout acts in training only: a BOFT layer wrapping a layer in eval mode (as every loader
wraps a pipeline's) starts in eval mode, so a loaded adapter samples deterministically."""

from __future__ import annotations

import torch
from torch import nn

from boft_diffusion import BOFTConfig, add_boft


def _model(training: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Conv2d(16, 16, 3, padding=1))
    return model.train(training)


def _adapted(training: bool) -> nn.Module:
    config = BOFTConfig(
        boft_block_size=4, boft_block_num=0, boft_dropout=0.5, target_modules=["0", "1"], init_weights=False
    )
    return add_boft(_model(training), config)


def test_wrapping_a_layer_in_eval_mode_keeps_dropout_off():
    model = _adapted(training=False)
    wrappers = [m for m in model.modules() if hasattr(m, "boft_R")]
    assert len(wrappers) == 2 and not any(m.training for m in wrappers)
    x, image = torch.randn(3, 64), torch.randn(1, 16, 8, 8)
    assert torch.equal(model[0](x), model[0](x))
    assert torch.equal(model[1](image), model[1](image))


def test_in_training_mode_dropout_acts():
    model = _adapted(training=True)
    x = torch.randn(3, 64)
    torch.manual_seed(1)
    first = model[0](x)
    assert any(not torch.equal(first, model[0](x)) for _ in range(5))  # 8 of 16 blocks dropped at random
    model.eval()
    assert torch.equal(model[0](x), model[0](x))
