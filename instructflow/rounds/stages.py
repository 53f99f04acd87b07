"""Rounds of on-policy feedback (`make round`, flows/rounds.py; the weekly deployment).

One round, as InstructGPT's later batches and Llama 2's five rounds gathered theirs:

    round_champion   the current champion's policy (round 1: SFT), fetched verified from the store
    round_feedback   K answers per new prompt from it, ranked (instructflow.rounds.ranking), checked by
                     Great Expectations, added to the dataset of all rounds
    round_reward     the RM retrained from SFT on every round's comparisons and collect's
    round_ppo        PPO (or PPO-ptx, rounds.algorithm) from the champion against that RM,
                     KL-penalized to SFT as in the paper
    round_export     that RM to ONNX
    round_gate       challenger, champion and SFT answer the same held-out prompts; the judge
                     (held-out labeler or gold RM) compares them: promote only when the lower end
                     of the challenger's 95% interval over the champion is above rounds.gate_min_lower

Then the flow promotes (instructflow.rounds.champion: a new version, the pointer moved last),
appends the round to the ledger and commits the ticket, the ledger and dvc.lock.

The ticket (rounds.ticket, kept in git) names the round and the champion it starts from;
every round stage reads it, so a new round has new stage keys, and checking out a round's
commit and running `dvc repro` reproduces it (versions in the store are never overwritten).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import statistics
import time
from pathlib import Path

from ..config import Params
from ..context import StageContext
from ..data.formats import Prompt
from ..io import content_hash, read_jsonl, swap_in, write_json

log = logging.getLogger(__name__)

SFT = "sft"  # the ticket's champion before anything was promoted


# --------------------------------------------------------------------------- the ticket and the ledger
def read_ticket(params: Params) -> dict:
    path = Path(params.rounds.ticket)
    if not path.is_file():
        raise ValueError(f"{path}: no round ticket; `make round` (flows/rounds.py) writes it when it opens a round")
    ticket = json.loads(path.read_text())
    if not isinstance(ticket.get("round"), int) or ticket["round"] < 1 or not isinstance(ticket.get("champion"), str):
        raise ValueError(f"{path}: a ticket is {{\"round\": <int >= 1>, \"champion\": \"sft\" | \"v<N>\"}}, got {ticket}")
    return ticket


def read_ledger(params: Params) -> list[dict]:
    path = Path(params.rounds.ledger)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def append_ledger(params: Params, entry: dict) -> None:
    """Add or replace (a round run again) the round's line; the file is rewritten whole."""
    rows = [r for r in read_ledger(params) if r["round"] != entry["round"]] + [entry]
    path = Path(params.rounds.ledger)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in sorted(rows, key=lambda r: r["round"])))
    tmp.replace(path)


def open_round(params: Params) -> dict:
    """The ticket of the round to run: the current one again when it has not finished (its
    stages are then cached), else the next, starting from the champion the store points at."""
    from ..serving.storage import open_store
    from .champion import read_pointer

    path = Path(params.rounds.ticket)
    finished = {r["round"] for r in read_ledger(params)}
    ticket = read_ticket(params) if path.is_file() else None
    if ticket is not None and ticket["round"] not in finished:
        return ticket
    pointer = read_pointer(open_store(params.rounds.store))
    ticket = {"round": max([*finished, ticket["round"] if ticket else 0]) + 1,
              "champion": pointer["version"] if pointer else SFT}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, ticket)
    return ticket


# --------------------------------------------------------------------------- the stages
def run_round_champion(ctx: StageContext) -> dict:
    from .champion import fetch_version

    ticket, policy = read_ticket(ctx.params), ctx.output("policy")
    with ctx.phase("fetch"):
        if ticket["champion"] == SFT:
            tmp = policy.with_name(policy.name + ".copy")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(ctx.input("sft"), tmp)
            swap_in(tmp, policy)
        else:
            fetch_version(ctx.params.rounds.store, ticket["champion"], policy, "policy")
    write_json(ctx.output("champion"), ticket)
    return {"round": ticket["round"], "champion": ticket["champion"]}


def round_files(folder: Path) -> list[Path]:
    """Every round's comparisons in the round_feedback stage's `feedback` folder, in round order."""
    return sorted(folder.glob("round_*.jsonl"))


