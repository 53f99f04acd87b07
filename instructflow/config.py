"""The one configuration: `params.yaml`, one section per stage, validated here.

Every field carries a line of help (its `description`). Unknown keys are an
error that names the key, so a typo never silently falls back to a default.
Both the CLI and (later) Prefect and DVC read the same file through
`load_params`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A params file that cannot be used; the message names the file and key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ProjectConfig(_Section):
    seed: int = Field(0, description="Global random seed: data generation, init, sampling.")
    artifacts_dir: str = Field("artifacts", description="Root folder; each stage writes artifacts/<stage>/.")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0 means all cores.")
    device: Literal["auto", "cpu"] = Field("auto", description="'auto' lets accelerate pick a GPU when present.")
    compact_host_memory: Literal["auto", "on", "off"] = Field(
        "auto", description="Fix glibc's mmap threshold so freed tensors go back to the system (training.keep_large_blocks_"
        "unpooled): 'auto' does it for models sharded on CPU, whose RSS otherwise grows every step; 'on' always (less "
        "memory, 10-20% slower on CPU: docs/decisions.md); 'off' never.")
    deterministic: bool = Field(True, description="torch's deterministic kernels, so that a rerun of a stage gives the "
                                "same bytes (off: ops that sum with several threads may sum in another order each run).")
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="Where training curves also go, through accelerate's trackers (off by default; "
        "train_log.jsonl and DVC plots always). Logs under artifacts/<stage>/trackers for tensorboard.")


class TinyModelConfig(_Section):
    """The built-in model's shape; the bounds catch a typed extra zero before a run allocates it."""

    vocab_size: int = Field(1024, ge=64, le=1 << 17, description="BPE vocabulary size of the locally trained tokenizer.")
    hidden_size: int = Field(128, ge=8, le=8192, description="Model width; a multiple of num_heads.")
    intermediate_size: int = Field(384, ge=8, le=32768, description="MLP width.")
    num_layers: int = Field(4, ge=1, le=128, description="Decoder layers.")
    num_heads: int = Field(4, ge=1, le=256, description="Attention heads.")
    max_position_embeddings: int = Field(256, ge=16, le=1 << 16, description="Context length in tokens.")
    init_std: float = Field(
        0.12, gt=0, description="Std of the initial weights (LlamaConfig.initializer_range); why 0.12 here and 0.02 on "
        "HH-RLHF: docs/decisions.md.")

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 2:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be num_heads ({self.num_heads}) x an even head size")
        return self


class ModelConfig(_Section):
    name_or_path: str = Field(
        "builtin:tiny-llama",
        description="A Hugging Face causal LM (local path or hub id), or 'builtin:tiny-llama' to build "
        "and pretrain a tiny Llama-style model and BPE tokenizer locally.",
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig, description="Shape of the built-in model.")
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Dtype of the weights as loaded (float32: fp32 master weights, with mixed_precision for speed).")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no", description="Autocast of the forward passes through accelerate, fp32 master weights kept ('no': fp32 "
        "throughout). Which is faster on which hardware: docs/results.md.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute each layer's activations in the backward pass instead of keeping them: "
        "less memory for about a third more compute (SFT, RM, PPO's policy and value).")


class LoraConfig(_Section):
    r: int = Field(0, ge=0, description="LoRA rank; 0 trains every weight (full fine-tuning).")
    alpha: float = Field(32.0, gt=0, description="LoRA scaling numerator (the update is alpha / r * B A).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA branch.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules that get adapters: 'all-linear' (every linear layer but the output head) or names.")


class LabelerConfig(_Section):
    name: str = Field(description="Labeler id, recorded on every comparison it ranks.")
    heldout: bool = Field(False, description="A held-out labeler writes no training data; it judges evaluation.")
    constraint_weight: float = Field(0.35, ge=0, le=1, description="Share of helpfulness given to explicit constraints (length, format).")
    honesty_penalty: float = Field(0.8, ge=0, le=1, description="How much an invented answer lowers the rating (1 = to the floor).")
    harm_penalty: float = Field(0.9, ge=0, le=1, description="How much complying with a harmful request lowers the rating.")
    rating_noise: float = Field(0.6, ge=0, description="Std of Gaussian noise on the 1-7 Likert rating.")
    ranking_temperature: float = Field(0.5, gt=0, description="Plackett-Luce temperature on the latent 1-7 scale; higher = noisier rankings.")
    demo_error_rate: float = Field(0.2, ge=0, le=1, description="Chance that a demonstration this labeler writes is flawed.")


