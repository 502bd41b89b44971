"""launch/compare.py: seeds per label, mean ± sd, paired bootstrap marks, on hand-made evaluations."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from cats_ds.cli import compare_main
from cats_ds.compare import compare_paths, format_comparison, paired_bootstrap, parse_runs, sentence_stats
from cats_ds.evaluate import EvalError, corpus_scores, metrics

WORDS = ("haus katze hund baum licht wasser stein feuer nacht tag stadt weg buch tür fenster mond stern fluss "
         "rot blau grün alt neu groß klein schläft läuft isst").split()
GROUP = {"aa": "Hi", "bb": "Lo"}


def references(lang: str, n: int = 150) -> tuple[list[str], list[str]]:
    rng = random.Random(lang)
    refs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))) for _ in range(n)]
    return [f"english {i} source" for i in range(n)], refs


def corrupt(refs: list[str], rate: float, seed: int) -> list[str]:
    """Each word replaced by a random one with probability `rate`."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) if rng.random() < rate else w for w in r.split()) for r in refs]


def write_eval(folder: Path, rate: float, seed: int, langs=("aa", "bb")) -> Path:
    """An evaluate folder whose hypotheses are the references with `rate` of words replaced."""
    folder.mkdir(parents=True)
    report = {"languages": {}, "averages": {}, "settings": {"split": "test", "step": 10}}
    for k, lang in enumerate(langs):
        srcs, refs = references(lang)
        hyps = corrupt(refs, rate, seed * 100 + k)
        s, c = corpus_scores(hyps, refs, "13a"), corpus_scores(srcs, refs, "13a")
        report["languages"][lang] = {"bleu": s.bleu, "chrf": s.chrf, "copy_bleu": c.bleu, "copy_chrf": c.chrf,
                                     "tokenize": "13a", "n": len(refs), "group": GROUP[lang], "train_pairs": 0}
        for kind, lines in (("hyp", hyps), ("ref", refs), ("src", srcs)):
            (folder / f"{kind}.en-{lang}.txt").write_text("".join(x + "\n" for x in lines), encoding="utf-8")
    (folder / "bleu.json").write_text(json.dumps(report))
    return folder


@pytest.fixture
def runs(tmp_path) -> dict[str, list[str]]:
    """base: 40% of words wrong; better: 15%; noise: 40% again, other random draws. Two seeds each."""
    return {name: [str(write_eval(tmp_path / f"{name}{s}", rate, seed=10 * k + s)) for s in (1, 2)]
            for k, (name, rate) in enumerate((("base", 0.4), ("better", 0.15), ("noise", 0.4)))}


def test_clearly_better_is_marked_noise_is_not(runs):
    result = compare_paths([f"{label}={','.join(paths)}" for label, paths in runs.items()], baseline="base")
    for key in ("chrf", "bleu"):
        table = result["metrics"][key]
        for unit in ("aa", "bb", "Hi", "Lo", "All"):
            better, noise = table[unit]["better"], table[unit]["noise"]
            assert better["significant"] and better["p"] < 0.01 and better["pooled_delta"] > 5, (key, unit)
            assert not noise["significant"] and noise["p"] > 0.05, (key, unit, noise)
            assert "p" not in table[unit]["base"]
    text = format_comparison(result)
    row = next(line for line in text.splitlines() if line.startswith("| **All**"))
    assert row.count("*") == 4 + 1  # the bold group name, and one mark: better's
    assert row.split("|")[4].strip().endswith("*") and not row.split("|")[5].strip().endswith("*")


def test_mean_sd_over_seeds_and_copy_column(runs):
    result = compare_paths(["base=" + runs["base"][0], "base=" + runs["base"][1]])  # a repeated label
    reports = [json.loads((Path(p) / "bleu.json").read_text()) for p in runs["base"]]
    per_seed = [r["languages"]["aa"]["chrf"] for r in reports]
    entry = result["metrics"]["chrf"]["aa"]["base"]
    assert entry["seeds"] == per_seed and entry["mean"] == pytest.approx(np.mean(per_seed))
    assert entry["sd"] == pytest.approx(np.std(per_seed, ddof=1)) and entry["sd"] > 0
    group = result["metrics"]["bleu"]["All"]["base"]
    assert group["mean"] == pytest.approx(np.mean([np.mean([r["languages"][l]["bleu"] for l in ("aa", "bb")])
                                                   for r in reports]))
    assert result["metrics"]["chrf"]["bb"]["copy"] == reports[0]["languages"]["bb"]["copy_chrf"]
    assert "significant" not in entry and "no --baseline" in format_comparison(result)
    assert "warning" not in format_comparison(result)
    result["metrics"]["chrf"]["Lo"]["copy"] = 99.0
    assert "warning: base does not beat the copy baseline on Lo (chrF++ " in format_comparison(result)
    one = compare_paths(["base=" + runs["base"][0]])
    assert one["metrics"]["chrf"]["aa"]["base"]["sd"] is None
    assert f"| en-aa | {reports[0]['languages']['aa']['copy_chrf']:.2f} | {per_seed[0]:.2f} |" in \
        format_comparison(one)


