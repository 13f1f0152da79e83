"""The GPU path, tested on the CPU: half precision, gradient checkpointing, big-model loading
options and GPU memory per stage.

torch runs bfloat16 on the CPU, so the precision claims are checked here; what needs CUDA
(bitsandbytes quantisation, a device map over several GPUs, real memory figures) is checked for
its argument handling and error messages only.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from conftest import forward_terms, tol
from speccore.config import LoraSettings
from speccore.data.batches import IGNORE_INDEX, TokenizedData, collate
from speccore.models import load as load_module
from speccore.models.load import GpuMemoryByStage, bnb_config, load_model
from speccore.models.lora import (
    attach_lora,
    disable_gradient_checkpointing,
    enable_gradient_checkpointing,
    gradient_checkpointing_on,
    seeded,
)
from speccore.models.tiny import tiny_causal_lm
from speccore.scoring import score_samples
from speccore.scoring.losses import token_losses
from speccore.utils.errors import ConfigError, ModelError

VOCAB = 400
ROWS = 64
SCORES = ("effort", "loss", "el2n")
BF16_U = 2.0**-8  # unit roundoff of bfloat16: 8 significand bits, round to nearest
# float16 has 11 significand bits; its narrow range is why effort backpropagates summed (not
# averaged) token losses: logit gradients (p - e_y) / n_d would be subnormal for long responses.
UNIT_ROUNDOFF = {torch.bfloat16: BF16_U, torch.float16: 2.0**-11}


def graded_rows(model: Any, n: int = ROWS, seed: int = 0) -> TokenizedData:
    """Rows of varied length whose tokens follow the model's own greedy choice with probability
    ``q`` (spread evenly over [0, 1] across rows), else are random.

    A random model gives every row about the same loss, so bf16 rounding alone would reorder
    near-ties; rows from easy (q = 1) to hard (q = 0) give scores that differ by more than the
    rounding, as real data does. Three teacher-forced passes instead of token-by-token
    generation: the greedy choice of this tiny model depends mostly on the last token.
    """
    rng = np.random.default_rng(seed)
    q = rng.permutation(np.linspace(0, 1, n))
    lengths = rng.integers(12, 64, n)
    prompts = rng.integers(2, 10, n)
    ids = torch.as_tensor(rng.integers(1, VOCAB, (n, int(lengths.max()))))
    take = torch.as_tensor(rng.random(ids.shape) < q[:, None])
    take[:, 0] = False
    with torch.no_grad():
        for _ in range(3):
            greedy = model(input_ids=ids).logits.argmax(-1)
            ids[:, 1:] = torch.where(take[:, 1:], greedy[:, :-1], ids[:, 1:])
    rows = [ids[i, : lengths[i]].tolist() for i in range(n)]
    labels = [[IGNORE_INDEX] * int(p) + r[int(p) :] for p, r in zip(prompts, rows, strict=True)]
    return TokenizedData(input_ids=rows, labels=labels, pad_token_id=0)


def lora_model(layers: int, seed: int = 1, dropout: float = 0.0) -> Any:
    """A float32 tiny Llama with a LoRA whose B is non-zero (so dL/dA is not 0)."""
    base = tiny_causal_lm(VOCAB, hidden_size=64, layers=layers, seed=seed)
    model = attach_lora(base, LoraSettings(dropout=dropout), seed=0)
    with seeded(seed + 1), torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model


def half_copy(model: Any, adapters: str, dtype: torch.dtype = torch.bfloat16) -> Any:
    """A half-precision copy: the whole model (``adapters="half"``), or only the base weights
    with the adapters kept in float32 (``"fp32"``, what peft does when it wraps a bf16 model)."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if adapters == "half" or "lora_" not in name:
                p.data = p.data.to(dtype)
    return out


# --- bf16 against float32 ----------------------------------------------------------------------


@functools.cache
def float32_case(layers: int) -> tuple[Any, TokenizedData, dict[str, np.ndarray]]:
    """The float32 model, its rows and its scores, computed once per depth for all variants."""
    model = lora_model(layers)
    data = graded_rows(model)
    scores = {s: score_samples(model, data, s, max_batch_tokens=2048) for s in SCORES}
    return model, data, scores


