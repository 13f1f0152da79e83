"""Scoring on Ray (``--engine ray``): shards of the tokenised data, one actor per device.

The local runner's length-grouped batch plan is cut into *shards* of whole batches. Each shard
is one row of a Ray Data dataset; ``map_batches`` sends the rows to a fixed pool of actors (one
per GPU, or one per CPU but one, which stays with the driver and Ray Data's own tasks: a pool that
takes every CPU can stall Ray Data, ray-project/ray#44687). Every actor loads the model and the
adapter in use once, from the model name and a copy of the adapter saved under the cache.

The driver writes one score file per finished shard (atomically) into a folder keyed by the
score key and the request, and assembles the result from those files. A shard whose actor dies
is retried by Ray (``max_restarts`` / ``max_task_retries``); a rerun after a crash scores only
the shards that have no file yet. The shard files stay as a cache of their own (a few bytes per
sample); delete ``<cache>/scores/*.ray`` to reclaim the space.

Since the batches are those of :func:`speccore.scoring.score_samples` with the same
``max_batch_tokens``, the scores equal local scoring up to floating-point rounding (actors may
use another number of threads).

On a multi-node cluster every node must have speccore, the model (alias package, folder or hub
access) and the cache folder at the same path (a shared file system), since actors read the
adapter from there.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data.batches import IGNORE_INDEX, TokenizedData, length_grouped_batches, sample_indices
from ..utils import errors
from ..utils.errors import ConfigError, ScoringError, SpeccoreError
from ..utils.io import cache_root, fingerprint, load_npz, save_npz
from ..utils.progress import progress

if TYPE_CHECKING:
    from .request import ScoringRequest

logger = logging.getLogger(__name__)

RAY_MISSING = "--engine ray needs Ray: pip install 'speccore[ray]'"
# Shards hold between these many samples: enough shards to balance a pool and to lose little
# work in a crash, few enough that Ray's per-row overhead stays negligible. The shard size
# depends on the request only (not on the cluster), so a rerun on another cluster resumes too.
MIN_SHARD_SAMPLES = 8
MAX_SHARD_SAMPLES = 256
TARGET_SHARDS = 16
# Retries of a lost actor / of a shard on a restarted actor before the run fails.
MAX_RESTARTS = 3
MAX_TASK_RETRIES = 3


@dataclass(frozen=True)
class Pool:
    """The actor pool: how many actors, and what each one holds."""

    size: int
    num_cpus: float
    num_gpus: float

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus > 0 else "cpu"


def require_ray() -> Any:
    """Import and return the ``ray`` module (with Ray Data); a clear ConfigError without it."""
    try:
        import ray
        import ray.data  # the [data] extra
    except ImportError:
        raise ConfigError(RAY_MISSING) from None
    return ray


def score_with_ray(
    request: ScoringRequest,
    *,
    pool_size: int | None = None,
    shard_samples: int | None = None,
) -> np.ndarray:
    """The request's score of its samples (all when ``indices`` is None) under its adapter.

    Same result as :func:`speccore.scoring.score_samples` with ``request.max_batch_tokens``:
    float64, aligned with ``indices``. ``pool_size`` caps the actors (default: one per GPU, or
    one per CPU but one); ``shard_samples`` overrides the shard size (default from the request
    size). Connects to ``$RAY_ADDRESS`` when set, else starts a local Ray.
    """
    ray = require_ray()
    from .runner import SCORE_FUNCTIONS

    score = request.scorer
    if score not in SCORE_FUNCTIONS:
        raise ConfigError(f"unknown score {score!r}; valid scores: {', '.join(SCORE_FUNCTIONS)}")
    data = request.data
    idx = sample_indices(request.indices, len(data))
    if idx.size == 0:
        return np.zeros(0, dtype=np.float64)
    max_tokens = request.max_batch_tokens
    shards = plan_shards(data, idx, max_tokens, shard_samples)
    folder = shard_folder(request, idx, max_tokens, shards)
    missing = missing_shards(folder, shards)
    logger.info(
        "ray: %s (%s), %d samples in %d shards (%d to score) under %s",
        score,
        request.model_name,
        len(idx),
        len(shards),
        len(missing),
        folder,
    )
    if missing:
        connect(ray)
        pool = choose_pool(ray, request.device, pool_size, len(missing))
        args = actor_args(request, pool)
        run_shards(ray, data, idx, shards, missing, folder, pool, args)
    return assemble(folder, data, idx, shards, score)


def actor_args(request: ScoringRequest, pool: Pool) -> dict[str, Any]:
    """What every :class:`ShardScorer` is built with (the adapter is saved here first)."""
    return {
        "model": request.model_name,
        "adapter": str(publish_adapter(request)),
        "score": request.scorer,
        "dtype": request.dtype,
        "device": pool.device,
        "threads": max(1, int(pool.num_cpus)),
        "pad_token_id": request.data.pad_token_id,
        # Workers may not share the driver's environment: point them at the same model
        # conversion cache, so that an alias is not converted again.
        "cache_root": str(cache_root()),
    }


# --- planning -----------------------------------------------------------------------------


def default_shard_samples(n: int) -> int:
    """About :data:`TARGET_SHARDS` shards, each of 8 to 256 samples."""
    return min(MAX_SHARD_SAMPLES, max(MIN_SHARD_SAMPLES, math.ceil(n / TARGET_SHARDS)))


def plan_shards(
    data: TokenizedData, idx: np.ndarray, max_batch_tokens: int, shard_samples: int | None = None
) -> list[list[np.ndarray]]:
    """Shards of whole batches: each a list of batches of *positions* into ``idx``.

    The batches are the local runner's (length-grouped over ``data.lengths[idx]``), so a shard
    scores its samples in exactly the batches local scoring would use.
    """
    if max_batch_tokens < 1:
        raise ConfigError(f"--max-batch-tokens must be at least 1, got {max_batch_tokens}")
    size = default_shard_samples(len(idx)) if shard_samples is None else shard_samples
    if size < 1:
        raise ConfigError(f"shard_samples must be at least 1, got {size}")
    batches = length_grouped_batches(data.lengths[idx], max_batch_tokens)
    shards: list[list[np.ndarray]] = []
    current: list[np.ndarray] = []
    count = 0
    for batch in batches:
        current.append(batch)
        count += len(batch)
        if count >= size:
            shards.append(current)
            current, count = [], 0
    if current:
        shards.append(current)
    return shards


def shard_folder(
    request: ScoringRequest,
    idx: np.ndarray,
    max_batch_tokens: int,
    shards: list[list[np.ndarray]],
) -> Path:
    """``<work dir of the score key>/ray/<request>``: one folder per (model, adapter, data,
    score) and request (indices, batching, shard layout)."""
    layout = [len(b) for shard in shards for b in shard] + [-1] + [len(s) for s in shards]
    fp = fingerprint("ray-request", idx, max_batch_tokens, layout)
    return request.work_dir / "ray" / fp


def shard_path(folder: Path, shard: int) -> Path:
    return folder / f"shard-{shard:05d}.npz"


def missing_shards(folder: Path, shards: list[list[np.ndarray]]) -> list[int]:
    """Shards without a valid score file (an unreadable or mismatched file counts as missing)."""
    return [s for s in range(len(shards)) if _read_shard(folder, s, shards[s]) is None]


def _read_shard(folder: Path, shard: int, batches: list[np.ndarray]) -> np.ndarray | None:
    path = shard_path(folder, shard)
    if not path.exists():
        return None
    try:
        saved = load_npz(path)
        positions, values = saved["positions"], saved["values"]
    except (OSError, ValueError, KeyError) as e:
        logger.warning("ray: ignoring unreadable shard file %s: %s", path, e)
        return None
    if not np.array_equal(positions, np.concatenate(batches)) or values.shape != positions.shape:
        logger.warning("ray: ignoring shard file %s: made for another plan", path)
        return None
    return values


# --- the cluster --------------------------------------------------------------------------


def connect(ray: Any) -> None:
    """Join ``$RAY_ADDRESS`` when set, else start a local Ray (no-op when already connected)."""
    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        logger.info("ray: connecting to the cluster at %s", address)
        ray.init(address=address)
    else:
        logger.info("ray: starting a local Ray (set RAY_ADDRESS to use a cluster)")
        ray.init(include_dashboard=False)


def choose_pool(ray: Any, device: str, pool_size: int | None, n_shards: int) -> Pool:
    """One actor per GPU (unless ``device`` is cpu), else one per CPU but one; at most one per
    shard to score, at most ``pool_size``."""
    if pool_size is not None and pool_size < 1:
        raise ConfigError(f"pool_size must be at least 1, got {pool_size}")
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = int(resources.get("CPU", 1))
    if device.startswith("cuda") and gpus == 0:
        raise ConfigError(f"--device {device} asked for, but the Ray cluster has no GPU; use cpu")
    if gpus > 0 and device != "cpu":
        # Still leave one CPU free (a GPU actor needs little CPU).
        size, per_cpu, per_gpu = gpus, min(1.0, max(1, cpus - 1) / gpus), 1.0
    else:
        # Keep one CPU for the driver and Ray Data's own tasks (ray-project/ray#44687).
        size, per_cpu, per_gpu = max(1, cpus - 1), 1.0, 0.0
    size = min(size, n_shards, pool_size or size)
    logger.info("ray: %d actor(s), %g CPU and %g GPU each", size, per_cpu, per_gpu)
    return Pool(size=size, num_cpus=per_cpu, num_gpus=per_gpu)


def publish_adapter(request: ScoringRequest) -> Path:
    """The adapter in use, saved once under ``<work dir>/adapters/<fingerprint>``."""
    folder = request.work_dir / "adapters" / request.adapter_fp
    if not (folder / "adapter_model.safetensors").exists():
        request.save_adapter(folder)
    return folder


def shard_rows(
    data: TokenizedData, idx: np.ndarray, shards: list[list[np.ndarray]], todo: list[int]
) -> list[dict[str, Any]]:
    """One row per shard to score, holding its samples' tokens (flat) and its batch sizes."""
    rows = []
    lengths = data.lengths  # a property that rebuilds the array: read it once
    for s in todo:
        positions = np.concatenate(shards[s])
        samples = idx[positions]
        rows.append(
            {
                "shard": s,
                "lengths": lengths[samples],
                "batch_sizes": np.array([len(b) for b in shards[s]], dtype=np.int64),
                "input_ids": _flat(data.input_ids, samples),
                "labels": _flat(_masked_labels(data, samples), np.arange(len(samples))),
            }
        )
    return rows


