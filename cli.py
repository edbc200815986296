"""The `mnist-jax` command line: flags become a `Config`, each command makes one library call.

jax, flax, optax, orbax, wandb and tensorflow are imported inside the commands so that
`mnist-jax --help` stays fast.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.exceptions import TyperException

from mnist_jax.config import FIELD_HELP, config_from
from mnist_jax.errors import UserError

app = typer.Typer(
    help="Train, evaluate and analyse JAX/Flax classifiers on MNIST-style datasets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Show, download and verify datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Turns a `UserError` into one line on stderr and its exit code, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(e.exit_code) from None

    return wrapper  # type: ignore[return-value]


def _opt(name: str, *flags: str) -> Any:
    return typer.Option(*flags, help=FIELD_HELP[name], show_default=False)


DatasetOpt = Annotated[str | None, _opt("dataset", "--dataset")]
DataDirOpt = Annotated[Path | None, _opt("data_dir", "--data-dir")]
SourceOpt = Annotated[str | None, _opt("source", "--source")]


@app.command()
@user_errors
def train(
    config: Annotated[
        Path | None, typer.Option("--config", help="Experiment TOML file (flags override it).")
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume", help="Continue the run in this directory from its last checkpoint."
        ),
    ] = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    source: SourceOpt = None,
    train_examples: Annotated[int | None, _opt("train_examples", "--train-examples")] = None,
    test_examples: Annotated[int | None, _opt("test_examples", "--test-examples")] = None,
    conv_features: Annotated[str | None, _opt("conv_features", "--conv-features")] = None,
    dense_features: Annotated[int | None, _opt("dense_features", "--dense-features")] = None,
    dropout: Annotated[float | None, _opt("dropout", "--dropout")] = None,
    norm: Annotated[str | None, _opt("norm", "--norm")] = None,
    optimizer: Annotated[str | None, _opt("optimizer", "--optimizer")] = None,
    lr: Annotated[float | None, _opt("lr", "--lr")] = None,
    momentum: Annotated[float | None, _opt("momentum", "--momentum")] = None,
    weight_decay: Annotated[float | None, _opt("weight_decay", "--weight-decay")] = None,
    schedule: Annotated[str | None, _opt("schedule", "--schedule")] = None,
    warmup_steps: Annotated[int | None, _opt("warmup_steps", "--warmup-steps")] = None,
    grad_clip: Annotated[float | None, _opt("grad_clip", "--grad-clip")] = None,
    label_smoothing: Annotated[float | None, _opt("label_smoothing", "--label-smoothing")] = None,
    batch_size: Annotated[int | None, _opt("batch_size", "--batch-size")] = None,
    epochs: Annotated[int | None, _opt("epochs", "--epochs")] = None,
    seed: Annotated[int | None, _opt("seed", "--seed")] = None,
    eval_batch_size: Annotated[int | None, _opt("eval_batch_size", "--eval-batch-size")] = None,
    steps_per_call: Annotated[int | None, _opt("steps_per_call", "--steps-per-call")] = None,
    log_every: Annotated[int | None, _opt("log_every", "--log-every")] = None,
    runs_dir: Annotated[Path | None, _opt("runs_dir", "--runs-dir")] = None,
    name: Annotated[str | None, _opt("name", "--name")] = None,
    wandb: Annotated[str | None, _opt("wandb", "--wandb")] = None,
    project: Annotated[str | None, _opt("wandb_project", "--project")] = None,
    entity: Annotated[str | None, _opt("wandb_entity", "--entity")] = None,
    tags: Annotated[str | None, _opt("wandb_tags", "--tags")] = None,
    group: Annotated[str | None, _opt("wandb_group", "--group")] = None,
    notes: Annotated[str | None, _opt("wandb_notes", "--notes")] = None,
) -> None:
    """Train the CNN and record the run under RUNS_DIR/NAME."""
    flags = dict(
        dataset=dataset,
        data_dir=str(data_dir) if data_dir else None,
        source=source,
        train_examples=train_examples,
        test_examples=test_examples,
        conv_features=conv_features,
        dense_features=dense_features,
        dropout=dropout,
        norm=norm,
        optimizer=optimizer,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        schedule=schedule,
        warmup_steps=warmup_steps,
        grad_clip=grad_clip,
        label_smoothing=label_smoothing,
        batch_size=batch_size,
        epochs=epochs,
        seed=seed,
        eval_batch_size=eval_batch_size,
        steps_per_call=steps_per_call,
        log_every=log_every,
        runs_dir=str(runs_dir) if runs_dir else None,
        name=name,
        wandb=wandb,
        wandb_project=project,
        wandb_entity=entity,
        wandb_tags=tags,
        wandb_group=group,
        wandb_notes=notes,
    )
    if resume is not None:
        if config is not None:
            raise UserError("--resume continues a run with its own config; drop --config")
        from mnist_jax.train import resume as resume_run

        code = resume_run(resume, flags)
    else:
        from mnist_jax.train import fit

        code = fit(config_from(config, flags))
    raise typer.Exit(code)


@data_app.command("info")
@user_errors
def data_info(
    dataset: DatasetOpt = None, data_dir: DataDirOpt = None, source: SourceOpt = None
) -> None:
    """Show where a dataset would come from and what is there (files, shapes, class counts)."""
    from mnist_jax import data as data_lib

    info = data_lib.describe(dataset or "mnist", data_dir, source or "auto")
    plan = info.plan
    typer.echo(f"dataset: {info.name} ({len(data_lib.CLASS_NAMES[info.name])} classes)")
    if plan.kind == "tfds":
        installed = (
            "installed" if info.tfds_installed else 'not installed: pip install "mnist-jax[tfds]"'
        )
        typer.echo(f"source:  tensorflow-datasets ({installed})")
        return
    typer.echo(f"source:  {plan.kind} {plan.directory} ({plan.reason})")
    for stem, found in info.files.items():
        typer.echo(
            f"  {found[0].name:<28} {found[1]:>12,} bytes" if found else f"  {stem:<28} missing"
        )
    if plan.kind == "download":
        typer.echo("from:    " + "  ".join(info.urls))
    if info.dataset is not None:
        import numpy as np

        ds = info.dataset
        for split_name, split in (("train", ds.train), ("test", ds.test)):
            counts = np.bincount(split.labels, minlength=ds.num_classes)
            typer.echo(
                f"{split_name + ':':<8} images {split.images.dtype}{list(split.images.shape)}, "
                f"labels {split.labels.dtype}{list(split.labels.shape)}"
            )
            pairs = zip(ds.class_names, counts.tolist(), strict=True)
            typer.echo("  class counts: " + " ".join(f"{c}:{n}" for c, n in pairs))
    if info.error:
        raise UserError(info.error, exit_code=1)


@data_app.command("download")
@user_errors
def data_download(
    dataset: DatasetOpt = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Directory to download into (default: the cache directory)."),
    ] = None,
) -> None:
    """Download a dataset's four files, verify their SHA-256 and contents, and cache them."""
    from mnist_jax import data as data_lib

    name = dataset or "mnist"
    directory = data_lib.download(name, out, progress=sys.stderr.isatty())
    ds = data_lib.load_idx_dir(name, directory)
    typer.echo(f"{name}: {len(ds.train)} train and {len(ds.test)} test examples in {directory}")