def test_seed_average_equals_concatenated_hypotheses():
    """Averaging the seeds' sentence statistics scores like the concatenation of their hypotheses."""
    _, refs = references("aa", 40)
    a, b = corrupt(refs, 0.3, 1), corrupt(refs, 0.3, 2)
    for m in metrics("13a"):
        avg = sentence_stats(m, [a, b], refs).sum(0)
        assert m._compute_score_from_stats(avg).score == pytest.approx(m.corpus_score(a + b, [refs + refs]).score)


def test_paired_bootstrap_is_antisymmetric_and_self_is_not_significant():
    _, refs = references("bb", 80)
    m = metrics("13a")[1]
    x, y = (sentence_stats(m, [corrupt(refs, r, 5)], refs) for r in (0.2, 0.5))
    d_xy, p_xy = paired_bootstrap(m, x, y)
    d_yx, p_yx = paired_bootstrap(m, y, x)
    assert d_xy == pytest.approx(-d_yx) and d_xy > 0 and p_xy == p_yx
    assert paired_bootstrap(m, x, x) == (0.0, 1.0)


def test_cli_writes_markdown_and_json_and_names_mismatches(runs, tmp_path, capsys):
    out = tmp_path / "cmp.md"
    compare_main(["--baseline", "base", "--out", str(out), "--resamples", "200", "--", "base=" + runs["base"][0],
                  "-better=" + runs["better"][0]])
    assert "### chrF++ (test; seeds: base 1, -better 1)" in capsys.readouterr().out
    assert out.read_text().startswith("### chrF++") and json.loads(out.with_suffix(".json").read_text())["resamples"] == 200
    assert parse_runs(["A=x,y", "B=z", "A=w"]) == {"A": ["x", "y", "w"], "B": ["z"]}
    with pytest.raises(EvalError, match="--baseline nope: no such label; labels: base"):
        compare_paths(["base=" + runs["base"][0]], baseline="nope")
    other = write_eval(tmp_path / "short", 0.4, seed=1, langs=("aa",))
    with pytest.raises(EvalError, match=f"short.*evaluated on \\['aa'\\]"):
        compare_paths(["base=" + runs["base"][0], f"x={other}"])
    refs = Path(runs["noise"][1]) / "ref.en-bb.txt"
    refs.write_text(refs.read_text().replace("haus", "maus"))
    with pytest.raises(EvalError, match="en-bb references differ"):
        compare_paths(["base=" + runs["base"][0], "noise=" + runs["noise"][1]])
    with pytest.raises(SystemExit):
        compare_main(["base=" + str(tmp_path / "missing")])
    assert "no evaluation at" in capsys.readouterr().err


def test_sacrebleu_private_methods_guarded_and_pinned(monkeypatch):
    """compare reads sentence statistics through sacreBLEU's private methods: setup.py pins
    an upper bound, and a sacreBLEU without them gets an error naming the version to install."""
    import re

    import sacrebleu
    from sacrebleu.metrics import CHRF

    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    pin = re.search(r'"sacrebleu>=2\.3,<(\d+)\.(\d+)"', setup)
    assert pin, "setup.py must pin an upper bound on sacrebleu"
    major, minor = map(int, sacrebleu.__version__.split(".")[:2])
    assert (major, minor) < (int(pin[1]), int(pin[2]))  # the installed one is inside the pin
    _, refs = references("aa", 5)
    sentence_stats(metrics("13a")[1], [refs], refs)  # works as installed
    monkeypatch.setattr(CHRF, "_extract_corpus_statistics", None)  # (defined on sacreBLEU's Metric base class)
    with pytest.raises(EvalError, match=r"sacreBLEU .* has no CHRF._extract_corpus_statistics.*pip install 'sacrebleu>=2.3,<2.7'"):
        sentence_stats(metrics("13a")[1], [refs], refs)


def test_every_command_has_a_console_script():
    """Each *_main of cats_ds/cli.py is a console script of setup.py (cats-compare among them)."""
    import inspect
    import re

    from cats_ds import cli

    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    scripts = dict(re.findall(r'"(cats-[a-z-]+)=cats_ds\.cli:(\w+)"', setup))
    mains = {name for name, f in inspect.getmembers(cli, inspect.isfunction) if name.endswith("_main")}
    assert set(scripts.values()) == mains
    assert scripts["cats-compare"] == "compare_main"
