"""Bundles a device can trust: a manifest that cannot lie, archives unpacked only as listed, a pinned digest,
a model file a runtime cannot load, and a model whose outputs are not finite (issue 16, items 1-4, 8)."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from edgetl.cli import main
from edgetl.errors import BundleError, InferenceError
from edgetl.runtime import bundle as bundle_module
from edgetl.runtime.bundle import open_bundle
from edgetl.runtime.metrics import Latency, VariantMetrics
from edgetl.runtime.predictor import Predictor
from tests.tiny_bundle import LABELS, PREPROCESSING, write_manifest, write_tiny_bundle

BLUE = np.full((8, 8, 3), (0, 0, 250), np.uint8)


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return write_tiny_bundle(tmp_path / "bundle")


@pytest.fixture
def red_image(tmp_path: Path) -> Path:
    Image.new("RGB", (40, 30), (230, 10, 10)).save(tmp_path / "red.png")
    return tmp_path / "red.png"


def edgetl(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """The CLI in this process: (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def edit_manifest(folder: Path, change) -> None:
    """Apply `change` to edgetl.json and write it back (the sha256 and size of every other file stay as they are)."""
    manifest = json.loads((folder / "edgetl.json").read_text())
    change(manifest)
    (folder / "edgetl.json").write_text(json.dumps(manifest, indent=2))


def rehash(folder: Path) -> None:
    """Record the files as they are now in edgetl.json, as an attacker who edits the manifest too would."""
    write_manifest(folder, json.loads((folder / "edgetl.json").read_text()))


def digest(folder: Path) -> str:
    return hashlib.sha256((folder / "edgetl.json").read_bytes()).hexdigest()


def pack(folder: Path, archive: Path, arcname=lambda name: f"tiny/{name}") -> Path:
    """`folder`'s files into `archive`, as `edgetl build` packs them unless told otherwise."""
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=arcname(path.name))
    return archive


# --- 1. the manifest cannot lie: the model file carries its own labels, contract and shapes -------------------


def swap_labels(m: dict) -> None:
    m["labels"][0], m["labels"][2] = m["labels"][2], m["labels"][0]


@pytest.mark.parametrize(
    ("change", "field", "ours", "theirs"),
    [
        (swap_labels, "labels[0]", "'blue'", "'red'"),
        (lambda m: m["labels"].__setitem__(1, "lime"), "labels[1]", "'lime'", "'green'"),
        (lambda m: m["preprocessing"].__setitem__("mean", [0.6, 0.5, 0.5]), "preprocessing.mean[0]", "0.6", "0.5"),
        (lambda m: m["preprocessing"].__setitem__("resize_size", 40), "preprocessing.resize_size", "40", "36"),
        (
            lambda m: m["preprocessing"].__setitem__("interpolation", "bicubic"),
            "preprocessing.interpolation",
            "'bicubic'",
            "'bilinear'",
        ),
    ],
    ids=["swapped-labels", "renamed-label", "mean", "resize-size", "interpolation"],
)
def test_a_manifest_that_disagrees_with_its_model_file_is_refused(
    bundle: Path, red_image: Path, capsys: pytest.CaptureFixture, change, field: str, ours: str, theirs: str
) -> None:
    edit_manifest(bundle, change)
    code, out, err = edgetl(capsys, "predict", bundle, red_image)
    assert code == 2 and out == "" and "Traceback" not in err
    assert f"`{field}` is {ours} in the edgetl.json of {bundle}, but {theirs} in {bundle / 'model.onnx'}" in err


def test_label_count_and_input_size_are_checked_against_the_model_shapes(bundle: Path) -> None:
    edit_manifest(bundle, lambda m: m.__setitem__("labels", LABELS[:2]))
    with pytest.raises(BundleError, match=r"outputs 3 scores per image, but its edgetl\.json has 2 `labels`"):
        Predictor.load(bundle)
    edit_manifest(bundle, lambda m: (m.__setitem__("labels", LABELS), m["preprocessing"].__setitem__("input_size", 16)))
    with pytest.raises(BundleError, match=r"inputs of shape \(N, 3, 32, 32\), but .* `preprocessing.input_size` 16"):
        Predictor.load(bundle)


