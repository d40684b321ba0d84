"""Megatron runner: SFT of Qwen3 / Qwen3-MoE on megatron-core with TP / PP / EP / CP / SP (GPUs only).

`python -m hpcqwen.runners.megatron RUN_DIR`, started by the launcher on every process:
    load_context -> resolve_model -> load_data (shared cache) -> setup (process groups, GPTModel,
    Float16Module, DDP, DistributedOptimizer, LR schedule) -> restore (resume | mcore load | HF)
    -> train (Megatron's own forward/backward schedule; saves on the intervals, at the end, on STOP)
Checkpoints are `dist_checkpointing` folders `iter_<n>/` under `task.save` (default
`<task dir>/checkpoints`), complete once rank 0 wrote the marker; at start the newest complete one
is resumed whatever the job id. The STOP file (touched by the batch script on USR2) makes every
rank save and leave at the next iteration. With `HPCQWEN_PREPARE_ONLY=1` the runner builds the
data cache and stops (no GPU needed).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from hpcqwen import heartbeat, stopping
from hpcqwen.checkpoints import Pruner
from hpcqwen.metrics import MetricsWriter
from hpcqwen.runners._shared import RunContext, load_context, log0, peak_memory_gb, run_main, train_and_eval
from hpcqwen.stopping import EXIT_STOPPED


@dataclass
class State:
    """What the training loop carries."""

    model: Any  # DDP(Float16Module(GPTModel))
    optimizer: Any
    scheduler: Any
    dims: Any
    model_dir: Path
    train: Any
    evaluation: Any
    train_iters: int
    seq_length: int
    pad_token_id: int
    iteration: int = 0
    cpu_group: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    pruner: Any = field(default_factory=lambda: Pruner())


def checkpoint_root(ctx: RunContext) -> Path:
    """`task.save` (`<save>/tasks/<index>` for an array task: tasks never share a folder), or
    `<task dir>/checkpoints`."""
    if not ctx.task.save:
        return ctx.task_paths.checkpoints
    index = os.environ.get("HPCQWEN_ARRAY_TASK_ID") or ""
    return Path(ctx.task.save) / "tasks" / index if ctx.spec.array is not None and index else Path(ctx.task.save)


def hold_save_folder(ctx: RunContext) -> Any:
    """Rank 0 holds a lease on a user-given `save` folder for the run, so a second submission writing
    the same folder is refused instead of interleaving iter_* folders with this one (None otherwise)."""
    if not ctx.task.save or not ctx.is_rank0:
        return None
    from hpcqwen import lease

    held = lease.acquire(checkpoint_root(ctx) / ".hpcqwen-lease", os.environ.get("HPCQWEN_JOB_ID", "local"),
                         int(os.environ.get("HPCQWEN_RESTART_COUNT", "0") or 0),
                         what=f"megatron save folder {checkpoint_root(ctx)}")
    held.start_refreshing()
    return held


def resolve_model(ctx: RunContext, weights: bool = True) -> Path:
    """The folder with the model's config.json and tokenizer: `load` itself (HF), the `hf/` folder of an
    mcore checkpoint, or the hub snapshot of a hub id (downloaded into the HF cache, or found there;
    without the safetensors when `weights` is false, as the data-cache job needs only the tokenizer)."""
    from hpcqwen.tasks._common import is_hub_id
    from hpcqwen.tasks.megatron import model_folder

    load = ctx.task.load
    if is_hub_id(load):
        from huggingface_hub import snapshot_download

        # concurrent calls on a shared cache are safe: huggingface_hub locks each file it writes
        patterns = ["*.json", "*.txt", "*.jinja", *(["*.safetensors"] if weights else [])]
        return Path(snapshot_download(load, allow_patterns=patterns))
    folder = model_folder(Path(load))
    if folder is None:
        raise FileNotFoundError(f"task.load {load}: no config.json (and no complete iter_<n>/hf/)")
    return folder


def load_data(ctx: RunContext, model_dir: Path) -> tuple[Any, Any, dict[str, Any]]:
    """Train and eval rows from the shared tokenization/packing cache (built once by one process)."""
    from hpcqwen.caching import CacheSettings

    t = ctx.task
    options = dict(tokenizer_dir=str(model_dir), base_dir="/", cache_root=str(ctx.spec.cluster.cache_dir),
                   max_length=t.max_length, packing=t.packing, multi_turn=t.multi_turn,
                   truncation_strategy=t.truncation_strategy, chat_template=t.chat_template, seed=t.seed,
                   num_proc=t.dataset_num_proc, cache=CacheSettings.from_profile(ctx.spec.cluster))
    return train_and_eval(ctx, options)


def device() -> str:
    """"cuda", or "cpu" where there is no GPU (the CPU smoke test of this runner)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def init_parallel(ctx: RunContext) -> Any:
    """NCCL process group, megatron's parallel groups, model-parallel RNG; returns a gloo group for
    control messages (the STOP-file agreement must not wait behind GPU work). On a machine without
    GPUs: gloo, and no CUDA RNG (megatron-core then needs the test shims of tests/megatron_helpers.py)."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    t = ctx.task
    import datetime

    timeout = datetime.timedelta(seconds=heartbeat.collective_timeout_s(1800))  # > every watchdog allowance
    if device() == "cuda":
        torch.cuda.set_device(ctx.local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", ctx.local_rank), timeout=timeout)
    else:
        dist.init_process_group("gloo", timeout=timeout)
    ps.initialize_model_parallel(tensor_model_parallel_size=t.tensor_model_parallel_size,
                                 pipeline_model_parallel_size=t.pipeline_model_parallel_size,
                                 context_parallel_size=t.context_parallel_size,
                                 expert_model_parallel_size=t.expert_model_parallel_size)
    if device() == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(t.seed)
    torch.manual_seed(t.seed)
    return dist.new_group(backend="gloo", timeout=timeout)


def build_options(ctx: RunContext, dims: Any) -> Any:
    """The guide's knobs translated into megatron model options, in one visible block."""
    import torch

    from hpcqwen.megatron.model import BuildOptions, te_available

    t = ctx.task
    use_te = t.transformer_impl == "transformer_engine" or (t.transformer_impl == "auto" and te_available())
    return BuildOptions(
        tensor_parallel=t.tensor_model_parallel_size,
        pipeline_parallel=t.pipeline_model_parallel_size,
        expert_parallel=t.expert_model_parallel_size,
        context_parallel=t.context_parallel_size,
        sequence_parallel=t.sequence_parallel,
        dtype=torch.bfloat16,
        use_te=use_te,
        flash_attention=t.use_flash_attn,
        grouped_experts=t.moe_grouped_gemm,
        dispatcher="alltoall" if device() == "cuda" else "allgather",  # alltoall builds a torch.cuda.Stream
        # the model's own router_aux_loss_coef unless the spec sets one (HF and ms-swift do the same)
        moe_aux_loss_coeff=dims.router_aux_loss_coef if t.moe_aux_loss_coeff is None else t.moe_aux_loss_coeff,
        recompute_granularity=t.recompute_granularity,
        recompute_method=t.recompute_method,
        recompute_num_layers=t.recompute_num_layers,
        cross_entropy_loss_fusion=t.cross_entropy_loss_fusion,
        cpu=device() == "cpu",
        extra={"attention_backend": _attention_backend(t.use_flash_attn)} if use_te else {},
    )


