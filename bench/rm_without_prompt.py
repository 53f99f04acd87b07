"""How much of the reward model's accuracy comes from reading the prompt?

Trains the RM stage twice from the same SFT model, with the same seed and
settings (params.yaml's `reward` section): once on the collected comparisons
as they are, once with every prompt, in training and in validation, replaced
by one constant text. The second RM judges responses alone. If the two
validation accuracies match, the first RM did not use the prompt either:
whatever it learnt is about the response by itself.

    python bench/rm_without_prompt.py            # needs the sft, collect and data stages' outputs
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path

from instructflow.config import load_params
from instructflow.data.formats import Comparison
from instructflow.io import read_jsonl, write_jsonl
from instructflow.modeling import load_reward_model
from instructflow.reward import pairwise_accuracy
from reward_runs import run_reward_on

CONSTANT_PROMPT = "Reply."


def train_and_score(params_path: Path, artifacts: Path, train: Path, val: Path, work: Path) -> dict:
    """Run the real reward stage under `work` on these comparison files, from the SFT
    model; return its metrics and its validation accuracy per category."""
    p, metrics = run_reward_on(params_path, artifacts / "sft" / "model", train, val, work)
    model, tok = load_reward_model(work / "reward" / "model")
    by: dict[str, list[Comparison]] = defaultdict(list)
    for c in read_jsonl(val, Comparison):
        by[c.category or "-"].append(c)
    per_cat = {cat: round(pairwise_accuracy(model, tok, cs, p.reward.max_len), 3) for cat, cs in sorted(by.items())}
    return {"train_accuracy": metrics.get("train_accuracy"), "val_accuracy": metrics["val_accuracy"], "by_category": per_cat}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="bench/results/rm_without_prompt.json")
    args = ap.parse_args()
    artifacts = Path(load_params(args.params).project.artifacts_dir)
    train, val = artifacts / "collect" / "comparisons_train.jsonl", artifacts / "collect" / "comparisons_val.jsonl"
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        blank = {}
        for name, path in (("train", train), ("val", val)):
            blank[name] = tmp / f"blank_{name}.jsonl"
            write_jsonl(blank[name], [c.model_copy(update={"prompt": CONSTANT_PROMPT}) for c in read_jsonl(path, Comparison)])
        for variant, (tr, va) in (("with_prompt", (train, val)), ("without_prompt", (blank["train"], blank["val"]))):
            work = tmp / variant
            work.mkdir()
            result[variant] = train_and_score(Path(args.params), artifacts, tr.resolve(), va.resolve(), work)
            print(variant, json.dumps(result[variant]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    cats = result["with_prompt"]["by_category"]
    print(f"\n| category | with prompt | without prompt |\n| --- | ---: | ---: |")
    for cat in cats:
        print(f"| {cat} | {cats[cat]:.3f} | {result['without_prompt']['by_category'][cat]:.3f} |")
    print(f"| all | {result['with_prompt']['val_accuracy']:.4f} | {result['without_prompt']['val_accuracy']:.4f} |")


if __name__ == "__main__":
    main()
