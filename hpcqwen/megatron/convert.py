"""Hugging Face Qwen3 / Qwen3-MoE weights <-> the parameters of a megatron-core `GPTModel`.

A self-contained mapping rather than mbridge: mbridge 0.15.1 maps TransformerEngine-spec names
only, so driving the local spec took six patches of its private attributes (layer spec, norm
names, expert names, rope_theta, fusions, and `norm_topk_prob`, which it ignores: silently wrong
routing), and it knows nothing of `TorchGroupedMLP` (../shared/notes/mcore-gpu.md §3). The two
architectures need ~20 name rules and four tensor layouts, written here once and checked by
tests/cpu_train/test_megatron.py: logits equal to transformers' at TP 1 and 2 (and EP 2), and a
bit-exact HF -> mcore -> HF round trip.

Every live parameter name is first normalised to a *canonical* name: the local spec's names with
global layer and expert numbers (`decoder.layers.3.mlp.experts.local_experts.17.linear_fc1.weight`);
TE's fused-norm names and grouped experts map onto them. A canonical tensor is the unsharded
(TP 1) mcore tensor, built from HF tensors by one of four layouts:
- `copy`: the HF tensor as it is;
- `qkv`: q, k, v rows interleaved per query group ([q heads of group g; k_g; v_g] for each g);
- `glu`: [gate; up] rows (SwiGLU fc1);
- `vocab`: embedding / output rows padded with zeros to the model's (padded) vocabulary.
Tensor parallelism then splits it along axis 0 (column-parallel, vocab-parallel; for `glu` gate
and up separately) or axis 1 (row-parallel); norms and the router are replicated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hpcqwen.megatron.dims import Qwen3Dims

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_SEQ_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12])\.weight$")
_TE_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")
_STACKED = {"mlp.experts.weight1": "linear_fc1", "mlp.experts.weight2": "linear_fc2"}
# TE fuses the pre-attention / pre-MLP norms into the next linear
_TE_ALIASES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
               "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}

# canonical layer suffix -> (layout, HF names relative to model.layers.{L}., TP axis)
_LAYER_RULES: dict[str, tuple[str, tuple[str, ...], int | None]] = {
    "input_layernorm.weight": ("copy", ("input_layernorm.weight",), None),
    "self_attention.linear_qkv.weight": ("qkv", ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                                 "self_attn.v_proj.weight"), 0),
    "self_attention.q_layernorm.weight": ("copy", ("self_attn.q_norm.weight",), None),
    "self_attention.k_layernorm.weight": ("copy", ("self_attn.k_norm.weight",), None),
    "self_attention.linear_proj.weight": ("copy", ("self_attn.o_proj.weight",), 1),
    "pre_mlp_layernorm.weight": ("copy", ("post_attention_layernorm.weight",), None),
    "mlp.linear_fc1.weight": ("glu", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), 0),
    "mlp.linear_fc2.weight": ("copy", ("mlp.down_proj.weight",), 1),
    "mlp.router.weight": ("copy", ("mlp.gate.weight",), None),
}
_EXPERT_RULES: dict[str, tuple[str, tuple[str, ...], int | None]] = {
    "linear_fc1": ("glu", ("gate_proj.weight", "up_proj.weight"), 0),
    "linear_fc2": ("copy", ("down_proj.weight",), 1),
}


@dataclass(frozen=True)
class Rule:
    """How one canonical mcore tensor is made from HF tensors and split across ranks."""

    layout: str  # copy | qkv | glu | vocab
    hf: tuple[str, ...]
    tp_axis: int | None
    expert: bool = False


@dataclass(frozen=True)
class Ranks:
    """This process's place in the tensor-, expert-tensor- and expert-parallel groups."""

    tp: tuple[int, int] = (0, 1)  # (rank, size)
    etp: tuple[int, int] = (0, 1)
    ep: tuple[int, int] = (0, 1)

    @classmethod
    def current(cls) -> Ranks:
        """From megatron's parallel_state (1 everywhere when it is not initialized)."""
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            return cls()
        return cls((ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()),
                   (ps.get_expert_tensor_parallel_rank(), ps.get_expert_tensor_parallel_world_size()),
                   (ps.get_expert_model_parallel_rank(), ps.get_expert_model_parallel_world_size()))


def unwrap(model: Any) -> Any:
    """The GPTModel inside DDP / Float16Module wrappers (or a one-element model list)."""
    if isinstance(model, list | tuple):
        model = model[0]
    while hasattr(model, "module"):
        model = model.module
    return model


