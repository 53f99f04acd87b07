"""The methods beside PPO, their math against hand-computed values and simple reference
loops: DPO's losses (Plackett-Luce and pairwise), the ensemble's conservative reward,
best-of-n's KL and choice, the over-optimization peak and the pooling over seeds."""
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_lm

from instructflow.config import EnsembleConfig, Params
from instructflow.data.formats import Comparison
from instructflow.lm.losses import LMLoss, conservative_reward, kwise_loss, plackett_luce_loss
from instructflow.lm.modeling import reward_scores
from instructflow.replicates import replicate, spread
from instructflow.stages.best_of_n import best_of_n_kl, pick, powers_of_two
from instructflow.stages.compare import gold_peak
from instructflow.stages.dpo import DPOExample, collate_dpo, dpo_loss, rank_levels, response_logps
from instructflow.stages.reward_ensemble import RewardEnsemble


def tiny_rm(seed: int):
    """A tiny Llama sequence classifier (num_labels 1), initialised from `seed`."""
    from transformers import LlamaForSequenceClassification

    lm, tok = tiny_lm()
    config = lm.config.__class__.from_dict({**lm.config.to_dict(), "num_labels": 1, "pad_token_id": tok.pad_token_id})
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config).eval()


# --------------------------------------------------------------------------- DPO
def test_dpo_loss_of_one_pair_by_hand():
    # log pi / log pi_SFT: winner -2.0 / -2.5, loser -3.0 / -2.8; beta 0.1
    # implicit rewards 0.1 * 0.5 = 0.05 and 0.1 * -0.2 = -0.02; loss = -log sigmoid(0.07) = log(1 + e^-0.07)
    r = torch.tensor([0.05, -0.02])
    expected = 0.6587595  # ln(1 + 0.9323938)
    pl = plackett_luce_loss(r, torch.tensor([0, 0]), torch.tensor([0, 1]), n_prompts=1)
    pw = kwise_loss(r, torch.tensor([0]), torch.tensor([1]), torch.tensor([1.0]))
    assert float(pl) == pytest.approx(expected, abs=1e-6) and float(pw) == pytest.approx(expected, abs=1e-6)


def test_plackett_luce_of_three_by_hand():
    # ranking y0 > y2 > y1 with rewards 1.0, -0.5, 0.2:
    # -[(1.0 - log(e^1 + e^0.2 + e^-0.5)) + (0.2 - log(e^0.2 + e^-0.5))]
    r = torch.tensor([1.0, -0.5, 0.2])
    first = 1.0 - math.log(math.e + math.exp(0.2) + math.exp(-0.5))
    second = 0.2 - math.log(math.exp(0.2) + math.exp(-0.5))
    got = plackett_luce_loss(r, torch.zeros(3, dtype=torch.long), torch.tensor([0, 2, 1]), 1)
    assert float(got) == pytest.approx(-(first + second), abs=1e-6)


def _reference_pl(rewards: list[float], levels: list[int]) -> float:
    """-log Plackett-Luce likelihood, term by term: each response above the worst level
    against every response ranked no better than it (ties in each other's denominators)."""
    worst, total = max(levels), 0.0
    for i, (r, level) in enumerate(zip(rewards, levels)):
        if level == worst:
            continue
        denom = sum(math.exp(rewards[j]) for j in range(len(rewards)) if levels[j] >= level)
        total += r - math.log(denom)
    return -total


def test_plackett_luce_loss_equals_a_reference_loop_over_a_batch_with_ties():
    g = random.Random(0)
    rewards, owner, levels, expected = [], [], [], 0.0
    for b in range(6):
        k = g.randint(2, 9)
        r = [g.gauss(0, 1.5) for _ in range(k)]
        lv = [g.randint(0, k - 1) for _ in range(k)] if b % 2 else g.sample(range(k), k)  # ties on odd prompts
        rewards += r
        levels += lv
        owner += [b] * k
        expected += _reference_pl(r, lv)
    got = plackett_luce_loss(torch.tensor(rewards, dtype=torch.float64), torch.tensor(owner), torch.tensor(levels), 6)
    assert float(got) == pytest.approx(expected / 6, rel=1e-10)


