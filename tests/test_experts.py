"""Language-family experts on DeepSpeed MoE, family maps, and the norm variants.

In-process tests use one process with ep_size 1 (no engine needed); the distributed
ones run the real launcher with 2 gloo ranks against a 1-process reference."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import TINY_MODEL, checkpoint_dev_loss, ds_config, launch, read_log, write_json

from cats_ds.config import ConfigError, config_from_dict
from cats_ds.data.langcodes import base_language
from cats_ds.model.build import model_from_config
from cats_ds.model.experts import TABLE1, FamilyGate, FamilyMoE, param_groups, set_local_dispatch
from cats_ds.model.families import load_family_map, shipped_maps
from cats_ds.training.grads import is_expert_param

TRAIN = "launch/train.py"
CHECK = "tests/scripts/experts_check.py"
LANGS = ["aa", "bb", "cc"]
FAMILIES = {"x": ["aa", "bb"], "y": ["cc"]}  # two families: ep_size 2 puts one on each rank
EXPERT = re.compile(r"(\.moe)?\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)")
OPUS100 = ("af am an ar as az be bg bn br bs ca cs cy da de dz el eo es et eu fa fi fr fy ga gd gl gu ha he hi "
           "hr hu hy id ig is it ja ka kk km kn ko ku ky li lt lv mg mk ml mn mr ms mt my nb ne nl nn no oc or "
           "pa pl ps pt ro ru rw se sh si sk sl sq sr sv ta te tg th tk tr tt ug uk ur uz vi wa xh yi yo zh zu"
           ).split()


@pytest.fixture
def families(tmp_path) -> Path:
    return write_yaml(tmp_path / "families.yaml", FAMILIES)


def write_yaml(path: Path, obj) -> Path:
    path.write_text(yaml.safe_dump(obj))
    return path


def tiny_cfg(families: Path | None = None, **experts):
    tree = {"model": dict(TINY_MODEL)}
    if experts:
        tree["experts"] = {"families": str(families), **experts}
    return config_from_dict(tree)


def build(cfg, seed: int = 0, vocab: int = 100):
    torch.manual_seed(seed)
    return model_from_config(cfg, vocab, LANGS)


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 100, (5, 9), generator=g)
    prev = torch.randint(4, 100, (5, 7), generator=g)
    src[1, 6:] = 0  # padding
    return src, prev, torch.tensor([0, 2, 1, 2, 0])  # languages aa, cc, bb, cc, aa


def dense_name(name: str) -> str:
    """Expert parameter -> the dense parameter it was copied from (tied output -> embed)."""
    base = EXPERT.sub("", name)
    return "embed.weight" if base == "out_proj.weight" else base


# --------------------------------------------------------------------------- family maps


def test_shipped_family_maps():
    assert {"default", "ted8_related", "ted8_diverse", "wmt10"} <= set(shipped_maps())
    related = load_family_map("ted8_related")
    assert related.assign(["aze", "bel", "glg", "slk", "tur", "rus", "por", "ces"]) == (
        ["Turkic", "Slavic", "Romance", "Czech-Slovak"], [0, 1, 2, 3, 0, 1, 2, 3])
    diverse = load_family_map("ted8_diverse")
    fams, ids = diverse.assign(["bos", "mar", "hin", "mkd", "ell", "bul", "fra", "kor"])
    assert len(fams) == 5 and ids[0] == ids[3] == ids[5] and ids[1] == ids[2]
    wmt = load_family_map("wmt10")
    fams, ids = wmt.assign(["kk", "vi", "tr", "ja", "nl", "it", "ar", "ro", "hi", "de"])
    assert ids[0] == ids[2] and ids[4] == ids[9] and ids[5] == ids[7] and len(set(ids)) == len(fams)
    assert wmt.family_of("de_DE") == wmt.family_of("de")  # mBART codes


def test_default_map_covers_opus100_and_locales():
    m = load_family_map("default")
    assert sum(len(v) for v in m.families.values()) >= 100
    fams = {lang: m.family_of(lang) for lang in OPUS100}
    assert fams["de"] == fams["nl"] == m.family_of("en_GB") == "Germanic"
    assert fams["fr"] == fams["pt"] != fams["ru"]
    assert fams["fi"] == fams["hu"] == "Uralic" and fams["kk"] == fams["tr"] == "Turkic"
    # gettext locale names route by their base language
    assert m.family_of("pt_BR") == m.family_of("pt") == "Romance"
    assert m.family_of("sr@latin") == m.family_of("sr") == "Slavic"
    assert m.family_of("zh_CN") == m.family_of("zh_Hans") == "Sino-Tibetan"
    assert m.family_of("en@quot") == "Germanic" and m.family_of("ca@valencia") == "Romance"
    assert [base_language(c) for c in ("pt_BR", "sr@latin", "de_DE.UTF-8", "ast", "x")] == ["pt", "sr", "de",
                                                                                               "ast", "x"]


@pytest.mark.skipif(not Path("/usr/share/locale").is_dir(), reason="no gettext catalogs on this machine")
def test_default_map_covers_gettext_catalogs_here():
    root = Path("/usr/share/locale")
    locales = [d.name for d in root.iterdir() if list(d.glob("LC_MESSAGES/*.mo"))]
    m = load_family_map("default")
    assert locales and all(m.family_of(loc) for loc in locales)


def test_family_map_errors(tmp_path):
    m = load_family_map(str(write_yaml(tmp_path / "f.yaml", FAMILIES)))
    with pytest.raises(ConfigError, match=r"unknown language 'zz'.*f\.yaml"):
        m.assign(["aa", "zz"])
    with pytest.raises(ConfigError, match=r"unknown language 'qq_XX' \(base language 'qq'\)"):
        m.family_of("qq_XX")
    with pytest.raises(ConfigError, match=r"'aa' is listed under both 'x' and 'y'"):
        load_family_map(str(write_yaml(tmp_path / "dup.yaml", {"x": ["aa"], "y": ["aa"]})))
    with pytest.raises(ConfigError, match=r"experts.families='nope'.*shipped: default"):
        load_family_map("nope")
    # only families holding a run language get an expert, numbered in map order
    assert m.assign(["cc"]) == (["y"], [0]) and m.assign(["cc", "aa"]) == (["x", "y"], [1, 0])


def test_unknown_language_fails_the_build(tmp_path, families):
    cfg = tiny_cfg(families, modules=["ffn"])
    with pytest.raises(ConfigError, match="unknown language 'dd'"):
        model_from_config(cfg, 100, ["aa", "dd"])


def test_families_not_divisible_by_ep_size(tmp_path):
    three = write_yaml(tmp_path / "three.yaml", {"x": ["aa"], "y": ["bb"], "z": ["cc"]})
    with pytest.raises(ConfigError, match=r"experts.ep_size=2 does not divide the 3 families"):
        build(tiny_cfg(three, modules=["ffn"], ep_size=2))


# --------------------------------------------------------------------------- the layer, one process


def test_family_gate_routes_whole_families_without_drops():
    gate = FamilyGate(3)
    fam = torch.tensor([2, 0, 2, 1, 2, 2])
    l_aux, cap, e, idx, loc, gates, counts = gate(torch.zeros(6, 4), fam, True)
    assert float(l_aux) == 0 and e == 3 and int(cap) == 4  # the largest family, nothing dropped
    assert idx.tolist() == [[2, 0, 2, 1, 2, 2]] and loc.tolist() == [[0, 0, 1, 0, 2, 3]]
    assert gates.tolist() == [[1.0] * 6] and counts.tolist() == [1, 1, 4]
    assert not list(gate.parameters())
    with pytest.raises(RuntimeError, match="sparse-route"):
        gate(torch.zeros(6, 4), fam, False)


@pytest.mark.parametrize("modules", [["ffn"], ["attn"], ["out_embed"], ["all"]])
def test_dense_equals_experts_with_identical_experts(families, modules):
    """Same seed: the expert model's shared weights equal the dense model's and every
    expert is a copy of the dense module, so outputs match, shared gradients match, and
    the experts' gradients add up to the dense module's gradient."""
    dense = build(tiny_cfg())
    experts = build(tiny_cfg(families, modules=modules, side="both"))
    dense_params = dict(dense.named_parameters())
    n_expert = 0
    for name, p in experts.named_parameters():
        assert torch.equal(p, dense_params[dense_name(name)]), name
        n_expert += is_expert_param(p)
    assert n_expert > 0
    src, prev, langs = batch()
    a, b = dense(src, prev), experts(src, prev, langs)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    a.pow(2).mean().backward()
    b.pow(2).mean().backward()
    summed: dict[str, torch.Tensor] = {}
    for name, p in experts.named_parameters():
        key = dense_name(name)
        summed[key] = p.grad.clone() if key not in summed else summed[key] + p.grad
    for name, p in dense.named_parameters():
        torch.testing.assert_close(summed[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("langs", [[0, 1, 0, 1, 1], [1, 1, 1, 1, 1]])  # both families; family x absent
def test_local_dispatch_equals_moelayer(families, langs):
    """ep_size 1 sorts tokens by family instead of MOELayer's capacity slots: same outputs,
    same gradients, and every expert (an absent family's too) gets a gradient tensor."""
    models = [build(tiny_cfg(families, modules=["all"], side="both")) for _ in range(2)]
    with torch.no_grad():  # distinct experts, identical in both models
        for name, p in models[0].named_parameters():
            if EXPERT.search(name):
                p.add_(0.05 * torch.randn_like(p))
        models[1].load_state_dict(models[0].state_dict())
    set_local_dispatch(models[1], False)
    src, prev, _ = batch()
    outs = [m(src, prev, torch.tensor(langs)) for m in models]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
    for o in outs:
        o.pow(2).mean().backward()
    grads = [dict(m.named_parameters()) for m in models]
    for name, p in grads[0].items():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, grads[1][name].grad, rtol=1e-4, atol=1e-7, msg=name)


