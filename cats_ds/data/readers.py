"""Raw corpus readers: find a corpus's files, then read one language at a time.

Reading is split in two so `prepare` can fingerprint its inputs before parsing them, and
so memory holds one language at a time (WMT German alone is 27.8M pairs):

    layout = locate(data)                     # files per language and split; checks data.languages
    scan = scan_corpus(layout, data)          # reads every language once: counts, warnings, errors
    lang_data = read_language(layout, lang, data)   # pairs per split, read again when needed

Layouts (docs/data.md, "Corpus layouts", has the full description):

- ``gettext``: ``<raw>/<locale>/LC_MESSAGES/*.mo``; every locale directory (``pt_BR``,
  ``sr@latin``, ``zh_CN``) is a language of its own, except ``en`` itself (the source);
  ``en_GB`` and the like stay. See `read_catalog_pairs` for the filters; gettext has no
  splits of its own, so all three come from `hash_split`.
- ``plain``: ``{train,dev,test}.en-xx.{en,xx}``; dev/test optional.
- ``opus100``: ``[opus-100-corpus/][v1.0/]supervised/{pair}/opus.{pair}-{split}.{side}``,
  ``en-xx`` tried before ``xx-en`` (pairs are in alphabetical order). zero-shot/ is ignored.
- ``ted8``: ``data.pattern`` is a preset (`TED_PRESETS`) or a custom pattern, see
  `locate_ted8`. ``None`` tries the presets in order and takes the first that finds files.
- ``wmt``: fairseq's ML50 raw layout ``{split}.{src}-{tgt}.{side}``, both directions,
  mBART codes (``de_DE``) mapped to ISO (``de``); plain ISO codes also accepted.

Rules common to text corpora: files are decoded as strict UTF-8 (an error names file,
line and byte column; a leading BOM is removed); lines are split on ``\\n`` only, never
on the other characters `str.splitlines` treats as breaks (U+2028, U+0085, form feed
and vertical tab occur inside OPUS sentences and would misalign the sides); surrounding
whitespace is stripped; a pair with an empty side is dropped and counted in a warning;
pairs with a side over data.max_chars characters are dropped (in every split); training
pairs whose English side is also in the language's dev or test split are dropped from
train (counted as "in dev/test"); a language code that is not ISO 639 shaped (`xx_YY`)
is warned about (`non_iso_code`). Where a corpus has no dev/test of its own, only gettext
and plain carve them from train with `hash_split`; OPUS-100, TED8 and WMT languages
without them simply have none (warned). Dev/test pairs that do not test translation
(cats_ds/data/translatable.py) are dropped for gettext by default and for any corpus with
data.translatable_eval=true (`translatable_filter`).
"""

from __future__ import annotations

import difflib
import gettext
import glob
import hashlib
import re
import string
import struct
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from cats_ds.config import DataConfig
from cats_ds.data.manifest import SPLITS
from cats_ds.data.translatable import applies, placeholders, strip_placeholders, untranslatable

Pair = tuple[str, str]
"""(english, foreign)."""

ENGLISH = "en"


class CorpusError(Exception):
    """The raw corpus is missing, malformed or lacks a requested language; the message
    names the file (and line) or the language, and the valid choices."""


@dataclass
class Layout:
    """Where each language's raw files are, found without reading them."""

    corpus: str
    root: Path
    languages: list[str]
    """Target languages in output order: data.languages as given, else sorted."""
    texts: dict[str, dict[str, tuple[Path, Path]]] = field(default_factory=dict)
    """Text corpora: language -> split -> (english file, foreign file)."""
    catalogs: dict[str, list[Path]] = field(default_factory=dict)
    """gettext: language -> .mo files."""
    hash_split: bool = False
    """Missing dev/test splits are carved from train by hashing the English side."""
    warnings: list[str] = field(default_factory=list)

    def sources(self) -> list[Path]:
        """Every raw file of the selected languages, sorted."""
        files = [p for lang in self.languages for p in self.catalogs.get(lang, [])]
        files += [p for lang in self.languages for pair in self.texts.get(lang, {}).values() for p in pair]
        return sorted(set(files))


