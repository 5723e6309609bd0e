# -*- test-case-name: tests.test_demo -*-
"""
C{python -m zcontrol.demo}: build a small cloud's inventory through a real management node
and a real simulated agent, in one process, and print each step, until the REST API exists.

It starts a management node on the embedded defaults (SQLite in a temporary data dir, the
in-process bus, HTTP on a free loopback port) and a simulated agent on another free port
serving four slots (C{/hosts/0..3}: two KVM hosts, one Sftp backup storage, one host added
later), with the node's bootstrap token. Then, through the node's bus, each as the REST API
will send it: CreateZone, CreateCluster, AddHost x2, AddLocalPrimaryStorage and
AddNfsPrimaryStorage attached to the cluster, AddSftpBackupStorage attached to the zone,
AddImage, CreateInstanceOffering, CreateL2NoVlanNetwork attached to the cluster,
CreateL3Network with an IP range and DNS, AllocateHost and ReturnHostCapacity, a third host
that mounts the NFS storage when it connects, and 20 concurrent root volumes from the image
on the NFS storage (one download); then a VM's life (CreateVmInstance, Stop, Start, Reboot,
Destroy, Recover, Start, Destroy, Expunge) and 20 concurrent creates. Each line shows the message, the bus service id it was
sent to, and the inventory fields that matter. It stops everything (and deletes the data
dir) at the end; C{--keep} leaves the data dir (with its SQLite store) to look at.

Exit status 0 when every step succeeded, 1 (with the failing step's ErrorCode) otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, TextIO

from twisted.internet import defer, task

__all__ = ["main", "run"]

GiB = 1024**3


class StepFailed(Exception):
    """
    A step's reply was an error.
    """


class _Demo:
    def __init__(self, node: Any, agent_url: str, out: TextIO):
        self.node = node
        self.agent_url = agent_url
        self.out = out

    def base(self, slot: int) -> str:
        from agent import protocol as p

        return p.host_base_url(self.agent_url, slot)

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    async def send(self, msg: Any, service_id: str, resource_uuid: str | None = None,
                   show: Callable[[Any], str] | None = None, quiet: bool = False) -> Any:
        msg.service_id = service_id
        msg.resource_uuid = resource_uuid
        reply = await self.node.bus.send(msg, 300)
        name = type(msg).__name__
        if not reply.success:
            self.say(f"  {name} [{service_id}] FAILED {reply.error}")
            raise StepFailed(str(reply.error))
        if not quiet:
            self.say(f"  {name} [{service_id}] {show(reply) if show else 'ok'}")
        return reply

    async def query(self, resource: str, *conditions: str) -> list[dict[str, Any]]:
        from zcontrol.services.inventory import QueryInventoryMsg

        reply = await self.node.bus.send(QueryInventoryMsg(
            service_id="query", resource=resource, conditions=list(conditions)), 60)
        if not reply.success:
            raise StepFailed(str(reply.error))
        return reply.inventories

    async def build(self) -> None:
        from zcontrol.scheduler.messages import AllocateHostMsg, ReturnHostCapacityMsg
        from zcontrol.services.backupstorage.messages import (
            AddSftpBackupStorageMsg,
            AttachBackupStorageToZoneMsg,
        )
        from zcontrol.services.cluster.messages import CreateClusterMsg
        from zcontrol.services.host.messages import AddHostMsg
        from zcontrol.services.image.messages import AddImageMsg, SelectBackupStorageMsg
        from zcontrol.services.network.messages import (
            AddDnsToL3NetworkMsg,
            AddIpRangeMsg,
            AttachL2NetworkToClusterMsg,
            CreateL2NoVlanNetworkMsg,
            CreateL3NetworkMsg,
        )
        from zcontrol.services.offering.messages import CreateInstanceOfferingMsg
        from zcontrol.services.primarystorage.messages import (
            AddLocalPrimaryStorageMsg,
            AddNfsPrimaryStorageMsg,
            AttachPrimaryStorageToClusterMsg,
            InstantiateRootVolumeFromTemplateOnPrimaryStorageMsg,
        )
        from zcontrol.services.zone.messages import CreateZoneMsg

        def inv(*fields: str) -> Callable[[Any], str]:
            return lambda r: " ".join(f"{f}={r.inventory.get(f)}" for f in fields)

        say = self.say
        say(f"management node {self.node.config.node_id}, agent {self.agent_url}")
        zone = (await self.send(CreateZoneMsg(name="zone-1"), "zone",
                                show=inv("uuid", "state"))).inventory["uuid"]
        cluster = (await self.send(CreateClusterMsg(zone_uuid=zone, name="cluster-1",
                                                    hypervisor_type="KVM"), "cluster",
                                   show=inv("uuid", "hypervisorType"))).inventory["uuid"]
        hosts = []
        for slot in (0, 1):
            hosts.append((await self.send(
                AddHostMsg(name=f"host-{slot}", zone_uuid=zone, cluster_uuid=cluster,
                           management_ip=self.base(slot)), "host",
                show=inv("managementIp", "status", "totalCpuCapacity",
                         "totalMemoryCapacity"))).inventory["uuid"])
        local = (await self.send(AddLocalPrimaryStorageMsg(
            name="local", zone_uuid=zone, url="/zstack_ps"), "storage.primary",
            show=inv("uuid", "type"))).inventory["uuid"]
        await self.send(AttachPrimaryStorageToClusterMsg(
            primary_storage_uuid=local, cluster_uuid=cluster), "storage.primary", local,
            show=inv("totalCapacity", "attachedClusterUuids"))
        nfs = (await self.send(AddNfsPrimaryStorageMsg(
            name="nfs", zone_uuid=zone, url="nfs.example:/export/demo"), "storage.primary",
            show=inv("uuid", "type"))).inventory["uuid"]
        await self.send(AttachPrimaryStorageToClusterMsg(
            primary_storage_uuid=nfs, cluster_uuid=cluster), "storage.primary", nfs,
            show=inv("totalCapacity", "attachedClusterUuids"))
        bs = (await self.send(AddSftpBackupStorageMsg(
            name="sftp", url="/zstack_bs", hostname=self.base(2), username="root",
            password="unused"), "storage.backup",
            show=inv("uuid", "status", "totalCapacity"))).inventory["uuid"]
        await self.send(AttachBackupStorageToZoneMsg(backup_storage_uuid=bs, zone_uuid=zone),
                        "storage.backup", bs, show=inv("attachedZoneUuids"))
        image = (await self.send(AddImageMsg(
            name="image-1", url=f"http://images.example/centos.qcow2?size={8 * GiB}"
            f"&actualSize={GiB}", backup_storage_uuids=[bs]), "image",
            show=inv("uuid", "status", "size", "actualSize"))).inventory
        offering = (await self.send(CreateInstanceOfferingMsg(
            name="small", cpu_num=2, memory_size=2 * GiB), "offering",
            show=inv("uuid", "cpuNum", "memorySize"))).inventory
        l2 = (await self.send(CreateL2NoVlanNetworkMsg(
            name="l2", zone_uuid=zone, physical_interface="eth0"), "network.l2",
            show=inv("uuid", "type"))).inventory["uuid"]
        await self.send(AttachL2NetworkToClusterMsg(l2_network_uuid=l2, cluster_uuid=cluster),
                        "network.l2", l2, show=inv("attachedClusterUuids"))
        l3 = (await self.send(CreateL3NetworkMsg(name="l3", l2_network_uuid=l2),
                              "network.l3", show=inv("uuid"))).inventory["uuid"]
        await self.send(AddIpRangeMsg(l3_network_uuid=l3, name="range", start_ip="10.0.0.10",
                                      end_ip="10.0.0.200", netmask="255.255.255.0",
                                      gateway="10.0.0.1"), "network.l3", l3,
                        show=lambda r: "ok")
        await self.send(AddDnsToL3NetworkMsg(l3_network_uuid=l3, dns="8.8.8.8"),
                        "network.l3", l3, show=lambda r: f"dns={r.inventory['dns']} ipRanges="
                        + ",".join(f"{x['startIp']}-{x['endIp']}"
                                   for x in r.inventory["ipRanges"]))
        chosen = (await self.send(AllocateHostMsg(
            vm_instance_uuid="vm-demo", cpu_num=offering["cpuNum"],
            memory_size=offering["memorySize"], disk_size=image["size"],
            l3_network_uuids=[l3]), "host.allocator",
            show=lambda r: f"host={r.inventory['uuid']} availableMemoryCapacity="
            f"{r.inventory['availableMemoryCapacity']} primaryStorages="
            f"{r.primary_storage_uuids}")).inventory["uuid"]
        await self.send(ReturnHostCapacityMsg(host_uuid=chosen, vm_instance_uuid="vm-demo"),
                        "host.allocator", show=inv("availableMemoryCapacity"))

        # A host added after the attach mounts the NFS storage when it connects.
        mounted: defer.Deferred = defer.Deferred()

        def ref_added(event: Any) -> None:
            if event.new_status == "Connected" and event.host_uuid not in hosts \
                    and not mounted.called:
                mounted.callback(event.host_uuid)

        subscription = self.node.bus.subscribe("host.status", ref_added)
        third = (await self.send(AddHostMsg(
            name="host-3", zone_uuid=zone, cluster_uuid=cluster, management_ip=self.base(3)),
            "host", show=inv("uuid", "status"))).inventory["uuid"]
        await mounted
        subscription.cancel()
        for _ in range(100):
            refs = await self.query("primaryStorageHostRef", f"primaryStorageUuid={nfs}",
                                    f"hostUuid={third}")
            if refs:
                break
            await task.deferLater(self.node.reactor, 0.05, lambda: None)
        say(f"  host-3 connected later: NFS mount {refs[0]['status'] if refs else 'MISSING'}")
        if not refs:
            raise StepFailed("the host added later did not mount the NFS storage")

        # 20 concurrent root volumes from one image on NFS: one download to the cache.
        select = await self.send(SelectBackupStorageMsg(image_uuid=image["uuid"],
                                                        zone_uuid=zone), "image", image["uuid"],
                                 show=lambda r: f"backupStorageUuid={r.backup_storage_uuid}")
        spec = {"uuid": image["uuid"], "size": image["size"],
                "actualSize": image["actualSize"], "format": image["format"],
                "mediaType": image["mediaType"], "backupStorageUuid": bs,
                "installPath": select.install_path, "backupStorageHostname": select.hostname}
        volumes = [defer.Deferred.fromCoroutine(self.send(
            InstantiateRootVolumeFromTemplateOnPrimaryStorageMsg(
                primary_storage_uuid=nfs, volume_uuid=f"vol-{i}", image=spec), "storage.primary",
            nfs, quiet=True)) for i in range(20)]
        await defer.gatherResults(volumes, consumeErrors=True)
        caches = await self.query("imageCache", f"primaryStorageUuid={nfs}")
        say(f"  20 root volumes on NFS: {len(caches)} image cache entry (one download), "
            f"status {caches[0]['status'] if caches else '-'}")
        # VMs: the lifecycle, each operation a journaled job in the VM's chain.
        from zcontrol.services.vm.messages import (
            CreateVmInstanceMsg,
            DestroyVmInstanceMsg,
            ExpungeVmInstanceMsg,
            RebootVmInstanceMsg,
            RecoverVmInstanceMsg,
            StartVmInstanceMsg,
            StopVmInstanceMsg,
        )

        def vm_show(r: Any) -> str:
            v = r.inventory
            if v is None:
                return f"gone job={r.job_uuid}"
            ips = ",".join(str(n["ip"]) for n in v["vmNics"])
            return (f"uuid={v['uuid']} state={v['state']} hostUuid={v['hostUuid']} ip={ips}"
                    f" job={r.job_uuid}")

        vm = (await self.send(CreateVmInstanceMsg(
            name="vm-1", instance_offering_uuid=offering["uuid"], image_uuid=image["uuid"],
            l3_network_uuids=[l3], primary_storage_uuid_for_root_volume=nfs),
            "vmInstance", show=vm_show)).inventory["uuid"]
        for op in (StopVmInstanceMsg, StartVmInstanceMsg, RebootVmInstanceMsg,
                   DestroyVmInstanceMsg, RecoverVmInstanceMsg, StartVmInstanceMsg,
                   DestroyVmInstanceMsg, ExpungeVmInstanceMsg):
            await self.send(op(uuid=vm), "vmInstance", vm, show=vm_show)
        batch = [defer.Deferred.fromCoroutine(self.send(CreateVmInstanceMsg(
            name=f"batch-{i}", instance_offering_uuid=offering["uuid"],
            image_uuid=image["uuid"], l3_network_uuids=[l3]), "vmInstance", quiet=True))
            for i in range(20)]
        replies = await defer.gatherResults(batch, consumeErrors=True)
        running = await self.query("vmInstance", "state=Running")
        say(f"  20 concurrent creates: {len(running)} Running, "
            f"{sum(1 for r in replies if not r.success)} failed")
        audit = await self.node.store.audit_capacity()
        say(f"  capacity audit: {len(audit)} drifted figure(s)")
        if audit:
            raise StepFailed(f"capacity drift: {audit}")


async def run(reactor: Any, out: TextIO = sys.stdout, data_dir: str | None = None,
              keep: bool = False) -> int:
    """
    Build the demo cloud (see the module docstring) on C{reactor}, writing to C{out}.

    @return: 0 when every step succeeded, else 1.
    """
    from twisted.internet.endpoints import TCP4ServerEndpoint
    from twisted.python.reflect import namedAny

    from agent.app import AgentApp
    from agent.http import QuietSite, make_http_client, make_pool
    from agent.hypervisor.simulator import SimulatedCluster, SimulatorConfig
    from agent.tap import PLUGINS
    from zcontrol.config import load_config
    from zcontrol.node import make_node

    owned = data_dir is None
    data_dir = data_dir or tempfile.mkdtemp(prefix="zcontrol-demo-")
    node = make_node(load_config(None, {
        "node": {"id": "mn-demo", "data_dir": data_dir},
        "http": {"port": 0, "interface": "127.0.0.1"}}), reactor)
    # The agent `twistd zagent --hosts 4` runs (every plugin), with the node's token.
    cluster = SimulatedCluster(SimulatorConfig(clock=reactor))
    pool = make_pool(reactor, 100)
    agent = AgentApp(clock=reactor, http=make_http_client(reactor, pool),
                     backend_factory=cluster.backends,
                     plugins=[namedAny(path)() for path, _ in PLUGINS.values()],
                     host_count=4, reset_host=cluster.reset,
                     bootstrap_token=node.config.agents.token(data_dir))
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
        QuietSite(agent.app.resource()))
    agent_url = f"http://127.0.0.1:{port.getHost().port}"
    status = 0
    try:
        await node.startService()
        await _Demo(node, agent_url, out).build()
        out.write("done: every step succeeded\n")
    except StepFailed as e:
        out.write(f"stopped: {e}\n")
        status = 1
    finally:
        if node.running:
            await node.stopService()
        await agent.drain()
        await pool.closeCachedConnections()
        await port.stopListening()
        if owned and not keep:
            shutil.rmtree(data_dir, ignore_errors=True)
        elif keep:
            out.write(f"data dir kept: {data_dir} (SQLite store: "
                      f"{os.path.join(data_dir, 'zcontrol.db')})\n")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m zcontrol.demo",
        description="Build a small cloud's inventory through a management node and a "
                    "simulated agent, in one process, and print each step.")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary data dir (its SQLite store) at the end")
    args = parser.parse_args(argv)
    result: list[int] = []

    async def go(reactor: Any) -> None:
        result.append(await run(reactor, keep=args.keep))

    try:
        task.react(lambda reactor: defer.ensureDeferred(go(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            return int(e.code)
    return result[0] if result else 1


if __name__ == "__main__":
    sys.exit(main())