def test_experts_separate_families_and_decode_incrementally(families):
    model = build(tiny_cfg(families, modules=["all"], side="both")).eval()
    with torch.no_grad():  # make family y's experts differ from family x's
        for name, p in model.named_parameters():
            m = EXPERT.search(name)
            if m and m.group(2) == "1":
                p.add_(0.05 * torch.randn_like(p))
    src, prev, langs = batch()
    with torch.no_grad():
        full = model(src, prev, langs)  # (B, T, V)
        swapped = model(src, prev, torch.tensor([0, 0, 1, 0, 0]))  # rows 1 and 3 move to family x
        assert torch.allclose(full[[0, 2, 4]], swapped[[0, 2, 4]], atol=1e-6)
        assert not torch.allclose(full[[1, 3]], swapped[[1, 3]], atol=1e-3)
        enc, pad = model.encode(src, langs)
        caches = [{} for _ in model.decoder_layers]
        steps = [model.decode(prev[:, t:t + 1], enc, pad, langs, caches, start=t) for t in range(prev.size(1))]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_expert_parameters_are_deepspeed_moe_params(families):
    """DeepSpeed's marks (allreduce=False, group_name) are what its MoE groups, expert
    gradient reduction, checkpoint files and CATS' shared-only Gram key on."""
    model = build(tiny_cfg(families, modules=["ffn", "out_embed"], ep_size=1))
    marked = {n for n, p in model.named_parameters() if is_expert_param(p)}
    assert marked == {n for n, _ in model.named_parameters() if EXPERT.search(n)}
    assert all(p.group_name == "ep_size_1" for n, p in model.named_parameters() if n in marked)
    groups = param_groups(model)
    moe = [g for g in groups if g.get("moe")]
    assert len(moe) == 1 and moe[0]["name"] == "ep_size_1"
    assert {id(p) for p in moe[0]["params"]} == {id(p) for n, p in model.named_parameters() if n in marked}
    assert config_from_dict({}).meta.params == "shared"  # the Gram leaves these out by default
    assert len(param_groups(build(tiny_cfg()))) == 1


