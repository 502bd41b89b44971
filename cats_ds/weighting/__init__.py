"""Task weighting: static temperature, CATS, GradNorm, MGDA and the Gram-space methods
(gramspace.py) behind one interface (base.py).

`make_weighting` turns weighting.method into an instance; base.py knows none of its
subclasses.
"""

from __future__ import annotations

from typing import Optional

from cats_ds.weighting.base import TemperatureWeighting, Weighting, WeightingError

__all__ = ["TemperatureWeighting", "Weighting", "WeightingError", "make_weighting"]


def make_weighting(cfg, languages: list[str], vocab_size: Optional[int] = None) -> Weighting:
    """cfg.weighting.method -> instance. A plain dict, no registry. vocab_size: GradNorm's
    L_n(0) = log V for languages not in the first meta batch."""
    from cats_ds.weighting.cats import CatsWeighting
    from cats_ds.weighting.gradnorm import GradNormWeighting
    from cats_ds.weighting.gramspace import (CagradWeighting, GradVacWeighting, ImtlWeighting, NashMtlWeighting,
                                             PCGradWeighting)
    from cats_ds.weighting.mgda import MgdaWeighting

    c = cfg.cats
    builders = {
        "temperature": lambda: TemperatureWeighting(languages),
        "cats": lambda: CatsWeighting(languages, c),
        "gradnorm": lambda: GradNormWeighting(languages, cfg.gradnorm, c.meta_every, vocab_size, c.weight_by),
        "mgda": lambda: MgdaWeighting(languages, cfg.mgda, c.meta_every, c.weight_by),
        "pcgrad": lambda: PCGradWeighting(languages, c.meta_every, c.weight_by, cfg.train.seed),
        "gradvac": lambda: GradVacWeighting(languages, cfg.gradvac, c.meta_every, c.weight_by, cfg.train.seed),
        "cagrad": lambda: CagradWeighting(languages, cfg.cagrad, c.meta_every, c.weight_by),
        "nashmtl": lambda: NashMtlWeighting(languages, cfg.nashmtl, c.meta_every, c.weight_by),
        "imtl": lambda: ImtlWeighting(languages, c.meta_every, c.weight_by),
    }
    return builders[cfg.weighting.method]()
