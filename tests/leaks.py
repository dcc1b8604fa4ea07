"""Looking for secrets (a token, a password) where they must never be: logs, output, tables."""

from __future__ import annotations

from pathlib import Path


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
    """Every value of every table of a warehouse (a DuckLake directory or a DuckDB file), as text
    ('' when there is none)."""
    from event_pipeline import warehouse

    if not path.exists():
        return ""
    with warehouse.connect(path, read_only=True) as connection:
        tables = connection.execute(
            "select table_schema, table_name from information_schema.tables "
            "where table_catalog = current_database()"
        ).fetchall()
        assert tables, f"no tables in {path}"
        rows = [
            connection.execute(f'select * from "{schema}"."{name}"').fetchall()
            for schema, name in tables
        ]
    return repr(rows)
