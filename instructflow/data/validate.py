"""Data validation with Great Expectations: bad data is rejected before any
training starts.

Each JSONL file is read leniently (a line that is not UTF-8, not JSON or not an
object becomes a row that fails, instead of stopping the read), flattened into
a DataFrame with a few derived columns (the number of responses, whether the
ranking is a permutation, ...), and checked against the expectation suite of
its kind: prompts, demonstrations, comparisons or pretrain text. A report
names the file, the failed expectation and the line numbers; the failing rows
are copied, with their reasons, to a quarantine file.

    validate_file(path, kind)                  -> FileReport
    validate_dataset_dir(data_dir, cfg, out)   -> the `validate` stage's checks
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ValidateConfig
from ..io import BOM, DataError, LineError, parse_json_line, write_jsonl
from .formats import MAX_K, MIN_K

log = logging.getLogger(__name__)

KINDS = ("prompts", "demonstrations", "comparisons", "pretrain")
# C0 control characters other than tab, newline and carriage return; DEL; and
# U+FFFD, which marks text that was decoded from bad bytes somewhere upstream.
CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]"
# Fields and their JSON types: the schema of each kind (formats.py has the pydantic models).
SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    "prompts": {"id": (str,), "prompt": (str,)},
    "demonstrations": {"id": (str,), "prompt": (str,), "response": (str,)},
    "comparisons": {"id": (str,), "prompt": (str,), "responses": (list,)},
    "pretrain": {"text": (str,)},
}
OPTIONAL = {"category": (str,), "meta": (dict,), "labeler": (str,), "ranking": (list,), "scores": (list,)}
ITEMS = {"responses": ((str,), "a string"), "ranking": ((int,), "an integer"), "scores": ((int, float), "a number")}
ALLOWED = {
    "prompts": {"id", "prompt", "category", "meta"},
    "demonstrations": {"id", "prompt", "response", "category", "meta", "labeler"},
    "comparisons": {"id", "prompt", "responses", "ranking", "scores", "category", "meta", "labeler"},
    "pretrain": {"text"},
}


STRUCTURE = "record_structure"  # a line that cannot be read, parsed or typed: checked before the suite


@dataclass
class Failure:
    expectation: str
    column: str
    description: str
    lines: list[int]

    def message(self, path: Path, shown: int) -> str:
        if not self.lines:  # a whole-file expectation
            return f"{path}: fails '{self.description}' [{self.expectation}]: it has no records"
        more = f" (+{len(self.lines) - shown} more)" if len(self.lines) > shown else ""
        lines = ", ".join(map(str, self.lines[:shown]))
        if self.expectation == STRUCTURE:
            return f"{path}: {self.description}: lines {lines}{more}"
        return f"{path}: {len(self.lines)} row(s) fail '{self.description}' [{self.expectation} on '{self.column}']: lines {lines}{more}"


@dataclass
class FileReport:
    path: Path
    kind: str
    rows: int
    failures: list[Failure] = field(default_factory=list)
    quarantine: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def bad_lines(self) -> list[int]:
        return sorted({n for f in self.failures for n in f.lines})

    def as_dict(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "rows": self.rows, "ok": self.ok,
                "bad_rows": len(self.bad_lines), "quarantine": str(self.quarantine) if self.quarantine else None,
                "failures": [{"expectation": f.expectation, "column": f.column, "description": f.description,
                              "count": len(f.lines), "lines": f.lines[:1000]} for f in self.failures]}

    def summary(self, shown: int = 10) -> str:
        if self.ok:
            return f"{self.path}: {self.rows} rows of {self.kind}, all expectations met"
        return "\n".join(f.message(self.path, shown) for f in self.failures)


class ValidationFailed(DataError):
    """Data that failed its expectations; the message is the report."""

    def __init__(self, reports: list[FileReport], shown: int = 10) -> None:
        self.reports = reports
        bad = [r for r in reports if not r.ok]
        text = "\n".join(r.summary(shown) for r in bad)
        where = "; ".join(f"{r.quarantine}" for r in bad if r.quarantine)
        super().__init__(f"data validation failed in {len(bad)} file(s):\n{text}"
                         + (f"\nfailing rows quarantined to: {where}" if where else ""))


# ---------------------------------------------------------------- reading rows

def read_rows(path: Path) -> list[dict[str, Any]]:
    """One dict per non-blank line, never raising on content. A line that cannot
    be read or parsed gets `_problem`: its one reason."""
    rows = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip() or (lineno == 1 and not raw.removeprefix(BOM).strip()):
                continue
            row: dict[str, Any] = {"_line": lineno, "_raw": raw, "_obj": {}, "_problem": None}
            try:
                row["_obj"] = parse_json_line(raw, lineno)
            except LineError as err:
                row["_problem"] = str(err)
            rows.append(row)
    return rows


TYPE_NAMES = {str: "a string", list: "a list", dict: "an object", int: "an integer", float: "a number"}


def _json_type(v: Any) -> str:
    return "null" if v is None else "a boolean" if isinstance(v, bool) else TYPE_NAMES[type(v)]


def _is_type(v: Any, types: tuple[type, ...]) -> bool:
    return isinstance(v, types) and not isinstance(v, bool)


def structure_problem(obj: Any, kind: str) -> str | None:
    """Why a parsed line is not a record of `kind` (the first reason, naming the
    field), or None. Content (lengths, rankings, duplicates) is the suite's."""
    if not isinstance(obj, dict):
        return f"the line is {_json_type(obj)}, not a JSON object"
    foreign = foreign_layout(obj)
    if foreign:
        return foreign
    allowed = ALLOWED[kind]
    for k in obj:
        if k not in allowed:
            return f"field '{k}' is not a {kind} field (those are: {', '.join(sorted(allowed))})"
    for k, types in SCHEMA[kind].items():
        if k not in obj:
            return f"field '{k}' is missing"
        if not _is_type(obj[k], types):
            return f"field '{k}' must be {TYPE_NAMES[types[0]]}, not {_json_type(obj[k])}"
    for k, types in OPTIONAL.items():
        if k in allowed and obj.get(k) is not None and not _is_type(obj[k], types):
            return f"field '{k}' must be {TYPE_NAMES[types[0]]}, not {_json_type(obj[k])}"
    for k, (types, name) in ITEMS.items():
        for i, v in enumerate(obj.get(k) or [] if k in allowed else []):
            if not _is_type(v, types):
                return f"field '{k}[{i}]' must be {name}, not {_json_type(v)}"
    return None


