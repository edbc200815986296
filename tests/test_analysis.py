"""`mnist-jax analyze`: exact dataset statistics, run reading, run analysis, the report."""

from __future__ import annotations

import base64
import csv
import json
import math
import os
from decimal import Decimal, localcontext
from fractions import Fraction
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from sklearn import metrics as skm
from typer.testing import CliRunner

from cli import app
from mnist_jax import analysis, data, metrics, models
from mnist_jax.config import Config
from mnist_jax.data import load_dataset
from mnist_jax.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NUM_TEST = 300  # test predictions per synthetic run: small keeps ROC curves and figures fast


# --------------------------------------------------------------------------------------------
# Synthetic run directories that follow docs/run-record.md
# --------------------------------------------------------------------------------------------

_summary = jax.jit(metrics.classification_summary)


def write_run(
    root: Path,
    name: str,
    *,
    test_labels: np.ndarray,
    accuracy: float = 0.95,
    status: str = "completed",
    epochs: int = 3,
    epochs_done: int | None = None,
    predictions: bool = True,
    checkpoint: bool = True,
    metrics_lines: bool = True,
    config: dict[str, Any] | None = None,
    seed: int = 0,
) -> Path:
    """A run directory as `mnist-jax train` writes it, its numbers derived from fake predictions.

    Predictions cover test indices 0..len(test_labels)-1 and are right for about `accuracy` of
    them; summary and epoch events come from `mnist_jax.metrics`, as in training.
    """
    rng = np.random.default_rng(seed)
    run = root / name
    run.mkdir(parents=True)
    cfg = Config(epochs=epochs, **(config or {})).replace(name=name).to_dict()
    environment = {"backend": "cpu", "device_kind": "cpu", "jax": "0.0", "started": "2025"}
    (run / "config.json").write_text(json.dumps({"config": cfg, "environment": environment}))

    labels = np.asarray(test_labels, np.int32)
    n, c = len(labels), 10
    right = rng.random(n) < accuracy
    predicted = np.where(right, labels, (labels + rng.integers(1, c, n)) % c)
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), predicted] += rng.uniform(2, 9, n)
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs = probs.astype(np.float32)
    confusion = metrics.confusion_matrix(labels, probs.argmax(1), c)
    final = metrics.to_record(
        "test",
        _summary(confusion, probs, labels),
        confusion,
        loss=float(-np.mean(np.log(probs[np.arange(n), labels]))),
    )

    done = epochs if epochs_done is None else epochs_done
    steps_per_epoch = 100
    events = []
    for epoch in range(1, done + 1):
        for k in range(1, 5):
            events.append(
                {"step": (epoch - 1) * steps_per_epoch + 25 * k, "epoch": epoch - 1 + k / 4,
                 "train/loss": 1.0 / (epoch + k), "train/accuracy": 0.9 + 0.01 * epoch,
                 "train/lr": 1e-3, "train/examples_per_sec": 5000.0}
            )  # fmt: skip
        lag = (done - epoch) * 0.01
        epoch_event = {k: v for k, v in final.items() if k != "test/confusion_matrix"}
        epoch_event.update(
            {"step": epoch * steps_per_epoch, "epoch": epoch, "train/loss": 0.5 / epoch,
             "train/accuracy": 0.9 + 0.02 * epoch, "test/accuracy": final["test/accuracy"] - lag}
        )  # fmt: skip
        events.append(epoch_event)
    if metrics_lines:
        (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    else:
        (run / "metrics.jsonl").write_text("")

    summary: dict[str, Any] = {"status": status, "step": done * steps_per_epoch, "epoch": done}
    if status != "completed":
        summary["message"] = f"stopped: {status}"
    if done:
        summary.update(events[-1])
        summary.update(
            {"test/confusion_matrix": final["test/confusion_matrix"],
             "train/examples_per_sec": 5000.0 + seed, "time/compile_seconds": 1.5,
             "time/train_seconds": 10.0 + seed, "time/total_seconds": 12.0 + seed,
             "best/test/accuracy": events[-1]["test/accuracy"], "best/step": done * 100}
        )  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))

    if checkpoint and done:
        for kind in ("last", "best"):
            (run / "checkpoints" / kind / str(done * steps_per_epoch)).mkdir(parents=True)
    if predictions:
        np.savez(run / "predictions.npz", probs=probs, labels=labels,
                 indices=np.arange(n, dtype=np.int32))  # fmt: skip
    return run


@pytest.fixture(scope="module")
def mnist(mnist_dir: Path):
    return load_dataset("mnist", mnist_dir, "local", progress=False)


@pytest.fixture(scope="module")
def test_labels(mnist) -> np.ndarray:
    return mnist.test.labels[:NUM_TEST]


# --------------------------------------------------------------------------------------------
# Dataset statistics
# --------------------------------------------------------------------------------------------


def test_pixel_stats_hand_computed():
    stats = analysis.pixel_stats(
        analysis.pixel_value_counts(np.array([[0, 255], [255, 0]], np.uint8))
    )
    assert stats["pixel_mean_0_255"] == 127.5
    assert stats["pixel_std_0_255"] == 127.5
    assert stats["pixel_mean_0_1"] == 0.5
    assert stats["pixel_std_0_1"] == 0.5
    assert stats["fraction_zero"] == stats["fraction_255"] == 0.5

    stats = analysis.pixel_stats(analysis.pixel_value_counts(np.array([1, 2, 3, 4], np.uint8)))
    assert stats["pixel_mean_0_255"] == 2.5
    assert stats["pixel_std_0_255"] == math.sqrt(1.25)
    assert stats["fraction_zero"] == stats["fraction_255"] == 0.0
    assert stats["num_pixels"] == 4


def test_pixel_value_counts_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        analysis.pixel_value_counts(np.zeros((2, 2), np.float32))


