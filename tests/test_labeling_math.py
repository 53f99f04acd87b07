"""Label Studio tasks and annotations <-> comparisons, by hand (no server): the display order maps back
exactly, ties become scores, every malformed annotation is a named problem, and the quality figures."""
import random

import pytest

from instructflow.config import LabelingConfig
from instructflow.data.formats import Prompt
from instructflow.labeling.interfaces import ranking_config
from instructflow.labeling.people import levels_of, ranking_result, shown_levels
from instructflow.labeling.projects import quality
from instructflow.labeling.tasks import (
    agreement,
    comparison_of,
    edited,
    flags,
    ranking_levels,
    ranking_task,
    task_responses,
)

PROMPT = Prompt(id="p7", prompt="Name a fruit.", category="open_qa", meta={"kind": "x"})
RESPONSES = ["An apple.", "A car.", "Pear.", "I do not know."]


def _task(seed=3):
    return ranking_task(PROMPT, RESPONSES, random.Random(seed))


def test_responses_are_shown_in_a_random_order_that_maps_back_exactly():
    data = _task()
    order = data["instructflow"]["order"]
    assert sorted(order) == [0, 1, 2, 3] and order != [0, 1, 2, 3]  # seed 3 shuffles
    assert [x["body"] for x in data["responses"]] == [RESPONSES[i] for i in order]
    assert [x["id"] for x in data["responses"]] == ["A", "B", "C", "D"]
    assert task_responses(data) == RESPONSES and not edited(data)
    data["responses"][1]["body"] = "edited in the UI"
    assert edited(data)


def test_a_strict_ranking_and_a_tie_become_the_comparison_of_the_original_responses():
    data = _task()
    order = data["instructflow"]["order"]
    # the labeler puts the response shown as C best, then A, then D, then B
    shown = {"C": 0, "A": 1, "D": 2, "B": 3}
    levels = [shown[x] for x in "ABCD"]
    annotation = {"result": ranking_result(levels)}
    assert ranking_levels(annotation, 4) == levels
    c = comparison_of(data, levels, "ada")
    expected = sorted(range(4), key=lambda i: levels[order.index(i)])  # original indices, best first
    assert c.ranking == expected and c.responses == RESPONSES and c.labeler == "ada"
    assert (c.id, c.prompt, c.category, c.meta) == ("p7", "Name a fruit.", "open_qa", {"kind": "x"})
    tied = comparison_of(data, [0, 0, 1, 2], "bo")  # A and B share the best column
    assert tied.ranking is None and tied.scores[order[0]] == tied.scores[order[1]] == 4.0
    assert sorted(tied.scores) == [2.0, 3.0, 4.0, 4.0]
    assert levels_of(c) == [levels[order.index(i)] for i in range(4)]
    assert shown_levels(levels_of(c), order) == levels


@pytest.mark.parametrize("columns, reason", [
    ({"_": ["A", "B", "C", "D"]}, "partial: 0 of 4 responses ranked"),
    ({"rank_1": ["A"], "rank_2": ["B"], "_": ["C", "D"]}, "partial: 2 of 4 responses ranked (not ranked: C, D)"),
    ({"rank_1": ["A", "B", "C", "D"]}, "partial: every response in one column"),
    ({"rank_1": ["A", "B"], "rank_2": ["B", "C", "D"]}, "contradictory: response B is in two columns"),
    ({"rank_1": ["A", "E"], "rank_2": ["B", "C", "D"]}, "contradictory: response 'E' is not one of this task's 4"),
    ({"rank_9": ["A"], "rank_2": ["B", "C", "D"]}, "contradictory: a column 'rank_9' the page does not have"),
])
def test_what_is_not_a_full_ranking_is_named(columns, reason):
    annotation = {"result": [{"from_name": "rank", "to_name": "responses", "type": "ranker", "value": {"ranker": columns}}]}
    assert ranking_levels(annotation, 4).startswith(reason)
    assert ranking_levels({"result": []}, 4).startswith("partial: 0 of 4")


def test_flags_name_the_original_responses():
    data = _task()
    order = data["instructflow"]["order"]
    annotation = {"result": ranking_result([0, 1, 2, 3], {"invents_facts": ["B"], "harmful": ["A", "D"]}, "B is made up")}
    assert flags(annotation, data) == {"fails_instruction": [], "invents_facts": [order[1]],
                                       "harmful": sorted([order[0], order[3]])}


def test_agreement_counts_ordered_pairs_and_skips_ties():
    assert agreement([0, 1, 2], [0, 1, 2]) == (3, 3)
    assert agreement([0, 1, 2], [2, 1, 0]) == (0, 3)
    assert agreement([0, 0, 1], [0, 1, 2]) == (2, 2)  # the tied pair states nothing


def test_quality_scores_labelers_on_known_answers_and_holds_out_those_below():
    def ann(task, name, levels, known=None):
        return {"task": task, "annotation": task * 10 + len(name), "labeler": name, "result": levels, "known": known,
                "data": {"instructflow": {"order": [0, 1]}}}
    full = [ann(1, "ada", [0, 1]), ann(1, "bo", [1, 0]), ann(2, "ada", [0, 1]), ann(2, "cy", [0, 1])]
    full += [ann(10 + i, "ada", [0, 1], known=[0, 1]) for i in range(3)]   # right 3 of 3
    full += [ann(20 + i, "bo", [1, 0], known=[0, 1]) for i in range(3)]    # wrong 3 of 3
    cfg = LabelingConfig(min_known_accuracy=0.6, min_known_tasks=3, hold_out_below=True)
    q = quality(full, cfg)
    assert q["tasks_with_several_rankings"] == 2 and q["agreement"] == 0.5 and q["agreement_pairs"] == 2
    assert q["labelers"]["ada"]["known_answer_accuracy"] == 1.0 and q["labelers"]["bo"]["known_answer_accuracy"] == 0.0
    assert q["below_min_known_accuracy"] == ["bo"] and q["held_out"] == ["bo"]
    assert q["labelers"]["cy"]["known_answer_accuracy"] is None  # no known-answer task: not judged


def test_the_ranking_page_has_a_column_per_rank_and_the_papers_flags():
    config = ranking_config(4)
    for needle in ('<Ranker name="rank" toName="responses">', 'name="rank_1" title="1 (best)"', 'title="4 (worst)"',
                   'name="fails_instruction"', 'name="invents_facts"', 'name="harmful"', 'name="comment"'):
        assert needle in config
