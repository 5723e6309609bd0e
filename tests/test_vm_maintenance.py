"""
Host maintenance with real VMs (issue 10, "Host maintenance migrates VMs away where storage
allows and stops the rest"): a VM on NFS is live-migrated to the other host, a VM on
LocalStorage is stopped, the host reaches Maintenance; on both backends.
"""

from __future__ import annotations

from tests.test_agent_loopback import LoopbackTestCase
from tests.vm_scenario import CloudScenario, EmbeddedBackends, RabbitPostgresBackends
from zcontrol.services.host.messages import SERVICE_ID as HOST_SERVICE
from zcontrol.services.host.messages import ChangeHostStateMsg


class MaintenanceScenario(CloudScenario):
    """
    Two hosts, NFS and LocalStorage.
    """

    storage = "both"
    cloud_hosts = 2

    async def test_maintenance_migrates_and_stops(self) -> None:
        """
        Maintain the host of two VMs: the NFS one runs on the other host afterwards, the
        LocalStorage one is Stopped; the host is in Maintenance and nothing is left on it.
        """
        cloud = await self.build_cloud()
        host, other = cloud.hosts
        shared = await self.create("shared", host_uuid=host,
                                   primary_storage_uuid_for_root_volume=cloud.nfs)
        local = await self.create("local", host_uuid=host,
                                  primary_storage_uuid_for_root_volume=cloud.local)
        self.assertEqual((shared["hostUuid"], local["hostUuid"]), (host, host))
        await self.ok(ChangeHostStateMsg(uuid=host, state_event="maintain"), HOST_SERVICE,
                      host)
        [row] = await self.rows("host", uuid=host)
        self.assertEqual(row["state"], "Maintenance")
        [moved] = await self.rows("vmInstance", uuid=shared["uuid"])
        self.assertEqual((moved["state"], moved["hostUuid"], moved["lastHostUuid"]),
                         ("Running", other, host))
        [stopped] = await self.rows("vmInstance", uuid=local["uuid"])
        self.assertEqual((stopped["state"], stopped["hostUuid"]), ("Stopped", None))
        self.assertEqual(self.running_on_agents(), {shared["uuid"]: other})
        await self.consistent()


class EmbeddedMaintenanceTests(EmbeddedBackends, MaintenanceScenario, LoopbackTestCase):
    """On SQLite and the LocalBus."""


class RabbitPostgresMaintenanceTests(RabbitPostgresBackends, MaintenanceScenario,
                                     LoopbackTestCase):
    """On PostgreSQL and RabbitMQ."""
