"""Computing each prompt once: the two places where one prompt has several responses.

- collect samples `collect.candidates` responses per prompt. `sample_tokens` runs the
  prompt once and drops finished rows from the batch; HF's `generate` with
  num_return_sequences runs each prompt once per sample and computes every row until
  the longest ends. Both sample from softmax(logits / T); the bench reports the mean
  response length and distinct responses per prompt of each, which should agree.
- the RM's training step scores K responses per prompt. `comparison_rewards` runs the
  prompt once and the responses on its KV cache; the reference runs the K full
  sequences. Forward + backward on the same batches; the rewards must agree.

Each pair is measured alternately in one process, on the default pipeline's SFT model
and comparisons:

    python bench/shared_prompt.py [--params params.yaml] [--prompts 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from instructflow.config import load_params
from instructflow.data.formats import Comparison, Prompt
from instructflow.generation import left_pad, sample_tokens
from instructflow.io import read_jsonl
from instructflow.modeling import encode_prompt, load_causal_lm, load_reward_model, pad_right, reward_scores
from instructflow.reward import collate_comparisons, comparison_rewards, encode_comparison


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def bench_sampling(p, prompts: list[str], repeats: int) -> dict:
    model, tok = load_causal_lm(p.stage_dir("sft") / "model", p.model.dtype)
    model.eval()
    cfg, n = p.collect, p.collect.candidates
    batches = [left_pad([encode_prompt(tok, x) for x in prompts[i : i + cfg.batch_size]], tok.pad_token_id)
               for i in range(0, len(prompts), cfg.batch_size)]

    def ours():
        return [sample_tokens(model, ids, mask, num_samples=n, max_new_tokens=cfg.max_new_tokens, eos_id=tok.eos_token_id,
                              pad_id=tok.pad_token_id, temperature=cfg.temperature) for ids, mask in batches]

    def hf():
        return [model.generate(input_ids=ids, attention_mask=mask, do_sample=True, top_k=0, top_p=1.0,
                               temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens, num_return_sequences=n,
                               pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, ids.size(1):]
                for ids, mask in batches]

    times: dict[str, list[float]] = {"sample_tokens": [], "hf_generate": []}
    stats = {}
    with torch.no_grad():
        for r in range(repeats):
            for name, fn in (("sample_tokens", ours), ("hf_generate", hf)):
                torch.manual_seed(r)
                dt, outs = timed(fn)
                times[name].append(dt)
                texts = [t for o in outs for t in tok.batch_decode(o, skip_special_tokens=True)]
                lengths = [float((o != tok.pad_token_id).sum(1).float().mean()) for o in outs]
                distinct = statistics.fmean(len(set(texts[i : i + n])) for i in range(0, len(texts), n))
                stats.setdefault(name, []).append((statistics.fmean(lengths), distinct))
    return _summary(times, "sample_tokens", "hf_generate") | {
        f"{k}_mean_tokens_distinct": [round(statistics.fmean(x[i] for x in v), 2) for i in (0, 1)] for k, v in stats.items()}


def bench_rm_step(p, comps: list[Comparison], repeats: int) -> dict:
    model, tok = load_reward_model(p.stage_dir("sft") / "model", p.model.dtype)
    model.config.pad_token_id = tok.pad_token_id
    model.train()
    enc = [encode_comparison(tok, c, p.reward.max_len) for c in comps]
    batches = [enc[i : i + p.reward.batch_size] for i in range(0, len(enc), p.reward.batch_size)]
    shared = [collate_comparisons(b, tok.pad_token_id) for b in batches]
    full = [pad_right([s for e in b for s in e.sequences], tok.pad_token_id) for b in batches]

    def run_shared():
        out = [comparison_rewards(model, b) for b in shared]
        torch.stack([o.sum() for o in out]).sum().backward()
        return out

    def run_full():
        out = [reward_scores(model, ids, mask) for ids, mask in full]
        torch.stack([o.sum() for o in out]).sum().backward()
        return out

    times: dict[str, list[float]] = {"shared_prompt": [], "full_sequences": []}
    rewards: dict[str, list[torch.Tensor]] = {}
    for _ in range(repeats):
        for name, fn in (("shared_prompt", run_shared), ("full_sequences", run_full)):
            model.zero_grad(set_to_none=True)
            dt, rewards[name] = timed(fn)
            times[name].append(dt)
    diff = max(float((x - y).abs().max().detach()) for x, y in zip(rewards["shared_prompt"], rewards["full_sequences"]))
    tokens = {"shared_prompt": sum(b["prompt_ids"].numel() + b["response_ids"].numel() for b in shared),
              "full_sequences": sum(ids.numel() for ids, _ in full)}
    return _summary(times, "shared_prompt", "full_sequences") | {"max_abs_reward_diff": diff, "padded_tokens": tokens}


def _summary(times: dict[str, list[float]], ours: str, peer: str) -> dict:
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_s": {k: round(v, 3) for k, v in med.items()}, "speedup": round(med[peer] / med[ours], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--prompts", type=int, default=512, help="RM prompts sampled, and comparisons scored")
    ap.add_argument("--repeats", type=int, default=3, choices=range(1, 100), metavar="N")
    args = ap.parse_args()
    p = load_params(args.params)
    if p.project.threads:
        torch.set_num_threads(p.project.threads)
    prompts = [x.prompt for x in read_jsonl(p.stage_dir("data") / "rm_prompts_train.jsonl", Prompt)[: args.prompts]]
    comps = read_jsonl(p.stage_dir("collect") / "comparisons_train.jsonl", Comparison)[: args.prompts]
    print("sampling", bench_sampling(p, prompts, args.repeats))
    print("rm_step", bench_rm_step(p, comps, args.repeats))


if __name__ == "__main__":
    main()
