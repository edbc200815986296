"""The command line: fast start, one-line errors with exit code 2, and a real training run."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import click
import pytest
import typer
from typer.testing import CliRunner

from cli import app
from mnist_jax.config import Config

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def test_help_starts_fast_without_heavy_imports():
    code = (
        "import sys, time; t = time.perf_counter(); import cli; "
        "heavy = [m for m in ('jax', 'flax', 'optax', 'orbax', 'wandb', 'tensorflow', "
        "'matplotlib') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
    for args in (["--help"], ["train", "--help"]):
        result = subprocess.run(
            [sys.executable, "-m", "cli", *args], cwd=REPO, capture_output=True, text=True
        )
        assert result.returncode == 0 and "Usage" in result.stdout


# A process running cli.run with `command` as main. Files in OUT say what happened at its exit:
# "thread" (a worker thread's write after main returned), "handler" (an exit handler registered
# by the command), "finalised" (an object's finaliser, run only by the interpreter's teardown).
PROGRAM = """
import atexit, sys, threading, time
import cli
OUT = sys.argv[1]
def touch(name):
    open(f"{OUT}/{name}", "w").close()
class Finalised:
    def __del__(self, path=f"{OUT}/finalised", open=open):
        open(path, "w").close()
keep = Finalised()
if sys.argv[2] == "handler-before":
    atexit.register(lambda: None)
def command():
    def late_write():
        time.sleep(0.3)
        touch("thread")
    threading.Thread(target=late_write).start()
    atexit.register(touch, "handler")
    sys.stdout.write("unflushed")
    sys.exit(3)
