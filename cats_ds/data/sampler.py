"""Language sampler: temperature T over languages, K language slots per batch,
token-budget batches, disjoint data per rank.

Every rank runs the same sampler and sees the same GLOBAL plan for a micro-step (so all
ranks agree on which languages are in the batch, as the Gram matrix needs); each rank
then takes its own interleaved share of every language's sentences. The global plan
depends only on `max_tokens * world_size`, so 2 ranks with budget B train on exactly the
data 1 rank with budget 2B sees.

Plain updates may pool the sentences of `length_pool` consecutive draws and regroup
them by (source, target) length into micro-batches (`next_batch`): every drawn sentence is trained
exactly once, within the window of its draw, so each language's expected token share is
what the draws give; only which sentences share a micro-batch changes (length bands, one
forward each, little padding). Meta steps take the draws themselves (`next_plan`).

State is tiny and exact: the micro-step counter plus (epoch, position) per language, and
the pool's starting state plus position. Everything else is recomputed from (seed,
language, epoch) and (seed, pool start).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from cats_ds.data.manifest import PAD, LangSplit


def temperature_probs(sizes: list[int], temperature: float) -> np.ndarray:
    """p_l ~ n_l^(1/T); T = inf gives uniform."""
    n = np.asarray(sizes, dtype=np.float64)
    if math.isinf(temperature):
        w = (n > 0).astype(np.float64)
    else:
        w = n ** (1.0 / temperature)
    return w / w.sum()


def draw_languages(rng: np.random.Generator, probs: np.ndarray, k: int, distinct: bool) -> list[int]:
    """The languages of a micro-batch's K slots.

    distinct=False: K independent draws from p (repeats allowed; a language's expected
    share of slots, hence of tokens, is exactly p_l).
    distinct=True: successive sampling without replacement: slot 1 from p, each next slot
    from p renormalized over the languages not drawn yet, until min(K, #languages with
    p_l > 0) are drawn. The inclusion probability pi_l (the chance that l is in the batch)
    is then not K p_l: large-p languages are capped at pi_l <= 1 and the rest are lifted
    (e.g. 2 of 3 languages with p = (0.8, 0.1, 0.1): pi = (0.978, 0.511, 0.511), not
    (1.6, 0.2, 0.2)); each drawn language fills one slot of max_tokens * world / K tokens,
    so its expected token share is pi_l / K, flatter than p_l."""
    if not distinct:
        return rng.choice(len(probs), size=k, replace=True, p=probs).tolist()
    p = np.asarray(probs, dtype=np.float64).copy()
    out = []
    for _ in range(min(k, int((p > 0).sum()))):
        li = int(rng.choice(len(p), p=p / p.sum()))
        out.append(li)
        p[li] = 0.0
    return out


def chunk_by_budget(order: np.ndarray, cost: np.ndarray, budget: int) -> list[np.ndarray]:
    """Split sentence ids `order` (ascending by cost) into consecutive chunks whose
    padded cost (count * longest) stays within budget; a sentence over budget is alone."""
    c = cost[order]
    chunks, i, n = [], 0, len(order)
    sorted_c = c.tolist()
    while i < n:
        # largest j with (j - i + 1) * c[j] <= budget; c ascending makes this monotone
        lo, hi = i, n - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if (mid - i + 1) * sorted_c[mid] <= budget:
                lo = mid
            else:
                hi = mid - 1
        chunks.append(order[i:lo + 1])
        i = lo + 1
    return chunks


def chunk_greedy(order: np.ndarray, cost: np.ndarray, budget: int) -> list[np.ndarray]:
    """Split sentence ids `order` (any order) into consecutive chunks whose padded cost
    (count * largest cost in the chunk) stays within budget, greedily; a sentence over
    budget is alone. With `order` sorted by (source, target) length and cost = max(source,
    target), as fairseq batches, a chunk's sources are nearly equal in length."""
    chunks, start, top = [], 0, 0
    for i, c in enumerate(cost[order].tolist()):
        top_i = max(top, c)
        if i > start and (i - start + 1) * top_i > budget:
            chunks.append(order[start:i])
            start, top_i = i, c
        top = top_i
    if len(order) > start:
        chunks.append(order[start:])
    return chunks


