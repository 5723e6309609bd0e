"""
Soak: restart RabbitMQ under an AMQPBus load and watch the bus recover by itself.

Two management nodes in this process send requests to each other (window 50) and publish
events; after a few seconds the broker application is restarted (C{rabbitmqctl stop_app},
C{start_app}: every non-durable queue and exchange is lost). Measured: how long the waiting
sends took to be answered once the connection dropped (they must get C{SYS.1016} at once, not
a timeout), how long until sends succeed again, and whether services (a cross-node send)
and subscriptions (an event) came back without any manual step.

Not part of C{make test} (a broker restart takes ~10 s and would disturb other tests using
the broker): run as C{python -m bench.soak_bus_restart}. Prints one JSON object as its last
line and writes C{bench/results/soak_bus_restart.json}.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import subprocess
import time
import uuid

import attrs
from twisted.internet import defer, task, threads
from twisted.internet.defer import Deferred

from bench.bench_bus import REGISTRY, BenchEcho, BenchEchoReply, stop_and_clean
from zcontrol.bus.amqp import AMQPBus
from zcontrol.bus.message import Event

HERE = os.path.dirname(os.path.abspath(__file__))


@attrs.define(kw_only=True)
class SoakEvent(Event):
    topic = "soak.tick"


REG = REGISTRY.copy()
REG.register(SoakEvent)


def ctl(*args: str) -> subprocess.CompletedProcess:
    exe = shutil.which("rabbitmqctl") or "/usr/sbin/rabbitmqctl"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


async def main(reactor) -> None:
    prefix = f"soak{uuid.uuid4().hex[:6]}."
    a = AMQPBus(reactor, node_id="soakA", prefix=prefix, registry=REG)
    b = AMQPBus(reactor, node_id="soakB", prefix=prefix, registry=REG)
    await a.start()
    await b.start()
    await a.when_members(2)
    await b.when_members(2)
    for bus in (a, b):
        await bus.register_service("soak", lambda m: BenchEchoReply(text=m.text))
    key = next(f"r{i}" for i in range(10000) if a.owner_of(f"r{i}") == "soakB")
    events: list[float] = []
    a.subscribe("soak.*", lambda e: events.append(time.monotonic()))
    outcomes: collections.Counter = collections.Counter()
    timeline: list[tuple[float, str, float]] = []  # (sent at, outcome, latency)
    state = {"running": True}
    finished: Deferred = Deferred()
    inflight = [0]

    def one() -> None:
        if not state["running"]:
            if inflight[0] == 0 and not finished.called:
                finished.callback(None)
            return
        inflight[0] += 1
        t0 = time.monotonic()
        a.send(BenchEcho(service_id="soak", resource_uuid=key, text="x"), timeout=30
               ).addCallback(back, t0)

    def back(reply, t0) -> None:
        inflight[0] -= 1
        outcome = "ok" if reply.success else reply.error.code
        outcomes[outcome] += 1
        timeline.append((t0, outcome, time.monotonic() - t0))
        if reply.success:
            one()
        else:
            reactor.callLater(0.05, one)

    for _ in range(50):
        one()
    await task.deferLater(reactor, 3, lambda: None)
    restart_at = time.monotonic()
    r1 = await threads.deferToThread(ctl, "stop_app")
    stopped_at = time.monotonic()
    r2 = await threads.deferToThread(ctl, "start_app")
    started_at = time.monotonic()
    # wait for the first success after the restart
    while True:
        await task.deferLater(reactor, 0.1, lambda: None)
        if any(t >= started_at and o == "ok" for t, o, _ in timeline[-200:]):
            break
        if time.monotonic() - started_at > 60:
            break
    recovered_at = time.monotonic()
    await task.deferLater(reactor, 2, lambda: None)
    # services and subscriptions came back?
    cross = await b.send(BenchEcho(service_id="soak",
                                   resource_uuid=next(f"q{i}" for i in range(10000)
                                                      if b.owner_of(f"q{i}") == "soakA")))
    n_events = len(events)
    for s in a._subs:
        await s.ready
    await b.publish(SoakEvent())
    for _ in range(50):
        if len(events) > n_events:
            break
        await task.deferLater(reactor, 0.1, lambda: None)
    state["running"] = False
    await finished
    # failures of sends already waiting when the connection dropped: how fast answered
    io_errors = [lat for t, o, lat in timeline if o == "SYS.1016" and t < stopped_at]
    result = {
        "stop_app_rc": r1.returncode,
        "start_app_rc": r2.returncode,
        "broker_stop_s": round(stopped_at - restart_at, 2),
        "broker_start_s": round(started_at - stopped_at, 2),
        "recovered_after_start_s": round(recovered_at - started_at, 2),
        "outcomes": dict(outcomes),
        "waiting_sends_failed": len(io_errors),
        "waiting_sends_max_answer_s": round(max(io_errors), 3) if io_errors else None,
        "timeouts": outcomes.get("SYS.1001", 0),
        "cross_node_send_after": bool(cross.success),
        "event_after": len(events) > n_events,
    }
    await stop_and_clean(reactor, [a, b], prefix)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    line = json.dumps(result, sort_keys=True)
    with open(os.path.join(HERE, "results", "soak_bus_restart.json"), "w") as f:
        f.write(line + "\n")
    print(line)


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
