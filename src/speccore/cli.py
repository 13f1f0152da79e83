"""``speccore`` command line: thin entry points over the config dataclasses (one flag per field)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Sequence
from typing import Any

from .config import SelectConfig
from .errors import SpeccoreError

logger = logging.getLogger("speccore")


def _field_type(tp: Any) -> Any:
    """The concrete type of ``X | None`` (or ``X``)."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0]
    return tp


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per dataclass field: ``foo_bar`` → ``--foo-bar``; a bool that defaults to True
    becomes ``--no-foo-bar``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        tp = _field_type(hints[f.name])
        if tp is bool:
            if f.default is True:
                parser.add_argument(
                    "--no-" + f.name.replace("_", "-"),
                    dest=f.name,
                    action="store_false",
                    help=help_text,
                )
            else:
                parser.add_argument(flag, dest=f.name, action="store_true", help=help_text)
            continue
        default = None if f.default is dataclasses.MISSING else f.default
        parser.add_argument(
            flag, dest=f.name, type=tp, default=default, help=f"{help_text} (default: {default})"
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="speccore", description="Coreset selection for LLM fine-tuning."
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = parser.add_subparsers(dest="command", required=True)
    sel = sub.add_parser("select", help="select a coreset (STAFF by default)")
    add_dataclass_arguments(sel, SelectConfig)
    sub.add_parser("methods", help="list the selection methods")
    bench = sub.add_parser(
        "bench", help="fine-tune the target on each coreset, evaluate, write tables and plots"
    )
    bench.add_argument("config", help="bench YAML file (see bench/*.yaml)")
    bench.add_argument("--out", default=None, help="bench folder (default: the config's out)")
    bench.add_argument(
        "--report-only",
        action="store_true",
        help="only rewrite results.csv, table.md and plots from the finished cells",
    )
    return parser


def config_from_args(args: argparse.Namespace, cls: type) -> Any:
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def run_select(args: argparse.Namespace) -> int:
    from .pipeline import select
    from .report import summary_text

    cfg = config_from_args(args, SelectConfig)
    selection = select(cfg)
    if cfg.dry_run:
        from .dryrun import format_estimate

        print(format_estimate(selection.info["dry_run"]))
        return 0
    print(summary_text(selection))
    if cfg.out:
        print(f"wrote {cfg.out}/")
    return 0


def run_methods(args: argparse.Namespace) -> int:
    from .pipeline import import_methods
    from .selection.base import _REGISTRY

    import_methods()
    for name in sorted(_REGISTRY):
        print(f"{name:20s} {_REGISTRY[name].description}")
    return 0


def run_bench_command(args: argparse.Namespace) -> int:
    from .bench import load_bench_config, report_only, run_bench

    cfg = load_bench_config(args.config, out=args.out)
    if args.report_only:
        written = report_only(cfg)
    else:
        result = run_bench(cfg)
        print(f"{len(result.ran)} cells run, {len(result.skipped)} already finished")
        written = result.outputs
    for path in written:
        print(f"wrote {path}")
    return 0


COMMANDS = {"select": run_select, "methods": run_methods, "bench": run_bench_command}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return COMMANDS[args.command](args)
    except SpeccoreError as err:
        print(f"speccore: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
