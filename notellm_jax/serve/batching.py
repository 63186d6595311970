"""Request batching: notes of concurrent requests coalesced into jitted calls of the embedder (or of the generation
decoder: `notellm_jax.serve.generation`).

A single worker task takes the first waiting note, then gathers more until `max_batch` notes are waiting or
`max_wait_s` has passed since the first. The gathered notes, sorted by the length bucket they pad to, are cut
into the runs that cost the fewest computed token positions (`plan_calls`: rows the call is padded to x its
longest member's bucket), so a batch of short notes and one long one is one call at the long bucket when
that computes less than a call per bucket, and two calls when a lone long note would pad many short ones.
The embedder pads each call to its longest member's bucket and to a compiled row count, so each shape
compiles once, at the warm-up. The calls run on one executor thread: the event loop keeps accepting requests
meanwhile, and those queue up for the next batch, so batches grow with the load even with a zero wait budget.
Each call reports a `BatchStats` (time its notes waited, inference time, tokens, fill) to `on_batch`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from notellm_jax.errors import ConfigError


def row_buckets(max_batch: int) -> list[int]:
    """The batch row counts the service compiles: powers of two below `max_batch`, and `max_batch`. A batch
    runs at the smallest that holds it, so at most half its rows are padding (a lone request runs alone)."""
    return sorted({1 << i for i in range(max(1, max_batch).bit_length()) if 1 << i < max_batch} | {max_batch})


def plan_calls(buckets: Sequence[int], counts: Sequence[int], rows_of: Callable[[int], int]) -> list[range]:
    """The cheapest cut of notes grouped by length bucket (`buckets` ascending, `counts` notes in each) into
    runs of consecutive groups, each run one call: its cost is `rows_of(notes in the run)` x the run's longest
    bucket, the token positions the call computes. Returned as ranges of group indices."""
    best: list[tuple[float, list[range]]] = [(0.0, [])]
    for end in range(1, len(buckets) + 1):
        best.append(min(((best[start][0] + rows_of(sum(counts[start:end])) * buckets[end - 1],
                          best[start][1] + [range(start, end)]) for start in range(end)), key=lambda c: c[0]))
    return best[-1][1]


@dataclasses.dataclass(frozen=True)
class BatchStats:
    """One call of the batch function: its notes, their tokens, the positions computed (rows x bucket), how long
    each note waited in the queue and how long the call took."""
    size: int
    bucket: int
    tokens: int
    computed: int
    queue_seconds: tuple[float, ...]
    inference_seconds: float

    @property
    def fill(self) -> float:
        """Real tokens over the token positions computed (1 = no padding)."""
        return self.tokens / self.computed if self.computed else 0.0


@dataclasses.dataclass
class _Item:
    tokens: list[int]
    future: asyncio.Future
    queued_at: float


class Batcher:
    def __init__(self, embed: Callable[[Sequence[list[int]]], np.ndarray], bucket_of: Callable[[int], int],
                 max_batch: int, max_wait_s: float, on_batch: Callable[[BatchStats], None] = lambda stats: None,
                 rows: Sequence[int] = ()):
        """`rows`: the row counts a call is padded to (default `row_buckets(max_batch)`)."""
        if max_batch < 1 or max_wait_s < 0:
            raise ConfigError(f"serve.max_batch_size must be >= 1 and serve.max_wait_ms >= 0, got {max_batch}, "
                             f"{max_wait_s * 1e3}")
        self._embed, self._bucket_of, self._on_batch = embed, bucket_of, on_batch
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.rows = sorted(rows) or row_buckets(max_batch)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="embed")
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None

    def rows_of(self, notes: int) -> int:
        return next((r for r in self.rows if r >= notes), notes)

    @property
    def waiting(self) -> int:
        """Notes queued for the next batch."""
        return 0 if self._queue is None else self._queue.qsize()

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
        items = [_Item(list(t), loop.create_future(), time.perf_counter()) for t in token_lists]
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
        return [item for item in items if not item.future.done()]  # a request past its deadline went away

    def _calls(self, items: list[_Item]) -> list[tuple[int, list[_Item]]]:
        groups: dict[int, list[_Item]] = defaultdict(list)
        for item in items:
            groups[self._bucket_of(len(item.tokens))].append(item)
        buckets = sorted(groups)
        runs = plan_calls(buckets, [len(groups[b]) for b in buckets], self.rows_of)
        return [(buckets[run[-1]], [item for g in run for item in groups[buckets[g]]]) for run in runs]

    async def _call(self, bucket: int, group: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            vectors = await loop.run_in_executor(self._executor, self._embed, [i.tokens for i in group])
        except Exception as e:  # noqa: BLE001  (delivered to every waiting request, the loop goes on)
            for item in group:
                if not item.future.done():
                    item.future.set_exception(e)
            return
        self._on_batch(BatchStats(len(group), bucket, sum(len(i.tokens) for i in group),
                                  self.rows_of(len(group)) * bucket, tuple(start - i.queued_at for i in group),
                                  time.perf_counter() - start))
        for item, vector in zip(group, vectors):
            if not item.future.done():  # a client that went away cancelled its future
                item.future.set_result(vector)

    async def _run(self) -> None:
        while True:
            items = await self._gather()
            for bucket, group in self._calls(items) if items else ():
                await self._call(bucket, group)
