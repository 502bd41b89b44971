#!/usr/bin/env bash
# The default job, end to end, on a fresh machine (a CPU is enough):
#   venv + install -> gettext8 corpus from this machine's GNU gettext catalogs -> prepare
#   -> train about 10 minutes on 2 CPU ranks (DeepSpeed ZeRO-2, gloo) -> beam-5 test chrF++ and
#   BLEU against the raw references, next to the copy baseline (the English source as the
#   translation), plus five sample translations.
#
#   bash launch/quickstart.sh
#
# Env knobs: MINUTES (10) training time, NPROC (2) ranks, EVAL_LIMIT (200) test sentences per
# language, VENV (.venv), RUN (runs/gettext8). A plain parallel folder instead of gettext:
#   CORPUS=plain RAW=/path/to/folder LANGS=de,fr bash launch/quickstart.sh
# (files train.en-xx.en / train.en-xx.xx, optional dev.* and test.*; see README).
# Running it again resumes from $RUN/latest, so a finished run only re-evaluates. SIGTERM or
# Ctrl-C while it trains: latest/ saved after the current update, exit 75 ("resume me").
set -euo pipefail
cd "$(dirname "$0")/.."

MINUTES=${MINUTES:-10}
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
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q --upgrade pip
pip install -q torch==2.13.0          # the CPU build; must come before the project
pip install -q -e '.[export]'    # with ctranslate2: launch/export.py, evaluate --backend ctranslate2
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

DATA_ARGS=("data.dir=$DATA" "data.corpus=$CORPUS" "data.raw=$RAW" "data.languages=[$LANGS]")

echo "== 3/5 prepare -> $DATA"
python launch/prepare.py --config "$RECIPE" "${DATA_ARGS[@]}"

echo "== 4/5 train ~$MINUTES minutes on $NPROC ranks -> $RUN"
# launch/supervise.py: exit 75 when the ranks stopped with $RUN/latest saved (SIGTERM/Ctrl-C to
# this script, which passes it on; deepspeed or its launch process killed), non-zero on any failure
python launch/supervise.py deepspeed --num_gpus "$NPROC" launch/train.py --deepspeed_config ds_configs/cpu_zero2.json \
  --config "$RECIPE" "${DATA_ARGS[@]}" "train.save_dir=$RUN" "train.max_minutes=$MINUTES" &
train_pid=$!
trap 'kill -TERM "$train_pid" 2>/dev/null' TERM INT
rc=0
wait "$train_pid" || rc=$?
while kill -0 "$train_pid" 2>/dev/null; do  # a trapped signal ends `wait` early: wait for the save
  rc=0
  wait "$train_pid" || rc=$?
done
trap - TERM INT
if [ "$rc" -eq 75 ]; then
  echo "Training stopped with $RUN/latest saved; run the quickstart again to resume it." >&2
  exit 75
fi
[ "$rc" -eq 0 ] || exit "$rc"

echo "== 5/5 evaluate $RUN/best on test (first $EVAL_LIMIT sentences per language; model vs copy baseline)"
python launch/evaluate.py --checkpoint "$RUN/best" --split test --limit "$EVAL_LIMIT" --samples 5
echo "Results: $RUN/eval/best-test (bleu.json, bleu.md, hyp/ref/src files)"
echo "TensorBoard: tensorboard --logdir $RUN/tensorboard"