def test_ep_size_two_needs_an_engine(families):
    model = build(tiny_cfg(families, modules=["ffn"], ep_size=2))
    layer = next(m for m in model.modules() if isinstance(m, FamilyMoE))
    assert layer.num_local_experts == 1 and layer.num_experts == 2
    with pytest.raises(RuntimeError, match="no expert-parallel group"):
        model(*batch())


# --------------------------------------------------------------------------- norms


@pytest.mark.parametrize("norm,keys", [("layernorm", {"weight", "bias"}), ("rmsnorm", {"weight"}),
                                       ("layernorm_noaffine", set()), ("rmsnorm_noaffine", set())])
def test_norm_variants_parameters(norm, keys):
    cfg = config_from_dict({"model": {**TINY_MODEL, "norm": norm}})
    model = build(cfg)
    norm_keys = {k.rsplit(".", 1)[1] for k in model.state_dict() if re.search(r"(^|\.)(enc_|dec_)?norm\d?\.", k)}
    assert norm_keys == keys
    if not keys:  # "w/o LayerNorm": normalization only
        layer = model.encoder_layers[0].norm1
        y = layer(torch.randn(4, 32) * 3 + 1)
        if norm == "layernorm_noaffine":
            torch.testing.assert_close(y.mean(-1), torch.zeros(4), atol=1e-5, rtol=0)
            torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)
        else:
            torch.testing.assert_close(y.pow(2).mean(-1), torch.ones(4), atol=1e-4, rtol=0)
    src, prev, _ = batch()
    assert model(src, prev).shape == (5, 7, 100)


