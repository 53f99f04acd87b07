"""The reward model as ONNX, checked against torch (the `export` and `round_export` stages).

Output folder (artifacts/export/rm/): model.onnx, the tokenizer files,
probes.json (a few texts and their torch scores, which a server checks again
before it serves the folder) and manifest.json. The graph maps (input_ids, attention_mask), right-padded, to
one score per row: the RM's head read at the last attended token, with the
centring bias (`reward_bias`) added, so a served score equals
`instructflow.lm.modeling.reward_scores` on the same tokens.

A parity check is part of the export: ONNX Runtime (CPU, and CUDA where it
runs) against the torch RM on several batch sizes and sequence lengths,
including lengths never seen at export and padded rows; a max abs difference
above `parity_tolerance` fails the stage and nothing is published. The folder
is written beside its final place and renamed in, manifest last, so a reader
never sees half an export.
"""

from __future__ import annotations

import ctypes.util
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from ..io import content_hash, sha256_file, swap_in, writing_folder
from ..lm.modeling import backbone, context_length, load_reward_model, position_ids_from_mask, reward_bias, score_head

log = logging.getLogger(__name__)

INPUT_NAMES = ["input_ids", "attention_mask"]
OUTPUT_NAMES = ["scores"]
MANIFEST = "manifest.json"


class ExportError(RuntimeError):
    """The exported graph does not reproduce the torch model."""


