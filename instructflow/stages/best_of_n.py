"""The `best_of_n` stage: sample n answers from SFT per evaluation prompt and keep
the RM's favourite. No training: the baseline every RL method must beat.

The answers are drawn as the evaluation draws every model's (eval.temperature,
eval.max_new_tokens), with a seed of their own, so that n = 1 is an SFT answer
independent of the one the judge compares against. The samples and every
sample's RM score are kept, so best-of-m for any m <= n is read off the same
file (the first m samples): the overoptimization stage plots the judge against
m's KL to SFT, log m - (m - 1)/m (Stiennon et al. 2020, appendix G.3).
Output: artifacts/best_of_n/samples.jsonl (per prompt: the n answers, their RM
scores, tokens and whether each ended).
"""

from __future__ import annotations

import logging
import math

from ..context import StageContext
from ..data.formats import Prompt
from ..io import read_jsonl, write_jsonl
from ..lm.generation import sample_answers
from ..lm.modeling import context_length, load_causal_lm, load_reward_model
from ..lm.training import autocast
from .evaluate import STOP
from .reward import score_texts

log = logging.getLogger(__name__)


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || SFT) = log n - (n - 1)/n, the analytic value for n distinct samples."""
    return math.log(n) - (n - 1) / n


def pick(scores: list[float], m: int) -> int:
    """Index of the RM's favourite among the first m samples (the first one on a tie)."""
    return max(range(m), key=lambda i: (scores[i], -i))


def powers_of_two(n: int) -> list[int]:
    """1, 2, 4, ... up to n, and n itself."""
    out = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return out if out[-1] == n else [*out, n]


def run_best_of_n(ctx: StageContext) -> dict:
    params, cfg, ev = ctx.params, ctx.params.best_of_n, ctx.params.eval
    prompts = read_jsonl(ctx.input("eval_prompts"), Prompt)
    if ev.prompts:
        prompts = prompts[: ev.prompts]
    texts = [p.prompt for p in prompts]
    sft, tok = load_causal_lm(ctx.input("sft"), params.model.dtype)
    rm, rm_tok = load_reward_model(ctx.input("reward_model"), params.model.dtype)
    with ctx.phase("generate"), autocast(params.model.mixed_precision, next(sft.parameters()).device):
        drawn = sample_answers(sft, tok, texts, max_new_tokens=ev.max_new_tokens, num_samples=cfg.n,
                               temperature=ev.temperature, seed=params.project.seed + 29, batch_size=cfg.batch_size)
    answers = [[a.text.split(STOP)[0].strip() or a.text for a in row] for row in drawn]
    with ctx.phase("score"):
        flat = score_texts(rm, rm_tok, [t for t in texts for _ in range(cfg.n)], [a for row in answers for a in row],
                           context_length(rm)).tolist()
    scores = [flat[i * cfg.n : (i + 1) * cfg.n] for i in range(len(prompts))]
    rows = [{"id": p.id, "answers": a, "rm_scores": [round(x, 6) for x in s], "tokens": [x.tokens for x in d],
             "ended": [x.ended for x in d]} for p, a, s, d in zip(prompts, answers, scores, drawn, strict=True)]
    write_jsonl(ctx.output("samples"), rows)
    metrics = {"n": cfg.n, "prompts": len(prompts), "kl_to_sft": round(best_of_n_kl(cfg.n), 4),
               "distinct_answers_per_prompt": round(sum(len(set(a)) for a in answers) / len(answers), 2),
               **{f"rm_score_best_of_{m}": round(sum(s[pick(s, m)] for s in scores) / len(scores), 4)
                  for m in powers_of_two(cfg.n)}}
    log.info("best_of_n: %s", metrics)
    return metrics
