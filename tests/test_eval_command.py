"""``boft-diffusion eval`` and ``base_fingerprint``, on random tiny pipelines saved to disk and a tiny
random CLIP scorer (the pretrained tiny weights are not needed)."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from boft_diffusion import BOFTConfig, add_boft_to_pipeline, base_fingerprint, cli, save_boft_weights
from boft_diffusion.commands import eval as eval_cmd
from boft_diffusion.metrics import GUTTER
from boft_diffusion.tiny import build_tiny_pipeline, build_tiny_tokenizer

UNET = BOFTConfig(boft_block_size=4, init_weights=False)
FAST = ["--num-images", "1", "--steps", "2"]
PROMPTS = [
    "--instance-prompt",
    "a photo of sks toy",
    "--class-prompt",
    "a photo of a star",
    "--context-prompt",
    "a photo of sks toy on a blue background",
]


def invoke(argv: list) -> int:
    return cli.main(["eval", *map(str, argv)])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def adapter_on(pipe, folder, fingerprint: str | None = None):
    """An adapter (random rotations) trained, as its metadata says, on a base with ``fingerprint``."""
    torch.manual_seed(0)
    add_boft_to_pipeline(pipe, {"unet": UNET})
    metadata = {"base_model": "tiny random"} | ({"base_fingerprint": fingerprint} if fingerprint else {})
    save_boft_weights(pipe, folder, metadata=metadata)
    return folder


def tiny_clip(folder):
    """A random CLIP model (32 px images, the tiny tokenizer) saved as a transformers folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = build_tiny_tokenizer()
    config = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=len(tokenizer),
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder
    )
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved random base, an adapter trained on it, one trained on another base, a CLIP scorer, images."""
    root = tmp_path_factory.mktemp("eval")
    base = build_tiny_pipeline(weights="random", seed=0)
    base.save_pretrained(root / "base")
    fingerprint = base_fingerprint(base)
    other = build_tiny_pipeline(weights="random", seed=1)
    paths = {
        "root": root,
        "base": root / "base",
        "fingerprint": fingerprint,
        "adapter": adapter_on(base, root / "adapter", fingerprint),
        "other": adapter_on(other, root / "other", base_fingerprint(other)),
        "clip": tiny_clip(root / "clip"),
        "instances": root / "instances",
    }
    (root / "junk.safetensors").write_text("this is not a safetensors file")
    paths["instances"].mkdir()
    for i, colour in enumerate(("red", "teal")):
        Image.new("RGB", (48, 48), colour).save(paths["instances"] / f"{i}.png")
    return paths


def user_args(files, *extra, adapter=None, scorer: str | None = "clip", prompts=PROMPTS) -> list:
    """``eval`` arguments for the saved base: its adapter, the images, the prompts and the CLIP scorer."""
    scorer = f"clip:{files['clip']}" if scorer == "clip" else scorer
    return [
        adapter or files["adapter"],
        "--base",
        files["base"],
        "--instance-dir",
        files["instances"],
        *prompts,
        *(["--scorer", scorer] if scorer else []),
        *FAST,
        *extra,
    ]


# --- base_fingerprint ----------------------------------------------------------------------------
def test_fingerprint_is_the_same_for_the_same_weights_and_differs_for_others():
    first = base_fingerprint(build_tiny_pipeline(weights="random", seed=0))
    assert first.startswith("sha256:") and len(first) == len("sha256:") + 16
    assert base_fingerprint(build_tiny_pipeline(weights="random", seed=0)) == first
    assert base_fingerprint(build_tiny_pipeline(weights="random", seed=1)) != first


def test_fingerprint_ignores_an_attached_adapter():
    pipe = build_tiny_pipeline(weights="random", seed=0)
    before = base_fingerprint(pipe)
    text = BOFTConfig(
        boft_block_size=4, init_weights=False, bias="boft_only", modules_to_save=["final_layer_norm"]
    )
    add_boft_to_pipeline(pipe, {"unet": UNET, "text_encoder": text})
    assert base_fingerprint(pipe) == before
    assert base_fingerprint(pipe, ["unet"]) == base_fingerprint(
        build_tiny_pipeline(weights="random"), ["unet"]
    )


def test_fingerprint_agrees_across_load_dtypes(files):
    """float32 and bfloat16 loads agree; a float16 load agrees with the float32 load's float16 variant."""
    from diffusers import StableDiffusionPipeline

    fingerprint = files["fingerprint"]
    loads = {
        dtype: StableDiffusionPipeline.from_pretrained(files["base"], torch_dtype=dtype)
        for dtype in (torch.float32, torch.bfloat16, torch.float16)
    }
    assert base_fingerprint(loads[torch.float32]) == fingerprint
    assert base_fingerprint(loads[torch.bfloat16]) == fingerprint
    assert base_fingerprint(loads[torch.float16]) == base_fingerprint(
        loads[torch.float32], as_dtype=torch.float16
    )


