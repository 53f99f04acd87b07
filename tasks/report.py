"""The markdown report artifact of a pipeline run."""

from __future__ import annotations

import json
from pathlib import Path

from prefect.artifacts import create_markdown_artifact

from instructflow.config import Params
from instructflow.pipeline import stage_specs

KEY_METRICS = ("rows", "heldout_ppl", "val_loss", "likert_sft", "labeler_agreement", "val_accuracy",
               "heldout_labeler_accuracy", "parity_max_abs_diff", "final_score", "final_kl")


def _link(path: str) -> str:
    p = Path(path).resolve()
    return f"[{path}]({p.as_uri()})" if p.exists() else path


def report_markdown(params: Params, run: dict) -> str:
    lines = ["# instructflow pipeline run", "",
             f"params: `{run['params']}` - wall {run['wall_s']} s, in stages {run['stage_compute_s']} s, "
             f"orchestration overhead {run['overhead_s']} s ({100 * run['overhead_share']:.1f}%)", "",
             "| stage | state | wall s | compute s | key metrics |", "| --- | --- | ---: | ---: | --- |"]
    for r in run["stages"]:
        m = r["metrics"]
        keys = ", ".join(f"{k}={m[k]}" for k in KEY_METRICS if k in m)
        lines.append(f"| {r['stage']} | {r['state']} | {r['wall_s']} | {r['compute_s']} | {keys} |")
    metrics = params.stage_dir("eval") / "metrics.json"
    if metrics.exists():
        ev = json.loads(metrics.read_text())
        lines += ["", "## Evaluation (held-out labeler)", "",
                  "| model | win rate vs SFT [95% CI] | Likert | invented | disallowed | alignment tax |",
                  "| --- | --- | ---: | ---: | ---: | ---: |"]
        for name, m in ev["models"].items():
            w = m.get("vs_sft")
            win = f"{w['win_rate']:.3f} [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}]" if w else "(reference)"
            fmt = lambda x, s=".3f": "-" if x is None else format(x, s)  # noqa: E731
            lines.append(f"| {name} | {win} | {fmt(m['likert'], '.2f')} | {fmt(m['invented_answer_rate'])} | "
                         f"{fmt(m['disallowed_output_rate'])} | {fmt(m['alignment_tax'], '+.3f')} |")
    lines += ["", "## Artifacts", ""]
    for s in stage_specs(params):
        if any(r["stage"] == s.name for r in run["stages"]):
            lines.append(f"- {s.name}: " + ", ".join(_link(x) for x in (*s.outs, *s.metrics, *s.plots)))
    return "\n".join(lines)


def publish_report(params: Params, run: dict) -> str:
    md = report_markdown(params, run)
    create_markdown_artifact(markdown=md, key="instructflow-pipeline-report", description="Pipeline run report")
    return md