# --------------------------------------------------------------------------- 2 gloo ranks


def _check_recipe(path: Path, tiny_data: Path, families: Path, save_dir: Path) -> Path:
    recipe = {"data": {"dir": str(tiny_data)}, "model": dict(TINY_MODEL),
              "sampling": {"temperature": 5.0, "langs_per_batch": 2},
              "train": {"save_dir": str(save_dir), "max_tokens": 256, "warmup_updates": 10, "lr": 0.003,
                        "tensorboard": False},
              "experts": {"modules": ["all"], "side": "both", "families": str(families)}}
    return write_yaml(path, recipe)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_data):
    """One process, ep_size 1 (every expert local), ZeRO-0: the same global batches as the
    2-rank runs, all on this process."""
    root = tmp_path_factory.mktemp("experts_ref")
    families = write_yaml(root / "families.yaml", FAMILIES)
    recipe = _check_recipe(root / "r.yaml", tiny_data, families, root / "run")
    ds = write_json(root / "z0.json", ds_config(0, clip=0.0))
    launch([CHECK, "--deepspeed_config", ds, "--config", recipe, "--out", root / "ref", "--isolate", "cc",
            "experts.ep_size=1", "train.max_tokens=512"], 1)
    return root, recipe, torch.load(root / "ref.rank0.pt", weights_only=False)


def _close(got: torch.Tensor, want: torch.Tensor, scale: float) -> bool:
    """Per-parameter relative error 1e-5, plus an absolute floor for gradients that are zero
    analytically but not numerically (see `_zero_grad`)."""
    return float((got - want).norm()) <= 1e-5 * float(want.norm()) + 1e-8 * scale


def _zero_grad(name: str) -> bool:
    """Attention key biases: softmax ignores a shift of all scores, so their gradient is
    rounding noise (~1e-10), which Adam's first step turns into a full +-lr move."""
    return name.endswith("bias") and ".k_proj." in name


