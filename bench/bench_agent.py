"""
Agent benchmark: the callback pattern against a bare HTTP round trip, with the agent in its own
process (C{twistd -n zagent}).

Measured, in the same run against the same agent process, alternating over C{--rounds} rounds
(medians reported):

  - C{bare_http_rps_1000}: a plain klein+treq POST round trip (C{/host/echo}, answered inline)
    with 1,000 requests in flight;
  - C{callback_cmds_per_s_1000}: asynchronous commands (C{/host/capacity}) completed per
    second with 1,000 in flight: the agent accepts, works (simulator, no latency) and POSTs a
    signed callback to this process's callback endpoint; C{p50_ms}/C{p99_ms} are per-command
    latencies (send to completion) and C{lost} counts commands that did not complete.

Both sides size their pools (1,000 persistent connections per peer) and backlogs (1,024), as
STACK_NOTES.md says they must. The bare round trip uses the same treq client construction
(pool, body producer, endpoint cache) against the same klein site, so the two differ only by
the pattern.

Also reported: CPU microseconds per command/request of each process (C{*_cpu_us}, from
C{os.times} and C{/proc/<agent pid>/stat}), which do not depend on how busy the machine is,
and C{cpu_ratio} = bare CPU (both processes) / callback CPU (both processes): the ratio the
two would reach if the processes could never run at the same time (see Note [callback outbox]
in L{agent.app}; C{--time-slice -1} turns the outbox off to compare).

Prints one JSON object as its last line and writes it to C{bench/results/agent.json}.

    python -m bench.bench_agent [--commands 15000] [--concurrency 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.internet import defer, task

from agent import protocol as p
from agent.bootstrap import TOKEN_FILE, ensure_token_file
from agent.http import make_http_client, make_pool
from zcontrol.agentclient import AgentClient, CallbackEndpoint, listen_callback

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "agent.json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _cpu_seconds(pid: int | None = None) -> float:
    """
    User + system CPU seconds used so far by process C{pid} (this process if None).
    """
    if pid is None:
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def closed_loop(reactor: Any, total: int, concurrency: int, one: Any) -> defer.Deferred:
    """
    Run C{one(i)} (returning a Deferred) C{total} times with C{concurrency} in flight; fire
    with C{(elapsed seconds, latencies, failures)}.
    """
    done = defer.Deferred()
    latencies: list[float] = []
    state = {"next": 0, "finished": 0, "failures": 0}
    clock = time.perf_counter
    start = clock()

    def launch() -> None:
        i = state["next"]
        if i >= total:
            return
        state["next"] = i + 1
        t0 = clock()
        d = one(i)
        d.addCallbacks(ok, bad, callbackArgs=(t0,))

    def ok(_: Any, t0: float) -> None:
        latencies.append(clock() - t0)
        finish()

    def bad(reason: Any) -> None:
        state["failures"] += 1
        if state["failures"] <= 3:
            print("failure:", reason.getErrorMessage(), file=sys.stderr)
        finish()

    def finish() -> None:
        state["finished"] += 1
        if state["finished"] == total:
            done.callback((clock() - start, latencies, state["failures"]))
        else:
            launch()

    for _ in range(min(concurrency, total)):
        launch()
    return done


async def run(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    port = _free_port()
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    logfile = tempfile.NamedTemporaryFile(prefix="zagent-", suffix=".log", delete=False).name
    # The agent requires a bootstrap token, as in production (agent.bootstrap).
    token_dir = tempfile.mkdtemp(prefix="zagent-token-")
    token_file = os.path.join(token_dir, TOKEN_FILE)
    token, _ = ensure_token_file(token_file)
    proc = subprocess.Popen(
        [twistd, "-n", "--pidfile=", f"--logfile={logfile}", "zagent", "--port", str(port),
         "--hosts", str(args.hosts), "--gc-freeze", "--seed", "1",
         "--callback-time-slice", str(args.time_slice), "--bootstrap-token-file", token_file],
    )
    agent_url = f"http://127.0.0.1:{port}"
    client = AgentClient.create(reactor, "", pool_size=args.concurrency,
                                default_timeout=args.timeout, bootstrap_token=token)
    endpoint = CallbackEndpoint(client)
    listening = listen_callback(reactor, endpoint, interface="127.0.0.1", backlog=1024)
    bare_pool = make_pool(reactor, args.concurrency)
    bare_http = make_http_client(reactor, bare_pool)
    try:
        bases = [p.host_base_url(agent_url, i) for i in range(args.hosts)]
        for _ in range(200):
            try:
                await client.call(bases[0], p.EchoCmd(), timeout=1.0)
                break
            except Exception:
                await task.deferLater(reactor, 0.05, lambda: None)
        else:
            raise RuntimeError("the agent did not come up")
        await defer.gatherResults([client.connect(b, f"host-{i}") for i, b in enumerate(bases)])

        echo_urls = [b + p.ECHO_PATH for b in bases]
        echo_body = p.EchoCmd().to_json()
        headers = {b"content-type": [b"application/json"]}

        def bare(i: int) -> defer.Deferred:
            d = bare_http.post(echo_urls[i % len(echo_urls)], data=echo_body, headers=headers)
            return d.addCallback(lambda r: r.content())

        cmd = p.HostCapacityCmd()

        def callback(i: int) -> defer.Deferred:
            return client.call(bases[i % len(bases)], cmd)

        # Warm up both pools to their full size.
        await closed_loop(reactor, args.concurrency * 2, args.concurrency, bare)
        await closed_loop(reactor, args.concurrency * 2, args.concurrency, callback)
        gc.collect()
        gc.freeze()

        rounds = []
        for r in range(args.rounds):
            cpu0 = (_cpu_seconds(), _cpu_seconds(proc.pid))
            b_elapsed, b_lat, b_fail = await closed_loop(reactor, args.commands,
                                                         args.concurrency, bare)
            cpu1 = (_cpu_seconds(), _cpu_seconds(proc.pid))
            c_elapsed, c_lat, c_fail = await closed_loop(reactor, args.commands,
                                                         args.concurrency, callback)
            cpu2 = (_cpu_seconds(), _cpu_seconds(proc.pid))
            row = {
                "bare_http_rps": args.commands / b_elapsed,
                "bare_failures": b_fail,
                "callback_cmds_per_s": args.commands / c_elapsed,
                "p50_ms": _percentile(c_lat, 0.50) * 1000,
                "p99_ms": _percentile(c_lat, 0.99) * 1000,
                "lost": c_fail,
                # CPU per command/request, microseconds: this process (client) and the agent.
                "bare_client_cpu_us": (cpu1[0] - cpu0[0]) / args.commands * 1e6,
                "bare_agent_cpu_us": (cpu1[1] - cpu0[1]) / args.commands * 1e6,
                "callback_client_cpu_us": (cpu2[0] - cpu1[0]) / args.commands * 1e6,
                "callback_agent_cpu_us": (cpu2[1] - cpu1[1]) / args.commands * 1e6,
            }
            print(f"round {r + 1}: " + json.dumps({k: round(v, 1) for k, v in row.items()}),
                  file=sys.stderr)
            rounds.append(row)
        # After the last round nothing may be left waiting.
        lost_pending = len(client)

        def med(key: str) -> float:
            return round(statistics.median(row[key] for row in rounds), 1)

        result = {
            "bench": "agent",
            "callback_cmds_per_s_1000": med("callback_cmds_per_s"),
            "bare_http_rps_1000": med("bare_http_rps"),
            "ratio": round(med("callback_cmds_per_s") / med("bare_http_rps"), 3),
            "ratio_per_round_median": round(statistics.median(
                row["callback_cmds_per_s"] / row["bare_http_rps"] for row in rounds), 3),
            "cpu_ratio": round((med("bare_client_cpu_us") + med("bare_agent_cpu_us"))
                               / (med("callback_client_cpu_us") + med("callback_agent_cpu_us")),
                               3),
            "p50_ms": med("p50_ms"),
            "p99_ms": med("p99_ms"),
            "lost": sum(row["lost"] for row in rounds) + lost_pending,
            "bare_client_cpu_us": med("bare_client_cpu_us"),
            "bare_agent_cpu_us": med("bare_agent_cpu_us"),
            "callback_client_cpu_us": med("callback_client_cpu_us"),
            "callback_agent_cpu_us": med("callback_agent_cpu_us"),
            "bare_failures": sum(row["bare_failures"] for row in rounds),
            "commands_per_round": args.commands,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "hosts": args.hosts,
            "agent_process": "twistd -n zagent (separate process)",
            "pool_per_peer": args.concurrency,
            "agent_callback_time_slice": args.time_slice,
            "backlog": 1024,
            "python": sys.version.split()[0],
            "cpus": os.cpu_count(),
        }
        result["target_met"] = (
            result["lost"] == 0
            and result["callback_cmds_per_s_1000"] >= 0.5 * result["bare_http_rps_1000"]
        )
        return result
    finally:
        await client.close()
        await bare_pool.closeCachedConnections()
        await listening.stopListening()
        proc.terminate()
        proc.wait(10)
        os.unlink(logfile)
        shutil.rmtree(token_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=15000)
    parser.add_argument("--concurrency", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hosts", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--time-slice", type=float, default=0.02,
                        help="the agent's --callback-time-slice (negative: inline callbacks)")
    args = parser.parse_args()
    out: dict[str, Any] = {}

    def go(reactor: Any) -> defer.Deferred:
        d = defer.Deferred.fromCoroutine(run(reactor, args))
        return d.addCallback(out.update)

    try:
        task.react(go)
    except SystemExit as e:
        if e.code:
            raise
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(out, f, indent=2, sort_keys=True)
    print(json.dumps(out, sort_keys=True))


if __name__ == "__main__":
    main()
