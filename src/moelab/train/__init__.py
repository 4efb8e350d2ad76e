"""Training: the loop, schedules, checkpoints, progress and the router-health monitor."""