@dataclass
class Plan:
    """One micro-step's global batch: languages (indices into the language list, each
    once, ascending) and the sentence ids of each."""
    langs: list[int]
    sents: list[np.ndarray]

    def for_rank(self, rank: int, world: int) -> "Plan":
        # sentences are ascending by length within a chunk: interleaving keeps ranks balanced
        return Plan(self.langs, [s[rank::world] for s in self.sents])


class LanguageSampler:
    def __init__(self, splits: dict[str, LangSplit], languages: list[str], temperature: float,
                 langs_per_batch: int, max_tokens: int, world_size: int, seed: int, allow_missing: bool = False,
                 distinct: bool = False, length_pool: int = 0):
        missing = [l for l in languages if l not in splits]
        if missing and not allow_missing:
            raise ValueError(f"no training data for language(s) {', '.join(missing)}")
        self.languages = languages
        self.sizes = [len(splits[l]) if l in splits else 0 for l in languages]
        self.cost = [np.maximum(splits[l].src.sizes, splits[l].tgt.sizes) if l in splits else np.zeros(0, np.int64)
                     for l in languages]
        self.src_sizes = [splits[l].src.sizes if l in splits else np.zeros(0, np.int64) for l in languages]
        self.tgt_sizes = [splits[l].tgt.sizes if l in splits else np.zeros(0, np.int64) for l in languages]
        self.probs = temperature_probs(self.sizes, temperature)
        self.k = langs_per_batch
        self.distinct = distinct
        budget = max_tokens * world_size  # config.micro_step_tokens: the global budget of one micro-step
        self.slot_budget = max(1, budget // langs_per_batch)
        self.seed = seed
        self.micro_step = 0
        self.cursor = [[0, 0] for _ in languages]  # (epoch, position) per language
        self._chunks: dict[int, tuple[int, list[np.ndarray]]] = {}
        self.batch_budget = max(1, budget)
        self.length_pool = length_pool
        self._pool: list[Plan] = []
        self._pool_pos = 0
        self._pool_start: Optional[tuple[int, list[list[int]]]] = None  # (micro_step, cursor) before the pool

    def _epoch_chunks(self, li: int, epoch: int) -> list[np.ndarray]:
        cached = self._chunks.get(li)
        if cached is not None and cached[0] == epoch:
            return cached[1]
        rng = np.random.default_rng([self.seed, 1, li, epoch])
        perm = rng.permutation(self.sizes[li])
        order = perm[np.argsort(self.cost[li][perm], kind="stable")]  # by length, random ties
        chunks = chunk_by_budget(order, self.cost[li], self.slot_budget)
        chunks = [chunks[i] for i in rng.permutation(len(chunks))]
        self._chunks[li] = (epoch, chunks)
        return chunks

    def _take(self, li: int) -> np.ndarray:
        epoch, pos = self.cursor[li]
        chunks = self._epoch_chunks(li, epoch)
        if pos >= len(chunks):
            epoch, pos = epoch + 1, 0
            chunks = self._epoch_chunks(li, epoch)
        self.cursor[li] = [epoch, pos + 1]
        return chunks[pos]

    def plan_for(self, langs: list[int]) -> Plan:
        """The next chunk of each given language that has data (meta batches from dev)."""
        have = [li for li in langs if self.sizes[li] > 0]
        return Plan(have, [self._take(li) for li in have])

    def next_plan(self, probs: Optional[np.ndarray] = None) -> Plan:
        """The next micro-batch; `probs` overrides the language probabilities of this one
        draw (meta batches at meta.temperature)."""
        rng = np.random.default_rng([self.seed, 2, self.micro_step])
        self.micro_step += 1
        slots = draw_languages(rng, self.probs if probs is None else probs, self.k, self.distinct)
        taken: dict[int, list[np.ndarray]] = {}
        for li in slots:
            taken.setdefault(li, []).append(self._take(li))
        langs = sorted(taken)
        sents = []
        for li in langs:
            s = np.concatenate(taken[li])
            sents.append(s[np.argsort(self.cost[li][s], kind="stable")])
        return Plan(langs, sents)

    def next_batch(self) -> tuple[Plan, list[Plan]]:
        """The next micro-batch of a plain update and the draws made to produce it (empty
        while the pool lasts). Without a pool that is the next draw itself."""
        if not self.length_pool:
            plan = self.next_plan()
            return plan, [plan]
        drawn = []
        if self._pool_pos >= len(self._pool):
            drawn = self._fill_pool()
        self._pool_pos += 1
        return self._pool[self._pool_pos - 1], drawn

    def _fill_pool(self) -> list[Plan]:
        """Draw length_pool plans, sort their sentences by (source length, target length)
        (targets in alternating direction per source length) and cut micro-batches of
        padded cost (sentences x longest max(src, tgt)) <= max_tokens x world size, as
        fairseq batches, in a random order."""
        start = self.micro_step
        self._pool_start = (start, [list(c) for c in self.cursor])
        drawn = [self.next_plan() for _ in range(self.length_pool)]
        lang_of = np.concatenate([np.full(len(s), li) for p in drawn for li, s in zip(p.langs, p.sents)])
        sent_of = np.concatenate([s for p in drawn for s in p.sents])
        cost = np.concatenate([self.cost[li][s] for p in drawn for li, s in zip(p.langs, p.sents)])
        src = np.concatenate([self.src_sizes[li][s] for p in drawn for li, s in zip(p.langs, p.sents)])
        tgt = np.concatenate([self.tgt_sizes[li][s] for p in drawn for li, s in zip(p.langs, p.sents)])
        # by source length, then target length ascending at even and descending at odd source
        # lengths, so a micro-batch that spans two source lengths spans similar targets
        order = np.lexsort((np.where(src % 2 == 1, -tgt, tgt), src))
        groups = chunk_greedy(order, cost, self.batch_budget)
        rng = np.random.default_rng([self.seed, 4, start])
        self._pool = []
        for gi in rng.permutation(len(groups)).tolist():
            g_lang, g_sent = lang_of[groups[gi]], sent_of[groups[gi]]
            langs = np.unique(g_lang).tolist()
            self._pool.append(Plan(langs, [g_sent[g_lang == li] for li in langs]))  # each ascending by source
        self._pool_pos = 0
        return drawn

    def state_dict(self) -> dict:
        pool = None
        if self._pool_pos < len(self._pool):  # resume rebuilds the pool from its starting state
            pool = {"micro_step": self._pool_start[0], "cursor": self._pool_start[1], "pos": self._pool_pos}
        return {"micro_step": self.micro_step, "cursor": [list(c) for c in self.cursor],
                "languages": list(self.languages), "slot_budget": self.slot_budget, "seed": self.seed,
                "length_pool": self.length_pool, "pool": pool}

    def load_state_dict(self, state: dict) -> None:
        if state["languages"] != self.languages:
            raise ValueError(f"checkpoint sampler languages {state['languages']} != configured {self.languages}")
        if state["slot_budget"] != self.slot_budget or state["seed"] != self.seed:
            raise ValueError(f"checkpoint sampler budget/seed ({state['slot_budget']}, {state['seed']}) != "
                             f"({self.slot_budget}, {self.seed}): max_tokens * world_size / K or the seed changed")
        pool = state.get("pool")
        if pool is not None and state.get("length_pool") != self.length_pool:
            raise ValueError(f"checkpoint sampler has sampling.length_pool={state.get('length_pool')}, this run "
                             f"{self.length_pool}: resume with the same length_pool")
        self._pool, self._pool_pos = [], 0
        if pool is not None:
            self.micro_step, self.cursor = int(pool["micro_step"]), [list(c) for c in pool["cursor"]]
            self._fill_pool()
            self._pool_pos = int(pool["pos"])
        self.micro_step = int(state["micro_step"])
        self.cursor = [list(c) for c in state["cursor"]]


def split_by_length(plan: Plan, splits: dict[str, LangSplit], languages: list[str], budget: int) -> list[Plan]:
    """Split a global plan into length-homogeneous groups of padded cost <= budget, so a
    micro-batch mixing short and long chunks is not padded to its longest sentence.
    Every rank computes the same groups, so all run the same number of forwards."""
    lang_of = np.concatenate([np.full(len(s), li) for li, s in zip(plan.langs, plan.sents)])
    sent_of = np.concatenate(plan.sents)
    cost = np.concatenate([np.maximum(splits[languages[li]].src.sizes[s], splits[languages[li]].tgt.sizes[s])
                           for li, s in zip(plan.langs, plan.sents)])
    groups = []
    for chunk in chunk_by_budget(np.argsort(cost, kind="stable"), cost, budget):
        langs = sorted(set(lang_of[chunk].tolist()))
        groups.append(Plan(langs, [sent_of[chunk][lang_of[chunk] == li] for li in langs]))
    return groups


def eval_plans(splits: dict[str, LangSplit], languages: list[str], max_tokens: int,
               rank: int, world: int, limit: Optional[int] = None) -> list[Plan]:
    """Deterministic single-language batches over a dev/test split, dealt round-robin to
    ranks (a rank may get none)."""
    plans = []
    for li, lang in enumerate(languages):
        if lang not in splits:
            continue
        n = len(splits[lang]) if limit is None else min(limit, len(splits[lang]))
        cost = np.maximum(splits[lang].src.sizes[:n], splits[lang].tgt.sizes[:n])
        order = np.argsort(cost, kind="stable")
        plans.extend(Plan([li], [c]) for c in chunk_by_budget(order, cost, max_tokens))
    return plans[rank::world]


@dataclass
class Batch:
    src: torch.Tensor    # (B, S) source pieces + </s>, right-padded
    prev: torch.Tensor   # (B, T) <2xx> + target pieces
    tgt: torch.Tensor    # (B, T) target pieces + </s>
    langs: torch.Tensor  # (B,) language index of each sentence
    ids: torch.Tensor    # (B,) sentence id within its language's split

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) for t in (self.src, self.prev, self.tgt, self.langs, self.ids)))

    def __len__(self) -> int:
        return self.src.size(0)

    def select(self, rows: torch.Tensor) -> "Batch":
        return Batch(*(t[rows] for t in (self.src, self.prev, self.tgt, self.langs, self.ids)))


