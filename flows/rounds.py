"""One round of on-policy feedback as a Prefect flow (`make round`; the weekly deployment).

    python -m flows.rounds [--params params.yaml]

Opens the round (rounds.ticket: the round number and the champion it starts from),
runs the round's stages with the pipeline stages they read (Cached when `make
pipeline` ran them), each versioned by DVC, then promotes the challenger if the
gate said so (a new version in rounds.store, the `champion` pointer moved last),
writes the round's line in rounds.ledger and commits the ticket, the ledger and
dvc.lock: a round is one commit. The round's report is the flow's markdown artifact.
What the stages do: instructflow/rounds/stages.py.
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

from prefect import flow, get_run_logger, runtime, task
from prefect.artifacts import create_markdown_artifact

from flows.pipeline import Run, checked_params, record_run, run_stages
from flows.stopping import stages_stop_first, stopped_cleanly
from instructflow.config import ConfigError, load_params
from instructflow.dvcfile import pipeline_file
from instructflow.io import exclusive
from instructflow.labeling.projects import LabelingPending
from instructflow.registry import ROUNDS_NEED, group_specs, with_upstream
from instructflow.rounds.stages import finish_round, ledger_markdown, open_round, read_ledger
from tasks.retries import retry_if_transient
from tasks.stages import with_retries
from tasks.versioning import dvc_root


@task(retry_condition_fn=retry_if_transient)
def open_round_task(params: str) -> dict:
    return open_round(load_params(params))


@task(retry_condition_fn=retry_if_transient)
def finish_round_task(params: str) -> dict:
    return finish_round(load_params(params))


def check_rounds(config, params: str) -> None:
    if not group_specs(config, "rounds"):
        raise ConfigError(f"{params}: this configuration has no round stages: they need {ROUNDS_NEED}")


@flow(name="instructflow-round", log_prints=True)
@stages_stop_first
def round_flow(params: str = "params.yaml") -> dict:
    config = load_params(params)
    check_rounds(config, params)
    with exclusive(config.project.artifacts_dir, "flows.rounds"):
        return _round(params, config)


def _round(params: str, config) -> dict:
    logger = get_run_logger()
    t0 = time.perf_counter()
    ticket = with_retries(open_round_task, config)(params)
    logger.info("round %d, from champion %s", ticket["round"], ticket["champion"])
    try:
        rows = run_stages([Run(params, config, with_upstream(config, group_specs(config, "rounds")))])[params]
    except LabelingPending as wait:
        return wait_for_people(config, ticket, wait)
    entry = with_retries(finish_round_task, config)(params)
    run = record_run(params, config, rows, time.perf_counter() - t0, publish=False)
    md = (f"## Round {entry['round']}: {'promoted ' + entry['champion_after'] if entry['promoted'] else 'champion kept'}\n\n"
          f"{entry['reason']}\n\n### Every round\n\n{ledger_markdown(read_ledger(config))}\n"
          f"Flow wall time {run['wall_s']} s.\n")
    create_markdown_artifact(markdown=md, key="instructflow-round-report", description=f"Round {entry['round']}")
    logger.info("%s", entry["reason"])
    commit_round(params, config, entry)
    return entry


def wait_for_people(config, ticket: dict, wait: LabelingPending) -> dict:
    """The round's rankings are in Label Studio and people are not done. A scheduled run (a deployment)
    suspends itself, releasing its worker; the label-watch deployment resumes it when they are done
    (flows/label_watch.py), and it then runs again from the top, its finished stages cached. A run
    by hand ends here: run it again when they are done."""
    logger = get_run_logger()
    logger.warning("round %d: %s", ticket["round"], wait)
    if runtime.deployment.id:
        from prefect.flow_runs import suspend_flow_run

        suspend_flow_run(timeout=int(config.labeling.wait_hours * 3600), key=f"round-{ticket['round']}-labeling")
    return {"round": ticket["round"], "waiting": str(wait)}


def commit_round(params: str, config, entry: dict) -> None:
    """Commit the ticket, the ledger and the DVC files of the round and of the pipeline it read (only those
    paths) when the project is a git work tree."""
    root = dvc_root(params)
    if not config.rounds.git_commit or root is None:
        return
    if subprocess.run(["git", "rev-parse", "--is-inside-work-tree"], cwd=root, capture_output=True).returncode:
        get_run_logger().info("not a git work tree: round %d not committed", entry["round"])
        return
    rel = Path(params).resolve().relative_to(root).as_posix()
    dvc = [str(f.with_suffix(s)) for f in (pipeline_file(rel, "pipeline"), pipeline_file(rel, "rounds")) for s in (".yaml", ".lock")]
    paths = [x for x in (config.rounds.ticket, config.rounds.ledger, *dvc) if (root / x).exists()]
    decision = f"promoted {entry['champion_after']}" if entry["promoted"] else f"kept {entry['champion_after']}"
    message = (f"round {entry['round']}: {decision}; challenger vs champion {entry['challenger_vs_champion']['win_rate']:.3f}, "
               f"RM val accuracy {entry['rm_val_accuracy']}")
    subprocess.run(["git", "add", "--", *paths], cwd=root, check=True)
    proc = subprocess.run(["git", "commit", "-q", "-m", message, "--", *paths], cwd=root, capture_output=True, text=True)
    if proc.returncode:
        get_run_logger().warning("round %d: git commit failed: %s", entry["round"], (proc.stderr or proc.stdout).strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args()
    t0 = time.perf_counter()
    config = checked_params(args.params, check_rounds)
    with stopped_cleanly():
        entry = round_flow(params=args.params)
    if "waiting" in entry:
        print(f"round {entry['round']} is waiting: {entry['waiting']}\nRun `make round` again when they are done "
              "(the label-watch deployment resumes a scheduled round by itself).")
        return
    print(ledger_markdown(read_ledger(load_params(args.params))))
    print(f"round {entry['round']}: {entry['reason']}\n(round finished in {time.perf_counter() - t0:.1f} s; "
          f"ledger {Path(config.rounds.ledger)})")


if __name__ == "__main__":
    main()
