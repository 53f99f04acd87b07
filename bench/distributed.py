"""Peak memory per process of SFT (and the RM and PPO) under DDP and FSDP2, against the memory
model (instructflow/lm/memory.py).

    python bench/distributed.py [--model models/SmolLM2-135M-Instruct] [--batch 4] [--seq 128] [--steps 3]
                                [--cases single,ddp,fsdp2,fsdp2-lora,fsdp2-gc,reward-fsdp2,ppo-fsdp2,tiny]

Each case runs a real stage through its CLI, launched by `accelerate launch --config_file
infra/accelerate/<ddp|fsdp2>.yaml` on 2 processes (1 thread each), on HH-RLHF dialogs and Alpaca
tasks from ../shared/data cut to --seq tokens, so every micro-batch is --batch x --seq. The
stage reports each process's peak RSS after training (before the final model is gathered on
the main process). The prediction is instructflow.lm.memory.predict for the same stage, batch
and length, plus the runtime measured here: the RSS of a process that has imported
everything a stage imports and joined a gloo group, before it loads a model. Writes
bench/results/distributed.json and prints a markdown table.

"-compact" cases set project.compact_host_memory: on (FSDP2 on CPU has it by default):
freed tensors go back to the system, so RSS follows the live tensors that the model
predicts; without it glibc keeps part of what was freed, which the model does not count.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared/data"
CONFIGS = {"ddp": ROOT / "infra/accelerate/ddp.yaml", "fsdp2": ROOT / "infra/accelerate/fsdp2.yaml"}

# case -> (stage, launcher (None: one plain process), strategy for the model, extra params)
CASES = {
    "single": ("sft", None, "ddp", {}),
    "single-compact": ("sft", None, "ddp", {"project": {"compact_host_memory": "on"}}),
    "ddp": ("sft", "ddp", "ddp", {}),
    "ddp-compact": ("sft", "ddp", "ddp", {"project": {"compact_host_memory": "on"}}),
    "fsdp2": ("sft", "fsdp2", "fsdp2", {}),
    "single-gc": ("sft", None, "ddp", {"model": {"gradient_checkpointing": True}}),
    "single-gc-compact": ("sft", None, "ddp", {"model": {"gradient_checkpointing": True}, "project": {"compact_host_memory": "on"}}),
    "ddp-gc": ("sft", "ddp", "ddp", {"model": {"gradient_checkpointing": True}}),
    "ddp-gc-compact": ("sft", "ddp", "ddp", {"model": {"gradient_checkpointing": True}, "project": {"compact_host_memory": "on"}}),
    "fsdp2-gc": ("sft", "fsdp2", "fsdp2", {"model": {"gradient_checkpointing": True}}),
    "fsdp2-lora": ("sft", "fsdp2", "fsdp2", {"sft": {"lora": {"r": 16}}}),
    "reward-fsdp2": ("reward", "fsdp2", "fsdp2", {}),
    "ppo-fsdp2": ("ppo", "fsdp2", "fsdp2", {}),
}

RUNTIME_PROBE = """
import os, resource, torch.distributed as dist
import accelerate, transformers, instructflow.cli, instructflow.stages.sft, instructflow.stages.reward, instructflow.stages.ppo
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, "INSTRUCTFLOW_LOG": "WARNING", "OMP_NUM_THREADS": "1", **(env or {})},
                          capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout


def prepare(work: Path, model: str, seq: int) -> None:
    """HH-RLHF dialogs and Alpaca tasks as the stages' files; data and pretrain stages."""
    if not SHARED.exists():
        sys.exit(f"{SHARED} is missing: this benchmark trains on its HH-RLHF and Alpaca files")
    cli = [sys.executable, "-m", "instructflow.cli"]
    rows = [line for line, _ in zip(gzip.open(SHARED / "hh-rlhf-harmless-base-test.jsonl.gz", "rt"), range(200))]
    (work / "hh.jsonl").write_text("".join(rows))
    (work / "alpaca.jsonl").write_text("".join(open(SHARED / "alpaca-seed-tasks.jsonl").readlines()[:40]))
    run(cli + ["data", "import", "hh-rlhf", "hh.jsonl", "comparisons.jsonl"], work)
    run(cli + ["data", "import", "alpaca", "alpaca.jsonl", "demos.jsonl"], work)
    write_params(work, "base", model, seq, 4, 1, {})
    run(cli + ["run", "--params", "base.yaml", "--stages", "data,pretrain"], work)


