"""
make bench-alloc: host allocations per second (choose + reserve + release) with 1,000 and
10,000 hosts, on SQLite (temp file, WAL) and on PostgreSQL (a fresh database on
127.0.0.1:5432), with 1 and 50 concurrent allocators, first-fit and least-used; and the
"no available host" path (the per-filter counting query over every host).

The inventory: one zone, clusters of 100 hosts, all attached to the L2 network of the
requested L3 and to an NFS primary storage (mounted on every host) and a LocalStorage (a
host ref per host with room); 32 CPUs and 128 GiB per host; every 10th host Disconnected
and every 20th in Maintenance (the pre-filter skips them). An allocation asks 1 CPU, 1 GiB
and a 10 GiB root volume on that L3, through L{zcontrol.scheduler.allocator.Allocator}
(what the C{host.allocator} service runs per AllocateHostMsg), then gives the capacity back
(C{release_host_capacity}), so the figures are of a steady state. With 50 first-fit
allocators all choose the same first host: its row is contended and its 32 CPUs are
sometimes all held, so allocations lose races and retry on the next host (counted).

Prints one JSON object as its last line and writes it to bench/results/alloc.json.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import psycopg2
from twisted.internet import defer, task

from zcontrol.core.errors import OperationError
from zcontrol.db import open_store
from zcontrol.scheduler.allocator import Allocator
from zcontrol.scheduler.model import AllocationRequest

DURATION = float(os.environ.get("BENCH_ALLOC_DURATION", "3"))
SIZES = tuple(int(n) for n in os.environ.get("BENCH_ALLOC_HOSTS", "1000,10000").split(","))
CONCURRENCY = (1, 50)
STRATEGIES = {"first_fit": None, "least_used": "LeastUsedHostAllocatorStrategy"}
PG_ADMIN = os.environ.get("ZCONTROL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
PG_POOL = 8
GIB = 1024**3
CLUSTER_SIZE = 100


def pg_admin(sql: str) -> None:
    conn = psycopg2.connect(PG_ADMIN)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


def _insert_rows(db: Any, table: str, columns: tuple[str, ...], rows: list[tuple]) -> None:
    for i in range(0, len(rows), 500):
        chunk = rows[i:i + 500]
        one = "(" + ", ".join("?" for _ in columns) + ")"
        db.run(f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
               + ", ".join(one for _ in chunk), tuple(v for r in chunk for v in r))


def seed_thd(db: Any, hosts: int, now: float) -> None:
    """
    The bench inventory, in one transaction of multi-row INSERTs.
    """
    t = (now, now)
    clusters = [f"c{i:04d}" for i in range((hosts + CLUSTER_SIZE - 1) // CLUSTER_SIZE)]
    with db.transaction():
        _insert_rows(db, "zones", ("uuid", "name", "create_date", "last_op_date"),
                     [("z", "z", *t)])
        _insert_rows(db, "clusters", ("uuid", "name", "zone_uuid", "hypervisor_type",
                                      "create_date", "last_op_date"),
                     [(c, c, "z", "KVM", *t) for c in clusters])
        _insert_rows(db, "l2_networks", ("uuid", "name", "zone_uuid", "physical_interface",
                                         "create_date", "last_op_date"),
                     [("l2", "l2", "z", "eth0", *t)])
        _insert_rows(db, "l3_networks", ("uuid", "name", "l2_network_uuid", "zone_uuid",
                                         "create_date", "last_op_date"),
                     [("l3", "l3", "l2", "z", *t)])
        _insert_rows(db, "l2_network_cluster_refs", ("uuid", "l2_network_uuid", "cluster_uuid",
                                                     "create_date", "last_op_date"),
                     [(f"l2-{c}", "l2", c, *t) for c in clusters])
        ps_cols = ("uuid", "name", "zone_uuid", "url", "type", "status", "total_capacity",
                   "available_capacity", "create_date", "last_op_date")
        _insert_rows(db, "primary_storages", ps_cols, [
            ("nfs", "nfs", "z", "nfs:/x", "NFS", "Connected", 10**15, 10**15, *t),
            ("local", "local", "z", "/local", "LocalStorage", "Connected", 10**16, 10**16, *t)])
        _insert_rows(db, "primary_storage_cluster_refs", (
            "uuid", "primary_storage_uuid", "cluster_uuid", "create_date", "last_op_date"),
            [(f"{ps}-{c}", ps, c, *t) for c in clusters for ps in ("nfs", "local")])
        host_rows, mounts, locals_ = [], [], []
        for i in range(hosts):
            h = f"h{i:06d}"
            status = "Disconnected" if i % 10 == 9 else "Connected"
            state = "Maintenance" if i % 20 == 4 else "Enabled"
            host_rows.append((h, h, "z", clusters[i // CLUSTER_SIZE], f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}",
                              "KVM", state, status, 32, 32, 32, 128 * GIB, 128 * GIB, *t))
            mounts.append((f"m-{h}", "nfs", h, "Connected", *t))
            locals_.append((f"l-{h}", "local", h, 1000 * GIB, 1000 * GIB, *t))
        _insert_rows(db, "hosts", (
            "uuid", "name", "zone_uuid", "cluster_uuid", "management_ip", "hypervisor_type",
            "state", "status", "cpu_num", "total_cpu_capacity", "available_cpu_capacity",
            "total_memory_capacity", "available_memory_capacity", "create_date",
            "last_op_date"), host_rows)
        _insert_rows(db, "primary_storage_host_refs", (
            "uuid", "primary_storage_uuid", "host_uuid", "status", "create_date",
            "last_op_date"), mounts)
        _insert_rows(db, "local_storage_host_refs", (
            "uuid", "primary_storage_uuid", "host_uuid", "total_capacity", "available_capacity",
            "create_date", "last_op_date"), locals_)
    db.run("ANALYZE")


async def allocations_per_s(store: Any, concurrency: int, strategy: str | None
                            ) -> dict[str, Any]:
    """
    C{concurrency} allocators, each allocating and releasing back to back for
    L{DURATION} seconds.
    """
    allocator = Allocator(store)
    req = AllocationRequest(cpu_num=1, memory_size=GIB, disk_size=10 * GIB,
                            l3_network_uuids=["l3"], allocator_strategy=strategy)
    done, attempts, errors = [0], [0], []
    latencies: list[float] = []
    deadline = time.perf_counter() + DURATION

    async def worker(w: int) -> None:
        n = 0
        while time.perf_counter() < deadline:
            holder = ("VmInstanceVO", f"bench-{w}-{n}")
            n += 1
            t0 = time.perf_counter()
            try:
                a = await allocator.allocate(req, holder)
            except OperationError as e:
                errors.append(str(e.error))
                continue
            latencies.append(time.perf_counter() - t0)
            await store.release_host_capacity(a.host["uuid"], holder)
            done[0] += 1
            attempts[0] += a.attempts

    start = time.perf_counter()
    await defer.gatherResults([defer.Deferred.fromCoroutine(worker(w))
                               for w in range(concurrency)])
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "allocations_per_s": round(done[0] / elapsed, 1),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 2) if latencies else None,
        "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 2) if latencies else None,
        "retries_per_allocation": round((attempts[0] - done[0]) / done[0], 3) if done[0] else None,
        "errors": len(errors),
    }


async def no_host_per_s(store: Any) -> float:
    """
    "No available host" answers per second (one allocator): the pre-filter finds nothing
    and the counting query runs over every host.
    """
    allocator = Allocator(store)
    req = AllocationRequest(cpu_num=64, memory_size=GIB, l3_network_uuids=["l3"])
    n, deadline, start = 0, time.perf_counter() + DURATION / 2, time.perf_counter()
    while time.perf_counter() < deadline:
        try:
            await allocator.allocate(req, ("VmInstanceVO", "none"))
        except OperationError:
            n += 1
    return round(n / (time.perf_counter() - start), 1)


async def measure(reactor: Any, url: str, hosts: int, pool: int) -> dict[str, Any]:
    store = open_store(url, reactor, pool_size=pool)
    await store.start()
    try:
        t0 = time.perf_counter()
        await store._run(seed_thd, hosts, time.time())
        out: dict[str, Any] = {"seed_s": round(time.perf_counter() - t0, 2)}
        for name, strategy in STRATEGIES.items():
            for c in CONCURRENCY:
                r = await allocations_per_s(store, c, strategy)
                out[f"{name}_c{c}"] = r
                print(f"  {hosts} hosts {name} c={c}: {r}", file=sys.stderr, flush=True)
        out["no_host_errors_per_s"] = await no_host_per_s(store)
        drift = await store.audit_capacity()
        out["drift_after"] = len(drift)
        return out
    finally:
        await store.stop()


async def run(reactor: Any) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="zcontrol-bench-alloc-")
    pg_dbs: list[str] = []
    result: dict[str, Any] = {"duration_s": DURATION, "concurrency": list(CONCURRENCY),
                              "sqlite": {}, "postgresql": {}}
    try:
        for hosts in SIZES:
            print(f"sqlite, {hosts} hosts", file=sys.stderr, flush=True)
            result["sqlite"][str(hosts)] = await measure(
                reactor, f"sqlite://{tmp}/alloc{hosts}.db", hosts, 2)
            name = f"zcontrol_bench_alloc_{os.getpid()}_{hosts}"
            pg_admin(f'CREATE DATABASE "{name}"')
            pg_dbs.append(name)
            print(f"postgresql, {hosts} hosts", file=sys.stderr, flush=True)
            result["postgresql"][str(hosts)] = await measure(
                reactor, PG_ADMIN.rpartition("/")[0] + "/" + name, hosts, PG_POOL)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for name in pg_dbs:
            pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    for backend in ("sqlite", "postgresql"):
        for hosts, figures in result[backend].items():
            result[f"{backend}_{hosts}_hosts_allocations_per_s_c50"] = (
                figures["first_fit_c50"]["allocations_per_s"])
    return result


def main() -> None:
    """
    Run the benchmark on the global reactor, print the JSON object as the last line and
    write it to bench/results/alloc.json.
    """
    result: dict[str, Any] = {}

    def body(reactor: Any) -> defer.Deferred:
        async def go() -> None:
            result.update(await run(reactor))
            os.makedirs("bench/results", exist_ok=True)
            with open("bench/results/alloc.json", "w") as f:
                f.write(json.dumps(result, sort_keys=True))
            print(json.dumps(result, sort_keys=True), flush=True)

        return defer.Deferred.fromCoroutine(go())

    task.react(body)


if __name__ == "__main__":
    main()
