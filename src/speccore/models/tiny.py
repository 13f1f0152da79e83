"""Tiny, randomly initialised models and tokenizers built offline, for tests and benchmarks.

Nothing here downloads anything: the tokenizer is a byte-level BPE trained in memory on a short
built-in text, the models are random. Everything is deterministic given its arguments.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from .lora import seeded

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
CHAT_START, CHAT_END = "<|im_start|>", "<|im_end|>"

# A SmolLM2-style chat template, so --chat-template works on the tiny models too.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """
The quick brown fox jumps over the lazy dog. A small model reads the question and writes an
answer. Every sample has a prompt and a response; the response is what the model learns to write.
Question: what is the capital of France? Answer: Paris. Question: how many legs has a spider?
Answer: eight. Translate to German: the house is small. Das Haus ist klein. Die Brücke über den
Fluss ist alt, und die Straße führt zum Bahnhof. Schöne Grüße aus München und Köln! Über Nacht
fällt Schnee; die Bäume tragen weiße Mützen. Ärger, Öl, Übung, Größe, Fußball, grün, hören, müde.
Summarize the text in one sentence. The report describes sales, costs and the plan for next year.
Write a short poem about the sea: waves come and go, the sand is warm, the gulls cry over boats.
Classify the sentiment: I loved this film, the music was great. Positive. The food was cold and
the service slow. Negative. Solve: 12 plus 30 equals 42. 7 times 6 is 42. 100 minus 58 is 42.
Code: def add(a, b): return a + b. print(add(1, 2)) for i in range(10): total += i
A coreset is a small subset of the training data that keeps most of its value. Pruning drops the
easy samples and keeps the hard and diverse ones. Fine-tuning adapts a pretrained model to a task.
Medicine, law, finance and science each have their own words: diagnosis, contract, interest, atom.
Yesterday it rained in Berlin; today the sun shines in Hamburg, tomorrow we travel to Zürich.
"""


def tiny_tokenizer(
    bos_every_call: bool = False, pad_is_eos: bool = True, vocab_size: int = 400
) -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained in memory (any text, no unknowns).

    ``bos_every_call``: the post-processor prepends BOS to every encoding (like Gemma).
    ``pad_is_eos``: the pad id equals the EOS id (like SmolLM2). ``vocab_size`` changes the
    vocabulary: two different sizes behave like two model families. Has a chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [BOS, EOS, PAD, UNK, CHAT_START, CHAT_END]
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.split("\n"), trainer=trainer)
    if bos_every_call:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=EOS if pad_is_eos else PAD,
        unk_token=UNK,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_causal_lm(
    vocab_size: int,
    arch: str = "llama",
    hidden_size: int = 32,
    layers: int = 2,
    seed: int = 0,
    **config_kwargs: Any,
) -> Any:
    """A random float32 causal LM in eval mode: ``arch`` is ``llama`` or ``gemma3``.

    Weights are drawn with std 0.1 (``initializer_range``), so LoRA can overfit a few samples.
    ``config_kwargs`` go to the config (e.g. ``bos_token_id``, ``eos_token_id``, ``pad_token_id``,
    ``initializer_range``).
    """
    from transformers import AutoModelForCausalLM

    config = _tiny_config(vocab_size, arch, hidden_size, layers, **config_kwargs)
    with seeded(seed):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model


def tiny_model_folder(
    path: str | os.PathLike[str],
    arch: str = "llama",
    *,
    hidden_size: int = 32,
    layers: int = 2,
    seed: int = 0,
    vocab_size: int = 400,
    bos_every_call: bool | None = None,
    pad_is_eos: bool | None = None,
) -> Path:
    """Save a tiny model and its tokenizer to ``path`` (``--small path --target path`` works).

    By default a ``gemma3`` folder behaves like Gemma (BOS on every call, own pad token) and a
    ``llama`` folder like SmolLM2 (pad is EOS). A different ``vocab_size`` gives a tokenizer of a
    different "family" (for the family-mismatch warning).
    """
    gemma = arch == "gemma3"
    tokenizer = tiny_tokenizer(
        bos_every_call=gemma if bos_every_call is None else bos_every_call,
        pad_is_eos=(not gemma) if pad_is_eos is None else pad_is_eos,
        vocab_size=vocab_size,
    )
    model = tiny_causal_lm(
        len(tokenizer),
        arch,
        hidden_size,
        layers,
        seed,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def llama_config_for(
    params: float = 1e9, *, vocab_size: int = 49152, max_position_embeddings: int = 4096
) -> Any:
    """A Llama config of about ``params`` parameters (head_dim 64, GQA 4:1, depth ≈ width/128).

    For each width (a multiple of 256) the depth that best meets ``params`` is computed; the width
    whose depth is closest to the usual width/128 aspect ratio wins (1e9 → 2048 wide, 18 deep;
    Llama-3.2-1B is 2048 wide, 16 deep). The smallest shape is 256 wide, 2 deep.
    """
    best: tuple[float, Any] | None = None
    for hidden in range(256, 16385, 256):
        one = _llama_shape(hidden, 1, vocab_size, max_position_embeddings)
        two = _llama_shape(hidden, 2, vocab_size, max_position_embeddings)
        per_layer = llama_param_count(two) - llama_param_count(one)
        rest = llama_param_count(one) - per_layer
        layers = max(2, round((params - rest) / per_layer))
        badness = abs(math.log(layers / (hidden / 128)))
        if best is None or badness < best[0]:
            best = (badness, _llama_shape(hidden, layers, vocab_size, max_position_embeddings))
    assert best is not None
    return best[1]


def llama_param_count(config: Any) -> int:
    """Exact parameter count of a ``LlamaForCausalLM`` with this config (no instantiation)."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    attention = 2 * h * h + 2 * h * kv
    per_layer = attention + 3 * h * i + 2 * h  # + two RMSNorm weights
    embeddings = v * h * (1 if config.tie_word_embeddings else 2)
    return embeddings + config.num_hidden_layers * per_layer + h


