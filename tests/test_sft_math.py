import json

import pytest
import torch
from tiny import tiny_lm

from instructflow.config import OptimConfig, ProjectConfig
from instructflow.data.formats import Demonstration
from instructflow.lm.encoding import join_truncated
from instructflow.lm.modeling import add_residual_dropout
from instructflow.lm.training import cosine_with_warmup, make_accelerator, train_loop
from instructflow.stages.sft import encode_demonstration, sft_batch


def test_prompt_tokens_carry_no_sft_loss():
    model, tok = tiny_lm()
    demos = [Demonstration(id="1", prompt="What color is the ball?", response="It is red."),
             Demonstration(id="2", prompt="Ana has a green kite. Ben has a pink hat.", response="Positive.")]
    ex = [encode_demonstration(tok, d, 64) for d in demos]
    batch = sft_batch(ex, tok.pad_token_id)
    for i, (ids, n_prompt) in enumerate(ex):
        assert (batch["labels"][i, :n_prompt] == -100).all()
        assert (batch["labels"][i, n_prompt:len(ids)] == torch.tensor(ids[n_prompt:])).all()
        assert (batch["labels"][i, len(ids):] == -100).all()
    # the loss gradient w.r.t. the logits that predict prompt tokens is exactly zero
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits.retain_grad()
    from instructflow.lm.losses import causal_lm_loss
    causal_lm_loss(logits, batch["labels"]).backward()
    for i, (ids, n_prompt) in enumerate(ex):
        # position t predicts token t+1: positions 0..n_prompt-2 predict prompt tokens
        assert logits.grad[i, : n_prompt - 1].abs().max() == 0
        assert logits.grad[i, n_prompt - 1 : len(ids) - 1].abs().max() > 0


def test_truncation_cuts_the_prompt_from_the_left():
    ids, n = join_truncated(list(range(10)), [100, 101, 999], max_len=8)
    assert ids == [5, 6, 7, 8, 9, 100, 101, 999] and n == 5
    ids, n = join_truncated([1, 2], list(range(100, 120)), max_len=8)
    assert ids == [2, 100, 101, 102, 103, 104, 105, 106] and n == 1


def test_cosine_schedule_with_warmup():
    f = cosine_with_warmup(100, warmup_ratio=0.1, min_lr_ratio=0.1)
    assert [round(f(s), 4) for s in (0, 9)] == [0.1, 1.0]
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.55) and f(100) == pytest.approx(0.1)


def test_residual_dropout_acts_only_in_training():
    model, _ = tiny_lm()
    assert add_residual_dropout(model, 0.5) == 4  # 2 layers x (attention, MLP)
    x = torch.randint(3, 200, (2, 12))
    model.eval()
    a, b = model(input_ids=x).logits, model(input_ids=x).logits
    assert torch.equal(a, b)
    model.train()
    assert not torch.equal(model(input_ids=x).logits, model(input_ids=x).logits)


class _Crash(RuntimeError):
    pass


def _train(tmp_path, crash_at=None, resume=True, size_fn=None):
    torch.manual_seed(0)
    model, tok = tiny_lm()
    add_residual_dropout(model, 0.2)  # randomness inside the step: resume must restore RNG state too
    data = [torch.randint(3, 250, (16,)) for _ in range(48)]
    calls = {"n": 0}

    def loss_fn(m, b):
        calls["n"] += 1
        if crash_at is not None and calls["n"] == crash_at:
            raise _Crash
        x = b["input_ids"]
        return torch.nn.functional.cross_entropy(m(input_ids=x).logits[:, :-1].reshape(-1, 300), x[:, 1:].reshape(-1)), {}

    cfg = OptimConfig(lr=1e-2, batch_size=4, grad_accum=2, epochs=2, checkpoint_every=2, log_every=1, resume=resume)
    acc = make_accelerator(ProjectConfig(device="cpu"), cfg.grad_accum)
    res = train_loop(name="t", model=model, examples=data, collate=lambda xs: {"input_ids": torch.stack(xs)},
                     loss_fn=loss_fn, cfg=cfg, out_dir=tmp_path, accelerator=acc, seed=1, size_fn=size_fn)
    return acc.unwrap_model(model), res


