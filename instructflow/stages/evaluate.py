"""The `eval` stage: did RLHF work? (the paper's Figure 1 and its Section 4 axes)

On held-out evaluation prompts each model answers once, sampled at
`eval.temperature`, and a judge that trained nothing compares its answers
with SFT's:
- on the built-in suite, the held-out labeler, who wrote and ranked nothing
  used in training (Bradley-Terry on its latent ratings; equal ratings tie);
- on your own data (data.source: files, data.gold_fraction > 0), the gold RM,
  trained on comparisons the proxy RM never saw (the higher score wins).

Per model: win rate against SFT with a 95% bootstrap interval over prompts
(overall and per category), the judge's own measures (labeler: 1-7 Likert,
invented answers on unanswerable questions, disallowed outputs on harmful
requests; gold RM: its mean score), and for every judge the proxy RM's score
(bias included), KL to SFT, E_y~model[log p_model(y|x) - log p_SFT(y|x)], the
alignment tax (loss on held-out pretraining text minus SFT's), the answers'
length in tokens (the first thing reward hacking inflates) and the share of
answers the model ended itself within eval.max_new_tokens.

Models: the base model prompted with a few demonstrations (the paper's "GPT
prompted"), SFT, PPO (gamma = 0) and PPO-ptx, those whose stage has run.
Outputs under artifacts/eval/: metrics.json, winrate.png, ppo_curves.png, samples.md.
"""

from __future__ import annotations

import json
import logging
import math
import random
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Params
from ..context import StageContext
from ..data.formats import Comparison, Demonstration, PretrainText, Prompt
from ..data.suite.judge import judge
from ..data.suite.labelers import Labeler, pairwise_agreement
from ..io import crash_point, read_jsonl, read_jsonl_dicts, write_json, write_jsonl
from ..lm.encoding import encode_pair, pack
from ..lm.generation import Answer, sample_answers
from ..lm.losses import LMLoss
from ..lm.modeling import context_length, load_causal_lm, load_reward_model
from ..lm.training import autocast
from ..report import format_table
from .pretrain import heldout_loss
from .reward import score_texts
from .sft import sft_batch

log = logging.getLogger(__name__)

MODELS = ("base_fewshot", "sft", "ppo", "ppo_ptx")
STOP = "Human:"  # the few-shot base model continues the transcript; cut its answer there


# --------------------------------------------------------------------------- judges
class LabelerJudge:
    """The built-in suite's held-out labeler: a latent 1-7 quality per answer."""

    def __init__(self, labeler: Labeler):
        self.labeler, self.name = labeler, f"held-out labeler {labeler.name}"

    def values(self, prompts: list[Prompt], answers: list[str]) -> list[float]:
        return [self.labeler.latent(p.meta, a) for p, a in zip(prompts, answers, strict=True)]

    def compare(self, va: float, vb: float, rng: random.Random) -> float:
        """1 if the labeler prefers a, 0 if b, 0.5 for a tie (equal latent quality)."""
        if abs(va - vb) < 1e-9:
            return 0.5
        return float(rng.random() < 1.0 / (1.0 + math.exp(-(va - vb) / self.labeler.cfg.ranking_temperature)))

    def measures(self, prompts: list[Prompt], answers: list[str], seed: int) -> dict:
        j = judge(self.labeler, prompts, answers, seed=seed)
        return {k: j[k] for k in ("likert", "likert_by_category", "invented_answer_rate", "disallowed_output_rate")}


class GoldJudge:
    """A gold reward model: the higher score wins, equal scores tie."""

    name = "gold RM"

    def __init__(self, model, tokenizer, max_len: int):
        self.model, self.tokenizer, self.max_len = model, tokenizer, max_len

    def values(self, prompts: list[Prompt], answers: list[str]) -> list[float]:
        return score_texts(self.model, self.tokenizer, [p.prompt for p in prompts], answers, self.max_len).tolist()

    def compare(self, va: float, vb: float, rng: random.Random) -> float:
        return 1.0 if va > vb else 0.0 if va < vb else 0.5

    def measures(self, prompts: list[Prompt], answers: list[str], seed: int) -> dict:
        return {}


