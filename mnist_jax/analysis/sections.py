"""The report's sections: the dataset section, the comparison table and one section per run,
each with its tables, facts and figures (rendered by `plots`, saved under `figures/`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mnist_jax import metrics
from mnist_jax.analysis import plots, run_plots
from mnist_jax.analysis import report as report_lib
from mnist_jax.analysis.compare import MODEL_COLUMNS, TRAIN_GFLOPS
from mnist_jax.analysis.dataset import class_mean_images, mean_image, sample_images
from mnist_jax.analysis.runs import RunAnalysis
from mnist_jax.files import write_bytes_atomic
from mnist_jax.record import METRICS_FILE, PREDICTIONS_FILE, Run, number

if TYPE_CHECKING:
    from mnist_jax.data import Dataset

SAMPLES_PER_CLASS = 10

# How a cell shows a value: a str.format pattern ("{:.2%}") or a function of the value.
Format = str | Callable[[Any], str]


def dataset_section(
    data: Dataset,
    stats: Mapping[str, Any],
    tables: tuple[report_lib.Table, report_lib.Table],
    figures_dir: Path,
) -> report_lib.DatasetSection:
    """The dataset's tables (from `dataset_tables`), normalisation snippet and figures."""
    stats_table, classes_table = tables
    train = data.train
    names = data.class_names
    counts = {split: stats["splits"][split] for split in ("train", "test")}
    samples = sample_images(train.images, train.labels, data.num_classes, SAMPLES_PER_CLASS)
    figures = [
        Plot(
            "sample_images", "Sample images per class",
            plots.sample_grid(samples, names, f"{data.name}: random training images per class"),
            "Drawn with a fixed seed from the training split.", half=True,
        ),
        Plot(
            "mean_intensity", "Average intensity",
            plots.mean_intensity_heatmap(
                mean_image(train.images),
                f"{data.name}: mean of the {len(train.labels):,} training images",
            ),
            "Where the digits are written: the pixel-wise mean over the training split.",
            half=True,
        ),
        Plot(
            "pixel_histogram", "Pixel value histogram",
            plots.pixel_histogram(
                {s: np.asarray(c["pixel_value_counts"]) for s, c in counts.items()},
                f"{data.name}: pixel values are nearly binary (mostly 0, else often near 255)",
            ),
            "Share of all pixels at each value; log-scale y.",
        ),
        Plot(
            "class_distribution", "Class distribution",
            plots.class_distribution(
                {s: list(c["class_counts"].values()) for s, c in counts.items()},
                names, f"{data.name}: images per class",
            ),
        ),
        Plot(
            "class_mean_images", "Mean image per class",
            plots.class_mean_images(
                class_mean_images(train.images, train.labels, data.num_classes), names,
                f"{data.name}: mean training image of each class",
            ),
        ),
    ]  # fmt: skip
    train_stats = stats["splits"]["train"]
    snippet = (
        f"# {data.name} training split, exact over all pixels (population std)\n"
        f"MEAN_0_1, STD_0_1 = {train_stats['pixel_mean_0_1']!r}, {train_stats['pixel_std_0_1']!r}\n"
        f"MEAN_0_255, STD_0_255 = {train_stats['pixel_mean_0_255']!r}, "
        f"{train_stats['pixel_std_0_255']!r}"
    )
    return report_lib.DatasetSection(
        name=data.name,
        tables=[("Pixel statistics", stats_table), ("Images per class", classes_table)],
        figures=save_figures(figures, figures_dir),
        snippet=snippet,
    )


def dataset_tables(
    stats: Mapping[str, Any], significant: int | None = 6
) -> tuple[report_lib.Table, report_lib.Table]:
    """Pixel statistics (one row per statistic, one column per split) and class counts.

    Means and standard deviations are shown with `significant` digits, or exactly (the float64
    repr, as dataset_stats.json holds them) when it is None.
    """
    splits = list(stats["splits"])
    shape = "x".join(str(s) for s in stats["image_shape"])
    pixel_rows = [["images", *(f"{stats['splits'][s]['num_images']:,}" for s in splits)]]
    pixel_rows.append(["image shape", *([shape] * len(splits))])
    moment = "{!r}" if significant is None else f"{{:.{significant}g}}"
    for label, key, spec in _PIXEL_ROWS:
        spec = spec or moment
        pixel_rows.append([label, *(spec.format(stats["splits"][s][key]) for s in splits)])
    classes = ["", *["num"] * len(splits)]
    pixel_table = report_lib.Table(["statistic", *splits], pixel_rows, classes)
    class_rows = [
        [name, *(f"{stats['splits'][s]['class_counts'][name]:,}" for s in splits)]
        for name in stats["class_names"]
    ]
    return pixel_table, report_lib.Table(["class", *splits], class_rows, classes)


