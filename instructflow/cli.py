"""The `instructflow` command: one subcommand per stage, each reading
params.yaml and writing under artifacts/<stage>/ (with a result.json)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from .config import ConfigError, load_params
from .io import DataError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
data_app = typer.Typer(no_args_is_help=True, help="Datasets: build the built-in suite, import public layouts.")
app.add_typer(data_app, name="data")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="The params file.")]
STAGES = ("data", "pretrain", "sft", "collect", "reward")


def _setup_logging() -> None:
    logging.basicConfig(level=os.environ.get("INSTRUCTFLOW_LOG", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def run_stage(stage: str, params_path: Path) -> dict:
    """Run one stage by name; the functions are imported lazily (torch is slow to import)."""
    params = load_params(params_path)
    if stage == "data":
        from .data.stage import run_data as fn
    elif stage == "pretrain":
        from .pretrain import run_pretrain as fn
    elif stage == "sft":
        from .sft import run_sft as fn
    elif stage == "collect":
        from .collect import run_collect as fn
    elif stage == "reward":
        from .reward import run_reward as fn
    else:
        raise ValueError(f"unknown stage '{stage}'")
    return fn(params)


def _run(stage: str, params_path: Path) -> dict:
    _setup_logging()
    try:
        result = run_stage(stage, params_path)
    except (ConfigError, DataError) as err:
        _fail(str(err))
    typer.echo(json.dumps({"stage": stage, "metrics": result["metrics"], "seconds": result["timings_s"]["total"]}, indent=2))
    return result


@data_app.command("build")
def data_build(params: ParamsOpt = Path("params.yaml")) -> None:
    """Write the datasets under artifacts/data/ (built-in suite or validated files)."""
    _run("data", params)


@data_app.command("import")
def data_import(
    layout: Annotated[str, typer.Argument(help="hh-rlhf | alpaca | trl-preference")],
    src: Annotated[Path, typer.Argument(help="Source file (.jsonl, .jsonl.gz or .json)")],
    out: Annotated[Path, typer.Argument(help="Output JSONL in instructflow's format")],
) -> None:
    """Convert a public dataset layout; skipped rows are reported in OUT.report.json."""
    from .data.importers import IMPORTERS
    from .io import write_json, write_jsonl

    if layout not in IMPORTERS:
        _fail(f"unknown layout '{layout}'; choose one of {sorted(IMPORTERS)}")
    try:
        records, report = IMPORTERS[layout](src)
    except DataError as err:
        _fail(str(err))
    write_jsonl(out, records)
    write_json(out.with_suffix(".report.json"), report.as_dict())
    typer.echo(f"{layout}: read {report.read}, wrote {report.written} to {out}, skipped {len(report.skipped)}"
               + (f" (see {out.with_suffix('.report.json')})" if report.skipped else ""))
    for s in report.skipped[:10]:
        typer.echo(f"  skipped {src}:{s['line']}: {s['reason']}")


@app.command()
def pretrain(params: ParamsOpt = Path("params.yaml")) -> None:
    """Build (or load) the base model; artifacts/pretrain/model."""
    _run("pretrain", params)


@app.command()
def sft(params: ParamsOpt = Path("params.yaml")) -> None:
    """Supervised fine-tuning on demonstrations; artifacts/sft/model."""
    _run("sft", params)


@app.command()
def collect(params: ParamsOpt = Path("params.yaml")) -> None:
    """Sample K responses per prompt from SFT and have labelers rank them."""
    _run("collect", params)


@app.command()
def reward(params: ParamsOpt = Path("params.yaml")) -> None:
    """Train the reward model on K-wise rankings; artifacts/reward/model."""
    _run("reward", params)


@app.command()
def pipeline(
    params: ParamsOpt = Path("params.yaml"),
    stages: Annotated[str, typer.Option(help="Comma-separated stages to run, in order.")] = ",".join(STAGES),
) -> None:
    """Run the stages in order and print a summary."""
    _setup_logging()
    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    try:
        p = load_params(params)
    except ConfigError as err:
        _fail(str(err))
    if p.data.source != "builtin" and "collect" in chosen:
        chosen.remove("collect")  # comparisons come from the given files
    summary, t0 = [], time.perf_counter()
    for stage in chosen:
        try:
            result = run_stage(stage, params)
        except (ConfigError, DataError) as err:
            _fail(f"stage {stage}: {err}")
        summary.append((stage, result["timings_s"]["total"], result["metrics"]))
    typer.echo("\nstage       seconds  key metrics")
    for stage, secs, m in summary:
        keys = [k for k in ("heldout_ppl", "val_loss", "likert_base", "likert_sft", "labeler_agreement",
                            "labeler_agreement_heldout", "val_accuracy", "heldout_labeler_accuracy") if k in m]
        typer.echo(f"{stage:10s} {secs:8.1f}  " + "  ".join(f"{k}={m[k]}" for k in keys))
    typer.echo(f"total      {time.perf_counter() - t0:8.1f}")


if __name__ == "__main__":
    app()