# Public layouts a user may hand over as they are, and the importer that converts each (data/importers.py).
LAYOUTS = (({"prompt", "chosen", "rejected"}, "TRL's preference layout (prompt/chosen/rejected)", "trl-preference"),
           ({"chosen", "rejected"}, "HH-RLHF's layout (chosen/rejected dialogs)", "hh-rlhf"),
           ({"instruction", "output"}, "Alpaca's layout (instruction/input/output)", "alpaca"),
           ({"instruction", "instances"}, "Alpaca's seed-task layout (instruction/instances)", "alpaca"))


def foreign_layout(obj: dict) -> str | None:
    """A row in a public layout instead of instructflow's: what it is and the command that converts it."""
    for keys, what, layout in LAYOUTS:
        if keys <= obj.keys():
            return (f"this row is in {what}, not instructflow's: convert the file with "
                    f"`instructflow data import {layout} FILE OUT.jsonl`, then validate OUT.jsonl")
    return None


def _text(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _comparison_columns(obj: dict) -> dict[str, Any]:
    """Derived columns of a comparison whose fields have the right types (structure_problem)."""
    texts, ranking, scores = obj["responses"], obj.get("ranking"), obj.get("scores")
    k = len(texts)
    return {
        "k": k,
        "one_order": (ranking is None) != (scores is None),
        "ranking_ok": (ranking is None or sorted(ranking) == list(range(k))) and (scores is None or len(scores) == k),
        "responses_distinct": len({t.strip() for t in texts}) == k,
        "shortest_response": min((len(t.strip()) for t in texts), default=None),  # none: k fails, alone
        "longest_response": max((len(t) for t in texts), default=None),
        "responses_joined": "\n".join(texts),
    }


def to_frame(rows: list[dict], kind: str, seen_prompts: dict[str, str] | None = None):
    """Flatten rows into the DataFrame the suite checks (one row per line)."""
    import pandas as pd

    recs, seen_ids = [], set()
    for r in rows:
        obj = r["_obj"]
        rec: dict[str, Any] = {"_line": r["_line"]}
        if kind != "pretrain":
            rec["id"] = _text(obj.get("id"))
            rec["id_repeated"] = rec["id"] is not None and rec["id"] in seen_ids  # the first use is kept
            seen_ids.add(rec["id"])
            rec["prompt"] = _text(obj.get("prompt"))
            rec["leaks_from"] = (seen_prompts or {}).get(rec["prompt"] or "", "")
        if kind == "demonstrations":
            rec["response"] = _text(obj.get("response"))
        if kind == "comparisons":
            rec.update(_comparison_columns(obj))
        if kind == "pretrain":
            rec["text"] = _text(obj.get("text"))
            rec["leaks_from"] = (seen_prompts or {}).get(rec["text"] or "", "")
        recs.append(rec)
    return pd.DataFrame.from_records(recs) if recs else pd.DataFrame()


# ---------------------------------------------------------------- the suites

def expectations(kind: str, cfg: ValidateConfig) -> list[tuple[Any, str]]:
    """(GX expectation, what it means in words) for one dataset kind."""
    import great_expectations as gx

    E = gx.expectations
    out: list[tuple[Any, str]] = []
    texts = {"prompts": [("prompt", cfg.max_prompt_chars)],
             "demonstrations": [("prompt", cfg.max_prompt_chars), ("response", cfg.max_response_chars)],
             "comparisons": [("prompt", cfg.max_prompt_chars)],
             "pretrain": [("text", cfg.max_text_chars)]}[kind]
    if kind != "pretrain":
        out += [(E.ExpectColumnValuesToMatchRegex(column="id", regex=r"\S"), "id is not empty or whitespace"),
                (E.ExpectColumnValuesToBeInSet(column="id_repeated", value_set=[False]), "id is unique in the file")]
    for col, limit in texts:
        out += [
            (E.ExpectColumnValuesToMatchRegex(column=col, regex=r"\S"), f"{col} is not empty or whitespace"),
            (E.ExpectColumnValueLengthsToBeBetween(column=col, max_value=limit), f"{col} is at most {limit} characters"),
            (E.ExpectColumnValuesToNotMatchRegex(column=col, regex=CONTROL), f"{col} has no control characters or U+FFFD"),
        ]
    if kind == "comparisons":
        out += [
            (E.ExpectColumnValuesToBeBetween(column="k", min_value=MIN_K, max_value=MAX_K), f"between {MIN_K} and {MAX_K} responses"),
            (E.ExpectColumnValuesToBeBetween(column="shortest_response", min_value=1), "no response is empty or whitespace"),
            (E.ExpectColumnValuesToBeBetween(column="longest_response", max_value=cfg.max_response_chars),
             f"every response is at most {cfg.max_response_chars} characters"),
            (E.ExpectColumnValuesToBeInSet(column="responses_distinct", value_set=[True]), "responses within a comparison are distinct"),
            (E.ExpectColumnValuesToBeInSet(column="one_order", value_set=[True]), "exactly one of 'ranking' or 'scores'"),
            (E.ExpectColumnValuesToBeInSet(column="ranking_ok", value_set=[True]),
             "ranking is a permutation of 0..K-1 (or scores has K numbers)"),
            (E.ExpectColumnValuesToNotMatchRegex(column="responses_joined", regex=CONTROL), "responses have no control characters or U+FFFD"),
        ]
    out.append((E.ExpectColumnValuesToBeInSet(column="leaks_from", value_set=[""]),
                "prompt (or text) does not also appear in a training file"))
    return out


_CONTEXT = None


def _gx_context():
    """One ephemeral GX context per process (creating one costs ~0.5 s)."""
    global _CONTEXT
    if _CONTEXT is None:
        os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
        import great_expectations as gx

        ctx = gx.get_context(mode="ephemeral")
        ctx.variables.progress_bars = {"globally": False, "metric_calculations": False}
        _CONTEXT = ctx
    return _CONTEXT


def run_suite(df, kind: str, cfg: ValidateConfig) -> list[Failure]:
    """Run the kind's suite on `df`; return the failed expectations with their lines."""
    import great_expectations as gx

    ctx = _gx_context()
    name = f"instructflow-{kind}"
    try:  # rebuilt each time: the limits come from this call's cfg
        ctx.suites.delete(name)
    except Exception:  # noqa: BLE001 - GX raises its own not-found types
        pass
    suite = ctx.suites.add(gx.ExpectationSuite(name=name))
    described = {}
    for exp, words in expectations(kind, cfg):
        suite.add_expectation(exp)
        described[(exp.expectation_type, exp.column)] = words
    try:
        ds = ctx.data_sources.get("instructflow")
    except (KeyError, ValueError):
        ds = ctx.data_sources.add_pandas("instructflow")
    asset_name = f"{kind}-{id(df)}"
    batch_def = ds.add_dataframe_asset(asset_name).add_batch_definition_whole_dataframe("all")
    try:
        result = batch_def.get_batch(batch_parameters={"dataframe": df}).validate(
            suite, result_format={"result_format": "COMPLETE"})
    finally:
        ds.delete_asset(asset_name)
    failures = []
    for r in result.results:
        if r.success:
            continue
        cfg_ = r.expectation_config
        column = cfg_.kwargs.get("column", "")
        if r.exception_info and r.exception_info.get("raised_exception"):
            raise RuntimeError(f"expectation {cfg_.type} on '{column}' could not run: {r.exception_info.get('exception_message')}")
        index = r.result.get("unexpected_index_list") or []
        lines = sorted(int(df.loc[i, "_line"]) for i in index)
        failures.append(Failure(cfg_.type, column, described.get((cfg_.type, column), cfg_.type), lines))
    return failures


def validate_file(path: str | Path, kind: str, cfg: ValidateConfig | None = None,
                  quarantine_dir: Path | None = None, seen_prompts: dict[str, str] | None = None) -> FileReport:
    """Check one JSONL file against its kind's suite. `seen_prompts` maps the
    prompts (or texts) of training files to that file's name, to catch
    leakage into a validation or evaluation file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return validate_rows(path, read_rows(path), kind, cfg, quarantine_dir, seen_prompts)


def validate_rows(path: Path, rows: list[dict], kind: str, cfg: ValidateConfig | None = None,
                  quarantine_dir: Path | None = None, seen_prompts: dict[str, str] | None = None) -> FileReport:
    """validate_file on rows already read with read_rows."""
    cfg = cfg or ValidateConfig()
    if kind not in KINDS:
        raise ValueError(f"unknown dataset kind '{kind}'; choose one of {', '.join(KINDS)}")
    report = FileReport(path, kind, len(rows))
    if not rows:
        report.failures.append(Failure("expect_table_row_count_to_be_between", "(table)", "file has at least one record", []))
        return report
    problems: dict[str, list[int]] = {}
    sound = []
    for r in rows:
        problem = r["_problem"] or structure_problem(r["_obj"], kind)
        if problem:
            problems.setdefault(problem, []).append(r["_line"])
        else:
            sound.append(r)
    report.failures = [Failure(STRUCTURE, "(line)", reason, lines) for reason, lines in problems.items()]
    if sound:
        report.failures += run_suite(to_frame(sound, kind, seen_prompts), kind, cfg)
    if report.failures and quarantine_dir is not None:
        report.quarantine = write_quarantine(path, rows, report, quarantine_dir)
    return report


def write_quarantine(path: Path, rows: list[dict], report: FileReport, out_dir: Path) -> Path:
    """Copy every failing row, with its line number and reasons, to <out_dir>/<name>.quarantine.jsonl."""
    reasons: dict[int, list[str]] = {}
    for f in report.failures:
        for n in f.lines:
            reasons.setdefault(n, []).append(f.description)
    dest = out_dir / f"{path.stem}.quarantine.jsonl"
    recs = [{"file": str(path), "line": r["_line"], "reasons": reasons[r["_line"]],
             "raw": r["_raw"].decode("utf-8", errors="replace").rstrip("\n")}
            for r in rows if r["_line"] in reasons]
    write_jsonl(dest, recs)
    return dest


# ---------------------------------------------------------------- the stage

# The datasets the `data` stage writes, by file stem: their kind, and the
# training files whose prompts must not reappear in them (leakage).
DATASETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "pretrain_train": ("pretrain", ()),
    "pretrain_heldout": ("pretrain", ("pretrain_train",)),
    "sft_train": ("demonstrations", ()),
    "sft_val": ("demonstrations", ("sft_train",)),
    "rm_prompts_train": ("prompts", ()),
    "rm_prompts_val": ("prompts", ("rm_prompts_train",)),
    "comparisons_train": ("comparisons", ()),
    "comparisons_gold": ("comparisons", ("comparisons_train",)),
    "comparisons_val": ("comparisons", ("comparisons_train", "comparisons_gold")),
    "ppo_prompts": ("prompts", ()),
    "eval_prompts": ("prompts", ("sft_train", "rm_prompts_train", "comparisons_train", "comparisons_gold", "ppo_prompts")),
}


def _field_values(rows: list[dict], kind: str) -> list[str]:
    key = "text" if kind == "pretrain" else "prompt"
    return [r["_obj"][key] for r in rows if isinstance(r["_obj"], dict) and isinstance(r["_obj"].get(key), str)]


def validate_datasets(files: dict[str, Path], cfg: ValidateConfig, quarantine_dir: Path) -> list[FileReport]:
    """Validate the datasets {name: path} the data stage wrote, including leakage from training files."""
    present = {stem: Path(files[stem]) for stem in DATASETS if stem in files and Path(files[stem]).exists()}
    if not present:
        raise DataError(f"no datasets to validate (expected some of {', '.join(DATASETS)})")
    rows = {stem: read_rows(path) for stem, path in present.items()}  # each file read once
    reports = []
    for stem, path in present.items():
        kind, sources = DATASETS[stem]
        seen: dict[str, str] = {}
        for src in sources:
            if src in present:
                for v in _field_values(rows[src], DATASETS[src][0]):
                    seen.setdefault(v, f"{src}.jsonl")
        reports.append(validate_rows(path, rows[stem], kind, cfg, quarantine_dir, seen))
    return reports


def validate_inputs(files: dict[str, tuple[str | Path, str]], cfg: ValidateConfig, quarantine_dir: Path) -> None:
    """Validate named input files {name: (path, kind)}; raise ValidationFailed on any failure."""
    reports = [validate_file(path, kind, cfg, quarantine_dir) for path, kind in files.values()]
    if any(not r.ok for r in reports):
        raise ValidationFailed(reports, cfg.max_failed_rows_shown)
