# -*- test-case-name: tests.test_agent_storage -*-
"""
The primary storage agent plugin (C{--plugins ...,storage}): ZStack's LocalStorage and NFS
commands of the KVM agent (C{LocalStorageKvmBackend}, C{NfsPrimaryStorageKVMBackend}) on
the host's L{agent.hypervisor.storage_sim.SimulatedStorage}. Every response carries the
disk's or export's capacity after the command (C{totalCapacity}, C{availableCapacity},
bytes).
"""

from __future__ import annotations

from typing import Any

import attrs
from zope.interface import implementer

from agent import protocol as p
from agent.app import HostState, IAgentPlugin
from agent.hypervisor.interfaces import HypervisorError
from agent.hypervisor.storage_sim import StorageFigures

__all__ = ["StoragePlugin"]


def _storage(host: HostState) -> Any:
    storage = host.backends.storage
    if storage is None:
        raise HypervisorError(f"host {host.key} has no primary storage backend")
    return storage


def _capacity(f: StorageFigures) -> p.StorageCapacityRsp:
    return p.StorageCapacityRsp(total_capacity=f.total, available_capacity=f.available)


def _volume(f: StorageFigures) -> p.StorageVolumeRsp:
    return p.StorageVolumeRsp(total_capacity=f.total, available_capacity=f.available,
                              install_path=f.install_path, size=f.size,
                              actual_size=f.actual_size)


@implementer(IAgentPlugin)
@attrs.frozen
class StoragePlugin:
    """
    C{/localstorage/*} and C{/nfsprimarystorage/*}.
    """

    name = "storage"

    def handlers(self) -> dict[str, Any]:
        return {
            "/localstorage/init": self.local_init,
            "/localstorage/getphysicalcapacity": self.local_capacity,
            "/localstorage/sftp/download": self.local_download,
            "/localstorage/volume/createvolumefromcache": self.local_create_from_cache,
            "/localstorage/volume/createempty": self.local_create_empty,
            "/localstorage/delete": self.local_delete,
            "/nfsprimarystorage/mount": self.nfs_mount,
            "/nfsprimarystorage/unmount": self.nfs_unmount,
            "/nfsprimarystorage/getcapacity": self.nfs_capacity,
            "/nfsprimarystorage/downloadfromsftpbackupstorage": self.nfs_download,
            "/nfsprimarystorage/sftp/createvolumefromtemplate": self.nfs_create_root,
            "/nfsprimarystorage/createemptyvolume": self.nfs_create_empty,
            "/nfsprimarystorage/delete": self.nfs_delete,
        }

    # --- LocalStorage --------------------------------------------------------------------

    def local_init(self, host: HostState, cmd: p.LocalStorageInitCmd) -> Any:
        return _storage(host).local_init(cmd.path).addCallback(_capacity)

    def local_capacity(self, host: HostState, cmd: p.LocalStorageGetPhysicalCapacityCmd) -> Any:
        return _storage(host).local_capacity(cmd.storage_path).addCallback(_capacity)

    def local_download(self, host: HostState, cmd: p.LocalStorageDownloadCmd) -> Any:
        return _storage(host).local_download(
            cmd.storage_path, cmd.image_uuid, cmd.primary_storage_install_path, cmd.size,
            cmd.actual_size or cmd.size).addCallback(_volume)

    def local_create_from_cache(self, host: HostState,
                                cmd: p.LocalStorageCreateVolumeFromCacheCmd) -> Any:
        return _storage(host).local_create_from_cache(
            cmd.storage_path, cmd.template_path_in_cache, cmd.install_url,
            cmd.virtual_size).addCallback(_volume)

    def local_create_empty(self, host: HostState, cmd: p.LocalStorageCreateEmptyVolumeCmd) -> Any:
        return _storage(host).local_create_empty(
            cmd.storage_path, cmd.install_url, cmd.size).addCallback(_volume)

    def local_delete(self, host: HostState, cmd: p.LocalStorageDeleteCmd) -> Any:
        return _storage(host).local_delete(cmd.storage_path, cmd.path).addCallback(_capacity)

    # --- NFS -----------------------------------------------------------------------------

    def nfs_mount(self, host: HostState, cmd: p.NfsMountCmd) -> Any:
        return _storage(host).nfs_mount(cmd.url, cmd.mount_path).addCallback(_capacity)

    def nfs_unmount(self, host: HostState, cmd: p.NfsUnmountCmd) -> Any:
        return _storage(host).nfs_unmount(cmd.url, cmd.mount_path).addCallback(_capacity)

    def nfs_capacity(self, host: HostState, cmd: p.NfsGetCapacityCmd) -> Any:
        return _storage(host).nfs_capacity(cmd.url, cmd.mount_path).addCallback(_capacity)

    def nfs_download(self, host: HostState, cmd: p.NfsDownloadCmd) -> Any:
        return _storage(host).nfs_download(
            cmd.url, cmd.mount_path, cmd.image_uuid, cmd.primary_storage_install_path,
            cmd.size, cmd.actual_size or cmd.size).addCallback(_volume)

    def nfs_create_root(self, host: HostState, cmd: p.NfsCreateRootVolumeCmd) -> Any:
        return _storage(host).nfs_create_root(
            cmd.url, cmd.mount_path, cmd.template_path_in_cache, cmd.install_url,
            cmd.virtual_size).addCallback(_volume)

    def nfs_create_empty(self, host: HostState, cmd: p.NfsCreateEmptyVolumeCmd) -> Any:
        return _storage(host).nfs_create_empty(
            cmd.url, cmd.mount_path, cmd.install_url, cmd.size).addCallback(_volume)

    def nfs_delete(self, host: HostState, cmd: p.NfsDeleteCmd) -> Any:
        return _storage(host).nfs_delete(cmd.url, cmd.mount_path,
                                         cmd.install_path).addCallback(_capacity)
