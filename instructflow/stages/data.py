"""The `data` stage: write every dataset the later stages read, under
artifacts/data/, with fixed names.

- source=builtin: generate the built-in suite (suite/build.py).
- source=files: validate the given files and split them. When only
  comparisons are given, demonstrations are their best-ranked responses and
  the pretraining text is prompt + best response (documented in README).
"""

from __future__ import annotations

import random
from pathlib import Path

from ..config import Params
from ..context import StageContext
from ..data.formats import Comparison, Demonstration, PretrainText, Prompt, split_by_prompt
from ..data.suite.build import build_builtin
from ..io import DataError, read_jsonl, write_jsonl
from ..lm.encoding import format_prompt


def _best(c: Comparison) -> str:
    if c.ranking is not None:
        return c.responses[c.ranking[0]]
    return c.responses[max(range(c.k), key=lambda i: c.scores[i])]


def _unique_prompts(records: list) -> list[Prompt]:
    unique = {r.prompt: r for r in records}
    return [Prompt(id=r.id, prompt=r.prompt, category=r.category) for r in unique.values()]


def build_from_files(params: Params, out: Path, quarantine: Path) -> dict:
    d, seed = params.data, params.project.seed
    if not (d.demonstrations or d.comparisons):
        raise DataError("data.source=files needs data.demonstrations or data.comparisons (params.yaml)")
    from ..data.validate import validate_inputs

    kinds = {"demonstrations": "demonstrations", "comparisons": "comparisons", "pretrain_text": "pretrain"}
    validate_inputs({k: (getattr(d, k), kind) for k, kind in kinds.items() if getattr(d, k)},
                    params.validate_, quarantine)
    counts: dict[str, int] = {}
    comparisons = read_jsonl(d.comparisons, Comparison) if d.comparisons else []
    if d.comparisons and not comparisons:
        raise DataError(f"{d.comparisons}: no comparison records (data.comparisons in params.yaml)")
    tr: list[Comparison] = []
    if comparisons:
        # split by prompt: validation (also the evaluation's prompts), the gold RM's share, the proxy RM's
        rest, va = split_by_prompt(comparisons, d.val_fraction, seed)
        tr, gold = split_by_prompt(rest, d.gold_fraction, seed + 1) if d.gold_fraction else (rest, [])
        counts["comparisons_train"] = write_jsonl(out / "comparisons_train.jsonl", tr)
        counts["comparisons_val"] = write_jsonl(out / "comparisons_val.jsonl", va)
        if d.gold_fraction:
            counts["comparisons_gold"] = write_jsonl(out / "comparisons_gold.jsonl", gold)
            counts["eval_prompts"] = write_jsonl(out / "eval_prompts.jsonl", _unique_prompts(va))
    best = [Demonstration(id=c.id, prompt=c.prompt, response=_best(c), meta=c.meta) for c in tr]
    if d.demonstrations:
        demos = read_jsonl(d.demonstrations, Demonstration)
        if not demos:
            raise DataError(f"{d.demonstrations}: no demonstration records (data.demonstrations in params.yaml)")
        if d.best_responses_as_demonstrations:
            demos += best
    else:  # demonstrations from the training comparisons' best responses only
        demos = best
    tr_d, va_d = split_by_prompt(demos, d.val_fraction, seed)
    counts["sft_train"] = write_jsonl(out / "sft_train.jsonl", tr_d)
    counts["sft_val"] = write_jsonl(out / "sft_val.jsonl", va_d)
    # RL prompts, once each (PPO needs no labels): those the RM trained on, else the demonstrations'
    counts["ppo_prompts"] = write_jsonl(out / "ppo_prompts.jsonl", _unique_prompts(tr or tr_d))
    if d.pretrain_text:
        texts = read_jsonl(d.pretrain_text, PretrainText)
    else:
        texts = [PretrainText(text=f"{format_prompt(x.prompt)} {x.response}") for x in tr_d]
    rng = random.Random(seed)
    texts = list(texts)
    rng.shuffle(texts)
    n_held = max(1, round(len(texts) * d.pretrain_heldout_fraction))
    counts["pretrain_train"] = write_jsonl(out / "pretrain_train.jsonl", texts[n_held:])
    counts["pretrain_heldout"] = write_jsonl(out / "pretrain_heldout.jsonl", texts[:n_held])
    return {"counts": counts}


def run_data(ctx: StageContext) -> dict:
    out = ctx.folder
    with ctx.phase("build"):
        if ctx.params.data.source == "builtin":
            return build_builtin(ctx.params.data, ctx.params.project.seed, out)
        return build_from_files(ctx.params, out, ctx.folder / "quarantine")