def rule_for(canonical: str, dims: Qwen3Dims) -> Rule:
    """The rule of a canonical name.

    Raises:
        KeyError: For a parameter this mapping does not know.
    """
    if canonical == "embedding.word_embeddings.weight":
        return Rule("vocab", ("model.embed_tokens.weight",), 0)
    if canonical == "output_layer.weight":
        return Rule("vocab", ("model.embed_tokens.weight" if dims.tie_word_embeddings else "lm_head.weight",), 0)
    if canonical == "decoder.final_layernorm.weight":
        return Rule("copy", ("model.norm.weight",), None)
    m = _LAYER.match(canonical)
    if m is None:
        raise KeyError(canonical)
    layer, rest = int(m[1]), m[2]
    prefix = f"model.layers.{layer}."
    e = _SEQ_EXPERT.match(rest)
    if e:
        layout, names, axis = _EXPERT_RULES[e[2]]
        return Rule(layout, tuple(f"{prefix}mlp.experts.{e[1]}.{n}" for n in names), axis, expert=True)
    layout, names, axis = _LAYER_RULES[rest]
    return Rule(layout, tuple(prefix + n for n in names), axis)


def canonical_names(name: str, layer_offset: int, local_experts: int, ranks: Ranks) -> list[str]:
    """Canonical names behind one live parameter (several for a stacked `TorchGroupedMLP` weight)."""
    m = _LAYER.match(name)
    if m is None:
        return [name]
    layer, rest = int(m[1]) + layer_offset, _TE_ALIASES.get(m[2], m[2])
    first = ranks.ep[0] * local_experts  # global number of this rank's first local expert
    if rest in _STACKED:
        return [f"decoder.layers.{layer}.mlp.experts.local_experts.{first + i}.{_STACKED[rest]}.weight"
                for i in range(local_experts)]
    for pattern, order in ((_SEQ_EXPERT, (1, 2)), (_TE_EXPERT, (2, 1))):
        e = pattern.match(rest)
        if e:
            index, linear = int(e[order[0]]), e[order[1]]
            return [f"decoder.layers.{layer}.mlp.experts.local_experts.{first + index}.{linear}.weight"]
    return [f"decoder.layers.{layer}.{rest}"]


# ---- layouts: HF tensors <-> canonical tensor ---------------------------------------------------

def to_canonical(rule: Rule, hf: list[torch.Tensor], dims: Qwen3Dims, rows: int) -> torch.Tensor:
    """The unsharded mcore tensor (`rows`: the model's padded vocabulary for `vocab`)."""
    if rule.layout == "copy":
        return hf[0]
    if rule.layout == "glu":
        return torch.cat(hf, dim=0)
    if rule.layout == "vocab":
        out = hf[0].new_zeros(rows, hf[0].shape[1])
        out[: hf[0].shape[0]] = hf[0]
        return out
    q, k, v = hf
    g, d, h = dims.num_kv_heads, dims.head_dim, q.shape[-1]
    return torch.cat([q.view(g, -1, h), k.view(g, d, h), v.view(g, d, h)], dim=1).reshape(-1, h)


def from_canonical(rule: Rule, full: torch.Tensor, dims: Qwen3Dims) -> list[torch.Tensor]:
    """The HF tensors of `rule.hf` from the unsharded mcore tensor."""
    if rule.layout == "copy":
        return [full]
    if rule.layout == "glu":
        return list(torch.chunk(full, 2, dim=0))
    if rule.layout == "vocab":
        return [full[: dims.vocab_size]]
    g, d, h = dims.num_kv_heads, dims.head_dim, full.shape[-1]
    per_group = full.view(g, -1, h)
    q, k, v = torch.split(per_group, [per_group.shape[1] - 2 * d, d, d], dim=1)
    return [q.reshape(-1, h), k.reshape(-1, h), v.reshape(-1, h)]


def shard(full: torch.Tensor, rule: Rule, rank: int, size: int) -> torch.Tensor:
    """This rank's slice of a canonical tensor."""
    if rule.tp_axis is None or size == 1:
        return full
    if full.shape[rule.tp_axis] % size:
        raise ValueError(f"{rule.hf[0]}: dimension {full.shape[rule.tp_axis]} does not split {size} ways")
    if rule.layout == "glu":
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([gate.chunk(size)[rank], up.chunk(size)[rank]], dim=0)
    return full.chunk(size, dim=rule.tp_axis)[rank]


