"""Great Expectations suites: each kind of bad row is caught, named by line and
expectation, and quarantined; good data passes; leakage between splits is found."""
import json
import subprocess
import sys
from contextlib import nullcontext

import pytest

from instructflow.config import ValidateConfig
from instructflow.data.formats import Comparison, Demonstration, PretrainText, Prompt
from instructflow.data.validate import ValidationFailed, validate_datasets, validate_file, validate_inputs
from instructflow.io import BOM, DataError, read_jsonl


def good(kind: str, i: int) -> dict:
    if kind == "demonstrations":
        return {"id": f"d{i}", "prompt": f"Say hello number {i}.", "response": f"Hello {i}!"}
    if kind == "comparisons":
        return {"id": f"c{i}", "prompt": f"Name a colour ({i}).", "responses": ["red", "blue", "green"], "ranking": [2, 0, 1]}
    if kind == "prompts":
        return {"id": f"p{i}", "prompt": f"Write a haiku about {i}."}
    return {"text": f"Document number {i} about rivers."}


def write(path, kind: str, bad: bytes, at: int = 3, n: int = 5) -> int:
    """n good rows with `bad` as line `at`; returns that line number."""
    lines = [json.dumps(good(kind, i)).encode() for i in range(n)]
    lines.insert(at - 1, bad)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return at