# (label, key, format); an empty format is the precision `dataset_tables` is asked for.
_PIXEL_ROWS = (
    ("mean (0-255)", "pixel_mean_0_255", ""),
    ("std (0-255)", "pixel_std_0_255", ""),
    ("mean [0, 1]", "pixel_mean_0_1", ""),
    ("std [0, 1]", "pixel_std_0_1", ""),
    ("pixels = 0", "fraction_zero", "{:.4%}"),
    ("pixels = 255", "fraction_255", "{:.4%}"),
)

_key = metrics.metric_key

# (header, runs.csv key, format, CSS class) of each column of the report's comparison table; a
# format is a str.format pattern or a function.
_TABLE_COLUMNS = (
    ("run", "name", "{}", ""),
    ("dataset", "dataset", "{}", ""),
    ("model", "model", "{}", ""),
    ("params", "params", "{:,}", "num"),
    ("FLOPs/example", "flops_per_example", "{:,}", "num"),
    ("optimizer", "optimizer", "{}", ""),
    ("lr", "lr", "{:g}", "num"),
    ("schedule", "schedule", "{}", ""),
    ("batch", "batch_size", "{}", "num"),
    ("epochs", "epochs", "{}", "num"),
    ("test acc", _key("test", "accuracy"), "{:.2%}", "num"),
    ("macro F1", _key("test", "f1_macro"), plots.score_text, "num"),
    ("macro AUROC", _key("test", "auroc_macro"), lambda v: plots.score_text(v, 5), "num"),
    ("train time", metrics.TRAIN_SECONDS, "{:.1f} s", "num"),
    ("examples/s", _key("train", "examples_per_sec"), "{:,.0f}", "num"),
    ("GFLOP/s", TRAIN_GFLOPS, "{:,.1f}", "num"),
    ("status", "status", "{}", ""),
)
_EPOCHS_COLUMN = [key for _, key, *_ in _TABLE_COLUMNS].index("epochs")


def comparison_table(rows: Sequence[Mapping[str, Any]]) -> report_lib.Table:
    """The comparison table of `compare.comparison_row` rows. A model cell is empty for a run
    whose config.json does not describe its model; other missing values show as '–'."""
    body = []
    for row in rows:
        cells: list[Any] = [
            "" if key in MODEL_COLUMNS and row[key] is None else _fmt(row[key], spec)
            for _, key, spec, _ in _TABLE_COLUMNS
        ]
        if row["epoch"] is not None and row["epochs"] is not None and row["epoch"] != row["epochs"]:
            # a run that stopped early
            cells[_EPOCHS_COLUMN] = f"{_fmt(row['epoch'], '{:g}')}/{row['epochs']}"
        cells[-1] = report_lib.markup_badge(row["status"])
        body.append(cells)
    headers = [header for header, *_ in _TABLE_COLUMNS]
    return report_lib.Table(headers, body, [css for *_, css in _TABLE_COLUMNS])


def run_section(analysis: RunAnalysis, slug: str, figures_dir: Path) -> report_lib.RunSection:
    run, names, title = analysis.run, analysis.class_names, analysis.run.name
    figures = []
    if len(analysis.curves["epoch"]) or len(analysis.curves["step_epoch"]):
        png = run_plots.learning_curves(analysis.curves, f"{title}: learning curves")
        figures.append(Plot("learning_curves", "Learning curves", png, f"From {METRICS_FILE}."))
    if analysis.confusion_CxC is not None:
        cm = analysis.confusion_CxC
        heading = f"{title}: confusion matrix ({cm.sum():,} test images, accuracy "
        heading += f"{np.trace(cm) / max(cm.sum(), 1):.2%})"
        caption = f"Counts from {analysis.confusion_source}; rows are the true class."
        png = run_plots.confusion_heatmap(cm, names, heading)
        figures.append(Plot("confusion_matrix", "Confusion matrix", png, caption, half=True))
    if analysis.per_class is not None:
        scores = {k: analysis.per_class[k] for k in ("precision", "recall", "f1")}
        png = run_plots.per_class_bars(scores, names, f"{title}: per-class scores")
        caption = "From the confusion counts."
        figures.append(Plot("per_class_scores", "Per-class scores", png, caption, half=True))
    if analysis.ranking is not None:
        r = analysis.ranking
        png = run_plots.roc_pr_curves(
            r.roc, r.pr, r.auroc_C, r.average_precision_C, names,
            f"{title}: one-vs-rest ROC and PR curves",
        )  # fmt: skip
        caption = f"From {PREDICTIONS_FILE}. The precision-recall axes are zoomed onto the knees "
        caption += "of the curves (each class's best-F1 point, with a margin): the curves leave "
        caption += "them on the left at high precision and at the bottom, where precision falls "
        caption += "towards the class's share of the examples."
        figures.append(Plot("roc_pr_curves", "ROC and PR curves", png, caption))
    mistakes = analysis.mistakes
    if mistakes is not None and mistakes.images_KxHxW is not None and len(mistakes.indices_K):
        png = run_plots.mistakes_gallery(
            mistakes.images_KxHxW, mistakes.true_K, mistakes.predicted_K, mistakes.confidence_K,
            names, f"{title}: most confident mistakes",
        )  # fmt: skip
        caption = "Confidence is the predicted class's probability. Test indices: "
        caption += ", ".join(str(i) for i in mistakes.indices_K) + "."
        if mistakes.images_from:
            caption += f" Images from {mistakes.images_from}."
        figures.append(Plot("misclassified", "Most confident mistakes", png, caption))
    return report_lib.RunSection(
        name=run.name,
        slug=slug,
        path=str(run.path),
        status=run.status,
        message=str(run.summary.get("message") or ""),
        problems=list(run.problems),
        facts=_run_facts(run),
        figures=save_figures(figures, figures_dir),
        notes=list(analysis.notes),
    )


