#!/usr/bin/env bash
# The default job, end to end, on a fresh machine (a CPU is enough):
#   venv + install -> gettext8 corpus from this machine's GNU gettext catalogs -> prepare
#   -> train 1525 updates on 2 CPU ranks (DeepSpeed ZeRO-2, gloo; about 10 minutes on a 2-core
#   machine, longer on a slower one) -> beam-5 test chrF++ and BLEU against the raw references,
#   next to the copy baseline (the English source as the translation), plus five sample
#   translations, then the wall time the training took and the whole job's.
#
#   bash launch/quickstart.sh
#
# Env knobs: UPDATES (1525) training updates, the same on any machine (the README's numbers are
# for 1525); MINUTES (unset) trains for that many minutes instead (train.max_minutes; the update
# cap is then UPDATES if set, else 100000); NPROC (2) ranks, EVAL_LIMIT (200) test sentences per
# language, VENV (.venv), RUN (runs/gettext8), DRY_RUN=1 prints the prepare, train and evaluate
# commands without installing or running anything. A plain parallel folder instead of gettext:
#   CORPUS=plain RAW=/path/to/folder LANGS=de,fr bash launch/quickstart.sh
# (files train.en-xx.en / train.en-xx.xx, optional dev.* and test.*; see docs/data.md).
# Running it again resumes from $RUN/latest, so a finished run only re-evaluates. SIGTERM or
# Ctrl-C while it trains: latest/ saved after the current update, exit 75 ("resume me").
set -euo pipefail
cd "$(dirname "$0")/.."

T0=$(date +%s)
UPDATES_SET=${UPDATES:-}
UPDATES=${UPDATES:-1525}
MINUTES=${MINUTES:-}
DRY_RUN=${DRY_RUN:-0}
NPROC=${NPROC:-2}
EVAL_LIMIT=${EVAL_LIMIT:-200}
VENV=${VENV:-.venv}
CORPUS=${CORPUS:-gettext}
RAW=${RAW:-/usr/share/locale}
LANGS=${LANGS:-de,es,it,uk,af,cy,is,kk}
RUN=${RUN:-runs/gettext8}
DATA=${DATA:-data-bin/gettext8}
[ "$CORPUS" = gettext ] || DATA=${DATA_PLAIN:-data-bin/quickstart-$CORPUS}
RECIPE=launch/recipes/gettext8.yaml
if ! [[ "$UPDATES" =~ ^[1-9][0-9]*$ ]]; then echo "error: UPDATES=$UPDATES must be a positive integer" >&2; exit 2; fi
if [ -n "$MINUTES" ] && ! [[ "$MINUTES" =~ ^[0-9]*\.?[0-9]+$ && "$MINUTES" =~ [1-9] ]]; then
  echo "error: MINUTES=$MINUTES must be a positive number of minutes (or unset: train UPDATES updates)" >&2; exit 2
fi
if [ -n "$MINUTES" ]; then  # a time budget; the update count caps it only when UPDATES was given
  LIMIT_ARGS=("train.max_minutes=$MINUTES" "train.max_updates=${UPDATES_SET:-100000}")
  LIMIT="$MINUTES minutes"
else
  LIMIT_ARGS=("train.max_updates=$UPDATES" "train.max_minutes=null")
  LIMIT="$UPDATES updates"
fi

clock() {  # seconds -> H:MM:SS
  printf '%d:%02d:%02d' $(($1 / 3600)) $(($1 % 3600 / 60)) $(($1 % 60))
}

do_cmd() {  # print, and run unless DRY_RUN=1
  echo "+ $*"
  [ "$DRY_RUN" = 1 ] || "$@"
}

echo "== 1/5 corpus check ($CORPUS at $RAW: $LANGS)"
if [ "$CORPUS" = gettext ]; then
  missing=()
  for lang in ${LANGS//,/ }; do
    compgen -G "$RAW/$lang/LC_MESSAGES/*.mo" >/dev/null || missing+=("$lang")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    cat >&2 <<MSG
This machine has too few gettext catalogs for the quickstart: none for ${missing[*]}
(looked for $RAW/<lang>/LC_MESSAGES/*.mo). Either install more locale data, pick languages
it has (LANGS=fr,de,... bash launch/quickstart.sh; 'ls $RAW' lists them), or point the
quickstart at a plain folder of parallel text:
    my_corpus/train.en-de.en   my_corpus/train.en-de.de     (one sentence per line, UTF-8)
    my_corpus/dev.en-de.en ... my_corpus/test.en-de.de      (optional: else hashed out of train)
    CORPUS=plain RAW=my_corpus LANGS=de,fr bash launch/quickstart.sh
MSG
    exit 1
  fi
fi
echo "== 2/5 environment ($VENV)"
if [ "$DRY_RUN" != 1 ]; then
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  . "$VENV/bin/activate"
  pip install -q --upgrade pip
  pip install -q torch==2.13.0          # the CPU build; must come before the project
  pip install -q -e '.[export]'    # with ctranslate2: launch/export.py, evaluate --backend ctranslate2
fi
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

DATA_ARGS=("data.dir=$DATA" "data.corpus=$CORPUS" "data.raw=$RAW" "data.languages=[$LANGS]")

echo "== 3/5 prepare -> $DATA"
do_cmd python launch/prepare.py --config "$RECIPE" "${DATA_ARGS[@]}"

echo "== 4/5 train $LIMIT on $NPROC ranks -> $RUN"
# launch/supervise.py: exit 75 when the ranks stopped with $RUN/latest saved (SIGTERM/Ctrl-C to
# this script, which passes it on; deepspeed or its launch process killed), non-zero on any failure
TRAIN=(python launch/supervise.py deepspeed --num_gpus "$NPROC" launch/train.py --deepspeed_config ds_configs/cpu_zero2.json
  --config "$RECIPE" "${DATA_ARGS[@]}" "train.save_dir=$RUN" "${LIMIT_ARGS[@]}")
echo "+ ${TRAIN[*]}"
T_TRAIN=$(date +%s)
if [ "$DRY_RUN" = 1 ]; then
  true &
else
  "${TRAIN[@]}" &
fi
train_pid=$!
trap 'kill -TERM "$train_pid" 2>/dev/null' TERM INT
rc=0
wait "$train_pid" || rc=$?
while kill -0 "$train_pid" 2>/dev/null; do  # a trapped signal ends `wait` early: wait for the save
  rc=0
  wait "$train_pid" || rc=$?
done
trap - TERM INT
TRAIN_S=$(($(date +%s) - T_TRAIN))
step=$( [ -f "$RUN/latest/cats_ds.json" ] && python3 -c "import json; print(json.load(open('$RUN/latest/cats_ds.json'))['step'])" \
  2>/dev/null || echo "?")
echo "| training wall time: $(clock "$TRAIN_S") ($RUN/latest at update $step)"
if [ "$rc" -eq 75 ]; then
  echo "Training stopped with $RUN/latest saved; run the quickstart again to resume it." >&2
  exit 75
fi
[ "$rc" -eq 0 ] || exit "$rc"

echo "== 5/5 evaluate $RUN/best on test (first $EVAL_LIMIT sentences per language; model vs copy baseline)"
do_cmd python launch/evaluate.py --checkpoint "$RUN/best" --split test --limit "$EVAL_LIMIT" --samples 5
echo "Results: $RUN/eval/best-test (bleu.json, bleu.md, hyp/ref/src files)"
echo "TensorBoard: tensorboard --logdir $RUN/tensorboard"
echo "Wall time: training $(clock "$TRAIN_S"), the whole quickstart $(clock $(($(date +%s) - T0)))"
