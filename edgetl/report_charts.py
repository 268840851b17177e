"""Charts for the HTML report, drawn by matplotlib as inline SVG so the page opens offline.

matplotlib is imported inside the functions: importing the report stays cheap for the CLI,
and the torch-free runtime never draws anything. Figures get their own Agg canvas instead
of going through pyplot, so no global backend or figure registry is touched. SVG text stays
text (`svg.fonttype: none`): the page is smaller, its labels searchable.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.text import Text
    from matplotlib.transforms import Bbox

MARKERS = "osD^vPX*"
# Where a point's name may go, tried in order: beside the point first, since the vertical
# error bar occupies the space straight above and below it.
_LABEL_OFFSETS = (
    (7, 0, "left", "center"),
    (-7, 0, "right", "center"),
    (7, 8, "left", "bottom"),
    (7, -8, "left", "top"),
    (-7, 8, "right", "bottom"),
    (-7, -8, "right", "top"),
    (0, 14, "center", "bottom"),
    (0, -14, "center", "top"),
    (7, 18, "left", "bottom"),
    (-7, 18, "right", "bottom"),
    (7, -18, "left", "top"),
    (-7, -18, "right", "top"),
)


@dataclass(frozen=True)
class ChartPoint:
    """One variant on the accuracy-vs-latency chart; accuracy and its interval are fractions."""

    label: str
    latency_ms: float
    accuracy: float
    ci95: tuple[float, float] | None = None


@dataclass(frozen=True)
class Series:
    """The points drawn with one marker and colour: one run's variants."""

    name: str
    points: tuple[ChartPoint, ...]


def accuracy_latency_svg(
    series: Sequence[Series],
    front: Sequence[ChartPoint],
    floor: tuple[str, float] | None = None,
    max_latency_ms: float | None = None,
) -> str:
    """Accuracy (with 95% CI bars) against p50 latency, the Pareto front as a step line, and
    the accuracy and latency gates as lines (`floor`: the accuracy gate's name and value, `metric_floor`).

    >>> svg = accuracy_latency_svg([Series("run", (ChartPoint("onnx-fp32", 2.5, 0.99),))], [])
    """
    from matplotlib.ticker import FuncFormatter

    with _style("accuracy-latency"):
        fig, ax = _figure((9.4, 5.0))
        everything = [p for s in series for p in s.points]
        for k, s in enumerate(series):
            ax.errorbar(
                [p.latency_ms for p in s.points],
                [p.accuracy * 100 for p in s.points],
                yerr=_ci_bars(s.points),
                fmt=MARKERS[k % len(MARKERS)],
                color=f"C{k % 10}",
                markersize=7,
                capsize=3,
                elinewidth=1,
                label=s.name,
                zorder=3,
            )
        if front:
            xs, ys = _steps(front, right=max(p.latency_ms for p in everything))
            ax.plot(xs, ys, color="0.4", linewidth=1.2, zorder=2, label="Pareto front")
        _gate_lines(ax, floor, max_latency_ms)
        latencies = [p.latency_ms for p in everything] + ([max_latency_ms] if max_latency_ms is not None else [])
        _latency_axis(ax, latencies)
        ax.margins(x=0.12, y=0.2)  # room for two rows of names above the top points
        ax.set_xlabel("p50 latency (ms) · lower is better")
        ax.set_ylabel("test accuracy (%) · higher is better")
        # The margin above the top points is room for names, not an accuracy past 100%.
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:.1f}" if y <= 100 else ""))
        ax.grid(alpha=0.3, which="major")
        ax.grid(alpha=0.1, which="minor")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
        # One run: dark names. Several: each name in its run's colour, so it is clear whose it is.
        _label_points(
            fig, ax, [(p, f"C{k % 10}" if len(series) > 1 else "0.15") for k, s in enumerate(series) for p in s.points]
        )
        return _svg(fig)