@pytest.mark.parametrize(
    ("dtype", "adapters"),
    [(torch.bfloat16, "half"), (torch.bfloat16, "fp32"), (torch.float16, "half")],
    ids=["bf16", "bf16-fp32-adapters", "fp16"],
)
@pytest.mark.parametrize("layers", [2, 4])
def test_half_precision_scores_match_float32_within_the_rounding_bound(
    layers: int, dtype: torch.dtype, adapters: str
) -> None:
    """bf16 (and fp16) effort, loss and EL2N against float32 on the same weights and rows.

    The bound, first-order: a bfloat16 value carries a relative rounding error of at most
    u = 2^-8. A pre-norm block adds its output to the residual stream, and that stream is stored
    in bf16 twice per block (the block's output and the sum), so the forward adds at most 2u of
    relative error per block; the roundings inside a block (attention, MLP) enter the next
    matmul as errors of random sign over d inputs and average out to less than that. The
    backward crosses the same blocks in the other direction, again 2u each: a LoRA layer in
    block l sees its input after l blocks and its output gradient after L - l, 2Lu together.
    The lm_head adds one rounding of the logits and one of their gradient (the loss itself is
    float32): 2u. The per-sample pieces g^T x are formed in float32, so they add nothing; a norm
    of pieces each within a relative error e is within e. Hence, for effort,
    ``|e_bf16 / e_fp32 - 1| <= 2 (L + 1) u`` (0.023 for L = 2, 0.039 for L = 4). Loss and EL2N
    only need the forward and the logits, a subset of the same roundings, so the same bound
    holds for them with room to spare. Measured here (bf16): effort 1.5u (L = 2) and 4.5u
    (L = 4) against bounds of 6u and 10u; loss below 0.6u, EL2N below 0.05u. The same argument
    holds for float16 with its u = 2^-11 (measured: effort 1.1u and 3.7u).

    Ranks: on these rows the scores are spread much wider than the rounding, so Spearman
    must stay >= 0.999 (at 64 rows that allows a handful of swapped neighbours).
    """
    model, data, reference = float32_case(layers)
    half = half_copy(model, adapters, dtype)
    bound = 2 * (layers + 1) * UNIT_ROUNDOFF[dtype]
    for score, ref in reference.items():
        got = score_samples(half, data, score, max_batch_tokens=2048)
        assert np.isfinite(got).all() and (ref > 0).all()
        rel = float(np.max(np.abs(got - ref) / np.abs(ref)))
        rho = float(spearmanr(ref, got).statistic)
        assert rel <= bound, f"{score}: relative error {rel:.4f} > bound {bound:.4f}"
        assert rho >= 0.999, f"{score}: Spearman {rho:.5f}"
        # A half model must not give float32 results: the comparison did compare something.
        assert rel > 0


def test_effort_per_sample_pieces_are_float32_for_a_bf16_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The squared norms are summed from float32 pieces, whatever the model's dtype."""
    from speccore.scoring import effort

    seen: list[torch.dtype] = []
    original = effort._Tracker._add_sq

    def spy(self: Any, grad: torch.Tensor) -> None:
        seen.append(grad.dtype)
        original(self, grad)

    monkeypatch.setattr(effort._Tracker, "_add_sq", spy)
    model = half_copy(lora_model(2), "half")
    batch = collate(graded_rows(lora_model(2), n=6), range(6))
    out = effort.effort_batch(model, batch)
    assert out.dtype == torch.float64 and bool(torch.isfinite(out).all())
    assert seen and set(seen) == {torch.float32}


# --- gradient checkpointing in a fine-tune -------------------------------------------------------


def train_grads(model: Any, batch: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The LoRA gradients of one training step (train mode: dropout on, seeded)."""
    model.train()
    model.zero_grad(set_to_none=True)
    with seeded(seed):
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        ce, mask = token_losses(logits, batch["labels"])
        (ce.sum() / mask.sum()).backward()
    model.eval()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_a_fine_tune_step_has_the_same_gradients_with_checkpointing() -> None:
    """Recomputed blocks replay the same dropout masks (the RNG state is restored), so the
    gradients are those of the plain step up to float rounding."""
    model = lora_model(3, dropout=0.3)
    batch = collate(graded_rows(model, n=8), range(8))
    plain = train_grads(model, batch, seed=5)
    enable_gradient_checkpointing(model)
    assert gradient_checkpointing_on(model)
    recomputed = count_block_forwards(model)
    checkpointed = train_grads(model, batch, seed=5)
    assert recomputed[0] == 2  # the first block ran again in the backward
    assert plain.keys() == checkpointed.keys() and len(plain) > 0
    # The recomputed blocks repeat the same float32 operations; what rounding may still differ
    # is bounded by a forward and backward pass over rows of up to 64 tokens plus the sum of a
    # weight's gradient over the 8 rows' tokens. Entries near 0 are sums that cancel: their
    # error is relative to the tensor's largest entry.
    rtol = tol(torch.float32, forward_terms(model, 64, backward=True) + 8 * 64)
    for name, grad in plain.items():
        atol = rtol * float(grad.abs().max())
        assert torch.allclose(checkpointed[name], grad, rtol=rtol, atol=atol), name
    # Another dropout draw gives other gradients: the comparison above is not vacuous.
    other = train_grads(model, batch, seed=6)
    assert any(not torch.allclose(other[n], g, rtol=1e-3) for n, g in plain.items())
    disable_gradient_checkpointing(model)
    assert not gradient_checkpointing_on(model)


def count_block_forwards(model: Any) -> list[int]:
    """How often the first decoder block's attention runs from now on, recomputes included.

    (A hook on the block itself would not see them: transformers checkpoints its ``forward``,
    inside the hooks. The attention runs first in the block, so an early-stopping recompute
    never skips it.)
    """
    count = [0]
    attention = model.get_base_model().model.layers[0].self_attn
    attention.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def test_a_model_without_checkpointing_support_is_refused() -> None:
    class Plain(torch.nn.Module):
        supports_gradient_checkpointing = False

    with pytest.raises(ModelError, match="does not support gradient checkpointing"):
        enable_gradient_checkpointing(Plain())


# --- loading big models: device_map and quantisation ---------------------------------------------


def test_device_map_auto_loads_and_scores_the_same(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The map goes to from_pretrained, which places the model itself (on a machine without
    GPUs every layer lands on the CPU): same model, same scores as the plain load."""
    from transformers import AutoModelForCausalLM

    calls: list[dict[str, Any]] = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    plain = load_model(str(model_dirs["small"]), device="cpu")
    mapped = load_model(str(model_dirs["small"]), device_map="auto")
    assert "device_map" not in calls[0] and calls[1]["device_map"] == "auto"
    if not torch.cuda.is_available():
        assert {p.device.type for p in mapped.model.parameters()} == {"cpu"}
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, len(plain.tokenizer), n).tolist() for n in (9, 14, 6)]
    data = TokenizedData(rows, [[IGNORE_INDEX] * 3 + r[3:] for r in rows], 0)
    scores = [
        score_samples(attach_lora(m.model, LoraSettings(), seed=3), data, "effort")
        for m in (plain, mapped)
    ]
    assert (scores[0] > 0).all()
    # The same device (the CPU) gives the same sums; on a GPU the mapped model runs other
    # kernels: effort is a forward and a backward pass over rows of up to 14 tokens.
    rtol = tol(torch.float32, forward_terms(plain.model, 14, backward=True))
    np.testing.assert_allclose(scores[1], scores[0], rtol=rtol)


