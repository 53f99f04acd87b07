"""The `ppo` and `ppo_ptx` stages: RL against the reward model (Ouyang et al. 2022, eq. 2).

    objective(phi) = E_{(x,y) ~ pi_RL} [ r(x, y) - beta * log(pi_RL(y|x) / pi_SFT(y|x)) ]
                     + gamma * E_{x ~ pretrain} [ log pi_RL(x) ]

Models: the policy pi_RL starts from SFT; the reference pi_SFT is SFT, frozen;
the value model V starts from the RM (a separate model, as in the paper); the
RM r is frozen. gamma = ptx_coef; gamma = 0 is plain PPO.

One iteration, in the order of this file:
  1. rollout     sample y ~ pi_RL(.|x) at temperature 1 (KV cache, left-padded prompts);
                 record log pi_RL, log pi_SFT and V for every response token.
  2. rewards     per token t:  r_t = -beta * (log pi_RL(y_t) - log pi_SFT(y_t)),
                 plus the RM score at the last token (read at EOS); a response cut
                 off without EOS gets the fixed `no_eos_score` instead of the RM's.
  3. advantages  GAE:  delta_t = r_t + d * V_{t+1} - V_t,
                 A_t = delta_t + d * lambda * A_{t+1},  returns R_t = A_t + V_t  (d: ppo.discount, 1 in the paper);
                 A whitened over the iteration's tokens.
  4. losses      for ppo_epochs x minibatches, with rho_t = pi(y_t) / pi_old(y_t):
                 policy  L_pg  = mean_t max(-A_t rho_t, -A_t clip(rho_t, 1-eps, 1+eps))
                 value   L_vf  = 0.5 mean_t max((V_t - R_t)^2, (V_old + clip(V_t - V_old, +-eps_v) - R_t)^2)
                 ptx     L_ptx = gamma * mean over pretraining tokens of -log pi(x)
  5. beta        fixed, or the adaptive controller:  beta *= 1 + clip(KL / KL_target - 1, +-0.2) * n / horizon.

Dropout is off throughout (every dropout module set to 0; rollouts run in eval mode, updates in train mode).
Token tensors are (B, R): B rollouts, R response positions; `mask` marks the
tokens the policy chose (up to and including EOS).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import PPOConfig
from ..context import StageContext
from ..data.formats import PretrainText, Prompt
from ..io import crash_point, read_jsonl
from ..lm.encoding import end_of_turn_id, pack
from ..lm.losses import causal_lm_loss
from ..lm.modeling import (
    context_length,
    disable_dropout,
    load_causal_lm,
    load_reward_model,
    merged,
    trainable_parameters,
)
from ..lm.rollout import (
    PolicySampler,
    Rollout,
    RolloutModels,
    Sampler,
    ValueModel,
    make_rollout,
    minibatch,
    response_logprobs,
    response_values,
    rm_reward,
)
from ..lm.training import (
    LoopLog,
    all_done_across,
    is_sharded,
    processes_report,
    save_model_atomic,
    seed_everything,
    trainable,
    trained_model,
)
from .reward_ensemble import load_ensemble

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the math (pure functions, unit-tested)
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def per_token_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                      beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -beta * (log pi(y_t) - log pi_SFT(y_t)) on every response token, plus the
    sequence score on the last one. Returns (rewards, kl), both (B, R), zero off the mask."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -beta * kl
    last = mask.sum(1).long() - 1                                    # (B,) index of EOS (or the cut-off token)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, discount: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over (B, R) tensors; the value after the
    last token is 0 (the episode ends there). Returns (advantages, returns)."""
    rewards, values = rewards * mask, values * mask
    adv = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.size(1))):
        next_value = values[:, t + 1] if t + 1 < rewards.size(1) else torch.zeros_like(running)
        delta = rewards[:, t] + discount * next_value - values[:, t]
        running = delta + discount * lam * running
        adv[:, t] = running
    adv = adv * mask
    return adv, (adv + values) * mask