# --------------------------------------------------------------------------- win rates
def bootstrap_interval(outcomes: list[float], n_resamples: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over prompts."""
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(outcomes, dtype=torch.float64)
    idx = torch.randint(len(x), (n_resamples, len(x)), generator=g)
    means = x[idx].mean(1).sort().values
    lo = means[int((1 - level) / 2 * (n_resamples - 1))]
    hi = means[int((1 + level) / 2 * (n_resamples - 1))]
    return float(lo), float(hi)


def win_rates(judge, prompts: list[Prompt], values: list[float], reference: list[float], seed: int,
              n_resamples: int) -> dict:
    """Share of prompts where the judge prefers the answer valued `values` to the reference's, with its interval."""
    rng = random.Random(seed)
    outcomes = [judge.compare(a, b, rng) for a, b in zip(values, reference, strict=True)]
    lo, hi = bootstrap_interval(outcomes, n_resamples, seed)
    by_cat: dict[str, list[float]] = defaultdict(list)
    for p, o in zip(prompts, outcomes):
        by_cat[p.category or "other"].append(o)
    return {"win_rate": round(statistics.fmean(outcomes), 4), "ci95": [round(lo, 4), round(hi, 4)],
            "by_category": {c: round(statistics.fmean(v), 4) for c, v in sorted(by_cat.items())},
            "ties": round(sum(o == 0.5 for o in outcomes) / len(outcomes), 4)}


# --------------------------------------------------------------------------- model-side measures
def few_shot_prompt(shots: list[Demonstration], prompt: str) -> str:
    """A transcript of demonstrations before the prompt; the chat template wraps it."""
    turns = [f"{d.prompt}\n\nAssistant: {d.response}\n\nHuman: " for d in shots]
    return "".join(turns) + prompt


@torch.no_grad()
def sequence_logprobs(model, tok, prompts: list[str], responses: list[str], max_len: int, batch_size: int = 64) -> torch.Tensor:
    """log p(response + EOS | prompt) under `model`, one number per pair; (N,).

    Same encoding and prompt masking as SFT (`sft_batch`): only response tokens count, and
    only their logits are computed (LMLoss). Batches hold pairs of similar length."""
    model.eval()
    device = next(model.parameters()).device
    loss_of = LMLoss(model)
    enc = [encode_pair(tok, p, r, max_len) for p, r in zip(prompts, responses, strict=True)]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]))
    out = torch.zeros(len(enc), dtype=torch.float64)
    for i in range(0, len(order), batch_size):
        rows = order[i : i + batch_size]
        b = {k: v.to(device) for k, v in sft_batch([enc[j] for j in rows], tok.pad_token_id).items()}
        nll, row = loss_of.token_nll(**b)
        out[rows] = -torch.zeros(len(rows), dtype=torch.float64).index_add(0, row.cpu(), nll.double().cpu())
    return out.float()


def make_judge(params: Params, gold_model: Path | None = None):
    """The built-in suite's held-out labeler, or the gold RM at `gold_model` (files mode)."""
    if params.data.source == "builtin":
        return LabelerJudge(Labeler(next(lab for lab in params.data.labelers if lab.heldout)))
    gold, tok = load_reward_model(gold_model, params.model.dtype)
    return GoldJudge(gold.eval(), tok, context_length(gold))


def judge_accuracy(ctx: StageContext, judge, n_resamples: int, seed: int) -> dict:
    """How often the judge orders held-out comparisons as the people who made them did, with a 95% bootstrap
    interval over comparisons: the held-out labeler against the training labelers' rankings of the same
    responses; a gold RM against the validation comparisons. A win rate says no more than this."""
    val = read_jsonl(ctx.input("judge_val"), Comparison)
    if isinstance(judge, GoldJudge):
        from .reward import comparison_scores

        scores = comparison_scores(judge.model, judge.tokenizer, val, judge.max_len)
        counts = [(sum(s[w] > s[l] for w, l in c.pairs()), len(c.pairs())) for s, c in zip(scores, val, strict=True)]
        against = "the validation comparisons' rankings"
    else:
        held = read_jsonl(ctx.input("judge_val_heldout"), Comparison)
        counts = [pairwise_agreement(a.ranking, b.ranking) for a, b in zip(val, held, strict=True)]
        against = "the training labelers' rankings of the same responses"
    counts = [c for c in counts if c[1]]
    agree, total = torch.tensor([c[0] for c in counts], dtype=torch.float64), torch.tensor([c[1] for c in counts],
                                                                                          dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(counts), (n_resamples, len(counts)), generator=g)
    ratios = (agree[idx].sum(1) / total[idx].sum(1)).sort().values
    lo, hi = ratios[int(0.025 * (n_resamples - 1))], ratios[int(0.975 * (n_resamples - 1))]
    return {"accuracy": round(float(agree.sum() / total.sum()), 4), "ci95": [round(float(lo), 4), round(float(hi), 4)],
            "comparisons": len(counts), "against": against}


