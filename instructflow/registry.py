"""The stage registry: every stage of the pipeline, declared once.

A stage is a function `run_<name>(ctx) -> metrics` in one module of this
package (ctx: runner.StageContext), plus what it reads and writes, by name.
Everything else derives from the declarations below:

    the `instructflow <stage>` commands     (cli.py loops over STAGES)
    runner.run_stage(name, params)          (the CLI, `instructflow run` and the Prefect tasks call it)
    run_key(params, name)                   (Prefect's cache key; checkpoints carry it too)
    dvcfile.dvc_yaml(params, ...)           (dvc.yaml, written by `instructflow dvc-yaml`)
    stage_waves(specs)                      (which stages may run side by side)

Where a stage's files are is written here and nowhere else: a stage asks its
context for `ctx.input("sft")` or `ctx.output("model")`, never for a folder.

A stage's key covers its params sections (runtime settings such as threads and
device excluded), the content of every input, and the code it runs: its
module and every package module that module imports, directly or not. An edit
to serving/endpoint.py therefore changes no training stage's key.

To add a stage: declare it here with `@stage(...)`, write its module's
`run_<name>(ctx)`, and test it. Nothing else lists stages.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError, Params
from .io import content_hash

PACKAGE_DIR = Path(__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name

# Settings that change how fast a stage runs, or which runs happen, never what a stage writes: not part of any key.
RUNTIME_FIELDS = {"project": ("threads", "device", "compact_host_memory", "deterministic"), "methods": ("enabled", "seeds")}

BUILTIN_DATASETS = ("pretrain_train", "pretrain_heldout", "sft_train", "sft_val",
                    "rm_prompts_train", "rm_prompts_val", "ppo_prompts", "eval_prompts")
FILES_DATASETS = ("comparisons_train", "comparisons_val", "sft_train", "sft_val",
                  "ppo_prompts", "pretrain_train", "pretrain_heldout")


# --------------------------------------------------------------------------- declarations
Named = dict[str, str]  # a stage's files by name: what its code asks for (ctx.input("sft")), and where it is


@dataclass(frozen=True)
class IO:
    """What one stage reads and writes, by name, as paths relative to the working directory."""

    deps: Named = field(default_factory=dict)      # files and folders it reads
    outs: Named = field(default_factory=dict)      # what it produces (DVC caches these)
    reports: Named = field(default_factory=dict)   # JSON reports besides its result.json (kept with the outs)
    plots: Named = field(default_factory=dict)     # JSONL logs and images
    persist: tuple[str, ...] = ()                   # names of outs that grow run after run (DVC leaves them in place)


@dataclass(frozen=True)
class Stage:
    name: str
    fn: str                                    # "module:function" inside this package: fn(ctx) -> metrics
    help: str                                  # one line, shown by `instructflow --help`
    sections: tuple[str, ...]                  # params.yaml sections it reads
    io: Callable[[Params, Paths], IO]          # its inputs and outputs for a configuration
    command: tuple[str, ...]                   # the CLI words that run it
    headline: tuple[str, ...] = ()             # its figures: run summaries, and the metrics DVC shows
    table: str = ""                            # "module:function" rendering its metrics as a table
    when: Callable[[Params], bool] = lambda params: True  # whether it runs with this configuration
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
                             when or (lambda params: True), requires, group)
        return io
    return register


class Paths:
    """The file layout under project.artifacts_dir: the one place that knows where a stage's files are."""

    def __init__(self, params: Params):
        self.root = params.project.artifacts_dir.rstrip("/")

    def data(self, *names: str) -> Named:
        """Datasets the data stage writes, by name: {"sft_train": "artifacts/data/sft_train.jsonl", ...}."""
        return {n: f"{self.root}/data/{n}.jsonl" for n in names}

    def __call__(self, stage: str, *rest: str) -> str:
        return "/".join((self.root, stage, *rest))

    def model(self, stage: str) -> str:
        return self(stage, "model")

    def log(self, stage: str) -> Named:
        return {"log": self(stage, "train_log.jsonl")}


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


