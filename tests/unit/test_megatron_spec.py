"""`task.kind: megatron`: the guide's command -> spec -> megatron options, flag by flag, and the
login-node checks of the parallel layout against the resources and the model (exact text)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hpcqwen.errors import SpecError
from hpcqwen.preflight import checked_spec
from hpcqwen.spec import load_spec, parse_spec, read_source
from hpcqwen.tasks.megatron import MegatronTask

# The shipped specs name hub ids: offline (HF_HUB_OFFLINE=1) they validate only when the cache holds them.
pytestmark = pytest.mark.usefixtures("hub_ids_cached")

REPO = Path(__file__).resolve().parents[2]

# The guide's `megatron sft` flags (qwen3-best-practices.md, "Megatron-SWIFT") -> the task field and value.
GUIDE = [
    ("dataset", ["liucong/Chinese-DeepSeek-R1-Distill-data-110k-SFT"]), ("tensor_model_parallel_size", 2),
    ("expert_model_parallel_size", 8), ("moe_grouped_gemm", True), ("moe_shared_expert_overlap", True),
    ("moe_aux_loss_coeff", 0.01), ("micro_batch_size", 1), ("global_batch_size", 16), ("packing", True),
    ("recompute_granularity", "full"), ("recompute_method", "uniform"), ("recompute_num_layers", 1),
    ("train_iters", 2000), ("eval_iters", 50), ("finetune", True), ("cross_entropy_loss_fusion", True),
    ("lr", 1e-5), ("lr_warmup_iters", 100), ("min_lr", 1e-6), ("eval_interval", 200), ("save_interval", 200),
    ("max_length", 8192), ("num_workers", 8), ("dataset_num_proc", 8), ("no_save_optim", True),
    ("no_save_rng", True), ("sequence_parallel", True), ("use_flash_attn", True),
]

# Qwen3-30B-A3B's config.json (the numbers the checks read).
QWEN3_30B_A3B = {
    "model_type": "qwen3_moe", "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144, "moe_intermediate_size": 768,
    "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "vocab_size": 151936, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False, "max_position_embeddings": 40960,
}
QWEN3_8B = {"model_type": "qwen3", "hidden_size": 4096, "num_hidden_layers": 36, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 12288, "vocab_size": 151936,
            "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "tie_word_embeddings": False}


@pytest.fixture(scope="module")
def guide(tmp_path_factory: pytest.TempPathFactory) -> MegatronTask:
    from helpers import fake_hub_cache

    with pytest.MonkeyPatch.context() as mp:  # module scope: the function fixture hub_ids_cached comes later
        mp.setenv("HF_HUB_CACHE", str(fake_hub_cache(tmp_path_factory.mktemp("hf-hub-cache"))))
        spec = load_spec(REPO / "jobspecs/megatron-moe.yaml")
    assert isinstance(spec.task, MegatronTask)
    return spec.task


@pytest.mark.parametrize(("key", "value"), GUIDE, ids=[g[0] for g in GUIDE])
def test_guide_flag_is_a_task_field(guide: MegatronTask, key: str, value: object) -> None:
    assert getattr(guide, key) == value


def test_guide_resources_load_and_save(run_root: Path) -> None:
    spec = load_spec(REPO / "jobspecs/megatron-moe.yaml")
    t = spec.task
    assert isinstance(t, MegatronTask)
    assert (spec.resources.nodes, spec.gpus_per_node, spec.world_size) == (2, 8, 16)
    assert t.load == "Qwen/Qwen3-30B-A3B-Base"  # hub id kept as written
    assert t.save == f"{run_root}/megatron_output/Qwen3-30B-A3B-Base"  # ${HPCQWEN_RUN_ROOT} expanded
    assert not spec.requeue.enabled  # no_save_optim: a requeued job could not restore the optimizer
    assert t.runner_module() == "hpcqwen.runners.megatron"


def test_guide_becomes_megatron_options(guide: MegatronTask) -> None:
    from hpcqwen.runners._shared import RunContext
    from hpcqwen.runners.megatron import build_options

    spec = load_spec(REPO / "jobspecs/megatron-moe.yaml")
    ctx = RunContext(spec, guide, None, None, 0, 0, 16)  # type: ignore[arg-type]
    from hpcqwen.megatron.dims import dims_from_config

    o = build_options(ctx, dims_from_config(QWEN3_30B_A3B))
    assert (o.tensor_parallel, o.pipeline_parallel, o.expert_parallel, o.context_parallel) == (2, 1, 8, 1)
    assert o.sequence_parallel and o.grouped_experts and o.flash_attention and o.cross_entropy_loss_fusion
    assert (o.recompute_granularity, o.recompute_method, o.recompute_num_layers) == ("full", "uniform", 1)
    assert o.moe_aux_loss_coeff == 0.01 and str(o.dtype) == "torch.bfloat16"


def test_moe_aux_loss_defaults_to_the_models_router_coefficient(guide: MegatronTask) -> None:
    """Without `moe_aux_loss_coeff` MoE SFT used to train with no load-balancing loss at all."""
    from hpcqwen.megatron.dims import dims_from_config
    from hpcqwen.runners._shared import RunContext
    from hpcqwen.runners.megatron import build_options

    spec = load_spec(REPO / "jobspecs/megatron-moe.yaml")
    unset = guide.model_copy(update={"moe_aux_loss_coeff": None})
    ctx = RunContext(spec, unset, None, None, 0, 0, 16)  # type: ignore[arg-type]
    dims = dims_from_config({**QWEN3_30B_A3B, "router_aux_loss_coef": 0.001})
    assert build_options(ctx, dims).moe_aux_loss_coeff == 0.001
    off = RunContext(spec, guide.model_copy(update={"moe_aux_loss_coeff": 0.0}), None, None, 0, 0, 16)  # type: ignore[arg-type]
    assert build_options(off, dims).moe_aux_loss_coeff == 0.0


def test_dims_of_both_config_spellings() -> None:
    from hpcqwen.megatron.dims import dims_from_config

    moe = dims_from_config(QWEN3_30B_A3B)
    assert (moe.num_experts, moe.moe_topk, moe.moe_ffn_hidden_size, moe.rope_theta) == (128, 8, 768, 1e6)
    assert moe.moe_layers == tuple(range(48)) and moe.padded_vocab_size(2) == 152064
    # transformers 5 writes num_local_experts and rope_parameters
    v5 = {**{k: v for k, v in QWEN3_30B_A3B.items() if k not in ("num_experts", "rope_theta")},
          "num_local_experts": 128, "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"},
          "mlp_only_layers": [0], "decoder_sparse_step": 2}
    d = dims_from_config(v5)
    assert d.num_experts == 128 and d.rope_theta == 5e5 and d.moe_layers == tuple(range(1, 48, 2))
    dense = dims_from_config(QWEN3_8B)
    assert not dense.is_moe and dense.padded_vocab_size(1) == 151936


# ---- cross-field errors, exact text ----------------------------------------------------------

BASE = """\
name: m
cluster: {cluster}
resources: {{nodes: {nodes}, gpus_per_node: {gpus}}}
task:
  kind: megatron
  load: {model}
  dataset: data.jsonl
