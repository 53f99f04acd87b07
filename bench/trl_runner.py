"""The TRL side of the peer benchmark. Runs ONLY inside a peer virtual
environment made by bench/peers.py (TRL and its own pins; it never imports
instructflow).

    <peer-venv>/bin/python bench/trl_runner.py SPEC.json

SPEC names the task (sft | reward | ppo | rloo), the models, the pre-tokenized
data written by peers.py (the same token ids instructflow trains on), the
hyperparameters, and where to write the trained model and `result.json`.
The timed span is the trainer's own training loop (on_train_begin to
on_train_end), as instructflow's figure is its loop's: model loading, dataset
preparation and saving are outside it on both sides.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainerCallback,
)


class LoopTimer(TrainerCallback):
    """Wall time of the training loop proper."""

    def __init__(self):
        self.start = self.end = None

    def on_train_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kw):
        self.end = time.perf_counter()

    @property
    def seconds(self) -> float:
        return self.end - self.start


def read_jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def common_args(spec: dict) -> dict:
    """Trainer arguments both instructflow's loop and TRL's trainers are matched on."""
    cuda = torch.cuda.is_available()
    return dict(
        output_dir=spec["out_dir"], seed=spec["seed"], data_seed=spec["seed"], report_to="none",
        save_strategy="no", eval_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=not cuda, bf16=False, fp16=False,
        # the data file is already in instructflow's batch order for this seed (see peers.our_order)
        train_sampling_strategy="sequential" if spec.get("sequential") else "random",
    )


def schedule_args(spec: dict, steps: int) -> dict:
    """AdamW (beta2 0.95), linear warmup then cosine to min_lr_ratio, as instructflow's train_loop."""
    return dict(
        learning_rate=spec["lr"], adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": spec["min_lr_ratio"]},
        warmup_steps=int(steps * spec["warmup_ratio"]),  # as instructflow: no warmup when the ratio rounds to 0
    )


# --------------------------------------------------------------------------- SFT
def run_sft(spec: dict, timer: LoopTimer) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = read_jsonl(spec["train"])
    data = Dataset.from_list([{"input_ids": r["input_ids"],
                               "completion_mask": [0] * r["n_prompt"] + [1] * (len(r["input_ids"]) - r["n_prompt"])}
                              for r in rows])
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    steps = math.ceil(len(rows) / spec["batch_size"])
    args = SFTConfig(**common_args(spec), **schedule_args(spec, steps), per_device_train_batch_size=spec["batch_size"],
                     num_train_epochs=1, completion_only_loss=True, packing=False, padding_free=False,
                     max_length=spec["max_len"])
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[timer])
    trainer.train()
    tokens = sum(len(r["input_ids"]) for r in rows)
    trainer.model.save_pretrained(spec["out_dir"] + "/model")
    tok.save_pretrained(spec["out_dir"] + "/model")
    return {"items": tokens, "unit": "tokens", "steps": steps}


# --------------------------------------------------------------------------- reward model
def run_reward(spec: dict, timer: LoopTimer) -> dict:
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    comps = read_jsonl(spec["train"])  # {"sequences": [K token lists], "pairs": [[winner, loser], ...]}
    pairs = [{"chosen_ids": c["sequences"][w], "rejected_ids": c["sequences"][l]} for c in comps for w, l in c["pairs"]]
    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    # Equal comparisons per optimizer step: one step of instructflow takes batch_size prompts with all their
    # pairs; TRL's batch is the same pairs, shuffled across prompts as RewardTrainer does.
    pairs_per_step = math.ceil(len(pairs) / math.ceil(len(comps) / spec["batch_size"]))
    steps = math.ceil(len(pairs) / pairs_per_step)
    args = RewardConfig(**common_args(spec), **schedule_args(spec, steps), per_device_train_batch_size=pairs_per_step,
                        num_train_epochs=1, max_length=None, disable_dropout=True, center_rewards_coefficient=None)
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs), processing_class=tok,
                            callbacks=[timer])
    trainer.train()
    trainer.model.save_pretrained(spec["out_dir"] + "/model")
    tok.save_pretrained(spec["out_dir"] + "/model")
    return {"items": len(comps), "unit": "comparisons", "pairs": len(pairs), "pairs_per_step": pairs_per_step, "steps": steps}


