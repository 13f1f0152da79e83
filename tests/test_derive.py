"""Derived small models: layer choice, the saved folder, block influence, healing, the cache."""

from __future__ import annotations

import json
import os
import signal
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from conftest import forward_terms, make_rows, tol
from speccore.config import LoraSettings
from speccore.data.batches import IGNORE_INDEX, TokenizedData, collate
from speccore.data.encode import tokenize_pairs
from speccore.models import LoadedModel, attach_lora, check_family, load_model, tiny_model_folder
from speccore.proxies import derive as derive_module
from speccore.proxies import heal as heal_module
from speccore.proxies import layers as layers_module
from speccore.proxies.derive import (
    derive_model,
    is_derive_spec,
    parse_derive_spec,
    read_derivation,
    resolve_derived,
)
from speccore.proxies.derive_settings import DeriveSettings
from speccore.proxies.heal import distillation_kl, heal
from speccore.proxies.layers import (
    block_influence,
    build_derived,
    derived_config,
    layer_count,
    select_layers,
    uniform_layers,
)
from speccore.utils.errors import ConfigError, ModelError
from speccore.utils.interrupt import Interrupted, interruptible

LAYERS = 6


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("derive_targets")
    return {
        arch: tiny_model_folder(root / arch, arch, layers=LAYERS, seed=3)
        for arch in ("llama", "gemma3")
    }


@pytest.fixture(scope="module")
def llama(targets: dict[str, Path]) -> LoadedModel:
    return load_model(str(targets["llama"]))


@pytest.fixture(scope="module")
def gemma(targets: dict[str, Path]) -> LoadedModel:
    return load_model(str(targets["gemma3"]))


def rows_data(tokenizer: Any, n: int, seed: int) -> TokenizedData:
    rows = make_rows(n, seed)
    prompts = [r["dialogue"] for r in rows]
    return tokenize_pairs(tokenizer, prompts, [r["summary"] for r in rows], 64)


def long_batch(vocab: int) -> dict[str, torch.Tensor]:
    """Rows longer than the tiny Gemma's sliding window (16), one padded."""
    rng = np.random.default_rng(0)
    ids = [rng.integers(5, vocab, n).tolist() for n in (40, 23)]
    data = TokenizedData(ids, [[-100] * 5 + x[5:] for x in ids], pad_token_id=0)
    return collate(data, [0, 1])


def logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# --- which layers --------------------------------------------------------------------------


def test_uniform_layers_keep_first_and_last_evenly_spaced() -> None:
    for total, n in [(30, 10), (30, 15), (18, 6), (6, 3), (7, 7), (5, 2)]:
        kept = uniform_layers(total, n)
        assert len(kept) == n == len(set(kept))
        assert kept[0] == 0 and kept[-1] == total - 1
        gaps = np.diff(kept)
        assert gaps.max() - gaps.min() <= 1, (total, n, kept)
    assert uniform_layers(6, 1) == [0]
    with pytest.raises(ConfigError):
        uniform_layers(6, 7)


def test_layer_count_from_count_or_fraction() -> None:
    assert layer_count(10, 30) == 10
    assert layer_count(0.33, 30) == 10
    assert layer_count(0.5, 18) == 9
    assert layer_count(0.01, 30) == 2  # a fraction keeps at least two layers
    assert layer_count(12.0, 30) == 12
    for bad in (0, -1, 1.5, 0.0, True):
        with pytest.raises(ConfigError, match="--layers"):
            layer_count(bad, 30)
    with pytest.raises(ConfigError, match="only 30 layers"):
        layer_count(31, 30)


def test_derived_weights_are_the_kept_layers(llama: LoadedModel) -> None:
    folder = derive_model(llama, layers=3, layer_selection="uniform", heal_steps=0)
    record = read_derivation(folder)
    assert record is not None
    kept = record["kept_layers"]
    assert kept == uniform_layers(LAYERS, 3)
    derived = AutoModelForCausalLM.from_pretrained(folder)
    assert derived.config.num_hidden_layers == 3 and len(derived.model.layers) == 3
    for new, old in enumerate(kept):
        for name, p in derived.model.layers[new].state_dict().items():
            assert torch.equal(p, llama.model.model.layers[old].state_dict()[name]), (new, name)
    # Embeddings, final norm and LM head are the target's.
    assert torch.equal(derived.model.embed_tokens.weight, llama.model.model.embed_tokens.weight)
    assert torch.equal(derived.model.norm.weight, llama.model.model.norm.weight)
    assert torch.equal(derived.lm_head.weight, llama.model.lm_head.weight)


