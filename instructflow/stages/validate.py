"""The `validate` stage: every dataset the data stage wrote must meet its Great
Expectations suite (instructflow/data/validate.py) before anything trains.
Output: artifacts/validate/report.json; failing rows in artifacts/validate/quarantine/."""

from __future__ import annotations

from ..context import StageContext
from ..data.validate import ValidationFailed, validate_datasets
from ..io import write_json


def run_validate(ctx: StageContext) -> dict:
    cfg = ctx.params.validate_
    quarantine = ctx.folder / "quarantine"
    if quarantine.exists():
        for f in quarantine.glob("*.jsonl"):
            f.unlink()
    with ctx.phase("validate"):
        reports = validate_datasets({name: ctx.input(name) for name in ctx.spec.inputs}, cfg, quarantine)
    report = {"ok": all(r.ok for r in reports), "files": [r.as_dict() for r in reports]}
    write_json(ctx.output("report"), report)
    if not report["ok"]:
        raise ValidationFailed(reports, cfg.max_failed_rows_shown)
    return {"files": len(reports), "rows": sum(r.rows for r in reports)}
