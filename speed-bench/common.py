"""Helpers shared by the benchmark scripts: machine info, data, timing, result files.

The scripts put their own folder on ``sys.path`` (Python does so for ``python speed-bench/x.py``),
so they import this module as ``common``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import platform
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
DIALOGSUM = Path("/work/shared/data/dialogsum/train.jsonl.gz")
UI = Path("/work/shared/data/ui-translation-de/train.jsonl.gz")
UI_TEMPLATE = "Translate from English to German.\nEnglish: {source}\nGerman: "

#: How each task's rows are formatted (the quality benches' settings).
TASKS: dict[str, dict[str, Any]] = {
    "ui": {"template": UI_TEMPLATE, "output_field": "target", "max_length": 128},
    "dialogsum": {"input_field": "dialogue", "output_field": "summary", "max_length": 512},
}


def load_task(task: str, rows: int) -> list[dict[str, Any]]:
    """``rows`` rows of a task: UI strings drawn at random with seed 0 as the mini UI bench
    draws its 400 (the file is sorted by source text), DialogSum's first rows."""
    if task == "ui":
        from speccore.bench.run import take_rows
        from speccore.data import load_rows

        picked = take_rows(load_rows(str(UI)), rows, "random", 0)
        return [{k: r[k] for k in ("source", "target", "domain")} for r in picked]
    return [
        {k: r[k] for k in ("dialogue", "summary", "topic") if k in r} for r in load_dialogsum(rows)
    ]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """CPU cores this process may run on (affinity), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def machine_info(device: str | None = None) -> dict[str, Any]:
    """CPU model, cores, torch version and device (GPU name and memory when on CUDA)."""
    import torch

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": usable_cores(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "device": device or ("cuda" if torch.cuda.is_available() else "cpu"),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def write_result(name: str, args: dict[str, Any], results: Any, device: str | None = None) -> Path:
    """Write ``speed-bench/results/<name>.json`` (atomically) with the machine and the arguments."""
    from speccore.utils.io import write_json

    path = RESULTS / f"{name}.json"
    write_json(
        path,
        {
            "benchmark": name,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(device),
            "args": args,
            "results": results,
        },
    )
    print(f"wrote {path}")
    return path


def load_dialogsum(rows: int, path: Path = DIALOGSUM) -> list[dict[str, Any]]:
    """The first ``rows`` rows of a (gzipped) JSONL file, DialogSum by default."""
    if not path.exists():
        raise SystemExit(f"data file {path} not found; pass --data")
    out: list[dict[str, Any]] = []
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if len(out) >= rows:
                break
            if line.strip():
                out.append(json.loads(line))
    if len(out) < rows:
        print(f"note: {path} has only {len(out)} rows")
    return out


def write_jsonl(rows: list[dict[str, Any]], path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@contextlib.contextmanager
def stopwatch(result: dict[str, float], key: str, sync_cuda: bool = False) -> Iterator[None]:
    """Store the block's wall time in ``result[key]`` and this process's CPU time (all threads)
    in ``result[key + "_cpu"]``, after a CUDA sync when asked."""
    import torch

    start, start_cpu = time.perf_counter(), time.process_time()
    try:
        yield
    finally:
        if sync_cuda and torch.cuda.is_available():
            torch.cuda.synchronize()
        result[key] = time.perf_counter() - start
        result[key + "_cpu"] = time.process_time() - start_cpu


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    cells = [[_fmt(c) for c in row] for row in [header, *rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for r, row in enumerate(cells):
        parts = [
            c.ljust(w) if r == 0 or i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(parts))
        if r == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)
