#!/usr/bin/env bash
# One command for the first hour on a GPU node: do the bf16 paths of cats_ds run here, and
# how fast? About 10 minutes on one GPU:
#
#   bash launch/gpu_check.sh                   # 1 GPU
#   NPROC=8 bash launch/gpu_check.sh           # every GPU of the node
#
# On gettext8 (prepared first if needed), with ds_configs/zero2_bf16.json:
#   dense     UPDATES updates, dev translation on, tokens/s
#   cats      the same with weighting.method=cats (meta steps every meta.every)
#   experts   the same with family experts on every module (experts.ep_size=EP)
#   resume    the dense run continued for RESUME_UPDATES more updates from its latest/
#   evaluate  the dense best/ decoded on DEVICE in fp32 and in bf16 (beam 5, EVAL_LIMIT
#             sentences per language): chrF++ of both and the share of identical hypotheses
#   bench     `python -m cats_ds.bench train` on NPROC ranks: tokens/s, full/bare, model
#             FLOPs utilisation (peak from the GPU's name, or PEAK_TFLOPS)
# then a pass/fail table; the exit status is the number of failed paths. Each path's output
# is in $OUT/<path>.log.
#
# Knobs (environment): NPROC (1), UPDATES (100), RESUME_UPDATES (20), EP (1), EVAL_LIMIT (100),
# MAX_TOKENS (4000 tokens per rank and micro-batch: the CPU recipe's 1000 leaves a GPU idle),
# DEVICE (cuda), DS_CONFIG (ds_configs/zero2_bf16.json), RECIPE (launch/recipes/gettext8.yaml),
# FAMILIES (default), OUT (runs/gpu_check/<date-time>), BENCH_STEPS (8), BENCH_ROUNDS (2),
# EXTRA (more section.key=value overrides for every run, space-separated), MASTER_PORT (the
# launcher's rendezvous port; default: a free one, so that a training already on 29500 does
# not collide).
# The test suite runs it on the CPU accelerator with a tiny recipe (tests/test_gpu_check.py):
#   DEVICE=cpu DS_ACCELERATOR=cpu NPROC=2 UPDATES=4 RECIPE=tiny.yaml bash launch/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

NPROC=${NPROC:-1}
UPDATES=${UPDATES:-100}
RESUME_UPDATES=${RESUME_UPDATES:-20}
EP=${EP:-1}
EVAL_LIMIT=${EVAL_LIMIT:-100}
MAX_TOKENS=${MAX_TOKENS:-4000}
DEVICE=${DEVICE:-cuda}
DS_CONFIG=${DS_CONFIG:-ds_configs/zero2_bf16.json}
RECIPE=${RECIPE:-launch/recipes/gettext8.yaml}
FAMILIES=${FAMILIES:-default}
OUT=${OUT:-runs/gpu_check/$(date +%Y%m%d-%H%M%S)}
BENCH_STEPS=${BENCH_STEPS:-8}
BENCH_ROUNDS=${BENCH_ROUNDS:-2}
read -r -a EXTRA_ARGS <<< "train.max_tokens=$MAX_TOKENS ${EXTRA:-}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
  echo "error: OUT=$OUT exists and is not empty; choose another OUT (each check starts fresh)" >&2
  exit 2
fi
mkdir -p "$OUT"
RESULTS="$OUT/results.tsv"
: > "$RESULTS"
PY=${PYTHON:-python}
MASTER_PORT=${MASTER_PORT:-$("$PY" -c "from cats_ds.runtime.ports import free_port; print(free_port())")}

record() {  # path status seconds
  printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$RESULTS"
  echo "== $1: $2 (${3}s)"
}

step() {  # name command...: run, log to $OUT/name.log, record pass/fail and seconds
  local name=$1; shift
  local t0=$SECONDS
  echo "== $name: $*"
  if "$@" > "$OUT/$name.log" 2>&1; then
    record "$name" PASS $((SECONDS - t0))
  else
    record "$name" "FAIL(exit $?)" $((SECONDS - t0))
    tail -n 25 "$OUT/$name.log" | sed "s/^/   $name| /"
  fi
}

train() {  # save_dir overrides...
  local dir=$1; shift
  deepspeed --num_gpus "$NPROC" --master_port "$MASTER_PORT" launch/train.py --deepspeed_config "$DS_CONFIG" --config "$RECIPE" \
    "train.save_dir=$dir" "train.max_updates=$UPDATES" train.max_minutes=null "train.log_every=$(( UPDATES < 10 ? 1 : 10 ))" \
    "train.valid_every=$UPDATES" "${EXTRA_ARGS[@]}" "$@"
}

echo "== gpu_check: $NPROC rank(s) on $DEVICE, $DS_CONFIG, $RECIPE, $UPDATES updates per path -> $OUT"
step prepare "$PY" launch/prepare.py --config "$RECIPE" "${EXTRA_ARGS[@]}"
step dense train "$OUT/dense" eval.valid_every="$UPDATES" eval.valid_sentences=20
step cats train "$OUT/cats" weighting.method=cats
step experts train "$OUT/experts" "experts.modules=[all]" "experts.families=$FAMILIES" "experts.ep_size=$EP"
step resume train "$OUT/dense" eval.valid_every="$UPDATES" eval.valid_sentences=20 \
  "train.max_updates=$((UPDATES + RESUME_UPDATES))"
for dtype in fp32 bf16; do
  step "evaluate_$dtype" "$PY" launch/evaluate.py --checkpoint "$OUT/dense/best" --device "$DEVICE" --dtype "$dtype" \
    --limit "$EVAL_LIMIT" --out "$OUT/eval_$dtype"
done
step bench "$PY" -m cats_ds.bench train --recipe "$RECIPE" --ds_config "$DS_CONFIG" --ranks "$NPROC" \
  --steps "$BENCH_STEPS" --rounds "$BENCH_ROUNDS" --warmup 2 --json "$OUT/bench_train.json" "${EXTRA_ARGS[@]}"

"$PY" -m cats_ds.bench.gpu_check "$OUT" "$UPDATES" "$RESUME_UPDATES"