def test_plackett_luce_equals_pairwise_dpo_for_two_responses():
    g = torch.Generator().manual_seed(1)
    r = torch.randn(2 * 16, generator=g, dtype=torch.float64)
    owner = torch.arange(16).repeat_interleave(2)
    levels = torch.stack([torch.randperm(2, generator=g) for _ in range(16)]).flatten()
    win = torch.tensor([2 * b + int(levels[2 * b] == 1) for b in range(16)])
    lose = torch.tensor([2 * b + int(levels[2 * b] == 0) for b in range(16)])
    pl = plackett_luce_loss(r, owner, levels, 16)
    pw = kwise_loss(r, win, lose, torch.full((16,), 1 / 16, dtype=torch.float64))
    assert float(pl) == pytest.approx(float(pw), rel=1e-12)
    # and its gradient is the same too
    r1, r2 = r.clone().requires_grad_(), r.clone().requires_grad_()
    plackett_luce_loss(r1, owner, levels, 16).backward()
    kwise_loss(r2, win, lose, torch.full((16,), 1 / 16, dtype=torch.float64)).backward()
    assert torch.allclose(r1.grad, r2.grad, atol=1e-12)


def test_rank_levels_from_rankings_and_scores():
    c = Comparison(id="c", prompt="p", responses=["a", "b", "c"], ranking=[2, 0, 1])
    assert rank_levels(c) == [1, 2, 0]
    s = Comparison(id="s", prompt="p", responses=["a", "b", "c"], scores=[0.5, 1.0, 0.5])
    assert rank_levels(s) == [1, 0, 1]


def test_sequence_log_probs_and_implicit_rewards_match_a_token_by_token_loop():
    lm, _ = tiny_lm(seed=3)
    lm.eval()
    seqs = [([5, 9, 11, 4, 7, 2], 3), ([6, 8, 2], 2), ([5, 9, 11, 13, 2], 3)]
    got = response_logps(LMLoss(lm), seqs, pad_id=0)
    for (ids, n_prompt), value in zip(seqs, got):
        with torch.no_grad():
            logp = F.log_softmax(lm(input_ids=torch.tensor([ids])).logits[0].double(), -1)
        expected = sum(float(logp[t - 1, ids[t]]) for t in range(n_prompt, len(ids)))
        assert value == pytest.approx(expected, abs=1e-4)
    # the loss a batch of two comparisons gets, from the policy's and SFT's log-probs
    ref = [v - 0.3 for v in got]  # pi_SFT a little less likely than pi on every response
    ex = [DPOExample(seqs[:2], [0, 1], [(0, 1)], ref[:2]), DPOExample([seqs[2], seqs[0]], [1, 0], [(1, 0)], [ref[2], ref[0]])]
    batch = collate_dpo(ex, pad_id=0)
    loss, stats = dpo_loss(LMLoss(lm), batch, beta=0.5, kind="plackett_luce")
    margins = [0.5 * ((got[0] - ref[0]) - (got[1] - ref[1])), 0.5 * ((got[0] - ref[0]) - (got[2] - ref[2]))]
    assert float(loss.detach()) == pytest.approx(sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / 2, abs=1e-4)
    assert float(dpo_loss(LMLoss(lm), batch, 0.5, "pairwise")[0].detach()) == pytest.approx(float(loss.detach()), abs=1e-6)


def test_dpo_steps_raise_the_winner_over_the_loser():
    lm, _ = tiny_lm(seed=4)
    seqs = [([5, 9, 11, 4, 7, 2], 3), ([5, 9, 11, 8, 8, 2], 3), ([5, 9, 11, 6, 2], 3)]
    ref = response_logps(LMLoss(lm), seqs, pad_id=0)
    batch = collate_dpo([DPOExample(seqs, [2, 0, 1], [(1, 2), (1, 0), (2, 0)], ref)], pad_id=0)
    model = LMLoss(lm)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    first = None
    for _ in range(5):
        loss, _ = dpo_loss(model, batch, beta=1.0, kind="plackett_luce")
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    now = response_logps(model, seqs, pad_id=0)
    ratio = [n - r for n, r in zip(now, ref)]
    assert float(loss.detach()) < first and ratio[1] > ratio[2] > ratio[0]


