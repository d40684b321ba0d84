"""Library output in the runners' logs that asks nothing of the user, silenced narrowly before the libraries
load: each warning by its category and message (a new or different warning still shows), progress bars (in a
log file they are carriage-return noise: hpcqwen prints its own summary lines), and DeepSpeed's notice that it
picked the CPU on a node without GPUs. What a user must act on (errors, hpcqwen's own warnings, NCCL, the
cache's waiting lines) is untouched; a user's own setting of these variables wins."""

from __future__ import annotations

import os
import warnings

# (category, regex of the message start): deprecations raised inside libraries, not by anything a spec sets.
KNOWN_WARNINGS: list[tuple[type[Warning], str]] = [
    # transformers 5.x: Trainer and peft still call the old name internally (hpcqwen passes the new names).
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated and will be removed in v6"),
    # megatron-core 0.16 calls torch's old collective names (torch 2.13 deprecates them), once per call site.
    (FutureWarning, r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated"),
    # megatron-core without Apex/TransformerEngine: the runner's start-up line names the implementations used.
    (UserWarning, r"Apex is not installed\. Falling back to Torch Norm"),
    (UserWarning, r"Transformer Engine and Apex are not installed\. Falling back to"),
    # megatron-core's own default for cuda_graph_scope, not a setting hpcqwen or the spec makes.
    (UserWarning, r"full scope is deprecated\. Use empty cuda_graph_scope"),
]


def quiet_library_noise() -> None:
    """Install the filters and defaults in this process (a runner, first thing; forked workers inherit them)."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' "Loading weights" follows it too
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import torch

    # DeepSpeed (imported by accelerate) otherwise warns that it chose the CPU. device_count() asks NVML;
    # is_available() would call cudaGetDeviceCount, which poisons fork: vLLM's engine core, forked later, then
    # fails with "Cannot re-initialize CUDA in forked subprocess".
    if torch.cuda.device_count() == 0:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
