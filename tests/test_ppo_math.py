"""PPO's terms against hand-computed values and plain reference loops."""
import math

import pytest
import torch
from tiny import tiny_lm

from instructflow.lm.losses import causal_lm_loss
from instructflow.lm.rollout import apply_no_eos_score
from instructflow.stages.evaluate import bootstrap_interval
from instructflow.stages.ppo import (
    KLController,
    gae,
    masked_mean,
    per_token_rewards,
    policy_loss,
    ptx_loss,
    value_loss,
    whiten,
)


def test_per_token_kl_reward_and_score_on_the_last_token():
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])  # 3 response tokens, then padding
    rewards, kl = per_token_rewards(logp, ref, torch.tensor([2.0]), mask, beta=0.1)
    # kl_t = logp - ref = [0.5, -1.0, 0.0]; r_t = -0.1 * kl_t; the score 2.0 lands on token 3 (EOS)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0, 0.0]]))


def test_no_eos_penalty_replaces_the_score_only_when_eos_is_missing():
    scores = torch.tensor([1.5, -0.3, 0.7])
    ended = torch.tensor([True, False, True])
    assert torch.equal(apply_no_eos_score(scores, ended, -2.0), torch.tensor([1.5, -2.0, 0.7]))


def _gae_reference(rewards, values, length, gamma, lam):
    """The textbook backward loop over one episode of `length` tokens."""
    adv = [0.0] * length
    last = 0.0
    for t in reversed(range(length)):
        next_v = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (1.0, 1.0), (0.9, 0.5)])
def test_gae_matches_a_reference_loop(gamma, lam):
    torch.manual_seed(0)
    rewards, values = torch.randn(3, 6), torch.randn(3, 6)
    lengths = [6, 4, 1]
    mask = torch.tensor([[1.0] * n + [0.0] * (6 - n) for n in lengths])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    for i, n in enumerate(lengths):
        ref = _gae_reference(rewards[i].tolist(), values[i].tolist(), n, gamma, lam)
        assert torch.allclose(adv[i, :n], torch.tensor(ref), atol=1e-6)
        assert torch.all(adv[i, n:] == 0) and torch.all(ret[i, n:] == 0)
        assert torch.allclose(ret[i, :n], adv[i, :n] + values[i, :n])


def test_gae_hand_computed_gamma_one_lambda_one():
    # with gamma = lambda = 1 the advantage is the return-to-go minus the value
    adv, ret = gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.2, 0.5, 0.9]]), torch.ones(1, 3), 1.0, 1.0)
    assert torch.allclose(ret, torch.tensor([[1.0, 1.0, 1.0]]))
    assert torch.allclose(adv, torch.tensor([[0.8, 0.5, 0.1]]))


def test_whitening_uses_only_masked_entries():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, mask)
    # mean 2, unbiased std 1 over the three real tokens; padding stays 0
    assert torch.allclose(w, torch.tensor([[-1.0, 0.0, 1.0, 0.0]]), atol=1e-6)


