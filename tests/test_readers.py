"""Corpus readers on small corpora built in tmp_path (all five layouts, every error path)."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Union

import pytest

from cats_ds.config import DataConfig
from cats_ds.data.readers import (CorpusError, hash_split, locate, mbart_to_iso, read_language, scan_corpus,
                                  split_position, strip_accelerators)
from cats_ds.data.translatable import placeholders

MoKey = Union[str, tuple[str, str]]  # msgid, or (singular, plural)


def write_mo(path: Path, entries: dict[MoKey, Union[str, list[str]]], charset: str = "UTF-8") -> Path:
    """A GNU .mo file: magic, count, two tables of (length, offset), then the strings."""
    header = (f"Content-Type: text/plain; charset={charset}\n"
              "Plural-Forms: nplurals=2; plural=(n != 1);\n")
    items = {b"": header.encode(charset)}
    for key, value in entries.items():
        msgid = "\0".join(key) if isinstance(key, tuple) else key
        msgstr = "\0".join(value) if isinstance(value, list) else value
        items[msgid.encode(charset)] = msgstr.encode(charset)
    keys = sorted(items)
    n = len(keys)
    originals_at, translations_at = 28, 28 + 8 * n
    data_at = translations_at + 8 * n
    blob, originals, translations = b"", [], []
    for table, strings in ((originals, keys), (translations, [items[k] for k in keys])):
        for s in strings:
            table.append((len(s), data_at + len(blob)))
            blob += s + b"\0"
    out = struct.pack("<7I", 0x950412DE, 0, n, originals_at, translations_at, 0, 0)
    out += b"".join(struct.pack("<2I", *t) for t in originals + translations) + blob
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(out)
    return path


def cfg(tmp_path: Path, corpus: str, **kw) -> DataConfig:
    return DataConfig(corpus=corpus, raw=str(kw.pop("raw", tmp_path)), **kw)


def write_pair(root: Path, en_name: str, xx_name: str, en: list[str], xx: list[str]) -> None:
    for name, lines in ((en_name, en), (xx_name, xx)):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def english(n: int, prefix: str = "sentence") -> list[str]:
    return [f"{prefix} number {i} is here" for i in range(n)]


def foreign(lines: list[str], lang: str) -> list[str]:
    return [f"{lang} {line[::-1]}" for line in lines]


def all_pairs(layout, lang, data):
    return read_language(layout, lang, data).splits


# --------------------------------------------------------------------------- gettext


def test_gettext_filters_and_normalization(tmp_path):
    write_mo(tmp_path / "de/LC_MESSAGES/app.mo", {
        "_Open": "Ö_ffnen",
        "Save _As…": "Speichern _unter …",
        "Restore _Defaults": "Standard (_D)",
        "Hello": "Hello",                              # untranslated
        "Empty": "",                                   # untranslated
        "Line one\nLine two": "Zeile eins\nZeile zwei",  # multi-line
        "Trailing newline\n": "Zeilenende\n",          # surrounding whitespace stripped
        "%d files": "%s Dateien",                      # placeholders differ
        "%1$s of %2$s": "%2$s von %1$s",               # reordered: same multiset
        "{name} saved": "{Name} gespeichert",          # placeholders differ
        "%(count)d left": "noch %(count)d",
        "x" * 301: "y" * 10,                           # over max_chars
        "%s": "%s:",                                   # no letters
        "menu\x04Quit": "Beenden",                     # msgctxt removed
        ("One file", "%d files"): ["Eine Datei", "%d Dateien"],  # plural: singular + form 0
        "INT_MAX exceeded": "INT_MAX überschritten",   # identifier, not an accelerator
    })
    data = cfg(tmp_path, "gettext", languages=["de"], dev_fraction=0.0, test_fraction=0.0)
    lang_data = read_language(locate(data), "de", data)
    assert sorted(lang_data.splits["train"]) == sorted([
        ("Open", "Öffnen"), ("Save As…", "Speichern unter …"), ("Restore Defaults", "Standard"),
        ("Trailing newline", "Zeilenende"), ("%1$s of %2$s", "%2$s von %1$s"),
        ("%(count)d left", "noch %(count)d"), ("Quit", "Beenden"), ("One file", "Eine Datei"),
        ("INT_MAX exceeded", "INT_MAX überschritten")])
    assert lang_data.dropped == {"untranslated": 2, "multi-line": 1, "placeholders differ": 2,
                                 "over max_chars": 1, "no letters": 1}


def test_gettext_conflicting_translations_majority_then_smallest(tmp_path):
    for i, (close, stop) in enumerate([("Schließen", "Halt"), ("Zumachen", "Stopp"), ("Schließen", "Anhalten")]):
        write_mo(tmp_path / f"de/LC_MESSAGES/app{i}.mo", {"Close": close, "Stop": stop, "Yes": "Ja"})
    data = cfg(tmp_path, "gettext", dev_fraction=0.0, test_fraction=0.0)
    lang_data = read_language(locate(data), "de", data)
    assert lang_data.splits["train"] == [("Close", "Schließen"), ("Stop", "Anhalten"), ("Yes", "Ja")]
    assert lang_data.dropped["duplicate"] == 3  # Schließen once more, Ja twice more
    assert lang_data.dropped["conflicting translation"] == 3


def test_gettext_locale_names_are_languages(tmp_path):
    for lang in ("pt", "pt_BR", "sr@latin", "zh_CN"):
        write_mo(tmp_path / f"{lang}/LC_MESSAGES/a.mo", {"Open the file": f"{lang} open"})
    (tmp_path / "locale.alias").write_text("not a language\n")
    (tmp_path / "fr/LC_MESSAGES").mkdir(parents=True)  # no catalogs: not a language
    layout = locate(cfg(tmp_path, "gettext"))
    assert layout.languages == ["pt", "pt_BR", "sr@latin", "zh_CN"]
    assert layout.sources() == sorted(tmp_path.glob("*/LC_MESSAGES/a.mo"))


def test_gettext_corrupt_catalog_is_skipped_with_a_warning(tmp_path):
    write_mo(tmp_path / "de/LC_MESSAGES/good.mo", {"Open the file": "Datei öffnen"})
    (tmp_path / "de/LC_MESSAGES/bad.mo").write_bytes(b"\x00garbage, not a catalog")
    write_mo(tmp_path / "de/LC_MESSAGES/latin1.mo", {"Stop": "Hält"}, charset="latin-1")  # readable
    data = cfg(tmp_path, "gettext", languages=["de"], dev_fraction=0.0, test_fraction=0.0)
    scan = scan_corpus(locate(data), data)
    assert scan.counts["de"]["train"] == 2
    assert any("bad.mo" in w and "skipped" in w for w in scan.warnings)


def test_gettext_requested_language_without_pairs_is_an_error(tmp_path):
    write_mo(tmp_path / "de/LC_MESSAGES/a.mo", {"Open the file": "Datei öffnen"})
    (tmp_path / "cy/LC_MESSAGES").mkdir(parents=True)
    (tmp_path / "cy/LC_MESSAGES/bad.mo").write_bytes(b"junk")
    data = cfg(tmp_path, "gettext", languages=["de", "cy"], dev_fraction=0.0, test_fraction=0.0)
    with pytest.raises(CorpusError, match=r"language 'cy' has no usable training pairs"):
        scan_corpus(locate(data), data)
    # not requested: skipped with a warning
    scan = scan_corpus(locate(cfg(tmp_path, "gettext", dev_fraction=0.0, test_fraction=0.0)),
                       cfg(tmp_path, "gettext", dev_fraction=0.0, test_fraction=0.0))
    assert scan.languages == ["de"] and any("'cy'" in w for w in scan.warnings)


def test_unknown_language_names_it_and_the_closest(tmp_path):
    write_mo(tmp_path / "de/LC_MESSAGES/a.mo", {"Open": "Öffnen"})
    write_mo(tmp_path / "pt_BR/LC_MESSAGES/a.mo", {"Open": "Abrir"})
    with pytest.raises(CorpusError) as e:
        locate(cfg(tmp_path, "gettext", languages=["de", "pt-BR"]))
    msg = str(e.value)
    assert "'pt-BR'" in msg and "closest: 'pt_BR'" in msg and "de, pt_BR" in msg and str(tmp_path) in msg
    with pytest.raises(CorpusError, match="source side"):
        locate(cfg(tmp_path, "gettext", languages=["en"]))


def test_gettext_hash_split_never_crosses_languages(tmp_path):
    sentences = [f"Message number {i} about files" for i in range(600)]
    for k, lang in enumerate(("de", "fr", "cy")):
        subset = sentences[k * 100:]  # overlapping English across languages
        write_mo(tmp_path / f"{lang}/LC_MESSAGES/a.mo", {s: f"{lang}: {s[::-1]}" for s in subset})
    data = cfg(tmp_path, "gettext", dev_fraction=0.1, test_fraction=0.1, dev_max=30)
    layout = locate(data)
    where: dict[str, set[str]] = {}
    for lang in layout.languages:
        splits = read_language(layout, lang, data).splits
        assert splits == read_language(layout, lang, data).splits  # deterministic
        assert len(splits["dev"]) == 30 and len(splits["test"]) == 30  # capped
        for split, pairs in splits.items():
            for en, _ in pairs:
                where.setdefault(en, set()).add(split)
    assert all(len(s) == 1 for s in where.values())
    # capped pairs are dropped, never moved to train
    in_train = {en for en, s in where.items() if "train" in s}
    assert not any(split_position(en) < 0.2 for en in in_train)
    assert len(where) < 600


def test_hash_split_cap_keeps_lowest_positions_in_order():
    data = DataConfig(dev_fraction=0.5, test_fraction=0.0, dev_max=3)
    pairs = [(f"s{i}", f"t{i}") for i in range(40)]
    splits = hash_split(pairs, data)
    hashed_dev = [p for p in pairs if split_position(p[0]) < 0.5]
    lowest = sorted(hashed_dev, key=lambda p: split_position(p[0]))[:3]
    assert splits["dev"] == [p for p in pairs if p in lowest]  # original order kept
    assert splits["test"] == []
    assert splits["train"] == [p for p in pairs if split_position(p[0]) >= 0.5]
    assert hash_split(pairs, data, carve=["test"])["train"] == pairs  # dev exists elsewhere: stays in train


def test_placeholders_and_accelerators():
    assert placeholders("%s of %1$d, %(name)s {0} {x:.2f} %% 100% done %ld %1") == \
        {"%s": 1, "%d": 1, "%(name)s": 1, "{0}": 1, "{x}": 1, "%ld": 1, "%1": 1}
    assert placeholders("%2$s von %1$s") == placeholders("%s of %s")
    assert placeholders("{{literal}}") == {}
    assert strip_accelerators("&File", "&Datei") == ("File", "Datei")
    assert strip_accelerators("Pre_ferences", "_Einstellungen") == ("Preferences", "Einstellungen")
    assert strip_accelerators("proc_info failed", "proc_info fehlgeschlagen") == \
        ("proc_info failed", "proc_info fehlgeschlagen")
    assert strip_accelerators("AT&T modem", "Modem von AT&T") == ("AT&T modem", "Modem von AT&T")
    assert strip_accelerators("GREP_COLOR or GREP_OPTIONS", "x") == ("GREP_COLOR or GREP_OPTIONS", "x")
    assert strip_accelerators("_Open", "打开(_O)") == ("Open", "打开")


# --------------------------------------------------------------------------- plain


def test_plain_reads_splits_and_discovers_languages(tmp_path):
    for lang in ("de", "fr"):
        for split, n in (("train", 20), ("dev", 3), ("test", 4)):
            en = english(n, split)
            write_pair(tmp_path, f"{split}.en-{lang}.en", f"{split}.en-{lang}.{lang}", en, foreign(en, lang))
    data = cfg(tmp_path, "plain")
    layout = locate(data)
    assert layout.languages == ["de", "fr"] and len(layout.sources()) == 12 and not layout.warnings
    splits = all_pairs(layout, "fr", data)
    assert {s: len(p) for s, p in splits.items()} == {"train": 20, "dev": 3, "test": 4}
    assert splits["dev"][1] == ("dev number 1 is here", "fr ereh si 1 rebmun ved")


def test_plain_missing_dev_test_is_hash_carved(tmp_path):
    en = english(400)
    write_pair(tmp_path, "train.en-de.en", "train.en-de.de", en, foreign(en, "de"))
    write_pair(tmp_path, "test.en-de.en", "test.en-de.de", english(5, "t"), foreign(english(5, "t"), "de"))
    data = cfg(tmp_path, "plain", dev_fraction=0.1, test_fraction=0.1, dev_max=1000)
    layout = locate(data)
    assert any("no dev files for de" in w and "hash" in w for w in layout.warnings)
    splits = all_pairs(layout, "de", data)
    assert len(splits["test"]) == 5  # from its file
    assert 15 < len(splits["dev"]) < 70 and len(splits["train"]) + len(splits["dev"]) == 400


def test_plain_empty_lines_unicode_separators_and_bom(tmp_path):
    en = ["\ufeffFirst line", "", "Second\u2028still second", "Third  ", "Fourth"]
    xx = ["Erste", "Leer", "Zweite\u2028noch", "Dritte", "   "]
    write_pair(tmp_path, "train.en-de.en", "train.en-de.de", en, xx)
    data = cfg(tmp_path, "plain", dev_fraction=0.0, test_fraction=0.0)
    layout = locate(data)
    lang_data = read_language(layout, "de", data)
    assert lang_data.splits["train"] == [("First line", "Erste"), ("Second\u2028still second", "Zweite\u2028noch"),
                                         ("Third", "Dritte")]
    assert lang_data.warnings == ["de: dropped 2 pairs with an empty side"]


def test_plain_non_utf8_names_file_and_line(tmp_path):
    write_pair(tmp_path, "train.en-de.en", "train.en-de.de", ["a b", "c d", "e f"], ["x", "y", "z"])
    (tmp_path / "train.en-de.de").write_bytes(b"eins\nzwei\ndr\xe4i\n")
    data = cfg(tmp_path, "plain")
    with pytest.raises(CorpusError, match=r"train\.en-de\.de:3: not valid UTF-8 \(byte 0xe4 at column 3"):
        read_language(locate(data), "de", data)


def test_plain_line_count_mismatch_names_both_files(tmp_path):
    write_pair(tmp_path, "train.en-de.en", "train.en-de.de", ["a", "b", "c"], ["x", "y"])
    data = cfg(tmp_path, "plain")
    with pytest.raises(CorpusError) as e:
        read_language(locate(data), "de", data)
    msg = str(e.value)
    assert f"{tmp_path / 'train.en-de.en'} has 3 lines" in msg and f"{tmp_path / 'train.en-de.de'} has 2" in msg


def test_plain_missing_counterpart_and_no_files(tmp_path):
    write_pair(tmp_path, "train.en-de.en", "train.en-de.de", ["a"], ["x"])
    (tmp_path / "dev.en-de.en").write_text("a\n")
    with pytest.raises(CorpusError, match=r"dev\.en-de\.en has no parallel file: expected .*dev\.en-de\.de"):
        locate(cfg(tmp_path, "plain"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CorpusError, match=f"{empty}: no plain files found"):
        locate(cfg(tmp_path, "plain", raw=empty))
    with pytest.raises(CorpusError, match="no such directory"):
        locate(cfg(tmp_path, "plain", raw=tmp_path / "nope"))


def test_corpus_without_any_pair_is_an_error_naming_the_root(tmp_path):
    write_pair(tmp_path, "train.en-de.en", "train.en-de.de", ["", "a", " "], ["x", "", "z"])
    data = cfg(tmp_path, "plain")
    with pytest.raises(CorpusError, match=f"{tmp_path}: no usable pairs in any language"):
        scan_corpus(locate(data), data)


def test_max_chars_applies_to_text_corpora(tmp_path):
    write_pair(tmp_path, "train.en-de.en", "train.en-de.de", ["short", "long " * 20], ["kurz", "lang"])
    data = cfg(tmp_path, "plain", max_chars=50, dev_fraction=0.0, test_fraction=0.0)
    lang_data = read_language(locate(data), "de", data)
    assert lang_data.splits["train"] == [("short", "kurz")] and lang_data.dropped == {"over max_chars": 1}


# --------------------------------------------------------------------------- OPUS-100


def make_opus(root: Path) -> Path:
    sup = root / "opus-100-corpus/v1.0/supervised"
    for lang in ("fr", "de", "an"):
        pair = f"en-{lang}" if lang > "en" else f"{lang}-en"
        splits = ("train",) if lang == "an" else ("train", "dev", "test")
        for split in splits:
            en = english(6, f"{lang} {split}")
            write_pair(sup, f"{pair}/opus.{pair}-{split}.en", f"{pair}/opus.{pair}-{split}.{lang}", en,
                       foreign(en, lang))
    write_pair(root / "opus-100-corpus/v1.0/zero-shot", "de-fr/opus.de-fr-test.de",
               "de-fr/opus.de-fr-test.fr", ["x"], ["y"])
    return sup


@pytest.mark.parametrize("sub", ["", "opus-100-corpus", "opus-100-corpus/v1.0", "opus-100-corpus/v1.0/supervised"])
def test_opus100_roots_pair_order_and_missing_dev(tmp_path, sub):
    make_opus(tmp_path)
    data = cfg(tmp_path, "opus100", raw=tmp_path / sub)
    layout = locate(data)
    assert layout.languages == ["an", "de", "fr"]
    assert layout.texts["de"]["train"][1].name == "opus.de-en-train.de"
    assert layout.texts["fr"]["dev"][0].name == "opus.en-fr-dev.en"
    assert "dev" not in layout.texts["an"] and "test" not in layout.texts["an"]
    assert any("no dev files for an" in w for w in layout.warnings)
    scan = scan_corpus(layout, data)
    assert scan.counts["an"] == {"train": 6, "dev": 0, "test": 0}
    assert scan.counts["de"] == {"train": 6, "dev": 6, "test": 6}


# --------------------------------------------------------------------------- TED8


def test_ted8_presets_and_valid_is_dev(tmp_path):
    for lang in ("aze", "bel"):
        for split in ("train", "dev", "test"):
            for infix in ("orig", "mtok"):
                en = english(5, f"{infix} {split}")
                write_pair(tmp_path, f"{lang}_eng/ted-{split}.{infix}.eng",
                           f"{lang}_eng/ted-{split}.{infix}.{lang}", en, foreign(en, lang))
    auto = cfg(tmp_path, "ted8")
    layout = locate(auto)
    assert layout.languages == ["aze", "bel"] and "preset 'orig'" in layout.warnings[0]
    assert all_pairs(layout, "aze", auto)["dev"][0][0] == "orig dev number 0 is here"
    mtok = cfg(tmp_path, "ted8", pattern="mtok", languages=["bel"])
    assert all_pairs(locate(mtok), "bel", mtok)["test"][0][0] == "mtok test number 0 is here"

    raw = tmp_path / "other"
    for split in ("train", "valid", "test"):
        en = english(4, split)
        write_pair(raw, f"raw/glg_en/{split}.en", f"raw/glg_en/{split}.glg", en, foreign(en, "glg"))
    for pattern in ("raw", None, "raw/{l2e}/{split}.{side}", "raw/{lang}_{en}/{split}.{side}"):
        data = cfg(tmp_path, "ted8", raw=raw, pattern=pattern)
        splits = all_pairs(locate(data), "glg", data)
        assert splits["dev"][0][0] == "valid number 0 is here" and len(splits["test"]) == 4


def test_ted8_bad_pattern_and_nothing_found(tmp_path):
    with pytest.raises(CorpusError, match=r"needs \{lang\}, \{split\} and \{side\}.*presets: orig, raw"):
        locate(cfg(tmp_path, "ted8", pattern="{lang}/ted-{split}.txt"))
    with pytest.raises(CorpusError, match=r"no ted8 files found; expected .*ted-\{split\}\.orig"):
        locate(cfg(tmp_path, "ted8"))
    with pytest.raises(CorpusError, match="data.pattern is for corpus ted8 only"):
        locate(cfg(tmp_path, "plain", pattern="orig"))


# --------------------------------------------------------------------------- WMT


def test_wmt_mbart_codes_both_directions_and_iso(tmp_path):
    for split in ("train", "valid", "test"):
        en = english(3, split)
        write_pair(tmp_path, f"{split}.en_XX-de_DE.en_XX", f"{split}.en_XX-de_DE.de_DE", en, foreign(en, "de"))
        write_pair(tmp_path, f"{split}.kk_KZ-en_XX.en_XX", f"{split}.kk_KZ-en_XX.kk_KZ", en, foreign(en, "kk"))
    write_pair(tmp_path, "train.en-vi.en", "train.en-vi.vi", ["hello"], ["xin chào"])
    data = cfg(tmp_path, "wmt")
    layout = locate(data)
    assert layout.languages == ["de", "kk", "vi"]
    assert layout.texts["kk"]["dev"][1].name == "valid.kk_KZ-en_XX.kk_KZ"
    assert all_pairs(layout, "de", data)["dev"][0] == ("valid number 0 is here", "de ereh si 0 rebmun dilav")
    assert "dev" not in layout.texts["vi"]
    assert mbart_to_iso("zh_CN") == "zh" and mbart_to_iso("en") == "en" and mbart_to_iso("sr@latin") == "sr@latin"


def test_wmt_two_codes_for_one_language_is_an_error(tmp_path):
    write_pair(tmp_path, "train.en_XX-de_DE.en_XX", "train.en_XX-de_DE.de_DE", ["a"], ["b"])
    write_pair(tmp_path, "train.en-de.en", "train.en-de.de", ["a"], ["b"])
    with pytest.raises(CorpusError, match="'de' and 'de_DE' map to language 'de'"):
        locate(cfg(tmp_path, "wmt"))


def test_max_train_pairs_caps_train_and_fills_dev_test(tmp_path):
    sentences = [f"Message number {i} about the files here" for i in range(400)]
    for lang in ("de", "cy"):
        write_mo(tmp_path / f"{lang}/LC_MESSAGES/a.mo", {s: f"{lang} words: {s[::-1]}" for s in sentences})
    data = cfg(tmp_path, "gettext", dev_fraction=0.05, test_fraction=0.05, dev_max=60,
               max_train_pairs={"cy": 100})
    layout = locate(data)
    de = read_language(layout, "de", data).splits
    cy_data = read_language(layout, "cy", data)
    cy = cy_data.splits
    assert cy == read_language(layout, "cy", data).splits  # deterministic
    assert len(cy["train"]) == 100 and len(de["train"]) > 300  # only the named language is capped
    # train keeps the pairs of lowest English hash among de's train sentences
    de_train = {en for en, _ in de["train"]}
    assert {en for en, _ in cy["train"]} <= de_train
    assert max(split_position(en) for en, _ in cy["train"]) <= min(
        split_position(en) for en in de_train - {en for en, _ in cy["train"]})
    # freed pairs fill dev and test up to dev_max; the split's own pairs come first
    assert len(cy["dev"]) == 60 and len(cy["test"]) == 60
    assert cy["dev"][:len(de["dev"])] == [(en, f"cy words: {en[::-1]}") for en, _ in de["dev"]]
    # no English sentence in two splits of one language; the rest is counted as dropped
    seen = [en for split in ("train", "dev", "test") for en, _ in cy[split]]
    assert len(seen) == len(set(seen))
    assert cy_data.dropped["over max_train_pairs"] == len(de["train"]) - 100 - (120 - len(de["dev"]) - len(de["test"]))


def test_max_train_pairs_checks_its_languages(tmp_path):
    from cats_ds.data.prepare import PrepareError, check_settings
    with pytest.raises(PrepareError, match=r"data.max_train_pairs.xx"):
        check_settings(DataConfig(languages=["de"], max_train_pairs={"xx": 10}))
    with pytest.raises(PrepareError, match=r"data.max_train_pairs.de must be >= 1"):
        check_settings(DataConfig(languages=["de"], max_train_pairs={"de": 0}))
