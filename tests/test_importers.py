import json

import pytest
from typer.testing import CliRunner

from instructflow.cli import app
from instructflow.data.importers import import_alpaca, import_hh_rlhf, import_trl_preference, split_hh_dialog
from instructflow.io import DataError
from instructflow.encoding import format_prompt


def test_hh_split_keeps_the_dialog_and_round_trips_through_the_template():
    chosen = "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Help me?\n\nAssistant: Sure, here is how."
    rejected = "\n\nHuman: Hi?\n\nAssistant: Hello.\n\nHuman: Help me?\n\nAssistant: No."
    prompt, a, b = split_hh_dialog(chosen, rejected)
    assert (a, b) == ("Sure, here is how.", "No.")
    assert "\n\n" + format_prompt(prompt) + " " + a == chosen


def test_hh_rows_without_shared_prefix_are_reported_not_mis_split(tmp_path):
    rows = [
        {"chosen": "\n\nHuman: A\n\nAssistant: good", "rejected": "\n\nHuman: A\n\nAssistant: bad"},
        {"chosen": "\n\nHuman: A\n\nAssistant: x\n\nHuman: B\n\nAssistant: good",
         "rejected": "\n\nHuman: A\n\nAssistant: y\n\nHuman: B\n\nAssistant: bad"},
        {"chosen": "\n\nHuman: C\n\nAssistant: ", "rejected": "\n\nHuman: C\n\nAssistant: bad"},
    ]
    src = tmp_path / "hh.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    comps, report = import_hh_rlhf(src)
    assert [c.responses for c in comps] == [["good", "bad"]]
    assert [(s["line"], "share" in s["reason"]) for s in report.skipped] == [(2, True), (3, False)]


def test_hh_missing_field_names_line(tmp_path):
    src = tmp_path / "hh.jsonl"
    src.write_text(json.dumps({"chosen": "x"}))
    with pytest.raises(DataError, match=r"hh\.jsonl:1: field 'rejected' is missing"):
        import_hh_rlhf(src)


def test_real_hh_rlhf_sample(shared_data):
    comps, report = import_hh_rlhf(shared_data / "hh-rlhf-harmless-base-test.jsonl.gz")
    assert report.read == 2312
    prefix_mismatch = [s["line"] for s in report.skipped if "share" in s["reason"]]
    assert len(prefix_mismatch) == 4  # the data README names 4 such rows
    assert len(comps) + len(report.skipped) == 2312
    for c in comps:
        assert c.k == 2 and c.ranking == [0, 1] and not c.prompt.startswith("Human:")


def test_real_alpaca_seed_tasks(shared_data):
    demos, report = import_alpaca(shared_data / "alpaca-seed-tasks.jsonl")
    assert report.read == 175 and len(demos) == 175 and not report.skipped
    with_input = [d for d in demos if "\n\n" in d.prompt]
    assert len(with_input) == 125  # an instance's input belongs in the prompt


def test_alpaca_records_and_trl_layouts(tmp_path):
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps([{"instruction": "Add", "input": "1+1", "output": "2"}, {"instruction": "Hi", "output": ""}]))
    demos, report = import_alpaca(src)
    assert [(d.prompt, d.response) for d in demos] == [("Add\n\n1+1", "2")] and len(report.skipped) == 1
    trl = tmp_path / "trl.jsonl"
    trl.write_text(json.dumps({"prompt": "Q?", "chosen": "A", "rejected": "B"}) + "\n" + json.dumps({
        "prompt": [{"role": "user", "content": "Q2?"}],
        "chosen": [{"role": "assistant", "content": "yes"}], "rejected": [{"role": "assistant", "content": "no"}]}))
    comps, _ = import_trl_preference(trl)
    assert [(c.prompt, c.responses) for c in comps] == [("Q?", ["A", "B"]), ("Q2?", ["yes", "no"])]


def test_cli_import_writes_records_and_report(shared_data, tmp_path):
    out = tmp_path / "hh.jsonl"
    res = CliRunner().invoke(app, ["data", "import", "hh-rlhf", str(shared_data / "hh-rlhf-harmless-base-test.jsonl.gz"), str(out)])
    assert res.exit_code == 0, res.output
    assert "skipped 8" in res.output
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["written"] == len(out.read_text().splitlines()) == 2304
