"""Which dev/test pairs test translation: the rule for catalog-style corpora.

Software catalogs are full of strings that a model can "translate" by copying: ``%s: %s``,
``--help``, ``/etc/fstab``, ``<b>%d</b>``, ``1.0``. Scored as they are, they reward
copying, not translating. `prepare` therefore drops a dev/test pair when its TARGET,
once these are removed (`residue`):

  1. format placeholders: printf ``%s %d %1$d %(name)s``, Qt ``%1``, Python/ICU
     ``{name}`` ``{0}`` (the set `placeholders` reads; readers.py compares it between the
     two sides of a catalog entry), and ``%%``;
  2. markup: tags ``<b>`` ``</a>`` ``<br/>`` and entities ``&amp;`` ``&#38;``;
  3. URLs and e-mail addresses (``https://x.org/y``, ``www.x.org``, ``a@b.org``) and paths
     (``/usr/share``, ``~/.config``, ``./run``, ``C:\\dir``, ``dir/file.ext``);
  4. command-line options: ``-x``, ``--opt``, ``--opt=VALUE``, after a space, an opening
     bracket or an ASCII quote (so ``e-mail`` and ``»%s«-Taste`` keep their words);
  5. numbers: ``42``, ``3.14``, ``1,000``, ``10:30``;

has fewer than `min_letters` letters (``str.isalpha``; default 4) — rule ``letters`` — or
else fewer than `min_words` words (default 2) — rule ``words``. A word is a
whitespace-separated token with at least one letter; in scripts written without spaces
(Han, Hiragana, Katakana, Thai, Lao, Khmer, Myanmar, Tibetan) every letter counts as a
word. Only the target is tested: the English side of a kept pair may still hold
placeholders (they are part of the sentence to translate).

On by default for gettext (`data.translatable_eval`, None = gettext only, true/false =
any corpus), for dev and test only: train keeps such pairs unless
`data.translatable_train` is true. The thresholds are `data.translatable_min_letters` and
`data.translatable_min_words`; `prepare` prints how many pairs each rule dropped per
language.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

RULES = ("letters", "words")
"""Names of the rules, in the order they are tested (a pair counts under the first it fails)."""

_MARKUP = re.compile(r"<[^<>]*>|&(?:[A-Za-z][A-Za-z0-9]*|#\d+|#[xX][0-9A-Fa-f]+);")
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://\S*|\bwww\.\S+|[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_PATH = re.compile(r"(?<!\S)(?:~|\.{1,2})?/\S*|(?<!\S)[A-Za-z]:\\\S*|\S*\w/[\w./-]*\.\w+\S*")
_OPTION = re.compile(r"(?<![^\s(\[{\"'`])--?[A-Za-z0-9][\w-]*(?:=\S*)?")
_NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
_UNSPACED = ("CJK", "HIRAGANA", "KATAKANA", "THAI", "LAO", "KHMER", "MYANMAR", "TIBETAN")


# --------------------------------------------------------------------------- placeholders

# printf: %s %d %ld %5.2f %1$d %(name)s; the position, flags, width and precision are
# left out of the comparison key because translators legitimately reorder with %1$s.
_PRINTF = re.compile(r"%(?:\((?P<name>[^)]+)\)|(?P<pos>\d+)\$)?[-+#0']*(?:\d+|\*)?(?:\.(?:\d+|\*))?"
                     r"(?P<len>hh|h|ll|l|L|q|j|z|t)?(?P<conv>[diouxXeEfFgGaAcspnm])")
_QT = re.compile(r"%(?P<num>\d+)")  # KDE/Qt %1 %2 (after printf so %1$d is taken there)
_BRACE = re.compile(r"\{(?P<field>[^{}!:\s]*)(?:![rsa])?(?::[^{}]*)?\}")


def placeholders(text: str) -> Counter:
    """Multiset of format placeholders in `text` (printf, Python %()/{}, Qt %1)."""
    keys: Counter = Counter()
    if "%" not in text and "{" not in text:
        return keys

    def printf(m: re.Match) -> str:
        keys[f"%({m['name']}){m['conv']}" if m["name"] else f"%{m['len'] or ''}{m['conv']}"] += 1
        return " "

    rest = _PRINTF.sub(printf, text.replace("%%", " "))
    keys.update(f"%{m['num']}" for m in _QT.finditer(rest))
    keys.update(f"{{{m['field']}}}" for m in _BRACE.finditer(rest.replace("{{", " ").replace("}}", " ")))
    return keys


def strip_placeholders(text: str) -> str:
    """`text` with every placeholder `placeholders` counts (and ``%%``) replaced by a space."""
    text = _PRINTF.sub(" ", text.replace("%%", " "))
    return _BRACE.sub(" ", _QT.sub(" ", text))


# --------------------------------------------------------------------------- the rule


def applies(corpus: str, translatable_eval) -> bool:
    """Whether the rule filters this corpus: data.translatable_eval, None meaning gettext only."""
    return corpus == "gettext" if translatable_eval is None else bool(translatable_eval)


def residue(text: str) -> str:
    """`text` with placeholders, markup, URLs/paths, options and numbers replaced by spaces."""
    text = strip_placeholders(text)
    text = _MARKUP.sub(" ", text)
    text = _URL.sub(" ", text)
    text = _PATH.sub(" ", text)
    text = _OPTION.sub(" ", text)
    return _NUMBER.sub(" ", text)


def _unspaced(c: str) -> bool:
    return unicodedata.name(c, "").startswith(_UNSPACED)


def count_words(text: str) -> int:
    """Whitespace tokens with a letter; letters of unspaced scripts count one word each."""
    n = 0
    for token in text.split():
        letters = [c for c in token if c.isalpha()]
        unspaced = sum(_unspaced(c) for c in letters)
        n += unspaced + (1 if len(letters) > unspaced else 0)
    return n


def untranslatable(target: str, min_letters: int = 4, min_words: int = 2) -> str:
    """The rule (`RULES`) that drops a dev/test pair with this target, or "" to keep it."""
    rest = residue(target)
    if sum(c.isalpha() for c in rest) < min_letters:
        return "letters"
    if count_words(rest) < min_words:
        return "words"
    return ""