"""

# (case, format fields, extra task lines, --set overrides, expected problems; {f} = spec file, {d} = its folder)
CASES = [
    ("world_size", {}, "  train_iters: 10\n  pipeline_model_parallel_size: 3\n", [], [
        "{f}:9: task.pipeline_model_parallel_size: the world size 2 nodes × 8 GPUs = 16 must be divisible by "
        "tensor_model_parallel_size (1) × pipeline_model_parallel_size (3) × context_parallel_size (1) = 3 "
        "(got 3; expected TP × PP × CP dividing 16)",
    ]),
    ("ep_vs_data_parallel", {}, "  train_iters: 10\n  tensor_model_parallel_size: 4\n  sequence_parallel: true\n"
     "  expert_model_parallel_size: 8\n", [], [
        "{f}:11: task.expert_model_parallel_size: must divide the data-parallel size (4 = 16 GPUs / (TP 4 × PP 1 "
        "× CP 1)) (got 8; expected a divisor of 4)",
    ]),
    ("ep_vs_experts", {"model": "moe60"}, "  train_iters: 10\n  expert_model_parallel_size: 8\n", [], [
        "{f}:9: task.expert_model_parallel_size: must divide the model's expert count (60, num_experts in "
        "{d}/moe60/config.json) (got 8; expected a divisor of 60)",
    ]),
    ("ep_on_dense", {"model": "dense"}, "  train_iters: 10\n  expert_model_parallel_size: 2\n", [], [
        "{f}:9: task.expert_model_parallel_size: is 2 but the model is dense (model_type qwen3 in "
        "{d}/dense/config.json) (got 2; expected 1)",
    ]),
    ("global_batch", {}, "  train_iters: 10\n  tensor_model_parallel_size: 2\n  global_batch_size: 12\n", [], [
        "{f}:10: task.global_batch_size: global_batch_size (12) must be divisible by micro_batch_size (1) × "
        "data-parallel size (8) = 8 (got 12; expected a multiple of 8) — set global_batch_size: 16",
    ]),
    ("sequence_parallel_without_tp", {}, "  train_iters: 10\n  sequence_parallel: true\n", [], [
        "{f}:9: task.sequence_parallel: needs tensor_model_parallel_size > 1 (it splits the sequence over the "
        "tensor-parallel ranks) (got true; expected false with TP 1)",
    ]),
    ("ep_and_tp_need_sp", {}, "  train_iters: 10\n  tensor_model_parallel_size: 2\n"
     "  expert_model_parallel_size: 8\n", [], [
        "{f}:4: task.sequence_parallel: expert_model_parallel_size (8) with tensor_model_parallel_size (2) needs "
        "sequence parallelism (megatron-core: 'When using expert parallelism and tensor parallelism for "
        "training, sequence parallelism must be used') (got false; expected true)",
    ]),
    ("no_save_optim_requeue", {}, "  train_iters: 10\n  no_save_optim: true\n", [], [
        "{f}:9: task.no_save_optim: checkpoints without the optimizer state cannot resume a requeued job "
        "(Adam's moments and step would restart from zero) (got true) — set no_save_optim: false, or requeue: "
        "{enabled: false}",
    ]),
    ("no_train_iters", {}, "", [], [
        "{f}:4: task.train_iters: set train_iters (or max_epochs) (expected e.g. train_iters: 2000)",
    ]),
    ("recompute_full", {}, "  train_iters: 10\n  recompute_granularity: full\n", [], [
        "{f}:4: task.recompute_method: recompute_granularity full needs a recompute_method (expected uniform or "
        "block)",
        "{f}:4: task.recompute_num_layers: recompute_granularity full needs recompute_num_layers (expected e.g. 1)",
    ]),
    ("packing_without_flash", {}, "  train_iters: 10\n  packing: true\n", [], [
        "{f}:9: task.packing: packing needs use_flash_attn: true (megatron's DotProductAttention cannot keep "
        "packed sequences apart: it asserts packed_seq_params is None) (got true) — set use_flash_attn: true",
    ]),
    ("context_parallel_local", {}, "  train_iters: 10\n  context_parallel_size: 2\n", [], [
        "{f}:9: task.context_parallel_size: context_parallel_size (2) needs transformer_impl: transformer_engine "
        "(megatron: 'Context parallelism is only supported by TEDotProductAttention') (got 2; expected 1)",
    ]),
    ("heads", {}, "  train_iters: 10\n  tensor_model_parallel_size: 8\n", [], [
        "{f}:9: task.tensor_model_parallel_size: must divide the model's attention heads (32) and key/value heads "
        "(4) (got 8; expected a divisor of 4)",
    ]),
    ("layers", {"model": "dense"}, "  train_iters: 10\n  pipeline_model_parallel_size: 8\n", [], [
        "{f}:9: task.pipeline_model_parallel_size: must divide the model's 36 layers (got 8; expected a divisor "
        "of 36)",
    ]),
    ("no_gpus", {"cluster": "local", "nodes": 1, "gpus": 0}, "  train_iters: 10\n", [], [
        "{f}:3: resources.gpus_per_node: Megatron training runs on GPUs (NCCL, CUDA kernels) but the job asks "
        "for none (got 0; expected >= 1) — use a GPU profile, e.g. cluster: h100-8x",
    ]),
    ("load_missing", {"model": "nope"}, "  train_iters: 10\n", [], [
        "{f}:6: task.load: is neither a Hugging Face model folder nor an hpcqwen megatron checkpoint (got "
        "{d}/nope; expected a folder with config.json, or checkpoints with a complete iter_<n>/) — download the "
        "model first (huggingface-cli download ORG/NAME --local-dir DIR)",
    ]),
    ("several_at_once", {}, "  train_iters: 10\n", ["task.global_batch_size=4", "task.tensor_model_parallel_size=3"], [
        "--set task.tensor_model_parallel_size=3: task.tensor_model_parallel_size: the world size 2 nodes × 8 GPUs "
        "= 16 must be divisible by tensor_model_parallel_size (3) × pipeline_model_parallel_size (1) × "
        "context_parallel_size (1) = 3 (got 3; expected TP × PP × CP dividing 16)",
        "--set task.tensor_model_parallel_size=3: task.tensor_model_parallel_size: must divide the model's "
        "attention heads (32) and key/value heads (4) (got 3; expected a divisor of 4)",
    ]),
]


def _write_model(folder: Path, config: dict[str, object]) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")


@pytest.mark.parametrize(("case", "fields", "extra", "overrides", "expected"), CASES, ids=[c[0] for c in CASES])
def test_megatron_spec_errors_exact(tmp_path: Path, case: str, fields: dict[str, object], extra: str,
                                    overrides: list[str], expected: list[str]) -> None:
    _write_model(tmp_path / "moe", QWEN3_30B_A3B)
    _write_model(tmp_path / "moe60", {**QWEN3_30B_A3B, "num_experts": 60})
    _write_model(tmp_path / "dense", QWEN3_8B)
    (tmp_path / "data.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    values = {"cluster": "h100-8x", "nodes": 2, "gpus": 8, "model": "moe", **fields}
    path = tmp_path / f"{case}.yaml"
    path.write_text(BASE.format(**values) + extra)
    with pytest.raises(SpecError) as info:
        checked_spec(read_source(str(path), tuple(overrides)))  # spec + preflight's look at the model
    want = [e.replace("{f}", str(path)).replace("{d}", str(tmp_path)) for e in expected]
    assert [i.render() for i in info.value.issues] == want


def test_a_valid_layout_passes(tmp_path: Path) -> None:
    _write_model(tmp_path / "moe", QWEN3_30B_A3B)
    (tmp_path / "data.jsonl").write_text("{}\n")
    path = tmp_path / "ok.yaml"
    path.write_text(BASE.format(cluster="h100-8x", nodes=2, gpus=8, model="moe") + "  train_iters: 10\n"
                    "  tensor_model_parallel_size: 2\n  sequence_parallel: true\n  expert_model_parallel_size: 4\n"
                    "  pipeline_model_parallel_size: 2\n  global_batch_size: 8\n  save: out/ckpt\n")
    spec = parse_spec(read_source(str(path)))
    assert isinstance(spec.task, MegatronTask)
    assert spec.task.save == str(tmp_path / "out/ckpt")  # relative to the spec's folder


def test_export_of_a_megatron_run_needs_to_hf(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from hpcqwen import checkpoints
    from hpcqwen.cli import main

    _write_model(tmp_path / "moe", QWEN3_30B_A3B)
    (tmp_path / "data.jsonl").write_text("{}\n")
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(BASE.format(cluster="h100-8x", nodes=2, gpus=8, model="moe") + "  train_iters: 10\n"
                         "  tensor_model_parallel_size: 2\n  sequence_parallel: true\n")
    run = tmp_path / "run"
    (run / "checkpoints" / "iter_0000005").mkdir(parents=True)
    (run / "spec.json").write_text(load_spec(spec_file).model_dump_json())
    assert main(["export", str(run)]) == 1  # no complete checkpoint yet
    assert "has no complete Megatron checkpoint yet" in capsys.readouterr().err
    checkpoints.mark_complete(run / "checkpoints" / "iter_0000005", {"step": 5})
    assert main(["export", str(run)]) == 1
    assert "iter_0000005 is a Megatron checkpoint" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "moe"), "--to-hf"]) == 1
    assert "is not a Megatron run dir or iter_<n> checkpoint" in capsys.readouterr().err
