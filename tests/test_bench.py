"""The benchmarks' own arithmetic and bookkeeping (bench/peers.py, bench/serve_load.py's
load generator); the TRL runs and the timed loads themselves belong to `make bench`, not to tests."""
import asyncio
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import peers  # noqa: E402
import serve_load  # noqa: E402

from instructflow.config import OptimConfig, ProjectConfig  # noqa: E402
from instructflow.lm.training import make_accelerator, train_loop  # noqa: E402


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


def test_load_generator_counts_every_round_trip_and_every_error():
    """The bare HTTP/1.1 client of serve_load.py against a real server on a socket:
    keep-alive connections, every response read whole, non-200s counted as errors."""
    bodies: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as uvicorn serves

        def do_POST(self):
            item = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            bodies.append(item)
            bad = item["items"][0]["prompt"] == "bad"
            out = json.dumps({"scores": [0.5] * 50}).encode()  # a body larger than one small read
            self.send_response(500 if bad else 200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        items = [{"prompt": "good", "response": "a"}, {"prompt": "bad", "response": "b"}]
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = asyncio.run(serve_load.drive(url, items, clients=2, seconds=0.5))
    finally:
        server.shutdown()
    assert result["requests"] == len(bodies) > 10
    # client 0 sends items 0, 2, 4, ... (all "good"), client 1 items 1, 3, ... (all "bad")
    assert result["errors"] == sum(b["items"][0]["prompt"] == "bad" for b in bodies) > 0
    assert result["p50_ms"] > 0 and result["requests_per_s"] > 0
