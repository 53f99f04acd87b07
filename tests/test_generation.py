"""The decoding loop (instructflow.lm.generation.sample_tokens) against Hugging Face's `generate`:
token for token when greedy, including rows that finish at different steps and leave the batch,
and in distribution when sampling at a temperature."""
import pytest
import torch
from tiny import tiny_lm

from instructflow.lm.encoding import encode_prompt, pad
from instructflow.lm.generation import sample_tokens

PROMPTS = ["What color is the ball?", "Hi", "Ana has a green kite. Ben has a pink hat."]  # unequal: left padding


@pytest.fixture(scope="module")
def lm():
    model, tok = tiny_lm(seed=3)
    ids, mask = pad([encode_prompt(tok, p) for p in PROMPTS], tok.pad_token_id, side="left")
    return model.eval(), tok, ids, mask


def _padded(tokens, width, pad):
    return torch.nn.functional.pad(tokens, (0, width - tokens.size(1)), value=pad)


def _hf_greedy(model, ids, mask, n, max_new, eos, pad):
    ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)  # HF refuses num_return_sequences when greedy
    seqs = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new,
                          pad_token_id=pad, eos_token_id=eos)[:, ids.size(1):]
    return _padded(seqs, max_new, pad)


def test_greedy_decoding_equals_hf_generate_as_rows_finish_and_leave_the_batch(lm):
    model, tok, ids, mask = lm
    pad = tok.pad_token_id
    # without a stop token every row runs to the limit
    free = sample_tokens(model, ids, mask, num_samples=2, max_new_tokens=12, eos_id=-1, pad_id=pad, greedy=True)
    assert torch.equal(free, _hf_greedy(model, ids, mask, 2, 12, -1, pad))
    assert torch.equal(free[0], free[1]) and torch.equal(free[2], free[3])  # greedy samples of one prompt agree
    # stop on a token the rows produce at different steps: they leave the batch one by one
    first = {}
    for row in free[::2].tolist():
        for t, x in enumerate(row):
            first.setdefault(x, []).append(t)
    stop = next(x for x, steps in first.items() if len(set(steps)) > 1 and min(steps) < 11)
    ours = sample_tokens(model, ids, mask, num_samples=2, max_new_tokens=12, eos_id=stop, pad_id=pad, greedy=True)
    ours = _padded(ours, 12, pad)
    assert torch.equal(ours, _hf_greedy(model, ids, mask, 2, 12, stop, pad))
    ended_at = [row.index(stop) if stop in row else None for row in ours.tolist()]
    assert len(set(ended_at)) > 1
    for row, end in zip(ours.tolist(), ended_at):
        if end is not None:
            assert set(row[end + 1 :]) <= {pad}


def test_sampling_draws_from_softmax_of_logits_over_temperature(lm):
    model, tok, ids, mask = lm
    torch.manual_seed(0)
    n, temperature = 4000, 2.0
    first = sample_tokens(model, ids[:1], mask[:1], num_samples=n, max_new_tokens=1, eos_id=tok.eos_token_id,
                          pad_id=tok.pad_token_id, temperature=temperature)[:, 0]
    probs = torch.softmax(model(input_ids=ids[:1], attention_mask=mask[:1]).logits[0, -1] / temperature, -1)
    counts = torch.bincount(first, minlength=probs.numel()).double() / n
    sigma = (probs * (1 - probs) / n).sqrt()
    assert ((counts - probs).abs() <= 5 * sigma + 1e-3).all()
    assert probs.max() < 0.5 and (counts > 0).sum() > 10  # a spread distribution, really sampled


def test_a_process_done_early_keeps_pace_with_the_others_and_its_samples_do_not_change(lm):
    """Under FSDP every forward pass is a collective: a process whose rows have all ended runs
    one-token passes until `all_done` says every process has ended, and returns what it would
    have returned alone."""
    model, tok, ids, mask = lm
    free = sample_tokens(model, ids, mask, num_samples=2, max_new_tokens=12, eos_id=-1, pad_id=tok.pad_token_id, greedy=True)
    stop = next(x for x in free[0].tolist() if all(x in row[:3] for row in free.tolist()))  # every row ends by step 3
    calls = []

    def counting(module, args, kwargs):
        calls.append(1)

    alone = {}
    for others_left in (0, 5):
        torch.manual_seed(11)
        calls.clear()
        answers = {"n": 0}

        def all_done(done_here, answers=answers, others_left=others_left):
            answers["n"] += 1
            return done_here and answers["n"] > others_left

        handle = model.register_forward_pre_hook(counting, with_kwargs=True)
        try:
            out = sample_tokens(model, ids, mask, num_samples=2, max_new_tokens=12, eos_id=stop,
                                pad_id=tok.pad_token_id, greedy=True, all_done=all_done)
        finally:
            handle.remove()
        alone[others_left] = (out, len(calls), answers["n"])
    (out0, calls0, asked0), (out5, calls5, asked5) = alone[0], alone[5]
    assert torch.equal(out0, out5) and out0.size(1) <= 3
    assert asked0 <= 3 and asked5 == 6 and calls5 - calls0 == asked5 - asked0  # one pass per extra round
