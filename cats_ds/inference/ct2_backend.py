"""CTranslate2 as a decoding backend of `evaluate` (`--backend ctranslate2`) and of
`bench decode`.

The checkpoint is exported on the fly (cats_ds/inference/export.py) into a cache folder,
`<save_dir>/eval/ctranslate2/<checkpoint name>/`, and reused while the checkpoint is
unchanged: `source.json` there records the checkpoint's files (name, size, mtime) and
its cats_ds.json; any difference (training re-saved best/, another checkpoint copied
over it) exports again. A family-expert checkpoint decodes each language with its
family's model (`families.json`).

Decoding follows cats_ds.inference.search as closely as CTranslate2 allows:
  - the same beam size and length penalty (hypotheses ranked by sum log-prob /
    length^lenpen, length counting </s>: CTranslate2's `length_penalty`);
  - the same length limit per sentence, int(max_len_a * source length + max_len_b)
    tokens including </s> (source length counting </s>): CTranslate2 takes one
    `max_decoding_length` per call, so a batch is split into runs of sentences with the
    same limit (batches are sorted by source length, so these runs are long), and the
    limit minus 1 is passed (CTranslate2 does not count </s>);
  - <pad>, <unk> and <s> are never generated (`suppress_sequences`, `disable_unk`), no
    minimum length, the `<2xx>` tag is the first decoder input (`target_prefix`).
At the length limit cats_ds.inference.search allows only </s> and counts its log-probability;
CTranslate2 stops there without </s> and scores the hypothesis without it, so cut
hypotheses look better to it than to us. When a sentence's best CTranslate2 hypothesis is
such a cut one, all its n-best hypotheses are scored again as ours are (`score_batch`:
teacher forcing with </s>) and the best by sum / length^lenpen is kept: the hypotheses
that reach the limit are the same beams in both searches, so this gives our choice,
unless the cut hypotheses (looking better than they are) pushed a finished one out of
CTranslate2's n-best: a model that runs to the length limit on a sentence may then get
another hypothesis than ours there (seen with a barely trained model; tested to stay
within 0.1 BLEU).
One difference remains: CTranslate2 renormalizes the softmax over the tokens it may
still generate, while cats_ds.inference.search leaves the banned tokens' mass out without
renormalizing (so its scores equal teacher forcing). Scores during the search therefore
differ by the log of (1 - that mass), which only reorders beams whose scores nearly tie:
with greedy search (beam 1) the tokens are identical, with beam 5 almost every sentence
is (tests/test_ctranslate2_backend.py prints the ones that differ).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from cats_ds.checkpoints import CHECKPOINT_META, read_meta
from cats_ds.data.manifest import BOS, EOS, PAD
from cats_ds.inference.ct2_export import _ctranslate2, export_ctranslate2

BACKENDS = ("pytorch", "ctranslate2")
"""pytorch: the project's own search (cats_ds/inference/search.py); ctranslate2: an export of the checkpoint."""
SOURCE_FILE = "source.json"


def cache_dir(checkpoint: str | Path) -> Path:
    """`<save_dir>/eval/ctranslate2/<checkpoint name>`: beside the checkpoint, not inside it."""
    ckpt = Path(checkpoint).resolve()
    return ckpt.parent / "eval" / "ctranslate2" / ckpt.name


def checkpoint_fingerprint(checkpoint: str | Path) -> dict:
    """What identifies a checkpoint's contents without reading its weights: every file's
    name, size and modification time, and the whole cats_ds.json."""
    ckpt = Path(checkpoint)
    files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(ckpt.iterdir()) if p.is_file()}
    meta = (ckpt / CHECKPOINT_META).read_text(encoding="utf-8") if (ckpt / CHECKPOINT_META).is_file() else ""
    return {"checkpoint": str(ckpt.resolve()), "files": files, "meta": meta}


def cached_export(checkpoint: str | Path, cfg, model, vocab, languages: list[str], cache: Optional[Path] = None,
                  say=print) -> Path:
    """The CTranslate2 export of `checkpoint` (whose loaded config/model/vocab are given),
    from the cache when it was made from the same checkpoint files, else exported now."""
    cache = Path(cache) if cache is not None else cache_dir(checkpoint)
    source = checkpoint_fingerprint(checkpoint)
    stamp = cache / SOURCE_FILE
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text(encoding="utf-8")) == source:
                say(f"| CTranslate2 model: {cache} (cached export of {checkpoint})")
                return cache
        except json.JSONDecodeError:
            pass
    t0 = time.time()
    cache.parent.mkdir(parents=True, exist_ok=True)
    export_ctranslate2(cfg, model, vocab, languages, cache, force=True, checkpoint=str(checkpoint),
                       step=read_meta(checkpoint).get("step"))
    stamp.write_text(json.dumps(source, indent=1), encoding="utf-8")  # last: an interrupted export is redone
    say(f"| CTranslate2 model: exported {checkpoint} to {cache} in {time.time() - t0:.1f}s (cached for the next run)")
    return cache


