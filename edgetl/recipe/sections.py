"""The sections of a recipe (data, model, train, export, distill, adapt, quantize, measure, gates, device):
pydantic models that forbid unknown keys and non-finite numbers and resolve paths against the recipe's folder."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from edgetl.runtime.decode import DEFAULT_MAX_PIXELS


class Section(BaseModel):
    # allow_inf_nan=False: `.inf`/`.nan` in YAML (or --set) is refused in every number field;
    # `train.weight_decay: .inf` once trained a model whose logits were all NaN.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _resolve(value: Path | None, info: ValidationInfo) -> Path | None:
    base = (info.context or {}).get("base_dir")
    if value is None or value.is_absolute() or base is None:
        return value
    return (Path(base) / value).resolve()


def _resolve_weights(value: str, info: ValidationInfo) -> str:
    return value if value in ("pretrained", "none") else str(_resolve(Path(value), info))


class DataConfig(Section):
    path: Path | None = Field(
        None, description="ImageFolder root: <root>/<class>/* or <root>/{train,val|validation,test}/<class>/*"
    )
    builtin: Literal["digits", "digits-mosaic"] | None = Field(
        None, description="A bundled offline dataset instead of `path`: digits, or digits-mosaic (multi-label)."
    )
    manifest: Path | None = Field(
        None,
        description="A label manifest instead of `path`: a .csv with columns path,label[,split] or a .jsonl with one "
        "such object per line; paths relative to the manifest's folder; split train|val|validation|test.",
    )
    allow_empty_labels: bool = Field(
        False, description="task multilabel: a manifest row may have an empty label set (an image of no label)."
    )
    val_split: float = Field(
        0.15, gt=0, lt=1, description="Stratified fraction held out for validation when the root has no val folder."
    )
    test_split: float = Field(
        0.15, gt=0, lt=1, description="Stratified fraction held out for test when the root has no test folder."
    )
    image_size: int | None = Field(
        None, ge=16, le=1024, description="Model input size in pixels; default: the backbone's native size."
    )
    crop_pct: float | None = Field(
        None,
        ge=0.5,
        le=1,
        description="The center crop's share of the resized shorter side; 1.0 keeps the whole frame (small or "
        "tightly framed images). Default: the backbone's (0.875 for most).",
    )
    decode: Literal["full", "reduced"] = Field(
        "reduced",
        description="reduced: images at least twice the resize size are decoded at 1/2, 1/4 or 1/8 scale (JPEG in the "
        "DCT domain), in the build and on the device alike (a 4032×3024 JPEG predicts ~5× faster; no accuracy change "
        "measured); full: every pixel, as torchvision's eval transform does.",
    )
    augment: Literal["none", "default", "strong"] = Field("default", description="Training augmentation.")
    on_bad_image: Literal["skip", "error"] = Field(
        "skip", description="skip: report and count unreadable images; error: fail the build."
    )
    max_image_pixels: int = Field(
        DEFAULT_MAX_PIXELS,
        ge=1,
        description="Larger images are refused from their header, before decoding (reported like unreadable ones).",
    )
    cache_dir: Path | None = Field(
        None,
        description="Where decoded images, frozen features and teacher logits are cached on disk, shared by builds "
        "of the same data; default $EDGETL_CACHE_DIR, else $XDG_CACHE_HOME/edgetl, else ~/.cache/edgetl.",
    )
    workers: int | None = Field(
        None,
        ge=0,
        le=64,
        description="DataLoader worker processes that read and augment training batches; 0 reads them in the "
        "training process. Default: the cores beyond two, at most 8 (0 on a 2-core machine).",
    )

    _resolve_path = field_validator("path", "manifest", "cache_dir")(_resolve)

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if [self.path, self.builtin, self.manifest].count(None) != 2:
            raise ValueError(
                "set exactly one of `data.path` (an image folder), `data.manifest` (a .csv/.jsonl label manifest) or "
                "`data.builtin` (one of: digits, digits-mosaic)"
            )
        if self.val_split + self.test_split >= 0.9:
            raise ValueError(
                f"`data.val_split` + `data.test_split` must leave data to train on; got {self.val_split} + "
                f"{self.test_split}"
            )
        return self


class ModelConfig(Section):
    backbone: str = Field(
        "efficientnet_lite0", description="A registry name (see `edgetl backbones`) or `timm:<name>`."
    )
    weights: str = Field(
        "pretrained", description="pretrained | none | path to a .pth / .safetensors state dict of the backbone."
    )
    dropout: float = Field(0.2, ge=0, lt=1, description="Dropout before the classification head.")

    _resolve_weights = field_validator("weights")(_resolve_weights)


class TrainConfig(Section):
    strategy: Literal["linear_probe", "partial", "finetune"] = Field(
        "linear_probe", description="What trains: the head only, the last `unfreeze` stages, or everything."
    )
    unfreeze: int = Field(2, ge=1, description="partial: how many final backbone stages train.")
    epochs: int = Field(10, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(1e-3, gt=0, le=10, description="Peak learning rate of the head (AdamW).")
    backbone_lr_mult: float = Field(0.1, gt=0, le=1, description="partial/finetune: backbone lr = lr × this.")
    weight_decay: float = Field(0.01, ge=0)
    warmup_epochs: float = Field(1.0, ge=0, description="Linear warm-up before cosine decay.")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    patience: int | None = Field(
        None, ge=1, description="Stop after this many epochs without a better val accuracy; the best epoch is kept."
    )
    class_balance: Literal["none", "weighted_loss", "balanced_sampler"] = Field(
        "none", description="For imbalanced classes."
    )
    pos_weight: Literal["none", "balanced"] = Field(
        "none", description="task multilabel: balanced weighs each label's positives by its negatives/positives."
    )
    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads per process; default: the cores, shared by the processes of a torchrun launch.",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$",
        description="Where training runs: auto (CUDA when available, else CPU) | cpu | cuda | cuda:N | mps. Export, "
        "quantization and validation run on the CPU.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Training's mixed precision: auto (bf16 on CUDA GPUs that support it, else fp16 with a grad "
        "scaler; fp32 on CPU) | fp32 | bf16 | fp16.",
    )


class ExportConfig(Section):
    opset: int = Field(17, ge=17, le=21, description="ONNX opset.")
    runtimes: list[Literal["onnxruntime", "openvino"]] | None = Field(
        None,
        description="Runtimes to validate on; default: every installed one (a missing one is skipped with a line). "
        "Listed runtimes are required.",
    )
    parity_tolerance: float = Field(
        1e-3, gt=0, description="Max |Δlogit| allowed between PyTorch and each FP32 runtime on every validation image."
    )


class TeacherConfig(Section):
    """The bigger model the student learns from: trained in this build, or another run's checkpoint."""

    backbone: str | None = Field(
        None, description="A registry backbone trained first in this build (with `train` below)."
    )
    checkpoint: Path | None = Field(
        None, description="Instead of `backbone`: another run's checkpoint.pt (its own preprocessing)."
    )
    weights: str = Field("pretrained", description="backbone: pretrained | none | path to a state dict.")
    image_size: int | None = Field(
        None, ge=16, le=1024, description="backbone: its input size; default: its native size."
    )
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(strategy="partial"), description="backbone: how the teacher trains."
    )
    augment: Literal["none", "default", "strong"] | None = Field(
        None, description="backbone: the teacher's augmentation; default: `data.augment`."
    )

    _resolve_checkpoint = field_validator("checkpoint")(_resolve)
    _resolve_weights = field_validator("weights")(_resolve_weights)

    @model_validator(mode="after")
    def _one_teacher(self) -> TeacherConfig:
        if (self.backbone is None) == (self.checkpoint is None):
            raise ValueError(
                "set exactly one of `distill.teacher.backbone` (trained in this build) or "
                "`distill.teacher.checkpoint` (another run's checkpoint.pt)"
            )
        return self