def test_policy_loss_value_and_zero_gradient_where_clipped():
    old = torch.zeros(1, 4)
    # ratios e^0.5 = 1.65 (above 1.2), e^-0.5 = 0.61 (below 0.8), 1.1, 0.9
    new = torch.tensor([[0.5, -0.5, math.log(1.1), math.log(0.9)]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    loss, stats = policy_loss(new, old, adv, torch.ones(1, 4), clip_range=0.2)
    # token 1: A>0, ratio above 1+eps -> clipped term -1.2 is the max; token 2: A<0, ratio below 1-eps -> 0.8
    expected = (-1.2 + 0.8 + -1.1 + 0.9) / 4
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] == 0          # clipped branch taken: no gradient
    assert new.grad[0, 2] == pytest.approx(-1.1 / 4) and new.grad[0, 3] == pytest.approx(0.9 / 4)
    assert float(stats["clipfrac"]) == pytest.approx(0.5)


def test_policy_loss_unclipped_when_it_is_the_pessimistic_branch():
    # A>0 with ratio below 1-eps: the unclipped term is larger, so it is used and has gradient
    new = torch.tensor([[-0.5]], requires_grad=True)
    loss, _ = policy_loss(new, torch.zeros(1, 1), torch.tensor([[1.0]]), torch.ones(1, 1), 0.2)
    assert float(loss.detach()) == pytest.approx(-math.exp(-0.5))
    loss.backward()
    assert new.grad[0, 0] == pytest.approx(-math.exp(-0.5))


def test_value_loss_clipping():
    old = torch.tensor([[0.0, 0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1, -1.0]], requires_grad=True)
    ret = torch.tensor([[2.0, 0.0, 1.0]])
    loss = value_loss(new, old, ret, torch.ones(1, 3), clip_range=0.2)
    # token 1: unclipped (1-2)^2=1, clipped (0.2-2)^2=3.24 -> 3.24; token 2: 0.01 vs 0.01;
    # token 3: unclipped (-1-1)^2=4, clipped (-0.2-1)^2=1.44 -> 4
    assert float(loss.detach()) == pytest.approx(0.5 * (3.24 + 0.01 + 4.0) / 3, abs=1e-6)
    loss.backward()
    assert new.grad[0, 0] == 0                                    # the clipped branch won: no gradient
    assert new.grad[0, 2] == pytest.approx(0.5 * 2 * (-2.0) / 3)


def test_ptx_term_is_gamma_times_the_pretraining_nll():
    model, _ = tiny_lm()
    blocks = torch.randint(3, 200, (2, 10))
    nll = causal_lm_loss(model(input_ids=blocks).logits, blocks)
    logits = model(input_ids=blocks).logits
    manual = -torch.log_softmax(logits[:, :-1], -1).gather(-1, blocks[:, 1:, None]).mean()
    assert float(nll) == pytest.approx(float(manual), rel=1e-5)
    assert float(ptx_loss(model, blocks, 27.8)) == pytest.approx(27.8 * float(nll), rel=1e-5)
    assert float(ptx_loss(model, blocks, 0.0)) == 0.0


def test_adaptive_kl_controller_update():
    ctl = KLController(0.1, adaptive=True, target=4.0, horizon=1000)
    ctl.update(kl=6.0, n_rollouts=100)      # error = clip(6/4 - 1) = 0.2 (at the clip)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    before = ctl.value
    ctl.update(kl=3.0, n_rollouts=100)      # error = -0.25 -> clipped to -0.2
    assert ctl.value == pytest.approx(before * (1 - 0.2 * 0.1))
    ctl.update(kl=4.4, n_rollouts=50)       # error = 0.1, inside the clip
    fixed = KLController(0.1)
    fixed.update(kl=100.0, n_rollouts=100)
    assert fixed.value == 0.1


def test_masked_mean():
    assert float(masked_mean(torch.tensor([[1.0, 3.0, 100.0]]), torch.tensor([[1.0, 1.0, 0.0]]))) == 2.0


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    lo, hi = bootstrap_interval([1.0] * 60 + [0.0] * 40, 2000, seed=0)
    assert lo < 0.6 < hi and 0.08 < hi - lo < 0.24  # normal approx: +-1.96*sqrt(.24/100) = +-0.096
    lo2, hi2 = bootstrap_interval(([1.0] * 60 + [0.0] * 40) * 4, 2000, seed=0)
    assert hi2 - lo2 < hi - lo


def test_sequence_logprobs_sums_only_the_response_tokens():
    from instructflow.lm.encoding import encode_prompt, encode_response
    from instructflow.stages.evaluate import sequence_logprobs

    model, tok = tiny_lm()
    model.eval()
    got = sequence_logprobs(model, tok, ["What color is the ball?", "Hi"], ["It is red.", "Positive."], max_len=64)
    for k, (p, r) in enumerate([("What color is the ball?", "It is red."), ("Hi", "Positive.")]):
        prompt, resp = encode_prompt(tok, p), encode_response(tok, r)
        ids = torch.tensor([prompt + resp])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        want = sum(float(logp[len(prompt) - 1 + t, tok_id]) for t, tok_id in enumerate(resp))  # a plain loop
        assert float(got[k]) == pytest.approx(want, abs=1e-4)


def _padded_rollout(tok, prompts, responses):
    """A Rollout of left-padded prompts and right-padded responses (EOS included), plus the
    unpadded rows, built the way `rollout` lays them out."""
    from instructflow.lm.encoding import encode_prompt, encode_response, pad
    from instructflow.lm.rollout import Rollout

    p_ids, p_attn = pad([encode_prompt(tok, p) for p in prompts], tok.pad_token_id, side="left")
    resp = [encode_response(tok, r) for r in responses]
    R = max(map(len, resp))
    r_ids = torch.full((len(resp), R), tok.pad_token_id)
    mask = torch.zeros(len(resp), R)
    for i, r in enumerate(resp):
        r_ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1.0
    zeros = torch.zeros(len(resp), R)
    ro = Rollout(torch.cat([p_ids, r_ids], 1), torch.cat([p_attn, mask.long()], 1), mask, p_ids.size(1),
                 zeros, zeros, zeros, torch.zeros(len(resp)), torch.zeros(len(resp)), torch.ones(len(resp), dtype=torch.bool))
    rows = [(encode_prompt(tok, p), r) for p, r in zip(prompts, resp)]
    return ro, rows


def test_response_logprobs_match_a_plain_loop_over_unpadded_rows():
    """Left-padded prompts, right-padded responses and the LM head on the response only
    (`logits_to_keep`) give each row the log-probabilities it has unpadded."""
    from instructflow.lm.rollout import response_logprobs

    model, tok = tiny_lm()
    model.eval()
    ro, rows = _padded_rollout(tok, ["What color is the ball?", "Hi", "Ana has a green kite. What does Ben have?"],
                               ["It is red.", "Positive. Negative.", "I do not know."])
    with torch.no_grad():
        logp, ent = response_logprobs(model, ro.ids, ro.attn, ro.prompt_width, 1.0, with_entropy=True)
        for i, (prompt, resp) in enumerate(rows):
            full = torch.log_softmax(model(input_ids=torch.tensor([prompt + resp])).logits[0].float(), -1)
            for t, tok_id in enumerate(resp):  # position len(prompt)-1+t predicts response token t
                row = full[len(prompt) - 1 + t]
                assert float(logp[i, t]) == pytest.approx(float(row[tok_id]), abs=1e-5)
                assert float(ent[i, t]) == pytest.approx(float(-(row.exp() * row).sum()), abs=1e-5)

    class FullLogits(torch.nn.Module):  # a causal LM whose forward has no `logits_to_keep`
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids, attention_mask, position_ids):
            return self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    with torch.no_grad():
        without_keep, _ = response_logprobs(FullLogits(model), ro.ids, ro.attn, ro.prompt_width, 1.0)
    assert torch.allclose(without_keep * ro.mask, logp * ro.mask, atol=1e-6)


