"""The previous beam search (tests/old_search.py) against the current one on a checkpoint,
on `bench decode`'s sentences and batches, in one run (alternating which goes first per
language): sentences/s of each and how many best hypotheses and 5-best lists are identical.

    python tests/scripts/compare_search.py --checkpoint runs/gettext8/best --sentences 800
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from old_search import old_beam_search  # noqa: E402

from cats_ds.bench.suite import decode_batches  # noqa: E402
from cats_ds.checkpoints import load_for_inference  # noqa: E402
from cats_ds.data.manifest import load_split  # noqa: E402
from cats_ds.inference.search import beam_search  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--sentences", type=int, default=800)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--beam", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg, model, manifest, vocab, languages = load_for_inference(args.checkpoint)
    model.eval()
    splits = load_split(cfg.data.dir, manifest, "test", languages)
    batches = decode_batches(splits, languages, args.sentences // len(splits), args.batch)
    seconds = {"old": 0.0, "new": 0.0}
    n = same_best = same_nbest = 0
    for li, lang in enumerate(languages):
        if lang not in batches:
            continue
        decoders = [("old", old_beam_search), ("new", beam_search)]
        outs = {}
        for name, fn in decoders if li % 2 == 0 else decoders[::-1]:
            t0, out = time.perf_counter(), []
            for ids in batches[lang]:
                src = torch.nn.utils.rnn.pad_sequence(
                    [torch.as_tensor(splits[lang].src[i].astype("int64")) for i in ids], batch_first=True)
                out += fn(model, src, torch.full((len(ids),), vocab.lang_ids[lang]), torch.full((len(ids),), li),
                          beam=args.beam, lenpen=cfg.eval.lenpen, max_len_a=cfg.eval.max_len_a,
                          max_len_b=cfg.eval.max_len_b)
            seconds[name] += time.perf_counter() - t0
            outs[name] = out
        for a, b in zip(outs["old"], outs["new"]):
            n += 1
            same_best += a[0].tokens == b[0].tokens
            same_nbest += [h.tokens for h in a] == [h.tokens for h in b]
    print(f"{n} sentences: old {n / seconds['old']:.2f} sentences/s, new {n / seconds['new']:.2f} sentences/s, "
          f"new/old {seconds['old'] / seconds['new']:.2f}x; identical best hypotheses {same_best}/{n}, "
          f"identical {args.beam}-best lists {same_nbest}/{n}")


if __name__ == "__main__":
    main()