def run_round_feedback(ctx: StageContext) -> dict:
    """K distinct answers per new prompt from the champion, ranked (simulated labelers, or people in Label
    Studio), validated, then added to the dataset of all rounds (artifacts/round_feedback/feedback/round_NNN.jsonl)."""
    from ..data.validate import ValidationFailed, validate_file

    params = ctx.params
    ticket = read_ticket(params)
    n, seed = ticket["round"], params.project.seed + 1000 * ticket["round"]
    folder = ctx.output("feedback")
    folder.mkdir(parents=True, exist_ok=True)
    prompts = round_prompts(ctx, n, seed)
    kept = champion_answers(ctx, prompts, seed)
    with ctx.phase("rank"):
        ranker, comparisons = rank_answers(ctx, n, seed, kept)
    incoming = ctx.folder / "incoming" / f"round_{n:03d}.jsonl"
    incoming.parent.mkdir(exist_ok=True)
    incoming.write_text("".join(c.model_dump_json(exclude_none=True) + "\n" for c in comparisons))
    with ctx.phase("validate"):
        report = validate_file(incoming, "comparisons", params.validate_, quarantine_dir=ctx.folder / "quarantine")
    bad = set(report.bad_lines)
    if any(not f.lines for f in report.failures) or len(bad) > params.rounds.max_rejected_share * len(comparisons):
        raise ValidationFailed([report])  # nothing joins the dataset, nothing trains
    if bad:  # a few bad rows: quarantined (report.quarantine), the rest join
        log.warning("round_feedback: %d of %d comparisons fail validation and are left out:\n%s", len(bad),
                    len(comparisons), report.summary())
        comparisons = [c for line, c in enumerate(comparisons, 1) if line not in bad]
        incoming.write_text("".join(c.model_dump_json(exclude_none=True) + "\n" for c in comparisons))
    incoming.replace(folder / incoming.name)
    for later in round_files(folder):  # a round run again from an older commit: the later rounds are not in its dataset
        if int(later.stem.split("_")[1]) > n:
            later.unlink()
    metrics = {"round": n, "champion": ticket["champion"], "ranker": ranker.name, "comparisons_added": len(comparisons),
               "rejected_by_validation": len(bad),
               "skipped_prompts": len(prompts) - len(comparisons),
               "mean_k": round(statistics.fmean(len(c.responses) for c in comparisons), 3) if comparisons else 0,
               "comparisons_all_rounds": sum(1 for f in round_files(folder) for line in f.open() if line.strip()),
               "rounds_in_dataset": len(round_files(folder)),
               # how good the champion's samples are by the held-out labeler: it rises as champions improve
               "sample_quality_heldout_labeler": heldout_quality(params, comparisons),
               **labeling_figures(getattr(ranker, "report", {}))}
    log.info("round_feedback: %s", metrics)
    return metrics


def round_prompts(ctx: StageContext, n: int, seed: int) -> list[Prompt]:
    """rounds.prompts new prompts for round n: fresh ones from the built-in suite (none of the evaluation's),
    or with your data, round n's share of data.ppo_prompts in a seeded order (no prompt twice in
    len(ppo_prompts) / rounds.prompts rounds)."""
    params, count = ctx.params, ctx.params.rounds.prompts
    eval_texts = {p.prompt for p in read_jsonl(ctx.input("eval_prompts"), Prompt)}
    if params.data.source == "builtin":
        from ..data.suite.build import fresh_prompts

        return fresh_prompts(params.data, seed, count, f"round{n:03d}", exclude=eval_texts)
    pool = [p for p in read_jsonl(ctx.input("ppo_prompts"), Prompt) if p.prompt not in eval_texts]
    random.Random(params.project.seed).shuffle(pool)
    start = ((n - 1) * count) % max(len(pool), 1)
    return [p.model_copy(update={"id": f"round{n:03d}-{p.id}"}) for p in (pool[start:] + pool[:start])[:count]]


def champion_answers(ctx: StageContext, prompts: list[Prompt], seed: int) -> list[tuple[Prompt, list[str]]]:
    """The champion's K answers to each prompt (`answers`)."""
    with ctx.phase("sample"):
        return answers(ctx.params, ctx.input("policy"), prompts, seed)


