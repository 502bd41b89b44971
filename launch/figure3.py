"""The paper's Figure 3 from run folders: train and dev loss of the Lo and Hi languages
against updates, one line per arm (mean over its seeds, band over seeds), the table of
each arm's dev minimum, and (--alpha-out) CATS' alpha per language over seeds
(details: cats_ds/reports/figure3.py; docs/figures.md).

    python launch/figure3.py --arm T=1:runs/t1-s1,runs/t1-s2 --arm T=5:runs/t5-s1,runs/t5-s2 \
        --arm CATS:runs/cats-s1,runs/cats-s2 --out results/figure3.png --json results/figure3.json \
        --alpha-out results/cats_alpha.png

Same as the `cats-figure3` command.
"""

from cats_ds.cli import figure3_main

if __name__ == "__main__":
    figure3_main()
