"""Typed experiment configuration: YAML recipe + ``section.field=value`` overrides.

One dataclass per section. Every field has a default and a docstring-comment; unknown
keys are rejected with the closest match, choices are checked against their ``Literal``.
DeepSpeed settings (precision, ZeRO stage, gradient accumulation, clipping) are NOT here:
the DeepSpeed JSON is their one source of truth.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from cats_ds.data.groups import GroupError, check_named_groups


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key."""


class Section:
    """A config section: `check` holds every check of its own keys (Config.validate calls
    it; the checks that need another section's keys are in Config.validate)."""

    def check(self) -> None:
        """Raise ConfigError naming the first bad key of this section."""


def _check_table(rows) -> None:
    """(key, value, ok, allowed) rows: ConfigError "<key> must be <allowed>, got <value>" for the first not ok."""
    for key, value, ok, allowed in rows:
        if not ok:
            raise ConfigError(f"{key} must be {allowed}, got {value}")


@dataclass
class DataConfig(Section):
    dir: str = "data-bin/gettext8"
    """Prepared data folder (manifest.json, spm.model, binarized shards)."""
    corpus: Literal["gettext", "plain", "opus100", "ted8", "wmt"] = "gettext"
    """Raw corpus layout read by `prepare` (see docs/data.md, "Corpus layouts")."""
    raw: str = "/usr/share/locale"
    """Root of the raw corpus."""
    languages: list[str] = field(default_factory=list)
    """Target languages (English is always the source). Empty: every language found."""
    pattern: Optional[str] = None
    """TED8 only: file pattern preset (`orig`, `mtok`, `spm8000`, `raw`) or a pattern with
    {lang}, {split}, {side}, {l2e} placeholders."""
    vocab_size: int = 8000
    """Joint SentencePiece vocabulary size (language tags included)."""
    vocab_temperature: float = 5.0
    """Temperature over languages when sampling sentences to train SentencePiece."""
    vocab_sentences: int = 300_000
    """How many sentences (both sides together) SentencePiece is trained on."""
    character_coverage: float = 0.9995
    """SentencePiece character coverage."""
    max_chars: int = 300
    """Drop pairs with a side longer than this many characters."""
    max_tokens_per_side: int = 200
    """Drop pairs with a side longer than this many pieces after encoding."""
    dev_fraction: float = 0.03
    """Share of English sentences hashed into dev (corpora without their own dev)."""
    test_fraction: float = 0.03
    """Share of English sentences hashed into test (corpora without their own test)."""
    dev_max: int = 500
    """Cap on dev/test pairs per language for hash-split corpora; pairs over the cap are
    dropped (never moved to train), so no English sentence crosses splits."""
    min_pairs: int = 1
    """Languages with fewer training pairs than this are an error."""
    translatable_eval: Optional[bool] = None
    """Drop dev/test pairs whose target is not a translation test once placeholders,
    markup, URLs/paths, options and numbers are removed (cats_ds/data/translatable.py).
    None: for gettext only; true/false: for any corpus."""
    translatable_min_letters: int = 4
    """That rule: a target with fewer letters left is dropped."""
    translatable_min_words: int = 2
    """That rule: a target with fewer words left is dropped."""
    translatable_train: bool = False
    """Apply the rule to train as well (by default train keeps those pairs)."""
    max_train_pairs: dict[str, int] = field(default_factory=dict)
    """Cap on a language's training pairs, e.g. {af: 1000, cy: 1000} (docs/data.md,
    "Capped languages"): the pairs of lowest English hash stay in train; the freed pairs
    that pass the translatable rule go to that language's dev and test (half each by
    hash, up to data.dev_max per split), the rest are dropped. Makes a corpus as
    imbalanced as TED8 (Hi:Lo about 40:1) with larger Lo dev/test sets."""

    def check(self) -> None:
        repeated = sorted({lang for lang in self.languages if self.languages.count(lang) > 1})
        if repeated:
            raise ConfigError(f"data.languages lists {', '.join(repeated)} more than once "
                              f"({self.languages}); name each language once")
        if self.vocab_temperature <= 0:
            raise ConfigError(f"data.vocab_temperature must be > 0 (inf for uniform), got {self.vocab_temperature}")
        if not (0 <= self.dev_fraction and 0 <= self.test_fraction and self.dev_fraction + self.test_fraction < 1):
            raise ConfigError(f"data.dev_fraction={self.dev_fraction} and data.test_fraction={self.test_fraction} "
                              f"must be >= 0 and sum to less than 1")
        for key in ("vocab_size", "vocab_sentences", "max_chars", "max_tokens_per_side"):
            if getattr(self, key) < 2:
                raise ConfigError(f"data.{key} must be >= 2, got {getattr(self, key)}")
        for lang, cap in self.max_train_pairs.items():
            if cap < 1:
                raise ConfigError(f"data.max_train_pairs.{lang} must be >= 1, got {cap}")
            if self.languages and lang not in self.languages:
                raise ConfigError(f"data.max_train_pairs.{lang}: '{lang}' is not in data.languages ({self.languages})")


