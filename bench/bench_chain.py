"""
Chain-task throughput: tasks per second through L{ChainTaskQueue}.

C{measure_chain_tasks_per_s(n)} pushes C{n} tasks through 1,000 signatures at sync level 1;
half of the tasks return an already-fired Deferred, the other half a Deferred fired later
(from outside the queue, in submission waves), so both the synchronous fast path and the
queued path are measured. Run as C{python -m bench.bench_chain}.
"""

from __future__ import annotations

import gc
import json
import os
import time

from twisted.internet.defer import Deferred, succeed

from zcontrol.core.chain import ChainTaskQueue

SIGNATURES = 1_000


def measure_chain_tasks_per_s(n: int = 200_000, signatures: int = SIGNATURES) -> float:
    """
    Tasks per second (submission to completion) through one L{ChainTaskQueue}.

    @param n: number of tasks.
    @param signatures: number of distinct signatures, used round robin (sync level 1).
    """
    queue = ChainTaskQueue()
    later: list[Deferred] = []
    done = [0]

    def count(_: object) -> None:
        done[0] += 1

    def fired() -> Deferred:
        return succeed(None)

    def deferred() -> Deferred:
        d: Deferred = Deferred()
        later.append(d)
        return d

    gc.collect()
    start = time.perf_counter()
    for i in range(n):
        queue.run(i % signatures, deferred if i & 1 else fired).addCallback(count)
        if len(later) >= signatures:
            batch, later[:] = list(later), []
            for d in batch:
                d.callback(None)
    while later:
        batch, later[:] = list(later), []
        for d in batch:
            d.callback(None)
    elapsed = time.perf_counter() - start
    assert done[0] == n, (done[0], n)
    assert len(queue) == 0
    return n / elapsed


def main() -> dict[str, float]:
    best = max(measure_chain_tasks_per_s() for _ in range(3))
    result = {"chain_tasks_per_s": round(best)}
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "bench_chain.json"), "w") as f:
        json.dump(result, f)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
