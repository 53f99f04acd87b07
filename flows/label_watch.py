"""The scheduled check that resumes rounds waiting for people (deployment `label-watch` in prefect.yaml).

    python -m flows.label_watch [--params params.yaml]

A scheduled round whose rankings are in Label Studio suspends itself until
people are done (flows/rounds.py), holding no worker. This flow, every
labeling.poll_minutes, asks Label Studio how far each suspended round's
project is and resumes the round once labeling.min_done of its tasks are
done. Why a scheduled check rather than Label Studio's webhooks:
docs/decisions.md.
"""

from __future__ import annotations

import argparse

from prefect import flow, get_client, get_run_logger
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateName,
)
from prefect.flow_runs import resume_flow_run

from instructflow.config import load_params
from instructflow.labeling.commands import status
from instructflow.rounds.stages import read_ticket, round_project_title


@flow(name="instructflow-label-watch", log_prints=True)
def label_watch(params: str = "params.yaml") -> dict:
    logger = get_run_logger()
    with get_client(sync_client=True) as client:
        waiting = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["instructflow-round"])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(name=FlowRunFilterStateName(any_=["Suspended"]))))
    resumed = []
    for run in waiting:
        config = load_params(run.parameters.get("params", params))
        title = round_project_title(config, read_ticket(config)["round"])
        done = status(config, title, "ranking")
        logger.info("%s: %d of %d tasks done", title, done["done"], done["tasks"])
        if done["tasks"] and done["done_share"] >= config.labeling.min_done:
            resume_flow_run(run.id)
            resumed.append(str(run.id))
    return {"waiting": len(waiting), "resumed": resumed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    print(label_watch(params=ap.parse_args().params))


if __name__ == "__main__":
    main()
