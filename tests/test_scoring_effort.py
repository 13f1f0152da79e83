"""effort_batch (one backward for the batch) against effort_reference (plain per-sample autograd)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import lm_head_lengths, mixed_prompt_data, model_tol, tol
from speccore.data.batches import TokenizedData, collate
from speccore.scoring import losses
from speccore.scoring.effort import effort_batch, effort_reference
from speccore.scoring.losses import response_window
from speccore.utils.errors import ModelError

TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]
VOCAB = 97


def randomise_lora(model: nn.Module, seed: int, scale: float = 0.3) -> None:
    """Random A *and* B: a fresh adapter has B = 0, which would make dL/dA vanish."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(
                    torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * scale
                )


def tiny_lora_llama(
    dtype: torch.dtype = torch.float64, seed: int = 0, **lora_kwargs: object
) -> nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    base = LlamaForCausalLM(config).to(dtype)
    settings: dict[str, object] = {
        "r": 4,
        "lora_alpha": 12,  # scaling 3, not 1
        "lora_dropout": 0.2,  # must be off while scoring
        "target_modules": TARGETS,
    }
    settings.update(lora_kwargs)
    model = get_peft_model(base, LoraConfig(**settings))  # type: ignore[arg-type]
    randomise_lora(model, seed + 1)
    return model


def make_data(lengths: list[int], prompt: int = 3, seed: int = 0) -> TokenizedData:
    gen = torch.Generator().manual_seed(seed)
    ids = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in lengths]
    labels = [[-100] * min(prompt, len(x) - 1) + x[min(prompt, len(x) - 1) :] for x in ids]
    return TokenizedData(input_ids=ids, labels=labels, pad_token_id=0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs()).max())


def rtol(model: nn.Module) -> float:
    """Two ways to one effort (batched and per sample, another batch or logits window, with and
    without checkpointing) round differently: a forward and a backward pass in the model's dtype
    over rows of up to 24 tokens (``mixed_prompt_data``'s longest; LENGTHS' is 14)."""
    return model_tol(model, 24, backward=True)


LENGTHS = [6, 11, 4, 9, 14]


@pytest.mark.parametrize("side", ["right", "left"])
def test_batched_effort_matches_reference_float64(side: str) -> None:
    model = tiny_lora_llama()
    batch = collate(make_data(LENGTHS), range(len(LENGTHS)), padding_side=side)
    fast, slow = effort_batch(model, batch), effort_reference(model, batch)
    assert fast.shape == (len(LENGTHS),)
    assert bool((slow > 0).all())
    assert rel_err(fast, slow) <= rtol(model)


def test_batched_effort_matches_reference_float32() -> None:
    model = tiny_lora_llama(torch.float32, seed=3)
    batch = collate(make_data(LENGTHS, seed=3), range(len(LENGTHS)))
    assert rel_err(effort_batch(model, batch), effort_reference(model, batch)) <= rtol(model)


def test_a_sample_scores_the_same_alone_and_in_a_padded_batch() -> None:
    model = tiny_lora_llama()
    data = make_data(LENGTHS)
    together = effort_batch(model, collate(data, range(len(LENGTHS))))
    for i in range(len(LENGTHS)):
        alone = effort_batch(model, collate(data, [i]))
        assert abs(float(alone[0]) - float(together[i])) <= rtol(model) * float(together[i])


def test_only_response_positions_count() -> None:
    model = tiny_lora_llama()
    data = make_data(LENGTHS, prompt=5)
    batch = collate(data, range(len(LENGTHS)))
    base = effort_batch(model, batch)
    assert rel_err(base, effort_reference(model, batch)) <= rtol(model)

    # Changing a masked (prompt) label changes nothing; a counted label changes the score.
    masked = {k: v.clone() for k, v in batch.items()}
    masked["labels"][1, 2] = 5  # was -100: now a counted target at position 2
    unmasked_score = effort_batch(model, masked)
    assert float(unmasked_score[1]) != pytest.approx(float(base[1]), rel=1e-6)
    assert rel_err(unmasked_score[[0, 2, 3, 4]], base[[0, 2, 3, 4]]) <= rtol(model)

    # Without the prompt mask, every position counts: another score, still matching the reference.
    full = collate(make_data(LENGTHS, prompt=0), range(len(LENGTHS)))
    full_score = effort_batch(model, full)
    assert not torch.allclose(full_score, base, rtol=1e-3)
    assert rel_err(full_score, effort_reference(model, full)) <= rtol(model)


def test_scaling_and_rank_are_handled() -> None:
    """Different alpha / r (scaling 0.25 and 8) and a larger rank still match the reference."""
    for r, alpha in [(8, 2), (2, 16)]:
        model = tiny_lora_llama(r=r, lora_alpha=alpha, target_modules=[*TARGETS, "o_proj"])
        batch = collate(make_data(LENGTHS, seed=r), range(len(LENGTHS)))
        assert rel_err(effort_batch(model, batch), effort_reference(model, batch)) <= rtol(model)


