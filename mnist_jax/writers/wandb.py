"""The Weights & Biases mirror: copies a run's events, evaluation and best checkpoint to W&B.

The run directory (`mnist_jax.record`, docs/run-record.md) is the source of truth; W&B only
mirrors it, so the mirror must never slow down, block or break training. Every method swallows
its own failure: the first one is reported as one line on stderr and the mirror then turns into
the no-op mirror for the rest of the run. `wandb` is imported only when W&B is on (it is slow to
import), and everything W&B writes stays under the run directory.
"""

from __future__ import annotations

import configparser
import math
import netrc
import os
import re
import secrets
import socket
import string
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np

from mnist_jax.errors import UserError, describe
from mnist_jax.writers import Background, TestResults, Writer

if TYPE_CHECKING:
    from mnist_jax.config import Config

DEFAULT_BASE_URL = "https://api.wandb.ai"
# wandb.init waits this long for an unreachable server (its default is 90 s); users can still
# choose with WANDB_INIT_TIMEOUT. After it, the mirror falls back to offline.
INIT_TIMEOUT_SECONDS = 30.0
# A server that does not accept a TCP connection in this time is taken as unreachable.
CONNECT_TIMEOUT_SECONDS = 3.0
# At the end of a run, wait at most this long for uploads (WANDB_FINISH_TIMEOUT overrides);
# what is not uploaded stays on disk for `wandb sync`.
FINISH_TIMEOUT_SECONDS = 300.0
CURVE_POINTS = 200
MISCLASSIFIED_SAMPLES = 32
# WANDB_MODE spellings that wandb itself accepts, mapped to ours.
_MODE_ALIASES = {
    "online": "online",
    "run": "online",
    "offline": "offline",
    "dryrun": "offline",
    "disabled": "disabled",
}
# W&B writes these outside the run directory unless told otherwise: the service log and the
# artifact cache (cache), staged artifact files that `wandb sync` uploads later (data), and
# downloaded artifacts (artifacts). WANDB_CONFIG_DIR is left alone: it holds the user's login
# host (`wandb login --host`), and a run writes nothing there.
_REDIRECTED_DIRS = {
    "WANDB_CACHE_DIR": "cache",
    "WANDB_DATA_DIR": "data",
    "WANDB_ARTIFACT_DIR": "artifacts",
}
_SECRET_NAME = re.compile(r"api_?key|token|secret|password|credential", re.IGNORECASE)


