"""The stage registry: every stage of the pipeline, declared once.

A stage is a function `run(params, run_key) -> result record` in one module of
this package, plus what it reads and writes. Everything else derives from the
declarations below:

    the `instructflow <stage>` commands     (cli.py loops over STAGES)
    run_stage(name, params)                 (the CLI, `instructflow run` and the Prefect tasks call it)
    stage_key(params, name)                 (Prefect's cache key; checkpoints carry it too)
    dvc_yaml(params)                        (dvc.yaml, written by `instructflow dvc-yaml`)
    stage_waves(specs)                      (which stages may run side by side)

A stage's key covers its params sections (runtime settings such as threads and
device excluded), the content of every input, and the code it runs: its
module and every package module that module imports, directly or not. An edit
to serve.py therefore changes no training stage's key.

To add a stage: declare it here with `@stage(...)`, write its module's
`run_<name>(params, run_key)`, and test it. Nothing else lists stages.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError, Params
from .io import content_hash

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name

# Settings that change how fast a stage runs, or which runs happen, never what a stage writes: not part of any key.
RUNTIME_FIELDS = {"project": ("threads", "device", "compact_host_memory"), "methods": ("enabled", "seeds")}

BUILTIN_DATASETS = ("pretrain_train", "pretrain_heldout", "sft_train", "sft_val",
                    "rm_prompts_train", "rm_prompts_val", "ppo_prompts", "eval_prompts")
FILES_DATASETS = ("comparisons_train", "comparisons_val", "sft_train", "sft_val",
                  "ppo_prompts", "pretrain_train", "pretrain_heldout")


# --------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class IO:
    """What one stage reads and writes, as paths relative to the working directory."""

    deps: tuple[str, ...] = ()                 # files and folders it reads
    outs: tuple[str, ...] = ()                 # what it produces (DVC caches these)
    metrics: tuple[str, ...] = ()              # small JSON files besides its result.json
    plots: tuple[str, ...] = ()                # JSONL logs and images
    persist: tuple[str, ...] = ()              # outs that grow run after run (DVC leaves them in place)


@dataclass(frozen=True)
class Stage:
    name: str
    fn: str                                    # "module:function" inside this package
    help: str                                  # one line, shown by `instructflow --help`
    sections: tuple[str, ...]                  # params.yaml sections it reads
    io: Callable[[Params, Paths], IO]          # its inputs and outputs for a configuration
    command: tuple[str, ...]                   # the CLI words that run it
    headline: tuple[str, ...] = ()             # metrics shown in run summaries
    table: str = ""                            # "module:function" rendering its metrics as a table
    when: Callable[[Params], bool] = lambda p: True  # whether it runs with this configuration
    requires: str = ""                         # what `when` asks of the configuration, in words
    group: str = "pipeline"                    # "pipeline": `make pipeline` runs it; "methods": `make methods` adds
                                               # it; "rounds": `make round` runs them (with what they read)

    @property
    def module(self) -> str:
        return f"{PACKAGE}.{self.fn.partition(':')[0]}"


STAGES: dict[str, Stage] = {}


def stage(name: str, fn: str, help: str, sections: tuple[str, ...], *, command: tuple[str, ...] = (),
          headline: tuple[str, ...] = (), table: str = "", when: Callable[[Params], bool] | None = None,
          requires: str = "", group: str = "pipeline"):
    """Declare a stage; the decorated function gives its IO. Declaration order is run order."""
    def register(io: Callable[[Params, Paths], IO]) -> Callable[[Params, Paths], IO]:
        STAGES[name] = Stage(name, fn, help, sections, io, command or (name.replace("_", "-"),), headline, table,
                             when or (lambda p: True), requires, group)
        return io
    return register


class Paths:
    """The file layout under project.artifacts_dir."""

    def __init__(self, params: Params):
        self.root = params.project.artifacts_dir.rstrip("/")

    def data(self, *names: str) -> tuple[str, ...]:
        return tuple(f"{self.root}/data/{n}.jsonl" for n in names)

    def __call__(self, stage: str, *rest: str) -> str:
        return "/".join((self.root, stage, *rest))

    def model(self, stage: str) -> str:
        return self(stage, "model")

    def log(self, stage: str) -> str:
        return self(stage, "train_log.jsonl")


def builtin_data(params: Params) -> bool:
    return params.data.source == "builtin"


def builtin_model(params: Params) -> bool:
    from .lm.modeling import BUILTIN

    return params.model.name_or_path == BUILTIN


def gold_judge(params: Params) -> bool:
    """Files mode with a share of the comparisons kept for a gold RM (data.gold_fraction)."""
    return not builtin_data(params) and bool(params.data.comparisons) and params.data.gold_fraction > 0


def datasets(params: Params) -> tuple[str, ...]:
    """The files the data stage writes under artifacts/data/."""
    if builtin_data(params):
        return BUILTIN_DATASETS
    names = tuple(n for n in FILES_DATASETS if params.data.comparisons or not n.startswith("comparisons"))
    return names + (("comparisons_gold", "eval_prompts") if gold_judge(params) else ())


def methods_on(params: Params) -> bool:
    """The method-comparison stages: methods.enabled, and comparisons to learn from."""
    return params.methods.enabled and (builtin_data(params) or bool(params.data.comparisons))


def judged(params: Params) -> bool:
    """A judge that trained nothing: the held-out labeler (built-in suite) or a gold RM."""
    return builtin_data(params) or gold_judge(params)


METHODS_NEED = "methods.enabled and comparisons (the built-in suite, or data.comparisons)"
JUDGE_NEEDS = ("a judge that trained nothing: data.source: builtin (the held-out labeler), or data.gold_fraction > 0 "
               "with data.comparisons (a gold RM)")


def comparison_files(params: Params, a: Paths) -> tuple[str, ...]:
    """(train, val[, the held-out labeler's val]) comparisons the RM reads."""
    if builtin_data(params):
        return tuple(a("collect", f"comparisons_{s}.jsonl") for s in ("train", "val", "val_heldout"))
    return a.data("comparisons_train", "comparisons_val")


@stage("data", "stages.data:run_data", "Write the datasets under artifacts/data/ (built-in suite or validated files).",
       ("project", "data"), command=("data", "build"), headline=("rows",))
def _data(p: Params, a: Paths) -> IO:
    given = tuple(getattr(p.data, k) for k in ("demonstrations", "comparisons", "pretrain_text") if getattr(p.data, k))
    return IO(deps=given, outs=a.data(*datasets(p)))


@stage("validate", "data.validate:run_validate", "Validate every dataset (Great Expectations); fails before any training.",
       ("validate",), headline=("rows",))
def _validate(p: Params, a: Paths) -> IO:
    return IO(deps=a.data(*datasets(p)), outs=(a("validate", "report.json"),))


@stage("pretrain", "stages.pretrain:run_pretrain", "Build (or load) the base model; artifacts/pretrain/model.",
       ("project", "model", "pretrain"), headline=("heldout_ppl",))
def _pretrain(p: Params, a: Paths) -> IO:
    trains = builtin_model(p) or p.pretrain.train_external
    return IO(deps=(*a.data("pretrain_train", "pretrain_heldout", "sft_train"), a("validate", "report.json")),
              outs=(a.model("pretrain"),), plots=(a.log("pretrain"),) if trains else ())


@stage("sft", "stages.sft:run_sft", "Supervised fine-tuning on demonstrations; artifacts/sft/model.",
       ("project", "model", "data", "sft"), headline=("val_loss", "likert_base", "likert_sft"))
def _sft(p: Params, a: Paths) -> IO:
    return IO(deps=(a.model("pretrain"), *a.data("sft_train", "sft_val")), outs=(a.model("sft"),), plots=(a.log("sft"),))


@stage("collect", "stages.collect:run_collect", "Sample K responses per prompt from SFT and have labelers rank them.",
       ("project", "model", "data", "collect"), headline=("labeler_agreement", "labeler_agreement_heldout"),
       when=builtin_data, requires="data.source: builtin (its simulated labelers rank the samples)")
def _collect(p: Params, a: Paths) -> IO:
    return IO(deps=(a.model("sft"), *a.data("rm_prompts_train", "rm_prompts_val")),
              outs=(*comparison_files(p, a), a("collect", "agreement.json")))


@stage("reward", "stages.reward:run_reward", "Train the reward model on K-wise rankings; artifacts/reward/model.",
       ("project", "model", "data", "reward"), headline=("val_accuracy", "heldout_labeler_accuracy"))
def _reward(p: Params, a: Paths) -> IO:
    return IO(deps=(a.model("sft"), *comparison_files(p, a), *a.data("sft_train")), outs=(a.model("reward"),),
              plots=(a.log("reward"),))


@stage("gold_reward", "stages.reward:run_gold_reward", "A second RM, on comparisons the proxy RM never sees: the evaluation's judge.",
       ("project", "model", "data", "reward"), headline=("val_accuracy",), when=gold_judge,
       requires="data.source: files with data.comparisons and data.gold_fraction > 0")
def _gold_reward(p: Params, a: Paths) -> IO:
    return IO(deps=(a.model("pretrain"), *a.data("comparisons_gold", "comparisons_val")), outs=(a.model("gold_reward"),),
              plots=(a.log("gold_reward"),))


@stage("export", "stages.export:run_export", "Export the RM to ONNX with a parity check against torch; artifacts/export/rm/.",
       ("project", "export"), headline=("parity_max_abs_diff",))
def _export(p: Params, a: Paths) -> IO:
    return IO(deps=(a.model("reward"),), outs=(a("export", "rm"),))


def ensemble_members(p: Params, a: Paths) -> tuple[str, ...]:
    """The models reward_ensemble trains (member 0 is the reward stage's RM)."""
    return tuple(a("reward_ensemble", f"member_{i}", "model") for i in range(1, p.ensemble.members))


def _ppo_io(name: str, extra: tuple[str, ...], ensemble: bool = False) -> Callable[[Params, Paths], IO]:
    def io(p: Params, a: Paths) -> IO:
        members = (*ensemble_members(p, a), a("reward_ensemble", "members.json")) if ensemble else ()
        snapshots = (a(name, "snapshots"),) if p.ppo.takes_snapshots else ()
        return IO(deps=(a.model("sft"), a.model("reward"), *members, *a.data("ppo_prompts", *extra)),
                  outs=(a.model(name), a(name, "value_model"), *snapshots), plots=(a.log(name),))
    return io


stage("ppo", "stages.ppo:run_ppo", "PPO against the RM with a per-token KL penalty to SFT (no pretraining mix); artifacts/ppo/.",
      ("project", "model", "pretrain", "ppo"), headline=("first_score", "final_score", "final_kl"))(_ppo_io("ppo", ()))
stage("ppo_ptx", "stages.ppo:run_ppo_ptx", "PPO-ptx: PPO plus ppo.ptx_coef x the pretraining log-likelihood; artifacts/ppo_ptx/.",
      ("project", "model", "pretrain", "ppo"), headline=("first_score", "final_score", "final_kl"))(
    _ppo_io("ppo_ptx", ("pretrain_train",)))


# ---- the methods beside PPO (`make methods`: flows/methods.py), before eval so that they share its waves
@stage("reward_ensemble", "stages.reward_ensemble:run_reward_ensemble", "Train the RM ensemble's other members (seeds + 1 .. k-1).",
       ("project", "model", "data", "reward", "ensemble"), headline=("val_accuracy", "mean_member_val_accuracy"),
       when=methods_on, requires=METHODS_NEED, group="methods")
def _reward_ensemble(p: Params, a: Paths) -> IO:
    return IO(deps=(a.model("sft"), a.model("reward"), *comparison_files(p, a), *a.data("sft_train")),
              outs=(*ensemble_members(p, a), a("reward_ensemble", "members.json")),
              plots=tuple(a("reward_ensemble", f"member_{i}", "train_log.jsonl") for i in range(1, p.ensemble.members)))


@stage("dpo", "stages.dpo:run_dpo", "DPO from SFT on the comparisons (Plackett-Luce over each ranking); artifacts/dpo/model.",
       ("project", "model", "data", "dpo"), headline=("val_loss", "val_accuracy"), when=methods_on, requires=METHODS_NEED,
       group="methods")
def _dpo(p: Params, a: Paths) -> IO:
    return IO(deps=(a.model("sft"), *comparison_files(p, a)[:2]), outs=(a.model("dpo"),), plots=(a.log("dpo"),))


@stage("best_of_n", "stages.best_of_n:run_best_of_n", "n SFT samples per evaluation prompt, scored by the RM (no training).",
       ("project", "model", "eval", "best_of_n"), headline=("rm_score_best_of_1", "kl_to_sft"),
       when=lambda p: methods_on(p) and judged(p), requires=f"{METHODS_NEED}, and {JUDGE_NEEDS}", group="methods")
def _best_of_n(p: Params, a: Paths) -> IO:
    return IO(deps=(a.model("sft"), a.model("reward"), *a.data("eval_prompts")), outs=(a("best_of_n", "samples.jsonl"),))


stage("ppo_ensemble", "stages.ppo:run_ppo_ensemble", "PPO against the RM ensemble's conservative reward; artifacts/ppo_ensemble/.",
      ("project", "model", "pretrain", "ppo", "ensemble"), headline=("first_score", "final_score", "final_kl"),
      when=methods_on, requires=METHODS_NEED, group="methods")(_ppo_io("ppo_ensemble", (), ensemble=True))


def _judge_deps(p: Params, a: Paths) -> tuple[str, ...]:
    return (a("collect", "agreement.json"),) if builtin_data(p) else (a.model("gold_reward"), a("gold_reward", "result.json"))


@stage("eval", "stages.evaluate:run_eval", "Judge base (few-shot), SFT, PPO and PPO-ptx on held-out prompts; artifacts/eval/.",
       ("project", "model", "data", "pretrain", "reward", "eval"), table="stages.evaluate:summary_table",
       when=judged, requires=JUDGE_NEEDS)
def _eval(p: Params, a: Paths) -> IO:
    models = tuple(a.model(s) for s in ("pretrain", "sft", "reward", "ppo", "ppo_ptx"))
    return IO(deps=(*a.data("eval_prompts", "pretrain_heldout", "sft_train"), *models, a.log("ppo"), a.log("ppo_ptx"),
                    a("reward", "result.json"), *_judge_deps(p, a)),
              outs=(a("eval", "samples.md"), a("eval", "answers.jsonl")), metrics=(a("eval", "metrics.json"),),
              plots=(a("eval", "winrate.png"), a("eval", "ppo_curves.png")))


@stage("compare", "stages.compare:run_compare", "Every method against SFT by the judge (Figure 1 with DPO, best-of-n, ensembles).",
       ("project", "model", "data", "pretrain", "reward", "eval", "best_of_n"), table="stages.evaluate:summary_table",
       when=lambda p: methods_on(p) and judged(p), requires=f"{METHODS_NEED}, and {JUDGE_NEEDS}", group="methods")
def _compare(p: Params, a: Paths) -> IO:
    return IO(deps=(*a.data("eval_prompts", "pretrain_heldout", "sft_train"), a.model("sft"), a.model("reward"),
                    a.model("dpo"), a.model("ppo_ensemble"), a("best_of_n", "samples.jsonl"), a("eval", "answers.jsonl"),
                    a("eval", "metrics.json"), a("reward", "result.json"), *_judge_deps(p, a)),
              metrics=(a("compare", "metrics.json"),), plots=(a("compare", "figure1.png"),))


@stage("overoptimization", "stages.compare:run_overoptimization",
       "Proxy reward and the judge against sqrt(KL) along PPO's snapshots, one RM and the ensemble (Gao et al. 2022).",
       ("project", "model", "data", "pretrain", "reward", "eval", "ppo", "ensemble", "best_of_n", "methods"),
       headline=("peak_kl_ppo", "peak_win_rate_ppo", "peak_kl_ppo_ensemble", "peak_win_rate_ppo_ensemble"),
       when=lambda p: methods_on(p) and judged(p) and p.ppo.takes_snapshots,
       requires=f"{METHODS_NEED}, 0 < ppo.snapshot_every < ppo.iterations, and {JUDGE_NEEDS}", group="methods")
def _overoptimization(p: Params, a: Paths) -> IO:
    runs = tuple(x for r in ("ppo", "ppo_ensemble") for x in (a.model(r), a(r, "snapshots")))
    return IO(deps=(*a.data("eval_prompts", "pretrain_heldout", "sft_train"), a.model("sft"), a.model("reward"),
                    *ensemble_members(p, a), *runs, a("best_of_n", "samples.jsonl"), *_judge_deps(p, a)),
              metrics=(a("overoptimization", "metrics.json"),), plots=(a("overoptimization", "overoptimization.png"),))


# ---- rounds of on-policy feedback (`make round`: flows/rounds.py, instructflow/rounds/stages.py)
def rounds_on(params: Params) -> bool:
    return params.rounds.enabled and builtin_data(params)


ROUNDS_NEED = "rounds.enabled and data.source: builtin (its training labelers rank the new answers)"


def _round_stage(name: str, help: str, sections: tuple[str, ...], headline: tuple[str, ...] = ()):
    return stage(name, f"rounds.stages:run_{name}", help, ("rounds", *sections), headline=headline, when=rounds_on,
                 requires=ROUNDS_NEED, group="rounds")


@_round_stage("round_champion", "The round's champion policy (round 1: SFT), fetched and verified from rounds.store.",
              ("project",), headline=("round", "champion"))
def _round_champion(p: Params, a: Paths) -> IO:
    return IO(deps=(p.rounds.ticket, a.model("sft")), outs=(a("round_champion", "policy"), a("round_champion", "champion.json")))


@_round_stage("round_feedback", "K answers per new prompt from the champion, ranked, validated, added to every round's data.",
              ("project", "model", "data", "collect", "validate"), headline=("comparisons_added", "sample_quality_heldout_labeler"))
def _round_feedback(p: Params, a: Paths) -> IO:
    folder = a("round_feedback", "feedback")
    return IO(deps=(p.rounds.ticket, a("round_champion", "policy"), *a.data("eval_prompts")), outs=(folder,), persist=(folder,))


@_round_stage("round_reward", "The RM retrained from SFT on collect's and every round's comparisons.",
              ("project", "model", "data", "reward"), headline=("val_accuracy", "heldout_labeler_accuracy"))
def _round_reward(p: Params, a: Paths) -> IO:
    return IO(deps=(a.model("sft"), *comparison_files(p, a), a("round_feedback", "feedback"), *a.data("sft_train")),
              outs=(a.model("round_reward"),), plots=(a.log("round_reward"),))


@_round_stage("round_ppo", "The challenger: PPO (or PPO-ptx) from the champion against the round's RM, KL to SFT.",
              ("project", "model", "pretrain", "ppo"), headline=("first_score", "final_score", "final_kl"))
def _round_ppo(p: Params, a: Paths) -> IO:
    ptx = a.data("pretrain_train") if p.rounds.algorithm == "ppo_ptx" else ()
    return IO(deps=(a.model("sft"), a("round_champion", "policy"), a.model("round_reward"), *a.data("ppo_prompts"), *ptx),
              outs=(a.model("round_ppo"), a("round_ppo", "value_model")), plots=(a.log("round_ppo"),))


@_round_stage("round_export", "The round's RM to ONNX, parity-checked (what a promotion publishes).", ("project", "export"),
              headline=("parity_max_abs_diff",))
def _round_export(p: Params, a: Paths) -> IO:
    return IO(deps=(a.model("round_reward"),), outs=(a("round_export", "rm"),))


@_round_stage("round_gate", "The judge compares challenger, champion and SFT: promote or keep, and why.",
              ("project", "model", "data", "eval"), headline=("promote", "reason"))
def _round_gate(p: Params, a: Paths) -> IO:
    return IO(deps=(p.rounds.ticket, a.model("sft"), a("round_champion", "policy"), a.model("round_ppo"),
                    *a.data("eval_prompts"), a("round_reward", "result.json"), a("round_feedback", "result.json"),
                    *_judge_deps(p, a)),
              metrics=(a("round_gate", "report.json"),))


# --------------------------------------------------------------------------- resolved for one configuration
@dataclass(frozen=True)
class StageSpec:
    """A stage with its paths resolved for one configuration."""

    stage: Stage
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    metrics: tuple[str, ...]                   # result.json last
    plots: tuple[str, ...]
    persist: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def result(self) -> str:
        return self.metrics[-1]


def stage_specs(params: Params) -> list[StageSpec]:
    """Every stage this configuration runs, in order."""
    a = Paths(params)
    specs = []
    for s in STAGES.values():
        if s.when(params):
            io = s.io(params, a)
            specs.append(StageSpec(s, io.deps, io.outs, (*io.metrics, a(s.name, "result.json")), io.plots, io.persist))
    return specs


def pipeline_specs(params: Params) -> list[StageSpec]:
    """The stages `make pipeline` and `instructflow run` run by default: the "pipeline" group."""
    return group_specs(params, "pipeline")


def group_specs(params: Params, *groups: str) -> list[StageSpec]:
    """The stages of these groups, in order."""
    return [s for s in stage_specs(params) if s.stage.group in groups]


def with_upstream(params: Params, targets: list[StageSpec]) -> list[StageSpec]:
    """`targets` and every stage they read from, directly or not, in run order (`make round` runs
    the round's stages with only the pipeline stages they need)."""
    specs = stage_specs(params)
    needed = {s.name for s in targets}
    for s in reversed(specs):  # a stage only reads stages declared before it
        if s.name in needed:
            needed |= {t.name for t in specs[: specs.index(s)] if reads_from(s, t)}
    return [s for s in specs if s.name in needed]


def spec(params: Params, name: str) -> StageSpec:
    for s in stage_specs(params):
        if s.name == name:
            return s
    if name in STAGES:
        raise ConfigError(f"stage '{name}' does not run with this configuration: it needs {STAGES[name].requires}")
    raise ConfigError(f"unknown stage '{name}'; the stages are {', '.join(STAGES)}")


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


def resolve(ref: str) -> Callable:
    """The function named by "module:function" inside this package (imported on demand: torch is slow to import)."""
    module, _, fn = ref.partition(":")
    return getattr(importlib.import_module(f"{PACKAGE}.{module}"), fn)


def run_stage(name: str, params: Params) -> dict:
    """Run one stage in this process; returns its result record."""
    s = spec(params, name)
    return resolve(s.stage.fn)(params, stage_key(params, name))


# --------------------------------------------------------------------------- what a stage's key covers
def _module_file(module: str) -> Path | None:
    """The source file of a module of this package, or None when it is not one."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        return None
    parts = module.split(".")[1:]
    candidates = [PACKAGE_DIR.joinpath(*parts, "__init__.py")]
    if parts:
        candidates.append(PACKAGE_DIR.joinpath(*parts[:-1], parts[-1] + ".py"))
    return next((f for f in candidates if f.is_file()), None)


def _imports(path: Path, module: str) -> set[str]:
    """The package modules a source file imports, anywhere in it (function-level imports too)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import world`
    return {m for m in found if _module_file(m) is not None}


@functools.cache
def code_files(module: str) -> tuple[Path, ...]:
    """The source files a module runs: itself, the package modules it imports (transitively)
    and the packages they sit in (their __init__ runs on import)."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        m = todo.pop()
        if m in seen or (f := _module_file(m)) is None:
            continue
        seen[m] = f
        todo.extend(_imports(f, m))
        todo.extend(".".join(m.split(".")[:i]) for i in range(1, m.count(".") + 1))
    return tuple(sorted(set(seen.values())))


@functools.cache
def code_version(module: str) -> str:
    """sha256 over the sources of `code_files(module)`."""
    h = hashlib.sha256()
    for f in code_files(module):
        h.update(f"{f.relative_to(PACKAGE_DIR).as_posix()}\0".encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def section_values(params: Params, sections: tuple[str, ...]) -> dict:
    """The params sections a stage reads, without the runtime fields."""
    dumped = params.model_dump(mode="json", by_alias=True)
    return {s: {k: v for k, v in dumped[s].items() if k not in RUNTIME_FIELDS.get(s, ())} for s in sections}


def stage_key(params: Params, name: str) -> str:
    """The run key of a stage: sha256 of its name, params sections, the content
    of every input, and its code. Equal keys mean equal outputs."""
    s = spec(params, name)
    record = {
        "stage": name,
        "params": section_values(params, s.stage.sections),
        "inputs": {dep: content_hash(dep) if Path(dep).exists() else None for dep in s.deps},
        "code": code_version(s.stage.module),
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


# --------------------------------------------------------------------------- DVC
def dvc_yaml(params: Params, params_file: str = "params.yaml", present: dict | None = None) -> dict:
    """dvc.yaml's content for this configuration (`instructflow dvc-yaml` writes it).

    DVC tracks the same params as the stage key: each section a stage reads,
    runtime fields left out (a section with such fields is listed field by
    field). DVC refuses a params dependency that is not in the file, so with
    `present` (the params file as read) only what the file holds is listed;
    the defaults of the rest come from the code, itself a dependency. The code
    dependencies are the stage's module closure, as in the key."""
    stages = {}
    for s in stage_specs(params):
        keys: list[str] = []
        for section in s.stage.sections:
            if present is not None and section not in present:
                continue
            if section in RUNTIME_FIELDS:
                given = present.get(section) or {} if present is not None else None
                keys += [f"{section}.{k}" for k in section_values(params, (section,))[section]
                         if given is None or k in given]
            else:
                keys.append(section)
        code = [f"{PACKAGE}/{f.relative_to(PACKAGE_DIR).as_posix()}" for f in code_files(s.stage.module)]
        entry: dict = {"cmd": " ".join(("instructflow", *s.stage.command, "--params", params_file)),
                       "deps": [*s.deps, *code]}
        if keys:
            entry["params"] = keys if params_file == "params.yaml" else [{params_file: keys}]
        entry["outs"] = [{o: {"persist": True}} if o in s.persist else o for o in s.outs]
        # metrics and plots are cached too: artifacts/ is not in git, so `dvc pull` must bring them
        entry["metrics"] = list(s.metrics)
        if s.plots:
            entry["plots"] = list(s.plots)
        stages[s.name] = entry
    return {"stages": stages}


def dvc_yaml_text(params: Params, params_path: str | Path = "params.yaml") -> str:
    """dvc.yaml as `instructflow dvc-yaml` writes it for the params file at `params_path`."""
    import yaml

    present = yaml.safe_load(Path(params_path).read_text()) or {} if Path(params_path).exists() else None
    return ("# Generated by `instructflow dvc-yaml` from instructflow/registry.py; do not edit by hand.\n"
            + yaml.safe_dump(dvc_yaml(params, str(params_path), present), sort_keys=False, width=120))
