"""Headless Chromium screenshots: of a web page, and of an email as a mail client shows it.

Used by the tests that render the stats email and by `make pictures` (docs/pictures.py). The
browser is Debian's `chromium` package (`make browser` installs it when missing and possible);
$CHROMIUM names another binary.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from email import policy
from email.message import EmailMessage
from pathlib import Path


class BrowserError(RuntimeError):
    """Chromium is missing, or did not write the screenshot."""


def chromium() -> str | None:
    """The Chromium binary ($CHROMIUM, else `chromium` on PATH), or None when there is none."""
    return os.environ.get("CHROMIUM") or shutil.which("chromium")


def screenshot(
    url: str, target: Path, *, width: int = 1200, height: int = 800, wait_ms: int = 0
) -> Path:
    """Load `url` in headless Chromium and write a `width` x `height` PNG to `target`.

    `wait_ms`: virtual time given to the page's scripts after it loaded (for single-page apps
    that fetch their data, such as Airflow's UI and dbt docs).
    """
    binary = chromium()
    if binary is None:
        raise BrowserError(
            "No Chromium to take screenshots with: install Debian's `chromium` package "
            "(`make browser`), or set CHROMIUM to a Chromium binary."
        )
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="event-stats-chromium-") as profile:
        argv = [
            binary,
            "--headless",
            "--disable-gpu",
            "--hide-scrollbars",
            "--force-device-scale-factor=1",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={target}",
        ]
        if os.geteuid() == 0:
            argv.append("--no-sandbox")  # Chromium's sandbox refuses to run as root
        if wait_ms:
            argv.append(f"--virtual-time-budget={wait_ms}")
        _run(argv + [url], timeout=120 + wait_ms / 1000)
    if not target.exists():
        raise BrowserError(f"Chromium wrote no screenshot of {url} to {target}")
    return target


def _run(argv: list[str], timeout: float) -> None:
    """Run Chromium in its own process group: on a timeout, stop it and its helpers by PID."""
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise BrowserError(f"Chromium did not finish within {timeout:.0f} s: {argv[-1]}") from None
    if process.returncode != 0:
        tail = output.decode(errors="replace")[-2000:]
        raise BrowserError(f"Chromium failed ({process.returncode}) on {argv[-1]}:\n{tail}")


def email_html_as_mhtml(message: EmailMessage) -> bytes:
    """The email's HTML with its inline images, as an MHTML document (multipart/related) that
    Chromium opens like a mail client: `cid:` references resolve to the parts' Content-IDs."""
    html_part = message.get_body(("html",))
    if html_part is None:
        raise ValueError(f"The email {message['Message-ID']} has no HTML part")
    related = next(
        (
            part
            for part in message.walk()
            if part.get_content_type() == "multipart/related" and html_part in part.iter_parts()
        ),
        html_part,  # no inline images: the HTML alone
    )
    return b"MIME-Version: 1.0\r\n" + related.as_bytes(policy=policy.SMTP)


def screenshot_email(
    message: EmailMessage, target: Path, *, width: int = 900, height: int = 1000
) -> Path:
    """A screenshot of the email's HTML part, images included, as `target` (PNG)."""
    with tempfile.TemporaryDirectory(prefix="event-stats-email-") as folder:
        document = Path(folder) / "email.mhtml"
        document.write_bytes(email_html_as_mhtml(message))
        return screenshot(document.as_uri(), target, width=width, height=height)
