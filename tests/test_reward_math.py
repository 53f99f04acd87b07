import math

import pytest
import torch
from tiny import tiny_lm
from transformers import AutoModelForSequenceClassification

from instructflow.data.formats import Comparison, Demonstration
from instructflow.lm.encoding import pad
from instructflow.lm.losses import kwise_loss
from instructflow.lm.modeling import reward_scores
from instructflow.stages.reward import (
    centre_on_demonstrations,
    collate_comparisons,
    comparison_rewards,
    encode_comparison,
    rm_loss,
    score_texts,
)


def test_kwise_loss_on_a_hand_computed_k4_ranking():
    # rewards of responses 0..3; the labeler ranked 2 > 0 > 3 > 1
    r = torch.tensor([0.5, -1.0, 2.0, 0.0])
    c = Comparison(id="x", prompt="p", responses=list("abcd"), ranking=[2, 0, 3, 1])
    pairs = c.pairs()
    win, lose = torch.tensor([w for w, _ in pairs]), torch.tensor([l for _, l in pairs])
    loss = kwise_loss(r, win, lose, torch.full((6,), 1 / 6))
    # differences r_w - r_l: 2-.5, 2-0, 2+1, .5-0, .5+1, 0+1
    diffs = [1.5, 2.0, 3.0, 0.5, 1.5, 1.0]
    expected = -sum(math.log(1 / (1 + math.exp(-d))) for d in diffs) / 6
    assert float(loss) == pytest.approx(expected, abs=1e-6)
    # by hand: log(1+e^-d) = .2014 + .1269 + .0486 + .4741 + .2014 + .3133 = 1.3657; / 6
    assert expected == pytest.approx(0.22761, abs=1e-4)


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    lm, tok = tiny_lm()
    d = tmp_path_factory.mktemp("rm")
    lm.save_pretrained(d)
    tok.save_pretrained(d)
    rm = AutoModelForSequenceClassification.from_pretrained(d, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    return rm.eval(), tok


def _comparisons():
    return [
        Comparison(id="1", prompt="What color is the ball?", responses=["It is red.", "Blue.", "I do not know.", "It is."],
                   ranking=[0, 2, 1, 3]),
        Comparison(id="2", prompt="Ana has a kite.", responses=["Positive.", "Negative fox."], ranking=[1, 0]),
        Comparison(id="3", prompt="Hi", responses=["a", "b b", "c c c"], scores=[1.0, 1.0, 0.0]),
    ]


def test_kwise_batching_equals_pairwise_loss_with_exactly_k_forward_rows(tiny_rm):
    rm, tok = tiny_rm
    comps = _comparisons()
    batch = collate_comparisons([encode_comparison(tok, c, 64) for c in comps], tok.pad_token_id)
    rows = []  # (batch rows, tokens per row) seen by the transformer body, per forward call
    handle = rm.model.register_forward_pre_hook(lambda m, args, kw: rows.append(tuple((args[0] if args else kw["input_ids"]).shape)), with_kwargs=True)
    try:
        loss, _ = rm_loss(rm, batch)
    finally:
        handle.remove()
    # one row per prompt (computed once, shared through the KV cache), then one row per response: 4 + 2 + 3,
    # not 2 * pairs; the response rows carry response tokens only
    assert [r[0] for r in rows] == [len(comps), sum(c.k for c in comps)]
    assert rows == [tuple(batch["prompt_ids"].shape), tuple(batch["response_ids"].shape)]
    # reference: every pair scored separately (2 forward rows per pair), mean per prompt, then mean over prompts
    per_prompt = []
    for c in comps:
        terms = []
        for w, l in c.pairs():
            s = score_texts(rm, tok, [c.prompt] * 2, [c.responses[w], c.responses[l]], 64)
            terms.append(-torch.nn.functional.logsigmoid(s[0] - s[1]))
        per_prompt.append(torch.stack(terms).mean())
    assert float(loss) == pytest.approx(float(torch.stack(per_prompt).mean()), abs=1e-5)


def test_reward_is_read_at_the_eos_token(tiny_rm):
    rm, tok = tiny_rm
    enc = encode_comparison(tok, _comparisons()[0], 64)
    batch = collate_comparisons([enc], tok.pad_token_id)
    assert all(seq[-1] == tok.eos_token_id for seq in enc.sequences)
    full = score_texts(rm, tok, ["What color is the ball?"], ["It is red."], 64)
    alone = rm(input_ids=torch.tensor([enc.sequences[0]])).logits.squeeze()
    assert float(full[0]) == pytest.approx(float(alone), abs=1e-5)  # right padding does not move the read-out
    assert batch["response_ids"].shape[0] == 4


def test_shared_prompt_rewards_and_gradients_equal_the_full_sequences(tiny_rm):
    """Prompts of different lengths (left padding) and responses of different lengths (right padding):
    the shared-prompt pass must give each response the reward, and the parameters the gradient, of
    scoring prompt + response as one sequence."""
    rm, tok = tiny_rm
    comps = _comparisons()
    enc = [encode_comparison(tok, c, 64) for c in comps]
    batch = collate_comparisons(enc, tok.pad_token_id)
    assert len({len(e.prompt) for e in enc}) == 3 and len({len(r) for e in enc for r in e.responses}) > 2
    rm.train()
    try:
        shared = comparison_rewards(rm, batch)
        ids, mask = pad([s for e in enc for s in e.sequences], tok.pad_token_id)
        full = reward_scores(rm, ids, mask)
        assert shared.shape == (9,)
        assert torch.allclose(shared, full, atol=1e-5)
        weights = torch.linspace(-1, 1, 9)  # any scalar function of the rewards
        params = [p for p in rm.parameters()]
        g_shared = torch.autograd.grad((weights * shared).sum(), params)
        g_full = torch.autograd.grad((weights * full).sum(), params)
    finally:
        rm.eval()
    for a, b in zip(g_shared, g_full):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_one_prompt_cut_serves_all_k_responses():
    c = Comparison(id="x", prompt="p", responses=["a", "b b b b"], ranking=[0, 1])

    class Tok:  # one token per character
        eos_token_id = 0
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(ch) for ch in text]}

    enc = encode_comparison(Tok(), c, 12)  # prompt "Human: p\n\nAssistant:" (20 tokens), responses 3 and 9 tokens
    assert [len(r) for r in enc.responses] == [3, 9]
    assert len(enc.prompt) == 12 - 9 and enc.prompt == [ord(ch) for ch in "nt:"]  # cut from the left
    assert max(len(s) for s in enc.sequences) == 12


def test_bias_centres_demonstrations_at_zero(tiny_rm):
    rm, tok = tiny_rm
    demos = [Demonstration(id=str(i), prompt=f"Question {i}?", response="It is red." if i % 2 else "Blue fox.") for i in range(37)]
    bias = centre_on_demonstrations(rm, tok, demos, 64)
    mean = score_texts(rm, tok, [d.prompt for d in demos], [d.response for d in demos], 64).double().mean()
    assert abs(float(mean)) < 1e-5
    assert rm.config.reward_bias == bias