@pytest.mark.parametrize("split", ["train", "test"])
def test_pixel_stats_exact_on_real_mnist(mnist, split):
    images = getattr(mnist, split).images
    labels = getattr(mnist, split).labels
    stats = analysis.split_stats(images, labels, mnist.class_names)

    # Oracle 1: exact rationals. In float64 every partial sum of integer pixels (and of their
    # squares) is an integer below 2**53, so numpy's sums are exact whatever their order.
    pixels = images.reshape(-1).astype(np.float64)
    n = pixels.size
    s1, s2 = int(pixels.sum()), int(pixels @ pixels)
    with localcontext() as ctx:
        ctx.prec = 60
        exact_std = Decimal(n * s2 - s1 * s1).sqrt() / n
    assert stats["pixel_mean_0_255"] == float(Fraction(s1, n))
    assert stats["pixel_mean_0_1"] == float(Fraction(s1, 255 * n))
    assert stats["pixel_std_0_255"] == float(exact_std)
    assert stats["pixel_std_0_1"] == float(exact_std / 255)

    # Oracle 2: plain float64 numpy over all pixels (its rounding differs by an ulp or two).
    assert stats["pixel_mean_0_255"] == pixels.mean()
    np.testing.assert_allclose(stats["pixel_std_0_255"], pixels.std(), rtol=1e-14)
    pixels /= 255
    np.testing.assert_allclose(stats["pixel_mean_0_1"], pixels.mean(), rtol=1e-14)
    np.testing.assert_allclose(stats["pixel_std_0_1"], pixels.std(), rtol=1e-14)
    assert stats["fraction_zero"] == np.mean(images == 0)
    assert stats["fraction_255"] == np.mean(images == 255)
    assert list(stats["class_counts"].values()) == np.bincount(labels, minlength=10).tolist()
    assert stats["num_images"] == len(labels)
    assert sum(stats["pixel_value_counts"]) == n
    if split == "train":  # the widely quoted MNIST normalisation constants
        assert round(stats["pixel_mean_0_1"], 4) == 0.1307
        assert round(stats["pixel_std_0_1"], 4) == 0.3081


def test_mean_and_sample_images_match_numpy(mnist):
    images, labels = mnist.test.images[:2000], mnist.test.labels[:2000]
    means = analysis.class_mean_images(images, labels, 10)
    for c in range(10):
        np.testing.assert_allclose(means[c], images[labels == c].astype(np.float64).mean(0))
    np.testing.assert_allclose(analysis.mean_image(images), images.astype(np.float64).mean(0))

    grid = analysis.sample_images(images, labels, 10, 4)
    assert grid.shape == (10, 4, 28, 28)
    for c in range(10):
        for k in range(4):
            matches = np.flatnonzero((images == grid[c, k]).all(axis=(1, 2)))
            assert (labels[matches] == c).any()


# --------------------------------------------------------------------------------------------
# Finding and reading runs
# --------------------------------------------------------------------------------------------


def test_find_runs_globs_ignore_non_runs_and_explicit_dirs_must_be_runs(tmp_path, test_labels):
    a = write_run(tmp_path / "runs", "a", test_labels=test_labels, predictions=False)
    b = write_run(tmp_path / "runs", "b", test_labels=test_labels, predictions=False)
    (tmp_path / "runs" / "notes").mkdir()
    (tmp_path / "runs" / "stray.txt").write_text("x")

    found, note = analysis.find_runs([str(tmp_path / "runs" / "*")], "unused")
    assert found == [a, b] and note == ""
    found, _ = analysis.find_runs(None, tmp_path / "runs")
    assert found == [a, b]
    found, _ = analysis.find_runs([str(b), str(tmp_path / "runs" / "*")], "unused")
    assert found == [b, a]  # given order, each run once

    with pytest.raises(UserError, match="not a run directory"):
        analysis.find_runs([str(tmp_path / "runs" / "notes")], "unused")
    with pytest.raises(UserError, match="holds runs; use --runs-dir"):
        analysis.find_runs([str(tmp_path / "runs")], "unused")
    with pytest.raises(UserError, match="no such directory"):
        analysis.find_runs([str(tmp_path / "nope")], "unused")
    with pytest.raises(UserError, match="matches nothing"):
        analysis.find_runs([str(tmp_path / "nope-*")], "unused")

    found, note = analysis.find_runs([str(tmp_path / "runs" / "note*")], "unused")
    assert found == [] and "No runs found" in note
    found, note = analysis.find_runs(None, tmp_path / "missing")
    assert found == [] and "does not exist" in note


def test_globs_list_runs_that_lost_their_config_as_damaged(tmp_path, test_labels):
    root = tmp_path / "runs"
    good = write_run(root, "good", test_labels=test_labels, predictions=False)
    lost = write_run(root, "lost-config", test_labels=test_labels, predictions=False)
    (lost / "config.json").unlink()
    crashed = root / "crashed"  # died before its first summary: only a metrics line is left
    crashed.mkdir()
    (crashed / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.3}\n')
    (root / "notes").mkdir()  # a plain directory: no run files, still ignored

    found, note = analysis.find_runs([str(root / "*")], "unused")
    assert found == [crashed, good, lost] and note == ""
    assert analysis.find_runs(None, root)[0] == [crashed, good, lost]
    assert analysis.find_runs([str(lost)], "unused")[0] == [lost]

    run = analysis.load_run(lost)
    assert "no config.json" in run.problems and run.config == {}
    assert run.status == "completed"  # its summary survived and still says so
    row = analysis.comparison_row(analysis.analyze_run(run))
    assert row["status"] == "completed" and "no config.json" in row["problems"]
    assert row["test/accuracy"] == run.summary["test/accuracy"]

    run = analysis.load_run(crashed)
    assert run.status == "unknown"
    assert "no config.json" in run.problems and "no summary.json" in run.problems


