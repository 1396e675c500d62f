"""A file describes; it never chooses (issue #24).

Nothing read from an adapter, a prompt cache or a checkpoint opens a path or hub id the user did not
give: the ControlNet an adapter was trained on is named in the error and given by the user, whose
ControlNet must have the fingerprint the file records. And every size a file's metadata claims is
checked against the file's own tensors before anything is built: an absurd claim is one error line and
costs no memory (the tests that say so run the load in a fresh Python under an address-space limit).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from boft_diffusion import BOFTConfig
from boft_diffusion.control import (
    CONTROL_COMPONENT,
    CONTROL_METADATA,
    add_light_control,
    light_control,
    save_light_control,
)
from boft_diffusion.inject import UNET_ATTENTION_TARGETS, adapter_configs, apply_adapter_plan, plan_adapter
from boft_diffusion.io import AdapterFormatError, load_boft_weights, read_adapter, save_boft_weights
from boft_diffusion.pipeline import base_fingerprint, boft_adapters
from boft_diffusion.recipes.controlnet import controlnet_saved_modules
from boft_diffusion.tiny import build_tiny_pipeline

TESTS = Path(__file__).resolve().parent
WIDTHS = (16, 32, 96)
"""The condition embedding / light encoder widths of the tiny model (3 widths: its VAE downsamples 4x)."""
ABSURD = [16, 24_000, 24_000]
"""A claim whose 24,000 x 24,000 3x3 convolutions would take about 21 GB each."""
HEADROOM = 2 << 30
"""What a limited load may allocate past torch, diffusers and the tiny pipeline: 2 GiB."""
HUB_ID = "someone/controlnet-canny"

# --- every way to open a model or reach the hub: refused and recorded ----------------------------------------
OPENERS = [
    ("diffusers", "ModelMixin", "from_pretrained"),
    ("diffusers", "ControlNetModel", "from_pretrained"),
    ("diffusers", "DiffusionPipeline", "from_pretrained"),
    ("huggingface_hub", None, "hf_hub_download"),
    ("huggingface_hub", None, "snapshot_download"),
    ("diffusers.utils.hub_utils", None, "hf_hub_download"),
    ("diffusers.utils.hub_utils", None, "snapshot_download"),
    ("diffusers.pipelines.pipeline_utils", None, "hf_hub_download"),
    ("diffusers.pipelines.pipeline_utils", None, "snapshot_download"),
]


def guard_openers(set_attribute: Callable[[Any, str, Any], None] = setattr) -> list[str]:
    """Make each of :data:`OPENERS` record its call and raise; returns the record (empty: nothing opened)."""
    calls: list[str] = []
    for module_name, owner, name in OPENERS:
        target = importlib.import_module(module_name)
        target = getattr(target, owner) if owner else target
        what = f"{owner or module_name}.{name}"

        def refuse(*args: Any, _what: str = what, **kwargs: Any) -> Any:
            calls.append(f"{_what}({str(args[:1])[:200]})")
            raise AssertionError(f"{_what} was called: a file chose what to open")

        set_attribute(target, name, refuse)
    return calls


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    return guard_openers(monkeypatch.setattr)


# --- adapter files as the controlnet recipe writes them (no training: random rotations) ---------------------
def tiny_controlnet(pipe: Any) -> nn.Module:
    """The ControlNet ``train controlnet`` starts from on the tiny model: from its UNet, seed 0."""
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=WIDTHS).eval()


def reference_fingerprints(controlnet: nn.Module) -> dict[str, str]:
    """What the file records: ``base_fingerprint`` of the ControlNet, less the parts the adapter trains in full
    (condition embedding, zero convolutions), as loaded and cast to float16."""
    saved = ("controlnet_cond_embedding", "controlnet_down_blocks", "controlnet_mid_block")
    kept = {"controlnet": nn.ModuleDict({n: c for n, c in controlnet.named_children() if n not in saved})}
    return {
        "controlnet_fingerprint": base_fingerprint(kept),
        "controlnet_fingerprint_float16": base_fingerprint(kept, as_dtype=torch.float16),
    }


def controlnet_adapter(folder: Path, source: str = "from_unet", fingerprints: bool = True) -> Path:
    """A ControlNet adapter trained on :func:`tiny_controlnet` of the embedded tiny model, whose metadata says
    it came from ``source``; returns its file."""
    controlnet = tiny_controlnet(build_tiny_pipeline())
    info = {"mode": "controlnet", "controlnet": source, "conditioning_embedding_out_channels": list(WIDTHS)}
    info |= {"seed": 0, "conditioning_scale": 1.0}
    info |= reference_fingerprints(controlnet) if fingerprints else {}
    saved = controlnet_saved_modules(controlnet)
    config = BOFTConfig(target_modules=UNET_ATTENTION_TARGETS, modules_to_save=saved, init_weights=False)
    apply_adapter_plan(controlnet, plan_adapter(controlnet, config))
    return save_boft_weights(
        {"controlnet": controlnet}, folder, metadata={CONTROL_METADATA: json.dumps(info)}
    )


def light_adapter(folder: Path) -> Path:
    """A light-control adapter of the tiny model (its encoder trained in full); returns its file."""
    pipe = build_tiny_pipeline()
    control = add_light_control(pipe, block_out_channels=WIDTHS)
    apply_adapter_plan(
        control, plan_adapter(control, BOFTConfig(target_modules=[], modules_to_save=["encoder"]))
    )
    return save_boft_weights(pipe, folder, metadata={CONTROL_METADATA: '{"mode": "light"}'})


def with_metadata(file: Path, folder: Path, **changes: str) -> Path:
    """A copy of adapter ``file`` in ``folder`` with some metadata entries replaced; returns the new file."""
    with safe_open(str(file), "pt") as handle:
        metadata = {**handle.metadata(), **changes}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(load_file(str(file)), str(folder / file.name), metadata=metadata)
    return folder / file.name


def control_json(file: Path, **changes: Any) -> str:
    with safe_open(str(file), "pt") as handle:
        return json.dumps({**json.loads(handle.metadata()[CONTROL_METADATA]), **changes})


def untouched(pipe: Any) -> bool:
    """No adapter, ControlNet or light encoder was added to ``pipe``."""
    return (
        not boft_adapters(pipe) and getattr(pipe, "controlnet", None) is None and light_control(pipe) is None
    )


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The adapters, ControlNet folder, checkpoints, prompt cache and encoder folder the tests read."""
    root = tmp_path_factory.mktemp("files")
    tiny_controlnet(build_tiny_pipeline()).save_pretrained(root / "controlnet")  # what the user has
    from_unet = controlnet_adapter(root / "from_unet")
    light = light_adapter(root / "light")
    made = {
        "controlnet": root / "controlnet",
        "from_unet": from_unet,
        "from_folder": controlnet_adapter(root / "from_folder", str(root / "controlnet")),
        "from_hub": controlnet_adapter(root / "from_hub", HUB_ID),
        "no_fingerprint": controlnet_adapter(root / "old", str(root / "controlnet"), fingerprints=False),
        "light": light,
        "absurd_light": with_metadata(
            light, root / "absurd_light", light_control=json.dumps({"embedding_channels": 32, "block_out_channels": ABSURD})
        ),
        "long_light": with_metadata(
            light, root / "long_light", light_control=json.dumps({"embedding_channels": 32, "block_out_channels": [16] * 100_000})
        ),
        "absurd_controlnet": with_metadata(
            from_unet, root / "absurd_controlnet",
            control=control_json(from_unet, conditioning_embedding_out_channels=ABSURD),
        ),
    }  # fmt: skip
    made |= make_checkpoints(root)
    made["prompt_cache"] = make_prompt_cache(root)
    made["encoder_folder"] = make_encoder_folder(root)
    return made


