"""What a build makes on this machine, decided before any training: the runtimes it validates on
and the quantized variants it makes, with a line for each one left out, so a missing runtime
fails (or is skipped) in seconds rather than after an hour of training.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from edgetl.errors import RecipeError
from edgetl.recipe import QuantVariant, Recipe
from edgetl.runtime.engines import RUNTIMES, is_installed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    """What this machine can build of the recipe."""

    runtimes: list[str]  # the runtimes the FP32 files and variants are validated on
    variants: list[QuantVariant]  # the quantized variants to make
    skipped: list[str]  # one line per runtime or variant left out, for the report


def plan(recipe: Recipe) -> Plan:
    """The runtimes and variants this machine builds of `recipe`, checked against its device.

    Raises RecipeError: a runtime or variant the recipe lists is not installed, or the device's
    runtime is not measured here.
    """
    runtimes, skipped = _available_runtimes(recipe)
    variants, skipped_variants = _runnable_variants(recipe, runtimes)
    _check_device_runtimes(recipe, runtimes)
    return Plan(runtimes, variants, skipped + skipped_variants)


def _available_runtimes(recipe: Recipe) -> tuple[list[str], list[str]]:
    """Runtimes to validate on. Listed in the recipe: required. Otherwise: the installed ones."""
    if recipe.export.runtimes is not None:
        missing = [r for r in recipe.export.runtimes if not is_installed(r)]
        if missing:
            raise RecipeError(
                f"`export.runtimes` asks for {missing}, which is not installed; install it (`pip install "
                "'edgetl[train]'`) or remove it from the list."
            )
        return list(recipe.export.runtimes), []
    skipped = [
        f"{r} is not installed: its variants were skipped (install it with `pip install 'edgetl[train]'`)"
        for r in RUNTIMES
        if not is_installed(r)
    ]
    for line in skipped:
        log.warning(line)
    return [r for r in RUNTIMES if is_installed(r)], skipped


def _check_device_runtimes(recipe: Recipe, runtimes: list[str]) -> None:
    """Before training: the device must have a runtime this build measures variants on.

    Raises RecipeError. The FP32 ONNX file is always measured on ONNX Runtime, so only an
    OpenVINO-only device with OpenVINO missing here (or left out of `export.runtimes`) fails.
    """
    if "onnxruntime" not in recipe.device.runtimes and "openvino" not in runtimes:
        raise RecipeError(
            "`device.runtimes` is [openvino], but this build measures no variant on OpenVINO (not "
            "installed here, or not in `export.runtimes`); install it (`pip install 'edgetl[train]'`) "
            "or add onnxruntime to `device.runtimes`."
        )


def _runnable_variants(recipe: Recipe, runtimes: list[str]) -> tuple[list[QuantVariant], list[str]]:
    """A default variant for a missing runtime is skipped with a line; one the recipe lists is an error."""
    explicit = "quantize" in recipe.model_fields_set
    runnable, skipped = [], []
    for variant in recipe.quantize:
        if variant.runtime in runtimes:
            runnable.append(variant)
        elif explicit:
            raise RecipeError(
                f"quantize variant {variant.display_name} needs {variant.runtime}, which is not installed or not "
                "in `export.runtimes`; install it or remove the variant."
            )
        else:
            skipped.append(f"quantize variant {variant.display_name} skipped: {variant.runtime} is not available")
            log.warning(skipped[-1])
    return runnable, skipped
