"""
A real management node killed with SIGKILL in the middle of a batch of creates, and
restarted (issue 10, "Tests": "one test that kills a real C{twistd zcontrol} process with
SIGKILL mid-batch and restarts it").

Three processes: C{twistd zagent} (simulated hosts, LocalStorage and an Sftp backup storage,
with latencies so that creates take a while), C{twistd zcontrol} on PostgreSQL (a scratch
database) and RabbitMQ (a random bus prefix), and this test, which drives the node as the
REST API will: bus messages over AMQP (a client bus on the same prefix that is no member of
the ring: every request goes to the node), and reads the store directly.

The scenario: build the inventory, send a batch of C{CreateVmInstanceMsg}, watch the jobs
table until some creates are under way (jobs Running with flows recorded) and some are done,
SIGKILL the node, check that the kill left jobs Running, restart the node (same node id),
wait (bounded) until its start has resolved every job, then check: no job Running, every VM
in a final state, and the audit (L{tests.vm_audit}) clean against the store and the agent
process (its VMs through C{/vm/vmsync} and its local disks' use through
C{/localstorage/getphysicalcapacity}, both sent through the node's host service).

Slow: three processes, a crash and a restart: 11 s of CPU in this process, 90 s of wall
time measured on a machine with a load average of 20 (each wait is bounded by TIMEOUT). Fails
(never skips) without RabbitMQ or PostgreSQL.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import sys
import uuid as uuidlib
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.trial.unittest import TestCase

from agent import protocol as p
from tests.db_support import pg_create_database_sync, pg_drop_database_sync, pg_dsn
from tests.vm_audit import audit
from zcontrol.bus.amqp import AMQPBus
from zcontrol.db import open_store
from zcontrol.db.query import Query
from zcontrol.services.backupstorage.messages import SERVICE_ID as BACKUP
from zcontrol.services.backupstorage.messages import (
    AddSftpBackupStorageMsg,
    AttachBackupStorageToZoneMsg,
)
from zcontrol.services.cluster.messages import SERVICE_ID as CLUSTER_SERVICE
from zcontrol.services.cluster.messages import CreateClusterMsg
from zcontrol.services.host.messages import SERVICE_ID as HOST_SERVICE
from zcontrol.services.host.messages import AddHostMsg, KVMHostAsyncHttpCallMsg
from zcontrol.services.image.messages import SERVICE_ID as IMAGE_SERVICE
from zcontrol.services.image.messages import AddImageMsg
from zcontrol.services.network.messages import (
    L2_SERVICE_ID,
    L3_SERVICE_ID,
    AddIpRangeMsg,
    AttachL2NetworkToClusterMsg,
    CreateL2NoVlanNetworkMsg,
    CreateL3NetworkMsg,
)
from zcontrol.services.offering.messages import SERVICE_ID as OFFERING_SERVICE
from zcontrol.services.offering.messages import CreateInstanceOfferingMsg
from zcontrol.services.primarystorage.messages import SERVICE_ID as PRIMARY
from zcontrol.services.primarystorage.messages import (
    AddLocalPrimaryStorageMsg,
    AttachPrimaryStorageToClusterMsg,
)
from zcontrol.services.vm.messages import SERVICE_ID as VM_SERVICE
from zcontrol.services.vm.messages import CreateVmInstanceMsg
from zcontrol.services.vm.states import FINAL_STATES
from zcontrol.services.zone.messages import SERVICE_ID as ZONE_SERVICE
from zcontrol.services.zone.messages import CreateZoneMsg

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
GiB = 1024**3
#: hosts of the agent process: KVM hosts in slots 0..HOSTS-1, the Sftp backup storage next
HOSTS = 3
BS_SLOT = HOSTS
#: creates in the batch
BATCH = 24
#: the bound of one setup message, and of each wait of the test (seconds)
TIMEOUT = 60
#: agent latencies (seconds): a create spends about 1 s on the agent
LATENCY = {"/localstorage/volume/createvolumefromcache": "const:0.3",
           "/vm/start": "const:0.6"}
LOCAL_URL = "/zstack_ps_kill"


class Twistd(ProcessProtocol):
    """
    A C{twistd -n} child: its output appended to a log file (kept in the test's temp
    directory), C{ready} fired with the first match of C{marker} in it, C{ended} with the
    exit status or signal when it ends.
    """

    def __init__(self, name: str, log_path: str, marker: bytes):
        self.name = name
        self.log = open(log_path, "ab")  # noqa: SIM115 - closed when the process ends
        self.marker = re.compile(marker)
        self.buffer = b""
        self.ready: defer.Deferred = defer.Deferred()
        self.ended: defer.Deferred = defer.Deferred()
        self.status: Any = None

    def outReceived(self, data: bytes) -> None:
        self.log.write(data)
        self.log.flush()
        if not self.ready.called:
            self.buffer += data
            m = self.marker.search(self.buffer)
            if m is not None:
                self.buffer = b""
                self.ready.callback(m)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.log.close()
        self.status = (reason.value.exitCode, reason.value.signal)
        if not self.ready.called:
            self.ready.errback(AssertionError(
                f"{self.name} ended (status {self.status}) before it was ready;"
                f" see {self.log.name}"))
        self.ended.callback(self.status)

    def running(self) -> bool:
        return self.status is None

    def kill(self, sig: str) -> defer.Deferred:
        """
        Send C{sig} (C{"KILL"}, C{"TERM"}) and fire once the process ended (bounded).
        """
        if self.running():
            self.transport.signalProcess(sig)
        return _bounded(self.ended, f"{self.name} to end after SIG{sig}")


def _bounded(d: defer.Deferred, what: str, timeout: float = TIMEOUT) -> defer.Deferred:
    def timed_out(f: Any) -> Any:
        if f.check(defer.TimeoutError, defer.CancelledError):
            raise AssertionError(f"waited {timeout} s for {what}")
        return f

    return d.addTimeout(timeout, reactor).addErrback(timed_out)


class ClientBus(AMQPBus):
    """
    The test's AMQP bus: no member of the ring (it sends no heartbeat), every request goes
    to the one management node C{target}.
    """

    target: str = ""

    def _target(self, msg: Any) -> str:
        return self.target


def poll(check: Any, what: str, interval: float = 0.05, timeout: float = TIMEOUT
         ) -> defer.Deferred:
    """
    Fire with the first true result of C{check()} (a coroutine function), tried every
    C{interval} seconds on the reactor; fail after C{timeout} seconds naming C{what}.
    """
    done: defer.Deferred = defer.Deferred()
    busy: list[bool] = []

    def tick() -> None:
        if busy or done.called:
            return
        busy.append(True)
        d = defer.Deferred.fromCoroutine(check())

        def checked(result: Any) -> None:
            busy.clear()
            if result and not done.called:
                done.callback(result)

        def failed(f: Any) -> None:
            busy.clear()
            if not done.called:
                done.errback(f)

        d.addCallbacks(checked, failed)

    loop = LoopingCall(tick)
    loop.clock = reactor
    loop.start(interval)

    def stop(result: Any) -> Any:
        if loop.running:
            loop.stop()
        return result

    return _bounded(done, what, timeout).addBoth(stop)


class SigkillTests(TestCase):
    """
    SIGKILL of a real management node mid-batch, and its restart.
    """

    timeout = 300

    async def test_sigkill_mid_batch_and_restart(self) -> None:
        """
        After a SIGKILL in the middle of a batch of creates and a restart, every job is
        resolved, every VM is in a final state and nothing taken is leaked, on the store
        or on the agent.
        """
        await self.start_all()
        inv = await self.build_inventory()

        # the batch: each reply recorded when it comes (the killed node's never come: the
        # client bus fails them when it stops)
        replies: dict[str, Any] = {}
        vm_uuids = [uuidlib.uuid4().hex for _ in range(BATCH)]
        batch = set(vm_uuids)
        for i, vm in enumerate(vm_uuids):
            d = self.send(CreateVmInstanceMsg(
                name=f"kill-{i}", instance_offering_uuid=inv["offering"],
                image_uuid=inv["image"], l3_network_uuids=[inv["l3"]], uuid=vm),
                VM_SERVICE, vm, timeout=TIMEOUT)
            d.addBoth(lambda r, vm=vm: replies.__setitem__(vm, r))

        # kill once some creates are under way and some are done
        async def mid_batch() -> Any:
            jobs = [j for j in await self.rows("job") if j["resourceUuid"] in batch]
            running = [j for j in jobs if j["state"] == "Running" and j.get("flows")]
            done = [j for j in jobs if j["state"] != "Running"]
            return len(running) >= 3 and len(done) >= 1 and jobs

        await poll(mid_batch, "some creates under way and some done")
        await self.node.kill("KILL")
        self.assertEqual(self.node.status[1], signal.SIGKILL)
        at_kill = [j for j in await self.rows("job") if j["resourceUuid"] in batch]
        left = [j for j in at_kill if j["state"] == "Running"]
        self.assertTrue(left, "the kill left no job Running: it tested nothing")
        self.assertTrue([j for j in at_kill if j["state"] == "Succeeded"], "none done")
        intermediate = [v for v in await self.rows("vmInstance")
                        if v["state"] not in FINAL_STATES]
        # (the VMs of the jobs left Running are usually Starting: recorded for the report)
        self.left_at_kill = (len(left), len(intermediate))

        # restart: the node resolves its jobs at start
        self.node = await self.start_node("node-2")

        async def connected() -> bool:
            return all(h["status"] == "Connected" for h in await self.rows("host"))

        await poll(connected, "the restarted node to reconnect its hosts")

        async def resolved() -> bool:
            jobs = await self.rows("job")
            vms = await self.rows("vmInstance")
            return (not [j for j in jobs if j["state"] == "Running"]
                    and not [v for v in vms if v["state"] not in FINAL_STATES])

        await poll(resolved, "the restarted node to resolve every job", interval=0.2)

        jobs = await self.rows("job")
        self.assertEqual([j["uuid"] for j in jobs if j["state"] == "Running"], [])
        for j in jobs:
            if j["uuid"] in {x["uuid"] for x in left}:
                self.assertIn(j["state"], ("Succeeded", "Failed"), j)
        vms = await self.rows("vmInstance")
        self.assertEqual([(v["uuid"], v["state"]) for v in vms
                          if v["state"] not in FINAL_STATES], [])
        self.assertGreater(len([v for v in vms if v["state"] == "Running"]), 0)
        agent_vms, disk_used = await self.agent_view(inv["hosts"])
        self.assertEqual(await audit(self.store, agent_vms=agent_vms,
                                     agent_local_used=disk_used), [])

    # --- processes ------------------------------------------------------------------------

    async def start_all(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.db = await threads.deferToThread(pg_create_database_sync)
        self.addCleanup(threads.deferToThread, pg_drop_database_sync, self.db)
        self.prefix = f"kill{secrets.token_hex(5)}."
        self.addCleanup(self.delete_exchanges)
        self.node_id = f"mn-kill-{secrets.token_hex(3)}"
        token = secrets.token_hex(16)
        self.config = os.path.join(self.dir, "zcontrol.toml")
        with open(self.config, "w") as f:
            f.write(f"""