def comparison_files(params: Params, paths: Paths) -> Named:
    """The comparisons an RM (or DPO) learns from: comparisons_train, comparisons_val and, on the
    built-in suite, comparisons_val_heldout (the held-out labeler's rankings of the val responses)."""
    if builtin_data(params):
        return {f"comparisons_{s}": paths("collect", f"comparisons_{s}.jsonl") for s in ("train", "val", "val_heldout")}
    return paths.data("comparisons_train", "comparisons_val")


@stage("data", "stages.data:run_data", "Write the datasets under artifacts/data/ (built-in suite or validated files).",
       ("project", "data"), command=("data", "build"), headline=("rows",))
def _data(params: Params, paths: Paths) -> IO:
    given = {k: getattr(params.data, k) for k in ("demonstrations", "comparisons", "pretrain_text") if getattr(params.data, k)}
    return IO(deps=given, outs=paths.data(*datasets(params)))


@stage("validate", "stages.validate:run_validate", "Validate every dataset (Great Expectations); fails before any training.",
       ("validate",), headline=("rows",))
def _validate(params: Params, paths: Paths) -> IO:
    return IO(deps=paths.data(*datasets(params)), outs={"report": paths("validate", "report.json")})


@stage("pretrain", "stages.pretrain:run_pretrain", "Build (or load) the base model; artifacts/pretrain/model.",
       ("project", "model", "pretrain"), headline=("heldout_ppl",))
def _pretrain(params: Params, paths: Paths) -> IO:
    trains = builtin_model(params) or params.pretrain.train_external
    return IO(deps={**paths.data("pretrain_train", "pretrain_heldout", "sft_train"),
                    "validation": paths("validate", "report.json")},
              outs={"model": paths.model("pretrain")}, plots=paths.log("pretrain") if trains else {})


@stage("sft", "stages.sft:run_sft", "Supervised fine-tuning on demonstrations; artifacts/sft/model.",
       ("project", "model", "data", "sft"), headline=("val_loss", "likert_base", "likert_sft"))
def _sft(params: Params, paths: Paths) -> IO:
    return IO(deps={"base": paths.model("pretrain"), **paths.data("sft_train", "sft_val")},
              outs={"model": paths.model("sft")}, plots=paths.log("sft"))


@stage("collect", "stages.collect:run_collect", "Sample K responses per prompt from SFT and have labelers rank them.",
       ("project", "model", "data", "collect"), headline=("labeler_agreement", "labeler_agreement_heldout"),
       when=builtin_data, requires="data.source: builtin (its simulated labelers rank the samples)")
def _collect(params: Params, paths: Paths) -> IO:
    return IO(deps={"policy": paths.model("sft"), **paths.data("rm_prompts_train", "rm_prompts_val")},
              outs={**comparison_files(params, paths), "agreement": paths("collect", "agreement.json")})


@stage("reward", "stages.reward:run_reward", "Train the reward model on K-wise rankings; artifacts/reward/model.",
       ("project", "model", "data", "reward"), headline=("val_accuracy", "heldout_labeler_accuracy"))
def _reward(params: Params, paths: Paths) -> IO:
    return IO(deps={"init": paths.model("sft"), **comparison_files(params, paths), **paths.data("sft_train")},
              outs={"model": paths.model("reward")}, plots=paths.log("reward"))


@stage("gold_reward", "stages.reward:run_gold_reward", "A second RM, on comparisons the proxy RM never sees: the evaluation's judge.",
       ("project", "model", "data", "reward"), headline=("val_accuracy",), when=gold_judge,
       requires="data.source: files with data.comparisons and data.gold_fraction > 0")
def _gold_reward(params: Params, paths: Paths) -> IO:
    gold = paths.data("comparisons_gold", "comparisons_val")
    return IO(deps={"init": paths.model("pretrain"), "comparisons_train": gold["comparisons_gold"],
                    "comparisons_val": gold["comparisons_val"]},
              outs={"model": paths.model("gold_reward")}, plots=paths.log("gold_reward"))


@stage("export", "stages.export:run_export", "Export the RM to ONNX with a parity check against torch; artifacts/export/rm/.",
       ("project", "export"), headline=("parity_max_abs_diff",))
def _export(params: Params, paths: Paths) -> IO:
    return IO(deps={"reward_model": paths.model("reward")}, outs={"rm": paths("export", "rm")})


