import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from instructflow.data.formats import Comparison, Demonstration
from instructflow.reward import (centre_on_demonstrations, collate_comparisons, encode_comparison, kwise_loss,
                                 rm_loss, score_texts)
from tiny import tiny_lm


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
    rows = []  # batch rows seen by the transformer body, per forward call
    handle = rm.model.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        loss, _ = rm_loss(rm, batch)
    finally:
        handle.remove()
    assert rows == [sum(c.k for c in comps)]  # one row per response: 4 + 2 + 3, not 2 * pairs
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
    assert batch["input_ids"].shape[0] == 4


def test_bias_centres_demonstrations_at_zero(tiny_rm):
    rm, tok = tiny_rm
    demos = [Demonstration(id=str(i), prompt=f"Question {i}?", response="It is red." if i % 2 else "Blue fox.") for i in range(37)]
    bias = centre_on_demonstrations(rm, tok, demos, 64)
    mean = score_texts(rm, tok, [d.prompt for d in demos], [d.response for d in demos], 64).double().mean()
    assert abs(float(mean)) < 1e-5
    assert rm.config.reward_bias == bias
