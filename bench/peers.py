"""instructflow against Hugging Face TRL: same model, tokens, batch sizes and
number of updates, measured side by side in one run.

    python bench/peers.py                    # everything (about 15 min on 2 CPU cores, 3 more the first time)
    python bench/peers.py --tasks sft,reward --repeats 3

What runs:
- the peers in their own virtual environments, made here on first use
  (bench/.venvs/): TRL 1.16 (SFTTrainer, RewardTrainer, RLOOTrainer) and
  trl==1.9.0, the last release with trl.experimental.ppo.PPOTrainer; both with
  the torch, transformers and accelerate versions instructflow runs on;
- instructflow's own stage code (`instructflow sft|reward|ppo --params`), on
  run folders that link the default pipeline's models and data;
- every run in its own process, ours and the peer's alternating, `--repeats`
  times; each figure is the median over repeats and each comparison the ratio
  of the two medians (this machine is shared and noisy);
- quality judged by ONE evaluator (this file, instructflow's code) on every
  trained model: SFT validation loss, RM accuracy on held-out comparisons, and
  after RL the held-out labeler's mean rating and win rate against SFT;
- model FLOP utilization against this machine's fp32 matmul rate, measured here;
- how PPO's cost grows with response length, batch size and model size.

Outputs: bench/results.json, and the tables between the markers in
docs/results.md. Needs the default pipeline's artifacts up to `reward`
(`make bench` runs those stages first when they are missing).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from instructflow.config import Params, load_params
from instructflow.data.formats import Comparison, Demonstration, Prompt
from instructflow.data.suite.judge import judge
from instructflow.data.suite.labelers import Labeler
from instructflow.io import content_hash, read_jsonl, write_jsonl
from instructflow.lm.encoding import encode_prompt, format_prompt
from instructflow.lm.generation import generate
from instructflow.lm.modeling import build_tiny_llama, context_length, load_causal_lm, load_reward_model, load_tokenizer
from instructflow.lm.training import epoch_batches
from instructflow.registry import STAGES
from instructflow.stages.collect import distinct_first
from instructflow.stages.evaluate import LabelerJudge, win_rates
from instructflow.stages.reward import encode_comparison, pairwise_accuracy
from instructflow.stages.sft import encode_demonstration, validation_loss

ROOT = Path(__file__).resolve().parent.parent
PEERS = {  # venv name -> TRL version
    "trl-current": "1.16.0",
    "trl-ppo": "1.9.0",  # the last release with trl.experimental.ppo.PPOTrainer
}
TASK_PEER = {"sft": "trl-current", "reward": "trl-current", "ppo": "trl-ppo", "rloo": "trl-current"}
# No warmup on either side: Hugging Face's warmup gives the first step a learning rate of 0,
# instructflow's gives it lr / warmup_steps, and on these short runs that one step moves the
# final validation loss by more than anything else. Without warmup the two schedules are the
# same function, and with the same batch order SFT then ends at the same validation loss on
# both sides (measured: 3.4614 and 3.4614).
WARMUP_RATIO = 0.0
MARK_BEGIN, MARK_END = "<!-- peers:begin (bench/peers.py writes this part) -->", "<!-- peers:end -->"


# --------------------------------------------------------------------------- peer environments
def pinned(dist: str) -> str:
    from importlib.metadata import version

    return f"{dist}=={version(dist).split('+')[0]}"


def peer_python(name: str, venvs: Path) -> Path:
    """The peer's interpreter; its venv is created on first use. torch is installed
    first and pinned (an unpinned torch would pull gigabytes of CUDA wheels)."""
    venv = venvs / name
    pins = [pinned("torch"), f"trl=={PEERS[name]}", pinned("transformers"), pinned("accelerate")]
    marker = venv / ".installed"
    if marker.exists() and marker.read_text() == "\n".join(pins):
        return venv / "bin" / "python"
    print(f"[peers] creating {venv} with {' '.join(pins)}", flush=True)
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run(pip + [pins[0]], check=True)
    subprocess.run(pip + pins + ["datasets"], check=True)
    marker.write_text("\n".join(pins))
    return venv / "bin" / "python"


# --------------------------------------------------------------------------- running one measured process
# A small launcher between us and the measured process: Linux starts a forked child's peak-RSS
# count at its parent's size, so forking straight from this (large) process would floor every figure.
LAUNCHER = "import os, subprocess, sys; p = subprocess.Popen(sys.argv[2:]); _, st, ru = os.wait4(p.pid, 0); " \
           "open(sys.argv[1], 'w').write(str(ru.ru_maxrss)); sys.exit(os.waitstatus_to_exitcode(st))"


def run_process(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Run cmd to completion; return its peak resident memory in MB."""
    peak = log.with_suffix(".peak_kb")
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, "-c", LAUNCHER, str(peak), *map(str, cmd)], stdout=fh,
                              stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})})
    if proc.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}); log {log}:\n{tail}")
    return int(peak.read_text()) / 1024