def _run_facts(run: Run) -> list[tuple[str, str]]:
    """Label/value lines about a run; a line whose values are all missing is left out."""
    m, c, env = run.final_metrics(), run.config, run.environment
    best = _values(m, (metrics.BEST_TEST_ACCURACY,), "{:.2%}")
    if best and number(m.get(metrics.BEST_STEP)) is not None:
        best += f" (step {m[metrics.BEST_STEP]})"
    progress = ""
    if number(m.get("step")) is not None:
        progress = f"epoch {_fmt(m.get('epoch'), '{:g}')} of {_fmt(c.get('epochs'), '{}')}, "
        progress += f"step {m['step']}"
    scores = ("f1_macro", "auroc_macro", "average_precision_macro")
    times = (metrics.COMPILE_SECONDS, metrics.TRAIN_SECONDS, metrics.TOTAL_SECONDS)
    facts = [
        ("test accuracy", _values(m, (_key("test", "accuracy"),), "{:.2%}")),
        ("best test accuracy", best),
        ("test loss", _values(m, (_key("test", "loss"),), "{:.4f}")),
        ("macro F1 / AUROC / AP", _values(m, [_key("test", s) for s in scores], plots.score_text)),
        ("progress", progress),
        ("time: compile / train / total", _values(m, times, "{:.1f} s")),
        ("train examples/s", _values(m, (_key("train", "examples_per_sec"),), "{:,.0f}")),
        ("checkpoints", ", ".join(f"{k} at step {v[-1]}" for k, v in run.checkpoints.items())),
    ]
    if c:
        model = f"conv {c.get('conv_features')}, dense {c.get('dense_features')}, "
        model += f"norm {c.get('norm')}, dropout {c.get('dropout')}"
        optimisation = f"{c.get('optimizer')}, lr {c.get('lr')}, {c.get('schedule')} schedule, "
        optimisation += f"batch {c.get('batch_size')}, weight decay {c.get('weight_decay')}, "
        optimisation += f"seed {c.get('seed')}"
        data = f"{c.get('dataset')} from {c.get('data_dir') or 'the default'} ({c.get('source')})"
        facts += [("model", model), ("optimisation", optimisation), ("data", data)]
    keys = ("backend", "device_kind", "device_count", "jax", "flax", "git_commit", "started")
    facts.append(("environment", ", ".join(f"{k} {env[k]}" for k in keys if env.get(k))))
    return [(label, value) for label, value in facts if value]


def _values(metrics_: Mapping[str, Any], keys: Sequence[str], spec: Format) -> str:
    """`spec`-formatted values joined by ' / ' ('–' for a missing one); '' if all are missing."""
    values = [number(metrics_.get(k)) for k in keys]
    if all(v is None for v in values):
        return ""
    return " / ".join(_fmt(v, spec) for v in values)


@dataclasses.dataclass(frozen=True)
class Plot:
    """A rendered figure on its way to `figures/STEM.png` and the report."""

    stem: str
    title: str
    png: bytes
    caption: str = ""
    half: bool = False


def save_figures(figures: Sequence[Plot], folder: Path) -> list[report_lib.Figure]:
    """Writes each figure to `folder/STEM.png` and returns them as the report embeds them."""
    folder.mkdir(parents=True, exist_ok=True)
    for figure in figures:
        write_bytes_atomic(folder / f"{figure.stem}.png", figure.png)
    return [report_lib.Figure(f.title, f.png, f.caption, f.half) for f in figures]


def _fmt(value: Any, spec: Format) -> str:
    if value is None or value == "":
        return "–"
    try:
        return spec(value) if callable(spec) else spec.format(value)
    except (ValueError, TypeError):
        return str(value)
