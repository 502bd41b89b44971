"""BLEU of several evaluated runs side by side (per language, Lo/Mid/Hi/All).

    python launch/compare.py T1=runs/exp/t1/eval T5=runs/exp/t5/eval CATS=runs/exp/cats/eval \
        --out runs/exp/bleu.md
"""

from cats_ds.cli import compare_main

if __name__ == "__main__":
    compare_main()
