"""The single-process benchmark (beam-5 decoding) runs end to end and writes its JSON.
Its numbers are not checked: timings are for the benchmark table, never for tests."""

from __future__ import annotations

import json

from cats_ds.bench import main


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
    assert "sentences/s" in capsys.readouterr().out
