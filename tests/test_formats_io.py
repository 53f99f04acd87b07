import json

import pytest

from instructflow.data.formats import Comparison, Demonstration
from instructflow.io import DataError, atomic_path, content_hash, read_jsonl, write_jsonl


def test_comparison_pairs_from_ranking_and_scores():
    c = Comparison(id="a", prompt="p", responses=["x", "y", "z", "w"], ranking=[2, 0, 3, 1])
    assert c.pairs() == [(2, 0), (2, 3), (2, 1), (0, 3), (0, 1), (3, 1)]  # C(4,2) = 6
    tied = Comparison(id="b", prompt="p", responses=["x", "y", "z"], scores=[1.0, 1.0, 0.0])
    assert sorted(tied.pairs()) == [(0, 2), (1, 2)]  # the tie states no preference


@pytest.mark.parametrize("fields, msg", [
    ({"responses": ["x"], "ranking": [0]}, "2 to 9"),
    ({"responses": ["x"] * 10, "ranking": list(range(10))}, "2 to 9"),
    ({"responses": ["x", "y"], "ranking": [0, 0]}, "permutation"),
    ({"responses": ["x", "y"]}, "exactly one"),
    ({"responses": ["x", "  "], "ranking": [0, 1]}, "empty"),
    ({"responses": ["x", "y"], "scores": [1.0]}, "scores has 1"),
])
def test_comparison_validation(fields, msg):
    with pytest.raises(ValueError, match=msg):
        Comparison(id="c", prompt="p", **fields)


def test_loader_errors_name_file_line_and_field(tmp_path):
    f = tmp_path / "demos.jsonl"
    f.write_text(json.dumps({"id": "1", "prompt": "p", "response": "r"}) + "\n"
                 + json.dumps({"id": "2", "prompt": "p", "response": "   "}) + "\n")
    with pytest.raises(DataError, match=r"demos\.jsonl:2: field 'response': .*empty"):
        read_jsonl(f, Demonstration)
    f.write_text('{"id": "1", "prompt": "p"\n')
    with pytest.raises(DataError, match=r"demos\.jsonl:1: not valid JSON"):
        read_jsonl(f, Demonstration)
    f.write_bytes(b'{"id": "1", "prompt": "\xff", "response": "r"}\n')
    with pytest.raises(DataError, match=r"demos\.jsonl:1: not valid UTF-8"):
        read_jsonl(f, Demonstration)
    f.write_text(json.dumps({"id": "1", "prompt": "p", "response": "r", "extra": 1}) + "\n")
    with pytest.raises(DataError, match=r"field 'extra'"):
        read_jsonl(f, Demonstration)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    f = tmp_path / "out.jsonl"
    write_jsonl(f, [{"a": 1}])
    before = f.read_text()

    def bad_records():
        yield {"a": 2}
        raise RuntimeError("boom mid-write")

    with pytest.raises(RuntimeError):
        write_jsonl(f, bad_records())
    assert f.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]  # no temp file left behind
    with pytest.raises(RuntimeError), atomic_path(f):
        raise RuntimeError


def test_content_hash_of_folders_ignores_checkpoints(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(b"123")
    h = content_hash(tmp_path / "m")
    (tmp_path / "m" / "checkpoint").mkdir()
    (tmp_path / "m" / "checkpoint" / "state").write_bytes(b"x")
    assert content_hash(tmp_path / "m") == h
    (tmp_path / "m" / "w.bin").write_bytes(b"124")
    assert content_hash(tmp_path / "m") != h
