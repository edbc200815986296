"""Terminal tables for evaluation results: the per-class report and the confusion matrix."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def print_evaluation(result: Mapping[str, Any], split: str) -> None:
    """Per-class precision, recall, F1, support and AUROC, the averages, the confusion matrix."""
    from rich.console import Console
    from rich.table import Table

    from mnist_jax.metrics import metric_key

    console = Console()
    confusion = result[metric_key(split, "confusion_matrix")]
    classes = range(len(confusion))

    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    table = Table(title=f"{split} split, {result['checkpoint']} checkpoint (step {result['step']})")
    for column in ("class", "precision", "recall", "F1", "support", "AUROC"):
        table.add_column(column, justify="right")
    for c in classes:
        table.add_row(
            str(c),
            fmt(result[metric_key(split, "precision", c)]),
            fmt(result[metric_key(split, "recall", c)]),
            fmt(result[metric_key(split, "f1", c)]),
            str(result[metric_key(split, "support", c)]),
            fmt(result.get(metric_key(split, "auroc", c))),
        )
    for average in ("macro", "micro", "weighted"):
        table.add_row(
            average,
            fmt(result[metric_key(split, f"precision_{average}")]),
            fmt(result[metric_key(split, f"recall_{average}")]),
            fmt(result[metric_key(split, f"f1_{average}")]),
            str(sum(map(sum, confusion))),
            fmt(result.get(metric_key(split, "auroc_macro"))) if average == "macro" else "",
            style="bold",
        )
    console.print(table)
    console.print(
        f"accuracy {fmt(result[metric_key(split, 'accuracy')])}   "
        f"loss {fmt(result[metric_key(split, 'loss')])}"
    )

    matrix = Table(title="confusion matrix (rows: true class, columns: predicted)")
    matrix.add_column("")
    for c in classes:
        matrix.add_column(str(c), justify="right")
    for c, row in zip(classes, confusion, strict=True):
        cells = [
            f"[bold]{n}[/bold]" if i == c else (str(n) if n else ".") for i, n in enumerate(row)
        ]
        matrix.add_row(str(c), *cells)
    console.print(matrix)
