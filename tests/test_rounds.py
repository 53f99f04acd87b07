"""Rounds, unit by unit: the champion store (versions, the pointer written last, rollback), the
round ticket and ledger, the ranker interface and which stages a round runs. The whole round
through Prefect, DVC, git and SeaweedFS is in test_orchestration.py and test_deployments.py;
the server following the champion in test_serve.py."""
import json
from pathlib import Path

import pytest

from instructflow.config import Params
from instructflow.rounds.champion import list_versions, promote, read_pointer, read_version, rollback
from instructflow.serving.storage import FolderStore, fetch_folder, publish_folder


def _folder(root: Path, name: str, text: str) -> Path:
    (root / name).mkdir(parents=True)
    (root / name / "weights.bin").write_text(text)
    (root / name / "sub").mkdir()
    (root / name / "sub" / "config.json").write_text(json.dumps({"name": name}))
    return root / name


@pytest.fixture
def rm_export(tmp_path, monkeypatch):
    """A folder that passes verify_export (promote checks the RM export first)."""
    from instructflow.io import sha256_file

    folder = _folder(tmp_path, "rm", "onnx bytes")
    (folder / "manifest.json").write_text(json.dumps({"model_version": "rm-x", "files": {
        "weights.bin": sha256_file(folder / "weights.bin")}}))
    return folder


def test_promote_publishes_a_version_then_moves_the_pointer_last_and_rollback_walks_back(tmp_path, rm_export, monkeypatch):
    store_dir = tmp_path / "store"
    writes = []
    real_write = FolderStore.write
    monkeypatch.setattr(FolderStore, "write", lambda self, name, data: (writes.append(name), real_write(self, name, data)))
    policy = _folder(tmp_path, "policy", "policy v1")
    p1 = promote(str(store_dir), policy, rm_export, {"round": 1})
    assert p1["version"] == "v1" and p1["previous"] is None and p1["reason"] == "promoted"
    assert writes[-2:] == ["versions/v1/version.json", "champion.json"]  # the pointer last, after the whole version
    for part in ("policy", "rm"):  # each folder's manifest after its files
        files = [i for i, w in enumerate(writes) if w.startswith(f"versions/v1/{part}/")]
        assert len(files) >= 3 and writes[files[-1]] == f"versions/v1/{part}/files.json"
    # a version that was never finished (no version.json) keeps its number: the next is v3, and it is not listed
    (store_dir / "versions/v2/policy").mkdir(parents=True)
    (store_dir / "versions/v2/policy/weights.bin").write_text("half")
    assert promote(str(store_dir), policy, rm_export, {"round": 2})["version"] == "v3"
    assert promote(str(store_dir), policy, rm_export, {"round": 3})["version"] == "v4"
    store = FolderStore(store_dir)
    assert list_versions(store) == ["v1", "v3", "v4"] and read_version(store, "v4")["previous"] == "v3"

    assert rollback(str(store_dir))["version"] == "v3"
    back = rollback(str(store_dir))
    assert back["version"] == "v1" and back["reason"] == "rolled back from v3" and read_pointer(store)["version"] == "v1"
    with pytest.raises(ValueError, match="first version"):
        rollback(str(store_dir))
    assert rollback(str(store_dir), "v4")["version"] == "v4"
    with pytest.raises(ValueError, match="no version 'v9'.*v1, v3, v4"):
        rollback(str(store_dir), "v9")
    with pytest.raises(ValueError, match="already the champion"):
        rollback(str(store_dir), "v4")


def test_nothing_unverified_is_promoted_and_a_tampered_file_is_refused_on_fetch(tmp_path, rm_export):
    bad = tmp_path / "bad-rm"
    import shutil

    shutil.copytree(rm_export, bad)
    (bad / "weights.bin").write_text("changed")
    with pytest.raises(ValueError, match="weights.bin has sha256"):
        promote(str(tmp_path / "store"), rm_export, bad, {})
    assert not (tmp_path / "store").exists()

    store = FolderStore(tmp_path / "s2")
    publish_folder(store, _folder(tmp_path, "p", "good"), "x")
    dest = fetch_folder(store, "x", tmp_path / "dest")
    assert (dest / "sub/config.json").exists() and (dest / "weights.bin").read_text() == "good"
    (tmp_path / "s2/x/weights.bin").write_text("tampered")
    with pytest.raises(ValueError, match="x/weights.bin: sha256 does not match"):
        fetch_folder(store, "x", tmp_path / "dest")
    assert (dest / "weights.bin").read_text() == "good" and not (tmp_path / "dest.download").exists()
    with pytest.raises(ValueError, match="no files.json"):
        fetch_folder(store, "missing", tmp_path / "other")
    with pytest.raises(ValueError, match="not a name inside the store"):
        store.read("../outside")


