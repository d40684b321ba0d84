"""`task.kind: distill` at spec load: derived array and engine layout, and every bad input caught before
sbatch (so before any GPU time), with the exact problem text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from hpcqwen.errors import SpecError
from hpcqwen.paths import RunPaths
from hpcqwen.preflight import checked_spec
from hpcqwen.render import render_sbatch
from hpcqwen.spec import load_spec, read_source
from hpcqwen.tasks.distill import DistillTask

# The shipped specs name hub ids: offline (HF_HUB_OFFLINE=1) they validate only when the cache holds them.
pytestmark = pytest.mark.usefixtures("hub_ids_cached")

REPO = Path(__file__).resolve().parents[2]


def distill_spec(write_spec, model: Path, data: str, task: dict[str, Any] | None = None,
                 top: dict[str, Any] | None = None) -> Path:
    """A distill spec file (the tiny model's context is 4096 tokens: max_model_len 1024 unless `task` sets it)."""
    body = {"kind": "distill", "model": str(model), "infer_backend": "hf", "dataset": data, "max_model_len": 1024,
            "max_new_tokens": 256, **(task or {})}
    return write_spec(yaml.safe_dump({"name": "d", **(top or {}), "task": body}, sort_keys=False))


def problems(path: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(SpecError) as info:
        checked_spec(read_source(path, overrides))  # the spec and preflight's file checks, as `check` runs them
    return [i.render().replace(str(path.parent) + "/", "") for i in info.value.issues]


def test_shards_become_the_array_and_tasks_get_task_dirs(write_spec, tiny_qwen3_dir: Path, data_dir: Path) -> None:
    path = distill_spec(write_spec, tiny_qwen3_dir, f"{data_dir}/sft-tiny.jsonl#12", {"shards": 3},
                        {"array": {"throttle": 2}})
    spec = load_spec(path)
    assert spec.array is not None and (spec.array.size, spec.array.throttle) == (3, 2)
    assert spec.nproc_per_node == 1  # CPU: one engine per task
    script = render_sbatch(spec, RunPaths(Path("/runs/x")), read_source(path))
    assert "#SBATCH --array=0-2%2" in script and "/tasks/\"$SLURM_ARRAY_TASK_ID\"" in script
    assert spec.task.runner_module() == "hpcqwen.runners.distill"


def test_shards_above_max_array_size_are_chunked_over_the_array(write_spec, tiny_qwen3_dir: Path,
                                                               data_dir: Path) -> None:
    path = distill_spec(write_spec, tiny_qwen3_dir, f"{data_dir}/sft-tiny.jsonl", {"shards": 7},
                        {"cluster": {"profile": "local", "max_array_size": 3}})
    spec = load_spec(path)
    assert spec.array is not None and spec.array.size == 3
    from hpcqwen.shards import array_indices, shards_of_task

    assert [shards_of_task(i, 3, 7) for i in range(3)] == [[0, 3, 6], [1, 4], [2, 5]]
    assert array_indices([4, 6], 3) == [0, 1]


def test_gpu_nodes_run_one_engine_per_tensor_parallel_group(write_spec, tmp_path: Path) -> None:
    spec = load_spec(REPO / "jobspecs/qwen3-32b-distill.yaml")
    assert isinstance(spec.task, DistillTask)
    assert (spec.gpus_per_node, spec.task.tensor_parallel_size, spec.nproc_per_node) == (4, 2, 2)
    # The guide's command runs on one node of 4 GPUs: no array, one node (not 2 × 4 GPUs).
    assert spec.array is None and spec.resources.nodes == 1
    sharded = load_spec(REPO / "jobspecs/qwen3-32b-distill.yaml", ["task.shards=2"])
    assert sharded.array is not None and sharded.array.size == 2 and sharded.resources.nodes == 1
    assert spec.task.dataset == ["AI-ModelScope/alpaca-gpt4-data-en#5000", "AI-ModelScope/alpaca-gpt4-data-zh#5000"]
    assert spec.task.vllm_python is None  # the site venv of the profile brings vLLM
    assert spec.task.model == "Qwen/Qwen3-32B"
    bad = problems(REPO / "jobspecs/qwen3-32b-distill.yaml", ("task.tensor_parallel_size=3",))
    assert bad == ["--set task.tensor_parallel_size=3: task.tensor_parallel_size: engines per node (4) × "
                   "tensor_parallel_size (3) must equal the GPUs per node (4) (got 3; expected a divisor of 4) "
                   "— leave resources.nproc_per_node unset"]


def test_result_path_relative_is_in_the_run_dir(write_spec, tiny_qwen3_dir: Path, data_dir: Path,
                                                tmp_path: Path) -> None:
    spec = load_spec(distill_spec(write_spec, tiny_qwen3_dir, f"{data_dir}/sft-tiny.jsonl"))
    assert spec.task.result_file("/runs/x") == Path("/runs/x/distill_dataset.jsonl")
    spec = load_spec(distill_spec(write_spec, tiny_qwen3_dir, f"{data_dir}/sft-tiny.jsonl",
                                  {"result_path": "${HOME}/out.jsonl"}))
    assert spec.task.result_file("/runs/x") == Path.home() / "out.jsonl"


def test_bad_data_fails_at_load_naming_file_and_row(write_spec, tiny_qwen3_dir: Path, tmp_path: Path) -> None:
    no_columns = tmp_path / "prompts.jsonl"
    no_columns.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"prompt": "hello"}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    # (the data files sit next to the spec file, so paths print relative here)
    assert problems(distill_spec(write_spec, tiny_qwen3_dir, str(no_columns))) == [
        "spec.yaml:6: task.dataset: columns ['prompt'] match no known format; expected `messages` (a list of "
        "{role, content}; optional `system` column), `query` (+ `response`; optional `system`, `history`), or "
        "alpaca `instruction` (+ `input`, `output`) (got prompts.jsonl: row 2; expected rows with `messages` or "
        "`query`)"]
    assert problems(distill_spec(write_spec, tiny_qwen3_dir, str(empty))) == [
        "spec.yaml:6: task.dataset: the dataset has no rows (got empty.jsonl; expected rows with `messages` or "
        "`query`)"]
    assert problems(distill_spec(write_spec, tiny_qwen3_dir, f"{empty}#lots")) == [
        "spec.yaml:6: task.dataset[0]: the sample count after '#' must be a positive integer (got "
        "'empty.jsonl#lots'; expected name#N, e.g. data.jsonl#500)"]


def test_model_without_tokenizer_and_other_cross_checks(write_spec, tiny_qwen3_dir: Path, data_dir: Path,
                                                        tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny_qwen3_dir / "config.json", bare / "config.json")
    text = distill_spec(write_spec, bare, f"{data_dir}/sft-tiny.jsonl", {
        "shards": 100, "enable_thinking": False, "response_prefix": "<think>\n\n</think>\n\n", "max_model_len": 8192,
        "max_new_tokens": 9000, "temperature": 0, "num_return_sequences": 3}, {"resources": {"nodes": 2}})
    assert problems(text) == [
        "spec.yaml:3: resources.nodes: a distill task runs on one node; spread over nodes with task.shards (one "
        "array task per shard) (got 2; expected 1)",
        "spec.yaml:6: task.model: model folder has no tokenizer (got bare; expected one of tokenizer.json, "
        "tokenizer_config.json in the folder) — save the tokenizer next to the weights "
        "(tokenizer.save_pretrained(DIR))",
        "spec.yaml:9: task.max_model_len: max_model_len (8192) is longer than the model's max_position_embeddings "
        "(4096) (got 8192; expected <= 4096)",
        "spec.yaml:10: task.max_new_tokens: max_new_tokens (9000) must be below max_model_len (8192), which also "
        "holds the prompt (got 9000; expected < 8192)",
        "spec.yaml:11: task.shards: 100 shards for 64 prompts leaves shards empty (got 100; expected <= 64)",
        "spec.yaml:13: task.response_prefix: enable_thinking: false already renders the empty <think></think> "
        "block; with response_prefix it would appear twice (got '<think>\\n\\n</think>\\n\\n') — set only "
        "one of the two",
        "spec.yaml:21: task.num_return_sequences: temperature 0 is greedy: the 3 answers per prompt would be "
        "identical (got 3) — raise temperature, or set num_return_sequences: 1"]


def test_vllm_on_cpu_needs_vllm_and_a_supported_head_size(write_spec, tmp_path: Path, data_dir: Path,
                                                         tiny_tokenizer_dir: Path) -> None:
    from hpcqwen.testing import build_tiny_qwen3

    hd16 = build_tiny_qwen3(tmp_path / "hd16", tiny_tokenizer_dir, head_dim=16)
    path = distill_spec(write_spec, hd16, f"{data_dir}/sft-tiny.jsonl",
                        {"infer_backend": "vllm", "vllm_python": f"{tmp_path}/no-venv/bin/python"})
    assert problems(path) == [
        "spec.yaml:4: task.model: vLLM's CPU attention does not support head_dim 16 (got 16; expected one of "
        "[32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512]) — use infer_backend: hf on CPU, or a model with "
        "head_dim >= 32",
        "spec.yaml:5: task.infer_backend: vLLM is not installed for the nodes' interpreter (got no-venv/bin/python; "
        "expected an interpreter where `import vllm` works) — run scripts/setup-vllm.sh (or set "
        "HPCQWEN_VLLM_PYTHON), or infer_backend: hf"]


def test_vllm_python_defaults_to_the_checkouts_venv(write_spec, tiny_qwen3_dir: Path, data_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = distill_spec(write_spec, tiny_qwen3_dir, f"{data_dir}/sft-tiny.jsonl", {"infer_backend": "auto"})
    monkeypatch.setenv("HPCQWEN_VLLM_PYTHON", "/opt/vllm/bin/python")
    assert load_spec(path).task.vllm_python == "/opt/vllm/bin/python"
    monkeypatch.delenv("HPCQWEN_VLLM_PYTHON")
    expected = str(REPO / ".venv-vllm/bin/python") if (REPO / ".venv-vllm/bin/python").is_file() else None
    spec = load_spec(path)
    assert spec.task.vllm_python == expected
    frozen = json.loads(spec.model_dump_json())
    assert frozen["task"]["vllm_python"] == expected  # resolved once, on the login node