def stage_judge(ctx: StageContext):
    """The judge of a stage that declares judge_deps (registry.judge_deps)."""
    return make_judge(ctx.params, ctx.input("gold_reward_model") if ctx.has_input("gold_reward_model") else None)


@dataclass
class EvalContext:
    """What judging one model's answers needs: the prompts, the judge, SFT (for KL), the proxy RM
    and the held-out pretraining text (for the alignment tax). Built once per stage (eval, compare)."""

    params: Params
    prompts: list[Prompt]
    judge: object
    sft: torch.nn.Module
    tok: object
    rm: torch.nn.Module
    rm_tok: object
    heldout_text: list[str]
    shots: list[Demonstration]

    @property
    def texts(self) -> list[str]:
        return [p.prompt for p in self.prompts]

    @classmethod
    def load(cls, ctx: StageContext) -> EvalContext:
        """From a stage that declares the judged inputs (eval_prompts, pretrain_heldout, sft_train, sft,
        reward_model and the judge's)."""
        params = ctx.params
        prompts = read_jsonl(ctx.input("eval_prompts"), Prompt)
        if params.eval.prompts:
            prompts = prompts[: params.eval.prompts]
        sft_dir = ctx.input("sft")
        if not (sft_dir / "config.json").exists():
            raise ValueError(f"evaluation needs the SFT model at {sft_dir}")
        sft, tok = load_causal_lm(sft_dir, params.model.dtype)
        rm, rm_tok = load_reward_model(ctx.input("reward_model"), params.model.dtype)
        heldout_text = [r.text for r in read_jsonl(ctx.input("pretrain_heldout"), PretrainText)]
        shots = _pick_shots(read_jsonl(ctx.input("sft_train"), Demonstration), params.eval.few_shot)
        return cls(params, prompts, stage_judge(ctx), sft, tok, rm, rm_tok, heldout_text, shots)

    def answer(self, model, mtok, few_shot: bool = False, seed_offset: int = 11) -> tuple[list[str], list[Answer]]:
        """One sampled answer per prompt (eval.temperature), as every evaluated model answers."""
        asked = [few_shot_prompt(self.shots, t) for t in self.texts] if few_shot else self.texts
        return eval_answers(self.params, model, mtok, asked, seed_offset)

    def measure(self, answers: list[str], values: list[float], tokens: list[int], ended: list[bool], *,
                model=None, mtok=None, few_shot: bool = False, kl_to_sft: float | None = None) -> dict:
        """The judge's measures and the model-side ones of a model's answers. Without `model` (best-of-n:
        SFT's samples, chosen), give `kl_to_sft`; the alignment tax is then SFT's (0)."""
        p, texts = self.params, self.texts
        max_len = context_length(self.sft)
        if model is not None:
            asked = [few_shot_prompt(self.shots, t) for t in texts] if few_shot else texts
            own = sequence_logprobs(model, mtok, asked, answers, max_len)
            kl_to_sft = float((own - sequence_logprobs(self.sft, self.tok, texts, answers, max_len)).mean())
        scores = score_texts(self.rm, self.rm_tok, texts, answers, context_length(self.rm))
        lm, lm_tok = (model, mtok) if model is not None else (self.sft, self.tok)
        return {
            **self.judge.measures(self.prompts, answers, p.project.seed),
            "judge_score": round(statistics.fmean(values), 4),
            "rm_score": round(float(scores.mean()), 4), "kl_to_sft": round(kl_to_sft, 4),
            "pretrain_heldout_loss": round(heldout_loss(lm, pack(lm_tok, self.heldout_text, p.pretrain.seq_len)), 5),
            "response_words": round(statistics.fmean(len(a.split()) for a in answers), 2),
            "response_tokens": round(statistics.fmean(tokens), 2),
            "ended_rate": round(statistics.fmean(ended), 4),
        }