def random_llama(
    params: float = 1e9,
    *,
    vocab_size: int = 49152,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> Any:
    """A randomly initialised Llama of about ``params`` parameters, built directly on ``device``.

    For GPU speed benchmarks; a 1e9 model needs 4 GB in float32.
    """
    from transformers import AutoModelForCausalLM

    config = llama_config_for(params, vocab_size=vocab_size)
    with seeded(seed, device=device), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model


def _llama_shape(hidden: int, layers: int, vocab_size: int, max_positions: int) -> Any:
    from transformers import LlamaConfig

    heads = max(1, hidden // 64)
    kv_heads = heads // 4 if heads % 4 == 0 else heads
    # SwiGLU width ≈ 8/3 · hidden, rounded up to a multiple of 256 as Llama does.
    intermediate = -(-int(hidden * 8 / 3) // 256) * 256
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
    )


def _tiny_config(vocab_size: int, arch: str, hidden: int, layers: int, **kwargs: Any) -> Any:
    from transformers import Gemma3TextConfig, LlamaConfig

    heads = 4 if hidden % 4 == 0 else 1
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),
        "max_position_embeddings": 1024,
        # Real configs draw weights with std 0.02; a 32-wide model that small barely moves its
        # logits (loss stays near ln V), so LoRA could not overfit anything in a test.
        "initializer_range": 0.1,
    }
    if arch == "llama":
        return LlamaConfig(**common, **kwargs)
    if arch == "gemma3":
        # Alternate sliding and full attention, like Gemma 3 does (5:1) but in two layers.
        layer_types = [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)
        ]
        return Gemma3TextConfig(
            **common,
            head_dim=hidden // heads,
            query_pre_attn_scalar=hidden // heads,
            sliding_window=16,
            layer_types=layer_types,
            **kwargs,
        )
    raise ValueError(f"arch must be 'llama' or 'gemma3', got {arch!r}")
