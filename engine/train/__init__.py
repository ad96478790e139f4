"""The training run: setup, loop, objectives, checkpoints, distributed, metrics, trackers, memory planner."""
