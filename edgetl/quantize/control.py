"""Agreement with the FP32 model as the quantization's control signal, on any runtime.

A quantized model is judged by how often it gives the FP32 model's answer (top-1 agreement, or for a
multi-label model the same thresholded label set) and by how far its probabilities move (mean
|Δ softmax|, or |Δ sigmoid|), both measured on the control images: the val split and the
calibration images. The task's `Readout` (edgetl.runtime.readout) decides what an answer is, so
every runtime's control uses the same agreement function. On a few hundred images agreement is far
less noisy than accuracy: accuracy hides a disagreement that turns one wrong answer into
another, or that one image gains and another loses.

`search` is runtime-agnostic. It is given a trial function (the layers to keep in float →
the model's logits on some inputs) and the FP32 logits, ranks the candidate layers by
measured sensitivity (the error left with that layer alone in float, on the control images
the fully quantized model gets most wrong, as NNCF's accuracy control ranks its quantizers),
then finds the shortest prefix of the ranking that meets the bound: 1, 2, 4, … layers until
the bound holds, then a bisection between the last count that missed and the first that met,
so the chosen count is one whose count − 1 was found below the bound. `verify` then measures
the file-to-be on every control image, adding the next ranked layer while it misses.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from edgetl.progress import track
from edgetl.runtime.bench import interleaved_latency
from edgetl.runtime.engines import Engine
from edgetl.runtime.readout import SINGLE, Readout

log = logging.getLogger(__name__)

# (layers kept in float, float32 (N, 3, S, S) inputs) → (N, classes) logits of that quantized model
Trial = Callable[[list[str], np.ndarray], np.ndarray]
# at most this many ranked layers stay in float: past it, INT8 loses its speed (a search that needs
# more reports the bound missed, and the variant is not selected)
MAX_FLOAT_LAYERS = 16
RANKING_IMAGES = 32  # control images the ranking measures on: those the fully quantized model gets furthest off


@dataclass(frozen=True)
class Fidelity:
    """How close a quantized model's outputs are to the FP32 model's on the same `images`.

    `agreement`: share of images whose answer (top-1 class, or label set) is FP32's; `mean_abs_softmax_delta`:
    mean over images and classes of |p(q) − p(fp32)|, p the softmax (or each label's sigmoid) (0 when identical);
    `max_abs_prob_delta`: the largest such difference (label sets only).
    """

    agreement: float
    mean_abs_softmax_delta: float
    images: int
    max_abs_prob_delta: float | None = None

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def fidelity(logits: np.ndarray, reference: np.ndarray, readout: Readout = SINGLE) -> Fidelity:
    """`logits` (N, C) against the FP32 `reference` (N, C), answers read by `readout`.

    >>> fidelity(np.array([[2.0, 0.0]]), np.array([[1.0, 0.0]])).agreement
    1.0
    """
    if not len(logits):
        return Fidelity(1.0, 0.0, 0)
    delta = readout.delta(logits, reference)  # (N,)
    largest = None
    if readout.multilabel:
        largest = float(np.abs(readout.probabilities(logits) - readout.probabilities(reference)).max())
    agreement = float(readout.agree(logits, reference).mean())
    return Fidelity(agreement, float(delta.mean() / max(logits.shape[1], 1)), len(logits), largest)


@dataclass(frozen=True)
class ControlSet:
    """The images agreement is controlled on, preprocessed, with the FP32 model's logits of them.

    `inputs`: float32 (N, 3, S, S), the val split's images first (`val_images` of them), then the
    calibration images; `reference`: (N, classes) FP32 logits; `readout`: what an answer is.
    """

    inputs: np.ndarray
    reference: np.ndarray
    val_images: int
    readout: Readout = SINGLE

    def by_split(self, logits: np.ndarray) -> dict[str, dict[str, float]]:
        """Fidelity of `logits` (N, classes) on the val part and on the calibration part, as JSON."""
        v = self.val_images
        return {
            "val": fidelity(logits[:v], self.reference[:v], self.readout).to_dict(),
            "calibration": fidelity(logits[v:], self.reference[v:], self.readout).to_dict(),
        }


@dataclass(frozen=True)
class Search:
    """What the agreement search found. `float_layers`: the chosen prefix of `ranking`;
    `trials`: (count of ranked layers in float, agreement) in the order measured."""

    float_layers: list[str]
    start: Fidelity  # with none of the ranked layers in float
    reached: Fidelity  # with `float_layers` in float
    bound: float
    ranked: int
    trials: list[tuple[int, float]]
    logits: np.ndarray | None  # (N, classes) of the chosen model on the control images; None: not measured yet
    ranking: list[str] = field(default_factory=list)  # the ranked candidates, most sensitive first (≤ the limit)

    @property
    def met(self) -> bool:
        return self.reached.agreement >= self.bound

    def record(self, control: ControlSet, latency_ms: dict[str, float]) -> dict:
        """The quantize record's `agreement_control` (report.json `quantize[]`): bound, whether it was met, the
        layers added in float, agreement before and after on val and calibration, the trials, and the latency
        cost (`latency_ms`: p50 of the fully quantized model and of the chosen one, measured together)."""
        return {
            "min_agreement": self.bound,
            "met": self.met,
            "float_layers_added": self.float_layers,
            "ranked": self.ranked,
            "trials": [list(t) for t in self.trials],
            "start": self.start.to_dict(),
            "reached": control.by_split(self.logits) | {"all": self.reached.to_dict()},
            "latency_ms": latency_ms,
        }


def search(
    trial: Trial,
    candidates: Sequence[str],
    inputs: np.ndarray,
    reference: np.ndarray,
    bound: float,
    limit: int,
    readout: Readout = SINGLE,
) -> Search:
    """The fewest of `candidates`, most sensitive first, to keep in float for agreement ≥ `bound`
    with `reference` (the FP32 logits of `inputs`), at most `limit` of them; `readout` says what agreeing is.

    `inputs`: float32 (N, 3, S, S), the control images, preprocessed. The fully quantized model
    runs on all of them; each later trial only on the images it can change: those it disagrees
    on and the quarter with the smallest FP32 margin (the rest count as they were), so its
    agreement is an estimate and `logits` None until `verify` measures the choice on every image.
    Costs one trial on `RANKING_IMAGES` images per candidate and about 2·log2 of the count
    chosen on the focus images; nothing more when the fully quantized model meets the bound.
    When even `limit` layers miss it, the result has the count that came closest (more float
    layers do not always help: each trial's noise is not additive).

    >>> verify(search(trial, ["conv1", "conv2"], control, fp32_logits, 0.99, limit=8), measure, fp32_logits)
    """
    start_logits = trial([], inputs)
    start = fidelity(start_logits, reference, readout)
    trials = [(0, start.agreement)]
    if start.agreement >= bound or not candidates or limit < 1:
        return Search([], start, start, bound, 0, trials, start_logits)
    worst = np.sort(np.argsort(-readout.delta(start_logits, reference), kind="stable")[:RANKING_IMAGES])
    started = time.monotonic()
    ranking = rank(trial, candidates, inputs[worst], reference[worst], readout)[:limit]
    log.info("agreement search: ranked %d layers in %.1fs", len(candidates), time.monotonic() - started)
    agrees = readout.agree(start_logits, reference)  # (N,)
    margin = readout.margin(reference)
    focus = np.flatnonzero(~agrees | (margin <= np.quantile(margin, 0.25)))
    outside = int(agrees.sum() - agrees[focus].sum())
    measured = {0: start.agreement}

    def meets(count: int) -> bool:
        if count not in measured:
            hits = readout.agree(trial(ranking[:count], inputs[focus]), reference[focus])
            measured[count] = (outside + int(hits.sum())) / len(reference)
            trials.append((count, measured[count]))
            log.info("agreement search: %d layer(s) in float → agreement ~%.4f", count, measured[count])
        return measured[count] >= bound

    def estimate(count: int) -> Search:
        reached = Fidelity(measured[count], float("nan"), len(reference))
        return Search(ranking[:count], start, reached, bound, len(candidates), trials, None, ranking)

    missed, count = 0, 1
    while not meets(count):  # doubling: the first count that meets the bound, or all of the ranking
        if count == len(ranking):  # missed: the count that came closest (the fewest of equals)
            return estimate(max(sorted(c for c in measured if c), key=measured.__getitem__))
        missed, count = count, min(2 * count, len(ranking))
    while count - missed > 1:  # bisection: `missed` misses the bound, `count` meets it
        middle = (missed + count) // 2
        missed, count = (missed, middle) if meets(middle) else (middle, count)
    return estimate(count)


def verify(
    found: Search,
    measure: Callable[[list[str]], np.ndarray],
    reference: np.ndarray,
    extra: int = 4,
    readout: Readout = SINGLE,
) -> tuple[Search, list[list]]:
    """`found` measured on every control image (`measure`: float layers → (N, classes) logits of the model
    that will be the file); while it misses the bound, the next ranked layer joins, at most `extra` more
    (none when the search's estimate already missed it).
    Returns the measured result and each check as [count, agreement]."""
    count, checks = len(found.float_layers), []
    extra = extra if found.met else 0  # the search's estimate missed: the file as it is, measured once
    while True:
        logits = measure(found.ranking[:count])
        result = replace(found, float_layers=found.ranking[:count], logits=logits,
                         reached=fidelity(logits, reference, readout))  # fmt: skip
        checks.append([count, result.reached.agreement])
        if result.met or count >= min(len(found.ranking), len(found.float_layers) + extra):
            return result, checks
        count += 1


def rank(
    trial: Trial, candidates: Sequence[str], inputs: np.ndarray, reference: np.ndarray, readout: Readout = SINGLE
) -> list[str]:
    """`candidates`, most sensitive first: ordered by the error to `reference` (mean Σ|Δ probability|
    per image) that is left when that candidate alone stays in float."""
    error = {}
    for candidate in track(candidates, total=len(candidates), description="ranking layers by agreement sensitivity"):
        error[candidate] = float(readout.delta(trial([candidate], inputs), reference).mean())
    return sorted(candidates, key=error.__getitem__)


def latency_cost(quantized: Engine, controlled: Engine, example: np.ndarray) -> dict[str, float]:
    """p50 batch-1 milliseconds of the fully quantized model and of the one with float layers, timed
    interleaved (the machine's noise hits both alike): what the float layers cost."""
    calls = {"quantized": lambda: quantized.run(example), "with_float_layers": lambda: controlled.run(example)}
    timings = interleaved_latency(calls, rounds=5, runs_per_round=10, warmup=5)
    return {name: round(t["p50"], 3) for name, t in timings.items()}