def test_a_model_file_without_edgetl_metadata_is_refused(bundle: Path) -> None:
    model = onnx.load(str(bundle / "model.onnx"))
    del model.metadata_props[:]
    onnx.save(model, str(bundle / "model.onnx"))
    rehash(bundle)
    with pytest.raises(BundleError, match=r"model\.onnx carries no 'edgetl\.labels' metadata"):
        Predictor.load(bundle)


# --- 2. the manifest's schema: each violation names its field, exit 2, never a traceback ---------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda m: m.__setitem__("files", list(m["files"])), "files"),
        (lambda m: m["files"].__setitem__("README.md", "abc"), "files"),
        (lambda m: m["files"].__setitem__("../model.onnx", "0" * 64), "files"),
        (lambda m: m["sizes"].pop("README.md"), "sizes"),
        (lambda m: m.__setitem__("labels", ["red", "red", "blue"]), "labels"),
        (lambda m: m.__setitem__("labels", "red,green,blue"), "labels"),
        (lambda m: m.pop("labels"), "labels"),
        (lambda m: m["preprocessing"].__setitem__("input_size", 0), "preprocessing.input_size"),
        (lambda m: m["preprocessing"].__setitem__("resize_size", 31), "preprocessing.resize_size"),
        (lambda m: m["preprocessing"].__setitem__("std", [0.5, 0, 0.5]), "preprocessing.std"),
        (lambda m: m["preprocessing"].__setitem__("mean", [float("nan")] * 3), "preprocessing.mean"),
        (lambda m: m["preprocessing"].__setitem__("interpolation", "lanczos"), "preprocessing.interpolation"),
        (lambda m: m.__setitem__("model", "README.md"), "model"),
        (lambda m: m.__setitem__("runtime", "tensorrt"), "runtime"),
        (lambda m: m.__setitem__("schema_version", "1"), "schema_version"),
        (lambda m: m.__setitem__("metrics", {"accuracy": "high"}), "metrics"),
        (lambda m: m.__setitem__("versions", ["pillow"]), "versions"),
    ],
    ids=[
        "files-list",
        "files-digest",
        "files-path",
        "sizes-keys",
        "labels-duplicate",
        "labels-string",
        "labels-missing",
        "input-size-0",
        "resize-below-input",
        "std-zero",
        "mean-nan",
        "interpolation",
        "model-readme",
        "runtime",
        "schema-version-string",
        "metrics",
        "versions",
    ],
)
def test_each_schema_violation_names_its_field(
    bundle: Path, red_image: Path, capsys: pytest.CaptureFixture, change, field: str
) -> None:
    edit_manifest(bundle, change)
    for command in (["info", bundle], ["predict", bundle, red_image]):
        code, out, err = edgetl(capsys, *command)
        assert code == 2 and out == "" and "Traceback" not in err, err
        assert f"{bundle / 'edgetl.json'}" in err and f"`{field}`" in err


def test_a_manifest_that_is_not_an_object_or_too_big_is_refused(bundle: Path) -> None:
    (bundle / "edgetl.json").write_text("[1, 2, 3]")
    with pytest.raises(BundleError, match="must hold a JSON object; got list"):
        open_bundle(bundle)
    (bundle / "edgetl.json").write_text(" " * (1 << 20) + "{}")
    with pytest.raises(BundleError, match=r"edgetl\.json is 1048578 bytes; an edgetl\.json is at most 1048576"):
        open_bundle(bundle)


# --- 3. a model file the runtime cannot parse, with a matching hash: exit 4 naming the file and the reason -----


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_an_unparsable_model_with_a_matching_hash_is_an_inference_error(
    bundle: Path, red_image: Path, capsys: pytest.CaptureFixture, runtime: str
) -> None:
    (bundle / "model.onnx").write_bytes(b"this is not a protobuf" * 10)
    rehash(bundle)
    code, out, err = edgetl(capsys, "predict", bundle, red_image, "--runtime", runtime)
    assert code == 4 and out == "" and "Traceback" not in err
    assert f"{runtime} cannot load {bundle / 'model.onnx'}: " in err
    assert ("Protobuf parsing failed" if runtime == "onnxruntime" else "Unable to read the model") in err


