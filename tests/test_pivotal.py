"""Pivotal tuning (textual inversion + BOFT): new token embeddings trained with the adapter, carried through
the one door for trained state (adapter file, loading into a stock pipeline, checkpoints, resume, unload,
merged export), and its bad input."""

from __future__ import annotations

import pytest
import torch
from conftest import DREAMBOOTH_FAST, FAMILY_FAST, recipe_config
from safetensors.torch import load_file, save_file

from boft_diffusion import AdapterFormatError, load_boft_weights, unload_boft
from boft_diffusion.io import read_adapter
from boft_diffusion.recipes.pivotal import PivotalConfig, PivotalRecipe, run
from boft_diffusion.recipes.tokens import new_tokens
from boft_diffusion.tiny import build_tiny_pipeline
from boft_diffusion.training.args import ConfigError

FAST = [*DREAMBOOTH_FAST, "train.max_train_steps=3", "optim.learning_rate=1e-2"]
TOKENS = ["<s0>", "<s1>"]


def make_config(out, *overrides: str) -> PivotalConfig:
    return recipe_config(PivotalConfig, out, *FAST, *overrides)


def prompt_states(pipe, prompt: str = "a photo of <s0><s1> toy") -> torch.Tensor:
    ids = pipe.tokenizer(
        prompt, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    )
    with torch.no_grad():
        return pipe.text_encoder(ids.input_ids)[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 3-step pivotal run (checkpoints at 1 and 2) and the recipe that ran it."""
    out = tmp_path_factory.mktemp("pivotal") / "run"
    recipe = PivotalRecipe(make_config(out, "train.checkpointing_steps=1"))
    recipe.run()
    return out, recipe


def test_new_rows_train_and_every_other_row_stays(trained):
    out, recipe = trained
    base = build_tiny_pipeline(seed=0).text_encoder.get_input_embeddings().weight
    weight = recipe.pipe.text_encoder.get_input_embeddings().weight.detach()
    assert weight.shape[0] == base.shape[0] + 2
    torch.testing.assert_close(weight[: base.shape[0]], base, rtol=0, atol=0)  # weight decay included
    toy = recipe.pipe.tokenizer("toy", add_special_tokens=False).input_ids[0]
    assert (weight[-2:] - base[toy]).norm(dim=1).min() > 1e-3  # started at "toy", moved
    adapter = read_adapter(out)
    assert adapter.metadata["token_embeddings"] == '{"text_encoder": ["<s0>", "<s1>"]}'
    torch.testing.assert_close(adapter.states["token_embeddings"]["text_encoder"], weight[-2:])
    assert recipe.cfg.data.instance_prompt == "a photo of <s0><s1> toy"
    card = (out / "README.md").read_text()
    assert (
        "# BOFT pivotal tuning: a photo of <s0><s1> toy" in card
        and "| `pivotal.num_new_tokens` | `2` |" in card
    )
    assert (
        recipe.trainable_count()
        == sum(t.numel() for t in adapter.tensors["text_encoder"].values())
        + sum(t.numel() for t in adapter.tensors["unet"].values())
        + 2 * weight.shape[1]
    )


def test_the_adapter_loads_into_a_fresh_stock_pipeline_and_unloads(trained):
    out, recipe = trained
    pipe = build_tiny_pipeline(seed=0)
    before = pipe.text_encoder.get_input_embeddings().weight.clone()
    load_boft_weights(pipe, out)
    assert new_tokens(pipe.text_encoder, "default") == TOKENS
    assert pipe.tokenizer.convert_tokens_to_ids(TOKENS) == [before.shape[0], before.shape[0] + 1]
    recipe.pipe.text_encoder.eval()
    torch.testing.assert_close(prompt_states(pipe), prompt_states(recipe.pipe))
    unload_boft(pipe)
    assert "<s0>" not in pipe.tokenizer.get_vocab() and len(pipe.tokenizer) == before.shape[0]
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, before)
    assert pipe.text_encoder.config.vocab_size == before.shape[0]


@pytest.mark.slow
def test_a_stopped_run_resumes_with_the_same_tokens(trained, tmp_path):
    out, _ = trained
    whole = read_adapter(out).states["token_embeddings"]["text_encoder"]
    parts = tmp_path / "parts"
    run(make_config(parts, "train.checkpointing_steps=1", "train.max_train_steps=2"))
    run(make_config(parts, "train.checkpointing_steps=1", "train.resume_from_checkpoint=latest"))
    torch.testing.assert_close(
        read_adapter(parts).states["token_embeddings"]["text_encoder"], whole, rtol=1e-5, atol=1e-6
    )


def test_embeddings_of_another_width_are_refused_and_the_pipeline_kept(trained, tmp_path):
    out, _ = trained
    file = out / "boft_weights.safetensors"
    tensors = load_file(file)
    tensors["state.token_embeddings.text_encoder"] = torch.zeros(2, 16)
    from safetensors import safe_open

    with safe_open(file, "pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, tmp_path / "boft_weights.safetensors", metadata=metadata)
    pipe = build_tiny_pipeline(seed=0)
    size = len(pipe.tokenizer)
    with pytest.raises(
        AdapterFormatError, match=r"token embeddings do not fit text_encoder: embeddings of shape \(2, 16\)"
    ):
        load_boft_weights(pipe, tmp_path)
    assert len(pipe.tokenizer) == size and pipe.text_encoder.get_input_embeddings().num_embeddings == size


def test_loading_twice_is_refused_as_tokens_already_there(trained):
    out, _ = trained
    pipe = build_tiny_pipeline(seed=0)
    load_boft_weights(pipe, out)
    with pytest.raises(AdapterFormatError, match=r"already in the tokenizer"):
        load_boft_weights(pipe, out, adapter_name="again")
    assert new_tokens(pipe.text_encoder, "default") == TOKENS and len(pipe.tokenizer) == 916


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["boft.train_text_encoder=false"], "needs boft.train_text_encoder=true"),
        (["pivotal.token_abstraction=zebra"], "'zebra' is not a word of data.instance_prompt"),
        (["pivotal.num_new_tokens=0"], r"num_new_tokens must be an integer in \[1, 64\]"),
    ],
)
def test_bad_settings_fail_before_anything_is_written(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run(make_config(tmp_path / "run", *overrides))
    assert not (tmp_path / "run").exists()


def test_an_initializer_outside_the_vocabulary_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"initializer_token 'qqzzxxkk' is not one token"):
        run(make_config(tmp_path / "run", "pivotal.initializer_token=qqzzxxkk"))
    assert not (tmp_path / "run" / "boft_weights.safetensors").exists()


def test_a_new_token_the_base_already_has_fails_before_training(tmp_path):
    base = build_tiny_pipeline(seed=0)
    base.tokenizer.add_tokens(["<s1>"])
    base.text_encoder.resize_token_embeddings(len(base.tokenizer))
    base.save_pretrained(tmp_path / "base")
    with pytest.raises(ConfigError, match=r"new token\(s\) \['<s1>'\] are already in tokenizer's vocabulary"):
        run(make_config(tmp_path / "run", f"model.pretrained_model_name_or_path={tmp_path / 'base'}"))
    assert not (tmp_path / "run" / "boft_weights.safetensors").exists()


def test_the_merged_export_opens_in_stock_diffusers_with_the_tokens(trained, tmp_path):
    from diffusers import StableDiffusionPipeline

    from boft_diffusion.export import export_merged

    out, _ = trained
    pipe = build_tiny_pipeline(seed=0)
    load_boft_weights(pipe, out)
    export_merged(pipe, tmp_path / "merged")
    stock = StableDiffusionPipeline.from_pretrained(tmp_path / "merged")
    assert stock.tokenizer.convert_tokens_to_ids(TOKENS) == pipe.tokenizer.convert_tokens_to_ids(TOKENS)
    torch.testing.assert_close(prompt_states(stock), prompt_states(pipe), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_convert_writes_a_textual_inversion_file_stock_diffusers_reproduces(trained, tmp_path, capsys):
    from boft_diffusion import cli

    out, _ = trained
    lora = tmp_path / "lora.safetensors"
    code = cli.main(
        ["convert", "--adapter", str(out), "--to", "lora", "--error-budget", "0.0001", "--max-rank", "1024",
         "--out", str(lora), "--prompt", "a photo of <s0><s1> toy"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0 and (tmp_path / "lora_emb.safetensors").is_file()
    state = load_file(tmp_path / "lora_emb.safetensors")
    torch.testing.assert_close(state["clip_l"], read_adapter(out).states["token_embeddings"]["text_encoder"])
    difference = float(printed.split("largest pixel difference")[1].split(":")[1].split()[0])
    assert difference < 1.0  # load_lora_weights + load_textual_inversion give the adapter's images


def test_convert_refuses_an_existing_embeddings_file_before_writing(trained, tmp_path, capsys):
    from boft_diffusion import cli

    out, _ = trained
    (tmp_path / "lora_emb.safetensors").write_text("keep me")
    code = cli.main(
        [
            "convert",
            "--adapter",
            str(out),
            "--to",
            "lora",
            "--rank",
            "2",
            "--out",
            str(tmp_path / "lora.safetensors"),
        ]
    )
    assert code == 2 and "lora_emb.safetensors: output path already exists" in capsys.readouterr().err
    assert not (tmp_path / "lora.safetensors").exists()
    assert (tmp_path / "lora_emb.safetensors").read_text() == "keep me"


def test_inspect_names_the_token_embeddings(trained, capsys):
    from boft_diffusion import cli

    out, _ = trained
    assert cli.main(["inspect", str(out)]) == 0
    assert "Trained state token_embeddings: text_encoder 2x32" in capsys.readouterr().out


def test_the_shipped_pivotal_configs_load():
    from pathlib import Path

    from boft_diffusion.training.args import load_config

    configs = sorted((Path(__file__).resolve().parents[1] / "configs" / "pivotal").glob("*.yaml"))
    assert configs
    for path in configs:
        cfg = load_config(PivotalConfig, path)
        assert cfg.data.with_prior_preservation and len(cfg.data.class_context_prompts) == 25
        assert "sks" not in " ".join(cfg.data.class_context_prompts)  # the class alone, never the subject


@pytest.mark.slow
def test_sdxl_gets_the_tokens_in_both_text_encoders(tmp_path):

    from boft_diffusion.tiny import build_tiny_sdxl_pipeline

    out = tmp_path / "run"
    cfg = recipe_config(
        PivotalConfig, out, *FAMILY_FAST, "model.tiny_family=sdxl", "pivotal.initializer_token=null"
    )
    run(cfg)
    adapter = read_adapter(out)
    assert sorted(adapter.states["token_embeddings"]) == ["text_encoder", "text_encoder_2"]
    pipe = build_tiny_sdxl_pipeline(seed=0)
    sizes = (len(pipe.tokenizer), len(pipe.tokenizer_2))
    load_boft_weights(pipe, out)
    assert pipe.tokenizer_2.convert_tokens_to_ids(TOKENS) == [sizes[1], sizes[1] + 1]
    assert new_tokens(pipe.text_encoder_2, "default") == TOKENS
    unload_boft(pipe)
    assert (len(pipe.tokenizer), len(pipe.tokenizer_2)) == sizes
