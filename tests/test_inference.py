"""`evaluate` and `predict` on a real (tiny) trained run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from mnist_jax import data, images, parallel, train
from mnist_jax.inference import evaluate_run, predict_batch, predict_files

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
# The same image through a batch of 5 (predict) and of 1,000 (training's evaluation): XLA:CPU
# agrees to float32 rounding; GPUs run float32 convolutions as TF32 (10-bit mantissa, ~1e-3
# relative) with an algorithm chosen per batch shape, and TPUs use bfloat16 passes.
PROBS_TOLERANCE = 1e-5 if jax.default_backend() == "cpu" else 2e-3


@pytest.fixture(scope="module")
def run_dir(tiny_config, tmp_path_factory):
    config = tiny_config(tmp_path_factory.mktemp("runs"), train_examples=1024, name="tiny")
    assert train.fit(config) == 0
    return Path(config.runs_dir) / "tiny"


@pytest.fixture(scope="module")
def mnist(mnist_dir):
    return data.load_dataset("mnist", mnist_dir)


def best_epoch_event(run_dir) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return next(e for e in events if e["step"] == summary["best/step"] and "test/accuracy" in e)


def test_evaluate_reproduces_the_best_epochs_metrics(run_dir):
    result = evaluate_run(run_dir)
    assert result["checkpoint"] == "best"
    saved = json.loads((run_dir / "eval.json").read_text())
    assert saved == result
    expected = best_epoch_event(run_dir)
    for key, value in expected.items():
        if key.startswith("test/"):
            assert result[key] == pytest.approx(value, abs=1e-6), key
    confusion = np.array(result["test/confusion_matrix"])
    assert confusion.sum() == 300
    assert result["test/accuracy"] == pytest.approx(np.trace(confusion) / 300)


def test_evaluate_the_train_split_counts_every_training_image(run_dir):
    result = evaluate_run(run_dir, split="train")
    assert sum(map(sum, result["train/confusion_matrix"])) == 1024
    assert sum(result[f"train/support/{c}"] for c in range(10)) == 1024


def test_evaluate_cli_prints_the_table_and_rejects_bad_input(run_dir, tmp_path):
    result = runner.invoke(app, ["evaluate", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "precision" in result.output and "confusion matrix" in result.output
    bad = runner.invoke(app, ["evaluate", str(tmp_path)])
    assert bad.exit_code == 2 and "not a run directory" in bad.output
    assert "Traceback" not in bad.output
    split = runner.invoke(app, ["evaluate", str(run_dir), "--split", "val"])
    assert split.exit_code == 2 and "unknown split 'val'" in split.output


def test_predict_matches_the_models_output_on_test_digits(run_dir, mnist, tmp_path):
    predictions = np.load(run_dir / "predictions.npz")
    paths = []
    for i in range(5):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(mnist.test.images[i]).save(path)
        paths.append(path)
    results = predict_files(run_dir, paths)
    best_is_last = json.loads((run_dir / "summary.json").read_text())["best/step"] == 32
    for i, r in enumerate(results):
        assert r.error is None and len(r.top) == 3
        probs = [p for _, p in r.top]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        if best_is_last:  # predictions.npz holds the final model's outputs
            assert r.label == str(predictions["probs"][i].argmax())
            assert probs[0] == pytest.approx(predictions["probs"][i].max(), abs=PROBS_TOLERANCE)


def test_predict_reports_a_bad_file_and_classifies_the_others(run_dir, mnist, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(mnist.test.images[0]).save(good)
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    result = runner.invoke(app, ["predict", str(run_dir), str(bad), str(good), "--json"])
    assert result.exit_code == 1
    assert f"error: {bad}: not a readable image" in result.output
    payload = json.loads(result.stdout[: result.stdout.rindex("]") + 1])
    assert [p["path"] for p in payload] == [str(bad), str(good)]
    assert payload[1]["label"] in [str(d) for d in range(10)] and payload[0]["error"]


def test_a_large_dark_on_light_scan_is_converted_like_mnist(mnist, tmp_path):
    digit = mnist.test.images[0]
    scan = np.kron(255 - digit, np.ones((10, 10), np.uint8))  # 280x280, dark ink on paper
    rgb = np.stack([scan] * 3, axis=-1)
    path = tmp_path / "scan.jpg"
    Image.fromarray(rgb).save(path, quality=95)
    converted = images.load_digit(path, invert=True)
    assert converted.shape == (28, 28) and converted.dtype == np.uint8
    correlation = np.corrcoef(converted.ravel().astype(float), digit.ravel().astype(float))[0, 1]
    assert correlation > 0.8
    # The centre of mass sits at the centre of the field, as in MNIST.
    rows, cols = np.indices(converted.shape)
    mass = converted.astype(float)
    assert abs((rows * mass).sum() / mass.sum() - 14) < 1.0
    assert abs((cols * mass).sum() / mass.sum() - 14) < 1.0


def test_evaluate_reads_only_and_reports_damaged_checkpoints_in_one_line(run_dir, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(run_dir, damaged)
    for array_dir in damaged.glob("checkpoints/*/*/state/d"):
        shutil.rmtree(array_dir)
    result = runner.invoke(app, ["evaluate", str(damaged)])
    assert result.exit_code == 2 and "no checkpoint could be restored" in result.output
    assert "Traceback" not in result.output

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run_dir / "config.json", bare / "config.json")
    result = runner.invoke(app, ["evaluate", str(bare)])
    assert result.exit_code == 2 and "has no checkpoint yet" in result.output
    assert sorted(p.name for p in bare.iterdir()) == ["config.json"], "evaluate must not write"


def test_predict_names_a_directory_given_as_an_image(run_dir, tmp_path):
    result = runner.invoke(app, ["predict", str(run_dir), str(tmp_path)])
    assert result.exit_code == 1 and f"error: {tmp_path}: " in result.output


def test_predict_notes_that_a_blank_image_has_a_meaningless_label(run_dir, mnist, tmp_path):
    blank, digit = tmp_path / "blank.png", tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(blank)
    Image.fromarray(mnist.test.images[0]).save(digit)
    result = runner.invoke(app, ["predict", str(run_dir), str(blank), str(digit)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(str(blank)) and "note: the image is blank" in lines[0]
    assert lines[1].startswith(str(digit)) and "note:" not in lines[1]


def test_a_digit_is_laid_out_for_the_datasets_own_image_size(mnist, tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(np.kron(mnist.test.images[0], np.ones((4, 4), np.uint8))).save(path)
    for size in (28, 32):
        converted = images.load_digit(path, size=size)
        assert converted.shape == (size, size)
        rows, cols = np.indices(converted.shape)
        mass = converted.astype(float)
        assert abs((rows * mass).sum() / mass.sum() - size / 2) < 1.0
        assert abs((cols * mass).sum() / mass.sum() - size / 2) < 1.0


def digit_files(mnist, directory: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        path = directory / f"digit{i}.png"
        Image.fromarray(mnist.test.images[i]).save(path)
        paths.append(path)
    return paths


def test_evaluate_and_predict_reuse_their_kept_programs(run_dir, mnist, tmp_path, monkeypatch):
    """A second `evaluate` traces nothing and gives the same metrics; `predict` of 3 and then
    5 images runs one program (both padded to 8) and gives the same probabilities."""
    monkeypatch.setattr(parallel, "use_compilation_cache", lambda: None)
    kept = tmp_path / "programs"
    monkeypatch.setattr(parallel, "_programs_dir", kept)
    paths = digit_files(mnist, tmp_path, 5)
    with parallel.count_compilations() as cold:
        first = evaluate_run(run_dir)
        three = predict_files(run_dir, paths[:3])
    assert cold["traced"] == 2
    assert sorted(p.name.split("-")[0] for p in kept.iterdir()) == ["eval_step", "evaluate"]
    with parallel.count_compilations() as warm:
        second = evaluate_run(run_dir)
        five = predict_files(run_dir, paths)
    assert warm["traced"] == 0
    assert second == first
    assert [r.top for r in five[:3]] == [r.top for r in three]


def test_predict_pads_to_few_batch_sizes():
    assert [predict_batch(n) for n in (1, 8, 9, 64, 65, 512, 513, 1100)] == [
        8, 8, 64, 64, 512, 512, 1024, 1536
    ]  # fmt: skip


@pytest.mark.slow
def test_evaluate_and_predict_keep_their_programs_in_the_compilation_cache(
    run_dir, mnist, tmp_path
):
    """The commands turn the cache on as `train` does: XLA's code and the kept programs are
    written on the first call, and a second `evaluate` writes nothing new and the same file."""
    cache = tmp_path / "xla"
    env = {**os.environ, "MNIST_JAX_COMPILATION_CACHE": str(cache)}
    paths = [str(p) for p in digit_files(mnist, tmp_path, 2)]

    def command(*args: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "cli", *args], cwd=REPO, env=env, capture_output=True,
            text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr

    command("evaluate", str(run_dir))
    first = (run_dir / "eval.json").read_text()
    command("predict", str(run_dir), *paths)
    kept = sorted(p.name.split("-")[0] for p in (cache / parallel.PROGRAMS_DIR).iterdir())
    assert kept == ["eval_step", "evaluate"]
    entries = {p.name for p in cache.iterdir()}
    assert any(name.startswith("jit_evaluate-") for name in entries)
    command("evaluate", str(run_dir))
    assert {p.name for p in cache.iterdir()} == entries
    assert (run_dir / "eval.json").read_text() == first
