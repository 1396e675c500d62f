"""The sample, merge, inspect and bench commands, run in-process through ``cli.main`` on the tiny pipeline
saved to disk."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import sample_images
from PIL import Image
from safetensors import safe_open

from boft_diffusion import (
    BOFTConfig,
    add_boft_to_pipeline,
    cli,
    merge_boft,
    save_boft_weights,
    set_boft_adapters,
)
from boft_diffusion.commands import CommandError, parse_adapter_spec
from boft_diffusion.commands import inspect as inspect_cmd
from boft_diffusion.commands import merge as merge_cmd
from boft_diffusion.commands import sample as sample_cmd
from boft_diffusion.io import read_adapter, write_adapter
from boft_diffusion.tiny import build_tiny_pipeline, save_tiny_pipeline

COMMANDS = {"sample": sample_cmd, "merge": merge_cmd, "inspect": inspect_cmd}
UNET = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False)
TEXT = BOFTConfig(boft_block_size=4, init_weights=False)


def invoke(module, argv: list) -> int:
    """``boft-diffusion <verb of module> ARGV`` in-process."""
    return cli.main([module.__name__.rpartition(".")[2], *map(str, argv)])


def adapter_pipe(seed: int, name: str = "default"):
    pipe = build_tiny_pipeline(seed=0)
    torch.manual_seed(seed)
    add_boft_to_pipeline(pipe, {"unet": UNET, "text_encoder": TEXT}, name)
    return pipe


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved base pipeline, two adapters, and a collection of bad adapters."""
    root = tmp_path_factory.mktemp("cli")
    paths = {"base": save_tiny_pipeline(root / "base"), "root": root}
    for key, seed in (("toy", 1), ("style", 2)):
        save_boft_weights(adapter_pipe(seed), root / key)
        paths[key] = root / key
    pipe = build_tiny_pipeline(seed=0)
    add_boft_to_pipeline(pipe, {"unet": BOFTConfig(boft_block_size=4)})
    paths["identity"] = save_boft_weights(pipe, root / "identity")  # the .safetensors file itself

    adapter = read_adapter(paths["toy"])
    key = next(k for k in adapter.tensors["unet"] if k.endswith(".boft_s"))
    adapter.tensors["unet"][key] = torch.ones(48)  # an adapter trained on a wider base model
    write_adapter(adapter, root / "other_base")
    paths["other_base"] = root / "other_base"
    for name, change in (
        ("flat_generators", lambda t: t.flatten()),  # not (factors, blocks, b(b-1)/2)
        ("odd_generators", lambda t: t[..., :5]),  # 5 free entries fit no block size
    ):
        broken = read_adapter(paths["toy"])
        first = next(k for k in broken.tensors["unet"] if k.endswith(".boft_R"))
        broken.tensors["unet"][first] = change(broken.tensors["unet"][first]).contiguous()
        paths[name] = write_adapter(broken, root / name)
    overflow = read_adapter(paths["toy"])  # finite, but its merged weights overflow fp16
    for key in [k for k in overflow.tensors["unet"] if k.endswith(".boft_s")]:
        overflow.tensors["unet"][key] = torch.full_like(overflow.tensors["unet"][key], 1e8)
    paths["overflow"] = write_adapter(overflow, root / "overflow")
    (root / "junk.safetensors").write_text("this is not a safetensors file")
    paths["junk"] = root / "junk.safetensors"
    data = (root / "toy" / "boft_weights.safetensors").read_bytes()
    (root / "truncated").mkdir()
    (root / "truncated" / "boft_weights.safetensors").write_bytes(data[: len(data) // 2])
    paths["truncated"] = root / "truncated"
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(
        build_tiny_pipeline(seed=0).unet, peft.LoraConfig(r=2, target_modules=["to_q"])
    )
    lora.save_pretrained(root / "lora")
    paths["lora"] = root / "lora"
    return paths


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# --- help and argument parsing ---------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_shows_an_example(name, capsys):
    from boft_diffusion.cli import build_parser

    module = COMMANDS[name]
    assert module.COMMAND is not None and module.COMMAND.run is module.run
    parser = build_parser({name: module.COMMAND})
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "example" in out and f"boft-diffusion {name} " in out


@pytest.mark.parametrize(
    "argv",
    [
        ["sample", "--base", "b", "--prompt", "p", "--out", "x.png", "--scale", "strong"],
        ["merge", "--base", "b", "--adapter", "a", "--out", "o", "--format", "ckpt"],
        ["inspect"],
    ],
)
def test_usage_errors_are_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and f"boft-diffusion {argv[0]}" in err[0]


def test_adapter_spec_parsing(tmp_path):
    assert parse_adapter_spec("a/b:0.5") == (tmp_path.__class__("a/b"), 0.5)
    assert parse_adapter_spec("a/b", 0.7)[1] == 0.7
    odd = tmp_path / "weird:name"
    odd.mkdir()
    assert parse_adapter_spec(str(odd)) == (odd, 1.0)  # an existing path wins over ':suffix'
    with pytest.raises(CommandError, match="'x' is not a number"):
        parse_adapter_spec("a:x")


# --- inspect ---------------------------------------------------------------------------------------
def test_inspect_reports_components_layout_and_angles(files, capsys):
    assert invoke(inspect_cmd, [files["toy"]]) == 0
    out = capsys.readouterr().out
    assert "unet: 56 layers (to_k, to_out.0, to_q, to_v); block size 4, 2 butterfly factor(s)" in out
    assert "text_encoder: 8 layers (k_proj, out_proj, q_proj, v_proj)" in out
    assert "Largest orthogonality error" in out and "on disk" in out
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q" in out

    assert invoke(inspect_cmd, [files["toy"], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    tensors = read_adapter(files["toy"]).tensors
    assert report["trainable_parameters"] == sum(t.numel() for c in tensors.values() for t in c.values())
    assert report["file_size_bytes"] == (files["toy"] / "boft_weights.safetensors").stat().st_size
    assert 0 < report["max_orthogonality_error"] < 1e-5
    layer = next(iter(report["components"]["unet"]["per_layer"].values()))
    assert layer["factors"] == 2 and layer["block_size"] == 4 and 0 < layer["angle_max_deg"] < 180


def test_inspect_identity_adapter_has_zero_angles(files, capsys):
    assert invoke(inspect_cmd, [files["identity"], "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    layers = report["components"]["unet"]["per_layer"].values()
    assert all(s["angle_max_deg"] == 0 and s["scale_min"] == s["scale_max"] == 1 for s in layers)
    assert report["max_orthogonality_error"] == 0


def test_inspect_peft_folder(files, tmp_path, capsys):
    from boft_diffusion import save_peft_adapter

    save_peft_adapter(adapter_pipe(1), tmp_path / "peft")
    assert invoke(inspect_cmd, [tmp_path / "peft", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "peft"
    unet = report["components"]["unet"]
    assert unet["stored_parameters"] > unet["trainable_parameters"]  # PEFT stores full b x b generators
    assert invoke(inspect_cmd, [files["toy"], "--json"]) == 0  # the same adapter in the project format
    assert json.loads(capsys.readouterr().out)["trainable_parameters"] == report["trainable_parameters"]


INSPECT_REFUSALS = {
    "junk": "safetensors",
    "truncated": "safetensors",
    "missing": "no such",
    "flat_generators": "expected float (factors, blocks, b(b-1)/2)",
    "odd_generators": "5 free entries per block match no block size",
}


@pytest.mark.parametrize("bad", sorted(INSPECT_REFUSALS))
def test_inspect_bad_input(files, bad, capsys):
    path = files["root"] / "nowhere" if bad == "missing" else files[bad]
    assert invoke(inspect_cmd, [path]) == 2
    assert INSPECT_REFUSALS[bad] in one_error_line(capsys)


@pytest.mark.slow
def test_inspect_runs_as_a_module(files):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "boft_diffusion.cli", "inspect", str(files["toy"])],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "Total trainable parameters" in done.stdout


# --- sample ----------------------------------------------------------------------------------------
def test_sample_writes_a_png_grid_of_the_adapter_images(files, tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["--base", files["base"], "--adapter", f"{files['toy']}:0.8", "--prompt", "a photo of sks toy"]
    argv += ["--num-images", 3, "--seed", 5, "--steps", 2, "--height", 32, "--width", 32, "--out", out]
    argv += ["--guidance-scale", 7.5]
    assert invoke(sample_cmd, argv) == 0
    grid = Image.open(out)
    assert grid.size == (64, 64) and grid.text["seed"] == "5" and grid.text["prompt"] == "a photo of sks toy"
    assert "Wrote 3 image(s)" in capsys.readouterr().out

    pipe = adapter_pipe(1)
    set_boft_adapters(pipe, ["default"], [0.8])
    merge_boft(pipe)
    generator = torch.Generator().manual_seed(6)  # the second image uses seed + 1
    second = pipe(
        "a photo of sks toy", num_inference_steps=2, height=32, width=32, generator=generator
    ).images[0]
    tile = np.asarray(grid)[:32, 32:64].astype(int)
    assert np.abs(tile - np.asarray(second).astype(int)).max() <= 1


@pytest.mark.parametrize(
    "case, expect",
    [
        ("exists", "already exists"),
        ("weight", "is not a number"),
        ("other_base", "shape"),
        ("lora", "LORA"),
        ("missing_adapter", "no such adapter"),
        ("missing_base", "no such base"),
        ("not_png", ".png"),
    ],
)
def test_sample_bad_input_writes_nothing(files, tmp_path, case, expect, capsys):
    out = tmp_path / ("grid.jpg" if case == "not_png" else "grid.png")
    if case == "exists":
        out.write_bytes(b"keep")
    adapter = {
        "weight": f"{files['toy']}:lots",
        "other_base": files["other_base"],
        "lora": files["lora"],
        "missing_adapter": tmp_path / "nothing",
    }.get(case, files["toy"])
    base = tmp_path / "nobase" if case == "missing_base" else files["base"]
    argv = ["--base", base, "--adapter", adapter, "--prompt", "p", "--steps", 1, "--out", out]
    assert invoke(sample_cmd, argv) == 2
    assert expect in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["grid.png"] if case == "exists" else [])
    if case == "exists":
        assert out.read_bytes() == b"keep"


# --- merge -----------------------------------------------------------------------------------------
def test_merge_blends_adapters_into_a_stock_diffusers_folder(files, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "merged"
    argv = ["--base", files["base"], "--adapter", f"{files['toy']}:1.0", "--adapter", f"{files['style']}:0.5"]
    assert invoke(merge_cmd, [*argv, "--out", out]) == 0
    loaded = StableDiffusionPipeline.from_pretrained(out)
    loaded.set_progress_bar_config(disable=True)

    pipe = adapter_pipe(1, "toy")
    torch.manual_seed(2)
    add_boft_to_pipeline(pipe, {"unet": UNET, "text_encoder": TEXT}, "style")
    set_boft_adapters(pipe, ["toy", "style"], [1.0, 0.5])
    assert np.abs(sample_images(loaded) - sample_images(pipe)).max() < 1e-4
    prov = json.loads((out / "boft_provenance.json").read_text())
    assert [(a["name"], a["strength"]) for a in prov["adapters"]] == [("toy", 1.0), ("style", 0.5)]
    assert prov["base_model"] == str(files["base"])


def test_merge_single_file_fp16(files, tmp_path):
    out = tmp_path / "toy.safetensors"
    argv = ["--base", files["base"], "--adapter", files["toy"], "--out", out, "--format", "single-file"]
    assert invoke(merge_cmd, [*argv, "--dtype", "fp16"]) == 0
    with safe_open(out, framework="pt") as f:
        assert f.metadata()["boft_diffusion.adapters"] == "toy:1"
        assert f.get_slice("model.diffusion_model.input_blocks.0.0.weight").get_dtype() == "F16"


@pytest.mark.parametrize(
    "case, expect",
    [
        ("exists", "already exists"),
        ("weight", "is not a number"),
        ("other_base", "shape"),
        ("junk", "safetensors"),
        ("truncated", "safetensors"),
        ("lora", "LORA"),
        ("variant", "--variant"),
    ],
)
def test_merge_bad_input_leaves_nothing(files, tmp_path, case, expect, capsys):
    out = tmp_path / "out"
    if case == "exists":
        out.mkdir()
    adapters = {"weight": f"{files['toy']}:1,5"}.get(case, files.get(case, files["toy"]))
    argv = ["--base", files["base"], "--adapter", files["style"], "--adapter", adapters, "--out", out]
    if case == "variant":
        argv += ["--format", "single-file", "--variant", "fp16"]
    assert invoke(merge_cmd, argv) == 2
    assert expect in one_error_line(capsys)
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if case == "exists" else [])


# --- one error policy: what the user gave is one line, a bug keeps its traceback --------------------
@pytest.mark.parametrize("verb", ["sample", "merge"])
def test_adapters_that_merge_to_non_finite_weights_are_one_line(files, tmp_path, verb, capsys):
    out = tmp_path / ("grid.png" if verb == "sample" else "merged")
    argv = [verb, "--base", files["base"], "--adapter", files["overflow"], "--out", out, "--dtype", "fp16"]
    if verb == "sample":
        argv += ["--prompt", "p", "--steps", 1, "--num-images", 1, "--height", 32, "--width", 32]
    assert cli.main([str(a) for a in argv]) == 2
    assert "non-finite" in one_error_line(capsys).lower()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("verb", ["sample", "merge", "bench"])
def test_an_output_path_under_a_regular_file_is_one_line(files, tmp_path, verb, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    argv = {
        "sample": ["--base", files["base"], "--prompt", "p", "--out", blocker / "grid.png"],
        "merge": ["--base", files["base"], "--adapter", files["toy"], "--out", blocker / "merged"],
        "bench": ["--json", blocker / "bench.json"],
    }[verb]
    assert cli.main([verb, *map(str, argv)]) == 2
    assert "is not a folder" in one_error_line(capsys)
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"] and blocker.read_text() == "x"


def test_a_device_that_does_not_exist_is_one_line(files, tmp_path, capsys):
    argv = [
        "--base",
        files["base"],
        "--prompt",
        "p",
        "--out",
        tmp_path / "grid.png",
        "--device",
        "warp-drive",
    ]
    assert invoke(sample_cmd, argv) == 2
    assert "--device 'warp-drive'" in one_error_line(capsys)


def test_a_full_disk_while_writing_the_grid_is_one_line(files, tmp_path, monkeypatch, capsys):
    from boft_diffusion import atomic

    def disk_full(path, replace=True):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(atomic, "atomic_file", disk_full)
    out = tmp_path / "grid.png"
    argv = ["--base", files["base"], "--prompt", "p", "--steps", 1, "--num-images", 1, "--out", out]
    assert invoke(sample_cmd, [*argv, "--height", 32, "--width", 32]) == 2
    last = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]  # after the progress bar
    assert last.startswith("error: ") and "No space left on device" in last and not out.exists()


@pytest.mark.parametrize("verb, internal", [("merge", "_adapter_names"), ("inspect", "inspect_adapter")])
@pytest.mark.parametrize("bug", [ValueError("bug"), TypeError("bug")])
def test_a_programming_error_keeps_its_traceback(files, tmp_path, monkeypatch, verb, internal, bug):
    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(COMMANDS[verb], internal, broken)
    argv = {
        "merge": ["--base", files["base"], "--adapter", files["toy"], "--out", tmp_path / "merged"],
        "inspect": [files["toy"]],
    }[verb]
    with pytest.raises(type(bug), match="bug"):
        cli.main([verb, *map(str, argv)])
