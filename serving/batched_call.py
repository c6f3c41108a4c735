"""One engine RPC for many requests.

Every tracked request asks the engine for its routing counts (`routing_peek_requests` at its
first output, `routing_pop_requests` at its end). Sent one by one, each is a utility call the
engine core serves between steps, with its own round trip: under 32 concurrent clients that is a
stream of calls competing with the steps themselves. `BatchedCall` sends the first key at once
(a lone request waits for no one) and gathers the keys asked for while that call is in flight
into the next one, so the number of calls follows the engine's pace, not the request rate.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence


class BatchedCall:
    """`await batched(key)` -> the result for `key` of `call(keys)`, an async function that
    answers a list of distinct keys with a list of results in the same order. An error of the
    call goes to every caller of its batch."""

    def __init__(self, call: Callable[[list[str]], Awaitable[Sequence]]):
        self._call = call
        self._pending: dict[str, list[asyncio.Future]] = {}
        self._flushing = False

    async def __call__(self, key: str):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.setdefault(key, []).append(future)
        if not self._flushing:
            self._flushing = True
            loop.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, {}
                try:
                    results = await self._call(list(batch))
                    if len(results) != len(batch):
                        raise RuntimeError(f"{len(results)} results for {len(batch)} keys")
                except asyncio.CancelledError:  # the replica is shutting down
                    for futures in [*batch.values(), *self._pending.values()]:
                        for future in futures:
                            future.cancel()
                    raise
                except Exception as error:
                    for futures in batch.values():
                        for future in futures:
                            if not future.done():
                                future.set_exception(error)
                    continue
                for futures, result in zip(batch.values(), results):
                    for future in futures:
                        if not future.done():  # its caller may have gone (a cancelled request)
                            future.set_result(result)
        finally:
            self._flushing = False
