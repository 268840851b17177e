"""How each architecture is cut into stem, block stages and neck, so a strategy can freeze a prefix."""

from __future__ import annotations

import torch
from torch import nn

from edgetl.errors import ModelError
from edgetl.models.spec import Stages


class _Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1)


def timm_efficientnet_stages(model: nn.Module) -> Stages:
    neck = nn.Sequential(model.conv_head, model.bn2, model.global_pool, _Flatten())
    return nn.Sequential(model.conv_stem, model.bn1), list(model.blocks), neck


def timm_mobilenetv3_stages(model: nn.Module) -> Stages:
    neck = nn.Sequential(model.global_pool, model.conv_head, model.norm_head, model.act2, _Flatten())
    return nn.Sequential(model.conv_stem, model.bn1), list(model.blocks), neck


def resnet_stages(model: nn.Module) -> Stages:
    """torchvision and timm ResNets share these names (timm calls the stem's activation act1)."""
    act = model.relu if hasattr(model, "relu") else model.act1
    stem = nn.Sequential(model.conv1, model.bn1, act, model.maxpool)
    blocks = [model.layer1, model.layer2, model.layer3, model.layer4]
    return stem, blocks, nn.Sequential(nn.AdaptiveAvgPool2d(1), _Flatten())


def torchvision_mobilenetv3_stages(model: nn.Module) -> Stages:
    """Keeps the pretrained pre-classifier Linear + Hardswish in the neck."""
    stem, *blocks, last = list(model.features)
    return stem, blocks, nn.Sequential(last, model.avgpool, _Flatten(), model.classifier[0], model.classifier[1])


def torchvision_efficientnet_stages(model: nn.Module) -> Stages:
    stem, *blocks, last = list(model.features)
    return stem, blocks, nn.Sequential(last, model.avgpool, _Flatten())


def timm_stages(model: nn.Module) -> Stages:
    """Any timm model of a family edgetl can cut: its class picks the cut. Raises ModelError for another."""
    from timm.models import efficientnet, mobilenetv3, resnet

    cuts = {
        efficientnet.EfficientNet: timm_efficientnet_stages,
        mobilenetv3.MobileNetV3: timm_mobilenetv3_stages,
        resnet.ResNet: resnet_stages,
    }
    if type(model) not in cuts:
        raise ModelError(
            f"edgetl does not know how to cut {type(model).__name__} into stages; `linear_probe` and "
            "`finetune` need them too. Use a registry backbone or a timm EfficientNet, MobileNetV3 or "
            "ResNet."
        )
    return cuts[type(model)](model)