def merge(parts: list[torch.Tensor], rule: Rule) -> torch.Tensor:
    """The canonical tensor from every rank's slice (inverse of `shard`)."""
    if rule.tp_axis is None or len(parts) == 1:
        return parts[0]
    if rule.layout == "glu":
        halves = [torch.chunk(p, 2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(parts, dim=rule.tp_axis)


# ---- HF -> model ---------------------------------------------------------------------------------

class HfWeights:
    """Lazy reader of a Hugging Face safetensors checkpoint (one file or an index of shards)."""

    def __init__(self, model_dir: str | Path) -> None:
        from safetensors import safe_open

        folder = Path(model_dir)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            weight_map = {}
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {folder}")
        self._handles = {f: safe_open(str(folder / f), framework="pt") for f in files}
        if not weight_map:
            weight_map = {k: f for f, h in self._handles.items()
                          for k in h.keys()}  # type: ignore[no-untyped-call]  # noqa: SIM118
        self.names = weight_map

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read from its file."""
        if name not in self.names:
            raise KeyError(f"{name} is not in the checkpoint")
        tensor: torch.Tensor = self._handles[self.names[name]].get_tensor(name)  # type: ignore[no-untyped-call]
        return tensor


def _stage_layout(gpt: Any) -> tuple[int, int]:
    """(global number of this stage's first layer, local experts per MoE layer)."""
    layers = gpt.decoder.layers if hasattr(gpt, "decoder") else []
    offset = layers[0].layer_number - 1 if len(layers) else 0
    local = next((getattr(layer.mlp.experts, "num_local_experts", 0) for layer in layers
                  if hasattr(getattr(layer, "mlp", None), "experts")), 0)
    return offset, local


def local_tensors(model: Any, hf: HfWeights, dims: Qwen3Dims, ranks: Ranks | None = None
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """(parameter name, this rank's tensor) for every parameter of `model`, read from `hf`."""
    gpt = unwrap(model)
    ranks = ranks or Ranks.current()
    offset, local_experts = _stage_layout(gpt)
    for name, param in gpt.named_parameters():
        parts = []
        for canonical in canonical_names(name, offset, local_experts, ranks):
            rule = rule_for(canonical, dims)
            rank, size = ranks.etp if rule.expert else ranks.tp
            rows = param.shape[0] * size if rule.layout == "vocab" else 0
            full = to_canonical(rule, [hf.get(n) for n in rule.hf], dims, rows)
            parts.append(shard(full, rule, rank, size))
        tensor = torch.stack(parts) if name.endswith(tuple(_STACKED)) else parts[0]
        if tensor.shape != param.shape:
            raise ValueError(f"{name}: converted shape {tuple(tensor.shape)} != parameter {tuple(param.shape)}")
        yield name, tensor


@torch.no_grad()
def load_hf_weights(model: Any, model_dir: str | Path, dims: Qwen3Dims) -> int:
    """Copy a Hugging Face checkpoint into this rank's parameters; returns how many were set."""
    gpt = unwrap(model)
    params = dict(gpt.named_parameters())
    count = 0
    for name, tensor in local_tensors(gpt, HfWeights(model_dir), dims):
        params[name].copy_(tensor.to(params[name].dtype))
        count += 1
    return count


# ---- model -> HF ---------------------------------------------------------------------------------

def _gather(t: torch.Tensor, group: Any, size: int) -> list[torch.Tensor]:
    if size == 1:
        return [t]
    import torch.distributed as dist

    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


@torch.no_grad()
def export_hf_state_dict(model: Any, dims: Qwen3Dims) -> dict[str, torch.Tensor]:
    """The HF tensors of this pipeline stage, gathered over tensor and expert parallelism.

    Collective over the TP, expert-TP and EP groups: every rank of them must call it. With one
    pipeline stage this is the whole checkpoint (tied embeddings give no `lm_head.weight`).
    """
    from megatron.core import parallel_state as ps

    gpt = unwrap(model)
    ranks = Ranks.current()
    offset, local_experts = _stage_layout(gpt)
    initialized = ps.model_parallel_is_initialized()
    out: dict[str, torch.Tensor] = {}
    for name, param in gpt.named_parameters():
        if name == "output_layer.weight" and dims.tie_word_embeddings:
            continue
        names = canonical_names(name, offset, local_experts, Ranks())  # EP offsets are applied below
        stacked = name.endswith(tuple(_STACKED))
        pieces = list(param.detach()) if stacked else [param.detach()]
        for canonical, piece in zip(names, pieces, strict=True):
            rule = rule_for(canonical, dims)
            rank_size = ranks.etp if rule.expert else ranks.tp
            group = None
            if initialized and rank_size[1] > 1:
                group = (ps.get_expert_tensor_parallel_group() if rule.expert
                         else ps.get_tensor_model_parallel_group())
            full = merge(_gather(piece, group, rank_size[1]), rule)
            if not rule.expert:
                out.update(zip(rule.hf, from_canonical(rule, full, dims), strict=True))
                continue
            group = ps.get_expert_model_parallel_group() if initialized and ranks.ep[1] > 1 else None
            for ep_rank, expert_full in enumerate(_gather(full, group, ranks.ep[1])):
                hf_names = [_shift_expert(n, ep_rank * local_experts) for n in rule.hf]
                out.update(zip(hf_names, from_canonical(rule, expert_full, dims), strict=True))
    return out


def _shift_expert(hf_name: str, shift: int) -> str:
    """`...mlp.experts.<e>...` with `e + shift` (local expert number -> global)."""
    return re.sub(r"experts\.(\d+)\.", lambda m: f"experts.{int(m[1]) + shift}.", hf_name)


def save_hf_folder(tensors: dict[str, torch.Tensor], out: Path, support_dir: Path,
                   max_shard_size: str = "5GB") -> Path:
    """Write an HF model folder: safetensors shards (+ index) and the config/tokenizer files of
    `support_dir` (config.json, generation_config.json, tokenizer files)."""
    import shutil

    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n].contiguous() for n in names}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for f in sorted(support_dir.iterdir()):
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    return out
