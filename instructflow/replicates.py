"""The comparison of methods over seeds (`make methods`, flows/methods.py).

One run of the pipeline says little on its own: on the built-in default,
changing sft.lr from 1.0e-3 to 1.1e-3 moved PPO-ptx's invented-answer rate
from 0.276 to 0.724. So every method runs in `methods.seeds` replicates: the
configuration itself, then the same configuration with project.seed + 1, + 2,
... under <artifacts_dir>/seeds/<seed>/, every stage drawn again (data, base
model, SFT, comparisons, RMs, policies). Each replicate's `compare` and
`overoptimization` stages judge its methods; this module pools them:

- per method and figure, the replicates' mean, standard deviation (n - 1),
  range, and a 95% interval for the mean over seeds (Student's t: with 3 seeds
  it is wide, which is the point);
- the over-optimization peaks (KL and win rate where the judge peaks) per run;
- figure1.png (every method's win rate against SFT, mean and interval over
  seeds, each seed a dot) and overoptimization.png (every seed's curves).
Outputs under <artifacts_dir>/methods/: summary.json, summary.md and the two charts.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import yaml

from .config import Params, parse_params
from .io import atomic_path, write_json
from .registry import output

FIGURES = ("win_rate", "likert", "invented_answer_rate", "disallowed_output_rate", "judge_score", "rm_score", "kl_to_sft",
           "alignment_tax", "response_tokens")
PEAKS = ("peak_win_rate", "peak_kl", "final_win_rate", "final_kl")
RUNS = ("ppo", "ppo_ensemble", "best_of_n")
# Student's t, 0.975 quantile, by degrees of freedom
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def replicate(params: Params, i: int) -> Params:
    """Replicate i of a configuration: project.seed + i under <artifacts_dir>/seeds/<seed>/, not
    versioned by DVC (dvc.yaml describes replicate 0); replicate 0 is the configuration itself."""
    if i == 0:
        return params
    seed = params.project.seed + i
    raw = params.model_dump(mode="json", by_alias=True)
    raw["project"].update(seed=seed, artifacts_dir=str(Path(params.project.artifacts_dir) / "seeds" / str(seed)))
    raw["orchestrate"]["version_with_dvc"] = False
    return parse_params(raw, f"replicate {i}")


def write_replicates(params: Params, params_path: str | Path) -> list[tuple[str, Params]]:
    """(params file, params) of every replicate, the given file first; the others' files are
    written as <their artifacts_dir>/params.yaml (every key spelled out)."""
    out = [(str(params_path), params)]
    for i in range(1, params.methods.seeds):
        r = replicate(params, i)
        path = Path(r.project.artifacts_dir) / "params.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(r.model_dump(mode="json", by_alias=True), sort_keys=False)
        if not path.exists() or path.read_text() != text:  # rewritten only when it changes
            with atomic_path(path) as tmp:
                Path(tmp).write_text(text)
        out.append((str(path), r))
    return out


def spread(values: list[float]) -> dict:
    """Mean, standard deviation (n - 1), range and the t interval of the mean of replicate values."""
    n = len(values)
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if n > 1 else 0.0
    half = T975.get(n - 1, 1.96) * sd / math.sqrt(n) if n > 1 else 0.0
    return {"mean": round(mean, 4), "sd": round(sd, 4), "min": round(min(values), 4), "max": round(max(values), 4),
            "ci95": [round(mean - half, 4), round(mean + half, 4)], "values": [round(v, 4) for v in values]}


def summarize(replicates: list[Params]) -> dict:
    """Pool the replicates' compare and overoptimization metrics (every replicate must have both)."""
    compares, overopts, seeds = [], [], []
    for r in replicates:
        for stage, into in (("compare", compares), ("overoptimization", overopts)):
            path = output(r, stage, "metrics")
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing: replicate seed {r.project.seed} has not run its {stage} stage")
            into.append(json.loads(path.read_text()))
        seeds.append(r.project.seed)
    methods = [m for m in compares[0]["models"] if all(m in c["models"] for c in compares)]
    table: dict[str, dict] = {}
    for m in methods:
        rows = [c["models"][m] for c in compares]
        figs = {}
        for f in FIGURES:
            vals = [0.5 if (f == "win_rate" and m == "sft") else (row["vs_sft"]["win_rate"] if f == "win_rate" else row.get(f))
                    for row in rows]
            if all(v is not None for v in vals) and (f != "win_rate" or m == "sft" or all("vs_sft" in row for row in rows)):
                figs[f] = spread([float(v) for v in vals])
        if m != "sft":
            figs["win_rate_ci95_per_seed"] = [row["vs_sft"]["ci95"] for row in rows]
        table[m] = figs
    peaks = {run: {k: spread([float(o[f"{k}_{run}"]) for o in overopts]) for k in PEAKS if all(f"{k}_{run}" in o for o in overopts)}
             for run in RUNS}
    for run in RUNS:
        peaks[run]["proxy_rose_after_peak"] = [bool(o.get(f"proxy_rose_after_peak_{run}")) for o in overopts]
    diffs = [o["peak_win_rate_ppo_ensemble"] - o["peak_win_rate_ppo"] for o in overopts
             if "peak_win_rate_ppo_ensemble" in o and "peak_win_rate_ppo" in o]
    return {"seeds": seeds, "judge": compares[0].get("judge"), "prompts": compares[0].get("prompts"),
            "best_of_n": compares[0].get("best_of_n"), "methods": table, "overoptimization": peaks,
            "ensemble_minus_single_peak_win_rate": spread(diffs) if diffs else None,
            "curves": [o.get("curves", {}) for o in overopts]}


