"""From what the user names to a model's units: resolving, checkpoints, conversion, the layer store."""
