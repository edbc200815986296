"""The `mnist-jax` command line: flags become a `Config`, each command makes one library call.

jax, flax, optax, orbax, wandb and tensorflow are imported inside the commands so that
`mnist-jax --help` stays fast.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer

from mnist_jax.config import FIELD_HELP
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


DatasetOpt = Annotated[Optional[str], _opt("dataset", "--dataset")]
DataDirOpt = Annotated[Optional[Path], _opt("data_dir", "--data-dir")]
SourceOpt = Annotated[Optional[str], _opt("source", "--source")]


@app.command()
@user_errors
def train(
    config: Annotated[
        Optional[Path], typer.Option("--config", help="Experiment TOML file (flags override it).")
    ] = None,
    resume: Annotated[
        Optional[Path],
        typer.Option("--resume", help="Continue the run in this directory from its last checkpoint."),
    ] = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    source: SourceOpt = None,
    conv_features: Annotated[Optional[str], _opt("conv_features", "--conv-features")] = None,
    dense_features: Annotated[Optional[int], _opt("dense_features", "--dense-features")] = None,
    dropout: Annotated[Optional[float], _opt("dropout", "--dropout")] = None,
    norm: Annotated[Optional[str], _opt("norm", "--norm")] = None,
    optimizer: Annotated[Optional[str], _opt("optimizer", "--optimizer")] = None,
    lr: Annotated[Optional[float], _opt("lr", "--lr")] = None,
    momentum: Annotated[Optional[float], _opt("momentum", "--momentum")] = None,
    weight_decay: Annotated[Optional[float], _opt("weight_decay", "--weight-decay")] = None,
    schedule: Annotated[Optional[str], _opt("schedule", "--schedule")] = None,
    warmup_steps: Annotated[Optional[int], _opt("warmup_steps", "--warmup-steps")] = None,
    grad_clip: Annotated[Optional[float], _opt("grad_clip", "--grad-clip")] = None,
    label_smoothing: Annotated[
        Optional[float], _opt("label_smoothing", "--label-smoothing")
    ] = None,
    batch_size: Annotated[Optional[int], _opt("batch_size", "--batch-size")] = None,
    epochs: Annotated[Optional[int], _opt("epochs", "--epochs")] = None,
    seed: Annotated[Optional[int], _opt("seed", "--seed")] = None,
    eval_batch_size: Annotated[Optional[int], _opt("eval_batch_size", "--eval-batch-size")] = None,
    steps_per_call: Annotated[Optional[int], _opt("steps_per_call", "--steps-per-call")] = None,
    log_every: Annotated[Optional[int], _opt("log_every", "--log-every")] = None,
    runs_dir: Annotated[Optional[Path], _opt("runs_dir", "--runs-dir")] = None,
    name: Annotated[Optional[str], _opt("name", "--name")] = None,
    wandb: Annotated[Optional[str], _opt("wandb", "--wandb")] = None,
    project: Annotated[Optional[str], _opt("wandb_project", "--project")] = None,
    entity: Annotated[Optional[str], _opt("wandb_entity", "--entity")] = None,
    tags: Annotated[Optional[str], _opt("wandb_tags", "--tags")] = None,
    group: Annotated[Optional[str], _opt("wandb_group", "--group")] = None,
    notes: Annotated[Optional[str], _opt("wandb_notes", "--notes")] = None,
) -> None:
    """Train the CNN and record the run under RUNS_DIR/NAME."""
    flags = dict(
        dataset=dataset,
        data_dir=str(data_dir) if data_dir else None,
        source=source,
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
    from mnist_jax.config import config_from

    if resume is not None:
        if config is not None:
            raise UserError("--resume continues a run with its own config; drop --config")
        from mnist_jax.train import resume as resume_run

        code = resume_run(resume, flags)
    else:
        from mnist_jax.train import fit

        code = fit(config_from(config, flags))
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
