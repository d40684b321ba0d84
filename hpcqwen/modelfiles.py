"""Which files of a Hugging Face model folder mean what: the one list each, for the login-node checks,
the cache key, Megatron's HF copies and adapter folders."""

from __future__ import annotations

# Files that decide tokenization (the data cache is keyed by their bytes); weights are left out.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# A folder has a tokenizer when one of these is there (the others complete it).
TOKENIZER_MARKERS = TOKENIZER_FILES[:2]
# Everything but the weights: what a converted checkpoint copies next to its own weights.
CONFIG_FILES = ("config.json", "generation_config.json")
HF_FILES = CONFIG_FILES + TOKENIZER_FILES
