"""serving.batched_call.BatchedCall: one engine RPC for the requests that wait together."""

from __future__ import annotations

import asyncio

import pytest

from serving.batched_call import BatchedCall


class Engine:
    """A stand-in for a worker extension method: answers keys in order after `delay` seconds."""

    def __init__(self, delay: float = 0.02, fail: set[str] = frozenset()):
        self.delay, self.fail, self.batches = delay, fail, []

    async def __call__(self, keys: list[str]):
        self.batches.append(list(keys))
        await asyncio.sleep(self.delay)
        if self.fail & set(keys):
            raise ValueError(f"engine error on {sorted(self.fail & set(keys))}")
        return [f"hits of {key}" for key in keys]


def test_a_lone_request_is_answered_by_a_call_of_its_own():
    async def run():
        engine = Engine()
        batched = BatchedCall(engine)
        return await batched("a"), engine.batches

    assert asyncio.run(run()) == ("hits of a", [["a"]])


def test_requests_waiting_together_share_one_call_and_each_gets_its_own_result():
    async def run():
        engine = Engine(delay=0.05)
        batched = BatchedCall(engine)
        first = asyncio.ensure_future(batched("k0"))
        await asyncio.sleep(0)  # the first call is in flight; these 63 wait for the next
        rest = [asyncio.ensure_future(batched(f"k{i}")) for i in range(1, 64)]
        return await asyncio.gather(first, *rest), engine.batches

    results, batches = asyncio.run(run())
    assert results == [f"hits of k{i}" for i in range(64)]
    assert batches == [["k0"], [f"k{i}" for i in range(1, 64)]]


def test_a_key_asked_twice_is_sent_once_and_both_callers_get_it():
    async def run():
        engine = Engine()
        batched = BatchedCall(engine)
        return await asyncio.gather(batched("x"), batched("x"), batched("y")), engine.batches

    results, batches = asyncio.run(run())
    assert results == ["hits of x", "hits of x", "hits of y"]
    assert batches == [["x"], ["y"]] or batches == [["x", "y"]]
    assert sum(b.count("x") for b in batches) == 1


def test_an_error_reaches_every_caller_of_its_batch_and_the_next_batch_still_runs():
    async def run():
        engine = Engine(fail={"bad"})
        batched = BatchedCall(engine)
        lone = asyncio.ensure_future(batched("first"))
        await asyncio.sleep(0)
        failing = [asyncio.ensure_future(batched(k)) for k in ("bad", "innocent")]
        outcomes = await asyncio.gather(lone, *failing, return_exceptions=True)
        return outcomes, await batched("later")

    (lone, bad, innocent), later = asyncio.run(run())
    assert lone == "hits of first" and later == "hits of later"
    assert isinstance(bad, ValueError) and isinstance(innocent, ValueError) and "bad" in str(innocent)


def test_a_call_answering_the_wrong_number_of_keys_is_an_error_not_a_misattribution():
    async def short(keys):
        return ["only one"]

    async def run():
        batched = BatchedCall(short)
        first = asyncio.ensure_future(batched("a"))
        await asyncio.sleep(0)
        return await asyncio.gather(first, batched("b"), batched("c"), return_exceptions=True)

    first, b, c = asyncio.run(run())
    assert first == "only one"
    assert isinstance(b, RuntimeError) and "1 results for 2 keys" in str(b) and isinstance(c, RuntimeError)


def test_a_caller_that_goes_away_does_not_break_the_batch():
    async def run():
        engine = Engine(delay=0.05)
        batched = BatchedCall(engine)
        first = asyncio.ensure_future(batched("a"))
        await asyncio.sleep(0)
        gone, kept = asyncio.ensure_future(batched("gone")), asyncio.ensure_future(batched("kept"))
        await asyncio.sleep(0.01)
        gone.cancel()
        return await first, await kept, gone.cancelled()

    assert asyncio.run(run()) == ("hits of a", "hits of kept", True)


@pytest.mark.parametrize("n", [1, 7])
def test_every_caller_is_answered_when_keys_keep_arriving(n):
    """Keys that arrive during every call still get answered: the flush loops until none wait."""

    async def run():
        engine = Engine(delay=0.005)
        batched = BatchedCall(engine)

        async def client(c):
            return [await batched(f"{c}-{i}") for i in range(10)]

        return await asyncio.gather(*(client(c) for c in range(n))), engine.batches

    results, batches = asyncio.run(run())
    assert results == [[f"hits of {c}-{i}" for i in range(10)] for c in range(n)]
    assert sum(len(b) for b in batches) == 10 * n and len(batches) <= 10 * n
