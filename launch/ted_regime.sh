#!/usr/bin/env bash
# The weighting comparison in the paper's regime: gettext8-TED (launch/recipes/gettext8_ted.yaml,
# Hi:Lo about 40:1, Lo test sets of 500), where upsampling overfits the low-resource languages.
# Comparisons named before the runs (docs/results/ted_regime.md):
#   primary   (SEEDS, default 3): CATS (curvature objective, T = inf start, plain Gram) vs T = 5
#             and vs T = inf
#   secondary (SEEDS2, default 2): T = 1; CATS with the split Gram; CATS with loss_term ascent;
#             T = inf distinct (CATS' alpha = 1 reference); GradNorm and GradVac (the best Gram-space
#             method on gettext8, docs/results/gramspace_gettext8.md) on the split Gram
# Every run trains UPDATES updates on NPROC CPU ranks (valid every 100; best checkpoint by dev
# loss), is evaluated on the test split (beam 5, raw references, EVAL_LIMIT hash-ordered
# sentences per language), and compare.py tests the arms with a hierarchical bootstrap over
# seeds and sentences (macro-averaged groups, stratified by language, Holm).
#
#   bash launch/ted_regime.sh primary | secondary | all | compare
#   DRY_RUN=1 bash launch/ted_regime.sh all     # print the commands only
#
# Env: SEEDS (3), SEEDS2 (2), UPDATES (1000), NPROC (2), EVAL_LIMIT (300), OUT (runs/ted),
# ONLY (arm names to run, e.g. "t5 tinf"; the others are only listed for compare), DS_CONFIG,
# DRY_RUN (0), KEEP (none). Resumable like launch/gettext8_experiments.sh: a finished run is
# skipped, an unfinished one continues, a run is re-evaluated only when its best checkpoint
# is newer than its evaluation.
# KEEP=DIR keeps what the comparison and Figure 3 read of each evaluated run, small enough to
# commit: DIR/<arm>-s<seed>/{config.yaml, train_log.jsonl, eval/} (no checkpoints). A run whose
# folder is gone but whose kept copy has the same train.max_updates counts as done, and
# compare reads the kept evaluation: seeds run on different machines or sessions add up.
set -euo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-all}
SEEDS=${SEEDS:-3}
SEEDS2=${SEEDS2:-2}
UPDATES=${UPDATES:-1000}
NPROC=${NPROC:-2}
EVAL_LIMIT=${EVAL_LIMIT:-300}
OUT=${OUT:-runs/ted}
DS_CONFIG=${DS_CONFIG:-ds_configs/cpu_zero2.json}
DRY_RUN=${DRY_RUN:-0}
KEEP=${KEEP:-}
RECIPE=launch/recipes/gettext8_ted.yaml
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
case "$WHAT" in primary|secondary|all|compare) ;;
  *) echo "error: unknown set '$WHAT' (primary, secondary, all or compare)" >&2; exit 2;; esac
for v in SEEDS SEEDS2 UPDATES; do
  if ! [[ "${!v}" =~ ^[1-9][0-9]*$ ]]; then echo "error: $v=${!v} must be a positive integer" >&2; exit 2; fi
done

do_cmd() {  # print, and run unless DRY_RUN=1
  echo "+ $*"
  [ "$DRY_RUN" = 1 ] || "$@"
}

finished() {  # save_dir: its latest checkpoint has reached UPDATES
  [ -f "$1/latest/cats_ds.json" ] && python -c "import json, sys; \
sys.exit(json.load(open('$1/latest/cats_ds.json'))['step'] < $UPDATES)"
}

kept() {  # name: KEEP/name holds a run of this budget (its folder may be gone)
  [ -n "$KEEP" ] && [ -f "$KEEP/$1/eval/bleu.json" ] && grep -qx "  max_updates: $UPDATES" "$KEEP/$1/config.yaml"
}

