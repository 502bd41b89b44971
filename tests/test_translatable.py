"""The translatable dev/test filter (cats_ds/data/translatable.py) on hand-made catalog lines,
alone and inside the gettext / plain readers and `prepare`."""

from __future__ import annotations

import pytest

from cats_ds.config import DataConfig, config_from_dict
from cats_ds.data.prepare import prepare
from cats_ds.data.readers import locate, read_language, split_position
from cats_ds.data.translatable import count_words, residue, untranslatable
from test_readers import write_mo

# (target, rule that drops it or "" to keep): one kept and one dropped case per removal
CASES = [
    # format placeholders
    ("%s: %s", "letters"),
    ("%1$s (%2$d)", "letters"),
    ("%(name)s %(count)d", "letters"),
    ("{name}: {0}", "letters"),
    ("Datei %s nicht gefunden", ""),
    ("Datei {filename} gelöscht", ""),
    ("%s Datei", "words"),                      # one word left
    # command-line options
    ("--help", "letters"),
    ("--output=FILE -v", "letters"),
    ("-x, --exclude", "letters"),
    ("--verbose ausführlich", "words"),
    ("--no-slot  keinen Slot erzeugen", ""),
    ("E-Mail senden", ""),                      # a hyphen inside a word is not an option
    # paths and URLs
    ("/usr/share/locale", "letters"),
    ("~/.config/app/settings.ini", "letters"),
    ("https://www.gnu.org/licenses/", "letters"),
    ("Siehe https://gnu.org für Details", ""),
    ("Datei ./run.sh", "words"),
    ("user@example.org", "letters"),
    # markup
    ("<b>%d</b>", "letters"),
    ("&amp; &lt;", "letters"),
    ("<b>Fett</b>", "words"),
    ("<i>Keine Verbindung</i>", ""),
    # numbers
    ("3.14", "letters"),
    ("1,000 / 10:30", "letters"),
    ("100 Einträge", "words"),
    ("Seite 3 von 10", ""),
    # plain too short
    ("Ja", "letters"),
    ("TiB", "letters"),
    ("Dateisystem", "words"),
    ("Datei öffnen", ""),
    # unspaced scripts: every letter counts as a word
    ("打开文件", ""),
    ("打开", "letters"),
]


@pytest.mark.parametrize("target,rule", CASES)
def test_rule_on_hand_made_catalog_lines(target, rule):
    assert untranslatable(target) == rule, residue(target)


def test_thresholds_are_settings():
    assert untranslatable("Datei", min_letters=4, min_words=1) == ""
    assert untranslatable("Datei öffnen", min_letters=12) == "letters"
    assert untranslatable("Datei öffnen jetzt", min_words=4) == "words"
    assert count_words(residue("Datei %s öffnen 42 ..")) == 2 and count_words("打开 file") == 3


def test_gettext_dev_test_filtered_before_the_cap_train_keeps_them(tmp_path):
    """Untranslatable dev/test pairs are dropped (not moved to train) before dev_max
    applies, so the cap counts translatable pairs; train keeps its own untranslatable
    pairs unless data.translatable_train."""
    entries = {}
    for i in range(300):
        entries[f"Open the file number {i} now"] = f"Datei Nummer {i} jetzt öffnen"
        entries[f"%s: no. {i}"] = f"%s: Nr. {i}"  # two letters once placeholder and number go
    write_mo(tmp_path / "de/LC_MESSAGES/a.mo", entries)
    data = DataConfig(corpus="gettext", raw=str(tmp_path), dev_fraction=0.2, test_fraction=0.2, dev_max=40)
    layout = locate(data)
    ld = read_language(layout, "de", data)
    for split in ("dev", "test"):
        assert len(ld.splits[split]) == 40 and all(untranslatable(xx) == "" for _, xx in ld.splits[split])
    carved = sum(split_position(en) < 0.4 for en in entries if en.startswith("%s"))
    assert ld.untranslatable == {"letters": carved} and carved > 50
    assert sum(untranslatable(xx) == "letters" for _, xx in ld.splits["train"]) == 300 - carved
    trained_en = {en for en, _ in ld.splits["train"]}
    assert not any(split_position(en) < 0.4 for en in trained_en)  # nothing moved from dev/test to train

    strict = read_language(layout, "de", DataConfig(**{**data.__dict__, "translatable_train": True}))
    assert all(untranslatable(xx) == "" for _, xx in strict.splits["train"])
    assert strict.untranslatable["letters"] == 300
    off = read_language(layout, "de", DataConfig(**{**data.__dict__, "translatable_eval": False}))
    assert not off.untranslatable and any(untranslatable(xx) for _, xx in off.splits["test"])


def test_plain_corpus_only_on_request_and_prepare_counts_per_rule(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    en = [f"open the file number {i} now" for i in range(120)]
    xx = [f"öffne die Datei {i} jetzt" for i in range(120)]
    dev_en, dev_xx = ["open it", "the size", "see %s", "read the file"], ["öffnen", "%d", "siehe %s", "lies die Datei"]
    for split, e, x in (("train", en, xx), ("dev", dev_en, dev_xx), ("test", dev_en, dev_xx)):
        (raw / f"{split}.en-de.en").write_text("\n".join(e) + "\n", encoding="utf-8")
        (raw / f"{split}.en-de.de").write_text("\n".join(x) + "\n", encoding="utf-8")
    data = {"corpus": "plain", "raw": str(raw), "vocab_size": 45, "character_coverage": 1.0}
    default = prepare(config_from_dict({"data": {**data, "dir": str(tmp_path / "a")}}))
    assert default.pairs["dev"]["de"] == 4  # off for plain corpora by default
    assert "<4 letters" not in capsys.readouterr().out
    on = prepare(config_from_dict({"data": {**data, "dir": str(tmp_path / "b"), "translatable_eval": True}}))
    assert on.pairs["dev"]["de"] == on.pairs["test"]["de"] == 1 and on.pairs["train"]["de"] == 120
    out = capsys.readouterr().out
    head, row = [line for line in out.splitlines() if line.startswith(("language", "de "))]
    assert head.split()[-4:] == ["<4", "letters", "<2", "words"]
    assert row.split()[-2:] == ["2", "4"]  # dev + test: %d twice; öffnen and siehe %s twice each
    assert "2 with <4 letters left, 4 with <2 words left" in out
    assert (tmp_path / "b" / "dev.en-de.de.txt").read_text(encoding="utf-8") == "lies die Datei\n"
