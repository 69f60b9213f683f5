"""Front ends: the CLI, generate and batch files, continuous batching, the server, the rank launcher."""
