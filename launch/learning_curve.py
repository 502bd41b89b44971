"""A run's learning curve: test chrF++ / BLEU per language group (copy baseline dashed)
and dev loss against minutes and updates, from the step_<n>/ checkpoints of a run trained
with train.save_every=N (details: cats_ds/reports/curve.py).

    python launch/learning_curve.py --run runs/lc --evaluate --limit 200 --minutes 10,30,60
"""

from cats_ds.cli import curve_main

if __name__ == "__main__":
    curve_main()
