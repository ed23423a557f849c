"""The asyncio front end: concurrent streams, early exits cancel their jobs, bad jobs fail fast."""

from __future__ import annotations

import asyncio

import pytest

from trellm.engine.async_generator import AsyncGenerator
from trellm.engine.generate import GenerationRequest, generate_tokens
from trellm.engine.generator import Generator, Job
from trellm.errors import GenerationError
from trellm.models.loader import load_model


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return load_model(tiny_model_dir("qwen2")[0], device="cpu")


def test_concurrent_streams_cancel_on_early_exit_and_free_every_page(model):
    prompts = [[1, 2, 3], list(range(5, 30)), [7] * 9, [4, 4]]

    async def main():
        gen = Generator(model, page_size=4, max_batch_tokens=8)
        engine = AsyncGenerator(gen)

        async def full(p):
            return await engine.generate(Job(p, max_new_tokens=10))

        async def quitter(p):
            got = []
            async for r in engine.stream(Job(p, max_new_tokens=200)):
                got += r.new_token_ids
                if len(got) >= 2:
                    break  # the client went away
            return got

        results = await asyncio.gather(full(prompts[0]), quitter(prompts[1]), full(prompts[2]), full(prompts[3]))
        with pytest.raises(GenerationError, match="outside the vocabulary"):
            await engine.generate(Job([10**7]))
        await asyncio.sleep(0)
        busy = gen.busy
        await engine.close()
        return gen, results, busy

    gen, results, busy = asyncio.run(main())
    alone = lambda p: list(generate_tokens(model, GenerationRequest(p, max_new_tokens=10)))  # noqa: E731
    assert results[0] == alone(prompts[0]) and results[2] == alone(prompts[2]) and results[3] == alone(prompts[3])
    assert len(results[1]) == 2
    assert not busy  # the quitter's job was cancelled, not left running for 200 tokens
    assert gen.pool.available == gen.pool.num_pages


def test_a_task_cancelled_mid_stream_cancels_its_job(model):
    async def main():
        gen = Generator(model, page_size=4, max_batch_tokens=4)
        engine = AsyncGenerator(gen)
        started = asyncio.Event()

        async def consume():
            async for _ in engine.stream(Job(list(range(1, 40)), max_new_tokens=300)):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        busy = gen.busy
        await engine.close()
        return gen, busy

    gen, busy = asyncio.run(main())
    assert not busy and gen.pool.available == gen.pool.num_pages
