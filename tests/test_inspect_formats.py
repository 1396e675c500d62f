"""``boft-diffusion inspect`` tells every format apart and says what it loads into.

Small files of each format are written here: a project adapter, a PEFT BOFT folder (the project's
writer), a PEFT LoRA folder (PEFT's own ``save_pretrained``), LoRA files with diffusers keys and with
kohya keys (SDXL ``lora_te1_`` / ``lora_te2_``), a kohya OFT file, a ComfyUI-style full-difference
file, a merged single-file checkpoint and a diffusers folder.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from test_kohya import metadata, oft_state

from boft_diffusion import BOFTConfig, add_boft_to_pipeline, cli, save_boft_weights, save_peft_adapter
from boft_diffusion.tiny import build_tiny_pipeline, save_tiny_pipeline

TO_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
CLIP_Q = "text_model.encoder.layers.0.self_attn.q_proj"
KOHYA_UNET = "lora_unet_" + TO_Q.replace(".", "_")
KOHYA_TE = "self_attn_q_proj"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("formats")
    pipe = build_tiny_pipeline(weights="random")
    add_boft_to_pipeline(pipe, {"unet": BOFTConfig(boft_block_size=4, init_weights=False)})
    paths = {"project": save_boft_weights(pipe, root / "project").parent}
    save_peft_adapter(pipe, root / "peft")
    paths["peft"] = root / "peft"

    save_file(oft_state(pipe.unet), root / "oft.safetensors", metadata=metadata("networks.oft", 4, 1e-3))
    diffusers_lora = {
        f"unet.{TO_Q}.lora_A.weight": torch.zeros(4, 32),
        f"unet.{TO_Q}.lora_B.weight": torch.zeros(32, 4),
        f"text_encoder.{CLIP_Q}.lora_A.weight": torch.zeros(4, 32),
        f"text_encoder.{CLIP_Q}.lora_B.weight": torch.zeros(32, 4),
    }
    save_file(diffusers_lora, root / "diffusers_lora.safetensors")
    kohya_lora = {}
    for name in (
        KOHYA_UNET,
        f"lora_te1_text_model_encoder_layers_0_{KOHYA_TE}",
        f"lora_te2_text_model_encoder_layers_0_{KOHYA_TE}",
    ):
        kohya_lora |= {
            f"{name}.lora_down.weight": torch.zeros(8, 32),
            f"{name}.lora_up.weight": torch.zeros(32, 8),
            f"{name}.alpha": torch.tensor(8.0),
        }
    save_file(kohya_lora, root / "kohya_lora.safetensors", metadata=metadata("networks.lora", 8, 8))
    diff = {
        "diffusion_model.input_blocks.1.1.proj_in.diff": torch.zeros(32, 32),
        "diffusion_model.input_blocks.1.1.proj_in.diff_b": torch.zeros(32),
    }
    save_file(diff, root / "diff.safetensors")
    checkpoint = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(32),
        "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
    }
    save_file(checkpoint, root / "checkpoint.safetensors")
    save_file({"some.unknown.weight": torch.zeros(2)}, root / "unknown.safetensors")
    paths |= {
        name: root / f"{name}.safetensors"
        for name in ("oft", "diffusers_lora", "kohya_lora", "diff", "checkpoint", "unknown")
    }
    paths["diffusers"] = save_tiny_pipeline(root / "base")

    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(
        build_tiny_pipeline(seed=0).unet, peft.LoraConfig(r=2, target_modules=["to_q"])
    )
    lora.save_pretrained(root / "peft_lora")
    paths["peft_lora"] = root / "peft_lora"
    return paths


LORA_LOADERS = (
    "diffusers load_lora_weights / ComfyUI / A1111; this project's load_boft_weights does not read it"
)
EXPECTED = {  # name: (kind, format line, target line start)
    "project": (
        "boft_diffusion",
        "Format: boft_diffusion adapter v1",
        "Target: unet; loads with boft_diffusion load_boft_weights",
    ),
    "peft": (
        "peft_boft",
        "Format: PEFT BOFT adapter folder",
        "Target: unet; loads with boft_diffusion load_boft_weights",
    ),
    "oft": (
        "kohya_oft",
        "Format: kohya OFT network (networks.oft)",
        "Target: unet (sd); loads with kohya sd-scripts",
    ),
    "diffusers_lora": (
        "lora",
        "Format: LoRA (diffusers/PEFT keys lora_A / lora_B)",
        f"Target: text_encoder, unet (sd); loads with {LORA_LOADERS}",
    ),
    "kohya_lora": (
        "lora",
        "Format: LoRA (kohya keys lora_down / lora_up)",
        f"Target: text_encoder, text_encoder_2, unet (sdxl); loads with {LORA_LOADERS}",
    ),
    "peft_lora": (
        "lora",
        "Format: LoRA (PEFT adapter folder, lora_A / lora_B)",
        f"Target: unet (sd); loads with {LORA_LOADERS}",
    ),
    "diff": (
        "diff",
        "Format: full-difference file (.diff / .diff_b keys)",
        f"Target: unet (sd); loads with {LORA_LOADERS}",
    ),
    "checkpoint": (
        "checkpoint",
        "Format: merged single-file checkpoint (model.diffusion_model.*)",
        "Target: text_encoder, unet, vae (sd); loads with diffusers from_single_file",
    ),
    "diffusers": (
        "diffusers",
        "Format: diffusers pipeline folder (model_index.json)",
        "Target: scheduler, text_encoder, tokenizer, unet, vae",
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_format_and_target_lines(files, name, capsys):
    kind, format_line, target_line = EXPECTED[name]
    assert cli.main(["inspect", str(files[name])]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert format_line in lines, lines[:4]
    assert any(line.startswith(target_line) for line in lines), lines[:4]

    assert cli.main(["inspect", str(files[name]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == kind and report["format_name"] == format_line.removeprefix("Format: ")
    assert {"path", "format", "target", "file_size_bytes", "components"} <= set(report)
    assert {"components", "family", "loads_with"} <= set(report["target"])
    assert report["file_size_bytes"] > 0


def test_lora_reports_layers_ranks_and_parameters(files, capsys):
    assert cli.main(["inspect", str(files["kohya_lora"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["layers"] == 3 and report["parameters"] == 3 * (8 * 32 * 2 + 1)
    assert all(c["ranks"] == [8] and c["layers"] == 1 for c in report["components"].values())
    assert cli.main(["inspect", str(files["peft_lora"]), "--json"]) == 0
    peft = json.loads(capsys.readouterr().out)
    assert peft["components"]["unet"]["ranks"] == [2] and peft["layers"] > 0
    assert cli.main(["inspect", str(files["diffusers_lora"])]) == 0
    out = capsys.readouterr().out
    assert "unet: 1 layers, rank 4; 256 parameters" in out and "Total: 2 layers, 512 parameters" in out


def test_boft_report_is_kept_in_full(files, capsys):
    assert cli.main(["inspect", str(files["project"])]) == 0
    out = capsys.readouterr().out
    assert "Largest orthogonality error" in out and "Rotation angles" in out and "unet: " in out


@pytest.mark.parametrize(
    "bad, message", [("unknown", "not an adapter, LoRA, difference or checkpoint"), ("junk", "safetensors")]
)
def test_unknown_or_unreadable_is_one_error_line(files, tmp_path, bad, message, capsys):
    path = files.get(bad) or tmp_path / "junk.safetensors"
    if bad == "junk":
        path.write_text("not a safetensors file")
    assert cli.main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0] and str(path) in err[0]
