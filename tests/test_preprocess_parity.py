"""The device's numpy/Pillow preprocessing against the training side's torchvision eval
transform, on 60 real images of different sizes, modes, formats and EXIF orientations."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from sklearn.datasets import load_sample_images
from torchvision import transforms

from edgetl import export
from edgetl.models import REGISTRY, build
from edgetl.runtime.engines import open_engine
from edgetl.runtime.preprocess import Preprocessing, normalize, preprocess, preprocess_uint8
from edgetl.train.inputs import Inputs

SPEC = REGISTRY.get("efficientnet_lite0")
PRE = SPEC.preprocessing()  # 224 px, resize 256, bicubic, mean = std = 0.5
ONE_STEP = 1 / 255 / 0.5  # one 8-bit level after normalization


def reference_tensor(data: bytes, pre: Preprocessing) -> np.ndarray:
    """The training-side eval transform as torchvision writes it (Resize → CenterCrop →
    ToTensor → Normalize), after the decoding any PIL pipeline does: EXIF upright, RGB,
    transparency on white."""
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    if image.mode in ("I;16", "I;16B", "I"):
        image = Image.fromarray(np.clip(np.rint(np.asarray(image, np.float64) / 257), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    interpolation = {
        "bicubic": transforms.InterpolationMode.BICUBIC,
        "bilinear": transforms.InterpolationMode.BILINEAR,
    }[pre.interpolation]
    transform = transforms.Compose(
        [
            transforms.Resize(pre.resize_size, interpolation=interpolation),
            transforms.CenterCrop(pre.input_size),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]
    )
    return transform(image).numpy()[None]


def real_images(count: int = 60) -> list[tuple[str, bytes]]:
    """Crops of sklearn's two real photos: sizes 150-900 px, every mode and format, EXIF rotations."""
    rng = np.random.default_rng(0)
    photos = load_sample_images().images
    images = []
    for i in range(count):
        photo = photos[i % 2]
        height, width = int(rng.integers(120, 420)), int(rng.integers(120, 630))
        top, left = int(rng.integers(0, photo.shape[0] - height)), int(rng.integers(0, photo.shape[1] - width))
        image = Image.fromarray(photo[top : top + height, left : left + width])
        if i % 5 == 0:
            image = image.resize((image.width * 2, image.height * 2), Image.Resampling.BICUBIC)  # up to ~840 px
        kind = ["jpeg", "png", "gray", "palette", "rgba", "cmyk", "16bit", "exif", "webp", "tiff"][i % 10]
        buffer = io.BytesIO()
        if kind == "gray":
            image.convert("L").save(buffer, "PNG")
        elif kind == "palette":
            image.convert("P", palette=Image.Palette.ADAPTIVE).save(buffer, "PNG")
        elif kind == "rgba":
            rgba = image.convert("RGBA")
            rgba.putalpha(Image.linear_gradient("L").resize(image.size))
            rgba.save(buffer, "PNG")
        elif kind == "cmyk":
            image.convert("CMYK").save(buffer, "JPEG", quality=92)
        elif kind == "16bit":
            Image.fromarray(np.asarray(image.convert("L"), np.uint16) * 257).save(buffer, "PNG")
        elif kind == "exif":
            exif = Image.Exif()
            exif[0x0112] = int(rng.choice([3, 6, 8]))  # rotated 180, 90 CW, 90 CCW
            image.save(buffer, "JPEG", quality=90, exif=exif)
        elif kind in ("webp", "tiff"):
            image.save(buffer, kind.upper())
        else:
            image.save(buffer, kind.upper() if kind != "jpeg" else "JPEG", quality=90)
        images.append((f"{i:02d}-{kind}-{image.width}x{image.height}", buffer.getvalue()))
    return images


