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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ..io import BOM, DataError, LineError, field_error, parse_json_line
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


class _Skip(Exception):
    """A row that cannot be converted faithfully; the message is the reason."""


@dataclass(frozen=True)
class HubSource:
    """A dataset by Hugging Face hub id (or a local dataset folder), read with `datasets.load_dataset`:
    e.g. HubSource("Anthropic/hh-rlhf", split="test", data_dir="harmless-base")."""

    id: str
    split: str = "train"
    data_dir: str | None = None

    def __str__(self) -> str:
        return f"{self.id}[{self.split}]" + (f" ({self.data_dir})" if self.data_dir else "")


def source(src: str | Path, split: str = "train", data_dir: str | None = None) -> Path | HubSource:
    """A file when `src` is one; a folder or an id of the form owner/name is a dataset for `datasets`."""
    path = Path(src)
    if path.is_file():
        return path
    if path.is_dir() or (len(str(src).split("/")) == 2 and not str(src).endswith((".jsonl", ".json", ".gz"))):
        return HubSource(str(src), split, data_dir)
    raise DataError(f"{src}: file not found (give a .jsonl, .jsonl.gz or .json file, or a Hugging Face dataset id "
                    "such as Anthropic/hh-rlhf)")


def _hub_rows(src: HubSource):
    """Yield (row number, record) of a hub dataset's split; the hub needs network access."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"{src}: reading a hub dataset needs the `datasets` package") from None
    datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset(src.id, data_dir=src.data_dir, split=src.split)
    except Exception as err:  # noqa: BLE001 - the hub unreachable, an unknown id or split: one clear line
        raise DataError(f"{src}: cannot load the dataset ({type(err).__name__}: {str(err).splitlines()[0][:300]}); a hub "
                        "id needs network access to huggingface.co, or give a local file") from None
    yield from enumerate(rows, start=1)


def _rows(path: str | Path | HubSource):
    """Yield (line number, JSON object or _Skip) from .jsonl, .jsonl.gz, a .json list or a hub dataset.
    A line that cannot be read becomes a _Skip with the reason; nothing raises per row."""
    if isinstance(path, HubSource):
        yield from _hub_rows(path)
        return
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix == ".json":
        try:
            data = parse_json_line(path.read_bytes(), 1)
        except LineError as err:
            raise DataError(f"{path}: {err}") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records")
        yield from enumerate(data, start=1)
        return
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                if not raw.strip() or (lineno == 1 and not raw.removeprefix(BOM).strip()):
                    continue
                try:
                    yield lineno, parse_json_line(raw, lineno)
                except LineError as err:
                    yield lineno, _Skip(str(err))
    except (OSError, EOFError) as err:  # a truncated or corrupt .gz
        raise DataError(f"{path}: cannot be read: {err}") from None


def _fields(obj: Any, **types: type | tuple[type, ...]) -> dict:
    """`obj`'s named fields, each of the given type (a _Skip naming the first that is not)."""
    if not isinstance(obj, dict):
        raise _Skip(f"expected a JSON object, got {type(obj).__name__}")
    for k, t in types.items():
        if k not in obj:
            raise _Skip(f"field '{k}' is missing")
        if not isinstance(obj[k], t) or isinstance(obj[k], bool):
            raise _Skip(f"field '{k}' has the wrong type ({type(obj[k]).__name__})")
    return obj


def _convert(src, convert) -> tuple[list, ImportReport]:
    """Run `convert(lineno, row) -> records` over every row; rows it cannot convert are
    skipped with their reason. A file from which nothing converts is an error."""
    report = ImportReport(str(src))
    out: list = []
    for lineno, row in _rows(src):
        report.read += 1
        try:
            if isinstance(row, _Skip):
                raise row
            out.extend(convert(lineno, row, report))
        except _Skip as skip:
            report.skip(lineno, str(skip))
        except ValidationError as err:  # converted, but not a valid record (an empty prompt, ...)
            report.skip(lineno, field_error(err))
    report.written = len(out)
    if not out:
        reasons = "; ".join(f"line {s['line']}: {s['reason']}" for s in report.skipped[:3])
        raise DataError(f"{src}: no record could be converted ({report.read} read){': ' + reasons if reasons else ''}")
    return out, report


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
    body = prefix[: -len(ASSISTANT)].removeprefix(HUMAN)
    return body.strip(), a, b