@pytest.mark.filterwarnings("ignore:`lora_bias=True`")
def test_lora_bias_is_part_of_phi() -> None:
    model = tiny_lora_llama(lora_bias=True)
    batch = collate(make_data(LENGTHS), range(len(LENGTHS)))
    assert rel_err(effort_batch(model, batch), effort_reference(model, batch)) <= rtol(model)


def test_no_grad_left_and_modes_restored() -> None:
    model = tiny_lora_llama()
    model.train()
    model.base_model.model.model.layers[0].eval()  # a deliberately mixed state
    before = {name: m.training for name, m in model.named_modules()}
    batch = collate(make_data(LENGTHS), range(len(LENGTHS)))
    effort_batch(model, batch)
    assert all(p.grad is None for p in model.parameters())
    assert {name: m.training for name, m in model.named_modules()} == before
    # No hook is left behind: a later forward in train mode is untouched by scoring.
    for m in model.modules():
        assert not m._forward_hooks


def test_eval_mode_means_no_dropout() -> None:
    """In train mode dropout would make two calls differ; scoring runs in eval mode."""
    model = tiny_lora_llama(lora_dropout=0.5)
    model.train()
    batch = collate(make_data(LENGTHS), range(len(LENGTHS)))
    first, second = effort_batch(model, batch), effort_batch(model, batch)
    assert torch.equal(first, second)
    assert model.training


def test_frozen_lora_params_give_the_same_score() -> None:
    model = tiny_lora_llama()
    batch = collate(make_data(LENGTHS), range(len(LENGTHS)))
    trainable = effort_batch(model, batch)
    for p in model.parameters():
        p.requires_grad_(False)
    assert rel_err(effort_batch(model, batch), trainable) <= rtol(model)
    assert rel_err(effort_reference(model, batch), trainable) <= rtol(model)
    assert not any(p.requires_grad for p in model.parameters())


def test_only_the_active_adapter_counts() -> None:
    model = tiny_lora_llama()
    batch = collate(make_data(LENGTHS), range(len(LENGTHS)))
    first = effort_batch(model, batch)
    model.add_adapter("other", LoraConfig(r=2, lora_alpha=5, target_modules=["k_proj", "o_proj"]))
    model.set_adapter("other")
    randomise_lora(model, seed=11)
    second = effort_batch(model, batch)
    assert rel_err(second, effort_reference(model, batch)) <= rtol(model)
    assert not torch.allclose(first, second, rtol=1e-3)


def test_a_sample_without_response_tokens_gets_nan() -> None:
    model = tiny_lora_llama()
    data = make_data(LENGTHS)
    data.labels[2] = [-100] * len(data.labels[2])
    batch = collate(data, range(len(LENGTHS)))
    fast, slow = effort_batch(model, batch), effort_reference(model, batch)
    assert bool(fast.isnan()[2]) and bool(slow.isnan()[2])
    keep = [0, 1, 3, 4]
    assert rel_err(fast[keep], slow[keep]) <= rtol(model)


def test_a_model_without_lora_is_refused() -> None:
    torch.manual_seed(0)
    plain = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
        )
    )
    batch = collate(make_data([5, 6]), [0, 1])
    with pytest.raises(ModelError, match="get_peft_model"):
        effort_batch(plain, batch)


class SharedLayerLM(nn.Module):
    """A toy causal LM that calls the same (LoRA-adapted) Linear twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids: torch.Tensor, **_: object) -> SimpleNamespace:
        x = self.embed(input_ids)
        x = x.cumsum(1)  # causal: position t sees tokens <= t
        x = torch.tanh(self.mix(x))
        x = torch.tanh(self.mix(x))
        return SimpleNamespace(logits=self.head(x))


def test_a_layer_called_twice_sums_its_gradients_before_the_norm() -> None:
    torch.manual_seed(0)
    model = get_peft_model(
        SharedLayerLM().double(), LoraConfig(r=3, lora_alpha=7, target_modules=["mix", "head"])
    )
    randomise_lora(model, seed=5)
    batch = collate(make_data(LENGTHS), range(len(LENGTHS)))
    # float64; rows of up to 14 tokens. Forward: the cumsum (14), two calls of `mix` and the
    # head (16 each), the logsumexp (97) and the mean (14): 173; backward the same again and the
    # sum over the tokens of a weight's gradient.
    rtol = tol(torch.float64, 2 * 173 + 14)
    assert rel_err(effort_batch(model, batch), effort_reference(model, batch)) <= rtol


# --- logits only over the response window ---------------------------------------------------


@pytest.mark.parametrize("side", ["right", "left"])
def test_windowed_effort_matches_full_logit_reference(
    side: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batched path runs the lm_head on the window only; the reference on every position."""
    model = tiny_lora_llama(seed=7)
    batch = collate(mixed_prompt_data(VOCAB, seed=7), range(5), padding_side=side)
    length = batch["labels"].shape[1]
    seen = lm_head_lengths(model)
    fast = effort_batch(model, batch)
    assert seen[0] == response_window(batch["labels"]) < length
    slow = effort_reference(model, batch)
    assert bool((slow > 0).all()) and rel_err(fast, slow) <= rtol(model)
    monkeypatch.setattr(losses, "LOGITS_WINDOW", False)
    seen.clear()
    assert rel_err(effort_batch(model, batch), fast) <= rtol(model)
    assert seen == [length]


