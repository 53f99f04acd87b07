"""One plain training loop on `accelerate`, shared by pretraining, SFT and the RM.

It runs unchanged on CPU, one GPU or many (accelerate launch), the models
replicated (DDP) or sharded (FSDP2: infra/accelerate/). What each stage brings
is a list of examples, a `collate` function and a `loss_fn`; the loop owns the
optimizer (AdamW), warmup + cosine decay, gradient accumulation, clipping,
progress bar and per-step logs (`train_log.jsonl`), and resumable checkpoints.
The data order is a seeded permutation per epoch, so a resumed run skips exactly
the micro-batches it had consumed and sees the same order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..config import OptimConfig, ProjectConfig
from ..io import crash_point, restore_aside, swap_in, writing_folder

log = logging.getLogger(__name__)


class _TiedWeightsNote(logging.Filter):
    """accelerate warns "Removed shared tensor {'lm_head.weight'}" at every checkpoint of a model whose
    output head is tied to its embeddings (SmolLM2, the built-in model): the tie is restored on load,
    and the line said nothing a person could act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Removed shared tensor")


logging.getLogger("accelerate.utils.other").addFilter(_TiedWeightsNote())


def setup_runtime(project: ProjectConfig) -> None:
    """Threads, seeds, deterministic kernels, progress bars and the GPU's peak-memory counter; called at the
    start of each stage."""
    use_deterministic_kernels(project.deterministic)
    if not sys.stderr.isatty():  # transformers' own bars (loading weights, writing shards): terminal only
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if project.threads:
        torch.set_num_threads(project.threads)
    if project.compact_host_memory == "on":
        keep_large_blocks_unpooled()
    seed_everything(project.seed)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()  # `pipeline` runs every stage in one process: each reports its own peak


def use_deterministic_kernels(on: bool) -> None:
    """torch's deterministic algorithms (where an op has one; the others warn): a rerun then gives the same
    bytes. Without them, ops that sum into shared rows with several threads (the backward pass of indexing,
    which the RM's shared-prompt gathers and the pair losses use) sum in thread order, and two runs of the
    same stage drift apart at float level (the RM's log differed from step 150 on 2 cores); measured at no
    cost on the RM's CPU step (docs/decisions.md). CUDA's cuBLAS needs a fixed workspace for it."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)


def keep_large_blocks_unpooled(threshold: int = 128 * 1024) -> None:
    """Fix glibc's mmap threshold (M_MMAP_THRESHOLD) at 128 KiB.

    By default glibc raises the threshold to the size of each large block freed, after which
    blocks of that size come from the heap, where freed ones fragment it instead of returning
    to the system. A loop that frees and re-allocates layer-sized tensors every step (FSDP's
    gathered layers, activations) then grows in RSS step after step: measured on SmolLM2 SFT
    under FSDP2, 2.3 GB -> 3.7 GB over three steps; with the threshold fixed, 2.3 GB flat.
    The price is a fresh mapping, page faults included, for every large tensor: 10-20% of a
    CPU training step (project.compact_host_memory decides; docs/decisions.md). No-op where
    the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def has_accelerator_device() -> bool:
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def make_accelerator(project: ProjectConfig, grad_accum: int = 1, mixed_precision: str = "no",
                     tracking_dir: Path | None = None, run_name: str = "") -> Accelerator:
    """CPU when asked or when there is no GPU. (Saying cpu=True on a GPU-less host
    matters: launched as several processes, accelerate then joins them in one
    gloo group instead of running each alone.) `mixed_precision` "bf16" autocasts
    the prepared models' forward passes, fp32 master weights kept. With
    `project.trackers` and a `tracking_dir`, the curves also go to those trackers."""
    cpu = project.device == "cpu" or not has_accelerator_device()
    trackers = list(project.trackers) if tracking_dir is not None else []
    from accelerate.state import AcceleratorState

    # accelerate keeps one state per process: a stage run after another in the same process
    # (`instructflow run`, tests) may ask for another precision; the process group is kept
    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != mixed_precision:
        AcceleratorState._reset_state()
    acc = Accelerator(cpu=cpu, gradient_accumulation_steps=grad_accum, mixed_precision=mixed_precision,
                      log_with=trackers or None, project_dir=str(tracking_dir) if trackers else None)
    _shard_on_cpu_too(acc)
    if project.compact_host_memory == "auto" and is_sharded(acc) and acc.device.type == "cpu":
        keep_large_blocks_unpooled()
    if trackers:
        acc.init_trackers(run_name or "instructflow")
    return acc


