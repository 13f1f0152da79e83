"""speed-bench/derive_agreement.py's on-paper FLOPs: its parameter counts are the models'."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

from speccore.proxies.costs import ARCHS, Arch


def _config(a: Arch, layers: int) -> object:
    common = {
        "hidden_size": a.hidden,
        "intermediate_size": a.intermediate,
        "num_attention_heads": a.heads,
        "num_key_value_heads": a.kv_heads,
        "head_dim": a.head_dim,
        "num_hidden_layers": layers,
        "vocab_size": 512,  # the lm_head is counted apart: keep the model small
    }
    if a.name.startswith("gemma"):
        return Gemma3TextConfig(**common)
    return LlamaConfig(**common)


@pytest.mark.parametrize("arch", ARCHS[:2], ids=lambda a: a.name)
def test_layer_matrices_are_counted_as_the_model_holds_them(arch: Arch) -> None:
    model = AutoModelForCausalLM.from_config(_config(arch, layers=2))
    matrices = sum(
        p.numel() for name, p in model.named_parameters() if p.dim() == 2 and ".layers." in name
    )
    assert matrices == 2 * arch.layer_params()
    assert arch.flops(2, lm_head=True) == 2.0 * (matrices + arch.hidden * arch.vocab)
    assert arch.flops(2, lm_head=False) == 2.0 * matrices


def test_halving_gemma_saves_little_per_response_token_and_half_per_prompt_token() -> None:
    gemma = ARCHS[0]
    ratio = gemma.flops(9, True) / gemma.flops(18, True)
    assert 0.8 < ratio < 0.82  # its lm_head is most of a response token
    assert gemma.flops(9, False) / gemma.flops(18, False) == pytest.approx(0.5)
