"""PPO's minibatch training step: the LM head on every position against on the response only.

`response_logprobs` passes `logits_to_keep` so the policy's LM head runs only where it
predicts a response token, and `minibatch` cuts the columns that are padding in every row
of a minibatch. This measures one PPO epoch of the default pipeline's shapes (a real
rollout of `ppo.batch_size` prompts from the SFT policy; policy and value forward and
backward per minibatch) both ways, alternated, and checks that the log-probabilities agree.

    python bench/ppo_step.py [--params params.yaml] [--repeats 8]

Needs the sft and reward stages' models (`make bench-models` builds them).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from instructflow import ppo as P
from instructflow.config import load_params
from instructflow.data.formats import Prompt
from instructflow.io import read_jsonl
from instructflow.modeling import load_causal_lm, load_reward_model


class FullLogits(torch.nn.Module):
    """The policy without `logits_to_keep`: its LM head runs on every position."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, position_ids):
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)


def epoch(policy, value, ro, minibatches, trim: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One pass of policy and value forward + backward over the minibatches; returns each
    minibatch's (masked log-probs, mask)."""
    out = []
    for mb in minibatches:
        if trim:
            ids, attn, width, (mask,) = P.minibatch(ro, mb, ro.mask)
        else:
            ids, attn, width, mask = ro.ids[mb], ro.attn[mb], ro.prompt_width, ro.mask[mb]
        logp, ent = P.response_logprobs(policy, ids, attn, width, 1.0, with_entropy=True)
        (P.masked_mean(logp, mask) + 0.01 * P.masked_mean(ent, mask)).backward()
        P.masked_mean(P.response_values(value, ids, attn, width), mask).backward()
        out.append((logp.detach() * mask, mask))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    params = load_params(args.params)
    torch.manual_seed(params.project.seed)
    sft, rm = params.stage_dir("sft") / "model", params.stage_dir("reward") / "model"
    policy, tok = load_causal_lm(sft)
    ref, _ = load_causal_lm(sft)
    reward, _ = load_reward_model(rm)
    value = P.ValueModel(load_reward_model(rm)[0])
    for m in (policy, ref, reward, value):
        m.eval()
    prompts = [p.prompt for p in read_jsonl(params.stage_dir("data") / "ppo_prompts.jsonl", Prompt)][: params.ppo.batch_size]
    ro = P.rollout(policy, ref, value, reward, tok, prompts, params.ppo, torch.device("cpu"))
    minibatches = torch.randperm(len(prompts)).split(params.ppo.minibatch_size)
    print(f"rollout: {len(prompts)} prompts, prompt width {ro.prompt_width}, response width {ro.mask.size(1)}, "
          f"mean response {ro.mask.sum(1).mean():.1f} tokens; {len(minibatches)} minibatches of {params.ppo.minibatch_size}")

    ways = {"LM head on every position, batch width": (FullLogits(policy), False),
            "LM head on the response, minibatch width": (policy, True)}
    full, cut = (epoch(model, value, ro, minibatches, trim) for model, trim in ways.values())  # also warm-up
    for (a, _), (b, mask) in zip(full, cut):
        assert torch.allclose(a[:, : mask.size(1)], b, atol=1e-5), "the two ways disagree"
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, (model, trim) in ways.items():
            t = time.perf_counter()
            epoch(model, value, ro, minibatches, trim)
            times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        print(f"{name:45s} min {min(ts) * 1e3:7.1f} ms   median {statistics.median(ts) * 1e3:7.1f} ms")
    base, new = (statistics.median(ts) for ts in times.values())
    print(f"median ratio: {base / new:.2f}x ({args.repeats} alternated repeats, torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