class DistillConfig(Section):
    teacher: TeacherConfig
    temperature: float = Field(4.0, gt=0, description="Softens both logits before the KL term.")
    alpha: float = Field(
        0.7, ge=0, le=1, description="Weight of the distillation loss; 1 - alpha weighs the label loss."
    )
    compare: bool = Field(
        True, description="Also train the student alone (same epochs), for the report's side-by-side."
    )


class AdaptConfig(Section):
    target: Path = Field(..., description="Unlabeled images from the deployment domain (any folder layout).")
    method: Literal["adabn", "dann"] = Field(
        "adabn",
        description="adabn: recompute BatchNorm statistics on target images (no training); dann: "
        "domain-adversarial training.",
    )
    target_labeled: Path | None = Field(
        None, description="<root>/<class>/* of the target domain, used only to measure source-only vs adapted accuracy."
    )
    dann_weight: float = Field(
        1.0, gt=0, le=10, description="dann: final weight of the reversed domain gradient (ramped up from 0)."
    )
    domain_hidden: int = Field(256, ge=8, description="dann: hidden units of the domain classifier.")

    _resolve_paths = field_validator("target", "target_labeled")(_resolve)


class QuantVariant(Section):
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Default: <runtime>-<precision>."
    )
    runtime: Literal["onnxruntime", "openvino"]
    precision: Literal["int8", "fp16"] = "int8"
    method: Literal["ptq", "qat"] = Field(
        "ptq",
        description="ptq: post-training quantization; qat: NNCF quantization-aware fine-tuning of the trained "
        "model (an int8 IR for openvino, a QDQ ONNX with int8 weights for onnxruntime).",
    )
    qat_epochs: int = Field(2, ge=1, le=100, description="qat: fine-tuning epochs with fake quantization.")
    qat_lr: float = Field(1e-5, gt=0, le=1, description="qat: learning rate (AdamW); QAT needs a small one.")
    engine: Literal["nncf", "onnxruntime"] | None = Field(
        None,
        description="int8 quantizer. Default: onnxruntime's quantize_static for runtime onnxruntime (NNCF places "
        "its quantizers for OpenVINO, which fuses a conv with the residual Add after it: ONNX Runtime runs those "
        "convs in float, and NNCF's QDQ lite0 was no faster than FP32), nncf for openvino.",
    )
    calibration_images: int = Field(300, ge=1, description="Real training images, through the eval preprocessing.")
    calibration_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="engine onnxruntime only."
    )
    activation_type: Literal["auto", "uint8", "int8"] = Field(
        "auto", description="engine onnxruntime only; auto keeps the faster on this CPU."
    )
    max_accuracy_drop: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Accuracy control: keep the val accuracy drop within this (0.01 = 1 point) by leaving the most "
        "sensitive layers in float.",
    )
    min_agreement: float | None = Field(
        0.99,
        gt=0,
        le=1,
        description="Agreement control: the share of images whose top-1 must match the FP32 model's, on the val "
        "split and the calibration images; the most sensitive layers stay in float until it holds (fewest first). "
        "A variant whose test agreement misses it is marked and not selected. The default holds INT8 PTQ variants "
        "without max_accuracy_drop (the ones the search works on); set it to hold QAT and the others too. "
        "null: no control, no check.",
    )
    allow_below_agreement: bool = Field(
        False,
        description="Let the selection pick this variant even when its test agreement misses `min_agreement` "
        "(the report still marks it).",
    )
    keep_float: list[str] | None = Field(
        None,
        description="engine onnxruntime only: ONNX node names left in float. Default: the first convolution and "
        "the first depthwise one (on a fine-tuned cifar lite0, INT8 agreement with FP32 0.805 → 0.954 with "
        "bias correction, at no latency cost). [] quantizes everything.",
    )
    bias_correction: Literal["fast", "full"] = Field(
        "fast",
        description="engine nncf: NNCF's fast bias correction, or the full one (layer by layer on the quantized "
        "model, slower).",
    )
    preset: Literal["performance", "mixed"] = Field(
        "performance", description="engine nncf: symmetric activations, or asymmetric ones (mixed)."
    )
    activation_ranges: Literal["default", "minmax", "mean_minmax", "quantile", "histogram"] = Field(
        "default",
        description="engine nncf: how activation ranges come from the calibration statistics: NNCF's default, "
        "global min-max, the mean of per-image min-max, the mean 0.01%/99.99% quantile, or the histogram "
        "search for the range with the least quantization error.",
    )
    overflow_fix: Literal["first_layer", "enable", "disable"] = Field(
        "first_layer",
        description="engine nncf: 7-bit weights (the fix for int8 overflow on CPUs without VNNI) in the first "
        "layer (NNCF's default), everywhere, or nowhere.",
    )

    @property
    def display_name(self) -> str:
        suffix = (
            "-qat"
            if self.method == "qat"
            else "-nncf"
            if self.runtime == "onnxruntime" and self.engine == "nncf"
            else ""
        )
        return self.name or f"{'ort' if self.runtime == 'onnxruntime' else 'ov'}-{self.precision}{suffix}"

    @property
    def quantizer(self) -> str:
        return (
            "nncf"
            if self.method == "qat"
            else self.engine or ("onnxruntime" if self.runtime == "onnxruntime" else "nncf")
        )

    @model_validator(mode="after")
    def _consistent(self) -> QuantVariant:
        if self.precision == "fp16" and self.runtime != "openvino":
            raise ValueError("precision fp16 is an OpenVINO IR variant; use runtime: openvino")
        if self.method == "qat" and (
            self.precision != "int8" or self.engine is not None or self.max_accuracy_drop is not None
        ):
            raise ValueError(
                "method qat makes an int8 model with NNCF (an OpenVINO IR, or a QDQ ONNX for onnxruntime); "
                "drop `precision`, `engine` and `max_accuracy_drop`"
            )
        if self.allow_below_agreement and self.min_agreement is None:
            raise ValueError(
                "allow_below_agreement lets a variant below its min_agreement be selected, but min_agreement is "
                "null; set a bound (e.g. 0.99) or drop allow_below_agreement"
            )
        if self.engine == "onnxruntime" and self.runtime != "onnxruntime":
            raise ValueError("engine onnxruntime quantizes for runtime onnxruntime only; use engine: nncf for openvino")
        if self.quantizer == "nncf" and (
            self.calibration_method != "minmax" or self.activation_type != "auto" or self.keep_float is not None
        ):
            raise ValueError(
                "calibration_method, activation_type and keep_float apply to engine: onnxruntime; "
                "NNCF chooses its own (use max_accuracy_drop to keep layers in float)"
            )
        nncf_options = ("bias_correction", "preset", "activation_ranges", "overflow_fix")
        changed = [name for name in nncf_options if getattr(self, name) != type(self).model_fields[name].default]
        if self.quantizer != "nncf" and changed:
            raise ValueError(f"{', '.join(changed)} apply to engine: nncf (NNCF's quantization); add `engine: nncf`")
        return self


