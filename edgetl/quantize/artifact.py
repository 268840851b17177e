"""The quantize stage's result (one variant's file and facts), which saves itself to its stage
folder and loads itself back, and what every variant of a build is made from."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgetl.data import Dataset
from edgetl.fileio import write_json
from edgetl.notes import Note, render
from edgetl.runtime.preprocess import Preprocessing
from edgetl.runtime.readout import SINGLE, Readout

FACTS_FILE = "quantize.json"


@dataclass(frozen=True)
class Inputs:
    """What every variant of one build is made from: the data (calibration images, the val split of
    accuracy control and QAT), its preprocessing, the seed and the inference threads."""

    dataset: Dataset
    pre: Preprocessing
    seed: int
    threads: int | None
    readout: Readout = SINGLE  # what an answer is, for the agreement control: top-1, or a thresholded label set


@dataclass(frozen=True)
class QuantizedArtifact:
    name: str
    runtime: str
    precision: str
    file: Path
    float_layers: list[str]  # weighted layers left in float (accuracy control, or never quantized)
    seconds: float
    calibration_images: int
    notes: list[Note] = field(default_factory=list)
    # the agreement search's record (`control.Search.record`): bound, met, layers added, agreement, latency cost
    agreement_control: dict[str, Any] | None = None

    def notes_text(self) -> list[str]:
        """The notes as the report's sentences."""
        return [render(note) for note in self.notes]

    def to_json(self) -> dict[str, Any]:
        """The facts as `quantize.json` and report.json's `quantize[]` hold them: the notes as sentences
        (`notes`) and as records (`note_records`), the file by its name."""
        return {
            "name": self.name,
            "runtime": self.runtime,
            "precision": self.precision,
            "float_layers": self.float_layers,
            "seconds": self.seconds,
            "calibration_images": self.calibration_images,
            "notes": self.notes_text(),
            "note_records": [note.to_dict() for note in self.notes],
            "file": self.file.name,
        } | ({"agreement_control": self.agreement_control} if self.agreement_control is not None else {})

    def save(self, folder: Path) -> None:
        """Write `folder/quantize.json`; the model file is already in `folder` (run_variant made it there).

        Raises OutputError when the disk refuses the write.
        """
        write_json(folder / FACTS_FILE, self.to_json())

    @classmethod
    def load(cls, folder: Path) -> QuantizedArtifact:
        """The artifact `save` wrote to `folder`. A folder saved before notes were records gives its
        sentences as `text` notes.

        Raises OSError (no quantize.json) or ValueError (not JSON): the stage cache only hands over
        complete folders, so either means the folder was changed by hand.
        """
        facts = json.loads((folder / FACTS_FILE).read_text())
        if "note_records" in facts:
            notes = [Note.from_dict(record) for record in facts["note_records"]]
        else:
            notes = [Note("text", {"text": sentence}) for sentence in facts["notes"]]
        return cls(
            facts["name"],
            facts["runtime"],
            facts["precision"],
            folder / facts["file"],
            facts["float_layers"],
            facts["seconds"],
            facts["calibration_images"],
            notes,
            facts.get("agreement_control"),
        )
