"""A backbone registry entry (`BackboneSpec`): its weights and preprocessing as data, its behaviour as callables."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from edgetl.runtime.preprocess import Decode, Interpolation, Preprocessing

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_CLASSIFIER = ("classifier.", "fc.", "head.")  # state-dict prefixes of a library's own ImageNet head
TORCHVISION_CLASSIFIER = ("classifier.", "fc.")

Stages = tuple[nn.Module, list[nn.Module], nn.Module]  # stem, block stages, neck


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone is (architecture, weights, preprocessing, as data) and how it is handled (callables)."""

    name: str
    source: str  # "timm" or "torchvision": the library `arch` names a model of
    arch: str  # the timm model name or torchvision builder name
    native_size: int
    crop_pct: float
    interpolation: Interpolation
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str  # where `weights: pretrained` comes from, for people
    # the architecture as its library defines it, with its own ImageNet head, no weights
    build_original: Callable[[BackboneSpec], nn.Module] = field(repr=False, compare=False)
    # the same with the pretrained weights; raises ModelError when they cannot be had
    load_pretrained: Callable[[BackboneSpec], nn.Module] = field(repr=False, compare=False)
    # the built original cut into stem, block stages and neck (its pooled features, (N, F)); raises ModelError
    split: Callable[[nn.Module], Stages] = field(repr=False, compare=False)
    classifier: tuple[str, ...] = field(repr=False, compare=False)  # state-dict prefixes of the original's head

    def preprocessing(
        self, image_size: int | None = None, crop_pct: float | None = None, decode: Decode = "full"
    ) -> Preprocessing:
        """The contract for an input of `image_size` px (default: native), the center crop's share
        `crop_pct` of the resized shorter side (default: the backbone's) and the `decode` mode."""
        size = image_size or self.native_size
        resize = int(math.floor(size / (crop_pct or self.crop_pct)))
        return Preprocessing(size, resize, self.interpolation, self.mean, self.std, decode=decode)
