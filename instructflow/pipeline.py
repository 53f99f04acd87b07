"""The pipeline's stages as data: what each one reads, which params sections it
depends on, and what it writes. Prefect (tasks/) builds its cache keys from
this table and DVC's dvc.yaml is generated from it, so the two can never
disagree about a stage's inputs.

    stage_specs(params)      -> the stages, in order, for this configuration
    stage_waves(specs)       -> the same, cut into waves of stages that may run at the same time
    stage_key(params, name)  -> hash of the stage's inputs, params sections and code
    outputs_current(...)     -> are the stage's outputs on disk the ones that key made?
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .config import Params
from .io import content_hash

PACKAGE_DIR = Path(__file__).resolve().parent

BUILTIN_DATASETS = ("pretrain_train", "pretrain_heldout", "sft_train", "sft_val",
                    "rm_prompts_train", "rm_prompts_val", "ppo_prompts", "eval_prompts")
FILES_DATASETS = ("comparisons_train", "comparisons_val", "sft_train", "sft_val",
                  "ppo_prompts", "pretrain_train", "pretrain_heldout")


@dataclass(frozen=True)
class StageSpec:
    """One stage. Paths are relative to the working directory (the repo root)."""

    name: str
    cmd: str                                   # the CLI command that runs it (dvc.yaml's cmd)
    sections: tuple[str, ...]                  # params.yaml sections it reads
    deps: tuple[str, ...]                      # files and folders it reads
    outs: tuple[str, ...]                      # what it produces (DVC caches these)
    metrics: tuple[str, ...] = ()              # small JSON files (not cached by DVC)
    plots: tuple[str, ...] = ()                # JSONL logs and images
    result: str = field(default="")            # its result.json


def stage_specs(params: Params) -> list[StageSpec]:
    """Every stage this configuration runs, in order."""
    a = params.project.artifacts_dir.rstrip("/")
    builtin = params.data.source == "builtin"

    def d(*names: str) -> tuple[str, ...]:
        return tuple(f"{a}/data/{n}.jsonl" for n in names)

    datasets = BUILTIN_DATASETS if builtin else tuple(
        n for n in FILES_DATASETS if params.data.comparisons or not n.startswith("comparisons"))
    inputs = tuple(getattr(params.data, k) for k in ("demonstrations", "comparisons", "pretrain_text") if getattr(params.data, k))
    trains_base = builtin_model(params) or params.pretrain.train_external
    reward_inputs = ((f"{a}/collect/comparisons_train.jsonl", f"{a}/collect/comparisons_val.jsonl",
                      f"{a}/collect/comparisons_val_heldout.jsonl") if builtin
                     else d("comparisons_train", "comparisons_val"))
    if params.reward.comparisons_train:
        reward_inputs = (params.reward.comparisons_train, params.reward.comparisons_val or reward_inputs[1])
    reward_init = params.reward.init_from or f"{a}/sft/model"

    specs = [
        StageSpec("data", "instructflow data build", ("project", "data"), inputs, d(*datasets)),
        StageSpec("validate", "instructflow validate", ("validate",), d(*datasets), (f"{a}/validate/report.json",)),
        StageSpec("pretrain", "instructflow pretrain", ("project", "model", "pretrain"),
                  (*d("pretrain_train", "pretrain_heldout", "sft_train"), f"{a}/validate/report.json"),
                  (f"{a}/pretrain/model",), plots=(f"{a}/pretrain/train_log.jsonl",) if trains_base else ()),
        StageSpec("sft", "instructflow sft", ("project", "model", "data", "sft"),
                  (f"{a}/pretrain/model", *d("sft_train", "sft_val")), (f"{a}/sft/model",),
                  plots=(f"{a}/sft/train_log.jsonl",)),
    ]
    if builtin:
        specs.append(StageSpec("collect", "instructflow collect", ("project", "model", "data", "collect"),
                               (f"{a}/sft/model", *d("rm_prompts_train", "rm_prompts_val")),
                               (f"{a}/collect/comparisons_train.jsonl", f"{a}/collect/comparisons_val.jsonl",
                                f"{a}/collect/comparisons_val_heldout.jsonl", f"{a}/collect/agreement.json")))
    specs += [
        StageSpec("reward", "instructflow reward", ("project", "model", "data", "reward"),
                  (reward_init, *reward_inputs, *d("sft_train")), (f"{a}/reward/model",),
                  plots=(f"{a}/reward/train_log.jsonl",)),
        StageSpec("export", "instructflow export", ("project", "export"), (f"{a}/reward/model",), (f"{a}/export/rm",)),
        StageSpec("ppo", "instructflow ppo", ("project", "model", "pretrain", "ppo"),
                  (f"{a}/sft/model", f"{a}/reward/model", *d("ppo_prompts")),
                  (f"{a}/ppo/model", f"{a}/ppo/value_model"), plots=(f"{a}/ppo/train_log.jsonl",)),
        StageSpec("ppo_ptx", "instructflow ppo-ptx", ("project", "model", "pretrain", "ppo"),
                  (f"{a}/sft/model", f"{a}/reward/model", *d("ppo_prompts", "pretrain_train")),
                  (f"{a}/ppo_ptx/model", f"{a}/ppo_ptx/value_model"), plots=(f"{a}/ppo_ptx/train_log.jsonl",)),
    ]
    if builtin:
        specs.append(StageSpec(
            "eval", "instructflow eval", ("project", "model", "data", "pretrain", "reward", "eval"),
            (*d("eval_prompts", "pretrain_heldout", "sft_train"), f"{a}/pretrain/model", f"{a}/sft/model",
             f"{a}/reward/model", f"{a}/ppo/model", f"{a}/ppo_ptx/model", f"{a}/ppo/train_log.jsonl",
             f"{a}/ppo_ptx/train_log.jsonl", f"{a}/reward/result.json", f"{a}/collect/agreement.json"),
            (f"{a}/eval/samples.md",), metrics=(f"{a}/eval/metrics.json",),
            plots=(f"{a}/eval/winrate.png", f"{a}/eval/ppo_curves.png")))
    return [StageSpec(s.name, s.cmd, s.sections, s.deps, s.outs, (*s.metrics, f"{a}/{s.name}/result.json"), s.plots,
                      f"{a}/{s.name}/result.json") for s in specs]


def stage_waves(specs: list[StageSpec]) -> list[list[StageSpec]]:
    """The stages, in order, cut into waves whose stages may run at the same time:
    a stage joins the wave before it unless it reads something a stage of that
    wave writes. On the built-in default: export, ppo and ppo_ptx form one wave."""
    waves: list[list[StageSpec]] = []
    for s in specs:
        if waves and not any(reads_from(s, t) for t in waves[-1]):
            waves[-1].append(s)
        else:
            waves.append([s])
    return waves


def reads_from(s: StageSpec, t: StageSpec) -> bool:
    """Whether stage s reads a path that stage t writes (the same path, or one inside the other)."""
    def nested(a: str, b: str) -> bool:
        pa, pb = Path(a), Path(b)
        return pa == pb or pb in pa.parents or pa in pb.parents

    return any(nested(d, w) for d in s.deps for w in (*t.outs, *t.metrics, *t.plots))


def builtin_model(params: Params) -> bool:
    from .modeling import BUILTIN

    return params.model.name_or_path == BUILTIN


def spec(params: Params, name: str) -> StageSpec:
    for s in stage_specs(params):
        if s.name == name:
            return s
    raise KeyError(f"stage '{name}' does not run with data.source={params.data.source}")


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 over the package's Python sources: any code change is a new version."""
    h = hashlib.sha256()
    for f in sorted(PACKAGE_DIR.rglob("*.py")):
        h.update(f"{f.relative_to(PACKAGE_DIR).as_posix()}\0".encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def section_values(params: Params, sections: tuple[str, ...]) -> dict:
    dumped = params.model_dump(mode="json", by_alias=True)
    return {s: dumped[s] for s in sections}


def stage_key(params: Params, name: str) -> str:
    """The run key of a stage: sha256 of its name, params sections, the content
    of every input, and the code version. Equal keys mean equal outputs."""
    s = spec(params, name)
    record = {
        "stage": name,
        "params": section_values(params, s.sections),
        "inputs": {dep: content_hash(dep) if Path(dep).exists() else None for dep in s.deps},
        "code": code_version(),
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def outputs_current(params: Params, name: str, key: str) -> bool:
    """True when the stage's outputs on disk were produced under `key` and are
    unchanged since (their hashes match the result.json that recorded them)."""
    s = spec(params, name)
    path = Path(s.result)
    if not path.exists():
        return False
    try:
        result = json.loads(path.read_text())
    except json.JSONDecodeError:
        return False
    if result.get("run_key") != key:
        return False
    for out in result.get("outputs", {}).values():
        p = Path(out["path"])
        if not p.exists() or content_hash(p) != out["sha256"]:
            return False
    return all(Path(o).exists() for o in s.outs)


def dvc_yaml(params: Params, params_file: str = "params.yaml", present: set[str] | None = None) -> dict:
    """dvc.yaml's content for this configuration (`instructflow dvc-yaml` writes it).

    DVC tracks the params sections a stage reads; a section left out of the
    file (its defaults come from the code, itself a dependency) is not listed,
    since DVC refuses a params dependency that is not in the file."""
    stages = {}
    for s in stage_specs(params):
        sections = [x for x in s.sections if present is None or x in present]
        entry: dict = {"cmd": f"{s.cmd} --params {params_file}"}
        deps = [*s.deps, "instructflow"]
        entry["deps"] = deps
        entry["params"] = sections if params_file == "params.yaml" else [{params_file: sections}]
        entry["outs"] = list(s.outs)
        # metrics and plots are cached too: artifacts/ is not in git, so `dvc pull` must bring them
        entry["metrics"] = list(s.metrics)
        if s.plots:
            entry["plots"] = list(s.plots)
        stages[s.name] = entry
    return {"stages": stages}
