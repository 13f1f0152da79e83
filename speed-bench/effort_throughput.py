"""Throughput of exact effort scoring, side by side with its two yardsticks.

(a) speccore's batched exact effort: ``score_samples(model, data, "effort", max_batch_tokens=T)``
    (one forward + one backward per length-grouped batch, per-sample norms from hooks);
(b) the per-sample loop the public STAFF code uses: every sample alone (batch size 1, no
    padding), ``autograd.grad`` of its loss w.r.t. every LoRA parameter, then the norm
    (:func:`speccore.scoring.effort_reference`);
(c) a plain batched LoRA forward + backward over the same batches (one summed loss, parameter
    gradients, no per-sample work): the practical limit for (a).

Throughput is real (unpadded) tokens per second, so the ratios are ratios of wall time.
Goals: a/c ≥ 0.9 at every T; a/b ≥ 2 on a GPU, ≥ 0.9 on a CPU. Also reports how far (a) is from
(b) (both exact: only rounding apart).

CPU:  python speed-bench/effort_throughput.py --model smollm2-135m --rows 300
GPU:  python speed-bench/effort_throughput.py --random-llama 1e9 --rows 300 --device cuda
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from tqdm.auto import tqdm

from common import DIALOGSUM, load_dialogsum, stopwatch, table, write_result
from speccore.config import LoraSettings, SelectConfig
from speccore.data import Formatting, collate, length_grouped_batches, tokenize_dataset
from speccore.data.batches import TokenizedData
from speccore.models import attach_lora, load_model, random_llama, resolve_device, resolve_dtype
from speccore.models.lora import seeded
from speccore.scoring import effort_reference, score_samples, token_losses
from speccore.scoring.losses import model_device, response_logits


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model (alias, folder, hub name)")
    p.add_argument(
        "--random-llama",
        type=float,
        default=None,
        help="instead of --model: a random Llama of this many parameters (e.g. 1e9); "
        "--model then only gives the tokenizer",
    )
    p.add_argument("--data", default=None, help="JSONL(.gz) with dialogue/summary (DialogSum)")
    p.add_argument("--rows", type=int, default=300)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-batch-tokens", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--exact-samples", type=int, default=5, help="samples listed in the exactness")
    p.add_argument("--repeats", type=int, default=1, help="time each run this often, keep the best")
    p.add_argument(
        "--reference-rows",
        type=int,
        default=None,
        help="run (b), the slow per-sample loop, on the first this many rows only (its tokens/s "
        "and the exactness are measured there; default: all rows)",
    )
    p.add_argument("--name", default="effort_throughput", help="results/<name>.json")
    return p.parse_args()


def build_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    """(LoRA model, tokenizer, description). The adapter's B is made non-zero so that both the
    A and B gradients are real work (a fresh adapter has B = 0, hence dL/dA = 0)."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    loaded = load_model(
        args.model, dtype=args.dtype, device="cpu" if args.random_llama else args.device
    )
    if args.random_llama:
        base = random_llama(
            args.random_llama, vocab_size=len(loaded.tokenizer), dtype=dtype, device=device
        )
        what = f"random Llama {sum(p.numel() for p in base.parameters()) / 1e9:.2f}B"
    else:
        base, what = loaded.model, args.model
    model = attach_lora(base, LoraSettings(), seed=0)
    with seeded(1, model), torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model, loaded.tokenizer, f"{what} ({dtype}, {device})"


def tokenise(args: argparse.Namespace, tokenizer: Any) -> TokenizedData:
    rows = load_dialogsum(args.rows, Path(args.data) if args.data else DIALOGSUM)
    rows = [{"dialogue": r["dialogue"], "summary": r["summary"]} for r in rows]
    fmt = Formatting.from_config(
        SelectConfig(data="-", input_field="dialogue", output_field="summary")
    )
    return tokenize_dataset(datasets.Dataset.from_list(rows), tokenizer, fmt, args.max_length)


def plain_forward_backward(model: Any, data: TokenizedData, max_batch_tokens: int) -> None:
    """(c): per batch one forward, the summed per-sample mean loss, one backward to the LoRA
    parameters; gradients dropped after each batch. Eval mode, like effort."""
    device = model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    for batch_idx in length_grouped_batches(data.lengths, max_batch_tokens):
        batch = {k: v.to(device) for k, v in collate(data, batch_idx).items()}
        # Logits over the response window only, as (a) and the fine-tune compute them.
        ce, mask = token_losses(*response_logits(model, batch))
        loss = (ce.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
        loss.backward()
        for p in params:
            p.grad = None


def per_sample_reference(model: Any, data: TokenizedData) -> np.ndarray:
    """(b): every sample alone, by plain autograd (the public code's loop)."""
    device = model_device(model)
    out = np.empty(len(data), dtype=np.float64)
    for i in tqdm(range(len(data)), desc="(b) per-sample", unit="sample"):
        batch = {k: v.to(device) for k, v in collate(data, [i]).items()}
        out[i] = float(effort_reference(model, batch)[0])
    return out


def warm_up(model: Any, data: TokenizedData) -> None:
    """One short batch of each kind, so lazy initialisation is not timed."""
    small = TokenizedData(data.input_ids[:2], data.labels[:2], data.pad_token_id)
    score_samples(model, small, "effort", max_batch_tokens=10**6)
    plain_forward_backward(model, small, 10**6)
    per_sample_reference(model, small)


def peak_gpu() -> float | None:
    """Peak GPU memory (GiB) since the last call; None on the CPU."""
    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 2)


