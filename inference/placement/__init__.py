"""How the device and RAM budgets are divided: reserves, the plan, the KV cache's share."""
