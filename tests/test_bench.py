"""The peer benchmark's own arithmetic and bookkeeping (bench/peers.py); the TRL runs
themselves need the peer virtual environments and belong to `make bench`, not to tests."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import peers  # noqa: E402
from instructflow.config import OptimConfig  # noqa: E402
from instructflow.training import make_accelerator, train_loop  # noqa: E402
from instructflow.config import ProjectConfig  # noqa: E402


def test_our_order_is_the_order_train_loop_visits(tmp_path):
    seen: list[int] = []

    def collate(xs):
        seen.extend(xs)
        return {"x": torch.ones(len(xs), 1)}

    model = torch.nn.Linear(1, 1)
    train_loop(name="t", model=model, examples=list(range(37)), collate=collate,
               loss_fn=lambda m, b: (m(b["x"]).pow(2).mean(), {}), cfg=OptimConfig(batch_size=5, epochs=1, log_every=100),
               out_dir=tmp_path, accelerator=make_accelerator(ProjectConfig(device="cpu")), seed=3)
    assert seen == peers.our_order(37, 5, 3)


def test_train_flops_per_token_by_hand(tmp_path):
    cfg = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "vocab_size": 10,
           "num_attention_heads": 2, "num_key_value_heads": 1}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    # per layer: q, o 8x8; k, v 8x4 (one kv head of width 4); gate, up, down 8x16
    n_layer = 64 + 64 + 32 + 32 + 3 * 128
    seq = 5
    assert peers.train_flops_per_token(tmp_path, seq, lm_head=True) == 6 * (2 * n_layer + 80) + 12 * 2 * 8 * seq
    assert peers.train_flops_per_token(tmp_path, seq, lm_head=False) == 6 * (2 * n_layer + 8) + 12 * 2 * 8 * seq


def test_report_block_is_replaced_in_place(tmp_path):
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nintro\n")
    results = {"date": "2026-11-22", "command": "python bench/peers.py", "repeats": 3,
               "machine": {"cpus": 2, "processor": "x86_64", "device": "cpu", "matmul_gflops": 100.0},
               "tasks": {"sft": {"unit": "tokens/s", "peer_version": "1.16.0", "speedup": 1.5, "quality_metric": "val_loss",
                                 "ours": {"items_per_s": 15.0, "peak_rss_mb": 1.0, "val_loss": 3.0, "model_gflops_per_s": 20.0},
                                 "peer": {"items_per_s": 10.0, "peak_rss_mb": 1.0, "val_loss": 3.0, "model_gflops_per_s": 10.0}}}}
    peers.write_report(results, doc)
    peers.write_report(results, doc)
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nintro") and text.count(peers.MARK_BEGIN) == 1
    assert "**1.5x**" in text and "20.0% / 10.0%" in text
