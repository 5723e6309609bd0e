"""
The cloud's inventory on TWO whole management nodes (issue 9: "nothing may assume a single
management node"): two L{zcontrol.node.make_node} nodes share one PostgreSQL scratch database
and one RabbitMQ (the same random C{bus.prefix}), each with its own data dir, node id and
HTTP port, and one simulated agent over loopback HTTP serves their hosts and backup storage.

 - L{TwoNodeInventoryTests.test_build_use_and_tear_down}: the one-node scenario of
   L{tests.test_inventory_e2e} with every message sent through the two nodes' buses in
   turn, so about half of them reach the node that does not own the resource and the bus
   routes them: the same inventories, one download for 100 concurrent volumes, the store
   clean at the end.
 - L{TwoNodeInventoryTests.test_owners_and_takeover}: uuids chosen so that each message
   reaches the node that does NOT own its resource: hosts are connected by their owner (its
   agent client holds the callback secret; the agent's callbacks go to its endpoint), a host
   added after the NFS attach is mounted once, by the storage's owner, an image added
   through the other node is added by its owner; then one node stops and the other takes
   its resources over: deleting them through it succeeds and leaves the store clean.
"""

from __future__ import annotations

import os
import secrets
import uuid as uuidlib
from collections import Counter
from typing import Any

from twisted.internet import defer, reactor

from tests.test_inventory_e2e import (
    BS_SLOT,
    HOLDER_TABLES,
    HOST_SLOTS,
    IMAGE_ACTUAL,
    IMAGE_SIZE,
    NOT_INVENTORY,
    TIMEOUT,
    RabbitPostgresInventoryTests,
)
from zcontrol.config import load_config
from zcontrol.db.query import RESOURCES, Query
from zcontrol.node import make_node
from zcontrol.services.backupstorage.messages import SERVICE_ID as BACKUP
from zcontrol.services.backupstorage.messages import (
    AddSftpBackupStorageMsg,
    AttachBackupStorageToZoneMsg,
    DeleteBackupStorageMsg,
)
from zcontrol.services.cluster.messages import SERVICE_ID as CLUSTER_SERVICE
from zcontrol.services.cluster.messages import CreateClusterMsg, DeleteClusterMsg
from zcontrol.services.host.messages import SERVICE_ID as HOST_SERVICE
from zcontrol.services.host.messages import AddHostMsg, DeleteHostMsg
from zcontrol.services.image.messages import SERVICE_ID as IMAGE_SERVICE
from zcontrol.services.image.messages import AddImageMsg, DeleteImageMsg
from zcontrol.services.primarystorage.messages import SERVICE_ID as PRIMARY
from zcontrol.services.primarystorage.messages import (
    AddNfsPrimaryStorageMsg,
    AttachPrimaryStorageToClusterMsg,
    DeletePrimaryStorageMsg,
    DetachPrimaryStorageFromClusterMsg,
)
from zcontrol.services.zone.messages import SERVICE_ID as ZONE_SERVICE
from zcontrol.services.zone.messages import CreateZoneMsg, DeleteZoneMsg

MOUNT = "/nfsprimarystorage/mount"