def _attention_backend(flash: bool) -> Any:
    from megatron.core.transformer.enums import AttnBackend

    return AttnBackend.flash if flash else AttnBackend.auto


def build(ctx: RunContext, dims: Any, train_iters: int) -> tuple[Any, Any, Any]:
    """GPTModel -> Float16Module -> DDP, the DistributedOptimizer and the LR schedule.

    The weights are still random here: `restore` loads them and then refreshes the optimizer's fp32
    main parameters, which the optimizer copied from the model when it was built.
    """
    import torch
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.transformer.module import Float16Module

    from hpcqwen.megatron.model import build_model

    t = ctx.task
    gpt = build_model(dims, build_options(ctx, dims))
    config = gpt.config
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True,
                                               check_for_nan_in_grad=True)
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=Float16Module(config, gpt))
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                        adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, clip_grad=t.clip_grad, bf16=True,
                        params_dtype=torch.bfloat16, use_distributed_optimizer=True),
        [model])
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr, lr_warmup_steps=t.lr_warmup_iters,
        lr_decay_steps=max(train_iters, t.lr_warmup_iters + 1), lr_decay_style=t.lr_decay_style,
        start_wd=t.weight_decay, end_wd=t.weight_decay, wd_incr_steps=train_iters, wd_incr_style="constant")
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return model, optimizer, scheduler


