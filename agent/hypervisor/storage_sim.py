# -*- test-case-name: tests.test_agent_storage -*-
"""
The simulated primary storage of one host: its local disk (LocalStorage) and its NFS mounts,
the image cache and the volumes on them.

Note [simulated storage]: a host's local disk has C{SimulatorConfig.local_disk} bytes and
belongs to that host alone; an NFS export (C{server:/export}) is an L{NfsExport} of the
L{agent.hypervisor.simulator.SimulatedCluster} (C{SimulatorConfig.nfs_capacity} bytes), so
every host of the agent process that mounts the same URL sees the same files and capacity.
Files are install paths with a size; creating one takes that size from its disk or export
(creating it again with the same size is a no-op, as ZStack's agents answer a retried
command; another size is refused),
deleting it gives the size back (deleting a missing file is not an error, as ZStack's agents
do). Each operation takes the latency configured for its command path and fails with the
configured error rate (L{agent.hypervisor.simulator._Simulated._op}); state changes at the
end of the latency, in one reactor turn.

Every image download that reached a disk or export is counted in
C{SimulatedCluster.downloads}, keyed by (cache location, image uuid): C{("local:<host
key>", image)} or C{("nfs:<url>", image)}, so tests can assert how many copies were made.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred

from agent.hypervisor.interfaces import HypervisorError, NoCapacity

if TYPE_CHECKING:  # pragma: no cover
    from agent.hypervisor.simulator import SimulatedCluster, SimulatorConfig

__all__ = ["Disk", "NfsExport", "SimulatedStorage", "StorageFigures"]


@attrs.frozen
class StorageFigures:
    """
    Capacity of a disk or export after an operation, and what it created (if anything).

    @ivar total: bytes.
    @ivar available: bytes.
    @ivar install_path: the file created (None when nothing was).
    @ivar size: its virtual size, bytes.
    @ivar actual_size: the bytes it takes.
    """

    total: int
    available: int
    install_path: str | None = None
    size: int = 0
    actual_size: int = 0


@attrs.define
class Disk:
    """
    A disk (a host's local disk, or an NFS export): files by install path with the bytes
    they take.
    """

    total: int
    files: dict[str, int] = attrs.Factory(dict)

    @property
    def available(self) -> int:
        return self.total - sum(self.files.values())

    def create(self, path: str, size: int) -> None:
        """
        Create C{path} of C{size} bytes. Idempotent for the same path and size (a retried
        command, as ZStack's agents answer it); another size is refused.
        """
        if path in self.files:
            if self.files[path] == size:
                return
            raise HypervisorError(f"{path} already exists ({self.files[path]} bytes, not"
                                  f" {size})")
        if size < 0:
            raise HypervisorError(f"negative size {size} for {path}")
        if size > self.available:
            raise NoCapacity(f"{path}: {size} bytes asked, {self.available} available")
        self.files[path] = size

    def figures(self, path: str | None = None, size: int = 0, actual: int = 0
                ) -> StorageFigures:
        return StorageFigures(self.total, self.available, path, size, actual)


@attrs.define
class NfsExport(Disk):
    """
    An NFS export shared by every host of the agent process that mounts its URL.
    """

    url: str = ""


class SimulatedStorage:
    """
    The primary storage of one simulated host (see Note [simulated storage]).

    @ivar local: the host's local disk.
    @ivar local_paths: the LocalStorage urls initialised on it.
    @ivar mounts: NFS url -> mount path, for the exports this host mounts.
    """

    def __init__(self, key: str, config: SimulatorConfig, cluster: SimulatedCluster) -> None:
        from agent.hypervisor.simulator import _Simulated

        self._sim = _Simulated(config)
        self.key = key
        self._cluster = cluster
        self.local = Disk(total=config.local_disk)
        self.local_paths: set[str] = set()
        self.mounts: dict[str, str] = {}

    def _op(self, op: str, fn: Any) -> Deferred:
        return self._sim._op(op, fn)

    # --- LocalStorage ----------------------------------------------------------------------

    def _local_ready(self, storage_path: str) -> Disk:
        if storage_path not in self.local_paths:
            raise HypervisorError(f"local storage {storage_path} is not initialised on host "
                                  f"{self.key}")
        return self.local

    def local_init(self, path: str) -> Deferred[StorageFigures]:
        """
        Prepare C{path} on the local disk (idempotent).
        """
        def do() -> StorageFigures:
            self.local_paths.add(path)
            return self.local.figures()

        return self._op("/localstorage/init", do)

    def local_capacity(self, storage_path: str) -> Deferred[StorageFigures]:
        return self._op("/localstorage/getphysicalcapacity", lambda: self.local.figures())

    def local_download(self, storage_path: str, image_uuid: str, install_path: str,
                       size: int, actual_size: int) -> Deferred[StorageFigures]:
        """
        Copy an image into the local cache (counted in C{cluster.downloads}).
        """
        def do() -> StorageFigures:
            disk = self._local_ready(storage_path)
            self._cluster.count_download(f"local:{self.key}", image_uuid)
            disk.create(install_path, actual_size)
            return disk.figures(install_path, size, actual_size)

        return self._op("/localstorage/sftp/download", do)

    def local_create_from_cache(self, storage_path: str, cache_path: str, install_path: str,
                                size: int) -> Deferred[StorageFigures]:
        def do() -> StorageFigures:
            disk = self._local_ready(storage_path)
            if cache_path not in disk.files:
                raise HypervisorError(f"no cached image {cache_path} on host {self.key}")
            disk.create(install_path, size)
            return disk.figures(install_path, size, size)

        return self._op("/localstorage/volume/createvolumefromcache", do)

    def local_create_empty(self, storage_path: str, install_path: str, size: int
                           ) -> Deferred[StorageFigures]:
        def do() -> StorageFigures:
            disk = self._local_ready(storage_path)
            disk.create(install_path, size)
            return disk.figures(install_path, size, size)

        return self._op("/localstorage/volume/createempty", do)

    def local_delete(self, storage_path: str, path: str) -> Deferred[StorageFigures]:
        def do() -> StorageFigures:
            self.local.files.pop(path, None)
            return self.local.figures()

        return self._op("/localstorage/delete", do)

    # --- NFS -------------------------------------------------------------------------------

    def _mounted(self, url: str, mount_path: str) -> NfsExport:
        if self.mounts.get(url) != mount_path:
            raise HypervisorError(f"{url} is not mounted at {mount_path} on host {self.key}")
        return self._cluster.nfs_export(url)

    def nfs_mount(self, url: str, mount_path: str) -> Deferred[StorageFigures]:
        """
        Mount C{url} at C{mount_path} (idempotent). A mount of the same url at another path
        moves it there: Linux mounts one export at several points, and the other path is
        what a management node whose store was wiped (a new primary storage uuid, so a new
        mount path) asks for, while this agent kept the old mount (ZStack's agent mounts
        when the path is not mounted, whatever else is).
        """
        def do() -> StorageFigures:
            if ":/" not in url:
                raise HypervisorError(f"{url} is not an NFS url (server:/export)")
            self.mounts[url] = mount_path
            return self._cluster.nfs_export(url).figures()

        return self._op("/nfsprimarystorage/mount", do)

    def nfs_unmount(self, url: str, mount_path: str) -> Deferred[StorageFigures]:
        def do() -> StorageFigures:
            if self.mounts.get(url) == mount_path:
                del self.mounts[url]
            return self._cluster.nfs_export(url).figures()

        return self._op("/nfsprimarystorage/unmount", do)

    def nfs_capacity(self, url: str, mount_path: str) -> Deferred[StorageFigures]:
        return self._op("/nfsprimarystorage/getcapacity",
                        lambda: self._mounted(url, mount_path).figures())

    def nfs_download(self, url: str, mount_path: str, image_uuid: str, install_path: str,
                     size: int, actual_size: int) -> Deferred[StorageFigures]:
        def do() -> StorageFigures:
            export = self._mounted(url, mount_path)
            self._cluster.count_download(f"nfs:{url}", image_uuid)
            export.create(install_path, actual_size)
            return export.figures(install_path, size, actual_size)

        return self._op("/nfsprimarystorage/downloadfromsftpbackupstorage", do)

    def nfs_create_root(self, url: str, mount_path: str, cache_path: str, install_path: str,
                        size: int) -> Deferred[StorageFigures]:
        def do() -> StorageFigures:
            export = self._mounted(url, mount_path)
            if cache_path not in export.files:
                raise HypervisorError(f"no cached image {cache_path} on {url}")
            export.create(install_path, size)
            return export.figures(install_path, size, size)

        return self._op("/nfsprimarystorage/sftp/createvolumefromtemplate", do)

    def nfs_create_empty(self, url: str, mount_path: str, install_path: str, size: int
                         ) -> Deferred[StorageFigures]:
        def do() -> StorageFigures:
            export = self._mounted(url, mount_path)
            export.create(install_path, size)
            return export.figures(install_path, size, size)

        return self._op("/nfsprimarystorage/createemptyvolume", do)

    def nfs_delete(self, url: str, mount_path: str, install_path: str
                   ) -> Deferred[StorageFigures]:
        def do() -> StorageFigures:
            export = self._mounted(url, mount_path)
            export.files.pop(install_path, None)
            return export.figures()

        return self._op("/nfsprimarystorage/delete", do)