def our_order(n: int, batch_size: int, seed: int) -> list[int]:
    """The order in which instructflow's train_loop visits n examples in its first epoch when
    batches are not grouped by length (our runs here set group_by_length false). The peer is
    given its data in this order with sequential sampling, so that both sides take the same
    batches in the same order and their quality can be compared run for run."""
    return [i for batch in epoch_batches(n, batch_size, seed, 0) for i in batch]


def memory(res: dict) -> dict:
    """Peak host memory of a run, and its peak GPU memory when it ran on one."""
    return {k: res[k] for k in ("peak_rss_mb", "peak_gpu_memory_mb") if k in res}


def link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    dst.symlink_to(src.resolve())


def ours_params(base: Params, run_dir: Path, threads: int, seed: int, **sections) -> Path:
    """A params file for instructflow's stage code on run_dir (the default config, overridden)."""
    raw = base.model_dump(by_alias=True)
    raw["project"].update(artifacts_dir=str(run_dir / "artifacts"), threads=threads, seed=seed)
    for name, over in sections.items():
        raw[name].update(over)
    path = run_dir / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run_ours(stage: str, params_path: Path, run_dir: Path) -> dict:
    rss = run_process([sys.executable, "-m", "instructflow.cli", *STAGES[stage].command, "--params", str(params_path)],
                      run_dir / "log.txt", env={"INSTRUCTFLOW_LOG": "WARNING"})
    res = json.loads((run_dir / "artifacts" / stage / "result.json").read_text())
    return {"metrics": res["metrics"], "peak_rss_mb": round(rss, 1), "model": str(run_dir / "artifacts" / stage / "model"),
            **({"peak_gpu_memory_mb": res["host"]["peak_gpu_memory_mb"]} if "peak_gpu_memory_mb" in res["host"] else {})}


def run_peer(task: str, spec: dict, run_dir: Path, venvs: Path) -> dict:
    spec = {**spec, "task": task, "out_dir": str(run_dir)}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    rss = run_process([str(peer_python(TASK_PEER[task], venvs)), str(ROOT / "bench" / "trl_runner.py"),
                       str(run_dir / "spec.json")], run_dir / "log.txt", env={"TQDM_DISABLE": "1"})
    res = json.loads((run_dir / "result.json").read_text())
    return {"metrics": res, "peak_rss_mb": round(rss, 1), "model": str(run_dir / "model"),
            **({"peak_gpu_memory_mb": res["peak_gpu_memory_mb"]} if "peak_gpu_memory_mb" in res else {})}


