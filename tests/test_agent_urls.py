"""
One agent address, one resource (L{zcontrol.services.agenturls}): a host and a backup
storage never share an agent base URL, in either order and in any spelling, because the
agent keeps one callback secret per base URL.
"""

from __future__ import annotations

from tests.test_agent_sftp import bs_base
from tests.test_backup_storage import ServicesTestCase
from zcontrol.services.backupstorage import BS, SERVICE_ID, AddSftpBackupStorageMsg
from zcontrol.services.host import HOST, AddHostMsg, HostConfig, HostService
from zcontrol.services.host import SERVICE_ID as HOST_SERVICE


class NeverCalled:
    """
    An agent client the refused adds must never reach.
    """

    def __getattr__(self, name: str) -> None:
        raise AssertionError(f"the agent client was used ({name}) by a refused add")


class OneAgentOneResourceTests(ServicesTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.result(self.store.insert("cluster", {"uuid": "c", "name": "c", "zoneUuid": "z",
                                                  "hypervisorType": "KVM"}))
        self.hosts = HostService(self.clock, self.bus, self.store, NeverCalled(),
                                 HostConfig(vm_sync_on_ping=False))
        self.hosts.start(track=False)

    def test_backup_storage_at_a_hosts_agent_refused(self) -> None:
        """
        A backup storage whose C{hostname} names a host's agent (spelt otherwise) is
        refused with C{BS.1004} naming the host, and nothing is inserted.
        """
        self.result(self.store.add_host({
            "uuid": "h1", "name": "h1", "zoneUuid": "z", "clusterUuid": "c",
            "managementIp": bs_base(1) + "/", "hypervisorType": "KVM"}))
        error = self.refused(AddSftpBackupStorageMsg(
            service_id=SERVICE_ID, name="bs", url="/bs", hostname=bs_base(1), username="root",
            password="x", uuid="bs1"), BS.DUPLICATE_HOSTNAME)
        self.assertEqual((error.opaque["field"], error.opaque["existingHostUuid"]),
                         ("hostname", "h1"))
        self.assertEqual(self.rows("backupStorage"), [])

    def test_host_at_a_backup_storages_agent_refused(self) -> None:
        """
        A host whose C{managementIp} names a backup storage's agent is refused with
        C{HOST.1004} naming the backup storage, before any agent is contacted.
        """
        self.add_bs("bs1", 2, zone=None)
        error = self.refused(AddHostMsg(
            service_id=HOST_SERVICE, name="h", zone_uuid="z", cluster_uuid="c",
            management_ip=bs_base(2) + "/", uuid="h2"),
            HOST.DUPLICATE_MANAGEMENT_IP)
        self.assertEqual(error.opaque["existingBackupStorageUuid"], "bs1")
        self.assertEqual(self.rows("host"), [])