# --- the folder ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_folder_reloads_with_identical_outputs(
    arch: str, llama: LoadedModel, gemma: LoadedModel
) -> None:
    target = llama if arch == "llama" else gemma
    kept = uniform_layers(LAYERS, 3)
    in_memory = build_derived(target.model, kept)
    folder = derive_model(target, layers=3, heal_steps=0)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    batch = long_batch(len(target.tokenizer))
    assert torch.equal(logits(reloaded, batch), logits(in_memory, batch))
    # The tokenizer beside it is the target's: the family check passes without a warning.
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_family(tokenizer, target.tokenizer, "derived", "target")


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_keeping_every_layer_reproduces_the_target(
    arch: str, llama: LoadedModel, gemma: LoadedModel
) -> None:
    target = llama if arch == "llama" else gemma
    copy = build_derived(target.model, list(range(LAYERS)))
    batch = long_batch(len(target.tokenizer))
    assert torch.equal(logits(copy, batch), logits(target.model, batch))


def test_gemma_layer_types_trimmed_consistently(gemma: LoadedModel) -> None:
    original = list(gemma.model.config.layer_types)
    assert len(set(original)) == 2  # sliding and full attention alternate
    kept = [0, 1, 3]
    config, trimmed = derived_config(gemma.model.config, kept)
    assert trimmed == ["layer_types"]
    assert config.layer_types == [original[i] for i in kept]
    assert gemma.model.config.layer_types == original  # the target's config is untouched
    model = build_derived(gemma.model, kept)
    for new, old in enumerate(kept):
        attention = model.model.layers[new].self_attn
        assert attention.is_sliding == (original[old] == "sliding_attention")
        assert attention.layer_idx == new


def test_custom_per_layer_list_trimmed_and_others_kept() -> None:
    config = LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=4,
        num_attention_heads=2, num_key_value_heads=1, architectures=["LlamaForCausalLM"] * 4,
    )  # fmt: skip
    config.per_layer_scale = [0.1, 0.2, 0.3, 0.4]
    config.not_per_layer = [1, 2, 3]
    new, trimmed = derived_config(config, [1, 3])
    assert new.num_hidden_layers == 2
    assert new.per_layer_scale == [0.2, 0.4]
    assert new.not_per_layer == [1, 2, 3]
    assert new.architectures == ["LlamaForCausalLM"] * 4  # names, not per-layer settings
    assert trimmed == ["per_layer_scale"]
    with pytest.raises(ConfigError, match="ascending"):
        derived_config(config, [3, 1])


def test_derivation_json_says_how_it_was_made(llama: LoadedModel) -> None:
    data = rows_data(llama.tokenizer, 12, 0)
    folder = derive_model(
        llama, layers=0.5, layer_selection="block-influence", data=data, heal_steps=3, seed=4
    )
    record = json.loads((folder / "derivation.json").read_text())
    assert record["target"]["identity"] == llama.source.identity
    assert record["target"]["num_hidden_layers"] == LAYERS
    assert record["num_hidden_layers"] == 3 == len(record["kept_layers"])
    assert record["settings"]["layer_selection"] == "block-influence"
    assert record["settings"]["seed"] == 4
    assert len(record["block_influence"]) == LAYERS
    assert record["data"]["fingerprint"] == data.fingerprint()
    heal_record = record["heal"]
    assert heal_record["steps"] == 3 and heal_record["kl_before"] > 0
    assert heal_record["kl_after"] >= 0 and heal_record["seconds"] > 0
    assert record["seconds"]["total"] >= record["seconds"]["heal"]
    assert record["versions"]["transformers"]


# --- block influence ------------------------------------------------------------------------