# --------------------------------------------------------------------------- PPO (trl==1.9.0)
def run_ppo(spec: dict, timer: LoopTimer) -> dict:
    from datasets import Dataset
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(spec["model"])
    tok.padding_side = "left"
    policy = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward_model"], num_labels=1, dtype=torch.float32)
    prompts = read_jsonl(spec["train"])  # {"input_ids": [...]}
    episodes = spec["iterations"] * spec["batch_size"]
    args = PPOConfig(
        **common_args(spec), learning_rate=spec["lr"], lr_scheduler_type="constant", adam_epsilon=1e-5,
        max_grad_norm=1.0, per_device_train_batch_size=spec["minibatch_size"], gradient_accumulation_steps=1,
        num_mini_batches=spec["batch_size"] // spec["minibatch_size"], num_ppo_epochs=spec["ppo_epochs"],
        total_episodes=episodes, local_rollout_forward_batch_size=spec["batch_size"], num_sample_generations=0,
        response_length=spec["max_new_tokens"], stop_token="eos", temperature=spec["temperature"],
        missing_eos_penalty=spec["missing_eos_penalty"], kl_coef=spec["kl_coef"], kl_estimator="k1",
        cliprange=spec["clip_range"], cliprange_value=spec["value_clip_range"], vf_coef=spec["vf_coef"],
        gamma=1.0, lam=spec["lam"], whiten_rewards=False,
    )
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=Dataset.from_list(prompts), callbacks=[timer])
    trainer.train()
    trainer.policy_model.save_pretrained(spec["out_dir"] + "/model")
    tok.padding_side = "right"
    tok.save_pretrained(spec["out_dir"] + "/model")
    return {"items": episodes, "unit": "episodes"}


# --------------------------------------------------------------------------- RLOO (current TRL)
def rm_reward_fn(rm_path: str, tok, no_eos_score: float):
    """instructflow's reward exactly: the RM (bias included) at the EOS of prompt + completion tokens;
    a completion cut off without EOS gets no_eos_score."""
    rm = AutoModelForSequenceClassification.from_pretrained(rm_path, num_labels=1, dtype=torch.float32).eval()
    bias = float(getattr(rm.config, "reward_bias", 0.0) or 0.0)

    @torch.no_grad()
    def reward(prompts, completions, completion_ids, **kw) -> list[float]:
        seqs = [tok(p, add_special_tokens=True)["input_ids"] + list(c) for p, c in zip(prompts, completion_ids)]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        scores = rm(input_ids=ids, attention_mask=mask).logits.squeeze(-1) + bias
        ended = [tok.eos_token_id in list(c) for c in completion_ids]
        return [float(s) if e else no_eos_score for s, e in zip(scores, ended)]

    reward.__name__ = "instructflow_rm"
    return reward


def run_rloo(spec: dict, timer: LoopTimer) -> dict:
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    tok = AutoTokenizer.from_pretrained(spec["model"])
    tok.padding_side = "left"
    prompts = read_jsonl(spec["train"])  # {"prompt": "Human: ...\n\nAssistant:"}
    k = spec["num_generations"]
    per_step = spec["batch_size"]  # completions per optimizer step
    steps = spec["iterations"]
    args = RLOOConfig(
        **common_args(spec), learning_rate=spec["lr"], lr_scheduler_type="constant", adam_epsilon=1e-5,
        max_grad_norm=1.0, per_device_train_batch_size=spec["minibatch_size"],
        gradient_accumulation_steps=per_step // spec["minibatch_size"], num_generations=k,
        max_completion_length=spec["max_new_tokens"], temperature=spec["temperature"], top_p=1.0, top_k=0,
        beta=spec["kl_coef"], num_iterations=1, max_steps=steps, log_completions=False,
    )
    trainer = RLOOTrainer(model=spec["model"], reward_funcs=rm_reward_fn(spec["reward_model"], tok, spec["no_eos_score"]),
                          args=args, train_dataset=Dataset.from_list(prompts), processing_class=tok, callbacks=[timer])
    trainer.train()
    trainer.model.save_pretrained(spec["out_dir"] + "/model")
    tok.padding_side = "right"
    tok.save_pretrained(spec["out_dir"] + "/model")
    return {"items": steps * per_step, "unit": "episodes"}


TASKS = {"sft": run_sft, "reward": run_reward, "ppo": run_ppo, "rloo": run_rloo}


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    Path(spec["out_dir"]).mkdir(parents=True, exist_ok=True)
    timer = LoopTimer()
    res = TASKS[spec["task"]](spec, timer)
    res.update(seconds=round(timer.seconds, 3), items_per_s=round(res["items"] / timer.seconds, 2),
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    if torch.cuda.is_available():
        res["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import trl

    res["version"] = trl.__version__
    (Path(spec["out_dir"]) / "result.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