def ensemble_members(params: Params, paths: Paths) -> Named:
    """The models reward_ensemble trains: member_1 .. member_{k-1} (member 0 is the reward stage's RM)."""
    return {f"member_{i}": paths("reward_ensemble", f"member_{i}", "model") for i in range(1, params.ensemble.members)}


def _ppo_io(name: str, ptx: bool = False, ensemble: bool = False) -> Callable[[Params, Paths], IO]:
    def io(params: Params, paths: Paths) -> IO:
        members = {**ensemble_members(params, paths), "members": paths("reward_ensemble", "members.json")} if ensemble else {}
        snapshots = {"snapshots": paths(name, "snapshots")} if params.ppo.takes_snapshots else {}
        return IO(deps={"sft": paths.model("sft"), "reward_model": paths.model("reward"), **members,
                        **paths.data("ppo_prompts", *(("pretrain_train",) if ptx else ()))},
                  outs={"model": paths.model(name), "value_model": paths(name, "value_model"), **snapshots},
                  plots=paths.log(name))
    return io


PPO_HEADLINE = ("first_score", "final_score", "final_kl")
stage("ppo", "stages.ppo:run_ppo", "PPO against the RM with a per-token KL penalty to SFT (no pretraining mix); artifacts/ppo/.",
      ("project", "model", "pretrain", "ppo"), headline=PPO_HEADLINE)(_ppo_io("ppo"))
stage("ppo_ptx", "stages.ppo:run_ppo_ptx", "PPO-ptx: PPO plus ppo.ptx_coef x the pretraining log-likelihood; artifacts/ppo_ptx/.",
      ("project", "model", "pretrain", "ppo"), headline=PPO_HEADLINE)(_ppo_io("ppo_ptx", ptx=True))


# ---- the methods beside PPO (`make methods`: flows/methods.py), before eval so that they share its waves
@stage("reward_ensemble", "stages.reward_ensemble:run_reward_ensemble", "Train the RM ensemble's other members (seeds + 1 .. k-1).",
       ("project", "model", "data", "reward", "ensemble"), headline=("val_accuracy", "mean_member_val_accuracy"),
       when=methods_on, requires=METHODS_NEED, group="methods")
def _reward_ensemble(params: Params, paths: Paths) -> IO:
    return IO(deps={"init": paths.model("sft"), "member_0": paths.model("reward"), **comparison_files(params, paths),
                    **paths.data("sft_train")},
              outs={**ensemble_members(params, paths), "members": paths("reward_ensemble", "members.json")},
              plots={f"member_{i}_log": paths("reward_ensemble", f"member_{i}", "train_log.jsonl")
                     for i in range(1, params.ensemble.members)})


@stage("dpo", "stages.dpo:run_dpo", "DPO from SFT on the comparisons (Plackett-Luce over each ranking); artifacts/dpo/model.",
       ("project", "model", "data", "dpo"), headline=("val_loss", "val_accuracy"), when=methods_on, requires=METHODS_NEED,
       group="methods")
def _dpo(params: Params, paths: Paths) -> IO:
    comparisons = comparison_files(params, paths)
    return IO(deps={"sft": paths.model("sft"), **{k: comparisons[k] for k in ("comparisons_train", "comparisons_val")}},
              outs={"model": paths.model("dpo")}, plots=paths.log("dpo"))


@stage("best_of_n", "stages.best_of_n:run_best_of_n", "n SFT samples per evaluation prompt, scored by the RM (no training).",
       ("project", "model", "eval", "best_of_n"), headline=("rm_score_best_of_1", "kl_to_sft"),
       when=lambda params: methods_on(params) and judged(params), requires=f"{METHODS_NEED}, and {JUDGE_NEEDS}",
       group="methods")
def _best_of_n(params: Params, paths: Paths) -> IO:
    return IO(deps={"sft": paths.model("sft"), "reward_model": paths.model("reward"), **paths.data("eval_prompts")},
              outs={"samples": paths("best_of_n", "samples.jsonl")})


stage("ppo_ensemble", "stages.ppo:run_ppo_ensemble", "PPO against the RM ensemble's conservative reward; artifacts/ppo_ensemble/.",
      ("project", "model", "pretrain", "ppo", "ensemble"), headline=PPO_HEADLINE,
      when=methods_on, requires=METHODS_NEED, group="methods")(_ppo_io("ppo_ensemble", ensemble=True))


