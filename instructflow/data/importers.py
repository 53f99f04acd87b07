"""Importers from public layouts into instructflow's formats.

- HH-RLHF (`{"chosen": dialog, "rejected": dialog}`) -> K=2 comparisons.
- Alpaca (`instruction`/`input`/`output`) and its seed-task layout
  (`instruction`/`instances: [{input, output}]`) -> demonstrations.
- TRL's preference layout (`prompt`/`chosen`/`rejected`, plain strings or
  conversational message lists) -> K=2 comparisons.

Rows that cannot be converted faithfully are skipped and *reported* (line and
reason) rather than guessed at; the report is returned and written beside the
output.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..io import DataError
from .formats import Comparison, Demonstration

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"


@dataclass
class ImportReport:
    source: str
    read: int = 0
    written: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def skip(self, line: int, reason: str) -> None:
        self.skipped.append({"line": line, "reason": reason})

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "read": self.read, "written": self.written,
                "skipped_count": len(self.skipped), "skipped": self.skipped}


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def _rows(path: str | Path):
    """Yield (line number, JSON object) from .jsonl, .jsonl.gz or a .json list."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records")
        yield from enumerate(data, start=1)
        return
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}: not valid JSON: {err.msg}") from None


def _require(obj: Any, keys: tuple[str, ...], path, lineno) -> None:
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object")
    for k in keys:
        if k not in obj:
            raise DataError(f"{path}:{lineno}: field '{k}' is missing")


def split_hh_dialog(chosen: str, rejected: str) -> tuple[str, str, str] | str:
    """Split an HH-RLHF pair into (prompt, chosen response, rejected response).

    The prompt is the dialog up to and including chosen's final "Assistant:"
    turn; it must also prefix `rejected`. Returns a reason string when the pair
    cannot be split faithfully. The prompt is stored without the leading
    "Human:" and trailing "Assistant:" markers, which the chat template adds back.
    """
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        return "chosen has no '\\n\\nAssistant:' turn"
    prefix = chosen[: cut + len(ASSISTANT)]
    if not rejected.startswith(prefix):
        return "chosen and rejected do not share the dialog up to the last assistant turn"
    a, b = chosen[len(prefix):].strip(), rejected[len(prefix):].strip()
    if not a or not b:
        return "empty final assistant response"
    if a == b:
        return "chosen and rejected responses are identical"
    body = prefix[: -len(ASSISTANT)]
    if body.startswith(HUMAN):
        body = body[len(HUMAN):]
    return body.strip(), a, b


def import_hh_rlhf(src: str | Path) -> tuple[list[Comparison], ImportReport]:
    report = ImportReport(str(src))
    out: list[Comparison] = []
    for lineno, row in _rows(src):
        report.read += 1
        _require(row, ("chosen", "rejected"), src, lineno)
        split = split_hh_dialog(row["chosen"], row["rejected"])
        if isinstance(split, str):
            report.skip(lineno, split)
            continue
        prompt, a, b = split
        out.append(Comparison(id=f"hh-{lineno}", prompt=prompt, responses=[a, b], ranking=[0, 1], meta={"source": "hh-rlhf"}))
    report.written = len(out)
    return out, report


def import_alpaca(src: str | Path) -> tuple[list[Demonstration], ImportReport]:
    """Alpaca records or seed tasks; a non-empty `input` is appended to the prompt."""
    report = ImportReport(str(src))
    out: list[Demonstration] = []
    for lineno, row in _rows(src):
        report.read += 1
        _require(row, ("instruction",), src, lineno)
        if "instances" in row:
            instances = row["instances"]
        elif "output" in row:
            instances = [{"input": row.get("input", ""), "output": row["output"]}]
        else:
            raise DataError(f"{src}:{lineno}: field 'output' (or 'instances') is missing")
        for j, inst in enumerate(instances):
            instruction = row["instruction"].strip()
            inp = (inst.get("input") or "").strip()
            output = (inst.get("output") or "").strip()
            if not instruction or not output:
                report.skip(lineno, f"instance {j}: empty instruction or output")
                continue
            prompt = f"{instruction}\n\n{inp}" if inp else instruction
            rid = str(row.get("id", f"alpaca-{lineno}")) + (f"-{j}" if len(instances) > 1 else "")
            cat = "classification" if row.get("is_classification") else None
            out.append(Demonstration(id=rid, prompt=prompt, response=output, category=cat, meta={"source": "alpaca"}))
    report.written = len(out)
    return out, report


def _conversation_to_text(messages: list[dict]) -> str:
    """TRL conversational turns -> the Human/Assistant dialog the template uses."""
    parts = []
    for m in messages:
        role = "Human" if m.get("role") in ("user", "system") else "Assistant"
        parts.append(f"{role}: {m.get('content', '').strip()}")
    text = "\n\n".join(parts)
    return text[len("Human: "):] if text.startswith("Human: ") else text


def import_trl_preference(src: str | Path) -> tuple[list[Comparison], ImportReport]:
    report = ImportReport(str(src))
    out: list[Comparison] = []
    for lineno, row in _rows(src):
        report.read += 1
        _require(row, ("prompt", "chosen", "rejected"), src, lineno)
        p, a, b = row["prompt"], row["chosen"], row["rejected"]
        if isinstance(p, list):
            p = _conversation_to_text(p)
        if isinstance(a, list):
            a = " ".join(m.get("content", "") for m in a)
        if isinstance(b, list):
            b = " ".join(m.get("content", "") for m in b)
        if not all(isinstance(x, str) for x in (p, a, b)):
            raise DataError(f"{src}:{lineno}: prompt/chosen/rejected must be strings or message lists")
        p, a, b = p.strip(), a.strip(), b.strip()
        if not p or not a or not b:
            report.skip(lineno, "empty prompt, chosen or rejected")
            continue
        if a == b:
            report.skip(lineno, "chosen and rejected are identical")
            continue
        out.append(Comparison(id=f"trl-{lineno}", prompt=p, responses=[a, b], ranking=[0, 1], meta={"source": "trl"}))
    report.written = len(out)
    return out, report


IMPORTERS = {"hh-rlhf": import_hh_rlhf, "alpaca": import_alpaca, "trl-preference": import_trl_preference}