@pytest.mark.parametrize("stage,ep", [(0, 2), (2, 2), (1, 1)])
def test_two_ranks_match_one_process(reference, tmp_path, stage, ep):
    """2 ranks (ep_size 2: one family's experts on each rank; ep_size 1: both on both) give
    the same logits and the same full gradients as 1 process holding all experts; an
    update on one language's batch changes only that family's experts and shared weights."""
    _, recipe, ref = reference
    ds = write_json(tmp_path / "ds.json", ds_config(stage, clip=0.0))
    launch([CHECK, "--deepspeed_config", ds, "--config", recipe, "--out", tmp_path / "got", "--isolate", "cc",
            f"experts.ep_size={ep}"], 2)
    ranks = [torch.load(tmp_path / f"got.rank{r}.pt", weights_only=False) for r in range(2)]

    logits = {**ranks[0]["logits"], **ranks[1]["logits"]}
    assert logits.keys() == ref["logits"].keys() and len(logits) > 4
    for key, want in ref["logits"].items():
        torch.testing.assert_close(logits[key], want, rtol=1e-5, atol=1e-5, msg=key)

    scale = max(float(g.norm()) for g in ref["grads"].values())
    held = {name: [r for r in ranks if name in r["grads"]] for name in ref["grads"]}
    for name, want in ref["grads"].items():
        assert held[name], f"{name} is on no rank"
        for r in held[name]:
            assert _close(r["grads"][name], want, scale), \
                f"{name}: |diff| {float((r['grads'][name] - want).norm()):.3g}, |ref| {float(want.norm()):.3g}"
            if not _zero_grad(name):
                torch.testing.assert_close(r["params"][name], ref["params"][name], rtol=1e-5, atol=1e-6, msg=name)
    if stage > 0:  # the norm clipping uses covers every expert once, wherever it lives
        want = sum(float(g.norm()) ** 2 for g in ref["grads"].values()) ** 0.5
        assert [r["grad_norm"] for r in ranks] == pytest.approx([want, want], rel=1e-5)
    if ep == 2:  # each rank holds exactly one family's experts
        for r, rank in enumerate(ranks):
            ids = {int(m.group(2)) for n in rank["grads"] for m in [EXPERT.search(n)] if m}
            assert ids == {r}
    expert_1 = [n for n in ref["grads"] if (m := EXPERT.search(n)) and m.group(2) == "1"]
    assert expert_1 and all(float(ref["grads"][n].norm()) > 1e-6 * scale for n in expert_1 if not _zero_grad(n))

    # the single-language update (language cc = family y = expert 1)
    for changed in [ref["changed"]] + [r["changed"] for r in ranks]:
        for name, moved in changed.items():
            m = EXPERT.search(name)
            if m and m.group(2) == "0":
                assert not moved, f"{name}: another family's expert changed"
            elif m and not _zero_grad(name):
                assert moved, f"{name}: family expert did not change"
            elif not m:
                assert moved, f"{name}: shared parameter did not change"


def test_ep_size_must_divide_the_world_size(tmp_path, tiny_recipe, families):
    recipe = tiny_recipe(experts={"modules": ["ffn"], "families": str(families), "ep_size": 2})
    out = launch([TRAIN, "--deepspeed_config", write_json(tmp_path / "z0.json", ds_config(0)), "--config", recipe],
                 1, check=False)
    assert out.returncode != 0 and "experts.ep_size=2 does not divide the world size 1" in out.stderr


def test_table1_ablations_train_on_two_ranks(tmp_path, tiny_recipe, families):
    """Each Table 1 row (All, -Attn, -FFN, -OE) builds and trains 5 updates on 2 ranks; its
    first loss equals the dense model's (same seed: experts start as the dense modules).
    Every run trains on the sampler's draws at the meta-step schedule, as the CATS row does."""
    draws = {"draws_at_meta_steps": True}
    dense = tiny_recipe("dense", train={"max_updates": 5}, sampling=draws)
    launch([TRAIN, "--deepspeed_config", write_json(tmp_path / "z0.json", ds_config(0)), "--config", dense], 2)
    first = read_log(tmp_path / "dense")[0]["loss"]
    runs = {"All": (2, 2, {"sampling": draws}), "-Attn": (1, 1, {"sampling": draws}), "-FFN": (2, 2, {"sampling": draws}),
            "-OE": (0, 1, {"weighting": {"method": "cats"}, "meta": {"every": [[None, 2]]},
                           "sampling": {"distinct": False, **draws}})}  # dense's draws, so the first losses match
    for row, (stage, ep, extra) in runs.items():
        name = "abl" + row.replace("-", "_")
        recipe = tiny_recipe(name, train={"max_updates": 5},
                             experts={"modules": TABLE1[row], "families": str(families), "ep_size": ep}, **extra)
        ds = write_json(tmp_path / f"{name}.json", ds_config(stage))
        out = launch([TRAIN, "--deepspeed_config", ds, "--config", recipe], 2)
        log = read_log(tmp_path / name)
        assert [r["step"] for r in log] == [1, 2, 3, 4, 5], row
        assert log[0]["loss"] == pytest.approx(first, rel=1e-5), row
        assert log[-1]["loss"] < log[0]["loss"] and np.isfinite(log[-1]["loss"]), row
        assert "| done at step 5" in out.stdout
    assert read_log(tmp_path / "abl_OE")[0]["weighting"]  # the CATS hook ran with experts present


