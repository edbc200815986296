"""Training: the pure steps, the loop, the run record, determinism, interrupt and resume."""

from __future__ import annotations

import json
import logging
import re
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sklearn.metrics as skm

from mnist_jax import data, metrics, parallel, steps, train
from mnist_jax.checkpoint import Checkpoints
from mnist_jax.config import Config
from mnist_jax.writers.progress import Progress

REPO = Path(__file__).resolve().parents[1]

MNIST = data.spec("mnist")

# Loss of the default model (seed 0) on the first 128 training images, before and after one
# Adam step: a change here means the model, its initialisation or the optimizer changed.
GOLDEN_LOSS_STEP_1 = 2.294262170791626
GOLDEN_LOSS_STEP_2 = 2.2234930992126465


@pytest.fixture(scope="module")
def mnist(mnist_dir) -> data.Dataset:
    return data.load_dataset("mnist", mnist_dir)


@pytest.fixture
def tiny(tiny_config, tmp_path) -> Config:
    return tiny_config(tmp_path / "runs")


def run_summary(config: Config) -> dict:
    return json.loads((config_run_dir(config) / "summary.json").read_text())


def config_run_dir(config: Config):
    return Path(config.runs_dir) / config.name


def first_batch(dataset: data.Dataset, n: int = 128):
    return jnp.asarray(dataset.train.images[:n]), jnp.asarray(dataset.train.labels[:n])


def test_one_step_lowers_the_loss_and_matches_golden_values(mnist):
    built = steps.build(Config(), mnist.spec, total_steps=100)
    step = jax.jit(built.train_step)
    batch = first_batch(mnist)
    state, out1 = step(built.init_state, batch, steps.step_key(0, 0))
    _, out2 = step(state, batch, steps.step_key(0, 1))
    assert float(out2["loss"]) < float(out1["loss"])
    assert float(out1["loss"]) == pytest.approx(GOLDEN_LOSS_STEP_1, abs=1e-5)
    assert float(out2["loss"]) == pytest.approx(GOLDEN_LOSS_STEP_2, abs=1e-5)
    assert int(state.step) == 1


