"""The markdown report artifact of a pipeline run."""

from __future__ import annotations

from pathlib import Path

from prefect.artifacts import create_markdown_artifact

from instructflow.config import Params
from instructflow.registry import STAGES, resolve, stage_specs
from instructflow.report import format_table, key_metrics


def _link(path: str) -> str:
    p = Path(path).resolve()
    return f"[{path}]({p.as_uri()})" if p.exists() else path


def report_markdown(params: Params, run: dict) -> str:
    lines = ["# instructflow pipeline run", "",
             f"params: `{run['params']}` - wall {run['wall_s']} s, in stages {run['stage_compute_s']} s, "
             f"orchestration overhead {run['overhead_s']} s ({100 * run['overhead_share']:.1f}%)", ""]
    rows = [[r["stage"], r["state"], str(r["wall_s"]), str(r["compute_s"]),
             key_metrics(r["metrics"], STAGES[r["stage"]].headline).replace("  ", ", ")] for r in run["stages"]]
    lines.append(format_table(["stage", "state", "wall s", "compute s", "key metrics"], rows, markdown=True))
    for r in run["stages"]:
        if STAGES[r["stage"]].table:
            lines += ["", f"## {r['stage']}", "", resolve(STAGES[r["stage"]].table)(r["metrics"], markdown=True)]
    lines += ["", "## Artifacts", ""]
    for s in stage_specs(params):
        if any(r["stage"] == s.name for r in run["stages"]):
            lines.append(f"- {s.name}: " + ", ".join(_link(x) for x in (*s.outs, *s.metrics, *s.plots)))
    return "\n".join(lines)


def publish_report(params: Params, run: dict) -> str:
    md = report_markdown(params, run)
    create_markdown_artifact(markdown=md, key="instructflow-pipeline-report", description="Pipeline run report")
    return md