def direct_block_influence(model: Any, data: TokenizedData) -> np.ndarray:
    """Row by row: hidden states from output_hidden_states (the last layer's output taken at
    the final norm's input, since hidden_states[-1] is after the norm), cosine per token."""
    captured: list[torch.Tensor] = []
    hook = model.model.norm.register_forward_hook(lambda _m, args, _o: captured.append(args[0]))
    sums = np.zeros(LAYERS)
    count = 0
    try:
        for i in range(len(data)):
            ids = torch.tensor([data.input_ids[i]])
            response = torch.tensor(data.labels[i]) != IGNORE_INDEX
            with torch.no_grad():
                hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
            states = [h[0] for h in hidden[:LAYERS]] + [captured.pop()[0]]
            for layer in range(LAYERS):
                x, y = states[layer][response], states[layer + 1][response]
                for t in range(len(x)):
                    sums[layer] += float(F.cosine_similarity(x[t], y[t], dim=0))
            count += int(response.sum())
    finally:
        hook.remove()
    return 1 - sums / count


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_block_influence_matches_a_direct_computation(
    arch: str, llama: LoadedModel, gemma: LoadedModel
) -> None:
    target = llama if arch == "llama" else gemma
    data = rows_data(target.tokenizer, 8, 1)
    batched = block_influence(target.model, data, max_batch_tokens=128)
    # Padded batches against one row at a time: other float32 sums in the forward pass (rows of
    # up to 64 tokens). A block influence is 1 - a mean cosine, in [0, 2]: the cosine's relative
    # error is an absolute one on the influence.
    atol = tol(torch.float32, forward_terms(target.model, 64))
    np.testing.assert_allclose(batched, direct_block_influence(target.model, data), atol=atol)
    assert np.all((batched > 0) & (batched < 2))


def test_block_influence_keeps_the_highest(llama: LoadedModel, monkeypatch: Any) -> None:
    data = rows_data(llama.tokenizer, 8, 1)
    fake = np.array([0.1, 0.5, 0.2, 0.9, 0.3, 0.4])
    monkeypatch.setattr(layers_module, "block_influence", lambda *a, **k: fake)
    settings = DeriveSettings(layers=3, layer_selection="block-influence")
    kept, bi = select_layers(llama.model, settings, data)
    assert kept == [1, 3, 5] and bi is fake
    kept_real, bi_real = select_layers(llama.model, DeriveSettings(layers=3), data)
    assert kept_real == uniform_layers(LAYERS, 3) and bi_real is None


# --- healing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_healing_lowers_the_kl_on_held_out_rows(llama: LoadedModel, mode: str) -> None:
    train, held_out = rows_data(llama.tokenizer, 24, 0), rows_data(llama.tokenizer, 10, 5)
    student = build_derived(llama.model, uniform_layers(LAYERS, 2))
    before = distillation_kl(llama.model, student, held_out)
    embed = student.model.embed_tokens.weight.clone()
    settings = DeriveSettings(heal_steps=15, heal_lr=3e-3, heal_mode=mode, heal_lora_r=8)
    result = heal(llama.model, student, train, settings, max_batch_tokens=96)
    healed = result["model"]
    after = distillation_kl(llama.model, healed, held_out)
    assert after < 0.8 * before, (before, after)
    assert len(result["losses"]) == 15
    # A plain model again (LoRA merged), frozen, with the target's embeddings untouched.
    assert not any("lora_" in n for n, _ in healed.named_parameters())
    assert not any(p.requires_grad for p in healed.parameters())
    assert torch.equal(healed.model.embed_tokens.weight, embed)


def test_distillation_kl_is_zero_for_the_target_itself(llama: LoadedModel) -> None:
    data = rows_data(llama.tokenizer, 4, 2)
    assert distillation_kl(llama.model, llama.model, data) == pytest.approx(0.0, abs=1e-6)
    other = build_derived(llama.model, [0, 5])
    assert distillation_kl(llama.model, other, data) > 0.01


# --- the cache ---------------------------------------------------------------------------------


def _no_work(*args: object, **kwargs: object) -> None:
    raise AssertionError("the cached derivation was rebuilt")


