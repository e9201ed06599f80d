"""Training: the one loop (modes), the bi-level meta step, checkpoints, schedules and DDP."""
