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

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

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
# What the device installs to run a variant of each runtime (the base install is the ONNX Runtime one).
_INSTALL = {"onnxruntime": "pip install edgetl", "openvino": "pip install 'edgetl[openvino]'"}


def install_command(runtime: str) -> str:
    """The pip command that gives a device `runtime`: `pip install edgetl` for onnxruntime."""
    return _INSTALL[runtime]


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
    runtime: str | None = None  # the selected variant's runtime

    @property
    def passed(self) -> bool:
        return self.selected is not None

    def failures(self) -> list[str]:
        return [o.describe() for o in self.outcomes if not o.passed]

    def to_dict(self) -> dict:
        return {
            "gates": [asdict(o) for o in self.outcomes],
            "selected": {"name": self.selected, "policy": self.policy, "reason": self.reason, "runtime": self.runtime,
                         "install": install_command(self.runtime)} if self.selected else None,
            "passed": self.passed,
        }


def run(variants: list[dict], config: GatesConfig, policy: str,
        device_runtimes: Sequence[str] | None = None) -> Decision:
    """Check every deployable variant against the recipe's gates and select one that runs on
    `device_runtimes` (None: any runtime).

    >>> run(report["variants"], recipe.gates, recipe.select, recipe.device.runtimes).selected
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
    passing = [v for v in deployable if v["name"] not in failed]
    candidates = [v for v in passing if device_runtimes is None or v["runtime"] in device_runtimes]
    elsewhere = ", ".join(f"{v['name']} ({v['runtime']})" for v in passing if v not in candidates)
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
    which = " and ".join(filter(None, ["pass every gate" if thresholds else "", on_device]))
    reason = f"{description} of the {len(candidates)} variant(s)" + (f" that {which}" if which else "")
    reason += "" if thresholds else " (no gates set)"
    reason += f"; not considered, measured on a runtime the device lacks: {elsewhere}" if elsewhere else ""
    return Decision(outcomes, chosen["name"], policy, reason, chosen["runtime"])