def whiten(x: torch.Tensor, mask: torch.Tensor, accelerator=None, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked entries (of every process, when given an accelerator)."""
    stats = torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]).double()
    if accelerator is not None and accelerator.num_processes > 1:
        stats = accelerator.reduce(stats, reduction="sum")
    mean = stats[0] / stats[2]
    var = (stats[1] / stats[2] - mean * mean) * stats[2] / (stats[2] - 1).clamp(min=1)
    return ((x - mean) * torch.rsqrt(var + eps)).to(x.dtype) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip_range: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: mean_t max(-A rho, -A clip(rho, 1-eps, 1+eps))."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask),
                 "approx_kl": masked_mean(0.5 * (logprobs - old_logprobs) ** 2, mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_range: float) -> torch.Tensor:
    """0.5 * mean_t max((V - R)^2, (V_old + clip(V - V_old, -eps, eps) - R)^2)."""
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


def ptx_loss(model, blocks: torch.Tensor, coef: float) -> torch.Tensor:
    """gamma * E_pretrain[-log pi(x)]: minimising it maximises the ptx term of the objective."""
    return coef * causal_lm_loss(model(input_ids=blocks).logits, blocks)


class KLController:
    """beta: fixed, or adapted toward a target KL (Ziegler et al. 2019, eq. 3)."""

    def __init__(self, beta: float, adaptive: bool = False, target: float = 4.0, horizon: int = 10000):
        self.value, self.adaptive, self.target, self.horizon = beta, adaptive, target, horizon

    def update(self, kl: float, n_rollouts: int) -> None:
        if self.adaptive:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.value *= 1.0 + error * n_rollouts / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class EMA:
    """Exponential moving average of the policy's trained weights (paper: 0.992); with LoRA, of the adapters."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().clone().float() for k, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for k, p in model.named_parameters():
            if k in self.shadow:
                self.shadow[k].mul_(self.decay).add_(p.float(), alpha=1 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        for k, p in model.named_parameters():
            if k in self.shadow:
                p.copy_(self.shadow[k].to(p.dtype))

    def state_dict(self) -> dict:
        return self.shadow

    def load_state_dict(self, state: dict) -> None:
        self.shadow = {k: v.clone() for k, v in state.items()}


# --------------------------------------------------------------------------- the run
@dataclass
class PPORun:
    """Everything one PPO run works with. `policy` and `value` are prepared by accelerate
    (wrapped for DDP when there are several processes); `ref` and the reward stay frozen."""

    cfg: PPOConfig
    seed: int
    acc: object                 # accelerate.Accelerator
    policy: torch.nn.Module
    ref: torch.nn.Module | None  # None with LoRA: the policy with its adapters off
    value: torch.nn.Module
    reward: object              # reward(ids, attn) -> (scores, spread or None): lm/rollout.RolloutModels
    tok: object
    opt_p: torch.optim.Optimizer
    opt_v: torch.optim.Optimizer
    kl_ctl: KLController
    ema: EMA | None
    prompts: list[Prompt]
    ptx_coef: float             # gamma; 0 for plain PPO
    ptx_blocks: torch.Tensor | None  # (N, seq_len) pretraining blocks when ptx_coef > 0
    sampler: Sampler | None = None   # who generates (default: the policy itself, instructflow's decoding loop)

    def rollout_models(self) -> RolloutModels:
        return RolloutModels(self.acc.unwrap_model(self.policy), self.ref, self.value, self.reward)


# --------------------------------------------------------------------------- 1-3. experience
@dataclass
class Experience:
    """One iteration's rollouts with their per-token rewards and advantages: what the update learns from."""

    rollout: Rollout
    kl: torch.Tensor            # (B, R) log pi_old - log pi_SFT
    advantages: torch.Tensor    # (B, R) whitened when ppo.whiten_advantages
    returns: torch.Tensor       # (B, R)


def make_experience(run: PPORun, texts: list[str]) -> Experience:
    """1. rollout (eval mode: transformers turns the KV cache off in train mode under gradient checkpointing;
    with dropout disabled the two modes compute the same), 2. rewards, 3. advantages."""
    cfg, acc = run.cfg, run.acc
    run.policy.eval(), run.value.eval()
    with acc.autocast():
        ro = make_rollout(run.sampler, run.rollout_models(), run.tok, texts, cfg, acc.device)
    run.policy.train(), run.value.train()
    rewards, kl = per_token_rewards(ro.logprobs, ro.ref_logprobs, ro.scores, ro.mask, run.kl_ctl.value)
    adv, returns = gae(rewards, ro.values, ro.mask, cfg.discount, cfg.lam)
    if cfg.whiten_advantages:
        adv = whiten(adv, ro.mask, acc)
    return Experience(ro, kl, adv, returns)


# --------------------------------------------------------------------------- 4. the update
def ppo_update(run: PPORun, exp: Experience, g: torch.Generator) -> dict[str, list[float]]:
    """ppo_epochs passes of minibatches over the experience: L_pg (+ L_ptx) on the policy, L_vf on the value model."""
    cfg, acc, ro = run.cfg, run.acc, exp.rollout
    stats: dict[str, list[float]] = {k: [] for k in ("pg_loss", "value_loss", "ptx_loss", "clipfrac", "approx_kl", "entropy")}
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(ro.ids.size(0), generator=g).split(cfg.minibatch_size):
            ids, attn, P, (mb_mask, old_logp, mb_adv, old_v, mb_ret) = minibatch(
                ro, mb, ro.mask, ro.logprobs, exp.advantages, ro.values, exp.returns)
            # policy: L_pg (+ L_ptx)
            logp, ent = response_logprobs(run.policy, ids, attn, P, cfg.temperature, True)
            pg, pstats = policy_loss(logp, old_logp, mb_adv, mb_mask, cfg.clip_range)
            loss = pg
            if run.ptx_blocks is not None:
                idx = torch.randint(len(run.ptx_blocks), (cfg.ptx_batch_size,), generator=g)
                lm = ptx_loss(run.policy, run.ptx_blocks[idx].to(acc.device), run.ptx_coef)
                loss = pg + lm
                stats["ptx_loss"].append(float(lm.detach()) / run.ptx_coef)
            _step(acc, run.policy, run.opt_p, loss, cfg.max_grad_norm)
            # value: L_vf
            v = response_values(run.value, ids, attn, P)
            vf = cfg.vf_coef * value_loss(v, old_v, mb_ret, mb_mask, cfg.value_clip_range)
            _step(acc, run.value, run.opt_v, vf, cfg.max_grad_norm)

            stats["pg_loss"].append(float(pg.detach()))
            stats["value_loss"].append(float(vf.detach()) / max(cfg.vf_coef, 1e-12))
            stats["clipfrac"].append(float(pstats["clipfrac"]))
            stats["approx_kl"].append(float(pstats["approx_kl"]))
            stats["entropy"].append(float(masked_mean(ent.detach(), mb_mask)))
    return stats


def _step(acc, model, optimizer, loss: torch.Tensor, max_grad_norm: float) -> None:
    """backward, clip, step, zero: one gradient step of one model."""
    acc.backward(loss)
    acc.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def iteration_prompts(run: PPORun, it: int) -> list[str]:
    """This process's prompts of iteration `it`: a pass over the prompts in a seeded order per epoch."""
    cfg, world, rank = run.cfg, run.acc.num_processes, run.acc.process_index
    per_epoch = len(run.prompts) // cfg.batch_size or 1
    epoch, slot = divmod(it, per_epoch)
    order = torch.randperm(len(run.prompts), generator=torch.Generator().manual_seed(run.seed + epoch)).tolist()
    chosen = [order[(slot * cfg.batch_size + i) % len(order)] for i in range(cfg.batch_size)][rank::world]
    return [run.prompts[i].prompt for i in chosen]


def ppo_iteration(run: PPORun, it: int) -> dict:
    """One PPO iteration: experience, ppo_epochs of minibatch updates, then beta, EMA and the iteration's numbers."""
    cfg, acc = run.cfg, run.acc
    # Every iteration reseeds from (seed, iteration): a run resumed from a checkpoint
    # draws exactly the prompts, samples and minibatches an uninterrupted one does.
    seed_everything(run.seed * 100003 + it * acc.num_processes + acc.process_index)
    g = torch.Generator().manual_seed(run.seed * 100003 + it)
    exp = make_experience(run, iteration_prompts(run, it))
    stats = ppo_update(run, exp, g)
    run.sampler.sync(acc.unwrap_model(run.policy))

    # 5. beta, EMA, and the iteration's numbers (averaged over processes)
    ro, kl_per_response = exp.rollout, exp.kl.sum(1)
    if ro.reward_std is not None:
        stats["reward_std"] = [float(ro.reward_std.mean())]
    glob = {
        "score": ro.raw_scores.mean(), "reward": (ro.scores - run.kl_ctl.value * kl_per_response).mean(),
        "kl": kl_per_response.mean(), "response_length": ro.mask.sum(1).mean(), "eos_rate": ro.ended.float().mean(),
        **{k: torch.tensor(sum(v) / len(v)) if v else torch.tensor(0.0) for k, v in stats.items()},
    }
    glob = {k: float(acc.reduce(t.detach().float().to(acc.device), reduction="mean")) for k, t in glob.items()}
    beta = run.kl_ctl.value
    run.kl_ctl.update(glob["kl"], cfg.batch_size)
    if run.ema is not None:
        run.ema.update(acc.unwrap_model(run.policy))
    return {"iteration": it + 1, **{k: round(v, 5) for k, v in glob.items()}, "beta": round(beta, 6)}


# --------------------------------------------------------------------------- the stages
def run_ppo(ctx: StageContext) -> dict | None:
    """The `ppo` stage: PPO with gamma = 0."""
    return train_ppo(ctx)


def run_ppo_ptx(ctx: StageContext) -> dict | None:
    """The `ppo_ptx` stage: PPO-ptx with gamma = ppo.ptx_coef."""
    return train_ppo(ctx, ptx=True)


def run_ppo_ensemble(ctx: StageContext) -> dict | None:
    """The `ppo_ensemble` stage: PPO (gamma = 0) against the RM ensemble's conservative reward
    (ensemble.reward); the value model starts from member 0, the reward stage's RM, as in `ppo`."""
    return train_ppo(ctx, ensemble=True)


def train_ppo(ctx: StageContext, ptx: bool = False, ensemble: bool = False, snapshots_on: bool = True) -> dict | None:
    """PPO into the stage's outputs. The policy starts from the input `init` (default: `sft`) and is
    penalized for its KL to `sft`, against the RM `reward_model` (or the ensemble), which also
    starts the value model."""
    cfg = ctx.params.ppo
    snapshotting = cfg.takes_snapshots and snapshots_on
    if snapshotting and cfg.lora.r:
        raise ValueError("ppo.snapshot_every > 0 keeps full copies of the policy, which LoRA training does not "
                         "hold: set ppo.snapshot_every to 0 with ppo.lora.r > 0")
    run, trainable_count = load_run(ctx, ptx, ensemble)
    book = LoopLog(run.acc, ctx.folder, ctx.name, cfg.iterations, cfg, ctx.run_key,
                   {"kl_controller": run.kl_ctl, **({"ema": run.ema} if run.ema is not None else {})}, unit="iteration")
    start = (book.resume(lambda state: state["iteration"]) or {}).get("iteration", 0)
    if run.acc.is_main_process:  # snapshots a previous (other or killed) run left beyond where this one starts
        for n, folder in snapshots(ctx.output("snapshots") if snapshotting else ctx.folder / "snapshots"):
            if n > start:
                shutil.rmtree(folder)
    rebuild = PolicyRebuild(ctx)
    with ctx.phase("train"):
        for it in range(start, cfg.iterations):
            row = ppo_iteration(run, it)
            crash_point(f"iteration:{ctx.name}")
            row["seconds"] = round(time.perf_counter() - book.t0, 2)
            book.write(row)
            book.advance(score=f"{row['score']:.3f}", kl=f"{row['kl']:.2f}")
            if (it + 1) % cfg.log_every == 0 or it + 1 == cfg.iterations:
                book.say(it + 1, row)
            if snapshotting and (it + 1) % cfg.snapshot_every == 0 and it + 1 < cfg.iterations:
                snapshot = trained_model(run.acc, run.policy, rebuild.policy)  # a collective when sharded
                if run.acc.is_main_process:
                    snapshot_dir(ctx.output("snapshots"), it + 1).parent.mkdir(exist_ok=True)
                    save_model_atomic(snapshot, run.tok, snapshot_dir(ctx.output("snapshots"), it + 1))
            if book.checkpoint_due(it + 1):
                book.checkpoint({"iteration": it + 1})
    book.finish({"iteration": cfg.iterations})
    return finish_ppo(ctx, run, book, start, trainable_count, rebuild)


def load_run(ctx: StageContext, ptx: bool, ensemble: bool) -> tuple[PPORun, int]:
    """The models, optimizers and data of a PPO run, prepared by the stage's accelerator."""
    params, cfg = ctx.params, ctx.params.ppo
    acc = ctx.accelerator()
    world = acc.num_processes
    if cfg.batch_size % world:
        raise ValueError(f"ppo.batch_size={cfg.batch_size} must be divisible by the {world} processes")
    if (cfg.batch_size // world) % cfg.minibatch_size:
        raise ValueError(f"ppo.batch_size / processes = {cfg.batch_size // world} must be divisible by "
                         f"ppo.minibatch_size={cfg.minibatch_size}")
    init = ctx.input("init") if ctx.has_input("init") else ctx.input("sft")
    with ctx.phase("load"):
        policy, tok = load_causal_lm(init, params.model.dtype)
        # the reference is SFT. With LoRA on a policy that starts from SFT, that is the policy with its adapters
        # off (no second copy); a round's champion (SFT plus merged adapters) needs SFT loaded beside it
        ref = None if cfg.lora.r and init == ctx.input("sft") else load_causal_lm(ctx.input("sft"), params.model.dtype)[0]
        rm = load_ensemble(ctx, acc.device) if ensemble else load_reward_model(ctx.input("reward_model"), params.model.dtype)[0]
        value_seq_cls, _ = load_reward_model(ctx.input("reward_model"), params.model.dtype)
        for m in (ref, rm):
            if m is not None:
                m.requires_grad_(False).eval().to(acc.device)
        for m in (policy, value_seq_cls):
            disable_dropout(m)  # RL trains without dropout; train mode then computes what eval mode would
        policy, _ = trainable(policy, cfg, "causal_lm", params.model.gradient_checkpointing)
        value_seq_cls, _ = trainable(value_seq_cls, cfg, "score", params.model.gradient_checkpointing)
        value = ValueModel(value_seq_cls)
        count = trainable_parameters(policy)[0] + trainable_parameters(value)[0]
        prompts = read_jsonl(ctx.input("ppo_prompts"), Prompt)
        blocks = None
        if ptx and cfg.ptx_coef > 0:
            texts = [r.text for r in read_jsonl(ctx.input("pretrain_train"), PretrainText)]
            blocks = torch.stack(pack(tok, texts, min(params.pretrain.seq_len, context_length(policy))))

    if cfg.ema_decay > 0 and is_sharded(acc):
        raise ValueError("ppo.ema_decay > 0 is not supported with sharded models (FSDP, DeepSpeed) yet: set it to 0")
    opt_p = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr, eps=1e-5)
    opt_v = torch.optim.Adam([p for p in value.parameters() if p.requires_grad], lr=cfg.value_lr, eps=1e-5)
    policy, opt_p = acc.prepare(policy, opt_p)  # one model per call: FSDP2 swaps each optimizer's parameters
    value, opt_v = acc.prepare(value, opt_v)    # for its model's shards
    kl_ctl = KLController(cfg.kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)
    ema = EMA(acc.unwrap_model(policy), cfg.ema_decay) if cfg.ema_decay > 0 else None
    reward = rm if ensemble else rm_reward(rm)
    run = PPORun(cfg, params.project.seed, acc, policy, ref, value, reward, tok, opt_p, opt_v, kl_ctl, ema, prompts,
                 cfg.ptx_coef if ptx else 0.0, blocks)
    run.sampler = PolicySampler(lambda: acc.unwrap_model(run.policy), end_of_turn_id(tok), tok.pad_token_id,
                                all_done_across(acc))
    return run, count


@dataclass
class PolicyRebuild:
    """Fresh copies of the trained models' architectures, for the full weights gathered under sharding."""

    ctx: StageContext

    def policy(self) -> torch.nn.Module:
        cfg = self.ctx.params.ppo
        return trainable(load_causal_lm(self.ctx.input("sft"), self.ctx.params.model.dtype)[0], cfg, "causal_lm", False)[0]

    def value(self) -> torch.nn.Module:
        cfg = self.ctx.params.ppo
        return ValueModel(trainable(load_reward_model(self.ctx.input("reward_model"), self.ctx.params.model.dtype)[0], cfg,
                                    "score", False)[0])


def finish_ppo(ctx: StageContext, run: PPORun, book: LoopLog, start: int, trainable_count: int,
               rebuild: PolicyRebuild) -> dict | None:
    """The final policy (the EMA's when on) and value model, gathered and saved; the run's metrics."""
    cfg, acc = run.cfg, run.acc
    ran = processes_report(acc, ctx.timer)
    final = trained_model(acc, run.policy, rebuild.policy)
    value_final = trained_model(acc, run.value, rebuild.value)
    if run.ema is not None:
        run.ema.copy_to(final)
    log_rows = book.history
    last = log_rows[-min(5, len(log_rows)):]
    done_here = len(log_rows) - start
    metrics = {"iterations": cfg.iterations, "rollouts": cfg.iterations * cfg.batch_size, "ptx_coef": run.ptx_coef,
               "trainable_parameters": trainable_count, "resumed_from_iteration": start, **ran, "ema_decay": cfg.ema_decay,
               **{f"final_{k}": round(sum(r[k] for r in last) / len(last), 5)
                  for k in ("score", "kl", "entropy", "response_length", "eos_rate", "ptx_loss", "value_loss", "beta")},
               "first_score": log_rows[0]["score"] if log_rows else None,
               "rollouts_per_s": round(done_here * cfg.batch_size / max(time.perf_counter() - book.t0, 1e-9), 2)}
    if acc.is_main_process:
        with ctx.phase("save"):
            save_model_atomic(merged(final), run.tok, ctx.output("model"))
            save_model_atomic(merged(value_final.seq_cls), run.tok, ctx.output("value_model"))
    acc.wait_for_everyone()
    log.info("%s: %s", ctx.name, metrics)
    return metrics if acc.is_main_process else None


def snapshot_dir(folder: Path, iteration: int) -> Path:
    """Where a PPO stage keeps its policy after `iteration` iterations (ppo.snapshot_every), in its snapshots folder."""
    return folder / f"iteration_{iteration:04d}"


def snapshots(folder: Path) -> list[tuple[int, Path]]:
    """(iteration, folder) of a PPO stage's snapshots (its `snapshots` output), in order; the final model is not one."""
    found = sorted(folder.glob("iteration_*/config.json")) if folder.is_dir() else []
    return [(int(f.parent.name.split("_")[1]), f.parent) for f in found]
