"""The runners' first step (`quiet_library_noise`) must not initialise the CUDA driver: a process that has
called `cudaGetDeviceCount` is "poisoned" for fork, and vLLM forks its engine core, which then fails with
"Cannot re-initialize CUDA in forked subprocess" (the distill array task on the H200, bench/RESULTS.md).

No GPU here, so the CUDA build is a stub (torch's own seams): `_is_compiled` says CUDA is built in, NVML
finds one device, and the driver call that poisons fork is recorded."""

from __future__ import annotations

import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import os, torch
    calls = []
    torch.cuda._is_compiled = lambda: True
    torch.cuda._device_count_nvml = lambda: 1
    torch._C._cuda_getDeviceCount = lambda: calls.append("cudaGetDeviceCount") or 1
    os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK", None)
    os.environ.pop("DS_ACCELERATOR", None)
    from hpcqwen.runners.noise import quiet_library_noise
    quiet_library_noise()
    print(calls, os.environ.get("DS_ACCELERATOR"))
""")


def test_runner_start_leaves_the_cuda_driver_alone_stub_cuda_build() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]", "None"], out.stdout  # no driver call; a GPU node keeps DeepSpeed's choice


def test_a_node_without_gpus_still_sets_deepspeeds_cpu_accelerator() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD.replace("lambda: 1\n", "lambda: 0\n", 1)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["[]", "cpu"], out.stdout
