"""`edgetl` command line. Errors are caught here, once, and printed as one paragraph.

Exit codes (documented in the README): 0 success; 2 recipe, data, model or argument error, or
an output the disk refused; 3 a gate failed; 4 export or parity failure; 5 `serve`'s port is in
use; 1 an unexpected internal error; 130 interrupted; 141 stdout was closed (a pipe's reader
stopped); 143 a build stopped by SIGTERM.
Training-side imports (torch) happen inside the commands that need them; the device-side
commands (`edgetl.runtime.commands`) import only the runtime, so they start without torch.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

from PIL.Image import DecompressionBombWarning

from edgetl import __version__
from edgetl.errors import EdgetlError
from edgetl.runtime.commands import COMMANDS as DEVICE_COMMANDS
from edgetl.runtime.commands import add_commands as add_device_commands
from edgetl.runtime.preprocess import ImageDecodeError
from edgetl.runtime.warnlog import route_warnings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgetl", description="Transfer-learn, quantize, validate and ship a compact vision model."
    )
    parser.add_argument("--version", action="version", version=f"edgetl {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser(
        "build", help="run a recipe: data, transfer, export, quantize, validate, gates, report, bundle"
    )
    build.add_argument("recipe", type=Path)
    build.add_argument("--output", "-o", type=Path, help="run folder (default: runs/<recipe name>)")
    build.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a recipe field, e.g. --set train.epochs=5 (repeatable)",
    )
    build.add_argument(
        "--resume", action="store_true", help="continue an interrupted build from its last finished epoch"
    )
    build.add_argument("--force", action="store_true", help="rebuild every stage instead of reusing cached ones")

    sweep = commands.add_parser("sweep", help="search recipe fields for the most accurate model within a budget")
    sweep.add_argument("sweep", type=Path, metavar="SWEEP")
    sweep.add_argument("--trials", type=int, help="trials to sample (random, tpe, nsga2); default the file's")
    sweep.add_argument("--concurrency", type=int, help="trials at once; default as many as the CPUs allow")
    sweep.add_argument("--address", help="join this Ray cluster (e.g. ray://head:10001) instead of a local Ray")
    sweep.add_argument("--output", "-o", type=Path, help="output folder (default: runs/<sweep name>)")

    report = commands.add_parser("report", help="compare several runs in one chart and table")
    report.add_argument("runs", type=Path, nargs="+", metavar="RUN_DIR")
    report.add_argument("--output", "-o", type=Path, required=True, help="folder for report.html and report.md")

    add_device_commands(commands)
    commands.add_parser("schema", help="print the recipe's JSON Schema")
    commands.add_parser("backbones", help="list registered backbones with their weights and preprocessing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Our loggers speak at INFO; libraries (ONNX Runtime's quantizer logs per-channel
    # chatter on the root logger) only at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("edgetl").setLevel(logging.WARNING if args.quiet else logging.INFO)
    route_warnings(logging.getLogger("edgetl.warnings"))
    # edgetl refuses images over its own, lower pixel limit with a message of its own.
    warnings.filterwarnings("ignore", category=DecompressionBombWarning)
    try:
        code = _COMMANDS[args.command](args)
        sys.stdout.flush()  # so a closed pipe shows here, not as a traceback when Python exits
        return code
    except BrokenPipeError:
        # The reader went away (`edgetl predict ... | head -1`): stop quietly with the status a
        # process killed by SIGPIPE gets, as `cat` would. Python flushes stdout again at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except EdgetlError as exc:
        print(f"edgetl: error: {_rank_prefix()}{exc}", file=sys.stderr)
        return exc.exit_code
    except ImageDecodeError as exc:  # an image given directly (not walked from a folder)
        print(f"edgetl: error: {exc}", file=sys.stderr)
        return 2
    except _Terminated:
        # torchrun stops every rank with SIGTERM when one fails: its summary names the first failure
        cause = "; torchrun stops every rank when one fails, see its first failure" if _rank_prefix() else ""
        print(
            f"edgetl: {_rank_prefix()}terminated (SIGTERM{cause}); temporary files removed, rerun with --resume "
            "to continue",
            file=sys.stderr,
        )
        return 143
    except KeyboardInterrupt:
        print("edgetl: interrupted", file=sys.stderr)
        return 130


class _Terminated(KeyboardInterrupt):
    """SIGTERM during a build, raised where the build is so that every `finally` removes its temporary files."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


