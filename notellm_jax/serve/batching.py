"""Request batching: notes of concurrent requests coalesced into one jitted call per length bucket (of the
embedder, or of the generation decoder: `notellm_jax.serve.generation`).

A single worker task takes the first waiting note, then gathers more until `max_batch` notes are waiting or
`max_wait_s` has passed since the first; the gathered notes are grouped by the bucket their length pads to,
and each group is one call of the embedder (its batch shape is fixed, so each bucket compiles once, at the
warm-up). The calls run on one executor thread: the event loop keeps accepting requests meanwhile, and those
queue up for the next batch, so batches grow with the load even with a zero wait budget.
"""
from __future__ import annotations

import asyncio
import dataclasses
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from notellm_jax.errors import ConfigError


def row_buckets(max_batch: int) -> list[int]:
    """The batch row counts the service compiles: powers of two below `max_batch`, and `max_batch`. A batch
    runs at the smallest that holds it, so at most half its rows are padding (a lone request runs alone)."""
    return sorted({1 << i for i in range(max(1, max_batch).bit_length()) if 1 << i < max_batch} | {max_batch})


@dataclasses.dataclass
class _Item:
    tokens: list[int]
    future: asyncio.Future


class Batcher:
    def __init__(self, embed: Callable[[Sequence[list[int]]], np.ndarray], bucket_of: Callable[[int], int],
                 max_batch: int, max_wait_s: float, on_batch: Callable[[int, int], None] = lambda size, bucket: None):
        if max_batch < 1 or max_wait_s < 0:
            raise ConfigError(f"serve.max_batch_size must be >= 1 and serve.max_wait_ms >= 0, got {max_batch}, "
                             f"{max_wait_s * 1e3}")
        self._embed, self._bucket_of, self._on_batch = embed, bucket_of, on_batch
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="embed")
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def submit(self, token_lists: Sequence[list[int]]) -> list:
        """The batch function's rows for `token_lists`, computed together with whatever else is waiting."""
        loop = asyncio.get_running_loop()
        items = [_Item(list(t), loop.create_future()) for t in token_lists]
        for item in items:
            self._queue.put_nowait(item)
        return list(await asyncio.gather(*(item.future for item in items)))

    async def embed(self, token_lists: Sequence[list[int]]) -> np.ndarray:
        """[n, d] vectors of `token_lists` (the batch function is an embedder)."""
        return np.stack(await self.submit(token_lists))

    def embed_now(self, token_lists: Sequence[list[int]]) -> np.ndarray:
        """Synchronous, on the embedder thread (start-up warm-up)."""
        return self._executor.submit(self._embed, token_lists).result()

    async def _gather(self) -> list[_Item]:
        items = [await self._queue.get()]
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while len(items) < self.max_batch:
            if not self._queue.empty():
                items.append(self._queue.get_nowait())
                continue
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                items.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return items

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            groups: dict[int, list[_Item]] = defaultdict(list)
            for item in await self._gather():
                groups[self._bucket_of(len(item.tokens))].append(item)
            for bucket, group in sorted(groups.items()):
                try:
                    vectors = await loop.run_in_executor(self._executor, self._embed, [i.tokens for i in group])
                except Exception as e:  # noqa: BLE001  (delivered to every waiting request, the loop goes on)
                    for item in group:
                        if not item.future.done():
                            item.future.set_exception(e)
                    continue
                self._on_batch(len(group), bucket)
                for item, vector in zip(group, vectors):
                    if not item.future.done():  # a client that went away cancelled its future
                        item.future.set_result(vector)
