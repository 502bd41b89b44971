"""The pass/fail table at the end of launch/gpu_check.sh, from the files its paths wrote.

    python -m cats_ds.bench.gpu_check <OUT> <UPDATES> <RESUME_UPDATES>

A path passes when its command exited 0 AND its files show the work was done: the
training runs reached their last update (the resumed one continued from its latest/
instead of starting over), CATS logged its weights, both evaluations scored every
language. Prints the table and the numbers (tokens/s per path, chrF++ in fp32 and bf16
and the share of identical hypotheses, bench train's tokens/s and MFU), writes
<OUT>/gpu_check.json, and exits with the number of failed paths.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Optional


def read_jsonl(path: Path, kind: str = "train") -> list[dict]:
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("kind") == kind]


def tokens_per_s(log: list[dict], first_step: int = 0) -> Optional[float]:
    """Median target tokens/s over the logged intervals after the first (start-up)."""
    rates = [r["tokens_per_s"] for r in log if r["step"] > first_step][1:]
    return statistics.median(rates) if rates else None


def identical_share(a: Path, b: Path) -> tuple[int, int]:
    """(identical, total) hypothesis lines over the hyp.en-*.txt files of two eval folders."""
    same = total = 0
    for fa in sorted(a.glob("hyp.en-*.txt")):
        la = fa.read_text(encoding="utf-8").splitlines()
        lb = (b / fa.name).read_text(encoding="utf-8").splitlines() if (b / fa.name).is_file() else []
        total += len(la)
        same += sum(x == y for x, y in zip(la, lb))
    return same, total


def check(out: Path, updates: int, resume_updates: int) -> tuple[list[list], dict]:
    status = {}
    for line in (out / "results.tsv").read_text().splitlines():
        name, state, seconds = line.split("\t")
        status[name] = [state, int(seconds)]
    rows, summary = [], {}

    def row(name: str, problem: Optional[str], detail: str) -> None:
        state, seconds = status.get(name, ["NOT RUN", 0])
        if state == "PASS" and problem:
            state = "FAIL"
        rows.append([name, state, seconds, problem or detail])
        summary[name] = {"status": state, "seconds": seconds, "detail": problem or detail}

    row("prepare", None, "")
    for name in ("dense", "cats", "experts"):
        log = read_jsonl(out / name / "train_log.jsonl")
        if name == "dense":  # the resumed run appends to the same log: judge the first session only
            log = [r for r in log if r["step"] <= updates]
        last = max((r["step"] for r in log), default=0)
        rate = tokens_per_s(log)
        problem = None if last == updates else f"log ends at step {last}, expected {updates}"
        if name == "cats" and not problem and not any(k.startswith("alpha/") for k in log[-1].get("weighting", {})):
            problem = "no alpha/* in the CATS log"
        row(name, problem, f"{rate:.0f} target tokens/s" if rate else "")
        summary[name]["tokens_per_s"] = rate
    log = read_jsonl(out / "dense" / "train_log.jsonl")
    resumed = [r["step"] for r in log if r["step"] > updates]
    text = (out / "resume.log").read_text(errors="replace") if (out / "resume.log").is_file() else ""
    problem = None
    if "resumed from" not in text:
        problem = "did not resume from latest/"
    elif not resumed or max(resumed) != updates + resume_updates:
        problem = f"continued to step {max(resumed, default=updates)}, expected {updates + resume_updates}"
    rate = tokens_per_s(log, updates)
    row("resume", problem, f"steps {updates + 1}-{updates + resume_updates}" + (f", {rate:.0f} tokens/s" if rate else ""))
    chrf = {}
    for dtype in ("fp32", "bf16"):
        path = out / f"eval_{dtype}" / "bleu.json"
        problem, detail = None, ""
        if path.is_file():
            avg = json.loads(path.read_text())["averages"].get("All") or {}
            chrf[dtype] = avg.get("chrf")
            detail = f"chrF++ All {chrf[dtype]:.2f}" if chrf[dtype] is not None else ""
        else:
            problem = f"no {path}"
        row(f"evaluate_{dtype}", problem, detail)
    same, total = identical_share(out / "eval_fp32", out / "eval_bf16")
    summary["identical_hypotheses"] = {"identical": same, "total": total}
    if total:
        rows[-1][3] += f"; {same}/{total} hypotheses ({100 * same / total:.1f}%) identical to fp32"
    bench_path = out / "bench_train.json"
    problem, detail = None, ""
    if bench_path.is_file():
        bench = json.loads(bench_path.read_text())
        r = next(v for k, v in bench.items() if k.startswith("ranks_"))
        mfu = "n/a (unknown peak)" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        detail = (f"{r['tokens_per_s']:.0f} tokens/s, full/bare {r['ratio_to_bare']:.2f}, "
                  f"{r['model_tflops_per_s']:.2f} model TFLOP/s, MFU {mfu} ({r['precision']} on {r['device']})")
        summary["bench_train"] = r
    else:
        problem = f"no {bench_path}"
    row("bench", problem, detail)
    return rows, summary


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 3:
        print("usage: python -m cats_ds.bench.gpu_check OUT UPDATES RESUME_UPDATES", file=sys.stderr)
        return 2
    out, updates, resume_updates = Path(args[0]), int(args[1]), int(args[2])
    rows, summary = check(out, updates, resume_updates)
    widths = [max(len(str(r[i])) for r in rows + [["path", "status", "seconds", "details"]]) for i in range(3)]
    print("\n" + "  ".join(h.ljust(w) for h, w in zip(["path", "status", "seconds"], widths)) + "  details")
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r[:3], widths)) + f"  {r[3]}")
    failed = sum(r[1] != "PASS" for r in rows)
    print(f"\n{len(rows) - failed} of {len(rows)} paths passed; logs in {out}/<path>.log; summary {out}/gpu_check.json")
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    return failed


if __name__ == "__main__":
    sys.exit(main())