def judge_deps(params: Params, paths: Paths) -> Named:
    """What the judge reads: the labelers' agreement (built-in suite), or the gold RM and its result; and the
    held-out comparisons its own accuracy is measured on (the held-out labeler's rankings beside the training
    labelers' of the same responses; the gold RM: the validation comparisons)."""
    if builtin_data(params):
        val = comparison_files(params, paths)
        return {"agreement": paths("collect", "agreement.json"), "judge_val": val["comparisons_val"],
                "judge_val_heldout": val["comparisons_val_heldout"]}
    return {"gold_reward_model": paths.model("gold_reward"), "gold_reward_result": paths("gold_reward", "result.json"),
            **{"judge_val": p for p in paths.data("comparisons_val").values()}}


def _judged_deps(params: Params, paths: Paths) -> Named:
    """What every judged comparison of models reads besides the models: prompts, held-out text, few-shot
    demonstrations, SFT, the proxy RM with its result, and the judge."""
    return {**paths.data("eval_prompts", "pretrain_heldout", "sft_train"), "sft": paths.model("sft"),
            "reward_model": paths.model("reward"), "reward_result": paths("reward", "result.json"),
            **judge_deps(params, paths)}


@stage("eval", "stages.evaluate:run_eval", "Judge base (few-shot), SFT, PPO and PPO-ptx on held-out prompts; artifacts/eval/.",
       ("project", "model", "data", "pretrain", "reward", "eval"), table="stages.evaluate:summary_table",
       headline=("win_rate_ppo_vs_sft", "win_rate_ppo_ptx_vs_sft"), when=judged, requires=JUDGE_NEEDS)
def _eval(params: Params, paths: Paths) -> IO:
    return IO(deps={**_judged_deps(params, paths), "base": paths.model("pretrain"),
                    "ppo": paths.model("ppo"), "ppo_ptx": paths.model("ppo_ptx"),
                    "ppo_log": paths("ppo", "train_log.jsonl"), "ppo_ptx_log": paths("ppo_ptx", "train_log.jsonl")},
              outs={"samples": paths("eval", "samples.md"), "answers": paths("eval", "answers.jsonl")},
              reports={"metrics": paths("eval", "metrics.json")},
              plots={"winrate": paths("eval", "winrate.png"), "ppo_curves": paths("eval", "ppo_curves.png")})


@stage("compare", "stages.compare:run_compare", "Every method against SFT by the judge (Figure 1 with DPO, best-of-n, ensembles).",
       ("project", "model", "data", "pretrain", "reward", "eval", "best_of_n"), table="stages.evaluate:summary_table",
       headline=("win_rate_best_of_n_vs_sft", "win_rate_dpo_vs_sft", "win_rate_ppo_ensemble_vs_sft"),
       when=lambda params: methods_on(params) and judged(params), requires=f"{METHODS_NEED}, and {JUDGE_NEEDS}",
       group="methods")
def _compare(params: Params, paths: Paths) -> IO:
    return IO(deps={**_judged_deps(params, paths), "dpo": paths.model("dpo"), "ppo_ensemble": paths.model("ppo_ensemble"),
                    "best_of_n": paths("best_of_n", "samples.jsonl"), "eval_answers": paths("eval", "answers.jsonl"),
                    "eval_metrics": paths("eval", "metrics.json")},
              reports={"metrics": paths("compare", "metrics.json")}, plots={"figure1": paths("compare", "figure1.png")})


@stage("overoptimization", "stages.compare:run_overoptimization",
       "Proxy reward and the judge against sqrt(KL) along PPO's snapshots, one RM and the ensemble (Gao et al. 2022).",
       ("project", "model", "data", "pretrain", "reward", "eval", "ppo", "ensemble", "best_of_n", "methods"),
       headline=("peak_kl_ppo", "peak_win_rate_ppo", "peak_kl_ppo_ensemble", "peak_win_rate_ppo_ensemble"),
       when=lambda params: methods_on(params) and judged(params) and params.ppo.takes_snapshots,
       requires=f"{METHODS_NEED}, 0 < ppo.snapshot_every < ppo.iterations, and {JUDGE_NEEDS}", group="methods")
