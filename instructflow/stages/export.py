"""The `export` and `round_export` stages: the RM to ONNX with a parity check against
torch (instructflow/serving/onnx.py); what the endpoint serves and a promotion publishes.
Output: artifacts/<stage>/rm/ (model.onnx, tokenizer, probes.json, manifest.json last)."""

from __future__ import annotations

import logging

from ..context import StageContext
from ..serving.onnx import export_reward_model

log = logging.getLogger(__name__)


def run_export(ctx: StageContext) -> dict:
    cfg, rm = ctx.params.export, ctx.output("rm")
    with ctx.phase("export"):
        manifest = export_reward_model(ctx.input("reward_model"), rm, cfg.opset, cfg.parity_tolerance,
                                       [tuple(c) for c in cfg.parity_cases])
    metrics = {"model_version": manifest["model_version"], "parity_max_abs_diff": manifest["parity"]["max_abs_diff"],
               "parity_cases": len(manifest["parity"]["cases"]), "opset": manifest["opset"],
               "export_seconds": manifest["export_seconds"], "onnx_bytes": (rm / "model.onnx").stat().st_size}
    log.info("%s: %s", ctx.name, metrics)
    return metrics