def import_hh_rlhf(src: str | Path) -> tuple[list[Comparison], ImportReport]:
    def convert(lineno: int, row: Any, report: ImportReport) -> list[Comparison]:
        row = _fields(row, chosen=str, rejected=str)
        split = split_hh_dialog(row["chosen"], row["rejected"])
        if isinstance(split, str):
            raise _Skip(split)
        prompt, a, b = split
        return [Comparison(id=f"hh-{lineno}", prompt=prompt, responses=[a, b], ranking=[0, 1], meta={"source": "hh-rlhf"})]

    return _convert(src, convert)


def import_alpaca(src: str | Path) -> tuple[list[Demonstration], ImportReport]:
    """Alpaca records or seed tasks; a non-empty `input` is appended to the prompt."""
    def convert(lineno: int, row: Any, report: ImportReport) -> list[Demonstration]:
        row = _fields(row, instruction=str)
        if "instances" in row:
            instances = _fields(row, instances=list)["instances"]
        elif "output" in row:
            instances = [{"input": row.get("input") or "", "output": row["output"]}]
        else:
            raise _Skip("field 'output' (or 'instances') is missing")
        out = []
        for j, inst in enumerate(instances):
            try:
                inst = _fields(inst, output=str)
                inp = inst.get("input") or ""
                if not isinstance(inp, str):
                    raise _Skip("field 'input' has the wrong type")
            except _Skip as skip:
                raise _Skip(f"instance {j}: {skip}") from None
            instruction, inp, output = row["instruction"].strip(), inp.strip(), inst["output"].strip()
            if not instruction or not output:
                report.skip(lineno, f"instance {j}: empty instruction or output")
                continue
            prompt = f"{instruction}\n\n{inp}" if inp else instruction
            rid = str(row.get("id", f"alpaca-{lineno}")) + (f"-{j}" if len(instances) > 1 else "")
            cat = "classification" if row.get("is_classification") else None
            out.append(Demonstration(id=rid, prompt=prompt, response=output, category=cat, meta={"source": "alpaca"}))
        return out

    return _convert(src, convert)


def _conversation_to_text(messages: list) -> str:
    """TRL conversational turns -> the Human/Assistant dialog the template uses."""
    parts = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("content", ""), str):
            raise _Skip("a message is not an object with a string 'content'")
        role = "Human" if m.get("role") in ("user", "system") else "Assistant"
        parts.append(f"{role}: {m.get('content', '').strip()}")
    return "\n\n".join(parts).removeprefix("Human: ")


def _message_text(messages: list) -> str:
    if not all(isinstance(m, dict) and isinstance(m.get("content", ""), str) for m in messages):
        raise _Skip("a message is not an object with a string 'content'")
    return " ".join(m.get("content", "") for m in messages)


def import_trl_preference(src: str | Path) -> tuple[list[Comparison], ImportReport]:
    def convert(lineno: int, row: Any, report: ImportReport) -> list[Comparison]:
        row = _fields(row, prompt=(str, list), chosen=(str, list), rejected=(str, list))
        p, a, b = row["prompt"], row["chosen"], row["rejected"]
        p = _conversation_to_text(p) if isinstance(p, list) else p
        a, b = (_message_text(x) if isinstance(x, list) else x for x in (a, b))
        p, a, b = p.strip(), a.strip(), b.strip()
        if not p or not a or not b:
            raise _Skip("empty prompt, chosen or rejected")
        if a == b:
            raise _Skip("chosen and rejected are identical")
        return [Comparison(id=f"trl-{lineno}", prompt=p, responses=[a, b], ranking=[0, 1], meta={"source": "trl"})]

    return _convert(src, convert)


IMPORTERS = {"hh-rlhf": import_hh_rlhf, "alpaca": import_alpaca, "trl-preference": import_trl_preference}
