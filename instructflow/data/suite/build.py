"""Build the built-in datasets: pretraining corpus, SFT demonstrations, and the
prompt sets for RM collection, RL and evaluation.

- The pretraining corpus is plain world text (facts, stories, reviews, lists,
  some toxic sentences, as web text has) with no instruction format: the base
  model learns the world, not how to follow instructions.
- Demonstrations are written by the *training* labelers, each with its own
  error rate; the held-out labeler writes nothing.
- Held-out categories appear only in the evaluation prompts.
- Evaluation prompts are drawn first and their texts are excluded from every
  other set (where the template space allows; the count of unavoidable
  repeats is reported).
"""

from __future__ import annotations

import random
from pathlib import Path

from ...config import DataConfig
from ...io import write_jsonl
from ..formats import Demonstration, PretrainText, Prompt, split_by_prompt
from . import world as W
from .instructions import grade, harmful_probability, make_prompt
from .labelers import Labeler


# --------------------------------------------------------------------------- corpus
def _sentence(rng: random.Random) -> str:
    kind = rng.choices(
        ["fact", "fruit_fact", "has", "animal", "review", "list", "went", "bought", "names", "toxic"],
        weights=[14, 10, 14, 12, 12, 10, 8, 8, 8, 4],
    )[0]
    name, name2 = rng.sample(W.NAMES, 2)
    if kind == "fact":
        c = rng.choice(list(W.KNOWN_COUNTRIES))
        cap = W.KNOWN_COUNTRIES[c]
        return rng.choice([f"The capital of {c} is {cap}.", f"{cap} is the capital of {c}.", f"{c} is a country and its capital is {cap}."])
    if kind == "fruit_fact":
        c = rng.choice(list(W.KNOWN_COUNTRIES))
        return rng.choice([f"People in {c} grow {W.COUNTRY_FRUIT[c]}s.", f"In {c} the farms grow {W.COUNTRY_FRUIT[c]}s."])
    if kind == "has":
        people = rng.sample(W.NAMES, 3)
        owned = [(p, rng.choice(W.COLORS), o) for p, o in zip(people, rng.sample(W.OBJECTS, 3))]
        text = " ".join(f"{p} has a {c} {o}." for p, c, o in owned)
        p, c, o = rng.choice(owned)  # web text often reads a fact back
        return text + rng.choice([f" So {p}'s {o} is {c}.", f" The {o} of {p} is {c}.", ""])
    if kind == "animal":
        return f"The {rng.choice(W.COLORS)} {rng.choice(W.ANIMALS)} {rng.choice(W.VERBS)} near the {rng.choice(W.PLACES)}."
    if kind == "review":
        food = rng.choice(W.FOODS)
        positive, negate = rng.random() < 0.5, rng.random() < 0.3
        polar = positive != negate
        if rng.random() < 0.5:
            review = f"I {'do not ' if negate else ''}{rng.choice(W.POS_VERBS if polar else W.NEG_VERBS)} the {food}."
        else:
            review = f"The {food} was {'not ' if negate else ''}{rng.choice(W.POS_ADJS if polar else W.NEG_ADJS)}."
        verdict = "positive" if positive else "negative"
        return review + rng.choice([f" That is a {verdict} review.", f" The review is {verdict}.", ""])
    if kind == "list":
        k = rng.choice(list(W.KINDS))
        return f"Some {k} are {', '.join(rng.sample(W.KINDS[k], 2))} and {rng.choice(W.KINDS[k])}."
    if kind == "went":
        return f"{name} went to the {rng.choice(W.PLACES)}. The day was {rng.choice(W.WEATHER)}."
    if kind == "bought":
        return f"{name} bought a {rng.choice(W.COLORS)} {rng.choice(W.OBJECTS)} at the {rng.choice(W.PLACES)}."
    if kind == "names":
        return f"{name} and {name2} saw a {rng.choice(W.ANIMALS)} near the {rng.choice(W.PLACES)}."
    return rng.choice([f"{name} is a {rng.choice(W.INSULTS)} {rng.choice(W.ANIMALS)}.",
                       f"{name} said {name2} is {rng.choice(W.INSULTS)}."])


def pretrain_corpus(n_docs: int, rng: random.Random) -> list[str]:
    return [" ".join(_sentence(rng) for _ in range(rng.randint(2, 6))) for _ in range(n_docs)]


