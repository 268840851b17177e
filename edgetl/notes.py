"""Notes: what a stage wants the reader to know, as data (a kind and its values).

Stages return `Note` records; only the reports turn them into sentences (`render`), so a test
asserts on a kind and a number, not on prose, and `report.json` keeps both: the sentences in
`notes` (as before) and the records in `note_records`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# kind → the sentence, formatted with the note's values. Stages add their kinds here.
_TIED = (
    "at {count} epochs ({epochs}), so it cannot rank them: epoch {best_epoch} was kept for the lowest val loss "
    "among them"
)
TEMPLATES: dict[str, str] = {
    # a sentence saved before notes were records (the stage folders of earlier builds)
    "text": "{text}",
    # quantize
    "calibration_short": "asked for {asked} calibration images; the train split has {available}, all used",
    "keep_float": "kept in float (keep_float): {nodes}",
    "bias_correction": "bias correction: {convs} conv(s) absorb the mean output shift of their rounded weights",
    "reduce_range": "7-bit weights (reduce_range): this CPU has no VNNI, where 8-bit weights saturate ONNX Runtime's "
    "int8 kernels",
    "activation_type": "activation type measured: uint8 {uint8_ms:.2f} ms, int8 {int8_ms:.2f} ms; kept {kept}",
    "accuracy_control_all": "accuracy control: val drop {drop:.4f} ≤ {max_drop} with every other layer quantized",
    "accuracy_control_met": "accuracy control: {count} more of {ranked} quantized node(s) left in float, "
    "val drop {drop:.4f} within {max_drop}",
    "accuracy_control_missed": "accuracy control: {count} more of {ranked} quantized node(s) left in float, "
    "val drop {drop:.4f} NOT within {max_drop}",
    "float_layers": "{count} weighted layer(s) kept in float: {layers}",
    "agreement_control": "agreement control: {count} more layer(s) in float for agreement ≥ {bound} with FP32 "
    "(fully quantized {start:.4f}; reached {val:.4f} on val, {calibration:.4f} on the calibration images)",
    "agreement_control_latency": "agreement control: {count} more layer(s) in float for agreement ≥ {bound} with "
    "FP32 (fully quantized {start:.4f}; reached {val:.4f} on val, {calibration:.4f} on the calibration images), "
    "at {ms:.2f} ms against {quantized_ms:.2f} ms fully quantized",
    "agreement_control_missed": "agreement control: bound {bound} NOT met with {count} more layer(s) in float "
    "(fully quantized {start:.4f}; reached {val:.4f} on val, {calibration:.4f} on the calibration images)",
    "agreement_control_missed_latency": "agreement control: bound {bound} NOT met with {count} more layer(s) in "
    "float (fully quantized {start:.4f}; reached {val:.4f} on val, {calibration:.4f} on the calibration images), "
    "at {ms:.2f} ms against {quantized_ms:.2f} ms fully quantized",
    "qat": "QAT: val accuracy {start:.4f} after calibration, {best:.4f} after fine-tuning "
    "(best epoch {best_epoch} of {epochs}, {seconds:.0f}s)",
    # train
    "augment_not_applied": "data.augment={augment} was not applied: linear_probe computes features once per image. "
    "Use strategy partial or finetune to train with augmentation.",
    "early_stop": "early stop after epoch {epoch}: val accuracy (ties: val loss) had not improved for {patience} "
    "epochs",
    "small_val_split": "the val split has {images} images (one image = {points:.1f} points of val accuracy), too few "
    "to rank epochs reliably (under {minimum}); add images or raise `data.val_split`",
    "saturated_val_accuracy": "val accuracy was 1.0 (saturated) " + _TIED,
    "tied_val_accuracy": "val accuracy was {accuracy:.4f} " + _TIED,
}


@dataclass(frozen=True)
class Note:
    """One fact a stage reports: `kind` names it (a key of TEMPLATES), `values` fill it in."""

    kind: str
    values: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "values": self.values}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Note:
        return cls(data["kind"], dict(data.get("values", {})))


def render(note: Note) -> str:
    """The note as one sentence for a report.

    >>> TEMPLATES["example"] = "{count} image(s) skipped"
    >>> render(Note("example", {"count": 3}))
    '3 image(s) skipped'
    """
    return TEMPLATES[note.kind].format(**note.values)
