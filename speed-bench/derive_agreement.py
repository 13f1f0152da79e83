"""How well does a small model derived from the target agree with it, and at what cost?

For each task (UI translation, DialogSum) and target (``smollm2-135m``, ``gemma-3-270m``), and
each derived small model (``speccore.proxies.derive``: a fraction of the target's layers, uniform or
block-influence, healed or not), this measures over *all* rows, both models untuned (a fresh
LoRA adapter, as STAFF's agreement check and ``speccore agree`` score them):

* Spearman of effort and of loss between the small model's and the target's scores;
* the Rand index of the K = 10 equal-width regions each model's scores induce;
* cost, measured side by side (``time_costs``): each target and its derived halves and thirds
  timed one after the other in this process, nothing else running, on one seeded sample
  (scoring and a LoRA fine-tune, per row); the cost ratio is the small model's (fine-tune +
  scoring) per row over its target's. Healing's own seconds are paid once per task (cached)
  and reported apart.

The cross-family pair (SmolLM2-135M scoring for Gemma-3-270M) sits in the same table. Each
model is scored once (:func:`speccore.proxies.agree.score_rows`) and compared with
:func:`speccore.proxies.agree.compare`, the two halves of :func:`speccore.proxies.agree.agreement`.

The work runs in priority order under a time budget (``--budget-min``); what does not fit is
listed in the results as ``skipped``, so a cut is never silent. Results are written after every
item to ``speed-bench/results/derive_agreement.json`` and ``.md``.

    OMP_NUM_THREADS=2 nice -n 10 .venv/bin/python speed-bench/derive_agreement.py
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common import RESULTS, machine_info, table
from speccore.config import LoraSettings, TrainSettings
from speccore.data import Formatting, tokenize_dataset
from speccore.data.batches import TokenizedData
from speccore.models import LoadedModel, attach_lora, detach_lora, load_model
from speccore.proxies.agree import ScoredRows, compare, sample_rows, score_rows
from speccore.proxies.costs import cost_table, measured_cost_ratio, on_paper
from speccore.proxies.derive import derive_model, read_derivation
from speccore.proxies.derive_settings import DeriveSettings
from speccore.train import finetune

logger = logging.getLogger("derive_agreement")
Item = tuple[str, float, Callable[[], None]]
ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("smollm2-135m", "gemma-3-270m")
LORA = LoraSettings(r=8, alpha=16, dropout=0.05)  # the mini benches' adapter
TRAIN = TrainSettings(epochs=1, learning_rate=2e-4, batch_size=8)  # STAFF's small fine-tune, T=1
COST_SCORE_ROWS, COST_FT_ROWS = 48, 32  # the side-by-side timing's sample (time_costs)


@dataclass(frozen=True)
class Task:
    name: str
    path: Path
    template: str
    output_field: str
    max_length: int
    random_rows: bool  # draw rows at random (a sorted file) or take the first ones


TASKS = {
    "ui": Task(
        "UI translation",
        ROOT.parent / "shared/data/ui-translation-de/train.jsonl.gz",
        "Translate from English to German.\nEnglish: {source}\nGerman: ",
        "target",
        128,
        True,
    ),
    "dialogsum": Task(
        "DialogSum",
        ROOT / "demo/dialogsum-train-150.jsonl",
        "Summarize the dialogue.\n{dialogue}\nSummary: ",
        "summary",
        384,
        False,
    ),
}


class Campaign:
    """Targets loaded once, every model scored once, rows of the table appended as they come."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.start = time.perf_counter()
        self.targets: dict[str, LoadedModel] = {}
        self.data: dict[tuple[str, str], TokenizedData] = {}
        self.scored: dict[tuple[str, str], ScoredRows] = {}
        # Side-by-side timings measured alone (time_costs): seconds per row of scoring and of
        # fine-tuning, by (task, target, layers kept).
        self.costs: dict[tuple[str, str, int], dict[str, float]] = {}
        self.rows: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self.done: list[str] = []
        self.datasets: dict[str, Any] = {}
        if args.resume:
            self.load(RESULTS / f"{args.name}.json")

    # --- plumbing ------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def run(self, label: str, need_s: float, fn: Callable[[], None]) -> None:
        """Run one item unless fewer than ``need_s`` seconds of the budget are left."""
        if label in self.done:
            logger.info("already measured: %s", label)
            return
        left = self.args.budget_min * 60 - self.elapsed()
        if left < need_s:
            logger.warning("skipped (%.0f s left, needs ~%.0f s): %s", left, need_s, label)
            self.skipped.append(label)
            self.write()
            return
        t = time.perf_counter()
        logger.info("[%.0f s] %s", self.elapsed(), label)
        try:
            fn()
        except Exception as err:  # one failed item must not lose the others
            logger.exception("failed: %s", label)
            self.skipped.append(f"{label} (failed: {type(err).__name__}: {err})")
        else:
            logger.info("done in %.0f s: %s", time.perf_counter() - t, label)
            self.done.append(label)
        self.write()

    def target(self, name: str) -> LoadedModel:
        if name not in self.targets:
            self.targets[name] = load_model(name, dtype="float32", device="cpu")
        return self.targets[name]

    def dataset(self, task: str) -> Any:
        if task not in self.datasets:
            rows = self.args.ui_rows if task == "ui" else self.args.dialogsum_rows
            self.datasets[task] = load_task_rows(TASKS[task], rows)
        return self.datasets[task]

    def tokens(self, task: str, target: str) -> TokenizedData:
        key = (task, target)
        if key not in self.data:
            spec = TASKS[task]
            fmt = Formatting(template=spec.template, output_field=spec.output_field)
            self.data[key] = tokenize_dataset(
                self.dataset(task), self.target(target).tokenizer, fmt, spec.max_length
            )
        return self.data[key]

    def score(self, loaded: LoadedModel, data: TokenizedData) -> ScoredRows:
        return score_rows(
            loaded,
            data,
            rows=len(data),
            seed=0,
            lora=LORA,
            max_batch_tokens=self.args.max_batch_tokens,
        )

    def target_scores(self, task: str, target: str) -> ScoredRows:
        scored = self.scored[(task, target)]
        if scored.tokenizer is None:  # restored from an earlier run
            scored.tokenizer = self.target(target).tokenizer
        return scored

    def time_model(self, loaded: LoadedModel, data: TokenizedData) -> dict[str, float]:
        """Seconds per row of effort + loss scoring (COST_SCORE_ROWS rows) and of STAFF's LoRA
        fine-tune (COST_FT_ROWS rows), on one seeded sample, after a warm-up of both."""
        opts = {"seed": 0, "lora": LORA, "max_batch_tokens": self.args.max_batch_tokens}
        score_rows(loaded, data, rows=4, **opts)  # warm-up: one-off costs are not per row
        t = time.perf_counter()
        score_rows(loaded, data, rows=COST_SCORE_ROWS, **opts)
        score_s = (time.perf_counter() - t) / COST_SCORE_ROWS
        sub = data.subset(sample_rows(len(data), COST_FT_ROWS, seed=0))
        model = attach_lora(loaded.model, LORA, seed=0)
        try:
            finetune(model, sub.subset(range(8)), TRAIN, max_batch_tokens=2048, desc="warm-up")
            t = time.perf_counter()
            finetune(model, sub, TRAIN, max_batch_tokens=2048, desc="timed fine-tune")
            ft_s = (time.perf_counter() - t) / COST_FT_ROWS
        finally:
            detach_lora(model)
        return {"score_s_per_row": score_s, "finetune_s_per_row": ft_s}

    def time_costs(self, task: str, target: str) -> None:
        """The target and its derived 1/2 and 1/3 (uniform, unhealed: healing changes weights,
        not shapes or cost) timed one after the other in this process, nothing else running."""
        loaded, data = self.target(target), self.tokens(task, target)
        total = int(loaded.model.config.get_text_config().num_hidden_layers)
        self.costs[(task, target, total)] = self.time_model(loaded, data)
        for frac in (0.5, 1 / 3):
            folder = derive_model(loaded, settings=DeriveSettings(layers=frac, heal_steps=0))
            small = load_model(str(folder), dtype="float32", device="cpu")
            kept = int(small.model.config.get_text_config().num_hidden_layers)
            self.costs[(task, target, kept)] = self.time_model(small, data)

    def measured_cost_ratio(self, row: dict[str, Any]) -> float | None:
        """Small over target (fine-tune + scoring) per row, from the side-by-side timings."""
        return measured_cost_ratio(self.costs, row)

    # --- items ---------------------------------------------------------------------------

    def score_target(self, task: str, target: str) -> None:
        if (task, target) in self.scored:  # restored by --resume
            return
        loaded, data = self.target(target), self.tokens(task, target)
        self.scored[(task, target)] = self.score(loaded, data)

    def cross_family(self, task: str) -> None:
        small, target = self.args.targets
        report = compare(
            self.target_scores(task, small), self.target_scores(task, target), regions=10
        )
        s_layers, t_layers = (
            int(self.target(n).model.config.get_text_config().num_hidden_layers)
            for n in self.args.targets
        )
        row = self.row(task, target, small, f"{s_layers}/{t_layers}", "-", 0, report, None)
        self.rows.append(row)

    def derived(self, task: str, target: str, settings: DeriveSettings) -> None:
        loaded, data = self.target(target), self.tokens(task, target)
        folder = derive_model(
            loaded, settings=settings, data=data, max_batch_tokens=self.args.heal_batch_tokens
        )
        record = read_derivation(folder)
        assert record is not None
        small = load_model(str(folder), dtype="float32", device="cpu")
        small_rows = self.score(small, data)
        report = compare(small_rows, self.target_scores(task, target), regions=10)
        kept = int(record["num_hidden_layers"])
        total = int(record["target"]["num_hidden_layers"])
        row = self.row(
            task,
            target,
            f"derive:{settings.layers:.2g}",
            f"{kept}/{total}",
            settings.layer_selection,
            settings.heal_steps,
            report,
            record,
        )
        self.rows.append(row)

    def row(
        self,
        task: str,
        target: str,
        small: str,
        layers: str,
        selection: str,
        heal: int,
        report: Any,
        record: dict[str, Any] | None,
    ) -> dict[str, Any]:
        heal_record = (record or {}).get("heal", {})
        return {
            "task": task,
            "target": target,
            "small": small,
            "layers": layers,
            "selection": selection,
            "heal_steps": heal,
            "rows": report.rows,
            "spearman_effort": report.spearman.get("effort"),
            "spearman_loss": report.spearman.get("loss"),
            "rand_effort": report.rand_index.get("effort"),
            "rand_loss": report.rand_index.get("loss"),
            "same_family": report.same_family,
            "small_scoring_s": report.small_seconds,
            "target_scoring_s": report.target_seconds,
            "small_tokens": report.small_tokens,
            "target_tokens": report.target_tokens,
            "kl_before": heal_record.get("kl_before"),
            "kl_after": heal_record.get("kl_after"),
            "derive_s": (record or {}).get("seconds", {}).get("total"),
            "heal_s": heal_record.get("seconds"),
            "kept_layers": (record or {}).get("kept_layers"),
        }

    # --- output --------------------------------------------------------------------------

    def write(self) -> None:
        from speccore.utils.io import atomic_open, write_json

        RESULTS.mkdir(parents=True, exist_ok=True)
        for r in self.rows:
            r["cost_ratio_alone"] = self.measured_cost_ratio(r)
        payload = {
            "benchmark": "derive_agreement",
            "machine": machine_info("cpu"),
            "args": vars(self.args),
            "elapsed_s": self.elapsed(),
            "rows": self.rows,
            "skipped": self.skipped,
            # For --resume: what was measured, the targets' scores and the costs.
            "done": self.done,
            "target_scores": {
                f"{task}|{name}": {
                    "name": r.name,
                    "n_rows": r.n_rows,
                    "seed": r.seed,
                    "indices": r.indices.tolist(),
                    "scores": {k: v.tolist() for k, v in r.scores.items()},
                    "seconds": r.seconds,
                    "tokens": r.tokens,
                }
                for (task, name), r in self.scored.items()
            },
            "costs": {"|".join(map(str, k)): v for k, v in self.costs.items()},
        }
        write_json(RESULTS / f"{self.args.name}.json", payload)
        with atomic_open(RESULTS / f"{self.args.name}.md") as f:
            f.write(markdown(self.rows, self.skipped, self.elapsed(), self.costs))

    def load(self, path: Path) -> None:
        """Resume: the rows, targets' scores and costs of an earlier run of the same setup."""
        old = json.loads(path.read_text(encoding="utf-8"))
        # A task's row count matters only once one of its items is measured.
        tasks = {label.split(":")[0] for label in old.get("done", [])}
        same = ["targets", "max_batch_tokens", *(f"{t}_rows" for t in sorted(tasks))]
        changed = [k for k in same if old["args"].get(k) != getattr(self.args, k)]
        if changed:
            raise SystemExit(f"--resume: {path} was measured with other {', '.join(changed)}")
        self.rows, self.done = old["rows"], old.get("done", [])
        for key, r in old.get("target_scores", {}).items():
            task, name = key.split("|", 1)
            self.scored[(task, name)] = ScoredRows(
                name=r["name"],
                tokenizer=None,
                n_rows=r["n_rows"],
                seed=r["seed"],
                indices=np.asarray(r["indices"], dtype=np.int64),
                scores={k: np.asarray(v) for k, v in r["scores"].items()},
                seconds=r["seconds"],
                tokens=r["tokens"],
            )
        for key, v in old.get("costs", {}).items():
            task, target, layers = key.rsplit("|", 2)
            self.costs[(task, target, int(layers))] = v
        logger.info("resumed %d measured items from %s", len(self.done), path)


