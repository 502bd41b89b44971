"""Evaluate a checkpoint: beam search per language; BLEU and chrF++ against the raw
references, the copy baseline (English source as the translation), Lo/Mid/Hi/All table.

    python launch/evaluate.py --checkpoint runs/gettext8/best                      # test split, beam 5
    python launch/evaluate.py --checkpoint runs/gettext8/best --split dev --limit 100 eval.beam=1
    python launch/evaluate.py --checkpoint runs/gettext8/best --backend ctranslate2   # a cached CTranslate2 export
    python launch/evaluate.py --checkpoint runs/opus100/best --languages de,af,kk \
        eval.lenpen=0.6 eval.batch_tokens=4000 --out results/opus100-test

One CPU process (no deepspeed launcher). Only eval.* settings can be overridden. Results go
to <save_dir>/eval/<checkpoint name>-<split>/ (runs/gettext8/eval/best-test/ above; outside
best/ and latest/, which training replaces whole) unless --out is given: bleu.json, bleu.md,
hyp.en-xx.txt, ref.en-xx.txt and src.en-xx.txt. --samples N prints N sample translations.
Same as the `cats-evaluate` command.
"""

from cats_ds.cli import evaluate_script

if __name__ == "__main__":
    evaluate_script()
