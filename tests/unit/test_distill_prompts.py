"""What the engines are given: rendered prompts (thinking off = an empty <think> block after the assistant
header), the reference answer dropped, the chat's per-turn switches and its re-exec arguments."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from hpcqwen.cli.chat import add_arguments, chat_argv, split_switch
from hpcqwen.data.formats import load_dataset_rows
from hpcqwen.data.templates import EMPTY_THINK_PREFIX
from hpcqwen.data.tokenize import load_tokenizer, render_prompt
from hpcqwen.inference import ensure_engine, stop_token_ids
from hpcqwen.tasks.distill import prompt_messages

HEADER = "<|im_start|>assistant\n"


def test_thinking_off_renders_an_empty_think_block_after_the_assistant_header(tiny_tokenizer_dir: Path,
                                                                              data_dir: Path) -> None:
    tok = load_tokenizer(tiny_tokenizer_dir)
    row = load_dataset_rows(["sft-tiny.jsonl#1"], base_dir=data_dir, seed=0)[0]
    assert row["messages"][-1]["role"] == "assistant"
    messages = prompt_messages(row["messages"])
    assert [m["role"] for m in messages] == ["user"]  # the reference answer is not part of the prompt
    off = render_prompt(tok, messages, enable_thinking=False)
    assert off.endswith(HEADER + "<think>\n\n</think>\n\n")
    prefix = render_prompt(tok, messages, response_prefix="<think>\n\n</think>\n\n")
    assert prefix == off  # the guide: --response_prefix '<think>\n\n</think>\n\n' equals enable_thinking false
    on = render_prompt(tok, messages)
    assert on.endswith(HEADER) and "<think>" not in on
    assert render_prompt(tok, row["messages"], enable_thinking=False) == off  # render_prompt drops it too
    ids = tok(off, add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<think>") in ids[-6:] and tok.decode(ids) == off
    assert render_prompt(tok, messages, response_prefix=EMPTY_THINK_PREFIX) == off  # the one home of the prefix
    assert stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]


def test_chat_switches_and_reexec_arguments() -> None:
    assert split_switch("who are you? /no_think") == ("who are you?", False)
    assert split_switch("think hard /think") == ("think hard", True)
    assert split_switch("plain question") == ("plain question", None)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", "/m", "--stream", "--temperature", "0", "--max-new-tokens", "5"])
    argv = chat_argv(args)
    assert argv[:3] == ["-m", "hpcqwen", "chat"]
    again = parser.parse_args(argv[3:])
    assert vars(again) == vars(args)  # the re-exec'd chat gets exactly these options


def test_engine_choice_without_vllm_here() -> None:
    import hpcqwen.inference as inference

    if inference.vllm_importable():
        pytest.skip("vLLM is installed in the test interpreter itself (the main venv keeps it out)")
    assert ensure_engine("hf", None, []) == "hf"
    assert ensure_engine("auto", None, []) == "hf"
    assert ensure_engine("auto", "/nonexistent/python", []) == "hf"
    try:
        ensure_engine("vllm", "/nonexistent/python", [])
    except inference.HpcqwenError as e:
        assert "vLLM is not importable in" in e.message and "scripts/setup-vllm.sh" in e.hint
    else:
        raise AssertionError("expected an error")
