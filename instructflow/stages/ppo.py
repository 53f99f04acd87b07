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

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Params, PPOConfig
from ..data.formats import PretrainText, Prompt
from ..lm.encoding import encode_prompt, end_of_turn_id, pack, pad
from .reward_ensemble import RewardEnsemble, load_ensemble, member_dirs
from ..lm.generation import sample_tokens
from ..io import StageTimer, crash_point, helper_result, read_jsonl, write_result
from ..lm.losses import causal_lm_loss, token_logprobs
from ..lm.modeling import (
    accepts_logits_to_keep,
    backbone,
    context_length,
    disable_dropout,
    layer_classes,
    load_causal_lm,
    load_reward_model,
    make_trainable,
    merged,
    position_ids_from_mask,
    reward_scores,
    score_head,
    trainable_parameters,
)
from ..lm.training import (
    CheckpointClock,
    all_done_across,
    enable_gradient_checkpointing,
    is_sharded,
    load_checkpoint,
    make_accelerator,
    processes_report,
    progress,
    save_checkpoint,
    save_model_atomic,
    seed_everything,
    setup_runtime,
    trained_model,
)

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


def apply_no_eos_score(scores: torch.Tensor, ended: torch.Tensor, no_eos_score: float) -> torch.Tensor:
    """The RM's score where the response ended with EOS, else the fixed penalty score."""
    return torch.where(ended, scores, torch.full_like(scores, no_eos_score))


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


# --------------------------------------------------------------------------- models
class ValueModel(torch.nn.Module):
    """Per-token values from a sequence classifier (the RM): its backbone plus its
    scalar head applied at every position. forward -> (B, T)."""

    def __init__(self, seq_cls):
        super().__init__()
        self.seq_cls = seq_cls
        self._no_split_modules = layer_classes(seq_cls)  # for FSDP's layer-by-layer wrapping

    def forward(self, input_ids, attention_mask, position_ids):
        hidden = backbone(self.seq_cls)(input_ids=input_ids, attention_mask=attention_mask,
                                        position_ids=position_ids).last_hidden_state
        return score_head(self.seq_cls)(hidden).squeeze(-1).float()


def response_logprobs(model, ids: torch.Tensor, attn: torch.Tensor, prompt_width: int, temperature: float,
                      with_entropy: bool = False):
    """log pi(y_t | x, y_<t) for the response tokens ids[:, P:], (B, R); and the per-token entropy.

    Position P-1+t predicts response token t, so only the last R+1 positions need the LM
    head: `logits_to_keep` skips it on the prompt. That is 5% of a training step on the
    default model (vocabulary 1,024; docs/decisions.md) and most of one with a real vocabulary."""
    R = ids.size(1) - prompt_width
    keep = {"logits_to_keep": R + 1} if accepts_logits_to_keep(model) else {}
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn), **keep).logits
    return token_logprobs(logits[:, -R - 1 : -1], ids[:, prompt_width:], temperature, with_entropy)


def response_values(value_model, ids: torch.Tensor, attn: torch.Tensor, prompt_width: int) -> torch.Tensor:
    """V(x, y_<t) for each response token t, (B, R): read where that token is predicted."""
    return value_model(ids, attn, position_ids_from_mask(attn))[:, prompt_width - 1 : -1]


# --------------------------------------------------------------------------- 1. rollout
@dataclass
class Rollout:
    ids: torch.Tensor           # (B, P+R) prompt (left-padded) + response (right-padded)
    attn: torch.Tensor          # (B, P+R)
    mask: torch.Tensor          # (B, R) response tokens the policy chose, EOS included
    prompt_width: int           # P
    logprobs: torch.Tensor      # (B, R) log pi_old
    ref_logprobs: torch.Tensor  # (B, R) log pi_SFT
    values: torch.Tensor        # (B, R) V_old
    scores: torch.Tensor        # (B,) RM score, or no_eos_score
    raw_scores: torch.Tensor    # (B,) RM score as read
    ended: torch.Tensor         # (B,) bool: EOS within the limit
    reward_std: torch.Tensor | None = None  # (B,) the ensemble members' spread (ppo_ensemble)


def reference_logprobs(policy, ref, ids: torch.Tensor, attn: torch.Tensor, prompt_width: int, temperature: float) -> torch.Tensor:
    """log pi_SFT of the response tokens: the frozen reference model, or, with LoRA,
    the policy itself with its adapters disabled (which is SFT: no second copy)."""
    if ref is not None:
        return response_logprobs(ref, ids, attn, prompt_width, temperature)[0]
    with policy.disable_adapter():
        return response_logprobs(policy, ids, attn, prompt_width, temperature)[0]


