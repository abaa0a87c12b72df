#!/usr/bin/env bash
# The GPU checks and benchmarks, in one run on a machine with a CUDA GPU (docs/benchmarks.md,
# section "GPU"). Uses the machine's python3 with torch and transformers, and the source tree
# as it is (no install); each step has its own time limit and log, and a failed step does not
# stop the others; SKIP="tests smoke" leaves steps out. Results: $OUT/gpu-results.tar.gz (logs, bench and cost-curve folders).
set -u
OUT=${OUT:-runs/gpu}
WORK=$(mktemp -d)
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 SPECDEC_CPU_KERNELS=0 MPLBACKEND=Agg
PY=${PYTHON:-python3}
METHODS=hf,hf-assisted,plain,draft@1,draft,adaptive,ngram,hybrid,staged,early-exit,medusa,eagle

step() {  # step NAME SECONDS COMMAND...: run with a time limit, keep the log, show its end
  local name=$1 limit=$2
  shift 2
  case " ${SKIP:-} " in *" $name "*) echo "== $name: skipped (SKIP)"; return ;; esac
  echo "== $name: start $(date +%T)"
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  echo "== $name: rc=$? end $(date +%T)"
  tail -n "${TAIL:-20}" "$WORK/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
$PY -c "import torch, transformers, sys; print(sys.version.split()[0], torch.__version__, transformers.__version__)"
step tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py \
    "tests/test_serving_engine.py::test_demo_pair_in_a_batch_equals_plain_greedy"
step smoke 100 $PY scripts/gpu_smoke.py
step bench 200 $PY -m specdec.cli bench --device cuda --dtype float32 --num-prompts 3 --runs 2 \
  --methods "$METHODS" --no-progress --out "$WORK/bench"
step cost 100 $PY -m specdec.cli bench --cost-curve --device cuda --sizes 100M,300M,700M \
  --dtypes bfloat16,float32 --ks 1-8,12,16,24,32 --repeats 5 --no-progress --out "$WORK/cost"
step eager 90 env SPECDEC_CUDA_GRAPHS=0 $PY -m specdec.cli bench --device cuda --dtype float32 \
  --num-prompts 3 --runs 2 --methods plain,draft,ngram,eagle --no-progress --out "$WORK/bench-eager"
step bf16 100 $PY -m specdec.cli bench --device cuda --dtype bfloat16 --num-prompts 2 --runs 2 \
  --methods hf,hf-assisted,plain,draft,ngram,eagle --no-progress --out "$WORK/bench-bf16"
# A memory-bound stand-in on the GPU: the demo target padded to 1.2B parameters (same outputs).
step widen 40 $PY -m specdec.bench.widen --out "$WORK/wide-target" --intermediate-size 262144
step wide 160 $PY -m specdec.cli bench --target "$WORK/wide-target" --device cuda --dtype float32 \
  --num-prompts 1 --runs 2 --methods hf,hf-assisted,plain,draft@1,draft,ngram,eagle,medusa --no-progress \
  --out "$WORK/bench-wide"
tar czf "$OUT/gpu-results.tar.gz" --exclude=wide-target -C "$WORK" .
for f in bench/bench.md cost/cost_curve.md bench-eager/bench.md bench-bf16/bench.md bench-wide/bench.md; do
  echo "== $f"
  head -c 2500 "$WORK/$f" 2>/dev/null
done