def test_complete_run_reads_without_problems(tmp_path, test_labels):
    run = analysis.load_run(write_run(tmp_path, "ok", test_labels=test_labels))
    assert run.problems == []
    assert run.status == "completed"
    assert run.config["epochs"] == 3
    assert [e["epoch"] for e in run.epoch_events] == [1, 2, 3]
    assert len(run.step_events) == 12
    assert run.checkpoints == {"last": [300], "best": [300]}
    assert run.predictions is not None and run.predictions.probs_NxC.shape == (NUM_TEST, 10)


def _corrupt_summary(run: Path) -> None:
    (run / "summary.json").write_text('{"status": "compl')


def _truncate_metrics(run: Path) -> None:
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 301, "train/lo')


def _corrupt_config(run: Path) -> None:
    (run / "config.json").write_text("not json")


def _corrupt_predictions(run: Path) -> None:
    (run / "predictions.npz").write_bytes(b"PK\x03\x04garbage")


@pytest.mark.parametrize(
    ("kwargs", "damage", "status", "problem"),
    [
        ({"predictions": False}, None, "completed", "no predictions.npz"),
        ({"checkpoint": False}, None, "completed", "no checkpoint"),
        ({"metrics_lines": False}, None, "completed", "metrics.jsonl is empty"),
        ({"status": "interrupted", "epochs_done": 0}, None, "interrupted", "no checkpoint"),
        ({}, _corrupt_summary, "unknown", "summary.json is not valid JSON"),
        ({}, _truncate_metrics, "completed", "1 unreadable line(s) in metrics.jsonl"),
        ({}, _corrupt_config, "completed", "config.json is not valid JSON"),
        ({}, _corrupt_predictions, "completed", "predictions.npz cannot be read"),
    ],
)
def test_partial_runs_are_read_with_their_problems(
    tmp_path, test_labels, kwargs, damage, status, problem
):
    path = write_run(tmp_path, "r", test_labels=test_labels, **kwargs)
    if damage:
        damage(path)
    run = analysis.load_run(path)
    assert run.status == status
    assert any(problem in p for p in run.problems), run.problems
    analysed = analysis.analyze_run(run)  # never raises on a partial run
    row = analysis.comparison_row(analysed)
    assert row["status"] == status and problem in row["problems"]


# --------------------------------------------------------------------------------------------
# Run analysis against independent oracles
# --------------------------------------------------------------------------------------------


def test_run_analysis_matches_sklearn(tmp_path, test_labels, mnist):
    path = write_run(tmp_path, "ok", test_labels=test_labels, accuracy=0.8)
    result = analysis.analyze_run(analysis.load_run(path), lambda *_: mnist)
    p = result.run.predictions
    predicted = p.probs_NxC.argmax(1)

    np.testing.assert_array_equal(result.confusion_CxC, skm.confusion_matrix(p.labels_N, predicted))
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        p.labels_N, predicted, zero_division=0
    )
    np.testing.assert_allclose(result.per_class["precision"], precision, rtol=1e-6)
    np.testing.assert_allclose(result.per_class["recall"], recall, rtol=1e-6)
    np.testing.assert_allclose(result.per_class["f1"], f1, rtol=1e-6)
    np.testing.assert_array_equal(result.per_class["support"], support)
    for c in range(10):
        positives = p.labels_N == c
        scores = p.probs_NxC[:, c]
        fpr, tpr, _ = skm.roc_curve(positives, scores, drop_intermediate=False)
        np.testing.assert_allclose(result.ranking.roc[c][0], fpr, atol=1e-6)
        np.testing.assert_allclose(result.ranking.roc[c][1], tpr, atol=1e-6)
        precision_c, recall_c, _ = skm.precision_recall_curve(positives, scores)
        np.testing.assert_allclose(result.ranking.pr[c][0], recall_c, atol=1e-6)
        np.testing.assert_allclose(result.ranking.pr[c][1], precision_c, atol=1e-6)
        assert result.ranking.auroc_C[c] == pytest.approx(
            skm.roc_auc_score(positives, scores), abs=1e-6
        )
        assert result.ranking.average_precision_C[c] == pytest.approx(
            skm.average_precision_score(positives, scores), abs=1e-6
        )

    # The gallery: the wrong predictions with the highest confidence, most confident first.
    confidence = p.probs_NxC.max(1)
    wrong = np.flatnonzero(predicted != p.labels_N)
    expected = wrong[np.argsort(-confidence[wrong], kind="stable")][: analysis.GALLERY_SIZE]
    mistakes = result.mistakes
    np.testing.assert_array_equal(mistakes.indices_K, expected)
    np.testing.assert_array_equal(mistakes.predicted_K, predicted[expected])
    np.testing.assert_array_equal(mistakes.images_KxHxW, mnist.test.images[expected])
    assert np.all(np.diff(mistakes.confidence_K) <= 0)
    assert result.notes == []

    curves = result.curves
    np.testing.assert_array_equal(curves["epoch"], [1, 2, 3])
    assert curves["test/accuracy"][-1] == result.run.summary["test/accuracy"]


def test_gallery_skipped_when_labels_do_not_match(tmp_path, test_labels, mnist):
    path = write_run(tmp_path, "shifted", test_labels=np.roll(test_labels, 1))
    result = analysis.analyze_run(analysis.load_run(path), lambda *_: mnist)
    assert result.mistakes is None
    assert any("do not match" in n for n in result.notes)
    assert result.ranking is not None  # everything else is still there


def test_comparison_rows_sort_by_accuracy_with_missing_last():
    rows = [
        {"name": "b", "test/accuracy": 0.9},
        {"name": "none", "test/accuracy": None},
        {"name": "a", "test/accuracy": 0.99},
        {"name": "c", "test/accuracy": 0.9},
    ]
    assert [r["name"] for r in analysis.sort_rows(rows)] == ["a", "b", "c", "none"]