@data_app.command("verify")
@user_errors
def data_verify(dataset: DatasetOpt = None, data_dir: DataDirOpt = None) -> None:
    """Validate each IDX file (format, counts, labels, MD5 for MNIST); exit 1 on any error."""
    from mnist_jax import data as data_lib

    name = dataset or "mnist"
    directory = data_lib.local_dir(name, data_dir)
    typer.echo(f"{name} in {directory}")
    checks = data_lib.verify_dir(name, directory)
    for check in checks:
        label = check.path.name if check.path else check.stem
        md5 = {None: "", True: ", MD5 ok", False: ", MD5 mismatch (not canonical content)"}
        if check.status == "ok":
            typer.echo(f"  OK        {label}: {check.count} examples{md5[check.md5_ok]}")
        else:
            typer.echo(f"  {check.status.upper():<9} {label}: {check.message}")
    bad = sum(c.status != "ok" for c in checks)
    if bad:
        raise UserError(f"{bad} of {len(checks)} {name} files failed verification", exit_code=1)


@app.command()
@user_errors
def analyze(
    dataset: Annotated[str, typer.Option("--dataset", help=FIELD_HELP["dataset"])] = "mnist",
    data_dir: DataDirOpt = None,
    runs: Annotated[
        list[str] | None,
        typer.Option(
            "--runs",
            metavar="RUN",
            help="Run directory or quoted glob ('runs/*'); repeatable. Default: every run in "
            "--runs-dir.",
        ),
    ] = None,
    runs_dir: Annotated[
        Path, typer.Option("--runs-dir", help="Directory whose runs are analysed by default.")
    ] = Path("runs"),
    out: Annotated[
        Path, typer.Option("--out", help="Output directory for report.html, CSV, JSON, figures.")
    ] = Path("analysis"),
    no_dataset: Annotated[
        bool, typer.Option("--no-dataset", help="Skip the dataset analysis.")
    ] = False,
    no_runs: Annotated[bool, typer.Option("--no-runs", help="Skip the run analysis.")] = False,
) -> None:
    """Analyse a dataset and training runs into one self-contained HTML report."""
    if runs and no_runs:
        raise UserError("--runs and --no-runs contradict each other; drop one")
    if no_dataset and no_runs:
        raise UserError("--no-dataset and --no-runs leave nothing to analyse; drop one")
    from mnist_jax.analysis import analyze as run_analysis

    report = run_analysis(
        out,
        dataset=dataset,
        data_dir=data_dir,
        runs=runs,
        runs_dir=runs_dir,
        include_dataset=not no_dataset,
        include_runs=not no_runs,
    )
    typer.echo(f"report: {report}")


