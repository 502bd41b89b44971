"""Language-family maps for expert routing: YAML files of `family: [language, ...]`.

`experts.families` names a map: a path to a YAML file, or the name of one shipped in
cats_ds/model/families/ (`default`, `ted8_related`, `ted8_diverse`, `wmt10`). Languages are
looked up exactly first, then by their base language, so gettext locale names route
with their language (`pt_BR` -> `pt`, `sr@latin` -> `sr`, `zh_Hans` -> `zh`, `en_GB`
-> `en`) and mBART codes too (`de_DE` -> `de`); a map may still list a locale on its own
to give it a different family. ISO 639-1 and 639-3 codes are interchangeable
(cats_ds/data/langcodes.py): the 639-3 TED8 maps route a 2-letter corpus (`tr`, `pt_BR` ->
`tur`, `por`) and the 639-1 maps a 3-letter one. A language found in none of these ways
is an error naming it.

Only families that hold at least one of the run's languages get an expert, numbered in
the order the map lists them: `assign(["cc", "aa"])` with the map `{x: [aa, bb], y: [cc]}`
gives families ["x", "y"] and ids [1, 0].
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from cats_ds.config import ConfigError
from cats_ds.data.langcodes import base_language, equivalents

FAMILY_DIR = Path(__file__).resolve().parent / "families"
"""Where the shipped maps live (installed as package data)."""


def shipped_maps() -> list[str]:
    """Names of the maps in cats_ds/model/families/."""
    return sorted(p.stem for p in FAMILY_DIR.glob("*.yaml"))


@dataclass(frozen=True)
class FamilyMap:
    source: str
    """The path the map was read from (named in every error)."""
    families: dict[str, list[str]]
    """family -> languages, in file order."""

    def family_of(self, lang: str) -> str:
        """The family of `lang` (exact entry, else its base language's entry)."""
        index = self._index()
        if lang in index:
            return index[lang]
        base = base_language(lang)
        if base in index:
            return index[base]
        for key in (lang, base):
            for code in equivalents(key):
                if code in index:
                    return index[code]
        shown = f"'{lang}'" if base == lang else f"'{lang}' (base language '{base}')"
        raise ConfigError(f"experts.families: unknown language {shown} in family map {self.source}; add it to "
                          f"a family there, or pick another map (shipped: {', '.join(shipped_maps())})")

    def assign(self, languages: Sequence[str]) -> tuple[list[str], list[int]]:
        """(families that hold any of `languages`, in map order; family id of each language)."""
        fam_of = [self.family_of(lang) for lang in languages]
        used = [f for f in self.families if f in set(fam_of)]
        ids = {f: i for i, f in enumerate(used)}
        return used, [ids[f] for f in fam_of]

    def _index(self) -> dict[str, str]:
        return {lang: fam for fam, langs in self.families.items() for lang in langs}


def load_family_map(spec: str) -> FamilyMap:
    """Read and check a map: `spec` is a YAML path or a shipped map's name.

    The file must be a mapping of family name -> non-empty list of language codes, with
    every language under one family only."""
    path = Path(spec)
    if not path.is_file():
        named = FAMILY_DIR / f"{spec}.yaml"
        if not named.is_file():
            raise ConfigError(f"experts.families={spec!r}: no such file, and no shipped map of that name "
                              f"(shipped: {', '.join(shipped_maps())})")
        path = named
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"experts.families: {path} is not valid YAML: {e}") from None
    if not isinstance(tree, dict) or not tree:
        raise ConfigError(f"experts.families: {path} must map family names to lists of languages")
    families: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for fam, langs in tree.items():
        if not isinstance(langs, list) or not langs or not all(isinstance(l, str) and l for l in langs):
            raise ConfigError(f"experts.families: {path}: family {fam!r} must list language codes, got {langs!r}")
        for lang in langs:
            other = next((c for c in [lang, *equivalents(lang)] if c in seen), None)
            if other is not None and (other == lang or seen[other] != str(fam)):
                also = "" if other == lang else f" (as '{other}', the same language)"
                raise ConfigError(f"experts.families: {path}: language '{lang}' is listed under both "
                                  f"{seen[other]!r}{also} and {fam!r}")
            seen[lang] = str(fam)
        families[str(fam)] = list(langs)
    return FamilyMap(str(path), families)
