"""The stats email's chart: the last days' event totals with the day highlighted, and its top users.

One PNG, the same bytes for the same input on any machine with the locked packages: matplotlib's
Agg renderer with its default settings (never a user's matplotlibrc), the DejaVu fonts shipped
inside matplotlib (never a system font that differs between machines), and no metadata chunk
(matplotlib writes its version as "Software"; Agg writes no time stamp). Knows no warehouse.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

from event_pipeline.warehouse.stats import DailyTotal, DayStats

HISTORY_DAYS = 14
WIDTH_PX, HEIGHT_PX = 800, 560
HIGHLIGHT = "#d9480f"  # the email's day; used nowhere else in the chart
OTHER_DAYS = "#a5b4c8"
USERS = "#3b6ea5"


def day_chart_png(day: DayStats, history: Sequence[DailyTotal], *, top: int) -> bytes:
    """A PNG of `history`'s totals (day.event_date highlighted) above `day`'s top users."""
    import matplotlib
    from matplotlib.figure import Figure  # savefig renders a PNG with Agg, whatever the backend

    defaults = {k: v for k, v in matplotlib.rcParamsDefault.items() if k != "backend"}
    with matplotlib.rc_context(defaults):
        figure = Figure(figsize=(WIDTH_PX / 100, HEIGHT_PX / 100), dpi=100)
        totals_axes, users_axes = figure.subplots(2, 1, height_ratios=[1, 1])
        _plot_totals(totals_axes, day, history)
        _plot_top_users(users_axes, day, top)
        figure.tight_layout(h_pad=2.0)
        _use_bundled_fonts(figure)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return buffer.getvalue()


def _plot_totals(axes, day: DayStats, history: Sequence[DailyTotal]) -> None:  # noqa: ANN001
    days = list(history) or [DailyTotal(day.event_date, day.total_events, day.users, True)]
    positions = range(len(days))
    heights = [d.events for d in days]
    colors = [HIGHLIGHT if d.event_date == day.event_date else OTHER_DAYS for d in days]
    axes.bar(positions, heights, color=colors, width=0.7)
    axes.set_xticks(
        list(positions), [f"{d.event_date:%a}\n{d.event_date:%m-%d}" for d in days], fontsize=8
    )
    top_value = max(heights) if any(heights) else 1
    for position, total in zip(positions, days, strict=True):
        if total.event_date == day.event_date or not total.built:
            label = f"{total.events:,}" if total.built else "not built"
            axes.annotate(
                label,
                (position, total.events),
                xytext=(0, 3),
                textcoords="offset points",
                ha="center",
                fontsize=8,
                fontweight="bold" if total.built else "normal",
                color=HIGHLIGHT if total.built else "#555555",
            )
    axes.set_ylim(0, top_value * 1.18)
    axes.set_title(
        f"Events per day, {days[0].event_date} to {days[-1].event_date} (UTC)", fontsize=10
    )
    axes.spines[["top", "right"]].set_visible(False)
    axes.tick_params(axis="y", labelsize=8)


def _plot_top_users(axes, day: DayStats, top: int) -> None:  # noqa: ANN001
    rows = day.counts[:top]
    axes.set_title(f"Top {len(rows)} users on {day.event_date}", fontsize=10)
    axes.spines[["top", "right"]].set_visible(False)
    if not rows:
        axes.set_axis_off()
        axes.text(0.5, 0.5, "No events on this date", ha="center", va="center", fontsize=10)
        return
    positions = range(len(rows))
    axes.barh(positions, [count for _, count in rows], color=USERS, height=0.7)
    axes.set_yticks(list(positions), [user for user, _ in rows], fontsize=8)
    axes.invert_yaxis()  # the most active user on top
    for position, (_, count) in zip(positions, rows, strict=True):
        axes.annotate(
            f"{count:,}",
            (count, position),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    axes.set_xlim(0, rows[0][1] * 1.12)
    axes.tick_params(axis="x", labelsize=8)


def _use_bundled_fonts(figure) -> None:  # noqa: ANN001
    """Every text in matplotlib's own DejaVu Sans files (regular or bold), whatever is installed."""
    import matplotlib
    from matplotlib.font_manager import FontProperties
    from matplotlib.text import Text

    fonts = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    for text in figure.findobj(Text):
        bold = text.get_fontweight() in {"bold", 700, "heavy"}
        path = fonts / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
        text.set_fontproperties(FontProperties(fname=path, size=text.get_fontsize()))