# --- 1. the ControlNet: the user gives it; the file only names it -----------------------------------------
@pytest.mark.parametrize("which", ["from_folder", "from_hub"])
def test_a_controlnet_the_file_names_is_never_opened(files, which, opened):
    pipe = build_tiny_pipeline()
    named = str(files["controlnet"]) if which == "from_folder" else HUB_ID
    with pytest.raises(AdapterFormatError) as err:
        load_boft_weights(pipe, files[which])
    message = str(err.value)
    assert str(files[which]) in message and repr(named) in message  # the file, and what it records, as a hint
    assert "controlnet=" in message and "--controlnet" in message  # how to give it
    assert "\n" not in message
    assert opened == [] and untouched(pipe)


@pytest.mark.parametrize("how", ["argument", "attribute"])
def test_the_controlnet_the_user_gives_loads_when_its_fingerprint_is_the_recorded_one(
    files, how, monkeypatch
):
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_pretrained(files["controlnet"])  # the user's own choice
    pipe = build_tiny_pipeline()
    if how == "attribute":
        pipe.controlnet = controlnet
    kwargs = {"controlnet": controlnet} if how == "argument" else {}
    opened = guard_openers(monkeypatch.setattr)  # from here on, loading may open nothing
    load_boft_weights(pipe, files["from_folder"], **kwargs)
    assert pipe.controlnet is controlnet and "default" in adapter_configs(controlnet) and opened == []