@pytest.mark.parametrize("load_in", ["4bit", "8bit"])
def test_load_in_without_cuda_or_bitsandbytes_says_what_to_install(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, load_in: str
) -> None:
    hint = f"--load-in {load_in} needs bitsandbytes and a CUDA GPU: pip install 'speccore[quant]'"
    if not torch.cuda.is_available():
        with pytest.raises(ModelError) as err:
            load_model(str(model_dirs["small"]), load_in=load_in)
        assert str(err.value) == hint
    # A CUDA machine without bitsandbytes: the same one line, before anything touches the GPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        load_module.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelError) as err:
        load_model(str(model_dirs["small"]), dtype="bfloat16", device="cuda", load_in=load_in)
    assert str(err.value) == hint


def test_bad_placement_options_are_one_line_config_errors(model_dirs: dict[str, Path]) -> None:
    folder = str(model_dirs["small"])
    with pytest.raises(ConfigError, match="--load-in must be 8bit or 4bit"):
        load_model(folder, load_in="2bit")
    with pytest.raises(ConfigError, match="--device-map must be auto"):
        load_model(folder, device_map="balanced")
    with pytest.raises(ConfigError, match="cannot be combined with --device cpu"):
        load_model(folder, device="cpu", device_map="auto")


def test_bnb_config_is_qlora() -> None:
    four = bnb_config("4bit", torch.float32)
    assert four.load_in_4bit and not four.load_in_8bit
    assert four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert four.bnb_4bit_compute_dtype == torch.bfloat16  # float32 asked: QLoRA computes in bf16
    assert bnb_config("4bit", torch.float16).bnb_4bit_compute_dtype == torch.float16
    eight = bnb_config("8bit", torch.bfloat16)
    assert eight.load_in_8bit and not eight.load_in_4bit


# --- GPU memory per stage --------------------------------------------------------------------


class FakeAllocator:
    """Stands in for torch.cuda's peak-memory counters of two GPUs."""

    def __init__(self) -> None:
        self.now = [0, 0]
        self.peak = [0, 0]

    def alloc(self, device: int, nbytes: int) -> None:
        self.now[device] += nbytes
        self.peak[device] = max(self.peak[device], self.now[device])

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i: self.peak[i])
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self.reset)

    def reset(self, device: int) -> None:
        self.peak[device] = self.now[device]


def test_gpu_memory_by_stage_is_empty_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")  # the fake-allocator test below covers it
    mem = GpuMemoryByStage()
    with mem.stage("scoring"):
        torch.zeros(1000)
    assert mem.peaks() == {}


def test_gpu_memory_by_stage_resets_between_stages_and_nests(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeAllocator()
    fake.install(monkeypatch)
    mem = GpuMemoryByStage()
    fake.alloc(0, 100)  # a model loaded before
    with mem.stage("outer"):
        fake.alloc(0, 50)  # outer peak 150 on GPU 0
        fake.alloc(0, -50)
        with mem.stage("inner"):
            fake.alloc(1, 70)  # GPU 1 peaks at 70, GPU 0 stays at 100
            fake.alloc(1, -70)
        fake.alloc(0, 10)
    with mem.stage("after"):
        fake.alloc(0, -10)
    with mem.stage("inner"):  # entered again, lower peak: keeps the larger
        fake.alloc(1, 5)
    assert mem.peaks() == {"inner": 100, "outer": 150, "after": 110}
