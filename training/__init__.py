"""Pretraining: data pipeline, loop, checkpoints, recipes."""
