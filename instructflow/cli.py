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
STAGES = ("data", "validate", "pretrain", "sft", "collect", "reward", "export", "ppo", "ppo_ptx", "eval")


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
    elif stage == "validate":
        from .validate import run_validate as fn
    elif stage == "pretrain":
        from .pretrain import run_pretrain as fn
    elif stage == "sft":
        from .sft import run_sft as fn
    elif stage == "collect":
        from .collect import run_collect as fn
    elif stage == "reward":
        from .reward import run_reward as fn
    elif stage in ("ppo", "ppo_ptx"):
        from .ppo import run_ppo

        return run_ppo(params, ptx=stage == "ppo_ptx")
    elif stage == "eval":
        from .evaluate import run_eval as fn
    elif stage == "export":
        from .export import run_export as fn
    else:
        raise ValueError(f"unknown stage '{stage}'")
    return fn(params)


def _run(stage: str, params_path: Path) -> dict:
    _setup_logging()
    try:
        result = run_stage(stage, params_path)
    except (ConfigError, DataError, FileNotFoundError) as err:
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


@data_app.command("validate")
def data_validate(
    path: Annotated[Path, typer.Argument(help="A JSONL file in instructflow's format.")],
    kind: Annotated[str, typer.Option(help="prompts | demonstrations | comparisons | pretrain")],
    quarantine: Annotated[Path, typer.Option(help="Folder for the failing rows (<name>.quarantine.jsonl).")] = Path("artifacts/validate/quarantine"),
    report: Annotated[Path | None, typer.Option(help="Also write the report as JSON here.")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Check one dataset against its Great Expectations suite; exit 1 with a report naming the rows when it fails."""
    from .config import ValidateConfig
    from .io import write_json
    from .validate import KINDS, validate_file

    if kind not in KINDS:
        _fail(f"unknown kind '{kind}'; choose one of {', '.join(KINDS)}")
    try:
        cfg = load_params(params).validate_ if params.exists() else ValidateConfig()
        result = validate_file(path, kind, cfg, quarantine)
    except (ConfigError, DataError) as err:
        _fail(str(err))
    if report:
        write_json(report, result.as_dict())
    typer.echo(result.summary(cfg.max_failed_rows_shown), err=not result.ok)
    if not result.ok:
        typer.echo(f"{len(result.bad_lines)} of {result.rows} rows failed; they are in {result.quarantine}", err=True)
        raise typer.Exit(1)


@app.command("validate")
def validate_stage(params: ParamsOpt = Path("params.yaml")) -> None:
    """Validate every dataset under artifacts/data/ (Great Expectations); fails before any training."""
    _run("validate", params)


@app.command("dvc-yaml")
def dvc_yaml_cmd(
    params: ParamsOpt = Path("params.yaml"),
    out: Annotated[Path, typer.Option(help="Where to write it.")] = Path("dvc.yaml"),
) -> None:
    """Write dvc.yaml from the stage table (instructflow/pipeline.py) for this params file."""
    import yaml

    from .io import atomic_path
    from .pipeline import dvc_yaml

    try:
        p = load_params(params)
    except ConfigError as err:
        _fail(str(err))
    present = set(yaml.safe_load(params.read_text()) or {})
    text = "# Generated by `instructflow dvc-yaml` from instructflow/pipeline.py; do not edit by hand.\n" + \
        yaml.safe_dump(dvc_yaml(p, str(params), present), sort_keys=False, width=120)
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    typer.echo(f"wrote {out}")


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
def ppo(params: ParamsOpt = Path("params.yaml")) -> None:
    """PPO against the RM with a per-token KL penalty to SFT (no pretraining mix); artifacts/ppo/."""
    _run("ppo", params)


@app.command("ppo-ptx")
def ppo_ptx(params: ParamsOpt = Path("params.yaml")) -> None:
    """PPO-ptx: PPO plus ppo.ptx_coef x the pretraining log-likelihood; artifacts/ppo_ptx/."""
    _run("ppo_ptx", params)


@app.command("eval")
def evaluate(params: ParamsOpt = Path("params.yaml")) -> None:
    """Judge base (few-shot), SFT, PPO and PPO-ptx on held-out prompts; artifacts/eval/."""
    result = _run("eval", params)
    typer.echo(eval_table(result["metrics"]))


@app.command()
def export(params: ParamsOpt = Path("params.yaml")) -> None:
    """Export the RM to ONNX with a parity check against torch; artifacts/export/rm/."""
    _run("export", params)


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="Export folder (artifacts/export) or s3://bucket/prefix.")] = "artifacts/export",
    params: ParamsOpt = Path("params.yaml"),
    host: Annotated[str | None, typer.Option(help="Overrides serve.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Overrides serve.port.")] = None,
) -> None:
    """Serve the exported RM over HTTP (POST /v1/score, /v1/compare; /healthz, /readyz, /metrics, /docs)."""
    from .serve import serve as run_server

    _setup_logging()
    try:
        cfg = load_params(params).serve if params.exists() else None
    except ConfigError as err:
        _fail(str(err))
    from .config import ServeConfig

    cfg = cfg or ServeConfig()
    cfg = cfg.model_copy(update={k: v for k, v in {"host": host, "port": port}.items() if v is not None})
    try:
        run_server(model, cfg)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        _fail(f"not serving {model}: {err}")


@app.command()
def publish(
    uri: Annotated[str, typer.Argument(help="s3://bucket/prefix")],
    folder: Annotated[Path, typer.Option(help="The export folder.")] = Path("artifacts/export/rm"),
) -> None:
    """Upload the exported RM to object storage, manifest last (endpoint/credentials from AWS_* variables)."""
    from .storage import publish_export

    try:
        m = publish_export(folder, uri)
    except ValueError as err:
        _fail(str(err))
    typer.echo(f"published {m['model_version']} ({len(m['files'])} files + manifest) to {uri}")


@app.command()
def pipeline(
    params: ParamsOpt = Path("params.yaml"),
    stages: Annotated[str, typer.Option(help="Comma-separated stages to run, in order.")] = ",".join(STAGES),
) -> None:
    """Run the stages in order in this process, without orchestration, and print a summary
    (`make pipeline` runs the same stages through Prefect: flows/pipeline.py)."""
    from .pipeline import stage_specs

    _setup_logging()
    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    try:
        p = load_params(params)
    except ConfigError as err:
        _fail(str(err))
    runs = {s.name for s in stage_specs(p)}  # with data.source=files there is no collect or eval
    chosen = [s for s in chosen if s in runs]
    summary, t0 = [], time.perf_counter()
    for stage in chosen:
        try:
            result = run_stage(stage, params)
        except (ConfigError, DataError, FileNotFoundError) as err:
            _fail(f"stage {stage}: {err}")
        summary.append((stage, result["timings_s"]["total"], result["metrics"]))
    typer.echo("\nstage       seconds  key metrics")
    for stage, secs, m in summary:
        keys = [k for k in ("heldout_ppl", "val_loss", "likert_base", "likert_sft", "labeler_agreement",
                            "labeler_agreement_heldout", "val_accuracy", "heldout_labeler_accuracy",
                            "first_score", "final_score", "final_kl") if k in m]
        typer.echo(f"{stage:10s} {secs:8.1f}  " + "  ".join(f"{k}={m[k]}" for k in keys))
    typer.echo(f"total      {time.perf_counter() - t0:8.1f}")
    if "eval" in chosen:
        typer.echo(eval_table(json.loads((p.stage_dir("eval") / "metrics.json").read_text())))


def eval_table(metrics: dict) -> str:
    """The evaluation as a terminal table: one row per model."""
    head = f"\n{'model':13s} {'win_rate vs SFT [95% CI]':26s} {'likert':>6s} {'invented':>8s} {'disallowed':>10s} " \
           f"{'align_tax':>9s} {'rm_score':>8s} {'kl_to_sft':>9s}"
    rows = [head]
    for name, m in metrics["models"].items():
        w = m.get("vs_sft")
        win = f"{w['win_rate']:.3f} [{w['ci95'][0]:.3f}, {w['ci95'][1]:.3f}]" if w else "(reference)"

        def f(x, spec=".3f"):
            return format(x, spec) if x is not None else "-"

        rows.append(f"{name:13s} {win:26s} {f(m['likert'], '.2f'):>6s} {f(m['invented_answer_rate']):>8s} "
                    f"{f(m['disallowed_output_rate']):>10s} {f(m['alignment_tax'], '+.3f'):>9s} {f(m['rm_score'], '+.3f'):>8s} "
                    f"{f(m['kl_to_sft'], '.2f'):>9s}")
    rows.append(f"(held-out labeler, {metrics['prompts']} prompts, T={metrics['temperature']}; RM accuracy "
                f"{metrics['rm_val_accuracy']}, labeler agreement {metrics['labeler_agreement']})")
    return "\n".join(rows)


if __name__ == "__main__":
    app()