def test_a_controlnet_of_other_weights_is_refused_naming_both_fingerprints(files, opened):
    other = tiny_controlnet(build_tiny_pipeline(weights="random", seed=3))  # same shapes, other weights
    recorded = reference_fingerprints(tiny_controlnet(build_tiny_pipeline()))["controlnet_fingerprint"]
    theirs = reference_fingerprints(other)["controlnet_fingerprint"]
    pipe = build_tiny_pipeline()
    with pytest.raises(AdapterFormatError, match="fingerprint") as err:
        load_boft_weights(pipe, files["from_folder"], controlnet=other)
    assert (
        recorded in str(err.value)
        and theirs in str(err.value)
        and str(files["from_folder"]) in str(err.value)
    )
    assert untouched(pipe) and not adapter_configs(other) and opened == []


def test_a_float16_controlnet_matches_the_float32_one_it_was_trained_on(files):
    controlnet = tiny_controlnet(build_tiny_pipeline()).to(torch.float16)
    pipe = build_tiny_pipeline()
    load_boft_weights(pipe, files["from_folder"], controlnet=controlnet)
    assert pipe.controlnet is controlnet


def test_an_older_file_without_a_fingerprint_loads_onto_the_users_controlnet_with_a_warning(files, opened):
    pipe = build_tiny_pipeline()
    with pytest.warns(UserWarning, match="records no ControlNet fingerprint"):
        load_boft_weights(pipe, files["no_fingerprint"], controlnet=tiny_controlnet(build_tiny_pipeline()))
    assert "default" in adapter_configs(pipe.controlnet) and opened == []


def test_a_from_unet_adapter_rebuilds_its_controlnet_from_the_pipelines_own_unet(files, opened):
    pipe = build_tiny_pipeline()
    load_boft_weights(pipe, files["from_unet"])  # no path: the pipeline's UNet and the file's tensors
    assert "default" in adapter_configs(pipe.controlnet) and opened == []
    other = build_tiny_pipeline(
        weights="random", seed=3
    )  # another base: its ControlNet is not the one trained on
    with pytest.raises(AdapterFormatError, match="rebuilt from this pipeline's UNet has fingerprint"):
        load_boft_weights(other, files["from_unet"])
    assert untouched(other)


