"""Pipelines: stages of job specs submitted at once with Slurm dependencies, into one pipeline dir."""