def j(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode()


# (case, kind, bad line, words that must appear in its one reason)
CASES = [
    # lines that cannot be read or parsed
    ("not_utf8", "demonstrations", b'{"id": "x", "prompt": "caf\xe9", "response": "ok"}', "not valid UTF-8"),
    ("not_json", "demonstrations", b'{"id": "x", "prompt": "hi", "response": ', "not valid JSON"),
    ("cut_mid_string", "prompts", b'{"id": "x", "prompt": "hal', "not valid JSON"),
    ("trailing_comma", "prompts", b'{"id": "x", "prompt": "hi",}', "not valid JSON"),
    ("not_an_object", "prompts", b'["a", "list"]', "the line is a list, not a JSON object"),
    ("a_bare_number", "pretrain", b"42", "the line is an integer, not a JSON object"),
    ("nan_score", "comparisons", b'{"id": "x", "prompt": "q", "responses": ["a", "b"], "scores": [NaN, 1]}', "NaN is not a number"),
    ("infinite_score", "comparisons", b'{"id": "x", "prompt": "q", "responses": ["a", "b"], "scores": [Infinity, 1]}',
     "Infinity is not a number"),
    ("minus_infinity", "comparisons", b'{"id": "x", "prompt": "q", "responses": ["a", "b"], "scores": [0, -Infinity]}',
     "-Infinity is not a number"),
    ("lone_surrogate", "prompts", b'{"id": "x", "prompt": "broken \\ud800 text"}', "field 'prompt' holds a lone surrogate \\ud800"),
    ("lone_surrogate_in_a_response", "comparisons", b'{"id": "x", "prompt": "q", "responses": ["a", "\\udfff"], "ranking": [0, 1]}',
     "field 'responses[1]' holds a lone surrogate"),
    ("duplicate_key", "prompts", b'{"id": "x", "prompt": "one", "prompt": "two"}', "field 'prompt' appears twice"),
    ("nested_too_deeply", "prompts", b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    # records with the wrong fields or types
    ("missing_field", "demonstrations", j({"id": "x", "prompt": "hi"}), "field 'response' is missing"),
    ("wrong_type", "prompts", j({"id": "x", "prompt": 42}), "field 'prompt' must be a string, not an integer"),
    ("null_id", "prompts", j({"id": None, "prompt": "hi"}), "field 'id' must be a string, not null"),
    ("unknown_field", "demonstrations", j({"id": "x", "prompt": "hi", "response": "yo", "answer": "?"}),
     "field 'answer' is not a demonstrations field"),
    ("pretrain_misnamed_field", "pretrain", j({"txt": "a document"}), "field 'txt' is not a pretrain field"),
    ("responses_not_a_list", "comparisons", j({"id": "x", "prompt": "q", "responses": "a or b", "ranking": [0, 1]}),
     "field 'responses' must be a list, not a string"),
    ("response_not_text", "comparisons", j({"id": "x", "prompt": "q", "responses": ["a", 3], "ranking": [0, 1]}),
     "field 'responses[1]' must be a string, not an integer"),
    ("ranking_of_booleans", "comparisons", j({"id": "x", "prompt": "q", "responses": ["a", "b"], "ranking": [True, False]}),
     "field 'ranking[0]' must be an integer, not a boolean"),
    ("score_as_text", "comparisons", j({"id": "x", "prompt": "q", "responses": ["a", "b"], "scores": ["1", 0]}),
     "field 'scores[0]' must be a number, not a string"),
    ("meta_not_an_object", "prompts", j({"id": "x", "prompt": "hi", "meta": "source"}), "field 'meta' must be an object, not a string"),
    ("category_a_number", "demonstrations", j({"id": "x", "prompt": "hi", "response": "yo", "category": 3}),
     "field 'category' must be a string, not an integer"),
    # content the suite rejects
    ("empty_id", "prompts", j({"id": " ", "prompt": "hi"}), "id is not empty"),
    ("whitespace_prompt", "prompts", j({"id": "x", "prompt": "  \t "}), "prompt is not empty or whitespace"),
    ("empty_text", "pretrain", j({"text": ""}), "text is not empty or whitespace"),
    ("whitespace_response", "demonstrations", j({"id": "x", "prompt": "hi", "response": "\n"}), "response is not empty"),
    ("too_long", "demonstrations", j({"id": "x", "prompt": "hi", "response": "a" * 9000}), "at most 8000 characters"),
    ("too_long_response_in_comparison", "comparisons", j({"id": "x", "prompt": "q", "responses": ["a" * 9000, "b"], "ranking": [0, 1]}),
     "every response is at most 8000 characters"),
    ("control_char", "demonstrations", j({"id": "x", "prompt": "bell\u0007 here", "response": "ok"}), "control characters"),
    ("control_char_in_a_response", "comparisons", j({"id": "x", "prompt": "q", "responses": ["a\u0000", "b"], "ranking": [0, 1]}),
     "responses have no control characters"),
    ("replacement_char", "pretrain", j({"text": "mojibake \ufffd text"}), "control characters or U+FFFD"),
    ("duplicate_id", "prompts", j({"id": "p1", "prompt": "another prompt"}), "id is unique"),
    ("no_responses", "comparisons", j({"id": "x", "prompt": "q", "responses": [], "ranking": []}), "between 2 and 9"),
    ("k_too_small", "comparisons", j({"id": "x", "prompt": "q", "responses": ["only one"], "ranking": [0]}), "between 2 and 9"),
    ("k_too_large", "comparisons", j({"id": "x", "prompt": "q", "responses": [f"r{i}" for i in range(10)],
                                      "ranking": list(range(10))}), "between 2 and 9"),
    ("ranking_not_permutation", "comparisons", j({"id": "x", "prompt": "q", "responses": ["a", "b", "c"], "ranking": [0, 0, 1]}),
     "permutation"),
    ("ranking_out_of_range", "comparisons", j({"id": "x", "prompt": "q", "responses": ["a", "b"], "ranking": [0, 2]}), "permutation"),
    ("duplicate_responses", "comparisons", j({"id": "x", "prompt": "q", "responses": ["same", "other", "same "], "ranking": [0, 1, 2]}),
     "distinct"),
    ("ranking_and_scores", "comparisons", j({"id": "x", "prompt": "q", "responses": ["a", "b"], "ranking": [0, 1], "scores": [1, 0]}),
     "exactly one"),
    ("no_order", "comparisons", j({"id": "x", "prompt": "q", "responses": ["a", "b"]}), "exactly one"),
    ("scores_wrong_length", "comparisons", j({"id": "x", "prompt": "q", "responses": ["a", "b", "c"], "scores": [1, 2]}),
     "scores has K numbers"),
    ("empty_response", "comparisons", j({"id": "x", "prompt": "q", "responses": ["a", " "], "ranking": [0, 1]}),
     "no response is empty"),
]


@pytest.mark.parametrize("case,kind,bad,words", CASES, ids=[c[0] for c in CASES])
def test_each_kind_of_bad_row_gets_one_reason_and_is_quarantined(tmp_path, case, kind, bad, words):
    path = tmp_path / f"{case}.jsonl"
    line = write(path, kind, bad)
    report = validate_file(path, kind, ValidateConfig(), tmp_path / "q")
    assert [f.lines for f in report.failures] == [[line]], report.summary()  # one reason, and the good rows are not blamed
    assert words in report.failures[0].description, report.failures[0].description
    q = [json.loads(x) for x in report.quarantine.read_text().splitlines()]
    assert [r["line"] for r in q] == [line] and q[0]["file"] == str(path)
    assert len(q[0]["reasons"]) == 1 and words in q[0]["reasons"][0]
    msg = report.summary()
    assert str(path) in msg and f"lines {line}" in msg and words in msg
    with pytest.raises(DataError, match=rf"{case}\.jsonl:") if case not in CONTENT_ONLY else nullcontext():
        read_jsonl(path, MODELS[kind])  # what training reads refuses the line too, naming it


# The suite's content checks that pydantic's record types do not make (whole-file or configurable ones).
CONTENT_ONLY = {"duplicate_id", "too_long", "too_long_response_in_comparison", "control_char", "control_char_in_a_response",
                "replacement_char", "duplicate_responses"}
MODELS = {"prompts": Prompt, "demonstrations": Demonstration, "comparisons": Comparison, "pretrain": PretrainText}


def test_a_byte_order_mark_before_the_first_line_is_accepted(tmp_path):
    for kind in ("prompts", "comparisons"):
        path = tmp_path / f"bom-{kind}.jsonl"
        path.write_bytes(BOM + b"".join(json.dumps(good(kind, i)).encode() + b"\r\n" for i in range(3)))
        assert validate_file(path, kind).ok
        assert len(read_jsonl(path, MODELS[kind])) == 3


def test_many_bad_lines_with_one_reason_are_reported_once(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join(json.dumps({"id": f"x{i}", "prompt": i}) + "\n" for i in range(30)))
    report = validate_file(path, "prompts")
    assert len(report.failures) == 1 and len(report.failures[0].lines) == 30
    assert "lines 1, 2, 3" in report.summary() and "(+20 more)" in report.summary()


@pytest.mark.parametrize("kind", ["prompts", "demonstrations", "comparisons", "pretrain"])
def test_good_data_passes(tmp_path, kind):
    path = tmp_path / "ok.jsonl"
    path.write_text("".join(json.dumps(good(kind, i)) + "\n" for i in range(20)))
    report = validate_file(path, kind, ValidateConfig(), tmp_path / "q")
    assert report.ok and report.rows == 20 and report.quarantine is None


def test_scores_with_ties_are_valid(tmp_path):
    path = tmp_path / "scores.jsonl"
    rows = [{"id": f"s{i}", "prompt": f"q{i}", "responses": ["a", "b", "c"], "scores": [1, 1, 0.5]} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert validate_file(path, "comparisons").ok


def test_empty_file_is_rejected(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    report = validate_file(path, "prompts")
    assert not report.ok and "at least one record" in report.summary()


def test_leakage_between_train_and_validation_is_found(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    train = [good("demonstrations", i) for i in range(6)]
    val = [{"id": "v0", "prompt": "A fresh prompt.", "response": "x"}, {**train[2], "id": "v1"}]
    (data / "sft_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (data / "sft_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in val))
    files = {p.stem: p for p in data.glob("*.jsonl")}
    reports = {r.path.name: r for r in validate_datasets(files, ValidateConfig(), tmp_path / "q")}
    assert reports["sft_train.jsonl"].ok
    leak = reports["sft_val.jsonl"]
    assert not leak.ok and leak.bad_lines == [2] and "training file" in leak.failures[0].description


def test_validate_inputs_raises_with_every_failing_file(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write(a, "demonstrations", j({"id": "x", "prompt": "", "response": "y"}))
    write(b, "pretrain", j({"text": 3}))
    with pytest.raises(ValidationFailed) as err:
        validate_inputs({"demonstrations": (a, "demonstrations"), "pretrain_text": (b, "pretrain")}, ValidateConfig(), tmp_path / "q")
    msg = str(err.value)
    assert "2 file(s)" in msg and f"{a}: 1 row(s)" in msg and f"{b}: field 'text' must be a string, not an integer: lines 3" in msg and "quarantined" in msg


def test_cli_exits_nonzero_with_the_report(tmp_path):
    path = tmp_path / "comparisons.jsonl"
    write(path, "comparisons", j({"id": "x", "prompt": "q", "responses": ["a", "b"], "ranking": [1, 1]}), at=4)
    proc = subprocess.run([sys.executable, "-m", "instructflow.cli", "data", "validate", str(path), "--kind", "comparisons",
                           "--quarantine", str(tmp_path / "q"), "--report", str(tmp_path / "r.json")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{path}: 1 row(s) fail 'ranking is a permutation" in proc.stderr and "lines 4" in proc.stderr
    assert (tmp_path / "q" / "comparisons.quarantine.jsonl").exists()
    assert json.loads((tmp_path / "r.json").read_text())["failures"][0]["lines"] == [4]
    ok = tmp_path / "ok.jsonl"
    ok.write_text(json.dumps(good("prompts", 0)) + "\n")
    proc = subprocess.run([sys.executable, "-m", "instructflow.cli", "data", "validate", str(ok), "--kind", "prompts"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and "all expectations met" in proc.stdout