def _default_labelers() -> list[LabelerConfig]:
    # Five training labelers with distinct priorities and noise, one held out.
    return [
        LabelerConfig(name="ada", constraint_weight=0.30, honesty_penalty=0.9, harm_penalty=0.95, rating_noise=0.5, ranking_temperature=0.4),
        LabelerConfig(name="bo", constraint_weight=0.45, honesty_penalty=0.7, harm_penalty=0.85, rating_noise=0.7, ranking_temperature=0.55),
        LabelerConfig(name="cy", constraint_weight=0.25, honesty_penalty=0.8, harm_penalty=0.90, rating_noise=0.6, ranking_temperature=0.45),
        LabelerConfig(name="di", constraint_weight=0.40, honesty_penalty=0.95, harm_penalty=1.0, rating_noise=0.8, ranking_temperature=0.6),
        LabelerConfig(name="eli", constraint_weight=0.35, honesty_penalty=0.75, harm_penalty=0.8, rating_noise=0.6, ranking_temperature=0.5),
        LabelerConfig(name="hal", heldout=True, constraint_weight=0.35, honesty_penalty=0.85, harm_penalty=0.9, rating_noise=0.6, ranking_temperature=0.45),
    ]


class DataConfig(_Section):
    source: Literal["builtin", "files"] = Field(
        "builtin", description="'builtin' generates the instruction suite; 'files' uses the paths below as they are."
    )
    categories: list[str] = Field(
        default_factory=lambda: [
            "generation", "open_qa", "closed_qa", "brainstorming", "chat",
            "rewrite", "summarization", "classification", "extraction",
        ],
        description="Task categories of the built-in suite.",
    )
    heldout_categories: list[str] = Field(
        default_factory=lambda: ["extraction"], description="Categories kept out of SFT and RM data entirely (evaluation only)."
    )
    sft_prompts: int = Field(3000, ge=1, description="Demonstrations written for SFT (train + validation).")
    rm_prompts: int = Field(5000, ge=1, description="Prompts whose sampled responses get ranked for the RM.")
    ppo_prompts: int = Field(2000, ge=1, description="Prompts for RL (no labels).")
    eval_prompts: int = Field(600, ge=1, description="Held-out prompts for evaluation, all categories.")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="Share of SFT demonstrations and RM prompts kept for validation.")
    pretrain_docs: int = Field(20000, ge=1, description="Documents in the pretraining corpus.")
    pretrain_heldout_fraction: float = Field(0.05, gt=0, lt=1, description="Share of the corpus held out for the alignment tax.")
    unanswerable_rate: float = Field(0.25, ge=0, le=1, description="Share of QA prompts the context or knowledge cannot answer.")
    harmful_rate: float = Field(0.15, ge=0, le=1, description="Share of prompts that invite a disallowed output.")
    labelers: list[LabelerConfig] = Field(default_factory=_default_labelers, description="Simulated labelers.")
    demonstrations: str = Field("", description="With source=files: demonstrations JSONL (prompt, response).")
    comparisons: str = Field("", description="With source=files: comparisons JSONL for the RM.")
    pretrain_text: str = Field("", description="With source=files: pretraining text JSONL ({'text': ...}).")
    best_responses_as_demonstrations: bool = Field(
        False, description="With source=files and demonstrations given: also train SFT on the best response of each "
        "training comparison (HH-RLHF's chosen). Without a demonstrations file SFT always does.")
    gold_fraction: float = Field(
        0.0, ge=0, lt=1, description="With source=files: share of the comparisons' prompts kept for a gold RM, trained on "
        "pairs the proxy RM never sees; it judges the evaluation where no simulated labeler exists (0: no gold RM, no eval).")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        unknown = set(self.heldout_categories) - set(self.categories)
        if unknown:
            raise ValueError(f"heldout_categories names categories not in categories: {sorted(unknown)}")
        if not any(lab.heldout for lab in self.labelers) or all(lab.heldout for lab in self.labelers):
            raise ValueError("labelers needs at least one training labeler and at least one held-out labeler")
        names = [lab.name for lab in self.labelers]
        if len(set(names)) != len(names):
            raise ValueError(f"labeler names must be unique, got {names}")
        return self


