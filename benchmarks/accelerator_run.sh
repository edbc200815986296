#!/usr/bin/env bash
# Everything a session on a GPU/TPU machine measures, in one run, each step under its own
# timeout so that one slow step cannot eat the others' time:
#
#   bash benchmarks/accelerator_run.sh OUT_DIR [DATA_DIR]
#
# OUT_DIR receives steps.txt (devices, versions, each step's exit status and seconds),
# suite.txt (the quick tests), speed.txt / speed.json (bench_speed: Trainer vs the Flax-style
# loop; fast.toml's and fast_gpu.toml's 3 seeds, each cold and warm; evaluation), flags.txt /
# flags.json (bench_flags: fast_gpu.toml under the backend's candidate XLA flags, cold and
# warm), sweep.txt / sweep.json (bench_sweep on full MNIST): 8 files. DATA_DIR (or
# $MNIST_JAX_DATA_DIR) holds the four MNIST IDX files. Scale the steps with the variables
# below; the defaults add up to at most 9.2 minutes.
set -u
out=${1:?usage: bash benchmarks/accelerator_run.sh OUT_DIR [DATA_DIR]}
data=${2:-${MNIST_JAX_DATA_DIR:?give DATA_DIR or set MNIST_JAX_DATA_DIR}}
export MNIST_JAX_DATA_DIR=$data WANDB_MODE=offline WANDB_SILENT=true
SUITE_S=${SUITE_S:-90} SPEED_S=${SPEED_S:-220} FLAGS_S=${FLAGS_S:-130} SWEEP_S=${SWEEP_S:-80}
mkdir -p "$out"
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here" || exit 1
# The checkout, importable by the benchmark scripts where mnist-jax is not installed.
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"

step() {  # step NAME SECONDS COMMAND...: runs it, keeps its output and exit status
  local name=$1 seconds=$2
  shift 2
  echo "== $name (at most ${seconds}s): $*"
  local t0=$SECONDS
  # SIGINT: pytest still prints its summary (what failed so far), Python unwinds and closes files.
  timeout -s INT --kill-after=10 "$seconds" "$@" >"$out/$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/steps.txt"
  tail -n 25 "$out/$name.txt"
  echo
}

result() {  # result NAME: the benchmark's JSON, only when this run wrote it
  rm -f "benchmarks/results/$1.json"
}

timeout 30 python3 -c "import jax, flax, optax, platform; print(platform.node(), jax.devices(), \
jax.__version__, flax.__version__, optax.__version__)" >"$out/steps.txt" 2>&1
cat "$out/steps.txt"
# The quick tests on a worker per two cores (at most 8) where pytest-xdist is installed, each
# taking GPU memory as it needs it (JAX's default, 75% of the card per process, leaves the
# second worker none).
workers=()
n=$(($(nproc) / 2)); n=$((n > 8 ? 8 : n))
if ((n > 1)) && python3 -c "import xdist" 2>/dev/null; then workers=(-n "$n"); fi
XLA_PYTHON_CLIENT_PREALLOCATE=false step suite "$SUITE_S" python3 -m pytest -q -m "not slow" \
  -p no:cacheprovider ${workers[@]+"${workers[@]}"}
result speed
step speed "$SPEED_S" python3 benchmarks/bench_speed.py --data-dir "$data" \
  --recipe experiments/fast.toml --recipe experiments/fast_gpu.toml
cp benchmarks/results/speed.json "$out/" 2>/dev/null
result flags
step flags "$FLAGS_S" python3 benchmarks/bench_flags.py -- --config experiments/fast_gpu.toml \
  --data-dir "$data"
cp benchmarks/results/flags.json "$out/" 2>/dev/null
result sweep
step sweep "$SWEEP_S" python3 benchmarks/bench_sweep.py --train-examples 60000 --test-examples 10000
cp benchmarks/results/sweep.json "$out/" 2>/dev/null
exit 0
