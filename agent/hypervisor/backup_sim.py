# -*- test-case-name: tests.test_agent_sftp -*-
"""
The simulated Sftp backup storage: one per agent host slot (C{/hosts/<i>}), its images in
memory, its capacity accounted.

Note [simulated downloads]: a download takes the latency configured for
C{/sftpbackupstorage/download} (L{agent.hypervisor.simulator.SimulatorConfig.latency}) and
fails:
 - with the injected failure of every simulated operation (C{error_rate});
 - when the URL contains C{fail} (any case), or is in L{SimulatedBackupStorage.failing_urls}:
   the reason is the URL query's C{fail} value when it has one (C{?fail=disk%20full}), else
   C{"simulated download failure"};
 - when its scheme is none of L{SCHEMES} (C{nfs://...}: "unsupported url scheme[nfs]");
 - when the storage has less available capacity than the image's actual size.
The image's sizes are derived from the URL: its query's C{size} (bytes) is the virtual size
and C{actualSize} (bytes) the size on disk (default: C{size}); without them an image is
L{DEFAULT_ACTUAL_SIZE} on disk and L{DEFAULT_SIZE} virtual. The md5 is the URL's. A download
to an install path already holding bits replaces them.
"""

from __future__ import annotations

import hashlib
from urllib.parse import parse_qs, urlsplit

import attrs
from twisted.internet.defer import Deferred

from agent.hypervisor.interfaces import HypervisorError, NoCapacity
from agent.hypervisor.simulator import SimulatorConfig, _Simulated

__all__ = [
    "DEFAULT_ACTUAL_SIZE",
    "DEFAULT_CAPACITY",
    "DEFAULT_SIZE",
    "DownloadedImage",
    "SCHEMES",
    "SimulatedBackupStorage",
]

GiB = 1024**3
#: A backup storage's capacity unless C{SimulatorConfig.backup_storage_capacity} says.
DEFAULT_CAPACITY = 10 * 1024**4
#: An image's virtual size and size on disk when its URL names none (bytes).
DEFAULT_SIZE = 8 * GiB
DEFAULT_ACTUAL_SIZE = 1 * GiB
#: The URL schemes the simulated storage downloads from.
SCHEMES = ("http", "https", "file", "ftp", "sftp")


@attrs.frozen
class DownloadedImage:
    """
    An image on the storage: its install path, sizes (bytes), md5 and format.
    """

    install_path: str
    image_uuid: str
    size: int
    actual_size: int
    md5_sum: str
    format: str | None


def _int_param(query: dict[str, list[str]], name: str, url: str) -> int | None:
    values = query.get(name)
    if not values:
        return None
    try:
        value = int(values[0])
    except ValueError:
        raise HypervisorError(f"download of {url} failed: {name}={values[0]!r} is not a size "
                              "in bytes") from None
    if value < 0:
        raise HypervisorError(f"download of {url} failed: {name} must not be negative")
    return value


class SimulatedBackupStorage(_Simulated):
    """
    One simulated Sftp backup storage (see the module docstring).

    @ivar key: the agent host slot serving it.
    @ivar storage_path: the path given at connect (None before).
    @ivar images: install path -> L{DownloadedImage}.
    @ivar failing_urls: URLs whose download fails (besides those containing C{fail}).
    """

    def __init__(self, key: str, config: SimulatorConfig) -> None:
        super().__init__(config)
        self.key = key
        self.total_capacity: int = getattr(config, "backup_storage_capacity", DEFAULT_CAPACITY)
        self.storage_path: str | None = None
        self.uuid: str | None = None
        self.images: dict[str, DownloadedImage] = {}
        self.failing_urls: set[str] = set()

    @property
    def used_capacity(self) -> int:
        """
        Bytes held by the images (their actual sizes).
        """
        return sum(i.actual_size for i in self.images.values())

    @property
    def available_capacity(self) -> int:
        """
        Bytes free.
        """
        return self.total_capacity - self.used_capacity

    def capacity(self) -> tuple[int, int]:
        """
        (total, available) bytes, now.
        """
        return self.total_capacity, self.available_capacity

    def connect(self, uuid: str, storage_path: str) -> Deferred[tuple[int, int]]:
        """
        Take the storage into use at C{storage_path}.

        @return: a Deferred firing with (total, available) capacity in bytes.
        """
        def do() -> tuple[int, int]:
            if not storage_path.startswith("/"):
                raise HypervisorError(f"storage path {storage_path!r} is not an absolute path")
            self.uuid, self.storage_path = uuid, storage_path
            return self.capacity()

        return self._op("/sftpbackupstorage/connect", do)

    def download(self, image_uuid: str, url: str, install_path: str,
                 format: str | None = None) -> Deferred[DownloadedImage]:
        """
        Download C{url} to C{install_path} (Note [simulated downloads]).

        @return: a Deferred firing with the L{DownloadedImage}; fails with
            L{HypervisorError} saying why.
        """
        def do() -> DownloadedImage:
            try:
                parts = urlsplit(url)
            except ValueError:
                raise HypervisorError(f"download of {url!r} failed: not a URL") from None
            scheme = parts.scheme.lower()
            if scheme not in SCHEMES:
                raise HypervisorError(
                    f"unsupported url scheme[{scheme or 'none'}] of {url}: the Sftp backup "
                    f"storage downloads only from {', '.join(SCHEMES)}")
            query = parse_qs(parts.query)
            if "fail" in url.lower() or url in self.failing_urls:
                reason = (query.get("fail") or ["simulated download failure"])[0]
                raise HypervisorError(f"download of {url} failed: {reason}")
            size = _int_param(query, "size", url)
            actual = _int_param(query, "actualSize", url)
            if size is None:
                size = DEFAULT_SIZE if actual is None else actual
                actual = DEFAULT_ACTUAL_SIZE if actual is None else actual
            elif actual is None:
                actual = size
            old = self.images.get(install_path)
            freed = old.actual_size if old is not None else 0
            if actual > self.available_capacity + freed:
                raise NoCapacity(
                    f"download of {url} failed: the image takes {actual} bytes, backup "
                    f"storage {self.uuid or self.key} has {self.available_capacity} available")
            image = DownloadedImage(
                install_path=install_path, image_uuid=image_uuid, size=size,
                actual_size=actual, md5_sum=hashlib.md5(url.encode("utf-8")).hexdigest(),
                format=format)
            self.images[install_path] = image
            return image

        return self._op("/sftpbackupstorage/download", do)

    def delete(self, install_url: str) -> Deferred[None]:
        """
        Delete the bits at C{install_url} (nothing there is not an error).
        """
        def do() -> None:
            self.images.pop(install_url, None)

        return self._op("/sftpbackupstorage/delete", do)

    def __repr__(self) -> str:
        return f"<SimulatedBackupStorage {self.key} {self.uuid} {len(self.images)} images>"


