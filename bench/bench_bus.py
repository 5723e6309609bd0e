"""
The bus over RabbitMQ, measured against its floor and against OpenStack's bus, in one run on
the same broker (127.0.0.1:5672):

 - C{AMQPBus} request/reply round trips per second with p50/p99 latency, with 1 and 1,000
   requests outstanding (a client node and a server node in this process, every message
   through the broker), and one-way posts per second (handled at the far end);
 - the same RPC workload on bare txAMQP (its channel API, C{basic_consume} queues, one
   request queue, one reply queue, no confirms): the floor our layer adds to;
 - the local short-cut: requests a node sends to itself, with the switch off and on;
 - oslo.messaging RPC (rabbit driver, threading executor, one client thread per outstanding
   call), run in its own virtualenv (C{bench/.venv-oslo}, made by C{make bench-bus}; set
   C{OSLO_PYTHON} to use another interpreter) as a subprocess.

Rounds alternate AMQPBus and bare txAMQP, so both see the same noise; the ratios are medians
of per-round ratios. Prints one JSON object as its last line and writes
C{bench/results/bus.json}. Run as C{python -m bench.bench_bus} (C{--quick} for a smoke run).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import uuid

import attrs
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from txamqp.content import Content
from txamqp.endpoint import AMQEndpoint
from txamqp.factory import AMQFactory

from zcontrol.bus._amqp_proto import spec_path
from zcontrol.bus.amqp import AMQPBus, Topology
from zcontrol.bus.message import NeedReplyMessage, Reply, registry

HOST, PORT = "127.0.0.1", 5672
HERE = os.path.dirname(os.path.abspath(__file__))
PAYLOAD = "x" * 300
QUICK = "--quick" in sys.argv


@attrs.define(kw_only=True)
class BenchEcho(NeedReplyMessage):
    text: str = ""


@attrs.define(kw_only=True)
class BenchEchoReply(Reply):
    text: str = ""


REGISTRY = registry.copy()
REGISTRY.register(BenchEcho)
REGISTRY.register(BenchEchoReply)


def summary(latencies: list[float], elapsed: float) -> dict:
    latencies = sorted(latencies)
    return {
        "per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 3),
        "p99_ms": round(latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000, 3),
    }


async def windowed(send, n: int, window: int) -> dict:
    """
    C{n} calls of C{send() -> Deferred}, C{window} outstanding.
    """
    latencies: list[float] = []
    done: Deferred = Deferred()
    state = {"sent": 0, "back": 0}
    clock = time.perf_counter

    def one() -> None:
        state["sent"] += 1
        t0 = clock()
        send().addCallback(back, t0)

    def back(result, t0) -> None:
        latencies.append(clock() - t0)
        if getattr(result, "success", True) is False:
            raise RuntimeError(f"error reply: {result.error}")
        state["back"] += 1
        if state["sent"] < n:
            one()
        elif state["back"] == n:
            done.callback(None)

    start = clock()
    for _ in range(min(window, n)):
        one()
    await done
    return summary(latencies, clock() - start)


# AMQPBus

async def bus_pair(reactor, prefix: str, shortcut: bool = False):
    server = AMQPBus(reactor, node_id="benchserver", prefix=prefix, registry=REGISTRY,
                     heartbeat_interval=None, local_shortcut=shortcut)
    client = AMQPBus(reactor, node_id="benchclient", prefix=prefix, registry=REGISTRY,
                     heartbeat_interval=None, local_shortcut=shortcut)
    await server.start()
    await client.start()
    for b in (server, client):
        b.set_members(["benchserver", "benchclient"])
    got = {"posts": 0, "expect": 0, "done": None}

    def echo(msg):
        if isinstance(msg, BenchEcho) and msg.reply_to is not None:
            return BenchEchoReply(text=msg.text)
        got["posts"] += 1
        if got["posts"] == got["expect"] and got["done"] is not None:
            got["done"].callback(None)
        return None

    for b in (server, client):
        await b.register_service("bench", echo)
    key = next(f"r{i}" for i in range(10000) if client.owner_of(f"r{i}") == "benchserver")
    return server, client, key, got


async def stop_and_clean(reactor, buses, prefix):
    for b in buses:
        await b.stop()
    topo = Topology(prefix)
    client, ch = await raw_connect(reactor)
    await ch.queue_delete(queue=topo.no_route_queue)
    for ex in (topo.p2p, topo.broadcast, topo.no_route):
        await ch.exchange_delete(exchange=ex)
    await client.close(within=5)
    await client.disconnected.wait()


async def amqpbus_rpc(client, key, n, window) -> dict:
    return await windowed(
        lambda: client.send(BenchEcho(service_id="bench", resource_uuid=key, text=PAYLOAD)),
        n, window)


async def amqpbus_local_rpc(client, n, window) -> dict:
    return await windowed(lambda: client.send(BenchEcho(service_id="bench", text=PAYLOAD)),
                          n, window)


async def amqpbus_oneway(client, key, got, n, window=1000) -> dict:
    got["posts"], got["expect"], got["done"] = 0, n, Deferred()
    start = time.perf_counter()
    await windowed(lambda: client.post(BenchEcho(service_id="bench", resource_uuid=key,
                                                 text=PAYLOAD)), n, window)
    await got["done"]
    return {"per_s": round(n / (time.perf_counter() - start), 1)}


# bare txAMQP

async def raw_connect(reactor):
    endpoint = AMQEndpoint(reactor, HOST, PORT, username="guest", password="guest")
    client = await endpoint.connect(AMQFactory(spec=spec_path(), clock=reactor))
    ch = await client.channel(1)
    await ch.channel_open()
    return client, ch


async def raw_setup(reactor):
    """
    A server connection echoing requests from a queue, a client connection with its reply
    queue: the textbook txAMQP RPC.
    """
    rq = f"bench.raw.req.{uuid.uuid4().hex[:8]}"
    sclient, sch = await raw_connect(reactor)
    await sch.queue_declare(queue=rq, exclusive=True, auto_delete=True)
    await sch.basic_qos(prefetch_count=2000)
    stag = (await sch.basic_consume(queue=rq, no_ack=True)).consumer_tag
    squeue = await sclient.queue(stag)

    def serve(msg):
        props = msg.content.properties
        sch.basic_publish(exchange="", routing_key=props["reply-to"], content=Content(
            msg.content.body, properties={"correlation-id": props["correlation-id"],
                                          "delivery-mode": 1}))
        squeue.get().addCallbacks(serve, lambda f: None)

    squeue.get().addCallbacks(serve, lambda f: None)

    cclient, cch = await raw_connect(reactor)
    reply_q = (await cch.queue_declare(queue="", exclusive=True, auto_delete=True)).queue
    ctag = (await cch.basic_consume(queue=reply_q, no_ack=True)).consumer_tag
    cqueue = await cclient.queue(ctag)
    waiting: dict[str, Deferred] = {}

    def on_reply(msg):
        d = waiting.pop(msg.content.properties["correlation-id"], None)
        if d is not None:
            d.callback(msg.content.body)
        cqueue.get().addCallbacks(on_reply, lambda f: None)

    cqueue.get().addCallbacks(on_reply, lambda f: None)
    body = json.dumps({"BenchEcho": {"id": uuid.uuid4().hex, "text": PAYLOAD}}).encode()

    def call() -> Deferred:
        cid = uuid.uuid4().hex
        d: Deferred = Deferred()
        waiting[cid] = d
        cch.basic_publish(exchange="", routing_key=rq, content=Content(
            body, properties={"reply-to": reply_q, "correlation-id": cid,
                              "delivery-mode": 1}))
        return d

    async def close():
        for c in (cclient, sclient):
            await c.close(within=5)
            await c.disconnected.wait()

    return call, close


def oslo_python() -> str | None:
    py = os.environ.get("OSLO_PYTHON") or os.path.join(HERE, ".venv-oslo", "bin", "python")
    return py if os.path.exists(py) else None


def run_oslo(outstanding: int, calls: int) -> dict:
    py = oslo_python()
    if py is None:
        return {"error": "no oslo.messaging virtualenv (make bench-bus creates it)"}
    out = subprocess.run([py, os.path.join(HERE, "_oslo_rpc.py"), str(outstanding),
                          str(calls)], capture_output=True, text=True, timeout=300)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": (out.stderr or out.stdout)[-500:]}


async def main(reactor) -> None:
    rounds = 1 if QUICK else 3
    n1, n1000 = (300, 3000) if QUICK else (2000, 20000)
    prefix = f"bench{uuid.uuid4().hex[:6]}."
    server, client, key, got = await bus_pair(reactor, prefix)
    raw_call, raw_close = await raw_setup(reactor)
    result: dict = {"payload_bytes": len(REGISTRY.encode(BenchEcho(text=PAYLOAD)))}
    # warm up both
    await amqpbus_rpc(client, key, 500, 100)
    await windowed(raw_call, 500, 100)
    bus1, raw1, bus1000, raw1000, ratios = [], [], [], [], []
    for _ in range(rounds):
        bus1.append(await amqpbus_rpc(client, key, n1, 1))
        raw1.append(await windowed(raw_call, n1, 1))
        b = await amqpbus_rpc(client, key, n1000, 1000)
        r = await windowed(raw_call, n1000, 1000)
        bus1000.append(b)
        raw1000.append(r)
        ratios.append(b["per_s"] / r["per_s"])

    def med(runs, field):
        return round(statistics.median(x[field] for x in runs), 3)

    for name, runs in (("amqpbus", (bus1, bus1000)), ("txamqp_raw", (raw1, raw1000))):
        for out, runs_ in zip(("1", "1000"), runs, strict=True):
            result[f"{name}_rpc_per_s_{out}"] = med(runs_, "per_s")
            result[f"{name}_p50_ms_{out}"] = med(runs_, "p50_ms")
            result[f"{name}_p99_ms_{out}"] = med(runs_, "p99_ms")
    result["ratio_vs_raw"] = round(statistics.median(ratios), 3)
    result["amqpbus_oneway_per_s"] = (await amqpbus_oneway(client, key, got, n1000))["per_s"]
    # local short-cut off / on (a node sending to its own service)
    result["amqpbus_local_rpc_per_s_1000_shortcut_off"] = (
        await amqpbus_local_rpc(client, n1000 // 2, 1000))["per_s"]
    await raw_close()
    await stop_and_clean(reactor, [server, client], prefix)
    prefix2 = f"bench{uuid.uuid4().hex[:6]}."
    s2, c2, _, _ = await bus_pair(reactor, prefix2, shortcut=True)
    result["amqpbus_local_rpc_per_s_1000_shortcut_on"] = (
        await amqpbus_local_rpc(c2, n1000 // 2, 1000))["per_s"]
    await stop_and_clean(reactor, [s2, c2], prefix2)
    # oslo.messaging, same broker, in its own process and virtualenv
    o1 = await defer_to_thread(reactor, run_oslo, 1, 300 if QUICK else 1000)
    o1000 = await defer_to_thread(reactor, run_oslo, 1000, 2000 if QUICK else 6000)
    result["oslo_rpc_per_s_1"] = o1.get("rpc_per_s")
    result["oslo_p99_ms_1"] = o1.get("p99_ms")
    result["oslo_rpc_per_s_1000"] = o1000.get("rpc_per_s")
    result["oslo_p50_ms_1000"] = o1000.get("p50_ms")
    result["oslo_p99_ms_1000"] = o1000.get("p99_ms")
    if "error" in o1000:
        result["oslo_error"] = o1000["error"]
    if result["oslo_rpc_per_s_1000"]:
        result["oslo_rpc_per_s_1000"] = round(result["oslo_rpc_per_s_1000"], 1)
        result["ratio_vs_oslo"] = round(
            result["amqpbus_rpc_per_s_1000"] / result["oslo_rpc_per_s_1000"], 2)
    else:
        result["ratio_vs_oslo"] = None
    result["rounds"] = rounds
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    line = json.dumps(result, sort_keys=True)
    with open(os.path.join(HERE, "results", "bus.json"), "w") as f:
        f.write(line + "\n")
    print(line)


def defer_to_thread(reactor, fn, *args):
    from twisted.internet import threads

    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), fn, *args)


if __name__ == "__main__":
    task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