def agreement_latency_svg(points: Sequence[ChartPoint], min_agreement: float | None = None) -> str:
    """Top-1 agreement with the FP32 model (each point's `accuracy` holds it) against p50 latency, with the
    lowest `quantize[].min_agreement` bound as a line: what accuracy on a small test split hides.

    >>> svg = agreement_latency_svg([ChartPoint("ort-int8", 2.5, 0.992)], 0.99)
    """
    with _style("agreement-latency"):
        fig, ax = _figure((9.4, 3.6))
        ax.plot([p.latency_ms for p in points], [p.accuracy * 100 for p in points], "o", color="C2", markersize=7,
                label="variants", zorder=3)  # fmt: skip
        if min_agreement is not None:
            label = f"min_agreement {min_agreement * 100:.2f}%"
            ax.axhline(min_agreement * 100, color="tab:red", linestyle="--", linewidth=1, label=label)
        _latency_axis(ax, [p.latency_ms for p in points])
        ax.margins(x=0.12, y=0.25)
        ax.set_xlabel("p50 latency (ms) · lower is better")
        ax.set_ylabel("agreement with FP32 (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8)
        _label_points(fig, ax, [(p, "0.15") for p in points])
        return _svg(fig)


def metric_floor(threshold: Callable[[str], float | None]) -> tuple[str, float] | None:
    """The charted metric's gate as (name, value), from `threshold(gate name)`: `min_accuracy`, else a label
    set's `min_map` (the accuracy a multi-label build charts is its mAP); None when neither is set."""
    return next(((gate, value) for gate in ("min_accuracy", "min_map") if (value := threshold(gate)) is not None), None)


def _gate_lines(ax: Axes, floor: tuple[str, float] | None, max_latency_ms: float | None) -> None:
    """The accuracy and latency gates, where the recipe sets them, as a horizontal and a vertical line."""
    if floor is not None:
        gate, value = floor
        ax.axhline(value * 100, color="tab:red", linestyle="--", linewidth=1, label=f"gate {gate} {value * 100:.2f}%")
    if max_latency_ms is not None:
        label = f"gate max_latency_ms {max_latency_ms:g} ms"
        ax.axvline(max_latency_ms, color="tab:purple", linestyle=":", linewidth=1.4, label=label)


def confusion_svg(matrix: Sequence[Sequence[int]], classes: Sequence[str]) -> str:
    """Counts per (true, predicted) cell, shaded by the share of the true class, so a rare
    class's errors stand out as much as a frequent one's."""
    import numpy as np

    with _style("confusion"):
        counts = np.asarray(matrix)  # (K, K): rows true, columns predicted
        k = len(classes)
        side = min(max(3.0, 0.4 * k + 1.6), 9.0)
        fig, ax = _figure((side + 0.4, side))
        share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
        long_names = max(map(len, classes)) > 3  # would collide side by side under the columns
        ax.set_xticks(
            range(k), labels=list(classes), rotation=45 if long_names else 0, ha="right" if long_names else "center"
        )
        ax.set_yticks(range(k), labels=list(classes))
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if k <= 25:  # beyond that the numbers would be unreadable; the shading still is not
            for i in range(k):
                for j in range(k):
                    colour = "white" if share[i, j] > 0.6 else ("0.2" if counts[i, j] else "0.7")
                    ax.text(
                        j, i, str(counts[i, j]), ha="center", va="center", color=colour, fontsize=8 if k > 12 else 9
                    )
        return _svg(fig)


def training_svg(history: Sequence[dict], best_epoch: int | None) -> str:
    """Train loss and validation accuracy per epoch, side by side, the best epoch marked."""
    from matplotlib.ticker import MaxNLocator

    with _style("training"):
        fig, (loss_ax, acc_ax) = _figure((8.0, 2.9), columns=2)
        epochs = [h["epoch"] for h in history]
        val = [h["val_accuracy"] * 100 for h in history]
        loss_ax.plot(epochs, [h["train_loss"] for h in history], marker="o", markersize=3, color="C0")
        acc_ax.plot(epochs, val, marker="o", markersize=3, color="C2")
        loss_ax.set_title("train loss", fontsize=9)
        acc_ax.set_title("validation accuracy (%)", fontsize=9)
        for ax in (loss_ax, acc_ax):
            if best_epoch is not None:
                ax.axvline(
                    best_epoch, color="tab:orange", linestyle="--", linewidth=1, label=f"best epoch {best_epoch}"
                )
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        if best_epoch in epochs:
            acc_ax.plot(
                [best_epoch],
                [val[epochs.index(best_epoch)]],
                marker="*",
                markersize=12,
                color="tab:orange",
                linestyle="none",
            )
        acc_ax.legend(loc="lower right", fontsize=8)
        fig.set_layout_engine("constrained")
        return _svg(fig)


def _style(salt: str) -> AbstractContextManager:
    """Text as text, and ids salted per chart so they are stable and unique in one page."""
    import matplotlib

    return matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt, "font.size": 9})


def _figure(size: tuple[float, float], columns: int = 1) -> tuple[Figure, Axes]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, columns)


