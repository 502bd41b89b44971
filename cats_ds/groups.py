"""Resource groups of languages by training pairs (Lo / Mid / Hi), shared by evaluation
(table averages) and analysis (HiLo / LoLo pair types): eval.lo_max, eval.hi_min."""

from __future__ import annotations

GROUPS = ("Lo", "Mid", "Hi")


def group_of(train_pairs: int, lo_max: int, hi_min: int) -> str:
    """Lo: fewer than lo_max training pairs; Hi: at least hi_min; Mid: in between."""
    if train_pairs < lo_max:
        return "Lo"
    return "Hi" if train_pairs >= hi_min else "Mid"