def _shard_on_cpu_too(acc: Accelerator) -> None:
    """Honour an FSDP launch config (infra/accelerate/fsdp2.yaml) on processes without a GPU.

    accelerate 1.15 turns FSDP on only for accelerator backends and leaves gloo (CPU) groups
    as plain DDP, although torch's `fully_shard` shards over gloo just as well. This sets the
    distributed type accelerate would have set on a GPU, so `prepare`, `save_state`,
    `load_state` and `get_state_dict` take their FSDP2 paths: the same code a GPU run takes,
    which is what lets CPU tests prove sharded training."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or acc.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # read from the launch config's FSDP_* environment
    if plugin.fsdp_version != 2:
        raise ValueError("on CPU only FSDP2 is supported: set fsdp_version: 2 (infra/accelerate/fsdp2.yaml)")
    if acc.mixed_precision != "no":
        plugin.set_mixed_precision(acc.mixed_precision)
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin


def is_sharded(acc: Accelerator) -> bool:
    """Whether prepared models hold only a shard of their parameters in each process (FSDP, DeepSpeed)."""
    from accelerate.utils import DistributedType

    return acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def trained_model(acc: Accelerator, prepared: torch.nn.Module, rebuild: Callable[[], torch.nn.Module]) -> torch.nn.Module | None:
    """The trained model as an ordinary module, to evaluate and save.

    Unsharded (one process, DDP): the prepared model, unwrapped, in every process. Sharded
    (FSDP2): each process holds a slice of every parameter, so every process joins in
    gathering the full state dict, and the main process loads it into `rebuild()`, a fresh
    copy of the same architecture (the stage's own loader); the others get None."""
    if not is_sharded(acc):
        return acc.unwrap_model(prepared)
    state = acc.get_state_dict(prepared)  # a collective; full tensors on the main process only
    if not acc.is_main_process:
        return None
    model = rebuild()
    model.load_state_dict(state)
    return model


def processes_report(acc: Accelerator, timer) -> dict:
    """How the stage ran, for its metrics: the number of processes, the distributed type
    ("no", "multi_cpu", "fsdp"...) and every process's peak memory so far (RSS; GPU memory
    when a GPU is used), measured after training and before the final model is gathered and
    saved. A collective: every process calls it."""
    gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() and torch.cuda.is_initialized() else 0.0
    peaks = acc.gather(torch.tensor([[timer.memory.peak_mb(), gpu]], dtype=torch.float64, device=acc.device)).cpu()
    out = {"processes": acc.num_processes, "distributed": str(acc.distributed_type.value).lower(),
           "peak_rss_mb_per_process": [round(float(v), 1) for v in peaks[:, 0]]}
    if gpu:
        out["peak_gpu_memory_mb_per_process"] = [round(float(v), 1) for v in peaks[:, 1]]
    return out


def all_done_across(acc: Accelerator) -> Callable[[bool], bool] | None:
    """For sharded models: a function telling whether every process is done (one int
    all-reduced), which keeps their forward passes in step (generation.sample_tokens).
    None when each process holds whole models and may stop on its own."""
    if not is_sharded(acc):
        return None

    def all_done(done_here: bool) -> bool:
        left = acc.reduce(torch.tensor([0 if done_here else 1], device=acc.device), reduction="sum")
        return int(left.item()) == 0

    return all_done


def autocast(mixed_precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The autocast of `model.mixed_precision` for models accelerate did not prepare (inference)."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in the backward pass (transformers does it in train mode only,
    and turns the KV cache off there: sample and score in eval mode)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def progress(total: int, desc: str, initial: int = 0, main: bool = True):
    """A progress bar on a terminal; none when stderr is not one (CI, Prefect workers,
    log files), where the stages' periodic log lines say the same."""
    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, mininterval=1.0,
                disable=not (main and sys.stderr.isatty()))