[node]
id = "{self.node_id}"
data_dir = "{self.dir}/data"
[store]
url = "{pg_dsn(self.db)}"
[bus]
backend = "amqp"
prefix = "{self.prefix}"
[http]
port = 0
interface = "127.0.0.1"
[agents]
bootstrap_token = "{token}"
[host]
# commands to one host two at a time: the batch completes in waves, so that the kill
# finds creates done and creates under way
host_sync_level = 2
[vm]
probe_timeout = 10.0
rollback_timeout = 30.0
command_timeout = 30.0
recovery_interval = 1.0
""")
        args = ["zagent", "--port", "0", "--hosts", str(HOSTS + 1), "--bootstrap-token", token,
                "--seed", "1", "--callback-attempts", "3"]
        for path, dist in LATENCY.items():
            args += ["--latency", f"{path}={dist}"]
        self.agent = self.spawn("agent", args, rb"QuietSite starting on (\d+)")
        port = int((await _bounded(self.agent.ready, "the agent to listen")).group(1))
        self.agent_url = f"http://127.0.0.1:{port}"
        self.node = await self.start_node("node-1")
        self.client = ClientBus(reactor, reactor, node_id=f"test-{secrets.token_hex(3)}",
                                prefix=self.prefix, heartbeat_interval=None,
                                connection_name="zcontrol-test-sigkill")
        self.client.target = self.node_id
        await self.client.start()
        self.addCleanup(self.client.stop)
        self.store = open_store(pg_dsn(self.db), reactor, pool_size=2)
        await self.store.start()
        self.addCleanup(self.store.stop)

    def spawn(self, name: str, args: list[str], marker: bytes) -> Twistd:
        proto = Twistd(name, os.path.join(self.dir, f"{name}.log"), marker)
        reactor.spawnProcess(proto, TWISTD, [TWISTD, "-n", "--pidfile=", *args],
                             env=os.environ.copy(), path=self.dir)
        self.addCleanup(lambda: proto.kill("TERM") if proto.running() else None)
        return proto

    async def start_node(self, name: str) -> Twistd:
        node = self.spawn(name, ["zcontrol", "--config", self.config],
                          rb"inventory services up")
        await _bounded(node.ready, f"{name} to start")
        return node

    async def delete_exchanges(self) -> None:
        from tests.test_bus_amqp import Admin
        from zcontrol.bus.amqp import Topology

        admin = await Admin.connect()
        try:
            topo = Topology(self.prefix)
            await admin.ch.queue_delete(queue=topo.no_route_queue)
            for exchange in (topo.p2p, topo.broadcast, topo.no_route):
                await admin.ch.exchange_delete(exchange=exchange)
        finally:
            await admin.close()

    # --- messages and rows ------------------------------------------------------------------

    def send(self, msg: Any, service_id: str, resource_uuid: str | None = None,
             timeout: float = TIMEOUT) -> defer.Deferred:
        msg.service_id = service_id
        msg.resource_uuid = resource_uuid or uuidlib.uuid4().hex
        return self.client.send(msg, timeout)

    async def ok(self, msg: Any, service_id: str, resource_uuid: str | None = None) -> Any:
        reply = await self.send(msg, service_id, resource_uuid)
        self.assertTrue(reply.success, f"{type(msg).__name__}: {reply.error}")
        return reply

    async def rows(self, resource: str) -> list[dict]:
        return (await self.store.query(resource, Query(limit=10_000))).inventories

    async def build_inventory(self) -> dict[str, Any]:
        """
        Zone, cluster, HOSTS hosts, LocalStorage, Sftp backup storage with an image, an
        instance offering, an L2/L3 with a range.
        """
        z = (await self.ok(CreateZoneMsg(name="z"), ZONE_SERVICE)).inventory["uuid"]
        c = (await self.ok(CreateClusterMsg(zone_uuid=z, name="c", hypervisor_type="KVM"),
                           CLUSTER_SERVICE)).inventory["uuid"]
        hosts = []
        for slot in range(HOSTS):
            h = uuidlib.uuid4().hex
            await self.ok(AddHostMsg(uuid=h, name=f"h{slot}", zone_uuid=z, cluster_uuid=c,
                                     management_ip=p.host_base_url(self.agent_url, slot)),
                          HOST_SERVICE, h)
            hosts.append(h)
        ls = uuidlib.uuid4().hex
        await self.ok(AddLocalPrimaryStorageMsg(uuid=ls, name="local", zone_uuid=z,
                                                url=LOCAL_URL), PRIMARY, ls)
        await self.ok(AttachPrimaryStorageToClusterMsg(primary_storage_uuid=ls,
                                                       cluster_uuid=c), PRIMARY, ls)
        bs = uuidlib.uuid4().hex
        await self.ok(AddSftpBackupStorageMsg(uuid=bs, name="bs", url="/zstack_bs",
                                              hostname=p.host_base_url(self.agent_url, BS_SLOT),
                                              password="password"), BACKUP, bs)
        await self.ok(AttachBackupStorageToZoneMsg(backup_storage_uuid=bs, zone_uuid=z),
                      BACKUP, bs)
        img = uuidlib.uuid4().hex
        image = (await self.ok(AddImageMsg(
            uuid=img, name="img", url=f"http://images.example/k.qcow2?size={4 * GiB}"
            f"&actualSize={GiB}", backup_storage_uuids=[bs]), IMAGE_SERVICE, img)).inventory
        self.assertEqual(image["status"], "Ready")
        offering = (await self.ok(CreateInstanceOfferingMsg(
            name="small", cpu_num=1, memory_size=GiB, cpu_speed=1000),
            OFFERING_SERVICE)).inventory["uuid"]
        l2 = (await self.ok(CreateL2NoVlanNetworkMsg(name="l2", zone_uuid=z,
                                                     physical_interface="eth0"),
                            L2_SERVICE_ID)).inventory["uuid"]
        await self.ok(AttachL2NetworkToClusterMsg(l2_network_uuid=l2, cluster_uuid=c),
                      L2_SERVICE_ID, l2)
        l3 = (await self.ok(CreateL3NetworkMsg(name="l3", l2_network_uuid=l2),
                            L3_SERVICE_ID)).inventory["uuid"]
        await self.ok(AddIpRangeMsg(l3_network_uuid=l3, name="r", start_ip="10.0.0.10",
                                    end_ip="10.0.0.250", netmask="255.255.255.0",
                                    gateway="10.0.0.1"), L3_SERVICE_ID, l3)
        return {"zone": z, "cluster": c, "hosts": hosts, "ps": ls, "image": img,
                "offering": offering, "l3": l3}

    async def agent_view(self, hosts: list[str]) -> tuple[dict, dict]:
        """
        Each host's VMs (C{/vm/vmsync}) and the bytes used on its local disk
        (C{/localstorage/getphysicalcapacity}), as the agent process reports them, asked
        through the node's host service.
        """
        vms: dict[str, dict[str, str]] = {}
        used: dict[str, int] = {}
        for h in hosts:
            rsp = await self.host_call(h, p.VmSyncCmd())
            vms[h] = dict(rsp.states)
            cap = await self.host_call(h, p.LocalStorageGetPhysicalCapacityCmd(
                storage_path=LOCAL_URL))
            used[h] = cap.total_capacity - cap.available_capacity
        return vms, used

    async def host_call(self, host: str, cmd: Any) -> Any:
        path = p.command_for(cmd).path
        reply = await self.ok(KVMHostAsyncHttpCallMsg(host_uuid=host, path=path,
                                                      command=cmd.to_dict(),
                                                      command_timeout=30),
                              HOST_SERVICE, host)
        rsp = p.COMMANDS[path].rsp_type.from_dict(reply.response)
        self.assertTrue(rsp.success, f"{path} on {host}: {rsp.error}")
        return rsp