def summary_markdown(s: dict) -> str:
    seeds = ", ".join(str(x) for x in s["seeds"])

    def cell(fig: dict | None, spec: str = ".3f") -> str:
        return "-" if fig is None else f"{fig['mean']:{spec}} +- {fig['sd']:{spec}}"

    lines = [f"# Methods over {len(s['seeds'])} seeds ({seeds})", "",
             f"Judge: {s['judge']}, {s['prompts']} prompts per seed; best-of-n with n = {s['best_of_n']}. "
             "Each cell: mean +- standard deviation over seeds; the win rate's 95% interval is over seeds (Student's t).", "",
             "| method | win rate vs SFT | 95% CI (seeds) | per seed | Likert | invented | disallowed | KL to SFT | RM score |",
             "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for m, f in s["methods"].items():
        w = f.get("win_rate")
        ci = f"[{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}]" if w and m != "sft" else "(reference)"
        per = ", ".join(f"{v:.3f}" for v in w["values"]) if w and m != "sft" else ""
        lines.append(f"| {m} | {w['mean']:.3f} | {ci} | {per} | {cell(f.get('likert'), '.2f')} | {cell(f.get('invented_answer_rate'))} | "
                     f"{cell(f.get('disallowed_output_rate'))} | {cell(f.get('kl_to_sft'), '.2f')} | {cell(f.get('rm_score'))} |")
    lines += ["", "## Over-optimization: where the judge peaks", "",
              "| run | peak win rate | KL at the peak | sqrt(KL) | final win rate | final KL | proxy rose after the peak (seeds) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for run, f in s["overoptimization"].items():
        if "peak_kl" not in f:
            continue
        rose = sum(f["proxy_rose_after_peak"])
        lines.append(f"| {run} | {cell(f['peak_win_rate'])} | {cell(f['peak_kl'], '.2f')} | {math.sqrt(max(f['peak_kl']['mean'], 0)):.2f} | "
                     f"{cell(f['final_win_rate'])} | {cell(f['final_kl'], '.2f')} | {rose} of {len(f['proxy_rose_after_peak'])} |")
    d = s.get("ensemble_minus_single_peak_win_rate")
    if d:
        lines += ["", f"Ensemble's peak win rate minus the single RM's: {d['mean']:+.3f} (95% CI over seeds "
                  f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]; per seed {', '.join(f'{v:+.3f}' for v in d['values'])})."]
    return "\n".join(lines) + "\n"


def write_summary(params: Params, s: dict) -> Path:
    """summary.json, summary.md, figure1.png and overoptimization.png under <artifacts_dir>/methods/."""
    out = params.stage_dir("methods")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", s)
    (out / "summary.md").write_text(summary_markdown(s))
    _charts(s, out)
    return out


def _charts(s: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(s["methods"])
    fig, ax = plt.subplots(figsize=(1.1 * len(names) + 2, 4.2))
    for x, m in enumerate(names):
        w = s["methods"][m].get("win_rate")
        if not w:
            continue
        ax.errorbar([x], [w["mean"]], yerr=[[w["mean"] - w["ci95"][0]], [w["ci95"][1] - w["mean"]]], fmt="o", capsize=5,
                    color="C0")
        ax.plot([x] * len(w["values"]), w["values"], ".", color="C1", alpha=0.8)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.axhline(0.5, color="grey", ls="--", lw=0.8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(f"win rate against SFT ({s['judge']})")
    ax.set_title(f"Every method against SFT: mean over {len(s['seeds'])} seeds, 95% t interval; dots: seeds")
    fig.tight_layout()
    fig.savefig(out / "figure1.png", dpi=100)
    plt.close(fig)

    from .stages.compare import overopt_plot

    overopt_plot(s["curves"], out / "overoptimization.png", s["judge"],
                 f"Over-optimization, {len(s['seeds'])} seeds (one line each)")