class WandbMirror(Writer):
    """A live W&B run. Any failure reports once and turns this into a no-op writer.

    `info` holds `wandb/run_id`, `wandb/mode` and `wandb/dir` for the run summary.
    """

    def __init__(self, run: Any, mode: str, secrets: list[str], restore_env: dict) -> None:
        self._run = run
        self._broken_run: Any = None
        self._secrets = secrets
        self._restore_env = restore_env
        # A resumed run already holds history up to here; W&B drops (with a warning each)
        # any step below it, so those replayed events are skipped quietly.
        self._first_step = int(getattr(run, "starting_step", 0) or 0)
        self._last_step: int | None = None
        self._last_keys: set[str] = set()
        self.info = {
            "wandb/run_id": run.id,
            "wandb/mode": mode,
            "wandb/dir": str(Path(run.dir).parent),
        }

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if self._run is None:
            return
        try:
            if step < self._first_step:
                return
            values = {k: v for k, v in metrics.items() if k != "step"}
            if step == self._last_step:
                values = {_second_name(k, self._last_keys): v for k, v in values.items()}
                self._last_keys |= set(values)
            else:
                self._last_keys = set(values)
            self._run.log(values, step=step)
            self._last_step = step
        except Exception as e:
            self._fail("log metrics", e)

    def write_evaluation(self, results: TestResults) -> None:
        if self._run is None:
            return
        try:
            from mnist_jax.metrics import metric_key

            probs_NxC, labels_N = np.asarray(results.probs_NxC), np.asarray(results.labels_N)
            images_NxHxW, confusion_CxC = results.images_NxHxW, results.confusion_CxC
            class_names = results.class_names
            roc_rows, pr_rows = curve_rows(probs_NxC, labels_N, class_names, results.curves)
            payload = {
                metric_key("test", "confusion_chart"): confusion_chart(
                    np.asarray(confusion_CxC), class_names
                ),
                metric_key("test", "roc_curve"): curve_chart(
                    roc_rows,
                    "fpr",
                    "tpr",
                    "ROC (test, one vs rest)",
                    "False positive rate",
                    "True positive rate",
                ),
                metric_key("test", "pr_curve"): curve_chart(
                    pr_rows,
                    "recall",
                    "precision",
                    "Precision-recall (test, one vs rest)",
                    "Recall",
                    "Precision",
                ),
            }
            errors = misclassified_images(
                probs_NxC, labels_N, np.asarray(images_NxHxW), class_names
            )
            if errors:
                payload[metric_key("test", "misclassified")] = errors
            # Joins the last logged row: the evaluation belongs to the final step.
            self._run.log(payload, step=self._last_step)
        except Exception as e:
            self._fail("log the evaluation", e)

    def write_checkpoint(self, path: Path, metadata: Mapping[str, Any]) -> None:
        if self._run is None:
            return
        try:
            import wandb

            path = Path(path)
            if not path.is_dir():
                raise FileNotFoundError(f"checkpoint directory {path} does not exist")
            artifact = wandb.Artifact(
                f"model-{self._run.id}", type="model", metadata=self._clean(metadata)
            )
            # File by file rather than add_dir, which prints a progress line.
            for file in sorted(p for p in path.rglob("*") if p.is_file()):
                artifact.add_file(str(file), name=file.relative_to(path).as_posix())
            self._run.log_artifact(artifact, aliases=["best"])
        except Exception as e:
            self._fail("log the checkpoint", e)

    def close(self, status: str, summary: Mapping[str, Any]) -> None:
        run, self._run = self._run, None
        try:
            if run is not None:
                # Commit the open history row first: flushed later, its values would
                # overwrite the summary's (e.g. the last interval's examples/sec).
                run.log({}, commit=True)
                run.summary.update(self._clean(summary))
                run.finish(exit_code=0 if status == "completed" else 1)
            elif self._broken_run is not None:
                self._broken_run.finish(exit_code=1)
        except Exception as e:
            if run is not None:
                _warn(f"W&B mirror: could not finish the W&B run ({describe(e)})")
        finally:
            self._broken_run = None
            _restore_env(self._restore_env)

    def _clean(self, values: Mapping[str, Any]) -> dict[str, Any]:
        return _plain(_scrub(values, self._secrets))

    def _fail(self, what: str, error: Exception) -> None:
        """Reports the first failure and goes quiet; the run directory is unaffected.

        The W&B run is closed only in `finish`: closing waits for uploads, which must not
        hold up training.
        """
        self._broken_run, self._run = self._run, None
        _warn(
            f"W&B mirror stopped: could not {what} ({describe(error)}); training goes on "
            "and the run directory stays complete"
        )


def start_mirror_in_background(
    config: Config, run_dir: Path, environment: Mapping[str, Any], resume_id: str | None = None
) -> Writer:
    """`start_mirror` on the writers' worker thread (`Background`): W&B's start (1.9 s on 2 CPU
    cores, offline, most of it importing wandb and spawning its service) and every later call
    overlap training instead of adding to it. The run's W&B id is chosen here, so that it is in
    the run summary from the start and a resumed run finds it even when this one was killed."""
    if resolve_mode(config.wandb)[0] == "disabled":
        return Writer()
    run_id = resume_id or new_run_id()
    return Background(
        lambda: start_mirror(config, run_dir, environment, resume_id, run_id=run_id),
        {"wandb/run_id": run_id},
    )


