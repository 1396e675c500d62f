"""data.cache_prompt_embeddings: prompts encoded once, cached on disk, reused only when they match."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from conftest import FAMILY_FAST, recipe_config

from boft_diffusion import cli
from boft_diffusion.data import (
    PROMPT_EMBEDDINGS_NAME,
    DataError,
    dreambooth_prompts,
    load_prompt_embeddings,
    read_prompt_embeddings_metadata,
)
from boft_diffusion.families import SD3, SDXL
from boft_diffusion.pipeline import base_fingerprint
from boft_diffusion.recipes import dreambooth
from boft_diffusion.recipes.dreambooth import DreamBoothConfig
from boft_diffusion.tiny import (
    TINY_CLASS_PROMPT,
    TINY_INSTANCE_PROMPT,
    build_tiny_sd3_pipeline,
    build_tiny_sdxl_pipeline,
    make_instance_images,
)
from boft_diffusion.training import prompt_cache
from boft_diffusion.training.args import ConfigError
from boft_diffusion.training.prompt_cache import cached_conditioning, encode_prompts
from boft_diffusion.training.setup import recorded_outputs

QUICK = [
    *FAMILY_FAST,
    "train.train_batch_size=1",  # the cache encodes each prompt alone; a batch of several rounds otherwise
    "validation.prompts=[]",
    "model.tiny_family=sd3",
    "model.tiny_weights=random",
    "train.weighting_scheme=logit_normal",
    "boft.train_text_encoder=false",
]
CACHE = "data.cache_prompt_embeddings=true"


def _cfg(out: Path, *extra: str) -> DreamBoothConfig:
    return recipe_config(DreamBoothConfig, out, *QUICK, *extra)


def _no_encoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any call of the text encoders (through the family or the cache builder) fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the text encoders were called")

    monkeypatch.setattr(prompt_cache, "encode_prompts", refuse)
    monkeypatch.setattr(type(SD3), "encode_prompt", refuse)


def test_cached_prompts_train_the_same_adapter_and_a_rerun_reuses_the_file(tmp_path, monkeypatch):
    plain = dreambooth.run(_cfg(tmp_path / "plain"))
    cached = dreambooth.run(_cfg(tmp_path / "cached", CACHE))
    assert cached.adapter.keys() == plain.adapter.keys()
    assert all(torch.equal(cached.adapter[k], plain.adapter[k]) for k in plain.adapter)  # bit for bit
    assert cached.losses == plain.losses
    assert not (tmp_path / "plain" / PROMPT_EMBEDDINGS_NAME).exists()

    path = tmp_path / "cached" / PROMPT_EMBEDDINGS_NAME
    embeddings, meta = load_prompt_embeddings(path)
    assert meta["prompts"] == [TINY_INSTANCE_PROMPT] and meta["family"] == "sd3"
    pipe = build_tiny_sd3_pipeline()
    assert meta["text_encoder_fingerprint"] == base_fingerprint(pipe, components=list(SD3.text_encoders))
    assert set(embeddings[TINY_INSTANCE_PROMPT]) == {"encoder_hidden_states", "pooled_projections"}
    assert path in recorded_outputs(tmp_path / "cached")  # an output of the run: overwrite may replace it

    _no_encoding(monkeypatch)
    again = dreambooth.run(_cfg(tmp_path / "cached", CACHE))  # the same run again: the file is reused
    assert all(torch.equal(again.adapter[k], plain.adapter[k]) for k in plain.adapter)


def test_a_class_folder_cache_is_reused_by_matching_runs_and_a_mismatch_is_refused(tmp_path, monkeypatch):
    classes = tmp_path / "classes"
    make_instance_images(classes, 2, seed=3)  # class images already there: none are generated
    prior = [
        CACHE,
        "data.with_prior_preservation=true",
        f"data.class_data_dir={classes}",
        "data.num_class_images=2",
    ]
    dreambooth.run(_cfg(tmp_path / "a", *prior))
    path = classes / PROMPT_EMBEDDINGS_NAME
    assert read_prompt_embeddings_metadata(path)["prompts"] == [TINY_INSTANCE_PROMPT, TINY_CLASS_PROMPT]
    assert not (tmp_path / "a" / PROMPT_EMBEDDINGS_NAME).exists()
    stored = path.read_bytes()

    with monkeypatch.context() as patch, warnings.catch_warnings():
        warnings.filterwarnings("error", "Skipping .*prompt_embeddings")  # the cache file is no image
        _no_encoding(patch)
        dreambooth.run(_cfg(tmp_path / "b", *prior))  # another run, the same model and prompts: reused
    assert path.read_bytes() == stored

    cases = [
        (
            ["data.instance_prompt=a photo of zwx toy"],
            r"other prompts \(not there: \[\"a photo of zwx toy\"\]",
        ),
        (["model.tiny_seed=1"], "other text-encoder weights"),
    ]
    for extra, message in cases:
        out = tmp_path / "refused"
        with pytest.raises(ConfigError, match=message):
            dreambooth.run(_cfg(out, *prior, *extra))
        assert not out.exists()  # refused before anything was written
        assert path.read_bytes() == stored

    path.write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="is not a prompt-embedding cache"):
        dreambooth.run(_cfg(tmp_path / "refused", *prior))
    assert not (tmp_path / "refused").exists()


def test_a_cache_whose_tensors_name_no_listed_prompt_is_refused_in_one_line(tmp_path, monkeypatch):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    dreambooth.run(_cfg(tmp_path / "run", CACHE))
    path = tmp_path / "run" / PROMPT_EMBEDDINGS_NAME
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()  # the same family, encoders and prompts: the check passes
    tensors = {name.replace("0/", "7/", 1): t for name, t in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata=metadata)
    _no_encoding(monkeypatch)
    with pytest.raises(
        ConfigError, match=r"prompt_embeddings.safetensors holds tensors of no prompt it lists"
    ):
        dreambooth.run(_cfg(tmp_path / "run", CACHE))  # the same run again: the file is reused


def test_caching_with_a_trained_text_encoder_is_refused_naming_both_keys(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"data.cache_prompt_embeddings.*boft.train_text_encoder=false"):
        _cfg(tmp_path / "run", CACHE, "boft.train_text_encoder=true")
    out = tmp_path / "run"
    args = ["train", "dreambooth", f"train.output_dir={out}", *QUICK, CACHE, "boft.train_text_encoder=true"]
    assert cli.main(args) == 2
    assert "boft.train_text_encoder" in capsys.readouterr().err
    assert not out.exists()


def test_the_prompts_are_each_caption_then_the_class_prompt(tmp_path):
    images = make_instance_images(tmp_path, 3)
    images[1].with_suffix(".txt").write_text("a photo of sks toy on grass")
    assert dreambooth_prompts(images, "p", ".txt", "c") == ["p", "a photo of sks toy on grass", "c"]
    assert dreambooth_prompts([], "p") == ["p"]


def test_sdxl_conditioning_from_the_cache_is_what_the_encoders_give(tmp_path):
    """SDXL's time ids are not cached: they come from the batch's image size, as encode_prompt's do."""
    pipe = build_tiny_sdxl_pipeline()
    encoders = {n: getattr(pipe, n) for n in SDXL.text_encoders}
    tokenizers = {
        n.replace("text_encoder", "tokenizer"): getattr(pipe, n.replace("text_encoder", "tokenizer"))
        for n in SDXL.text_encoders
    }
    prompts = ["a photo of sks toy", "a photo of a toy"]
    embeddings = encode_prompts(SDXL, encoders, tokenizers, prompts, "cpu", 64)
    assert "added_cond_kwargs.time_ids" not in embeddings[prompts[0]]
    batch = {"prompts": [prompts[1], prompts[0]], "pixel_values": torch.zeros(2, 3, 48, 48)}
    with torch.no_grad():
        want = SDXL.encode_prompt(encoders, {**batch, **SDXL.tokenize(tokenizers, batch["prompts"])}, "cpu")
    got = cached_conditioning(SDXL, embeddings, batch, "cpu")
    torch.testing.assert_close(got["encoder_hidden_states"], want["encoder_hidden_states"])
    torch.testing.assert_close(
        got["added_cond_kwargs"]["text_embeds"], want["added_cond_kwargs"]["text_embeds"]
    )
    assert torch.equal(got["added_cond_kwargs"]["time_ids"], want["added_cond_kwargs"]["time_ids"])