def _rank_prefix() -> str:
    """ "rank N of M: " in a torchrun launch (whose ranks share one terminal), else ""."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f"rank {os.environ.get('RANK', '?')} of {world}: " if world.isdigit() and int(world) > 1 else ""


def _build(args: argparse.Namespace) -> int:
    from edgetl.fileio import output_errors
    from edgetl.pipeline import build
    from edgetl.recipe import load_recipe
    from edgetl.train.distributed import from_env

    signal.signal(signal.SIGTERM, _raise_terminated)  # the default action would kill it with its temporaries in place
    recipe = load_recipe(args.recipe, args.overrides)
    run_dir = (args.output or Path("runs") / recipe.name).resolve()
    if from_env().is_main:  # under torchrun rank 0 logs and writes; the others only warn
        with output_errors(run_dir / "build.log"):
            run_dir.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(run_dir / "build.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(handler)
    else:
        logging.getLogger("edgetl").setLevel(logging.WARNING)
    result = build(recipe, run_dir, resume=args.resume, force=args.force)
    if result is None:  # a rank other than 0: it trained, rank 0 does the rest
        return 0
    report = result.report
    selected = report.selected_variant()
    print(
        f"{recipe.name}: selected {selected.name} ({selected.runtime} {selected.precision}): "
        f"accuracy {selected.accuracy:.4f}, agreement {selected.agreement:.4f}, p50 {selected.latency_ms.p50:.2f} "
        f"ms, {selected.size_mb:.2f} MB; "
        f"bundle {run_dir / (recipe.name + '.tar.gz')} (sha256 {report.selected.bundle_sha256}; "
        f"device: `{report.selected.install}`); "
        f"report {run_dir / 'report.html'}"
    )
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from edgetl.errors import RecipeError

    try:
        from edgetl.sweep.run import Launch, run_sweep
    except ImportError as exc:
        raise RecipeError(
            f"`edgetl sweep` needs Ray Tune and Optuna ({exc}); install `pip install 'edgetl[sweep]'`."
        ) from None
    from edgetl.sweep.spec import load_sweep

    for option in ("trials", "concurrency"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise RecipeError(f"--{option} must be an integer ≥ 1; got {getattr(args, option)}.")
    plan = load_sweep(args.sweep)
    out_dir = args.output or Path("runs") / plan.sweep.name
    summary = run_sweep(plan, Launch(out_dir, args.trials, args.concurrency, args.address))
    best, row = summary.best, summary.best.selected_row()
    print(
        f"{plan.sweep.name}: best {best.name} ({' '.join(best.overrides)}): {best.selected}, accuracy "
        f"{row['accuracy']:.4f}, p50 {row['p50_ms']:.2f} ms, {row['size_mb']:.2f} MB; recipe {out_dir / 'best.yaml'}; "
        f"bundle {out_dir / 'bundle'}; report {summary.html}"
    )
    return 0


def _report(args: argparse.Namespace) -> int:
    from edgetl.report import compare

    files = compare(args.runs, args.output)
    print(f"compared {len(args.runs)} runs: {files.html}")
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
        print(
            f"{name:20s} {spec.source:12s} {pre.input_size}px resize {pre.resize_size} {pre.interpolation:8s} mean "
            f"{pre.mean} std {pre.std}  weights: {spec.weights}"
        )
    print("timm:<name>          any timm model; weights from the timm hub or `model.weights: <file>`")
    return 0


_COMMANDS = {
    "build": _build,
    "sweep": _sweep,
    "report": _report,
    "schema": _schema,
    "backbones": _backbones,
    **DEVICE_COMMANDS,
}