class TwoNodeInventoryTests(RabbitPostgresInventoryTests):
    """
    Two nodes on PostgreSQL and RabbitMQ; C{self.node} is the first (store reads, queries
    of the inherited scenario go through both in turn).
    """

    async def start_node(self) -> None:
        overrides = await self.node_overrides()
        self.nodes = []
        for i in range(2):
            config = {"node": {"id": f"mn-two{i}-{secrets.token_hex(3)}",
                               "data_dir": os.path.abspath(self.mktemp())},
                      "http": {"port": 0, "interface": "127.0.0.1"}, **overrides}
            node = make_node(load_config(None, config), reactor)
            self.addCleanup(lambda node=node: node.running and node.stopService())
            self.nodes.append(node)
        await defer.gatherResults([defer.Deferred.fromCoroutine(self._up(n))
                                   for n in self.nodes])
        await defer.gatherResults([n.bus.when_members(2).addTimeout(TIMEOUT, reactor)
                                   for n in self.nodes])
        self.node = self.nodes[0]
        self.services = self.services_of(self.node)
        self._turn = 0
        self.callbacks: list[tuple[str, str, str]] = []  # (path, agent host key, callback url)
        accept = self.agent._accepted

        def recording(definition: Any, handler: Any, host: Any, taskuuid: str,
                      callback_url: str, cmd: Any, *rest: Any) -> None:
            self.callbacks.append((definition.path, host.key, callback_url))
            accept(definition, handler, host, taskuuid, callback_url, cmd, *rest)

        self.agent._accepted = recording

    async def _up(self, node: Any) -> None:
        await node.startService()

    def services_of(self, node: Any) -> dict[str, Any]:
        inventory = [s for s in node if s.name == "inventory"][0]
        return {s.service_id: s for s in inventory.services}

    def owner(self, uuid: str) -> Any:
        [node] = [n for n in self.nodes if n.bus.node_id == self.node.bus.owner_of(uuid)]
        return node

    def other(self, node: Any) -> Any:
        return self.nodes[1] if node is self.nodes[0] else self.nodes[0]

    def uuid_owned_by(self, node: Any) -> str:
        while True:
            u = uuidlib.uuid4().hex
            if self.node.bus.owner_of(u) == node.bus.node_id:
                return u

    async def send(self, msg: Any, service_id: str, resource_uuid: str | None = None,
                   via: Any = None) -> Any:
        """
        Send through C{via}, or through the two nodes in turn.
        """
        if via is None:
            via = self.nodes[self._turn % 2]
            self._turn += 1
        msg.service_id = service_id
        msg.resource_uuid = resource_uuid
        return await via.bus.send(msg, TIMEOUT)

    async def ok(self, msg: Any, service_id: str, resource_uuid: str | None = None,
                 via: Any = None) -> Any:
        reply = await self.send(msg, service_id, resource_uuid, via)
        self.assertTrue(reply.success, f"{type(msg).__name__}: {reply.error}")
        return reply

    def settled(self, topic: str, match: Any) -> defer.Deferred:
        """
        The event was seen on every live node (after its services' own subscriptions), and
        then no node's primary storage service has work in flight.
        """
        live = [n for n in self.nodes if n.running]
        seen_on = []
        for node in live:
            d: defer.Deferred = defer.Deferred()
            holder: list[Any] = []

            def seen(event: Any, d: defer.Deferred = d, holder: list[Any] = holder) -> None:
                if not d.called and match(event):
                    holder[0].cancel()
                    d.callback(None)

            holder.append(node.bus.subscribe(topic, seen))
            seen_on.append(d)

        async def all_settled() -> None:
            await defer.gatherResults(seen_on)
            for node in live:
                await self.services_of(node)[PRIMARY]._waiter.wait()

        return defer.Deferred.fromCoroutine(all_settled()).addTimeout(TIMEOUT, reactor)

    # --- ownership and takeover -----------------------------------------------------------

    async def test_owners_and_takeover(self) -> None:
        """
        Every message reaches the node that does not own its resource; the owner acts, the
        other forwards. Then node B stops and node A serves B's resources.
        """
        await self.start_node()
        a, b = self.nodes
        sim = self.simulated
        z = (await self.ok(CreateZoneMsg(name="z2"), ZONE_SERVICE, via=a)).inventory["uuid"]
        c = (await self.ok(CreateClusterMsg(zone_uuid=z, name="c2", hypervisor_type="KVM"),
                           CLUSTER_SERVICE, via=b)).inventory["uuid"]

        # hosts: each added through the node that does not own it
        slot_of: dict[str, int] = {}
        for slot, owner in zip(HOST_SLOTS[:2], (a, b), strict=True):
            h = self.uuid_owned_by(owner)
            await self.ok(AddHostMsg(uuid=h, name=f"h{slot}", zone_uuid=z, cluster_uuid=c,
                                     management_ip=self.base(slot)),
                          HOST_SERVICE, via=self.other(owner))
            slot_of[h] = slot
        for h in slot_of:
            owner = self.owner(h)
            self.assertIsNotNone(owner.agents.report_secret(h), f"{h}: owner has no secret")
            self.assertIsNone(self.other(owner).agents.report_secret(h), f"{h}: other has one")

        # NFS owned by B, added and attached through A: mounted once per host, by B
        nfs_url = f"nfs.example:/export/two-{secrets.token_hex(3)}"
        ns = self.uuid_owned_by(b)
        await self.ok(AddNfsPrimaryStorageMsg(uuid=ns, name="nfs", zone_uuid=z, url=nfs_url),
                      PRIMARY, via=a)
        await self.ok(AttachPrimaryStorageToClusterMsg(primary_storage_uuid=ns,
                                                       cluster_uuid=c), PRIMARY, ns, via=a)

        # a host added later (owned by A, through B) is mounted once, on its connect
        h3 = self.uuid_owned_by(a)
        slot_of[h3] = HOST_SLOTS[2]
        prepared = self.settled("host.status", lambda e: e.new_status == "Connected"
                                and e.host_uuid == h3)
        await self.ok(AddHostMsg(uuid=h3, name="h3", zone_uuid=z, cluster_uuid=c,
                                 management_ip=self.base(HOST_SLOTS[2])), HOST_SERVICE, via=b)
        await prepared
        [ref] = await self.query("primaryStorageHostRef", f"hostUuid={h3}")
        self.assertEqual((ref["primaryStorageUuid"], ref["status"]), (ns, "Connected"))
        mounts = Counter(key for path, key, _ in self.callbacks if path == MOUNT)
        self.assertEqual(mounts, Counter({str(s): 1 for s in slot_of.values()}))
        for slot in slot_of.values():
            self.assertIn(nfs_url, sim.storage(str(slot)).mounts)
        # every command's callback goes to the endpoint of its host's owner node
        key_owner = {str(s): self.owner(h) for h, s in slot_of.items()}
        for path, key, url in self.callbacks:
            if key in key_owner:
                self.assertEqual(url, key_owner[key].agents.callback_url, (path, key))

        # backup storage owned by B through A; an image owned by B added through A
        bs = self.uuid_owned_by(b)
        await self.ok(AddSftpBackupStorageMsg(uuid=bs, name="bs", url="/zstack_bs",
                                              hostname=self.base(BS_SLOT),
                                              password="password"), BACKUP, via=a)
        await self.ok(AttachBackupStorageToZoneMsg(backup_storage_uuid=bs, zone_uuid=z),
                      BACKUP, bs, via=a)
        self.assertIsNotNone(b.agents.report_secret(bs))
        self.assertIsNone(a.agents.report_secret(bs))
        img = self.uuid_owned_by(b)
        image = (await self.ok(AddImageMsg(
            uuid=img, name="img", url=f"http://images.example/two.qcow2?size={IMAGE_SIZE}"
            f"&actualSize={IMAGE_ACTUAL}", backup_storage_uuids=[bs]),
            IMAGE_SERVICE, via=a)).inventory
        self.assertEqual(image["status"], "Ready")
        [job] = (await self.node.store.query("job", Query(
            conditions=[f"resourceUuid={img}"]))).inventories
        self.assertEqual((job["managementNodeUuid"], job["state"]),
                         (b.bus.node_id, "Succeeded"))

        # B stops: A takes over B's image, storage and host
        await b.stopService()
        await a.bus.when_left(b.bus.node_id).addTimeout(TIMEOUT, reactor)
        self.assertEqual(a.bus.owner_of(img), a.bus.node_id)
        dropped = self.settled("image.deleted", lambda e: e.image_uuid == img)
        await self.ok(DeleteImageMsg(uuid=img), IMAGE_SERVICE, img, via=a)
        await dropped
        # B's backup storage downloads (and deletes) for A now
        again = (await self.ok(AddImageMsg(
            name="img2", url=f"http://images.example/two2.qcow2?size={IMAGE_SIZE}"
            f"&actualSize={IMAGE_ACTUAL}", backup_storage_uuids=[bs]),
            IMAGE_SERVICE, via=a)).inventory
        self.assertEqual(again["status"], "Ready")
        self.assertIsNotNone(a.agents.report_secret(bs))
        dropped = self.settled("image.deleted", lambda e: e.image_uuid == again["uuid"])
        await self.ok(DeleteImageMsg(uuid=again["uuid"]), IMAGE_SERVICE, again["uuid"], via=a)
        await dropped
        await self.ok(DetachPrimaryStorageFromClusterMsg(primary_storage_uuid=ns,
                                                         cluster_uuid=c), PRIMARY, ns, via=a)
        for slot in slot_of.values():
            self.assertEqual(sim.storage(str(slot)).mounts, {})
        # B's host was reconnected by A (Note [take over] in the host service): A holds
        # every host's secret, and the unmounts' callbacks came to A
        for h in slot_of:
            self.assertIsNotNone(a.agents.report_secret(h), h)
        unmounts = [(key, url) for path, key, url in self.callbacks
                    if path == "/nfsprimarystorage/unmount"]
        self.assertEqual(sorted(unmounts), sorted((str(s), a.agents.callback_url)
                                                  for s in slot_of.values()))
        await self.ok(DeletePrimaryStorageMsg(uuid=ns), PRIMARY, ns, via=a)
        await self.ok(DeleteBackupStorageMsg(uuid=bs), BACKUP, bs, via=a)
        for h in slot_of:
            await self.ok(DeleteHostMsg(uuid=h), HOST_SERVICE, h, via=a)
        await self.ok(DeleteClusterMsg(uuid=c), CLUSTER_SERVICE, c, via=a)
        await self.ok(DeleteZoneMsg(uuid=z), ZONE_SERVICE, z, via=a)
        for resource in sorted(set(RESOURCES) - NOT_INVENTORY):
            page = await a.store.query(resource, Query(count=True))
            self.assertEqual(page.total, 0, resource)
        for table in HOLDER_TABLES:
            [(count,)] = await a.store._run(
                lambda db, table=table: db.all(f"SELECT COUNT(*) FROM {table}"))
            self.assertEqual(count, 0, table)
        self.assertEqual(await a.store.audit_capacity(), [])
        await a.stopService()


del RabbitPostgresInventoryTests