def restore(ctx: RunContext, state: State) -> str:
    """Resume from the newest complete checkpoint (rank 0 picks it, every rank uses that one), else
    load `task.load` (mcore or HF); says which."""
    from hpcqwen.megatron import checkpoint
    from hpcqwen.metrics import drop_after

    t = ctx.task
    latest = stopping.agree_resume(lambda: checkpoint.latest_complete(checkpoint_root(ctx)))
    if latest is not None:
        state.iteration = checkpoint.load(latest, state.model, state.optimizer, state.scheduler,
                                          load_rng=not t.no_save_rng)
        if not checkpoint.read_meta(latest).get("optimizer"):
            state.optimizer.reload_model_params()
        if is_metrics_rank():
            drop_after(ctx.task_paths.metrics, state.iteration)  # those iterations run again
        return f"resumed {latest} at iteration {state.iteration}"
    return load_initial(ctx, state)


def load_initial(ctx: RunContext, state: State) -> str:
    """Weights (and, from an mcore checkpoint, the training state) of `task.load`."""
    from hpcqwen.megatron import checkpoint
    from hpcqwen.megatron.convert import load_hf_weights

    t = ctx.task
    source = mcore_source(t.load)
    if source is not None:
        state.iteration = checkpoint.load(source, state.model, state.optimizer, state.scheduler,
                                          finetune=t.finetune, load_rng=False)
        if t.finetune or not checkpoint.read_meta(source).get("optimizer"):
            state.optimizer.reload_model_params()
        return f"loaded {source} ({'weights only' if t.finetune else 'full state'}) at iteration {state.iteration}"
    count = load_hf_weights(state.model, state.model_dir, state.dims)
    state.optimizer.reload_model_params()  # the fp32 main parameters were copied from the random init
    return f"converted {count} tensors from {state.model_dir}"


def mcore_source(load: str) -> Path | None:
    """The `iter_<n>` folder when `load` is an hpcqwen megatron checkpoint, else None (HF folder or hub id)."""
    from hpcqwen.megatron import checkpoint
    from hpcqwen.tasks._common import is_hub_id

    path = Path(load)
    if is_hub_id(load) or (path / "config.json").is_file():
        return None
    return path if checkpoint.iteration_of(path) is not None else checkpoint.latest_complete(path)


# ---- one iteration -------------------------------------------------------------------------------

def micro_batches(ctx: RunContext, state: State, rows: Any, iteration: int, n_micro: int) -> list[Any]:
    """This data-parallel rank's micro-batches of one iteration."""
    from megatron.core import parallel_state as ps

    from hpcqwen.megatron.data import iteration_rows, make_micro_batch

    t = ctx.task
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    global_batch = t.micro_batch_size * dp * n_micro
    index = iteration_rows(len(rows), iteration, global_batch, dp_rank, dp, t.seed)
    mbs = t.micro_batch_size
    return [make_micro_batch([rows[int(i)] for i in index[k:k + mbs]], packing=t.packing,
                             seq_length=state.seq_length, pad_token_id=state.pad_token_id)
            for k in range(0, len(index), mbs)]


def forward_step(data_iterator: Any, model: Any) -> tuple[Any, Any]:
    """Megatron's forward_step_func: one micro-batch -> per-token losses and the loss function."""
    from megatron.core import parallel_state as ps
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.utils import get_batch_on_this_cp_rank

    b = next(data_iterator)
    dev = device()
    tensors = {k: getattr(b, k).to(dev, non_blocking=True) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    packed = None
    if b.cu_seqlens is not None:
        cu = b.cu_seqlens.to(dev, non_blocking=True)
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=b.max_seqlen,
                                 max_seqlen_kv=b.max_seqlen)
    elif ps.get_context_parallel_world_size() > 1:
        tensors = get_batch_on_this_cp_rank(tensors)
    heartbeat.beat("forward" if model.training else "eval")
    t0 = time.monotonic()
    output = model(input_ids=tensors["tokens"], position_ids=tensors["position_ids"], attention_mask=None,
                   labels=tensors["labels"], packed_seq_params=packed)
    hb = heartbeat.current()
    if hb is not None and model.training:  # the watchdog's straggler measure (no collective with TP = PP = 1)
        hb.add_work(time.monotonic() - t0)
    heartbeat.beat("backward" if model.training else "eval")
    return output, partial(loss_func, tensors["loss_mask"])


def loss_func(loss_mask: Any, output: Any) -> tuple[Any, Any, dict[str, Any]]:
    """Sum of the masked token losses and their count (the schedule divides by the global count:
    `calculate_per_token_loss`)."""
    import torch

    mask = loss_mask.view(-1).float()
    loss = torch.sum(output.view(-1).float() * mask)
    tokens = mask.sum().to(torch.int)
    return loss, tokens, {"lm loss": torch.stack([loss.detach(), tokens.detach().float()])}


