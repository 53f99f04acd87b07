"""Can a reward model learn to check a response against its prompt's words?

Trains the real reward stage (params.yaml's `reward` section) on clean,
synthetic comparisons where exactly one thing decides the ranking: whether
the response repeats a word of the prompt. Nothing about the response alone
tells the right answer from the wrong ones, so a model that does not read its
context stays at 0.5, and validation accuracy measures how well the RM,
starting from a given model, can learn that context check.

- chat:     "Hi, I am Nia ... What is my name?"; "Your name is Nia." beats three other names.
- summary:  the summarization prompt; "Nia bought a red cup." beats the same with three other colours.
- summary3: the same, but name, colour and object are each right or wrong at random;
            a response is scored by how many of the three it gets right (ties state no preference).
- closed:   closed QA; "It is red." (the colour of the asked person's thing) beats the
            other two colours of the text and one that is not in it.

    python bench/rm_context_check.py                                  # the default SFT model, every task
    python bench/rm_context_check.py --models artifacts/sft/model /tmp/other/sft/model --tasks summary3
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from instructflow.data.formats import Comparison
from instructflow.io import write_jsonl
from instructflow.suite import world as W
from reward_runs import run_reward_on

TASKS = ("chat", "summary", "summary3", "closed")


def _other(pool: list[str], not_this: str, rng: random.Random) -> str:
    return rng.choice([x for x in pool if x != not_this])


def make_comparison(task: str, i: int, rng: random.Random) -> Comparison:
    """One K=4 comparison of `task`, scored by the context check alone."""
    if task == "chat":
        name, fruit = rng.choice(W.NAMES), rng.choice(W.FRUITS)
        prompt = f"Hi, I am {name} and I like {fruit}s.\n\nAssistant: Nice to meet you, {name}!\n\nHuman: What is my name?"
        answers = [name] + rng.sample([x for x in W.NAMES if x != name], 3)
        responses, scores = [f"Your name is {x}." for x in answers], [1.0, 0.0, 0.0, 0.0]
    elif task in ("summary", "summary3"):
        name, place, color, obj = rng.choice(W.NAMES), rng.choice(W.PLACES), rng.choice(W.COLORS), rng.choice(W.OBJECTS)
        prompt = (f"Summarize in at most 6 words: {name} went to the {place}. "
                  f"{name} bought a {color} {obj} there. The day was sunny.")
        if task == "summary":
            colors = [color] + rng.sample([c for c in W.COLORS if c != color], 3)
            responses, scores = [f"{name} bought a {c} {obj}." for c in colors], [1.0, 0.0, 0.0, 0.0]
        else:
            responses, scores = [], []
            while len(responses) < 4 or len(set(scores)) < 2:
                if len(responses) == 4:  # all four equally good: draw again
                    responses, scores = [], []
                ok = [rng.random() < 0.5 for _ in range(3)]
                r = (f"{name if ok[0] else _other(W.NAMES, name, rng)} bought a "
                     f"{color if ok[1] else _other(W.COLORS, color, rng)} {obj if ok[2] else _other(W.OBJECTS, obj, rng)}.")
                if r not in responses:
                    responses.append(r)
                    scores.append(float(sum(ok)))
    elif task == "closed":
        people, objs, colors = rng.sample(W.NAMES, 3), rng.sample(W.OBJECTS, 3), rng.sample(W.COLORS, 3)
        j = rng.randrange(3)
        context = " ".join(f"{p} has a {c} {o}." for p, c, o in zip(people, colors, objs))
        prompt = f"Read: {context}\nQuestion: What color is {people[j]}'s {objs[j]}?"
        answers = [colors[j], colors[(j + 1) % 3], colors[(j + 2) % 3], rng.choice([c for c in W.COLORS if c not in colors])]
        responses, scores = [f"It is {c}." for c in answers], [1.0, 0.0, 0.0, 0.0]
    else:
        raise ValueError(f"unknown task '{task}'; choose from {', '.join(TASKS)}")
    order = list(range(len(responses)))
    rng.shuffle(order)
    return Comparison(id=f"{task}-{i:05d}", prompt=prompt, category=task,
                      responses=[responses[k] for k in order], scores=[scores[k] for k in order])


def check(params_path: Path, model: Path, task: str, n_train: int, n_val: int, seed: int, work: Path) -> dict:
    rng = random.Random(seed)
    train = [make_comparison(task, i, rng) for i in range(n_train)]
    val = [make_comparison(task, n_train + i, rng) for i in range(n_val)]
    write_jsonl(work / "train.jsonl", train)
    write_jsonl(work / "val.jsonl", val)
    _, m = run_reward_on(params_path, model, work / "train.jsonl", work / "val.jsonl", work)
    return {"model": str(model), "task": task, "train_comparisons": n_train,
            "train_accuracy": m.get("train_accuracy"), "val_accuracy": m["val_accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--models", type=Path, nargs="+", default=[Path("artifacts/sft/model")])
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    ap.add_argument("--train", type=int, default=2000, help="training comparisons per task")
    ap.add_argument("--val", type=int, default=300, help="validation comparisons per task")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("bench/results/rm_context_check.json"))
    args = ap.parse_args()
    rows = []
    for model in args.models:
        for task in args.tasks:
            with tempfile.TemporaryDirectory() as tmp:
                rows.append(check(args.params, model, task, args.train, args.val, args.seed, Path(tmp)))
            print(json.dumps(rows[-1]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print("\n| model | task | train comparisons | val accuracy |\n| --- | --- | ---: | ---: |")
    for r in rows:
        print(f"| {r['model']} | {r['task']} | {r['train_comparisons']} | {r['val_accuracy']:.3f} |")


if __name__ == "__main__":
    main()