# --- 4. archives: one folder or none; only the listed files, each within its recorded size --------------------


@pytest.mark.parametrize("layout", ["flat", "named-folder", "tar-folder", "tar-dot"])
def test_archive_layouts_a_user_would_pack_are_accepted(bundle: Path, tmp_path: Path, layout: str) -> None:
    archive = tmp_path / "m.tar.gz"
    if layout == "flat":
        pack(bundle, archive, arcname=lambda name: name)
    elif layout == "named-folder":
        pack(bundle, archive)  # what `edgetl build` writes: tiny/<file>
    elif layout == "tar-folder":
        subprocess.run(["tar", "czf", str(archive), "bundle"], cwd=tmp_path, check=True)  # bundle/, bundle/<file>
    else:
        subprocess.run(["tar", "-C", str(bundle), "-czf", str(archive), "."], check=True)  # ./, ./<file>
    assert Predictor.load(archive).predict(BLUE).label == "blue"


@pytest.mark.parametrize("position", ["before-manifest", "last"])
def test_an_unlisted_member_is_refused_without_being_written(bundle: Path, tmp_path: Path, position: str) -> None:
    payload = bytes(1 << 20)
    member = tarfile.TarInfo("tiny/extra.bin")
    member.size = len(payload)
    archive = tmp_path / "m.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        if position == "before-manifest":
            tar.addfile(member, io.BytesIO(payload))
        for path in sorted(bundle.iterdir()):
            tar.add(path, arcname=f"tiny/{path.name}")
        if position == "last":
            tar.addfile(member, io.BytesIO(payload))
    target = tmp_path / "unpacked"
    refused = rf"{archive}: refusing archive member 'tiny/extra\.bin': edgetl\.json does not list it"
    with pytest.raises(BundleError, match=refused):
        open_bundle(archive, target)
    assert not target.exists()


def test_a_member_larger_than_its_recorded_size_is_refused_before_writing(bundle: Path, tmp_path: Path) -> None:
    recorded = (bundle / "model.onnx").stat().st_size
    grown = tmp_path / "grown"
    grown.mkdir()
    for path in bundle.iterdir():
        (grown / path.name).write_bytes(path.read_bytes())
    with (grown / "model.onnx").open("ab") as handle:
        handle.write(bytes(4096))  # the manifest still records the original size (and sha256)
    archive = pack(grown, tmp_path / "m.tar.gz")
    target = tmp_path / "unpacked"
    grown_by = rf"'tiny/model\.onnx': {recorded + 4096} bytes, but edgetl\.json records {recorded}:"
    with pytest.raises(BundleError, match=grown_by):
        open_bundle(archive, target)
    assert not target.exists()


def test_archive_messages_name_the_archive_and_the_expected_layout(bundle: Path, tmp_path: Path) -> None:
    mixed = pack(bundle, tmp_path / "mixed.tar.gz", lambda name: name if name == "edgetl.json" else f"tiny/{name}")
    with pytest.raises(BundleError, match=r"more than one place \(tiny and the top level\).*at its top level or in"):
        open_bundle(mixed, tmp_path / "a")
    nothing = pack(bundle, tmp_path / "nothing.tar.gz", arcname=lambda name: f"tiny/{name}.bak")
    with pytest.raises(BundleError, match=rf"^{nothing} holds no edgetl\.json: a bundle archive holds"):
        open_bundle(nothing, tmp_path / "b")
    (bundle / "README.md").unlink()
    missing = pack(bundle, tmp_path / "missing.tar.gz")
    with pytest.raises(BundleError, match=rf"^README\.md in {missing} is missing from the bundle"):
        open_bundle(missing, tmp_path / "c")


def test_a_bundle_without_recorded_sizes_unpacks_within_a_total_cap(bundle: Path, tmp_path: Path, monkeypatch) -> None:
    manifest = json.loads((bundle / "edgetl.json").read_text())
    del manifest["sizes"]  # as bundles built before sizes were recorded
    (bundle / "edgetl.json").write_text(json.dumps(manifest))
    archive = pack(bundle, tmp_path / "old.tar.gz")
    assert Predictor.load(archive).predict(BLUE).label == "blue"
    monkeypatch.setattr(bundle_module, "UNSIZED_TOTAL_BYTES", 100)
    with pytest.raises(BundleError, match=r"over the 100 allowed to a bundle whose edgetl\.json records no file sizes"):
        open_bundle(archive, tmp_path / "capped")
    assert not (tmp_path / "capped").exists()


