import gzip
import json
import re

import pytest
from typer.testing import CliRunner

from instructflow.cli import app
from instructflow.data.importers import import_alpaca, import_hh_rlhf, import_trl_preference, split_hh_dialog
from instructflow.io import BOM, DataError
from instructflow.lm.encoding import format_prompt


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


GOOD_HH = json.dumps({"chosen": "\n\nHuman: Hi\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}).encode()
GOOD_ALPACA = json.dumps({"instruction": "Add", "input": "1+1", "output": "2"}).encode()
GOOD_TRL = json.dumps({"prompt": "Q?", "chosen": "A", "rejected": "B"}).encode()

# (case, importer, a good row, the bad row, words in its reason)
IMPORT_CASES = [
    ("hh_missing_field", import_hh_rlhf, GOOD_HH, json.dumps({"chosen": "x"}).encode(), "field 'rejected' is missing"),
    ("hh_not_text", import_hh_rlhf, GOOD_HH, json.dumps({"chosen": 3, "rejected": "x"}).encode(), "field 'chosen' has the wrong type"),
    ("hh_not_json", import_hh_rlhf, GOOD_HH, b'{"chosen": "x", ', "not valid JSON"),
    ("hh_not_utf8", import_hh_rlhf, GOOD_HH, b'{"chosen": "caf\xe9", "rejected": "x"}', "not valid UTF-8"),
    ("hh_nan", import_hh_rlhf, GOOD_HH, b'{"chosen": "x", "rejected": "y", "score": NaN}', "NaN is not a number"),
    ("hh_lone_surrogate", import_hh_rlhf, GOOD_HH, b'{"chosen": "\\ud83d", "rejected": "y"}', "lone surrogate"),
    ("hh_empty_prompt", import_hh_rlhf, GOOD_HH, json.dumps({"chosen": "\n\nAssistant: a", "rejected": "\n\nAssistant: b"}).encode(),
     "field 'prompt'"),
    ("alpaca_no_output", import_alpaca, GOOD_ALPACA, json.dumps({"instruction": "Add"}).encode(), "'output' (or 'instances') is missing"),
    ("alpaca_instances_not_a_list", import_alpaca, GOOD_ALPACA, json.dumps({"instruction": "Add", "instances": "x"}).encode(),
     "field 'instances' has the wrong type"),
    ("alpaca_instance_not_an_object", import_alpaca, GOOD_ALPACA, json.dumps({"instruction": "Add", "instances": [3]}).encode(),
     "instance 0: expected a JSON object"),
    ("alpaca_input_not_text", import_alpaca, GOOD_ALPACA, json.dumps({"instruction": "Add", "input": [1], "output": "2"}).encode(),
     "field 'input' has the wrong type"),
    ("alpaca_blank_id", import_alpaca, GOOD_ALPACA, json.dumps({"id": " ", "instruction": "Add", "output": "2"}).encode(), "field 'id'"),
    ("trl_bad_message", import_trl_preference, GOOD_TRL, json.dumps({"prompt": [3], "chosen": "a", "rejected": "b"}).encode(),
     "a message is not an object"),
    ("trl_number", import_trl_preference, GOOD_TRL, json.dumps({"prompt": "Q", "chosen": 1, "rejected": "b"}).encode(),
     "field 'chosen' has the wrong type"),
    ("trl_a_list_line", import_trl_preference, GOOD_TRL, b"[1, 2]", "expected a JSON object"),
]


@pytest.mark.parametrize("case,importer,good,bad,words", IMPORT_CASES, ids=[c[0] for c in IMPORT_CASES])
def test_a_bad_source_row_is_skipped_with_its_reason(tmp_path, case, importer, good, bad, words):
    src = tmp_path / f"{case}.jsonl"
    src.write_bytes(BOM + good + b"\n" + bad + b"\n" + good + b"\n")  # a byte-order mark before line 1 is fine
    records, report = importer(src)
    assert len(records) == 2 and report.read == 3
    assert [s["line"] for s in report.skipped] == [2] and words in report.skipped[0]["reason"], report.skipped
    src.write_bytes(bad + b"\n")
    with pytest.raises(DataError, match=rf"{case}\.jsonl: no record could be converted \(1 read\): line 1: .*{re.escape(words)}"):
        importer(src)


def test_an_unreadable_source_file_is_one_clear_error(tmp_path):
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(gzip.compress(GOOD_HH * 200)[:60])
    with pytest.raises(DataError, match="cut.jsonl.gz: cannot be read"):
        import_hh_rlhf(gz)
    bad_json = tmp_path / "list.json"
    bad_json.write_text('[{"instruction": "x", "output": NaN}]')
    with pytest.raises(DataError, match="list.json: NaN is not a number"):
        import_alpaca(bad_json)


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


def test_a_dataset_in_the_hub_layout_imports_by_id_split_and_subfolder(tmp_path, monkeypatch):
    """`data import` takes what `datasets.load_dataset` takes: a hub id (which needs network, absent here) or a
    dataset folder in the hub's layout, read through the same path; an unreachable id is one clear line."""
    rows = [{"chosen": f"\n\nHuman: Q{i}?\n\nAssistant: good {i}", "rejected": f"\n\nHuman: Q{i}?\n\nAssistant: bad {i}"}
            for i in range(5)]
    repo = tmp_path / "hh-rlhf"
    for sub, split, n in (("harmless-base", "test", 3), ("harmless-base", "train", 2), ("helpful-base", "test", 1)):
        (repo / sub).mkdir(parents=True, exist_ok=True)
        with gzip.open(repo / sub / f"{split}.jsonl.gz", "wt") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows[:n])
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(app, ["data", "import", "hh-rlhf", str(repo), str(out), "--split", "test",
                                   "--data-dir", "harmless-base"])
    assert res.exit_code == 0, res.output
    comps = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(c["prompt"], c["responses"], c["ranking"]) for c in comps] == \
        [(f"Q{i}?", [f"good {i}", f"bad {i}"], [0, 1]) for i in range(3)]  # the test split of harmless-base only
    assert "read 3, wrote 3" in res.output
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    res = CliRunner().invoke(app, ["data", "import", "hh-rlhf", "nobody/no-such-dataset", str(out)])
    assert res.exit_code == 2 and "nobody/no-such-dataset[train]: cannot load the dataset" in res.output
    assert "needs network access" in res.output and "Traceback" not in res.output
