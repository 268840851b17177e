"""The device-side commands: `edgetl predict`, `edgetl bench`, `edgetl info`, `edgetl serve`.

They import only the runtime (numpy, Pillow, ONNX Runtime or OpenVINO), so they start on a
device where torch is not installed.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgetl.errors import DataError
from edgetl.runtime.bench import interleaved_latency
from edgetl.runtime.metrics import VariantMetrics
from edgetl.runtime.predictor import Predictor
from edgetl.runtime.preprocess import DEFAULT_MAX_PIXELS, ImageDecodeError
from edgetl.runtime.walk import candidate_files


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register the device commands on the `edgetl` parser."""
    predict = commands.add_parser("predict", help="classify images with a bundle (torch-free)")
    _bundle_arguments(predict)
    predict.add_argument(
        "paths", type=Path, nargs="+", metavar="PATH", help="image files or folders (walked recursively)"
    )
    predict.add_argument("--top-k", type=positive_int, default=1, help="labels per image (default 1)")
    predict.add_argument("--json", action="store_true", help="one JSON document on stdout")

    bench = commands.add_parser("bench", help="latency and throughput of a bundle on this device")
    _bundle_arguments(bench)
    bench.add_argument(
        "--image", type=Path, help="an image for the end-to-end timing (default: a generated 640×480 JPEG)"
    )
    bench.add_argument("--runs", type=positive_int, default=100, help="timed runs per measurement")
    bench.add_argument("--batch", type=positive_int, default=16, help="batch size for the throughput measurement")
    bench.add_argument("--json", action="store_true")

    info = commands.add_parser("info", help="a bundle's labels, preprocessing, metrics, hashes and digest")
    info.add_argument("bundle", type=Path)
    info.add_argument("--json", action="store_true", help="print edgetl.json as is")
    _pin_argument(info)

    serve = commands.add_parser("serve", help="an HTTP JSON API for a bundle")
    _bundle_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    serve.add_argument("--port", type=port_number, default=8080, help="0 picks a free port (default 8080)")
    serve.add_argument("--max-body-mb", type=positive_number, default=10.0, help="larger requests get 413")
    serve.add_argument("--concurrency", type=positive_int, default=4, help="requests predicted at once; more wait")
    serve.add_argument(
        "--read-timeout",
        type=positive_number,
        default=10.0,
        metavar="SECONDS",
        help="seconds a client has to send its headers, and then its body, before it is cut off",
    )


def _bundle_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="a bundle folder or its .tar.gz")
    parser.add_argument("--runtime", default="auto", choices=["auto", "onnxruntime", "openvino"])
    parser.add_argument("--threads", type=positive_int, help="inference threads (default: all cores)")
    parser.add_argument(
        "--max-pixels",
        type=positive_int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse larger images from their header, before decoding (default {DEFAULT_MAX_PIXELS})",
    )
    _pin_argument(parser)


def _pin_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--expect-sha256", metavar="DIGEST", help="refuse any bundle but this one (its digest: sha256 of edgetl.json)"
    )


def _load(args: argparse.Namespace, threads: int | None = None) -> Predictor:
    """The bundle's predictor; `--threads` when given, else `threads` (None: all cores)."""
    return Predictor.load(
        args.bundle,
        args.runtime,
        args.threads or threads,
        expected_sha256=args.expect_sha256,
        max_pixels=args.max_pixels,
    )


def _shown(result: dict) -> list[str]:
    """One image's answer as `predict` prints it: top-k (a multi-label bundle: its label set) with scores; a
    multi-task bundle's: each task's, prefixed by the task's name."""
    if "tasks" in result:
        return [f"{name}: {shown}" for name, answer in result["tasks"].items() for shown in _shown(answer)]
    return [f"{t['label']} {t['score']:.4f}" for t in result.get("top_k", result.get("labels"))]


def predict(args: argparse.Namespace) -> int:
    files = _image_files(args.paths)  # before loading the model: a wrong path fails at once
    # Many files: a thread decodes beside the model, which then runs fastest on one core fewer
    # (2-core AMD EPYC: 411 against 302 images/s on all cores; benchmarks/runtime.py).
    predictor = _load(args, threads=max(1, (os.cpu_count() or 1) - 1) if len(files) > 1 else None)
    results, errors = [], []
    for path, outcome in zip(files, predictor.stream(files, args.top_k)):  # decodes ahead while the model runs
        if isinstance(outcome, ImageDecodeError):
            errors.append({"path": str(path), "error": str(outcome)})
            print(f"edgetl: skipped {outcome}", file=sys.stderr)
            continue
        results.append({"path": str(path), **outcome.to_dict()})
        if not args.json:
            print("\t".join([str(path), *_shown(results[-1])]))
    if args.json:
        print(
            json.dumps(
                {
                    "bundle": str(args.bundle),
                    "runtime": predictor.engine.runtime,
                    "predictions": results,
                    "errors": errors,
                },
                indent=2,
            )
        )
    return 2 if errors else 0


def _image_files(paths: list[Path]) -> list[Path]:
    """The files to classify: each file as given, each folder walked (symbolic links followed).
    Broken links and non-regular entries stay in the list: decoding reports each as skipped."""
    files = []
    for path in paths:
        if path.is_dir():
            found = candidate_files(path)
            if not found:
                raise DataError(f"folder {path} has no files to classify; pass a folder with images in it.")
            files.extend(found)
        elif path.exists() or path.is_symlink():
            files.append(path)
        else:
            raise DataError(f"{path} does not exist; pass image files or folders.")
    return files