@dataclass
class ModelConfig(Section):
    embed_dim: int = 512
    """Model width."""
    ffn_dim: int = 2048
    """Feed-forward inner width."""
    encoder_layers: int = 6
    """Encoder depth."""
    decoder_layers: int = 6
    """Decoder depth."""
    heads: int = 8
    """Attention heads."""
    dropout: float = 0.1
    """Residual/embedding dropout."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    activation_dropout: float = 0.0
    """Dropout after the FFN activation."""
    activation: Literal["relu", "gelu"] = "relu"
    """FFN activation."""
    norm: Literal["layernorm", "layernorm_noaffine", "rmsnorm", "rmsnorm_noaffine"] = "layernorm"
    """Norm variant; *_noaffine have no gain and no bias (the paper's w/o LayerNorm)."""
    prenorm: bool = True
    """Pre-norm residual blocks (False: post-norm)."""
    share_embeddings: bool = True
    """Tie encoder, decoder and output embeddings (one joint vocabulary)."""
    max_positions: int = 256
    """Longest sequence the sinusoidal positions cover."""

    def check(self) -> None:
        if self.embed_dim % self.heads:
            raise ConfigError(f"model.embed_dim={self.embed_dim} is not divisible by model.heads={self.heads}")
        if self.max_positions < 2:
            raise ConfigError(f"model.max_positions must be >= 2, got {self.max_positions}")


@dataclass
class SamplingConfig(Section):
    temperature: Optional[float] = None
    """Language sampling temperature T: p_l ~ n_l^(1/T). 1 = proportional, inf = uniform.
    null (default): inf for weighting.method=cats (alpha = 1 is then the paper's equal
    weights, alpha = 1/N), 5.0 for every other method; resolved when the config is
    loaded, so a loaded config always holds a number."""
    langs_per_batch: int = 4
    """K: language slots per draw, each filled with one chunk of max_tokens * world / K
    tokens. Meta steps train on one draw per micro-batch; plain updates regroup the
    sentences of sampling.length_pool draws by length."""
    distinct: Optional[bool] = None
    """true: the K slots hold K DISTINCT languages, drawn by successive sampling without
    replacement (first by p_l, then by p_l renormalized over the languages not yet drawn),
    so a language's token share is its inclusion probability / K, flatter than p_l;
    false: K independent draws from p_l (token share exactly p_l, often fewer than K
    languages); null (default): true for the Gram-based methods (every method but
    temperature), false for temperature."""
    length_pool: int = 1024
    """Plain updates pool the sentences of this many consecutive draws (K slots each), sort
    them by (source, target) length and cut micro-batches of train.max_tokens x world size
    padded tokens (1024: docs/results/benchmarks.md, "Length pool", has the padding per pool size):
    one forward each, little padding, the same sentences as the draws (so the sampling
    law is unchanged). Only with token-share loss coefficients (temperature, or
    meta.weight_by=tokens); meta steps use the draws themselves (and so do all updates
    at the meta.every steps under sampling.draws_at_meta_steps). 0: each draw is a
    micro-batch (split into length groups)."""
    draws_at_meta_steps: Optional[bool] = None
    """true: the updates at the meta.every steps train on the draws as drawn, whatever
    the method, so a temperature run with this set is the alpha = 1 reference of CATS (the
    same batches at every update); false: only meta steps do; null (default): true for the
    Gram-based methods, false for temperature (a temperature run pools every update)."""

    def check(self) -> None:
        """temperature None (not yet resolved from weighting.method, see Config.validate) passes."""
        if self.temperature is not None and self.temperature <= 0:
            raise ConfigError(f"sampling.temperature must be > 0 (inf for uniform), got {self.temperature}")
        if self.langs_per_batch < 1:
            raise ConfigError(f"sampling.langs_per_batch must be >= 1, got {self.langs_per_batch}")
        if self.length_pool < 0:
            raise ConfigError(f"sampling.length_pool must be >= 0 (0 = off), got {self.length_pool}")


@dataclass(frozen=True)
class MethodSpec:
    """What the layers below cats_ds/weighting/ know of a weighting method: its name (a key
    of METHODS) and how the loop treats it. cats_ds/weighting/registry.py binds the class
    that implements it to the name (`@register_method(name)`)."""
    gram: bool = True
    """It runs meta steps on the Gram matrix of per-language gradients (GRAM_METHODS): the
    distinct-language sampler and the draws at the meta-step schedule by default, the
    gradient capture, the refusal of optimizer offload."""
    split_gram: bool = True
    """It gets the split Gram of two half-batches unless grads.gram says otherwise
    (SPLIT_GRAM_METHODS; methods defined on expected gradients), else the plain Gram."""


METHODS: dict[str, MethodSpec] = {
    "temperature": MethodSpec(gram=False, split_gram=False),
    "gradnorm": MethodSpec(),
    "mgda": MethodSpec(),
    "cats": MethodSpec(split_gram=False),
    "pcgrad": MethodSpec(),
    "gradvac": MethodSpec(),
    "cagrad": MethodSpec(),
    "nashmtl": MethodSpec(),
    "imtl": MethodSpec(),
}
"""weighting.method's choices, declared here (below weighting/, which implements them) so
the config check, GRAM_METHODS and SPLIT_GRAM_METHODS need no import of weighting/."""

GRAM_METHODS = tuple(name for name, spec in METHODS.items() if spec.gram)
"""Weighting methods that run meta steps (per-language gradients and their Gram matrix)."""

SPLIT_GRAM_METHODS = tuple(name for name, spec in METHODS.items() if spec.gram and spec.split_gram)
"""The methods that get the split Gram unless grads.gram says otherwise (cats: plain)."""

MethodName = Literal[tuple(METHODS)]
"""The type of weighting.method: one of METHODS."""


@dataclass
class WeightingConfig(Section):
    method: MethodName = "temperature"
    """Task weighting. temperature: token-mean loss of the sampled batch. The others run
    meta steps on the Gram matrix (schedule meta.every, shares meta.weight_by);
    pcgrad, gradvac, cagrad, nashmtl, imtl: cats_ds/weighting/gramspace.py."""


@dataclass
class MetaConfig(Section):
    every: list[list[Optional[int]]] = field(default_factory=lambda: [[None, 10]])
    """Schedule of the meta steps of every Gram-based method, [[until_step, M], ...]: a meta
    step every M updates until until_step (None = forever). (Was cats.meta_every.)"""
    weight_by: Literal["tokens", "language"] = "tokens"
    """Loss coefficient of language n between meta steps, for every Gram-based method (w_n:
    CATS' alpha_n, the other methods' weights). tokens: c_n = w_n * tokens_n / tokens
    (w = 1 is exactly the temperature baseline at the run's T); language: c_n = w_n (each
    in-batch language's mean loss weighted by w_n alone). (Was cats.weight_by.)"""
    data: Literal["train", "dev"] = "train"
    """Where meta batches come from (the paper: train). (Was cats.meta_data.)"""
    temperature: Optional[float] = None
    """Draw the meta steps' batches at this language temperature (inf = uniform) instead
    of sampling.temperature; the meta step also trains on that batch. null: the run's T.
    (Was cats.meta_temperature.)"""
    params: Literal["shared", "all"] = "shared"
    """The Gram over shared parameters only (family experts excluded) or all parameters.
    (Was cats.params.)"""

    def check(self) -> None:
        if self.temperature is not None and not self.temperature > 0:
            raise ConfigError(f"meta.temperature must be > 0 (inf for uniform) or null, got {self.temperature!r}")
        if not self.every:
            raise ConfigError("meta.every must list at least one [until_step, M] entry")
        for i, entry in enumerate(self.every):
            if len(entry) != 2 or entry[1] is None or entry[1] < 1:
                raise ConfigError(f"meta.every[{i}] = {entry!r}: expected [until_step or null, M >= 1]")


@dataclass
class CatsConfig(Section):
    update: Literal["mirror", "lagrangian"] = "mirror"
    """How alpha moves at a meta step (docs/design.md, section 4, "CATS as implemented").
    mirror: exponentiated-gradient steps on dimensionless loss/curvature scores, in-batch languages keep their
    mass, relative curvature budget kappa, exact floor alpha_min. lagrangian: the paper's
    Eq. 6 read literally (SGD on alpha, ascent on the multipliers, absolute budget)."""
    loss_term: Literal["off", "descent", "ascent"] = "off"
    """A per-language loss score in the alpha step besides the curvature. off (default):
    none, the paper's meta objective is the curvature alone. descent: lower
    sum_B alpha_n L_n (weight goes to the lowest-loss languages; the old `true`). ascent:
    raise it (weight goes to the highest-loss languages). L_n: the per-language mean NLL."""
    lr_alpha: float = 0.1
    """Step on alpha: the exponentiated-gradient rate (mirror) or the SGD step (lagrangian).
    mirror with loss_term off: only the product lr_alpha * lr_lambda matters (docs/design.md)."""
    lr_lambda: float = 0.01
    """Projected gradient-ascent step on the Lagrange multipliers (mirror: on the budget
    violation relative to f0 - f_min, so dimensionless)."""
    kappa: float = 0.5
    """mirror: curvature budget b = f_min + kappa (f0 - f_min), f0 the meta batch's
    curvature at equal weights of the same mass, f_min the least any alpha (same mass,
    floor alpha_min) reaches; in [0, 1] (0: aim at the min-norm point, 1: equal weights
    already meet it)."""
    loss_ema: float = 0.9
    """mirror: decay of the per-language loss EMA the loss score uses (updated when the
    language is in a meta batch); in [0, 1)."""
    budget: float = 0.1
    """lagrangian: absolute curvature budget for alpha_B^T G alpha_B (the paper's eps in the
    lambda_c term)."""
    alpha_min: float = 0.1
    """Floor on every alpha (the paper's eps in the lambda_n term): exact for mirror, by
    multipliers for lagrangian; in [0, 1)."""

    def check(self) -> None:
        c = self
        _check_table((
            ("cats.kappa", c.kappa, 0 <= c.kappa <= 1, "in [0, 1]"),
            ("cats.loss_ema", c.loss_ema, 0 <= c.loss_ema < 1, "in [0, 1)"),
            ("cats.alpha_min", c.alpha_min, 0 <= c.alpha_min < 1, "in [0, 1) (sum alpha = N)"),
            ("cats.lr_alpha", c.lr_alpha, math.isfinite(c.lr_alpha) and c.lr_alpha >= 0, "finite and >= 0"),
            ("cats.lr_lambda", c.lr_lambda, math.isfinite(c.lr_lambda) and c.lr_lambda >= 0, "finite and >= 0"),
            ("cats.budget", c.budget, math.isfinite(c.budget) and c.budget >= 0, "finite and >= 0")))


@dataclass
class GradNormConfig(Section):
    asymmetry: float = 1.5
    """GradNorm's alpha (restoring-force strength)."""
    lr: float = 0.025
    """Step size on the task weights."""


@dataclass
class MgdaConfig(Section):
    iters: int = 200
    """Frank-Wolfe iterations for the min-norm point when a meta batch holds more than 8
    languages (up to 8 it is solved exactly)."""


@dataclass
class GradVacConfig(Section):
    beta: float = 0.01
    """EMA rate of the per-pair cosine targets phi^_ij <- (1 - beta) phi^_ij + beta phi_ij
    (Wang et al., 2021, 1e-2); in (0, 1]."""
    init: Literal["first", "zero"] = "first"
    """Start of a pair's target: its first observed cosine, or 0 (as LibMTL and TorchJD do).
    With zero, a pair of rarely sampled languages keeps a target near 0 for ~1/beta of ITS
    meta steps, so rare languages are vaccinated less than frequent ones (it fails the null
    test for thousands of meta steps); first has no such transient."""

    def check(self) -> None:
        _check_table((("gradvac.beta", self.beta, 0 < self.beta <= 1, "in (0, 1]"),))


@dataclass
class CagradConfig(Section):
    c: float = 0.5
    """Radius of the ball around the mean gradient, as a fraction of its norm (Liu et al.,
    2021; 0.5 is the reference implementation's default); in [0, 1) (0: plain GD)."""
    rescale: Literal[0, 1, 2] = 1
    """Divide the update by 1 (0), 1 + c^2 (1, the reference default) or 1 + c (2)."""
    iters: int = 500
    """Projected-gradient iterations for the dual when a meta batch holds more than 8
    languages (up to 8 it is solved exactly)."""

    def check(self) -> None:
        _check_table((("cagrad.c", self.c, 0 <= self.c < 1, "in [0, 1)"),
                      ("cagrad.iters", self.iters, self.iters >= 1, ">= 1")))


@dataclass
class NashMtlConfig(Section):
    iters: int = 100
    """Newton steps at most for G alpha = 1 / alpha (converges in ~10; the solution is
    accepted only at max |alpha_n (G alpha)_n - 1| < 1e-10)."""

    def check(self) -> None:
        _check_table((("nashmtl.iters", self.iters, self.iters >= 1, ">= 1"),))


@dataclass
class GradsConfig(Section):
    gram: Optional[Literal["plain", "split"]] = None
    """Which K x K matrix a meta step gives the Gram-based method. Each language's slot is
    cut into two halves of disjoint sentences and about equal target tokens, each backed
    up separately (2K backwards). plain: G[i, j] = <g_i, g_j> of the whole slots'
    gradients (the paper's minibatch Gram; a single slot's gradient is mostly noise, which
    inflates the diagonal). split: S[i, j] = (<g_i^a, g_j^b> + <g_i^b, g_j^a>) / 2 of the
    per-half token-mean gradients, unbiased for the Gram of the expected gradients
    (diagonal included), projected onto the PSD cone. null (default): split for gradnorm,
    mgda, pcgrad, gradvac, cagrad, nashmtl, imtl; plain for cats. The update is sum_n c_n
    g_n over the whole slots either way; both are logged (train_log.jsonl "gram")."""


@dataclass
class ExpertsConfig(Section):
    modules: list[Literal["ffn", "attn", "out_embed", "all"]] = field(default_factory=list)
    """Which modules get one expert per language family; empty = dense model."""
    side: Literal["encoder", "decoder", "both"] = "decoder"
    """Where ffn/attn experts sit."""
    families: Optional[str] = None
    """Family map YAML (family -> languages): a path, or a name in cats_ds/model/families/."""
    ep_size: int = 1
    """Expert-parallel world size (DeepSpeed MoE)."""

    def check(self) -> None:
        if self.ep_size < 1:
            raise ConfigError(f"experts.ep_size must be >= 1, got {self.ep_size}")


@dataclass
class TrainConfig(Section):
    save_dir: str = "runs/gettext8"
    """Checkpoints (best/, latest/), logs and TensorBoard events go here."""
    max_updates: int = 1000
    """Stop after this many optimizer updates."""
    max_minutes: Optional[float] = None
    """Also stop (after a checkpoint) within this much wall-clock time: checked every
    log_every updates, the run stops when another log_every updates plus a validation and
    save as long as the last one would end past it."""
    max_tokens: int = 4096
    """Token budget of one micro-batch on one rank (padded tokens, max of both sides)."""
    update_tokens: Optional[int] = None
    """If set, must equal max_tokens * gradient_accumulation_steps * world_size."""
    lr: float = 0.0015
    """Peak learning rate (Adam)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    """Adam betas."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    weight_decay: float = 0.0
    """Adam weight decay."""
    warmup_updates: int = 4000
    """Linear warmup, then inverse square root decay."""
    warmup_init_lr: float = 1e-7
    """Learning rate at update 0."""
    max_nonfinite: int = 5
    """Stop with an error after this many consecutive updates whose training loss is NaN or
    inf (fp16 loss-scale skips have finite losses and do not count); a non-finite
    validation loss stops at once. Neither writes a checkpoint."""
    label_smoothing: float = 0.1
    """Label smoothing of the cross entropy."""
    log_every: int = 50
    """A log line (and TensorBoard scalars) every N updates."""
    valid_every: int = 500
    """Validation loss per language (and checkpoints) every N updates."""
    resume: str = "auto"
    """auto: continue from save_dir/latest if present; none: start fresh; or a path."""
    overwrite: bool = False
    """Allow a run that starts from step 0 to replace the checkpoints (and train_log.jsonl)
    already in save_dir; without it such a start is refused."""
    seed: int = 1
    """Seed for initialization, sampling and dropout."""
    tensorboard: bool = True
    """Write TensorBoard events through DeepSpeed's monitor (unless the JSON sets it)."""
    host_malloc: Literal["reuse", "system"] = "reuse"
    """CPU ranks only: reuse keeps glibc malloc from mmapping (and page-faulting anew) the
    step's large buffers, so freed memory is reused (cats_ds/runtime/host_malloc.py; the
    environment's own MALLOC_* / GLIBC_TUNABLES settings win); system leaves malloc as it is.
    Numbers are unchanged either way, only the speed."""
    save_every: int = 0
    """Also save a numbered checkpoint <save_dir>/step_<n>/ every N updates (0: off); the
    inputs of `launch/average.py --last K`."""
    keep_last: int = 0
    """Keep only the newest N step_<n>/ checkpoints (0: keep all); best/ and latest/ are
    never removed by it."""
    best_metric: Literal["loss", "bleu", "chrf"] = "loss"
    """What best/ is: the lowest mean validation loss, or the highest mean dev BLEU / chrF++
    over languages (bleu and chrf need eval.valid_every; best/ is then chosen at the
    validations that translate)."""
    patience: int = 0
    """Stop after this many validations of train.best_metric in a row without improvement
    (0: never stop early)."""

    def check(self) -> None:
        t = self
        if t.max_tokens < 8:
            raise ConfigError(f"train.max_tokens must be >= 8, got {t.max_tokens}")
        for key in ("log_every", "valid_every", "max_nonfinite"):
            if getattr(t, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
        for key in ("max_updates", "warmup_updates"):
            if getattr(t, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(t, key)}")
        if not (math.isfinite(t.lr) and t.lr > 0):
            raise ConfigError(f"train.lr must be a finite number > 0, got {t.lr}")
        if not (math.isfinite(t.warmup_init_lr) and t.warmup_init_lr >= 0):
            raise ConfigError(f"train.warmup_init_lr must be a finite number >= 0, got {t.warmup_init_lr}")
        if t.resume not in ("auto", "none") and not t.resume:
            raise ConfigError("train.resume must be auto, none or a checkpoint path")
        for key in ("save_every", "keep_last", "patience"):
            if getattr(t, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0 (0: off), got {getattr(t, key)}")


@dataclass
class EvalConfig(Section):
    beam: int = 5
    """Beam size."""
    lenpen: float = 1.0
    """Length penalty: hypotheses are ranked by logprob / length^lenpen."""
    max_len_a: float = 1.2
    """Longest hypothesis = max_len_a * source length + max_len_b."""
    max_len_b: int = 10
    """See max_len_a."""
    batch_tokens: int = 6000
    """Source tokens per decoding batch."""
    tokenize: str = "13a"
    """Default sacreBLEU tokenizer."""
    tokenize_lang: dict[str, str] = field(
        default_factory=lambda: {"zh": "zh", "zh_CN": "zh", "zh_TW": "zh", "zh_HK": "zh",
                                 "ja": "char", "th": "char", "ko": "char", "km": "char",
                                 "lo": "char", "my": "char"})
    """Per-language sacreBLEU tokenizer overrides."""
    lo_max: int = 100_000
    """Languages with fewer training pairs are Lo."""
    hi_min: int = 1_000_000
    """Languages with at least this many training pairs are Hi (between: Mid)."""
    groups: dict[str, list[str]] = field(default_factory=dict)
    """Groups by name instead of by size, e.g. {Lo: [aze, bel, glg, slk], Hi: [tur, rus, por,
    ces]} (TED8's named sets): every evaluated language listed under one of Lo/Mid/Hi; ISO
    639-1 and 639-3 codes alike (cats_ds/data/groups.py). Empty: lo_max / hi_min decide."""
    valid_every: int = 0
    """During training, also translate the dev set every N updates (a multiple of
    train.valid_every, at whose validations it runs; 0: never) and log BLEU and chrF++ per
    language (bleu/en-xx, chrf/en-xx in TensorBoard and train_log.jsonl)."""
    valid_beam: int = 1
    """Beam size of that translation (1: greedy)."""
    valid_sentences: int = 200
    """Translate N dev sentences of each language (evaluate --limit's sample: the smallest
    sha256 of the English source)."""

    def check(self) -> None:
        """eval.valid_every is checked against train.valid_every in Config.validate."""
        e = self
        if e.beam < 1:
            raise ConfigError(f"eval.beam must be >= 1, got {e.beam}")
        try:
            check_named_groups(e.groups)
        except GroupError as err:
            raise ConfigError(str(err)) from None
        if e.valid_beam < 1 or e.valid_sentences < 1:
            raise ConfigError(f"eval.valid_beam and eval.valid_sentences must be >= 1, got "
                              f"{e.valid_beam} and {e.valid_sentences}")


@dataclass
class AnalysisConfig(Section):
    every: int = 0
    """Run the gradient/Hessian analysis every N updates during training (0 = never)."""
    pairs: list[str] = field(default_factory=list)
    """Language pairs such as ["de:af", "uk:kk"] for cos/gamma; empty = all pairs."""
    sentences: int = 64
    """Sentences per language in the fixed analysis batch."""
    hessian_iters: int = 20
    """Power-iteration steps for lambda_max."""
    hessian_tol: float = 1e-3
    """Stop power iteration when lambda changes by less than this (relative)."""

    def check(self) -> None:
        """analysis.pairs needs the run's languages: cats_ds/analysis/analyze.py, check_settings."""
        minimum = {"every": 0, "sentences": 1, "hessian_iters": 1, "hessian_tol": 0}
        for key, least in minimum.items():
            if getattr(self, key) < least:
                raise ConfigError(f"analysis.{key} must be >= {least}, got {getattr(self, key)}")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    cats: CatsConfig = field(default_factory=CatsConfig)
    gradnorm: GradNormConfig = field(default_factory=GradNormConfig)
    mgda: MgdaConfig = field(default_factory=MgdaConfig)
    gradvac: GradVacConfig = field(default_factory=GradVacConfig)
    cagrad: CagradConfig = field(default_factory=CagradConfig)
    nashmtl: NashMtlConfig = field(default_factory=NashMtlConfig)
    grads: GradsConfig = field(default_factory=GradsConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self) -> "Config":
        """Resolve the method-dependent defaults, run every section's own check (Section.check),
        then the checks that read keys of two sections; returns self. Checks that need the
        DeepSpeed JSON, the prepared data or the language list are outside config.py
        (docs/architecture.md, "Where the config checks live")."""
        if self.sampling.temperature is None:
            self.sampling.temperature = math.inf if self.weighting.method == "cats" else 5.0
        for f in dataclasses.fields(self):
            getattr(self, f.name).check()
        t, e, x = self.train, self.eval, self.experts
        if e.valid_every < 0 or (e.valid_every and e.valid_every % t.valid_every):
            raise ConfigError(f"eval.valid_every={e.valid_every} must be 0 (off) or a multiple of "
                              f"train.valid_every={t.valid_every} (dev translation runs at validations)")
        if t.best_metric != "loss" and not e.valid_every:
            raise ConfigError(f"train.best_metric={t.best_metric} needs dev translation: set eval.valid_every "
                              f"(a multiple of train.valid_every={t.valid_every}), or train.best_metric=loss")
        if e.valid_every and x.modules and x.ep_size > 1:  # ZeRO-3 (the DeepSpeed JSON): training.validation
            raise ConfigError(f"eval.valid_every={e.valid_every}: dev translation during training is not "
                              f"supported with experts.ep_size={x.ep_size} (every forward needs all ranks); set "
                              f"eval.valid_every=0 and evaluate saved checkpoints with launch/evaluate.py --split dev")
        if self.analysis.every and x.modules and x.ep_size > 1:
            raise ConfigError(f"analysis.every={self.analysis.every} with experts.ep_size={x.ep_size}: the Hessian "
                              f"needs every expert in one process; set analysis.every=0 and run cats-analyze on "
                              f"checkpoints")
        return self


# --------------------------------------------------------------------------- parsing


def _closest(key: str, choices) -> str:
    near = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{near[0]}'?" if near else f"; valid keys: {', '.join(sorted(choices))}"


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Turn a YAML value into the field's declared type, or raise naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            f = float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)  # accepts "inf" as well as YAML's .inf
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    return value


REMOVED = {
    "cats.eps": "cats.eps (one value for two constraints) was split: the curvature budget is "
                "cats.kappa (relative, for cats.update=mirror, the default) or cats.budget (absolute, "
                "for cats.update=lagrangian), and the floor on every alpha is cats.alpha_min",
}
"""Keys that no longer exist -> what replaces them (an error, never silently ignored)."""

MOVED = {
    "cats.meta_every": "meta.every",
    "cats.weight_by": "meta.weight_by",
    "cats.meta_data": "meta.data",
    "cats.meta_temperature": "meta.temperature",
    "cats.params": "meta.params",
}
"""Keys that moved -> their new name. The old name still loads (recipes, overrides, the
config saved in a checkpoint), with a note printed once per process; setting both the old
and the new name to different values is an error."""

LEGACY_VALUES = {
    "cats.loss_term": ({True: "descent", False: "off", "true": "descent", "false": "off"},
                       "cats.loss_term is no longer true/false but off | descent | ascent: true now reads "
                       "as descent (the old loss term: weight goes to the lowest-loss languages), false as off "
                       "(the default); write cats.loss_term=descent (or off, ascent) to silence this note"),
}
"""Old values of a key that still load: key -> ({old: new}, the note printed once per
process when an old value is read). YAML reads `off` as false, so false maps to off
without a note."""
_legacy_noted: set[str] = set()


def legacy_value(key: str, value: Any, note: bool = True) -> Any:
    """`value` of `key` with an old spelling replaced by its new one (LEGACY_VALUES); with
    `note`, the deprecation note goes to stderr once per process (rank 0 only) for an old
    value that is not also a new spelling."""
    if key not in LEGACY_VALUES or isinstance(value, (dict, list)):
        return value
    table, text = LEGACY_VALUES[key]
    if isinstance(value, str):
        lookup = value.lower()
    elif isinstance(value, bool):
        lookup = value
    else:
        return value
    if lookup not in table:
        return value
    if note and lookup not in (False, "false") and key not in _legacy_noted:
        _legacy_noted.add(key)
        _note(text)
    return table[lookup]


def move_legacy_keys(tree: dict, note: bool = True) -> dict:
    """A copy of a config mapping with the keys of MOVED under their new names; with `note`,
    a note on stderr once per process (rank 0 only) for each old name found."""
    tree = copy.deepcopy(tree or {})
    for old, new in MOVED.items():
        old_section, old_name = old.split(".", 1)
        node = tree.get(old_section)
        if not isinstance(node, dict) or old_name not in node:
            continue
        value = node.pop(old_name)
        new_section, new_name = new.split(".", 1)
        target = tree.setdefault(new_section, {})
        if not isinstance(target, dict):
            raise ConfigError(f"'{new_section}' is a section; expected a mapping, got {target!r}")
        if new_name in target and target[new_name] != value:
            raise ConfigError(f"{old} (the old name of {new}) is {value!r} but {new} is {target[new_name]!r}: "
                              f"set {new} only")
        target[new_name] = value
        if note and old not in _legacy_noted:
            _legacy_noted.add(old)
            _note(f"{old} is now {new} (one setting for every Gram-based method); write {new} to silence this note")
    return tree


def _note(text: str) -> None:
    """A deprecation note on stderr (rank 0 only)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"note: {text}", file=sys.stderr)


def upgrade_legacy(tree: dict) -> dict:
    """A copy of a config mapping (a checkpoint's saved config) with moved keys under their
    new names (MOVED) and old values in their new spelling (LEGACY_VALUES), silently, so it
    compares equal to a config loaded now."""
    tree = move_legacy_keys(tree, note=False)
    for key in LEGACY_VALUES:
        section, name = key.split(".", 1)
        node = tree.get(section)
        if isinstance(node, dict) and name in node:
            node[name] = legacy_value(key, node[name], note=False)
    return tree


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        key = f"{prefix}{k}"
        if key in REMOVED:
            raise ConfigError(REMOVED[key])
        if k not in names:
            raise ConfigError(f"unknown config key '{key}'" + _closest(k, names))
        v = legacy_value(key, v)
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            if not isinstance(v, dict):
                raise ConfigError(f"'{key}' is a section; expected a mapping, got {v!r}")
            kwargs[k] = _build(tp, v, key + ".")
        else:
            kwargs[k] = _coerce(v, tp, key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        detail = " ".join(str(e).split())
        raise ConfigError(f"override '{text}': the value is not valid YAML ({detail}); quote it or fix "
                          f"the brackets, e.g. {key.strip()}=[a,b]") from None
    return key.strip().split("."), value


def merge_overrides(tree: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{part}' is not a section")
        node[path[-1]] = value
    return tree


def config_from_dict(tree: dict) -> Config:
    return _build(Config, move_legacy_keys(tree), "").validate()


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Read a YAML recipe (or none) and apply ``section.field=value`` overrides. An error
    names where the offending value came from: the recipe file, or the command-line
    argument (the first override after which the error appears)."""
    tree: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
    overrides = list(overrides or [])
    for text in overrides:  # unparsable overrides first: they are the argument's fault alone
        try:
            parse_override(text)
        except ConfigError as e:
            raise ConfigError(str(e).replace("override ", "command-line argument ", 1)) from None
    try:
        return config_from_dict(merge_overrides(copy.deepcopy(tree), overrides))
    except ConfigError as e:
        raise ConfigError(_blame(tree, path, overrides, str(e))) from None


def _blame(tree: dict, path: Optional[str], overrides: list[str], message: str) -> str:
    """`message` prefixed with its source: the recipe when the recipe alone already fails
    with it, else the first command-line argument after which it appears."""
    for i in range(len(overrides) + 1):
        try:
            config_from_dict(merge_overrides(copy.deepcopy(tree), overrides[:i]))
        except ConfigError as e:
            if str(e) == message:
                if i == 0:
                    return f"{path}: {message}" if path else message
                return f"command-line argument '{overrides[i - 1]}': {message}"
    return f"{message} (from {path} and the command-line overrides)" if path else message


def distinct_languages(cfg: Config) -> bool:
    """sampling.distinct with its default resolved (on for the Gram-based methods)."""
    if cfg.sampling.distinct is None:
        return cfg.weighting.method in GRAM_METHODS
    return cfg.sampling.distinct


def draws_at_meta_steps(cfg: Config) -> bool:
    """sampling.draws_at_meta_steps with its default resolved (on for the Gram-based methods)."""
    if cfg.sampling.draws_at_meta_steps is None:
        return cfg.weighting.method in GRAM_METHODS
    return cfg.sampling.draws_at_meta_steps


def gram_kind(cfg: Config) -> str:
    """grads.gram with its default resolved: "split" for SPLIT_GRAM_METHODS, "plain" for
    cats (and for temperature, which has no meta steps)."""
    if cfg.grads.gram is not None:
        return cfg.grads.gram
    return "split" if cfg.weighting.method in SPLIT_GRAM_METHODS else "plain"


def default_config(method: str = "temperature") -> Config:
    """The default config of a weighting method with its method-dependent defaults resolved
    (sampling.temperature: inf for cats, 5.0 otherwise)."""
    cfg = Config()
    cfg.weighting.method = method
    return cfg.validate()


def cats_start_note(cfg: Config) -> Optional[str]:
    """The start-up line of a CATS run whose sampling is not T = inf (where alpha = 1 is the
    paper's equal weights), None otherwise."""
    t = cfg.sampling.temperature
    if cfg.weighting.method != "cats" or t is None or math.isinf(t):
        return None
    return (f"CATS from T={t:g}: alpha = 1 is the temperature baseline at sampling.temperature={t:g}, not the "
            f"paper's equal weights (T=inf, the default of a CATS run when sampling.temperature is not set)")


def meta_interval(schedule: list[list[Optional[int]]], step: int) -> int:
    """M in force at `step` under a [[until_step, M], ...] schedule."""
    for until, every in schedule:
        if until is None or step < until:
            return int(every)
    return int(schedule[-1][1])


def micro_step_tokens(cfg: Config | dict, world: int) -> int:
    """The global token budget of one micro-step: train.max_tokens (per rank) x world size.
    The sampler plans each draw for this budget, so it is what a run resumed on another
    world size must keep. `cfg`: a Config, or the dict a checkpoint's cats_ds.json stores."""
    max_tokens = cfg["train"]["max_tokens"] if isinstance(cfg, dict) else cfg.train.max_tokens
    return max_tokens * world


def tokens_per_update(cfg: Config | dict, world: int, gas: int = 1) -> int:
    """The token budget of one optimizer update over all ranks: train.max_tokens x
    gradient_accumulation_steps (`gas`, from the DeepSpeed JSON) x world size."""
    return micro_step_tokens(cfg, world) * gas


# --------------------------------------------------------------------------- printing


def field_docs() -> dict[str, str]:
    """{"section.key": its doc}: the string literal under each field of the section
    dataclasses in this file (the docstring-comments; Python keeps no such attribute)."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    docs = {}
    for section in dataclasses.fields(Config):
        node = classes[typing.get_type_hints(Config)[section.name].__name__]
        body = node.body
        for stmt, nxt in zip(body, body[1:] + [None]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                doc = ""
                if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str):
                    doc = " ".join(nxt.value.value.split())
                docs[f"{section.name}.{stmt.target.id}"] = doc
    return docs


def _yaml_value(value: Any) -> str:
    text = yaml.safe_dump({"v": value}, default_flow_style=True, sort_keys=False, width=10**9, allow_unicode=True)
    return text.strip()[len("{v: "):-1]


def _wrap(text: str, indent: str, width: int = 100) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width, initial_indent=indent + "# ", subsequent_indent=indent + "# ") or []


def config_yaml(cfg: Config, docs: bool = True, header: str = "") -> str:
    """The whole config as YAML that load_config reads back to an equal Config: every
    section and key in declaration order; with `docs`, each key's doc as a comment above
    it and, for a value that is not the default, the default."""
    default = default_config(cfg.weighting.method).to_dict()
    values = cfg.to_dict()
    notes = field_docs() if docs else {}
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    for section, fields in values.items():
        lines.append(f"{section}:")
        for key, value in fields.items():
            if docs:
                lines += _wrap(notes.get(f"{section}.{key}", ""), "  ")
                if value != default[section][key]:
                    lines.append(f"  # default: {_yaml_value(default[section][key])}")
            lines.append(f"  {key}: {_yaml_value(value)}")
    return "\n".join(lines) + "\n"