def need_s(task: str, target: str, heal_steps: int) -> float:
    """Seconds an item needs (the budget skips it when fewer are left): a healed model's
    healing dominates; measured on UI rows (48 steps of 8 rows, 2 cores: SmolLM2 ~250 s,
    Gemma ~630 s), and it grows with the tokens per row (DialogSum's are ~3.3 times UI's)."""
    if not heal_steps:
        return 60.0
    per_step = (13.0 if "gemma" in target else 5.0) * (3.3 if task == "dialogsum" else 1.0)
    return per_step * heal_steps


def load_task_rows(task: Task, n: int) -> Any:
    import datasets

    opener = gzip.open if task.path.suffix == ".gz" else open
    with opener(task.path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if task.random_rows:  # the file is sorted: a seeded random sample, in file order
        idx = np.sort(np.random.default_rng(0).choice(len(rows), n, replace=False))
        rows = [rows[i] for i in idx]
    else:
        rows = rows[:n]
    return datasets.Dataset.from_list(rows)


def markdown(
    rows: list[dict[str, Any]],
    skipped: list[str],
    elapsed: float,
    costs: dict[tuple[str, str, int], dict[str, float]],
) -> str:
    header = ["task", "target", "small", "layers", "select", "heal", "ρ effort", "ρ loss",
              "RI effort", "RI loss", "KL before→after", "heal s", "cost ratio"]  # fmt: skip
    body = []
    for r in rows:
        kl = "-" if r["kl_before"] is None else f"{r['kl_before']:.2f}→{r['kl_after']:.2f}"
        body.append(
            [
                r["task"],
                r["target"],
                r["small"],
                r["layers"],
                r["selection"],
                r["heal_steps"],
                _num(r["spearman_effort"]),
                _num(r["spearman_loss"]),
                _num(r["rand_effort"]),
                _num(r["rand_loss"]),
                kl,
                "-" if r.get("heal_s") is None else f"{r['heal_s']:.0f}",
                _num(r.get("cost_ratio_alone"), 2),
            ]
        )
    lines = [
        "# Derived small models: agreement with the target and cost",
        "",
        "Both models untuned (fresh LoRA r=8), all rows scored; ρ: Spearman; RI: Rand index of",
        "K = 10 equal-width regions; KL: the derived model's mean per-token KL(target ‖ derived)",
        "on 32 of the task's rows (healing trains on all of them) before and after healing; heal",
        "s: the healing's seconds (once per task, cached). cost ratio: the small model's seconds",
        "per row of STAFF's work (a fine-tune epoch",
        "and a scoring pass) over the target's, from the side-by-side timing below (n/a: not",
        f"timed). This run (resumed runs keep earlier rows): {elapsed / 60:.1f} min.",
        "",
        "```",
        table(header, body),
        "```",
    ]
    if costs:
        lines += ["", *cost_table(costs, COST_SCORE_ROWS, COST_FT_ROWS)]
    if skipped:
        lines += ["", "Not measured (time budget):", *[f"- {s}" for s in skipped]]
    lines += ["", *on_paper()]
    return "\n".join(lines) + "\n"


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-min", type=float, default=37.0)
    parser.add_argument("--heal-steps", type=int, default=48)
    parser.add_argument("--heal-lr", type=float, default=2e-4)
    parser.add_argument("--max-batch-tokens", type=int, default=2048)
    parser.add_argument("--heal-batch-tokens", type=int, default=1024)
    parser.add_argument("--ui-rows", type=int, default=300)
    parser.add_argument("--dialogsum-rows", type=int, default=150)
    parser.add_argument("--targets", nargs=2, default=list(TARGETS), help="small-family, other")
    parser.add_argument("--name", default="derive_agreement", help="results file name")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the measured items of speed-bench/results/NAME.json and run only the others",
    )
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    import torch

    torch.set_num_threads(2)
    c = Campaign(args)

    def variant(layers: float, selection: str, heal: int) -> DeriveSettings:
        return DeriveSettings(
            layers=layers, layer_selection=selection, heal_steps=heal, heal_lr=args.heal_lr
        )  # type: ignore[arg-type]

    half, third = 0.5, 1 / 3
    heal = args.heal_steps

    def scores(task: str) -> list[Item]:
        need = 60 if task == "ui" else 120
        items: list[Item] = [
            (f"{task}: score {t}", need, lambda t=t: c.score_target(task, t)) for t in args.targets
        ]
        return [*items, (f"{task}: cross-family", 0, lambda: c.cross_family(task))]

    def derived(
        task: str, frac: float, selections: tuple[str, ...], steps: int, only: str | None = None
    ) -> list[Item]:
        return [
            (
                f"{task}: {t} {frac:.2f} {s} heal {steps}",
                need_s(task, t, steps),
                lambda t=t, s=s: c.derived(task, t, variant(frac, s, steps)),
            )
            for t in args.targets
            for s in selections
            if only in (None, t)
        ]

    def costs(task: str) -> list[Item]:
        return [(f"{task}: cost {t}", 240, lambda t=t: c.time_costs(task, t)) for t in args.targets]

    both = ("uniform", "block-influence")
    # Priority order: what matters most first (the default, a healed third, before the
    # alternatives); the budget cuts from the end.
    plan = [
        *scores("ui"),
        *derived("ui", half, both, 0),
        *costs("ui"),
        *derived("ui", half, ("uniform",), heal),
        *derived("ui", third, both, 0),
        *derived("ui", third, ("uniform",), heal),
        *scores("dialogsum"),
        *derived("dialogsum", third, ("uniform",), 0),
        *derived("dialogsum", third, ("uniform",), heal),
        *costs("dialogsum"),
        *derived("ui", third, ("block-influence",), heal),
        # Longer healing, on the cheaper target (Gemma's would take ~40 min here: 4 × 607 s).
        *derived("ui", third, ("uniform",), 4 * heal, only=args.targets[0]),
        *derived("dialogsum", third, ("block-influence",), 0),
        *derived("dialogsum", half, both, 0),
        *derived("dialogsum", half, ("uniform",), heal),
        *derived("ui", half, ("block-influence",), heal),
    ]
    for label, need, fn in plan:
        c.run(label, need, fn)
    c.write()
    print(markdown(c.rows, c.skipped, c.elapsed(), c.costs))


if __name__ == "__main__":
    main()
