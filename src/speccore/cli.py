"""``speccore`` command line: thin entry points over the config dataclasses.

``select`` takes one flag per setting (built by :func:`speccore.config.select_parser`, a
``transformers.HfArgumentParser``) and ``--config run.yaml`` whose keys are the same names with
underscores; flags win over the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from datetime import datetime
from fractions import Fraction
from typing import Any, NoReturn

from .utils.errors import ConfigError, SpeccoreError

logger = logging.getLogger("speccore")


class Parser(argparse.ArgumentParser):
    """Errors are :class:`ConfigError`: one line, exit code 2 (see :func:`main`)."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    from .config import select_parser

    parser = Parser(prog="speccore", description="Coreset selection for LLM fine-tuning.")
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="warnings only: no info logs, no progress bars"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    sel = sub.add_parser(
        "select",
        help="select a coreset (STAFF by default)",
        parents=[select_parser(add_help=False)],
    )
    sel.add_argument(
        "--config",
        default=None,
        help="YAML file of settings (keys: the flag names with underscores); flags win",
    )
    sub.add_parser("methods", help="list the selection methods with their settings")
    bench = sub.add_parser(
        "bench", help="fine-tune the target on each coreset, evaluate, write tables and plots"
    )
    bench.add_argument("config", help="bench YAML file (see quality-bench/*.yaml)")
    bench.add_argument("--out", default=None, help="bench folder (default: the config's out)")
    bench.add_argument(
        "--report-only",
        action="store_true",
        help="only rewrite results.csv, table.md and plots from the finished cells",
    )
    bench.add_argument(
        "--dry-run",
        action="store_true",
        help="list the cells a run would do (new, stale, finished) with estimated times; "
        "writes nothing",
    )
    add_derive_parser(sub)
    add_agree_parser(sub)
    return parser


def select_argv(argv: Sequence[str]) -> list[str]:
    """The tokens after ``select``, without ``--config FILE`` and the global ``-q``."""
    argv = list(argv)
    rest = argv[argv.index("select") + 1 :]
    out: list[str] = []
    skip = False
    for token in rest:
        if skip:
            skip = False
        elif token == "--config":
            skip = True
        elif not token.startswith("--config="):
            out.append(token)
    return out