def test_minibatch_drops_all_padding_columns_and_changes_no_logprob():
    from instructflow.lm.rollout import minibatch, response_logprobs

    model, tok = tiny_lm()
    model.eval()
    ro, rows = _padded_rollout(tok, ["Ana has a green kite. Ben has a pink hat. What does Ben have?", "Hi", "Hello"],
                               ["It is a pink hat and a kite.", "Positive.", "Negative."])
    marker = torch.arange(ro.mask.numel(), dtype=torch.float).view_as(ro.mask)
    sub = torch.tensor([2, 1])  # the two short rows: the long prompt's and long response's columns go
    ids, attn, P, (mask, cut) = minibatch(ro, sub, ro.mask, marker)
    lead = ro.prompt_width - max(len(rows[i][0]) for i in (1, 2))
    width = max(len(rows[i][1]) for i in (1, 2))
    assert P == ro.prompt_width - lead and lead > 0
    assert ids.shape == (2, P + width) and mask.shape == (2, width) and width < ro.mask.size(1)
    assert torch.equal(ids, ro.ids[sub, lead : ro.prompt_width + width]) and torch.equal(cut, marker[sub, :width])
    with torch.no_grad():
        trimmed, _ = response_logprobs(model, ids, attn, P, 1.0)
        padded, _ = response_logprobs(model, ro.ids[sub], ro.attn[sub], ro.prompt_width, 1.0)
    assert torch.allclose(trimmed * mask, padded[:, :width] * mask, atol=1e-5)