def test_second_call_uses_the_cache(
    targets: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    name = str(targets["llama"])
    tokenizer = AutoTokenizer.from_pretrained(name)
    data = rows_data(tokenizer, 8, 0)
    first = derive_model(name, layers=2, data=data, heal_steps=2)
    loaded = load_model(name)

    monkeypatch.setattr(derive_module, "_build_folder", _no_work)
    monkeypatch.setattr(derive_module, "load_model", _no_work)
    assert derive_model(name, layers=2, data=data, heal_steps=2) == first
    out = derive_model(name, layers=2, data=data, heal_steps=2, out=tmp_path / "mine")
    assert (out / "config.json").is_file() and read_derivation(out) == read_derivation(first)
    assert derive_model(name, layers=2, data=data, heal_steps=2, out=out) == out
    # The target loaded (float32 on the CPU, as by name here) has the key of its name.
    assert derive_model(loaded, layers=2, data=data, heal_steps=2) == first
    # Every setting and the data are part of the key.
    for changed in (
        {"layers": 3, "data": data, "heal_steps": 2},
        {"layers": 2, "data": data, "heal_steps": 3},
        {"layers": 2, "data": data, "heal_steps": 2, "seed": 1},
        {"layers": 2, "data": rows_data(tokenizer, 9, 0), "heal_steps": 2},
    ):
        with pytest.raises(AssertionError, match="rebuilt"):
            derive_model(name, **changed)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="already holds another derived model"):
        derive_model(name, layers=2, heal_steps=0, out=out)