# ---- the fields every trained stage shares, declared once; a stage changes only their defaults
LearningRate = Annotated[float, Field(gt=0, description="Peak learning rate (AdamW for SFT, the RMs, DPO, pretraining; "
                                      "Adam, constant, for PPO's policy). A pretrained model's default comes from "
                                      "configs/presets/pretrained.yaml.")]
LogEvery = Annotated[int, Field(ge=1, description="Log a line with the training metrics, progress and time left every N "
                                "optimizer steps (PPO: iterations; every PPO iteration goes to train_log.jsonl).")]
CheckpointEvery = Annotated[int, Field(ge=0, description="Save a resumable checkpoint every N optimizer steps (PPO: "
                                       "iterations; 0: by time only), and at the end.")]
Epochs = Annotated[float, Field(gt=0, description="Passes over the training data (fractions allowed).")]
BatchSize = Annotated[int, Field(ge=1, description="Examples per micro-batch, per process (the RMs and DPO: comparisons, "
                                 "each with its K responses).")]
MaxLen = Annotated[int, Field(ge=8, description="Most prompt + response tokens; longer prompts are cut from the left (the "
                              "RM's export and endpoint cut their inputs to it too).")]
MaxComparisons = Annotated[int, Field(ge=0, description="Train on at most this many comparisons, a seeded sample (0: all).")]
# ---- and the fields every sampling stage shares
Temperature = Annotated[float, Field(gt=0, description="Sampling temperature (paper: 1; no top-k or top-p).")]
MaxNewTokens = Annotated[int, Field(ge=1, description="Response length limit in tokens; a response without EOS by then "
                                    "was cut off (PPO scores it no_eos_score).")]
GenerationBatch = Annotated[int, Field(ge=1, description="Prompts per generation batch.")]


class TrainedConfig(_Section):
    """What every trained stage has: what it trains, its learning rate and clipping, its checkpoints and logs."""

    lr: LearningRate = 1e-3
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm (PPO: policy and value each).")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters instead of full fine-tuning (the RM's "
                             "and the value model's score head trains whole beside them); merged when saved.")
    train_top_layers: int = Field(0, ge=0, description="Train only the top N transformer layers and the head (with LoRA: "
                                  "adapters only there); the layers below run without gradients. 0: every layer.")
    checkpoint_every: CheckpointEvery = 0
    checkpoint_minutes: float = Field(10.0, ge=0, description="Also save one after every this many minutes of training "
                                      "(0: by steps only), so a kill late in a long stage loses at most this much.")
    resume: bool = Field(True, description="Resume from the stage's last checkpoint when one exists.")
    log_every: LogEvery = 10


class OptimConfig(TrainedConfig):
    """A stage trained by the shared loop (lm/training.train_loop): AdamW, warmup + cosine decay, epochs of batches."""

    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps with linear warmup before cosine decay.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decays to lr * min_lr_ratio.")
    batch_size: BatchSize = 32
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    epochs: Epochs = 1.0
    group_by_length: bool = Field(True, description="Batch examples of similar length together, so that less of each batch "
                                  "is padding.")
    length_group: int = Field(50, ge=1, description="With group_by_length: sort windows of this many batches by length, "
                              "then shuffle the batches.")


class PretrainConfig(OptimConfig):
    seq_len: int = Field(128, ge=8, description="Tokens per packed pretraining block.")
    lr: LearningRate = 3e-3
    epochs: Epochs = 1.5
    log_every: LogEvery = 50
    train_external: bool = Field(False, description="Also pretrain a model given by name_or_path (default: only the built-in one).")


class SFTConfig(OptimConfig):
    lr: LearningRate = 1e-3
    epochs: Epochs = 6.0
    log_every: LogEvery = 50
    residual_dropout: float = Field(0.2, ge=0, lt=1, description="Dropout on each residual branch (paper: 0.2). A "
                                    "pretrained model's default is 0 (docs/method.md, \"Pretrained models\").")
    max_len: MaxLen = 160
    eval_prompts: int = Field(200, ge=0, description="Validation prompts generated and judged by the held-out labeler (base vs SFT).")
    max_new_tokens: MaxNewTokens = 32
    group_by_length: bool = Field(False, description="Batch demonstrations of similar length together: faster, but each "
                                  "batch then holds one kind of answer (docs/decisions.md).")