@torch.no_grad()
def rollout(policy, ref, value_model, rm, tok, prompts: list[str], cfg: PPOConfig, device, all_done=None) -> Rollout:
    max_prompt = context_length(policy) - cfg.max_new_tokens
    p_ids, p_attn = pad([encode_prompt(tok, p)[-max_prompt:] for p in prompts], tok.pad_token_id, side="left")
    p_ids, p_attn = p_ids.to(device), p_attn.to(device)
    eos = end_of_turn_id(tok)
    resp = sample_tokens(policy, p_ids, p_attn, max_new_tokens=cfg.max_new_tokens, eos_id=eos,
                         pad_id=tok.pad_token_id, temperature=cfg.temperature, all_done=all_done)
    P = p_ids.size(1)
    is_eos = resp == eos
    ended = is_eos.any(1)
    first_eos = torch.where(ended, is_eos.float().argmax(1), torch.full_like(ended, resp.size(1) - 1, dtype=torch.long))
    mask = (torch.arange(resp.size(1), device=device)[None] <= first_eos[:, None]).float()
    resp = torch.where(mask.bool(), resp, torch.full_like(resp, tok.pad_token_id))
    ids = torch.cat([p_ids, resp], 1)
    attn = torch.cat([p_attn, mask.long()], 1)
    logprobs, _ = response_logprobs(policy, ids, attn, P, cfg.temperature)
    ref_logprobs = reference_logprobs(policy, ref, ids, attn, P, cfg.temperature)
    values = response_values(value_model, ids, attn, P)
    # read at the last non-pad token: EOS, or the cut-off token; an ensemble gives its conservative reward
    raw, spread = rm(ids, attn) if isinstance(rm, RewardEnsemble) else (reward_scores(rm, ids, attn).float(), None)
    return Rollout(ids, attn, mask, P, logprobs * mask, ref_logprobs * mask, values * mask,
                   apply_no_eos_score(raw, ended, cfg.no_eos_score), raw, ended, spread)


def minibatch(ro: Rollout, rows: torch.Tensor, *per_token: torch.Tensor):
    """Rows `rows` of a rollout, without the columns that are padding in every one of them:
    the left-padded prompts' leading pad columns and the right-padded responses' trailing
    ones (the batch is as wide as its longest prompt plus its longest response). Exact:
    positions come from the attention mask, and padding carries no loss.

    Returns (ids, attn, prompt_width, [each (B, R) tensor of `per_token`, cut to match])."""
    attn = ro.attn[rows]
    lead = int((attn[:, : ro.prompt_width].sum(0) == 0).cumprod(0).sum())  # all-pad prompt columns
    width = int(ro.mask[rows].sum(1).max())                                 # longest response
    end = ro.prompt_width + width
    return (ro.ids[rows, lead:end], attn[:, lead:end], ro.prompt_width - lead,
            [t[rows, :width] for t in per_token])


# --------------------------------------------------------------------------- the loop
@dataclass
class PPORun:
    """Everything one PPO run works with. `policy` and `value` are prepared by accelerate
    (wrapped for DDP when there are several processes); `ref` and `rm` stay frozen."""

    cfg: PPOConfig
    seed: int
    acc: object                 # accelerate.Accelerator
    policy: torch.nn.Module
    ref: torch.nn.Module
    value: torch.nn.Module
    rm: torch.nn.Module
    tok: object
    opt_p: torch.optim.Optimizer
    opt_v: torch.optim.Optimizer
    kl_ctl: KLController
    ema: EMA | None
    prompts: list[Prompt]
    ptx_coef: float             # gamma; 0 for plain PPO
    ptx_blocks: torch.Tensor | None  # (N, seq_len) pretraining blocks when ptx_coef > 0


def run_ppo(params: Params, key: str = "") -> dict:
    """The `ppo` stage: PPO with gamma = 0."""
    return train_ppo(params, key, "ppo")


def run_ppo_ptx(params: Params, key: str = "") -> dict:
    """The `ppo_ptx` stage: PPO-ptx with gamma = ppo.ptx_coef."""
    return train_ppo(params, key, "ppo_ptx", ptx=True)