def test_a_derivation_made_by_another_process_meanwhile_is_waited_for_and_reused(
    targets: dict[str, Path], isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs deriving one model: the second waits on the entry's lock, then finds the
    first's folder and builds nothing (the "other process" is a thread holding the lock)."""
    import threading
    import time

    from speccore.utils.locks import file_lock

    name = str(targets["llama"])
    folder = derive_model(name, layers=2, heal_steps=0)
    aside = folder.with_name(folder.name + ".aside")
    folder.rename(aside)  # as if the other process were still building it
    held = threading.Event()

    def other_process() -> None:
        with file_lock(isolated_cache / "locks" / f"{folder.name}.lock", "the derived model"):
            held.set()
            time.sleep(0.5)
            aside.rename(folder)  # its folder is published while it holds the lock

    thread = threading.Thread(target=other_process)
    thread.start()
    held.wait()
    monkeypatch.setattr(derive_module, "_build_folder", _no_work)
    monkeypatch.setattr(derive_module, "load_model", _no_work)
    assert derive_model(name, layers=2, heal_steps=0) == folder
    thread.join()


def test_resolve_derived_spec_uses_the_cache(
    targets: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    name = str(targets["gemma3"])
    tokenizer = AutoTokenizer.from_pretrained(name)
    data = rows_data(tokenizer, 8, 0)
    folder = resolve_derived("derive:0.5,heal_steps=2", name, data)
    record = read_derivation(folder)
    assert record is not None and record["kept_layers"] == uniform_layers(LAYERS, 3)
    monkeypatch.setattr(derive_module, "_build_folder", _no_work)
    assert resolve_derived("derive:0.5,heal_steps=2", name, data) == folder
    small = load_model(str(folder))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_family(small.tokenizer, tokenizer, "derived", name)


# --- specs and bad input -------------------------------------------------------------------


def test_parse_derive_spec() -> None:
    assert is_derive_spec("derive:0.33") and is_derive_spec(" DERIVE:2")
    assert not is_derive_spec("smollm2-135m")
    assert parse_derive_spec("derive:0.33").layers == 0.33
    assert parse_derive_spec("derive:10").layers == 10
    assert isinstance(parse_derive_spec("derive:10").layers, int)
    assert parse_derive_spec("derive:") == DeriveSettings()
    full = parse_derive_spec(
        "derive:0.5, selection=block-influence, heal_steps=300, heal-lr=5e-5, heal_mode=lora, seed=2"
    )
    assert full == DeriveSettings(
        layers=0.5,
        layer_selection="block-influence",
        heal_steps=300,
        heal_lr=5e-5,
        heal_mode="lora",
        seed=2,
    )
    for bad, message in [
        ("derive:abc", "not a number"),
        ("derive:1.5", "fraction"),
        ("derive:0.5,selection=random", "layer-selection"),
        ("derive:0.5,heal_steps=x", "not a number"),
        ("derive:0.5,colour=red", "key=value"),
        ("derive:0.5,heal_steps", "key=value"),
        ("smollm2", "not a derive spec"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_derive_spec(bad)


def test_bad_settings_are_refused(llama: LoadedModel) -> None:
    with pytest.raises(ConfigError, match="needs the task's training data"):
        derive_model(llama, layers=2, layer_selection="block-influence", heal_steps=0)
    with pytest.raises(ConfigError, match="needs the task's training data"):
        derive_model(llama, layers=2, heal_steps=5)
    with pytest.raises(ConfigError, match="--heal-mode"):
        derive_model(llama, layers=2, heal_steps=0, heal_mode="half")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--heal-lr"):
        derive_model(llama, layers=2, heal_steps=0, heal_lr=0.0)
    with pytest.raises(ConfigError, match="only 6 layers"):
        derive_model(llama, layers=7, heal_steps=0)


def test_a_target_with_an_adapter_is_refused(targets: dict[str, Path]) -> None:
    loaded = load_model(str(targets["llama"]))
    attach_lora(loaded.model, LoraSettings(r=2, alpha=4))
    with pytest.raises(ModelError, match="LoRA adapter"):
        derive_model(loaded, layers=2, heal_steps=0)


# --- select, bench specs and the command line ---------------------------------------------


def test_derive_spec_in_select_uses_the_cache_the_second_time(
    model_dirs: dict[str, Path],
    jsonl_data: Path,
    isolated_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
    recwarn: pytest.WarningsRecorder,
) -> None:
    from conftest import tiny_select_config
    from speccore import select

    spec = "derive:1,selection=block-influence,heal_steps=2"
    first = select(tiny_select_config(jsonl_data, model_dirs, small=spec))
    assert first.timings["small derive"] > 0  # the derivation and its healing: a stage
    (folder,) = (isolated_cache / "derived").iterdir()
    record = read_derivation(folder)
    assert record is not None and record["num_hidden_layers"] == 1
    assert record["heal"]["steps"] == 2 and record["data"]["rows"] == 24
    # The derived model has the target's tokenizer: no family warning.
    assert not [w for w in recwarn if "tokenizer" in str(w.message)]

    monkeypatch.setattr(derive_module, "_build_folder", _no_work)
    second = select(tiny_select_config(jsonl_data, model_dirs, small=spec, seed=1))
    assert len(second) == len(first)
    assert list((isolated_cache / "derived").iterdir()) == [folder]


def test_derive_command(
    model_dirs: dict[str, Path], jsonl_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from speccore.cli import main

    target = str(model_dirs["target"])
    out = tmp_path / "derived"
    assert main(["derive", "--model", target, "--layers", "1", "--heal-steps", "0",
                 "--out", str(out)]) == 0  # fmt: skip
    assert read_derivation(out)["kept_layers"] == [0]  # type: ignore[index]
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1
    assert f"wrote {out}" in capsys.readouterr().out

    data_flags = ["--data", str(jsonl_data), "--input-field", "dialogue",
                  "--output-field", "summary", "--max-length", "64"]  # fmt: skip
    args = ["derive", "--model", target, "--layers", "0.5", "--layer-selection",
            "block-influence", "--heal-steps", "2", "--heal-lr", "1e-3", "--seed", "3"]  # fmt: skip
    assert main([*args, *data_flags]) == 0
    printed = capsys.readouterr().out
    assert "KL to the target" in printed
    folder = Path(printed.strip().splitlines()[-1].removeprefix("wrote "))
    record = read_derivation(folder)
    assert record is not None and record["settings"]["heal_lr"] == 1e-3
    assert record["settings"]["seed"] == 3 and len(record["block_influence"]) == 2

    # Healing without data: one line naming what to pass, exit code 2. Healing is the
    # default, so a bare call without data says how to get an unhealed model.
    assert main(["derive", "--model", target, "--layers", "1", "--heal-steps", "5"]) == 2
    assert "--data" in capsys.readouterr().err
    assert main(["derive", "--model", target, "--layers", "1"]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and "--heal-steps 0" in err and len(err.strip().splitlines()) == 1
    assert main(["derive", "--model", target, "--layers", "x"]) == 2


# --- healing: checkpoint and resume ------------------------------------------------------------


def _heal_args(llama: LoadedModel, lr: float = 3e-3) -> tuple[Any, TokenizedData, DeriveSettings]:
    student = build_derived(llama.model, uniform_layers(LAYERS, 2))
    return student, rows_data(llama.tokenizer, 12, 0), DeriveSettings(heal_steps=6, heal_lr=lr)


def test_sigterm_during_healing_saves_the_step_and_resumes_bit_for_bit(
    llama: LoadedModel, tmp_path: Path
) -> None:
    student, data, settings = _heal_args(llama)
    whole = heal(llama.model, student, data, settings, max_batch_tokens=96)

    student, _, _ = _heal_args(llama)
    forwards = []

    def pre_hook(*_args: Any) -> None:
        forwards.append(1)
        if len(forwards) == 5:  # inside step 2 or 3: that step is finished, then saved
            os.kill(os.getpid(), signal.SIGTERM)

    handle = student.register_forward_pre_hook(pre_hook)
    state = tmp_path / "heal" / "heal_state.pt"
    with pytest.raises(Interrupted) as caught, interruptible():
        heal(llama.model, student, data, settings, max_batch_tokens=96, checkpoint=state)
    handle.remove()
    e = caught.value
    assert e.unit == "steps" and e.total == 6 and 0 < e.done < 6 and e.exit_code == 143
    assert torch.load(state, weights_only=True)["step"] == e.done

    fresh, _, _ = _heal_args(llama)
    resumed = heal(llama.model, fresh, data, settings, max_batch_tokens=96, checkpoint=state)
    assert resumed["resumed_at"] == e.done
    assert resumed["losses"] == whole["losses"]
    a, b = resumed["model"].state_dict(), whole["model"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


def test_a_heal_checkpoint_of_another_healing_is_ignored(
    llama: LoadedModel, tmp_path: Path
) -> None:
    state = tmp_path / "heal_state.pt"
    student, data, settings = _heal_args(llama)
    heal(llama.model, student, data, settings, max_batch_tokens=96, checkpoint=state)
    assert torch.load(state, weights_only=True)["step"] == 6
    student, _, other = _heal_args(llama, lr=1e-3)
    result = heal(llama.model, student, data, other, max_batch_tokens=96, checkpoint=state)
    want = heal(llama.model, _heal_args(llama)[0], data, other, max_batch_tokens=96)
    assert result["resumed_at"] == 0 and result["losses"] == want["losses"]


def test_derive_interrupted_while_healing_resumes_and_cleans_up(
    llama: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = rows_data(llama.tokenizer, 8, 1)
    settings = DeriveSettings(layers=2, heal_steps=4, heal_lr=1e-3)
    monkeypatch.setenv("SPECCORE_CACHE", str(tmp_path / "whole"))
    whole = derive_model(llama, settings=settings, data=data, max_batch_tokens=96)

    monkeypatch.setenv("SPECCORE_CACHE", str(tmp_path / "stopped"))
    calls = []
    original = heal_module._heal_step

    def stop_in_step_two(*args: Any) -> float:
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the step finishes, is saved, then it stops
        return original(*args)

    monkeypatch.setattr(heal_module, "_heal_step", stop_in_step_two)
    with pytest.raises(Interrupted) as caught, interruptible():
        derive_model(llama, settings=settings, data=data, max_batch_tokens=96)
    assert caught.value.done == 2
    monkeypatch.setattr(heal_module, "_heal_step", original)
    folder = derive_model(llama, settings=settings, data=data, max_batch_tokens=96)

    record = read_derivation(folder)
    assert record is not None and record["heal"]["resumed_at_step"] == 2
    assert sorted(p.name for p in folder.parent.iterdir()) == [folder.name]  # state removed
    a = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    b = AutoModelForCausalLM.from_pretrained(whole).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
