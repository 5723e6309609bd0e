"""
The storage agent plugin over the agent app, in memory: the real agent client calls the
simulated hosts' LocalStorage and NFS commands through StubTreq, with signed callbacks, on
one task.Clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from agent import protocol as p
from agent.hypervisor.simulator import parse_latency
from agent.tap import PLUGINS, Options
from tests.agent_fakes import InMemoryPair, base

GiB = 1024**3
TiB = 1024 * GiB
URL = "nfs.example:/export"
MOUNT = "/mnt/ps"


class StorageAgentTestCase(SynchronousTestCase):
    """
    An in-memory agent pair with 3 simulated hosts, all connected.
    """

    config: dict[str, Any] = {}

    def setUp(self) -> None:
        self.clock = Clock()
        self.pair = InMemoryPair(host_count=3, clock=self.clock, **self.config)
        for i in range(3):
            self.successResultOf(self.pair.client.connect(base(i), f"host-{i}"))

    def call(self, i: int, cmd: p.Message, advance: float = 0.0) -> Any:
        d = self.pair.client.call(base(i), cmd, raise_on_failure=False)
        self.pair.flush()
        if advance:
            self.clock.advance(advance)
            self.pair.flush()
        return self.successResultOf(d)

    def mount(self, i: int, url: str = URL, mount_path: str = MOUNT) -> Any:
        return self.call(i, p.NfsMountCmd(uuid="ps", url=url, mount_path=mount_path))

    def nfs(self, **kw: Any) -> dict[str, Any]:
        return {"uuid": "ps", "url": URL, "mount_path": MOUNT, **kw}


class LocalStorageTests(StorageAgentTestCase):
    """
    /localstorage/*: one disk per host.
    """

    def test_init_and_capacity(self) -> None:
        """
        Init reports the host's disk (2 TiB by default); each host has its own.
        """
        rsp = self.call(0, p.LocalStorageInitCmd(path="/zstack_ps"))
        self.assertTrue(rsp.success, rsp.error)
        self.assertEqual((rsp.total_capacity, rsp.available_capacity), (2 * TiB, 2 * TiB))
        rsp = self.call(0, p.LocalStorageGetPhysicalCapacityCmd(storage_path="/zstack_ps"))
        self.assertEqual(rsp.available_capacity, 2 * TiB)

    def test_download_create_delete(self) -> None:
        """
        A download fills the cache (counted), a volume from the cache and an empty volume
        take their sizes, deleting gives them back; on another host nothing changed.
        """
        self.call(0, p.LocalStorageInitCmd(path="/ps"))
        rsp = self.call(0, p.LocalStorageDownloadCmd(
            storage_path="/ps", image_uuid="img", primary_storage_install_path="/ps/c/img",
            size=10 * GiB, actual_size=2 * GiB))
        self.assertTrue(rsp.success, rsp.error)
        self.assertEqual((rsp.install_path, rsp.actual_size), ("/ps/c/img", 2 * GiB))
        self.assertEqual(rsp.available_capacity, 2 * TiB - 2 * GiB)
        self.assertEqual(self.pair.cluster.downloads[("local:0", "img")], 1)
        rsp = self.call(0, p.LocalStorageCreateVolumeFromCacheCmd(
            storage_path="/ps", volume_uuid="v1", template_path_in_cache="/ps/c/img",
            install_url="/ps/v1", virtual_size=10 * GiB))
        self.assertEqual(rsp.available_capacity, 2 * TiB - 12 * GiB)
        rsp = self.call(0, p.LocalStorageCreateEmptyVolumeCmd(
            storage_path="/ps", volume_uuid="v2", install_url="/ps/v2", size=GiB))
        self.assertEqual(rsp.available_capacity, 2 * TiB - 13 * GiB)
        for path in ("/ps/v1", "/ps/v2", "/ps/c/img", "/ps/missing"):
            rsp = self.call(0, p.LocalStorageDeleteCmd(storage_path="/ps", path=path))
            self.assertTrue(rsp.success, rsp.error)
        self.assertEqual(rsp.available_capacity, 2 * TiB)
        self.call(1, p.LocalStorageInitCmd(path="/ps"))
        self.assertEqual(self.pair.cluster.storage("1").local.files, {})

    def test_refusals(self) -> None:
        """
        A volume from a cache that is not there, commands before init, more than the disk
        holds: success=false with the reason, nothing taken.
        """
        rsp = self.call(0, p.LocalStorageCreateEmptyVolumeCmd(
            storage_path="/ps", volume_uuid="v", install_url="/ps/v", size=GiB))
        self.assertFalse(rsp.success)
        self.assertIn("not initialised", rsp.error)
        self.call(0, p.LocalStorageInitCmd(path="/ps"))
        rsp = self.call(0, p.LocalStorageCreateVolumeFromCacheCmd(
            storage_path="/ps", volume_uuid="v", template_path_in_cache="/ps/none",
            install_url="/ps/v", virtual_size=GiB))
        self.assertFalse(rsp.success)
        self.assertIn("no cached image", rsp.error)
        rsp = self.call(0, p.LocalStorageCreateEmptyVolumeCmd(
            storage_path="/ps", volume_uuid="v", install_url="/ps/v", size=3 * TiB))
        self.assertFalse(rsp.success)
        self.assertEqual(self.pair.cluster.storage("0").local.files, {})


class NfsTests(StorageAgentTestCase):
    """
    /nfsprimarystorage/*: one export per url, shared by the hosts that mount it.
    """

    def test_shared_export(self) -> None:
        """
        Two hosts mounting one url see the same files and capacity; a file created through
        one is deleted through the other.
        """
        rsp = self.mount(0)
        self.assertEqual((rsp.total_capacity, rsp.available_capacity), (10 * TiB, 10 * TiB))
        self.mount(1)
        self.call(0, p.NfsDownloadCmd(**self.nfs(), image_uuid="img",
                                      primary_storage_install_path="/mnt/ps/c/img",
                                      size=GiB, actual_size=GiB))
        rsp = self.call(1, p.NfsCreateRootVolumeCmd(**self.nfs(), volume_uuid="v",
                                                    template_path_in_cache="/mnt/ps/c/img",
                                                    install_url="/mnt/ps/v", virtual_size=GiB))
        self.assertTrue(rsp.success, rsp.error)
        rsp = self.call(1, p.NfsGetCapacityCmd(**self.nfs()))
        self.assertEqual(rsp.available_capacity, 10 * TiB - 2 * GiB)
        self.call(0, p.NfsDeleteCmd(**self.nfs(), install_path="/mnt/ps/v"))
        rsp = self.call(1, p.NfsCreateEmptyVolumeCmd(**self.nfs(), volume_uuid="d",
                                                     install_url="/mnt/ps/d", size=GiB))
        self.assertEqual(rsp.available_capacity, 10 * TiB - 2 * GiB)
        self.assertEqual(self.pair.cluster.downloads[(f"nfs:{URL}", "img")], 1)
        self.assertEqual(set(self.pair.cluster.nfs_exports[URL].files),
                         {"/mnt/ps/c/img", "/mnt/ps/d"})

    def test_mount_rules(self) -> None:
        """
        Commands on a host that does not mount the url fail; mounting twice at one path is
        fine; mounting at another path moves the mount there (fault of the new-user trial: a
        node whose store was wiped asks for a new mount path, and the agent that kept the old
        mount refused it for ever); unmount forgets; a url without server:/ is refused.
        """
        rsp = self.call(2, p.NfsGetCapacityCmd(**self.nfs()))
        self.assertFalse(rsp.success)
        self.assertIn("not mounted", rsp.error)
        self.assertTrue(self.mount(2).success)
        self.assertTrue(self.mount(2).success)
        self.assertTrue(self.mount(2, mount_path="/other").success)
        self.assertEqual(list(self.pair.cluster.storage("2").mounts.values()), ["/other"])
        self.assertTrue(self.call(2, p.NfsUnmountCmd(**self.nfs(mount_path="/other"))).success)
        self.assertEqual(self.pair.cluster.storage("2").mounts, {})
        self.assertFalse(self.mount(2, url="no-export").success)


class LatencyFailureTests(StorageAgentTestCase):
    """
    Latency and injected failures as for the other simulated commands.
    """

    config = {"latency": {"/nfsprimarystorage/downloadfromsftpbackupstorage":
                          parse_latency("const:30")},
              "local_disk": 100 * GiB, "nfs_capacity": 50 * GiB}

    def test_download_latency_and_config(self) -> None:
        """
        A download takes its path's latency; the disk sizes come from the config.
        """
        self.assertEqual(self.mount(0).total_capacity, 50 * GiB)
        d = self.pair.client.call(base(0), p.NfsDownloadCmd(
            **self.nfs(), image_uuid="img", primary_storage_install_path="/mnt/ps/img",
            size=GiB), raise_on_failure=False)
        self.pair.flush()
        self.clock.advance(29)
        self.pair.flush()
        self.assertNoResult(d)
        self.assertEqual(self.pair.cluster.nfs_exports[URL].files, {})
        self.clock.advance(1)
        self.pair.flush()
        self.assertTrue(self.successResultOf(d).success)
        self.assertEqual(self.call(1, p.LocalStorageInitCmd(path="/p")).total_capacity,
                         100 * GiB)

    def test_injected_failure(self) -> None:
        """
        With error rate 1 a download fails before it counts or takes space.
        """
        self.mount(0)
        self.pair.cluster.config.error_rate = 1.0
        rsp = self.call(0, p.NfsDownloadCmd(**self.nfs(), image_uuid="img",
                                            primary_storage_install_path="/mnt/ps/img",
                                            size=GiB), advance=30)
        self.assertFalse(rsp.success)
        self.assertIn("injected failure", rsp.error)
        self.assertEqual(self.pair.cluster.downloads, {})
        self.assertEqual(self.pair.cluster.nfs_exports[URL].files, {})


class PluginTests(SynchronousTestCase):
    """
    The plugin is known to twistd zagent and on by default.
    """

    def test_default_plugins(self) -> None:
        """
        C{storage} is in the default plugin list and names L{agent.storage.StoragePlugin}.
        """
        options = Options()
        options.parseOptions(["--bootstrap-token", "t" * 32])
        self.assertIn("storage", options["plugins"])
        self.assertEqual(PLUGINS["storage"][0], "agent.storage.StoragePlugin")

    def test_disk_options(self) -> None:
        """
        C{--local-disk} and C{--nfs-capacity} (GiB) size the simulated disks.
        """
        from agent.tap import build_agent

        options = Options()
        options.parseOptions(["--bootstrap-token", "t" * 32, "--local-disk", "3",
                              "--nfs-capacity", "7"])
        self.assertEqual((options["local-disk"], options["nfs-capacity"]), (3, 7))
        agent = build_agent(options, Clock())
        storage = agent._backend_factory("0").storage
        self.assertEqual(storage.local.total, 3 * GiB)
        self.assertEqual(storage._cluster.nfs_export(URL).total, 7 * GiB)