def new_run_id() -> str:
    """A fresh W&B run id: 8 characters of [a-z0-9], as W&B makes its own (2.8e12 of them)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def start_mirror(
    config: Config,
    run_dir: Path,
    environment: Mapping[str, Any],
    resume_id: str | None = None,
    *,
    run_id: str | None = None,
) -> Writer:
    """Starts mirroring the run in `run_dir` to W&B, or returns the no-op writer.

    The mode is `config.wandb` if set, else $WANDB_MODE, else "online" when an API key is
    configured (WANDB_API_KEY or a netrc entry for the API host) and "offline" otherwise.
    `resume_id` continues that W&B run (`mnist-jax train --resume`); otherwise a new one starts,
    with the id `run_id` if given. An online start that cannot reach the server falls back to
    offline; if W&B cannot start at all, training goes on without it.
    """
    mode, reason = resolve_mode(config.wandb)
    if mode == "disabled":
        return Writer()
    run_dir = Path(run_dir)
    secrets = [key] if (key := configured_api_key()) else []
    wandb_config = _plain(_scrub({**config.to_dict(), "environment": dict(environment)}, secrets))
    root = Path(os.environ.get("WANDB_DIR") or run_dir)
    restore_env = _redirect_dirs(root / "wandb")
    try:
        import wandb

        def init(mode: str) -> Any:
            return wandb.init(
                project=config.wandb_project,
                entity=config.wandb_entity,
                group=config.wandb_group,
                tags=list(config.wandb_tags) or None,
                notes=config.wandb_notes,
                name=run_dir.name,
                job_type="train",
                config=wandb_config,
                dir=str(root),
                mode=mode,
                id=resume_id or run_id,
                resume="allow" if resume_id else None,
                reinit="create_new",
                settings=wandb.Settings(**_settings(mode)),
            )

        if mode == "online" and (unreachable := _unreachable(_base_url())):
            mode, reason = "offline", f"could not start the online W&B run ({unreachable})"
        try:
            run = init(mode)
        except Exception as e:
            if mode != "online":
                raise
            run, mode = init("offline"), "offline"
            reason = f"could not start the online W&B run ({describe(e)})"
    except Exception as e:
        _restore_env(restore_env)
        _warn(f"W&B mirror off: could not start W&B ({describe(e)}); training goes on without it")
        return Writer()
    mirror = WandbMirror(run, mode, secrets, restore_env)
    if mode == "offline":
        # wandb itself is silenced offline; this one line says where the run went.
        sync_dir = mirror.info["wandb/dir"]
        why = f"{reason}; " if reason else ""
        _warn(f"wandb: {why}mirroring offline, upload later with `wandb sync {sync_dir}`")
    return mirror


def resolve_mode(configured: str | None) -> tuple[str, str | None]:
    """The W&B mode, and why it is offline when nobody asked for offline (else None)."""
    if configured:
        return configured, None
    if env_mode := os.environ.get("WANDB_MODE"):
        mode = _MODE_ALIASES.get(env_mode.strip().lower())
        if mode is None:
            raise UserError(
                f"WANDB_MODE={env_mode!r} is not a W&B mode; set online, offline or disabled"
            )
        return mode, None
    if configured_api_key() or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "online", None
    return "offline", "no W&B API key found (set WANDB_API_KEY or run `wandb login`)"


def configured_api_key() -> str | None:
    """The API key W&B would use: $WANDB_API_KEY, else the netrc entry for the API host."""
    if key := os.environ.get("WANDB_API_KEY"):
        return key
    host = urlsplit(_base_url()).netloc
    path = Path(os.environ.get("NETRC") or "~/.netrc").expanduser()
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        return None
    return entry[2] if entry and entry[2] else None


def _base_url() -> str:
    """$WANDB_BASE_URL, else the host saved by `wandb login --host`, else W&B's cloud."""
    if url := os.environ.get("WANDB_BASE_URL"):
        return url
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or "~/.config/wandb").expanduser()
    parser = configparser.ConfigParser()
    try:
        parser.read(config_dir / "settings")
    except configparser.Error:
        return DEFAULT_BASE_URL
    return parser.get("default", "base_url", fallback=DEFAULT_BASE_URL)