def test_run_table_shows_the_model_config_json_describes(tmp_path, test_labels):
    from mnist_jax.analysis import sections

    runs = tmp_path / "runs"
    described = write_run(runs, "described", test_labels=test_labels, predictions=False)
    saved = json.loads((described / "config.json").read_text())
    saved["model"] = {
        "name": "cnn", "params": 421642, "flops_per_example": 12345678,
        "train_flops_per_example": 37_000_000,
        "layers": [{"name": "conv_0", "params": 320}, {"name": "dense_0", "params": 421322}],
    }  # fmt: skip
    (described / "config.json").write_text(json.dumps(saved))
    write_run(runs, "older", test_labels=test_labels, predictions=False, accuracy=0.5, seed=1)

    rows = [analysis.comparison_row(analysis.analyze_run(analysis.load_run(p))) for p in
            (described, runs / "older")]  # fmt: skip
    assert [r[k] for r in rows for k in analysis.MODEL_COLUMNS] == [
        "cnn", 421642, 12345678, 37_000_000, None, None, None, None
    ]  # fmt: skip
    # the summary's 5,000 examples/s times 37 MFLOP each (write_run: 5,000 + seed)
    assert rows[0]["train/examples_per_sec"] == 5000.0
    assert rows[0][analysis.TRAIN_GFLOPS] == pytest.approx(185.0)
    assert rows[1]["train/examples_per_sec"] == 5001.0 and rows[1][analysis.TRAIN_GFLOPS] is None
    table = sections.comparison_table(rows)
    columns = [table.headers.index(h) for h in ("model", "params", "FLOPs/example", "GFLOP/s")]
    assert [table.rows[0][i] for i in columns] == ["cnn", "421,642", "12,345,678", "185.0"]
    assert [table.rows[1][i] for i in columns] == ["", "", "", "–"]  # written before the model was

    page = analysis.analyze(tmp_path / "out", runs_dir=runs, include_dataset=False).read_text()
    assert "<th>FLOPs/example</th>" in page and '<td class="num">12,345,678</td>' in page
    assert "<th>GFLOP/s</th>" in page and '<td class="num">185.0</td>' in page
    with (tmp_path / "out" / "runs.csv").open() as f:
        by_name = {r["name"]: r for r in csv.DictReader(f)}
    assert (by_name["described"]["model"], by_name["described"]["params"]) == ("cnn", "421642")
    assert by_name["described"]["flops_per_example"] == "12345678"
    assert by_name["described"]["train_flops_per_example"] == "37000000"
    assert float(by_name["described"][analysis.TRAIN_GFLOPS]) == pytest.approx(185.0)
    assert by_name["older"]["model"] == by_name["older"]["params"] == ""
    assert by_name["older"][analysis.TRAIN_GFLOPS] == ""


# --------------------------------------------------------------------------------------------
# The command, end to end
# --------------------------------------------------------------------------------------------


