"""Task weighting: static temperature, CATS, GradNorm, MGDA and the Gram-space methods
(gramspace.py) behind one interface (base.py).

Each method's class registers itself under its weighting.method name
(`@register_method`, registry.py); importing the method modules here fills the registry,
and `make_weighting` looks the name up. base.py knows none of its subclasses.
"""

from __future__ import annotations

from typing import Optional

from cats_ds.weighting import cats, gradnorm, gramspace, mgda  # noqa: F401  (they register their methods)
from cats_ds.weighting.base import TemperatureWeighting, Weighting, WeightingError
from cats_ds.weighting.registry import REGISTRY, method_class, register_method

__all__ = ["REGISTRY", "TemperatureWeighting", "Weighting", "WeightingError", "make_weighting", "method_class",
           "register_method"]


def make_weighting(cfg, languages: list[str], vocab_size: Optional[int] = None) -> Weighting:
    """cfg.weighting.method -> instance of its registered class (`from_config`). vocab_size:
    GradNorm's L_n(0) = log V for languages not in the first meta batch."""
    return method_class(cfg.weighting.method).from_config(cfg, languages, vocab_size)