class CollectConfig(_Section):
    k: int = Field(9, ge=2, le=9, description="Responses ranked per prompt (paper: 4 to 9).")
    candidates: int = Field(12, ge=2, description="Samples drawn per prompt; the first k distinct are kept.")
    temperature: Temperature = 1.0
    max_new_tokens: MaxNewTokens = 32
    batch_size: GenerationBatch = 128
    agreement_prompts: int = Field(500, ge=0, description="Validation comparisons ranked by every labeler to measure agreement.")


class RewardConfig(OptimConfig):
    max_len: MaxLen = 160
    lr: LearningRate = 1e-3
    epochs: Epochs = 3.0
    log_every: LogEvery = 50
    batch_size: BatchSize = 16
    max_comparisons: MaxComparisons = 0
    centre_samples: int = Field(0, ge=0, description="Demonstrations scored to centre the rewards at 0, a seeded sample "
                                "(0: all of them).")


class PPOConfig(TrainedConfig):
    iterations: int = Field(100, ge=1, description="PPO iterations; each samples `batch_size` rollouts, then updates.")
    batch_size: int = Field(64, ge=1, description="Rollouts (prompts, one response each) per iteration, over all processes (paper: 512).")
    minibatch_size: int = Field(16, ge=1, description="Rollouts per gradient step, per process (paper: 64).")
    ppo_epochs: int = Field(2, ge=1, description="Passes over each iteration's rollouts.")
    lr: LearningRate = 1e-4
    value_lr: float = Field(1e-4, gt=0, description="Value-model learning rate (Adam); constant.")
    clip_range: float = Field(0.2, gt=0, description="PPO ratio clip epsilon (paper: 0.2).")
    value_clip_range: float = Field(0.2, gt=0, description="Clip of the value update around the rollout's value.")
    vf_coef: float = Field(0.5, ge=0, description="Weight of the value loss.")
    discount: float = Field(1.0, ge=0, le=1, description="Discount factor of GAE (paper: none, i.e. 1). Not the paper's gamma, which is ptx_coef.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    whiten_advantages: bool = Field(True, description="Normalise advantages to mean 0, std 1 over each iteration's tokens.")
    kl_coef: float = Field(0.1, ge=0, description="beta of the per-token KL penalty to the SFT policy (paper: 0.02 at its reward scale); the start value when adaptive.")
    adaptive_kl: bool = Field(False, description="Steer beta toward kl_target (Ziegler et al. 2019) instead of keeping it fixed.")
    kl_target: float = Field(4.0, gt=0, description="Target KL (nats per response) for the adaptive controller.")
    kl_horizon: int = Field(10000, ge=1, description="Horizon (rollouts) of the adaptive controller.")
    ptx_coef: float = Field(0.3, ge=0, description="gamma of PPO-ptx: weight of the pretraining log-likelihood in the ppo_ptx stage (plain ppo uses 0).")
    ptx_batch_size: int = Field(4, ge=1, description="Pretraining blocks per gradient step in PPO-ptx.")
    max_new_tokens: MaxNewTokens = 32
    temperature: Temperature = 1.0
    no_eos_score: float = Field(-2.0, description="Score that replaces the RM's for a response cut off without EOS.")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA of the policy weights, saved as the final model (paper: 0.992; 0 = off).")
    checkpoint_every: CheckpointEvery = 10
    log_every: LogEvery = 5
    snapshot_every: int = Field(10, ge=0, description="Keep the policy every N iterations under artifacts/<stage>/snapshots/ "
                                "(the overoptimization stage scores each one); 0: none. Full fine-tuning, unsharded only.")

    @property
    def takes_snapshots(self) -> bool:
        """Whether a PPO stage keeps snapshots: every snapshot_every iterations, before the last one."""
        return 0 < self.snapshot_every < self.iterations


class EnsembleConfig(_Section):
    members: int = Field(3, ge=2, le=16, description="Reward models in the ensemble, the reward stage's RM included; the "
                         "others train as it did, each with its own seed (project.seed + i).")
    bootstrap: bool = Field(False, description="Train each added member on a bootstrap resample of the comparisons "
                            "(drawn with replacement) instead of all of them.")
    reward: Literal["mean_minus_std", "min", "mean"] = Field(
        "mean_minus_std", description="The reward ppo_ensemble optimizes from the members' scores: mean - std_coef * std "
        "(uncertainty-weighted), the minimum (worst case), or the plain mean (Coste et al. 2024).")
    std_coef: float = Field(1.0, ge=0, description="lambda of mean_minus_std; std is the members' population std.")


class DPOConfig(OptimConfig):
    beta: float = Field(0.1, gt=0, description="beta of DPO: the implicit reward is beta * log(pi / pi_SFT) (Rafailov et al. 2023).")
    loss: Literal["plackett_luce", "pairwise"] = Field(
        "plackett_luce", description="'plackett_luce': one term per prompt over its whole ranking (DPO paper, eq. 18); "
        "'pairwise': the mean over every ranked pair of -log sigmoid(beta * margin), as the RM's loss.")
    lr: LearningRate = 1e-4
    epochs: Epochs = 1.0
    batch_size: BatchSize = 8
    max_len: MaxLen = 160
    max_comparisons: MaxComparisons = 0
    log_every: LogEvery = 50


class BestOfNConfig(_Section):
    n: int = Field(16, ge=1, le=256, description="Answers sampled from SFT per prompt; the RM's favourite is kept. No training.")
    batch_size: GenerationBatch = 64


class MethodsConfig(_Section):
    enabled: bool = Field(True, description="Whether this configuration has the method-comparison stages (reward_ensemble, "
                          "dpo, best_of_n, ppo_ensemble, compare, overoptimization); `make methods` runs them.")
    seeds: int = Field(3, ge=1, le=10, description="Replicates `make methods` runs: this configuration, then the same with "
                       "project.seed + 1, + 2, ... under <artifacts_dir>/seeds/<seed>/ (every stage re-drawn: data, SFT, "
                       "RMs, policies).")
    overopt_prompts: int = Field(300, ge=10, description="Evaluation prompts each PPO snapshot answers in the "
                                 "overoptimization stage.")


class RoundsConfig(_Section):
    enabled: bool = Field(True, description="Whether this configuration has the round stages (round_champion, round_feedback, "
                          "round_reward, round_ppo, round_export, round_gate); `make round` (flows/rounds.py) runs one round.")
    store: str = Field("store", description="Where promoted versions and the `champion` pointer live: s3://bucket/prefix "
                       "(endpoint and credentials from AWS_*), or a local folder.")
    ticket: str = Field("rounds/round.json", description="The round being run and the champion it starts from (kept in git "
                        "beside dvc.lock: a round is one commit of both).")
    ledger: str = Field("rounds/ledger.jsonl", description="One line per finished round: comparisons, RM accuracy, the gate's "
                        "win rates and its decision (kept in git).")
    prompts: int = Field(1000, ge=2, description="New prompts per round, drawn fresh from the suite (none seen before).")
    max_rejected_share: float = Field(0.05, ge=0, le=1, description="Share of a round's comparisons that may fail the "
                                      "Great Expectations suite: those are quarantined and left out; above it the round "
                                      "stops before any training.")
    ranker: Literal["simulated", "label_studio"] = Field(
        "simulated", description="Who ranks a round's answers: the built-in suite's simulated labelers, or people in "
        "Label Studio (the `labeling` section; the round waits until they are done).")
    algorithm: Literal["ppo", "ppo_ptx"] = Field("ppo_ptx", description="How the challenger is trained from the champion: "
                                                 "PPO, or PPO-ptx with ppo.ptx_coef.")
    gate_prompts: int = Field(0, ge=0, description="Held-out evaluation prompts the gate judges on (0: all of them).")
    gate_min_lower: float = Field(0.5, ge=0, lt=1, description="Promote the challenger only when the lower end of the 95% "
                                  "bootstrap interval of its win rate over the champion is above this.")
    git_commit: bool = Field(True, description="Commit the ticket, the ledger and dvc.lock after each round (when the "
                             "project is a git work tree).")


class LabelingConfig(_Section):
    """People ranking and writing in Label Studio (`instructflow label ...`; rounds with rounds.ranker: label_studio)."""

    url: str = Field("http://127.0.0.1:8080", description="Label Studio's address (`make label-studio` starts one here).")
    project_prefix: str = Field("instructflow", description="Start of the title of every project instructflow creates.")
    api_key_env: str = Field("LABEL_STUDIO_API_KEY", description="Environment variable holding the API key instructflow "
                             "uses (never written to params, logs or artifacts).")
    labelers: list[str] = Field(default_factory=list, description="The people (emails, or the part before the @) whose "
                                "annotations count; an annotation by anyone else is listed, not used. Empty: everyone "
                                "in the Label Studio organization.")
    overlap: int = Field(1, ge=1, le=9, description="People who rank each task of the overlapping share (2 or more: their "
                         "agreement is measured, as InstructGPT's 72.6%).")
    overlap_share: float = Field(0.0, ge=0, le=1, description="Share of the tasks ranked by `overlap` people.")
    known_share: float = Field(0.0, ge=0, lt=1, description="Share of known-answer tasks added to a round's: they score "
                               "each labeler and are not training data.")
    known_comparisons: str = Field("", description="Comparisons whose rankings are the known answers (JSONL). Empty with "
                                   "the built-in suite: a correct and a flawed response per prompt, from its grader.")
    min_known_accuracy: float = Field(0.6, ge=0, le=1, description="Labelers who agree with the known answers less than "
                                      "this (pairs of responses) are reported.")
    min_known_tasks: int = Field(3, ge=1, description="Known-answer tasks a labeler must have done to be judged.")
    hold_out_below: bool = Field(False, description="Leave out the rankings of the labelers below min_known_accuracy.")
    min_done: float = Field(1.0, gt=0, le=1, description="Share of a round's tasks that must be done before it goes on.")
    # talking to Label Studio
    timeout_s: Annotated[float, Field(gt=0, description="Timeout of one API call.")] = 30.0
    retry_seconds: float = Field(120.0, ge=0, description="How long a call retries while Label Studio is down or "
                                 "restarting (backoff up to 10 s), before one clear error.")
    poll_minutes: float = Field(10.0, gt=0, description="How often the scheduled check (deployment `label-watch`) asks "
                                "Label Studio whether a waiting round's tasks are done.")
    wait_hours: float = Field(24 * 14, gt=0, description="How long a round waits for people before it fails.")


class EvalConfig(_Section):
    prompts: int = Field(0, ge=0, description="Evaluation prompts used (0: all of data.eval_prompts).")
    temperature: Temperature = 1.0
    max_new_tokens: MaxNewTokens = 32
    batch_size: GenerationBatch = 64
    few_shot: int = Field(3, ge=0, description="Demonstrations in the base model's prompt ('GPT prompted').")
    bootstrap: int = Field(2000, ge=100, description="Bootstrap resamples for the win-rate intervals.")
    samples_per_category: int = Field(3, ge=0, description="Prompts per category shown in samples.md.")


class ExportConfig(_Section):
    opset: int = Field(18, ge=17, description="ONNX opset of the exported RM.")
    parity_tolerance: float = Field(1e-4, gt=0, description="Max |onnx - torch| score difference (fp32) allowed; above it the export fails.")
    parity_cases: list[tuple[int, int]] = Field(
        default_factory=lambda: [(1, 5), (2, 7), (3, 33), (8, 100), (5, 256)],
        description="(batch size, sequence length) pairs checked; lengths are capped at the model's context.",
    )


class ServeConfig(_Section):
    host: str = Field("127.0.0.1", description="Interface to bind.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port.")
    max_batch_size: int = Field(32, ge=1, description="Most (prompt, response) items scored in one ONNX Runtime call.")
    max_wait_ms: float = Field(0.0, ge=0, description="How long the batcher waits for more requests before running a partial batch; "
                               "0: none, a batch takes the requests that queued while the previous one ran.")
    max_padding: float = Field(0.25, ge=0, description="A batch is scored in groups of similar length, each padded by at "
                               "most this share of its real tokens (a large value: one call per batch, padded to its longest).")
    max_items: int = Field(64, ge=1, description="Most items in one /v1/score request (413 above).")
    max_chars: int = Field(8000, ge=1, description="Most characters in one prompt or response field (413 above).")
    max_body_bytes: int = Field(1_000_000, ge=1, description="Largest request body accepted (413 above).")
    provider: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto': CUDA when a session really starts on it, else CPU.")
    backend: Literal["onnx", "torch"] = Field("onnx", description="'onnx' serves an export folder; 'torch' serves the RM checkpoint eagerly (for comparisons).")
    api_keys_env: str = Field("INSTRUCTFLOW_API_KEYS", description="Environment variable with comma-separated API keys; unset and no file means no auth.")
    api_keys_file: str = Field("", description="File with one API key per line (alternative to the environment variable).")
    cache_dir: str = Field("artifacts/serve-cache", description="Where a model given as s3://bucket/prefix is downloaded.")
    champion_poll_s: float = Field(30.0, gt=0, description="Serving <store>/champion: how often the pointer is read; a "
                                   "new version is fetched, verified beside the old one and swapped in.")
    admin_keys_env: str = Field("INSTRUCTFLOW_ADMIN_KEYS", description="Environment variable with comma-separated keys of "
                                "the admin endpoints (POST /admin/reload); unset: they answer 403.")


Chars = Annotated[int, Field(ge=1, description="Longest text of this kind a dataset row may hold, in characters.")]


class ValidateConfig(_Section):
    """Limits of the Great Expectations suites (instructflow/data/validate.py): prompts, responses or
    demonstrations, and pretraining documents."""

    max_prompt_chars: Chars = 8000
    max_response_chars: Chars = 8000
    max_text_chars: Chars = 100_000
    max_failed_rows_shown: int = Field(10, ge=1, description="Line numbers listed per failed expectation in the report.")


class OrchestrateConfig(_Section):
    version_with_dvc: bool = Field(
        True, description="After each stage, record it in dvc.lock (dvc commit) and push its outputs to the DVC remote. "
        "Only when the run reads the params.yaml beside dvc.yaml.")
    dvc_remote: str = Field("", description="DVC remote to push to; empty means the default remote in .dvc/config.")
    concurrent_stages: bool = Field(
        True, description="Run the stages of one wave (stages that do not read each other's outputs: export, ppo and "
        "ppo_ptx) at the same time, each in its own process with an equal share of project.threads (all cores when 0).")
    retries: int = Field(3, ge=0, description="Retries of a stage or push that failed on a transient fault (storage, network).")
    retry_delay_s: float = Field(5.0, ge=0, description="First retry delay; it doubles on each retry (with jitter).")
    stage_timeout_s: float = Field(6 * 3600, gt=0, description="A stage still running after this long fails.")
    gpu_stages: list[str] = Field(
        default_factory=list, description="Stages sent to the GPU work pool (deployment `gpu_deployment`); the rest run "
        "in the pipeline's own process. Inputs and outputs travel through exchange_uri, object storage both sides reach.")
    gpu_processes: int = Field(
        0, ge=0, description="Processes a stage on the GPU pool runs on: 0 = one per GPU its pod sees (the job template's "
        "`gpus`). More than one launches the stage with `accelerate launch --config_file <accelerate_config>`.")
    accelerate_config: str = Field(
        "infra/accelerate/fsdp2.yaml", description="The accelerate config of a stage launched on several processes "
        "(infra/accelerate/: fsdp2.yaml shards the trained models, ddp.yaml replicates them, deepspeed-zero3.yaml).")
    gpu_deployment: str = Field("instructflow-stage/gpu-stage", description="Deployment (flow/deployment) that runs one stage on the GPU pool.")
    exchange_uri: str = Field("s3://instructflow/exchange", description="Where a stage sent to the GPU pool gets its inputs and leaves its outputs (S3 API; endpoint from AWS_ENDPOINT_URL).")


def pretrained_presets() -> dict:
    """configs/presets/pretrained.yaml: {"full": {section: {key: value}}, "lora": ...}, the defaults of a pretrained
    model. Read from the checkout, or from where `pip install` put it (share/instructflow/presets)."""
    import sysconfig

    for path in (Path(__file__).resolve().parents[1] / "configs" / "presets" / "pretrained.yaml",
                 Path(sysconfig.get_path("data")) / "share" / "instructflow" / "presets" / "pretrained.yaml"):
        if path.is_file():
            return yaml.safe_load(path.read_text())
    raise ConfigError("configs/presets/pretrained.yaml not found: reinstall instructflow")


class Params(_Section):
    project: ProjectConfig = Field(default_factory=ProjectConfig, description="Seed, folders, threads.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Datasets and simulated labelers.")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="Pretraining of the built-in base model.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Supervised fine-tuning.")
    collect: CollectConfig = Field(default_factory=CollectConfig, description="Sampling and ranking comparisons.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward-model training.")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="RL with PPO; the ppo stage runs it with ptx_coef 0, ppo_ptx as given.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation by the held-out labeler.")
    ensemble: EnsembleConfig = Field(default_factory=EnsembleConfig, description="The RM ensemble and the reward PPO takes from it.")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="Direct preference optimization from SFT on the comparisons.")
    best_of_n: BestOfNConfig = Field(default_factory=BestOfNConfig, description="Best-of-n sampling from SFT with the RM.")
    methods: MethodsConfig = Field(default_factory=MethodsConfig, description="The comparison of methods over seeds (`make methods`).")
    rounds: RoundsConfig = Field(default_factory=RoundsConfig, description="Rounds of on-policy feedback, the gate and promotion (`make round`).")
    labeling: LabelingConfig = Field(default_factory=LabelingConfig, description="People in Label Studio.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="ONNX export of the RM.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="The scoring endpoint.")
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate", description="Data validation (Great Expectations).")
    orchestrate: OrchestrateConfig = Field(default_factory=OrchestrateConfig, description="Prefect retries, timeouts, DVC versioning.")

    @model_validator(mode="before")
    @classmethod
    def _pretrained_defaults(cls, raw):
        """A pretrained model gets learning rates and dropout of its kind, unless the file sets them."""
        if not isinstance(raw, dict):
            return raw
        model = raw.get("model") or {}
        if not isinstance(model, dict) or model.get("name_or_path", "builtin:tiny-llama") == "builtin:tiny-llama":
            return raw
        raw, presets = dict(raw), _presets()
        for section in presets["full"]:
            given = raw.get(section) or {}
            if not isinstance(given, dict):
                continue
            lora = isinstance(given.get("lora"), dict) and (given["lora"].get("r") or 0) > 0
            raw[section] = {**presets["lora" if lora else "full"][section], **given}
        return raw

    def stage_dir(self, stage: str) -> Path:
        return Path(self.project.artifacts_dir) / stage