def bench(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    predictor = _load(args)
    source = args.image or _generated_jpeg()
    predictor.predict(source)  # the cold start's first prediction; a bad --image fails here, naming the file
    image = args.image.read_bytes() if args.image else source
    cold_start = time.perf_counter() - started
    size = predictor.bundle.preprocessing.input_size
    one = predictor.crop(image)[None]
    many = np.repeat(one, args.batch, axis=0)
    x_one = np.zeros((1, 3, size, size), np.float32)
    timings = interleaved_latency(
        {"model": lambda: predictor.engine.run(x_one), "end_to_end": lambda: predictor.predict(image)},
        rounds=max(1, args.runs // 10),
        runs_per_round=10,
        warmup=5,
    )
    batched = interleaved_latency({"batch": lambda: predictor.classify(many)}, rounds=3, runs_per_round=3, warmup=1)[
        "batch"
    ]
    result = {
        "bundle": str(args.bundle),
        "runtime": predictor.engine.runtime,
        "input_size": size,
        "cold_start_seconds": round(cold_start, 4),
        "latency_ms": {name: {k: round(v, 3) for k, v in t.items()} for name, t in timings.items()},
        "throughput_ips": round(args.batch / (batched["p50"] / 1000.0), 1),
        "throughput_batch": args.batch,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, t in result["latency_ms"].items():
            print(f"{name:11s} p50 {t['p50']:.2f} ms  p90 {t['p90']:.2f} ms  p99 {t['p99']:.2f} ms")
        print(
            f"throughput  {result['throughput_ips']:.1f} images/s at batch {args.batch}; cold start {cold_start:.3f} s"
        )
    return 0


def _generated_jpeg() -> bytes:
    """A 640×480 photo-like JPEG (smooth gradients plus noise), made here so bench needs no file."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:480, 0:640]
    pixels = np.stack([x * 255 / 640, y * 255 / 480, (x + y) * 255 / 1120], axis=-1) + rng.normal(0, 20, (480, 640, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def info(args: argparse.Namespace) -> int:
    from edgetl.runtime.bundle import open_bundle

    opened = open_bundle(args.bundle, expected_sha256=args.expect_sha256)
    manifest = opened.manifest
    if args.json:
        print(json.dumps(manifest, indent=2))
        return 0
    metrics = VariantMetrics.from_dict(manifest["metrics"]) if "metrics" in manifest else None  # checked by the schema
    pre = opened.preprocessing
    print(
        f"{manifest['name']}: {manifest['model']} ({manifest.get('variant')}, {manifest.get('precision')} for "
        f"{manifest['runtime']}), built {manifest.get('created')}"
    )
    print(f"labels ({len(opened.labels)}): {', '.join(opened.labels)}")
    if "task" in manifest:  # multi-label: `accuracy` below is the test mAP, `agreement` that of label sets
        cuts = ", ".join(f"{label} {t:g}" for label, t in zip(opened.labels, manifest["task"]["thresholds"]))
        print(f"multi-label, thresholds on each label's sigmoid: {cuts}")
    for task in manifest.get("tasks", []):  # multi-task: one model output per task
        print(f"task {task['name']} ({task['kind']}): output `{task['name']}`, labels {', '.join(task['labels'])}")
    print(
        f"preprocessing: decode {pre.decode}, resize {pre.resize_size} {pre.interpolation}, center crop "
        f"{pre.input_size}, mean "
        f"{list(pre.mean)}, std {list(pre.std)}"
    )
    if metrics is not None:
        print(
            f"measured at build: accuracy {metrics.accuracy:.4f}, agreement {metrics.agreement:.4f}, "
            f"p50 {metrics.latency_ms.p50:.2f} ms, {metrics.size_mb:.2f} MB"
        )
    if manifest.get("versions"):
        print(
            "built with: "
            + ", ".join(f"{package} {version}" for package, version in manifest["versions"].items() if version)
        )
    for name, digest in manifest["files"].items():
        print(f"sha256 {digest}  {name}")
    print(f"digest {opened.digest}  (sha256 of edgetl.json, which lists every file's; pin it with --expect-sha256)")
    return 0


def serve(args: argparse.Namespace) -> int:
    from edgetl.runtime.listen import sigterm_exits_cleanly
    from edgetl.runtime.server import run_server

    # From the start: a .tar.gz is unpacked into a temp folder that only a normal exit removes.
    with sigterm_exits_cleanly():
        predictor = _load(args)
        run_server(
            predictor,
            args.host,
            args.port,
            max_body_bytes=int(args.max_body_mb * 1024 * 1024),
            concurrency=args.concurrency,
            read_timeout=args.read_timeout,
        )
    return 0


def _checked(kind: type, rule: str, ok: Callable[[float], bool]) -> Callable[[str], float]:
    """An argparse `type`: parse with `kind`, refuse a value that is not finite or not `ok` with
    argparse's one-line error (exit 2) that states `rule` and the value given."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not math.isfinite(value) or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {rule}; got {text!r}")
        return value

    return parse


port_number = _checked(int, "a port number from 0 to 65535 (0 picks a free one)", lambda v: 0 <= v <= 65535)
positive_int = _checked(int, "an integer ≥ 1", lambda v: v >= 1)
positive_number = _checked(float, "a number > 0", lambda v: v > 0)


COMMANDS = {"predict": predict, "bench": bench, "info": info, "serve": serve}