def cosine_with_warmup(total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine decay to min_lr_ratio."""
    warmup = max(1, int(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@dataclass
class LoopResult:
    steps: int
    seconds: float
    train_metrics: dict[str, float]
    val_metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from_step: int = 0
    items_per_s: float = 0.0


def epoch_batches(n_items: int, batch_size: int, seed: int, epoch: int,
                  sizes: Sequence | None = None, group: int = 0) -> list[list[int]]:
    """One epoch's micro-batches of item indices, a function of (seed, epoch) alone.

    With `sizes` (a sortable padded-size key per item) and `group` > 0, batches are
    grouped by length, as Hugging Face's LengthGroupedSampler does: the shuffled items
    are cut into windows of `group` batches, each window is sorted by size and cut into
    batches, and the batches are shuffled. A batch is then padded to the longest of
    items of about the same length, not of random ones; every item is still seen once
    per epoch, in the same number of batches."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(n_items, generator=g).tolist()
    if sizes is None or group <= 0:
        return [perm[i : i + batch_size] for i in range(0, n_items, batch_size)]
    if len(sizes) != n_items:
        raise ValueError(f"epoch_batches: {len(sizes)} sizes for {n_items} items")
    window = batch_size * group
    batches = []
    for w in range(0, n_items, window):
        chunk = sorted(perm[w : w + window], key=lambda i: sizes[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def adamw(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, no weight decay on biases and norms."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95), fused=False,
    )  # the lists go with this frame: FSDP replaces the parameters with shards, and they would keep every full one alive


class LoopLog:
    """What every training loop does around its steps (train_loop's, PPO's): resume from the stage's
    checkpoint, keep its train_log.jsonl (a resumed run's rows after the checkpoint are dropped and
    logged again), the progress bar, trackers, a periodic log line with the time left, and checkpoints
    every `checkpoint_every` steps or `checkpoint_minutes`. `unit` names the step ("step", "iteration")."""

    def __init__(self, accelerator: Accelerator, out_dir: Path, name: str, total: int, cfg, run_key: str,
                 stateful: dict[str, Any] | None = None, unit: str = "step"):
        self.acc, self.out_dir, self.name, self.total, self.cfg = accelerator, out_dir, name, total, cfg
        self.run_key, self.stateful, self.unit = run_key, stateful or {}, unit
        self.path = out_dir / "train_log.jsonl"
        self.history: list[dict[str, Any]] = []
        self.start = 0
        self.bar = None
        self.clock = CheckpointClock(accelerator, cfg.checkpoint_every, cfg.checkpoint_minutes)
        self.t0 = time.perf_counter()

    def resume(self, position: Callable[[dict], int]) -> dict | None:
        """Load the checkpoint (when cfg.resume and one of this run exists); `position(state)` is the
        step it was taken after. Returns the trainer state saved with it, or None for a fresh start."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = load_checkpoint(self.acc, self.out_dir, self.run_key, self.stateful) if self.cfg.resume else None
        if state is not None:
            self.start = position(state)
            log.info("%s: resuming from %s %d (%s)", self.name, self.unit, self.start, self.out_dir / "checkpoint")
            if self.path.exists():  # the rows up to the checkpoint stand; a killed run's later rows are logged again
                rows = [json.loads(x) for x in self.path.read_text().splitlines()]
                self.history = [r for r in rows if r[self.unit] <= self.start]
                if self.acc.is_main_process:
                    self.path.write_text("".join(json.dumps(r) + "\n" for r in self.history))
        elif self.path.exists() and self.acc.is_main_process:
            self.path.unlink()
        self.bar = progress(self.total, self.name, self.start, self.acc.is_local_main_process)
        self.t0 = time.perf_counter()
        return state

    def advance(self, **postfix: str) -> None:
        """One step done: the progress bar moves."""
        self.bar.update(1)
        if postfix:
            self.bar.set_postfix(**postfix)

    def write(self, row: dict[str, Any]) -> None:
        """A row of train_log.jsonl (the main process writes it), and the trackers' step."""
        self.history.append(row)
        if self.acc.is_main_process:
            with self.path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
        self.acc.log({k: v for k, v in row.items() if k != self.unit}, step=row[self.unit])

    def say(self, done: int, row: dict[str, Any]) -> None:
        """The log line a person reads: progress, seconds per step, time left, then the row's numbers."""
        elapsed = time.perf_counter() - self.t0
        per_step = elapsed / max(done - self.start, 1)
        left = per_step * (self.total - done)
        numbers = " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != self.unit and isinstance(v, float | int))
        log.info("%s %s %d/%d (%d%%, %.2f s/%s, %s left) %s", self.name, self.unit, done, self.total,
                 100 * done // self.total, per_step, self.unit, _duration(left), numbers)

    def checkpoint_due(self, done: int) -> bool:
        return done < self.total and self.clock.due(done)

    def checkpoint(self, trainer_state: dict) -> None:
        save_checkpoint(self.acc, self.out_dir, {**trainer_state, "run_key": self.run_key}, self.stateful)
        self.clock.saved()

    def finish(self, trainer_state: dict) -> None:
        """The bar closed, the final checkpoint (when checkpoints are on), the trackers ended."""
        self.bar.close()
        if self.cfg.checkpoint_every:
            self.checkpoint(trainer_state)
        if self.acc.trackers:
            self.acc.end_training()


def _duration(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def train_loop(
    *,
    name: str,
    model: torch.nn.Module,
    examples: list,
    collate: Callable[[list], dict[str, torch.Tensor]],
    loss_fn: Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, float]]],
    cfg: OptimConfig,
    out_dir: Path,
    accelerator: Accelerator,
    seed: int,
    val_fn: Callable[[torch.nn.Module], dict[str, float]] | None = None,
    count_fn: Callable[[dict[str, torch.Tensor]], int] | None = None,
    size_fn: Callable[[Any], Any] | None = None,
    run_key: str = "",
) -> LoopResult:
    """Train `model` in place; return metrics. `count_fn(batch)` counts the
    work items (tokens, comparisons) of a batch for the throughput figure.
    `size_fn(example)` gives the padded-size key that `cfg.group_by_length` sorts by."""
    if not examples:
        raise ValueError(f"{name}: no training examples")
    world, rank = accelerator.num_processes, accelerator.process_index
    batches_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    # each process takes every world-th micro-batch; an optimizer step is grad_accum of them
    if batches_per_epoch < world * cfg.grad_accum:
        raise ValueError(f"{name}: {len(examples)} examples make {batches_per_epoch} batches of {cfg.batch_size}, "
                         f"fewer than processes x grad_accum = {world * cfg.grad_accum}")
    micro_per_epoch = batches_per_epoch // world
    sizes = [size_fn(e) for e in examples] if size_fn is not None and cfg.group_by_length else None
    # whole optimizer steps only: a partial accumulation window would be dropped
    total_steps = max(1, int(cfg.epochs * micro_per_epoch) // cfg.grad_accum)
    total_micro = total_steps * cfg.grad_accum

    optimizer = adamw(model, cfg)
    # The schedule is ours, stepped once per optimizer step: accelerate's prepared scheduler
    # steps once per process per step (several processes ran the schedule that many times faster).
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total_steps, cfg.warmup_ratio, cfg.min_lr_ratio))
    model, optimizer = accelerator.prepare(model, optimizer)
    book = LoopLog(accelerator, out_dir, name, total_steps, cfg, run_key, {"scheduler": scheduler})  # scheduler: JSON
    state = book.resume(lambda st: st["micro_batches"] // cfg.grad_accum) or {}
    micro = state.get("micro_batches", 0)

    model.train()
    # the metrics summed since the last log row (a checkpoint keeps them, so a resumed run logs the same rows)
    sums = RunningSums(dict(state.get("running", {})), state.get("n_running", 0))
    items, val_metrics = 0, {}
    while micro < total_micro:
        epoch, start = divmod(micro, micro_per_epoch)
        order = epoch_batches(len(examples), cfg.batch_size, seed, epoch, sizes, cfg.length_group)[rank::world][:micro_per_epoch]
        for idx in order[start:]:
            batch = collate([examples[i] for i in idx])
            batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss, metrics = _micro_step(accelerator, model, optimizer, scheduler, loss_fn, batch, cfg.max_grad_norm)
            micro += 1
            items += count_fn(batch) if count_fn else len(idx)
            sums.add({"loss": float(loss.detach()), **metrics})
            if micro % cfg.grad_accum:
                continue
            step = micro // cfg.grad_accum
            crash_point(f"step:{name}")
            checkpoint_due = book.checkpoint_due(step)
            if world > 1 and (checkpoint_due or step % cfg.log_every == 0 or step == total_steps):
                sums.mean_across(accelerator)  # a row is every process's micro-batches
            if step % cfg.log_every == 0 or step == total_steps:
                row = {"step": step, "epoch": round(micro / micro_per_epoch, 3), "lr": scheduler.get_last_lr()[0],
                       **sums.means(), "items_per_s": round(items / (time.perf_counter() - book.t0), 1)}
                book.write(row)
                book.say(step, row)
                sums.reset()
            book.advance(**({"loss": f"{book.history[-1]['loss']:.4f}"} if book.history else {}))
            if checkpoint_due:
                book.checkpoint({"micro_batches": micro, "step": step, **sums.state()})
            if micro >= total_micro:
                break
        if val_fn is not None and micro < total_micro and micro % micro_per_epoch == 0:
            val_metrics = val_fn(accelerator.unwrap_model(model))
            log.info("%s epoch %d validation %s", name, micro // micro_per_epoch, val_metrics)
            model.train()
    seconds = time.perf_counter() - book.t0
    if world > 1:  # throughput of all processes together
        items = int(accelerator.reduce(torch.tensor([items], device=accelerator.device), reduction="sum").item())
    if val_fn is not None:
        val_metrics = val_fn(accelerator.unwrap_model(model))
        model.train()
    book.finish({"micro_batches": micro, "step": micro // cfg.grad_accum, **sums.state()})
    last = book.history[-1] if book.history else {}
    return LoopResult(
        steps=total_steps, seconds=round(seconds, 3), resumed_from_step=book.start,
        train_metrics={k: v for k, v in last.items() if k not in ("step", "epoch", "lr", "items_per_s")},
        val_metrics=val_metrics, history=book.history, items_per_s=round(items / max(seconds, 1e-9), 1),
    )


@dataclass
class Trained:
    """What `fit` hands back: the trained model as an ordinary module (None in the helper processes of a
    sharded run), the loop's result, and the metrics every trained stage reports."""

    model: torch.nn.Module | None
    loop: LoopResult
    metrics: dict
    accelerator: Accelerator


def fit(ctx, model: torch.nn.Module, cfg: OptimConfig, examples: list, collate: Callable, loss_fn: Callable, *,
        rebuild: Callable[[], torch.nn.Module], accelerator: Accelerator | None = None,
        val_fn: Callable | None = None, count_fn: Callable | None = None, size_fn: Callable | None = None,
        throughput: str = "items_per_s", folder: Path | None = None, run_key: str | None = None,
        seed: int | None = None) -> Trained:
    """The training scaffold of SFT, pretraining, the RM and DPO: the stage's accelerator, `train_loop`
    in the stage's folder under its run key (so a kill resumes), how the processes ran, and the trained
    model gathered whole (`rebuild()`: a fresh model of the same architecture, for sharded runs).
    `ctx` is the stage's runner.StageContext; `folder`, `run_key` and `seed` (the data order's) put the
    loop's checkpoints and log elsewhere under another key and seed (an ensemble member's)."""
    acc = accelerator or ctx.accelerator(cfg.grad_accum)
    model = model.to(acc.device)
    with ctx.phase("train"):
        res = train_loop(name=ctx.name, model=model, examples=examples, collate=collate, loss_fn=loss_fn, cfg=cfg,
                         out_dir=folder or ctx.folder, accelerator=acc, val_fn=val_fn, count_fn=count_fn, size_fn=size_fn,
                         seed=ctx.params.project.seed if seed is None else seed, run_key=run_key or ctx.run_key)
    ran = processes_report(acc, ctx.timer)
    trained = trained_model(acc, model, rebuild)
    metrics = {**ran, "steps": res.steps, "train_loss": res.train_metrics.get("loss"), **res.val_metrics,
               throughput: res.items_per_s, "resumed_from_step": res.resumed_from_step}
    return Trained(trained if acc.is_main_process else None, res, metrics, acc)


def trainable(model: torch.nn.Module, cfg, kind: str, gradient_checkpointing: bool) -> tuple[torch.nn.Module, dict]:
    """The model as a stage trains it (LoRA adapters or its weights, of every layer or cfg.train_top_layers;
    kind: "causal_lm" or "score"), with gradient checkpointing when asked; and its parameter counts."""
    from .modeling import make_trainable, trainable_parameters

    model = make_trainable(model, cfg.lora, kind, cfg.train_top_layers)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    n_trainable, total = trainable_parameters(model)
    return model, {"trainable_parameters": n_trainable, "parameters": total}


def _micro_step(accelerator: Accelerator, model, optimizer, scheduler, loss_fn, batch, max_grad_norm: float):
    """Forward, backward and (every grad_accum micro-batches) clip, step and schedule."""
    with accelerator.accumulate(model):
        loss, metrics = loss_fn(model, batch)
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            metrics["grad_norm"] = float(accelerator.clip_grad_norm_(model.parameters(), max_grad_norm))
        optimizer.step()  # accelerate makes this a no-op until grad_accum micro-batches are in
        if accelerator.sync_gradients:
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss, metrics


class RunningSums:
    """The per-step metrics summed since the last log row."""

    def __init__(self, sums: dict[str, float] | None = None, n: int = 0):
        self.sums, self.n = sums or {}, n

    def add(self, metrics: dict[str, float]) -> None:
        for k, v in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1

    def mean_across(self, accelerator: Accelerator) -> None:
        """Each sum becomes its mean over the processes (logging or checkpointing them commutes with the sums to come)."""
        self.sums = _mean_across(accelerator, self.sums)

    def means(self) -> dict[str, float]:
        return {k: round(v / self.n, 5) for k, v in self.sums.items()}

    def reset(self) -> None:
        self.sums, self.n = {}, 0

    def state(self) -> dict:
        return {"running": self.sums, "n_running": self.n}


def _mean_across(accelerator: Accelerator, sums: dict[str, float]) -> dict[str, float]:
    """Each key's mean over the processes (every process has the same keys). Means of the
    running sums: logging or checkpointing them commutes with the sums still to come."""
    keys = sorted(sums)
    values = accelerator.reduce(torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=accelerator.device),
                                reduction="mean")
    return dict(zip(keys, values.tolist()))


class CheckpointClock:
    """When the next checkpoint is due: every `every` steps (0: never by steps) or every
    `minutes` of training (0: never by time). All processes take the main one's clock,
    so that they save together."""

    def __init__(self, accelerator: Accelerator, every: int, minutes: float):
        self.accelerator, self.every, self.seconds = accelerator, every, minutes * 60
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        by_steps = bool(self.every) and step % self.every == 0
        by_time = bool(self.seconds) and time.monotonic() - self.last >= self.seconds
        if self.accelerator.num_processes > 1 and self.seconds:  # one int per step, from the main process
            from accelerate.utils import broadcast

            by_time = bool(broadcast(torch.tensor([int(by_time)], device=self.accelerator.device), from_process=0).item())
        return by_steps or by_time

    def saved(self) -> None:
        self.last = time.monotonic()


def save_checkpoint(accelerator: Accelerator, out_dir: Path, trainer_state: dict,
                    stateful: dict[str, Any] | None = None) -> None:
    """Save everything `accelerator` prepared (models, optimizers, schedulers, RNG
    states) plus `trainer_state` and the `stateful` objects' state_dicts (their
    tensors as safetensors, the rest as JSON: nothing that loading must unpickle)
    into out_dir/checkpoint.

    Never without a complete checkpoint: the new one is written beside the old,
    the old is renamed aside, the new renamed into place, then the old deleted;
    `load_checkpoint` takes the one aside if a kill fell between the two renames.
    A failure while writing (a full disk) raises with the old checkpoint intact."""
    from safetensors.torch import save_file

    ckpt, tmp = out_dir / "checkpoint", out_dir / "checkpoint.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    with writing_folder(tmp, ckpt, accelerator.is_main_process):
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()  # each process writes its own files (shards, RNG states) before the swap
        if accelerator.is_main_process:
            objects = {}
            for name, obj in (stateful or {}).items():
                state = obj.state_dict()
                tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if torch.is_tensor(v)}
                if tensors:
                    save_file(tensors, str(tmp / f"{name}.safetensors"))
                objects[name] = {k: v for k, v in state.items() if not torch.is_tensor(v)}
            crash_point("checkpoint_written")
            _write_synced(tmp / "trainer_state.json", json.dumps({**trainer_state, "objects": objects}))
    if accelerator.is_main_process:
        swap_in(tmp, ckpt)
    accelerator.wait_for_everyone()


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def load_checkpoint(accelerator: Accelerator, out_dir: Path, run_key: str = "",
                    stateful: dict[str, Any] | None = None) -> dict | None:
    """Restore out_dir/checkpoint into what `accelerator` prepared and into the
    `stateful` objects; return its trainer_state, or None when there is no complete
    checkpoint or when it belongs to another run (other inputs, params or code: see
    registry.stage_key), which must start from scratch, not resume. Loading reads
    safetensors and JSON, and torch.load only with weights_only=True."""
    from safetensors.torch import load_file

    ckpt = out_dir / "checkpoint"
    if accelerator.is_main_process:
        restore_aside(ckpt)  # a kill fell between save_checkpoint's two renames
    accelerator.wait_for_everyone()
    if not (ckpt / "trainer_state.json").exists():
        return None
    state = json.loads((ckpt / "trainer_state.json").read_text())
    if state.get("run_key", "") != run_key:
        log.info("%s: checkpoint is from another run (inputs, params or code changed); starting fresh", ckpt)
        return None
    accelerator.load_state(str(ckpt), load_kwargs={"weights_only": True})
    for name, obj in (stateful or {}).items():
        tensors = ckpt / f"{name}.safetensors"
        obj.load_state_dict({**state.get("objects", {}).get(name, {}), **(load_file(str(tensors)) if tensors.exists() else {})})
    return state


def save_model_atomic(model, tokenizer, dest: Path, extra_config: dict | None = None) -> None:
    """save_pretrained into a temporary folder, then swap it in (the previous model is
    renamed aside first and deleted last, as in save_checkpoint). A failure while
    writing, a full disk included, leaves the previous model as it was."""
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    for k, v in (extra_config or {}).items():
        setattr(model.config, k, v)
    with writing_folder(tmp, dest):
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
    swap_in(tmp, dest)
