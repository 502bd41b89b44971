#!/usr/bin/env bash
# The gettext8 comparisons behind the closing notes: every run trains the same number of
# updates (UPDATES) from the gettext8 recipe on NPROC CPU ranks, is evaluated on the test
# split (beam 5, first EVAL_LIMIT sentences per language), and the BLEU tables are put
# side by side.
#
#   bash launch/gettext8_experiments.sh weighting   # T=1, T=5, T=inf, CATS (loss term on/off)
#   bash launch/gettext8_experiments.sh experts     # dense, Table 1 rows, LayerNorm w/o gain+bias
#   bash launch/gettext8_experiments.sh all
#
# Env: UPDATES (300), NPROC (2), EVAL_LIMIT (500), OUT (runs/exp), DS_CONFIG. Finished runs
# are skipped (train.resume=auto stops at once) and re-evaluated only if their eval is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
WHAT=${1:-all}
UPDATES=${UPDATES:-300}
NPROC=${NPROC:-2}
EVAL_LIMIT=${EVAL_LIMIT:-500}
OUT=${OUT:-runs/exp}
DS_CONFIG=${DS_CONFIG:-ds_configs/cpu_zero2.json}
RECIPE=launch/recipes/gettext8.yaml
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

python launch/prepare.py --config "$RECIPE"

run() {  # name, overrides...
  local name=$1; shift
  echo "| $name: $*"
  deepspeed --num_gpus "$NPROC" launch/train.py --deepspeed_config "$DS_CONFIG" --config "$RECIPE" \
    train.save_dir="$OUT/$name" train.max_updates="$UPDATES" train.max_minutes=null train.valid_every=100 "$@"
  [ -f "$OUT/$name/eval/bleu.json" ] || \
    python launch/evaluate.py --checkpoint "$OUT/$name/best" --split test --limit "$EVAL_LIMIT" --out "$OUT/$name/eval"
}

if [ "$WHAT" = weighting ] || [ "$WHAT" = all ]; then
  run t1 sampling.temperature=1
  run t5 sampling.temperature=5
  run tinf sampling.temperature=inf
  run cats sampling.temperature=1 weighting.method=cats cats.loss_term=true
  run cats_noloss sampling.temperature=1 weighting.method=cats cats.loss_term=false cats.lr_alpha=0.01
  python launch/compare.py "T1=$OUT/t1/eval" "T5=$OUT/t5/eval" "Tinf=$OUT/tinf/eval" \
    "CATS=$OUT/cats/eval" "CATS-noloss=$OUT/cats_noloss/eval" --out "$OUT/bleu_weighting.md"
fi
if [ "$WHAT" = experts ] || [ "$WHAT" = all ]; then
  run t5 sampling.temperature=5
  run x_all sampling.temperature=5 "experts.modules=[ffn,attn,out_embed]"
  run x_noattn sampling.temperature=5 "experts.modules=[ffn,out_embed]"
  run x_noffn sampling.temperature=5 "experts.modules=[attn,out_embed]"
  run x_nooe sampling.temperature=5 "experts.modules=[ffn,attn]"
  run noaffine sampling.temperature=5 model.norm=layernorm_noaffine
  # labels start with "-" (the paper's row names), so they follow "--"
  python launch/compare.py --out "$OUT/bleu_experts.md" -- "dense=$OUT/t5/eval" "All=$OUT/x_all/eval" \
    "-Attn=$OUT/x_noattn/eval" "-FFN=$OUT/x_noffn/eval" "-OE=$OUT/x_nooe/eval" "noaffine=$OUT/noaffine/eval"
fi
