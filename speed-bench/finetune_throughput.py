"""Fine-tune tokens/s against a bare forward+backward over the same tokens, row batching (before
issue 22) and token batching (after) side by side, on real UI and DialogSum rows.

For each task and batching: (bare) the fine-tune's own forward passes, collated beforehand, each
a response-window loss and a backward, nothing else (no optimizer, no schedule, no loop); (ft)
``speccore.train.finetune`` over the same rows for one epoch. Printed per run: real tokens/s of
both, ft/bare (goal on CPU: >= 0.85), the padding fraction (padded tokens that are padding) and
the optimizer steps; ``--budgets`` adds token budgets to the comparison (0 is the default one).
Runs are interleaved (bare rows, ft rows, bare tokens, ft tokens, ...), each on a fresh adapter.

    python speed-bench/finetune_throughput.py                       # gemma-3-270m, ~30 min CPU
    python speed-bench/finetune_throughput.py --model smollm2-135m  # ~10 min CPU
    python speed-bench/finetune_throughput.py --tiny                # tiny offline model, seconds
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from common import TASKS, load_task, table, write_result
from speccore.config import LoraSettings, SelectConfig, TrainSettings
from speccore.data import Formatting, tokenize_dataset
from speccore.data.batches import TokenizedData, collate
from speccore.models import attach_lora, detach_lora
from speccore.models.speed import adapter_autocast
from speccore.scoring.losses import response_loss
from speccore.train import finetune
from speccore.train.batching import padded_tokens
from speccore.train.loop import forward_pieces


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--tasks", default="ui,dialogsum")
    p.add_argument("--ui-rows", type=int, default=100)
    p.add_argument("--dialogsum-rows", type=int, default=24)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--budgets", default="0", help="token budgets to compare (0: the default)")
    p.add_argument("--max-batch-tokens", type=int, default=1024, help="speccore's CPU default")
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="a tiny offline model on a few rows")
    p.add_argument("--name", default="finetune_throughput")
    return p.parse_args()


def load(args: argparse.Namespace) -> tuple[Any, Any]:
    if args.tiny:
        from speccore.models.tiny import tiny_causal_lm, tiny_tokenizer

        tok = tiny_tokenizer()
        return tiny_causal_lm(len(tok), hidden_size=32, layers=2, seed=0), tok
    from speccore.models import load_model

    loaded = load_model(args.model, device=args.device)
    return loaded.model, loaded.tokenizer


def tokenized(task: str, rows: int, tokenizer: Any) -> TokenizedData:
    import datasets

    settings = TASKS[task]
    cfg = SelectConfig.from_dict({"data": "-", **settings})
    ds = datasets.Dataset.from_list(load_task(task, rows))
    return tokenize_dataset(ds, tokenizer, Formatting.from_config(cfg), settings["max_length"])


def bare(model: Any, data: TokenizedData, batches: list[Any]) -> float:
    """Seconds of a forward and a backward per piece, collated beforehand."""
    collated = [collate(data, b) for b in batches]
    model.train()
    start = time.perf_counter()
    for batch in collated:
        with adapter_autocast(model):
            loss = response_loss(model, batch).total
        loss.backward()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    model.eval()
    return seconds


def run(args: argparse.Namespace) -> dict[str, Any]:
    base, tokenizer = load(args)
    budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    rows_of = {"ui": args.ui_rows, "dialogsum": args.dialogsum_rows}
    if args.tiny:
        rows_of = {"ui": 12, "dialogsum": 4}
    results = []
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        data = tokenized(task, rows_of[task], tokenizer)
        plain = TrainSettings(epochs=1, batch_size=args.batch_size, seed=0)
        variants = [("rows", replace(plain, batching="rows"))]
        variants += [(f"tokens {b or 'auto'}", replace(plain, batch_tokens=b)) for b in budgets]
        for label, settings in variants:
            model = attach_lora(base, LoraSettings(), seed=0)
            try:
                batches = forward_pieces(data, settings, args.max_batch_tokens)
                real, padded = padded_tokens(data.lengths, batches)
                bare_s = bare(model, data, batches)
                stats = finetune(model, data, settings, max_batch_tokens=args.max_batch_tokens)
            finally:
                base = detach_lora(model)
            record = {
                "task": task,
                "rows": len(data),
                "batching": label,
                "steps": int(stats["steps"]),
                "tokens": real,
                "padding_fraction": (padded - real) / padded,
                "bare_tokens_per_s": real / bare_s,
                "finetune_tokens_per_s": stats["tokens_per_s"],
                "ratio": stats["tokens_per_s"] / (real / bare_s),
            }
            results.append(record)
            print(
                f"{task} {label}: ft {record['finetune_tokens_per_s']:.0f} tok/s, bare "
                f"{record['bare_tokens_per_s']:.0f} tok/s, ratio {record['ratio']:.2f}, "
                f"padding {100 * record['padding_fraction']:.1f}%, {record['steps']} steps"
            )
    return {"runs": results}


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    results = run(args)
    header = ["task", "rows", "batching", "steps", "padding", "ft tok/s", "bare tok/s", "ft/bare"]
    rows = [
        [
            r["task"],
            r["rows"],
            r["batching"],
            r["steps"],
            f"{100 * r['padding_fraction']:.1f}%",
            round(r["finetune_tokens_per_s"], 1),
            round(r["bare_tokens_per_s"], 1),
            round(r["ratio"], 3),
        ]
        for r in results["runs"]
    ]
    print()
    print(table(header, rows))
    if not args.tiny:
        write_result(args.name, vars(args), results, device=args.device)


if __name__ == "__main__":
    main()
