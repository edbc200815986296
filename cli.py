"""The `mnist-jax` command line: flags become a `Config`, each command makes one library call.

jax, flax, optax, orbax, wandb and tensorflow are imported inside the commands so that
`mnist-jax --help` stays fast.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import inspect
import os
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.exceptions import TyperException

from mnist_jax.config import Config, config_from, field_help, field_type
from mnist_jax.errors import UserError
from mnist_jax.signals import stop_on_signals

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
    return typer.Option(*flags, help=field_help(name), show_default=False)


DatasetOpt = Annotated[str | None, _opt("dataset", "--dataset")]
DataDirOpt = Annotated[Path | None, _opt("data_dir", "--data-dir")]
SourceOpt = Annotated[str | None, _opt("source", "--source")]


def config_options(fn: F) -> F:
    """Replaces `fn`'s `**flags` by one option per `Config` field, each None when not given.

    Typer reads the options from `inspect.signature`, so a field added to `Config` is a flag of
    every command decorated here with nothing else to write.
    """
    signature = inspect.signature(fn, eval_str=True)
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    params += [_config_option(f) for f in dataclasses.fields(Config)]
    fn.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    fn.__annotations__ = {p.name: p.annotation for p in params}
    return fn


def _config_option(field: dataclasses.Field) -> inspect.Parameter:
    flag = field.metadata["flag"] or "--" + field.name.replace("_", "-")
    kind = field_type(field.name)
    if kind is bool:  # a switch both ways, so a flag can override an experiment file
        flag = f"{flag}/--no-{flag.removeprefix('--')}"
    option = typer.Option(flag, help=field.metadata["help"], show_default=False)
    if field.metadata["path"]:
        kind = Path
    elif typing.get_origin(kind) is tuple:
        kind = str  # comma-separated, e.g. --conv-features 32,64
    annotation = Annotated[kind | None, option]
    return inspect.Parameter(
        field.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
    )


@app.command()
@user_errors
@config_options
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
    **flags: Any,
) -> None:
    """Train a model and record the run under RUNS_DIR/NAME."""
    flags = {k: str(v) if isinstance(v, Path) else v for k, v in flags.items()}
    if resume is not None and config is not None:
        raise UserError("--resume continues a run with its own config; drop --config")
    with stop_on_signals() as stop:  # before the heavy imports: no Ctrl-C gets lost
        if resume is not None:
            from mnist_jax.train import resume as resume_run

            stop.raise_if_requested()
            code = resume_run(resume, flags, stop)
        else:
            from mnist_jax.train import fit

            stop.raise_if_requested()
            code = fit(config_from(config, flags), stop)
    raise typer.Exit(code)


@app.command()
@user_errors
@config_options
def sweep(
    spec: Annotated[
        Path | None,
        typer.Argument(help="Sweep spec (TOML): base recipe and swept values, see experiments/."),
    ] = None,
    max_parallel: Annotated[
        int,
        typer.Option(
            "--max-parallel",
            help="Most trials trained at once as one mapped program (0: per backend, 1 on "
            "XLA:CPU, where one trial at a time is faster; 16 on GPU/TPU). 1 runs the trials "
            "one after another, sharing one compiled program.",
        ),
    ] = 0,
    resume: Annotated[
        Path | None,
        typer.Option("--resume", help="Continue the sweep in this directory."),
    ] = None,
    **flags: Any,
) -> None:
    """Train many trials of one recipe and tabulate them in RUNS_DIR/SWEEP_NAME.

    Trials come from a grid, zipped lists or random samples. Flags set the base recipe.

    --name names the sweep (RUNS_DIR/SWEEP_NAME), not its trials.
    """
    flags = {k: str(v) if isinstance(v, Path) else v for k, v in flags.items()}
    name = flags.pop("name")
    with stop_on_signals() as stop:
        from mnist_jax.sweep.run import sweep as run

        stop.raise_if_requested()
        code = run(spec, flags, name=name, max_parallel=max_parallel, resume=resume, stop=stop)
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
    dataset: Annotated[str, typer.Option("--dataset", help=field_help("dataset"))] = "mnist",
    data_dir: DataDirOpt = None,
    runs: Annotated[
        list[str] | None,
        typer.Option(
            "--runs",
            metavar="RUN",
            help="Run or sweep directory, or quoted glob ('runs/*'); repeatable. Default: every "
            "run and sweep in --runs-dir.",
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
    """Evaluate a run's best checkpoint on the images training used; writes eval.json.

    The images: the split's first --train-examples or --test-examples (0: all) in the run's config.
    """
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
            typer.echo(f"{r.path}: {r.label}   ({top})" + (f"   note: {r.note}" if r.note else ""))
    if any(r.error for r in results):
        raise typer.Exit(1)


def main() -> None:
    """The command line: every problem ends as one `error:` line and an exit code (raised as
    `SystemExit`; `run` is the program around it)."""
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


def run() -> None:
    """The `mnist-jax` program: `main` in a process of its own, which then ends without tearing
    the interpreter down.

    After a command that used jax, Python spends 0.4-0.6 s (2-core CPU) freeing compiled
    programs, arrays and ~1,500 modules one by one, for nothing. Everything that matters at exit
    still happens first: Python waits for the worker threads (the W&B writer's), then runs the
    exit handlers (W&B's, Orbax's, jax's, temporary directories'), and this one, registered
    before any of those libraries is imported, runs last: it flushes stdout and stderr and ends
    the process with `main`'s exit code. Where handlers were registered before it (a coverage
    or profiling wrapper), or `main` ends in an uncaught exception, the exit is Python's own.
    """
    exit_code: list[int] = []

    def exit_now() -> None:
        if not exit_code:
            return
        for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(Exception):  # a closed pipe: nothing left to flush into
                stream.flush()
        os._exit(exit_code[0])

    if getattr(atexit, "_ncallbacks", lambda: 1)() == 0:
        atexit.register(exit_now)
    try:
        main()
    except SystemExit as e:
        exit_code.append(e.code if isinstance(e.code, int) else int(e.code is not None))
        raise


if __name__ == "__main__":
    run()