cli.main = command
cli.run()
"""


@pytest.mark.parametrize("case", ["alone", "handler-before"])
def test_the_program_skips_only_the_interpreter_teardown(tmp_path, case):
    """`run` keeps main's exit code, unflushed output, a worker thread's last write and the
    exit handlers; alone, it ends before the teardown (no finaliser runs). Where a handler was
    registered before it (a coverage or profiling wrapper), the exit is Python's own."""
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(tmp_path), case],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert result.stdout == "unflushed" and result.stderr == ""
    assert (tmp_path / "thread").exists() and (tmp_path / "handler").exists()
    assert (tmp_path / "finalised").exists() == (case == "handler-before")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "-1"], "lr must be a positive number"),
        (["--lr", "0"], "lr must be a positive number"),
        (["--batch-size", "0"], "batch_size must be a positive integer"),
        (["--epochs", "0"], "epochs must be a positive integer"),
        (["--optimizer", "lion"], "unknown optimizer 'lion'"),
        (["--schedule", "linear"], "unknown schedule 'linear'"),
        (["--dataset", "svhn"], "unknown dataset 'svhn'"),
        (["--wandb", "sometimes"], "unknown wandb mode"),
        (["--conv-features", "a,b"], "conv_features must be integers"),
        (["--config", "experiments/missing.toml"], "does not exist"),
        (["--batch-size", "100000"], "larger than the 60000 training images"),
    ],
)
def test_invalid_train_flags_get_one_line_and_exit_code_2(args, message, mnist_dir, tmp_path):
    result = invoke("train", "--data-dir", str(mnist_dir), "--runs-dir", str(tmp_path), *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert "Traceback" not in result.output
    assert not list(tmp_path.iterdir()), "a rejected run must not leave a directory behind"


def test_unknown_key_in_a_config_file(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text("lr = 0.1\nlearning_rate = 0.2\n")
    result = invoke("train", "--config", str(path))
    assert result.exit_code == 2 and "unknown config key 'learning_rate'" in result.output


@pytest.mark.slow
def test_sigterm_marks_the_run_interrupted_and_exits_130(tmp_path, mnist_dir):
    """The real process: SIGTERM mid-training saves a checkpoint and exits 130."""
    cmd = [
        sys.executable, "-m", "cli", "train", "--data-dir", str(mnist_dir),
        "--runs-dir", str(tmp_path), "--name", "term", "--train-examples", "512",
        "--test-examples", "200", "--conv-features", "8", "--dense-features", "16",
        "--batch-size", "32", "--epochs", "500", "--log-every", "2", "--wandb", "disabled",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out.decode()
    summary = json.loads((tmp_path / "term" / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    last = tmp_path / "term" / "checkpoints" / "last"
    assert [p.name for p in last.iterdir() if p.name.isdigit()] == [str(summary["step"])]


@pytest.mark.slow
def test_default_recipe_one_epoch_on_full_mnist(tmp_path, mnist_dir):
    """The issue's acceptance run: the default recipe, one epoch, at least 98.5%."""
    env = dict(os.environ, WANDB_MODE="disabled")
    result = subprocess.run(
        [sys.executable, "-m", "cli", "train", "--data-dir", str(mnist_dir), "--epochs", "1",
         "--runs-dir", str(tmp_path), "--name", "default"],
        cwd=REPO, capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())
    assert summary["test/accuracy"] >= 0.985
    assert sum(map(sum, summary["test/confusion_matrix"])) == 10_000


def test_a_command_line_that_does_not_parse_is_one_line_with_exit_code_2():
    for args in (["train", "--epochs", "abc"], ["no-such-command"], ["evaluate"]):
        result = subprocess.run(
            [sys.executable, "-m", "cli", *args], cwd=REPO, capture_output=True, text=True
        )
        assert result.returncode == 2, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "--help" in lines[0], lines


def test_a_bad_wandb_mode_is_reported_before_a_run_directory_exists(tmp_path, mnist_dir):
    result = runner.invoke(
        app,
        ["train", "--data-dir", str(mnist_dir), "--runs-dir", str(tmp_path)],
        env={"WANDB_MODE": "sometimes"},
    )
    assert result.exit_code == 2 and "WANDB_MODE" in result.output
    assert not list(tmp_path.iterdir())


def train_options() -> dict[str, click.Option]:
    command = typer.main.get_command(app).commands["train"]
    return {p.name: p for p in command.params}


def test_every_config_field_is_a_train_flag_with_its_help():
    options = train_options()
    renamed = {f"wandb_{n}": f"--{n}" for n in ("project", "entity", "tags", "group", "notes")}
    for field in dataclasses.fields(Config):
        option = options.pop(field.name)
        flag = renamed.get(field.name, "--" + field.name.replace("_", "-"))
        assert option.opts == [flag], field.name
        assert option.help == field.metadata["help"] and option.help, field.name
        assert option.default is None and not option.required, field.name
    assert sorted(options) == ["config", "resume"]


def test_train_help_lists_every_flag():
    result = invoke("train", "--help")
    assert result.exit_code == 0
    for option in train_options().values():
        assert option.opts[0] in result.output


def all_commands(group: Any, prefix: str = "") -> dict[str, Any]:
    found = {}
    for name, command in group.commands.items():
        found[prefix + name] = command
        if hasattr(command, "commands"):  # a group
            found |= all_commands(command, f"{prefix}{name} ")
    return found


def test_help_paragraphs_have_no_line_breaks_inside():
    # Typer joins the first paragraph's lines but prints the later ones' line breaks as they
    # are, which cuts sentences mid-line in a terminal.
    commands = all_commands(typer.main.get_command(app))
    assert {"train", "sweep", "evaluate", "data download"} <= set(commands)
    for name, command in commands.items():
        for paragraph in (command.help or "").strip().split("\n\n")[1:]:
            assert "\n" not in paragraph.strip(), (name, paragraph)


@pytest.fixture
def fake_train(monkeypatch):
    """`train` without training: records the `Config` given to fit and the flags given to resume."""
    calls: list[object] = []
    module = types.ModuleType("mnist_jax.train")
    module.fit = lambda config, stop=None: calls.append(config) or 0
    module.resume = lambda run_dir, flags, stop=None: calls.append((run_dir, flags)) or 0
    monkeypatch.setitem(sys.modules, "mnist_jax.train", module)
    return calls


def test_flags_parse_into_typed_config_values(fake_train, tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('optimizer = "sgd"\nlr = 0.2\nepochs = 4\n')
    result = invoke(
        "train", "--config", str(path), "--lr", "0.05", "--conv-features", "8, 16",
        "--tags", "a,b", "--data-dir", str(tmp_path), "--runs-dir", "out", "--seed", "7",
        "--project", "p", "--wandb", "offline",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    [config] = fake_train
    assert config.lr == 0.05 and isinstance(config.lr, float)  # the flag beats the file
    assert config.optimizer == "sgd" and config.epochs == 4  # the file beats the defaults
    assert config.batch_size == Config().batch_size  # not given anywhere: the default
    assert config.conv_features == (8, 16) and config.wandb_tags == ("a", "b")
    assert config.data_dir == str(tmp_path) and config.runs_dir == "out"  # str, not Path
    assert (config.seed, config.wandb_project, config.wandb) == (7, "p", "offline")


def test_resume_receives_every_flag_with_none_for_those_not_given(fake_train, tmp_path):
    result = invoke("train", "--resume", str(tmp_path), "--data-dir", "elsewhere", "--epochs", "9")
    assert result.exit_code == 0, result.output
    [(run_dir, flags)] = fake_train
    assert run_dir == tmp_path
    assert set(flags) == {f.name for f in dataclasses.fields(Config)}
    assert {k: v for k, v in flags.items() if v is not None} == {
        "data_dir": "elsewhere",
        "epochs": 9,
    }