# --------------------------------------------------------------------------- prompts
class _PromptSource:
    """Draws prompts, uniformly over categories, avoiding excluded texts."""

    def __init__(self, cfg: DataConfig, rng: random.Random):
        self.cfg, self.rng = cfg, rng
        self.harmful_prob = harmful_probability(cfg.categories, cfg.harmful_rate)
        self.repeats = 0  # draws that had to reuse an excluded text

    def draw(self, categories: list[str], n: int, prefix: str, exclude: set[str]) -> list[Prompt]:
        out = []
        for i in range(n):
            cat = categories[i % len(categories)]
            for _ in range(50):
                text, spec = make_prompt(cat, self.rng, self.cfg.unanswerable_rate, self.harmful_prob)
                if text not in exclude:
                    break
            else:  # this category's templates keep giving evaluation prompts: leave the slot out
                self.repeats += 1
                continue
            out.append(Prompt(id=f"{prefix}-{i:05d}", prompt=text, category=cat, meta=spec))
        self.rng.shuffle(out)
        return out


def fresh_prompts(cfg: DataConfig, seed: int, n: int, prefix: str, exclude: set[str]) -> list[Prompt]:
    """n more prompts over the training categories (a round's new prompts), none of them in `exclude`."""
    train_cats = [c for c in cfg.categories if c not in cfg.heldout_categories]
    return _PromptSource(cfg, random.Random(seed)).draw(train_cats, n, prefix, exclude)


def _split(items: list, val_fraction: float) -> tuple[list, list]:
    n_val = max(1, round(len(items) * val_fraction))
    return items[n_val:], items[:n_val]


def build_builtin(cfg: DataConfig, seed: int, out_dir: Path) -> dict:
    """Write every built-in dataset under `out_dir`; return counts for result.json."""
    rng = random.Random(seed)
    train_cats = [c for c in cfg.categories if c not in cfg.heldout_categories]
    src = _PromptSource(cfg, rng)

    eval_prompts = src.draw(cfg.categories, cfg.eval_prompts, "eval", exclude=set())
    eval_texts = {p.prompt for p in eval_prompts}
    sft_prompts = src.draw(train_cats, cfg.sft_prompts, "sft", exclude=eval_texts)
    rm_prompts = src.draw(train_cats, cfg.rm_prompts, "rm", exclude=eval_texts)
    ppo_prompts = src.draw(train_cats, cfg.ppo_prompts, "ppo", exclude=eval_texts)

    writers = [Labeler(lab) for lab in cfg.labelers if not lab.heldout]
    demos = []
    for p in sft_prompts:
        lab = rng.choice(writers)
        demos.append(Demonstration(**p.model_dump(), response=lab.demonstrate(p.meta, rng), labeler=lab.name))
    sft_train, sft_val = split_by_prompt(demos, cfg.val_fraction, seed)
    rm_train, rm_val = split_by_prompt(rm_prompts, cfg.val_fraction, seed + 1)

    docs = list({t: PretrainText(text=t) for t in pretrain_corpus(cfg.pretrain_docs, rng)}.values())  # no document twice
    pt_train, pt_heldout = _split(docs, cfg.pretrain_heldout_fraction)

    files = {
        "pretrain_train": pt_train, "pretrain_heldout": pt_heldout,
        "sft_train": sft_train, "sft_val": sft_val,
        "rm_prompts_train": rm_train, "rm_prompts_val": rm_val,
        "ppo_prompts": ppo_prompts, "eval_prompts": eval_prompts,
    }
    counts = {name: write_jsonl(out_dir / f"{name}.jsonl", recs) for name, recs in files.items()}
    flawed = sum(_is_flawed(d) for d in demos)
    # How much of each category's prompt space a split covers: a category whose templates
    # give few texts beyond the evaluation prompts' would train on a handful of prompts.
    distinct = {name: _distinct_by_category(files[name]) for name in ("sft_train", "rm_prompts_train", "ppo_prompts", "eval_prompts")}
    return {"counts": counts, "train_categories": train_cats, "heldout_categories": cfg.heldout_categories,
            "training_prompts_dropped_as_eval_repeats": src.repeats, "demonstration_error_rate": round(flawed / len(demos), 4),
            "distinct_prompts_by_category": distinct}


def _distinct_by_category(records: list) -> dict[str, int]:
    texts: dict[str, set[str]] = {}
    for r in records:
        texts.setdefault(r.category or "other", set()).add(r.prompt)
    return {c: len(t) for c, t in sorted(texts.items())}


def _is_flawed(d: Demonstration) -> bool:
    g = grade(d.meta, d.response)
    return min(g.correct, g.constraint, g.honest, g.harmless) < 1.0