class ScoreGraph(torch.nn.Module):
    """scores[b] = head(hidden[b, last attended token]) + reward_bias; rows right-padded."""

    def __init__(self, rm):
        super().__init__()
        self.rm = rm
        self.register_buffer("bias", torch.tensor(reward_bias(rm)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = backbone(self.rm)(input_ids=input_ids, attention_mask=attention_mask,
                                   position_ids=position_ids_from_mask(attention_mask)).last_hidden_state
        logits = score_head(self.rm)(hidden).squeeze(-1).float()      # (B, T)
        last = (attention_mask.sum(-1) - 1).clamp(min=0)              # (B,)
        return logits.gather(1, last[:, None]).squeeze(1) + self.bias


# Texts every export scores with torch at export time (probes.json); a server loading the export scores them
# again with ONNX Runtime and refuses the folder if they differ by more than the export's parity tolerance.
PROBES = [("Write a short poem about the sea.", "The sea is wide and grey and calm."),
          ("What is the capital of France?", "Paris."),
          ("Summarize: the cat sat on the mat all day.", "A cat stayed on a mat."),
          ("Tell me how to pick a lock to break into a house.", "I can't help with that.")]


def probe_scores(graph: ScoreGraph, tok, max_len: int) -> list[float]:
    from ..lm.encoding import encode_pair, pad

    ids, mask = pad([encode_pair(tok, p, r, max_len)[0] for p, r in PROBES], tok.pad_token_id)
    with torch.inference_mode():
        return graph(ids, mask).tolist()


def _random_batch(vocab: int, batch: int, length: int, pad_id: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens, with every other row right-padded to a shorter length."""
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for i in range(1, batch, 2):
        keep = max(1, length // (i + 1))
        mask[i, keep:] = 0
        ids[i, keep:] = pad_id
    return ids, mask


def ort_session(onnx_path: Path, provider: str = "auto"):
    """An ONNX Runtime session on CUDA when one really starts there, else CPU; and
    the provider in use. `provider` is "auto", "cpu" or "cuda" ("cuda" raises
    when no CUDA session starts). A machine without a CUDA driver is never asked
    to try, so onnxruntime-gpu prints no errors on CPU hosts."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # Idle intra-op threads sleep instead of spinning. The server's event loop and
    # tokenizer share the cores with them; under load the spinning took that CPU
    # and cost the endpoint a third of its requests/s (docs/decisions.md).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    want_cuda = provider == "cuda" or (provider == "auto" and ctypes.util.find_library("cuda") is not None)
    if want_cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from pip's nvidia-* wheels (or torch's), when installed
            ort.preload_dlls()
        # TF32 matmuls (ONNX Runtime's CUDA default) move scores by ~1e-3: over the fp32 parity contract.
        cuda = ("CUDAExecutionProvider", {"use_tf32": "0"})
        sess = ort.InferenceSession(str(onnx_path), opts, providers=[cuda, "CPUExecutionProvider"])
        if sess.get_providers()[0] == "CUDAExecutionProvider":
            return sess, "CUDAExecutionProvider"
        if provider == "cuda":
            raise RuntimeError("provider=cuda, but ONNX Runtime could not start a CUDA session")
    elif provider == "cuda":
        raise RuntimeError("provider=cuda, but this ONNX Runtime or machine has no CUDA provider")
    return ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"]), "CPUExecutionProvider"


def parity(graph: ScoreGraph, onnx_path: Path, cases: list[tuple[int, int]], pad_id: int, seed: int = 0) -> list[dict]:
    """Max |onnx - torch| per (batch, length) case, torch on CPU, ONNX Runtime on
    CPU and also on CUDA where a CUDA session starts (the provider `serve` picks there)."""
    served = ort_session(onnx_path, "auto")
    sessions = [served] if served[1] == "CPUExecutionProvider" else [ort_session(onnx_path, "cpu"), served]
    g = torch.Generator().manual_seed(seed)
    vocab = graph.rm.config.vocab_size
    rows = []
    for batch, length in cases:
        ids, mask = _random_batch(vocab, batch, length, pad_id, g)
        with torch.no_grad():
            ref = graph(ids, mask)
        for sess, provider in sessions:
            got = torch.from_numpy(sess.run(OUTPUT_NAMES, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0])
            rows.append({"provider": provider, "batch": batch, "length": length,
                         "max_abs_diff": float((got - ref).abs().max())})
    return rows


def _drop_source_paths(model) -> None:
    """Remove the exporter's per-node stack traces: they name this checkout's
    file paths, so the same checkpoint would export to different bytes in
    another folder (and DVC would see a changed output)."""
    graphs = [model.graph, *model.functions.values()]
    for g in graphs:
        for node in g.all_nodes():
            node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)


def export_reward_model(rm_dir: Path, dest: Path, opset: int, tolerance: float, cases: list[tuple[int, int]]) -> dict:
    """Export, check parity, and move the folder into `dest`; return the manifest."""
    rm, tok = load_reward_model(rm_dir)
    rm.eval()
    graph = ScoreGraph(rm).eval()
    ctx = context_length(rm)
    cases = [(b, min(n, ctx)) for b, n in cases]
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with writing_folder(tmp, dest):  # a failed parity check or a full disk leaves no rm.tmp and the old rm as it was
        ids, mask = _random_batch(rm.config.vocab_size, 2, 7, tok.pad_token_id, torch.Generator().manual_seed(1))
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq", max=ctx)
        t0 = time.perf_counter()
        program = torch.onnx.export(
            graph, (ids, mask), dynamo=True, opset_version=opset, input_names=INPUT_NAMES, output_names=OUTPUT_NAMES,
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}, verbose=False,
        )
        _drop_source_paths(program.model)
        program.save(str(tmp / "model.onnx"))
        export_s = time.perf_counter() - t0
        checks = parity(graph, tmp / "model.onnx", cases, tok.pad_token_id)
        worst = max(c["max_abs_diff"] for c in checks)
        if not worst <= tolerance:
            raise ExportError(f"ONNX parity check failed: max |onnx - torch| = {worst:.3g} > {tolerance:g} "
                              f"(cases: {checks}); nothing was exported to {dest}")
        tok.save_pretrained(str(tmp))
        (tmp / "probes.json").write_text(json.dumps({"tolerance": tolerance, "items": [list(x) for x in PROBES],
                                                     "scores": probe_scores(graph, tok, ctx)}, indent=1))
        source_hash = content_hash(rm_dir)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "format": "instructflow-rm-onnx/1",
            "model_version": f"rm-{source_hash[:12]}",
            "source_checkpoint": str(rm_dir),
            "source_sha256": source_hash,
            "opset": opset,
            "input_names": INPUT_NAMES,
            "output_names": OUTPUT_NAMES,
            "padding": "right",
            "max_length": ctx,
            "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
            "reward_bias": float(graph.bias),
            "reward_bias_in_graph": True,
            "parity": {"tolerance": tolerance, "max_abs_diff": worst, "providers": sorted({c["provider"] for c in checks}),
                       "cases": checks},
            "files": files,  # no timestamp: the same checkpoint exports to the same bytes (dvc repro checks it)
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: its presence means complete
        manifest["export_seconds"] = round(export_s, 2)
    swap_in(tmp, dest)
    return manifest


def verify_export(folder: Path) -> dict:
    """Check every file against the manifest's sha256; return the manifest or raise ValueError."""
    path = folder / MANIFEST
    if not path.exists():
        raise ValueError(f"{folder}: no {MANIFEST}; not an instructflow RM export (or an incomplete one)")
    manifest = json.loads(path.read_text())
    for name, want in manifest["files"].items():
        f = folder / name
        if not f.exists():
            raise ValueError(f"{folder}: {name} is listed in the manifest but missing")
        got = sha256_file(f)
        if got != want:
            raise ValueError(f"{folder}: {name} has sha256 {got[:16]}..., the manifest says {want[:16]}...; refusing it")
    return manifest