def run_schedule(ctx: RunContext, state: State, batches: list[Any], forward_only: bool) -> Any:
    """Megatron's schedule over the micro-batches; returns [loss sum, tokens] (last stage, else zeros)."""
    import torch
    from megatron.core.pipeline_parallel import get_forward_backward_func

    shape = batches[0].tokens.shape
    reports = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(batches), model=[state.model],
        num_microbatches=len(batches), seq_length=shape[1], micro_batch_size=shape[0], forward_only=forward_only)
    total = torch.zeros(2, device=device())
    for r in reports or []:
        total += r["lm loss"]
    return total


def train_step(ctx: RunContext, state: State, n_micro: int) -> tuple[Any, float | None, int]:
    """One optimizer step: (loss sum and tokens of this rank, grad norm, real tokens of this rank)."""
    batches = micro_batches(ctx, state, state.train, state.iteration, n_micro)
    state.model.zero_grad_buffer()
    state.optimizer.zero_grad()
    total = run_schedule(ctx, state, batches, forward_only=False)
    heartbeat.beat("optimizer")
    _, grad_norm, _ = state.optimizer.step()
    state.scheduler.step(increment=1)
    state.iteration += 1
    return total, grad_norm, sum(b.num_tokens for b in batches)


def evaluate(ctx: RunContext, state: State, n_micro: int) -> float | None:
    """Mean token loss over `eval_iters` rounds of micro-batches of the eval rows."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if state.evaluation is None or ctx.task.eval_iters == 0:
        return None
    state.model.eval()
    total = torch.zeros(2, device=device())
    with torch.no_grad():
        for k in range(ctx.task.eval_iters):
            total += run_schedule(ctx, state, micro_batches(ctx, state, state.evaluation, k, n_micro), True)
    state.model.train()
    dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    return float(total[0] / total[1].clamp(min=1))


# ---- the loop --------------------------------------------------------------------------------------

def is_metrics_rank() -> bool:
    """The rank that writes metrics.jsonl: the last pipeline stage's first rank (it has the loss)."""
    from megatron.core import parallel_state as ps

    return bool(ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0
                and ps.get_data_parallel_rank(with_context_parallel=True) == 0)


def stop_requested(ctx: RunContext, group: Any) -> bool:
    """Any rank has a stop request, a signal or the STOP file (all ranks agree, over gloo)."""
    return stopping.agree(stopping.requested(ctx.task_paths.stop), group)


def save(ctx: RunContext, state: State) -> Path | None:
    """A complete checkpoint of the current iteration (collective); rank 0 then prunes in the background."""
    from hpcqwen.megatron import checkpoint

    t = ctx.task
    root = checkpoint_root(ctx)
    path = checkpoint.save(root, state.iteration, state.model, state.optimizer, state.scheduler, meta=state.meta,
                           hf_dir=state.model_dir, save_optim=not t.no_save_optim, save_rng=not t.no_save_rng)
    if ctx.is_rank0:
        state.pruner.start_with(checkpoint.prune, root, t.save_total_limit)
    return path