def test_jitted_step_equals_eager_step(mnist):
    built = steps.build(Config(conv_features=(4,), dense_features=8), MNIST, total_steps=10)
    batch = first_batch(mnist, 32)
    key = steps.step_key(0, 0)
    eager_state, eager = built.train_step(built.init_state, batch, key)
    jit_state, jitted = jax.jit(built.train_step)(built.init_state, batch, key)
    np.testing.assert_allclose(eager["loss"], jitted["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(eager_state), jax.tree.leaves(jit_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_scanned_chunk_equals_single_steps(mnist):
    """K steps under lax.scan reach the same state as K separate calls."""
    config = Config(conv_features=(4,), dense_features=8, batch_size=32)
    built = steps.build(config, MNIST, total_steps=8)
    images, labels = jnp.asarray(mnist.train.images[:256]), jnp.asarray(mnist.train.labels[:256])
    permutation = steps.epoch_permutation(0, 0, 256)
    one = jax.jit(steps.train_chunk(built, 1), donate_argnums=(0, 1))
    four = jax.jit(steps.train_chunk(built, 4), donate_argnums=(0, 1))
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731 - inputs are donated
    state_a, sums_a = copy(built.init_state), steps.Sums.zeros()
    for i in range(4):
        state_a, sums_a = one(state_a, sums_a, images, labels, permutation, jnp.int32(i))
    state_b, sums_b = four(
        copy(built.init_state), steps.Sums.zeros(), images, labels, permutation, jnp.int32(0)
    )
    sums_a, sums_b = sums_a.epoch, sums_b.epoch
    np.testing.assert_allclose(sums_a.loss_sum, sums_b.loss_sum, rtol=1e-5)
    assert int(sums_a.correct) == int(sums_b.correct) and int(sums_b.count) == 128
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_the_one_step_program_is_compiled_only_when_a_run_needs_it(tiny, mnist):
    """An epoch of whole chunks needs no one-step program; a run resumed between two chunks
    compiles it then, and goes on to the state of a run that never stopped."""
    from mnist_jax.trainer import Trainer

    dataset = data.subset(mnist, 512, 300)
    whole = Trainer(tiny.replace(steps_per_call=4), dataset)  # 8 steps an epoch: 2 calls
    assert set(whole.programs.chunks) == {4}
    initial = parallel.fetch(whole.state)
    whole.run(8)
    assert set(whole.programs.chunks) == {4}

    resumed = Trainer(tiny.replace(steps_per_call=4), dataset)
    assert set(resumed.programs.chunks) == {4}
    resumed.load({"state": initial, "sums": steps.Sums.zeros()}, step=0)
    assert resumed.run(3) == 3  # three single steps
    assert set(resumed.programs.chunks) == {4, 1}
    assert resumed.run(5) == 8  # one chunk of 4, one single step
    for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(resumed.state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

    assert set(Trainer(tiny.replace(steps_per_call=3), dataset).programs.chunks) == {3, 1}


def test_eval_counts_every_image_with_a_padded_last_batch(mnist):
    config = Config(conv_features=(4,), dense_features=8)
    built = steps.build(config, MNIST, total_steps=1)
    n = 997  # not a multiple of the eval batch: the last batch is padded and masked
    split = steps.eval_data(mnist.test.images[:n], mnist.test.labels[:n], batch_size=100)
    assert split.images_KxBxHxW.shape[:2] == (10, 100)
    evaluate = jax.jit(steps.evaluate(built, split.num_examples))
    sums, probs, summary, curves = evaluate(built.init_state, split)
    assert int(sums.count) == n and int(sums.confusion.sum()) == n
    predictions = np.asarray(probs).argmax(-1)
    assert probs.shape == (n, 10)
    expected = np.zeros((10, 10), np.int64)
    np.add.at(expected, (mnist.test.labels[:n], predictions), 1)
    np.testing.assert_array_equal(np.asarray(sums.confusion), expected)
    logp = np.log(np.asarray(probs, np.float64))
    expected_loss = -logp[np.arange(n), mnist.test.labels[:n]].sum()
    assert float(sums.loss_sum) == pytest.approx(expected_loss, rel=1e-4)
    # The curves of the n images (none of the padding), whose areas the summary reports.
    roc, pr = metrics.curve_points(curves)
    for c in range(10):
        positives, scores = mnist.test.labels[:n] == c, np.asarray(probs)[:, c]
        fpr, tpr, _ = skm.roc_curve(positives, scores, drop_intermediate=False)
        np.testing.assert_allclose(roc[c][0], fpr, atol=1e-6)
        np.testing.assert_allclose(roc[c][1], tpr, atol=1e-6)
        precision, recall, _ = skm.precision_recall_curve(positives, scores)
        np.testing.assert_allclose(pr[c][0], recall, atol=1e-6)
        np.testing.assert_allclose(pr[c][1], precision, atol=1e-6)
        auroc = skm.roc_auc_score(positives, scores)
        assert float(summary["auroc"][c]) == pytest.approx(auroc, abs=1e-6)


def test_fit_writes_the_run_record(tiny):
    config = tiny.replace(name="record")
    assert train.fit(config) == 0
    run = config_run_dir(config)
    saved = json.loads((run / "config.json").read_text())
    assert saved["config"]["lr"] == config.lr and saved["config"]["name"] == "record"
    assert saved["environment"]["backend"] == jax.default_backend()
    assert saved["environment"]["device_count"] >= 1
    for key in ("jax", "flax", "optax", "device_kind", "git_commit"):
        assert key in saved["environment"]
    # the per-backend choices the config left at 0 (auto), as this backend made them
    execution = saved["environment"]["execution"]
    backend = jax.default_backend()
    assert execution["steps_per_call"] == (1 if backend == "cpu" else 8)  # a whole epoch
    assert execution["conv_chunk"] == (8 if backend == "cpu" else config.batch_size)
    assert execution["stem"] == "conv"  # the classic CNN pools by average
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epoch_events = [e for e in events if "test/accuracy" in e]
    assert [e["epoch"] for e in epoch_events] == [1, 2]
    train_events = [e for e in events if "test/accuracy" not in e]
    assert all({"step", "epoch", "train/loss", "train/lr"} <= e.keys() for e in train_events)
    # docs/run-record.md names every file of the run and every key of its events
    documented = (REPO / "docs" / "run-record.md").read_text()
    for name in {p.name for p in run.iterdir()}:
        assert f"`{name}" in documented, name
    for key in {re.sub(r"/\d+$", "/K", k) for e in events for k in e}:
        assert f'"{key}"' in documented, key
    summary = run_summary(config)
    assert summary["status"] == "completed"
    for key in (
        "test/accuracy",
        "test/loss",
        "train/loss",
        "train/examples_per_sec",
        "time/compile_seconds",
        "time/train_seconds",
        "time/total_seconds",
        "test/precision_macro",
        "test/recall_macro",
        "test/f1_macro",
        "test/auroc_macro",
        "test/precision/3",
    ):
        assert summary[key] is not None, key
    # two evaluations, neither of them training time, both within the run's time
    times = {k.split("/")[1]: summary[k] for k in summary if k.startswith("time/")}
    assert times["eval_seconds"] > 0 and times["train_seconds"] > 0
    assert (
        times["compile_seconds"] + times["train_seconds"] + times["eval_seconds"]
        < times["total_seconds"]
    )
    confusion = np.array(summary["test/confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == 300
    assert summary["test/accuracy"] == pytest.approx(np.trace(confusion) / 300)
    assert summary["test/accuracy"] == epoch_events[-1]["test/accuracy"]
    predictions = np.load(run / "predictions.npz")
    assert predictions["probs"].shape == (300, 10)
    assert (predictions["probs"].argmax(-1) == predictions["labels"]).mean() == pytest.approx(
        summary["test/accuracy"]
    )
    checkpoints = Checkpoints(run / "checkpoints")
    assert checkpoints.latest_step("last") == 16
    assert checkpoints.latest_step("best") == summary["best/step"]


def test_the_train_step_compiles_once_across_epochs(tiny, caplog):
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        assert train.fit(tiny.replace(name="compiles")) == 0
    messages = [r.getMessage() for r in caplog.records]
    compiled = [m for m in messages if m.startswith("Compiling jit(train_chunk")]
    assert len(compiled) == 1, compiled


def test_same_seed_gives_the_same_metrics_bit_for_bit(tiny):
    tiny = tiny.replace(deterministic=True)  # bit identity is promised in deterministic mode
    a, b = tiny.replace(name="a"), tiny.replace(name="b")
    assert train.fit(a) == 0 and train.fit(b) == 0
    sa, sb = run_summary(a), run_summary(b)
    metric_keys = [k for k in sa if k.startswith(("test/", "train/loss", "train/accuracy"))]
    assert metric_keys
    assert {k: sa[k] for k in metric_keys} == {k: sb[k] for k in metric_keys}
    other = tiny.replace(name="c", seed=1)
    assert train.fit(other) == 0
    assert run_summary(other)["train/loss"] != sa["train/loss"]


@pytest.mark.parametrize("at_step", [5, 8], ids=["mid-epoch", "epoch-end"])
def test_interrupt_then_resume_equals_an_uninterrupted_run(tiny, monkeypatch, at_step):
    # bit identity is promised in deterministic mode; one step a call stops at any step on
    # every backend (a GPU's default, 8 steps here, would pass step 5 in one call)
    tiny = tiny.replace(deterministic=True, steps_per_call=1)
    straight = tiny.replace(name="straight")
    assert train.fit(straight) == 0

    advance = Progress.advance

    def interrupt(self, step):
        advance(self, step)
        if step == at_step:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(Progress, "advance", interrupt)
    cut = tiny.replace(name="cut")
    assert train.fit(cut) == train.EXIT_INTERRUPTED
    summary = run_summary(cut)
    assert summary["status"] == "interrupted" and summary["step"] == at_step
    monkeypatch.setattr(Progress, "advance", advance)

    assert train.resume(config_run_dir(cut), {}) == 0
    resumed, expected = run_summary(cut), run_summary(straight)
    assert resumed["status"] == "completed"
    keys = [k for k in expected if k.startswith(("test/", "train/loss", "train/accuracy"))]
    assert {k: resumed[k] for k in keys} == {k: expected[k] for k in keys}
    lines = (config_run_dir(cut) / "metrics.jsonl").read_text().splitlines()
    steps_logged = [json.loads(line)["step"] for line in lines]
    assert steps_logged == sorted(steps_logged), "a resumed run must not log a step twice"


def test_a_non_finite_loss_fails_the_run_and_keeps_the_last_good_checkpoint(tiny, monkeypatch):
    end_epoch = train.Loop.end_epoch

    def diverge_after_first_epoch(self):
        end_epoch(self)
        params = jax.tree.map(lambda x: x * jnp.nan, self.trainer.state.params)
        self.trainer.state = self.trainer.state._replace(params=params)

    monkeypatch.setattr(train.Loop, "end_epoch", diverge_after_first_epoch)
    config = tiny.replace(name="nan")
    assert train.fit(config) == train.EXIT_FAILED
    summary = run_summary(config)
    assert summary["status"] == "failed"
    assert "non-finite at step 9" in summary["message"] and "--lr" in summary["message"]
    checkpoints = Checkpoints(config_run_dir(config) / "checkpoints")
    assert checkpoints.latest_step("last") == 8  # the end of epoch 1, before the divergence
    built = steps.build(config, MNIST, total_steps=16)
    template = {"state": built.init_state, "sums": steps.Sums.zeros()}
    restored, meta = checkpoints.restore("last", template)
    assert meta["step"] == 8
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["state"]))


def test_resuming_a_run_without_a_checkpoint_keeps_why_it_stopped(tiny):
    from mnist_jax.errors import UserError

    config = tiny.replace(name="diverged", optimizer="sgd", schedule="constant", lr=1e12)
    assert train.fit(config) == train.EXIT_FAILED  # non-finite before the first epoch's end
    before = (config_run_dir(config) / "summary.json").read_text()
    assert "non-finite" in json.loads(before)["message"]
    with pytest.raises(UserError, match="no checkpoint to resume from"):
        train.resume(config_run_dir(config), {})
    assert (config_run_dir(config) / "summary.json").read_text() == before


def test_a_run_longer_than_the_step_counter_is_refused_before_it_exists():
    from mnist_jax.errors import UserError

    config = Config(batch_size=128, epochs=10**8)  # 468 steps an epoch: 4.68e10 steps
    with pytest.raises(UserError, match="468 steps is 46,800,000,000 steps, more than"):
        train.require_trainable(config, 60_000)
    train.require_trainable(config.replace(epochs=4_000_000), 60_000)  # 1.87e9 < 2**31


def test_resume_refuses_a_completed_run_and_changed_hyperparameters(tiny):
    from mnist_jax.errors import UserError

    config = tiny.replace(name="done", epochs=1)
    assert train.fit(config) == 0
    with pytest.raises(UserError, match="already completed"):
        train.resume(config_run_dir(config), {})
    with pytest.raises(UserError, match="drop lr"):
        train.resume(config_run_dir(config), {"lr": 0.1})


def test_a_run_directory_is_never_overwritten(tiny):
    from mnist_jax.errors import UserError

    config = tiny.replace(name="once", epochs=1)
    assert train.fit(config) == 0
    before = (config_run_dir(config) / "summary.json").read_text()
    with pytest.raises(UserError, match="already exists"):
        train.fit(config)
    assert (config_run_dir(config) / "summary.json").read_text() == before


def test_a_checkpoint_saved_as_a_copy_restores_like_one_saved_twice(tmp_path, mnist):
    """`same_as`: the last checkpoint copied from the best one of the same step restores the
    same arrays with its own meta, replaces the older last step, owns its files (damage to one
    kind's files leaves the other whole) and outlives the next best step."""
    built = steps.build(Config(conv_features=(4,), dense_features=8), MNIST, 10)
    train_step = jax.jit(built.train_step)
    state, _ = train_step(built.init_state, first_batch(mnist, 16), steps.step_key(0, 0))
    template = {"state": built.init_state, "epoch_sums": steps.TrainSums.zeros()}
    payload = {"state": state, "epoch_sums": steps.TrainSums.zeros()}
    checkpoints = Checkpoints(tmp_path)
    checkpoints.save("last", 1, template, {"step": 1})
    checkpoints.save("best", 2, payload, {"step": 2, "kind": "best"})
    path = checkpoints.save("last", 2, payload, {"step": 2, "kind": "last"}, same_as="best")
    assert path == tmp_path / "last" / "2"
    assert checkpoints.latest_step("last") == 2
    assert sorted(p.name for p in (tmp_path / "last").iterdir()) == ["2"]
    restored, meta = checkpoints.restore("last", template)
    assert meta == {"step": 2, "kind": "last"}
    for a, b in zip(jax.tree.leaves(payload), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    best_files = {
        p.relative_to(tmp_path / "best" / "2")
        for p in (tmp_path / "best" / "2").rglob("*")
        if p.is_file()
    }
    last_files = {p.relative_to(path) for p in path.rglob("*") if p.is_file()}
    assert best_files == last_files
    for name in best_files:
        assert (path / name).stat().st_ino != (tmp_path / "best" / "2" / name).stat().st_ino
    # A later best step replaces best/2; the copy stays whole, also for a new manager.
    later, _ = train_step(state, first_batch(mnist, 16), steps.step_key(0, 1))
    checkpoints.save("best", 3, {"state": later, "epoch_sums": steps.TrainSums.zeros()}, {})
    checkpoints.close()
    reopened = Checkpoints(tmp_path, read_only=True)
    assert (reopened.latest_step("best"), reopened.latest_step("last")) == (3, 2)
    again, _ = reopened.restore("last", template)
    for a, b in zip(jax.tree.leaves(payload), jax.tree.leaves(again), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_round_trip_restores_every_array(tmp_path, mnist):
    built = steps.build(Config(conv_features=(4,), dense_features=8, norm="batch"), MNIST, 10)
    state, _ = jax.jit(built.train_step)(
        built.init_state, first_batch(mnist, 16), steps.step_key(0, 0)
    )
    checkpoints = Checkpoints(tmp_path)
    payload = {"state": state, "epoch_sums": steps.TrainSums.zeros()}
    checkpoints.save("last", 1, payload, {"step": 1})
    restored, meta = checkpoints.restore(
        "last", {"state": built.init_state, "epoch_sums": steps.TrainSums.zeros()}
    )
    assert meta == {"step": 1}
    for a, b in zip(jax.tree.leaves(payload), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def expected_lr(schedule: str, lr: float, warmup: int, total: int, step: int) -> float:
    """The documented schedules, written out: a linear warmup from `init` to `lr`, then (cosine,
    onecycle) a half cosine down to `end` at the run's last step, or at the step after the
    warmup where the warmup takes the whole run."""
    if schedule == "constant":
        return lr * (min(step / warmup, 1.0) if warmup else 1.0)
    init, end = (1 / 25, 1 / 25e4) if schedule == "onecycle" else (0.0, 0.0)
    if step < warmup:
        return lr * (init + (1 - init) * step / warmup)
    decay = max(total, warmup + 1) - warmup
    t = min(step - warmup, decay)
    return lr * (end + (1 - end) * 0.5 * (1 + np.cos(np.pi * t / decay)))


@pytest.mark.parametrize("schedule", ["constant", "cosine", "onecycle"])
@pytest.mark.parametrize(
    ("total", "warmup"),
    # total 1: the one-step build that sizes a checkpoint; warmups up to and past the run
    [(20, -1), (20, 0), (20, 1), (20, 5), (20, 19), (20, 20), (20, 50), (1, 1), (1, 3)],
)
def test_learning_rate_schedules_match_their_formulas(schedule, total, warmup):
    config = Config(schedule=schedule, warmup_steps=warmup, lr=0.3)
    used = steps.warmup_steps(config, total)
    assert used == (min(warmup, total) if warmup >= 0 else (total // 10) * (schedule == "onecycle"))
    rate = steps.make_schedule(config, total)
    got = [float(rate(jnp.asarray(s), config.lr)) for s in range(total + 3)]
    want = [expected_lr(schedule, config.lr, used, total, s) for s in range(total + 3)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert max(got) <= config.lr * (1 + 1e-6) and min(got) >= 0


@pytest.mark.parametrize(
    "changes",
    [
        {"optimizer": "sgd", "lr": 0.2, "schedule": "constant"},
        {"optimizer": "momentum", "lr": 0.05, "schedule": "cosine", "weight_decay": 1e-4},
        {"optimizer": "adamw", "weight_decay": 1e-2, "grad_clip": 1.0, "label_smoothing": 0.1},
        {"norm": "batch", "dropout": 0.3},
        {"norm": "layer", "schedule": "constant", "warmup_steps": 4},
        {"schedule": "cosine", "warmup_steps": 1},
        # fast.toml's model, its first block a matrix product on every backend
        {
            "conv_kernels": (5, 3),
            "conv_padding": "valid",
            "pool": "max",
            "pool_first": True,
            "stem": "matmul",
            "optimizer": "adam",
            "momentum": 0.7,
            "beta2": 0.9,
        },
    ],
)
def test_every_optimizer_schedule_and_model_option_trains(tiny, changes):
    config = tiny.replace(name="options", **changes)
    assert train.fit(config) == 0
    summary = run_summary(config)
    assert summary["test/accuracy"] > 0.3  # far above the 0.1 of guessing, after 16 steps


def test_an_unexpected_error_is_recorded_before_it_propagates(tiny, monkeypatch):
    def broken(self):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(train.Loop, "end_epoch", broken)
    config = tiny.replace(name="broken", epochs=1)
    with pytest.raises(RuntimeError, match="disk on fire"):
        train.fit(config)
    summary = run_summary(config)
    assert summary["status"] == "failed" and "disk on fire" in summary["message"]


def test_resume_after_the_final_checkpoint_completes_the_record(tiny):
    """A run killed after its last checkpoint but before the end: resume only writes the end."""
    tiny = tiny.replace(deterministic=True)  # bit identity is promised in deterministic mode
    straight = tiny.replace(name="whole")
    assert train.fit(straight) == 0
    killed = tiny.replace(name="killed")
    assert train.fit(killed) == 0
    run = config_run_dir(killed)
    (run / "predictions.npz").unlink()
    summary = run_summary(killed)
    (run / "summary.json").write_text(json.dumps({**summary, "status": "running"}))
    assert train.resume(run, {}) == 0
    resumed, expected = run_summary(killed), run_summary(straight)
    assert resumed["status"] == "completed"
    keys = [k for k in expected if k.startswith("test/")]
    assert {k: resumed[k] for k in keys} == {k: expected[k] for k in keys}
    np.testing.assert_array_equal(
        np.load(run / "predictions.npz")["probs"],
        np.load(config_run_dir(straight) / "predictions.npz")["probs"],
    )


def test_an_eval_batch_larger_than_the_split_is_not_padded_up(mnist):
    split = steps.eval_data(mnist.test.images[:30], mnist.test.labels[:30], batch_size=100_000)
    assert split.images_KxBxHxW.shape[:2] == (1, 30) and bool(split.mask_KxB.all())


def test_beta2_is_adams_second_moment_decay(mnist):
    """The default beta2 is optax's 0.999 (the golden values above). Adam's first update is
    sign-like whatever beta2 is (bias correction), so another beta2 shows from the second
    update on: in the loss of the third step."""
    batch = first_batch(mnist)

    def losses(config: Config) -> list[float]:
        built = steps.build(config, mnist.spec, total_steps=100)
        step, state, out = jax.jit(built.train_step), built.init_state, []
        for i in range(3):
            state, metrics = step(state, batch, steps.step_key(0, i))
            out.append(float(metrics["loss"]))
        return out

    default = losses(Config())
    assert losses(Config(beta2=0.999)) == default
    assert default[:2] == pytest.approx([GOLDEN_LOSS_STEP_1, GOLDEN_LOSS_STEP_2], abs=1e-5)
    other = losses(Config(beta2=0.9))
    assert other[:2] == pytest.approx(default[:2], abs=1e-6)
    assert abs(other[2] - default[2]) > 1e-4
