"""The `collect` stage: comparison data, as the paper gathered it.

For each RM prompt, sample responses from the SFT policy at temperature 1,
keep the first K distinct ones, and have one training labeler (drawn at
random) rank them. Validation prompts are also ranked by the held-out labeler
(to measure the RM against someone who trained nothing), and a subset by every
labeler, to measure inter-labeler agreement.
Outputs under artifacts/collect/: comparisons_train.jsonl,
comparisons_val.jsonl, comparisons_val_heldout.jsonl, agreement.json.
"""

from __future__ import annotations

import itertools
import logging
import random
import statistics

from ..context import StageContext
from ..data.formats import Comparison, Prompt
from ..data.suite.labelers import Labeler, pairwise_agreement
from ..io import read_jsonl, write_json, write_jsonl
from ..lm.generation import generate
from ..lm.modeling import load_causal_lm
from ..lm.training import autocast

log = logging.getLogger(__name__)


def distinct_first(samples: list[str], k: int) -> list[str]:
    """The first k distinct non-empty samples, in sampling order."""
    seen: list[str] = []
    for s in samples:
        if s.strip() and s not in seen:
            seen.append(s)
        if len(seen) == k:
            break
    return seen


def measure_agreement(labelers: list[Labeler], comparisons: list[Comparison], seed: int) -> dict:
    """Each labeler ranks every comparison; report the share of response pairs
    on which two labelers agree, for training-training and held-out-training pairs."""
    rng = random.Random(seed)
    ranks = {lab.name: [lab.rank(c.meta, c.responses, rng) for c in comparisons] for lab in labelers}
    heldout = {lab.name for lab in labelers if lab.cfg.heldout}
    by_pair = {}
    for a, b in itertools.combinations([lab.name for lab in labelers], 2):
        agree = total = 0
        for ra, rb in zip(ranks[a], ranks[b]):
            x, n = pairwise_agreement(ra, rb)
            agree, total = agree + x, total + n
        by_pair[f"{a}-{b}"] = agree / total
    train_pairs = [v for k, v in by_pair.items() if not set(k.split("-")) & heldout]
    held_pairs = [v for k, v in by_pair.items() if set(k.split("-")) & heldout]
    return {
        "training_labelers": round(statistics.fmean(train_pairs), 4),
        "heldout_vs_training": round(statistics.fmean(held_pairs), 4) if held_pairs else None,
        "by_pair": {k: round(v, 4) for k, v in by_pair.items()},
        "comparisons": len(comparisons),
    }


def run_collect(ctx: StageContext) -> dict:
    params, cfg = ctx.params, ctx.params.collect
    if params.data.source != "builtin":
        raise ValueError("collect needs the built-in suite's simulated labelers; with data.source=files the "
                         "comparisons come from data.comparisons")
    rng = random.Random(params.project.seed + 1)
    model, tok = load_causal_lm(ctx.input("policy"), params.model.dtype)
    trainers = [Labeler(lab) for lab in params.data.labelers if not lab.heldout]
    heldout = Labeler(next(lab for lab in params.data.labelers if lab.heldout))

    def sample(prompts: list[Prompt], seed: int) -> list[tuple[Prompt, list[str]]]:
        with autocast(params.model.mixed_precision, next(model.parameters()).device):
            samples = generate(model, tok, [p.prompt for p in prompts], max_new_tokens=cfg.max_new_tokens,
                               num_samples=cfg.candidates, temperature=cfg.temperature, batch_size=cfg.batch_size,
                               seed=seed)
        kept = [(p, distinct_first(s, cfg.k)) for p, s in zip(prompts, samples)]
        return [(p, r) for p, r in kept if len(r) >= 2]

    metrics: dict = {}
    for split, seed in (("train", params.project.seed), ("val", params.project.seed + 7)):
        prompts = read_jsonl(ctx.input(f"rm_prompts_{split}"), Prompt)
        with ctx.phase(f"sample_{split}"):
            sampled = sample(prompts, seed)
        comps = []
        for p, responses in sampled:
            lab = rng.choice(trainers)
            comps.append(Comparison(id=p.id, prompt=p.prompt, category=p.category, meta=p.meta,
                                    responses=responses, ranking=lab.rank(p.meta, responses, rng), labeler=lab.name))
        write_jsonl(ctx.output(f"comparisons_{split}"), comps)
        metrics[f"{split}_comparisons"] = len(comps)
        metrics[f"{split}_skipped_prompts"] = len(prompts) - len(comps)
        metrics[f"{split}_mean_k"] = round(statistics.fmean(len(c.responses) for c in comps), 3) if comps else 0
        if split == "val":
            held = [c.model_copy(update={"ranking": heldout.rank(c.meta, c.responses, rng), "labeler": heldout.name})
                    for c in comps]
            write_jsonl(ctx.output("comparisons_val_heldout"), held)
            with ctx.phase("agreement"):
                agreement = measure_agreement(trainers + [heldout], comps[: cfg.agreement_prompts], params.project.seed)
            write_json(ctx.output("agreement"), agreement)
            metrics["labeler_agreement"] = agreement["training_labelers"]
            metrics["labeler_agreement_heldout"] = agreement["heldout_vs_training"]
    log.info("collect: %s", metrics)
    return metrics