# --- eval ----------------------------------------------------------------------------------------
def test_help_shows_an_example(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["eval", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and "boft-diffusion eval " in out and "--context-prompt" in out
    assert eval_cmd.COMMAND.run is eval_cmd.run


def test_eval_writes_metrics_before_and_after_and_a_grid(files, tmp_path, capsys):
    out, grid = tmp_path / "metrics.json", tmp_path / "grid.png"
    assert invoke(user_args(files, "--out", out, "--grid", grid)) == 0
    report = json.loads(out.read_text())
    assert {"adapter", "base", "scorer", "probe", "before", "after"} <= set(report)
    assert report["probe"]["num_images"] == 1 and report["scorer"] == f"clip:{files['clip']}"
    assert set(report["before"]) == set(report["after"]) and report["before"]
    prompts = ["a photo of sks toy", "a photo of sks toy on a blue background", "a photo of a star"]
    for stage in ("before", "after"):
        assert list(report["per_prompt"][stage]) == prompts
        assert report["per_prompt"][stage][prompts[2]] == {"class_drift": report[stage]["class_drift"]}
    stdout = capsys.readouterr().out
    assert all(metric in stdout for metric in report["before"]) and "before" in stdout
    assert "per prompt:" in stdout and "a photo of sks toy on a blue background" in stdout
    rows, cols, cell = 3, 2, 64  # instance, class and context prompt; one image before, one after
    with Image.open(grid) as image:
        assert image.size == (cols * cell + (cols - 1) * GUTTER, rows * cell + (rows - 1) * GUTTER)


def test_eval_default_out_is_next_to_the_adapter_one_without_a_fingerprint_warns(files, tmp_path, capsys):
    adapter = adapter_on(build_tiny_pipeline(weights="random", seed=0), tmp_path / "adapter")
    assert invoke(user_args(files, adapter=adapter)) == 0
    assert "after" in json.loads((adapter / "eval_metrics.json").read_text())
    assert "records no base_fingerprint" in capsys.readouterr().err
    assert invoke(user_args(files, adapter=adapter)) == 2  # it exists now
    assert "already exists" in one_error_line(capsys)


def test_an_adapter_of_another_base_is_refused(files, tmp_path, capsys):
    args = user_args(
        files, "--out", tmp_path / "metrics.json", "--grid", tmp_path / "grid.png", adapter=files["other"]
    )
    assert invoke(args) == 2
    line = one_error_line(capsys)
    assert "trained on another base model" in line and "tiny random" in line and files["fingerprint"] in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "case, expect",
    [
        ("missing scorer", "no-such-clip"),
        ("empty context prompt", "--context-prompt"),
        ("blank context prompt", "--context-prompt"),
        ("no scorer", "--scorer clip:PATH"),
        ("world scorer", "--scorer world"),
        ("no prompts", "--instance-prompt"),
        ("no adapter", "no such adapter"),
        ("broken adapter", "junk.safetensors"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(files, tmp_path, case, expect, capsys):
    out = ["--out", tmp_path / "m.json", "--grid", tmp_path / "g.png"]
    args = {
        "missing scorer": lambda: user_args(files, *out, scorer=f"clip:{files['root']}/no-such-clip"),
        "empty context prompt": lambda: user_args(files, *out, "--context-prompt", ""),
        "blank context prompt": lambda: user_args(files, *out, "--context-prompt", "  "),
        "no scorer": lambda: user_args(files, *out, scorer=None),
        "world scorer": lambda: user_args(files, *out, scorer="world"),
        "no prompts": lambda: user_args(files, *out, prompts=[]),
        "no adapter": lambda: user_args(files, *out, adapter=files["root"] / "nope"),
        "broken adapter": lambda: user_args(files, *out, adapter=files["root"] / "junk.safetensors"),
    }[case]()
    assert invoke(args) == 2
    assert expect in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_out_is_kept_without_overwrite(files, tmp_path, capsys):
    out = tmp_path / "metrics.json"
    out.write_text("mine")
    assert invoke(user_args(files, "--out", out)) == 2
    assert "already exists" in one_error_line(capsys)
    assert out.read_text() == "mine"