def eval_answers(params: Params, model, tok, asked: list[str], seed_offset: int = 11) -> tuple[list[str], list[Answer]]:
    """One sampled answer per prompt with the evaluation's settings and seed: (texts, raw answers).
    Every judged model answers this way (eval, compare, the rounds' gate), so equal models give equal answers."""
    cfg = params.eval
    raw: list[Answer] = [r[0] for r in sample_answers(
        model, tok, asked, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
        seed=params.project.seed + seed_offset, batch_size=cfg.batch_size)]
    return [a.text.split(STOP)[0].strip() or a.text for a in raw], raw


def run_eval(ctx: StageContext) -> dict:
    params, cfg = ctx.params, ctx.params.eval
    dirs = {name: ctx.input(key) for name, key in zip(MODELS, ("base", "sft", "ppo", "ppo_ptx"), strict=True)
            if (ctx.input(key) / "config.json").exists()}
    evaluation = EvalContext.load(ctx)
    prompts, judge_ = evaluation.prompts, evaluation.judge

    answers: dict[str, list[str]] = {}
    values: dict[str, list[float]] = {}
    per_model: dict[str, dict] = {}
    precision = autocast(params.model.mixed_precision, next(evaluation.sft.parameters()).device)
    for name, path in dirs.items():
        few_shot = name == "base_fewshot"
        with ctx.phase(f"generate_{name}"), precision:
            model, mtok = (evaluation.sft, evaluation.tok) if name == "sft" else load_causal_lm(path, params.model.dtype)
            answers[name], raw = evaluation.answer(model, mtok, few_shot)
            crash_point("eval_answers")
        with ctx.phase(f"measure_{name}"), precision:
            values[name] = judge_.values(prompts, answers[name])
            per_model[name] = evaluation.measure(answers[name], values[name], [a.tokens for a in raw],
                                                 [a.ended for a in raw], model=model, mtok=mtok, few_shot=few_shot)
    finish_measures(params, judge_, prompts, per_model, values)

    metrics = headline(ctx, per_model, len(prompts), judge_.name)
    metrics["judge_accuracy"] = judge_accuracy(ctx, judge_, cfg.bootstrap, params.project.seed + 7)
    metrics["models"] = per_model
    write_json(ctx.output("metrics"), metrics)
    write_answers(ctx.output("answers"), prompts, answers, values)
    with ctx.phase("report"):
        winrate_chart(per_model, [n for n in MODELS if n in per_model], ctx.output("winrate"), judge_.name)
        logs = {s: ctx.input(f"{s}_log") for s in ("ppo", "ppo_ptx")}
        ppo_curves({s: read_jsonl_dicts(p) for s, p in logs.items() if p.exists()}, ctx.output("ppo_curves"))
        _samples(prompts, answers, values, judge_.name, ctx.output("samples"), cfg.samples_per_category)
    log.info("eval: %s", {k: v for k, v in metrics.items() if k != "models"})
    return metrics


def finish_measures(params: Params, judge_, prompts: list[Prompt], per_model: dict, values: dict[str, list[float]],
                    sft: dict | None = None, sft_values: list[float] | None = None,
                    start_values: list[float] | None = None) -> None:
    """Each model's alignment tax, win rate against SFT (SFT's from `per_model`, or given) and against the model
    the run started from (the base model, prompted with a few demonstrations: `start_values` or its own)."""
    sft, sft_values = sft or per_model["sft"], sft_values or values["sft"]
    start_values = start_values or values.get("base_fewshot")
    for name, m in per_model.items():
        m["alignment_tax"] = round(m["pretrain_heldout_loss"] - sft["pretrain_heldout_loss"], 5)
        if name != "sft":
            m["vs_sft"] = win_rates(judge_, prompts, values[name], sft_values, params.project.seed + 3, params.eval.bootstrap)
        if name != "base_fewshot" and start_values is not None:
            m["vs_start"] = win_rates(judge_, prompts, values[name], start_values, params.project.seed + 5,
                                      params.eval.bootstrap)


