"""The `compare` and `overoptimization` stages: every method against SFT by a judge
that trained nothing, and how the proxy reward and that judge part ways as a
policy moves away from SFT.

compare: the paper's Figure 1 with every method of this project. The `eval`
stage's models (base few-shot, SFT, PPO, PPO-ptx) keep their answers and
measures (artifacts/eval/answers.jsonl, metrics.json); DPO and PPO against
the RM ensemble answer the same prompts with the same seed, and best-of-n
keeps the RM's favourite of its n SFT samples. Each is judged against the
same SFT answers, with a 95% bootstrap interval over prompts.
Outputs under artifacts/compare/: metrics.json, figure1.png.

overoptimization (Gao et al. 2022): PPO keeps its policy every
ppo.snapshot_every iterations. Each snapshot of `ppo` (one RM) and
`ppo_ensemble` answers methods.overopt_prompts evaluation prompts; the proxy
reward it was trained on (the RM; the ensemble's conservative reward) and the
judge (win rate against SFT's answers) are plotted against sqrt(KL to SFT),
KL measured on the answers as in `eval`. Best-of-m for m = 1, 2, 4, ..., n
adds a curve with no training, at its analytic KL. The gold judge's peak is
reported per run: its KL, its win rate, and whether the proxy kept rising after it.
Outputs under artifacts/overoptimization/: metrics.json, overoptimization.png.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import torch

from ..config import Params
from ..context import StageContext
from ..io import read_jsonl_dicts, write_json
from ..lm.losses import conservative_reward
from ..lm.modeling import context_length, load_causal_lm, load_reward_model
from ..lm.training import autocast
from .best_of_n import best_of_n_kl, pick, powers_of_two
from .evaluate import EvalContext, finish_measures, headline, sequence_logprobs, summary_table, win_rates, winrate_chart
from .ppo import snapshots
from .reward import score_texts

log = logging.getLogger(__name__)

METHODS = ("base_fewshot", "sft", "best_of_n", "dpo", "ppo", "ppo_ptx", "ppo_ensemble")
TRAINED = ("dpo", "ppo_ensemble")   # the models compare generates answers from (eval's it reads)


def best_of_n_choice(ctx: StageContext, n_prompts: int, m: int | None = None) -> tuple[list[dict], list[int]]:
    """best_of_n's samples for the first n_prompts prompts, and the index of the RM's favourite
    among the first m samples of each (all n by default)."""
    rows = read_jsonl_dicts(ctx.input("best_of_n"))[:n_prompts]
    m = m or ctx.params.best_of_n.n
    return rows, [pick(r["rm_scores"], m) for r in rows]


def run_compare(ctx: StageContext) -> dict:
    params = ctx.params
    evaluation = EvalContext.load(ctx)
    evaluated = json.loads(ctx.input("eval_metrics").read_text())
    rows = read_jsonl_dicts(ctx.input("eval_answers"))
    if [r["id"] for r in rows] != [p.id for p in evaluation.prompts]:
        raise ValueError(f"{ctx.input('eval_answers')} answers other prompts than {ctx.input('eval_prompts')}: "
                         "run the eval stage again")
    sft_values = [r["values"]["sft"] for r in rows]
    new: dict[str, dict] = {}
    values: dict[str, list[float]] = {}
    answers: dict[str, list[str]] = {}
    precision = autocast(params.model.mixed_precision, next(evaluation.sft.parameters()).device)
    for name in TRAINED:
        with ctx.phase(name), precision:
            model, mtok = load_causal_lm(ctx.input(name), params.model.dtype)
            answers[name], raw = evaluation.answer(model, mtok)
            values[name] = evaluation.judge.values(evaluation.prompts, answers[name])
            new[name] = evaluation.measure(answers[name], values[name], [a.tokens for a in raw], [a.ended for a in raw],
                                           model=model, mtok=mtok)
    with ctx.phase("best_of_n"), precision:
        samples, chosen = best_of_n_choice(ctx, len(evaluation.prompts))
        picked = list(zip(samples, chosen, strict=True))
        answers["best_of_n"] = [r["answers"][i] for r, i in picked]
        values["best_of_n"] = evaluation.judge.values(evaluation.prompts, answers["best_of_n"])
        new["best_of_n"] = evaluation.measure(answers["best_of_n"], values["best_of_n"], [r["tokens"][i] for r, i in picked],
                                              [r["ended"][i] for r, i in picked], kl_to_sft=best_of_n_kl(params.best_of_n.n))
    start_values = [r["values"]["base_fewshot"] for r in rows] if "base_fewshot" in rows[0]["values"] else None
    finish_measures(params, evaluation.judge, evaluation.prompts, new, values, sft=evaluated["models"]["sft"],
                    sft_values=sft_values, start_values=start_values)
    per_model = {**evaluated["models"], **new}
    per_model = {n: per_model[n] for n in METHODS if n in per_model}
    metrics = headline(ctx, per_model, len(evaluation.prompts), evaluation.judge.name)
    metrics["best_of_n"] = params.best_of_n.n
    metrics["judge_accuracy"] = evaluated.get("judge_accuracy")  # the same judge on the same comparisons as eval's
    metrics["models"] = per_model
    write_json(ctx.output("metrics"), metrics)
    winrate_chart(per_model, list(per_model), ctx.output("figure1"), evaluation.judge.name,
                  "Every method against SFT (95% bootstrap intervals over prompts)")
    log.info("compare:\n%s", summary_table(metrics))
    return metrics


# --------------------------------------------------------------------------- over-optimization
def gold_peak(points: list[dict]) -> dict:
    """Where the judge's win rate peaks along a run, and what the proxy did after it.
    points: dicts with kl, proxy, win_rate, in training order."""
    best = max(range(len(points)), key=lambda i: points[i]["win_rate"])
    later = points[best + 1:]
    return {"peak_win_rate": points[best]["win_rate"], "peak_kl": points[best]["kl"], "peak_index": best,
            "peak_at_end": best == len(points) - 1, "proxy_at_peak": points[best]["proxy"],
            "proxy_max_after_peak": max((p["proxy"] for p in later), default=None),
            "proxy_rose_after_peak": bool(later) and max(p["proxy"] for p in later) > points[best]["proxy"],
            "final_win_rate": points[-1]["win_rate"], "final_kl": points[-1]["kl"]}


def run_overoptimization(ctx: StageContext) -> dict:
    params = ctx.params
    evaluation = EvalContext.load(ctx)
    evaluation = dataclasses.replace(evaluation, prompts=evaluation.prompts[: params.methods.overopt_prompts])
    members = [evaluation.rm.eval(), *(load_reward_model(ctx.input(f"member_{i}"), params.model.dtype)[0].eval()
                                       for i in range(1, params.ensemble.members))]
    point = Points(evaluation, members, params)
    precision = autocast(params.model.mixed_precision, next(evaluation.sft.parameters()).device)
    with ctx.phase("sft"), precision:
        ref_answers, _ = evaluation.answer(evaluation.sft, evaluation.tok, seed_offset=41)
        point.reference = evaluation.judge.values(evaluation.prompts, ref_answers)
    curves: dict[str, list[dict]] = {}
    with ctx.phase("sft_point"), precision:
        sft_answers, _ = evaluation.answer(evaluation.sft, evaluation.tok, seed_offset=43)
        start = {"iteration": 0, **point(evaluation.sft, evaluation.tok, sft_answers)}
    for run, proxy in (("ppo", "rm"), ("ppo_ensemble", "ensemble")):
        models = [*snapshots(ctx.input(f"{run}_snapshots")), (params.ppo.iterations, ctx.input(f"{run}_model"))]
        curves[run] = [{**start, "proxy": start[proxy]}]
        for it, path in models:
            with ctx.phase(f"{run}_{it}"), precision:
                model, mtok = load_causal_lm(path, params.model.dtype)
                answers, _ = evaluation.answer(model, mtok, seed_offset=43)
                p = point(model, mtok, answers)
                curves[run].append({"iteration": it, **p, "proxy": p[proxy]})
    with ctx.phase("best_of_n"):
        curves["best_of_n"] = []
        for m in powers_of_two(params.best_of_n.n):
            samples, chosen = best_of_n_choice(ctx, len(evaluation.prompts), m)
            p = point(None, None, [r["answers"][i] for r, i in zip(samples, chosen, strict=True)], kl=best_of_n_kl(m))
            curves["best_of_n"].append({"n": m, **p, "proxy": p["rm"]})

    metrics: dict = {"prompts": len(evaluation.prompts), "judge": evaluation.judge.name,
                     "snapshot_every": params.ppo.snapshot_every}
    for run, pts in curves.items():
        metrics.update({f"{k}_{run}": v for k, v in gold_peak(pts).items()})
    write_json(ctx.output("metrics"), {**metrics, "curves": curves})
    overopt_plot([curves], ctx.output("plot"), evaluation.judge.name)
    log.info("overoptimization: %s", metrics)
    return metrics


class Points:
    """One point of an over-optimization curve: a model's answers judged against SFT's (`reference`, the
    judge's values of SFT's answers), its KL to SFT and every proxy reward (the RM, the ensemble's)."""

    def __init__(self, evaluation: EvalContext, members: list, params: Params):
        self.evaluation, self.members, self.params = evaluation, members, params
        self.reference: list[float] = []

    def proxies(self, answers: list[str]) -> dict[str, float]:
        ev, ens = self.evaluation, self.params.ensemble
        s = torch.stack([score_texts(m, ev.rm_tok, ev.texts, answers, context_length(ev.rm)) for m in self.members])
        return {"rm": float(s[0].mean()), "ensemble": float(conservative_reward(s, ens.reward, ens.std_coef).mean()),
                "ensemble_std": float(s.std(0, correction=0).mean())}

    def __call__(self, model, mtok, answers: list[str], kl: float | None = None) -> dict:
        ev = self.evaluation
        values = ev.judge.values(ev.prompts, answers)
        if kl is None:
            max_len = context_length(ev.sft)
            kl = float((sequence_logprobs(model, mtok, ev.texts, answers, max_len)
                        - sequence_logprobs(ev.sft, ev.tok, ev.texts, answers, max_len)).mean())
        w = win_rates(ev.judge, ev.prompts, values, self.reference, self.params.project.seed + 3, self.params.eval.bootstrap)
        return {"kl": round(max(kl, 0.0), 4), "sqrt_kl": round(math.sqrt(max(kl, 0.0)), 4),
                **{k: round(v, 4) for k, v in self.proxies(answers).items()},
                "judge_score": round(sum(values) / len(values), 4), "win_rate": w["win_rate"], "ci95": w["ci95"]}


LABELS = {"ppo": "PPO, one RM", "ppo_ensemble": "PPO, RM ensemble", "best_of_n": "best-of-n (n = 1, 2, 4, ...)"}


def overopt_plot(curve_sets: list[dict[str, list[dict]]], path: Path, judge_name: str, title: str = "") -> None:
    """Proxy reward and the judge's win rate against sqrt(KL to SFT), one line per run and
    curve set (a seed), the judge's peak of each starred (Gao et al. 2022, Figure 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    alpha = 1.0 if len(curve_sets) == 1 else 0.6
    for n, curves in enumerate(curve_sets):
        for j, (run, pts) in enumerate(curves.items()):
            x, label = [p["sqrt_kl"] for p in pts], LABELS.get(run, run) if n == 0 else None
            a.plot(x, [p["proxy"] for p in pts], "o-", color=f"C{j}", ms=3, alpha=alpha, label=label)
            b.plot(x, [p["win_rate"] for p in pts], "o-", color=f"C{j}", ms=3, alpha=alpha, label=label)
            peak = max(pts, key=lambda p: p["win_rate"])
            b.plot([peak["sqrt_kl"]], [peak["win_rate"]], "*", color=f"C{j}", mec="k", ms=10)
    a.set_title("proxy reward (what the run optimized)")
    b.set_title(f"gold: win rate against SFT ({judge_name}); * peak")
    b.axhline(0.5, color="grey", ls="--", lw=0.8)
    for ax in (a, b):
        ax.set_xlabel("sqrt(KL to SFT), nats^0.5")
    a.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
