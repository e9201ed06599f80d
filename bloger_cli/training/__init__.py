"""Training: the one loop (modes), the bi-level meta step, and the runtime (device, seeds)."""
