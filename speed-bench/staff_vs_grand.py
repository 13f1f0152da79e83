"""End-to-end selection time of STAFF vs GraNd on the same rows (and, optionally, every method).

Both run through ``speccore.select`` with one fresh temporary cache (adapters and scores), the
same T for the small model's fine-tune (STAFF) and the target's (GraNd), after both models were
converted once beforehand (conversion is never timed; each run's model loading is). The paper
reports STAFF/GraNd = 0.30-0.85.

``--all-methods`` also runs el2n, ccs, d2, random and staff-target-only on the same cache: the
baselines share GraNd's tuned target (its fine-tune is cached, so their totals exclude it) and
EL2N scores, as they would in a real comparison. Then the Jaccard overlap |A∩B| / |A∪B| of every
pair of coresets is printed (two random coresets of m out of N overlap m / (2N − m) on average).

``--task ui`` takes the mini UI bench's 400 rows and formatting (its T, K and b_v by default:
1, 10, 5). ``--batchings rows,tokens`` runs every method under each fine-tune batching, side by
side in one run (rows: the batching before issue 22; tokens: the default since).

CPU (2 cores): python speed-bench/staff_vs_grand.py --rows 300 --epochs 1
CPU, UI, before/after: python speed-bench/staff_vs_grand.py --task ui --rows 400 \
    --batchings rows,tokens --name staff_vs_grand_ui
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

import speccore
from common import TASKS, load_dialogsum, load_task, table, write_jsonl, write_result
from speccore.config import coreset_size
from speccore.models import load_model

BASE_METHODS = ["staff", "grand"]
MORE_METHODS = ["el2n", "ccs", "d2", "random", "staff-target-only"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--small", default="smollm2-135m")
    p.add_argument("--target", default="gemma-3-270m")
    p.add_argument("--data", default=None, help="JSONL(.gz) with dialogue/summary (DialogSum)")
    p.add_argument("--task", choices=sorted(TASKS), default="dialogsum")
    p.add_argument(
        "--batchings", default="tokens", help="fine-tune batchings to compare: rows,tokens"
    )
    p.add_argument("--rows", type=int, default=300)
    p.add_argument("--epochs", type=float, default=1.0, help="T of both fine-tunes")
    p.add_argument("--regions", type=int, default=10, help="K")
    p.add_argument("--verify-per-region", type=int, default=5, help="b_v")
    p.add_argument("--prune-rate", type=float, default=0.9)
    p.add_argument("--max-length", type=int, default=None, help="default: the task's")
    p.add_argument("--batch-size", type=int, default=8)
    # Gemma's 262k vocabulary makes logits huge: at 4096 tokens per batch GraNd's target
    # fine-tune peaked at 17 GB of RAM on the CPU (killed on a 23 GB machine); at 1024 the
    # whole run peaked at 6.6 GB.
    p.add_argument("--max-batch-tokens", type=int, default=1024)
    p.add_argument("--device", default="auto")
    p.add_argument("--all-methods", action="store_true", help="also " + ", ".join(MORE_METHODS))
    p.add_argument("--name", default=None, help="results/<name>.json (default from the methods)")
    return p.parse_args()


def convert_models(args: argparse.Namespace) -> None:
    """Convert (GGUF → safetensors, cached) and load both models once, untimed."""
    for name in (args.small, args.target):
        start = time.perf_counter()
        loaded = load_model(name, device=args.device)
        del loaded
        print(f"{name}: ready in {time.perf_counter() - start:.1f} s (not counted)")


def run_method(
    method: str, data: Path, cache: Path, args: argparse.Namespace, batching: str = "tokens"
) -> dict[str, Any]:
    print(f"--- {method} ({batching} batching)")
    start = time.perf_counter()
    task = dict(TASKS[args.task])
    task["max_length"] = args.max_length or task["max_length"]
    sel = speccore.select(
        data=str(data),
        **task,
        batching=batching,
        small=args.small,
        target=args.target,
        method=method,
        prune_rate=args.prune_rate,
        small_epochs=args.epochs,
        target_epochs=args.epochs,
        regions=args.regions,
        verify_per_region=args.verify_per_region,
        batch_size=args.batch_size,
        max_batch_tokens=args.max_batch_tokens,
        device=args.device,
        cache_dir=str(cache),
    )
    wall = time.perf_counter() - start
    print(f"{method}: {wall:.1f} s, kept {len(sel)}")
    return {
        "method": method if batching == "tokens" else f"{method} ({batching})",
        "batching": batching,
        "stage_tokens": sel.info.get("stage_tokens"),
        "wall_seconds": wall,
        "timings": sel.timings,
        "indices": sel.indices.tolist(),
        "target_samples_scored": sel.info.get("target_samples_scored"),
    }


def jaccard(a: list[int], b: list[int]) -> float:
    sa, sb = set(a), set(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 1.0


def stage_table(runs: list[dict[str, Any]]) -> str:
    stages: list[str] = []
    for r in runs:
        stages += [s for s in r["timings"] if s not in stages and s != "total"]
    rows = [[s] + [r["timings"].get(s, "") for r in runs] for s in stages]
    rows.append(["total", *(r["timings"]["total"] for r in runs)])
    return table(["stage (s)", *(r["method"] for r in runs)], rows)


def overlap_table(runs: list[dict[str, Any]]) -> tuple[str, dict[str, float]]:
    pairs = {
        f"{a['method']}|{b['method']}": jaccard(a["indices"], b["indices"])
        for a, b in itertools.combinations(runs, 2)
    }
    names = [r["method"] for r in runs]
    rows = [
        [a]
        + [
            1.0 if a == b else pairs.get(f"{a}|{b}", pairs.get(f"{b}|{a}", float("nan")))
            for b in names
        ]
        for a in names
    ]
    return table(["Jaccard", *names], rows), pairs


def main() -> None:
    args = parse_args()
    convert_models(args)
    if args.data:
        rows = load_dialogsum(args.rows, Path(args.data))
        rows = [{k: r[k] for k in ("dialogue", "summary", "topic") if k in r} for r in rows]
    else:
        rows = load_task(args.task, args.rows)
    methods = BASE_METHODS + (MORE_METHODS if args.all_methods else [])
    batchings = [b.strip() for b in args.batchings.split(",") if b.strip()]
    runs = []
    with tempfile.TemporaryDirectory(prefix="speccore-bench-") as tmp:
        data = write_jsonl(rows, Path(tmp) / "train.jsonl")
        for batching in batchings:  # a cache per batching: each run pays its fine-tunes
            cache = Path(tmp) / f"cache-{batching}"
            runs += [run_method(m, data, cache, args, batching) for m in methods]
    print()
    print(stage_table(runs))
    ratios = {}
    for batching in batchings:
        by_name = {r["method"].split(" (")[0]: r for r in runs if r["batching"] == batching}
        ratios[batching] = (
            by_name["staff"]["timings"]["total"] / by_name["grand"]["timings"]["total"]
        )
        print(f"STAFF / GraNd total time ({batching}): {ratios[batching]:.2f} (paper: 0.30-0.85)")
    ratio = ratios[batchings[-1]]
    for r in runs:
        for stage, v in (r.get("stage_tokens") or {}).items():
            print(
                f"{r['method']:>20} {stage:<22} {v['tokens']:>8} tokens  padding "
                f"{100 * v['padding_fraction']:5.1f}%  {v['tokens_per_s']:>9,.0f} tok/s"
            )
    overlaps, pairs = overlap_table(runs)
    m = coreset_size(len(rows), args.prune_rate)
    print(
        f"\ncoreset overlap (m = {m} of {len(rows)}; random pairs ≈ {m / (2 * len(rows) - m):.3f})"
    )
    print(overlaps)
    name = args.name or ("staff_vs_grand_all" if args.all_methods else "staff_vs_grand")
    results = {
        "rows": len(rows),
        "budget": m,
        "staff_over_grand": ratio,
        "staff_over_grand_by_batching": ratios,
        "runs": runs,
        "jaccard": pairs,
    }
    write_result(name, vars(args), results, device=args.device)


if __name__ == "__main__":
    main()
