"""chrF++ and BLEU of several evaluated runs side by side (per language, Lo/Mid/Hi/All):
mean ± sd over seeds, the copy baseline, and hierarchical-bootstrap marks (seeds, then
sentences; groups macro-averaged; Holm-adjusted) against a baseline label and for the
comparisons named with --primary (details: cats_ds/reports/compare.py).

    python launch/compare.py --baseline T5 --primary CATS:T5 --out runs/exp/weighting.md \
        T5=runs/exp/t5-s1/eval/best-test,runs/exp/t5-s2/eval/best-test \
        CATS=runs/exp/cats-s1/eval/best-test,runs/exp/cats-s2/eval/best-test
"""

from cats_ds.cli import compare_main

if __name__ == "__main__":
    compare_main()
