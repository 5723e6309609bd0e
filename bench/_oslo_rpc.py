"""
oslo.messaging RPC round trips on the local RabbitMQ, for L{bench.bench_bus}.

Runs in its own virtualenv (C{bench/.venv-oslo}, made by C{make bench-bus}); never imports
zcontrol. Usage: C{python _oslo_rpc.py <outstanding> <calls>}; prints one JSON object.
Outstanding calls are client threads (oslo's RPC client is blocking), the server uses the
threading executor, as a Nova service would without eventlet.
"""

import json
import statistics
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import oslo_messaging
from oslo_config import cfg

URL = "rabbit://guest:guest@127.0.0.1:5672/"
PAYLOAD = "x" * 300


class Endpoint:
    target = oslo_messaging.Target(version="1.0")

    def echo(self, ctxt, text):
        return text


def main():
    outstanding, calls = int(sys.argv[1]), int(sys.argv[2])
    conf = cfg.CONF  # oslo registers its tracing options on the global CONF only
    conf([], project="bench")
    transport = oslo_messaging.get_rpc_transport(conf, url=URL)
    topic = f"bench_{uuid.uuid4().hex[:8]}"
    server = oslo_messaging.get_rpc_server(
        transport, oslo_messaging.Target(topic=topic, server="s1"), [Endpoint()],
        executor="threading")
    # registered by the server: the server's worker pool (default 64)
    conf.set_override("executor_thread_pool_size", max(64, min(outstanding, 1000)))
    server.start()
    client = oslo_messaging.get_rpc_client(transport, oslo_messaging.Target(topic=topic),
                                           timeout=120)
    client.call({}, "echo", text="warm-up")
    latencies = []
    lock = threading.Lock()
    left = [calls]

    def worker():
        mine = []
        while True:
            with lock:
                if left[0] <= 0:
                    break
                left[0] -= 1
            t0 = time.perf_counter()
            client.call({}, "echo", text=PAYLOAD)
            mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=outstanding) as pool:
        for _ in range(outstanding):
            pool.submit(worker)
    elapsed = time.perf_counter() - start
    server.stop()
    server.wait()
    transport.cleanup()
    latencies.sort()
    print(json.dumps({
        "outstanding": outstanding,
        "calls": len(latencies),
        "rpc_per_s": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }))


if __name__ == "__main__":
    main()
