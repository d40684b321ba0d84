"""`hpcqwen chat` in a real terminal (tmux send-keys / capture-pane), transformers backend on CPU: two turns,
`/no_think`, `clear`, `exit`. The rendered prompts (--show-prompt) show what each turn sent."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


class Terminal:
    """A private tmux server running one command; the pane stays open and shows EXIT=rc."""

    def __init__(self, argv: list[str]) -> None:
        self.socket = f"hpcqwen-chat-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        cmd = f"cd {shlex.quote(str(REPO))} && env -u COLUMNS -u LINES {shlex.join(argv)}; echo EXIT=$?; sleep 600"
        self.tmux("new-session", "-d", "-s", "t", "-x", "220", "-y", "60", "bash", "-c", cmd)

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True,
                              timeout=20).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-500", "-t", "t")

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", "t", "-l", text)
        self.tmux("send-keys", "-t", "t", "Enter")

    def wait_for(self, pred, timeout: float, what: str) -> str:
        end, screen = time.time() + timeout, ""
        while time.time() < end:
            screen = self.screen()
            if pred(screen):
                return screen
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}; the screen was:\n{screen}")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, check=False)
        (Path(os.environ.get("TMUX_TMPDIR", "/tmp")) / f"tmux-{os.getuid()}" / self.socket).unlink(missing_ok=True)


@pytest.fixture
def chat(tiny_qwen3_dir: Path) -> Iterator[Terminal]:
    term = Terminal([sys.executable, "-m", "hpcqwen", "chat", "--model", str(tiny_qwen3_dir), "--backend", "hf",
                     "--stream", "--temperature", "0.7", "--max-new-tokens", "12", "--show-prompt"])
    try:
        yield term
    finally:
        term.close()


def prompts(screen: str) -> list[str]:
    return [line.split("] ", 1)[1] for line in screen.splitlines() if line.startswith("[prompt: ")]


def ready(n: int):
    """The n-th `<<< ` input prompt is waiting (it is the last thing on the screen)."""
    def check(screen: str) -> bool:
        lines = screen.rstrip().splitlines()  # tmux drops trailing spaces: the prompt shows as `<<<`
        return sum(line.startswith("<<<") for line in lines) >= n and lines[-1] == "<<<"
    return check


def test_chat_turns_think_switch_clear_and_exit(chat: Terminal) -> None:
    screen = chat.wait_for(ready(1), 120, "the first <<< prompt")
    assert "hpcqwen chat (hf): `clear` resets the conversation, `exit` quits" in screen
    chat.type("hello")
    chat.wait_for(ready(2), 60, "the answer to turn 1")
    chat.type("who are you? /no_think")
    screen = chat.wait_for(ready(3), 60, "the answer to turn 2")
    turn1, turn2 = prompts(screen)
    assert turn1 == "'<|im_start|>user\\nhello<|im_end|>\\n<|im_start|>assistant\\n'"
    # turn 2 carries turn 1 (history) and, with /no_think, ends in the empty think block
    assert turn2.startswith("'<|im_start|>user\\nhello<|im_end|>\\n<|im_start|>assistant\\n")
    assert turn2.endswith("<|im_start|>user\\nwho are you?<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>"
                          "\\n\\n'")
    after = screen.split("<<< who are you? /no_think\n", 1)[1].splitlines()
    assert after[0].startswith("[prompt: ") and after[1:4] == ["<think>", "", "</think>"]  # printed before the answer
    chat.type("clear")
    chat.type("hi again")
    screen = chat.wait_for(ready(5), 60, "the answer after clear")
    assert prompts(screen)[-1] == "'<|im_start|>user\\nhi again<|im_end|>\\n<|im_start|>assistant\\n'"  # no history
    chat.type("exit")
    chat.wait_for(lambda s: "EXIT=0" in s, 30, "the chat to exit with 0")


@pytest.fixture
def adapters(tmp_path: Path, tiny_qwen3_dir: Path) -> Path:
    """A LoRA checkpoint of the tiny model, with its tokenizer; adapter_config.json names the base."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = tmp_path / "checkpoint-5"
    get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_qwen3_dir)),
                   LoraConfig(r=4, target_modules="all-linear")).save_pretrained(str(ckpt))
    AutoTokenizer.from_pretrained(str(tiny_qwen3_dir)).save_pretrained(str(ckpt))
    return ckpt


def test_chat_with_adapters_alone_and_the_guide_s_response_prefix(adapters: Path) -> None:
    # As in the guide: `swift infer --adapters DIR --response_prefix '<think>\n\n</think>\n\n'`
    # (a literal backslash-n from the shell).
    term = Terminal([sys.executable, "-m", "hpcqwen", "chat", "--adapters", str(adapters), "--backend", "hf",
                     "--stream", "--max-new-tokens", "8", "--show-prompt", "--response-prefix",
                     r"<think>\n\n</think>\n\n"])
    try:
        term.wait_for(ready(1), 120, "the first <<< prompt")
        term.type("hello")
        term.wait_for(ready(2), 60, "the answer to turn 1")
        term.type("again")
        screen = term.wait_for(ready(3), 60, "the answer to turn 2")
        turn1, turn2 = prompts(screen)
        assert turn1 == "'<|im_start|>user\\nhello<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n'"
        assert turn2.startswith("'<|im_start|>user\\nhello<|im_end|>\\n<|im_start|>assistant\\n")
        assert turn2.endswith("<|im_start|>user\\nagain<|im_end|>\\n<|im_start|>assistant\\n"
                              "<think>\\n\\n</think>\\n\\n'")
        after = screen.split("<<< hello\n", 1)[1].splitlines()
        assert after[0].startswith("[prompt: ") and after[1:4] == ["<think>", "", "</think>"]  # the prefix shows
        term.type("exit")
        term.wait_for(lambda s: "EXIT=0" in s, 30, "the chat to exit with 0")
    finally:
        term.close()


def test_chat_needs_a_model_or_adapters_that_name_one(tmp_path: Path, adapters: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from hpcqwen.cli import main

    assert main(["chat"]) == 1
    assert "give --model DIR, or --adapters DIR" in capsys.readouterr().err
    assert main(["chat", "--adapters", str(tmp_path)]) == 1
    assert "has no adapter_config.json, so its base model is unknown" in capsys.readouterr().err
    config = adapters / "adapter_config.json"
    config.write_text(config.read_text().replace('"base_model_name_or_path": "', '"base_model_name_or_path": "/gone'))
    assert main(["chat", "--adapters", str(adapters)]) == 1
    err = capsys.readouterr().err
    assert f"the base model named by {adapters} (base_model_name_or_path): model folder not found" in err


def test_response_prefix_escapes_are_decoded() -> None:
    from hpcqwen.cli.chat import decode_escapes

    assert decode_escapes(r"<think>\n\n</think>\n\n") == "<think>\n\n</think>\n\n"
    assert decode_escapes(r"a\tb\\n") == "a\tb\\n" and decode_escapes(None) == ""