@dataclass
class LanguageData:
    """One language's pairs after the reader's filters."""

    lang: str
    splits: dict[str, list[Pair]]
    """split -> pairs; a split the corpus lacks is absent."""
    dropped: Counter = field(default_factory=Counter)
    """reason -> pairs filtered out (all splits together)."""
    warnings: list[str] = field(default_factory=list)
    untranslatable: Counter = field(default_factory=Counter)
    """translatable.RULES rule -> pairs it dropped (dev/test, and train if asked)."""


@dataclass
class Scan:
    """The result of reading every language once (`scan_corpus`)."""

    languages: list[str]
    """Languages with training pairs, in output order."""
    counts: dict[str, dict[str, int]]
    """language -> split -> pairs."""
    dropped: dict[str, Counter]
    warnings: list[str]
    untranslatable: dict[str, Counter] = field(default_factory=dict)
    """language -> LanguageData.untranslatable."""


# --------------------------------------------------------------------------- common


def _root(data: DataConfig) -> Path:
    root = Path(data.raw).expanduser()
    if not root.is_dir():
        raise CorpusError(f"data.raw={data.raw}: no such directory (corpus {data.corpus})")
    return root


def _select(found: Iterable[str], data: DataConfig, root: Path) -> list[str]:
    """data.languages checked against the languages the corpus has (all of them if empty)."""
    found = sorted(set(found) - {ENGLISH})
    if not found:
        raise CorpusError(f"{root}: no {data.corpus} corpus files found (see docs/data.md, 'Corpus layouts')")
    if not data.languages:
        return found
    if ENGLISH in data.languages:
        raise CorpusError("data.languages: 'en' is the source side of every pair, not a target language")
    for lang in data.languages:
        if lang not in found:
            near = difflib.get_close_matches(lang, found, n=1, cutoff=0.5)
            hint = f" (closest: '{near[0]}')" if near else ""
            raise CorpusError(f"language '{lang}' not in the {data.corpus} corpus at {root}{hint}; "
                              f"it has {len(found)}: {', '.join(found)}")
    return list(dict.fromkeys(data.languages))


ISO_639_1 = frozenset("""
    aa ab ae af ak am an ar as av ay az ba be bg bh bi bm bn bo br bs ca ce ch co cr cs cu cv cy da de dv
    dz ee el en eo es et eu fa ff fi fj fo fr fy ga gd gl gn gu gv ha he hi ho hr ht hu hy hz ia id ie ig ii
    ik io is it iu ja jv ka kg ki kj kk kl km kn ko kr ks ku kv kw ky la lb lg li ln lo lt lu lv mg mh mi mk
    ml mn mr ms mt my na nb nd ne ng nl nn no nr nv ny oc oj om or os pa pi pl ps pt qu rm rn ro ru rw sa sc
    sd se sg si sk sl sm sn so sq sr ss st su sv sw ta te tg th ti tk tl tn to tr ts tt tw ty ug uk ur uz ve
    vi vo wa wo xh yi yo za zh zu""".split())
"""The two-letter ISO 639-1 codes (bh, deprecated, included)."""
_LANG_CODE = re.compile(r"(?P<base>[a-z]{2,3})(?:[_-](?:[A-Z][a-z]{3}|[A-Z]{2}|[0-9]{3})){0,2}(?:@[a-z]+)?")


def non_iso_code(code: str) -> bool:
    """True unless `code` is an ISO 639-1 code or a three-letter (ISO 639-3 shaped) code,
    optionally followed by _Script, _REGION / _419 and @variant: pt_BR, zh_Hans, es_419,
    sr@latin, ca@valencia. Three-letter codes, scripts and regions are checked for their
    form only (no table of ISO 639-3 / 3166 here)."""
    m = _LANG_CODE.fullmatch(code)
    return m is None or (len(m["base"]) == 2 and m["base"] not in ISO_639_1)