def _overoptimization(params: Params, paths: Paths) -> IO:
    runs = {f"{r}_{x}": (paths.model(r) if x == "model" else paths(r, "snapshots"))
            for r in ("ppo", "ppo_ensemble") for x in ("model", "snapshots")}
    return IO(deps={**_judged_deps(params, paths), **ensemble_members(params, paths), **runs,
                    "best_of_n": paths("best_of_n", "samples.jsonl")},
              reports={"metrics": paths("overoptimization", "metrics.json")},
              plots={"plot": paths("overoptimization", "overoptimization.png")})


# ---- rounds of on-policy feedback (`make round`: flows/rounds.py, instructflow/rounds/)
def rounds_on(params: Params) -> bool:
    people = params.rounds.ranker == "label_studio"
    return params.rounds.enabled and (builtin_data(params) or (people and gold_judge(params)))


ROUNDS_NEED = ("rounds.enabled, and data.source: builtin (its labelers rank, its held-out labeler judges), or your data "
               "with rounds.ranker: label_studio (people rank) and data.gold_fraction > 0 (a gold RM judges)")


def _round_stage(name: str, help: str, sections: tuple[str, ...], headline: tuple[str, ...] = (), fn: str = ""):
    return stage(name, fn or f"rounds.stages:run_{name}", help, ("rounds", *sections), headline=headline, when=rounds_on,
                 requires=ROUNDS_NEED, group="rounds")


@_round_stage("round_champion", "The round's champion policy (round 1: SFT), fetched and verified from rounds.store.",
              ("project",), headline=("round", "champion"))
def _round_champion(params: Params, paths: Paths) -> IO:
    return IO(deps={"ticket": params.rounds.ticket, "sft": paths.model("sft")},
              outs={"policy": paths("round_champion", "policy"), "champion": paths("round_champion", "champion.json")})


@_round_stage("round_feedback", "K answers per new prompt from the champion, ranked, validated, added to every round's data.",
              ("project", "model", "data", "collect", "validate"), headline=("comparisons_added", "sample_quality_heldout_labeler"))
def _round_feedback(params: Params, paths: Paths) -> IO:
    return IO(deps={"ticket": params.rounds.ticket, "policy": paths("round_champion", "policy"),
                    **paths.data("eval_prompts", "ppo_prompts")},
              outs={"feedback": paths("round_feedback", "feedback")}, persist=("feedback",),
              reports={"labeling": paths("round_feedback", "labeling.json")})


@_round_stage("round_reward", "The RM retrained from SFT on collect's and every round's comparisons.",
              ("project", "model", "data", "reward"), headline=("val_accuracy", "heldout_labeler_accuracy"))
def _round_reward(params: Params, paths: Paths) -> IO:
    return IO(deps={"init": paths.model("sft"), **comparison_files(params, paths),
                    "feedback": paths("round_feedback", "feedback"), **paths.data("sft_train")},
              outs={"model": paths.model("round_reward")}, plots=paths.log("round_reward"))


@_round_stage("round_ppo", "The challenger: PPO (or PPO-ptx) from the champion against the round's RM, KL to SFT.",
              ("project", "model", "pretrain", "ppo"), headline=PPO_HEADLINE)
def _round_ppo(params: Params, paths: Paths) -> IO:
    ptx = ("pretrain_train",) if params.rounds.algorithm == "ppo_ptx" else ()
    return IO(deps={"sft": paths.model("sft"), "init": paths("round_champion", "policy"),
                    "reward_model": paths.model("round_reward"), **paths.data("ppo_prompts", *ptx)},
              outs={"model": paths.model("round_ppo"), "value_model": paths("round_ppo", "value_model")},
              plots=paths.log("round_ppo"))


@_round_stage("round_export", "The round's RM to ONNX, parity-checked (what a promotion publishes).", ("project", "export"),
              headline=("parity_max_abs_diff",), fn="stages.export:run_export")
def _round_export(params: Params, paths: Paths) -> IO:
    return IO(deps={"reward_model": paths.model("round_reward")}, outs={"rm": paths("round_export", "rm")})


@_round_stage("round_gate", "The judge compares challenger, champion and SFT: promote or keep, and why.",
              ("project", "model", "data", "eval"), headline=("promote",))
