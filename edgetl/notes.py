"""Notes: what a stage wants the reader to know, as data (a kind and its values).

Stages return `Note` records; only the reports turn them into sentences (`render`), so a test
asserts on a kind and a number, not on prose, and `report.json` keeps both: the sentences in
`notes` (as before) and the records in `note_records`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# kind → the sentence, formatted with the note's values. Stages add their kinds here.
_TIED = ("at {count} epochs ({epochs}), so it cannot rank them: epoch {best_epoch} was kept for the lowest val loss "
         "among them")
TEMPLATES: dict[str, str] = {
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
