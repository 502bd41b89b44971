"""launch/compare.py: seeds per label, mean ± sd, hierarchical bootstrap marks (seeds, then
sentences; macro-averaged groups stratified by language; Holm), on hand-made evaluations."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from cats_ds.cli import compare_main
from cats_ds.inference.evaluate import EvalError, corpus_scores, metrics
from cats_ds.reports.compare import (compare_paths, format_comparison, hierarchical_bootstrap, holm, paired_bootstrap,
                                     parse_runs, seed_stats, sentence_stats)

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


def write_eval(folder: Path, rate: float | dict, seed: int, langs=("aa", "bb"), sizes: dict | None = None) -> Path:
    """An evaluate folder whose hypotheses are the references with `rate` (or rate[lang]) of
    words replaced; sizes[lang] test sentences (default 150)."""
    folder.mkdir(parents=True)
    report = {"languages": {}, "averages": {}, "settings": {"split": "test", "step": 10}}
    for k, lang in enumerate(langs):
        srcs, refs = references(lang, (sizes or {}).get(lang, 150))
        hyps = corrupt(refs, rate[lang] if isinstance(rate, dict) else rate, seed * 100 + k)
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
            assert better["significant"] and better["p_adjusted"] < 0.01 and better["delta"] > 5, (key, unit)
            assert not noise["significant"] and noise["p_adjusted"] > 0.05, (key, unit, noise)
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
    report = json.loads((Path(runs["noise"][1]) / "bleu.json").read_text())
    report["settings"].update(limit=150, limit_order="sha256 of the English source")
    (Path(runs["noise"][1]) / "bleu.json").write_text(json.dumps(report))
    with pytest.raises(EvalError, match="en-bb references differ.*--limit samples differ: 150 by sha256 of the "
                                        "English source vs None by first sentences"):
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
    """Each *_main of cats_ds/cli.py is a console script of setup.py (cats-compare among them),
    directly or through its *_script (the commands that run under the DeepSpeed launcher)."""
    import inspect
    import re

    from cats_ds import cli

    setup = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    scripts = dict(re.findall(r'"(cats-[a-z0-9-]+)=cats_ds\.cli:(\w+)"', setup))
    functions = dict(inspect.getmembers(cli, inspect.isfunction))
    assert set(scripts.values()) <= set(functions)
    mains = {name for name in functions if name.endswith("_main")}
    assert {re.sub(r"_script$", "_main", target) for target in scripts.values()} == mains
    assert {t for t in scripts.values() if t.endswith("_script")} == {"train_script", "evaluate_script",
                                                                     "analyze_script"}
    assert scripts["cats-compare"] == "compare_main"


# --------------------------------------------------------------------------- the hierarchical test


def seeded(refs: list[str], rates: tuple[float, ...], seed: int) -> list[list[str]]:
    """One hypothesis set per seed, the i-th with rates[i] of its words replaced."""
    return [corrupt(refs, r, seed + i) for i, r in enumerate(rates)]


def test_hierarchical_bootstrap_finds_a_real_difference():
    """Three seeds each, the seeds of each method close together, the methods far apart."""
    _, refs = references("aa", 300)
    for m in metrics("13a"):
        a = seed_stats(m, seeded(refs, (0.10, 0.12, 0.14), 10), refs)
        b = seed_stats(m, seeded(refs, (0.30, 0.32, 0.28), 20), refs)
        r = hierarchical_bootstrap(m, {"aa": a}, {"aa": b})
        assert r["delta"] > 10 and r["p"] < 0.01 and 0 < r["ci95"][0] < r["delta"] < r["ci95"][1]
        per_seed = [[m.corpus_score(h, [refs]).score for h in hs] for hs in
                    (seeded(refs, (0.10, 0.12, 0.14), 10), seeded(refs, (0.30, 0.32, 0.28), 20))]
        assert r["delta"] == pytest.approx(np.mean(per_seed[0]) - np.mean(per_seed[1]))  # the table's means
        rev = hierarchical_bootstrap(m, {"aa": b}, {"aa": a})
        assert rev["delta"] == pytest.approx(-r["delta"]) and rev["p"] < 0.01
        assert hierarchical_bootstrap(m, {"aa": a}, {"aa": a})["p"] == 1.0
        with pytest.raises(EvalError, match="en-aa: 300 vs 10 sentences"):
            hierarchical_bootstrap(m, {"aa": a}, {"aa": b[:, :10]})


def test_seed_variance_hides_a_difference_the_seed_averaged_test_marks():
    """One method's two seeds scatter (10% and 40% of words wrong) around the other's (30%, 30%):
    the seed-averaged systems differ on these 400 sentences (old test: p = 0.001), the methods
    do not (a re-run could land either way)."""
    _, refs = references("aa", 400)
    m = metrics("13a")[1]
    a, b = seeded(refs, (0.10, 0.40), 10), seeded(refs, (0.30, 0.30), 20)
    delta, p_old = paired_bootstrap(m, sentence_stats(m, a, refs), sentence_stats(m, b, refs))
    assert delta > 5 and p_old < 0.01
    new = hierarchical_bootstrap(m, {"aa": seed_stats(m, a, refs)}, {"aa": seed_stats(m, b, refs)})
    assert new["delta"] == pytest.approx(delta, abs=0.1) and new["p"] > 0.2 and new["ci95"][0] < 0 < new["ci95"][1]


def test_group_is_macro_average_stratified_where_pooling_disagrees(tmp_path):
    """Hi (600 sentences): A a little worse than B; Lo (40 sentences): A much better. The
    pooled corpus is 94% Hi, so pooling says A is worse; the rows (per-language means) and the
    new group test say A is better on All, by the difference of the rows."""
    sizes = {"aa": 600, "bb": 40}
    runs = {name: [str(write_eval(tmp_path / f"{name}{s}", rate, seed=10 * k + s, sizes=sizes)) for s in (1, 2, 3)]
            for k, (name, rate) in enumerate((("A", {"aa": 0.30, "bb": 0.05}), ("B", {"aa": 0.22, "bb": 0.45})))}
    result = compare_paths([f"{label}={','.join(paths)}" for label, paths in runs.items()], baseline="B")
    m = metrics("13a")[1]
    from cats_ds.reports.compare import load_evaluation
    ev = {label: [load_evaluation(p) for p in paths] for label, paths in runs.items()}
    pooled = {label: np.concatenate([sentence_stats(m, [e.hyps[l] for e in ev[label]], ev[label][0].refs[l])
                                     for l in ("aa", "bb")]) for label in ev}
    pooled_delta, pooled_p = paired_bootstrap(m, pooled["A"], pooled["B"])
    assert pooled_delta < -3 and pooled_p < 0.01  # the old group test: A significantly worse
    row = result["metrics"]["chrf"]["All"]
    assert row["A"]["mean"] > row["B"]["mean"] + 5  # the table: A better
    assert row["A"]["delta"] == pytest.approx(row["A"]["mean"] - row["B"]["mean"], abs=1e-6)
    assert row["A"]["significant"] and row["A"]["ci95"][0] > 0
    assert result["metrics"]["chrf"]["aa"]["A"]["delta"] < 0 and result["metrics"]["chrf"]["bb"]["A"]["delta"] > 20
    assert result["groups"] == {"Lo": ["bb"], "Hi": ["aa"], "All": ["aa", "bb"]}
    assert "All = macro-average of aa, bb. Test sentences: aa 600, bb 40" in format_comparison(result)


def test_holm_on_known_p_values():
    # sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.6]) == [1.0, 1.0] and holm([0.2]) == [0.2] and holm([]) == []
    assert holm([0.01, 0.01, 0.02]) == pytest.approx([0.03, 0.03, 0.03])


@pytest.fixture
def three(tmp_path) -> dict[str, list[str]]:
    """base 3 seeds at 40%, better 3 seeds at 15%, noise 2 seeds at 40%."""
    return {name: [str(write_eval(tmp_path / f"{name}{s}", rate, seed=10 * k + s)) for s in range(1, seeds + 1)]
            for k, (name, rate, seeds) in enumerate((("base", 0.4, 3), ("better", 0.15, 3), ("noise", 0.4, 2)))}


def test_primary_family_holm_marks_warnings_and_named_method(three):
    items = [f"{label}={','.join(paths)}" for label, paths in three.items()]
    result = compare_paths(items, baseline="base", primary="better:noise", resamples=300)
    for key in ("chrf", "bleu"):
        comps = result["comparisons"][key]
        prim = [c for c in comps if c["family"] == "primary"]
        sec = [c for c in comps if c["family"] == "secondary"]
        assert [(c["system"], c["other"], c["unit"]) for c in prim] == [("better", "noise", u) for u in ("Lo", "Hi", "All")]
        assert comps[:3] == prim  # reported first
        assert len(sec) == 2 * 5 and {c["other"] for c in sec} == {"base"}
        for fam in (prim, sec):
            assert [c["p_adjusted"] for c in fam] == pytest.approx(holm([c["p"] for c in fam]))
            assert all(c["significant"] == (c["p_adjusted"] < 0.05) for c in fam)
        assert all(c["significant"] for c in prim)
        cell = result["metrics"][key]["All"]["better"]
        assert cell["family"] == "secondary" and cell["p_adjusted"] >= cell["p"]
    assert result["test"]["name"] == "hierarchical bootstrap" and result["test"]["correction"] == "Holm"
    assert result["warnings"] == ["noise has 2 seed(s): fewer than 3 for a headline arm, so the test sees little "
                                  "of its seed variance"]
    text = format_comparison(result)
    assert text.startswith("### Primary comparisons, chrF++ (test; hierarchical bootstrap, Holm over 3)")
    assert "| better vs noise | All | +" in text and "warning: noise has 2 seed(s)" in text
    assert "Test: hierarchical bootstrap: each label's seeds resampled with replacement" in text
    assert "Holm-adjusted p < 0.05" in text

    # a primary pair against the baseline: its group rows leave the secondary family
    result = compare_paths(items, baseline="base", primary="better:base", resamples=100)
    comps = result["comparisons"]["chrf"]
    assert [c["unit"] for c in comps if c["family"] == "primary"] == ["Lo", "Hi", "All"]
    assert [(c["system"], c["unit"]) for c in comps if c["family"] == "secondary" and c["system"] == "better"] \
        == [("better", "aa"), ("better", "bb")]
    assert result["metrics"]["chrf"]["All"]["better"]["family"] == "primary"
    assert result["warnings"] == []
    # without --baseline, only the primary comparisons are tested; headline arms without 3 seeds warned
    only = compare_paths(items, primary="noise:base", resamples=50)
    assert {c["family"] for c in only["comparisons"]["bleu"]} == {"primary"}
    assert "significant" not in only["metrics"]["chrf"]["All"]["noise"]
    assert only["warnings"][0].startswith("noise has 2 seed(s)")
    # and all labels tested against a baseline are headline arms without --primary
    assert compare_paths(items, baseline="base", resamples=20)["warnings"][0].startswith("noise has 2")


def test_primary_errors_name_the_argument(three):
    items = [f"{label}={','.join(paths)}" for label, paths in three.items()]
    with pytest.raises(EvalError, match=r"--primary better:nope: no label 'nope'; labels: base, better, noise"):
        compare_paths(items, primary="better:nope")
    with pytest.raises(EvalError, match=r"--primary 'better': expected LABEL:OTHER"):
        compare_paths(items, primary="better")
    with pytest.raises(EvalError, match=r"--primary 'base:base'"):
        compare_paths(items, primary="base:base")


def test_groups_must_match_across_runs(three, tmp_path):
    other = tmp_path / "regrouped"
    import shutil
    shutil.copytree(three["base"][0], other)
    report = json.loads((other / "bleu.json").read_text())
    report["languages"]["bb"]["group"] = "Mid"
    (other / "bleu.json").write_text(json.dumps(report))
    with pytest.raises(EvalError, match="regrouped.*assigned the groups.*eval.groups"):
        compare_paths([f"base={three['base'][0]}", f"x={other}"])


def test_cli_primary(three, tmp_path, capsys):
    out = tmp_path / "p.md"
    compare_main(["--baseline", "base", "--primary", "better:base,better:noise", "--resamples", "50", "--out",
                  str(out), *[f"{label}={','.join(paths)}" for label, paths in three.items()]])
    printed = capsys.readouterr().out
    assert printed.startswith("### Primary comparisons, chrF++") and "Holm over 6" in printed
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["primary"] == ["better:base", "better:noise"] and saved["test"]["correction"] == "Holm"
    assert all("p_adjusted" in c and "ci95" in c for c in saved["comparisons"]["chrf"])
    with pytest.raises(SystemExit):
        compare_main(["--primary", "x:base", *[f"{label}={','.join(paths)}" for label, paths in three.items()]])
    assert "--primary x:base: no label 'x'" in capsys.readouterr().err
