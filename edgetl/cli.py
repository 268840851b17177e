"""`edgetl` command line. Errors are caught here, once, and printed as one paragraph.

Exit codes (documented in the README): 0 success; 2 recipe, data or model error;
3 a gate failed; 4 export or parity failure; 1 an unexpected internal error; 130 interrupted.
Training-side imports (torch) happen inside the commands that need them, so the
device-side commands start without torch installed.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edgetl import __version__
from edgetl.errors import EdgetlError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgetl", description="Transfer-learn, quantize, validate and ship a compact vision model.")
    parser.add_argument("--version", action="version", version=f"edgetl {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="run a recipe: data, transfer, (export, quantize, validate, report, bundle)")
    build.add_argument("recipe", type=Path)
    build.add_argument("--output", "-o", type=Path, help="run folder (default: runs/<recipe name>)")
    build.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE", help="override a recipe field, e.g. --set train.epochs=5 (repeatable)")
    build.add_argument("--resume", action="store_true", help="continue an interrupted build from its last finished epoch")

    commands.add_parser("schema", help="print the recipe's JSON Schema")
    commands.add_parser("backbones", help="list registered backbones with their weights and preprocessing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return _COMMANDS[args.command](args)
    except EdgetlError as exc:
        print(f"edgetl: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("edgetl: interrupted", file=sys.stderr)
        return 130


def _build(args: argparse.Namespace) -> int:
    from edgetl.pipeline import build
    from edgetl.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    run_dir = (args.output or Path("runs") / recipe.name).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "build.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    result = build(recipe, run_dir, resume=args.resume)
    print(f"test accuracy {result.metrics['test_accuracy']:.4f} (val {result.metrics['val_accuracy']:.4f}); run folder {run_dir}")
    return 0


def _schema(args: argparse.Namespace) -> int:
    from edgetl.recipe import recipe_json_schema

    print(json.dumps(recipe_json_schema(), indent=2))
    return 0


def _backbones(args: argparse.Namespace) -> int:
    from edgetl.models import REGISTRY

    for name in REGISTRY.names():
        spec = REGISTRY.get(name)
        pre = spec.preprocessing()
        print(f"{name:20s} {spec.source:12s} {pre.input_size}px resize {pre.resize_size} {pre.interpolation:8s} mean {pre.mean} std {pre.std}  weights: {spec.weights}")
    print("timm:<name>          any timm model; weights from the timm hub or `model.weights: <file>`")
    return 0


_COMMANDS = {"build": _build, "schema": _schema, "backbones": _backbones}
