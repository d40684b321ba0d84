"""`hpcqwen chat [--model DIR] [--adapters DIR] [--stream]`: a terminal chat like the guide's `swift infer`.

`<<<` prompts for a turn; `clear` forgets the conversation, `exit` (or Ctrl-D) quits; a trailing
`/no_think` or `/think` turns thinking off or on for that turn (the prompt then ends in an empty
`<think>\\n\\n</think>\\n\\n`, printed before the answer, as in the guide). `--response-prefix TEXT`
makes every answer continue from TEXT (ms-swift's `--response_prefix`; `\\n` and `\\t` are decoded, so
the guide's `'<think>\\n\\n</think>\\n\\n'` works as written). `--adapters DIR` alone works like
`swift infer --adapters DIR`: the base model is the one the adapters name (their run's spec, else
`base_model_name_or_path` in adapter_config.json). transformers runs anywhere; vLLM (`--backend vllm`,
or auto when installed) re-execs this command under the vLLM venv.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from typing import Any

from hpcqwen.errors import HpcqwenError

SWITCHES = {"/no_think": False, "/think": True}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--model and the sampling options (ms-swift's names, dashed)."""
    p.add_argument("--model", help="model folder (an exported or base Hugging Face model); default with --adapters: "
                   "the base model the adapters name")
    p.add_argument("--adapters", help="LoRA adapter folder (a checkpoint-<step> of an SFT run); its tokenizer, when "
                   "it has one, is the one used")
    p.add_argument("--response-prefix", help="text every answer continues from, e.g. '<think>\\n\\n</think>\\n\\n' "
                   "(thinking off, as in the guide); \\n and \\t are decoded")
    p.add_argument("--backend", choices=["auto", "vllm", "hf"], default="auto",
                   help="auto (default): vLLM when installed (here or in .venv-vllm), else transformers")
    p.add_argument("--stream", action="store_true", help="print the answer as it is generated")
    p.add_argument("--temperature", type=float, default=0.6, help="0 is greedy (default 0.6)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=2048)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt + answer in tokens (default: 8192, or less if the model is shorter)")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--show-prompt", action="store_true", help="print each rendered prompt before the answer")


def split_switch(text: str) -> tuple[str, bool | None]:
    """'question /no_think' -> ('question', False); no switch -> (text, None)."""
    for switch, thinking in SWITCHES.items():
        if text.endswith(switch):
            return text[: -len(switch)].rstrip(), thinking
    return text, None


def chat_argv(args: argparse.Namespace) -> list[str]:
    """This command's arguments, rebuilt (for the re-exec under the vLLM interpreter)."""
    argv = ["-m", "hpcqwen", "chat", "--model", args.model, "--backend", args.backend]
    for name in ("adapters", "temperature", "top_p", "top_k", "max_new_tokens", "max_model_len", "system", "seed",
                 "response_prefix"):
        if getattr(args, name) is not None:
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return argv + [flag for flag in ("--stream", "--show-prompt") if getattr(args, flag[2:].replace("-", "_"))]


def decode_escapes(text: str | None) -> str:
    """`\\n`, `\\t` and `\\\\` typed on the command line as the characters they stand for."""
    if not text:
        return ""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m[1]], text)


def resolve_model(args: argparse.Namespace) -> str:
    """Set `args.model` (given, or the adapters' base model); return the name to report problems under."""
    from hpcqwen.inference import adapters_base_model

    if not args.model:
        args.model = adapters_base_model(args.adapters)
        return f"the base model named by {args.adapters} (base_model_name_or_path)"
    return "--model"


def check_folders(args: argparse.Namespace, model_key: str = "--model") -> None:
    """The model has weights and a tokenizer; the adapters have their config."""
    from pathlib import Path

    from hpcqwen.tasks._common import check_model_dir

    problems = check_model_dir(model_key, args.model)
    if args.adapters and not (Path(args.adapters) / "adapter_config.json").is_file():
        problems += check_model_dir("--adapters", args.adapters, need_tokenizer=False) or []
    if problems:
        p = problems[0]
        raise HpcqwenError(f"{p.key}: {p.message}", where=p.got, hint=p.hint or f"expected {p.expected}")


def answer(generator: Any, ids: list[int], sampling: Any, seed: int, stream: bool) -> str:
    """Print the answer (piece by piece with --stream) and return it."""
    if not stream:
        text: str = generator.generate([ids], sampling, [seed])[0].completions[0].text
        print(text, end="", flush=True)
        return text
    pieces = []
    for piece in generator.stream(ids, sampling, seed):
        print(piece, end="", flush=True)
        pieces.append(piece)
    return "".join(pieces)


def run(args: argparse.Namespace) -> int:
    """The read-generate-print loop."""
    from hpcqwen.data.templates import EMPTY_THINK_PREFIX
    from hpcqwen.data.tokenize import load_tokenizer, render_prompt
    from hpcqwen.inference import SamplingConfig, ensure_engine, make_generator, tokenizer_folder
    from hpcqwen.tasks.distill import default_vllm_python, model_max_len

    check_folders(args, resolve_model(args))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM logs to stdout: keep the chat readable
    args.max_model_len = args.max_model_len or min(8192, model_max_len(args.model) or 8192)
    backend = ensure_engine(args.backend, default_vllm_python(), chat_argv(args))
    tokenizer = load_tokenizer(tokenizer_folder(args.model, args.adapters))
    generator = make_generator(backend, args.model, tokenizer, adapters=args.adapters,
                               max_model_len=args.max_model_len, seed=args.seed)
    sampling = SamplingConfig(args.temperature, args.top_p, args.top_k, args.max_new_tokens, 1)
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401 - line editing and history for input()
    print(f"hpcqwen chat ({backend}): `clear` resets the conversation, `exit` quits; end a message with "
          "/no_think or /think", flush=True)
    history: list[dict[str, str]] = []
    system = [{"role": "system", "content": args.system}] if args.system else []
    for turn in range(sys.maxsize):
        try:
            line = input("<<< ").strip()
        except EOFError:
            print()
            break
        if line in ("exit", "quit"):
            break
        if line == "clear":
            history = []
            continue
        if not line:
            continue
        text, thinking = split_switch(line)
        user = {"role": "user", "content": text}
        extra = decode_escapes(args.response_prefix)  # the answer continues from it
        prompt = render_prompt(tokenizer, system + history + [user], enable_thinking=thinking, response_prefix=extra)
        prefix = (EMPTY_THINK_PREFIX if thinking is False else "") + extra
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if args.show_prompt:
            print(f"[prompt: {len(ids)} tokens] {prompt!r}")
        if len(ids) >= args.max_model_len:
            print(f"(the conversation has {len(ids)} tokens, over --max-model-len {args.max_model_len}: type clear)")
            continue
        print(prefix, end="")
        reply = answer(generator, ids, sampling, args.seed + turn, args.stream)
        print(flush=True)
        history += [user, {"role": "assistant", "content": prefix + reply}]
    return 0
