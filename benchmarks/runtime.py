"""The device runtime on this machine against the pipelines users write by hand: end to end per
photo, the parts of `predict`, folder and server throughput, cold start and memory.

Usage: python benchmarks/runtime.py BUNDLE [--rounds 10] [--runs 30] [--against DIR] [--output FILE]

Photos are made from a real one (sklearn's china.jpg): a 500×375 JPEG and PNG, a 4032×3024
JPEG (upscaled with LANCZOS to a phone photo's size) and the same as a raw RGB array. Each
pipeline runs in its own process, so no thread pool spins into another's timing, and the
processes take turns round by round (one times `--runs` calls while the others wait): medians
of interleaved rounds, and p10s (the calls other work on a shared machine did not slow down);
`ratios` compares pipelines round by round. Pipelines, per photo:
- bare: `session.run` on a ready tensor (the bundle's engine);
- edgetl: `Predictor.predict(bytes)` with the bundle's contract, and with `decode` switched;
- by_hand: Pillow decode, full resize (bicubic) to the resize size, center crop, numpy
  normalize, a default ONNX Runtime session (the ten lines a user writes);
- openvino_ppp*: Pillow decode and the crop's source square handed as uint8 NHWC to OpenVINO,
  with resize and normalization embedded by its PrePostProcessor (three resize algorithms; the
  report says how many 8-bit levels each one's input differs from the contract's).
Results: benchmarks/results/runtime.json, with the CPU model.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
PHOTOS = ("jpeg_500", "png_500", "jpeg_4032", "array_4032")
OPENVINO_RESIZE = {
    "openvino_ppp_pillow_bicubic": "RESIZE_BICUBIC_PILLOW",
    "openvino_ppp_cubic": "RESIZE_CUBIC",
    "openvino_ppp_linear": "RESIZE_LINEAR",
}

# One pipeline in one process: times `n` calls for each line `n` read from stdin.
WORKER = """
import importlib.util, json, sys, time
spec = importlib.util.spec_from_file_location("runtime_bench", sys.argv[1])
bench = importlib.util.module_from_spec(spec); spec.loader.exec_module(bench)
call = bench.pipeline(sys.argv[2], sys.argv[3], sys.argv[4])
for _ in range(20):
    call()
print("ready", flush=True)
for line in sys.stdin:
    times = []
    for _ in range(int(line)):
        started = time.perf_counter(); call(); times.append((time.perf_counter() - started) * 1000)
    print(json.dumps(times), flush=True)
"""

# Runs in a fresh process: the device's view of a cold start, without torch.
FRESH_PROCESS = """
import json, sys, time
for name in ("torch", "torchvision", "timm", "nncf"):
    sys.modules[name] = None
started = time.perf_counter()
from edgetl.runtime.predictor import Predictor
from edgetl.runtime.bench import peak_rss_kb
imported = time.perf_counter()
predictor = Predictor.load(sys.argv[1])
image = open(sys.argv[2], "rb").read()
predictor.predict(image)
first = time.perf_counter()
for _ in range(50):
    predictor.predict(image)
figures = {"import_seconds": imported - started, "cold_start_seconds": first - imported}
print(json.dumps(figures | {"peak_rss_mb": peak_rss_kb() / 1024}))
"""


def make_photos(folder: Path) -> dict[str, Path]:
    """The photos as files in `folder` (arrays as .npy)."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    china = Image.fromarray(load_sample_images().images[0])
    small, camera = (
        china.resize((500, 375), Image.Resampling.LANCZOS),
        china.resize((4032, 3024), Image.Resampling.LANCZOS),
    )
    files = {name: folder / f"{name}.{kind}" for name, kind in zip(PHOTOS, ("jpg", "png", "jpg", "npy"))}
    small.save(files["jpeg_500"], "JPEG", quality=90)
    small.save(files["png_500"], "PNG")
    camera.save(files["jpeg_4032"], "JPEG", quality=90)
    np.save(files["array_4032"], np.asarray(camera))
    return files