class MeasureConfig(Section):
    threads: int | None = Field(None, ge=1, description="Inference threads for every runtime; default: all cores.")
    latency_rounds: int = Field(10, ge=1, description="Round-robin rounds over the variants (interleaved timing).")
    latency_runs: int = Field(10, ge=1, description="Batch-1 runs per variant per round.")
    warmup: int = Field(10, ge=0)
    throughput_batch: int = Field(32, ge=2)


class GatesConfig(Section):
    """Each set gate must hold for a variant to be deployable; unset gates are not checked."""

    min_accuracy: float | None = Field(None, ge=0, le=1, description="Test accuracy of the variant.")
    min_map: float | None = Field(None, ge=0, le=1, description="task multilabel: test mAP of the variant.")
    max_accuracy_drop: float | None = Field(
        None, ge=0, le=1, description="Test accuracy drop against PyTorch FP32 (0.01 = 1 point)."
    )
    min_agreement: float | None = Field(
        None, ge=0, le=1, description="Top-1 agreement with PyTorch FP32 on the test split."
    )
    max_latency_ms: float | None = Field(None, gt=0, description="p50 latency at batch 1 on the build machine.")
    max_size_mb: float | None = Field(None, gt=0, description="Model file size (IR: .xml + .bin).")


class DeviceConfig(Section):
    """The device that runs the bundle: selection considers only the variants it can run."""

    runtimes: list[Literal["onnxruntime", "openvino"]] = Field(
        default_factory=lambda: ["onnxruntime"],
        min_length=1,
        description="Runtimes installed on the device. Default [onnxruntime]: what `pip install edgetl` runs. "
        "Add openvino (`pip install 'edgetl[openvino]'`) to let OpenVINO variants be selected. "
        "A variant counts for the runtime it was measured on.",
    )


def default_variants() -> list[QuantVariant]:
    return [QuantVariant(runtime="onnxruntime"), QuantVariant(runtime="openvino")]