@dataclass
class Timing:
    """Best wall and CPU (process) time over the repeats, the last result, peak GPU memory.

    On a shared CPU the wall time includes other people's work; process time counts this
    process's threads only, so its ratios are steadier there.
    """

    wall: float = math.inf
    cpu: float = math.inf
    value: Any = None
    peak_gpu_gib: float | None = None


def measure(fn: Callable[[], Any], repeats: int, on_gpu: bool) -> Timing:
    out = Timing()
    for _ in range(repeats):
        times: dict[str, float] = {}
        with stopwatch(times, "t", sync_cuda=on_gpu):
            out.value = fn()
        out.wall, out.cpu = min(out.wall, times["t"]), min(out.cpu, times["t_cpu"])
    out.peak_gpu_gib = peak_gpu()
    return out


def compare(
    t: int, tokens: int, a: Timing, b: Timing, c: Timing, ref: Timing, on_gpu: bool
) -> dict[str, Any]:
    """One T's throughputs (real tokens / s), ratios, goals and exactness."""
    rate = {k: tokens / x.wall for k, x in (("a", a), ("b", b), ("c", c))}
    rate_cpu = {k: tokens / x.cpu for k, x in (("a", a), ("b", b), ("c", c))}
    n_ref = len(ref.value)
    rel = np.abs(a.value[:n_ref] - ref.value) / np.abs(ref.value)
    return {
        "max_batch_tokens": t,
        "tokens_per_s": rate,
        "tokens_per_cpu_s": rate_cpu,
        "seconds": {"a": a.wall, "b": b.wall, "c": c.wall},
        "cpu_seconds": {"a": a.cpu, "b": b.cpu, "c": c.cpu},
        "b_over_a": rate["b"] / rate["a"],
        "a_over_c": rate["a"] / rate["c"],
        "b_over_a_cpu_time": rate_cpu["b"] / rate_cpu["a"],
        "a_over_c_cpu_time": rate_cpu["a"] / rate_cpu["c"],
        "goal_a_ge_0.9c": rate["a"] >= 0.9 * rate["c"],
        "goal_a_vs_b": rate["a"] >= (2.0 if on_gpu else 0.9) * rate["b"],
        "max_rel_error_a_vs_b": float(rel.max()),
        "exactness_samples": n_ref,
        "peak_gpu_gib": {"a": a.peak_gpu_gib, "b": b.peak_gpu_gib, "c": c.peak_gpu_gib},
    }


def print_report(results: list[dict[str, Any]], on_gpu: bool) -> None:
    header = ["T (tokens/batch)", "(a) tok/s", "(b) tok/s", "(c) tok/s", "b/a", "a/c"]
    header += ["b/a cpu-time", "a/c cpu-time", "max rel err a-b"]
    rows = [
        [
            r["max_batch_tokens"],
            *r["tokens_per_s"].values(),
            r["b_over_a"],
            r["a_over_c"],
            r["b_over_a_cpu_time"],
            r["a_over_c_cpu_time"],
            r["max_rel_error_a_vs_b"],
        ]
        for r in results
    ]
    print()
    print(table(header, rows))
    need = "a >= 2b (GPU)" if on_gpu else "a >= 0.9b (CPU)"
    print(
        f"goals: a >= 0.9c at every T: {all(r['goal_a_ge_0.9c'] for r in results)}; "
        f"{need}: {all(r['goal_a_vs_b'] for r in results)}"
    )


def main() -> None:
    args = parse_args()
    model, tokenizer, what = build_model(args)
    data = tokenise(args, tokenizer)
    tokens = int(data.lengths.sum())
    on_gpu = model_device(model).type == "cuda"
    print(f"{what}: {len(data)} samples, {tokens:,} tokens, max length {int(data.lengths.max())}")
    warm_up(model, data)

    n_ref = min(len(data), args.reference_rows or len(data))
    ref_data = data.subset(range(n_ref))
    ref = measure(lambda: per_sample_reference(model, ref_data), args.repeats, on_gpu)
    # (b)'s throughput on its own rows, stated for the whole data's token count.
    ref_tokens = int(ref_data.lengths.sum())
    b = Timing(ref.wall * tokens / ref_tokens, ref.cpu * tokens / ref_tokens, ref.value)
    b.peak_gpu_gib = ref.peak_gpu_gib
    results = []
    for t in args.max_batch_tokens:
        a = measure(
            lambda t=t: score_samples(model, data, "effort", max_batch_tokens=t, desc=f"(a) T={t}"),
            args.repeats,
            on_gpu,
        )
        c = measure(lambda t=t: plain_forward_backward(model, data, t), args.repeats, on_gpu)
        results.append(compare(t, tokens, a, b, c, ref, on_gpu))
        if t == args.max_batch_tokens[0]:
            k = min(args.exact_samples, n_ref)
            first = a.value[:k], ref.value[:k]
    print_report(results, on_gpu)
    print(f"first {len(first[0])} scores, (a) T={args.max_batch_tokens[0]} vs (b):")
    for x, y in zip(*first, strict=True):
        print(f"  {x:.8g}  {y:.8g}  rel {abs(x - y) / abs(y):.1e}")
    summary = {
        "model": what,
        "samples": len(data),
        "tokens": tokens,
        "reference_samples": n_ref,
        "runs": results,
        "first_scores": {"a": first[0].tolist(), "b": first[1].tolist()},
    }
    write_result(args.name, vars(args), summary, device=str(model_device(model)))


if __name__ == "__main__":
    start = time.perf_counter()
    main()
    print(f"benchmark wall time {time.perf_counter() - start:.0f} s")
