"""STAFF, S2L and perplexity bands sharing one small model, on real data and the packaged models.

Runs the three selections one after the other on the same rows with one cache and one model
pool (so the small model is loaded and fine-tuned once), and prints each method's selection time
by stage, measured in this one run, and the Jaccard overlap of their coresets.

    .venv/bin/python speed-bench/small_selectors.py --rows 300 --prune-rate 0.9

Writes ``speed-bench/results/small_selectors.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from speccore.config import SelectConfig
from speccore.data import load_rows
from speccore.models.pool import ModelPool
from speccore.run.pipeline import select_with_tokens
from speccore.utils.io import atomic_open, write_json

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "dialogsum" / "train.jsonl.gz"
METHODS = ("staff", "s2l", "perplexity")


def sample_rows(path: Path, n: int, seed: int, out: Path) -> Path:
    rows = load_rows(str(path))
    picked = np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))
    with atomic_open(out) as f:
        for i in picked.tolist():
            f.write(json.dumps(rows[i], ensure_ascii=False) + "\n")
    return out


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = set(a.tolist()), set(b.tolist())
    return len(sa & sb) / len(sa | sb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--prune-rate", type=float, default=0.9)
    parser.add_argument("--max-length", type=int, default=384)
    parser.add_argument("--out", default=str(REPO / "speed-bench" / "results"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    work = Path(tempfile.mkdtemp(prefix="speccore-small-selectors-"))
    data = sample_rows(DATA, args.rows, 0, work / "train.jsonl")
    pool = ModelPool()
    results: dict[str, dict] = {}
    for method in METHODS:
        cfg = SelectConfig.from_dict(
            {
                "data": str(data),
                "template": "Summarize the dialogue.\n{dialogue}\nSummary: ",
                "output_field": "summary",
                "small": "smollm2-135m",
                "target": "gemma-3-270m",
                "method": method,
                "prune_rate": args.prune_rate,
                "small_epochs": 1,
                "regions": 10,
                "verify_per_region": 5,
                "max_length": args.max_length,
                "cache_dir": str(work / "cache"),
            }
        )
        start = time.perf_counter()
        selection, _ = select_with_tokens(cfg, pool=pool)
        results[method] = {
            "seconds": time.perf_counter() - start,
            "timings": selection.timings,
            "indices": selection.indices.tolist(),
        }
    overlaps = {
        f"{a} ∩ {b}": jaccard(np.array(results[a]["indices"]), np.array(results[b]["indices"]))
        for a, b in itertools.combinations(METHODS, 2)
    }
    out = Path(args.out)
    record = {
        "rows": args.rows,
        "prune_rate": args.prune_rate,
        "methods": results,
        "jaccard": overlaps,
    }
    write_json(out / "small_selectors.json", record)
    lines = [
        f"# STAFF, S2L, perplexity on {args.rows} DialogSum rows, p = {args.prune_rate}",
        "",
        "Measured in one run, in this order, sharing one cache and one model pool "
        "(smollm2-135m → gemma-3-270m, T = 1, K = 10, b_v = 5, max length "
        f"{args.max_length}).",
        "",
        "| method | total s | stages (s) |",
        "| --- | ---: | --- |",
    ]
    for method in METHODS:
        r = results[method]
        stages = ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items() if k != "total")
        lines.append(f"| {method} | {r['seconds']:.1f} | {stages} |")
    lines += ["", f"| Jaccard overlap at p = {args.prune_rate:g} | |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.3f} |" for k, v in overlaps.items()]
    with atomic_open(out / "small_selectors.md") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
