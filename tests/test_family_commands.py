"""The `sample` and `merge` commands on every transformer or SDXL family: a stock pipeline folder and a BOFT
adapter file in, the adapter's samples and a merged folder that stock diffusers opens out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from boft_diffusion import cli
from boft_diffusion.config import BOFTConfig
from boft_diffusion.families import family_of
from boft_diffusion.inject import adapter_state_dict
from boft_diffusion.io import load_boft_weights, save_boft_weights
from boft_diffusion.pipeline import add_boft_to_pipeline
from boft_diffusion.tiny import (
    build_tiny_flux2_pipeline,
    build_tiny_flux_pipeline,
    build_tiny_sd3_pipeline,
    build_tiny_sdxl_pipeline,
)

BUILDS = {
    "sdxl": build_tiny_sdxl_pipeline,
    "sd3": build_tiny_sd3_pipeline,
    "flux": build_tiny_flux_pipeline,
    "flux2": build_tiny_flux2_pipeline,
}
PROMPT = "a photo of sks toy"


def _sample(pipe, seed: int = 0) -> np.ndarray:
    image = pipe(
        prompt=PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(seed), height=64, width=64,
        output_type="np",
    ).images[0]  # fmt: skip
    return (image * 255).round().astype(np.uint8)


@pytest.mark.parametrize("family", list(BUILDS))
def test_sample_and_merge_commands_on_each_family(tmp_path, family):
    build = BUILDS[family]
    base = tmp_path / "base"
    build().save_pretrained(base)
    pipe = build()
    fam = family_of(pipe)
    add_boft_to_pipeline(
        pipe,
        {fam.denoiser: BOFTConfig(boft_block_size=4, target_modules=list(fam.default_targets[fam.denoiser]))},
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained-looking adapter: rotations away from the identity
        for key, value in adapter_state_dict(getattr(pipe, fam.denoiser)).items():
            if key.endswith("boft_R"):
                value.copy_(torch.randn(value.shape, generator=generator))
    save_boft_weights(pipe, tmp_path / "adapter", metadata={"family": fam.name})
    adapted = _sample(pipe)

    common = ["--base", str(base), "--prompt", PROMPT, "--num-images", "1", "--steps", "2", "--seed", "0"]
    common += ["--height", "64", "--width", "64", "--guidance-scale", str(_guidance(pipe))]
    assert (
        cli.main(
            ["sample", *common, "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "a.png")]
        )
        == 0
    )
    assert cli.main(["sample", *common, "--out", str(tmp_path / "b.png")]) == 0
    with_adapter = np.asarray(Image.open(tmp_path / "a.png").convert("RGB"))
    without = np.asarray(Image.open(tmp_path / "b.png").convert("RGB"))
    assert with_adapter.shape == (64, 64, 3)
    assert np.abs(with_adapter.astype(int) - adapted.astype(int)).max() <= 1  # the adapter's samples
    assert np.abs(without.astype(int) - adapted.astype(int)).max() >= 3  # ... and not the base's

    merged = tmp_path / "merged"
    assert (
        cli.main(["merge", "--base", str(base), "--adapter", str(tmp_path / "adapter"), "--out", str(merged)])
        == 0
    )
    exported = type(pipe).from_pretrained(merged)
    exported.set_progress_bar_config(disable=True)
    assert (
        np.abs(_sample(exported).astype(int) - adapted.astype(int)).max() <= 3
    )  # merged = adapter, to rounding
    fresh = build()
    load_boft_weights(fresh, tmp_path / "adapter")
    assert np.array_equal(_sample(fresh), adapted)


def _guidance(pipe) -> float:
    """The guidance the sample command is given: the pipeline's own default, so `sample` and a direct call
    agree on everything but the adapter."""
    import inspect

    return inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default