def _unreachable(url: str) -> str | None:
    """Why the W&B server cannot be reached, found in seconds (None when it answers).

    wandb.init waits out its whole timeout for a server that never answers; a plain TCP
    connection tells in at most CONNECT_TIMEOUT_SECONDS, and the run goes offline at once.
    """
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), CONNECT_TIMEOUT_SECONDS):
            return None
    except OSError as e:
        return f"{parts.hostname}:{port} is unreachable: {e.strerror or describe(e)}"


def _settings(mode: str) -> dict[str, Any]:
    """wandb.Settings for a mirror; a setting the user gave as WANDB_<NAME> is left to them."""
    ours: dict[str, Any] = {
        "save_code": False,
        "init_timeout": INIT_TIMEOUT_SECONDS,
        "finish_timeout": FINISH_TIMEOUT_SECONDS,
        # Offline: our one line says where the run is; online: wandb prints only the run's URL.
        # Quiet also skips the login banner, which asks an unreachable server for 10 s.
        "silent" if mode == "offline" else "quiet": True,
    }
    return {k: v for k, v in ours.items() if f"WANDB_{k.upper()}" not in os.environ}


def _redirect_dirs(base: Path) -> dict[str, str | None]:
    """Points W&B's cache, staging and download directories under `base` unless already set.

    Returns what to put back at the end, so a second run in the same process gets its own.
    """
    previous: dict[str, str | None] = {}
    for var, sub in _REDIRECTED_DIRS.items():
        if not os.environ.get(var):
            previous[var] = os.environ.get(var)
            os.environ[var] = str(base / sub)
    return previous


def _restore_env(previous: dict[str, str | None]) -> None:
    for var, value in previous.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    previous.clear()


def _second_name(key: str, logged: set[str]) -> str:
    """W&B keeps one value per key and step: a second event at a step (the epoch event after
    the last interval's train event) moves its colliding `split/name` keys to
    `split_epoch/name`, so both survive (`train/loss` stays the interval's, as in every other
    row)."""
    if key not in logged or "/" not in key:
        return key
    split, name = key.split("/", 1)
    return f"{split}_epoch/{name}"