def answers(params: Params, model_dir: Path, prompts: list[Prompt], seed: int) -> list[tuple[Prompt, list[str]]]:
    """The first collect.k distinct answers of the model to each prompt, sampled as collect samples (prompts
    with fewer than two left out)."""
    from ..lm.generation import generate
    from ..lm.modeling import load_causal_lm
    from ..lm.training import autocast
    from ..stages.collect import distinct_first

    cfg = params.collect
    model, tok = load_causal_lm(model_dir, params.model.dtype)
    with autocast(params.model.mixed_precision, next(model.parameters()).device):
        samples = generate(model, tok, [p.prompt for p in prompts], max_new_tokens=cfg.max_new_tokens,
                           num_samples=cfg.candidates, temperature=cfg.temperature, batch_size=cfg.batch_size, seed=seed)
    # U+FFFD is what decoding makes of a token sequence cut inside a UTF-8 character: no ranker can read it
    samples = [[a.replace("\ufffd", "") for a in row] for row in samples]
    kept = [(p, distinct_first(s, cfg.k)) for p, s in zip(prompts, samples)]
    return [(p, r) for p, r in kept if len(r) >= 2]


def rank_answers(ctx: StageContext, n: int, seed: int, kept: list[tuple[Prompt, list[str]]]):
    """(the ranker, its comparisons); with people, the labeling report (agreement, known-answer accuracy per
    labeler, what was left out and why) goes to the stage's `labeling` report."""
    from .ranking import make_ranker

    ranker = make_ranker(ctx.params, seed, round_project_title(ctx.params, n), ctx.folder / "labeling" / f"round_{n:03d}.json")
    comparisons = ranker.rank([p for p, _ in kept], [r for _, r in kept])
    write_json(ctx.output("labeling"), {"round": n, "ranker": ranker.name, **getattr(ranker, "report", {})})
    return ranker, comparisons


def round_project_title(params: Params, n: int) -> str:
    """The Label Studio project of round n's rankings."""
    return f"{params.labeling.project_prefix} round {n:03d}: rank the answers"


def heldout_quality(params: Params, comparisons: list) -> float | None:
    """How good the champion's samples are by the built-in suite's held-out labeler (None with your data)."""
    if params.data.source != "builtin":
        return None
    from ..data.suite.labelers import Labeler

    heldout = Labeler(next(lab for lab in params.data.labelers if lab.heldout))
    quality = [heldout.latent(c.meta, r) for c in comparisons for r in c.responses]
    return round(statistics.fmean(quality), 4) if quality else None


LABELING_FIGURES = ("labeling_annotations", "labeling_left_out", "labeler_agreement", "labelers_below_known_accuracy",
                    "labelers_held_out")


def labeling_figures(report: dict) -> dict:
    """The labeling report's headline figures, for the round's metrics and ledger."""
    q = report.get("quality") or {}
    if not report:
        return {}
    return {"labeling_annotations": report.get("annotations"), "labeling_left_out": len(report.get("problems", [])),
            "labeler_agreement": q.get("agreement"), "labelers_below_known_accuracy": q.get("below_min_known_accuracy"),
            "labelers_held_out": q.get("held_out")}


def run_round_reward(ctx: StageContext) -> dict | None:
    """The RM from SFT on collect's comparisons and every round's, validated on collect's val set
    (the same yardstick every round)."""
    from ..stages.reward import RewardData, train_reward_model

    everything = ctx.folder / "comparisons_train.jsonl"
    with everything.open("w") as fh:
        for f in [ctx.input("comparisons_train"), *round_files(ctx.input("feedback"))]:
            fh.writelines(line if line.endswith("\n") else line + "\n" for line in f.open() if line.strip())
    return train_reward_model(ctx, RewardData.of(ctx, train=everything), ctx.folder, ctx.run_key,
                              ctx.params.project.seed, centre=True)


def run_round_ppo(ctx: StageContext) -> dict | None:
    from ..stages.ppo import train_ppo

    return train_ppo(ctx, ptx=ctx.params.rounds.algorithm == "ppo_ptx", snapshots_on=False)


