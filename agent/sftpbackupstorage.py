# -*- test-case-name: tests.test_agent_sftp -*-
"""
The Sftp backup storage agent plugin (ZStack's C{sftpbackupstorage} agent, port 7171): connect,
download an image from a URL, delete bits, on the host slot's simulated backup storage
(L{agent.hypervisor.backup_sim}).

The framework's C{/host/echo}, C{/host/connect} (the callback secret) and C{/host/ping} serve
the backup storage as they serve a host: the management node connects a backup storage as it
connects a host, with the backup storage's uuid as the "host uuid". Every response carries the
storage's C{totalCapacity} and C{availableCapacity} (bytes), failed ones too, as ZStack's do.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.python.failure import Failure
from zope.interface import implementer

from agent import protocol as p
from agent.app import HostState, IAgentPlugin
from agent.hypervisor.backup_sim import DownloadedImage, SimulatedBackupStorage
from agent.hypervisor.interfaces import HypervisorError

__all__ = ["SftpBackupStoragePlugin"]

CONNECT_PATH = "/sftpbackupstorage/connect"
DOWNLOAD_PATH = "/sftpbackupstorage/download"
DELETE_PATH = "/sftpbackupstorage/delete"


def _bs(host: HostState) -> SimulatedBackupStorage:
    bs = host.backends.backup_storage
    if bs is None:
        raise HypervisorError(f"host slot {host.key} serves no backup storage")
    return bs


def _failed(rsp_type: type[p.SftpBackupStorageRsp], bs: SimulatedBackupStorage) -> Any:
    def failed(reason: Failure) -> p.SftpBackupStorageRsp:
        if not reason.check(HypervisorError):
            return reason  # a bug: the framework logs it and answers success=false
        total, available = bs.capacity()
        return rsp_type(success=False, error=str(reason.value), total_capacity=total,
                        available_capacity=available)

    return failed


@implementer(IAgentPlugin)
@attrs.frozen
class SftpBackupStoragePlugin:
    """
    C{/sftpbackupstorage/connect}, C{/sftpbackupstorage/download},
    C{/sftpbackupstorage/delete}.
    """

    name = "sftpbackupstorage"

    def handlers(self) -> dict[str, Any]:
        return {
            CONNECT_PATH: self.connect,
            DOWNLOAD_PATH: self.download,
            DELETE_PATH: self.delete,
        }

    def connect(self, host: HostState, cmd: p.SftpConnectCmd) -> Any:
        bs = _bs(host)
        return bs.connect(cmd.uuid, cmd.storage_path).addCallbacks(
            lambda c: p.SftpConnectRsp(total_capacity=c[0], available_capacity=c[1]),
            _failed(p.SftpConnectRsp, bs))

    def download(self, host: HostState, cmd: p.SftpDownloadCmd) -> Any:
        bs = _bs(host)

        def done(image: DownloadedImage) -> p.SftpDownloadRsp:
            total, available = bs.capacity()
            return p.SftpDownloadRsp(
                image_uuid=image.image_uuid, install_path=image.install_path,
                md5_sum=image.md5_sum, size=image.size, actual_size=image.actual_size,
                format=image.format, total_capacity=total, available_capacity=available)

        return bs.download(cmd.image_uuid, cmd.url, cmd.install_path, cmd.format).addCallbacks(
            done, _failed(p.SftpDownloadRsp, bs))

    def delete(self, host: HostState, cmd: p.SftpDeleteCmd) -> Any:
        bs = _bs(host)

        def done(_: Any) -> p.SftpDeleteRsp:
            total, available = bs.capacity()
            return p.SftpDeleteRsp(total_capacity=total, available_capacity=available)

        return bs.delete(cmd.install_url).addCallbacks(done, _failed(p.SftpDeleteRsp, bs))
