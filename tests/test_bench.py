"""The single-process benchmarks (beam-5 decoding, expert placements) run end to end and
write their JSON. Timings are not checked: they are for the benchmark table, never for
tests; parameter counts are."""

from __future__ import annotations

import json

from cats_ds.bench.suite import main


def test_bench_decode_writes_json(tmp_path, tiny_data, tiny_recipe, capsys):
    # the tiny corpus' own data settings, so the benchmark's prepare step is a no-op
    recipe = tiny_recipe(data={"corpus": "plain", "raw": str(tiny_data.parent / "raw"), "vocab_size": 100,
                               "vocab_temperature": 1.0})
    out = tmp_path / "decode.json"
    main(["decode", "--recipe", str(recipe), "--sentences", "6", "--batch", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["beam"] == 5 and result["sentences"] == 6
    assert set(result["per_language"]) == {"aa", "bb", "cc"}
    assert result["sentences_per_s"] > 0 and result["hyp_tokens_per_s"] > 0
    ct2 = result["ctranslate2"]
    assert ct2["sentences"] == 6 and ct2["sentences_per_s"] > 0 
    # decoded as evaluate --backend ctranslate2 does: the same best hypotheses as ours (untrained: cut at the limit)
    assert ct2["identical"] == 6 and ct2["identical_share"] == 1.0
    assert result["ours_over_ctranslate2"] == result["sentences_per_s"] / ct2["sentences_per_s"]
    assert result["threads"] == 1
    assert {k: v["processes"] for k, v in result["processes"].items()} == {"1": 1, "2": 2}
    assert all(v["sentences_per_s"] > 0 for v in result["processes"].values())
    printed = capsys.readouterr().out
    assert "sentences/s" in printed and "identical best hypotheses" in printed and "ours / CTranslate2" in printed


def test_bench_decode_compares_hypotheses_with_ctranslate2(tmp_path, tiny_data, tiny_recipe):
    """Sentences are decoded in source-length order, in batches; with batches of one
    sentence CTranslate2 gets each sentence's own length limit, and its greedy hypotheses
    are ours (the untrained model runs to the limits, where both must stop alike; at beam 5
    CTranslate2 does not force </s> at the limit as our search does, so there a hypothesis
    that reaches it may differ)."""
    from cats_ds.bench.suite import decode_batches
    from cats_ds.data.manifest import Manifest, load_split

    manifest = Manifest.load(tiny_data)
    splits = load_split(tiny_data, manifest, "test")
    batches = decode_batches(splits, manifest.languages, 7, 3)
    for lang, bs in batches.items():
        ids = [i for b in bs for i in b]
        assert sorted(ids) == list(range(7)) and [len(b) for b in bs] == [3, 3, 1]
        sizes = splits[lang].src.sizes[ids]
        assert (sizes[1:] >= sizes[:-1]).all()
    recipe = tiny_recipe(data={"corpus": "plain", "raw": str(tiny_data.parent / "raw"), "vocab_size": 100,
                               "vocab_temperature": 1.0})
    out = tmp_path / "decode.json"
    main(["decode", "--recipe", str(recipe), "--sentences", "9", "--batch", "1", "--beam", "1", "--processes", "",
          "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["processes"] == {} and result["sentences"] == 9
    assert result["ctranslate2"]["identical"] == 9 and result["ctranslate2"]["identical_share"] == 1.0


def test_bench_experts_writes_json(tmp_path, capsys):
    out = tmp_path / "experts.json"
    main(["experts", "--embed-dim", "16", "--ffn-dim", "32", "--layers", "1", "--heads", "2", "--vocab", "60",
          "--batch-tokens", "64", "--length", "8", "--rounds", "1", "--threads", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    rows = {(r["mix"], r["placement"], r["dispatch"]): r for r in result["results"]}
    placements = ["ffn", "attn", "out_embed", "all"]
    assert set(rows) == {(mix, "dense", "-") for mix in ("balanced", "skewed")} | {
        (mix, p, d) for mix in ("balanced", "skewed") for p in placements for d in ("local", "moelayer")}
    assert all(r["tokens_per_s"] > 0 for r in rows.values())
    assert rows[("balanced", "dense", "-")]["ratio_to_dense"] == 1.0
    # ted8_related: 4 families; ep_size 2 keeps 2 of each expert layer's 4 experts per rank
    for p in placements:
        ep1, ep2 = (rows[("skewed", p, "local")]["expert_params_per_rank"][k] for k in ("1", "2"))
        assert ep1 > 0 and ep1 == 2 * ep2
    assert rows[("balanced", "dense", "-")]["expert_params_per_rank"]["1"] == 0
    assert "moelayer" in capsys.readouterr().out


def test_bench_cats_solve_only_rows_per_method(tmp_path, capsys):
    """`bench cats --methods ... --solve-only`: the coefficient-solve row of each method
    (K=8, N=8 and N=100), no data and no launches; unknown methods are refused."""
    import pytest

    out = tmp_path / "solve.json"
    main(["cats", "--methods", "pcgrad,cagrad,nashmtl", "--solve-only", "--json", str(out)])
    result = json.loads(out.read_text())["methods"]
    assert set(result) == {"pcgrad", "cagrad", "nashmtl"}
    assert all(r["solve_us_n8"] > 0 and r["solve_us_n100"] > 0 for r in result.values())
    assert "us at N=100" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="'temperature' is not a Gram-based weighting.method"):
        main(["cats", "--methods", "temperature", "--solve-only"])


def test_bench_train_against_bare_step(tmp_path, tiny_data, tiny_recipe, capsys):
    """1 and 2 gloo ranks: the full step and the bare PyTorch step on the same batches,
    with phases, padding and forwards per update (one per micro-batch with length pooling)."""
    from cats_ds.bench.suite import PHASES

    recipe = tiny_recipe(data={"corpus": "plain", "raw": str(tiny_data.parent / "raw"), "vocab_size": 100,
                               "vocab_temperature": 1.0})
    out = tmp_path / "train.json"
    main(["train", "--recipe", str(recipe), "--steps", "2", "--rounds", "2", "--warmup", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    for ranks in (1, 2):
        r = result[f"ranks_{ranks}"]
        assert r["ranks"] == ranks and r["length_pool"] == 1024 and r["forwards_per_update"] == 1.0
        assert r["tokens_per_s"] > 0 and r["bare_tokens_per_s"] > 0 and r["ratio_to_bare"] > 0
        assert 0 <= r["pad_src"] < 1 and 0 <= r["pad_tgt"] < 1
        assert set(r["phases_s"]) == set(PHASES) | {"other"}
        assert all(r["phases_s"][p] > 0 for p in ("data", "forward", "loss", "backward", "optimizer"))
    assert result["ranks_2"]["tokens_per_update"] > result["ranks_1"]["tokens_per_update"]  # 2x the global budget
    assert "full/bare" in capsys.readouterr().out


def test_bench_meta_worker_rows_per_method(tmp_path, tiny_data, tiny_recipe):
    """The N=8 / N=100 worker on 2 gloo ranks with `--methods`: per entry, its meta step
    against the plain step on the same batches (and no CATS timing, which the plain
    launches give)."""
    from cats_ds.bench.suite import DS_CONFIG, _launch_worker

    recipe = tiny_recipe(data={"corpus": "plain", "raw": str(tiny_data.parent / "raw"), "vocab_size": 100,
                               "vocab_temperature": 1.0})
    result = _launch_worker("meta", 2, ["--config", str(recipe), "--deepspeed_config", DS_CONFIG,
                                        "--steps", "1", "--warmup", "1", "--k", "2", "--methods", "pcgrad,imtl"])
    assert result["languages"] == 3 and "meta_step_s" not in result
    assert set(result["methods"]) == {"pcgrad", "imtl"}
    for r in result["methods"].values():
        assert r["plain_step_s"] > 0 and r["meta_step_s"] > 0
        assert r["meta_over_plain"] == r["meta_step_s"] / r["plain_step_s"]


def test_bench_pool_padding_per_pool_size(tmp_path, tiny_data, tiny_recipe, capsys):
    """`bench pool`: the sampler alone; pooling pads less than the draws as drawn, and a
    larger pool no more source padding than a small one on the tiny corpus."""
    recipe = tiny_recipe(data={"corpus": "plain", "raw": str(tiny_data.parent / "raw"), "vocab_size": 100,
                               "vocab_temperature": 1.0})
    out = tmp_path / "pool.json"
    main(["pool", "--recipe", str(recipe), "--sizes", "0,4,32", "--batches", "40", "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result) == {f"ranks_{r}_pool_{p}" for r in (1, 2) for p in (0, 4, 32)}
    for r in (1, 2):
        rows = [result[f"ranks_{r}_pool_{p}"] for p in (0, 4, 32)]
        assert all(0 <= x["pad_src"] < 1 and 0 <= x["pad_tgt"] < 1 for x in rows)
        assert rows[0]["micro_batches_per_draw"] == 1.0
        assert rows[2]["pad_src"] < rows[0]["pad_src"] and rows[2]["pad_tgt"] < rows[0]["pad_tgt"]
    assert "micro-batches/draw" in capsys.readouterr().out
