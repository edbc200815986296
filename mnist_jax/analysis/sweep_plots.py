"""Figures of sweeps for `mnist-jax analyze`: test accuracy against the swept value, and with
only the seed swept, accuracy over the seeds. Drawn like the other figures (see `plots`); the
functions take plain values and return PNG bytes. Only completed trials are drawn: a failed one
would sit at an accuracy it never reached."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from mnist_jax.analysis.plots import new_figure, short, to_png
from mnist_jax.analysis.run_plots import accuracy_y

# x values this far apart or more (rates: 1e-3 to 1e-2) are drawn on a log axis.
LOG_SPAN = 10.0
_MAX_TICKS = 12  # up to this many swept values each get a labelled tick


def accuracy_by_value(
    points: Sequence[tuple[Any, str, float]],
    means: Sequence[tuple[Any, str, float, float]],
    x_label: str,
    title: str,
) -> bytes:
    """Test accuracy against a swept value: each trial a point, `(x, line, accuracy)`; the mean
    over seeds a line with error bars of one standard deviation, `(x, line, mean, std)`; one
    line per value of the other swept fields (`line`, '' when there are none).

    Numbers are placed by value, on a log axis when they span a decade or more (learning
    rates); anything else (optimizer names, layer widths) as categories in sorted order.
    """
    import matplotlib as mpl

    xs = _ordered(x for x, _, _ in points)
    numeric = all(is_number(x) for x in xs)
    where = {x: float(x) if numeric else float(i) for i, x in enumerate(xs)}
    lines = _ordered(line for _, line, _ in points)
    colors = mpl.colormaps["tab10" if len(lines) <= 10 else "tab20"]
    fig = new_figure(8.5, 4.8)
    ax = fig.add_subplot()
    for i, line in enumerate(lines):
        color = colors(i % colors.N)
        mine = [(where[x], accuracy) for x, name, accuracy in points if name == line]
        ax.plot(*zip(*mine, strict=True), "o", color=color, alpha=0.45, ms=6,
                label="one trial" if len(lines) == 1 else None)  # fmt: skip
        curve = sorted((where[x], m, s) for x, name, m, s in means if name == line)
        if not curve:
            continue
        x, mean, std = zip(*curve, strict=True)
        label = short(line, 40) if line else "mean ± 1 std over seeds"
        ax.errorbar(x, mean, yerr=std, fmt="-", color=color, lw=1.8, capsize=4, label=label)
    positions = [where[x] for x in xs]
    if numeric and min(positions) > 0 and max(positions) >= LOG_SPAN * min(positions):
        ax.set_xscale("log")
    if not numeric or len(xs) <= _MAX_TICKS:
        ax.set_xticks(positions, [value_text(x) for x in xs])
        ax.minorticks_off()
    if not numeric:
        ax.set_xlim(-0.5, len(xs) - 0.5)
    accuracy_y(ax)
    ax.set_xlabel(x_label)
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9, loc="best")
    ax.set_title(title, fontsize=13)
    return to_png(fig)


def accuracy_over_seeds(
    seeds: Sequence[Any], accuracy: Sequence[float], mean: float, std: float, title: str
) -> bytes:
    """With only the seed swept: each trial's test accuracy at its seed, the mean as a line
    and one standard deviation either side of it as dashed lines."""
    fig = new_figure(8.5, 4.2)
    ax = fig.add_subplot()
    numeric = all(is_number(s) for s in seeds)
    x = [float(s) if numeric else float(i) for i, s in enumerate(seeds)]
    ax.plot(x, accuracy, "o", color="#1f77b4", alpha=0.7, ms=6, label="one trial")
    ax.axhline(mean, color="#d62728", lw=1.8, label=f"mean {mean:.2%}")
    for edge in (mean - std, mean + std):
        ax.axhline(edge, color="#d62728", lw=1.2, ls="--",
                   label=f"± 1 std ({std:.2%})" if edge < mean else None)  # fmt: skip
    if len(x) <= _MAX_TICKS:
        ax.set_xticks(x, [value_text(s) for s in seeds])
    accuracy_y(ax)
    ax.set_xlabel("seed" if numeric else "trial")
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9, loc="best")
    ax.set_title(title, fontsize=13)
    return to_png(fig)


def _ordered(values: Iterable[Any]) -> list[Any]:
    """The distinct values, sorted where they can be, else in the order first seen."""
    distinct = list(dict.fromkeys(values))
    try:
        return sorted(distinct)
    except TypeError:
        return distinct


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def value_text(value: Any) -> str:
    """A swept value as text: floats short (1e-3 as 0.001), lists as lists, missing as '–'."""
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(value_text(v) for v in value) + "]"
    return str(value)
