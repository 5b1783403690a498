"""Training: the step (step.py), data (data.py), checkpoints (checkpoint.py), sharding (sharding.py)."""