def pad_stack(seqs: list[np.ndarray], pad: int = PAD) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    out = np.full((len(seqs), width), pad, dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return torch.from_numpy(out)


def collate(plan: Plan, splits: dict[str, LangSplit], languages: list[str], tag_ids: list[int]) -> Batch:
    """Plan -> padded tensors; the language tag is the first decoder input token."""
    src, prev, tgt, langs, ids = [], [], [], [], []
    for li, sents in zip(plan.langs, plan.sents):
        data = splits[languages[li]]
        for i in sents.tolist():
            y = np.asarray(data.tgt[i], dtype=np.int64)  # pieces + </s>
            src.append(np.asarray(data.src[i], dtype=np.int64))
            tgt.append(y)
            prev.append(np.concatenate([[tag_ids[li]], y[:-1]]))
            langs.append(li)
            ids.append(i)
    return Batch(pad_stack(src), pad_stack(prev), pad_stack(tgt),
                 torch.tensor(langs, dtype=torch.long), torch.tensor(ids, dtype=torch.long))


def target_tokens(plan: Plan, splits: dict[str, LangSplit], languages: list[str]) -> dict[int, int]:
    """Target tokens (incl. </s>) per language in a plan: the loss normalizers."""
    return {li: int(splits[languages[li]].tgt.sizes[s].sum()) for li, s in zip(plan.langs, plan.sents)}