class Logger:
    """Accumulates loss, tokens and time between log lines; writes metrics.jsonl on one rank."""

    def __init__(self, ctx: RunContext, state: State, run_name: str) -> None:
        from hpcqwen.tracking import TRACKERS, Tracker

        self.ctx, self.state = ctx, state
        self.writer = MetricsWriter(ctx.task_paths.metrics) if is_metrics_rank() else None
        trackers = [r for r in ctx.task.report_to if r in TRACKERS]  # tensorboard, wandb, mlflow: same rank
        self.tracker = Tracker(trackers, run_name, ctx.task_paths.dir, ctx.task.model_dump(mode="json")) \
            if trackers and self.writer is not None else None
        self.reset()

    def reset(self) -> None:
        """Start a new interval."""
        import torch

        self.loss = torch.zeros(2, device=device())
        self.tokens, self.iters, self.t0 = 0, 0, time.time()

    def add(self, loss: Any, tokens: int) -> None:
        """One iteration's [loss sum, loss tokens] and real tokens."""
        self.loss += loss
        self.tokens += tokens
        self.iters += 1

    def write(self, record: dict[str, Any]) -> None:
        """One metrics line, also to the trackers of report_to (metrics rank only)."""
        if self.writer is not None:
            self.writer.write(record)
        if self.tracker is not None:
            self.tracker.log(record)

    def close(self) -> None:
        """Finish the trackers."""
        if self.tracker is not None:
            self.tracker.close()

    def flush(self, grad_norm: float | None, n_micro: int) -> None:
        """Reduce over the data-parallel ranks and write a train line (collective)."""
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        s = self.state
        dist.all_reduce(self.loss, group=ps.get_data_parallel_group(with_context_parallel=True))
        tokens = torch.tensor([float(self.tokens)])
        dist.all_reduce(tokens, group=ps.get_data_parallel_group_gloo(with_context_parallel=True))
        record: dict[str, Any] = {
            "step": s.iteration, "total_steps": s.train_iters, "phase": "train",
            "loss": float(self.loss[0] / self.loss[1].clamp(min=1)), "lr": s.optimizer.param_groups[0]["lr"],
            "grad_norm": grad_norm, "tokens_per_s": round(float(tokens.item()) / max(time.time() - self.t0, 1e-9), 1),
            "peak_mem_gb": peak_memory_gb()}
        record.update(self.moe_metrics(n_micro))
        self.write(record)
        self.reset()

    def moe_metrics(self, n_micro: int) -> dict[str, float]:
        """The routers' load-balancing loss averaged over layers and iterations (collective)."""
        if not self.state.dims.is_moe:
            return {}
        from megatron.core.transformer.moe.moe_utils import track_moe_metrics

        totals: dict[str, Any] = {}
        track_moe_metrics(loss_scale=1.0 / (n_micro * max(self.iters, 1)), iteration=self.state.iteration,
                          total_loss_dict=totals, num_layers=self.state.dims.num_layers,
                          moe_layer_freq=self.state.dims.moe_layer_pattern())
        return {("moe_aux_loss" if k == "load_balancing_loss" else k): float(v) for k, v in totals.items()}


def train(ctx: RunContext, state: State, run_name: str) -> str:
    """Iterate until train_iters or a STOP; save on the intervals, at the end and on STOP."""
    log = Logger(ctx, state, run_name)
    try:
        return train_loop(ctx, state, log)
    finally:
        log.close()


def train_loop(ctx: RunContext, state: State, log: Logger) -> str:
    """The iterations of `train`: "done" or "stopped"."""
    from megatron.core import parallel_state as ps

    t = ctx.task
    n_micro = t.global_batch_size // (t.micro_batch_size * ps.get_data_parallel_world_size())
    log.write({"step": state.iteration, "total_steps": state.train_iters, "phase": "train"})
    eval_every = t.eval_interval or t.save_interval
    saved_at = state.iteration
    heartbeat.beat("data", state.iteration, force=True)
    while state.iteration < state.train_iters:
        if stop_requested(ctx, state.cpu_group):
            if saved_at != state.iteration:
                heartbeat.beat("save", state.iteration)
                save(ctx, state)
            return "stopped"
        heartbeat.beat("data", state.iteration)
        loss, grad_norm, tokens = train_step(ctx, state, n_micro)
        hb = heartbeat.current()
        if hb is not None:
            hb.end_step()
        if ctx.is_rank0:
            stopping.mark_progress(ctx.task_paths.progress)
        log.add(loss, tokens)
        if state.iteration % t.log_interval == 0 or state.iteration == state.train_iters:
            log.flush(grad_norm, n_micro)
        if state.iteration % eval_every == 0:
            eval_loss = evaluate(ctx, state, n_micro)
            if eval_loss is not None:
                log.write({"step": state.iteration, "total_steps": state.train_iters, "phase": "eval",
                           "eval_loss": eval_loss})
        if state.iteration % t.save_interval == 0 or state.iteration == state.train_iters:
            heartbeat.beat("save", state.iteration)
            save(ctx, state)
            heartbeat.beat("data", state.iteration)
            saved_at = state.iteration
    return "done"


