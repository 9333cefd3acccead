"""The training engine shared by every task: one loop, checkpoints, tracking."""