# --------------------------------------------------------------------------- the shared inputs
class Inputs:
    """Models and data both sides train on, from the default pipeline's artifacts."""

    def __init__(self, params: Params, work: Path, args):
        self.params, self.work = params, work
        self.base = params.stage_dir("pretrain") / "model"
        self.sft = params.stage_dir("sft") / "model"
        self.rm = params.stage_dir("reward") / "model"
        self.data = params.stage_dir("data")
        for p in (self.base, self.sft, self.rm):
            if not (p / "config.json").exists():
                raise SystemExit(f"{p}: missing; run the pipeline up to `reward` first (make bench does)")
        self.tok = load_tokenizer(self.sft)
        self.args = args
        self.max_len = params.sft.max_len
        work.mkdir(parents=True, exist_ok=True)

    def sft_data(self) -> tuple[Path, Path, Path]:
        """(demonstrations, validation demonstrations, the same training rows as token ids)."""
        train, val, tokens = self.work / "sft_train.jsonl", self.work / "sft_val.jsonl", self.work / "sft_tokens.jsonl"
        demos = read_jsonl(self.data / "sft_train.jsonl", Demonstration)[: self.args.sft_examples]
        write_jsonl(train, demos)
        shutil.copyfile(self.data / "sft_val.jsonl", val)
        rows = [encode_demonstration(self.tok, d, self.max_len) for d in demos]
        tokens.write_text("".join(json.dumps({"input_ids": ids, "n_prompt": n}) + "\n" for ids, n in rows))
        return train, val, tokens

    @staticmethod
    def in_our_order(tokens: Path, batch_size: int, seed: int) -> Path:
        rows = tokens.read_text().splitlines()
        out = tokens.with_name(f"{tokens.stem}.seed{seed}.jsonl")
        out.write_text("".join(rows[i] + "\n" for i in our_order(len(rows), batch_size, seed)))
        return out

    def comparisons(self, k: int, batch: int) -> tuple[Path, Path, Path]:
        """K-wise comparisons of SFT samples ranked by the training labelers, as the collect
        stage makes them, but with exactly K responses each, and a whole number of batches of
        training comparisons. (train, val, train as token ids)"""
        # cached under a key of everything they are made from: a new SFT model or other sizes make new files
        key = content_hash(self.sft)[:12] + f"-k{k}-n{self.args.rm_comparisons}-v{self.args.rm_val_comparisons}-b{batch}"
        train, val, tokens = (self.work / f"comparisons_{key}_{s}.jsonl" for s in ("train", "val", "tokens"))
        if not train.exists() or not val.exists():
            model, tok = load_causal_lm(self.sft)
            labelers = [Labeler(lab) for lab in self.params.data.labelers if not lab.heldout]
            rng = random.Random(self.params.project.seed)
            for split, path, n in (("train", train, self.args.rm_comparisons), ("val", val, self.args.rm_val_comparisons)):
                prompts = read_jsonl(self.data / f"rm_prompts_{split}.jsonl", Prompt)[: int(n * 1.8)]
                samples = generate(model, tok, [p.prompt for p in prompts], max_new_tokens=self.params.collect.max_new_tokens,
                                   num_samples=2 * k, seed=self.params.project.seed + (split == "val"))
                comps = []
                for p, s in zip(prompts, samples):
                    responses = distinct_first(s, k)
                    if len(responses) == k and len(comps) < n:
                        lab = rng.choice(labelers)
                        comps.append(Comparison(id=p.id, prompt=p.prompt, category=p.category, meta=p.meta, responses=responses,
                                                ranking=lab.rank(p.meta, responses, rng), labeler=lab.name))
                write_jsonl(path, comps[: len(comps) // batch * batch] if split == "train" else comps)
        enc = [encode_comparison(self.tok, c, self.max_len) for c in read_jsonl(train, Comparison)]
        tokens.write_text("".join(json.dumps({"sequences": e.sequences, "pairs": e.pairs}) + "\n" for e in enc))
        return train, val, tokens

    def ppo_prompts(self, max_new_tokens: int, policy_dir: Path) -> tuple[Path, Path, Path]:
        """(prompts, prompts as token ids for PPOTrainer, prompts as chat text for RLOOTrainer)"""
        prompts = self.data / "ppo_prompts.jsonl"
        ids_path, text_path = self.work / "ppo_prompt_tokens.jsonl", self.work / "ppo_prompt_text.jsonl"
        keep = context_length(load_causal_lm(policy_dir)[0]) - max_new_tokens
        rows = read_jsonl(prompts, Prompt)
        ids_path.write_text("".join(json.dumps({"input_ids": encode_prompt(self.tok, p.prompt)[-keep:]}) + "\n" for p in rows))
        text_path.write_text("".join(json.dumps({"prompt": format_prompt(p.prompt)}) + "\n" for p in rows))
        return prompts, ids_path, text_path


# --------------------------------------------------------------------------- quality, judged once for everyone
class Judge:
    def __init__(self, inputs: Inputs, n_eval: int):
        self.inputs = inputs
        params = inputs.params
        self.heldout = Labeler(next(lab for lab in params.data.labelers if lab.heldout))
        self.prompts = read_jsonl(params.stage_dir("data") / "eval_prompts.jsonl", Prompt)[:n_eval]
        self.max_new = params.eval.max_new_tokens
        self.seed = params.project.seed
        self._sft_answers = None

    def answers(self, model_dir: str | Path) -> list[str]:
        model, tok = load_causal_lm(model_dir)
        out = generate(model, tok, [p.prompt for p in self.prompts], max_new_tokens=self.max_new,
                       temperature=self.inputs.params.eval.temperature, seed=self.seed)
        return [a[0] for a in out]

    def policy(self, model_dir: str | Path) -> dict:
        if self._sft_answers is None:
            self._sft_answers = self.answers(self.inputs.sft)
        ans = self.answers(model_dir)
        j = judge(self.heldout, self.prompts, ans, seed=self.seed)
        w = self._win_rate(ans, self._sft_answers)
        return {"likert": j["likert"], "win_rate_vs_sft": w["win_rate"], "win_rate_ci95": w["ci95"], "answers": ans}

    def head_to_head(self, ours: list[str], peer: list[str]) -> dict:
        """The held-out labeler's win rate of our policy's answers over the peer's, prompt by prompt."""
        w = self._win_rate(ours, peer)
        return {"win_rate": w["win_rate"], "ci95": w["ci95"]}

    def _win_rate(self, answers: list[str], reference: list[str]) -> dict:
        judge_ = LabelerJudge(self.heldout)
        return win_rates(judge_, self.prompts, judge_.values(self.prompts, answers), judge_.values(self.prompts, reference),
                         self.seed, 1000)

    def sft_val_loss(self, model_dir: str | Path, val_path: Path) -> float:
        model, tok = load_causal_lm(model_dir)
        ex = [encode_demonstration(tok, d, self.inputs.max_len) for d in read_jsonl(val_path, Demonstration)]
        return round(validation_loss(model, ex, tok.pad_token_id), 4)

    def rm_accuracy(self, model_dir: str | Path, val_path: Path) -> float:
        model, tok = load_reward_model(model_dir)
        return round(pairwise_accuracy(model, tok, read_jsonl(val_path, Comparison), self.inputs.max_len), 4)


# --------------------------------------------------------------------------- FLOPs
def matmul_gflops(threads: int, n: int = 1024, seconds: float = 3.0) -> float:
    """This machine's fp32 matrix-multiply rate: the best of repeated n x n x n products."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    best, stop = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < stop:
        t = time.perf_counter()
        for _ in range(5):
            a @ b
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return round(best, 1)


def train_flops_per_token(model_dir: Path, seq_len: float, lm_head: bool) -> float:
    """Forward + backward model FLOPs per token (PaLM's count): 6 N + 12 L d T, with N
    the matrix-multiply weights (the unembedding only when logits are computed)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    d, f, L, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = d * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) // cfg["num_attention_heads"]
    n = L * (2 * d * d + 2 * d * kv + 3 * d * f) + (v * d if lm_head else d)
    return 6 * n + 12 * L * d * seq_len


# --------------------------------------------------------------------------- the benchmarks
def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 4)


def alternate(repeats: int, ours, peer) -> tuple[list[dict], list[dict]]:
    """Run ours and the peer `repeats` times, alternating which goes first."""
    a, b = [], []
    for r in range(repeats):
        for side in ((ours, peer) if r % 2 == 0 else (peer, ours)):
            (a if side is ours else b).append(side(r))
            shown = {k: v for k, v in (a if side is ours else b)[-1].items() if k != "answers"}
            print(f"[peers]   {'ours' if side is ours else 'peer'} #{r}: {shown}", flush=True)
    return a, b


def bench_sft(inputs: Inputs, judge_: Judge, args, runs: Path, venvs: Path) -> dict:
    train, val, tokens = inputs.sft_data()
    cfg = inputs.params.sft
    hyper = {"lr": cfg.lr, "warmup_ratio": WARMUP_RATIO, "min_lr_ratio": cfg.min_lr_ratio, "batch_size": cfg.batch_size,
             "max_len": inputs.max_len, "threads": args.threads, "sequential": True}
    seed = inputs.params.project.seed

    def ours(r):
        d = runs / f"sft-ours-{r}"
        shutil.rmtree(d, ignore_errors=True)
        link(inputs.base, d / "artifacts/pretrain/model")
        link(train, d / "artifacts/data/sft_train.jsonl")
        link(val, d / "artifacts/data/sft_val.jsonl")
        p = ours_params(inputs.params, d, args.threads, seed + r, sft={"epochs": 1, "group_by_length": False, "residual_dropout": 0.0, "eval_prompts": 0, "warmup_ratio": WARMUP_RATIO,
                                                               "checkpoint_every": 0, "resume": False, "log_every": 10**6})
        res = run_ours("sft", p, d)
        return {"items_per_s": res["metrics"]["tokens_per_s"], **memory(res),
                "val_loss": judge_.sft_val_loss(res["model"], val)}

    def peer(r):
        d = runs / f"sft-trl-{r}"
        shutil.rmtree(d, ignore_errors=True)
        ordered = inputs.in_our_order(tokens, cfg.batch_size, seed + r)
        res = run_peer("sft", {**hyper, "seed": seed + r, "model": str(inputs.base), "train": str(ordered)}, d, venvs)
        return {"items_per_s": res["metrics"]["items_per_s"], **memory(res),
                "val_loss": judge_.sft_val_loss(res["model"], val), "version": res["metrics"]["version"]}

    a, b = alternate(args.repeats, ours, peer)
    rows = [json.loads(x) for x in tokens.read_text().splitlines()]
    mean_len = statistics.fmean(len(r["input_ids"]) for r in rows)
    return summarize("sft", "tokens/s", a, b, quality="val_loss", lower_is_better=True,
                     flops_per_item=train_flops_per_token(inputs.base, mean_len, lm_head=True),
                     settings={"examples": len(rows), "batch_size": cfg.batch_size, "epochs": 1, "mean_tokens": round(mean_len, 1),
                               "residual_dropout": 0.0, "lr": cfg.lr, "warmup_ratio": WARMUP_RATIO, "batch_order": "same"})


def bench_reward(inputs: Inputs, judge_: Judge, args, runs: Path, venvs: Path) -> dict:
    k = args.k
    train, val, tokens = inputs.comparisons(k, args.rm_batch)
    cfg = inputs.params.reward
    hyper = {"lr": cfg.lr, "warmup_ratio": WARMUP_RATIO, "min_lr_ratio": cfg.min_lr_ratio, "batch_size": args.rm_batch,
             "threads": args.threads, "sequential": True}
    seed = inputs.params.project.seed

    def ours(r):
        d = runs / f"reward-ours-{r}"
        shutil.rmtree(d, ignore_errors=True)
        link(inputs.sft, d / "artifacts/sft/model")
        link(train, d / "artifacts/collect/comparisons_train.jsonl")
        link(val, d / "artifacts/collect/comparisons_val.jsonl")
        link(inputs.data / "sft_train.jsonl", d / "artifacts/data/sft_train.jsonl")
        p = ours_params(inputs.params, d, args.threads, seed + r, reward={"epochs": 1, "group_by_length": False, "batch_size": args.rm_batch, "warmup_ratio": WARMUP_RATIO, "checkpoint_every": 0,
                                                                 "resume": False, "log_every": 10**6})
        res = run_ours("reward", p, d)
        return {"items_per_s": res["metrics"]["comparisons_per_s"], **memory(res),
                "accuracy": judge_.rm_accuracy(res["model"], val)}

    def peer(r):
        d = runs / f"reward-trl-{r}"
        shutil.rmtree(d, ignore_errors=True)
        ordered = inputs.in_our_order(tokens, args.rm_batch, seed + r)
        res = run_peer("reward", {**hyper, "seed": seed + r, "model": str(inputs.sft), "train": str(ordered)}, d, venvs)
        return {"items_per_s": res["metrics"]["items_per_s"], **memory(res),
                "accuracy": judge_.rm_accuracy(res["model"], val), "pairs_per_step": res["metrics"]["pairs_per_step"],
                "version": res["metrics"]["version"]}

    a, b = alternate(args.repeats, ours, peer)
    rows = [json.loads(x) for x in tokens.read_text().splitlines()]
    mean_len = statistics.fmean(len(s) for r in rows for s in r["sequences"])
    per_seq = train_flops_per_token(inputs.sft, mean_len, lm_head=False) * mean_len
    return summarize("reward", "comparisons/s", a, b, quality="accuracy", lower_is_better=False,
                     flops_per_item=per_seq * k, flops_per_item_peer=per_seq * k * (k - 1),
                     settings={"k": k, "comparisons": len(rows), "pairs": sum(len(r["pairs"]) for r in rows),
                               "comparisons_per_step": args.rm_batch, "epochs": 1, "lr": cfg.lr, "warmup_ratio": WARMUP_RATIO,
                               "batch_order": "same comparisons per step",
                               "sequences_per_comparison": {"ours": k, "trl": k * (k - 1)}})


def rl_spec(inputs: Inputs, args) -> dict:
    c = inputs.params.ppo
    return {"lr": c.lr, "batch_size": c.batch_size, "minibatch_size": c.minibatch_size, "ppo_epochs": c.ppo_epochs,
            "iterations": args.ppo_iterations, "max_new_tokens": c.max_new_tokens, "temperature": c.temperature,
            "kl_coef": c.kl_coef, "clip_range": c.clip_range, "value_clip_range": c.value_clip_range, "vf_coef": c.vf_coef,
            "lam": c.lam, "no_eos_score": c.no_eos_score, "missing_eos_penalty": -c.no_eos_score, "threads": args.threads}


def run_ours_ppo(inputs: Inputs, d: Path, threads: int, seed: int, policy: Path, rm: Path, prompts: Path, **ppo) -> dict:
    shutil.rmtree(d, ignore_errors=True)
    link(policy, d / "artifacts/sft/model")
    link(rm, d / "artifacts/reward/model")
    link(prompts, d / "artifacts/data/ppo_prompts.jsonl")
    p = ours_params(inputs.params, d, threads, seed, ppo={"checkpoint_every": 0, "resume": False, "log_every": 10**6, **ppo})
    return run_ours("ppo", p, d)


def bench_rl(inputs: Inputs, judge_: Judge, args, runs: Path, venvs: Path, tasks: list[str]) -> dict:
    spec = rl_spec(inputs, args)
    prompts, ids_path, text_path = inputs.ppo_prompts(spec["max_new_tokens"], inputs.sft)
    cache: dict[int, dict] = {}
    seed = inputs.params.project.seed

    def ours(r):
        if r not in cache:  # one set of instructflow PPO runs serves as the peer of both PPOTrainer and RLOOTrainer
            res = run_ours_ppo(inputs, runs / f"ppo-ours-{r}", args.threads, seed + r, inputs.sft, inputs.rm, prompts,
                               iterations=args.ppo_iterations)
            cache[r] = {"items_per_s": res["metrics"]["rollouts_per_s"], **memory(res),
                        **judge_.policy(res["model"])}
        return dict(cache[r])

    def peer_fn(task):
        def peer(r):
            d = runs / f"{task}-trl-{r}"
            shutil.rmtree(d, ignore_errors=True)
            data = ids_path if task == "ppo" else text_path
            extra = {"num_generations": args.rloo_k} if task == "rloo" else {}
            res = run_peer(task, {**spec, **extra, "seed": seed + r, "model": str(inputs.sft), "reward_model": str(inputs.rm),
                                  "train": str(data)}, d, venvs)
            return {"items_per_s": res["metrics"]["items_per_s"], **memory(res),
                    **judge_.policy(res["model"]), "version": res["metrics"]["version"]}
        return peer

    out = {}
    episodes = args.ppo_iterations * spec["batch_size"]
    for task in tasks:
        a, b = alternate(args.repeats, ours, peer_fn(task))
        h2h = [judge_.head_to_head(x.pop("answers"), y.pop("answers")) for x, y in zip(a, b)]
        settings = {"episodes": episodes, "batch_size": spec["batch_size"], "minibatch_size": spec["minibatch_size"],
                    "ppo_epochs": spec["ppo_epochs"], "max_new_tokens": spec["max_new_tokens"], "kl_coef": spec["kl_coef"]}
        if task == "rloo":
            settings["rloo_generations_per_prompt"] = args.rloo_k
        out[task] = summarize(task, "episodes/s", a, b, quality="likert", lower_is_better=False, settings=settings)
        out[task]["head_to_head"] = {"win_rate": median([h["win_rate"] for h in h2h]), "runs": h2h}
    return out


def summarize(task: str, unit: str, ours: list[dict], peer: list[dict], *, quality: str, lower_is_better: bool,
              settings: dict, flops_per_item: float | None = None, flops_per_item_peer: float | None = None) -> dict:
    """Medians per side and their ratio. FLOPs per item default to the same on both sides."""
    def side(runs, fpi):
        s = {"items_per_s": median([r["items_per_s"] for r in runs]), "peak_rss_mb": median([r["peak_rss_mb"] for r in runs]),
             quality: median([r[quality] for r in runs]), "runs": runs}
        if "peak_gpu_memory_mb" in runs[0]:
            s["peak_gpu_memory_mb"] = median([r["peak_gpu_memory_mb"] for r in runs])
        if "win_rate_vs_sft" in runs[0]:
            s["win_rate_vs_sft"] = median([r["win_rate_vs_sft"] for r in runs])
        if fpi is not None:
            s["model_gflops_per_s"] = round(s["items_per_s"] * fpi / 1e9, 2)
        return s

    o, p = side(ours, flops_per_item), side(peer, flops_per_item_peer if flops_per_item_peer is not None else flops_per_item)
    q_ok = o[quality] <= p[quality] if lower_is_better else o[quality] >= p[quality]
    return {"task": task, "unit": unit, "ours": o, "peer": p, "peer_version": peer[0].get("version"),
            "speedup": round(o["items_per_s"] / p["items_per_s"], 3), "quality_metric": quality,
            "quality_equal_or_better": bool(q_ok), "settings": settings}


def bench_scaling(inputs: Inputs, args, runs: Path) -> dict:
    """PPO seconds per episode and peak memory as one knob doubles, the others at default.
    Randomly initialised models (policy and RM of the given size), so every response
    runs to the length limit and the cost reflects the knob, not what the model learned."""
    base_cfg = inputs.params.model.tiny
    tok = inputs.tok
    prompts = inputs.data / "ppo_prompts.jsonl"
    points = {"max_new_tokens": [16, 32, 64], "batch_size": [16, 32, 64], "num_layers": [2, 4, 8]}
    defaults = {"max_new_tokens": 32, "batch_size": 32, "num_layers": 4}
    out = {}
    for knob, values in points.items():
        rows = []
        for v in values:
            setting = {**defaults, knob: v}
            model_dir = inputs.work / f"random-{setting['num_layers']}L"
            if not (model_dir / "policy" / "config.json").exists():
                from transformers import AutoModelForSequenceClassification

                m = build_tiny_llama(tok, base_cfg.model_copy(update={"num_layers": setting["num_layers"]}), seed=0)
                m.save_pretrained(model_dir / "policy")
                tok.save_pretrained(model_dir / "policy")
                rm = AutoModelForSequenceClassification.from_pretrained(model_dir / "policy", num_labels=1)
                rm.save_pretrained(model_dir / "rm")
                tok.save_pretrained(model_dir / "rm")
            res = run_ours_ppo(inputs, runs / f"scale-{knob}-{v}", args.threads, inputs.params.project.seed, model_dir / "policy", model_dir / "rm", prompts,
                               iterations=args.scale_iterations, batch_size=setting["batch_size"],
                               minibatch_size=min(16, setting["batch_size"]), max_new_tokens=setting["max_new_tokens"])
            rows.append({knob: v, "ms_per_episode": round(1000 / res["metrics"]["rollouts_per_s"], 2),
                         **memory(res), "response_length": res["metrics"]["final_response_length"]})
            print(f"[peers]   scale {knob}={v}: {rows[-1]}", flush=True)
        out[knob] = {"defaults": defaults, "points": rows}
    return out


# --------------------------------------------------------------------------- report
def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"Measured {results['date']} on {m['cpus']} CPU threads ({m['processor']}), device {m['device']}, "
             f"`{results['command']}`; {results['repeats']} runs per side, alternating; medians; "
             f"fp32 matmul rate measured: {m['matmul_gflops']} GFLOP/s.", "",
             "| stage | unit | instructflow | TRL | ratio | quality (metric) | instructflow | TRL | peak RSS MB ours / TRL | MFU ours / TRL |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["tasks"].items():
        o, p = r["ours"], r["peer"]
        mfu = "-"
        if "model_gflops_per_s" in o:
            mfu = f"{o['model_gflops_per_s'] / m['matmul_gflops']:.1%} / {p['model_gflops_per_s'] / m['matmul_gflops']:.1%}"
        peer = {"ppo": "PPOTrainer", "rloo": "RLOOTrainer", "sft": "SFTTrainer", "reward": "RewardTrainer"}[name]
        q = r["quality_metric"]
        extra = f"; win vs SFT {o['win_rate_vs_sft']} / {p['win_rate_vs_sft']}" if "win_rate_vs_sft" in o else ""
        if "peak_gpu_memory_mb" in o:
            extra += f"; peak GPU MB {o['peak_gpu_memory_mb']:.0f} / {p.get('peak_gpu_memory_mb', float('nan')):.0f}"
        if "head_to_head" in r:
            extra += f"; ours over TRL's policy {r['head_to_head']['win_rate']}"
        lines.append(f"| {name} vs {peer} {r['peer_version']} | {r['unit']} | {o['items_per_s']} | {p['items_per_s']} | "
                     f"**{r['speedup']}x** | {q}{extra} | {o[q]} | {p[q]} | {o['peak_rss_mb']:.0f} / {p['peak_rss_mb']:.0f} | {mfu} |")
    if "scaling" in results:
        lines += ["", "PPO cost as one knob doubles (instructflow, random-init models so responses run to the limit; "
                  "defaults " + json.dumps(next(iter(results["scaling"].values()))["defaults"]) + "):", "",
                  "| knob | value | ms / episode | peak RSS MB |", "|---|---|---|---|"]
        for knob, s in results["scaling"].items():
            for row in s["points"]:
                lines.append(f"| {knob} | {row[knob]} | {row['ms_per_episode']} | {row['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def write_report(results: dict, doc: Path) -> None:
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = f"{MARK_BEGIN}\n{markdown(results)}\n{MARK_END}"
    if MARK_BEGIN in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + block + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## instructflow against TRL (bench/peers.py)\n\n" + block + "\n"
    doc.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--tasks", default="sft,reward,ppo,rloo,scaling")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--sft-examples", type=int, default=2048)
    ap.add_argument("--k", type=int, default=9, help="responses per comparison for the RM benchmark")
    ap.add_argument("--rm-comparisons", type=int, default=200)
    ap.add_argument("--rm-val-comparisons", type=int, default=120)
    ap.add_argument("--rm-batch", type=int, default=8, help="comparisons per optimizer step")
    ap.add_argument("--ppo-iterations", type=int, default=12)
    ap.add_argument("--rloo-k", type=int, default=4)
    ap.add_argument("--eval-prompts", type=int, default=600)
    ap.add_argument("--scale-iterations", type=int, default=4)
    ap.add_argument("--work", default="bench/work")
    ap.add_argument("--venvs", default="bench/.venvs")
    ap.add_argument("--results", default="bench/results.json")
    ap.add_argument("--doc", default="docs/results.md")
    args = ap.parse_args()

    params = load_params(Path(args.params))
    work, venvs = (ROOT / args.work).resolve(), (ROOT / args.venvs).resolve()
    runs = work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    torch.set_num_threads(args.threads)
    for t in tasks:
        if t in TASK_PEER:
            peer_python(TASK_PEER[t], venvs)
    inputs = Inputs(params, work, args)
    judge_ = Judge(inputs, args.eval_prompts)
    device = "cuda: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    results = {"date": dt.date.today().isoformat(), "command": "python bench/peers.py " + " ".join(sys.argv[1:]),
               "repeats": args.repeats,
               "machine": {"cpus": args.threads, "processor": platform.processor() or platform.machine(), "device": device,
                           "matmul_gflops": matmul_gflops(args.threads)},
               "tasks": {}}
    print(f"[peers] fp32 matmul: {results['machine']['matmul_gflops']} GFLOP/s", flush=True)
    t0 = time.perf_counter()
    if "sft" in tasks:
        print("[peers] SFT", flush=True)
        results["tasks"]["sft"] = bench_sft(inputs, judge_, args, runs, venvs)
    if "reward" in tasks:
        print("[peers] reward model", flush=True)
        results["tasks"]["reward"] = bench_reward(inputs, judge_, args, runs, venvs)
    rl = [t for t in ("ppo", "rloo") if t in tasks]
    if rl:
        print(f"[peers] {', '.join(rl)}", flush=True)
        results["tasks"].update(bench_rl(inputs, judge_, args, runs, venvs, rl))
    if "scaling" in tasks:
        print("[peers] PPO scaling", flush=True)
        results["scaling"] = bench_scaling(inputs, args, runs)
    results["seconds"] = round(time.perf_counter() - t0, 1)
    path = ROOT / args.results
    old = json.loads(path.read_text()) if path.exists() else {}
    if set(tasks) != {"sft", "reward", "ppo", "rloo", "scaling"} and old:  # a partial run updates its parts only
        old.setdefault("tasks", {}).update(results.pop("tasks"))
        results = {**old, **results, "tasks": old["tasks"]}
    path.write_text(json.dumps(results, indent=1) + "\n")
    write_report(results, ROOT / args.doc)
    print(markdown(results))


if __name__ == "__main__":
    main()