def test_windowed_effort_matches_reference_float32() -> None:
    model = tiny_lora_llama(torch.float32, seed=8)
    batch = collate(mixed_prompt_data(VOCAB, seed=8), range(5), padding_side="left")
    assert rel_err(effort_batch(model, batch), effort_reference(model, batch)) <= rtol(model)


@pytest.mark.parametrize("side", ["right", "left"])
def test_lora_on_the_lm_head_sees_only_the_window(side: str) -> None:
    """A LoRA pair after the logits slice gets [B, keep] inputs, aligned to the last columns."""
    model = tiny_lora_llama(seed=9, target_modules=[*TARGETS, "lm_head"])
    data = mixed_prompt_data(VOCAB, seed=9)
    data.labels[1] = [-100] * len(data.labels[1])  # and a sample with nothing to score
    batch = collate(data, range(5), padding_side=side)
    seen = lm_head_lengths(model)
    fast, slow = effort_batch(model, batch), effort_reference(model, batch)
    assert seen[0] == response_window(batch["labels"]) < batch["labels"].shape[1]
    assert fast.isnan().tolist() == slow.isnan().tolist() == [False, True, False, False, False]
    keep = [0, 2, 3, 4]
    assert rel_err(fast[keep], slow[keep]) <= rtol(model)


# --- gradient checkpointing -----------------------------------------------------------------


def lora_a_calls(model: nn.Module, layer: int = 0) -> list[torch.Tensor]:
    """The inputs of one LoRA A (q_proj of ``layer``) on every later call, recomputes included."""
    seen: list[torch.Tensor] = []
    block = model.base_model.model.model.layers[layer]
    block.self_attn.q_proj.lora_A["default"].register_forward_hook(
        lambda _m, args, _out: seen.append(args[0])
    )
    return seen


@pytest.mark.parametrize("variant", ["blocks", "blocks+lm_head", "frozen"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_effort_with_gradient_checkpointing_equals_without(side: str, variant: str) -> None:
    """Recomputed forwards run the LoRA hooks again; nothing may be counted twice. Also with
    LoRA on the lm_head (past the logits window) and with every parameter frozen (no input of
    a checkpointed block then requires a gradient)."""
    from speccore.models.lora import enable_gradient_checkpointing

    targets = [*TARGETS, "lm_head"] if variant == "blocks+lm_head" else TARGETS
    model = tiny_lora_llama(seed=4, target_modules=targets)
    if variant == "frozen":
        for p in model.parameters():
            p.requires_grad_(False)
    model.train()  # a training-mode model comes back in training mode
    batch = collate(mixed_prompt_data(VOCAB, seed=4), range(5), padding_side=side)
    plain = effort_batch(model, batch)
    enable_gradient_checkpointing(model)
    calls = lora_a_calls(model)
    checkpointed = effort_batch(model, batch)
    assert len(calls) == 2  # the forward and the recompute in the backward
    assert rel_err(checkpointed, plain) <= rtol(model)
    assert rel_err(checkpointed, effort_reference(model, batch)) <= rtol(model)
    assert model.training and all(p.grad is None for p in model.parameters())


def test_checkpointing_frees_the_lora_inputs_during_the_forward() -> None:
    """Under checkpointing no LoRA input outlives its block in the forward: the effort taps
    keep them as saved tensors, which the checkpoint drops and recomputes."""
    import weakref

    from speccore.models.lora import enable_gradient_checkpointing

    def alive_at_the_head(model: nn.Module) -> tuple[int, int]:
        refs: list[weakref.ref[torch.Tensor]] = []
        alive: list[int] = []
        for layer in model.base_model.model.model.layers:
            layer.mlp.up_proj.lora_A["default"].register_forward_hook(
                lambda _m, args, _o: refs.append(weakref.ref(args[0]))
            )
        # The lm_head runs after every block: count the block inputs still held by then.
        model.get_output_embeddings().register_forward_hook(
            lambda *_: alive.append(sum(r() is not None for r in refs))
        )
        effort_batch(model, collate(make_data(LENGTHS), range(len(LENGTHS))))
        return alive[0], len(model.base_model.model.model.layers)

    held, layers = alive_at_the_head(tiny_lora_llama(seed=5))
    assert held == layers  # without checkpointing every block keeps its input for the backward
    model = enable_gradient_checkpointing(tiny_lora_llama(seed=5))
    assert alive_at_the_head(model) == (0, layers)


def test_reentrant_checkpointing_is_refused() -> None:
    """The reentrant variant runs the block without autograd: the taps would see nothing."""
    model = tiny_lora_llama(seed=6)
    base = model.get_base_model()
    enable = getattr(base, "activation_checkpointing_enable", None)  # transformers >= 5
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": True})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    batch = collate(make_data(LENGTHS), range(len(LENGTHS)))
    with pytest.raises(ModelError, match="reentrant gradient checkpointing"):
        effort_batch(model, batch)
