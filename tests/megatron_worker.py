"""Two-process (gloo) checks of the HF <-> mcore conversion, run by tests/cpu_train/test_megatron.py:

    torchrun --nproc_per_node=2 tests/megatron_worker.py OUT.json CKPT_ROOT MODEL_DIR [MODEL_DIR ...]

For every model: TP 2 (SDPA attention, grouped experts), TP 2 + sequence parallel (megatron's
DotProductAttention, SequentialMLP experts) and, for MoE models, EP 2 (data-parallel 2) logits
against transformers', and the HF -> mcore -> HF round trip gathered over TP / EP. The first model
is also saved with `dist_checkpointing` at TP 2 into CKPT_ROOT (the test exports it at TP 1).
PP 2: every stage loads and exports its own layers (their union is the checkpoint).
Gradients: TP 2 + sequence parallel + SDPA + grouped experts against TP 1 + megatron's attention +
SequentialMLP, compared per HF tensor.
Rank 0 writes the results as JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from megatron_helpers import (  # noqa: E402
    causal_mask,
    cpu_options,
    destroy_parallel,
    full_logits,
    init_parallel,
    tensor_cuda_is_identity,
)


def check(model_dir: str, tp: int, ep: int, ckpt_root: str | None = None, **opts: object) -> dict[str, object]:
    from megatron.core import parallel_state as ps
    from transformers import AutoModelForCausalLM

    from hpcqwen.megatron import checkpoint
    from hpcqwen.megatron.convert import HfWeights, export_hf_state_dict, load_hf_weights
    from hpcqwen.megatron.dims import dims_from_config, read_config
    from hpcqwen.megatron.model import build_model

    dims = dims_from_config(read_config(model_dir))
    init_parallel(tp=tp, ep=ep)
    options = cpu_options(tensor_parallel=tp, expert_parallel=ep, **opts)
    model = build_model(dims, options).eval()
    load_hf_weights(model, model_dir, dims)
    ids = torch.randint(0, dims.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    flash = options.flash_attention
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=torch.arange(32).expand(2, -1),
                    attention_mask=None if flash else causal_mask(32))
        ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()(ids).logits
    logits = full_logits(out)[..., : dims.vocab_size]
    exported = export_hf_state_dict(model, dims)
    disk = HfWeights(model_dir)
    exact = set(exported) == set(disk.names) and all(torch.equal(exported[k], disk.get(k)) for k in disk.names)
    if ckpt_root:
        meta = {"dtype": "float32", "padded_vocab_size": model.vocab_size, "tensor_model_parallel_size": tp}
        checkpoint.save(Path(ckpt_root), 7, model, None, None, meta=meta, hf_dir=Path(model_dir))
    ps.destroy_model_parallel()
    return {"model": Path(model_dir).name, "tp": tp, "ep": ep, "opts": {k: str(v) for k, v in opts.items()},
            "max_abs_diff": (logits - ref).abs().max().item(), "round_trip_exact": exact}


def hf_grads(model_dir: str, tp: int, **opts: object) -> dict[str, torch.Tensor]:
    """Gradients of a next-token loss, as HF-named tensors (after what finalize_model_grads does
    for replicated weights: the sum over TP of sequence-parallel and q/k-norm gradients)."""
    from megatron.core import parallel_state as ps

    from hpcqwen.megatron.convert import export_hf_state_dict, load_hf_weights
    from hpcqwen.megatron.dims import dims_from_config, read_config
    from hpcqwen.megatron.model import build_model

    dims = dims_from_config(read_config(model_dir))
    init_parallel(tp=tp)
    options = cpu_options(tensor_parallel=tp, **opts)
    model = build_model(dims, options)
    load_hf_weights(model, model_dir, dims)
    g = torch.Generator().manual_seed(2)
    ids, labels = (torch.randint(0, dims.vocab_size, (2, 32), generator=g) for _ in range(2))
    mask = None if options.flash_attention else causal_mask(32)
    positions = torch.arange(32).expand(2, -1)
    model(input_ids=ids, position_ids=positions, attention_mask=mask, labels=labels).mean().backward()
    for name, p in model.named_parameters():
        if tp > 1 and ((options.sequence_parallel and getattr(p, "sequence_parallel", False))
                       or "q_layernorm" in name or "k_layernorm" in name):
            dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
        p.data = p.grad
    grads = export_hf_state_dict(model, dims)
    ps.destroy_model_parallel()
    return grads


def grad_check(model_dir: str) -> dict[str, object]:
    ref = hf_grads(model_dir, 1, flash_attention=False, grouped_experts=False)
    got = hf_grads(model_dir, 2, sequence_parallel=True)
    worst = max((got[k] - ref[k]).abs().max().item() / max(ref[k].abs().max().item(), 1e-12) for k in ref)
    return {"model": Path(model_dir).name, "grads": "tp2+sp+sdpa+grouped vs tp1", "same_names": set(ref) == set(got),
            "max_rel_diff": worst}


def pp_check(model_dir: str) -> dict[str, object]:
    """PP 2: each stage loads its own layers (global layer numbers) and exports them back."""
    from megatron.core import parallel_state as ps

    from hpcqwen.megatron.convert import HfWeights, export_hf_state_dict, load_hf_weights
    from hpcqwen.megatron.dims import dims_from_config, read_config
    from hpcqwen.megatron.model import build_model

    dims = dims_from_config(read_config(model_dir))
    init_parallel(pp=2)
    with tensor_cuda_is_identity():
        model = build_model(dims, cpu_options(pipeline_parallel=2))
    load_hf_weights(model, model_dir, dims)
    stages: list[dict[str, torch.Tensor]] = [{}, {}]
    dist.all_gather_object(stages, export_hf_state_dict(model, dims))
    ps.destroy_model_parallel()
    disk = HfWeights(model_dir)
    merged = {**stages[0], **stages[1]}
    return {"model": Path(model_dir).name, "pp": 2, "disjoint": not set(stages[0]) & set(stages[1]),
            "round_trip_exact": set(merged) == set(disk.names) and all(torch.equal(merged[k], disk.get(k))
                                                                       for k in disk.names)}


def main() -> None:
    out, ckpt_root, models = sys.argv[1], sys.argv[2], sys.argv[3:]
    results = []
    for i, model_dir in enumerate(models):
        moe = json.loads((Path(model_dir) / "config.json").read_text()).get("model_type") == "qwen3_moe"
        results.append(check(model_dir, 2, 1, ckpt_root if i == 0 else None))
        results.append(check(model_dir, 2, 1, sequence_parallel=True, flash_attention=False, grouped_experts=False))
        if moe:
            results.append(check(model_dir, 1, 2))
        results.append(grad_check(model_dir))
        results.append(pp_check(model_dir))
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results, indent=1))
    destroy_parallel()


if __name__ == "__main__":  # dist_checkpointing.save spawns a multiprocessing Manager that re-imports __main__
    main()