class _Links(HTMLParser):
    """Collects every tag and every URL-valued attribute of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.urls: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "action", "data", "poster"):
                self.urls.append((tag, name, value or ""))


@pytest.fixture(scope="module")
def bare_analysis(tmp_path_factory, mnist_dir, test_labels):
    """`mnist-jax analyze` with no arguments in a directory with a `runs/` of every kind."""
    root = tmp_path_factory.mktemp("project")
    runs = root / "runs"
    local = {"data_dir": str(mnist_dir), "source": "local"}
    write_run(runs, "adam-good", test_labels=test_labels, accuracy=0.97, config=local, seed=1)
    write_run(runs, "sgd-best", test_labels=test_labels, accuracy=0.995,
              config={**local, "optimizer": "sgd", "lr": 0.1}, seed=2)  # fmt: skip
    write_run(runs, "stopped", test_labels=test_labels, accuracy=0.6, status="interrupted",
              epochs_done=1, predictions=False, config=local)  # fmt: skip
    write_run(runs, "starting", test_labels=test_labels, status="running", epochs_done=0,
              predictions=False, checkpoint=False, metrics_lines=False)  # fmt: skip
    _corrupt_summary(write_run(runs, "damaged", test_labels=test_labels, predictions=False))
    lost = write_run(runs, "no-config", test_labels=test_labels, accuracy=0.5,
                     status="interrupted", epochs_done=2, predictions=False, seed=3)  # fmt: skip
    (lost / "config.json").unlink()
    write_run(runs, "elsewhere", test_labels=test_labels, accuracy=0.9,
              config={"data_dir": str(root / "gone"), "source": "local"})  # fmt: skip
    (runs / "not-a-run").mkdir()

    old_cwd = os.getcwd()
    os.chdir(root)
    try:
        result = CliRunner().invoke(app, ["analyze"], env={"MNIST_JAX_DATA_DIR": str(mnist_dir)})
    finally:
        os.chdir(old_cwd)
    assert result.exit_code == 0, result.output
    return root, result.output


def test_bare_command_writes_every_file_and_ends_with_the_report_path(bare_analysis):
    root, output = bare_analysis
    out = root / "analysis"
    assert output.strip().splitlines()[-1] == f"report: {Path('analysis') / 'report.html'}"
    for name in ("report.html", "runs.csv", "dataset_stats.json"):
        assert (out / name).is_file()
    dataset_figures = {p.name for p in (out / "figures" / "dataset").iterdir()}
    assert dataset_figures == {
        "sample_images.png", "mean_intensity.png", "pixel_histogram.png",
        "class_distribution.png", "class_mean_images.png",
    }  # fmt: skip
    complete = {p.name for p in (out / "figures" / "runs" / "adam-good").iterdir()}
    assert complete == {
        "learning_curves.png", "confusion_matrix.png", "per_class_scores.png",
        "roc_pr_curves.png", "misclassified.png",
    }  # fmt: skip
    # Its own data_dir is gone: the images come from the data the command was given.
    elsewhere = {p.name for p in (out / "figures" / "runs" / "elsewhere").iterdir()}
    assert elsewhere == complete
    assert {p.name for p in (out / "figures" / "runs" / "stopped").iterdir()} == {
        "learning_curves.png", "confusion_matrix.png", "per_class_scores.png"
    }  # fmt: skip
    assert (out / "figures" / "comparison_curves.png").is_file()
    for png in out.rglob("*.png"):
        assert png.read_bytes().startswith(PNG_SIGNATURE)
    assert "0.13066047627384286" in output  # the statistics table is printed


def test_dataset_stats_json_holds_the_exact_statistics(bare_analysis, mnist):
    root, _ = bare_analysis
    stats = json.loads((root / "analysis" / "dataset_stats.json").read_text())
    assert stats == json.loads(json.dumps(analysis.dataset_stats(mnist)))
    assert stats["image_shape"] == [28, 28] and stats["num_classes"] == 10
    train = stats["splits"]["train"]
    assert train["pixel_mean_0_1"] == float(Fraction(int(mnist.train.images.sum()), 255 * 47040000))
    assert sum(train["class_counts"].values()) == 60000


def test_runs_csv_is_sorted_by_accuracy_and_holds_the_summary_numbers(bare_analysis):
    root, _ = bare_analysis
    with (root / "analysis" / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == analysis.COMPARISON_COLUMNS
    names = [r["name"] for r in rows]
    assert names == [
        "sgd-best", "adam-good", "damaged", "elsewhere", "stopped", "no-config", "starting"
    ]  # fmt: skip
    accuracies = [float(r["test/accuracy"]) for r in rows[:-1]]
    assert accuracies == sorted(accuracies, reverse=True)
    assert rows[-1]["test/accuracy"] == ""  # no epoch finished: last

    by_name = {r["name"]: r for r in rows}
    summary = json.loads((root / "runs" / "sgd-best" / "summary.json").read_text())
    best = by_name["sgd-best"]
    assert float(best["test/accuracy"]) == summary["test/accuracy"]
    assert float(best["test/f1_macro"]) == summary["test/f1_macro"]
    assert float(best["test/auroc_macro"]) == summary["test/auroc_macro"]
    assert float(best["time/train_seconds"]) == summary["time/train_seconds"]
    assert float(best["train/examples_per_sec"]) == summary["train/examples_per_sec"]
    assert (best["optimizer"], best["lr"], best["schedule"]) == ("sgd", "0.1", "onecycle")
    assert (best["batch_size"], best["epochs"], best["status"]) == ("128", "3", "completed")
    assert best["problems"] == ""
    assert by_name["stopped"]["status"] == "interrupted"
    assert "no predictions.npz" in by_name["stopped"]["problems"]
    # An unreadable summary: status unknown, numbers from the last epoch event.
    damaged = by_name["damaged"]
    events = (root / "runs" / "damaged" / "metrics.jsonl").read_text().splitlines()
    assert damaged["status"] == "unknown"
    assert float(damaged["test/accuracy"]) == json.loads(events[-1])["test/accuracy"]
    assert by_name["starting"]["test/accuracy"] == ""
    # A run that lost its config.json: listed with what is missing, its numbers from summary.json.
    lost = by_name["no-config"]
    assert lost["status"] == "interrupted" and "no config.json" in lost["problems"]
    assert lost["optimizer"] == "" and float(lost["test/accuracy"]) > 0
    assert "not-a-run" not in names


def test_report_is_self_contained(bare_analysis):
    root, _ = bare_analysis
    page = (root / "analysis" / "report.html").read_text()
    parser = _Links()
    parser.feed(page)
    images = [value for tag, name, value in parser.urls if tag == "img"]
    assert len(images) >= 5 + 4 * 2 + 1  # dataset, complete runs, comparison
    for tag, name, value in parser.urls:
        assert not value.lower().startswith(("http:", "https:", "//", "file:")), (tag, value)
        if name == "src":
            assert value.startswith("data:image/png;base64,")
            assert base64.b64decode(value.split(",", 1)[1]).startswith(PNG_SIGNATURE)
        if name == "href":
            assert value.startswith("#")
    assert "script" not in parser.tags and "link" not in parser.tags
    assert "@import" not in page and "url(" not in page


def test_report_shows_partial_runs_with_status_and_what_is_missing(bare_analysis):
    root, _ = bare_analysis
    page = (root / "analysis" / "report.html").read_text()
    for name in ("adam-good", "sgd-best", "stopped", "starting", "damaged", "elsewhere",
                 "no-config"):  # fmt: skip
        assert f'id="run-{name}"' in page
    for badge in ("completed", "interrupted", "running", "unknown"):
        assert f">{badge}</span>" in page
    assert "stopped: interrupted" in page  # the summary's message
    assert "no predictions.npz" in page
    assert "metrics.jsonl is empty" in page
    assert "summary.json is not valid JSON" in page
    assert "no config.json" in page
    assert "Dataset: mnist" in page and "0.3081078038564627" in page
    assert "not-a-run" not in page


def test_missing_dataset_still_reports_runs(tmp_path, test_labels):
    gone = {"data_dir": str(tmp_path / "gone"), "source": "local"}
    write_run(tmp_path / "runs", "r", test_labels=test_labels, config=gone)
    report = analysis.analyze(
        tmp_path / "out", data_dir=tmp_path / "no-data", runs_dir=tmp_path / "runs"
    )
    page = report.read_text()
    assert "Dataset section missing: mnist could not be loaded" in page
    assert 'id="run-r"' in page
    assert "Misclassified gallery skipped: the mnist dataset could not be loaded" in page
    assert str(tmp_path / "gone") in page  # the run's own data_dir is the one reported
    figures = {p.name for p in (tmp_path / "out" / "figures" / "runs" / "r").iterdir()}
    assert "roc_pr_curves.png" in figures and "misclassified.png" not in figures
    assert not (tmp_path / "out" / "dataset_stats.json").exists()
    with pytest.raises(UserError, match="could not be loaded"):
        analysis.analyze(tmp_path / "out2", data_dir=tmp_path / "no-data", runs_dir=tmp_path / "x")


def test_no_runs_found_still_reports_the_dataset(tmp_path, mnist, monkeypatch):
    from mnist_jax import data

    small = data.subset(mnist, 500, 100)
    monkeypatch.setattr(data, "load_dataset", lambda *args, **kwargs: small)
    report = analysis.analyze(tmp_path / "out", runs_dir=tmp_path / "empty")
    page = report.read_text()
    assert "No runs found: the runs directory" in page
    assert "Dataset: mnist" in page
    stats = json.loads((tmp_path / "out" / "dataset_stats.json").read_text())
    assert stats["splits"]["train"]["num_images"] == 500
    with (tmp_path / "out" / "runs.csv").open() as f:
        assert list(csv.reader(f)) == [list(analysis.COMPARISON_COLUMNS)]

    (tmp_path / "plain" / "notes").mkdir(parents=True)  # a glob that matches no run
    page = analysis.analyze(tmp_path / "out2", runs=[str(tmp_path / "plain" / "*")]).read_text()
    assert "No runs found in" in page and "Dataset: mnist" in page


@pytest.mark.parametrize(
    "args",
    [
        ["--runs", "{tmp}/plain/*"],
        ["--runs-dir", "{tmp}/missing"],
        ["--runs-dir", "{tmp}/plain"],
    ],
    ids=["glob-of-non-runs", "missing-runs-dir", "runs-dir-without-runs"],
)
def test_no_runs_and_no_dataset_is_an_error_not_an_empty_report(tmp_path, args):
    (tmp_path / "plain" / "notes").mkdir(parents=True)
    argv = ["analyze", "--no-dataset", "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, [*argv, *(a.format(tmp=tmp_path) for a in args)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: No runs found"), result.output
    searched = args[1].format(tmp=tmp_path)
    assert searched in lines[0]  # what was searched
    assert "mnist-jax train" in lines[0] and "--no-dataset" in lines[0]  # what to do
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--runs", "{tmp}"], "is not a run directory"),
        (["--runs", "{tmp}/missing"], "no such directory"),
        (["--runs", "{tmp}/x*"], "matches nothing"),
        (["--runs", "{tmp}", "--no-runs"], "contradict"),
        (["--no-runs", "--no-dataset"], "nothing to analyse"),
        (["--dataset", "cifar", "--runs-dir", "{tmp}"], "unknown dataset 'cifar'"),
    ],
)
def test_cli_bad_runs_are_one_line_errors(tmp_path, args, message):
    result = CliRunner().invoke(
        app, ["analyze", "--out", str(tmp_path / "out"), *(a.format(tmp=tmp_path) for a in args)]
    )
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in result.output


@pytest.mark.slow
def test_analyze_a_real_training_run(tmp_path, mnist_dir):
    from mnist_jax.train import fit

    config = Config(
        data_dir=str(mnist_dir), source="local", train_examples=1024, test_examples=500,
        conv_features=(4,), dense_features=16, batch_size=64, epochs=2, log_every=4,
        eval_batch_size=250, runs_dir=str(tmp_path / "runs"), name="tiny", wandb="disabled",
    )  # fmt: skip
    assert fit(config) == 0
    run_dir = tmp_path / "runs" / "tiny"
    report = analysis.analyze(
        tmp_path / "out", data_dir=mnist_dir, runs=[str(run_dir)], include_dataset=False
    )

    run = analysis.load_run(run_dir)
    assert run.problems == [] and run.status == "completed"
    assert [e["epoch"] for e in run.epoch_events] == [1, 2]
    figures = {p.name for p in (tmp_path / "out" / "figures" / "runs" / "tiny").iterdir()}
    assert figures == {
        "learning_curves.png", "confusion_matrix.png", "per_class_scores.png",
        "roc_pr_curves.png", "misclassified.png",
    }  # fmt: skip
    with (tmp_path / "out" / "runs.csv").open() as f:
        (row,) = csv.DictReader(f)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert float(row["test/accuracy"]) == summary["test/accuracy"]
    assert float(row["test/auroc_macro"]) == summary["test/auroc_macro"]
    # the training's FLOP rate: the model's own count of a step's FLOPs times the summary's rate
    train_flops = models.describe(config, data.spec("mnist"))["train_flops_per_example"]
    assert int(row["train_flops_per_example"]) == train_flops > 0
    assert float(row[analysis.TRAIN_GFLOPS]) == pytest.approx(
        train_flops * summary["train/examples_per_sec"] / 1e9
    )

    # The analysis recomputes from predictions.npz what training logged from its counts.
    result = analysis.analyze_run(run)
    predicted = run.predictions.probs_NxC.argmax(1)
    assert result.confusion_CxC.sum() == 500
    np.testing.assert_array_equal(
        result.confusion_CxC,
        skm.confusion_matrix(run.predictions.labels_N, predicted, labels=range(10)),
    )
    np.testing.assert_allclose(
        np.nanmean(result.ranking.auroc_C), summary["test/auroc_macro"], rtol=1e-5
    )
    page = report.read_text()
    assert 'id="run-tiny"' in page and "Missing or unreadable" not in page


# --------------------------------------------------------------------------------------------
# The output directory is checked before any work
# --------------------------------------------------------------------------------------------


def _no_work(monkeypatch) -> None:
    """Makes any analysis work fail loudly: the output check must come first."""
    from mnist_jax.analysis import build

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the output directory was checked")

    monkeypatch.setattr(build, "analyze_run", forbidden)
    monkeypatch.setattr(build, "_CachingLoader", forbidden)


def _analyze_cli(out: Path, runs: Path) -> Any:
    return CliRunner().invoke(app, ["analyze", "--out", str(out), "--runs-dir", str(runs)])


def _assert_one_line_out_error(result: Any, out: Path, reason: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines == [f"error: cannot write to {out} ({reason}): choose another --out"], lines
    assert "Traceback" not in result.output


def test_out_under_a_regular_file_is_a_one_line_error_before_any_work(
    tmp_path, test_labels, monkeypatch
):
    # mkdir fails under a file whoever runs it, root included.
    write_run(tmp_path / "runs", "r", test_labels=test_labels, predictions=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    _no_work(monkeypatch)
    out = blocker / "sub" / "out"
    _assert_one_line_out_error(_analyze_cli(out, tmp_path / "runs"), out, "Not a directory")
    assert blocker.read_text() == "keep me"


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not stop root")
def test_read_only_out_is_a_one_line_error_before_any_work(tmp_path, test_labels, monkeypatch):
    write_run(tmp_path / "runs", "r", test_labels=test_labels, predictions=False)
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    _no_work(monkeypatch)
    try:
        result = _analyze_cli(out, tmp_path / "runs")
    finally:
        out.chmod(0o755)
    _assert_one_line_out_error(result, out, "Permission denied")
    assert list(out.iterdir()) == []


def test_unwritable_out_leaves_nothing_behind(tmp_path, test_labels, monkeypatch):
    # A directory that can be made but not written in (a read-only mount, say): the write probe
    # fails, as it would for root too, and the directories made for it are removed again.
    import tempfile

    def read_only_file_system(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    write_run(tmp_path / "runs", "r", test_labels=test_labels, predictions=False)
    monkeypatch.setattr(tempfile, "mkstemp", read_only_file_system)
    _no_work(monkeypatch)
    out = tmp_path / "new" / "deeper" / "out"
    _assert_one_line_out_error(_analyze_cli(out, tmp_path / "runs"), out, "Read-only file system")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


# --------------------------------------------------------------------------------------------
# Figures: limits, ticks and labels (the figure is caught before it becomes a PNG)
# --------------------------------------------------------------------------------------------


def _one_epoch_curves(accuracy: float, loss: float) -> dict[str, np.ndarray]:
    return {"epoch": np.array([1.0]), "test/accuracy": np.array([accuracy]),
            "train/loss": np.array([loss])}  # fmt: skip


def test_one_epoch_comparison_has_whole_epochs_and_accuracy_at_most_1(drawn):
    from mnist_jax.analysis import run_plots

    run_plots.comparison_curves(
        {"a": _one_epoch_curves(0.9991, 0.031), "b": _one_epoch_curves(0.955, 0.5)}, "compared"
    )
    acc_ax, loss_ax = drawn[0].axes
    for ax in (acc_ax, loss_ax):
        assert ax.get_xlim() == (0.0, 2.0)
        ticks = [t for t in ax.get_xticks() if 0 <= t <= 2]
        assert ticks == [0, 1, 2]
        for line in ax.get_lines():
            assert line.get_marker() == "o"  # a lone point is visible
    low, high = acc_ax.get_ylim()
    assert high <= 1.0 and low <= 0.955 and high >= 0.9991
    assert low > 0.9  # around the points, not from 0

    run_plots.comparison_curves({"a": _one_epoch_curves(0.99, 0.1)}, "one run")
    low, high = drawn[1].axes[0].get_ylim()
    assert high <= 1.0 and low < 0.99 < high  # matplotlib alone gives 0.9405-1.0395


@pytest.mark.parametrize(
    "losses",
    [(0.036, 0.031), (0.9, 0.02), (1.9, 1.35), (1.9, 0.3), (2.3, 1e-4), (0.5002, 0.5)],
    ids=["narrow", "1.5-decades", "one-epoch", "under-a-decade", "4-decades", "flat"],
)
def test_loss_axis_has_at_least_three_labelled_ticks(drawn, losses):
    from mnist_jax.analysis import run_plots

    first, last = losses
    curves = {"epoch": np.array([1.0, 2.0, 3.0]),
              "train/loss": np.array([first, (first + last) / 2, last]),
              "test/loss": np.array([first, first, last]),
              "train/accuracy": np.array([0.9, 0.95, 0.97])}  # fmt: skip
    run_plots.learning_curves(curves, "losses")
    loss_ax = drawn[0].axes[0]
    assert loss_ax.get_yscale() == "log"
    low, high = loss_ax.get_ylim()
    assert low <= last and first <= high
    labelled = [
        (tick.get_loc(), tick.label1.get_text())
        for tick in loss_ax.yaxis.get_major_ticks()
        if low <= tick.get_loc() <= high and tick.label1.get_visible() and tick.label1.get_text()
    ]
    assert len(labelled) >= 3, (loss_ax.get_ylim(), labelled)
    for location, text in labelled:  # plain numbers that read back as the tick's value
        assert float(text) == pytest.approx(location, rel=1e-5)
    assert len({text for _, text in labelled}) == len(labelled)


@pytest.mark.parametrize(
    ("value", "digits", "expected"),
    [(0.99995, 4, "0.99995"), (0.9999999, 4, "0.9999999"), (0.97645, 4, f"{0.97645:.4f}"),
     (1.0, 4, "1.0000"), (0.5, 4, "0.5000"), (0.999996, 5, "0.999996")],
)  # fmt: skip
def test_scores_below_1_never_read_as_1(value, digits, expected):
    from mnist_jax.analysis.plots import score_text

    assert score_text(value, digits) == expected
    almost = 1 - 1e-15  # closer to 1 than any decimals shown
    assert score_text(almost).startswith("0.") and float(score_text(almost)) < 1
    assert score_text(float("nan")) == "nan"


def test_roc_pr_figure_labels_and_zoom(tmp_path, test_labels, drawn):
    from mnist_jax.analysis import run_plots

    labels = np.random.default_rng(0).integers(0, 10, 3000)
    path = write_run(tmp_path, "good", test_labels=labels, accuracy=0.995, seed=4)
    ranking = analysis.analyze_run(analysis.load_run(path)).ranking
    auroc = ranking.auroc_C.copy()
    auroc[1] = 0.99995
    names = [str(c) for c in range(10)]
    run_plots.roc_pr_curves(ranking.roc, ranking.pr, auroc, ranking.average_precision_C, names, "t")
    fig = drawn[0]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "AUROC 0.99995," in legend[1] and "1.0000" not in " ".join(legend)

    # The PR panel is zoomed onto the knees: every class's best-F1 point (from sklearn's curve,
    # computed here) lies inside it, and the zoom is real (far from the unzoomed 0-1).
    pr_ax = fig.axes[1]
    (x_low, x_high), (y_low, y_high) = pr_ax.get_xlim(), pr_ax.get_ylim()
    assert 0.5 < x_low == y_low and x_high >= 1.0 and y_high >= 1.0
    assert "zoomed" in pr_ax.get_xlabel() and "zoomed" in pr_ax.get_ylabel()
    assert "zoomed" in pr_ax.get_title()
    probs = np.load(path / "predictions.npz")["probs"]
    for c in range(10):
        precision, recall, _ = skm.precision_recall_curve(labels == c, probs[:, c])
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        knee = np.argmax(f1)
        assert x_low < recall[knee] and y_low < precision[knee]
        # with a margin of at least the knee's own distance from 1
        assert x_low <= 1 - 2 * (1 - recall[knee]) and y_low <= 1 - 2 * (1 - precision[knee])

    # A weak classifier's curves span the whole panel: no zoom, and the labels say so.
    weak = write_run(tmp_path, "weak", test_labels=labels, accuracy=0.3, seed=5)
    ranking = analysis.analyze_run(analysis.load_run(weak)).ranking
    run_plots.roc_pr_curves(ranking.roc, ranking.pr, ranking.auroc_C,
                            ranking.average_precision_C, names, "t")  # fmt: skip
    pr_ax = drawn[1].axes[1]
    assert pr_ax.get_xlim()[0] == 0 and pr_ax.get_xlabel() == "recall"


def test_report_pixel_table_is_rounded_while_the_json_is_exact(bare_analysis, mnist):
    root, output = bare_analysis
    page = (root / "analysis" / "report.html").read_text()
    pixels = mnist.train.images.reshape(-1).astype(np.float64)
    mean_0_1 = float(Fraction(int(pixels.sum()), 255 * pixels.size))
    assert f'<td class="num">{mean_0_1:.6g}</td>' in page
    assert f'<td class="num">{pixels.mean():.6g}</td>' in page  # mean (0-255)
    assert f'<td class="num">{pixels.std():.6g}</td>' in page  # std (0-255)
    assert f'<td class="num">{mean_0_1!r}</td>' not in page
    cells = [c.split("<")[0] for c in page.split('<td class="num">')[1:]]
    numbers = [c for c in cells if c.replace(".", "").isdigit() and "." in c]
    assert numbers and all(len(c.replace(".", "").lstrip("0")) <= 6 for c in numbers), numbers
    stats = json.loads((root / "analysis" / "dataset_stats.json").read_text())
    assert stats["splits"]["train"]["pixel_mean_0_1"] == mean_0_1  # every digit kept


# --------------------------------------------------------------------------------------------
# A stale run (its writer killed) is shown as stopped
# --------------------------------------------------------------------------------------------


def test_stale_run_is_shown_like_an_interrupted_one(tmp_path, test_labels):
    from mnist_jax.analysis import report, sections

    runs = tmp_path / "runs"
    same = {"test_labels": test_labels, "accuracy": 0.9, "epochs_done": 1, "predictions": False}
    write_run(runs, "killed", status="stale", **same)  # as load_run reports a dead writer
    write_run(runs, "stopped", status="interrupted", **same)
    summary = json.loads((runs / "killed" / "summary.json").read_text())
    assert summary["status"] == "stale"

    result = CliRunner().invoke(
        app, ["analyze", "--no-dataset", "--runs-dir", str(runs), "--out", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    assert any("killed" in line and "stale" in line for line in result.output.splitlines())

    page = (tmp_path / "out" / "report.html").read_text()
    color = report.STATUS_COLORS["stale"]
    assert color not in (report._UNKNOWN_COLOR, report.STATUS_COLORS["completed"])
    assert f'<span class="badge" style="background:{color}">stale</span>' in page
    with (tmp_path / "out" / "runs.csv").open() as f:
        by_name = {r["name"]: r for r in csv.DictReader(f)}
    assert by_name["killed"]["status"] == "stale"

    # Same numbers, same row as the interrupted run, but for the name and the status badge.
    rows = [analysis.comparison_row(analysis.analyze_run(analysis.load_run(runs / n)))
            for n in ("killed", "stopped")]  # fmt: skip
    killed, stopped = sections.comparison_table(rows).rows
    assert killed[1:-1] == stopped[1:-1]
    epochs = sections.comparison_table(rows).headers.index("epochs")
    assert killed[epochs] == "1/3"  # stopped early, shown as such
