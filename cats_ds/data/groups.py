"""Resource groups of languages (Lo / Mid / Hi), shared by evaluation (table averages,
compare's group rows) and analysis (HiLo / LoLo pair types).

Two ways to set them:
  - by name, `eval.groups: {Lo: [aze, bel, glg, slk], Hi: [tur, rus, por, ces]}`: the
    named sets of a benchmark (TED8's Lo/Hi), which a size cut could split differently
    on another corpus. Every evaluated language must be listed under one group; codes
    match exactly, by base language (`pt_BR` -> `pt`) or across ISO 639-1/639-3
    (`tr` = `tur`, cats_ds/data/langcodes.py);
  - by size (the default, when eval.groups is empty): fewer than eval.lo_max training
    pairs Lo, at least eval.hi_min Hi, Mid in between.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

from cats_ds.data.langcodes import base_language, equivalents

GROUPS = ("Lo", "Mid", "Hi")


class GroupError(ValueError):
    """eval.groups is malformed or does not cover a language; the message names it."""


def group_of(train_pairs: int, lo_max: int, hi_min: int) -> str:
    """Lo: fewer than lo_max training pairs; Hi: at least hi_min; Mid: in between."""
    if train_pairs < lo_max:
        return "Lo"
    return "Hi" if train_pairs >= hi_min else "Mid"


def _codes(lang: str) -> list[str]:
    base = base_language(lang)
    return list(dict.fromkeys([lang, base, *equivalents(lang), *equivalents(base)]))


def check_named_groups(groups: Mapping[str, Sequence[str]]) -> None:
    """Group names among Lo/Mid/Hi, each a list of language codes, no language (under any of
    its codes) in two groups."""
    seen: dict[str, str] = {}
    for name, langs in groups.items():
        if name not in GROUPS:
            raise GroupError(f"eval.groups: unknown group {name!r}; groups are {', '.join(GROUPS)}")
        if not isinstance(langs, (list, tuple)) or not all(isinstance(l, str) and l for l in langs):
            raise GroupError(f"eval.groups.{name} must list language codes, got {langs!r}")
        for lang in langs:
            clash = next((c for c in [lang, *equivalents(lang)] if c in seen), None)
            if clash is not None:
                raise GroupError(f"eval.groups: language '{lang}' is in both {seen[clash]} and {name}"
                                 + ("" if clash == lang else f" (as '{clash}')"))
            seen[lang] = name


def named_group(lang: str, groups: Mapping[str, Sequence[str]]) -> Optional[str]:
    """The group `lang` is listed under in `groups` (exactly, by base language or by its
    other ISO 639 code), or None."""
    index = {code: name for name, langs in groups.items() for code in langs}
    return next((index[c] for c in _codes(lang) if c in index), None)


def group_for(lang: str, train_pairs: int, lo_max: int, hi_min: int,
              groups: Optional[Mapping[str, Sequence[str]]] = None) -> str:
    """`lang`'s group: by name when `groups` (eval.groups) is given, else by size."""
    if not groups:
        return group_of(train_pairs, lo_max, hi_min)
    name = named_group(lang, groups)
    if name is None:
        listed = "; ".join(f"{g}: {', '.join(l)}" for g, l in groups.items())
        raise GroupError(f"eval.groups: language '{lang}' is in no group ({listed}); list it under one of "
                         f"{', '.join(GROUPS)}, or leave eval.groups empty to group by eval.lo_max / eval.hi_min")
    return name
