"""Nothing lost, nothing silent: every verb that writes keeps its outputs apart from its inputs, and every
failed write or unreadable image is one ``error:`` line naming the file.

Each rule has a walk over :data:`~boft_diffusion.commands.COMMAND_NAMES`: a verb added later must join
the table below (or be listed as not writing / reading no images), so no verb can skip a rule.

- **Outputs never replace inputs** (:func:`boft_diffusion.atomic.replaced_input`): an output that is,
  holds or overwrites something inside one of the verb's inputs is refused before any work, links
  resolved, whatever ``--overwrite`` says.
- **A failed write is one line** (:class:`boft_diffusion.atomic.WriteError`): a file-size limit
  (``RLIMIT_FSIZE``: the "File too large" of a full volume) hits each verb's first write; the verb
  prints one ``error:`` line naming its output, exits 2, and an output that was there is kept.
- **An unreadable image is one line** (:func:`boft_diffusion.data.load_rgb`, the one image opener):
  decompression bombs, truncated and unidentified files.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
from conftest import DREAMBOOTH_FAST

from boft_diffusion import BOFTConfig, add_boft_to_pipeline, cli, save_boft_weights
from boft_diffusion.atomic import WriteError, atomic_file, replaced_input, staged_dir
from boft_diffusion.commands import COMMAND_NAMES, load_command
from boft_diffusion.data import DataError, load_rgb
from boft_diffusion.tiny import build_tiny_pipeline, save_tiny_pipeline

UNET = BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, init_weights=False)

READS_NO_FILE = {
    "bench": "measures built-in model shapes; --json is its only file",
    "inspect": "writes nothing",
}
"""Verbs with no input a write of theirs could replace, and why (the walk checks the claim)."""


def digest(path: Path) -> str:
    """A hash of a file, or of a folder's files and names: what "left as it was" means below."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def run_cli(argv: list) -> int:
    return cli.main([str(a) for a in argv])


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert len(err) == 1, err
    return err[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A saved tiny base (with an extra picture in it, as hub repositories have), an adapter, a control image."""
    root = tmp_path_factory.mktemp("apart")
    base = save_tiny_pipeline(root / "base")
    from PIL import Image

    Image.new("RGB", (64, 64), "white").save(base / "preview.png")
    pipe = build_tiny_pipeline(seed=0)
    torch.manual_seed(1)
    add_boft_to_pipeline(pipe, {"unet": UNET})
    save_boft_weights(pipe, root / "adapter")
    Image.new("RGB", (64, 64), "black").save(root / "control.png")
    return {"root": root, "base": base, "adapter": root / "adapter", "control": root / "control.png"}


# --- the rule, unit by unit ----------------------------------------------------------------------------
def test_replaced_input_is_holds_inside_links(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"x")
    file = tmp_path / "w.safetensors"
    file.write_bytes(b"w")
    inputs = [folder, file, None]
    assert replaced_input(file, inputs) == file  # is
    assert replaced_input(tmp_path, inputs) == folder  # holds
    assert replaced_input(folder / "a.png", inputs) == folder  # inside, over an existing entry
    assert replaced_input(folder / "a.png", inputs, inside=False) is None
    assert replaced_input(folder / "new.json", inputs) is None  # a new file beside the inputs
    assert replaced_input(tmp_path / "elsewhere.png", inputs) is None
    (tmp_path / "link").symlink_to(file)
    assert replaced_input(tmp_path / "link", inputs) == file  # a link to an input
    os.link(file, tmp_path / "hard")
    assert replaced_input(tmp_path / "hard", [file]) == file  # a hard link is the input
    (tmp_path / "dirlink").symlink_to(folder)
    assert replaced_input(tmp_path / "dirlink" / "a.png", inputs) == folder


@pytest.mark.slow
def test_failed_writes_are_write_errors_naming_the_destination_and_keep_the_old_file(tmp_path):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")

    full = r"out\.safetensors: cannot write \(No space left on device\)"
    with pytest.raises(WriteError, match=full), atomic_file(target) as tmp:
        tmp.write_bytes(b"partial")
        raise OSError(28, os.strerror(28))
    assert target.read_bytes() == b"old"
    assert not [p for p in tmp_path.iterdir() if p.name != "out.safetensors"]

    script = textwrap.dedent(
        f"""
        import resource, signal, torch
        from safetensors.torch import save_file
        from boft_diffusion.atomic import WriteError, atomic_file
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            with atomic_file({str(target)!r}) as tmp:
                save_file({{"w": torch.zeros(100_000)}}, str(tmp))
        except WriteError as err:
            print(err)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "out.safetensors: cannot write (File too large)" in out.stdout, out.stderr
    assert target.read_bytes() == b"old"


def test_a_staged_folder_that_cannot_be_created_is_a_write_error(tmp_path):
    (tmp_path / "file").write_text("a file where a folder would go")
    with (
        pytest.raises(WriteError, match="file/sub/out: cannot write"),
        staged_dir(tmp_path / "file" / "sub" / "out"),
    ):
        pass
    assert (tmp_path / "file").read_text() == "a file where a folder would go"


# --- outputs never replace inputs, walked over every verb ----------------------------------------------
def apart_cases(f: dict) -> dict[str, tuple[list, Path]]:
    """Per writing verb: an invocation whose output would replace one of its inputs, and that input."""
    adapter_file = f["adapter"] / "boft_weights.safetensors"
    out = f["root"] / "run"
    return {
        "convert": (  # the reported case: the diff would replace the adapter it is made from
            ["convert", "--adapter", f["adapter"], "--to", "diff", "--out", adapter_file, "--overwrite"],
            f["adapter"],
        ),
        "merge": (["merge", "--base", f["base"], "--adapter", f["adapter"], "--out", f["base"]], f["base"]),
        "export": (
            ["export", "--base", f["base"], "--adapter", f["adapter"], "--out", f["adapter"]],
            f["adapter"],
        ),
        "sample": (  # a picture inside the base folder
            [
                "sample",
                "--base",
                f["base"],
                "--prompt",
                "a photo",
                "--num-images",
                "1",
                "--steps",
                "1",
                "--out",
                f["base"] / "preview.png",
                "--overwrite",
            ],
            f["base"],
        ),  # fmt: skip
        "eval": (["eval", f["adapter"], "--out", adapter_file, "--overwrite"], f["adapter"]),
        "train": (  # a base loaded from an earlier run's merged export, overwritten by this run's export
            [
                "train",
                "dreambooth",
                *DREAMBOOTH_FAST,
                f"train.output_dir={out}",
                f"model.pretrained_model_name_or_path={out / 'merged'}",
                "train.overwrite_output_dir=true",
                "train.export_merged=true",
            ],
            out / "merged",
        ),  # fmt: skip
    }


def earlier_run_with_a_merged_export(folder: Path) -> None:
    """An output folder as an earlier run leaves it: a manifest recording its ``merged`` export."""
    from boft_diffusion.training.setup import record_outputs

    save_tiny_pipeline(folder / "merged")
    record_outputs(folder, "merged")


def test_every_writing_verb_is_walked():
    cases = set(
        apart_cases({"root": Path("r"), "base": Path("b"), "adapter": Path("a"), "control": Path("c")})
    )
    assert cases | set(READS_NO_FILE) == set(COMMAND_NAMES), "a new verb must join the output/input walk"
    for name in READS_NO_FILE:  # what they claim: inspect has no output option, bench only --json
        import argparse

        parser = argparse.ArgumentParser()
        load_command(name).add_arguments(parser)
        outputs = {a.dest for a in parser._actions if a.dest in ("out", "grid", "json") and a.nargs != 0}
        assert outputs <= ({"json"} if name == "bench" else set()), (name, outputs)


@pytest.mark.parametrize("verb", sorted(set(COMMAND_NAMES) - set(READS_NO_FILE)))
def test_no_verb_writes_over_its_own_input(files, verb, capsys):
    if verb == "train":
        earlier_run_with_a_merged_export(files["root"] / "run")
    argv, replaced = apart_cases(files)[verb]
    before = digest(replaced)
    assert run_cli(argv) == 2
    line = one_error_line(capsys)
    assert "replace" in line and str(replaced.name) in line, line
    assert digest(replaced) == before


def test_symlinked_output_onto_the_input_is_refused(files, tmp_path, capsys):
    link = tmp_path / "diff.safetensors"
    link.symlink_to(files["adapter"] / "boft_weights.safetensors")
    before = digest(files["adapter"])
    assert (
        run_cli(["convert", "--adapter", files["adapter"], "--to", "diff", "--out", link, "--overwrite"]) == 2
    )
    assert "replace the input" in one_error_line(capsys)
    assert digest(files["adapter"]) == before


def test_eval_still_writes_beside_the_adapter(files):
    from boft_diffusion.commands import adapter_inputs

    default = files["adapter"] / "eval_metrics.json"
    assert replaced_input(default, adapter_inputs(files["adapter"])) is None


# --- a failed write is one line, walked over every verb --------------------------------------------------
WRITE_CASES = {
    "convert": ["convert", "--adapter", "{adapter}", "--to", "diff", "--out", "{out}/d.safetensors"],
    "merge": ["merge", "--base", "{base}", "--adapter", "{adapter}", "--out", "{out}/merged"],
    "export": ["export", "--base", "{base}", "--adapter", "{adapter}", "--out", "{out}/m.safetensors",
               "--format", "single-file"],
    "sample": ["sample", "--base", "{base}", "--adapter", "{adapter}", "--prompt", "a photo", "--num-images", "1",
               "--steps", "1", "--out", "{out}/kept.png", "--overwrite"],
    "eval": ["eval", "{adapter}", "--num-images", "1", "--steps", "1", "--out", "{out}/kept.json", "--overwrite"],
    "train": ["train", "dreambooth", *DREAMBOOTH_FAST, "train.output_dir={out}/run"],
    "bench": None,
}  # fmt: skip
"""Each writing verb with its first write to ``{out}``; ``kept.*`` exist before and must survive. ``bench``
is not run (minutes of measuring); its one write, ``--json``, goes through ``atomic_write_text``."""

WALKER = """
import contextlib, io, json, resource, signal, sys
from boft_diffusion import cli
from boft_diffusion.tiny import build_tiny_pipeline
build_tiny_pipeline()  # caches (tokenizer files) written before the limit
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (256, resource.RLIM_INFINITY))
results = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(argv)
        except SystemExit as exit:
            code = exit.code
        except BaseException as bug:
            code = f"{type(bug).__name__}: {bug}"
    results[name] = {"code": code, "err": err.getvalue()}
print("RESULTS" + json.dumps(results))
"""


@pytest.mark.slow
def test_every_verb_reports_a_failed_write_in_one_line_and_keeps_the_old_output(files, tmp_path):
    assert set(WRITE_CASES) | {"inspect"} == set(COMMAND_NAMES), "a new verb must join the write walk"
    (tmp_path / "kept.png").write_bytes(b"an earlier grid")
    (tmp_path / "kept.json").write_text("{}")
    fill = {"adapter": files["adapter"], "base": files["base"], "out": tmp_path}
    cases = {name: [a.format(**fill) for a in argv] for name, argv in WRITE_CASES.items() if argv}
    env = {**os.environ, "BOFT_DIFFUSION_DEBUG": ""}
    proc = subprocess.run(
        [sys.executable, "-c", WALKER, json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert "RESULTS" in proc.stdout, proc.stderr[-3000:]
    results = json.loads(proc.stdout.split("RESULTS", 1)[1])
    for name, result in results.items():
        lines = [line for line in result["err"].splitlines() if line.startswith("error")]
        assert result["code"] == 2 and len(lines) == 1, (name, result)
        assert "cannot write" in lines[0] and "File too large" in lines[0], (name, lines[0])
        assert "Traceback" not in result["err"], (name, result["err"])
    assert (tmp_path / "kept.png").read_bytes() == b"an earlier grid"
    assert (tmp_path / "kept.json").read_text() == "{}"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("kept.png", "kept.json", "run")]
    assert not leftovers, leftovers


# --- an unreadable image is one line, walked over every verb that reads images ---------------------------
def png_bomb(path: Path, side: int = 40_000) -> Path:
    """A valid PNG header claiming ``side`` x ``side`` pixels (Pillow refuses it as a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))  # fmt: skip
    return path


def bad_images(folder: Path) -> dict[str, Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "good.png"
    Image.new("RGB", (64, 64), "red").save(good)
    truncated = folder / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:60])
    unidentified = folder / "unidentified.png"
    unidentified.write_bytes(b"not an image at all" * 10)
    good.unlink()
    return {"bomb": png_bomb(folder / "bomb.png"), "truncated": truncated, "unidentified": unidentified}


@pytest.mark.parametrize("kind", ["bomb", "truncated", "unidentified"])
def test_load_rgb_turns_every_pillow_error_into_one_data_error(tmp_path, kind):
    path = bad_images(tmp_path)[kind]
    with pytest.raises(DataError, match=f"{path.name}: not a readable image"):
        load_rgb(path)


IMAGE_CASES = {
    "sample": lambda f, img: ["sample", "--base", f["base"], "--adapter", f["adapter"], "--prompt", "a photo",
                              "--control", img, "--out", f["root"] / "never.png"],
    "eval": lambda f, img: ["eval", f["adapter"], "--base", f["base"], "--instance-dir", img.parent,
                            "--instance-prompt", "a photo of sks toy", "--class-prompt", "a photo of a toy",
                            "--context-prompt", "a photo of sks toy on a table", "--scorer", "clip:" + str(img.parent),
                            "--out", f["root"] / "never.json"],
    "train": lambda f, img: ["train", "controlnet", "train.max_train_steps=1", "train.report_to=none",
                             f"train.output_dir={f['root'] / 'never'}", f"validation.conditioning_images=[{img}]",
                             "validation.prompts=[a photo]"],
}  # fmt: skip
"""Each verb that opens images a user names, with such an image; ``train dreambooth``'s folders skip an
unreadable file with a warning (tests/test_data.py) and ``train controlnet`` checks its images up front."""


def test_every_verb_that_reads_images_is_walked():
    no_images = {"merge", "export", "convert", "inspect", "bench"}
    assert set(IMAGE_CASES) | no_images == set(COMMAND_NAMES), "a new verb must join the image walk"


@pytest.mark.parametrize("kind", ["bomb", "truncated"])
@pytest.mark.parametrize("verb", sorted(IMAGE_CASES))
def test_every_verb_reports_an_unreadable_image_in_one_line(files, tmp_path, verb, kind, capsys):
    image = bad_images(tmp_path / "images")[kind]
    if verb == "eval":
        for other in set(image.parent.iterdir()) - {image}:
            other.unlink()
    code = run_cli(IMAGE_CASES[verb](files, image))
    line = one_error_line(capsys)
    assert code == 2, line
    assert image.name in line or str(image.parent) in line, line
    assert not (files["root"] / "never.png").exists() and not (files["root"] / "never.json").exists()
    assert not (files["root"] / "never").exists()


# --- found by trying the verbs as a careless user would ---------------------------------------------------
@pytest.mark.parametrize("verb", ["sample", "eval"])
def test_more_steps_than_the_scheduler_has_is_one_line(files, verb, capsys):
    out = files["root"] / f"steps-{verb}"
    argv = {
        "sample": [
            "sample",
            "--base",
            files["base"],
            "--prompt",
            "a photo",
            "--steps",
            5000,
            "--out",
            f"{out}.png",
        ],
        "eval": ["eval", files["adapter"], "--steps", 5000, "--out", f"{out}.json"],
    }[verb]
    assert run_cli(argv) == 2
    assert "--steps 5000" in one_error_line(capsys)
    assert not list(files["root"].glob("steps-*"))