def describe(ctx: RunContext, state: State, how: str) -> None:
    """Print the derived numbers once."""
    from megatron.core import parallel_state as ps

    from hpcqwen.megatron.convert import unwrap

    t, d = ctx.task, state.dims
    dp = ps.get_data_parallel_world_size()
    params = sum(p.numel() for p in unwrap(state.model).parameters())
    spec = type(unwrap(state.model).decoder.layers[0].self_attention.core_attention).__name__
    experts = getattr(getattr(unwrap(state.model).decoder.layers[0], "mlp", None), "experts", None)
    log0(ctx, f"megatron: {d.model_type} {d.num_layers} layers, {d.num_experts or 'no'} experts; "
              f"TP {t.tensor_model_parallel_size} × PP {t.pipeline_model_parallel_size} × CP "
              f"{t.context_parallel_size} × DP {dp} (EP {t.expert_model_parallel_size}), "
              f"{params:,} parameters on rank 0; global batch {t.global_batch_size} = {t.micro_batch_size} × "
              f"{t.global_batch_size // (t.micro_batch_size * dp)} micro-batches × DP {dp}, "
              f"{state.seq_length} tokens per row{' (packed)' if t.packing else ''}; {state.train_iters} iterations; "
              f"attention {spec}, experts {type(experts).__name__ if experts is not None else '-'}; {how}")


def setup(ctx: RunContext, model_dir: Path, train_rows: Any, eval_rows: Any) -> State:
    """Process groups, model, optimizer and schedule; the training state before `restore`."""
    from hpcqwen.data import open_tokenizer
    from hpcqwen.megatron.convert import unwrap
    from hpcqwen.megatron.data import iterations_for_epochs, round_up
    from hpcqwen.megatron.dims import dims_from_config, read_config

    t = ctx.task
    tokenizer, template_note = open_tokenizer(str(model_dir), t.chat_template)
    log0(ctx, f"megatron: {template_note}")
    cpu_group = init_parallel(ctx)
    dims = dims_from_config(read_config(model_dir))
    train_iters = t.train_iters or iterations_for_epochs(len(train_rows), t.max_epochs or 1, t.global_batch_size)
    # sequence parallelism splits each row over the TP ranks; context parallelism into 2 × CP chunks
    cp = t.context_parallel_size
    multiple = (t.tensor_model_parallel_size if t.sequence_parallel else 1) * (2 * cp if cp > 1 else 1)
    model, optimizer, scheduler = build(ctx, dims, train_iters)
    state = State(model, optimizer, scheduler, dims, model_dir, train_rows, eval_rows, train_iters,
                  round_up(t.max_length, multiple), tokenizer.pad_token_id or 0,
                  cpu_group=cpu_group)
    state.meta = {"dtype": "bfloat16", "padded_vocab_size": unwrap(model).vocab_size, "model_type": dims.model_type,
                  "load": t.load, "global_batch_size": t.global_batch_size,
                  "tensor_model_parallel_size": t.tensor_model_parallel_size,
                  "pipeline_model_parallel_size": t.pipeline_model_parallel_size,
                  "expert_model_parallel_size": t.expert_model_parallel_size}
    return state


def main(run_dir: str) -> int:
    """Train (or, with HPCQWEN_PREPARE_ONLY=1, only build the data cache); 0 when done, 75 when stopped."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from hpcqwen.megatron import checkpoint
    from hpcqwen.tracking import apply_tracking_env

    ctx = load_context(run_dir)
    run_name = apply_tracking_env(ctx.task.report_to, ctx.spec.name, ctx.paths.root, ctx.task_paths.dir)
    if ctx.task.sequence_parallel:  # TP's communication must be ordered before the compute it feeds (megatron)
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    prepare_only = os.environ.get("HPCQWEN_PREPARE_ONLY") == "1"
    model_dir = resolve_model(ctx, weights=not prepare_only)
    train_rows, eval_rows, stats = load_data(ctx, model_dir)
    if prepare_only:
        log0(ctx, "megatron: data cache ready (prepare only)")
        return 0
    held = hold_save_folder(ctx)
    try:
        state = setup(ctx, model_dir, train_rows, eval_rows)
        describe(ctx, state, restore(ctx, state))
        phase = train(ctx, state, run_name)
        state.pruner.join()
        if is_metrics_rank():
            MetricsWriter(ctx.task_paths.metrics).write({"step": state.iteration, "total_steps": state.train_iters,
                                                         "phase": phase, "fill_ratio": stats.get("fill_ratio")})
        log0(ctx, f"megatron: {phase} at iteration {state.iteration}; newest complete checkpoint: "
                  f"{checkpoint.latest_complete(checkpoint_root(ctx))}")
        dist.barrier()
    finally:
        if held is not None:
            held.release()
    ps.destroy_model_parallel()
    dist.destroy_process_group()
    return EXIT_STOPPED if phase == "stopped" else 0


if __name__ == "__main__":  # also keeps dist_checkpointing's spawned Manager from re-running main()
    run_main(main)
