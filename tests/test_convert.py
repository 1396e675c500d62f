"""BOFT -> LoRA (truncated SVD) and the exact full-difference export, on the embedded tiny pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from conftest import DREAMBOOTH_FAST
from safetensors import safe_open
from safetensors.torch import load_file

from boft_diffusion import BOFTConfig, add_boft_to_pipeline, base_fingerprint
from boft_diffusion.cli import main
from boft_diffusion.commands.convert import sample_images
from boft_diffusion.export.lora import (
    BaseMismatchError,
    ConvertError,
    convert_to_lora,
    export_diff,
    kohya_name,
    layer_deltas,
)
from boft_diffusion.inject import boft_layers
from boft_diffusion.io import load_boft_weights
from boft_diffusion.recipes.dreambooth import DreamBoothConfig, run
from boft_diffusion.tiny import TINY_RESOLUTION, build_tiny_pipeline, save_tiny_pipeline
from boft_diffusion.training.args import load_config

PROMPTS = ["a photo of sks toy", "a photo of a toy"]
STEPS = 4
BUDGETS = [0.3, 0.1, 0.01, 0.001]


def images(pipe) -> np.ndarray:
    return sample_images(pipe, PROMPTS, 0, STEPS, TINY_RESOLUTION)


def max_pixel_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max() * 255)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A DreamBooth adapter (UNet and text encoder, biases untrained) after 4 steps, and its images."""
    out = tmp_path_factory.mktemp("convert") / "run"
    cfg = load_config(
        DreamBoothConfig,
        None,
        [f"train.output_dir={out}", *DREAMBOOTH_FAST, "train.max_train_steps=4", "boft.bias=none"],
    )
    run(cfg)
    pipe = build_tiny_pipeline()
    load_boft_weights(pipe, out)
    return out, pipe, images(pipe)


@pytest.fixture(scope="module")
def biased():
    """A random (non-identity) adapter that also changes biases (``bias="boft_only"``)."""
    pipe = build_tiny_pipeline()
    unet = BOFTConfig(
        boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2, bias="boft_only", init_weights=False
    )
    text = BOFTConfig(boft_block_size=0, boft_block_num=4, bias="boft_only", init_weights=False)
    torch.manual_seed(0)
    add_boft_to_pipeline(pipe, {"unet": unet, "text_encoder": text})
    with torch.no_grad():
        for module in (pipe.unet, pipe.text_encoder):
            for layer in boft_layers(module).values():
                for bias in layer.boft_bias.values():
                    bias.add_(0.01 * torch.randn_like(bias))
    return pipe


def test_budgets_are_met_and_pixels_converge(trained, tmp_path):
    _, pipe, boft = trained
    diffs, sizes = [], []
    for budget in BUDGETS:
        report = convert_to_lora(pipe, tmp_path / f"lora_{budget}.safetensors", budget=budget)
        assert report.layers and all(layer.error <= budget for layer in report.layers)
        sizes.append(report.file_size)
        lora = build_tiny_pipeline()
        lora.load_lora_weights(str(report.path))
        diffs.append(max_pixel_diff(images(lora), boft))
    print("budgets", BUDGETS, "pixel differences", diffs, "sizes", sizes)
    assert all(b <= a for a, b in zip(diffs, diffs[1:])), diffs
    assert diffs[-1] < diffs[0] and diffs[-1] < 0.1
    assert sizes == sorted(sizes)


def test_fixed_rank_and_max_rank(trained, tmp_path):
    _, pipe, _ = trained
    report = convert_to_lora(pipe, tmp_path / "r4.safetensors", rank=4)
    assert {layer.rank for layer in report.layers} == {4}
    tensors = load_file(report.path)
    assert all(t.shape[0] == 4 for k, t in tensors.items() if k.endswith("lora_A.weight"))
    capped = convert_to_lora(pipe, tmp_path / "cap.safetensors", budget=0.001, max_rank=3)
    assert max(layer.rank for layer in capped.layers) == 3
    assert "rank" in capped.table() and "KiB" in capped.table()