def test_a_round_opens_after_the_last_finished_one_from_the_champion_the_store_points_at(tmp_path, rm_export, monkeypatch):
    from instructflow.rounds.stages import append_ledger, open_round, read_ledger

    monkeypatch.chdir(tmp_path)
    p = Params.model_validate({"rounds": {"store": str(tmp_path / "store")}})
    assert open_round(p) == {"round": 1, "champion": "sft"}
    assert open_round(p) == {"round": 1, "champion": "sft"}  # not finished: the same round again (its stages cached)
    append_ledger(p, {"round": 1, "promoted": False})
    promote(p.rounds.store, _folder(tmp_path, "policy", "x"), rm_export, {"round": 1})
    assert open_round(p) == {"round": 2, "champion": "v1"}
    assert json.loads(Path("rounds/round.json").read_text()) == {"round": 2, "champion": "v1"}
    append_ledger(p, {"round": 2, "promoted": True})
    append_ledger(p, {"round": 2, "promoted": False})  # a round run again replaces its line
    assert read_ledger(p) == [{"round": 1, "promoted": False}, {"round": 2, "promoted": False}]
    Path("rounds/round.json").write_text('{"round": 0}')
    from instructflow.rounds.stages import read_ticket

    with pytest.raises(ValueError, match="a ticket is"):
        read_ticket(p)


def test_simulated_labelers_rank_behind_the_ranker_interface():
    from instructflow.data.suite.build import fresh_prompts
    from instructflow.rounds.ranking import Ranker, make_ranker

    p = Params()
    ranker: Ranker = make_ranker(p, seed=3)
    prompts = fresh_prompts(p.data, seed=5, n=4, prefix="round007", exclude=set())
    assert len({x.prompt for x in prompts}) == 4 and not {x.category for x in prompts} & set(p.data.heldout_categories)
    comps = ranker.rank(prompts, [["apple", "a pear", "no idea"]] * 4)
    assert [c.id for c in comps] == [x.id for x in prompts] and all(c.id.startswith("round007-") for c in comps)
    assert all(sorted(c.ranking) == [0, 1, 2] and c.labeler in {"ada", "bo", "cy", "di", "eli"} for c in comps)
    with pytest.raises(ValueError, match="ranked by people: set rounds.ranker: label_studio"):
        make_ranker(Params.model_validate({"data": {"source": "files", "demonstrations": "d.jsonl"}}), 0)


def test_a_round_runs_its_stages_and_only_the_pipeline_stages_they_read():
    from instructflow.registry import group_specs, stage_waves, with_upstream

    p = Params()
    names = [s.name for s in with_upstream(p, group_specs(p, "rounds"))]
    assert names == ["data", "validate", "pretrain", "sft", "collect", "round_champion", "round_feedback", "round_reward",
                     "round_ppo", "round_export", "round_gate"]
    waves = [[s.name for s in w] for w in stage_waves(with_upstream(p, group_specs(p, "rounds")))]
    assert waves[-4:] == [["round_feedback"], ["round_reward"], ["round_ppo", "round_export"], ["round_gate"]]
    assert not group_specs(Params.model_validate({"rounds": {"enabled": False}}), "rounds")


def test_the_champion_commands_answer_in_one_line(tmp_path, rm_export, monkeypatch):
    from typer.testing import CliRunner

    from instructflow.cli import app

    monkeypatch.chdir(tmp_path)

    def cli(*args):
        return CliRunner().invoke(app, ["champion", *args, "--store", str(tmp_path / "s")])

    out = cli("rollback")
    assert out.exit_code == 2 and "no champion to roll back" in out.output and out.exception.__class__ is SystemExit
    promote(str(tmp_path / "s"), _folder(tmp_path, "policy", "x"), rm_export, {"round": 1})
    promote(str(tmp_path / "s"), tmp_path / "policy", rm_export, {"round": 2})
    shown = json.loads(cli("show").output)
    assert shown["champion"]["version"] == "v2" and shown["versions"] == ["v1", "v2"]
    out = cli("rollback")
    assert out.exit_code == 0 and "champion is now v1 (rolled back from v2)" in out.output
