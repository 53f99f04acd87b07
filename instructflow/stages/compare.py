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

from .best_of_n import best_of_n_kl, pick, powers_of_two
from ..config import Params
from .reward_ensemble import member_dirs
from .evaluate import EvalContext, _headline, finish_measures, sequence_logprobs, summary_table, win_rates, winrate_chart
from ..io import StageTimer, read_jsonl_dicts, write_json, write_result
from ..lm.losses import conservative_reward
from ..lm.modeling import context_length, load_causal_lm, load_reward_model
from .ppo import snapshots
from .reward import score_texts
from ..lm.training import autocast, setup_runtime

log = logging.getLogger(__name__)

METHODS = ("base_fewshot", "sft", "best_of_n", "dpo", "ppo", "ppo_ptx", "ppo_ensemble")
TRAINED = ("dpo", "ppo_ensemble")   # the models compare generates answers from (eval's it reads)


def best_of_n_choice(params: Params, n_prompts: int, m: int | None = None) -> tuple[list[dict], list[int]]:
    """best_of_n's samples for the first n_prompts prompts, and the index of the RM's favourite
    among the first m samples of each (all n by default)."""
    rows = read_jsonl_dicts(params.stage_dir("best_of_n") / "samples.jsonl")[:n_prompts]
    m = m or params.best_of_n.n
    return rows, [pick(r["rm_scores"], m) for r in rows]


def run_compare(params: Params, key: str = "") -> dict:
    setup_runtime(params.project)
    out, eval_dir = params.stage_dir("compare"), params.stage_dir("eval")
    out.mkdir(parents=True, exist_ok=True)
    timer = StageTimer()
    ctx = EvalContext.load(params)
    evaluated = json.loads((eval_dir / "metrics.json").read_text())
    rows = read_jsonl_dicts(eval_dir / "answers.jsonl")
    if [r["id"] for r in rows] != [p.id for p in ctx.prompts]:
        raise ValueError(f"{eval_dir / 'answers.jsonl'} answers other prompts than {params.stage_dir('data') / 'eval_prompts.jsonl'}: "
                         "run the eval stage again")
    sft_values = [r["values"]["sft"] for r in rows]
    new: dict[str, dict] = {}
    values: dict[str, list[float]] = {}
    answers: dict[str, list[str]] = {}
    precision = autocast(params.model.mixed_precision, next(ctx.sft.parameters()).device)
    for name in TRAINED:
        with timer.phase(name), precision:
            model, mtok = load_causal_lm(params.stage_dir(name) / "model", params.model.dtype)
            answers[name], raw = ctx.answer(model, mtok)
            values[name] = ctx.judge.values(ctx.prompts, answers[name])
            new[name] = ctx.measure(answers[name], values[name], [a.tokens for a in raw], [a.ended for a in raw],
                                    model=model, mtok=mtok)
    with timer.phase("best_of_n"), precision:
        samples, chosen = best_of_n_choice(params, len(ctx.prompts))
        answers["best_of_n"] = [r["answers"][i] for r, i in zip(samples, chosen, strict=True)]
        values["best_of_n"] = ctx.judge.values(ctx.prompts, answers["best_of_n"])
        new["best_of_n"] = ctx.measure(answers["best_of_n"], values["best_of_n"],
                                       [r["tokens"][i] for r, i in zip(samples, chosen, strict=True)],
                                       [r["ended"][i] for r, i in zip(samples, chosen, strict=True)],
                                       kl_to_sft=best_of_n_kl(params.best_of_n.n))
    finish_measures(params, ctx.judge, ctx.prompts, new, values, sft=evaluated["models"]["sft"], sft_values=sft_values)
    per_model = {**evaluated["models"], **new}
    per_model = {n: per_model[n] for n in METHODS if n in per_model}
    metrics = _headline(params, per_model, len(ctx.prompts), ctx.judge.name)
    metrics["best_of_n"] = params.best_of_n.n
    metrics["models"] = per_model
    write_json(out / "metrics.json", metrics)
    winrate_chart(per_model, list(per_model), out / "figure1.png", ctx.judge.name,
                  "Every method against SFT (95% bootstrap intervals over prompts)")
    log.info("compare:\n%s", summary_table(metrics))
    inputs = {"eval": eval_dir / "answers.jsonl", "best_of_n": params.stage_dir("best_of_n") / "samples.jsonl",
              **{f"model_{n}": params.stage_dir(n) / "model" for n in TRAINED}}
    return write_result(out, "compare", inputs, {"metrics": out / "metrics.json", "figure1": out / "figure1.png"},
                        metrics, timer, run_key=key)


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