@pytest.mark.slow
def test_diffusers_file_loads_without_this_package(trained, tmp_path):
    """A stock diffusers process (this package blocked) loads the file and samples what BOFT samples."""
    _, pipe, boft = trained
    base = save_tiny_pipeline(tmp_path / "base")
    lora = convert_to_lora(pipe, tmp_path / "lora", budget=0.001).path  # a folder: load_lora_weights(folder)
    assert lora.name == "pytorch_lora_weights.safetensors"
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["boft_diffusion"] = None
        import numpy as np, torch
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained({str(base)!r})
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights({str(lora.parent)!r})
        g = [torch.Generator().manual_seed(i) for i in range({len(PROMPTS)})]  # image i from seed 0 + i
        out = pipe({PROMPTS!r}, num_inference_steps={STEPS}, generator=g, output_type="np",
                   height={TINY_RESOLUTION}, width={TINY_RESOLUTION}).images
        np.save({str(tmp_path / "images.npy")!r}, out)
        assert not any(m.startswith("boft_diffusion.") for m in sys.modules)
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert max_pixel_diff(np.load(tmp_path / "images.npy"), boft) < 0.1


def test_kohya_file_matches_diffusers_file(trained, tmp_path):
    _, pipe, _ = trained
    diffusers_file = convert_to_lora(pipe, tmp_path / "d.safetensors", budget=0.05).path
    kohya = convert_to_lora(pipe, tmp_path / "k.safetensors", budget=0.05, format="kohya")
    keys = set(load_file(kohya.path))
    to_q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert f"lora_unet_{to_q.replace('.', '_')}.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in keys
    assert f"lora_unet_{to_q.replace('.', '_')}.alpha" in keys
    assert not kohya.notes
    results = []
    for path in (diffusers_file, kohya.path):
        lora = build_tiny_pipeline()
        lora.load_lora_weights(str(path))
        results.append(images(lora))
    assert max_pixel_diff(*results) < 0.01


def test_diff_is_exact(trained, biased, tmp_path):
    for pipe in (trained[1], biased):
        report = export_diff(pipe, tmp_path / f"diff{id(pipe)}.safetensors")
        tensors = load_file(report.path)
        deltas = layer_deltas(pipe, keep=True)
        assert report.max_abs_error < 1e-7
        assert len(deltas) == len(report.layers) and report.file_size > 0
        inexact = 0
        for delta in deltas:
            name = kohya_name(delta.component, delta.path, ["unet", "text_encoder"])
            applied = delta.base + tensors[f"{name}.diff"]
            exact = applied == delta.merged
            inexact += int((~exact).sum())
            if bool(exact.all()):
                torch.testing.assert_close(applied, delta.merged, rtol=0, atol=0)
            # Where float32 holds no exact difference, W + diff is within one ulp of the larger of W, W'.
            ulp = torch.finfo(torch.float32).eps * torch.maximum(delta.base.abs(), delta.merged.abs())
            assert bool(((applied - delta.merged).abs() <= ulp).all())
            if delta.bias is not None:
                assert torch.equal(delta.base_bias + tensors[f"{name}.diff_b"], delta.merged_bias)
        assert inexact == report.inexact
        naive = sum(int(((d.base + (d.merged - d.base)) != d.merged).sum()) for d in deltas)
        assert inexact <= naive  # float32 holds no exact difference where |W| >> |W'| (or W' across a binade)
        print("diff export: inexact", inexact, "naive", naive, "of", sum(d.delta.numel() for d in deltas))
    assert any(k.endswith(".diff_b") for k in tensors)  # the biased adapter's biases