@functools.cache
def _presets() -> dict:
    return pretrained_presets()


def _format_errors(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(part) for part in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key '{key}'" + _did_you_mean(e["loc"]))
        else:
            lines.append(f"{source}: {key}: {e['msg']}")
    return "\n".join(lines)


# What other tools (TRL, transformers' TrainingArguments, peft) call a key this file names otherwise.
SYNONYMS = {"learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs", "rank": "r", "lora_alpha": "alpha",
            "lora_dropout": "dropout", "per_device_train_batch_size": "batch_size", "gradient_accumulation_steps": "grad_accum",
            "max_length": "max_len", "max_seq_length": "max_len", "kl_penalty": "kl_coef", "cliprange": "clip_range",
            "model_name": "name_or_path", "model_name_or_path": "name_or_path", "seed_value": "seed"}


def _did_you_mean(loc: tuple) -> str:
    """"; did you mean 'sft.lr'?" for a misspelled key, from the fields of the section it is in."""
    import difflib

    model, known = Params, None
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) or next(
            (f for f in model.model_fields.values() if f.alias == part), None)
        inner = getattr(field, "annotation", None) if field else None
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            return ""
        model = inner
    known = [f.alias or name for name, f in model.model_fields.items()]
    synonym = SYNONYMS.get(str(loc[-1]))
    close = [synonym] if synonym in known else difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
    return f"; did you mean '{'.'.join(str(x) for x in (*loc[:-1], close[0]))}'?" if close else ""


def parse_params(raw: dict | None, source: str = "params") -> Params:
    """Validate a params mapping; raise ConfigError naming each bad key."""
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err)) from None


def load_params(path: str | Path = "params.yaml", overrides: dict | None = None) -> Params:
    """Read and validate params.yaml; `overrides` is merged in (dotted keys allowed). A file is parsed once
    per process for each content and overrides: every later call gets the same (frozen) Params."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: params file not found")
    text = path.read_text()
    return _parse_file(str(path), text, json.dumps(overrides or {}, sort_keys=True, default=str))


@functools.lru_cache(maxsize=32)
def _parse_file(path: str, text: str, overrides_json: str) -> Params:
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    for dotted, value in json.loads(overrides_json).items():
        node = raw
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: cannot set '{dotted}': '{p}' is not a section")
        node[leaf] = value
    return parse_params(raw, path)
