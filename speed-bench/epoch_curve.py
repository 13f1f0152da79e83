"""How long must the mini benches fine-tune the target for the data to matter? (issue 24, item 4)

Reference NLL (on the bench's evaluation rows) of the target fine-tuned on all training rows and
on a random coreset (p = 0.9), after 1, 2, 4 and 8 epochs, one seed. Each epoch count is a
small bench of its own (``full`` + ``random`` at p = 0.9, seed 0, reference NLL only) in
``runs/epoch-curve/<config>-e<epochs>``, so an interrupted curve resumes where it stopped. Prints
the curve as a Markdown table and writes it to ``speed-bench/results/epoch_curve_<config>.md``.

    python speed-bench/epoch_curve.py                               # UI mini bench, 1 2 4 8
    python speed-bench/epoch_curve.py --epochs 1 2 4 --config quality-bench/mini-dialogsum.yaml
    python speed-bench/epoch_curve.py --dry-run                    # the cells and their estimate

The epoch count to choose is the shortest after which the random coreset's NLL has stopped
falling fast, while full data stays ahead of it (a gap that data can close is what a selection
method can win).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from speccore.bench import load_bench_config, run_bench  # noqa: E402
from speccore.bench.bench_config import BenchConfig  # noqa: E402
from speccore.utils.io import atomic_open  # noqa: E402

RATE = 0.9


def curve_config(base: BenchConfig, epochs: float, root: Path) -> BenchConfig:
    """``base`` reduced to full data and random at p = 0.9, seed 0, reference NLL only, with
    ``epochs`` of fine-tuning."""
    import dataclasses

    return dataclasses.replace(
        base,
        out=str(root / f"e{epochs:g}"),
        methods=["random"],
        variants={},
        prune_rates=[RATE],
        seeds=[0],
        full=True,
        zero_shot=False,
        finetune=dataclasses.replace(base.finetune, epochs=float(epochs)),
        metrics=dataclasses.replace(base.metrics, generate_rows=0),
    )


def cell(folder: Path, name: str) -> dict[str, Any]:
    return json.loads((folder / "cells" / f"{name}.json").read_text(encoding="utf-8"))


def markdown(rows: list[dict[str, Any]], config: str, seconds: float) -> str:
    lines = [
        f"# Reference NLL vs fine-tune epochs ({config}, seed 0)",
        "",
        "| epochs | full data NLL | random p = 0.9 NLL | random − full | full fine-tune s "
        "| random fine-tune s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['epochs']:g} | {r['full']:.3f} | {r['random']:.3f} | "
            f"{r['random'] - r['full']:+.3f} | {r['full_s']:.0f} | {r['random_s']:.0f} |"
        )
    lines += [
        "",
        f"_Reference NLL in nats/token, lower is better; wall time {seconds / 60:.1f} min._",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "quality-bench" / "mini-uitrans.yaml"))
    parser.add_argument("--epochs", type=float, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--root", default=None, help="default: runs/epoch-curve/<config name>")
    parser.add_argument("--dry-run", action="store_true", help="estimate each epoch count's cells")
    parser.add_argument("--table", default=None, help="default: speed-bench/results/...md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    base = load_bench_config(args.config)
    name = Path(args.config).stem
    root = Path(args.root or REPO / "runs" / "epoch-curve" / name)
    if args.dry_run:
        from speccore.bench.estimate import estimate_bench, format_bench_estimate

        for epochs in args.epochs:
            print(f"## {epochs:g} epochs")
            print(format_bench_estimate(estimate_bench(curve_config(base, epochs, root))))
        return 0
    start = time.perf_counter()
    rows = []
    out = Path(args.table or REPO / "speed-bench" / "results" / f"epoch_curve_{name}.md")
    for epochs in args.epochs:
        cfg = curve_config(base, epochs, root)
        run_bench(cfg, plots=False)
        full, rand = cell(cfg.folder, "full_s0"), cell(cfg.folder, f"random_p{RATE:g}_s0")
        rows.append(
            {
                "epochs": epochs,
                "full": full["metrics"]["nll"],
                "random": rand["metrics"]["nll"],
                "full_s": full["train_seconds"],
                "random_s": rand["train_seconds"],
            }
        )
        # After every epoch count: a curve cut short still leaves its finished points.
        with atomic_open(out) as f:
            f.write(markdown(rows, name, time.perf_counter() - start) + "\n")
    print(markdown(rows, name, time.perf_counter() - start))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