def split_position(english: str) -> float:
    """Where an English sentence falls in [0, 1): the same everywhere, for every language."""
    digest = hashlib.sha1(english.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def hash_split(pairs: list[Pair], data: DataConfig, carve: Iterable[str] = ("dev", "test"),
               keep: Optional[Callable[[Pair], bool]] = None) -> dict[str, list[Pair]]:
    """Split by a hash of the English side: dev if u < dev_fraction, test if u <
    dev_fraction + test_fraction, else train. Only the splits in `carve` are taken out
    of train (the others exist in files and their share stays in train). A carved pair
    that `keep` rejects is dropped (never moved to train); then each carved split keeps
    its data.dev_max pairs of lowest u and drops the rest, so an English sentence is
    never in two splits, in any language."""
    carve = set(carve)
    out: dict[str, list[Pair]] = {"train": []}
    held: dict[str, list[tuple[float, int, Pair]]] = {s: [] for s in carve}
    for i, pair in enumerate(pairs):
        u = split_position(pair[0])
        split = ("dev" if u < data.dev_fraction
                 else "test" if u < data.dev_fraction + data.test_fraction else "train")
        if split in carve:
            if keep is None or keep(pair):
                held[split].append((u, i, pair))
        else:
            out["train"].append(pair)
    for split, items in held.items():
        kept = sorted(items)[:max(data.dev_max, 0)]
        out[split] = [pair for _, _, pair in sorted(kept, key=lambda t: t[1])]
    return out


def cap_train(splits: dict[str, list[Pair]], cap: int, split_max: int,
              keep: Optional[Callable[[Pair], bool]], dropped: Counter) -> None:
    """data.max_train_pairs for one language, in place: train keeps its `cap` pairs of
    lowest English hash (split_position); each freed pair that `keep` accepts goes to dev
    or test (by a second hash of its English side, half each), appended after the split's
    own pairs while the split has fewer than `split_max`; the other freed pairs are
    dropped (counted as 'over max_train_pairs'). The freed English sentences are not in
    this language's train, but may be in another language's (as in multi-way corpora)."""
    train = splits.get("train", [])
    if len(train) <= cap:
        return
    order = sorted(range(len(train)), key=lambda i: (split_position(train[i][0]), i))
    kept = set(order[:cap])
    splits["train"] = [pair for i, pair in enumerate(train) if i in kept]
    moved = 0
    for i in order[cap:]:
        pair = train[i]
        split = "dev" if split_position("cap:" + pair[0]) < 0.5 else "test"
        target = splits.setdefault(split, [])
        if len(target) < split_max and (keep is None or keep(pair)):
            target.append(pair)
            moved += 1
    if len(train) - cap - moved:
        dropped["over max_train_pairs"] += len(train) - cap - moved


def read_lines(path: Path) -> list[str]:
    """Lines of a strict UTF-8 file, split on \\n only; the error names file:line:column."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise CorpusError(f"{path}:{line}: not valid UTF-8 (byte {raw[e.start]:#04x} at column "
                          f"{column}: {e.reason})") from None
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_parallel(en_path: Path, xx_path: Path, dropped: Counter) -> list[Pair]:
    """Aligned pairs of two text files; pairs with an empty side are counted in dropped."""
    en_lines, xx_lines = read_lines(en_path), read_lines(xx_path)
    if len(en_lines) != len(xx_lines):
        raise CorpusError(f"parallel files differ in length: {en_path} has {len(en_lines)} lines, "
                          f"{xx_path} has {len(xx_lines)}")
    pairs = []
    for en, xx in zip(en_lines, xx_lines):
        en, xx = en.strip(), xx.strip()
        if en and xx:
            pairs.append((en, xx))
        else:
            dropped["empty side"] += 1
    return pairs


def _drop_long(pairs: list[Pair], max_chars: int, dropped: Counter) -> list[Pair]:
    kept = [p for p in pairs if len(p[0]) <= max_chars and len(p[1]) <= max_chars]
    dropped["over max_chars"] += len(pairs) - len(kept)
    return kept


# --------------------------------------------------------------------------- gettext

# CJK-style mnemonic suffix: "打开(_O)", "開く(&O)"
_MNEMONIC_SUFFIX = re.compile(r"\s*\((?:_|&)[^\W_]\)")
_UNDERSCORE = re.compile(r"(?<!_)_(?=[^\W_])")
_AMPERSAND = re.compile(r"(?<!&)&(?=[^\W_])(?![A-Za-z]+;|#\d+;)")  # not &amp; / &#38;
_IDENT = re.compile(r"[A-Za-z0-9]+(?:[_&][A-Za-z0-9]+)+")


def _strip_marker(text: str, marker: re.Pattern, shared: set[str]) -> str:
    """Remove the accelerator marker if exactly one is left once markers inside
    identifiers that occur on both sides (INT_MAX, proc_info, AT&T) are set aside."""
    hits = [m.start() for m in marker.finditer(text)]
    if not hits:
        return text
    protected = [m.span() for m in _IDENT.finditer(text) if m.group() in shared]
    hits = [i for i in hits if not any(a <= i < b for a, b in protected)]
    return text[:hits[0]] + text[hits[0] + 1:] if len(hits) == 1 else text


def strip_accelerators(en: str, xx: str) -> Pair:
    """GTK ``_Open``/``Ö_ffnen`` and Qt ``&Open`` mnemonics removed from both sides,
    with the CJK suffix form ``打开(_O)``. A string with several candidate markers is
    left alone (it is an identifier or a path, not a label), as is an identifier that
    appears verbatim on both sides."""
    if "_" not in en and "&" not in en and "_" not in xx and "&" not in xx:
        return en, xx
    shared = set(_IDENT.findall(en)) & set(_IDENT.findall(xx))
    out = []
    for text in (en, xx):
        text = _MNEMONIC_SUFFIX.sub("", text)
        text = _strip_marker(text, _UNDERSCORE, shared)
        out.append(_strip_marker(text, _AMPERSAND, shared))
    return out[0], out[1]


def _catalog_entries(catalog: dict) -> Iterable[Pair]:
    """(msgid, msgstr) of a GNUTranslations catalog. Plural entries are keyed
    (msgid, n); the singular msgid is paired with form 0, the translator's form for the
    smallest counts (exactly "one" in most languages). A msgctxt prefix is removed."""
    for key, value in catalog.items():
        if isinstance(key, tuple):
            if key[1] != 0:
                continue
            key = key[0]
        yield key.split("\x04", 1)[-1], value


def clean_entry(msgid: str, msgstr: str, max_chars: int) -> tuple[Optional[Pair], str]:
    """One catalog entry -> (pair or None, reason it was dropped)."""
    if not msgid:
        return None, "header"
    en, xx = strip_accelerators(msgid.strip(), msgstr.strip())
    en, xx = en.strip(), xx.strip()
    if not xx or xx == en:
        return None, "untranslated"
    if "\n" in en or "\n" in xx or "\r" in en or "\r" in xx:
        return None, "multi-line"
    if placeholders(en) != placeholders(xx):
        return None, "placeholders differ"
    if not any(c.isalpha() for c in strip_placeholders(en)) or \
            not any(c.isalpha() for c in strip_placeholders(xx)):
        return None, "no letters"
    if len(en) > max_chars or len(xx) > max_chars:
        return None, "over max_chars"
    return (en, xx), ""


def _load_catalog(path: Path) -> dict:
    with open(path, "rb") as f:
        return gettext.GNUTranslations(f)._catalog


def read_catalog_pairs(paths: list[Path], max_chars: int, dropped: Counter, warnings: list[str]
                       ) -> list[Pair]:
    """Filtered pairs of one language's catalogs, sorted by English.

    Entries are dropped when untranslated (empty or equal to the msgid), multi-line
    (after stripping surrounding whitespace, so a trailing \\n is fine), when their
    placeholder multisets differ (`placeholders`), when either side has no letter once
    placeholders are removed, or when a side is over max_chars. Accelerators are removed
    first (`strip_accelerators`). When one English maps to several translations, the one
    found in most catalogs wins, ties to the smallest string: independent of file order.
    A catalog Python cannot parse is skipped with a warning naming it.
    """
    choices: dict[str, Counter] = defaultdict(Counter)
    for path in paths:
        try:
            catalog = _load_catalog(path)
        except (OSError, ValueError, LookupError, struct.error, IndexError, OverflowError) as e:
            warnings.append(f"skipped unreadable catalog {path}: {type(e).__name__}: {e}")
            continue
        pairs = set()
        for msgid, msgstr in _catalog_entries(catalog):
            pair, reason = clean_entry(msgid, msgstr, max_chars)
            if pair is not None:
                pairs.add(pair)
            elif reason != "header":
                dropped[reason] += 1
        for en, xx in pairs:
            choices[en][xx] += 1
    out = []
    for en in sorted(choices):
        counts = choices[en]
        dropped["duplicate"] += sum(counts.values()) - len(counts)
        dropped["conflicting translation"] += len(counts) - 1
        out.append((en, min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0]))
    return out


def locate_gettext(data: DataConfig) -> Layout:
    root = _root(data)
    found = {}
    for d in sorted(root.iterdir()):
        mo = sorted((d / "LC_MESSAGES").glob("*.mo")) if (d / "LC_MESSAGES").is_dir() else []
        if mo:
            found[d.name] = mo
    langs = _select(found, data, root)
    return Layout("gettext", root, langs, catalogs={lang: found[lang] for lang in langs}, hash_split=True)


# --------------------------------------------------------------------------- text corpora


@dataclass(frozen=True)
class TextScheme:
    """How a text corpus names its files."""

    templates: tuple[str, ...]
    """Paths relative to the root with {lang} {en} {split} {side}; the first that exists wins."""
    english: tuple[str, ...] = (ENGLISH,)
    """Codes English goes by in file names, tried in order."""
    split_names: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("train", ("train",)), ("dev", ("dev", "valid")), ("test", ("test",)))
    """Our split -> names it has in files."""
    normalize: Callable[[str], str] = lambda code: code
    """File language code -> our language name."""


def _train_glob(template: str, en: str, split: str) -> tuple[str, re.Pattern]:
    """Glob for the English train files of every language, and a regex capturing {lang}."""
    globs, regex, seen_lang = [], [], False
    for literal, name, _, _ in string.Formatter().parse(template):
        globs.append(glob.escape(literal))
        regex.append(re.escape(literal))
        if name == "lang":  # a second {lang} must repeat the first: a backreference
            globs.append("*")
            regex.append("(?P=lang)" if seen_lang else "(?P<lang>[^/]+?)")
            seen_lang = True
        elif name is not None:
            value = split if name == "split" else en  # {en} and {side} are English's code here
            globs.append(glob.escape(value))
            regex.append(re.escape(value))
    return "".join(globs), re.compile("".join(regex))


def _discover(root: Path, scheme: TextScheme) -> dict[str, str]:
    """File language code -> language name, from the English side of the train files."""
    codes = {}
    for template in scheme.templates:
        for en in scheme.english:
            for split in dict(scheme.split_names)["train"]:
                pattern, regex = _train_glob(template, en, split)
                for path in root.glob(pattern):
                    m = regex.fullmatch(path.relative_to(root).as_posix())
                    if m and m["lang"] not in scheme.english:
                        codes.setdefault(m["lang"], scheme.normalize(m["lang"]))
    return codes


def _find_split(root: Path, scheme: TextScheme, code: str, names: tuple[str, ...]
                ) -> Optional[tuple[Path, Path]]:
    for template in scheme.templates:
        for en in scheme.english:
            for split in names:
                en_path = root / template.format(lang=code, en=en, split=split, side=en)
                xx_path = root / template.format(lang=code, en=en, split=split, side=code)
                if en_path.is_file() and xx_path.is_file():
                    return en_path, xx_path
                if en_path.is_file() != xx_path.is_file():
                    have, lack = (en_path, xx_path) if en_path.is_file() else (xx_path, en_path)
                    raise CorpusError(f"{have} has no parallel file: expected {lack}")
    return None


def locate_text(corpus: str, root: Path, scheme: TextScheme, data: DataConfig, hash_split_missing: bool
                ) -> Layout:
    """Layout of a text corpus: languages discovered from the English train files."""
    codes = _discover(root, scheme)
    if not codes:
        raise CorpusError(f"{root}: no {corpus} files found; expected the English train side at "
                          f"{' or '.join(scheme.templates)} with {{en}} in {', '.join(scheme.english)}")
    by_lang: dict[str, str] = {}
    for code, lang in sorted(codes.items()):
        if lang in by_lang:
            raise CorpusError(f"{root}: files for both '{by_lang[lang]}' and '{code}' map to language "
                              f"'{lang}'; keep one of them")
        by_lang[lang] = code
    langs = _select(by_lang, data, root)
    texts = {}
    for lang in langs:
        texts[lang] = {}
        for split, names in scheme.split_names:
            found = _find_split(root, scheme, by_lang[lang], names)
            if found:
                texts[lang][split] = found
    layout = Layout(corpus, root, langs, texts=texts, hash_split=hash_split_missing)
    for split in ("dev", "test"):
        lacking = [lang for lang in langs if split not in texts[lang]]
        if lacking:
            fate = "carved from train by hash" if hash_split_missing else "absent for them"
            layout.warnings.append(f"no {split} files for {', '.join(lacking)}: {split} is {fate}")
    return layout


def locate_plain(data: DataConfig) -> Layout:
    scheme = TextScheme(templates=("{split}.{en}-{lang}.{side}",),
                        split_names=(("train", ("train",)), ("dev", ("dev",)), ("test", ("test",))))
    return locate_text("plain", _root(data), scheme, data, hash_split_missing=True)


def locate_opus100(data: DataConfig) -> Layout:
    """OPUS-100's supervised pairs; data.raw may be the corpus root, v1.0/ or supervised/."""
    root = _root(data)
    for sub in ("opus-100-corpus/v1.0/supervised", "v1.0/supervised", "supervised"):
        if (root / sub).is_dir():
            root = root / sub
            break
    scheme = TextScheme(templates=("{en}-{lang}/opus.{en}-{lang}-{split}.{side}",
                                   "{lang}-{en}/opus.{lang}-{en}-{split}.{side}"),
                        split_names=(("train", ("train",)), ("dev", ("dev",)), ("test", ("test",))))
    return locate_text("opus100", root, scheme, data, hash_split_missing=False)


TED_PRESETS: dict[str, tuple[str, ...]] = {
    "orig": ("{lang}_{en}/ted-{split}.orig.{side}",),
    "raw": ("raw/{lang}_{en}/{split}.{side}", "{lang}_{en}/{split}.{side}"),
    "mtok": ("{lang}_{en}/ted-{split}.mtok.{side}",),
    "spm8000": ("{lang}_{en}/ted-{split}.spm8000.{side}",),
}
"""TED8 file patterns; {en} is `eng` or `en`, {split} train, dev or valid, test."""


def locate_ted8(data: DataConfig) -> Layout:
    """TED8 (ISO 639-3 codes, English `eng` or `en`). data.pattern: a preset name from
    TED_PRESETS, or a custom pattern relative to data.raw with {lang}, {split}, {side}
    (the language code or English's) and optionally {en} (English's code) or {l2e}
    (short for {lang}_{en}), e.g. ``{l2e}/ted-{split}.tok.{side}``. None: the first
    preset that finds files (orig, raw, mtok, spm8000). The spm8000 files are already
    segmented and are read as text like any other."""
    root = _root(data)
    if data.pattern is None:
        candidates = list(TED_PRESETS.items())
    elif data.pattern in TED_PRESETS:
        candidates = [(data.pattern, TED_PRESETS[data.pattern])]
    else:
        pattern = data.pattern.replace("{l2e}", "{lang}_{en}")
        names = {name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None}
        if not {"lang", "split", "side"} <= names or not names <= {"lang", "split", "side", "en"}:
            raise CorpusError(f"data.pattern={data.pattern!r}: a custom pattern needs {{lang}}, {{split}} "
                              f"and {{side}} (and may use {{en}}, {{l2e}}); presets: {', '.join(TED_PRESETS)}")
        candidates = [("custom", (pattern,))]
    for name, templates in candidates:
        scheme = TextScheme(templates=templates, english=("eng", ENGLISH))
        if _discover(root, scheme):
            layout = locate_text("ted8", root, scheme, data, hash_split_missing=False)
            if data.pattern is None:
                layout.warnings.insert(0, f"data.pattern not set: using the TED8 preset '{name}'")
            return layout
    tried = " or ".join(t for _, templates in candidates for t in templates)
    raise CorpusError(f"{root}: no ted8 files found; expected the English train side at {tried} "
                      f"with {{en}} = eng or en, {{split}} = train")


_MBART_CODE = re.compile(r"([a-z]{2,3})_[A-Z]{2}")


def mbart_to_iso(code: str) -> str:
    """mBART/ML50 language code -> ISO 639 (``de_DE`` -> ``de``); other codes unchanged."""
    m = _MBART_CODE.fullmatch(code)
    return m.group(1) if m else code


def locate_wmt(data: DataConfig) -> Layout:
    """fairseq ML50 raw files ``{split}.{src}-{tgt}.{side}`` (en-xx or xx-en; split names
    train, valid or dev, test) with mBART or plain ISO codes."""
    scheme = TextScheme(templates=("{split}.{en}-{lang}.{side}", "{split}.{lang}-{en}.{side}"),
                        english=("en_XX", ENGLISH), normalize=mbart_to_iso)
    return locate_text("wmt", _root(data), scheme, data, hash_split_missing=False)


LOCATORS: dict[str, Callable[[DataConfig], Layout]] = {
    "gettext": locate_gettext,
    "plain": locate_plain,
    "opus100": locate_opus100,
    "ted8": locate_ted8,
    "wmt": locate_wmt,
}


def locate(data: DataConfig) -> Layout:
    """Find the raw files of data.corpus under data.raw for data.languages."""
    if data.corpus not in LOCATORS:
        raise CorpusError(f"data.corpus={data.corpus!r}: choose one of {', '.join(LOCATORS)}")
    if data.pattern is not None and data.corpus != "ted8":
        raise CorpusError(f"data.pattern is for corpus ted8 only; data.corpus is {data.corpus}")
    layout = LOCATORS[data.corpus](data)
    odd = [lang for lang in layout.languages if non_iso_code(lang)]
    if odd:
        layout.warnings.append(f"language code(s) {', '.join(odd)} not ISO 639-1/639-3 (optionally with _REGION, "
                               f"_Script or @variant, e.g. pt_BR, zh_Hans, sr@latin): check data.languages and "
                               f"the corpus file names; family routing and per-language BLEU tokenizers go by code")
    return layout


# --------------------------------------------------------------------------- reading


def translatable_filter(data: DataConfig, corpus: str, counts: Counter) -> Optional[Callable[[Pair], bool]]:
    """The dev/test filter of cats_ds/data/translatable.py if data.translatable_eval (None:
    gettext only) asks for it: a predicate on pairs that counts each rule's drops in
    `counts`."""
    if not applies(corpus, data.translatable_eval):
        return None

    def keep(pair: Pair) -> bool:
        rule = untranslatable(pair[1], data.translatable_min_letters, data.translatable_min_words)
        if rule:
            counts[rule] += 1
        return not rule

    return keep


def read_language(layout: Layout, lang: str, data: DataConfig) -> LanguageData:
    """One language's pairs per split, filtered (and hash-split where the layout says).
    Dev/test (and train with data.translatable_train) go through `translatable_filter`;
    its drops are counted per rule in LanguageData.untranslatable, not in `dropped`."""
    dropped: Counter = Counter()
    untranslatable: Counter = Counter()
    keep = translatable_filter(data, layout.corpus, untranslatable)
    warnings: list[str] = []
    if layout.catalogs:
        pairs = read_catalog_pairs(layout.catalogs[lang], data.max_chars, dropped, warnings)
        splits = hash_split(pairs, data, keep=keep)
    else:
        splits = {split: _drop_long(read_parallel(en, xx, dropped), data.max_chars, dropped)
                  for split, (en, xx) in layout.texts[lang].items()}
        if keep is not None:
            splits.update({split: [p for p in splits[split] if keep(p)]
                           for split in ("dev", "test") if split in splits})
        missing = [s for s in ("dev", "test") if s not in splits]
        if layout.hash_split and missing and "train" in splits:
            splits.update(hash_split(splits["train"], data, carve=missing, keep=keep))
        if dropped["empty side"]:
            warnings.append(f"{lang}: dropped {dropped['empty side']} pairs with an empty side")
    if keep is not None and data.translatable_train and "train" in splits:
        splits["train"] = [p for p in splits["train"] if keep(p)]
    if lang in data.max_train_pairs:
        cap_train(splits, data.max_train_pairs[lang], data.dev_max, keep, dropped)
    held_out = {en for split in ("dev", "test") for en, _ in splits.get(split, [])}
    if held_out and splits.get("train"):
        # corpora that ship their own dev/test can repeat them in train: the model would see
        # the evaluation sentences (hash-carved splits never share an English sentence)
        kept = [pair for pair in splits["train"] if pair[0] not in held_out]
        if len(kept) < len(splits["train"]):
            dropped["in dev/test"] += len(splits["train"]) - len(kept)
            warnings.append(f"{lang}: dropped {dropped['in dev/test']} training pairs whose English side is in "
                            f"its dev or test split")
            splits["train"] = kept
    dropped += Counter()  # drop zero counts
    return LanguageData(lang, splits, dropped, warnings, untranslatable)


def scan_corpus(layout: Layout, data: DataConfig, progress: Optional[Callable] = None) -> Scan:
    """Read every language once: pair counts, filter counts and warnings. A requested
    language without training pairs is an error; a discovered one is skipped (warned).
    `progress` wraps the language list (e.g. tqdm)."""
    warnings = list(layout.warnings)
    counts, dropped, untranslatable, langs = {}, {}, {}, []
    for lang in (progress or (lambda x: x))(layout.languages):
        ld = read_language(layout, lang, data)
        warnings += ld.warnings
        if not ld.splits.get("train"):
            if data.languages:
                raise CorpusError(f"language '{lang}' has no usable training pairs in {layout.root} "
                                  f"(filtered out: {dict(ld.dropped) or 'nothing'})")
            warnings.append(f"skipped language '{lang}': no usable training pairs")
            continue
        langs.append(lang)
        counts[lang] = {s: len(ld.splits.get(s, [])) for s in SPLITS}
        dropped[lang] = ld.dropped
        untranslatable[lang] = ld.untranslatable
    if not langs:
        raise CorpusError(f"{layout.root}: no usable pairs in any language of the {layout.corpus} corpus")
    return Scan(langs, counts, dropped, warnings, untranslatable)
