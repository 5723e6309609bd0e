"""
make bench-core: LocalBus request/reply round trips per second with 1,000 outstanding, chain
tasks per second, and the memory one outstanding send costs (with its timeout). Prints one
JSON object as its last line and writes it to bench/results/core.json.

Targets (2-core machine): localbus_rpc_per_s >= 30,000; bytes_per_pending_send <= 2,000.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import tracemalloc

import attrs
from twisted.internet.defer import Deferred

from bench.bench_chain import measure_chain_tasks_per_s
from zcontrol.bus.local import LocalBus
from zcontrol.bus.message import NeedReplyMessage, Reply, registry


@registry.register
@attrs.define(kw_only=True)
class BenchEcho(NeedReplyMessage):
    n: int = 0


@registry.register
@attrs.define(kw_only=True)
class BenchEchoReply(Reply):
    n: int = 0


def measure_localbus_rpc(total: int = 200_000, outstanding: int = 1000) -> dict:
    """
    Round trips through a LocalBus on the real reactor, keeping C{outstanding} in flight.
    """
    from twisted.internet import reactor

    bus = LocalBus(reactor, node_id="bench")
    bus.start()
    bus.register_service("echo", lambda m: BenchEchoReply(n=m.n))
    state = {"sent": 0, "done": 0}
    finished: Deferred = Deferred()

    def one() -> None:
        state["sent"] += 1
        bus.send(BenchEcho(service_id="echo", n=state["sent"]), timeout=60).addCallback(answered)

    def answered(reply: Reply) -> None:
        assert reply.success, reply.error
        state["done"] += 1
        if state["sent"] < total:
            one()
        elif state["done"] == total:
            finished.callback(None)

    result = {}

    def go() -> None:
        start = time.perf_counter()
        for _ in range(outstanding):
            one()

        def stop(_):
            result["elapsed"] = time.perf_counter() - start
            reactor.stop()

        finished.addCallback(stop)

    reactor.callWhenRunning(go)
    reactor.run()
    return {"localbus_rpc_per_s": round(total / result["elapsed"]),
            "localbus_rpc_outstanding": outstanding, "localbus_rpc_total": total}


def measure_pending_bytes(count: int = 100_000) -> dict:
    """
    Bytes per send waiting for its reply: the message, its pending entry, its Deferred and
    its share of the timer wheel, measured with tracemalloc.
    """
    from twisted.internet.task import Clock

    clock = Clock()
    bus = LocalBus(clock, node_id="mem")
    bus.start()
    held = []
    # The handler keeps nothing: it will reply later through bus.reply (the receiver's own
    # state is not the sender's cost).
    bus.register_service("hold", lambda m: None)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(count):
        held.append(bus.send(BenchEcho(service_id="hold", n=i), timeout=30 + (i % 1000) / 10))
    while clock.getDelayedCalls() and any(c.getTime() <= clock.seconds()
                                          for c in clock.getDelayedCalls()):
        clock.advance(0)
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    per = (after - before) / count
    assert len(bus._pending) == count
    timers = len(clock.getDelayedCalls())
    clock.advance(200)
    assert all(d.called for d in held)
    return {"bytes_per_pending_send": round(per), "pending_sends_measured": count,
            "timer_calls_for_pending": timers}


def main() -> dict:
    out = {}
    out.update(measure_pending_bytes())
    out["chain_tasks_per_s"] = round(max(measure_chain_tasks_per_s() for _ in range(3)))
    out.update(measure_localbus_rpc())
    out["targets"] = {"localbus_rpc_per_s": 30000, "bytes_per_pending_send": 2000}
    out["python"] = sys.version.split()[0]
    os.makedirs("bench/results", exist_ok=True)
    with open("bench/results/core.json", "w") as f:
        json.dump(out, f, indent=2, sort_keys=True)
    print(json.dumps(out, sort_keys=True))
    return out


if __name__ == "__main__":
    main()
