"""`mnist-jax analyze` on sweeps: a sweep directory is one section (its trials, the spread over
seeds, accuracy against the swept value) and its trials are runs, each listed once.

The sweeps are made by hand: sweep.json and trial run directories written like `train` writes
them (by `test_analysis.write_run`), with known test accuracies; nothing trains.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_analysis import PNG_SIGNATURE, write_run

from mnist_jax import analysis

REPO = Path(__file__).resolve().parents[1]
LABELS = np.arange(100) % 10  # predictions are not written: any labels do
LRS = (1e-3, 1e-2, 1e-1)
# Test accuracy of each (lr, seed) trial; the last one failed (diverged) at a low accuracy.
ACCURACY = {
    (1e-3, 0): 0.95, (1e-3, 1): 0.96, (1e-3, 2): 0.955,
    (1e-2, 0): 0.98, (1e-2, 1): 0.975, (1e-2, 2): 0.985,
    (1e-1, 0): 0.90, (1e-1, 1): 0.92, (1e-1, 2): 0.11,
}  # fmt: skip
FAILED = "trial-08"
NOT_STARTED = "trial-09"  # in sweep.json, but its run directory was never made


def write_sweep(
    root: Path, name: str, trials: list[tuple[dict[str, Any], float, str]], swept: list[str]
) -> Path:
    """A sweep directory as `mnist-jax sweep` writes it: sweep.json and one run per trial
    (values, test accuracy, status); a trial with status `not started` gets no directory."""
    sweep = root / name
    sweep.mkdir(parents=True)
    saved: dict[str, Any] = {"name": name, "swept": swept, "trials": []}
    for i, (values, accuracy, status) in enumerate(trials):
        trial = f"trial-{i:02d}"
        saved["trials"].append({"name": trial, "values": values, "config": values})
        if status == "not started":
            continue
        run = write_run(sweep, trial, test_labels=LABELS, status=status, predictions=False,
                        checkpoint=False, config=values, epochs=1, seed=i)  # fmt: skip
        summary = json.loads((run / "summary.json").read_text())
        summary["test/accuracy"] = summary["best/test/accuracy"] = accuracy
        (run / "summary.json").write_text(json.dumps(summary))
    (sweep / "sweep.json").write_text(json.dumps(saved))
    return sweep


def lr_sweep(root: Path) -> Path:
    trials = [
        ({"lr": lr, "seed": seed}, accuracy, "failed" if (lr, seed) == (0.1, 2) else "completed")
        for (lr, seed), accuracy in ACCURACY.items()
    ]
    trials.append(({"lr": 0.3, "seed": 0}, 0.0, "not started"))
    return write_sweep(root, "lr-sweep", trials, ["lr", "seed"])


@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """The default analysis (`--runs-dir runs`) of a runs directory holding the lr sweep, a
    plain run, and the figures drawn."""
    root = tmp_path_factory.mktemp("project")
    runs = root / "runs"
    sweep = lr_sweep(runs)
    write_run(runs, "plain", test_labels=LABELS, accuracy=0.9, predictions=False)
    report = analysis.analyze(root / "out", runs_dir=runs, include_dataset=False)
    return root / "out", report.read_text(), sweep


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_runs_dir_finds_the_sweep_and_each_trial_once(analysed):
    out, page, _ = analysed
    names = [row["name"] for row in _csv(out / "runs.csv")]
    trials = [f"lr-sweep/trial-{i:02d}" for i in range(9)]
    assert sorted(names) == sorted([*trials, "plain"])  # each once; no trial-09
    for i in range(9):
        assert page.count(f'id="run-lr-sweep-trial-{i:02d}"') == 1
    assert page.count('id="sweep-lr-sweep"') == 1 and '<a href="#sweep-lr-sweep">' in page


def test_find_records_never_lists_a_trial_twice(tmp_path):
    runs = tmp_path / "runs"
    sweep = lr_sweep(runs)
    plain = write_run(runs, "plain", test_labels=LABELS, predictions=False)
    trials = [sweep / f"trial-{i:02d}" for i in range(9)]

    found = analysis.find_records([str(sweep)], "unused")
    assert found.sweeps == [sweep] and found.runs == trials and found.note == ""
    found = analysis.find_records([str(trials[3]), str(sweep), str(runs / "*")], "unused")
    assert found.sweeps == [sweep]
    assert found.runs == [trials[3], *trials[:3], *trials[4:], plain]
    found = analysis.find_records(None, runs)
    assert found.sweeps == [sweep] and found.runs == [*trials, plain]
    assert analysis.find_runs([str(sweep)], "unused") == (trials, "")


def test_trial_table_is_best_first_with_failed_and_unstarted_trials_listed(analysed):
    out, page, _ = analysed
    rows = _csv(out / "sweep-lr-sweep.csv")
    completed = sorted((a for k, a in ACCURACY.items() if k != (0.1, 2)), reverse=True)
    assert [float(r["test/accuracy"]) for r in rows[:8]] == completed
    assert [(r["trial"], r["status"]) for r in rows[8:]] == [
        (FAILED, "failed"), (NOT_STARTED, "not started")
    ]  # fmt: skip
    assert float(rows[8]["test/accuracy"]) == 0.11 and rows[9]["test/accuracy"] == ""
    assert list(rows[0])[:4] == ["trial", "status", "lr", "seed"]
    note = "Not averaged or plotted (not completed, or no test accuracy): "
    assert f"{note}{FAILED} (failed), {NOT_STARTED} (not started)." in page


def test_spread_is_numpy_mean_and_sample_std_over_completed_trials(analysed):
    out, page, sweep = analysed
    rows = {float(r["lr"]): r for r in _csv(out / "sweep-lr-sweep-spread.csv")}
    assert set(rows) == set(LRS)
    for lr in LRS:
        values = np.array([a for (x, s), a in ACCURACY.items() if x == lr and (x, s) != (0.1, 2)])
        assert int(rows[lr]["trials"]) == len(values)
        np.testing.assert_allclose(float(rows[lr]["mean"]), values.mean(), rtol=1e-12)
        np.testing.assert_allclose(float(rows[lr]["std"]), values.std(ddof=1), rtol=1e-12)
        assert float(rows[lr]["min"]) == values.min() and float(rows[lr]["max"]) == values.max()
    assert int(rows[0.1]["trials"]) == 2  # the failed trial is not averaged
    best = np.array([0.98, 0.975, 0.985])
    assert f"{best.mean():.2%} ± {best.std(ddof=1):.2%}" in page

    result = analysis.analyze_sweep(sweep)
    assert result.swept == ("lr", "seed") and result.by == ("lr",)
    assert [r["trial"] for r in result.left_out] == [FAILED, NOT_STARTED]


def test_the_figure_is_a_png_file_and_embedded_in_the_report(analysed):
    import matplotlib.image

    out, page, _ = analysed
    png = out / "figures" / "sweeps" / "lr-sweep" / "test_accuracy.png"
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    image = matplotlib.image.imread(png)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert base64.b64encode(data).decode("ascii") in page
    assert 'alt="Test accuracy against lr"' in page
    assert "<h3>lr-sweep</h3>" in page and "swept: lr, seed" in page


def _points(ax) -> np.ndarray:
    """The y values of the trial markers (lines drawn with markers and no line)."""
    lines = [line for line in ax.get_lines() if line.get_linestyle() == "None"]
    markers = [line for line in lines if line.get_marker() == "o"]
    return np.concatenate([np.asarray(line.get_ydata(), float) for line in markers])


def test_rates_on_a_log_axis_and_failed_trials_not_drawn(tmp_path, drawn):
    sweep = analysis.analyze_sweep(lr_sweep(tmp_path))
    analysis.sweeps.sweep_section(sweep, "lr-sweep", tmp_path / "figures")
    (fig,) = drawn
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0.001", "0.01", "0.1"]
    points = _points(ax)
    assert len(points) == 8 and 0.11 not in points and 0.0 not in points
    assert ax.get_ylim()[1] <= 1.0


def test_seed_only_and_two_field_sweeps_are_drawn(tmp_path, drawn):
    seeds = write_sweep(tmp_path, "seeds", [({"seed": s}, 0.97 + s / 1000, "completed")
                                            for s in range(4)], ["seed"])  # fmt: skip
    result = analysis.analyze_sweep(seeds)
    assert result.by == () and result.spread[0]["trials"] == 4
    section = analysis.sweeps.sweep_section(result, "seeds", tmp_path / "f1")
    assert section.figures[0].title == "Test accuracy over seeds"
    (ax,) = drawn[-1].axes
    mean = np.mean([0.97, 0.971, 0.972, 0.973])
    assert any(np.allclose(line.get_ydata(), mean) for line in ax.get_lines())

    grid = [({"lr": lr, "optimizer": opt, "seed": s}, 0.9 + lr + s / 100, "completed")
            for lr in (0.01, 0.03) for opt in ("adam", "sgd") for s in (0, 1)]  # fmt: skip
    result = analysis.analyze_sweep(write_sweep(tmp_path, "two", grid, ["lr", "optimizer", "seed"]))
    section = analysis.sweeps.sweep_section(result, "two", tmp_path / "f2")
    (ax,) = drawn[-1].axes
    assert ax.get_xscale() == "linear"  # 0.01 to 0.03 spans less than a decade
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["optimizer=adam", "optimizer=sgd"]
    assert len(result.spread) == 4 and {r["trials"] for r in result.spread} == {2}


def test_list_valued_swept_fields_group_and_plot_as_categories(tmp_path, drawn):
    trials = [({"conv_features": widths, "seed": s}, 0.9 + s / 100 + len(widths) / 50, "completed")
              for widths in ([8], [8, 16]) for s in (0, 1)]  # fmt: skip
    result = analysis.analyze_sweep(
        write_sweep(tmp_path, "widths", trials, ["conv_features", "seed"])
    )
    assert {r["conv_features"]: r["trials"] for r in result.spread} == {(8,): 2, (8, 16): 2}
    analysis.sweeps.sweep_section(result, "widths", tmp_path / "f")
    (ax,) = drawn[-1].axes
    assert [t.get_text() for t in ax.get_xticklabels()] == ["[8]", "[8, 16]"]


def test_a_damaged_sweep_json_keeps_its_trials_as_runs(tmp_path):
    sweep = lr_sweep(tmp_path / "runs")
    (sweep / "sweep.json").write_text("{")
    page = analysis.analyze(tmp_path / "out", runs=[str(sweep)], include_dataset=False).read_text()
    assert 'id="sweep-lr-sweep"' in page and "the sweep record is damaged" in page
    assert page.count('id="run-lr-sweep-trial-') == 9
    assert _csv(tmp_path / "out" / "sweep-lr-sweep.csv") == []


def test_cli_analyzes_a_sweep_directory(tmp_path):
    sweep = lr_sweep(tmp_path / "runs")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-m", "cli", "analyze", "--runs", str(sweep), "--no-dataset",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"report: {out / 'report.html'}"
    assert "sweep lr-sweep: test accuracy over seeds" in result.stdout
    page = (out / "report.html").read_text()
    assert 'id="sweep-lr-sweep"' in page and page.count('id="run-lr-sweep-trial-') == 9
    for name in ("sweep-lr-sweep.csv", "sweep-lr-sweep-spread.csv", "runs.csv"):
        assert (out / name).is_file()
    png = out / "figures" / "sweeps" / "lr-sweep" / "test_accuracy.png"
    assert png.read_bytes().startswith(PNG_SIGNATURE)