def run_ppo_ensemble(params: Params, key: str = "") -> dict:
    """The `ppo_ensemble` stage: PPO (gamma = 0) against the RM ensemble's conservative reward
    (ensemble.reward); the value model starts from member 0, the reward stage's RM, as in `ppo`."""
    return train_ppo(params, key, "ppo_ensemble", ensemble=True)


def train_ppo(params: Params, key: str, name: str, ptx: bool = False, ensemble: bool = False, *,
              init: Path | None = None, rm_dir: Path | None = None, reference: Path | None = None,
              snapshots_on: bool = True) -> dict:
    """PPO into artifacts/<name>/. The policy starts from `init` (default: SFT) and is penalized for
    its KL to `reference` (default: SFT), against the RM at `rm_dir` (default: the reward stage's),
    which also starts the value model."""
    setup_runtime(params.project)
    cfg, out = params.ppo, params.stage_dir(name)
    out.mkdir(parents=True, exist_ok=True)
    timer = StageTimer()
    sft_dir, data_dir = params.stage_dir("sft") / "model", params.stage_dir("data")
    rm_dir = rm_dir or params.stage_dir("reward") / "model"
    init, reference = init or sft_dir, reference or sft_dir
    snapshotting = cfg.takes_snapshots and snapshots_on

    acc = make_accelerator(params.project, 1, params.model.mixed_precision, out / "trackers", name)
    world = acc.num_processes
    if cfg.batch_size % world:
        raise ValueError(f"ppo.batch_size={cfg.batch_size} must be divisible by the {world} processes")
    if (cfg.batch_size // world) % cfg.minibatch_size:
        raise ValueError(f"ppo.batch_size / processes = {cfg.batch_size // world} must be divisible by "
                         f"ppo.minibatch_size={cfg.minibatch_size}")

    with timer.phase("load"):
        policy, tok = load_causal_lm(init, params.model.dtype)
        if cfg.lora.r and init != reference:
            raise ValueError(f"{name}: with LoRA the reference is the policy with its adapters off, so the policy must "
                             f"start from the reference ({reference}), not from {init}")
        # with LoRA the reference is the policy with its adapters off: no second copy
        ref = None if cfg.lora.r else load_causal_lm(reference, params.model.dtype)[0]
        rm = load_ensemble(params, acc.device) if ensemble else load_reward_model(rm_dir, params.model.dtype)[0]
        value_seq_cls, _ = load_reward_model(rm_dir, params.model.dtype)
        for m in (ref, rm):
            if m is not None:
                m.requires_grad_(False).eval().to(acc.device)
        for m in (policy, value_seq_cls):
            disable_dropout(m)  # RL trains without dropout; train mode then computes what eval mode would
            if params.model.gradient_checkpointing:
                enable_gradient_checkpointing(m)
        policy = make_trainable(policy, cfg.lora, "causal_lm", cfg.train_top_layers)
        value = ValueModel(make_trainable(value_seq_cls, cfg.lora, "score", cfg.train_top_layers))
        trainable = trainable_parameters(policy)[0] + trainable_parameters(value)[0]
        prompts = read_jsonl(data_dir / "ppo_prompts.jsonl", Prompt)
        blocks = None
        if ptx and cfg.ptx_coef > 0:
            texts = [r.text for r in read_jsonl(data_dir / "pretrain_train.jsonl", PretrainText)]
            blocks = torch.stack(pack(tok, texts, min(params.pretrain.seq_len, context_length(policy))))

    if cfg.ema_decay > 0 and is_sharded(acc):
        raise ValueError("ppo.ema_decay > 0 is not supported with sharded models (FSDP, DeepSpeed) yet: set it to 0")
    if snapshotting and cfg.lora.r:
        raise ValueError("ppo.snapshot_every > 0 keeps full copies of the policy, which LoRA training does not "
                         "hold: set ppo.snapshot_every to 0 with ppo.lora.r > 0")
    opt_p = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=cfg.lr, eps=1e-5)
    opt_v = torch.optim.Adam([p for p in value.parameters() if p.requires_grad], lr=cfg.value_lr, eps=1e-5)
    policy, opt_p = acc.prepare(policy, opt_p)  # one model per call: FSDP2 swaps each optimizer's parameters
    value, opt_v = acc.prepare(value, opt_v)    # for its model's shards
    kl_ctl = KLController(cfg.kl_coef, cfg.adaptive_kl, cfg.kl_target, cfg.kl_horizon)
    ema = EMA(acc.unwrap_model(policy), cfg.ema_decay) if cfg.ema_decay > 0 else None
    stateful = {"kl_controller": kl_ctl, **({"ema": ema} if ema is not None else {})}  # saved as JSON and safetensors
    run = PPORun(cfg, params.project.seed, acc, policy, ref, value, rm, tok, opt_p, opt_v, kl_ctl, ema, prompts,
                 cfg.ptx_coef if ptx else 0.0, blocks)

    log_path = out / "train_log.jsonl"
    start = 0
    state = load_checkpoint(acc, out, key, stateful) if cfg.resume else None
    if state is not None:
        start = state["iteration"]
        log.info("%s: resuming at iteration %d", name, start)
        if acc.is_main_process and log_path.exists():  # drop rows a killed run logged after its last checkpoint
            rows = [r for r in log_path.read_text().splitlines() if json.loads(r)["iteration"] <= start]
            log_path.write_text("".join(r + "\n" for r in rows))
    elif log_path.exists() and acc.is_main_process:
        log_path.unlink()
    if acc.is_main_process:  # snapshots a previous (other or killed) run left beyond where this one starts
        for n, folder in snapshots(out):
            if n > start:
                shutil.rmtree(folder)

    def rebuild_policy():  # a fresh copy of the policy's architecture, for the full weights gathered under sharding
        return make_trainable(load_causal_lm(sft_dir, params.model.dtype)[0], cfg.lora, "causal_lm", cfg.train_top_layers)

    history: list[dict] = []
    t0 = time.perf_counter()
    clock = CheckpointClock(acc, cfg.checkpoint_every, cfg.checkpoint_minutes)
    bar = progress(cfg.iterations, name, start, acc.is_local_main_process)
    with timer.phase("train"):
        for it in range(start, cfg.iterations):
            row = ppo_iteration(run, it)
            crash_point(f"iteration:{name}")
            row["seconds"] = round(time.perf_counter() - t0, 2)
            history.append(row)
            if acc.is_main_process:
                with log_path.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
            acc.log({k: v for k, v in row.items() if k != "iteration"}, step=row["iteration"])  # trackers, when any
            bar.update(1)
            bar.set_postfix(score=f"{row['score']:.3f}", kl=f"{row['kl']:.2f}")
            if (it + 1) % cfg.log_every == 0 or it + 1 == cfg.iterations:
                log.info("%s it %d/%d %s", name, it + 1, cfg.iterations,
                         " ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float)))
            if snapshotting and (it + 1) % cfg.snapshot_every == 0 and it + 1 < cfg.iterations:
                snapshot = trained_model(acc, policy, rebuild_policy)  # a collective when sharded
                if acc.is_main_process:
                    snapshot_dir(out, it + 1).parent.mkdir(exist_ok=True)
                    save_model_atomic(snapshot, tok, snapshot_dir(out, it + 1))
            if it + 1 < cfg.iterations and clock.due(it + 1):
                save_checkpoint(acc, out, {"iteration": it + 1, "run_key": key}, stateful)
                clock.saved()
    bar.close()
    if cfg.checkpoint_every:
        save_checkpoint(acc, out, {"iteration": cfg.iterations, "run_key": key}, stateful)
    if acc.trackers:
        acc.end_training()

    ran = processes_report(acc, timer)
    final = trained_model(acc, policy, rebuild_policy)
    value_final = trained_model(acc, value, lambda: ValueModel(make_trainable(
        load_reward_model(rm_dir, params.model.dtype)[0], cfg.lora, "score", cfg.train_top_layers)))
    if ema is not None:
        ema.copy_to(final)
    full_log = [json.loads(x) for x in log_path.read_text().splitlines()] if log_path.exists() else history
    last = full_log[-min(5, len(full_log)):]
    metrics = {"iterations": cfg.iterations, "rollouts": cfg.iterations * cfg.batch_size, "ptx_coef": run.ptx_coef,
               "trainable_parameters": trainable,
               "resumed_from_iteration": start, **ran, "ema_decay": cfg.ema_decay,
               **{f"final_{k}": round(sum(r[k] for r in last) / len(last), 5)
                  for k in ("score", "kl", "entropy", "response_length", "eos_rate", "ptx_loss", "value_loss", "beta")},
               "first_score": full_log[0]["score"] if full_log else None,
               "rollouts_per_s": round(len(history) * cfg.batch_size / max(time.perf_counter() - t0, 1e-9), 2)}
    if acc.is_main_process:
        with timer.phase("save"):
            save_model_atomic(merged(final), tok, out / "model")
            save_model_atomic(merged(value_final.seq_cls), tok, out / "value_model")
    acc.wait_for_everyone()
    log.info("%s: %s", name, metrics)
    inputs = {"sft": sft_dir, "reward_model": rm_dir, "prompts": data_dir / "ppo_prompts.jsonl",
              **{k: v for k, v in (("init", init), ("reference", reference)) if v != sft_dir}}
    if ensemble:
        inputs.update({f"reward_member_{i}": d for i, d in enumerate(member_dirs(params)) if i})
    if blocks is not None:
        inputs["pretrain"] = data_dir / "pretrain_train.jsonl"
    if not acc.is_main_process:
        return helper_result(name, timer)
    outputs = {"model": out / "model", "value_model": out / "value_model"}
    if snapshotting:
        outputs["snapshots"] = out / "snapshots"
    return write_result(out, name, inputs, outputs, metrics, timer, run_key=key)


def snapshot_dir(out: Path, iteration: int) -> Path:
    """Where a PPO stage keeps its policy after `iteration` iterations (ppo.snapshot_every)."""
    return out / "snapshots" / f"iteration_{iteration:04d}"


def snapshots(out: Path) -> list[tuple[int, Path]]:
    """(iteration, folder) of a PPO stage's snapshots, in order; the final model is not one."""
    folder = out / "snapshots"
    found = sorted(folder.glob("iteration_*/config.json")) if folder.is_dir() else []
    return [(int(f.parent.name.split("_")[1]), f.parent) for f in found]


def ppo_iteration(run: PPORun, it: int) -> dict:
    """One PPO iteration: rollout, rewards, advantages, ppo_epochs of minibatch updates, beta."""
    cfg, acc = run.cfg, run.acc
    world, rank = acc.num_processes, acc.process_index
    # Every iteration reseeds from (seed, iteration): a run resumed from a checkpoint
    # draws exactly the prompts, samples and minibatches an uninterrupted one does.
    seed_everything(run.seed * 100003 + it * world + rank)
    g = torch.Generator().manual_seed(run.seed * 100003 + it)
    per_epoch = len(run.prompts) // cfg.batch_size or 1
    epoch, slot = divmod(it, per_epoch)
    order = torch.randperm(len(run.prompts), generator=torch.Generator().manual_seed(run.seed + epoch)).tolist()
    chosen = [order[(slot * cfg.batch_size + i) % len(order)] for i in range(cfg.batch_size)][rank::world]
    texts = [run.prompts[i].prompt for i in chosen]

    # 1. rollout (eval mode: transformers turns the KV cache off in train mode under gradient checkpointing;
    #    with dropout disabled the two modes compute the same)
    run.policy.eval(), run.value.eval()
    with acc.autocast():
        ro = rollout(acc.unwrap_model(run.policy), run.ref, run.value, run.rm, run.tok, texts, cfg, acc.device,
                     all_done_across(acc))
    run.policy.train(), run.value.train()
    # 2. rewards
    rewards, kl = per_token_rewards(ro.logprobs, ro.ref_logprobs, ro.scores, ro.mask, run.kl_ctl.value)
    # 3. advantages
    adv, returns = gae(rewards, ro.values, ro.mask, cfg.discount, cfg.lam)
    if cfg.whiten_advantages:
        adv = whiten(adv, ro.mask, acc)

    # 4. losses: ppo_epochs passes of minibatches
    stats: dict[str, list[float]] = {k: [] for k in ("pg_loss", "value_loss", "ptx_loss", "clipfrac", "approx_kl", "entropy")}
    for _ in range(cfg.ppo_epochs):
        for mb in torch.randperm(len(texts), generator=g).split(cfg.minibatch_size):
            ids, attn, P, (mb_mask, old_logp, mb_adv, old_v, mb_ret) = minibatch(
                ro, mb, ro.mask, ro.logprobs, adv, ro.values, returns)
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

    # 5. beta, EMA, and the iteration's numbers (averaged over processes)
    kl_per_response = kl.sum(1)
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


def _step(acc, model, optimizer, loss: torch.Tensor, max_grad_norm: float) -> None:
    """backward, clip, step, zero: one gradient step of one model."""
    acc.backward(loss)
    acc.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