def run_overoptimization(params: Params, key: str = "") -> dict:
    setup_runtime(params.project)
    out = params.stage_dir("overoptimization")
    out.mkdir(parents=True, exist_ok=True)
    timer = StageTimer()
    ctx = EvalContext.load(params)
    ctx = dataclasses.replace(ctx, prompts=ctx.prompts[: params.methods.overopt_prompts])
    texts, n_boot, seed = ctx.texts, params.eval.bootstrap, params.project.seed
    max_len = context_length(ctx.sft)
    rm_len = context_length(ctx.rm)
    members = [ctx.rm.eval(), *(load_reward_model(d, params.model.dtype)[0].eval() for d in member_dirs(params)[1:])]
    ens = params.ensemble

    def proxies(answers: list[str]) -> dict[str, float]:
        s = torch.stack([score_texts(m, ctx.rm_tok, texts, answers, rm_len) for m in members])
        return {"rm": float(s[0].mean()), "ensemble": float(conservative_reward(s, ens.reward, ens.std_coef).mean()),
                "ensemble_std": float(s.std(0, correction=0).mean())}

    precision = autocast(params.model.mixed_precision, next(ctx.sft.parameters()).device)
    with timer.phase("sft"), precision:
        ref_answers, _ = ctx.answer(ctx.sft, ctx.tok, seed_offset=41)
        ref_values = ctx.judge.values(ctx.prompts, ref_answers)

    def point(model, mtok, answers: list[str], kl: float | None = None) -> dict:
        values = ctx.judge.values(ctx.prompts, answers)
        if kl is None:
            kl = float((sequence_logprobs(model, mtok, texts, answers, max_len)
                        - sequence_logprobs(ctx.sft, ctx.tok, texts, answers, max_len)).mean())
        w = win_rates(ctx.judge, ctx.prompts, values, ref_values, seed + 3, n_boot)
        return {"kl": round(max(kl, 0.0), 4), "sqrt_kl": round(math.sqrt(max(kl, 0.0)), 4), **{k: round(v, 4) for k, v in proxies(answers).items()},
                "judge_score": round(sum(values) / len(values), 4), "win_rate": w["win_rate"], "ci95": w["ci95"]}

    curves: dict[str, list[dict]] = {}
    with timer.phase("sft_point"), precision:
        sft_answers, _ = ctx.answer(ctx.sft, ctx.tok, seed_offset=43)
        start = {"iteration": 0, **point(ctx.sft, ctx.tok, sft_answers)}
    for run, proxy in (("ppo", "rm"), ("ppo_ensemble", "ensemble")):
        folder = params.stage_dir(run)
        models = [*snapshots(folder), (params.ppo.iterations, folder / "model")]
        curves[run] = [{**start, "proxy": start[proxy]}]
        for it, path in models:
            with timer.phase(f"{run}_{it}"), precision:
                model, mtok = load_causal_lm(path, params.model.dtype)
                answers, _ = ctx.answer(model, mtok, seed_offset=43)
                p = point(model, mtok, answers)
                curves[run].append({"iteration": it, **p, "proxy": p[proxy]})
    with timer.phase("best_of_n"):
        curves["best_of_n"] = []
        for m in powers_of_two(params.best_of_n.n):
            samples, chosen = best_of_n_choice(params, len(ctx.prompts), m)
            p = point(None, None, [r["answers"][i] for r, i in zip(samples, chosen, strict=True)], kl=best_of_n_kl(m))
            curves["best_of_n"].append({"n": m, **p, "proxy": p["rm"]})

    metrics: dict = {"prompts": len(ctx.prompts), "judge": ctx.judge.name, "snapshot_every": params.ppo.snapshot_every}
    for run, pts in curves.items():
        peak = gold_peak(pts)
        metrics.update({f"{k}_{run}": v for k, v in peak.items()})
    write_json(out / "metrics.json", {**metrics, "curves": curves})
    overopt_plot([curves], out / "overoptimization.png", ctx.judge.name)
    log.info("overoptimization: %s", metrics)
    inputs = {"best_of_n": params.stage_dir("best_of_n") / "samples.jsonl",
              **{f"{r}_snapshots": params.stage_dir(r) / "snapshots" for r in ("ppo", "ppo_ensemble")},
              **{f"{r}_model": params.stage_dir(r) / "model" for r in ("ppo", "ppo_ensemble")}}
    return write_result(out, "overoptimization", inputs,
                        {"metrics": out / "metrics.json", "plot": out / "overoptimization.png"}, metrics, timer, run_key=key)


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