def test_sample_takes_the_controlnet_from_the_user_and_never_from_the_file(files, tmp_path, capsys):
    from PIL import Image

    from boft_diffusion import cli

    base, control = tmp_path / "base", tmp_path / "edges.png"
    build_tiny_pipeline().save_pretrained(base)
    Image.new("RGB", (64, 64)).save(control)
    capsys.readouterr()  # save_pretrained's progress bar
    args = [
        "sample",
        "--base",
        str(base),
        "--adapter",
        str(files["from_folder"].parent),
        "--control",
        str(control),
    ]
    args += ["--prompt", "a red star", "--num-images", "1", "--steps", "2"]
    assert cli.main([*args, "--out", str(tmp_path / "refused.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--controlnet" in err and repr(str(files["controlnet"])) in err
    assert not (tmp_path / "refused.png").exists()
    assert (
        cli.main([*args, "--controlnet", str(files["controlnet"]), "--out", str(tmp_path / "grid.png")]) == 0
    )
    assert (tmp_path / "grid.png").is_file()
    light = ["--adapter", str(files["light"]), "--controlnet", str(files["controlnet"])]
    assert cli.main([*args[:3], *light, *args[5:], "--out", str(tmp_path / "light.png")]) == 2
    assert "no adapter given holds ControlNet weights" in capsys.readouterr().err


def test_the_controlnet_recipe_records_the_fingerprint_of_the_controlnet_it_trains_on(files, tmp_path):
    from boft_diffusion.recipes.controlnet import ControlNetConfig, ControlNetRecipe, _usage
    from boft_diffusion.training.args import load_config

    for source in (None, files["controlnet"]):
        overrides = [f"train.output_dir={tmp_path}", "control.mode=controlnet", "metrics.detector=none"]
        overrides += [f"control.controlnet_model_name_or_path={source}"] if source else []
        recipe = ControlNetRecipe(load_config(ControlNetConfig, None, overrides))
        recipe.pipe = build_tiny_pipeline()
        recipe.check_pipeline()
        info = json.loads(recipe.adapter_metadata()[CONTROL_METADATA])
        recorded = reference_fingerprints(tiny_controlnet(build_tiny_pipeline()))
        assert {key: info.get(key) for key in recorded} == recorded
        usage = _usage(recipe.cfg)
        assert (f"controlnet=ControlNetModel.from_pretrained({str(source)!r})" in usage) == bool(source)


# --- 2. check before you allocate -------------------------------------------------------------------------
@pytest.mark.slow
def test_an_absurd_light_encoder_claim_is_one_line_and_costs_no_memory(files):
    result = under_memory_limit("load_into_fresh_pipeline", str(files["absurd_light"]))
    assert result["error"] == "AdapterFormatError", result
    assert "claims an encoder whose encoder.blocks.1.weight has shape (24000, 16, 3, 3)" in result["message"]
    assert "the file's encoder.blocks.1.weight is (32, 16, 3, 3)" in result["message"]
    assert str(files["absurd_light"]) in result["message"] and result["untouched"]


@pytest.mark.slow
def test_an_absurd_controlnet_embedding_claim_is_one_line_and_costs_no_memory(files):
    result = under_memory_limit("load_into_fresh_pipeline", str(files["absurd_controlnet"]))
    assert result["error"] == "AdapterFormatError", result
    assert (
        "claims a ControlNet condition embedding whose blocks.1.weight has shape (24000, 16, 3, 3)"
        in (result["message"])
    )
    assert str(files["absurd_controlnet"]) in result["message"] and result["untouched"]


def test_a_claim_of_more_widths_than_the_file_has_tensors_builds_nothing(files, tmp_path):
    claim = json.dumps({"embedding_channels": 32, "block_out_channels": [16] * 13})  # the file has 12 tensors
    file = with_metadata(files["light"], tmp_path, light_control=claim)
    pipe = build_tiny_pipeline()
    with pytest.raises(AdapterFormatError, match="claims an encoder of 13 widths; the file holds 12 tensors"):
        load_boft_weights(pipe, file)
    assert untouched(pipe)


@pytest.mark.parametrize(
    "field, value", [("seed", 2**70), ("seed", -1), ("controlnet", ["x"]), ("conditioning_scale", "x")]
)
def test_malformed_controlnet_metadata_is_one_line(files, tmp_path, field, value):
    file = with_metadata(
        files["from_unet"], tmp_path, control=control_json(files["from_unet"], **{field: value})
    )
    pipe = build_tiny_pipeline()
    with pytest.raises(
        AdapterFormatError, match=f"{re.escape(str(tmp_path))}.*invalid control metadata .*{field}"
    ):
        load_boft_weights(pipe, file)
    assert untouched(pipe)


def test_inspect_names_the_recorded_controlnet_without_opening_it(files, opened):
    from boft_diffusion.commands.inspect import format_report, inspect_adapter

    report = inspect_adapter(files["from_hub"])
    assert report["control"]["controlnet"] == HUB_ID
    assert report["control"]["controlnet_fingerprint"].startswith("sha256:")
    line = next(x for x in format_report(report).splitlines() if x.startswith("Control:"))
    assert repr(HUB_ID) in line and "--controlnet" in line and opened == []


# --- 3. every loader: nothing opened, nothing big allocated ---------------------------------------------------
@pytest.mark.slow
def test_no_loader_opens_what_a_file_names_or_allocates_what_it_claims(files):
    results = under_memory_limit("walk_every_loader", {k: str(v) for k, v in files.items()})
    assert results.pop("opened") == []
    refused = {
        "load_boft_weights, light encoder of absurd widths (folder)": "AdapterFormatError",
        "load_boft_weights, light encoder of 100000 widths (file)": "AdapterFormatError",
        "load_boft_weights, ControlNet of absurd widths (file)": "AdapterFormatError",
        "load_boft_weights, ControlNet the file names by folder": "AdapterFormatError",
        "load_boft_weights, ControlNet the file names by hub id": "AdapterFormatError",
        "inspect, light encoder of absurd widths": "AdapterFormatError",
        "inspect, ControlNet of absurd widths": "AdapterFormatError",
        "boft-diffusion inspect, light encoder of absurd widths": "exit 2",
        "checkpoint resume, a listed file that links outside": "ConfigError",
        "load_light_control, config.json of absurd widths": "ValueError",
    }
    for loader, outcome in results.items():
        assert outcome["error"] == refused.get(loader), (loader, outcome)
        assert "\n" not in outcome.get("message", ""), (loader, outcome)
        assert "allocate" not in outcome.get("message", ""), (loader, outcome)
    assert set(refused) <= set(results)
    assert (
        "outside the checkpoint" in results["checkpoint resume, a listed file that links outside"]["message"]
    )


# --- what runs in the limited Python ------------------------------------------------------------------------
def under_memory_limit(call: str, argument: Any) -> dict[str, Any]:
    """``call(argument)`` of this module in a fresh Python whose address space may grow :data:`HEADROOM`
    past what torch, diffusers and the tiny pipeline take (so an allocation of a claimed size fails
    there); returns its JSON result. Every opener is refused there too (:func:`guard_openers`)."""
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); import test_file_never_chooses as t; "
        f"t.limited({call!r}, {json.dumps(argument)!r})"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def limited(call: str, argument: str) -> None:
    import resource

    torch.set_num_threads(1)
    torch.ones(64, 64) @ torch.ones(64, 64)  # the thread pool, before the limit
    build_tiny_pipeline()  # and what a load needs
    status = Path("/proc/self/status").read_text()
    used = int(next(line for line in status.splitlines() if line.startswith("VmSize")).split()[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (used + HEADROOM, resource.getrlimit(resource.RLIMIT_AS)[1]))
    print(json.dumps(globals()[call](json.loads(argument))))


def outcome(run: Callable[[], Any]) -> dict[str, Any]:
    """``{"error": None}``, or the type and message of what ``run()`` raised (a MemoryError or an allocator's
    RuntimeError included: what the old code did with an absurd claim)."""
    try:
        run()
    except BaseException as err:  # noqa: BLE001 - every failure is reported, none stops the walk
        return {"error": type(err).__name__, "message": str(err)[:2000]}
    return {"error": None}


def load_into_fresh_pipeline(path: str) -> dict[str, Any]:
    guard_openers()
    pipe = build_tiny_pipeline()
    return {**outcome(lambda: load_boft_weights(pipe, path)), "untouched": untouched(pipe)}


def walk_every_loader(files: dict[str, str]) -> dict[str, Any]:
    """Every loader on files whose metadata names a folder, a hub id or absurd sizes: ``{loader: outcome}``,
    and ``opened``: every attempt to open a model or reach the hub."""
    from boft_diffusion import cli
    from boft_diffusion.commands.inspect import inspect_adapter
    from boft_diffusion.control import load_light_control
    from boft_diffusion.data import load_prompt_embeddings, read_prompt_embeddings_metadata
    from boft_diffusion.recipes.dreambooth import DreamBoothConfig
    from boft_diffusion.training.checkpoint import check_resume

    calls = guard_openers()
    named = ("absurd_light", "long_light", "absurd_controlnet", "from_folder", "from_hub")
    results = {
        "load_boft_weights, light encoder of absurd widths (folder)": Path(files["absurd_light"]).parent,
        "load_boft_weights, light encoder of 100000 widths (file)": Path(files["long_light"]),
        "load_boft_weights, ControlNet of absurd widths (file)": Path(files["absurd_controlnet"]),
        "load_boft_weights, ControlNet the file names by folder": Path(files["from_folder"]).parent,
        "load_boft_weights, ControlNet the file names by hub id": Path(files["from_hub"]),
    }
    walked = {
        loader: outcome(lambda p=p: load_boft_weights(build_tiny_pipeline(), p))
        for loader, p in results.items()
    }
    walked |= {f"read_adapter, {name}": outcome(lambda n=name: read_adapter(files[n])) for name in named}
    walked |= {
        "inspect, light encoder of absurd widths": outcome(lambda: inspect_adapter(files["absurd_light"])),
        "inspect, ControlNet of absurd widths": outcome(lambda: inspect_adapter(files["absurd_controlnet"])),
        "inspect, ControlNet the file names by folder": outcome(
            lambda: inspect_adapter(files["from_folder"])
        ),
        "inspect, ControlNet the file names by hub id": outcome(lambda: inspect_adapter(files["from_hub"])),
    }
    code = cli.main(["inspect", files["absurd_light"]])
    walked["boft-diffusion inspect, light encoder of absurd widths"] = {
        "error": f"exit {code}" if code else None
    }
    cfg = DreamBoothConfig()
    walked["checkpoint resume, metadata naming paths and hub ids"] = outcome(
        lambda: check_resume(files["checkpoint"], cfg)
    )
    walked["checkpoint resume, a listed file that links outside"] = outcome(
        lambda: check_resume(files["linked_checkpoint"], cfg)
    )
    walked["prompt cache, metadata naming paths and hub ids"] = outcome(
        lambda: (
            load_prompt_embeddings(files["prompt_cache"]),
            read_prompt_embeddings_metadata(files["prompt_cache"]),
        )
    )
    walked["load_light_control, config.json of absurd widths"] = outcome(
        lambda: load_light_control(build_tiny_pipeline(), files["encoder_folder"])
    )
    return {**walked, "opened": calls}  # fmt: skip


# --- the other files a loader reads ---------------------------------------------------------------------------
def make_checkpoints(root: Path) -> dict[str, Path]:
    """A checkpoint whose adapter's metadata names a folder and a hub id (``checkpoint``), and one whose marker
    lists a file that links outside it, with that file's true size and hash (``linked_checkpoint``)."""
    from accelerate import Accelerator

    from boft_diffusion import add_boft
    from boft_diffusion.training.checkpoint import TrainingState, TrainProgress, save_checkpoint

    model = add_boft(nn.Sequential(nn.Linear(8, 8)), BOFTConfig(boft_block_size=4, target_modules=["0"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = TrainingState({"unet": model}, optimizer, scheduler, TrainProgress(), config={"train.seed": 0})
    folder = save_checkpoint(Accelerator(cpu=True), state, root / "run", 1)
    names = json.dumps({"mode": "controlnet", "controlnet": HUB_ID, "base_model": str(root / "controlnet")})
    claims = json.dumps({"embedding_channels": 24_000, "block_out_channels": ABSURD})
    with_metadata(
        folder / "boft_weights.safetensors", folder, control=names, base_model=HUB_ID, light_control=claims
    )
    remark(folder)
    linked = shutil.copytree(folder, root / "linked" / folder.name)
    os.symlink(root / "controlnet" / "config.json", linked / "notes.json")  # listed: read through the link
    remark(linked)
    return {"checkpoint": folder, "linked_checkpoint": linked}


def remark(folder: Path) -> None:
    """Rewrite the checkpoint's marker to list every file in it as it now is (size and SHA-256)."""
    marker = folder / "checkpoint.json"
    data = json.loads(marker.read_text())
    files = sorted(p for p in folder.iterdir() if p.name != marker.name)
    data["files"] = {
        p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
        for p in files
    }
    marker.write_text(json.dumps(data))


def make_prompt_cache(root: Path) -> Path:
    """A prompt-embedding cache whose metadata names a system file, a folder and a hub id."""
    from boft_diffusion.data import save_prompt_embeddings

    embeddings = {"/etc/passwd": {"encoder_hidden_states": torch.zeros(1, 4, 8)}}
    meta = {
        "family": "sd",
        "text_encoder_fingerprint": HUB_ID,
        "base_model": str(root / "controlnet"),
        "dtype": "float32",
    }
    return save_prompt_embeddings(root / "prompt_embeddings.safetensors", embeddings, meta)


def make_encoder_folder(root: Path) -> Path:
    """A ``save_light_control`` folder whose config.json claims absurd widths."""
    pipe = build_tiny_pipeline()
    folder = save_light_control(add_light_control(pipe, block_out_channels=WIDTHS), root / "encoder")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "block_out_channels": ABSURD}))
    return folder


def test_a_light_adapter_whose_claims_hold_loads_its_encoder(files, opened):
    pipe = build_tiny_pipeline()
    load_boft_weights(pipe, files["light"])
    assert light_control(pipe) is not None and CONTROL_COMPONENT in boft_adapters(pipe) and opened == []
