"""Inline SVG charts for the self-contained HTML reports (no scripts, no network)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from markupsafe import Markup

MAX_BARS = 30
BAR_HEIGHT_PX = 18
LABEL_WIDTH_PX = 200
CHART_WIDTH_PX = 720
PALETTE = ("#2b6cb0", "#c05621", "#2f855a", "#b83280", "#6b46c1", "#b7791f")


def bar_chart(title: str, labels: Sequence[str], values: Sequence[int], unit: str = "", color: int = 0) -> Markup:
    """A horizontal bar chart as an ``<svg>`` element; at most :data:`MAX_BARS` bars (largest first kept)."""
    pairs = list(zip(labels, values, strict=True))[:MAX_BARS]
    top = 28
    height = top + max(1, len(pairs)) * (BAR_HEIGHT_PX + 6) + 10
    span = max([abs(int(v)) for _, v in pairs] + [1])
    plot_w = CHART_WIDTH_PX - LABEL_WIDTH_PX - 110
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" role="img" aria-label="{escape(title)}" width="{CHART_WIDTH_PX}" '
        f'height="{height}" viewBox="0 0 {CHART_WIDTH_PX} {height}" class="chart">',
        f'<text x="0" y="16" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    if not pairs:
        parts.append(f'<text x="0" y="{top + 14}" font-size="12" fill="#666">no data</text>')
    for i, (label, value) in enumerate(pairs):
        y = top + i * (BAR_HEIGHT_PX + 6)
        w = max(1, round(abs(int(value)) / span * plot_w)) if value else 0
        fill = PALETTE[color % len(PALETTE)] if int(value) >= 0 else "#c53030"
        parts.append(f'<text x="{LABEL_WIDTH_PX - 6}" y="{y + 13}" font-size="12" text-anchor="end">{escape(str(label))}</text>')
        parts.append(f'<rect x="{LABEL_WIDTH_PX}" y="{y}" width="{w}" height="{BAR_HEIGHT_PX}" fill="{fill}"/>')
        parts.append(f'<text x="{LABEL_WIDTH_PX + w + 6}" y="{y + 13}" font-size="12">{escape(f"{value:,}{unit}")}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
