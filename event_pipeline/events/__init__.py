"""The events API: a deterministic generator, replay of JSON files, and fault modes.

It knows nothing of the warehouse. Start it with `event-stats serve-events`.
"""
