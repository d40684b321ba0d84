"""The Megatron runner on the CPU, under tests/megatron_helpers.py's training shims (gloo):

    torchrun --nproc_per_node=2 tests/megatron_runner_cpu.py RUN_DIR

Runs `hpcqwen.runners.megatron.main` itself: DDP, the DistributedOptimizer, Megatron's schedule,
dist_checkpointing save / resume, the STOP file and metrics.jsonl (tests/cpu_train/test_megatron_runner.py).
Everything happens under the `__main__` guard: dist_checkpointing.save spawns a multiprocessing
Manager that re-imports this file, and that child needs neither the shims nor megatron.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from hpcqwen.runners.noise import quiet_library_noise

    quiet_library_noise()  # as run_main does before the runner imports megatron (the shims import it here)
    from megatron_helpers import apply_training_shims

    apply_training_shims()
    from hpcqwen.runners._shared import run_main
    from hpcqwen.runners.megatron import main

    run_main(main)
