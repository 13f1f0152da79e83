"""The bench: fine-tune the target on each coreset, evaluate it, and report like the paper.

``speccore bench CONFIG.yaml`` or ``speccore.bench.run_bench("CONFIG.yaml")``; see
``quality-bench/*.yaml`` for configurations and :class:`BenchConfig` for every key.
"""

from .bench_config import (
    BenchConfig,
    DataSettings,
    GenerationSettings,
    ModelSettings,
    bench_config_from_dict,
    load_bench_config,
)
from .generate import generate
from .metrics import MetricSettings, UnicodeTokenizer, corpus_bleu, evaluate, rouge_l
from .run import BenchResult, Cell, plan_cells, report_only, run_bench
from .tables import read_results_csv, render_tables

__all__ = [
    "BenchConfig",
    "BenchResult",
    "Cell",
    "DataSettings",
    "GenerationSettings",
    "MetricSettings",
    "ModelSettings",
    "UnicodeTokenizer",
    "bench_config_from_dict",
    "corpus_bleu",
    "evaluate",
    "generate",
    "load_bench_config",
    "plan_cells",
    "read_results_csv",
    "render_tables",
    "report_only",
    "rouge_l",
    "run_bench",
]