@pytest.mark.parametrize("grouped", [False, True], ids=["random-batches", "grouped-by-length"])
def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, grouped):
    size_fn = (lambda x: int(x[0]) % 5) if grouped else None  # any sortable key exercises the grouped order
    ref, ref_res = _train(tmp_path / "ref", size_fn=size_fn)
    with pytest.raises(_Crash):
        _train(tmp_path / "run", crash_at=15, size_fn=size_fn)  # mid-epoch, after the checkpoint at step 6
    state = json.loads((tmp_path / "run" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 6
    resumed, res = _train(tmp_path / "run", size_fn=size_fn)
    assert res.resumed_from_step == 6 and res.steps == ref_res.steps == 12
    assert res.train_metrics == ref_res.train_metrics  # the last log row too: the running sums were checkpointed
    rows = [json.loads(x)["step"] for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert rows == list(range(1, 13))  # the rows a killed run logged after its checkpoint are not doubled
    for (n, p), (_, q) in zip(ref.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


def test_tiny_model_initial_weight_scale_follows_init_std(tmp_path):
    """model.tiny.init_std sets the initial weights' spread and is saved in the
    config (initializer_range), so plain transformers reloads the same model."""
    from tiny import MICRO, TEXTS
    from transformers import AutoModelForCausalLM

    from instructflow.lm.modeling import build_tiny_llama, train_tokenizer

    tok = train_tokenizer(TEXTS, MICRO.vocab_size)
    for std in (0.02, 0.12):
        model = build_tiny_llama(tok, MICRO.model_copy(update={"init_std": std}), seed=0)
        w = model.model.layers[0].self_attn.q_proj.weight
        assert abs(float(w.std()) - std) < 0.1 * std
        assert model.config.initializer_range == std
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.initializer_range == 0.12
    assert torch.equal(again.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)


def test_length_grouped_batches_cover_every_item_once_with_less_padding():
    """epoch_batches with sizes: the same items in the same number of batches as random
    batching, a function of (seed, epoch) alone, and less padding on mixed lengths."""
    import random

    from instructflow.lm.training import epoch_batches

    rng = random.Random(0)
    n, bs = 1003, 16
    lengths = [rng.choice([3, 4, 5, 30, 31, 60]) for _ in range(n)]
    plain = epoch_batches(n, bs, seed=1, epoch=0)
    grouped = epoch_batches(n, bs, seed=1, epoch=0, sizes=lengths, group=10)
    assert len(grouped) == len(plain) == -(-n // bs)
    assert sorted(i for b in grouped for i in b) == list(range(n))
    assert grouped == epoch_batches(n, bs, seed=1, epoch=0, sizes=lengths, group=10)
    assert grouped != epoch_batches(n, bs, seed=1, epoch=1, sizes=lengths, group=10)

    def padded(batches):
        return sum(max(lengths[i] for i in b) * len(b) for b in batches)

    assert padded(grouped) < 0.6 * padded(plain)
    # the windows are sorted, but the batches are not visited in order of length
    maxima = [max(lengths[i] for i in b) for b in grouped]
    assert maxima != sorted(maxima) and maxima != sorted(maxima, reverse=True)
    with pytest.raises(ValueError, match="3 sizes for 1003 items"):
        epoch_batches(n, bs, seed=1, epoch=0, sizes=[1, 2, 3], group=10)


def test_train_loop_visits_the_length_grouped_batches(tmp_path):
    """With group_by_length and a size_fn, train_loop takes exactly epoch_batches' grouped
    batches; without a size_fn (pretraining) it keeps random ones."""
    from instructflow.lm.training import epoch_batches

    lengths = [3, 30] * 40

    def visits(size_fn):
        seen: list[list[int]] = []

        def collate(xs):
            seen.append(xs)
            return {"x": torch.ones(len(xs), 1)}

        train_loop(name="t", model=torch.nn.Linear(1, 1), examples=list(range(len(lengths))), collate=collate,
                   loss_fn=lambda m, b: (m(b["x"]).pow(2).mean(), {}),
                   cfg=OptimConfig(batch_size=8, epochs=1, log_every=100, length_group=5), out_dir=tmp_path,
                   accelerator=make_accelerator(ProjectConfig(device="cpu")), seed=3, size_fn=size_fn)
        return seen

    def mixed(batches):  # batches holding both lengths: padded
        return sum(len({lengths[i] for i in b}) > 1 for b in batches)

    grouped = visits(lambda i: lengths[i])
    assert grouped == epoch_batches(len(lengths), 8, 3, 0, lengths, group=5)
    assert mixed(grouped) <= 2  # at most where a sorted window of 40 turns from 3 to 30
    plain = visits(None)
    assert plain == epoch_batches(len(lengths), 8, 3, 0) and mixed(plain) >= 8