def _flat(seqs: list[list[int]], samples: np.ndarray) -> np.ndarray:
    return np.concatenate([np.asarray(seqs[int(i)], dtype=np.int64) for i in samples])


def _masked_labels(data: TokenizedData, samples: np.ndarray) -> list[list[int]]:
    """Labels with token masks applied (what :func:`collate` would do), so actors need none."""
    if data.token_masks is None:
        return [data.labels[int(i)] for i in samples]
    return [
        [t if m else IGNORE_INDEX for t, m in zip(data.labels[i], data.token_masks[i], strict=True)]
        for i in (int(j) for j in samples)
    ]


def run_shards(
    ray: Any,
    data: TokenizedData,
    idx: np.ndarray,
    shards: list[list[np.ndarray]],
    todo: list[int],
    folder: Path,
    pool: Pool,
    actor_args: dict[str, Any],
) -> None:
    """Score the shards in ``todo`` on the pool; write each one's file as soon as it is done."""
    rows = shard_rows(data, idx, shards, todo)
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated")
        ds = ds.map_batches(
            ShardScorer,
            batch_size=1,  # one shard per call: a shard is already a list of batches
            compute=ray.data.ActorPoolStrategy(size=pool.size),
            fn_constructor_kwargs=actor_args,
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus,
            **retry_args(ds),
        )
    try:
        _collect(ds, shards, todo, folder, f"{actor_args['score']} on ray")
    except Exception as err:
        cause = _speccore_cause(err)
        if cause is err:
            raise
        raise cause from err


