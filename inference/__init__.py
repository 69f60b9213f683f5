"""Checkpoints, conversion, model hooks, generation and the CLI."""