def test_bias_changes(biased, tmp_path):
    boft = images(biased)
    report = convert_to_lora(biased, tmp_path / "b.safetensors", budget=0.001)
    tensors = load_file(report.path)
    assert any(k.endswith("lora_B.bias") for k in tensors)
    with safe_open(report.path, "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["unet.lora_bias"] is True and metadata["unet.lora_alpha"] == metadata["unet.r"]
    lora = build_tiny_pipeline()
    lora.load_lora_weights(str(report.path))
    assert max_pixel_diff(images(lora), boft) < 0.5
    kohya = convert_to_lora(biased, tmp_path / "bk.safetensors", budget=0.01, format="kohya")
    assert any(k.endswith(".diff_b") for k in load_file(kohya.path)) and kohya.notes


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_bad_input_is_refused_and_nothing_written(trained, tmp_path):
    _, pipe, _ = trained
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep")
    before = _listing(tmp_path)
    out = tmp_path / "new.safetensors"
    cases = [
        (build_tiny_pipeline(), {"budget": 0.1}, "no BOFT adapter"),
        (pipe, {"budget": 0.0}, "budget"),
        (pipe, {"budget": 1.0}, "budget"),
        (pipe, {"budget": -0.5}, "budget"),
        (pipe, {"rank": 33}, "above min"),
        (pipe, {"rank": 2, "budget": 0.1}, "exactly one"),
        (pipe, {}, "exactly one"),
        (pipe, {"budget": 0.1, "format": "ckpt"}, "format"),
        (pipe, {"budget": 0.1, "base_fingerprint": "sha256:0000000000000000"}, "sha256:0000000000000000"),
    ]
    for target, kwargs, message in cases:
        with pytest.raises(ConvertError, match=message):
            convert_to_lora(target, out, **kwargs)
    with pytest.raises(ConvertError, match="already exists"):
        convert_to_lora(pipe, existing, budget=0.1)
    with pytest.raises(ConvertError, match="already exists"):
        export_diff(pipe, existing)
    with pytest.raises(BaseMismatchError, match=base_fingerprint(pipe)):
        export_diff(pipe, out, base_fingerprint="sha256:1111111111111111")
    with pytest.raises(ConvertError, match="no BOFT adapter"):
        export_diff(build_tiny_pipeline(), out)
    assert _listing(tmp_path) == before and existing.read_bytes() == b"keep"
    report = convert_to_lora(pipe, existing, rank=1, overwrite=True)
    assert report.path == existing and existing.read_bytes() != b"keep"


def test_cli_end_to_end(trained, tmp_path, capsys):
    adapter = trained[0]
    out = tmp_path / "cli.safetensors"
    argv = ["convert", "--adapter", str(adapter), "--to", "lora", "--error-budget", "0.05", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "rel. error" in printed and "KiB" in printed and "largest pixel difference" in printed
    pixel = float(printed.split("largest pixel difference")[1].split(":")[-1].split()[0])
    # Small against 255 (a 0.3 budget gives tens of levels): 1-2 levels when both images shared one
    # generator, 3.5 since each image has its own seed (sampling.seeded_images), on this 4-step adapter.
    assert pixel < 5.0
    assert main(argv) == 2  # the output exists now
    assert "already exists" in capsys.readouterr().err
    assert main(["convert", "--adapter", str(adapter), "--to", "lora", "--out", str(tmp_path / "x")]) == 2
    assert main(["convert", "--adapter", str(adapter), "--to", "diff", "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "boft_diff.safetensors").is_file()
    assert not (tmp_path / "x").exists()


def test_a_kohya_file_without_text_encoder_out_proj_skips_the_pixel_check_and_says_why(tmp_path, capsys):
    """diffusers infers a converted kohya text-encoder LoRA's format from its 'to_out_lora' keys: the DreamBooth
    default adapts only q_proj / k_proj there, so the check would fail inside diffusers. It is skipped, saying why,
    and the diffusers-format file of the same adapter does load."""
    out = tmp_path / "run"
    overrides = [
        *DREAMBOOTH_FAST,
        "train.max_train_steps=2",
        "boft.bias=none",
        "boft.text_encoder_target_modules=[q_proj,k_proj]",
    ]
    run(load_config(DreamBoothConfig, None, [f"train.output_dir={out}", *overrides]))
    kohya = ["convert", "--adapter", str(out), "--to", "lora", "--error-budget", "0.05"]
    assert main([*kohya, "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 0
    printed = capsys.readouterr().out
    assert "pixel check skipped" in printed and "out_proj" in printed and "largest pixel" not in printed
    assert main([*kohya, "--out", str(tmp_path / "d.safetensors")]) == 0
    assert "largest pixel difference" in capsys.readouterr().out
