"""
make bench-vm: VM creates per second and the management node's CPU per VM, through the bus,
on 1,000 simulated hosts served by a simulated agent in its own process (issue 10,
"Benchmark").

For each configuration — C{embedded} (SQLite in the node's data dir, the in-process
LocalBus) and C{pg-amqp} (a scratch PostgreSQL database on 127.0.0.1:5432, the AMQP bus on
RabbitMQ 127.0.0.1:5672 under a random prefix) — the bench:

 1. starts a simulated agent as its own process (C{twistd -n zagent --hosts <hosts + 1>},
    zero latency, the node's bootstrap token: slots 0..hosts-1 are KVM hosts, the last slot
    the Sftp backup storage) and a whole management node in this process
    (L{zcontrol.node.make_node}, every service of the registry, HTTP on a free loopback port
    for the agents' callbacks);
 2. builds the inventory through the node's bus with the services' messages, as the REST
    API will send them: a zone, C{--clusters} KVM clusters, C{--hosts} hosts
    (C{AddHostMsg}, C{--add-parallelism} in flight, timed: C{setup.hosts_s}; a failed add is
    counted and sent again, at most three times in all), an NFS primary
    storage attached to every cluster (mounted on every host, timed: C{setup.attach_s}), an
    Sftp backup storage attached to the zone and an image on it, an L2 NoVlan network
    attached to every cluster and an L3 network with a /16 range (65,533 addresses), an
    instance offering of 1 CPU and 64 MiB;
 3. creates C{--vms} VMs (C{CreateVmInstanceMsg}, strategy InstantStart, sent with the
    node's bus; C{--concurrency} in flight): C{vm_creates_per_s} (VMs over the wall time of
    the phase), C{cpu_ms_per_vm} (this process's user + system CPU over the phase, every
    thread, divided by the VMs asked for) and the same per thread
    (C{cpu_ms_per_vm_by_thread}: C{reactor}, the store's C{store_pool} threads, C{other}),
    and, apart, the agent process's CPU per VM (C{agent_cpu_ms_per_vm}) and on PostgreSQL
    that of the server's backends serving the scratch database (C{postgres_cpu_ms_per_vm};
    RabbitMQ's one process serves every user of the broker: not measured);
 4. creates C{--profile-vms} more with the reactor thread under cProfile (timed by the
    thread's CPU clock, C{time.thread_time}) and splits that thread's CPU between C{bus},
    C{store}, C{agent_http} and C{rest} (below). The profile runs in a phase of its own
    because a profiler slows the node down: the figures of phase 3 are measured without it.
    C{cpu_split} (milliseconds of the node's CPU per VM) is the reactor thread's CPU per VM
    of phase 3 split by the profile's fractions, plus the store pool threads' CPU per VM of
    phase 3 (all C{store}: they run only the store's transactions) and any other thread's
    (C{rest}); C{cpu_split_fraction} gives the same as fractions of the node's CPU, and
    C{reactor_split_fraction} the profile's own fractions. The top 15 functions of the
    profile by own and by cumulative time go to C{bench/results/vm_profile_<config>.txt}.

Why NFS and not LocalStorage: with one NFS export mounted on every host, the image is
downloaded to the storage's cache once and every create after it is the steady-state
create (allocate host, storage, volume, NIC and IP; instantiate the root volume from the
cache; start on the hypervisor) that the scale issue will drive down. On LocalStorage each
of the 1,000 hosts would first fill its own cache, so a few thousand creates would measure
mostly first downloads. The host allocator uses the offering's default strategy (ZStack's
C{DefaultHostAllocatorStrategy}: first fit here); C{--strategy} changes it.

Hosts are pinged every hour instead of every minute (C{host.ping_interval}), so that the
create phases measure creates and not the pings of 1,000 hosts (about 17 agent calls per
second); everything else is the node's default configuration.

The profile classifies each function by the file it is defined in:
 - C{bus}: C{zcontrol/bus/}, C{txamqp/};
 - C{store}: C{zcontrol/db/}, C{sqlite3/}, C{psycopg2/}, C{twisted/enterprise/} (adbapi);
 - C{agent_http}: C{zcontrol/agentclient/}, C{treq/}, C{twisted/web/} (client, and the server
   of the agents' callbacks: the node serves no other HTTP yet), C{klein/}, C{agent/} (the
   command classes the node shares with the agent) but for C{agent/codec.py}, the wire codec
   of the bus and the agents alike, which takes its callers' classes (below);
 - C{rest}: every other C{zcontrol/} module (services, scheduler, core, journal), and this
   bench's driver loop;
 - any other function (the standard library, C{twisted/internet}, C{twisted/python},
   C{twisted/logger}, attrs, ...) takes the classes of its callers, weighted by the time it
   spent under each caller (a fixpoint over the profile's call graph); a function nobody
   profiled called (the reactor loop, a thread's entry) is C{rest}. So C{json} encoding the
   bus does counts as bus, a Deferred fired by the store as store, while the reactor's own
   socket reads and writes, which serve every connection at once, are C{rest}.
 C{cpu_split_flat}: the same without the inheritance (unclassified is C{rest}): what the
 inheritance moved is the difference.

Failures are counted (C{failed}) and the first one's error is reported (C{first_error});
after each phase the VMs C{Running} in the store are counted (C{running}) and the capacity
audit must find no drift (C{drift}).

Prints one JSON object as its last line and writes it to bench/results/vm.json.

    python -m bench.bench_vm [--vms 1000] [--profile-vms 200] [--concurrency 100]
                             [--hosts 1000] [--configs embedded,pg-amqp]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import psycopg2
from twisted.internet import defer, task
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import globalLogBeginner, textFileLogObserver

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RESULTS = os.path.join(RESULTS_DIR, "vm.json")
PG_ADMIN = os.environ.get("ZCONTROL_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_HOST, AMQP_PORT = "127.0.0.1", 5672
GiB = 1024**3
MiB = 1024**2
#: the image the agent "downloads" (virtual size, size on disk; the simulator reads them from
#: the URL's query)
IMAGE_SIZE, IMAGE_ACTUAL = 10 * GiB, 2 * GiB
#: the simulated NFS export (GiB): room for the root volumes of tens of thousands of VMs
NFS_GIB = 1024 * 1024
#: how many times a host whose AddHostMsg failed is added again
HOST_ATTEMPTS = 3
#: the bound of one setup message (seconds)
SETUP_TIMEOUT = 600.0
CLASSES = ("bus", "store", "agent_http", "rest")
#: (path fragment, class), first match wins; see the module docstring
RULES: tuple[tuple[str, str | None], ...] = (
    ("/zcontrol/bus/", "bus"),
    ("/txamqp/", "bus"),
    ("/zcontrol/db/", "store"),
    ("/sqlite3/", "store"),
    ("/psycopg2/", "store"),
    ("/twisted/enterprise/", "store"),
    ("/zcontrol/agentclient/", "agent_http"),
    ("/treq/", "agent_http"),
    ("/twisted/web/", "agent_http"),
    ("/klein/", "agent_http"),
    ("/agent/codec.py", None),  # the wire codec of the bus and the agents alike
    ("/agent/", "agent_http"),
    ("/zcontrol/", "rest"),
    ("/bench/", "rest"),
)


def classify(path: str) -> str | None:
    """
    The class of a function defined in file C{path}, or None (it takes its callers').
    """
    path = path.replace(os.sep, "/")
    for fragment, cls in RULES:
        if fragment in path:
            return cls
    return None


def split_profile(stats: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, float]]:
    """
    Split the own time of profiled functions between L{CLASSES}.

    @param stats: one dict per function: C{key} (unique), C{module} (its file), C{tsub} (own
        seconds) and C{parents}: C{[(caller key, seconds spent in the function, callees
        included, under that caller)]}.
    @return: C{(inherited, flat)}: seconds per class, unclassified functions taking their
        callers' classes weighted by the time under each caller (a fixpoint), or counted as
        C{rest}.
    """
    fixed = {s["key"]: classify(s["module"]) for s in stats}
    parents = {s["key"]: [(k, w) for k, w in s["parents"] if k in fixed and w > 0]
               for s in stats}
    rest = {c: float(c == "rest") for c in CLASSES}
    dist = {k: ({c: float(c == cls) for c in CLASSES} if cls else dict(rest))
            for k, cls in fixed.items()}
    free = [k for k, cls in fixed.items() if cls is None and parents[k]]
    for _ in range(200):
        moved = 0.0
        for k in free:
            total = sum(w for _, w in parents[k])
            new = {c: sum(w * dist[p][c] for p, w in parents[k]) / total for c in CLASSES}
            moved = max(moved, max(abs(new[c] - dist[k][c]) for c in CLASSES))
            dist[k] = new
        if moved < 1e-6:
            break
    inherited = {c: 0.0 for c in CLASSES}
    flat = {c: 0.0 for c in CLASSES}
    for s in stats:
        for c in CLASSES:
            inherited[c] += s["tsub"] * dist[s["key"]][c]
        flat[fixed[s["key"]] or "rest"] += s["tsub"]
    return inherited, flat


def pstats_functions(profile: Any) -> list[dict[str, Any]]:
    """
    The functions of a C{cProfile.Profile} in L{split_profile}'s form, plus C{name},
    C{line}, C{ttot} (cumulative seconds) and C{ncall}.
    """
    import pstats

    raw = pstats.Stats(profile).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
    return [{"key": func, "module": func[0], "line": func[1], "name": func[2], "tsub": tt,
             "ttot": ct, "ncall": nc,
             "parents": [(caller, edge[3]) for caller, edge in callers.items()]}
            for func, (cc, nc, tt, ct, callers) in raw.items()]


def thread_cpu() -> dict[int, float]:
    """
    User + system CPU seconds of each thread of this process, by native thread id.
    """
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _cpu_seconds(pid: int | None = None) -> float:
    """
    User + system CPU seconds of process C{pid} (this process, every thread, if None).
    """
    if pid is None:
        t = os.times()
        return t.user + t.system
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu(dbname: str | None) -> float:
    """
    User + system CPU seconds of the PostgreSQL backends serving database C{dbname} (their
    process titles name it), 0 when None.
    """
    if dbname is None:
        return 0.0
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().decode(errors="replace")
            if not title.startswith("postgres: ") or f" {dbname} " not in title:
                continue
            total += _cpu_seconds(int(pid))
        except (OSError, ValueError):  # gone meanwhile
            continue
    return total


def _die_with_parent() -> None:
    """
    In the agent's process, before it runs: SIGTERM when the bench dies (Linux), so that a
    bench killed mid-run leaves no agent behind.
    """
    import ctypes
    import signal

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_admin(sql: str) -> None:
    conn = psycopg2.connect(PG_ADMIN, connect_timeout=5)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(sql)
    finally:
        conn.close()


async def delete_exchanges(reactor: Any, prefix: str) -> None:
    """
    Delete what the AMQP bus declared under C{prefix} that outlives its nodes.
    """
    from txamqp.endpoint import AMQEndpoint
    from txamqp.factory import AMQFactory

    from zcontrol.bus._amqp_proto import spec_path
    from zcontrol.bus.amqp import Topology

    endpoint = AMQEndpoint(reactor, AMQP_HOST, AMQP_PORT, username="guest", password="guest",
                           timeout=10)
    client = await endpoint.connect(AMQFactory(spec=spec_path(), clock=reactor))
    try:
        ch = await client.channel(1)
        await ch.channel_open()
        topo = Topology(prefix)
        await ch.queue_delete(queue=topo.no_route_queue)
        for exchange in (topo.p2p, topo.broadcast, topo.no_route):
            await ch.exchange_delete(exchange=exchange)
    finally:
        await client.close(within=5)
        await client.disconnected.wait()


async def wait_listening(reactor: Any, port: int, proc: subprocess.Popen, bound: float) -> None:
    """
    Wait (at most C{bound} seconds) until something accepts connections on C{port}.
    """
    deadline = time.monotonic() + bound
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited with status {proc.returncode}")
        try:
            proto = await TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=1).connect(
                Factory.forProtocol(Protocol))
            proto.transport.loseConnection()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the agent did not listen on {port} within {bound}s") from None
            await task.deferLater(reactor, 0.1, lambda: None)


class Failures:
    """
    A count of failed sends and the first one's error (never dropped).
    """

    def __init__(self) -> None:
        self.count = 0
        self.first: str | None = None

    def add(self, what: str) -> None:
        self.count += 1
        if self.first is None:
            self.first = what
            print(f"  first failure: {what}", file=sys.stderr, flush=True)


async def bounded(reactor: Any, total: int, parallel: int,
                  one: Callable[[int], Any]) -> float:
    """
    Run C{await one(i)} for i in range(total), C{parallel} at a time; fire with the wall
    seconds it took.
    """
    start = time.perf_counter()
    state = {"next": 0}

    async def worker() -> None:
        while state["next"] < total:
            i = state["next"]
            state["next"] = i + 1
            await one(i)

    await defer.gatherResults([defer.Deferred.fromCoroutine(worker())
                               for _ in range(min(parallel, total))], consumeErrors=True)
    return time.perf_counter() - start


class Cloud:
    """
    One configuration: the agent process, the node, the inventory and the create phases.
    """

    def __init__(self, reactor: Any, args: argparse.Namespace, config_name: str):
        self.reactor = reactor
        self.args = args
        self.name = config_name
        self.tmp = tempfile.mkdtemp(prefix=f"zcontrol-bench-vm-{config_name}-")
        self.node: Any = None
        self.proc: subprocess.Popen | None = None
        self.pg_db: str | None = None
        self.prefix: str | None = None
        self.vm_seq = 0

    # --- plumbing ---------------------------------------------------------------------

    async def send(self, msg: Any, service_id: str, resource_uuid: str | None = None,
                   timeout: float = SETUP_TIMEOUT) -> Any:
        msg.service_id = service_id
        msg.resource_uuid = resource_uuid
        return await self.node.bus.send(msg, timeout)

    async def ok(self, msg: Any, service_id: str, resource_uuid: str | None = None) -> Any:
        reply = await self.send(msg, service_id, resource_uuid)
        if not reply.success:
            raise RuntimeError(f"{type(msg).__name__}: {reply.error}")
        return reply

    async def count(self, resource: str, *conditions: str) -> int:
        from zcontrol.services.inventory import QueryInventoryMsg

        reply = await self.ok(QueryInventoryMsg(resource=resource, conditions=list(conditions),
                                                count=True), "query")
        return reply.total

    def base(self, slot: int) -> str:
        from agent import protocol as p

        return p.host_base_url(self.agent_url, slot)

    async def start(self) -> None:
        from agent.bootstrap import ensure_token_file
        from zcontrol.config import load_config
        from zcontrol.node import make_node

        args = self.args
        token_file = os.path.join(self.tmp, "agent-token")
        token, _ = ensure_token_file(token_file)
        port = _free_port()
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.proc = subprocess.Popen(
            [twistd, "-n", "--pidfile=", f"--logfile={os.path.join(self.tmp, 'zagent.log')}",
             "zagent", "--port", str(port), "--hosts", str(args.hosts + 1),
             "--nfs-capacity", str(NFS_GIB), "--seed", "1",
             "--bootstrap-token-file", token_file], preexec_fn=_die_with_parent)
        self.agent_url = f"http://127.0.0.1:{port}"
        await wait_listening(self.reactor, port, self.proc, 30)

        overrides: dict[str, Any] = {
            "node": {"id": f"mn-bench-{secrets.token_hex(3)}",
                     "data_dir": os.path.join(self.tmp, "data")},
            "http": {"port": 0, "interface": "127.0.0.1"},
            "agents": {"bootstrap_token": token},
            "host": {"ping_interval": 3600.0},
        }
        if self.name == "pg-amqp":
            self.pg_db = f"zcontrol_bench_vm_{os.getpid()}_{secrets.token_hex(4)}"
            pg_admin(f'CREATE DATABASE "{self.pg_db}"')
            self.prefix = f"benchvm{secrets.token_hex(4)}."
            overrides["store"] = {"url": PG_ADMIN.rpartition("/")[0] + "/" + self.pg_db}
            overrides["bus"] = {"backend": "amqp", "prefix": self.prefix}
        os.makedirs(overrides["node"]["data_dir"])
        self.node = make_node(load_config(None, overrides), self.reactor)
        await self.node.startService()

    async def stop(self) -> None:
        try:
            if self.node is not None and self.node.running:
                await self.node.stopService()
        finally:
            if self.proc is not None:
                self.proc.terminate()
                try:
                    self.proc.wait(30)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(10)
            if self.prefix is not None:
                await delete_exchanges(self.reactor, self.prefix)
            if self.pg_db is not None:
                pg_admin(f'DROP DATABASE IF EXISTS "{self.pg_db}" WITH (FORCE)')
            if self.args.keep:
                print(f"  kept {self.tmp}", file=sys.stderr)
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)

    # --- the inventory ----------------------------------------------------------------

    async def setup(self) -> dict[str, Any]:
        from zcontrol.services.backupstorage.messages import (
            AddSftpBackupStorageMsg,
            AttachBackupStorageToZoneMsg,
        )
        from zcontrol.services.cluster.messages import CreateClusterMsg
        from zcontrol.services.host.messages import AddHostMsg
        from zcontrol.services.image.messages import AddImageMsg
        from zcontrol.services.network.messages import (
            AddIpRangeMsg,
            AttachL2NetworkToClusterMsg,
            CreateL2NoVlanNetworkMsg,
            CreateL3NetworkMsg,
        )
        from zcontrol.services.offering.messages import CreateInstanceOfferingMsg
        from zcontrol.services.primarystorage.messages import (
            AddNfsPrimaryStorageMsg,
            AttachPrimaryStorageToClusterMsg,
        )
        from zcontrol.services.zone.messages import CreateZoneMsg

        args = self.args
        out: dict[str, Any] = {}
        t0 = time.perf_counter()
        zone = (await self.ok(CreateZoneMsg(name="bench-zone"), "zone")).inventory["uuid"]
        clusters = [(await self.ok(CreateClusterMsg(
            zone_uuid=zone, name=f"bench-cluster-{i}", hypervisor_type="KVM"),
            "cluster")).inventory["uuid"] for i in range(args.clusters)]

        # the hosts, a bounded number in flight; an add that failed (the host removed
        # again, as ZStack does) is counted and sent again, up to HOST_ATTEMPTS times
        failures = Failures()
        per_cluster = -(-args.hosts // args.clusters)
        pending = list(range(args.hosts))

        async def add_host(k: int) -> None:
            i = pending[k]
            reply = await self.send(AddHostMsg(
                name=f"bench-host-{i}", zone_uuid=zone, cluster_uuid=clusters[i // per_cluster],
                management_ip=self.base(i)), "host")
            if not reply.success:
                failures.add(f"AddHostMsg {i}: {reply.error}")
                failed.append(i)

        cpu0, wall = _cpu_seconds(), 0.0
        for _ in range(HOST_ATTEMPTS):
            failed: list[int] = []
            wall += await bounded(self.reactor, len(pending), args.add_parallelism, add_host)
            pending = failed
            if not pending:
                break
        out["hosts_s"] = round(wall, 2)
        out["hosts_cpu_s"] = round(_cpu_seconds() - cpu0, 2)
        out["hosts_per_s"] = round(args.hosts / wall, 1)
        out["hosts_failed_adds"] = failures.count
        out["hosts_first_error"] = failures.first
        out["hosts_connected"] = await self.count("host", "status=Connected")
        print(f"  {out['hosts_connected']} hosts Connected in {out['hosts_s']} s "
              f"({failures.count} failed adds, sent again)", file=sys.stderr, flush=True)
        if out["hosts_connected"] != args.hosts:
            raise RuntimeError(f"{out['hosts_connected']} of {args.hosts} hosts connected "
                               f"after {HOST_ATTEMPTS} attempts; first error: {failures.first}")

        # NFS primary storage, mounted on every host by the attaches
        t1 = time.perf_counter()
        ps = (await self.ok(AddNfsPrimaryStorageMsg(
            name="bench-nfs", zone_uuid=zone, url=f"nfs.bench:/export/{secrets.token_hex(3)}"),
            "storage.primary")).inventory["uuid"]
        for c in clusters:
            await self.ok(AttachPrimaryStorageToClusterMsg(primary_storage_uuid=ps,
                                                           cluster_uuid=c),
                          "storage.primary", ps)
        out["attach_s"] = round(time.perf_counter() - t1, 2)
        out["nfs_mounts"] = await self.count("primaryStorageHostRef",
                                             f"primaryStorageUuid={ps}", "status=Connected")

        # backup storage and image
        bs = (await self.ok(AddSftpBackupStorageMsg(
            name="bench-sftp", url="/zstack_bs", hostname=self.base(args.hosts),
            password="unused"), "storage.backup")).inventory["uuid"]
        await self.ok(AttachBackupStorageToZoneMsg(backup_storage_uuid=bs, zone_uuid=zone),
                      "storage.backup", bs)
        self.image = (await self.ok(AddImageMsg(
            name="bench-image", url=f"http://images.bench/bench.qcow2?size={IMAGE_SIZE}"
            f"&actualSize={IMAGE_ACTUAL}", backup_storage_uuids=[bs]), "image")
        ).inventory["uuid"]

        # networks: L2 NoVlan on every cluster, L3 with a /16
        l2 = (await self.ok(CreateL2NoVlanNetworkMsg(name="bench-l2", zone_uuid=zone,
                                                     physical_interface="eth0"),
                            "network.l2")).inventory["uuid"]
        for c in clusters:
            await self.ok(AttachL2NetworkToClusterMsg(l2_network_uuid=l2, cluster_uuid=c),
                          "network.l2", l2)
        self.l3 = (await self.ok(CreateL3NetworkMsg(name="bench-l3", l2_network_uuid=l2),
                                 "network.l3")).inventory["uuid"]
        await self.ok(AddIpRangeMsg(l3_network_uuid=self.l3, name="bench-range",
                                    start_ip="10.0.0.2", end_ip="10.0.255.254",
                                    netmask="255.255.0.0", gateway="10.0.0.1"),
                      "network.l3", self.l3)

        self.offering = (await self.ok(CreateInstanceOfferingMsg(
            name="bench-tiny", cpu_num=1, memory_size=64 * MiB,
            allocator_strategy=args.strategy), "offering")).inventory["uuid"]
        out["setup_s"] = round(time.perf_counter() - t0, 2)
        return out

    # --- creates ----------------------------------------------------------------------

    def store_threads(self) -> set[int]:
        """
        The native ids of the store's pool threads (adbapi).
        """
        pool = getattr(getattr(self.node.store, "_pool", None), "threadpool", None)
        return {t.native_id for t in getattr(pool, "threads", [])}

    async def creates(self, n: int, concurrency: int) -> dict[str, Any]:
        """
        Create C{n} VMs, C{concurrency} in flight; the phase's figures.
        """
        from zcontrol.services.vm.messages import SERVICE_ID, CreateVmInstanceMsg

        failures = Failures()
        first = self.vm_seq
        self.vm_seq += n

        async def create(i: int) -> None:
            msg = CreateVmInstanceMsg(
                name=f"bench-vm-{first + i}", instance_offering_uuid=self.offering,
                image_uuid=self.image, l3_network_uuids=[self.l3])
            try:
                reply = await self.send(msg, SERVICE_ID, timeout=self.args.timeout)
            except Exception as e:  # a send that cannot be a message at all
                failures.add(f"CreateVmInstanceMsg raised {e!r}")
                return
            if not reply.success:
                failures.add(f"{reply.error}")

        pg0 = postgres_cpu(self.pg_db)  # outside the node's CPU window: it reads /proc
        threads0 = thread_cpu()
        cpu0, agent0 = _cpu_seconds(), _cpu_seconds(self.proc.pid)
        wall = await bounded(self.reactor, n, concurrency, create)
        cpu, agent_cpu = _cpu_seconds() - cpu0, _cpu_seconds(self.proc.pid) - agent0
        threads1 = thread_cpu()
        pg_cpu = postgres_cpu(self.pg_db) - pg0
        used = {t: c - threads0.get(t, 0.0) for t, c in threads1.items()}
        main = threading.main_thread().native_id
        store = self.store_threads()

        def ms(seconds: float) -> float:
            return round(1000 * seconds / n, 2)

        return {
            "n": n,
            "concurrency": concurrency,
            "wall_s": round(wall, 2),
            "vm_creates_per_s": round(n / wall, 1),
            "succeeded_per_s": round((n - failures.count) / wall, 1),
            "cpu_ms_per_vm": ms(cpu),
            "cpu_ms_per_vm_by_thread": {
                "reactor": ms(used.get(main, 0.0)),
                "store_pool": ms(sum(c for t, c in used.items() if t in store)),
                "other": ms(sum(c for t, c in used.items() if t != main and t not in store)),
            },
            "agent_cpu_ms_per_vm": ms(agent_cpu),
            **({"postgres_cpu_ms_per_vm": ms(pg_cpu)} if self.pg_db else {}),
            "failed": failures.count,
            "first_error": failures.first,
        }

    async def profiled_creates(self, n: int, concurrency: int, measured: dict[str, Any]
                               ) -> dict[str, Any]:
        """
        C{n} more creates with the reactor thread under cProfile (its CPU clock); the split of
        the node's CPU per VM of the C{measured} phase (see the module docstring).
        """
        import cProfile

        # The thread's CPU clock, though it makes cProfile several times slower than its
        # own wall clock: with a wall clock, every call that lets go of the GIL (a socket
        # send, os.urandom, waking a pool thread) is charged with the time the store's
        # threads then hold the GIL, which they are already measured for.
        profile = cProfile.Profile(time.thread_time)
        profile.enable()
        try:
            phase = await self.creates(n, concurrency)
        finally:
            profile.disable()
        funcs = pstats_functions(profile)
        inherited, flat = split_profile(funcs)
        total = sum(inherited.values()) or 1.0
        fraction = {c: inherited[c] / total for c in CLASSES}
        flat_fraction = {c: flat[c] / total for c in CLASSES}
        threads = measured["cpu_ms_per_vm_by_thread"]

        def split(frac: dict[str, float]) -> dict[str, float]:
            out = {c: frac[c] * threads["reactor"] for c in CLASSES}
            out["store"] += threads["store_pool"]
            out["rest"] += threads["other"]
            return {c: round(v, 2) for c in CLASSES for v in [out[c]]}

        ms_split = split(fraction)
        node_total = sum(ms_split.values()) or 1.0
        self.write_profile(funcs, phase, fraction)
        return {
            "profiled": phase,
            "cpu_split": ms_split,
            "cpu_split_fraction": {c: round(ms_split[c] / node_total, 3) for c in CLASSES},
            "cpu_split_flat": split(flat_fraction),
            "reactor_split_fraction": {c: round(fraction[c], 3) for c in CLASSES},
        }

    def write_profile(self, funcs: list[dict[str, Any]], phase: dict[str, Any],
                      fraction: dict[str, float]) -> None:
        path = os.path.join(RESULTS_DIR, f"vm_profile_{self.name}.txt")
        total = sum(f["tsub"] for f in funcs) or 1.0

        def line(f: dict[str, Any]) -> str:
            where = f"{f['module']}:{f['line']}"
            if len(where) > 60:
                where = "..." + where[-57:]
            return (f"{f['tsub']:8.3f} {100 * f['tsub'] / total:5.1f}% {f['ttot']:8.3f} "
                    f"{f['ncall']:8d}  {classify(f['module']) or '(callers)':10s} "
                    f"{f['name']}  {where}")

        head = "   own_s  own%    cum_s    calls  class      function  file:line\n"
        with open(path, "w") as out:
            out.write(f"bench-vm profile, configuration {self.name}: {phase['n']} creates, "
                      f"{phase['concurrency']} in flight; cProfile of the reactor thread, "
                      "its CPU clock (the store's pool threads are measured apart)\n")
            out.write(f"profiled CPU {total:.2f} s; reactor thread split (fractions, "
                      f"callers inherited): "
                      f"{json.dumps({c: round(v, 3) for c, v in fraction.items()})}\n\n")
            out.write("top 15 by own time\n" + head)
            for f in sorted(funcs, key=lambda f: -f["tsub"])[:15]:
                out.write(line(f) + "\n")
            out.write("\ntop 15 by cumulative time\n" + head)
            for f in sorted(funcs, key=lambda f: -f["ttot"])[:15]:
                out.write(line(f) + "\n")

    async def checks(self) -> dict[str, Any]:
        return {
            "running": await self.count("vmInstance", "state=Running"),
            "vms_in_store": await self.count("vmInstance"),
            "drift": len(await self.node.store.audit_capacity()),
        }


async def run_config(reactor: Any, args: argparse.Namespace, name: str) -> dict[str, Any]:
    cloud = Cloud(reactor, args, name)
    result: dict[str, Any] = {}
    try:
        print(f"{name}: starting the agent ({args.hosts} hosts) and the node", file=sys.stderr,
              flush=True)
        await cloud.start()
        result["setup"] = await cloud.setup()
        print(f"{name}: setup {json.dumps(result['setup'])}", file=sys.stderr, flush=True)
        if args.vms:
            phase = await cloud.creates(args.vms, args.concurrency)
            print(f"{name}: creates {json.dumps(phase)}", file=sys.stderr, flush=True)
            result.update(phase)
            if args.profile_vms:
                prof = await cloud.profiled_creates(args.profile_vms, args.concurrency, phase)
                print(f"{name}: profile {json.dumps(prof)}", file=sys.stderr, flush=True)
                result.update(prof)
                # every failed create counts, in either phase
                result["failed"] += prof["profiled"]["failed"]
                result["first_error"] = result["first_error"] or prof["profiled"]["first_error"]
            result.update(await cloud.checks())
    finally:
        await cloud.stop()
    return result


async def run(reactor: Any, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "bench": "vm",
        "hosts": args.hosts,
        "clusters": args.clusters,
        "primary_storage": "NFS",
        "allocator_strategy": args.strategy or "default (first fit)",
        "agent_process": "twistd -n zagent (separate process, zero latency)",
        "cpu_split_unit": "cpu_split: ms of the node's CPU per VM in the measured phase (the "
                          "reactor thread's by the profile's fractions, the store pool "
                          "threads' as store); cpu_split_fraction: the same as fractions",
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        # other work on the machine slows the rates down (not the CPU per VM)
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    for name in args.configs:
        try:
            result[name] = await run_config(reactor, args, name)
        except Exception as e:  # reported, and the other configurations still run
            print(f"{name}: FAILED {e!r}", file=sys.stderr, flush=True)
            result[name] = {"error": repr(e)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=1000, help="VMs created and measured")
    parser.add_argument("--profile-vms", type=int, default=200,
                        help="VMs created after them under the profiler (0: no profile)")
    parser.add_argument("--concurrency", type=int, default=100, help="creates in flight")
    parser.add_argument("--hosts", type=int, default=1000, help="simulated KVM hosts")
    parser.add_argument("--clusters", type=int, default=10, help="clusters the hosts are in")
    parser.add_argument("--add-parallelism", type=int, default=20,
                        help="AddHostMsg in flight during the setup (more only queues in the "
                        "node, whose host connect bounds its agent echo at 5 s)")
    parser.add_argument("--strategy", default=None,
                        help="the offering's allocatorStrategy (default: the default)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="bound of one create's send, seconds")
    parser.add_argument("--configs", default="embedded,pg-amqp",
                        help="comma-separated: embedded (SQLite + LocalBus), "
                             "pg-amqp (PostgreSQL + RabbitMQ)")
    parser.add_argument("--keep", action="store_true",
                        help="keep each configuration's temp dir (node data, agent log)")
    args = parser.parse_args()
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(args.configs) - {"embedded", "pg-amqp"}
    if unknown:
        parser.error(f"unknown configuration(s) {sorted(unknown)}")
    os.makedirs(RESULTS_DIR, exist_ok=True)
    # The node logs as under twistd, to a file (its CPU is the node's); kept when a create
    # failed, removed otherwise.
    log_fd, log_path = tempfile.mkstemp(prefix="zcontrol-bench-vm-", suffix=".log")
    log_file = os.fdopen(log_fd, "w")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)],
                                     redirectStandardIO=False)

    def go(reactor: Any) -> defer.Deferred:
        async def body() -> None:
            out = await run(reactor, args)
            failed = sum(out[c].get("failed", 0) for c in args.configs)
            errors = [c for c in args.configs if "error" in out[c]]
            if failed or errors or args.keep:
                out["node_log"] = log_path
            else:
                os.unlink(log_path)
            with open(RESULTS, "w") as f:
                json.dump(out, f, indent=2, sort_keys=True)
            print(json.dumps(out, sort_keys=True), flush=True)
            if errors:
                raise SystemExit(f"bench-vm: configuration(s) {errors} failed (see above)")

        return defer.Deferred.fromCoroutine(body())

    task.react(go)


if __name__ == "__main__":
    main()