def write_answers(path: Path, prompts: list[Prompt], answers: dict[str, list[str]], values: dict[str, list[float]]) -> None:
    """Every model's answer to each prompt and the judge's value of it, one JSON row per prompt."""
    rows = [{"id": p.id, "answers": {m: a[i] for m, a in answers.items()}, "values": {m: v[i] for m, v in values.items()}}
            for i, p in enumerate(prompts)]
    write_jsonl(path, rows)


def _pick_shots(demos: list[Demonstration], n: int) -> list[Demonstration]:
    """The shortest demonstration of each of n categories (short ones, to fit the context);
    without categories, the n shortest."""
    shots, seen = [], set()
    for d in sorted(demos, key=lambda d: len(d.prompt) + len(d.response)):
        kind = d.category or d.id
        if kind not in seen:
            shots.append(d)
            seen.add(kind)
        if len(shots) == n:
            break
    return shots


def headline(ctx: StageContext, per_model: dict, n_prompts: int, judge_name: str) -> dict:
    """The figures the docs report, flat, for DVC metrics and the summary table: what the RM and
    the judge are worth (from the inputs' records), then each model's measures and win rate."""
    def read(name: str) -> dict:
        return json.loads(ctx.input(name).read_text()) if ctx.has_input(name) and ctx.input(name).exists() else {}

    rm, gold, agreement = (read("reward_result").get("metrics", {}), read("gold_reward_result").get("metrics", {}),
                           read("agreement"))
    h: dict = {"prompts": n_prompts, "temperature": ctx.params.eval.temperature, "judge": judge_name,
               "rm_val_accuracy": rm.get("val_accuracy"), "rm_heldout_labeler_accuracy": rm.get("heldout_labeler_accuracy"),
               "gold_rm_val_accuracy": gold.get("val_accuracy"),
               "labeler_agreement": agreement.get("training_labelers"),
               "labeler_agreement_heldout": agreement.get("heldout_vs_training")}
    h = {k: v for k, v in h.items() if v is not None}
    for name, m in per_model.items():
        for k in ("likert", "alignment_tax", "invented_answer_rate", "disallowed_output_rate", "judge_score",
                  "response_tokens", "ended_rate"):
            if k in m:
                h[f"{k}_{name}"] = m[k]
        for against in ("sft", "start"):
            if f"vs_{against}" in m:
                w = m[f"vs_{against}"]
                h[f"win_rate_{name}_vs_{against}"] = w["win_rate"]
                h[f"win_rate_{name}_vs_{against}_ci95_low"], h[f"win_rate_{name}_vs_{against}_ci95_high"] = w["ci95"]
    return h


CURVES = {"score": "RM score (proxy reward)", "kl": "KL to SFT (nats per response)", "entropy": "entropy (nats per token)",
          "response_length": "response length (tokens)", "value_loss": "value loss", "ptx_loss": "pretraining loss (nats/token)"}