def limit_runs(limits: list[int]) -> list[tuple[int, int]]:
    """[start, end) runs of consecutive equal limits."""
    runs, start = [], 0
    for i in range(1, len(limits) + 1):
        if i == len(limits) or limits[i] != limits[start]:
            runs.append((start, i))
            start = i
    return runs


def max_length(src_len: int, max_len_a: float, max_len_b: int, max_positions: int) -> int:
    """cats_ds.inference.search.max_lengths for one sentence of src_len tokens (</s> included)."""
    return int(min(max(int(np.floor(max_len_a * src_len + max_len_b)), 1), max_positions))


class CT2Decoder:
    """Decodes batches of prepared source sentences (token ids ending in </s>) with the
    CTranslate2 export in `folder`; results are token ids ending in </s>, as
    cats_ds.inference.search gives them."""

    def __init__(self, folder: str | Path, vocab, max_positions: int, device: str = "cpu",
                 threads: Optional[int] = None):
        self.ct2 = _ctranslate2()
        self.folder = Path(folder)
        index = self.folder / "families.json"
        self.family_of = json.loads(index.read_text())["folder"] if index.is_file() else {}
        self.vocab, self.max_positions = vocab, max_positions
        self.device, self.device_index = ("cuda", int(device.split(":")[1]) if ":" in device else 0) \
            if device.startswith("cuda") else ("cpu", 0)
        self.threads = threads or torch.get_num_threads()
        self.translators: dict[Path, object] = {}
        self.pieces = [vocab.sp.id_to_piece(i) for i in range(len(vocab))]
        self.ids = {p: i for i, p in enumerate(self.pieces)}

    def translator(self, lang: str):
        where = self.folder / self.family_of.get(lang, "")
        if where not in self.translators:
            self.translators[where] = self.ct2.Translator(str(where), device=self.device,
                                                          device_index=self.device_index,
                                                          intra_threads=self.threads if self.device == "cpu" else 0)
        return self.translators[where]

    def decode(self, lang: str, srcs: list[np.ndarray], beam: int, lenpen: float, max_len_a: float,
               max_len_b: int) -> list[list[int]]:
        """Best hypothesis of each source (in input order), </s> appended."""
        limits = [max_length(len(s), max_len_a, max_len_b, self.max_positions) for s in srcs]
        order = sorted(range(len(srcs)), key=lambda i: limits[i])
        out: list[Optional[list[int]]] = [None] * len(srcs)
        tag = self.vocab.sp.id_to_piece(self.vocab.lang_ids[lang])
        translator = self.translator(lang)
        for start, end in limit_runs([limits[i] for i in order]):
            idx = order[start:end]
            sources = [[self.pieces[int(t)] for t in srcs[i][:-1]] for i in idx]  # CTranslate2 appends </s>
            results = translator.translate_batch(
                sources, target_prefix=[[tag]] * len(idx), beam_size=beam, num_hypotheses=beam,
                length_penalty=lenpen, max_decoding_length=limits[idx[0]] - 1, min_decoding_length=0,
                disable_unk=True, suppress_sequences=[[self.pieces[PAD]], [self.pieces[BOS]]],
                return_end_token=True, max_batch_size=len(idx))
            eos = self.pieces[EOS]
            rescore = []  # (sentence, its n-best without </s>): best hypothesis cut at the limit
            for i, src, r in zip(idx, sources, results):
                best = r.hypotheses[0]
                if best and best[-1] == eos:
                    out[i] = [self.ids[p] for p in best]
                else:
                    rescore.append((i, src, [h[:-1] if h and h[-1] == eos else h for h in r.hypotheses]))
            if rescore:
                self._rescore(translator, tag, rescore, lenpen, out)
        return out  # type: ignore[return-value]

    def _rescore(self, translator, tag: str, todo: list, lenpen: float, out: list) -> None:
        """Hypotheses cut at the length limit end without </s> in CTranslate2, scored without
        it; cats_ds.inference.search ends them with </s> and counts its log-probability. Score every
        hypothesis of those sentences as cats_ds.inference.search does (teacher forcing: score_batch
        appends </s>, no renormalization) and keep the best by sum / length^lenpen."""
        sources = [src for _, src, hyps in todo for _ in hyps]
        targets = [[tag] + h for _, _, hyps in todo for h in hyps]
        scored = iter(translator.score_batch(sources, targets, max_batch_size=len(targets)))
        for i, _, hyps in todo:
            best, best_score = None, -float("inf")
            for h in hyps:
                lp = next(scored).log_probs  # one per token of h, then </s>
                score = sum(lp) / float(len(lp)) ** lenpen
                if best is None or score > best_score:
                    best, best_score = h, score
            out[i] = [self.ids[p] for p in best] + [EOS]


def prepare_decoder(checkpoint: str | Path, cfg, model, vocab, languages: list[str], device: str, rank: int,
                    world: int, say=print) -> CT2Decoder:
    """Export (or reuse) on rank 0 while the other ranks wait, then a decoder on every rank."""
    folder = cache_dir(checkpoint)
    if rank == 0:
        cached_export(checkpoint, cfg, model, vocab, languages, folder, say=say)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return CT2Decoder(folder, vocab, cfg.model.max_positions, device=device)

