"""Speed and peak memory of one fine-tuning step of a real model, by variant.

    python bench/train_step.py [--model models/SmolLM2-135M-Instruct] [--batch 8] [--seq 256] [--steps 6]
                               [--variants full-logits,chunked,chunked-gc,bf16,lora,lora-bf16]

Each variant runs in a fresh process (its peak RSS is the kernel's, ru_maxrss): it loads
the model, then takes --steps AdamW steps on batches of --batch x --seq tokens of
HH-RLHF dialogs (../shared/data; random tokens when absent), the loss on the second
half of each row as SFT puts it on the response. Tokens/s counts the steps after the
first two (warm-up). The peer of the chunked loss is `full-logits`: transformers'
logits over every position, then the same cross-entropy, as the SFT stage computed
it before.

Variants: full-logits (the peer), chunked (instructflow's LMLoss), chunked-gc (plus
gradient checkpointing), bf16 (chunked, bf16 autocast, fp32 master weights), lora
(chunked, LoRA r=16 on every linear layer), lora-bf16, and any of them with -gc.
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(args) -> dict:
    import torch

    from instructflow.config import LoraConfig
    from instructflow.lm.losses import LMLoss, causal_lm_loss
    from instructflow.lm.modeling import add_lora, load_causal_lm, trainable_parameters
    from instructflow.lm.training import autocast, enable_gradient_checkpointing

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    model, tok = load_causal_lm(args.model)
    variant = args.variant
    if variant.endswith("-gc") or variant == "chunked-gc":
        enable_gradient_checkpointing(model)
    if variant.startswith("lora"):
        model = add_lora(model, LoraConfig(r=16), "causal_lm")
    model.train()
    hh = ROOT.parent / "shared/data/hh-rlhf-harmless-base-test.jsonl.gz"
    if hh.exists():
        text = " ".join(json.loads(line)["chosen"] for line, _ in zip(gzip.open(hh, "rt"), range(400)))
        ids = tok(text, add_special_tokens=False)["input_ids"]
    else:
        ids = torch.randint(10, len(tok), (args.batch * args.seq * args.steps,)).tolist()
    n = args.batch * args.seq
    batches = [torch.tensor((ids * 2)[i * n : (i + 1) * n]).view(args.batch, args.seq) for i in range(args.steps)]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    wrapped = LMLoss(model)
    precision = autocast("bf16" if "bf16" in variant else "no", "cpu")
    times = []
    for x in batches:
        labels = x.clone()
        labels[:, : args.seq // 2] = -100
        t0 = time.perf_counter()
        with precision:
            if variant.startswith("full-logits"):
                loss = causal_lm_loss(model(input_ids=x).logits, labels)
            else:
                loss = wrapped(input_ids=x, labels=labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    timed = times[2:] or times
    return {"variant": variant, "tokens_per_s": round(n * len(timed) / sum(timed), 1), "loss": round(float(loss), 4),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "trainable_parameters": trainable_parameters(model)[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models/SmolLM2-135M-Instruct"))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="full-logits,chunked,chunked-gc,bf16,lora,lora-bf16")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(child(args)))
        return
    rows = []
    for v in args.variants.split(","):
        cmd = [sys.executable, __file__, "--variant", v, "--model", args.model, "--batch", str(args.batch), "--seq",
               str(args.seq), "--steps", str(args.steps), "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows.append(json.loads(out))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.batch} x {args.seq} tokens per step, {args.threads} threads, {args.steps} steps (2 warm-up)")
    print(f"{'variant':14s} {'tokens/s':>9s} {'peak RSS MB':>12s} {'trainable':>11s} {'loss':>7s}")
    for r in rows:
        print(f"{r['variant']:14s} {r['tokens_per_s']:9.1f} {r['peak_rss_mb']:12.1f} {r['trainable_parameters']:11d} {r['loss']:7.4f}")


if __name__ == "__main__":
    main()