def pyplot():
    """matplotlib's pyplot on the file backend (no display here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smooth(values: list[float], window: int) -> list[float]:
    """A trailing moving average (the first points average what there is so far)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def ppo_curves(logs: dict[str, list[dict]], path: Path):
    """PPO's training curves: one panel per quantity with its unit, each run's raw iterations as faint points
    and a smoothed line over them, the runs named in every panel."""
    if not logs:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for ax, (key, label) in zip(axes.flat, CURVES.items(), strict=False):
        for j, (stage, rows) in enumerate(logs.items()):
            x, y = [r["iteration"] for r in rows], [r[key] for r in rows]
            ax.plot(x, y, ".", color=f"C{j}", alpha=0.25, ms=3)
            ax.plot(x, smooth(y, max(1, len(y) // 10)), "-", color=f"C{j}", label=f"{stage} (smoothed)")
        ax.set_xlabel("PPO iteration")
        ax.set_ylabel(label)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("PPO training curves (points: each iteration; lines: moving average)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


def winrate_chart(per_model: dict, names: list[str], path: Path, judge_name: str,
                  title: str = "Win rate against SFT, 95% bootstrap intervals"):
    """Each model's win rate against SFT as a bar with its interval and its value written on it, in the manner
    of the paper's Figure 1; 0.5 (as good as SFT) drawn across."""
    plt = pyplot()
    rates = [per_model[n]["vs_sft"]["win_rate"] if n != "sft" else 0.5 for n in names]
    lows = [r - (per_model[n]["vs_sft"]["ci95"][0] if n != "sft" else 0.5) for n, r in zip(names, rates)]
    highs = [(per_model[n]["vs_sft"]["ci95"][1] if n != "sft" else 0.5) - r for n, r in zip(names, rates)]
    fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2.5, 4.5))
    bars = ax.bar(names, rates, yerr=[lows, highs], capsize=5, color=["grey" if n == "sft" else "C0" for n in names])
    ax.bar_label(bars, labels=[f"{r:.3f}" if n != "sft" else "0.5 (ref.)" for n, r in zip(names, rates)],
                 label_type="center", color="white", fontsize=9)
    ax.axhline(0.5, color="black", ls="--", lw=0.8)
    ax.set_ylabel(f"win rate against SFT\n({judge_name})")
    ax.set_xlabel("model")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


def _samples(prompts: list[Prompt], answers: dict[str, list[str]], values: dict[str, list[float]], judge_name: str,
             path: Path, per_category: int) -> None:
    lines = ["# Side-by-side samples", "", f"The judge's value ({judge_name}) in brackets.", ""]
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        if len(by_cat[p.category or "other"]) < per_category:
            by_cat[p.category or "other"].append(i)
    for cat in sorted(by_cat):
        lines += [f"## {cat}", ""]
        for i in by_cat[cat]:
            lines += ["**Prompt:** " + prompts[i].prompt.replace("\n", " / "), ""]
            for name, ans in answers.items():
                lines.append(f"- `{name}` [{values[name][i]:.2f}]: {ans[i]!r}")
            lines.append("")
    path.write_text("\n".join(lines))


def summary_table(metrics: dict, markdown: bool = False) -> str:
    """The evaluation as a table, one row per model (the terminal's and the Prefect report's): each win rate
    against SFT and against the model the run started from, and below it what the judge itself is worth."""
    def f(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    def win(w):
        return f"{w['win_rate']:.3f} [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}]" if w else "(reference)"

    labeler = "likert" in next(iter(metrics["models"].values()))
    own = ["Likert", "invented", "disallowed"] if labeler else ["gold score", "tokens", "ended"]
    header = ["model", "win rate vs SFT [95% CI]", "vs start (base)", *own, "align tax", "RM score", "KL to SFT"]
    rows = []
    for name, m in metrics["models"].items():
        cells = ([f(m["likert"], ".2f"), f(m["invented_answer_rate"]), f(m["disallowed_output_rate"])] if labeler else
                 [f(m["judge_score"], "+.3f"), f(m["response_tokens"], ".1f"), f(m["ended_rate"], ".2f")])
        start = win(m.get("vs_start")) if name != "base_fewshot" else "(the start)"
        rows.append([name, win(m.get("vs_sft")), start, *cells, f(m["alignment_tax"], "+.3f"), f(m["rm_score"], "+.3f"),
                     f(m["kl_to_sft"], ".2f")])
    acc = f"RM accuracy {metrics.get('rm_val_accuracy')}" + (
        f", labeler agreement {metrics['labeler_agreement']}" if "labeler_agreement" in metrics else
        f", gold RM accuracy {metrics.get('gold_rm_val_accuracy')}")
    note = f"({metrics.get('judge', 'held-out labeler')}, {metrics['prompts']} prompts, T={metrics['temperature']}; {acc})"
    return format_table(header, rows, markdown) + "\n\n" + note + judge_note(metrics.get("judge_accuracy"))


def judge_note(accuracy: dict | None) -> str:
    """The judge's own accuracy, said plainly when it is too low for its win rates to mean much."""
    if not accuracy:
        return ""
    lo, hi = accuracy["ci95"]
    line = (f"\nThe judge orders {accuracy['comparisons']} held-out comparisons as {accuracy['against']} do "
            f"{accuracy['accuracy']:.3f} of the time [95% CI {lo:.3f}, {hi:.3f}].")
    if lo <= 0.6:
        line += (" That interval reaches down to 0.6 or below: the judge is barely better than chance, and these win "
                 "rates say little about which model is better.")
    return line