def test_checkpoint_resume_and_inference_with_experts(tmp_path, tiny_recipe, families):
    """ep_size 2 on 2 ranks: DeepSpeed writes one file per expert; 3 updates + resume + 3
    == 6 uninterrupted; one process (ep_size 1) loads every expert and reproduces the
    logged validation loss."""
    ds = write_json(tmp_path / "z2.json", ds_config(2))
    common = dict(model={"dropout": 0.1, "attention_dropout": 0.1},
                  experts={"modules": ["all"], "families": str(families), "ep_size": 2})
    full = tiny_recipe("full", train={"max_updates": 6, "valid_every": 3}, **common)
    part = tiny_recipe("part", train={"max_updates": 3, "valid_every": 3}, **common)
    launch([TRAIN, "--deepspeed_config", ds, "--config", full], 2)
    launch([TRAIN, "--deepspeed_config", ds, "--config", part], 2)
    out = launch([TRAIN, "--deepspeed_config", ds, "--config", part, "train.max_updates=6"], 2)
    assert "resumed from" in out.stdout and "at step 3" in out.stdout
    ref, got = read_log(tmp_path / "full"), read_log(tmp_path / "part")
    assert [r["step"] for r in got] == list(range(1, 7))
    for a, b in zip(ref, got):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), f"step {a['step']}"

    latest = tmp_path / "part" / "latest"
    cfg = config_from_dict({"model": {**TINY_MODEL, "dropout": 0.1, "attention_dropout": 0.1},
                            "experts": common["experts"]})
    n_layers = sum(isinstance(m, FamilyMoE) for m in model_from_config(cfg, 100, LANGS, ep_size=1).modules())
    files = sorted(p.name for p in latest.glob("layer_*_expert_*_mp_rank_00_model_states.pt"))
    assert len(files) == 2 * n_layers
    one = torch.load(latest / "layer_0_expert_1_mp_rank_00_model_states.pt", weights_only=False)
    assert one and all(".deepspeed_experts.1." in k for k in one)  # global expert ids
    main = torch.load(latest / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert not [k for k in main if "deepspeed_experts" in k]

    mean = checkpoint_dev_loss(latest)
    assert mean == pytest.approx(read_log(tmp_path / "part", "valid")[-1]["mean_loss"], rel=1e-5)


def test_family_maps_accept_iso_639_1_and_639_3_alike(tmp_path):
    """A 2-letter corpus (gettext / OPUS-100 codes and locales) routes with the 639-3 TED8 map,
    a 3-letter one with the 639-1 maps; every 2-letter code of the shipped maps has its 639-3."""
    from cats_ds.data.langcodes import ISO_639_1_TO_3, equivalents, same_language, to_639_1, to_639_3

    related = load_family_map("ted8_related")
    two = ["az", "be", "gl", "sk", "tr", "ru", "pt_BR", "cs"]
    assert related.assign(two) == related.assign(["aze", "bel", "glg", "slk", "tur", "rus", "por", "ces"]) == (
        ["Turkic", "Slavic", "Romance", "Czech-Slovak"], [0, 1, 2, 3, 0, 1, 2, 3])
    diverse = load_family_map("ted8_diverse")
    assert diverse.family_of("fr") == "Romance" and diverse.family_of("mk") == diverse.family_of("bg") == "Slavic"
    assert load_family_map("wmt10").family_of("deu") == "Germanic" and load_family_map("default").family_of(
        "ukr") == "Slavic"
    with pytest.raises(ConfigError, match=r"unknown language 'de'"):  # still an error when no code matches
        related.family_of("de")
    assert to_639_3("pt") == "por" and to_639_1("por") == "pt" and to_639_3("fre") == "fra" and to_639_3("zz") is None
    assert equivalents("tr") == ["tur"] and equivalents("tur") == ["tr"] and equivalents("ast") == []
    assert same_language("ger", "de") and not same_language("de", "nl")
    codes = {c for name in shipped_maps() for fam in load_family_map(name).families.values() for c in fam}
    assert {c for c in codes if len(c) == 2} - set(ISO_639_1_TO_3) == {"mo"}  # withdrawn Moldavian
    assert len(set(ISO_639_1_TO_3.values())) == len(ISO_639_1_TO_3)  # one-to-one
    with pytest.raises(ConfigError, match=r"'tur' is listed under both 'x' \(as 'tr', the same language\) and 'y'"):
        load_family_map(str(write_yaml(tmp_path / "dup2.yaml", {"x": ["tr"], "y": ["tur"]})))