@app.command()
@user_errors
def evaluate(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `train`.")],
    split: Annotated[str, typer.Option("--split", help="Split to evaluate: test or train.")] = (
        "test"
    ),
    data_dir: DataDirOpt = None,
) -> None:
    """Evaluate a run's best checkpoint on a whole split; writes RUN_DIR/eval.json."""
    from mnist_jax.inference import evaluate_run
    from mnist_jax.report_table import print_evaluation

    result = evaluate_run(run_dir, split, str(data_dir) if data_dir else None)
    print_evaluation(result, split)
    typer.echo(f"wrote {Path(run_dir) / 'eval.json'}")


@app.command()
@user_errors
def predict(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `train`.")],
    images: Annotated[list[Path], typer.Argument(help="PNG/JPEG files to classify.")],
    invert: Annotated[
        bool, typer.Option("--invert", help="Dark digits on a light background (scans, paper).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for machines.")] = False,
) -> None:
    """Classify image files: the label and the top-3 probabilities of each."""
    import dataclasses
    import json

    from mnist_jax.inference import predict_files

    results = predict_files(run_dir, images, invert=invert)
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(r) for r in results], indent=2))
    for r in results:
        if r.error:
            typer.echo(f"error: {r.error}", err=True)
        elif not as_json:
            top = "  ".join(f"{name} {p:.3f}" for name, p in r.top)
            typer.echo(f"{r.path}: {r.label}   ({top})")
    if any(r.error for r in results):
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point: every problem ends as one `error:` line and an exit code."""
    import warnings

    warnings.showwarning = _one_line_warning
    try:
        code = app(standalone_mode=False)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except TyperException as e:  # the command line itself could not be parsed
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        ctx = getattr(e, "ctx", None)
        hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
        typer.echo(f"error: {message.rstrip('.')}{hint}", err=True)
        sys.exit(getattr(e, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    typer.echo(f"warning: {message}", err=True)


if __name__ == "__main__":
    main()
