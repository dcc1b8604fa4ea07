"""Looking for secrets (a token, a password) where they must never be: logs, output, tables."""

from __future__ import annotations

from pathlib import Path

import duckdb


def pieces(secret: str) -> list[str]:
    """The secret and its first and last 12 characters: a truncated copy is a leak too."""
    return [secret, secret[:12], secret[-12:]]


def assert_absent(secrets: list[str], texts: list[str], blobs: list[bytes] = ()) -> None:
    """No secret (nor a 12-character end of one) in any of `texts` or `blobs`."""
    assert secrets and all(len(secret) >= 12 for secret in secrets)
    for secret in secrets:
        for piece in pieces(secret):
            for number, text in enumerate(texts):
                assert piece not in text, f"a secret in text {number}"
            for number, blob in enumerate(blobs):
                assert piece.encode() not in blob, f"a secret in blob {number}"


def warehouse_text(path: Path) -> str:
    """Every value of every table of a DuckDB warehouse file, as text ('' when there is none)."""
    if not path.exists():
        return ""
    with duckdb.connect(str(path), read_only=True) as connection:
        tables = connection.execute(
            "select table_schema, table_name from information_schema.tables"
        ).fetchall()
        rows = [
            connection.execute(f'select * from "{schema}"."{name}"').fetchall()
            for schema, name in tables
        ]
    return repr(rows)