def confusion_chart(confusion_CxC: np.ndarray, class_names: tuple[str, ...]) -> Any:
    """W&B's confusion-matrix chart, fed with our counts (rows = true class) rather than
    recounted from predictions, so W&B shows exactly what the run record holds."""
    import wandb

    rows = [
        [class_names[t], class_names[p], int(confusion_CxC[t, p])]
        for t in range(len(class_names))
        for p in range(len(class_names))
    ]
    table = wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=rows)
    return wandb.plot_table(
        "wandb/confusion_matrix/v1",
        table,
        {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
        {"title": "Confusion matrix (test)"},
    )


def curve_rows(
    probs_NxC: np.ndarray,
    labels_N: np.ndarray,
    class_names: tuple[str, ...],
    curves: Any = None,
) -> tuple[list[list[Any]], list[list[Any]]]:
    """One-vs-rest ROC rows `[class, fpr, tpr]` and PR rows `[class, recall, precision]`.

    The curves are the evaluation's own (`curves`), else computed by `mnist_jax.metrics`, all
    classes in one compiled call (wandb.plot.roc_curve/pr_curve would pull in pandas and
    scikit-learn and recompute them).
    """
    from mnist_jax import metrics, parallel

    if curves is None:
        curves = parallel.jit(metrics.one_vs_rest_curves)(probs_NxC, labels_N.astype(np.int32))
    roc, pr = metrics.curve_points(curves)
    roc_rows, pr_rows = [], []
    for name, (fpr, tpr), (recall, precision) in zip(class_names, roc, pr, strict=True):
        roc_rows += _curve_rows(name, fpr, tpr)
        pr_rows += _curve_rows(name, recall, precision)
    return roc_rows, pr_rows


def _curve_rows(name: str, x_N: np.ndarray, y_N: np.ndarray) -> list[list[Any]]:
    x_N, y_N = thin_curve(x_N, y_N)
    return [[name, float(x), float(y)] for x, y in zip(x_N, y_N, strict=True)]


def curve_chart(rows: list, x: str, y: str, title: str, x_title: str, y_title: str) -> Any:
    """W&B's area-under-curve chart (the one wandb.plot.roc_curve draws), one line per class."""
    import wandb

    table = wandb.Table(columns=["class", x, y], data=rows)
    return wandb.plot_table(
        "wandb/area-under-curve/v0",
        table,
        {"x": x, "y": y, "class": "class"},
        {"title": title, "x-axis-title": x_title, "y-axis-title": y_title},
    )


def thin_curve(
    x_N: np.ndarray, y_N: np.ndarray, max_points: int = CURVE_POINTS
) -> tuple[np.ndarray, np.ndarray]:
    """At most `max_points` points (plus the endpoints) spread evenly along the curve's length.

    A curve with one point per test image draws the same with a few hundred, and W&B tables stay
    small. Spacing by length rather than by index keeps the steep corner, where the thresholds
    are few but the curve moves most.
    """
    n = len(x_N)
    if n <= max_points:
        return x_N, y_N
    length = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(x_N), np.diff(y_N)))])
    at = np.searchsorted(length, np.linspace(0.0, length[-1], max_points))
    keep = np.unique(np.concatenate([[0, n - 1], np.clip(at, 0, n - 1)]))
    return x_N[keep], y_N[keep]


def misclassified_images(
    probs_NxC: np.ndarray,
    labels_N: np.ndarray,
    images_NxHxW: np.ndarray,
    class_names: tuple[str, ...],
    count: int = MISCLASSIFIED_SAMPLES,
) -> list[Any]:
    """The `count` most confidently wrong test images, captioned "true 3, predicted 5 (0.97)"."""
    import wandb

    from mnist_jax.metrics import top_mistakes

    preds_N = probs_NxC.argmax(axis=1)
    chosen = top_mistakes(probs_NxC, labels_N, count)
    pixels = _as_uint8(images_NxHxW[chosen])
    return [
        wandb.Image(
            image,
            mode="L",
            caption=f"true {class_names[labels_N[i]]}, predicted {class_names[preds_N[i]]} "
            f"({probs_NxC[i, preds_N[i]]:.2f})",
        )
        for i, image in zip(chosen, pixels, strict=True)
    ]


def _as_uint8(images: np.ndarray) -> np.ndarray:
    """Grey-level pixels: uint8 as they are, anything else stretched to 0..255."""
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.dtype == np.uint8 or images.size == 0:
        return images
    low, high = float(images.min()), float(images.max())
    scaled = (images - low) / (high - low) if high > low else np.zeros_like(images, float)
    return np.round(scaled * 255).astype(np.uint8)


def _scrub(values: Mapping[str, Any], secrets: list[str]) -> dict[str, Any]:
    """Drops entries named like credentials or whose text holds a secret, at any depth."""
    clean: dict[str, Any] = {}
    for k, v in values.items():
        if _SECRET_NAME.search(str(k)):
            continue
        if isinstance(v, Mapping):
            v = _scrub(v, secrets)
        elif isinstance(v, str) and any(s in v for s in secrets):
            continue
        clean[k] = v
    return clean


def _plain(value: Any) -> Any:
    """JSON-ready values: numpy and jax scalars/arrays as Python, non-finite floats as None."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _plain(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
