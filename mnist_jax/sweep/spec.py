"""A sweep spec: the base recipe and the values to sweep, expanded into one config per trial.

A spec is a TOML file::

    name = "lr-sweep"             # optional: the sweep's directory under runs_dir
    config = "baseline.toml"      # optional: the base recipe, relative to this file
    [base]                        # optional: settings on top of the base recipe
    epochs = 1
    [grid]                        # every combination of these values
    lr = [1e-3, 3e-3, 1e-2]
    seed = [0, 1]
    [zip]                         # lists of one length, taken together, element by element
    [random]                      # `trials` samples from ranges (log-uniform for rates)
    trials = 8
    lr = [1e-4, 1e-1]

The trials are the grid's combinations, crossed with the zipped rows and with the random
samples. Flags on the command line override the base recipe, never a swept value.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mnist_jax.config import (
    PLACEMENT_FIELDS,
    RECORD_FIELDS,
    Config,
    build_config,
    field_type,
    load_toml,
    plain_name,
)
from mnist_jax.errors import UserError

SECTIONS = ("grid", "zip", "random")
SPEC_KEYS = ("name", "config", "base", *SECTIONS)
# Fields a sweep cannot vary: the data, where it and the records are, how runs are reported.
FIXED = ("dataset", "train_examples", "test_examples", *RECORD_FIELDS, *PLACEMENT_FIELDS)
LOG_UNIFORM = ("lr", "weight_decay", "grad_clip")  # rates: sampled uniformly in their logarithm
MAX_TRIALS = 10_000
SAMPLER_KEYS = ("trials", "seed")  # [random]'s own settings, not fields
SAMPLE_DIGITS = 4  # sampled values are rounded to 4 significant digits: readable tables


@dataclasses.dataclass(frozen=True)
class Trial:
    name: str  # trial-00, trial-01, ...: its run directory's name
    values: dict[str, Any]  # the swept values
    config: Config


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    directory: Path
    swept: tuple[str, ...]
    trials: tuple[Trial, ...]

    def to_dict(self) -> dict[str, Any]:
        """What `sweep.json` keeps: enough to resume and to analyze the sweep."""
        return {
            "name": self.name,
            "swept": list(self.swept),
            "trials": [
                {"name": t.name, "values": t.values, "config": t.config.to_dict()}
                for t in self.trials
            ],
        }

    @classmethod
    def from_dict(cls, directory: Path, saved: Mapping[str, Any]) -> Sweep:
        trials = tuple(
            Trial(t["name"], dict(t["values"]), build_config(t["config"])) for t in saved["trials"]
        )
        return cls(saved["name"], directory, tuple(saved["swept"]), trials)


def load_spec(path: str | Path, flags: Mapping[str, Any], name: str | None = None) -> Sweep:
    """The sweep `path` describes, with command-line `flags` (None: not given) on its base."""
    path = Path(path)
    spec = load_toml(path)
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise UserError(
            f"unknown key {unknown[0]!r} in sweep spec {path}; known keys: {', '.join(SPEC_KEYS)}"
        )
    recipe = load_toml(_relative(path, spec["config"])) if "config" in spec else {}
    base = _table(spec, "base", path)
    given = {k: v for k, v in flags.items() if v is not None}
    choices = trial_values(spec, path)
    swept = tuple(dict.fromkeys(k for values in choices for k in values))
    for key in swept:
        if key in given:
            flag = "--" + key.replace("_", "-")
            raise UserError(f"{key} is swept by {path}; drop {flag}, or change the spec")
        if key in FIXED:
            raise UserError(f"{key} cannot be swept (in {path}): it is the same for every trial")
    common = build_config(recipe, base, given)
    sweep_name = name or spec.get("name") or path.stem
    if not plain_name(sweep_name):
        raise UserError(f"the sweep's name must be a plain directory name, got {sweep_name!r}")
    directory = Path(common.runs_dir) / sweep_name
    width = max(2, len(str(len(choices) - 1)))
    trials = []
    for i, values in enumerate(choices):
        trial_name = f"trial-{i:0{width}d}"
        where = {
            "runs_dir": str(directory),
            "name": trial_name,
            "wandb_group": common.wandb_group or sweep_name,
        }
        config = build_config(common.to_dict(), values, where)
        trials.append(Trial(trial_name, values, config))
    return Sweep(sweep_name, directory, swept, tuple(trials))


def trial_values(spec: Mapping[str, Any], path: Path) -> list[dict[str, Any]]:
    """The swept values of every trial: grid x zip x random samples."""
    grid = _table(spec, "grid", path)
    zipped = _table(spec, "zip", path)
    sampled = _table(spec, "random", path)
    if not (grid or zipped or sampled):
        raise UserError(f"sweep spec {path} sweeps nothing: give a [grid], [zip] or [random] table")
    for section, table in (("grid", grid), ("zip", zipped)):
        for key, values in table.items():
            if not isinstance(values, list) or not values:
                raise UserError(
                    f"[{section}] {key} in {path} must be a non-empty list of values, "
                    f"got {values!r}"
                )
    for key, values in grid.items():
        repeated = [v for i, v in enumerate(values) if v in values[:i]]
        if repeated:
            raise UserError(
                f"[grid] {key} in {path} lists {repeated[0]!r} more than once; "
                "to repeat trials, sweep seed"
            )
    keys = {"grid": set(grid), "zip": set(zipped), "random": set(sampled) - set(SAMPLER_KEYS)}
    for a, b in itertools.combinations(keys, 2):
        both = sorted(keys[a] & keys[b])
        if both:
            raise UserError(f"{both[0]} is in both [{a}] and [{b}] of {path}; sweep it in one")
    lengths = {len(v) for v in zipped.values()}
    if len(lengths) > 1:
        raise UserError(
            f"the [zip] lists in {path} have different lengths ({sorted(lengths)}); "
            "zipped lists are taken element by element and must be equally long"
        )
    count = math.prod(len(v) for v in grid.values()) * (lengths.pop() if lengths else 1)
    count *= _sample_count(sampled, path) or 1
    if count > MAX_TRIALS:  # counted before any row is built
        raise UserError(f"sweep spec {path} makes {count} trials; at most {MAX_TRIALS}")
    grid_rows = [dict(zip(grid, row, strict=True)) for row in itertools.product(*grid.values())]
    zip_rows = [dict(zip(zipped, row, strict=True)) for row in zip(*zipped.values(), strict=True)]
    random_rows = _samples(sampled, path)
    return [
        {**g, **z, **r}
        for g, z, r in itertools.product(grid_rows, zip_rows or [{}], random_rows or [{}])
    ]


def _sample_count(table: Mapping[str, Any], path: Path) -> int:
    """How many samples `[random]` asks for (0: no such table); its `trials` and `seed` checked."""
    if not table:
        return 0
    count = table.get("trials")
    ranges = [k for k in table if k not in SAMPLER_KEYS]
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0 or not ranges:
        raise UserError(
            f"[random] in {path} needs trials = N (a positive integer) and at least one range, "
            "such as lr = [1e-4, 1e-1]"
        )
    seed = table.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise UserError(
            f"[random] seed in {path} is the sampler's own seed (an integer), got {seed!r}; "
            "to train several seeds, put seed = [0, 1, 2] in [grid]"
        )
    return count


def _samples(table: Mapping[str, Any], path: Path) -> list[dict[str, Any]]:
    count = _sample_count(table, path)
    if not count:
        return []
    ranges = {k: v for k, v in table.items() if k not in SAMPLER_KEYS}
    rng = random.Random(table.get("seed", 0))
    rows: list[dict[str, Any]] = [{} for _ in range(count)]
    for key, bounds in ranges.items():
        low, high = _bounds(key, bounds, path)
        for row in rows:
            row[key] = _sample(rng, key, low, high)
    return rows


def _bounds(key: str, bounds: Any, path: Path) -> tuple[float, float]:
    numeric = isinstance(bounds, list) and len(bounds) == 2
    numeric = numeric and all(
        isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds
    )
    if not numeric or not bounds[0] <= bounds[1]:
        raise UserError(f"[random] {key} in {path} must be a range [low, high], got {bounds!r}")
    if key in LOG_UNIFORM and bounds[0] <= 0:
        raise UserError(f"[random] {key} in {path} is sampled log-uniformly: its range must be > 0")
    return bounds[0], bounds[1]


def _sample(rng: random.Random, key: str, low: float, high: float) -> Any:
    kind = field_type(key) if key in Config.__dataclass_fields__ else float
    if kind is int:
        return rng.randint(int(low), int(high))
    if key in LOG_UNIFORM:
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        value = rng.uniform(low, high)
    return float(f"{value:.{SAMPLE_DIGITS}g}")


def _table(spec: Mapping[str, Any], key: str, path: Path) -> dict[str, Any]:
    table = spec.get(key, {})
    if not isinstance(table, dict):
        raise UserError(f"{key} in sweep spec {path} must be a table ([{key}]), got {table!r}")
    return table


def _relative(spec_path: Path, name: Any) -> Path:
    """A base recipe named in a spec: relative to the spec's directory."""
    if not isinstance(name, str):
        raise UserError(f"config in sweep spec {spec_path} must be a file name, got {name!r}")
    return spec_path.parent / name