def run_select(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .config import parse_select_args
    from .run.pipeline import select
    from .run.summary import summary_text

    cfg = parse_select_args(select_argv(argv), config_file=args.config)
    if not cfg.out and not cfg.dry_run:
        cfg.out = f"runs/{cfg.method}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        logger.info("no --out given: writing the run to %s", cfg.out)
    selection = select(cfg)
    if cfg.dry_run:
        from .run.dryrun import format_estimate

        print(format_estimate(selection.info["dry_run"]))
        return 0
    print(summary_text(selection))
    print(f"wrote {cfg.out}/")
    return 0


def describe_methods() -> str:
    """Every method with its description, models and settings (flag = default)."""
    from .config import default_of
    from .selection.base import method_class, method_names

    lines = []
    for name in method_names():
        cls = method_class(name)
        needs = ", ".join(cls.needs) or "no model"
        lines.append(f"{name:22s} {cls.description} [{needs}]")
        for f in dataclasses.fields(cls.settings_class):
            default = default_of(f)
            flag = "--" + f.name.replace("_", "-")
            lines.append(f"{'':22s}   {flag} = {default!r}  {f.metadata.get('help', '')}")
    return "\n".join(lines)


def run_methods(args: argparse.Namespace, argv: Sequence[str]) -> int:
    print(describe_methods())
    return 0


def run_bench_command(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .bench import load_bench_config, report_only, run_bench

    cfg = load_bench_config(args.config, out=args.out)
    if args.dry_run:
        from .bench.estimate import estimate_bench, format_bench_estimate

        print(format_bench_estimate(estimate_bench(cfg)))
        return 0
    if args.report_only:
        written = report_only(cfg)
    else:
        result = run_bench(cfg)
        print(f"{len(result.ran)} cells run, {len(result.skipped)} already finished")
        written = result.outputs
    for path in written:
        print(f"wrote {path}")
    return 0


def add_derive_parser(sub: Any) -> None:
    """``speccore derive``: a small model of the target's family, by dropping its layers."""
    from .proxies.derive_settings import HEAL_MODES, LAYER_SELECTIONS, DeriveSettings, parse_layers

    p = sub.add_parser(
        "derive",
        help="derive a small model from the target by dropping layers (and healing them)",
    )
    p.add_argument("--model", required=True, help="the target: alias, folder, .gguf or hub name")
    p.add_argument(
        "--layers",
        type=parse_layers,
        default=DeriveSettings.layers,
        help="layers to keep: a count N or a fraction of the target's "
        f"(default {Fraction(DeriveSettings.layers).limit_denominator(100)})",
    )
    p.add_argument(
        "--layer-selection",
        choices=LAYER_SELECTIONS,
        default=DeriveSettings.layer_selection,
        help="which layers: evenly spaced, or the highest block influence on --data",
    )
    p.add_argument(
        "--heal-steps",
        type=int,
        default=DeriveSettings.heal_steps,
        help="distillation steps of 8 rows on --data (default %(default)s; 0: unhealed, no data)",
    )
    p.add_argument(
        "--heal-lr", type=float, default=DeriveSettings.heal_lr, help="default %(default)s"
    )
    p.add_argument("--heal-mode", choices=HEAL_MODES, default=DeriveSettings.heal_mode)
    p.add_argument("--seed", type=int, default=DeriveSettings.seed)
    p.add_argument(
        "--out", default=None, help="copy the derived folder here (default: the cache only)"
    )
    _add_data_flags(p, required=False)


def add_agree_parser(sub: Any) -> None:
    """``speccore agree``: how well a small model agrees with the target on the task."""
    p = sub.add_parser(
        "agree", help="Spearman and Rand index of a small model's scores against the target's"
    )
    p.add_argument("--small", required=True, help="small model, or derive:FRACTION[,key=value]")
    p.add_argument("--target", required=True, help="target model")
    p.add_argument("--rows", type=int, default=200, help="rows sampled (default %(default)s)")
    p.add_argument(
        "--regions", type=int, default=10, help="K equal-width regions (default %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the row sample")
    _add_data_flags(p, required=True)


def _add_data_flags(p: argparse.ArgumentParser, *, required: bool) -> None:
    """The data, its formatting and the models' placement (names as in ``select``)."""
    need = "" if required else " (needed for block-influence and healing)"
    p.add_argument("--data", required=required, help=f"training rows: file, folder or hub{need}")
    p.add_argument("--split", default="train")
    p.add_argument("--input-field", default=None)
    p.add_argument("--output-field", default=None)
    p.add_argument("--template", default=None, help="prompt template with {field} placeholders")
    p.add_argument("--messages-field", default=None)
    p.add_argument("--chat-template", action="store_true")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--truncation-side", choices=("left", "right"), default="left")
    p.add_argument("--max-batch-tokens", type=int, default=4096)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")


def _tokenizer_data(args: argparse.Namespace, min_rows: int = 1) -> Any:
    """A function ``tokenizer -> TokenizedData`` of ``--data`` formatted by the flags; the
    rows are read (and checked: at least ``min_rows``) now, before any model loads."""
    from .data import Formatting, format_rows, load_rows, tokenize_dataset
    from .utils.errors import DataError

    fmt = Formatting.from_config(args)
    fmt.validate()
    dataset = load_rows(args.data, args.split)
    if len(dataset) < min_rows:
        raise DataError(
            f"--data {args.data} has {len(dataset)} row(s); {args.command} needs at least "
            f"{min_rows}"
        )
    if not fmt.chat_template and not fmt.messages_field:
        format_rows(dataset, fmt)  # a bad row or field fails now

    def tokenized(tokenizer: Any) -> Any:
        return tokenize_dataset(dataset, tokenizer, fmt, args.max_length, args.truncation_side)

    return tokenized


def run_derive(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .models import load_model
    from .proxies.derive import derive_model, read_derivation
    from .proxies.derive_settings import DeriveSettings

    settings = DeriveSettings(
        layers=args.layers,
        layer_selection=args.layer_selection,
        heal_steps=args.heal_steps,
        heal_lr=args.heal_lr,
        heal_mode=args.heal_mode,
        seed=args.seed,
    )
    settings.validate()  # before loading anything
    from .models.load import check_model_name

    check_model_name(args.model)
    if args.out:
        from .utils.runfolder import check_out_folder

        check_out_folder(args.out, "derive")
    target: Any = args.model
    data = None
    if args.data:
        tokenized = _tokenizer_data(args)
        target = load_model(args.model, dtype=args.dtype, device=args.device)
        data = tokenized(target.tokenizer)
    folder = derive_model(
        target,
        settings=settings,
        data=data,
        out=args.out,
        dtype=args.dtype,
        device=args.device,
        max_batch_tokens=args.max_batch_tokens,
    )
    record = read_derivation(folder) or {}
    heal, total = record.get("heal", {}), record.get("target", {}).get("num_hidden_layers")
    print(f"kept layers {record.get('kept_layers')} of {total}")
    if "kl_before" in heal:
        before, after = heal["kl_before"], heal["kl_after"]
        print(f"KL to the target: {before:.3f} before healing, {after:.3f} after")
    print(f"wrote {folder}")
    return 0


def run_agree(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from .models import load_model
    from .models.load import check_model_name
    from .proxies.agree import MIN_ROWS, agreement
    from .proxies.derive import is_derive_spec, parse_derive_spec, resolve_derived
    from .utils.interrupt import Interrupted

    if args.rows < MIN_ROWS:
        raise ConfigError(f"--rows must be >= {MIN_ROWS} to compare rankings, got {args.rows}")
    check_model_name(args.target)
    if is_derive_spec(args.small):
        parse_derive_spec(args.small)
    else:
        check_model_name(args.small)
    # Spearman of fewer than MIN_ROWS rows is undefined: refused before any model loads.
    tokenized = _tokenizer_data(args, min_rows=MIN_ROWS)
    small: Any = args.small
    target: Any = args.target
    if is_derive_spec(args.small):
        # The derived model needs the target's tokens: load the target once for both.
        target = load_model(args.target, dtype=args.dtype, device=args.device)
        small = str(
            resolve_derived(
                args.small,
                target,
                tokenized(target.tokenizer),
                max_batch_tokens=args.max_batch_tokens,
            )
        )
    try:
        report = agreement(
            small,
            target,
            tokenized,
            rows=args.rows,
            regions=args.regions,
            seed=args.seed,
            max_batch_tokens=args.max_batch_tokens,
            dtype=args.dtype,
            device=args.device,
        )
    except Interrupted as stop:
        # A resumed half would measure the cost per token on part of the rows only.
        stop.nothing_kept("agree keeps no partial scores")
        raise
    print(report.format())
    return 0


COMMANDS: dict[str, Any] = {
    "select": run_select,
    "methods": run_methods,
    "bench": run_bench_command,
    "derive": run_derive,
    "agree": run_agree,
}


def set_quiet(quiet: bool) -> None:
    """``-q``: warnings only, and no progress bars."""
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from .utils import progress

    progress.set_quiet(quiet)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .utils.interrupt import Interrupted, interruptible

    try:
        args = build_parser().parse_args(argv)
        set_quiet(args.quiet)
        with interruptible():
            return int(COMMANDS[args.command](args, argv))
    except SpeccoreError as err:
        print(f"speccore: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        print(f"speccore: {stop}", file=sys.stderr)
        return stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