def _svg(fig: Figure) -> str:
    """The figure as an `<svg>` element, without the XML prolog that HTML does not want."""
    buffer = io.StringIO()
    with warnings.catch_warnings():
        # Text stays text in the SVG (`svg.fonttype: none`) with a sans-serif fallback, so the
        # browser draws a class name's emoji or CJK glyphs with its own fonts; matplotlib only
        # measures them, and warns that its DejaVu Sans lacks them.
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)
        fig.savefig(
            buffer,
            format="svg",
            bbox_inches="tight",
            metadata={"Date": None, "Creator": None, "Format": None, "Type": None},
        )
    text = buffer.getvalue()
    return text[text.index("<svg") :]


def _ci_bars(points: Sequence[ChartPoint]) -> list[list[float]]:
    """(2, N) distances in % from each accuracy down and up to its 95% CI; 0 without one."""
    low = [max(p.accuracy - p.ci95[0], 0.0) * 100 if p.ci95 else 0.0 for p in points]
    high = [max(p.ci95[1] - p.accuracy, 0.0) * 100 if p.ci95 else 0.0 for p in points]
    return [low, high]


def _steps(front: Sequence[ChartPoint], right: float) -> tuple[list[float], list[float]]:
    """The Pareto front's staircase as explicit vertices (not `drawstyle`), so label placement
    sees the segments that are drawn. It stays flat out to `right`: a slower variant is only
    worth it if it is more accurate."""
    xs, ys = [front[0].latency_ms], [front[0].accuracy * 100]
    for p in front[1:]:
        xs += [p.latency_ms, p.latency_ms]
        ys += [ys[-1], p.accuracy * 100]
    return xs + [right], ys + [ys[-1]]


def _latency_axis(ax: Axes, latencies: Sequence[float]) -> None:
    """Log scale when latencies span 5× or more, ticked at 1-2-5 in plain numbers."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    low, high = min(latencies), max(latencies)
    if low > 0 and high / low >= 5:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())


def _label_points(fig: Figure, ax: Axes, points: Sequence[tuple[ChartPoint, str]]) -> None:
    """Name every (point, text colour) where its label stays inside the axes and covers the
    least: another label is worst, then a marker or error bar; a line (the label has a white
    backing) is least bad."""
    from matplotlib.transforms import Bbox

    fig.canvas.draw()  # fixes the axis limits the pixel positions depend on
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    to_pixels = ax.transData.transform
    taken: list[tuple[Bbox, int]] = []  # (area, cost of covering it)
    for p, _ in points:
        x, y = to_pixels((p.latency_ms, p.accuracy * 100))
        low, high = p.ci95 or (p.accuracy, p.accuracy)
        y_low, y_high = to_pixels((p.latency_ms, low * 100))[1], to_pixels((p.latency_ms, high * 100))[1]
        taken.append((Bbox([[x - 5, min(y_low, y - 5)], [x + 5, max(y_high, y + 5)]]), 3))
    for line in ax.get_lines():  # the front and the gate lines; all their segments are axis-aligned
        if line.get_linestyle() not in ("None", ""):
            xy = line.get_transform().transform(line.get_xydata())
            taken += [
                (Bbox([[min(a[0], b[0]) - 1, min(a[1], b[1]) - 1], [max(a[0], b[0]) + 1, max(a[1], b[1]) + 1]]), 1)
                for a, b in zip(xy[:-1], xy[1:])
            ]
    for p, colour in sorted(points, key=lambda pc: (pc[0].latency_ms, -pc[0].accuracy)):
        best: tuple[int, Text, Bbox] | None = None
        for offset in _LABEL_OFFSETS:
            text = _annotate(ax, p, colour, *offset)
            box = text.get_window_extent(renderer).padded(2)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            cost = 100 * (not inside) + sum(weight for other, weight in taken if box.overlaps(other))
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, text, box)
            else:
                text.remove()
            if cost == 0:
                break
        taken.append((best[2], 10))


def _annotate(ax: Axes, p: ChartPoint, colour: str, dx: float, dy: float, ha: str, va: str) -> Text:
    # A translucent white box keeps the name readable where it has to cross a line.
    return ax.annotate(
        p.label,
        (p.latency_ms, p.accuracy * 100),
        xytext=(dx, dy),
        textcoords="offset points",
        ha=ha,
        va=va,
        color=colour,
        fontsize=8,
        bbox={"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.75},
    )
