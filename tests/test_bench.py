"""The benchmarks' own arithmetic and bookkeeping (bench/peers.py, bench/serve_load.py's
load generator); the TRL runs and the timed loads themselves belong to `make bench`, not to tests."""
import asyncio
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import peers  # noqa: E402
import rm_by_category  # noqa: E402
import rm_context_check  # noqa: E402
import serve_load  # noqa: E402
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


def test_context_check_comparisons_are_decided_by_the_prompt_alone():
    """Every task's ranking follows from matching the response's words against
    the prompt's, and the same responses recur with other prompts, so the
    response alone cannot tell the winner."""
    import random
    import re

    rng = random.Random(0)
    for task in rm_context_check.TASKS:
        comps = [rm_context_check.make_comparison(task, i, rng) for i in range(200)]
        for c in comps:
            assert c.k == 4 and len(set(c.responses)) == 4 and len(set(c.scores)) >= 2
            prompt_words = set(re.findall(r"[A-Za-z]+", c.prompt.split("Question:")[-1] if task == "closed" else c.prompt))
            if task == "closed":  # the asked person's colour, read from the text
                who, what = re.search(r"What color is (\w+)'s (\w+)\?", c.prompt).groups()
                gold = re.search(rf"{who} has a (\w+) {what}\.", c.prompt).group(1)
                assert all((s == 1.0) == (f"It is {gold}." == r) for r, s in zip(c.responses, c.scores))
            else:
                for r, s in zip(c.responses, c.scores):
                    # chat and summary: the winner's slots are the prompt's words; summary3: score = slots matched
                    slots = re.findall(r"[A-Za-z]+", r)
                    slots = [slots[3]] if task == "chat" else [slots[0], slots[3], slots[4]]
                    matched = sum(w in prompt_words for w in slots)
                    assert s == (float(matched) if task == "summary3" else float(matched == len(slots)))
        winners = {c.responses[c.scores.index(max(c.scores))] for c in comps}
        losers = {r for c in comps for r, s in zip(c.responses, c.scores) if s < max(c.scores)}
        assert winners & losers, task  # the same text wins in one comparison and loses in another


def test_judge_table_by_hand():
    """Two chat comparisons ranked by one labeler; the oracle and two judges scored by hand."""
    from instructflow.config import LabelerConfig
    from instructflow.data.formats import Comparison
    from instructflow.suite.labelers import Labeler

    lab = Labeler(LabelerConfig(name="ada"))
    spec = {"category": "chat", "variant": "normal", "name": "Nia", "fruit": "apple", "ask": "name", "answer": "Nia"}
    right, wrong, other = "Your name is Nia.", "Your name is Pia.", "Your name is Ben."  # wrong and other: a tie
    assert lab.latent(spec, right) > lab.latent(spec, wrong) == lab.latent(spec, other)
    comps = [Comparison(id="c1", prompt="p1", responses=[right, wrong, other], ranking=[0, 2, 1], labeler="ada", category="chat", meta=spec),
             Comparison(id="c2", prompt="p2", responses=[wrong, right], ranking=[0, 1], labeler="ada", category="chat", meta=spec)]
    # pairs (better, worse): (right, other), (right, wrong), (other, wrong) [a tie]; then (wrong, right) against the latent
    judges = {"a": [3.0, 1.0, 2.0, 0.0, 5.0],   # right, right, right; 5 > 0 is against the labeler's (wrong, right)
              "b": [1.0, 1.0, 1.0, 9.0, 0.0]}   # every pair in p1 tied (0.5 each); p2 right
    rows = rm_by_category.by_category(comps, {"ada": lab}, judges)
    assert list(rows) == ["chat", "ALL"]
    r = rows["ALL"]
    assert r["pairs"] == 4 and r["tie_share"] == 0.25
    assert r["oracle"] == (1 + 1 + 0.5 + 0) / 4        # the labeler's last pair went against its own latent
    assert r["a"] == (1 + 1 + 1 + 0) / 4 and r["a_non_tie"] == (1 + 1 + 0) / 3
    assert r["b"] == (0.5 + 0.5 + 0.5 + 1) / 4 and r["b_non_tie"] == (0.5 + 0.5 + 1) / 3


def test_judge_table_refuses_comparisons_it_cannot_grade():
    from instructflow.data.formats import Comparison

    comps = [Comparison(id="hh-7", prompt="p", responses=["a", "b"], ranking=[0, 1])]  # imported data: no labeler, no meta
    with pytest.raises(ValueError, match=r"comparison 1 \(id 'hh-7'\).*labeler is None"):
        rm_by_category.by_category(comps, {}, {"rm": [0.0, 1.0]})


