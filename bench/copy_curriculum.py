"""Experiment: can a pretraining curriculum give the tiny model the in-context
reading that the RM lacks (see bench/context_probe.py)?

Phase 1 trains a fresh default-shape model on short, dense copy documents
("Look. Ana has a red cup. Ben has a blue hat. As I said, Ben has a blue hat.") in
32-token blocks, 128 per step, lr 1e-3: the shape of data in which a copy
circuit forms within a few hundred steps, where 128-token blocks of the same
text do not. Phase 2 is the default pretraining (pretrain.* of params.yaml) on
the built-in corpus, with `--mix` times as many extra documents of three copy
texts each, shuffled in, so that phase 2 does not erase what phase 1 formed.
The probe runs after each phase.

The result is a run folder whose pretrain/model replaces the default base;
the script prints the commands that train SFT, collect and the RM on it.
It needs the default pipeline's data and tokenizer (artifacts/data,
artifacts/validate, artifacts/pretrain/model).

    python bench/copy_curriculum.py --out /tmp/curriculum [--phase1-steps 350] [--mix 0.3]
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
import yaml

from instructflow.config import load_params
from instructflow.data.formats import PretrainText
from instructflow.io import read_jsonl
from instructflow.modeling import build_tiny_llama, load_causal_lm
from instructflow.pretrain import causal_lm_loss, heldout_loss, pack
from instructflow.suite import world as W
from instructflow.training import make_accelerator, save_model_atomic, setup_runtime, train_loop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from context_probe import probe  # noqa: E402


def copy_text(rng: random.Random) -> str:
    people, objs = rng.sample(W.NAMES, 2), rng.sample(W.OBJECTS, 2)
    facts = [f"{p} has a {rng.choice(W.COLORS)} {o}." for p, o in zip(people, objs)]
    # "Look." puts a space before the first name too, so that the read-back repeats its tokens exactly
    return " ".join(["Look.", *facts, f"As I said, {rng.choice(facts)}"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="run folder (its artifacts_dir)")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--phase1-steps", type=int, default=350)
    ap.add_argument("--mix", type=float, default=0.3, help="extra copy documents in phase 2, per corpus document")
    args = ap.parse_args()

    raw = yaml.safe_load(args.params.read_text())
    source = Path(raw["project"]["artifacts_dir"]).resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    for stage in ("data", "validate"):
        if not (args.out / stage).exists():
            (args.out / stage).symlink_to(source / stage)
    raw["project"]["artifacts_dir"] = str(args.out.resolve())
    run_params = args.out / "params.yaml"
    run_params.write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(run_params)
    setup_runtime(params.project)

    _, tok = load_causal_lm(source / "pretrain" / "model")  # the default run's tokenizer
    model = build_tiny_llama(tok, params.model.tiny, params.project.seed)
    rng = random.Random(params.project.seed)

    if args.phase1_steps:
        n_docs = args.phase1_steps * 128 * 32 // 20  # about 26 tokens per document
        blocks = pack(tok, [copy_text(rng) for _ in range(n_docs)], 32)
        if len(blocks) < args.phase1_steps * 128:
            raise ValueError(f"phase 1: {len(blocks)} blocks for {args.phase1_steps} steps of 128")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
        model.train()
        for step in range(args.phase1_steps):
            x = torch.stack(blocks[step * 128 : (step + 1) * 128])
            loss = causal_lm_loss(model(input_ids=x).logits, x)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        save_model_atomic(model, tok, args.out / "phase1" / "model")
        print("after phase 1:", probe(args.out / "phase1" / "model"), flush=True)

    texts = [r.text for r in read_jsonl(args.out / "data" / "pretrain_train.jsonl", PretrainText)]
    texts += [" ".join(copy_text(rng) for _ in range(3)) for _ in range(int(len(texts) * args.mix))]
    rng.shuffle(texts)
    acc = make_accelerator(params.project, params.pretrain.grad_accum)
    res = train_loop(name="pretrain", model=model, examples=pack(tok, texts, params.pretrain.seq_len),
                     collate=lambda xs: {"input_ids": torch.stack(xs)},
                     loss_fn=lambda m, b: (causal_lm_loss(m(input_ids=b["input_ids"]).logits, b["input_ids"]), {}),
                     cfg=params.pretrain, out_dir=args.out / "pretrain", accelerator=acc, seed=params.project.seed,
                     count_fn=lambda b: b["input_ids"].numel())
    model = acc.unwrap_model(model)
    held = pack(tok, [r.text for r in read_jsonl(args.out / "data" / "pretrain_heldout.jsonl", PretrainText)],
                params.pretrain.seq_len)
    save_model_atomic(model, tok, args.out / "pretrain" / "model")
    print(f"after phase 2 ({res.steps} steps, held-out loss {heldout_loss(model, held):.4f}):",
          probe(args.out / "pretrain" / "model"))
    print(f"next: for s in sft collect reward; do instructflow $s --params {run_params}; done\n"
          f"then: python bench/rm_by_category.py --rm {args.out}/reward/model "
          f"--comparisons {args.out}/collect/comparisons_val.jsonl")


if __name__ == "__main__":
    main()