def judged_answers(params: Params, judge, prompts: list[Prompt], models: dict[str, Path]) -> dict[str, list[float]]:
    """Each model answers the prompts as the eval stage has them answer (evaluate.eval_answers);
    the judge's value of every answer, per model."""
    from ..lm.modeling import load_causal_lm
    from ..lm.training import autocast
    from ..stages.evaluate import eval_answers

    values = {}
    for name, folder in models.items():
        model, tok = load_causal_lm(folder, params.model.dtype)
        with autocast(params.model.mixed_precision, next(model.parameters()).device):
            answers, _ = eval_answers(params, model, tok, [p.prompt for p in prompts])
        values[name] = judge.values(prompts, answers)
    return values


def compare_versions(params: Params, a: str, b: str, cache: Path) -> dict:
    """Version `a` against version `b` of the store ("sft": the pipeline's SFT model) by the judge, on the
    gate's prompts: a's win rate with its 95% interval (e.g. round 3's champion against round 1's)."""
    from ..lm.training import setup_runtime
    from ..registry import output
    from ..stages.evaluate import make_judge, win_rates
    from .champion import fetch_version

    setup_runtime(params.project)
    folders = {}
    for v in (a, b):
        folders[v] = (output(params, "sft", "model") if v == SFT else
                      fetch_version(params.rounds.store, v, cache / v / "policy", "policy"))
    prompts = read_jsonl(output(params, "data", "eval_prompts"), Prompt)[: params.rounds.gate_prompts or None]
    gold = output(params, "gold_reward", "model") if params.data.source != "builtin" else None
    judge = make_judge(params, gold)
    values = judged_answers(params, judge, prompts, folders)
    w = win_rates(judge, prompts, values[a], values[b], params.project.seed, params.eval.bootstrap)
    return {"a": a, "b": b, "judge": judge.name, "prompts": len(prompts), "win_rate": w["win_rate"], "ci95": w["ci95"],
            "ties": w["ties"], "judge_score": {v: round(statistics.fmean(x), 4) for v, x in values.items()}}


def run_round_gate(ctx: StageContext) -> dict:
    """Challenger, champion and SFT answer the same held-out prompts (the eval stage's sampling);
    the judge compares them. The decision and its reason go to artifacts/round_gate/report.json."""
    from ..stages.evaluate import judge_accuracy, stage_judge, win_rates

    params = ctx.params
    ticket = read_ticket(params)
    prompts = read_jsonl(ctx.input("eval_prompts"), Prompt)[: params.rounds.gate_prompts or None]
    judge = stage_judge(ctx)
    models = {name: ctx.input(name) for name in ("sft", "champion", "challenger")}
    if ticket["champion"] == SFT:
        del models["champion"]  # the champion is SFT: the same answers
    with ctx.phase("answer"):
        values = judged_answers(params, judge, prompts, models)
    values.setdefault("champion", values["sft"])

    def versus(a: str, b: str) -> dict:
        w = win_rates(judge, prompts, values[a], values[b], params.project.seed + ticket["round"], params.eval.bootstrap)
        return {"win_rate": w["win_rate"], "ci95": w["ci95"], "ties": w["ties"]}

    vs_champion, vs_sft = versus("challenger", "champion"), versus("challenger", "sft")
    lower, bar = vs_champion["ci95"][0], params.rounds.gate_min_lower
    promote = lower > bar
    accuracy = judge_accuracy(ctx, judge, params.eval.bootstrap, params.project.seed + 7)
    measured = (f"the challenger's win rate over the champion ({ticket['champion']}) is {vs_champion['win_rate']:.3f}, "
                f"95% CI [{lower:.3f}, {vs_champion['ci95'][1]:.3f}], by a judge that orders held-out comparisons as "
                f"people do {accuracy['accuracy']:.3f} of the time [{accuracy['ci95'][0]:.3f}, {accuracy['ci95'][1]:.3f}]")
    reason = (f"promoted: {measured}; its lower end is above {bar}" if promote else
              f"not promoted: {measured}; its lower end is not above {bar}, so the champion stays")
    learned = json.loads(ctx.input("reward_result").read_text())["metrics"]
    fed = json.loads(ctx.input("feedback_result").read_text())["metrics"]
    report = {"round": ticket["round"], "champion": ticket["champion"], "judge": judge.name, "prompts": len(prompts),
              "judge_accuracy": accuracy,
              "challenger_vs_champion": vs_champion, "challenger_vs_sft": vs_sft,
              "champion_vs_sft": versus("champion", "sft") if ticket["champion"] != SFT else None,
              "judge_score": {k: round(statistics.fmean(v), 4) for k, v in values.items()},
              "promote": promote, "reason": reason, "gate_min_lower": bar,
              "comparisons_added": fed["comparisons_added"], "comparisons_all_rounds": fed["comparisons_all_rounds"],
              "sample_quality_heldout_labeler": fed["sample_quality_heldout_labeler"],
              "labeling": {k: fed[k] for k in LABELING_FIGURES if k in fed},
              "rm_val_accuracy": learned.get("val_accuracy"),
              "rm_heldout_labeler_accuracy": learned.get("heldout_labeler_accuracy"),
              "challenger_sha256": content_hash(models["challenger"])}
    write_json(ctx.output("report"), report)
    log.info("round_gate: %s", reason)
    return {k: report[k] for k in ("round", "promote", "reason", "challenger_vs_champion", "challenger_vs_sft")}


