"""``boft-diffusion``: the verb registry, the one error policy, ``train dreambooth`` and the thin scripts."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from conftest import DREAMBOOTH_FAST

from boft_diffusion import cli, commands
from boft_diffusion.io import read_adapter
from boft_diffusion.training import args as training_args
from boft_diffusion.training.args import ConfigError

REPO = Path(__file__).resolve().parents[1]
FAST = DREAMBOOTH_FAST


def console(*args: str) -> list[str]:
    """The installed console script, or the same entry point through the interpreter."""
    exe = shutil.which("boft-diffusion", path=os.path.dirname(sys.executable)) or shutil.which(
        "boft-diffusion"
    )
    return [exe, *args] if exe else [sys.executable, "-m", "boft_diffusion.cli", *args]


def run_process(cmd: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# --- in-process: parsing and errors -------------------------------------------------------------
def test_help_lists_every_key_with_its_documentation(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "dreambooth", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "optim.learning_rate = 0.002" in out
    assert "data.instance_data_dir = None" in out and "Folder of subject photos" in out
    assert "--config" in out and "KEY=VALUE" in out


def test_print_config_applies_file_then_overrides(capsys):
    config = str(REPO / "configs/dreambooth/sd15.yaml")
    assert (
        cli.main(["train", "dreambooth", "--config", config, "--print-config", "optim.learning_rate=1e-4"])
        == 0
    )
    out = capsys.readouterr().out
    assert "learning_rate: 0.0001" in out and "block_num: 8" in out and "resolution: 512" in out


def test_unknown_key_is_one_error_line_with_a_suggestion(capsys):
    assert cli.main(["train", "dreambooth", "optim.learnin_rate=3"]) == 2
    err = capsys.readouterr().err
    assert (
        err.strip()
        == "error: Unknown config key 'optim.learnin_rate' in command line; did you mean 'optim.learning_rate'?"
    )


def test_bad_input_through_the_cli_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    code = cli.main(
        ["train", "dreambooth", f"train.output_dir={out}", f"data.instance_data_dir={tmp_path / 'none'}"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The instance image folder") and "Traceback" not in err
    assert not out.exists()


def test_unknown_recipe_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "controlnet-xyz"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and err.count("\n") == 1


def test_train_in_process(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["train", "dreambooth", f"train.output_dir={out}", *FAST]) == 0
    assert re.search(r"Trained 2 steps; loss [\d.]+ \(first\) -> [\d.]+ \(last\)", capsys.readouterr().out)
    assert (out / "boft_weights.safetensors").is_file()


# --- command registry -----------------------------------------------------------------------------
def test_every_command_is_registered():
    parser = cli.build_parser(commands.load_commands())
    choices = next(a for a in parser._actions if a.dest == "command").choices
    assert (
        list(choices)
        == list(commands.COMMAND_NAMES)
        == ["train", "sample", "merge", "export", "convert", "inspect", "eval", "bench"]
    )


@pytest.mark.parametrize("name", commands.COMMAND_NAMES)
def test_every_command_shows_an_example(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    assert "example" in capsys.readouterr().out


@pytest.mark.parametrize("name", commands.COMMAND_NAMES)
def test_every_command_reports_bad_input_through_the_one_policy(name):
    policy = commands.reports_input_errors(lambda args: 0)
    assert commands.load_command(name).run.__code__ is policy.__code__


def test_commands_are_found_by_module_name(monkeypatch):
    def add_arguments(parser):
        parser.add_argument("--flag", action="store_true")

    module = types.ModuleType("boft_diffusion.commands.hello")
    module.COMMAND = commands.Command("say hello", add_arguments, lambda args: 7 if args.flag else 0)
    monkeypatch.setitem(sys.modules, "boft_diffusion.commands.hello", module)
    monkeypatch.setattr(commands, "COMMAND_NAMES", (*commands.COMMAND_NAMES, "hello"))
    assert commands.load_command("hello") is module.COMMAND
    assert cli.main(["hello", "--flag"]) == 7


# --- one error policy: bad input is one line and exit 2, a bug keeps its traceback -----------------
@pytest.mark.parametrize("argv", [[], ["nope"], ["train"], ["train", "dreambooth", "--nope"]])
def test_usage_errors_are_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0] and "--help" in err[0], err


@pytest.mark.parametrize("bug", [ValueError("bug"), TypeError("bug"), KeyError("bug")])
def test_a_programming_error_keeps_its_traceback(monkeypatch, bug):
    def broken(*args, **kwargs):
        raise bug

    monkeypatch.setattr(training_args, "load_config", broken)
    with pytest.raises(type(bug), match="bug"):
        cli.main(["train", "dreambooth", "--print-config"])


def test_debug_shows_the_traceback_of_bad_input(monkeypatch):
    monkeypatch.setenv("BOFT_DIFFUSION_DEBUG", "1")
    with pytest.raises(ConfigError, match="optim.learnin_rate"):
        cli.main(["train", "dreambooth", "optim.learnin_rate=3"])


def test_an_error_message_over_several_lines_is_printed_as_one(monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise ConfigError("first line\n  second line\n")

    monkeypatch.setattr(training_args, "load_config", refuse)
    assert cli.main(["train", "dreambooth"]) == 2
    assert capsys.readouterr().err == "error: first line second line\n"


# --- the installed entry points -------------------------------------------------------------------
@pytest.mark.slow
def test_console_script_and_thin_script(tmp_path):
    out = tmp_path / "out"
    config = str(REPO / "configs/dreambooth/tiny.yaml")
    proc = run_process(
        console("train", "dreambooth", "--config", config, f"train.output_dir={out}", *FAST), tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_adapter(out).configs["unet"].boft_block_num == 4
    script = run_process(
        [sys.executable, str(REPO / "scripts/train_dreambooth.py"), "--print-config"], tmp_path
    )
    assert script.returncode == 0, script.stderr[-3000:]
    assert "output_dir: outputs/dreambooth-tiny" in script.stdout
    bench = run_process([sys.executable, str(REPO / "scripts/benchmark.py"), "--help"], tmp_path)
    assert bench.returncode == 0 and "--preset" in bench.stdout, bench.stderr[-3000:]


@pytest.mark.slow
def test_the_readme_quickstart_command_runs_the_default_job(tmp_path):
    """`boft-diffusion train dreambooth` in a fresh folder: the default job (the learned tiny default, its
    config untouched) with its schedule shortened from 300 steps to 20, so the suite stays short; the
    full job's figures come from the README's own command."""
    short = ["train.max_train_steps=20", "train.checkpointing_steps=10", "validation.validation_steps=10"]
    proc = run_process(console("train", "dreambooth", *short), tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "outputs" / "dreambooth-tiny"
    assert (out / "boft_weights.safetensors").is_file() and (out / "README.md").is_file()
    assert sorted(p.name for p in (out / "validation").iterdir()) == [
        "final.png",
        "step-000010.png",
        "step-000020.png",
    ]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-20"]
    assert (out / "metrics.png").is_file()
    report = json.loads((out / "metrics.json").read_text())
    assert report["step"] == 20 and set(report["before"]) == set(report["after"])
    assert re.search(r"loss [\d.]+ \(first\) -> [\d.]+ \(last\)", proc.stdout)