def write_params(work: Path, name: str, model: str, seq: int, batch: int, epochs: float, extra: dict) -> Path:
    params = {
        "project": {"artifacts_dir": f"artifacts/{name}", "threads": 1},
        "model": {"name_or_path": model},
        "data": {"source": "files", "comparisons": "comparisons.jsonl", "demonstrations": "demos.jsonl",
                 "best_responses_as_demonstrations": True, "val_fraction": 0.1, "gold_fraction": 0.0},
        "pretrain": {"seq_len": 32},
        "sft": {"epochs": epochs, "batch_size": batch, "max_len": seq, "eval_prompts": 0, "log_every": 1,
                "checkpoint_every": 0, "group_by_length": False},
        "reward": {"epochs": epochs, "batch_size": batch, "max_len": seq, "centre_samples": 8, "log_every": 1,
                   "checkpoint_every": 0, "group_by_length": False},
        "ppo": {"iterations": 1, "batch_size": 2 * batch, "minibatch_size": batch, "max_new_tokens": seq // 2,
                "checkpoint_every": 0, "log_every": 1},
    }
    for section, values in extra.items():
        params[section] = {**params.get(section, {}), **values}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def runtime_mb(work: Path) -> float:
    return float(run([sys.executable, "-c", RUNTIME_PROBE.format(port=free_port())], work).strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models/SmolLM2-135M-Instruct"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cases", default="single,single-compact,ddp,ddp-compact,fsdp2,single-gc,single-gc-compact,ddp-gc,"
                                       "ddp-gc-compact,fsdp2-gc,fsdp2-lora,reward-fsdp2,ppo-fsdp2")
    ap.add_argument("--out", default=str(ROOT / "bench/results/distributed.json"))
    args = ap.parse_args()
    if Path(args.model).exists():  # the stages run in a folder of their own
        args.model = str(Path(args.model).resolve())

    from transformers import AutoConfig

    from instructflow.lm.memory import Shape, Workload, predict

    shape = Shape.of(AutoConfig.from_pretrained(args.model))
    work = Path(tempfile.mkdtemp(prefix="instructflow-distributed-"))
    prepare(work, args.model, args.seq)
    base = work / "artifacts/base"
    n_demos = sum(1 for _ in open(base / "data/sft_train.jsonl"))
    n_comparisons = sum(1 for _ in open(base / "data/comparisons_train.jsonl"))
    k = len(json.loads(open(base / "data/comparisons_train.jsonl").readline())["responses"])
    runtime = runtime_mb(work)
    rows = []
    for case in args.cases.split(","):
        stage, launcher, strategy, extra = CASES[case]
        procs = 1 if launcher is None else 2
        n = n_comparisons if stage == "reward" else n_demos
        epochs = (args.steps * args.batch * procs + 0.5) / n  # --steps optimizer steps
        extra = json.loads(json.dumps(extra))
        name = f"case-{case}"
        params = write_params(work, name, args.model, args.seq, args.batch, round(epochs, 4), extra)
        dest = work / "artifacts" / name
        dest.mkdir(parents=True, exist_ok=True)
        for needed in ("data", "pretrain"):
            os.symlink(base / needed, dest / needed)
        if stage in ("reward", "ppo"):  # from the SFT model of the one-process case (or the base model)
            sft = work / "artifacts/case-single/sft"
            os.symlink(sft if sft.exists() else base / "pretrain", dest / "sft")
        if stage == "ppo":
            run([sys.executable, "-m", "instructflow.cli", "reward", "--params", params.name], work)
        cmd = [sys.executable, "-m", "instructflow.cli", stage, "--params", params.name]
        if launcher:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS[launcher]),
                   "--main_process_port", str(free_port()), "--num_processes", str(procs), *cmd[1:]]
        t0 = time.perf_counter()
        run(cmd, work)
        seconds = time.perf_counter() - t0
        metrics = json.loads((dest / stage / "result.json").read_text())["metrics"]
        measured = max(metrics["peak_rss_mb_per_process"])
        cfg = extra.get("model", {})
        lora = extra.get(stage, {}).get("lora", {}).get("r", 0)
        workload = Workload(stage=stage, batch=args.batch, seq_len=args.seq, responses=k,
                            prompt_len=args.seq // 2 if stage == "ppo" else 0, rollout_batch=args.batch * 2 // procs,
                            lora_r=lora, gradient_checkpointing=bool(cfg.get("gradient_checkpointing")))
        predicted = predict(shape, workload, strategy, procs, runtime)
        rows.append({"case": case, "stage": stage, "processes": procs, "strategy": strategy if launcher else "one process",
                     "measured_peak_mb": measured, "per_process": metrics["peak_rss_mb_per_process"],
                     "predicted_mb": predicted["total"], "error": round(predicted["total"] / measured - 1, 3),
                     "parts": predicted, "seconds": round(seconds, 1),
                     "items_per_s": metrics.get("tokens_per_s") or metrics.get("comparisons_per_s") or metrics.get("rollouts_per_s")})
        print(json.dumps(rows[-1]), flush=True)
    result = {"model": args.model, "batch": args.batch, "seq": args.seq, "steps": args.steps, "runtime_mb": runtime,
              "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"), "rows": rows}
    by = {r["case"]: r for r in rows}
    for suffix in ("", "-gc"):  # FSDP2 (host memory compacted on CPU) against DDP as it runs, and DDP compacted too
        for peer in (f"ddp{suffix}", f"ddp{suffix}-compact"):
            if peer in by and f"fsdp2{suffix}" in by:
                result[f"fsdp2{suffix}_over_{peer}"] = round(by[f"fsdp2{suffix}"]["measured_peak_mb"] / by[peer]["measured_peak_mb"], 3)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nmodel {Path(args.model).name}, micro-batch {args.batch} x {args.seq} tokens, runtime {runtime:.0f} MB\n")
    print("| case | processes | measured peak MB (max over processes) | predicted MB | error |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['processes']} | {r['measured_peak_mb']:,.0f} | {r['predicted_mb']:,.0f} | {r['error']:+.1%} |")
    for key in [k for k in result if "_over_" in k]:
        print(f"\n{key}: peak per process {result[key]:.2f}")


if __name__ == "__main__":
    main()