def test_plackett_luce_loss_by_hand_and_equal_to_the_pair_loss_at_k2():
    """bench/rm_objectives.py's full-ranking likelihood, from the collated pair tensors."""
    import math

    from instructflow.data.formats import Comparison
    from instructflow.reward import collate_comparisons, encode_comparison, kwise_loss
    from rm_objectives import plackett_luce_loss

    class Tok:  # one token per character is enough for collation
        pad_token_id, eos_token_id = 0, 1

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [2 + ord(ch) % 50 for ch in text]}

    comps = [Comparison(id="a", prompt="p", responses=["x", "yy", "zzz"], ranking=[2, 0, 1]),  # zzz > x > yy
             Comparison(id="b", prompt="q", responses=["u", "vv"], ranking=[1, 0])]
    batch = collate_comparisons([encode_comparison(Tok(), c, 64) for c in comps], 0)
    r = torch.tensor([0.5, -1.0, 2.0, 0.3, -0.4])  # x, yy, zzz; u, vv

    def lse(*xs):
        return math.log(sum(math.exp(x) for x in xs))
    first = -((2.0 - lse(2.0, 0.5, -1.0)) + (0.5 - lse(0.5, -1.0))) / 2   # zzz of 3, then x of 2
    second = -(-0.4 - lse(-0.4, 0.3))                                       # vv of 2
    got = plackett_luce_loss(r, batch["owner"], batch["winners"], batch["losers"], 2)
    assert got.item() == pytest.approx((first + second) / 2, abs=1e-6)
    # K = 2: the full-ranking likelihood is the Bradley-Terry pair term of eq. 1
    one = collate_comparisons([encode_comparison(Tok(), comps[1], 64)], 0)
    pair = kwise_loss(r[3:], one["winners"], one["losers"], one["pair_weight"])
    assert plackett_luce_loss(r[3:], one["owner"], one["winners"], one["losers"], 1).item() == pytest.approx(pair.item(), abs=1e-6)


def test_plackett_luce_loss_refuses_ties():
    from rm_objectives import plackett_luce_loss

    owner, winners, losers = torch.tensor([0, 0, 0]), torch.tensor([0, 0]), torch.tensor([1, 2])  # 1 and 2 tied
    with pytest.raises(ValueError, match="full rankings"):
        plackett_luce_loss(torch.zeros(3), owner, winners, losers, 1)


def test_logprob_variant_reads_the_stage_reward_and_each_response_log_likelihood(tmp_path):
    """bench/rm_objectives.py's pairwise_logprob: from one shared-prompt pass, the score head's reward
    equals the reward stage's, and the mean token log-probability equals the causal LM's own on
    prompt + response; with weight 0 the loss is the stage's eq. 1."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from instructflow.data.formats import Comparison
    from instructflow.modeling import reward_bias
    from instructflow.reward import collate_comparisons, comparison_rewards, encode_comparison, rm_loss
    from rm_objectives import logprob_aux_loss, scores_and_mean_logprobs
    from tiny import tiny_lm

    lm, tok = tiny_lm()
    lm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=1).eval()
    rm.config.pad_token_id = tok.pad_token_id
    lm = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    comps = [Comparison(id="1", prompt="What color is the ball?", responses=["It is red.", "Blue.", "I do not know."],
                        ranking=[0, 2, 1]),
             Comparison(id="2", prompt="Ana has a kite.", responses=["Positive.", "Negative fox."], ranking=[1, 0])]
    enc = [encode_comparison(tok, c, 64) for c in comps]
    batch = collate_comparisons(enc, tok.pad_token_id)
    with torch.no_grad():
        reward, mean_logp = scores_and_mean_logprobs(rm, batch)
        assert torch.allclose(reward + reward_bias(rm), comparison_rewards(rm, batch), atol=1e-5)
        expected = []
        for e in enc:
            for seq in e.sequences:  # prompt + response + EOS, one row, no padding
                logp = torch.log_softmax(lm(input_ids=torch.tensor([seq])).logits[0, :-1], -1)
                n_prompt = len(e.prompt)
                picked = logp[torch.arange(n_prompt - 1, len(seq) - 1), torch.tensor(seq[n_prompt:])]
                expected.append(float(picked.mean()))
        assert mean_logp.tolist() == pytest.approx(expected, abs=1e-5)
        assert float(logprob_aux_loss(rm, batch, weight=0.0)[0]) == pytest.approx(float(rm_loss(rm, batch)[0]), abs=1e-6)


def test_mismatched_demo_comparisons_pair_each_demonstration_with_another_prompt_of_its_category():
    from instructflow.data.formats import Demonstration
    from rm_objectives import mismatched_demo_comparisons

    demos = [Demonstration(id=f"d{i}", prompt=f"p{i}", category=cat, response=f"r{i}", labeler="ada")
             for i, cat in enumerate(["chat", "chat", "chat", "rewrite", "rewrite", "summarization"])]
    out = mismatched_demo_comparisons(demos, seed=0)
    by_id = {d.id: d for d in demos}
    assert [c.id for c in out] == [f"mismatch-d{i}" for i in range(5)]  # the lone summarization demo has no partner
    for c in out:
        own = by_id[c.id.removeprefix("mismatch-")]
        partner = next(d for d in demos if d.response == c.responses[1])
        assert (c.prompt, c.responses[0], c.ranking) == (own.prompt, own.response, [0, 1])
        assert partner.category == own.category and partner.prompt != own.prompt