keep() {  # run folder, name: copy its config, log and evaluation to KEEP/name (when newer)
  local dir=$1 to="$KEEP/$2"
  [ -n "$KEEP" ] && [ -f "$dir/eval/best-test/bleu.json" ] || return 0
  [ -f "$to/eval/bleu.json" ] && ! [ "$dir/eval/best-test/bleu.json" -nt "$to/eval/bleu.json" ] && return 0
  do_cmd mkdir -p "$to"
  do_cmd cp "$dir/config.yaml" "$dir/train_log.jsonl" "$to/"
  do_cmd rm -rf "$to/eval"
  do_cmd cp -r "$dir/eval/best-test" "$to/eval"
}

run() {  # arm, seeds, overrides...: train and evaluate each seed; DIRS = the evaluation folders
  local arm=$1 seeds=$2; shift 2
  DIRS=""
  for seed in $(seq 1 "$seeds"); do
    local dir="$OUT/$arm-s$seed"
    if [ ! -d "$dir" ] && kept "$arm-s$seed"; then
      echo "| $arm seed $seed: kept in $KEEP/$arm-s$seed (run folder not here)"
      DIRS="${DIRS:+$DIRS,}$KEEP/$arm-s$seed/eval"
      continue
    fi
    if [ "$WHAT" != compare ] && { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $arm "* ]]; }; then
      if finished "$dir"; then
        echo "| $arm seed $seed: finished ($dir)"
      else
        do_cmd deepspeed --num_gpus "$NPROC" launch/train.py --deepspeed_config "$DS_CONFIG" --config "$RECIPE" \
          train.save_dir="$dir" train.seed="$seed" train.resume=auto train.max_updates="$UPDATES" \
          train.max_minutes=null train.valid_every=100 "$@"
      fi
      local eval_dir="$dir/eval/best-test"
      if [ ! -f "$eval_dir/bleu.json" ] || [ "$dir/best/cats_ds.json" -nt "$eval_dir/bleu.json" ]; then
        OMP_NUM_THREADS=$NPROC do_cmd python launch/evaluate.py --checkpoint "$dir/best" --split test \
          --limit "$EVAL_LIMIT"
      fi
    fi
    keep "$dir" "$arm-s$seed"
    DIRS="${DIRS:+$DIRS,}$dir/eval/best-test"
  done
}

[ "$WHAT" = compare ] || do_cmd python launch/prepare.py --config "$RECIPE"
# primary arms, interleaved by seed would not save anything on one machine: arm by arm
run t5 "$SEEDS" sampling.temperature=5; T5=$DIRS
run tinf "$SEEDS" sampling.temperature=inf; TINF=$DIRS
run cats "$SEEDS" weighting.method=cats sampling.temperature=inf grads.gram=plain; CATS=$DIRS
ARGS=("T5=$T5" "Tinf=$TINF" "CATS=$CATS")
if [ "$WHAT" = secondary ] || [ "$WHAT" = all ] || [ "$WHAT" = compare ]; then
  run t1 "$SEEDS2" sampling.temperature=1; ARGS+=("T1=$DIRS")
  run cats_split "$SEEDS2" weighting.method=cats sampling.temperature=inf grads.gram=split; ARGS+=("CATS-split=$DIRS")
  run cats_ascent "$SEEDS2" weighting.method=cats sampling.temperature=inf grads.gram=plain cats.loss_term=ascent
  ARGS+=("CATS-ascent=$DIRS")
  run tinf_distinct "$SEEDS2" sampling.temperature=inf sampling.distinct=true; ARGS+=("Tinf-distinct=$DIRS")
  run gradnorm "$SEEDS2" weighting.method=gradnorm sampling.temperature=inf grads.gram=split; ARGS+=("GradNorm=$DIRS")
  run gradvac "$SEEDS2" weighting.method=gradvac sampling.temperature=inf grads.gram=split; ARGS+=("GradVac=$DIRS")
fi
if [ "$WHAT" = compare ] || [ "$WHAT" = all ]; then
  existing=()
  for a in "${ARGS[@]}"; do
    first=${a#*=}; first=${first%%,*}
    if [ -f "$first/bleu.json" ] || [ "$DRY_RUN" = 1 ]; then existing+=("$a"); else echo "| skipped ${a%%=*}: not run"; fi
  done
  do_cmd python launch/compare.py --baseline T5 --primary CATS:T5,CATS:Tinf --out "$OUT/comparison.md" "${existing[@]}"
fi
