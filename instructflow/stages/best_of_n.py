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

from ..config import Params
from ..data.formats import Prompt
from .evaluate import STOP
from ..lm.generation import sample_answers
from ..io import StageTimer, read_jsonl, write_jsonl, write_result
from ..lm.modeling import context_length, load_causal_lm, load_reward_model
from .reward import score_texts
from ..lm.training import autocast, setup_runtime

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


def run_best_of_n(params: Params, key: str = "") -> dict:
    setup_runtime(params.project)
    cfg, ev, out = params.best_of_n, params.eval, params.stage_dir("best_of_n")
    out.mkdir(parents=True, exist_ok=True)
    timer = StageTimer()
    data_dir, sft_dir, rm_dir = params.stage_dir("data"), params.stage_dir("sft") / "model", params.stage_dir("reward") / "model"
    prompts = read_jsonl(data_dir / "eval_prompts.jsonl", Prompt)
    if ev.prompts:
        prompts = prompts[: ev.prompts]
    texts = [p.prompt for p in prompts]
    sft, tok = load_causal_lm(sft_dir, params.model.dtype)
    rm, rm_tok = load_reward_model(rm_dir, params.model.dtype)
    with timer.phase("generate"), autocast(params.model.mixed_precision, next(sft.parameters()).device):
        drawn = sample_answers(sft, tok, texts, max_new_tokens=ev.max_new_tokens, num_samples=cfg.n,
                               temperature=ev.temperature, seed=params.project.seed + 29, batch_size=cfg.batch_size)
    answers = [[a.text.split(STOP)[0].strip() or a.text for a in row] for row in drawn]
    with timer.phase("score"):
        flat = score_texts(rm, rm_tok, [t for t in texts for _ in range(cfg.n)], [a for row in answers for a in row],
                           context_length(rm)).tolist()
    scores = [flat[i * cfg.n : (i + 1) * cfg.n] for i in range(len(prompts))]
    rows = [{"id": p.id, "answers": a, "rm_scores": [round(x, 6) for x in s], "tokens": [x.tokens for x in d],
             "ended": [x.ended for x in d]} for p, a, s, d in zip(prompts, answers, scores, drawn, strict=True)]
    write_jsonl(out / "samples.jsonl", rows)
    metrics = {"n": cfg.n, "prompts": len(prompts), "kl_to_sft": round(best_of_n_kl(cfg.n), 4),
               "distinct_answers_per_prompt": round(sum(len(set(a)) for a in answers) / len(answers), 2),
               **{f"rm_score_best_of_{m}": round(sum(s[pick(s, m)] for s in scores) / len(scores), 4)
                  for m in powers_of_two(cfg.n)}}
    log.info("best_of_n: %s", metrics)
    return write_result(out, "best_of_n", {"sft": sft_dir, "reward_model": rm_dir, "prompts": data_dir / "eval_prompts.jsonl"},
                        {"samples": out / "samples.jsonl"}, metrics, timer, run_key=key)
