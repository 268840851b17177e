"""Gates stage: pass or fail on measured numbers, and pick the variant to deploy.

Every deployable variant (every exported file; the PyTorch row is the baseline, not a
deployable) is checked against every gate the recipe sets. The selection policy then
picks among the variants that pass them all; when none does, the build fails with exit
code 3, after the report is written, and the message names each failing gate, its
threshold and the measured value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from edgetl.recipe import GatesConfig

# gate → (how to read the measured value, True when larger is better, unit for messages)
_GATES: dict[str, tuple[Callable[[dict], float], bool, str]] = {
    "min_accuracy": (lambda v: v["accuracy"], True, ""),
    "max_accuracy_drop": (lambda v: v["accuracy_drop"], False, ""),
    "min_agreement": (lambda v: v["agreement"], True, ""),
    "max_latency_ms": (lambda v: v["latency_ms"]["p50"], False, " ms"),
    "max_size_mb": (lambda v: v["size_mb"], False, " MB"),
}
_POLICIES: dict[str, tuple[Callable[[dict], tuple], str]] = {
    "fastest": (lambda v: (v["latency_ms"]["p50"], -v["accuracy"]), "the fastest (p50 latency)"),
    "most_accurate": (lambda v: (-v["accuracy"], v["latency_ms"]["p50"]), "the most accurate"),
    "smallest": (lambda v: (v["size_mb"], v["latency_ms"]["p50"]), "the smallest"),
}


@dataclass(frozen=True)
class GateOutcome:
    gate: str
    threshold: float
    variant: str
    value: float
    passed: bool

    def describe(self) -> str:
        """One line: gate, threshold, measured value, variant."""
        _, larger_is_better, unit = _GATES[self.gate]
        relation = "≥" if larger_is_better else "≤"
        return f"gate {self.gate} failed for {self.variant}: needs {relation} {self.threshold:g}{unit}, measured {self.value:.4g}{unit}"


@dataclass(frozen=True)
class Decision:
    outcomes: list[GateOutcome]
    selected: str | None  # the variant to deploy; None when no variant passes every gate
    policy: str
    reason: str

    @property
    def passed(self) -> bool:
        return self.selected is not None

    def failures(self) -> list[str]:
        return [o.describe() for o in self.outcomes if not o.passed]

    def to_dict(self) -> dict:
        return {
            "gates": [asdict(o) for o in self.outcomes],
            "selected": {"name": self.selected, "policy": self.policy, "reason": self.reason} if self.selected else None,
            "passed": self.passed,
        }


def run(variants: list[dict], config: GatesConfig, policy: str) -> Decision:
    """Check every deployable variant against the recipe's gates and select one.

    >>> run(report["variants"], recipe.gates, recipe.select).selected
    'ort-int8'
    """
    deployable = [v for v in variants if v["runtime"] != "pytorch"]
    thresholds = {gate: value for gate, value in config.model_dump().items() if value is not None}
    outcomes = []
    for variant in deployable:
        for gate, threshold in thresholds.items():
            read, larger_is_better, _ = _GATES[gate]
            value = float(read(variant))
            passed = value >= threshold if larger_is_better else value <= threshold
            outcomes.append(GateOutcome(gate, threshold, variant["name"], value, passed))
    failed = {o.variant for o in outcomes if not o.passed}
    candidates = [v for v in deployable if v["name"] not in failed]
    key, description = _POLICIES[policy]
    if not candidates:
        reason = "no variant passes every gate" if deployable else "there is no deployable variant (no runtime was available)"
        return Decision(outcomes, None, policy, reason)
    chosen = min(candidates, key=key)
    gated = f"of the {len(candidates)} variant(s) that pass every gate" if thresholds else f"of the {len(candidates)} variant(s) (no gates set)"
    return Decision(outcomes, chosen["name"], policy, f"{description} {gated}")
