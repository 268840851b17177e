"""Backbone registry contract: every entry builds, cuts into stages, and its facts are true."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from sklearn.datasets import load_sample_images

from edgetl.errors import ModelError
from edgetl.models import REGISTRY, build
from edgetl.runtime.preprocess import Preprocessing, preprocess

TORCHVISION = [n for n in REGISTRY.names() if REGISTRY.get(n).source == "torchvision"]


@pytest.mark.parametrize("name", REGISTRY.names() + ["timm:resnet18", "timm:mobilenetv3_small_050"])
def test_every_backbone_builds_cuts_into_stages_and_has_a_complete_contract(name: str) -> None:
    spec = REGISTRY.get(name)
    model = build(spec, "none", num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.features(x)
        assert features.shape == (2, model.head.in_features)
        assert model(x).shape == (2, 3)
        prefix = model.features(x, 0, 2)
        assert torch.allclose(model.features(prefix, 2), features, atol=1e-5)  # stages compose
    assert model.num_blocks >= 3
    contract = spec.preprocessing(96)
    assert Preprocessing.from_dict(contract.to_dict()) == contract
    assert contract.input_size == 96 and contract.resize_size >= 96


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_preprocessing_matches_torchvision_weights_metadata(name: str) -> None:
    transforms = torchvision.models.get_model_weights(name)["IMAGENET1K_V1"].transforms()
    contract = REGISTRY.get(name).preprocessing()
    assert (contract.input_size, contract.resize_size) == (transforms.crop_size[0], transforms.resize_size[0])
    assert contract.interpolation == transforms.interpolation.value
    assert contract.mean == tuple(transforms.mean) and contract.std == tuple(transforms.std)


# Measured top-1 on sklearn's sample images (china.jpg, flower.jpg). lite2 reads the
# flower's centre as honeycomb (599) with p≈0.39; both rank palace (698) first for china.jpg.
ZERO_SHOT = {"efficientnet_lite0": [698, 985], "efficientnet_lite2": [698, 599]}


@pytest.mark.parametrize("name", sorted(ZERO_SHOT))
def test_efficientnet_lite_pretrained_weights_are_right_zero_shot(name: str) -> None:
    """A mis-mapped or random backbone gives near-uniform ImageNet probabilities (< 0.01)."""
    spec = REGISTRY.get(name)
    original = spec.load_pretrained(spec)  # timm's architecture with the PyPI weights, its ImageNet head included
    model = build(spec, "pretrained", num_classes=1000).eval()
    model.head.load_state_dict(original.classifier.state_dict())
    pre = spec.preprocessing()
    with torch.no_grad():
        probabilities = torch.cat(
            [model(torch.from_numpy(preprocess(img, pre))).softmax(1) for img in load_sample_images().images]
        )
    assert probabilities.argmax(1).tolist() == ZERO_SHOT[name]
    assert probabilities.max(1).values.min() > 0.2  # measured 0.30 and 0.32 with the torchvision-exact crop
    assert sum(p.numel() for p in original.parameters()) == sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in timm.create_model(spec.arch).parameters()) == sum(
        p.numel() for p in original.parameters()
    )


def test_torchvision_pretrained_goes_through_torchvisions_loader_and_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    reference = torchvision.models.resnet18()
    cached = tmp_path / "hub" / "checkpoints" / Path(weights.url).name
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    model = build(REGISTRY.get("resnet18"), "pretrained", num_classes=4)
    assert torch.equal(model.stages[0][0].weight, reference.conv1.weight)
    assert torch.equal(model.stages[4][1].conv2.weight, reference.layer4[1].conv2.weight)


def test_timm_weights_from_a_local_safetensors_file_load_strictly_except_the_head(tmp_path: Path) -> None:
    reference = timm.create_model("resnet18", pretrained=False, num_classes=7)
    save_file(reference.state_dict(), tmp_path / "r18.safetensors")
    model = build(REGISTRY.get("timm:resnet18"), str(tmp_path / "r18.safetensors"), num_classes=2)
    assert torch.equal(model.stages[1][0].conv1.weight, reference.layer1[0].conv1.weight)


def test_weights_that_do_not_fit_are_refused_with_the_keys(tmp_path: Path) -> None:
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(ModelError, match=r"wrong\.pth does not fit backbone resnet18 .*missing: conv1\.weight"):
        build(REGISTRY.get("resnet18"), str(tmp_path / "wrong.pth"), num_classes=2)
    with pytest.raises(ModelError, match="does not exist"):
        build(REGISTRY.get("resnet18"), str(tmp_path / "absent.pth"), num_classes=2)


def test_unknown_backbones_suggest_close_names() -> None:
    with pytest.raises(ModelError, match="Did you mean .*efficientnet_lite0"):
        REGISTRY.get("efficientnet_lite")
    with pytest.raises(ModelError, match="timm:resnet18"):
        REGISTRY.get("timm:resnet181")


def test_a_timm_family_edgetl_cannot_cut_is_refused_naming_its_class() -> None:
    with pytest.raises(ModelError, match="does not know how to cut VisionTransformer into stages"):
        build(REGISTRY.get("timm:vit_tiny_patch16_224"), "none", num_classes=2)


def test_registry_refuses_duplicates() -> None:
    with pytest.raises(ValueError, match="already registered"):
        REGISTRY.register(REGISTRY.get("resnet18"))
