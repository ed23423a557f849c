"""asyncio front end of the generator: each request is an async stream of results.

    engine = AsyncGenerator(Generator(model, tokenizer=tok))
    async for result in engine.stream(Job(prompt_ids, max_new_tokens=100)):
        print(result.text, end="")
    await engine.close()

One worker task runs the generator's forward passes in a thread (so the event loop stays
free for the server) whenever any job is queued, and routes every result to its job's
queue. A consumer that stops listening — it breaks out of its loop, its task is
cancelled, its client disconnected — cancels its job: the job leaves the batch before the
next pass and its pages go back to the pool. Enqueue and cancel take the lock a pass holds
while it schedules and records its results (not while the model runs), so the scheduler
never changes under a pass and the event loop never waits for one.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

from trellm.engine.generator import Generator, Job, JobResult


class AsyncGenerator:
    def __init__(self, generator: Generator):
        self.generator = generator
        self._lock = threading.Lock()
        self._queues: dict[int, asyncio.Queue] = {}
        self._wake = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._closed = False

    def submit(self, job: Job) -> AsyncIterator[JobResult]:
        """Queue a job now (a bad job raises GenerationError here, before anything streams) and
        return the async stream of its results."""
        return self.submit_many([job])[0]

    def submit_many(self, jobs: list[Job]) -> list[AsyncIterator[JobResult]]:
        """Queue several jobs, all or none (e.g. the n choices of one request)."""
        if self._closed:
            raise RuntimeError("this AsyncGenerator is closed")
        ids: list[int] = []
        with self._lock:
            try:
                for job in jobs:
                    ids.append(self.generator.enqueue(job))
            except Exception:
                for job_id in ids:
                    self.generator.cancel(job_id)
                raise
        streams = []
        for job_id in ids:
            queue: asyncio.Queue = asyncio.Queue()
            self._queues[job_id] = queue
            streams.append(self._results(job_id, queue))
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._run())
        self._wake.set()
        return streams

    async def stream(self, job: Job) -> AsyncIterator[JobResult]:
        """Results of one job as they come."""
        async for result in self.submit(job):
            yield result

    async def _results(self, job_id: int, queue: asyncio.Queue) -> AsyncIterator[JobResult]:
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(job_id, None)
            if not finished:  # the consumer left early: free the job's pages before the next pass
                with self._lock:  # held by a pass only around scheduling, never during the model
                    self.generator.cancel(job_id)

    async def generate(self, job: Job) -> list[int]:
        """All generated token ids of one job."""
        return [t async for r in self.stream(job) for t in r.new_token_ids]

    async def close(self) -> None:
        """Stop the worker (jobs still running are cancelled)."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        with self._lock:
            for job_id in list(self._queues):
                self.generator.cancel(job_id)

    def _step(self) -> list[JobResult]:
        return self.generator.iterate(self._lock)

    async def _run(self) -> None:
        while True:
            if not self.generator.busy:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                results = await asyncio.to_thread(self._step)
            except Exception as exc:  # a failed pass fails every waiting stream, loudly
                for queue in self._queues.values():
                    queue.put_nowait(exc)
                with self._lock:
                    for job_id in list(self._queues):
                        self.generator.cancel(job_id)
                continue
            for result in results:
                queue = self._queues.get(result.job_id)
                if queue is not None:
                    queue.put_nowait(result)
                    if result.finished:  # the stream holds its queue; a stream never read leaves nothing behind
                        self._queues.pop(result.job_id, None)
