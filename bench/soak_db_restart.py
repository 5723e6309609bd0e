"""
Soak: restart the PostgreSQL server under load and check the store rides through it.

    python -m bench.soak_db_restart        (needs root: runs pg_ctlcluster)

100 callers reserve host capacity back to back through a PostgresStore (pool 4); after a
few seconds the server is restarted with
C{pg_ctlcluster --skip-systemctl-redirect <version> main restart}. Every failure must be
SYS.1016; once the server is back every caller must succeed again without any help (the
pool replaces its dead connections); the host's capacity must match the reservations that
reported success (give or take the ones whose COMMIT went through while the reply was lost,
reported as C{ambiguous}). Kept out of CI: a restart disturbs every other user of the
server, so the script refuses to run while other databases have clients, unless --force.

Prints one JSON object as its last line and writes bench/results/soak_db_restart.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any
from uuid import uuid4

import psycopg2
from twisted.internet import defer, task, threads

from zcontrol.core.errors import SYS, OperationError
from zcontrol.db import open_store

PG_ADMIN = os.environ.get("ZCONTROL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
CALLERS = 100
BEFORE, AFTER = 3.0, 4.0


def admin(sql: str) -> list:
    conn = psycopg2.connect(PG_ADMIN, connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def restart() -> float:
    version = sorted(os.listdir("/etc/postgresql"))[-1]
    t = time.perf_counter()
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart"],
                   check=True, capture_output=True)
    return time.perf_counter() - t


async def soak(reactor: Any, name: str) -> dict:
    url = PG_ADMIN.rpartition("/")[0] + "/" + name
    store = open_store(url, reactor, pool_size=4)
    await store.start()
    await store.insert("zone", {"uuid": "z", "name": "z"})
    await store.insert("cluster", {"uuid": "c", "name": "c", "zoneUuid": "z",
                                   "hypervisorType": "KVM"})
    await store.add_host({"uuid": "h", "name": "h", "zoneUuid": "z", "clusterUuid": "c",
                          "managementIp": "10.0.0.1", "hypervisorType": "KVM",
                          "totalCpuCapacity": 10**12, "totalMemoryCapacity": 10**12})
    ok = [0]
    codes: dict[str, int] = {}
    last_failure = [0.0]
    phase = {"stop_at": time.perf_counter() + 3600.0}
    restart_done = [0.0]

    async def caller() -> None:
        while time.perf_counter() < phase["stop_at"]:
            try:
                await store.reserve_host_capacity("h", 1, 1, ("soak", uuid4().hex))
                ok[0] += 1
            except OperationError as e:
                codes[e.error.code] = codes.get(e.error.code, 0) + 1
                last_failure[0] = time.perf_counter()
                # Back off a little while the server is down, as a real caller would.
                await task.deferLater(reactor, 0.05, lambda: None)

    callers = defer.gatherResults([defer.Deferred.fromCoroutine(caller())
                                   for _ in range(CALLERS)])
    await task.deferLater(reactor, BEFORE, lambda: None)
    before_ok = ok[0]
    took = await threads.deferToThread(restart)
    restart_done[0] = time.perf_counter()
    phase["stop_at"] = time.perf_counter() + AFTER
    await callers
    host = await store.get("host", "h")
    await store.stop()
    reserved = 10**12 - host["availableCpuCapacity"]
    failures = sum(codes.values())
    recovered_after = max(0.0, last_failure[0] - restart_done[0])
    return {
        "bench": "soak_db_restart",
        "callers": CALLERS,
        "restart_s": round(took, 2),
        "ok_before_restart": before_ok,
        "ok_total": ok[0],
        "failures_by_code": codes,
        "only_io_errors": set(codes) <= {SYS.IO_ERROR},
        "last_failure_after_restart_s": round(recovered_after, 2),
        "ok_after_recovery": ok[0] - before_ok,
        "reserved_in_db": reserved,
        "ambiguous": reserved - ok[0],
        "consistent": 0 <= reserved - ok[0] <= failures,
    }


def main() -> None:
    force = "--force" in sys.argv
    others = admin("SELECT DISTINCT datname FROM pg_stat_activity WHERE datname IS NOT NULL"
                   " AND datname <> 'postgres' AND pid <> pg_backend_pid()")
    if others and not force:
        print(f"other databases have clients ({others}); not restarting (use --force)",
              file=sys.stderr)
        sys.exit(2)
    name = f"zcontrol_soak_{os.getpid()}"
    admin(f'CREATE DATABASE "{name}"')
    result: dict[str, Any] = {}

    def body(reactor: Any) -> defer.Deferred:
        async def run() -> None:
            result.update(await soak(reactor, name))

        return defer.Deferred.fromCoroutine(run())

    try:
        task.react(body)
    except SystemExit as e:
        if e.code:
            raise
    finally:
        for _ in range(50):
            try:
                admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                break
            except psycopg2.OperationalError:
                time.sleep(0.2)  # the server may still be coming back
    text = json.dumps(result, sort_keys=True)
    os.makedirs("bench/results", exist_ok=True)
    with open("bench/results/soak_db_restart.json", "w") as f:
        f.write(text + "\n")
    print(text)
    if not (result.get("only_io_errors") and result.get("consistent")
            and result.get("ok_after_recovery", 0) > 0):
        sys.exit(1)


if __name__ == "__main__":
    main()
