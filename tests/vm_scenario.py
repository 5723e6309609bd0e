"""
A cloud ready for VMs, for the VM tests: a whole management node (L{make_node}) and a real
simulated agent over loopback HTTP, with a zone, a cluster, KVM hosts, NFS and LocalStorage
primary storage, an Sftp backup storage with a Ready image, an instance offering, a disk
offering and an L2/L3 network with an address range, all made through the services' bus
messages.

Use it as a mixin before L{tests.test_agent_loopback.LoopbackTestCase}, with one of
L{EmbeddedBackends} or L{RabbitPostgresBackends}::

    class EmbeddedVmTests(MyScenario, EmbeddedBackends, LoopbackTestCase): ...

then C{await self.build_cloud()} in a test, and C{self.cloud} holds the uuids.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import attrs
from twisted.internet import defer, reactor, threads

from agent.console import ConsolePlugin
from agent.hypervisor.simulator import GiB
from agent.kvm import KvmPlugin
from agent.sftpbackupstorage import SftpBackupStoragePlugin
from agent.storage import StoragePlugin
from agent.vrouter import VRouterPlugin
from tests.db_support import pg_create_database_sync, pg_drop_database_sync, pg_dsn
from zcontrol.config import load_config
from zcontrol.db.query import Query
from zcontrol.node import make_node
from zcontrol.services.backupstorage.messages import SERVICE_ID as BACKUP
from zcontrol.services.backupstorage.messages import (
    AddSftpBackupStorageMsg,
    AttachBackupStorageToZoneMsg,
)
from zcontrol.services.cluster.messages import SERVICE_ID as CLUSTER_SERVICE
from zcontrol.services.cluster.messages import CreateClusterMsg
from zcontrol.services.host.messages import SERVICE_ID as HOST_SERVICE
from zcontrol.services.host.messages import AddHostMsg
from zcontrol.services.image.messages import SERVICE_ID as IMAGE_SERVICE
from zcontrol.services.image.messages import AddImageMsg
from zcontrol.services.inventory import QueryInventoryMsg
from zcontrol.services.network.messages import (
    L2_SERVICE_ID,
    L3_SERVICE_ID,
    AddIpRangeMsg,
    AttachL2NetworkToClusterMsg,
    CreateL2NoVlanNetworkMsg,
    CreateL3NetworkMsg,
)
from zcontrol.services.offering.messages import SERVICE_ID as OFFERING_SERVICE
from zcontrol.services.offering.messages import CreateDiskOfferingMsg, CreateInstanceOfferingMsg
from zcontrol.services.primarystorage.messages import SERVICE_ID as PRIMARY
from zcontrol.services.primarystorage.messages import (
    AddLocalPrimaryStorageMsg,
    AddNfsPrimaryStorageMsg,
    AttachPrimaryStorageToClusterMsg,
)
from zcontrol.services.vm.messages import SERVICE_ID as VM_SERVICE
from zcontrol.services.vm.messages import CreateVmInstanceMsg
from zcontrol.services.zone.messages import SERVICE_ID as ZONE_SERVICE
from zcontrol.services.zone.messages import CreateZoneMsg

#: the image's virtual size and its size on disk (bytes)
IMAGE_SIZE, IMAGE_ACTUAL = 10 * GiB, 2 * GiB
#: one send's bound (seconds): a lost reply fails the test instead of hanging it
TIMEOUT = 60
#: the agent slot of the Sftp backup storage (hosts use slots 1..n)
BS_SLOT = 0


@attrs.define
class Cloud:
    """
    The uuids of what L{CloudScenario.build_cloud} made.
    """

    zone: str
    cluster: str
    hosts: list[str]
    slots: dict[str, int]
    nfs: str | None
    local: str | None
    backup: str
    image: str
    offering: str
    disk_offering: str
    l2: str
    l3: str


class CloudScenario:
    """
    The plumbing and the cloud (see the module docstring).

    @cvar cloud_hosts: how many KVM hosts (agent slots 1..n).
    @cvar storage: C{"nfs"}, C{"local"} or C{"both"} (the primary storage made).
    @cvar offering_cpu: CPUs of the instance offering; C{offering_memory} bytes.
    @cvar node_config: extra configuration of the node (C{{"vm": {...}}}).
    """

    cloud_hosts = 2
    storage = "nfs"
    offering_cpu = 1
    offering_memory = 1 * GiB
    node_config: dict[str, dict[str, Any]] = {}
    host_count = 8

    def agent_plugins(self) -> list[Any]:
        return [KvmPlugin(), ConsolePlugin(), VRouterPlugin(), StoragePlugin(),
                SftpBackupStoragePlugin()]

    # --- plumbing ---------------------------------------------------------------------

    async def start_node(self, node_id: str | None = None, data_dir: str | None = None
                         ) -> Any:
        """
        Build and start a node (a second call builds a new node on the same store and bus
        configuration: a restart).
        """
        if not hasattr(self, "_overrides"):
            self._overrides = await self.node_overrides()
            self._node_id = f"mn-vm-{secrets.token_hex(3)}"
            self._data_dir = os.path.abspath(self.mktemp())
        overrides: dict[str, dict[str, Any]] = {
            "node": {"id": node_id or self._node_id, "data_dir": data_dir or self._data_dir},
            "http": {"port": 0, "interface": "127.0.0.1"}}
        for section, values in list(self._overrides.items()) + list(self.node_config.items()):
            overrides.setdefault(section, {}).update(values)
        node = make_node(load_config(None, overrides), reactor)
        self.addCleanup(lambda: node.running and node.stopService())
        await node.startService()
        self.node = node
        inventory = [s for s in node if s.name == "inventory"][0]
        self.services = {s.service_id: s for s in inventory.services}
        self.vm_service = self.services[VM_SERVICE]
        await self.vm_service.recovered
        return node

    async def send(self, msg: Any, service_id: str, resource_uuid: str | None = None) -> Any:
        msg.service_id = service_id
        msg.resource_uuid = resource_uuid
        return await self.node.bus.send(msg, TIMEOUT)

    async def ok(self, msg: Any, service_id: str, resource_uuid: str | None = None) -> Any:
        reply = await self.send(msg, service_id, resource_uuid)
        self.assertTrue(reply.success, f"{type(msg).__name__}: {reply.error}")
        return reply

    async def refused(self, msg: Any, service_id: str, resource_uuid: str | None,
                      code: str, *named: str) -> Any:
        """
        C{msg} fails with C{code} (at the top of the error or anywhere in its cause chain
        when C{code} starts with C{"~"}), and the error names each of C{named}.
        """
        reply = await self.send(msg, service_id, resource_uuid)
        self.assertFalse(reply.success, f"{type(msg).__name__} was not refused")
        if code.startswith("~"):
            self.assertIn(code[1:], codes_of(reply.error), reply.error)
        else:
            self.assertEqual(reply.error.code, code, reply.error)
        said = repr(reply.error.to_dict())
        for name in named:
            self.assertIn(name, said)
        return reply.error

    async def vm(self, msg: Any, resource_uuid: str | None = None) -> Any:
        """
        Send a VM message (routed by C{resource_uuid}) and return its reply, successful.
        """
        return await self.ok(msg, VM_SERVICE, resource_uuid)

    async def query(self, resource: str, *conditions: str) -> list[dict[str, Any]]:
        reply = await self.ok(QueryInventoryMsg(resource=resource, conditions=list(conditions)),
                              "query")
        return reply.inventories

    async def rows(self, resource: str, **equal: Any) -> list[dict[str, Any]]:
        """
        The store's rows of C{resource} (every one; C{equal} filters in Python).
        """
        page = await self.node.store.query(resource, Query(limit=100_000))
        return [r for r in page.inventories
                if all(r.get(k) == v for k, v in equal.items())]

    async def no_drift(self) -> None:
        self.assertEqual(await self.node.store.audit_capacity(), [])

    def running_on_agents(self) -> dict[str, str]:
        """
        VM uuid -> host uuid of every VM Running on a simulated host of the cloud.
        """
        out = {}
        for host, slot in self.cloud.slots.items():
            hv = self.simulated.hypervisor(str(slot))
            for vm, state in (hv.vms.items() if hv else ()):
                if state.state == "Running":
                    self.assertNotIn(vm, out, f"VM {vm} runs on two hosts")
                    out[vm] = host
        return out

    async def consistent(self) -> None:
        """
        The invariants at rest of L{zcontrol.services.vm.base}, the capacity audit and the
        agents agreeing with the store.
        """
        await self.no_drift()
        vms = await self.rows("vmInstance")
        self.assertEqual([j["uuid"] for j in await self.rows("job", state="Running")], [])
        running = {v["uuid"]: v["hostUuid"] for v in vms if v["state"] == "Running"}
        self.assertEqual(self.running_on_agents(), running)
        for v in vms:
            held = await self.node.store.holder_reservations(("VmInstanceVO", v["uuid"]))
            if v["state"] in ("Running", "Paused", "Unknown", "Crashed"):
                self.assertEqual(held, [(v["hostUuid"], v["cpuNum"], v["memorySize"])], v)
            else:
                self.assertEqual((v["state"], v["hostUuid"], held), (v["state"], None, []))
        nics = await self.rows("vmNic")
        by_vm = {v["uuid"]: v for v in vms}
        used = {(u["holderType"], u["holderUuid"]): u for u in await self.rows("usedIp")
                if u.get("holderType") == "VmNicVO"}
        for n in nics:
            vm = by_vm[n["vmInstanceUuid"]]
            u = used.pop(("VmNicVO", n["uuid"]), None)
            if vm["state"] == "Destroyed":
                self.assertEqual((n["usedIpUuid"], n["ip"], u), (None, None, None), n)
            elif u is None:
                self.assertNotIn(vm["state"], ("Running", "Paused", "Unknown", "Crashed"),
                                 f"NIC {n['uuid']} of a VM on a host holds no address")
                self.assertEqual((n["usedIpUuid"], n["ip"]), (None, None), n)
            else:
                self.assertEqual((u["uuid"], u["ip"]), (n["usedIpUuid"], n["ip"]))
        self.assertEqual(used, {}, "addresses held by no NIC")

    # --- the cloud --------------------------------------------------------------------

    async def build_cloud(self) -> Cloud:
        """
        Start the node and make the cloud (see the module docstring); C{self.cloud}.
        """
        await self.start_node()
        zone = (await self.ok(CreateZoneMsg(name="zone-vm"), ZONE_SERVICE)).inventory["uuid"]
        cluster = (await self.ok(CreateClusterMsg(zone_uuid=zone, name="cluster-vm",
                                                  hypervisor_type="KVM"),
                                 CLUSTER_SERVICE)).inventory["uuid"]
        hosts, slots = [], {}
        for slot in range(1, self.cloud_hosts + 1):
            host = (await self.ok(AddHostMsg(name=f"host-{slot}", zone_uuid=zone,
                                             cluster_uuid=cluster,
                                             management_ip=self.base(slot)),
                                  HOST_SERVICE)).inventory["uuid"]
            hosts.append(host)
            slots[host] = slot
        nfs = local = None
        if self.storage in ("nfs", "both"):
            nfs = (await self.ok(AddNfsPrimaryStorageMsg(
                name="nfs", zone_uuid=zone, url=f"nfs.example:/export/vm-{secrets.token_hex(3)}"),
                PRIMARY)).inventory["uuid"]
            await self.ok(AttachPrimaryStorageToClusterMsg(primary_storage_uuid=nfs,
                                                           cluster_uuid=cluster), PRIMARY, nfs)
        if self.storage in ("local", "both"):
            local = (await self.ok(AddLocalPrimaryStorageMsg(name="local", zone_uuid=zone,
                                                             url="/zstack_ps"),
                                   PRIMARY)).inventory["uuid"]
            await self.ok(AttachPrimaryStorageToClusterMsg(primary_storage_uuid=local,
                                                           cluster_uuid=cluster),
                          PRIMARY, local)
        backup = (await self.ok(AddSftpBackupStorageMsg(name="sftp", url="/zstack_bs",
                                                        hostname=self.base(BS_SLOT),
                                                        password="password"),
                                BACKUP)).inventory["uuid"]
        await self.ok(AttachBackupStorageToZoneMsg(backup_storage_uuid=backup, zone_uuid=zone),
                      BACKUP, backup)
        image = (await self.ok(AddImageMsg(
            name="image-vm", url=f"http://images.example/vm.qcow2?size={IMAGE_SIZE}"
            f"&actualSize={IMAGE_ACTUAL}", backup_storage_uuids=[backup]),
            IMAGE_SERVICE)).inventory["uuid"]
        offering = (await self.ok(CreateInstanceOfferingMsg(
            name="small", cpu_num=self.offering_cpu, memory_size=self.offering_memory,
            cpu_speed=1000), OFFERING_SERVICE)).inventory["uuid"]
        disk = (await self.ok(CreateDiskOfferingMsg(name="data", disk_size=20 * GiB),
                              OFFERING_SERVICE)).inventory["uuid"]
        l2 = (await self.ok(CreateL2NoVlanNetworkMsg(name="l2", zone_uuid=zone,
                                                     physical_interface="eth0"),
                            L2_SERVICE_ID)).inventory["uuid"]
        await self.ok(AttachL2NetworkToClusterMsg(l2_network_uuid=l2, cluster_uuid=cluster),
                      L2_SERVICE_ID, l2)
        l3 = (await self.ok(CreateL3NetworkMsg(name="l3", l2_network_uuid=l2),
                            L3_SERVICE_ID)).inventory["uuid"]
        await self.ok(AddIpRangeMsg(l3_network_uuid=l3, name="range", start_ip="10.0.0.10",
                                    end_ip="10.0.3.250", netmask="255.255.252.0",
                                    gateway="10.0.0.1"), L3_SERVICE_ID, l3)
        self.cloud = Cloud(zone=zone, cluster=cluster, hosts=hosts, slots=slots, nfs=nfs,
                           local=local, backup=backup, image=image, offering=offering,
                           disk_offering=disk, l2=l2, l3=l3)
        return self.cloud

    def create_msg(self, name: str = "vm", **fields: Any) -> CreateVmInstanceMsg:
        """
        A create of a VM on the cloud (C{fields} override).
        """
        values: dict[str, Any] = {"name": name, "instance_offering_uuid": self.cloud.offering,
                                  "image_uuid": self.cloud.image,
                                  "l3_network_uuids": [self.cloud.l3]}
        values.update(fields)
        return CreateVmInstanceMsg(**values)

    async def create(self, name: str = "vm", **fields: Any) -> dict[str, Any]:
        """
        Create a VM; its inventory.
        """
        return (await self.vm(self.create_msg(name, **fields))).inventory


def codes_of(error: Any) -> list[str]:
    """
    The codes of an ErrorCode and its causes, outermost first.
    """
    out = []
    while error is not None:
        out.append(error.code)
        error = error.cause
    return out


class EmbeddedBackends:
    """
    The embedded defaults: SQLite in the node's data dir, the LocalBus.
    """

    async def node_overrides(self) -> dict[str, Any]:
        return {}


class RabbitPostgresBackends:
    """
    PostgreSQL (a scratch database, dropped at cleanup) and RabbitMQ (the AMQP bus on a
    random prefix, its exchanges deleted at cleanup). Fails when either is missing.
    """

    async def node_overrides(self) -> dict[str, Any]:
        name = await threads.deferToThread(pg_create_database_sync)
        self.addCleanup(threads.deferToThread, pg_drop_database_sync, name)
        prefix = f"vm{secrets.token_hex(5)}."
        self.addCleanup(self._delete_exchanges, prefix)
        return {"store": {"url": pg_dsn(name)},
                "bus": {"backend": "amqp", "prefix": prefix}}

    async def _delete_exchanges(self, prefix: str) -> None:
        from tests.test_bus_amqp import Admin
        from zcontrol.bus.amqp import Topology

        admin = await Admin.connect()
        try:
            topo = Topology(prefix)
            await admin.ch.queue_delete(queue=topo.no_route_queue)
            for exchange in (topo.p2p, topo.broadcast, topo.no_route):
                await admin.ch.exchange_delete(exchange=exchange)
        finally:
            await admin.close()


def gather(*ds: Any) -> defer.Deferred:
    """
    C{gatherResults} of coroutines or Deferreds (consumeErrors).
    """
    return defer.gatherResults([defer.ensureDeferred(d) if not isinstance(d, defer.Deferred)
                                else d for d in ds], consumeErrors=True)
