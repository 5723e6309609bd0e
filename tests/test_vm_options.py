"""
The create options ZStack users use (issue 10): strategies C{CreateStopped} and
C{JustCreate}, a static IP by system tag, an explicit host, data disks from disk offerings,
LocalStorage (a VM starts only where its root volume is), the deletion policies C{Direct}
and C{Delay} with its expunge period; on the embedded backends and on PostgreSQL + RabbitMQ.
"""

from __future__ import annotations

from tests.test_agent_loopback import LoopbackTestCase
from tests.vm_scenario import CloudScenario, EmbeddedBackends, RabbitPostgresBackends
from zcontrol.services.vm.messages import SERVICE_ID as VM_SERVICE
from zcontrol.services.vm.messages import (
    DestroyVmInstanceMsg,
    StartVmInstanceMsg,
    StopVmInstanceMsg,
)


class OptionsScenario(CloudScenario):
    """
    Create options on NFS and LocalStorage.
    """

    storage = "both"
    cloud_hosts = 2

    async def test_strategies_static_ip_host_and_data_disks(self) -> None:
        """
        CreateStopped: volumes and address made, Stopped, no host held; JustCreate: only the
        record (Created, nothing held), started later with everything; a static IP; an
        explicit host; a data disk per disk offering, Ready on the root volume's storage.
        """
        cloud = await self.build_cloud()
        stopped = await self.create("stopped", strategy="CreateStopped",
                                    primary_storage_uuid_for_root_volume=cloud.nfs)
        self.assertEqual((stopped["state"], stopped["hostUuid"]), ("Stopped", None))
        self.assertIn(stopped["lastHostUuid"], cloud.hosts)
        self.assertEqual(stopped["allVolumes"][0]["status"], "Ready")
        self.assertIsNotNone(stopped["vmNics"][0]["ip"])
        self.assertEqual(self.running_on_agents(), {})
        await self.consistent()

        record = await self.create("record", strategy="JustCreate")
        self.assertEqual((record["state"], record["hostUuid"], record["vmNics"],
                          record["allVolumes"]), ("Created", None, [], []))
        await self.consistent()
        started = (await self.vm(StartVmInstanceMsg(uuid=record["uuid"]),
                                 record["uuid"])).inventory
        self.assertEqual(started["state"], "Running")
        self.assertEqual(len(started["vmNics"]), 1)
        self.assertEqual(started["allVolumes"][0]["status"], "Ready")
        await self.consistent()

        host = cloud.hosts[1]
        vm = await self.create("static", host_uuid=host,
                               primary_storage_uuid_for_root_volume=cloud.nfs,
                               data_disk_offering_uuids=[cloud.disk_offering],
                               system_tags=[f"staticIp::{cloud.l3}::10.0.1.77",
                                            "hostname::web-1"])
        self.assertEqual(vm["hostUuid"], host)
        self.assertEqual(vm["vmNics"][0]["ip"], "10.0.1.77")
        root, data = sorted(vm["allVolumes"], key=lambda v: v["deviceId"])
        self.assertEqual((data["type"], data["status"], data["primaryStorageUuid"]),
                         ("Data", "Ready", cloud.nfs))
        tags = {t["tag"] for t in await self.rows("tag", resourceUuid=vm["uuid"])}
        self.assertEqual(tags, {f"staticIp::{cloud.l3}::10.0.1.77", "hostname::web-1"})
        # the address is taken: another VM asking for it is refused, and leaves nothing
        await self.refused(self.create_msg("thief", system_tags=[
            f"staticIp::{cloud.l3}::10.0.1.77"]), VM_SERVICE, None, "~L3.1007")
        # stop and start keep the static address
        await self.vm(StopVmInstanceMsg(uuid=vm["uuid"]), vm["uuid"])
        again = (await self.vm(StartVmInstanceMsg(uuid=vm["uuid"]), vm["uuid"])).inventory
        self.assertEqual(again["vmNics"][0]["ip"], "10.0.1.77")
        await self.consistent()

    async def test_local_storage_pins_the_host(self) -> None:
        """
        A VM whose root volume is on LocalStorage starts again only on that host: asking
        for another host is refused naming the field.
        """
        cloud = await self.build_cloud()
        vm = await self.create("local", primary_storage_uuid_for_root_volume=cloud.local)
        u, host = vm["uuid"], vm["hostUuid"]
        self.assertEqual(vm["allVolumes"][0]["primaryStorageUuid"], cloud.local)
        await self.vm(StopVmInstanceMsg(uuid=u), u)
        other = [h for h in cloud.hosts if h != host][0]
        await self.refused(StartVmInstanceMsg(uuid=u, host_uuid=other), VM_SERVICE, u,
                           "SYS.1007", "hostUuid")
        started = (await self.vm(StartVmInstanceMsg(uuid=u), u)).inventory
        self.assertEqual(started["hostUuid"], host)
        await self.consistent()


class DirectScenario(CloudScenario):
    """
    The deletion policy Direct.
    """

    node_config = {"vm": {"deletion_policy": "Direct"}}

    async def test_destroy_expunges(self) -> None:
        """
        With Direct, a destroy expunges at once: rows and volume bits gone.
        """
        cloud = await self.build_cloud()
        vm = await self.create("vm")
        path = vm["allVolumes"][0]["installPath"]
        reply = await self.vm(DestroyVmInstanceMsg(uuid=vm["uuid"]), vm["uuid"])
        self.assertIsNone(reply.inventory)
        self.assertEqual(await self.rows("vmInstance"), [])
        self.assertEqual(await self.rows("volume"), [])
        for slot in cloud.slots.values():
            for export in self.simulated.storage(str(slot)).mounts:
                self.assertNotIn(path, self.simulated.nfs_export(export).files)
        await self.consistent()


class DelayScenario(CloudScenario):
    """
    The deletion policy Delay with a short expunge period.
    """

    node_config = {"vm": {"deletion_policy": "Delay", "expunge_period": 0.5}}

    async def test_expunged_after_the_period(self) -> None:
        """
        A destroyed VM is expunged by the expunge task once its period has passed; a
        Running one is not touched.
        """
        await self.build_cloud()
        gone = await self.create("gone")
        kept = await self.create("kept")
        await self.vm(DestroyVmInstanceMsg(uuid=gone["uuid"]), gone["uuid"])
        [row] = await self.rows("vmInstance", uuid=gone["uuid"])
        self.assertEqual(row["state"], "Destroyed")
        self.assertEqual(await self.vm_service.expunge_expired(row["lastOpDate"]), [])
        expunged = await self.vm_service.expunge_expired(row["lastOpDate"] + 1.0)
        self.assertEqual(expunged, [gone["uuid"]])
        self.assertEqual([v["uuid"] for v in await self.rows("vmInstance")], [kept["uuid"]])
        self.assertEqual(len(await self.rows("volume")), 1)
        await self.consistent()


class EmbeddedOptionsTests(OptionsScenario, EmbeddedBackends, LoopbackTestCase):
    """On SQLite and the LocalBus."""


class RabbitPostgresOptionsTests(OptionsScenario, RabbitPostgresBackends, LoopbackTestCase):
    """On PostgreSQL and RabbitMQ."""


class EmbeddedDirectTests(DirectScenario, EmbeddedBackends, LoopbackTestCase):
    """On SQLite and the LocalBus."""


class EmbeddedDelayTests(DelayScenario, EmbeddedBackends, LoopbackTestCase):
    """On SQLite and the LocalBus."""
