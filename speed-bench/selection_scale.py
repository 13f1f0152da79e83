"""The selection step alone, on synthetic scores: does it scale to a million samples?

STAFF (regions, verification bookkeeping with a fake verifier, budgets, fill) and CCS at
N = 10^4, 10^5, 10^6: wall time (best of --repeats), the check t(10^6) < 1 s, and the growth
t(10N)/t(N) against the N log N bound 10·log(10N)/log(N). D2 at N = 10^5 with k = 5 on random
unit features (d = 64): time and peak memory (tracemalloc peak of a second run, and the growth
of the process's peak RSS).

python speed-bench/selection_scale.py            # about a minute on 2 CPU cores
"""

from __future__ import annotations

import argparse
import math
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from common import table, write_result
from speccore.config import coreset_size
from speccore.run.dryrun import peak_rss_bytes
from speccore.selection.base import rng_for
from speccore.selection.ccs import ccs_select
from speccore.selection.d2 import d2_select
from speccore.selection.staff import staff_select

LIMIT_SECONDS = 1.0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[10**4, 10**5, 10**6])
    p.add_argument("--prune-rate", type=float, default=0.9)
    p.add_argument("--regions", type=int, default=50)
    p.add_argument("--verify-per-region", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    p.add_argument("--d2-n", type=int, default=10**5)
    p.add_argument("--d2-k", type=int, default=5)
    p.add_argument("--d2-dim", type=int, default=64)
    p.add_argument("--name", default="selection_scale", help="results/<name>.json")
    return p.parse_args()


def synthetic_scores(n: int, seed: int = 0) -> np.ndarray:
    """Effort-like scores: positive, skewed (log-normal), a few large outliers."""
    return np.random.default_rng(seed).lognormal(mean=0.0, sigma=0.75, size=n)


def fake_verifier(scores: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A target that agrees with the small model up to noise, and counts its calls."""
    noise = np.random.default_rng(1)

    def verify(indices: np.ndarray) -> np.ndarray:
        return scores[indices] * 3.0 * noise.lognormal(0.0, 0.2, size=len(indices))

    return verify


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def run_staff(scores: np.ndarray, args: argparse.Namespace) -> None:
    m = coreset_size(len(scores), args.prune_rate)
    sel = staff_select(
        scores,
        m,
        regions=args.regions,
        verify_per_region=args.verify_per_region,
        verify=fake_verifier(scores),
        seed=0,
    )
    assert len(sel) == m


def run_ccs(scores: np.ndarray, args: argparse.Namespace) -> None:
    m = coreset_size(len(scores), args.prune_rate)
    indices, _ = ccs_select(scores, m, beta=0.1, strata=args.regions, rng=rng_for(0, 1))
    assert len(indices) <= m


def scaling(name: str, fn: Callable[[np.ndarray], None], args: argparse.Namespace) -> dict:
    """Time ``fn`` at every size; growth ratios against N log N."""
    fn(synthetic_scores(min(args.sizes)))  # warm-up: lazy imports (scipy) are not timed
    net = {}
    for n in args.sizes:
        scores = synthetic_scores(n)
        net[n] = best_of(lambda scores=scores: fn(scores), args.repeats)
    growth = []
    for small, large in zip(args.sizes, args.sizes[1:], strict=False):
        bound = (large / small) * math.log(large) / math.log(small)
        growth.append(
            {
                "from": small,
                "to": large,
                "ratio": net[large] / net[small],
                "n_log_n_bound": bound,
                "ok": net[large] / net[small] <= bound,
            }
        )
    largest = max(args.sizes)
    return {
        "method": name,
        "seconds": {str(n): net[n] for n in args.sizes},
        "growth": growth,
        "under_1s_at_largest": net[largest] < LIMIT_SECONDS,
        "largest": largest,
    }


def unit_features(n: int, d: int, seed: int = 2) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def d2_cost(args: argparse.Namespace) -> dict[str, Any]:
    """D2 time (a plain run) and memory (a traced run: tracemalloc slows numpy a little)."""
    n, k = args.d2_n, args.d2_k
    x, scores = unit_features(n, args.d2_dim), synthetic_scores(n)
    m = coreset_size(n, args.prune_rate)
    rss_before = peak_rss_bytes()
    start = time.perf_counter()
    picked, info = d2_select(x, scores, m, k=k)
    seconds = time.perf_counter() - start
    rss_growth = peak_rss_bytes() - rss_before
    tracemalloc.start()
    d2_select(x, scores, m, k=k)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(picked) == m
    return {
        "n": n,
        "k": k,
        "dim": args.d2_dim,
        "budget": m,
        "seconds": seconds,
        "tracemalloc_peak_mib": traced_peak / 2**20,
        "peak_rss_growth_mib": rss_growth / 2**20,
        "n_edges": info["n_edges"],
        "input_features_mib": x.nbytes / 2**20,
    }


def main() -> None:
    args = parse_args()
    results = [scaling("staff", lambda s: run_staff(s, args), args)]
    results.append(scaling("ccs", lambda s: run_ccs(s, args), args))
    rows = []
    for r in results:
        for g in r["growth"]:
            t_from, t_to = r["seconds"][str(g["from"])], r["seconds"][str(g["to"])]
            sizes = f"{g['from']:.0e} -> {g['to']:.0e}"
            ok = "yes" if g["ok"] else "NO"
            rows.append([r["method"], sizes, t_from, t_to, g["ratio"], g["n_log_n_bound"], ok])
    print(
        table(["method", "N", "t(N) s", "t(10N) s", "t(10N)/t(N)", "10·log(10N)/log N", "ok"], rows)
    )
    for r in results:
        verdict = "yes" if r["under_1s_at_largest"] else "NO"
        largest = r["seconds"][str(r["largest"])]
        print(f"{r['method']}: {largest:.3f} s at N = {r['largest']:.0e}; under 1 s: {verdict}")
    d2 = d2_cost(args)
    print(
        f"d2: N = {d2['n']:.0e}, k = {d2['k']}, d = {d2['dim']}: {d2['seconds']:.2f} s, "
        f"tracemalloc peak {d2['tracemalloc_peak_mib']:.0f} MiB, peak RSS growth "
        f"{d2['peak_rss_growth_mib']:.0f} MiB (features alone {d2['input_features_mib']:.0f} MiB)"
    )
    write_result(args.name, vars(args), {"scaling": results, "d2": d2}, device="cpu")


if __name__ == "__main__":
    main()
