"""Shared test utilities: a synthetic parallel corpus and the real DeepSpeed launcher."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a cat dog house red blue green runs sleeps eats big small old new car tree sun "
         "moon star river city road book door window light night day water fire stone").split()


def foreign_word(word: str, lang: str) -> str:
    """A fixed made-up translation of an English word, different per language."""
    vowels = "aeiou"
    shift = sum(map(ord, lang)) % 5
    return lang[0] + "".join(vowels[(vowels.index(c) + shift) % 5] if c in vowels else c for c in word[::-1])


def translate(sentence: str, lang: str) -> str:
    words = [foreign_word(w, lang) for w in sentence.split()]
    return " ".join(reversed(words) if lang.startswith("b") else words)


def make_plain_corpus(root: Path, sizes: dict[str, int], dev: int = 30, test: int = 30, seed: int = 0) -> Path:
    """{train,dev,test}.en-xx.{en,xx} files of made-up but learnable translations."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    for lang, n in sizes.items():
        for split, count in (("train", n), ("dev", dev), ("test", test)):
            en = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10))) for _ in range(count)]
            (root / f"{split}.en-{lang}.en").write_text("".join(s + "\n" for s in en), encoding="utf-8")
            (root / f"{split}.en-{lang}.{lang}").write_text("".join(translate(s, lang) + "\n" for s in en),
                                                           encoding="utf-8")
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], nproc: int, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run a script under the real `deepspeed` launcher with `nproc` CPU (gloo) ranks."""
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    port = free_port()
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
           "--master_port", str(port)] + [str(a) for a in args]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    finally:
        # a rank that died before cats_ds released DeepSpeed's /dev/shm workspace leaves it behind
        for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            leftover.unlink(missing_ok=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"launcher exited {proc.returncode}\n--- stdout\n{proc.stdout[-6000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def kill_processes(procs, port: int) -> None:
    """kill -9 each psutil.Process still alive, then remove the /dev/shm workspaces DeepSpeed's
    CPU backend left for the run on `port`."""
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    for leftover in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        leftover.unlink(missing_ok=True)


def wait_for_updates(save_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until train_log.jsonl of a run started in the background holds n train records; an
    error if the run ends first (it must still be running to be interrupted)."""
    log = Path(save_dir) / "train_log.jsonl"
    end = time.time() + timeout
    while time.time() < end:
        if log.is_file() and log.read_text().count('"kind": "train"') >= n:
            return
        assert proc.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.1)
    raise AssertionError(f"no {n} logged updates after {timeout}s")


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=1))
    return path


def read_log(save_dir: Path, kind: str = "train") -> list[dict]:
    lines = (Path(save_dir) / "train_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def ds_config(stage: int, gas: int = 1, clip: float = 1.0, **extra) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": gas,
            "gradient_clipping": clip, "zero_optimization": {"stage": stage},
            "steps_per_print": 10 ** 8, **extra}


TINY_MODEL = {"embed_dim": 32, "ffn_dim": 64, "encoder_layers": 2, "decoder_layers": 2, "heads": 4,
              "dropout": 0.0}


def checkpoint_dev_loss(folder: Path) -> float:
    """Mean over languages of the per-token dev loss of a checkpoint loaded for
    inference, computed in one process: what train.py records as the valid loss."""
    import torch

    from cats_ds.checkpoints import load_for_inference
    from cats_ds.data.manifest import load_split
    from cats_ds.data.sampler import collate, eval_plans
    from cats_ds.training.losses import per_language_sums

    cfg, model, manifest, vocab, langs = load_for_inference(folder)
    dev = load_split(cfg.data.dir, manifest, "dev", langs)
    sums = torch.zeros(2, len(langs), dtype=torch.float64)
    with torch.no_grad():
        for plan in eval_plans(dev, langs, cfg.train.max_tokens, 0, 1):
            b = collate(plan, dev, langs, [vocab.lang_ids[lang] for lang in langs])
            loss, _, tok = per_language_sums(model(b.src, b.prev, b.langs), b.tgt, b.langs, len(langs),
                                             cfg.train.label_smoothing)
            sums += torch.stack([loss.double(), tok.double()])
    return float((sums[0] / sums[1]).mean())
