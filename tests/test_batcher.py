"""The scoring endpoint's micro-batcher, on its own (no model, no HTTP)."""
import asyncio
import threading

import pytest

from instructflow.serving.endpoint import MicroBatcher


class Engine:
    """Scores a sequence as its first token; records each call's size. The
    first call blocks until released, so the test controls what queues meanwhile."""

    def __init__(self, fail_on: int | None = None):
        self.calls: list[int] = []
        self.release = threading.Event()
        self.fail_on = fail_on

    def __call__(self, seqs: list[list[int]]) -> list[float]:
        self.calls.append(len(seqs))
        if len(self.calls) == 1:
            assert self.release.wait(10), "the test never released the first batch"
        if self.fail_on is not None and any(s[0] == self.fail_on for s in seqs):
            raise RuntimeError("engine failed")
        return [float(s[0]) for s in seqs]


async def _run(engine: Engine, jobs: list[list[list[int]]], max_batch: int, max_wait_s: float) -> list:
    batcher = MicroBatcher(engine, max_batch, max_wait_s)
    batcher.start()
    try:
        first = asyncio.ensure_future(batcher.submit(jobs[0]))
        while not engine.calls:  # the first job is inside the engine
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(batcher.submit(j)) for j in jobs[1:]]
        await asyncio.sleep(0.05)  # every other job is queued now
        engine.release.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)
    finally:
        await batcher.stop()


def test_jobs_queued_during_a_batch_form_the_next_one_without_waiting():
    engine = Engine()
    jobs = [[[i], [100 + i]] for i in range(6)]  # 6 callers, 2 sequences each
    results = asyncio.run(_run(engine, jobs, max_batch=32, max_wait_s=0.0))
    assert results == [[float(i), float(100 + i)] for i in range(6)]  # every caller its own scores, in order
    assert engine.calls == [2, 10]  # the 5 queued jobs went in one call


def test_batches_respect_the_maximum_size_and_split_large_requests():
    engine = Engine()
    jobs = [[[0]], [[1], [2], [3]], [[4], [5]], [[i] for i in range(10, 17)]]  # the last is larger than a batch
    results = asyncio.run(_run(engine, jobs, max_batch=4, max_wait_s=0.0))
    assert results[3] == [float(i) for i in range(10, 17)]
    assert results[:3] == [[0.0], [1.0, 2.0, 3.0], [4.0, 5.0]]
    assert max(engine.calls) <= 4 and sum(engine.calls) == 13


def test_an_engine_error_reaches_every_caller_of_that_batch_and_the_next_batch_runs():
    engine = Engine(fail_on=7)
    jobs = [[[0]], [[7]], [[8]], [[9]]]
    results = asyncio.run(_run(engine, jobs, max_batch=2, max_wait_s=0.0))
    assert results[0] == [0.0]
    assert isinstance(results[1], RuntimeError) and isinstance(results[2], RuntimeError)  # batched with the bad one
    assert results[3] == [9.0]


@pytest.mark.parametrize("max_wait_s", [0.0, 0.2])
def test_a_lone_job_waits_at_most_max_wait(max_wait_s):
    async def one() -> float:
        batcher = MicroBatcher(lambda seqs: [1.0] * len(seqs), 8, max_wait_s)
        batcher.start()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await batcher.submit([[1]])
        elapsed = loop.time() - t0
        await batcher.stop()
        return elapsed

    elapsed = asyncio.run(one())
    assert max_wait_s <= elapsed < max_wait_s + 1.0  # waits for company, then runs alone


def test_length_groups_bound_the_padding_and_cover_every_sequence():
    from instructflow.serving.endpoint import length_groups

    lengths = [30, 5, 6, 300, 7, 31, 290, 5]
    groups = length_groups(lengths, max_padding=0.25)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert len(g) * max(lengths[i] for i in g) <= 1.25 * sum(lengths[i] for i in g)
    assert sorted(map(sorted, groups)) == [[0, 5], [1, 2, 4, 7], [3, 6]]


def test_grouped_scoring_returns_each_score_in_its_place():
    from instructflow.serving.endpoint import _Scorer

    class Lengths(_Scorer):
        calls = []

        def score_batch(self, seqs):
            self.calls.append(len(seqs))
            return [float(len(s)) for s in seqs]

    seqs = [[1] * n for n in (40, 3, 41, 4, 3)]
    scorer = Lengths()
    assert scorer.score_ids(seqs) == [40.0, 3.0, 41.0, 4.0, 3.0]
    assert sorted(scorer.calls) == [2, 3]  # two calls: the short ones, the long ones
