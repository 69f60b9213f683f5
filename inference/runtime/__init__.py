"""What runs each pass: the module adapters (hooks, host lookup, experts, collectives) and the host KV cache."""
