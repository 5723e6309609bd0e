# -*- test-case-name: tests.test_primary_storage -*-
"""
The primary storage service's bus messages and events.
"""

from __future__ import annotations

from typing import ClassVar

import attrs

from zcontrol.bus.message import NeedReplyMessage, Reply, registry

__all__ = ["SERVICE_ID", "RemoveHostFromPrimaryStorageMsg"]

#: The bus service id of the primary storage service (ZStack: C{storage.primary}).
SERVICE_ID = "storage.primary"


@registry.register
@attrs.define(kw_only=True)
class RemoveHostFromPrimaryStorageMsg(NeedReplyMessage):
    """
    A host is about to be deleted: drop what the primary storage keeps on it (its NFS mount
    record; for LocalStorage its image caches and its share of the storage's capacity).
    Refused while volumes are on the host's local storage (the error names them). Sent by
    the host service with C{resource_uuid} = C{primary_storage_uuid}, for every primary
    storage attached to the host's cluster (ZStack's C{RemoveHostFromLocalStorageMsg}).
    """

    reply_type: ClassVar[type[Reply]] = Reply

    primary_storage_uuid: str
    host_uuid: str