@pytest.fixture(scope="module")
def imagenet_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Pretrained lite0 with its ImageNet head, exported: real logits with real margins."""
    original = SPEC.load_pretrained(SPEC)  # timm's architecture with the PyPI weights, its ImageNet head included
    model = build(SPEC, "pretrained", num_classes=1000).eval()
    model.head.load_state_dict(original.classifier.state_dict())
    return export.run(
        model, PRE, tuple(map(str, range(1000))), tmp_path_factory.mktemp("parity"), 17, "parity", want_openvino=False
    ).onnx


def test_runtime_preprocessing_matches_the_torchvision_eval_transform_within_one_step(imagenet_onnx: Path) -> None:
    images = real_images()
    ours = np.concatenate([preprocess(data, PRE, name) for name, data in images])
    reference = np.concatenate([reference_tensor(data, PRE) for _, data in images])
    delta = np.abs(ours - reference).reshape(len(images), -1).max(axis=1)
    worst = int(delta.argmax())
    assert delta.max() <= ONE_STEP + 1e-6, (
        f"{images[worst][0]}: max |Δ| {delta.max():.4f} > one 8-bit step {ONE_STEP:.4f}"
    )
    assert {name.split("-")[1] for name, _ in images} >= {"jpeg", "gray", "palette", "rgba", "cmyk", "16bit", "exif"}

    engine = open_engine(imagenet_onnx, "onnxruntime")
    ours_top1 = np.concatenate([engine.run(ours[i : i + 16]) for i in range(0, len(ours), 16)]).argmax(1)
    reference_top1 = np.concatenate([engine.run(reference[i : i + 16]) for i in range(0, len(reference), 16)]).argmax(1)
    assert (ours_top1 == reference_top1).all(), [images[i][0] for i in np.flatnonzero(ours_top1 != reference_top1)]


def test_exif_rotation_is_applied_before_cropping() -> None:
    wide = Image.new("RGB", (300, 120), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 150, 120))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: the viewer turns it 90° clockwise
    buffer = io.BytesIO()
    wide.save(buffer, "JPEG", quality=95, exif=exif)
    x = preprocess(buffer.getvalue(), Preprocessing(32, 32, "bilinear", (0.0,) * 3, (1.0,) * 3))[
        0
    ]  # (3, 32, 32) in [0, 1]
    assert x[0, 2, 16] > 0.8 and x[2, 2, 16] < 0.2  # upright: red on top
    assert x[2, 29, 16] > 0.8 and x[0, 29, 16] < 0.2  # blue at the bottom


def test_normalize_maps_every_pixel_value_of_every_channel_by_its_own_mean_and_std() -> None:
    pre = Preprocessing(16, 16, "bilinear", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    batch = np.stack([values, 255 - values, values.T], axis=-1)[None]  # each channel a different layout
    expected = (batch.transpose(0, 3, 1, 2) / 255.0 - np.array(pre.mean).reshape(1, 3, 1, 1)) / np.array(
        pre.std
    ).reshape(1, 3, 1, 1)
    x = normalize(batch, pre)
    assert x.dtype == np.float32 and x.flags.c_contiguous
    np.testing.assert_allclose(x, expected, rtol=0, atol=1e-6)
    # training on a GPU ships the batch as uint8 and normalizes it there, with the same terms
    inputs = Inputs(batch, batch, batch, start=0, cached=False, pre=pre, root=Path("unused"))
    raw = inputs.model_input(batch, normalized=False)
    assert raw.dtype == torch.uint8 and raw.is_contiguous(memory_format=torch.channels_last)
    on_device = inputs.on_device(raw)
    assert on_device.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(on_device.numpy(), inputs.model_input(batch).numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_the_crop_only_resize_matches_pillows_full_resize_then_crop(interpolation: str, threads: int) -> None:
    """Noise is the hard case: a pass order other than Pillow's moves its pixels by up to 20
    levels. Sizes cover landscape, portrait, up- and downscaling, split (2 threads) and unsplit."""
    rng = np.random.default_rng(0)
    for width, height in [
        (500, 375),
        (375, 500),
        (257, 1104),
        (154, 307),
        (1200, 40),
        (900, 880),
        (31, 29),
        (640, 640),
    ]:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        for pre in (
            Preprocessing(224, 256, interpolation, (0.0,) * 3, (1.0,) * 3),
            Preprocessing(96, 109, interpolation, (0.0,) * 3, (1.0,) * 3),
        ):
            ours = preprocess_uint8(image, pre, threads=threads).astype(int)
            reference = np.asarray(
                transforms.CenterCrop(pre.input_size)(
                    transforms.Resize(pre.resize_size, interpolation=transforms.InterpolationMode(interpolation))(image)
                )
            ).astype(int)
            assert ours.shape == reference.shape and np.abs(ours - reference).max() <= 1, (
                width,
                height,
                pre.input_size,
                np.abs(ours - reference).max(),
            )
