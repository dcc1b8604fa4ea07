"""Event statistics pipeline: events API, loader, email and CLI."""