def pipeline(name: str, photo: str, bundle: str):
    """The call that runs pipeline `name` once on `photo` (a file from `make_photos`)."""
    from edgetl.runtime.predictor import Predictor
    from edgetl.runtime.preprocess import normalize, preprocess_uint8

    image = np.load(photo) if photo.endswith(".npy") else Path(photo).read_bytes()
    predictor = Predictor.load(bundle)
    pre = predictor.bundle.preprocessing
    if name == "bare":
        tensor = normalize(preprocess_uint8(image, pre)[None], pre)
        return lambda: predictor.engine.run(tensor)
    if name == "edgetl":  # also what `side_by_side` runs from another checkout, which may predate `decode`
        return lambda: predictor.predict(image)
    if name.startswith("edgetl_"):
        decode = name.partition("_")[2]
        switched = Predictor(replace(predictor.bundle, preprocessing=replace(pre, decode=decode)), predictor.engine)
        return lambda: switched.predict(image)
    model = predictor.bundle.where(predictor.bundle.manifest["model"])
    if name == "by_hand":
        import onnxruntime as ort

        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])  # as a user opens one
        return lambda: session.run(None, {session.get_inputs()[0].name: by_hand_tensor(image, pre)})
    if name.startswith("openvino_ppp"):
        request = openvino_ppp(model, pre, OPENVINO_RESIZE[name]).create_infer_request()
        return lambda: request.infer({0: source_square(image, pre)[None]})
    if name == "decode_pillow":
        return lambda: pillow_rgb(image).load()
    raise KeyError(name)


def pillow_rgb(image):
    from PIL import Image

    return Image.fromarray(image) if isinstance(image, np.ndarray) else Image.open(io.BytesIO(image)).convert("RGB")


