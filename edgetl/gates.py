"""Gates stage: pass or fail on measured numbers, and pick the variant to deploy.

Every deployable variant (every exported file; the PyTorch row is the baseline, not a
deployable) is checked against every gate the recipe sets. The selection policy then
picks among the variants that pass them all and were measured on a runtime the device has
(`device.runtimes`: a variant's numbers hold on the runtime they were measured on, so an
ONNX file measured on ONNX Runtime is not picked for an OpenVINO-only device); when none
does, the build fails with exit code 3, after the report is written, and the message
names each failing gate, its threshold and the measured value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from edgetl.recipe import GatesConfig
from edgetl.runtime.metrics import VariantMetrics, known_fields, present_fields


@dataclass(frozen=True)
class Gate:
    """One of the recipe's `gates`: the measured value it bounds and how to say it.

    `unit` says what the value is: "fraction" (0.98: reports show 98.00%), "points" (a
    difference of two fractions: 0.0074 shows as 0.74 pt), "ms" or "MB".
    """

    name: str  # the recipe's field (`gates.<name>`): the label messages and reports give the gate
    larger_is_better: bool  # min_* gates; the value must be ≥ the threshold, else ≤
    unit: Literal["fraction", "points", "ms", "MB"]
    read: Callable[[VariantMetrics], float]

    @property
    def relation(self) -> str:
        return "≥" if self.larger_is_better else "≤"

    @property
    def suffix(self) -> str:
        """The unit as messages append it to a number: fractions have none."""
        return f" {self.unit}" if self.unit in ("ms", "MB") else ""

    def passes(self, value: float, threshold: float) -> bool:
        return value >= threshold if self.larger_is_better else value <= threshold


def _every_task(v: VariantMetrics, field: str, worst: Callable) -> float:
    """A multi-task row's worst task's `field` (every task must pass the gate), else the row's own."""
    return worst(t[field] for t in v.tasks.values()) if v.tasks else getattr(v, field)


# The one gate table: `run` checks it; GateOutcome.describe (the build's GateFailure message) and the
# reports (report_content.gate_rule, gate_value) read it.
GATES: dict[str, Gate] = {
    gate.name: gate
    for gate in (
        Gate("min_accuracy", True, "fraction", lambda v: _every_task(v, "accuracy", min)),
        Gate("min_map", True, "fraction", lambda v: v.accuracy),  # a multi-label row's `accuracy` is its test mAP
        Gate("max_accuracy_drop", False, "points", lambda v: _every_task(v, "accuracy_drop", max)),
        Gate("min_agreement", True, "fraction", lambda v: v.agreement),
        Gate("max_latency_ms", False, "ms", lambda v: v.latency_ms.p50),
        Gate("max_size_mb", False, "MB", lambda v: v.size_mb),
        # not a `gates` field: each quantized variant's own `quantize[].min_agreement`, checked on the test split
        Gate("quantize.min_agreement", True, "fraction", lambda v: v.agreement),
    )
}
_POLICIES: dict[str, tuple[Callable[[VariantMetrics], tuple], str]] = {
    "fastest": (lambda v: (v.latency_ms.p50, -v.accuracy), "the fastest (p50 latency)"),
    "most_accurate": (lambda v: (-v.accuracy, v.latency_ms.p50), "the most accurate"),
    "smallest": (lambda v: (v.size_mb, v.latency_ms.p50), "the smallest"),
}
# What the device installs to run a variant of each runtime (the base install is the ONNX Runtime one).
_INSTALL = {"onnxruntime": "pip install edgetl", "openvino": "pip install 'edgetl[openvino]'"}


def install_command(runtime: str) -> str:
    """The pip command that gives a device `runtime`: `pip install edgetl` for onnxruntime."""
    return _INSTALL[runtime]


