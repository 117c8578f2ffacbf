"""service/batcher.py on its own: a model-agnostic batcher of any items through a plain batch
function, told by its caller how many more items are on their way."""

from __future__ import annotations

import ast
import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from service.batcher import Batcher, BatchFunction, InferenceError, Result
from service.metrics import Metrics

BATCHER = Path(__file__).resolve().parents[2] / "service" / "batcher.py"


def test_the_batcher_imports_nothing_of_the_model_or_its_engines() -> None:
    imported: set[str] = set()
    for node in ast.walk(ast.parse(BATCHER.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
    assert "service.metrics" in imported  # the walk does see the imports
    model_side = {name for name in imported if name.split(".")[0] in ("model", "torch")}
    model_side |= {name for name in imported if name.startswith("model.engines")}
    assert model_side == set()


class _Recorder:
    """A batch function over strings: upper-cases each, records batches and threads."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.threads: set[str] = set()

    def load(self) -> BatchFunction[str, str]:
        self.threads.add(threading.current_thread().name)
        return self.__call__

    def __call__(self, items: list[str]) -> Sequence[str]:
        self.threads.add(threading.current_thread().name)
        self.batches.append(list(items))
        return [item.upper() for item in items]


def _batcher(
    load: Callable[[], BatchFunction[str, str]], max_wait_ms: float = 5000
) -> Batcher[str, str]:
    return Batcher(
        load,
        max_batch_size=4,
        max_wait_ms=max_wait_ms,
        queue_size=16,
        metrics=Metrics(4),
    )


def test_items_come_back_in_order_each_with_its_own_output_from_one_thread() -> None:
    recorder = _Recorder()

    async def scenario() -> list[Result[str]]:
        batcher = _batcher(recorder.load)
        await batcher.start()
        try:
            batcher.expect(6)
            futures = []
            for word in ["a", "b", "c", "d", "e", "f"]:
                futures.append(batcher.submit(word, time.perf_counter() + 30))
                batcher.expect(-1)
            return await asyncio.gather(*futures)
        finally:
            await batcher.stop()

    results = asyncio.run(scenario())
    assert [result.output for result in results] == ["A", "B", "C", "D", "E", "F"]
    assert recorder.batches == [["a", "b", "c", "d"], ["e", "f"]]  # max_batch_size 4
    assert [result.batch_size for result in results] == [4, 4, 4, 4, 2, 2]
    assert len(recorder.threads) == 1 and recorder.threads.pop().startswith("inference")


def test_a_batch_waits_for_items_the_caller_announced() -> None:
    """Two items announced: the first is not run alone while the second is still on its way
    (being read or decoded, in the service)."""
    recorder = _Recorder()

    async def scenario() -> tuple[Result[str], Result[str]]:
        batcher = _batcher(recorder.load)
        await batcher.start()
        try:
            batcher.expect(2)
            first = batcher.submit("a", time.perf_counter() + 30)
            batcher.expect(-1)
            while batcher.depth == 0:  # the collector has taken the first item
                await asyncio.sleep(0.001)
            await asyncio.sleep(0.05)  # ... and is waiting for the second
            second = batcher.submit("b", time.perf_counter() + 30)
            batcher.expect(-1)
            return await asyncio.gather(first, second)
        finally:
            await batcher.stop()

    results = asyncio.run(scenario())
    assert recorder.batches == [["a", "b"]]
    assert [result.batch_size for result in results] == [2, 2]


def test_with_nothing_announced_a_lone_item_does_not_wait_for_company() -> None:
    recorder = _Recorder()

    async def scenario() -> Result[str]:
        batcher = _batcher(recorder.load, max_wait_ms=5000)
        await batcher.start()
        try:
            return await asyncio.wait_for(batcher.submit("a", time.perf_counter() + 30), 2)
        finally:
            await batcher.stop()

    result = asyncio.run(scenario())  # not the 5 s max_wait: wait_for would time out
    assert (result.output, result.batch_size) == ("A", 1)


def test_a_batch_function_that_answers_the_wrong_number_of_items_fails_the_batch() -> None:
    def load() -> BatchFunction[str, str]:
        return lambda items: [item.upper() for item in items][:-1]

    async def scenario() -> None:
        batcher = _batcher(load)
        await batcher.start()
        try:
            with pytest.raises(InferenceError, match="1 outputs for a batch of 2 items"):
                batcher.expect(2)
                futures = [batcher.submit(word, time.perf_counter() + 30) for word in "ab"]
                batcher.expect(-2)
                await asyncio.gather(*futures)
        finally:
            await batcher.stop()

    asyncio.run(scenario())
