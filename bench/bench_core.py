"""
make bench-core: LocalBus request/reply round trips per second with 1,000 outstanding (as
objects, and with C{copy=True}: through the codec), chain tasks per second, the memory one
outstanding send costs (with its timeout), and the codec's microseconds per encode and decode.
Prints one JSON object as its last line and writes it to bench/results/core.json.

Targets (2-core machine): localbus_rpc_per_s >= 30,000; bytes_per_pending_send <= 2,000.
The plain round trips do not run the codec (objects are passed as they are); the C{copy=True}
figure and the C{codec_*_us} figures do. C{*_per_cpu_s} divides by the process's CPU time
instead of wall time: on a shared machine it moves less with the neighbours' load. The
evaluation of cattrs against the codec is in L{agent.codec}'s docstring.
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


def measure_localbus_rpc(total: int = 200_000, outstanding: int = 1000,
                         copy_total: int = 50_000) -> dict:
    """
    Round trips through a LocalBus on the real reactor, keeping C{outstanding} in flight:
    first as the embedded default (objects passed as they are), then with C{copy=True}, where
    each message and reply crosses the bus encoded and decoded (the codec's share of a
    round trip, as over AMQP without the broker).
    """
    from twisted.internet import reactor

    def run(copy: bool, count: int) -> Deferred:
        bus = LocalBus(reactor, node_id="bench-copy" if copy else "bench", copy=copy)
        bus.start()
        bus.register_service("echo", lambda m: BenchEchoReply(n=m.n))
        state = {"sent": 0, "done": 0}
        finished: Deferred = Deferred()

        def one() -> None:
            state["sent"] += 1
            bus.send(BenchEcho(service_id="echo", n=state["sent"]),
                     timeout=60).addCallback(answered)

        def answered(reply: Reply) -> None:
            assert reply.success, reply.error
            state["done"] += 1
            if state["sent"] < count:
                one()
            elif state["done"] == count:
                finished.callback(time.perf_counter() - start)

        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(outstanding):
            one()
        return finished.addCallback(lambda wall: (wall, time.process_time() - cpu_start))

    result = {}

    async def go() -> None:
        try:
            result["plain"] = await run(False, total)
            result["copy"] = await run(True, copy_total)
        finally:
            reactor.stop()

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(go()))
    reactor.run()
    return {"localbus_rpc_per_s": round(total / result["plain"][0]),
            "localbus_rpc_per_cpu_s": round(total / result["plain"][1]),
            "localbus_rpc_outstanding": outstanding, "localbus_rpc_total": total,
            "localbus_copy_rpc_per_s": round(copy_total / result["copy"][0]),
            "localbus_copy_rpc_per_cpu_s": round(copy_total / result["copy"][1])}


def _best_us(fn, n: int, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(n):
            fn()
        best = min(best, time.thread_time() - start)
    return round(best / n * 1e6, 2)


def measure_codec(n: int = 20_000) -> dict:
    """
    Thread-CPU microseconds per encode (object to JSON bytes) and per decode (bytes to
    object) of the one codec (L{agent.codec}), best of 5 runs of C{n}: a bus request (the bench's echo,
    with its envelope), a bus error reply, and an agent command with two nested NICs.
    """
    from agent.protocol import NicTO, StartVmCmd
    from zcontrol.core.errors import SYS, error_code

    request = BenchEcho(service_id="echo", n=7, resource_uuid="r" * 32, timeout=30.0,
                        deadline=1234.5, reply_to="node-1", headers={"k": "v"})
    reply = Reply.failure(error_code(SYS.OPERATION_ERROR, "boom", error_code(SYS.TIMEOUT, "t")),
                          "c" * 32)
    nics = [NicTO(mac=f"fa:16:3e:00:00:0{i}", ip=f"10.0.0.{i}", netmask="255.255.255.0",
                  device_id=i) for i in range(2)]
    cmd = StartVmCmd(vm_instance_uuid="v" * 32, vm_name="vm", cpu_num=2, memory_size=2 << 30,
                     nics=nics, root_volume_install_path="/var/lib/zc/v.qcow2")
    out = {}
    for name, obj in (("bus_request", request), ("bus_reply", reply)):
        data = registry.encode(obj)
        assert registry.decode(data) == obj
        out[f"codec_{name}_encode_us"] = _best_us(lambda obj=obj: registry.encode(obj), n)
        out[f"codec_{name}_decode_us"] = _best_us(lambda data=data: registry.decode(data), n)
    data = cmd.to_json()
    assert StartVmCmd.from_json(data) == cmd
    out["codec_agent_cmd_encode_us"] = _best_us(cmd.to_json, n)
    out["codec_agent_cmd_decode_us"] = _best_us(lambda: StartVmCmd.from_json(data), n)
    return out


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
    out.update(measure_codec())
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