def by_hand_tensor(image, pre) -> np.ndarray:
    """What a user writes: decode, resize the whole image, crop, normalize with numpy: (1, 3, S, S)."""
    from PIL import Image

    rgb = pillow_rgb(image)
    (width, height), size = rgb.size, pre.input_size
    long = int(pre.resize_size * max(width, height) / min(width, height))
    new_size = (pre.resize_size, long) if width <= height else (long, pre.resize_size)
    left, top = round((new_size[0] - size) / 2), round((new_size[1] - size) / 2)
    crop = rgb.resize(new_size, Image.Resampling.BICUBIC).crop((left, top, left + size, top + size))
    pixels = (np.asarray(crop, np.float32) / 255 - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return pixels.transpose(2, 0, 1)[None]


def source_square(image, pre) -> np.ndarray:
    """The center square of the decoded image that the contract's crop shows, uint8 (H, W, 3)."""
    pixels = np.asarray(pillow_rgb(image))
    height, width = pixels.shape[:2]
    side = min(width, height) * pre.input_size / pre.resize_size
    left, top = round((width - side) / 2), round((height - side) / 2)
    return pixels[top : top + round(side), left : left + round(side)]


def openvino_ppp(model, pre, algorithm: str):
    """The model compiled by OpenVINO with uint8 NHWC input of any size, resized and normalized inside."""
    import openvino as ov
    from openvino.preprocess import PrePostProcessor, ResizeAlgorithm

    core = ov.Core()
    ppp = PrePostProcessor(model if isinstance(model, ov.Model) else core.read_model(str(model)))
    ppp.input().tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")).set_spatial_dynamic_shape()
    ppp.input().model().set_layout(ov.Layout("NCHW"))
    ppp.input().preprocess().convert_element_type(ov.Type.f32).resize(getattr(ResizeAlgorithm, algorithm)).mean(
        [255 * m for m in pre.mean]
    ).scale([255 * s for s in pre.std])
    return core.compile_model(
        ppp.build(), "CPU", {"INFERENCE_NUM_THREADS": os.cpu_count(), "PERFORMANCE_HINT": "LATENCY"}
    )


def input_levels(photos: dict[str, Path], pre) -> dict[str, dict[str, float]]:
    """8-bit levels (max, mean) by which each hand-written pipeline's model input differs from edgetl's,
    on the 500 px JPEG. OpenVINO resizes in float, unclamped, from a square cropped to whole pixels."""
    import openvino as ov

    from edgetl.runtime.preprocess import normalize, preprocess_uint8

    image = photos["jpeg_500"].read_bytes()
    ours = normalize(preprocess_uint8(image, pre)[None], pre)
    step = 1 / (255 * np.asarray(pre.std, np.float32).reshape(1, 3, 1, 1))
    tensor = ov.opset13.parameter([1, 3, pre.input_size, pre.input_size], ov.Type.f32)
    identity = ov.Model([ov.opset13.multiply(tensor, np.float32(1.0))], [tensor], "identity")  # shows the PPP's output
    levels = {"by_hand": by_hand_tensor(image, pre)}
    for name, algorithm in OPENVINO_RESIZE.items():
        compiled = openvino_ppp(identity.clone(), pre, algorithm)  # the PrePostProcessor changes the model it is given
        levels[name] = compiled.create_infer_request().infer({0: source_square(image, pre)[None]})[0]
    differences = {name: np.abs(x - ours) / step for name, x in levels.items()}
    return {
        name: {"max": round(float(d.max()), 1), "mean": round(float(d.mean()), 2)} for name, d in differences.items()
    }


def isolated(
    bundle: Path,
    photo: Path,
    names: list[str],
    rounds: int,
    runs: int,
    sources: dict[str, Path] | None = None,
) -> dict[str, dict[str, float]]:
    """p10, p50 and p90 ms of each pipeline, each in its own process, taking turns round by round.
    `sources` runs the pipeline before a name's `@` with edgetl imported from another checkout."""
    sources = sources or {}
    workers = {
        name: subprocess.Popen(
            [sys.executable, "-c", WORKER, __file__, name.partition("@")[0], str(photo), str(bundle)],
            env={**os.environ, "PYTHONPATH": str(sources[name])} if name in sources else None,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name in names
    }
    rounds_ms: dict[str, list[list[float]]] = {name: [] for name in names}
    try:
        for name, worker in workers.items():
            if worker.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the {name} pipeline did not start on {photo.name}")
        for _ in range(rounds):
            for name, worker in workers.items():
                worker.stdin.write(f"{runs}\n")
                worker.stdin.flush()
                rounds_ms[name].append(json.loads(worker.stdout.readline()))
    finally:
        for worker in workers.values():
            worker.stdin.close()
            worker.wait()
    return {
        name: {
            "p10": round(float(np.percentile(r, 10)), 3),
            "p50": round(float(np.median(r)), 3),
            "p90": round(float(np.percentile(r, 90)), 3),
            "round_p50": [round(float(np.median(one)), 3) for one in r],
        }
        for name, r in rounds_ms.items()
    }


def ratio(latency: dict, name: str, other: str) -> dict[str, float]:
    """`name`'s time over `other`'s: the median over rounds of the two p50s in the same round (a slow spell
    hits both alike), and the ratio of their p10s (the calls no other process slowed down)."""
    rounds = np.divide(latency[name]["round_p50"], latency[other]["round_p50"])
    return {
        "rounds_p50": round(float(np.median(rounds)), 3),
        "p10": round(latency[name]["p10"] / latency[other]["p10"], 3),
    }


def parts(photo: Path, bundle: Path, rounds: int) -> dict[str, float]:
    """p50 ms of each part of `predict` on the 500 px JPEG, and of the alternatives measured for it."""
    from PIL import Image

    from edgetl.runtime.bench import interleaved_latency
    from edgetl.runtime.predictor import Predictor
    from edgetl.runtime.preprocess import crop_uint8, load_rgb, normalize

    predictor = Predictor.load(bundle)
    pre = predictor.bundle.preprocessing
    image = photo.read_bytes()
    decoded = load_rgb(image)
    crop = crop_uint8(decoded, pre)
    tensor = normalize(crop[None], pre)
    logits = predictor.engine.run(tensor)
    width, height = decoded.size
    long = int(pre.resize_size * max(width, height) / min(width, height))
    new_size, size = ((long, pre.resize_size) if width >= height else (pre.resize_size, long)), pre.input_size
    left, top = round((new_size[0] - size) / 2), round((new_size[1] - size) / 2)
    box = (
        left * width / new_size[0],
        top * height / new_size[1],
        (left + size) * width / new_size[0],
        (top + size) * height / new_size[1],
    )
    bicubic = Image.Resampling.BICUBIC
    timings = interleaved_latency(
        {
            "decode": lambda: load_rgb(image),
            "resize_crop": lambda: crop_uint8(decoded, pre),
            "resize_crop_2_threads": lambda: crop_uint8(decoded, pre, threads=2),
            "normalize": lambda: normalize(crop[None], pre),
            "model": lambda: predictor.engine.run(tensor),
            "postprocess": lambda: predictor.predictions(logits, 5),
            "alternative_pillow_full_resize_then_crop": lambda: (
                decoded.resize(new_size, bicubic).crop((left, top, left + size, top + size)).load()
            ),
            "alternative_pillow_one_call_box_resize": lambda: decoded.resize((size, size), bicubic, box=box).load(),
        },
        rounds=rounds,
        runs_per_round=10,
        warmup=10,
    )
    return {name: round(t["p50"], 3) for name, t in timings.items()}


def folder_throughput(bundle: Path, photo: Path, count: int = 64, rounds: int = 5) -> dict[str, float]:
    """Images/s over a folder of `count` copies of a photo: the bare model at batch 1, `Predictor.stream`
    as `edgetl predict` runs it (model on one core fewer), and one image after another on all cores."""
    import tempfile

    from edgetl.runtime.predictor import Predictor

    cores = os.cpu_count() or 1
    every, fewer = Predictor.load(bundle), Predictor.load(bundle, threads=max(1, cores - 1))
    size = every.bundle.preprocessing.input_size
    tensor = np.zeros((1, 3, size, size), np.float32)
    with tempfile.TemporaryDirectory() as folder:
        files = [Path(folder, f"{i:03d}.jpg") for i in range(count)]
        for file in files:
            file.write_bytes(photo.read_bytes())
        calls = {
            "bare_model_batch1": lambda: [every.engine.run(tensor) for _ in files],
            "edgetl_predict_folder": lambda: list(fewer.stream(files)),
            "one_by_one_all_cores": lambda: [every.predict(file) for file in files],
        }
        speeds: dict[str, list[float]] = {name: [] for name in calls}
        for call in calls.values():
            call()
        for _ in range(rounds):
            for name, call in calls.items():
                started = time.perf_counter()
                call()
                speeds[name].append(count / (time.perf_counter() - started))
    result = {name: round(float(np.median(v)), 1) for name, v in speeds.items()}
    return {**result, "folder_vs_bare_model": round(result["edgetl_predict_folder"] / result["bare_model_batch1"], 3)}


def server_throughput(bundle: Path, photo: Path, clients: int = 8, requests: int = 40) -> dict[str, float]:
    """`edgetl serve` on a loopback port under `clients` concurrent clients, each posting the
    photo `requests` times over a keep-alive connection (the clients share this machine's CPU)."""
    server = subprocess.Popen(
        [sys.executable, "-m", "edgetl", "serve", str(bundle), "--port", "0"], stderr=subprocess.PIPE, text=True
    )
    try:
        line = server.stderr.readline()
        port = int(line.split("http://")[1].split()[0].rsplit(":", 1)[1])
        _wait_until_healthy(port)
        body, latencies, lock = photo.read_bytes(), [], threading.Lock()

        def client(count: int) -> None:
            connection, mine = http.client.HTTPConnection("127.0.0.1", port, timeout=60), []
            for _ in range(count):
                started = time.perf_counter()
                connection.request("POST", "/predict", body, {"Content-Type": "image/jpeg"})
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"server answered {response.status}")
                mine.append((time.perf_counter() - started) * 1000)
            with lock:
                latencies.extend(mine)

        def load(count: int) -> float:
            threads = [threading.Thread(target=client, args=(count,)) for _ in range(clients)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            return clients * count / (time.perf_counter() - started)

        load(5)  # warm
        latencies.clear()
        images_per_second = load(requests)
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {
        "clients": clients,
        "requests": clients * requests,
        "images_per_second": round(images_per_second, 1),
        "p50_ms": round(float(np.percentile(latencies, 50)), 2),
        "p99_ms": round(float(np.percentile(latencies, 99)), 2),
    }


def _wait_until_healthy(port: int, seconds: float = 60.0) -> None:
    """Return once GET /health answers 200 (uvicorn listens a moment after edgetl prints its line)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def side_by_side(bundle: Path, photo: Path, against: Path, rounds: int, runs: int) -> dict:
    """`Predictor.predict(bytes)` from this checkout and from `against`, each in its own process, taking turns."""
    names = ["edgetl@this", "edgetl@against"]
    latency = isolated(bundle, photo, names, rounds, runs, {"edgetl@this": ROOT.parent, "edgetl@against": against})
    return {"against": str(against), **latency, "this_over_against": ratio(latency, *names)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--rounds", type=int, default=10, help="turns each pipeline takes")
    parser.add_argument("--runs", type=int, default=30, help="timed calls per turn")
    parser.add_argument("--against", type=Path, help="another edgetl checkout to time end to end side by side")
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "runtime.json")
    args = parser.parse_args()

    import tempfile

    from edgetl.runtime.bundle import open_bundle

    pre = open_bundle(args.bundle).preprocessing
    other = "reduced" if pre.decode == "full" else "full"
    ordinary = ["bare", "edgetl", "by_hand", *OPENVINO_RESIZE, "decode_pillow"]
    with tempfile.TemporaryDirectory() as folder:
        photos = make_photos(Path(folder))
        latency = {}
        for name in PHOTOS:
            names = (
                ordinary
                if name == "jpeg_500"
                else ["bare", "edgetl", f"edgetl_{other}", "by_hand", "openvino_ppp_cubic", "decode_pillow"]
            )
            rounds = args.rounds if name.endswith("500") else max(2, args.rounds // 3)
            runs = args.runs if name.endswith("500") else max(3, args.runs // 5)
            latency[name] = isolated(args.bundle, photos[name], names, rounds, runs)
            print(name, {k: v["p50"] for k, v in latency[name].items()}, file=sys.stderr, flush=True)
        small, camera = latency["jpeg_500"], latency["jpeg_4032"]
        ratios = {
            "jpeg_500_edgetl_over_by_hand": ratio(small, "edgetl", "by_hand"),
            **{f"jpeg_500_edgetl_over_{name}": ratio(small, "edgetl", name) for name in OPENVINO_RESIZE},
        }
        mode = {pre.decode: "edgetl", other: f"edgetl_{other}"}
        ratios["jpeg_4032_reduced_over_full"] = ratio(camera, mode["reduced"], mode["full"])
        result = {
            "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version()},
            "bundle": {
                **{k: open_bundle(args.bundle).manifest.get(k) for k in ("variant", "runtime", "precision")},
                "preprocessing": pre.to_dict(),
            },
            "photo_bytes": {name: file.stat().st_size for name, file in photos.items()},
            "latency_ms": latency,
            "ratios": ratios,
            "model_input_max_levels_from_edgetl": input_levels(photos, pre),
            "parts_ms_jpeg_500": parts(photos["jpeg_500"], args.bundle, args.rounds * 2),
            "folder_images_per_second": folder_throughput(args.bundle, photos["jpeg_500"]),
            "server_8_clients": server_throughput(args.bundle, photos["jpeg_500"]),
        }
        fresh = [
            json.loads(
                subprocess.run(
                    [sys.executable, "-c", FRESH_PROCESS, str(args.bundle), str(photos["jpeg_500"])],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
            )
            for _ in range(3)
        ]
        result["cold_start_seconds_median"] = round(sorted(r["cold_start_seconds"] for r in fresh)[1], 3)
        result["peak_rss_mb_max"] = round(max(r["peak_rss_mb"] for r in fresh), 1)
        if args.against:
            result["side_by_side_end_to_end"] = side_by_side(
                args.bundle, photos["jpeg_500"], args.against.resolve(), args.rounds, args.runs
            )
    print(json.dumps(result, indent=2))
    args.output.parent.mkdir(exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