# --------------------------------------------------------------------------- the ensemble
def test_conservative_reward_by_hand():
    s = torch.tensor([[1.0, 2.0], [3.0, 2.0], [2.0, 5.0]])  # 3 members x 2 responses
    # column 0: mean 2, population std sqrt(2/3); column 1: mean 3, std sqrt(2)
    assert torch.allclose(conservative_reward(s, "mean_minus_std", 1.0), torch.tensor([2 - math.sqrt(2 / 3), 3 - math.sqrt(2)]))
    assert torch.allclose(conservative_reward(s, "mean_minus_std", 0.5), torch.tensor([2 - 0.5 * math.sqrt(2 / 3), 3 - 0.5 * math.sqrt(2)]))
    assert conservative_reward(s, "min").tolist() == [1.0, 2.0]
    assert conservative_reward(s, "mean").tolist() == [2.0, 3.0]
    with pytest.raises(ValueError, match="unknown ensemble reward 'max'"):
        conservative_reward(s, "max")


def test_reward_ensemble_scores_each_member_and_combines_them():
    members = [tiny_rm(seed=s) for s in (1, 2, 3)]
    ids, mask = torch.tensor([[5, 9, 11, 2], [6, 7, 2, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    ens = RewardEnsemble(members, EnsembleConfig(members=3, reward="min"))
    score, std = ens(ids, mask)
    each = torch.stack([reward_scores(m, ids, mask) for m in members])
    assert torch.allclose(score, each.min(0).values) and torch.allclose(std, each.std(0, correction=0))


# --------------------------------------------------------------------------- best-of-n, over-optimization, seeds
def test_best_of_n_kl_and_choice():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert best_of_n_kl(16) == pytest.approx(math.log(16) - 15 / 16)
    assert pick([0.1, 0.5, 0.5, 0.9], 3) == 1 and pick([0.1, 0.5, 0.5, 0.9], 4) == 3 and pick([0.3], 1) == 0
    assert powers_of_two(16) == [1, 2, 4, 8, 16] and powers_of_two(12) == [1, 2, 4, 8, 12] and powers_of_two(1) == [1]


def test_gold_peak_finds_where_the_judge_turns_and_the_proxy_does_not():
    pts = [{"kl": k, "proxy": p, "win_rate": w} for k, p, w in
           [(0.0, -0.5, 0.50), (1.0, 0.0, 0.58), (2.5, 0.4, 0.61), (4.0, 0.7, 0.55), (6.0, 0.9, 0.52)]]
    peak = gold_peak(pts)
    assert peak["peak_kl"] == 2.5 and peak["peak_win_rate"] == 0.61 and not peak["peak_at_end"]
    assert peak["proxy_rose_after_peak"] and peak["proxy_max_after_peak"] == 0.9 and peak["final_win_rate"] == 0.52
    assert gold_peak(pts[:3])["peak_at_end"] and not gold_peak(pts[:3])["proxy_rose_after_peak"]


def test_spread_over_seeds_by_hand():
    s = spread([0.5, 0.6, 0.7])
    half = 4.303 * 0.1 / math.sqrt(3)  # Student's t, 2 degrees of freedom
    assert s["mean"] == 0.6 and s["sd"] == pytest.approx(0.1) and s["ci95"] == pytest.approx([0.6 - half, 0.6 + half], abs=1e-4)
    assert s["min"] == 0.5 and s["max"] == 0.7


def test_a_replicate_moves_the_seed_and_the_folder_and_nothing_else():
    p = Params()
    r = replicate(p, 2)
    assert r.project.seed == 2 and r.project.artifacts_dir == "artifacts/seeds/2" and not r.orchestrate.version_with_dvc
    assert r.ppo == p.ppo and r.data == p.data and replicate(p, 0) is p


def test_make_methods_refuses_a_configuration_without_the_comparison_before_prefect_starts(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT

    (tmp_path / "params.yaml").write_text("methods: {enabled: false}\n")
    proc = subprocess.run([sys.executable, "-m", "flows.methods", "--params", "params.yaml"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "params.yaml: methods.enabled is false" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "artifacts/seeds").exists()