def finish_round(params: Params) -> dict:
    """Promote the challenger when the gate said so (once: a rerun finds it promoted), then
    write the round's line of the ledger; returns it."""
    from ..registry import output
    from ..serving.storage import open_store
    from .champion import promote, read_pointer

    report = json.loads(output(params, "round_gate", "report").read_text())
    store = params.rounds.store
    pointer = read_pointer(open_store(store))
    if report["promote"]:
        if pointer and pointer.get("round") == report["round"] and pointer.get("policy_sha256") == report["challenger_sha256"]:
            promoted = pointer  # this round already promoted it (the flow was interrupted after)
        else:
            promoted = promote(store, output(params, "round_ppo", "model"), output(params, "round_export", "rm"),
                               {"round": report["round"], "policy_sha256": report["challenger_sha256"],
                                "gate": {k: report[k] for k in ("challenger_vs_champion", "challenger_vs_sft", "reason")}})
        after, vs_sft = promoted["version"], report["challenger_vs_sft"]
    else:
        after = report["champion"]
        vs_sft = report["champion_vs_sft"] or {"win_rate": 0.5, "ci95": None}
    entry = {"round": report["round"], "champion_before": report["champion"], "promoted": report["promote"],
             "champion_after": after, "reason": report["reason"],
             "comparisons_added": report["comparisons_added"], "comparisons_all_rounds": report["comparisons_all_rounds"],
             "rm_val_accuracy": report["rm_val_accuracy"], "rm_heldout_labeler_accuracy": report["rm_heldout_labeler_accuracy"],
             "sample_quality_heldout_labeler": report["sample_quality_heldout_labeler"],
             "labeling": report.get("labeling") or {},
             "challenger_vs_champion": report["challenger_vs_champion"], "challenger_vs_sft": report["challenger_vs_sft"],
             "champion_after_vs_sft": vs_sft, "judge": report["judge"], "gate_prompts": report["prompts"],
             "judge_accuracy": report.get("judge_accuracy"),
             "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    append_ledger(params, entry)
    return entry


def ledger_markdown(rows: list[dict]) -> str:
    def wr(x: dict | None) -> str:
        if not x:
            return "-"
        return f"{x['win_rate']:.3f}" + (f" [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}]" if x.get("ci95") else "")

    def acc(x: dict | None) -> str:
        return f"{x['accuracy']:.3f} [{x['ci95'][0]:.3f}, {x['ci95'][1]:.3f}]" if x else "-"

    lines = ["| round | champion before | comparisons added (all rounds) | RM val acc | RM held-out acc | challenger vs "
             "champion | challenger vs SFT | judge's accuracy | decision | champion after vs SFT |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        decision = f"promoted {r['champion_after']}" if r["promoted"] else f"kept {r['champion_after']}"
        lines.append(f"| {r['round']} | {r['champion_before']} | {r['comparisons_added']} ({r['comparisons_all_rounds']}) | "
                     f"{r['rm_val_accuracy']} | {r['rm_heldout_labeler_accuracy']} | {wr(r['challenger_vs_champion'])} | "
                     f"{wr(r['challenger_vs_sft'])} | {acc(r.get('judge_accuracy'))} | {decision} | "
                     f"{wr(r['champion_after_vs_sft'])} |")
    return "\n".join(lines) + "\n"
