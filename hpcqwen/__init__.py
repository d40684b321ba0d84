"""hpcqwen: Qwen3 training jobs on Slurm clusters from one YAML job spec."""

__version__ = "0.1.0"
