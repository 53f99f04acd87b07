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

from .config import ConfigError, load_params, parse_params
from .io import ArtifactsBusy, DataError, DiskFull, exclusive
from .labeling.projects import LabelingPending
from .registry import STAGES, pipeline_specs, resolve, stage_specs
from .report import format_table, key_metrics
from .runner import run_stage

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
data_app = typer.Typer(no_args_is_help=True, help="Datasets: build the built-in suite, import public layouts.")
app.add_typer(data_app, name="data")
model_app = typer.Typer(no_args_is_help=True, help="Models: bring pretrained weights into a plain Hugging Face folder.")
app.add_typer(model_app, name="model")
label_app = typer.Typer(no_args_is_help=True, help="People in Label Studio: push ranking or demonstration tasks, see "
                        "how far they are, pull what they did (the labeling section of params.yaml).")
app.add_typer(label_app, name="label")
champion_app = typer.Typer(no_args_is_help=True, help="The champion: the promoted version applications are served "
                           "(rounds.store: versions/ and the champion pointer).")
app.add_typer(champion_app, name="champion")

ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="The params file.")]


def _setup_logging() -> None:
    """instructflow's own lines at $INSTRUCTFLOW_LOG (INFO); every other library's at WARNING unless
    $INSTRUCTFLOW_LIBRARY_LOG asks for more (onnxscript alone logs some 190 INFO lines per export)."""
    logging.basicConfig(level=os.environ.get("INSTRUCTFLOW_LIBRARY_LOG", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("instructflow").setLevel(os.environ.get("INSTRUCTFLOW_LOG", "INFO"))


# What a configuration, a file or a model can get wrong: one clear line, no traceback
# (INSTRUCTFLOW_LOG=DEBUG logs it too).
USER_ERRORS = (ConfigError, DataError, FileNotFoundError, ValueError, ArtifactsBusy, DiskFull)


def _fail(msg: str) -> None:
    logging.getLogger("instructflow").debug("the error in full", exc_info=True)
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _load(params_path: Path, sets: list[str] | None = None, overrides: dict | None = None):
    """The params file, with `key.path=value` overrides (values read as YAML) and `overrides` (dotted keys),
    validated together."""
    import yaml

    given = dict(overrides or {})
    for item in sets or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            _fail(f"--set {item!r}: expected KEY=VALUE, e.g. --set sft.lora.r=16")
        try:
            given[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            _fail(f"--set {item!r}: the value is not valid YAML: {err}")
    try:
        return load_params(params_path, given)
    except ConfigError as err:
        _fail(str(err))


def _run(name: str, params_path: Path) -> dict:
    """Run one stage and print its metrics (and its table, when the registry names one)."""
    _setup_logging()
    params = _load(params_path)
    try:
        result = run_stage(name, params)
    except LabelingPending as wait:
        typer.secho(f"stage {name}: {wait}", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(LabelingPending.EXIT_CODE) from None
    except USER_ERRORS as err:
        _fail(f"stage {name}: {err}")
    if not result.get("main_process", True):
        return result
    typer.echo(json.dumps({"stage": name, "metrics": result["metrics"], "seconds": result["timings_s"]["total"]}, indent=2))
    if STAGES[name].table:
        typer.echo(resolve(STAGES[name].table)(result["metrics"]))
    return result


def _stage_command(name: str):
    def command(params: ParamsOpt = Path("params.yaml")) -> None:
        _run(name, params)
    return command


# One command per stage, from the registry: `instructflow sft`, `instructflow ppo-ptx`, `instructflow data build`...
_GROUPS = {(): app, ("data",): data_app}
for _stage in STAGES.values():
    _GROUPS[_stage.command[:-1]].command(_stage.command[-1], help=_stage.help)(_stage_command(_stage.name))


@data_app.command("import")
def data_import(
    layout: Annotated[str, typer.Argument(help="hh-rlhf | alpaca | trl-preference")],
    src: Annotated[str, typer.Argument(help="A file (.jsonl, .jsonl.gz or .json), or a Hugging Face dataset id "
                                            "(Anthropic/hh-rlhf; needs network) or a local dataset folder")],
    out: Annotated[Path, typer.Argument(help="Output JSONL in instructflow's format")],
    split: Annotated[str, typer.Option(help="With a dataset id: the split to read.")] = "train",
    data_dir: Annotated[str | None, typer.Option(help="With a dataset id: its subfolder (HH-RLHF: harmless-base, "
                                                      "helpful-base, ...).")] = None,
) -> None:
    """Convert a public dataset layout; skipped rows are reported in OUT.report.json."""
    from .data.importers import IMPORTERS, source
    from .io import write_json, write_jsonl

    if layout not in IMPORTERS:
        _fail(f"unknown layout '{layout}'; choose one of {sorted(IMPORTERS)}")
    try:
        records, report = IMPORTERS[layout](source(src, split, data_dir))
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
    quarantine: Annotated[Path | None, typer.Option(help="Folder for the failing rows, <name>.quarantine.jsonl "
                                                         "(default: beside the file).")] = None,
    report: Annotated[Path | None, typer.Option(help="Also write the report as JSON here.")] = None,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Check one dataset against its Great Expectations suite; exit 1 with a report naming the rows when it fails."""
    from .config import ValidateConfig
    from .data.validate import KINDS, validate_file
    from .io import write_json

    if kind not in KINDS:
        _fail(f"unknown kind '{kind}'; choose one of {', '.join(KINDS)}")
    try:
        cfg = load_params(params).validate_ if params.exists() else ValidateConfig()
        result = validate_file(path, kind, cfg, quarantine or path.parent)
    except (ConfigError, DataError) as err:
        _fail(str(err))
    if report:
        write_json(report, result.as_dict())
    typer.echo(result.summary(cfg.max_failed_rows_shown), err=not result.ok)
    if not result.ok:
        typer.echo(f"{len(result.bad_lines)} of {result.rows} rows failed; they are in {result.quarantine}", err=True)
        raise typer.Exit(1)


@model_app.command("import-gguf")
def model_import_gguf(
    src: Annotated[Path, typer.Argument(help="A .gguf file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf).")],
    out: Annotated[Path, typer.Argument(help="The folder to write (safetensors, config, tokenizer).")],
) -> None:
    """Dequantize a GGUF checkpoint into a safetensors folder that transformers loads as it is."""
    from .lm.modeling import import_gguf

    _setup_logging()
    try:
        summary = import_gguf(src, out)
    except (FileNotFoundError, ValueError, OSError) as err:
        _fail(f"cannot import {src}: {err}")
    typer.echo(json.dumps(summary, indent=2))


KindOpt = Annotated[str, typer.Option(help="ranking (rank K answers per prompt) | demonstration (write one)")]
TitleOpt = Annotated[str, typer.Option("--project", help="The Label Studio project's title.")]


def _labeling(fn, *args):
    """A labeling call; Label Studio down, refusing or gone, a bad file or setting: one line."""
    from .labeling.client import LabelStudioError

    try:
        return fn(*args)
    except (LabelStudioError, ValueError, FileNotFoundError, DataError) as err:
        _fail(str(err))


def _kind(kind: str) -> str:
    if kind not in ("ranking", "demonstration"):
        _fail(f"--kind {kind!r}: ranking or demonstration")
    return kind


@label_app.command("push")
def label_push(
    project: TitleOpt, kind: KindOpt = "ranking",
    prompts: Annotated[Path | None, typer.Option(help="A prompts JSONL (default: fresh prompts of the built-in "
                                                      "suite).")] = None,
    count: Annotated[int, typer.Option(min=1, help="Prompts to push (the first N of the file).")] = 20,
    model: Annotated[str, typer.Option(help="Who answers, for ranking: champion, a stage (sft, ppo_ptx...) or a model "
                                            "folder.")] = "champion",
    seed: Annotated[int, typer.Option(help="Sampling and the responses' display order.")] = 0,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Push ranking tasks (K answers per prompt from a model) or demonstration tasks into a project it creates or reuses."""
    from .labeling import commands

    _setup_logging()
    config = _load(params)
    chosen = _labeling(commands.prompts_to_label, config, prompts, count, seed)
    out = _labeling(commands.push, config, project, _kind(kind), chosen, model, seed)
    typer.echo(f"{out['pushed']} new task(s), {out['already_there']} already there, in project {out['project']} "
               f"'{project}': {out['url']}/projects/{out['project']}")


@label_app.command("status")
def label_status(project: TitleOpt, kind: KindOpt = "ranking", params: ParamsOpt = Path("params.yaml")) -> None:
    """Tasks done in a project, and annotations per labeler."""
    from .labeling import commands

    typer.echo(json.dumps(_labeling(commands.status, _load(params), project, _kind(kind)), indent=2))


@label_app.command("pull")
def label_pull(
    project: TitleOpt, out: Annotated[Path, typer.Option(help="The JSONL to write (comparisons or demonstrations).")],
    kind: KindOpt = "ranking", params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Finished annotations as comparisons or demonstrations (with labeler ids), checked by Great Expectations;
    what was left out and why, agreement and each labeler's known-answer accuracy in OUT.report.json."""
    from .labeling import commands

    _setup_logging()
    result, checked = _labeling(commands.pull, _load(params), project, _kind(kind), out)
    typer.echo(f"{len(result.comparisons) + len(result.demonstrations)} record(s) to {out} ({result.new_annotations} new "
               f"annotation(s)); {len(result.problems)} left out, listed in {out.with_suffix('.report.json')}")
    for problem in result.problems[:10]:
        typer.echo(f"  task {problem.task}, annotation {problem.annotation}: {problem.reason}")
    if not checked.ok:
        typer.echo(checked.summary(), err=True)
        raise typer.Exit(1)


@label_app.command("simulate")
def label_simulate(
    project: TitleOpt, seed: Annotated[int, typer.Option(help="The seed of the simulated labelers' draws (a round's: "
                                                              "project.seed + 1000 x round).")] = 0,
    extra: Annotated[int, typer.Option(min=0, help="More labelers per task (agreement).")] = 0,
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """The built-in suite's labelers rank a project's open tasks as people would, each with an account of their own."""
    from .labeling import commands

    _setup_logging()
    done = _labeling(commands.simulate, _load(params), project, seed, extra)
    typer.echo(json.dumps({"annotations": done}, indent=2))


@app.command("dvc-yaml")
def dvc_yaml_cmd(
    params: ParamsOpt = Path("params.yaml"),
    group: Annotated[str, typer.Option(help="pipeline | methods | rounds: the group of stages.")] = "pipeline",
    out: Annotated[Path | None, typer.Option(help="Where to write it (default: dvc.yaml for params.yaml's "
                                                  "pipeline, else pipelines/<name>/dvc.yaml).")] = None,
) -> None:
    """Write a dvc.yaml from the stage registry (instructflow/registry.py) for this params file and group."""
    from .dvcfile import dvc_yaml_text, pipeline_file
    from .io import atomic_path

    if group not in {s.group for s in STAGES.values()}:
        _fail(f"unknown group '{group}'; the groups are {', '.join(sorted({s.group for s in STAGES.values()}))}")
    config = _load(params)
    out = out or Path(pipeline_file(params.as_posix(), group))
    with atomic_path(out) as tmp:
        tmp.write_text(dvc_yaml_text(config, params, group))
    typer.echo(f"wrote {out}")


@app.command()
def plan(
    params: ParamsOpt = Path("params.yaml"),
    devices: Annotated[int, typer.Option(min=1, help="Processes (devices) the stage runs on.")] = 1,
    device_gb: Annotated[float, typer.Option(help="Memory per device, GB.")] = 80.0,
    model: Annotated[str, typer.Option(help="Another model: a folder, a hub id or one of "
                                            "smollm2-135m, llama-3.2-1b, llama-3.1-8b, llama-3.1-70b.")] = "",
    table: Annotated[bool, typer.Option(help="The docs' table instead: 135M, 1B, 8B and 70B on 1, --devices and 2 x "
                                             "--devices devices of --device-gb GB.")] = False,
) -> None:
    """Predict each training stage's memory per device under DDP, FSDP2, FSDP2 + LoRA and FSDP2 with CPU offload (instructflow/lm/memory.py)."""
    from .lm.memory import plan_rows, shape_of_params, workloads

    config = _load(params)
    try:
        if table:
            typer.echo(_plan_table(config, devices, device_gb))
            return
        shape = shape_of_params(config, model)
    except (OSError, ValueError) as err:
        _fail(f"plan: {err}")
    loads = workloads(config, devices)
    typer.echo(f"{shape.params / 1e9:.3f}B parameters, {shape.layers} layers; {devices} device(s) of {device_gb:g} GB; "
               + "; ".join(f"{k}: {w.batch} x {w.seq_len} tokens" for k, w in loads.items()))
    typer.echo(format_table(["stage", "strategy", "GB per device", "fits"], plan_rows(shape, loads, devices, device_gb)))
    typer.echo("Rows at max_len; the runtime (CUDA context, or the interpreter on CPU) comes on top.")


def _plan_table(config, devices: int, device_gb: float) -> str:
    """Every preset model on 1, `devices` and 2 x `devices` devices of `device_gb` GB: each model with the
    workload this params file gives it (a pretrained model's defaults applied, as a run would)."""
    from .lm.memory import PRESETS, STRATEGIES, Shape, predict, workloads

    counts = sorted({1, devices, 2 * devices})
    head = ["model", "stage", "strategy", *[f"{n}x{device_gb:g}GB (GB/device)" for n in counts]]
    rows = []
    for name in PRESETS:
        shape, own = Shape.preset(name), model_params(config, name)
        for stage in ("sft", "reward", "ppo"):
            for strategy in STRATEGIES:
                cells = []
                for n in counts:
                    gb = predict(shape, workloads(own, n)[stage], strategy, n)["total"] / 1024
                    cells.append(f"{gb:,.1f}" + ("" if gb <= device_gb else " (no)"))
                rows.append([name, stage, strategy, *cells])
    return format_table(head, rows, markdown=True)


def model_params(config, model: str):
    """The params a run of pretrained `model` would have from this file: a workload file for a pretrained model
    (configs/scale.yaml) keeps its stages' settings, with a pretrained model's defaults
    (configs/presets/pretrained.yaml) for the keys it leaves out; a file for the built-in 1M model, whose
    batches fit that model only, keeps its precision, checkpointing and data (its K) and takes the defaults."""
    from .lm.modeling import BUILTIN

    builtin = config.model.name_or_path == BUILTIN
    raw = config.model_dump(mode="json", by_alias=True, exclude_unset=True,
                            include={"model", "data"} if builtin else None)
    raw["model"] = {k: v for k, v in raw.get("model", {}).items() if k != "tiny"} | {"name_or_path": model}
    return parse_params(raw, f"params for {model}")


@app.command()
def serve(
    model: Annotated[str, typer.Option(help="Export folder (artifacts/export) or s3://bucket/prefix; several, "
                                            "comma-separated, or artifacts/reward_ensemble (with serve.backend: torch), "
                                            "serve an ensemble: its mean, and each item's spread. <store>/champion "
                                            "(s3://bucket/prefix/champion or a local store's) follows the champion "
                                            "pointer, swapping versions while serving.")] = "artifacts/export",
    params: Annotated[Path | None, typer.Option("--params", "-p", help="The params file (default: params.yaml when "
                                                "there is one, else the defaults); a file named here must exist.")] = None,
    host: Annotated[str | None, typer.Option(help="Overrides serve.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Overrides serve.port (validated as in the params file).")] = None,
    insecure_no_auth: Annotated[bool, typer.Option("--insecure-no-auth", help="Serve without API keys: anyone who "
                                                   "reaches the port can score. Without it, no keys is an error.")] = False,
) -> None:
    """Serve the exported RM over HTTP (POST /v1/score, /v1/compare; /healthz, /readyz, /metrics, /docs)."""
    from .serving.endpoint import load_api_keys
    from .serving.endpoint import serve as run_server

    _setup_logging()
    overrides = {f"serve.{k}": v for k, v in {"host": host, "port": port}.items() if v is not None}
    if params is None and not Path("params.yaml").exists():
        cfg = _checked(lambda: parse_params(_dotted(overrides), "command line")).serve
    else:
        cfg = _load(params or Path("params.yaml"), overrides=overrides).serve
    keys = _checked(lambda: load_api_keys(cfg))
    if not keys and not insecure_no_auth:
        _fail(f"no API keys: set {cfg.api_keys_env} (comma-separated) or serve.api_keys_file, or pass "
              "--insecure-no-auth to serve without authentication")
    if not keys:
        logging.getLogger("instructflow").warning(
            "serve: --insecure-no-auth: serving WITHOUT authentication on %s:%d; anyone who reaches it can score",
            cfg.host, cfg.port)
    try:
        run_server(model, cfg)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        _fail(f"not serving {model}: {err}")
    except Exception as err:  # noqa: BLE001 - the store unreachable after the retries: one line
        if not _storage_error(err):
            raise
        _fail(f"not serving {model}: {err}")


def _checked(fn):
    """fn(), with a configuration or file error as one line."""
    try:
        return fn()
    except (ValueError, OSError) as err:
        _fail(str(err))


def _dotted(overrides: dict) -> dict:
    """{"serve.port": 1} -> {"serve": {"port": 1}}."""
    out: dict = {}
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


@app.command()
def publish(
    uri: Annotated[str, typer.Argument(help="s3://bucket/prefix")],
    folder: Annotated[Path, typer.Option(help="The export folder.")] = Path("artifacts/export/rm"),
) -> None:
    """Upload the exported RM to object storage, manifest last (endpoint/credentials from AWS_* variables)."""
    from .serving.storage import publish_export

    _setup_logging()
    m = _storage_call(lambda: publish_export(folder, uri), uri, " (nothing is published there until every file is up: rerun to finish)")
    typer.echo(f"published {m['model_version']} ({len(m['files'])} files + manifest) to {uri}")


@app.command("methods-summary")
def methods_summary(params: ParamsOpt = Path("params.yaml")) -> None:
    """Pool the methods' figures over the seeds that have run (`make methods` does this itself):
    <artifacts_dir>/methods/summary.md, summary.json, figure1.png, overoptimization.png."""
    from .replicates import replicate, summarize, summary_markdown, write_summary

    config = _load(params)
    try:
        s = summarize([replicate(config, i) for i in range(config.methods.seeds)])
    except FileNotFoundError as err:
        _fail(f"{err}; run `make methods` (python -m flows.methods --params {params})")
    out = write_summary(config, s)
    typer.echo(summary_markdown(s) + f"\nwritten to {out}")


StoreOpt = Annotated[str, typer.Option(help="The store (default: rounds.store of the params file).")]


def _store(store: str, params: Path) -> str:
    return store or _load(params).rounds.store


def _storage_call(fn, what: str, hint: str = ""):
    """fn(); a bad name or an unreachable store after the retries is one line, not a traceback."""
    try:
        return fn()
    except ValueError as err:
        _fail(str(err))
    except Exception as err:  # noqa: BLE001 - storage errors (botocore's) after the retries: one line
        if not _storage_error(err):
            raise
        _fail(f"{what}: {err}{hint}")


def _storage_error(err: Exception) -> bool:
    return type(err).__module__.startswith(("botocore", "boto3", "s3transfer"))


@champion_app.command("show")
def champion_show(store: StoreOpt = "", params: ParamsOpt = Path("params.yaml")) -> None:
    """Print the champion pointer and every published version."""
    from .rounds.champion import list_versions, read_pointer
    from .serving.storage import open_store

    uri = _store(store, params)
    st = _storage_call(lambda: open_store(uri), uri)
    pointer = _storage_call(lambda: read_pointer(st), uri)
    typer.echo(json.dumps({"store": uri, "champion": pointer, "versions": _storage_call(lambda: list_versions(st), uri)},
                          indent=2))


@champion_app.command("rollback")
def champion_rollback(
    to: Annotated[str, typer.Option(help="The version to point at (default: the one before the champion).")] = "",
    store: StoreOpt = "", params: ParamsOpt = Path("params.yaml"),
) -> None:
    """Move the champion pointer back; servers following it swap at their next check (or POST /admin/reload)."""
    from .rounds.champion import rollback

    uri = _store(store, params)
    pointer = _storage_call(lambda: rollback(uri, to or None), uri)
    typer.echo(f"champion is now {pointer['version']} ({pointer['reason']}) in {uri}")


@champion_app.command("compare")
def champion_compare(
    a: Annotated[str, typer.Argument(help="A version (v3), or sft.")],
    b: Annotated[str, typer.Argument(help="The version it is compared with (v1), or sft.")],
    params: ParamsOpt = Path("params.yaml"),
) -> None:
    """A's win rate over B by the judge on the gate's prompts (e.g. round 3's champion against round 1's)."""
    from .rounds.stages import compare_versions

    _setup_logging()
    config = _load(params)
    out = _storage_call(lambda: compare_versions(config, a, b, config.stage_dir("champion-compare")), config.rounds.store)
    typer.echo(json.dumps(out, indent=2))


@app.command("rounds-report")
def rounds_report(params: ParamsOpt = Path("params.yaml")) -> None:
    """Print every finished round (rounds.ledger): comparisons, RM accuracy, the gate's win rates, decisions."""
    from .rounds.stages import ledger_markdown, read_ledger

    rows = read_ledger(_load(params))
    typer.echo(ledger_markdown(rows) if rows else "no round has finished yet (`make round`)")


@app.command()
def run(
    params: ParamsOpt = Path("params.yaml"),
    stages: Annotated[str, typer.Option(help="Comma-separated stages to run, in order (default: the pipeline's, "
                                              "as `make pipeline`; the methods' stages are named here or run by "
                                              "`make methods`).")] = "",
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override one setting, KEY=VALUE (repeatable): "
                                                   "--set sft.lora.r=16 --set project.artifacts_dir=artifacts/lora")] = None,
) -> None:
    """Run the stages in order in this process, without orchestration, and print a summary
    (`make pipeline` runs the same stages through Prefect: flows/pipeline.py)."""
    _setup_logging()
    config = _load(params, set_)
    runs = [s.name for s in stage_specs(config)]  # with data.source=files there is no collect or eval
    chosen = [s.strip() for s in stages.split(",") if s.strip()] or [s.name for s in pipeline_specs(config)]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        _fail(f"unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(STAGES)}")
    rows, tables, t0 = [], [], time.perf_counter()
    try:
        with exclusive(config.project.artifacts_dir, "instructflow run"):
            for name in [s for s in chosen if s in runs]:
                result = run_stage(name, config)
                rows.append([name, f"{result['timings_s']['total']:.1f}", key_metrics(result["metrics"], STAGES[name].headline)])
                if STAGES[name].table:
                    tables.append(resolve(STAGES[name].table)(result["metrics"]))
    except ArtifactsBusy as err:
        _fail(str(err))
    except LabelingPending as wait:
        typer.secho(f"stage {name}: {wait}", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(LabelingPending.EXIT_CODE) from None
    except USER_ERRORS as err:
        _fail(f"stage {name}: {err}")
    typer.echo("\n" + format_table(["stage", "seconds", "key metrics"], rows))
    typer.echo(f"total {time.perf_counter() - t0:.1f} s")
    for table in tables:
        typer.echo("\n" + table)


if __name__ == "__main__":
    app()