# --- 5. one digest pins the whole bundle --------------------------------------------------------------------


def test_a_consistently_tampered_bundle_is_refused_only_by_the_pinned_digest(
    bundle: Path, tmp_path: Path, red_image: Path, capsys: pytest.CaptureFixture
) -> None:
    built = digest(bundle)
    code, out, _ = edgetl(capsys, "info", bundle)
    assert code == 0 and f"digest {built}" in out
    # the attacker's model: same labels and contract inside, channels rotated; every sha256 and size rewritten
    write_tiny_bundle(bundle, weight=np.roll(np.eye(3, dtype=np.float32) * 10.0, 1, axis=1))
    tampered = digest(bundle)
    assert Predictor.load(bundle).predict(red_image).label != "red"  # every other check passes
    for command in ("predict", "info", "serve"):
        args = [command, bundle, *([red_image] if command == "predict" else []), "--expect-sha256", built.upper()]
        code, out, err = edgetl(capsys, *args)
        assert code == 2 and out == "" and f"has sha256 {tampered}, but --expect-sha256 pins {built}" in err, command
    archive = pack(bundle, tmp_path / "m.tar.gz")
    with pytest.raises(BundleError, match=rf"edgetl\.json in {archive} has sha256 {tampered}"):
        open_bundle(archive, tmp_path / "unpacked", expected_sha256=built)
    assert not (tmp_path / "unpacked").exists()
    assert Predictor.load(archive, expected_sha256=tampered).bundle.digest == tampered
    code, out, _ = edgetl(capsys, "predict", bundle, red_image, "--expect-sha256", tampered)
    assert code == 0 and "\tgreen " in out  # red scores as green: what was rotated


def test_a_malformed_pin_is_an_argument_error(bundle: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = edgetl(capsys, "info", bundle, "--expect-sha256", "deadbeef")
    assert code == 2 and "--expect-sha256 must be a bundle's digest: 64 hex digits" in err and "'deadbeef'" in err


def test_the_build_records_sizes_and_returns_the_digest_it_wrote(bundle: Path, tmp_path: Path) -> None:
    from edgetl import bundle as packer
    from edgetl.runtime.preprocess import Preprocessing

    variant = VariantMetrics(
        name="onnx-fp32",
        runtime="onnxruntime",
        precision="fp32",
        accuracy=1.0,
        agreement=1.0,
        latency_ms=Latency(1.0),
        size_mb=0.01,
    )
    pre = Preprocessing.from_dict(PREPROCESSING)
    result = packer.run(variant, bundle / "model.onnx", tuple(LABELS), pre, {"name": "tiny"}, {}, tmp_path / "run")
    assert result.digest == digest(result.folder)
    files = [p for p in result.folder.iterdir() if p.name != "edgetl.json"]
    assert result.manifest["sizes"] == {p.name: p.stat().st_size for p in files} and len(files) == 2
    assert Predictor.load(result.archive, expected_sha256=result.digest).predict(BLUE).label == "blue"


# --- 8. outputs that are not finite are an inference error, never a NaN score -------------------------------


def test_nan_logits_are_an_inference_error_and_never_printed(
    tmp_path: Path, red_image: Path, capsys: pytest.CaptureFixture
) -> None:
    nan_weights = np.full((3, 3), np.nan, np.float32)  # what a diverged training leaves
    nan_bundle = write_tiny_bundle(tmp_path / "nan", weight=nan_weights)
    predictor = Predictor.load(nan_bundle)
    with pytest.raises(InferenceError, match=r"onnxruntime returned 6 non-finite value\(s\) \(NaN or inf\) in 6"):
        predictor.predict_batch([BLUE, BLUE])
    code, out, err = edgetl(capsys, "predict", nan_bundle, red_image, "--json")
    assert code == 4 and "NaN" not in out and "Traceback" not in err
    assert f"of {nan_bundle / 'model.onnx'}: the model cannot predict" in err