def _collect(
    ds: Any, shards: list[list[np.ndarray]], todo: list[int], folder: Path, desc: str
) -> None:
    """Gather the per-sample rows by shard and write a shard's file once it is complete."""
    sizes = {s: sum(len(b) for b in shards[s]) for s in todo}
    got = {s: np.full(sizes[s], np.nan) for s in todo}
    seen = dict.fromkeys(todo, 0)
    with progress(total=sum(sizes.values()), unit="sample", desc=desc) as bar:
        for row in ds.iter_rows():
            s = int(row["shard"])
            got[s][int(row["offset"])] = float(row["value"])
            seen[s] += 1
            if seen[s] == sizes[s]:
                positions = np.concatenate(shards[s])
                save_npz(shard_path(folder, s), positions=positions, values=got.pop(s))
                bar.update(sizes[s])
    if got:
        raise ScoringError(f"ray returned incomplete shards {sorted(got)}; rerun to resume")


def _speccore_cause(err: Exception) -> Exception:
    """The speccore error behind a Ray error, so the CLI prints one line (else ``err``).

    A task error keeps its cause as an exception; an actor that died in its constructor (a
    model a node cannot load, say) only leaves the traceback text, whose last speccore error
    line is parsed back.
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, SpeccoreError):
            return seen
        cause = getattr(seen, "cause", None)
        seen = cause if isinstance(cause, BaseException) else seen.__cause__
    found = re.findall(r"speccore\.errors\.(\w+): (.+)", str(err))
    if found:
        name, message = found[-1]
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, SpeccoreError):
            return cls(f"on a Ray worker: {message}")
    return err


def retry_args(ds: Any) -> dict[str, int]:
    """Bounded retries of a lost actor and of its shard.

    Ray 2.60 takes them as extra remote arguments (deprecated there: the warning is filtered
    where they are passed); a Ray without those arguments keeps its own default, which retries
    lost actors without bound.
    """
    kinds = [p.kind for p in inspect.signature(ds.map_batches).parameters.values()]
    if inspect.Parameter.VAR_KEYWORD not in kinds:
        return {}
    return {"max_restarts": MAX_RESTARTS, "max_task_retries": MAX_TASK_RETRIES}


def assemble(
    folder: Path,
    data: TokenizedData,
    idx: np.ndarray,
    shards: list[list[np.ndarray]],
    score: str,
) -> np.ndarray:
    """The scores of every shard file, aligned with ``idx``; non-finite scores name the sample."""
    out = np.full(len(idx), np.nan, dtype=np.float64)
    for s, batches in enumerate(shards):
        values = _read_shard(folder, s, batches)
        if values is None:
            raise ScoringError(f"ray: shard {s} has no score file in {folder}; rerun to resume")
        out[np.concatenate(batches)] = values
    bad = np.flatnonzero(~np.isfinite(out))
    if bad.size:
        sample = int(idx[bad[0]])
        if not any(t != IGNORE_INDEX for t in data.labels[sample][1:]):
            raise ScoringError(
                f"sample {sample}: no response tokens to score (every label after the first "
                "position is -100); fix its labels or drop the row"
            )
        raise ScoringError(
            f"sample {sample}: {score} is {out[bad[0]]}; check the data row or lower the "
            "learning rate"
        )
    return out


# --- the actor ----------------------------------------------------------------------------


class ShardScorer:
    """A Ray Data actor: loads the model and adapter once, then scores whole shards."""

    def __init__(
        self,
        model: str,
        adapter: str,
        score: str,
        dtype: str,
        device: str,
        threads: int,
        pad_token_id: int,
        cache_root: str,
    ) -> None:
        import torch

        from ..models import load_adapter, load_model
        from .runner import SCORE_FUNCTIONS

        os.environ["SPECCORE_CACHE"] = cache_root
        if device == "cpu":
            torch.set_num_threads(threads)
        loaded = load_model(model, dtype=dtype, device=device)
        self.model = load_adapter(loaded.model, adapter)
        self.pad_id = pad_token_id
        self.fn = SCORE_FUNCTIONS[score]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..data.batches import collate
        from ..models.speed import adapter_autocast
        from .losses import model_device

        shard = int(batch["shard"][0])
        lengths = np.asarray(batch["lengths"][0], dtype=np.int64)
        cuts = np.cumsum(lengths)[:-1]
        data = TokenizedData(
            input_ids=[x.tolist() for x in np.split(np.asarray(batch["input_ids"][0]), cuts)],
            labels=[x.tolist() for x in np.split(np.asarray(batch["labels"][0]), cuts)],
            pad_token_id=self.pad_id,
        )
        device = model_device(self.model)
        values = np.empty(len(lengths), dtype=np.float64)
        start = 0
        for size in np.asarray(batch["batch_sizes"][0], dtype=np.int64).tolist():
            rows = np.arange(start, start + size)
            tensors = {k: v.to(device) for k, v in collate(data, rows).items()}
            with adapter_autocast(self.model):  # as the local runner scores
                values[rows] = self.fn(self.model, tensors).double().cpu().numpy()
            start += size
        return {
            "shard": np.full(len(values), shard, dtype=np.int64),
            "offset": np.arange(len(values), dtype=np.int64),
            "value": values,
        }