def _round_gate(params: Params, paths: Paths) -> IO:
    return IO(deps={"ticket": params.rounds.ticket, "sft": paths.model("sft"), "champion": paths("round_champion", "policy"),
                    "challenger": paths.model("round_ppo"), **paths.data("eval_prompts"),
                    "reward_result": paths("round_reward", "result.json"),
                    "feedback_result": paths("round_feedback", "result.json"), **judge_deps(params, paths)},
              reports={"report": paths("round_gate", "report.json")})


# --------------------------------------------------------------------------- resolved for one configuration
@dataclass(frozen=True)
class StageSpec:
    """A stage with its files resolved for one configuration, by name."""

    stage: Stage
    inputs: Named
    outputs: Named                             # outs, reports, plots and the two records, by name
    io: IO
    folder: str                                # artifacts/<stage>

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def deps(self) -> tuple[str, ...]:
        return tuple(self.inputs.values())

    @property
    def outs(self) -> tuple[str, ...]:
        """What DVC caches as outputs: the stage's products and its result.json."""
        return (*self.io.outs.values(), *self.io.reports.values(), self.result)

    @property
    def metrics(self) -> tuple[str, ...]:
        """What DVC shows as metrics: the stage's figures."""
        return (self.figures,)

    @property
    def plots(self) -> tuple[str, ...]:
        return tuple(self.io.plots.values())

    @property
    def persist(self) -> tuple[str, ...]:
        return tuple(self.io.outs[n] for n in self.io.persist)

    @property
    def result(self) -> str:
        """result.json: metrics, the content hashes in and out, timings, the run key."""
        return f"{self.folder}/result.json"

    @property
    def figures(self) -> str:
        """figures.json: the stage's headline figures, flat (DVC's metrics)."""
        return f"{self.folder}/figures.json"

    def files(self) -> tuple[str, ...]:
        """Every file or folder the stage writes."""
        return (*self.outs, *self.metrics, *self.plots)


def stage_specs(params: Params) -> list[StageSpec]:
    """Every stage this configuration runs, in order."""
    paths = Paths(params)
    specs = []
    for s in STAGES.values():
        if s.when(params):
            io = s.io(params, paths)
            outputs = {**io.outs, **io.reports, **io.plots}
            specs.append(StageSpec(s, dict(io.deps), outputs, io, paths(s.name)))
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


def output(params: Params, stage_name: str, name: str) -> Path:
    """Where stage `stage_name` writes its output `name` under this configuration (e.g. ("sft", "model"))."""
    return Path(spec(params, stage_name).outputs[name])


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


def reads_from(reader: StageSpec, writer: StageSpec) -> bool:
    """Whether stage `reader` reads a path that stage `writer` writes (the same path, or one inside the other)."""
    def nested(a: str, b: str) -> bool:
        pa, pb = Path(a), Path(b)
        return pa == pb or pb in pa.parents or pa in pb.parents

    return any(nested(d, w) for d in reader.deps for w in writer.files())


def resolve(ref: str) -> Callable:
    """The function named by "module:function" inside this package (imported on demand: torch is slow to import)."""
    module, _, fn = ref.partition(":")
    return getattr(importlib.import_module(f"{PACKAGE}.{module}"), fn)


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
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                   for n in ast.walk(block)}  # `if TYPE_CHECKING:` imports never run
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
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


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


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


@dataclass(frozen=True)
class RunKey:
    """A stage's run key and the content hashes it was computed from (result.json records them)."""

    key: str
    input_hashes: dict[str, str | None]        # path -> sha256 (None: absent)


def run_key(params: Params, name: str) -> RunKey:
    """The run key of a stage: sha256 of its name, params sections, the content
    of every input, and its code. Equal keys mean equal outputs."""
    s = spec(params, name)
    hashes = {dep: content_hash(dep) if Path(dep).exists() else None for dep in s.deps}
    record = {
        "stage": name,
        "params": section_values(params, s.stage.sections),
        "inputs": hashes,
        "code": code_version(s.stage.module),
    }
    return RunKey(hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest(), hashes)


def stage_key(params: Params, name: str) -> str:
    return run_key(params, name).key
