"""The stats email's chart: an inline PNG referenced by Content-ID, the same bytes for the same
stats, a complete text part, and an HTML part that a browser shows with the chart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import date, timedelta
from email.message import EmailMessage
from io import BytesIO
from pathlib import Path

import numpy
from PIL import Image
from report_fixtures import DAY, read_eml, table, write_stats

from event_pipeline import chart, screenshots
from event_pipeline.report import send_stats

# 14 days up to DAY: each a few users; DAY has the most events; 2025-12-26 was never built.
NOT_BUILT = DAY - timedelta(days=10)
ROWS = [
    (DAY - timedelta(days=back), f"10.0.{back}.{user}", 10 + 3 * user + back)
    for back in range(14)
    if DAY - timedelta(days=back) != NOT_BUILT
    for user in range(4)
] + [(DAY, "10.0.0.99", 60)]


def _hex_rgb(color: str) -> tuple[int, int, int]:
    return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))


def count_pixels(image: Image.Image, color: str, tolerance: int = 8) -> int:
    """Pixels within `tolerance` per channel of `color` (#rrggbb)."""
    pixels = numpy.asarray(image.convert("RGB"), dtype=numpy.int16)
    near = numpy.abs(pixels - numpy.array(_hex_rgb(color))) <= tolerance
    return int(near.all(axis=-1).sum())


def send_one(warehouse: Path, outbox: Path) -> EmailMessage:
    send_stats(DAY, warehouse_path=warehouse, recipients=["a@example.com"], outbox_dir=outbox)
    [eml] = outbox.glob("*.eml")
    return read_eml(eml)


def png_chunks(png: bytes) -> list[str]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(png):
        length = int.from_bytes(png[at : at + 4], "big")
        chunks.append(png[at + 4 : at + 8].decode("ascii"))
        at += 12 + length
    return chunks


def test_the_email_is_text_or_html_with_the_chart_as_an_inline_png(tmp_path: Path):
    warehouse = tmp_path / "warehouse.duckdb"
    write_stats(warehouse, ROWS)
    message = send_one(warehouse, tmp_path / "outbox")

    # multipart/alternative: text/plain, then multipart/related (text/html, image/png)
    assert message.get_content_type() == "multipart/alternative"
    text_part, related = message.iter_parts()
    assert text_part.get_content_type() == "text/plain"
    assert related.get_content_type() == "multipart/related"
    html_part, image_part = related.iter_parts()
    assert (html_part.get_content_type(), image_part.get_content_type()) == (
        "text/html",
        "image/png",
    )
    content_id = image_part["Content-ID"].strip()
    assert content_id.startswith("<") and content_id.endswith(">")
    assert f"src='cid:{content_id[1:-1]}'" in html_part.get_content()
    png = image_part.get_content()
    with Image.open(BytesIO(png)) as image:
        assert image.format == "PNG" and image.size == (chart.WIDTH_PX, chart.HEIGHT_PX)
        assert count_pixels(image, chart.HIGHLIGHT) > 200  # the day's bar
        assert count_pixels(image, chart.USERS) > 2000  # the top users' bars

    # The text part alone says everything the chart shows.
    text = text_part.get_content()
    assert "Total events: 118" in text and "Users:        5" in text
    assert "Events per day, last 14 days:" in text
    day_lines = [
        line
        for line in text.splitlines()
        if line.startswith("  2025-12-") or line.startswith("  2026-01-")
    ]
    assert [line.split()[0] for line in day_lines] == [
        str(DAY - timedelta(days=back)) for back in range(13, -1, -1)
    ]
    assert day_lines[-1].endswith("<- this email") and "118" in day_lines[-1]
    assert any(str(NOT_BUILT) in line and "not built" in line for line in day_lines)
    assert "10.0.0.99" in text and text.index("10.0.0.99") < text.index("10.0.0.3")


_COMPOSE = """
import hashlib, json, sys
from datetime import date
from event_pipeline.report import compose_email
from event_pipeline.warehouse.stats import DailyTotal, DayStats
spec = json.loads(sys.argv[1])
day = DayStats(date.fromisoformat(spec["day"]), tuple(map(tuple, spec["counts"])))
history = tuple(DailyTotal(date.fromisoformat(d), e, u, b) for d, e, u, b in spec["history"])
message = compose_email(day, sender="s@example.com", recipient="a@example.com",
                        message_id="<m.1@example.com>", history=history)
del message["Date"]
png = message.get_payload()[1].get_payload()[1].get_content()
print(json.dumps({"png": hashlib.sha256(png).hexdigest(),
                  "message": hashlib.sha256(bytes(message)).hexdigest()}))
"""


def test_the_same_stats_give_the_same_chart_and_message_bytes_in_any_process(tmp_path: Path):
    """Two processes with different matplotlib settings and font caches: the same bytes."""
    counts = [["10.0.0.2", 12], ["10.0.0.1", 5], ["10.0.0.3", 1]]
    history = [
        [str(DAY - timedelta(days=back)), 100 + back, 9, back != 4] for back in range(13, 0, -1)
    ] + [[str(DAY), 18, 3, True]]
    spec = json.dumps({"day": str(DAY), "counts": counts, "history": history})
    digests = []
    for name, rc in [
        ("plain", ""),
        ("odd", "font.family: serif\nfigure.dpi: 50\nlines.linewidth: 9\n"),
    ]:
        config = tmp_path / name  # an empty font cache, and a user's matplotlibrc
        config.mkdir()
        (config / "matplotlibrc").write_text(rc)
        env = {**os.environ, "MPLCONFIGDIR": str(config), "TZ": "Asia/Tokyo" if rc else "UTC"}
        done = subprocess.run(
            [sys.executable, "-c", _COMPOSE, spec], capture_output=True, text=True, env=env
        )
        assert done.returncode == 0, done.stderr
        digests.append(json.loads(done.stdout))
    assert digests[0] == digests[1]

    from event_pipeline.warehouse.stats import DailyTotal, DayStats

    day = DayStats(DAY, tuple(map(tuple, counts)))
    png = chart.day_chart_png(
        day, [DailyTotal(date.fromisoformat(d), e, u, b) for d, e, u, b in history], top=10
    )
    assert set(png_chunks(png)) <= {"IHDR", "pHYs", "IDAT", "IEND"}  # no time, no metadata text


def test_a_rerun_with_unchanged_stats_sends_nothing_and_changed_stats_a_new_chart(tmp_path: Path):
    warehouse, outbox = tmp_path / "warehouse.duckdb", tmp_path / "outbox"
    write_stats(warehouse, ROWS)
    first = send_one(warehouse, outbox)

    again = send_stats(
        DAY, warehouse_path=warehouse, recipients=["a@example.com"], outbox_dir=outbox
    )
    assert [r.status for r in again] == ["unchanged"]
    # An earlier day of the chart changed: that day's email is updated, not this one.
    write_stats(
        warehouse,
        [r for r in ROWS if r[0] != DAY - timedelta(days=1)],
        built=(DAY - timedelta(days=1),),
    )
    again = send_stats(
        DAY, warehouse_path=warehouse, recipients=["a@example.com"], outbox_dir=outbox
    )
    assert [r.status for r in again] == ["unchanged"]
    assert len(list(outbox.glob("*.eml"))) == 1

    write_stats(warehouse, ROWS + [(DAY, "10.0.0.100", 7)])
    [update] = send_stats(
        DAY, warehouse_path=warehouse, recipients=["a@example.com"], outbox_dir=outbox
    )
    assert (update.status, update.revision) == ("sent", 2)
    [second] = [
        read_eml(p) for p in outbox.glob("*.eml") if update.message_id in read_eml(p)["Message-ID"]
    ]
    chart_of = lambda m: m.get_payload()[1].get_payload()[1].get_content()  # noqa: E731
    assert chart_of(second) != chart_of(first)
    assert "Total events: 125" in second.get_body(("plain",)).get_content()
    assert table(warehouse, "select count(*) from ops.email_log") == [(2,)]


def test_the_html_part_renders_in_chromium_with_the_chart(chromium: str, tmp_path: Path):
    warehouse = tmp_path / "warehouse.duckdb"
    write_stats(warehouse, ROWS)
    message = send_one(warehouse, tmp_path / "outbox")

    shot = screenshots.screenshot_email(message, tmp_path / "email.png")
    with Image.open(shot) as image:
        assert image.size == (900, 1000)
        ink = int((numpy.asarray(image.convert("L")) < 200).sum())
        assert ink > 0.03 * image.width * image.height, "the page is (almost) blank"
        assert count_pixels(image, chart.HIGHLIGHT) > 200, "the chart's day bar is not shown"

    # The same HTML without its image part: no chart pixels (the check above can fail).
    related = message.get_payload()[1]
    related.set_payload([related.get_payload()[0]])
    shot = screenshots.screenshot_email(message, tmp_path / "email-without-image.png")
    with Image.open(shot) as image:
        assert count_pixels(image, chart.HIGHLIGHT) == 0
