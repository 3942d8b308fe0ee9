"""Quix Streams comparison app (see README.md); runs in .venv-quix."""
