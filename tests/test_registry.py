"""The stage registry: every list of stages derives from it, and a stage's key
covers exactly its params, inputs and code."""
import shutil
import subprocess
import sys

import yaml
from conftest import ROOT

from instructflow.config import Params, load_params
from instructflow.dvcfile import dvc_yaml_text
from instructflow.registry import PACKAGE_DIR, STAGES, code_files, pipeline_specs, stage_key, stage_specs

TRAINING = ("pretrain", "sft", "collect", "reward", "ppo", "ppo_ptx")


def test_committed_dvc_yaml_is_the_generated_one():
    text = (ROOT / "dvc.yaml").read_text()
    assert text == dvc_yaml_text(load_params(ROOT / "params.yaml"), "params.yaml"), \
        "dvc.yaml is stale: run `instructflow dvc-yaml` and commit it"


def test_every_list_of_stages_comes_from_the_registry():
    from instructflow.cli import app

    commands = {c.name for c in app.registered_commands} | {
        f"data {c.name}" for g in app.registered_groups for c in g.typer_instance.registered_commands}
    assert {" ".join(s.command) for s in STAGES.values()} <= commands
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == [s.name for s in pipeline_specs(Params())]  # the methods and rounds have files of their own
    assert set(dvc) <= set(STAGES)
    for name, entry in dvc.items():
        assert entry["cmd"] == "instructflow " + " ".join(STAGES[name].command) + " --params params.yaml"
        assert entry["metrics"] == [f"artifacts/{name}/figures.json"] and f"artifacts/{name}/result.json" in entry["outs"]
    methods = yaml.safe_load(dvc_yaml_text(Params(), "params.yaml", "methods"))["stages"]
    assert list(methods) == [s.name for s in stage_specs(Params()) if s.stage.group == "methods"]
    assert all(e["wdir"] == "../.." for e in methods.values())
    smol = yaml.safe_load(dvc_yaml_text(load_params(ROOT / "configs/smollm2-hh.yaml"), "configs/smollm2-hh.yaml", root=ROOT))
    assert "gold_reward" in smol["stages"] and smol["stages"]["sft"]["params"][0]["configs/smollm2-hh.yaml"]


def test_a_stage_runs_the_code_its_module_imports_and_nothing_else():
    def rel(stage):
        return {f.relative_to(PACKAGE_DIR).as_posix() for f in code_files(STAGES[stage].module)}

    sft = rel("sft")
    assert {"stages/sft.py", "lm/losses.py", "lm/encoding.py", "lm/training.py", "lm/modeling.py", "__init__.py",
            "stages/__init__.py", "data/suite/__init__.py"} <= sft
    assert not sft & {"serving/endpoint.py", "stages/export.py", "stages/ppo.py", "cli.py", "registry.py"}
    assert "data/validate.py" in rel("data")  # imported inside a function: still code the stage runs
    for stage in TRAINING:
        assert "serving/endpoint.py" not in rel(stage) and "cli.py" not in rel(stage)


def test_runtime_settings_change_no_key_and_a_params_section_changes_only_its_readers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = Params()
    names = [s.name for s in stage_specs(base)]
    keys = {s: stage_key(base, s) for s in names}
    faster = Params.model_validate({"project": {"threads": 7, "device": "cpu"}, "methods": {"seeds": 5}})
    assert {s: stage_key(faster, s) for s in names} == keys
    changed = Params.model_validate({"ppo": {"lr": 3e-4}})
    assert {s for s in names if stage_key(changed, s) != keys[s]} == {"ppo", "ppo_ptx", "ppo_ensemble", "overoptimization", "round_ppo"}
    changed = Params.model_validate({"dpo": {"beta": 0.2}})
    assert {s for s in names if stage_key(changed, s) != keys[s]} == {"dpo"}


def test_an_edit_to_serve_py_changes_no_stage_key_and_an_edit_to_losses_py_changes_its_users(tmp_path):
    """In a copy of the package, in a fresh interpreter (the code hash is computed once per process)."""
    shutil.copytree(PACKAGE_DIR, tmp_path / "instructflow", ignore=shutil.ignore_patterns("__pycache__"))
    probe = ("import json; from instructflow.config import Params; from instructflow.registry import stage_key, stage_specs;"
             "print(json.dumps({s.name: stage_key(Params(), s.name) for s in stage_specs(Params())}))")

    def keys():
        out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
        return yaml.safe_load(out.stdout)

    before = keys()
    serve = tmp_path / "instructflow/serving/endpoint.py"
    serve.write_text(serve.read_text().replace('"""The scoring endpoint', '"""The scoring endpoint (edited)', 1))
    assert keys() == before
    losses = tmp_path / "instructflow/lm/losses.py"
    losses.write_text(losses.read_text() + "\n# an edit\n")
    after = keys()
    assert {s for s in after if after[s] != before[s]} == {"pretrain", "sft", "reward", "ppo", "ppo_ptx", "eval",
                                                           "reward_ensemble", "dpo", "best_of_n", "ppo_ensemble", "compare",
                                                           "overoptimization", *(s for s in after if s.startswith("round_") and s != "round_export")}


def test_a_gold_rm_stage_runs_beside_the_proxy_rm_when_files_keep_a_gold_share():
    from instructflow.config import parse_params
    from instructflow.registry import stage_waves

    files = {"data": {"source": "files", "comparisons": "c.jsonl"}}
    plain = [s.name for s in stage_specs(parse_params(files))]
    assert "gold_reward" not in plain
    assert {"dpo", "reward_ensemble", "ppo_ensemble"} <= set(plain) and "compare" not in plain  # no judge, no comparison
    gold = parse_params({"data": {**files["data"], "gold_fraction": 0.5}})
    assert {"best_of_n", "compare", "overoptimization"} <= {s.name for s in stage_specs(gold)}
    waves = [[s.name for s in w] for w in stage_waves(pipeline_specs(gold))]
    assert ["reward", "gold_reward"] in waves and waves[-1] == ["eval"]
    gold_spec = next(s for s in stage_specs(gold) if s.name == "gold_reward")
    assert "artifacts/data/comparisons_gold.jsonl" in gold_spec.deps and "artifacts/sft/model" not in gold_spec.deps