@dataclass(frozen=True)
class GateOutcome:
    """One gate checked on one variant; a row of report.json's `gates`."""

    gate: str
    threshold: float
    variant: str
    value: float
    passed: bool
    # False for a variant whose recipe lets it be selected below its bound (`allow_below_agreement`): marked only
    enforced: bool = True

    def describe(self) -> str:
        """One line: gate, threshold, measured value, variant."""
        gate = GATES[self.gate]
        allowed = "" if self.enforced else " (allowed: allow_below_agreement)"
        return (
            f"gate {self.gate} failed for {self.variant}: needs {gate.relation} {self.threshold:g}{gate.suffix}, "
            f"measured {self.value:.4g}{gate.suffix}{allowed}"
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateOutcome:
        """Raises KeyError naming a missing field, TypeError when `data` is not a mapping."""
        return cls(**known_fields(cls, data))


@dataclass(frozen=True, kw_only=True)
class Selection:
    """The variant to deploy and why; report.json's `selected`."""

    name: str
    policy: str
    reason: str
    runtime: str | None = None  # None in reports written before selection knew runtimes
    install: str | None = None  # what the device installs to run it
    bundle_sha256: str | None = None  # the bundle's digest, once it is packed

    def to_dict(self) -> dict[str, Any]:
        """Fields that are None (absent in older reports) are left out."""
        return present_fields(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Selection:
        """Raises KeyError naming a missing field, TypeError when `data` is not a mapping."""
        return cls(**known_fields(cls, data))


@dataclass(frozen=True)
class Decision:
    outcomes: list[GateOutcome]
    selected: str | None  # the variant to deploy; None when no variant passes every gate
    policy: str
    reason: str
    runtime: str | None = None  # the selected variant's runtime

    @property
    def passed(self) -> bool:
        return self.selected is not None

    @property
    def selection(self) -> Selection | None:
        """The report's `selected`: None when no variant passes."""
        if self.selected is None:
            return None
        return Selection(
            name=self.selected,
            policy=self.policy,
            reason=self.reason,
            runtime=self.runtime,
            install=install_command(self.runtime),
        )

    def failures(self) -> list[str]:
        return [o.describe() for o in self.outcomes if not o.passed]


def run(
    variants: list[VariantMetrics],
    config: GatesConfig,
    policy: str,
    device_runtimes: Sequence[str] | None = None,
    agreement_bounds: dict[str, tuple[float, bool]] | None = None,
) -> Decision:
    """Check every deployable variant against the recipe's gates and its own agreement bound, and select one
    that runs on `device_runtimes` (None: any runtime).

    `agreement_bounds`: variant name → (`quantize[].min_agreement`, `allow_below_agreement`). A variant whose
    test agreement is below its bound gets a failed `quantize.min_agreement` outcome and is not selected,
    unless allowed (the outcome is then marked, not enforced).

    >>> run(report.variants, recipe.gates, recipe.select, recipe.device.runtimes, {"ort-int8": (0.99, False)}).selected
    'ort-int8'
    """
    deployable = [v for v in variants if v.runtime != "pytorch"]
    thresholds = {gate: value for gate, value in config.model_dump().items() if value is not None}
    outcomes = []
    for variant in deployable:
        for gate, threshold in thresholds.items():
            value = float(GATES[gate].read(variant))
            outcomes.append(GateOutcome(gate, threshold, variant.name, value, GATES[gate].passes(value, threshold)))
        if variant.name in (agreement_bounds or {}):
            bound, allowed = agreement_bounds[variant.name]
            agreement = float(variant.agreement)
            outcomes.append(
                GateOutcome("quantize.min_agreement", bound, variant.name, agreement, agreement >= bound, not allowed)
            )
    failed = {o.variant for o in outcomes if not o.passed and o.enforced}
    passing = [v for v in deployable if v.name not in failed]
    candidates = [v for v in passing if device_runtimes is None or v.runtime in device_runtimes]
    elsewhere = ", ".join(f"{v.name} ({v.runtime})" for v in passing if v not in candidates)
    on_device = f"run on the device's {' or '.join(device_runtimes)} (`device.runtimes`)" if device_runtimes else ""
    key, description = _POLICIES[policy]
    if not candidates:
        if elsewhere:
            reason = f"no variant that passes every gate can {on_device}; {elsewhere} would: add its runtime there"
        elif deployable:
            reason = "no variant passes every gate"
        else:
            reason = "there is no deployable variant (no runtime was available)"
        return Decision(outcomes, None, policy, reason)
    chosen = min(candidates, key=key)
    checked = thresholds or agreement_bounds
    which = " and ".join(filter(None, ["pass every gate" if checked else "", on_device]))
    reason = f"{description} of the {len(candidates)} variant(s)" + (f" that {which}" if which else "")
    reason += "" if checked else " (no gates set)"
    reason += f"; not considered, measured on a runtime the device lacks: {elsewhere}" if elsewhere else ""
    return Decision(outcomes, chosen.name, policy, reason, chosen.runtime)
