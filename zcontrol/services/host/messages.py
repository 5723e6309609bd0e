# -*- test-case-name: tests.test_host_service -*-
"""
The host service's bus messages and events.

A host's C{managementIp} holds its agent's base URL (C{http://10.0.0.5:7070}, or
C{http://127.0.0.1:7070/hosts/17} for a simulated host of a many-host agent); a bare IP or
host name means C{http://<ip>:<agent port>}.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from zcontrol.bus.message import Event, NeedReplyMessage, Reply, registry
from zcontrol.core.errors import register_codes

__all__ = [
    "HOST",
    "SERVICE_ID",
    "AddHostMsg",
    "ConnectHostMsg",
    "ChangeHostStateMsg",
    "DeleteHostMsg",
    "HostDeletedEvent",
    "HostStateChangedEvent",
    "HostReply",
    "KVMHostAsyncHttpCallMsg",
    "KVMHostAsyncHttpCallReply",
    "HostStatusChangedEvent",
    "PingHostMsg",
    "PingHostReply",
    "ReconnectHostMsg",
    "UpdateHostMsg",
    "VmStateChangedOnHostEvent",
]

#: The bus service id of the host service.
SERVICE_ID = "host"


class HOST:
    """
    The host service's error codes.
    """

    _codes = register_codes(
        "HOST",
        {
            1000: "Unable to add the host",
            1001: "Unable to connect the host",
            1002: "The host is not connected",
            1003: "No such host",
            1004: "A host with the same management IP already exists",
            1005: "The host has VMs that prevent the operation",
            1006: "Unable to delete the host",
        },
    )
    ADD_ERROR = _codes[1000]
    CONNECT_ERROR = _codes[1001]
    NOT_CONNECTED = _codes[1002]
    NOT_FOUND = _codes[1003]
    #: ZStack's "there has been a host having managementIp": here two addresses are the
    #: same when they name the same agent base URL (see
    #: L{zcontrol.services.host.service.canonical_agent_url}).
    DUPLICATE_MANAGEMENT_IP = _codes[1004]
    #: Details: C{hostUuid}, C{vmUuids} (at most 20), C{vmCount}, C{operation}.
    HAS_VMS = _codes[1005]
    #: Details: C{hostUuid} and, when something in the store still holds the host,
    #: C{holders} (C{{kind: [uuids]}}); the cause is a primary storage's refusal if any.
    DELETE_ERROR = _codes[1006]


@registry.register
@attrs.define(kw_only=True)
class HostReply(Reply):
    """
    A reply carrying the host's inventory (its store row).
    """

    inventory: dict[str, Any] | None = None


@registry.register
@attrs.define(kw_only=True)
class AddHostMsg(NeedReplyMessage):
    """
    Add a KVM host and connect it; if it cannot be connected it is removed again (as ZStack
    does) and the reply fails with C{HOST.1000}. A C{management_ip} naming the agent of an
    existing host (in any spelling: C{10.0.0.5}, C{http://10.0.0.5:7070/}) fails with
    C{HOST.1004} (details: C{field}, C{value}, C{existingHostUuid}, C{agentUrl}); a
    malformed one with C{SYS.1007}. The host keeps C{managementIp} as given.
    """

    reply_type: ClassVar[type[Reply]] = HostReply

    name: str
    zone_uuid: str
    cluster_uuid: str
    management_ip: str
    uuid: str | None = None
    description: str | None = None
    hypervisor_type: str = "KVM"


@registry.register
@attrs.define(kw_only=True)
class ConnectHostMsg(NeedReplyMessage):
    """
    (Re)connect a host: echo until its agent is up, connect (new callback secret), read its
    facts and capacity into the store, mark it Connected.
    """

    reply_type: ClassVar[type[Reply]] = HostReply

    host_uuid: str


@registry.register
@attrs.define(kw_only=True)
class PingHostReply(Reply):
    """
    The outcome of a ping: whether the host is connected after it.
    """

    connected: bool = False
    status: str | None = None


@registry.register
@attrs.define(kw_only=True)
class PingHostMsg(NeedReplyMessage):
    """
    Ping one host (the tracker sends these with a parallelism bound).
    """

    reply_type: ClassVar[type[Reply]] = PingHostReply

    host_uuid: str


@registry.register
@attrs.define(kw_only=True)
class HostStatusChangedEvent(Event):
    """
    A host's connection status changed.
    """

    topic: ClassVar[str] = "host.status"

    host_uuid: str
    old_status: str | None
    new_status: str
    reason: str | None = None


@registry.register
@attrs.define(kw_only=True)
class VmStateChangedOnHostEvent(Event):
    """
    A VM's state on a host differs from the store's (reported by the agent or found by a VM
    sync); C{from_state} is the store's state before the change.
    """

    topic: ClassVar[str] = "host.vmstate"

    host_uuid: str
    vm_uuid: str
    from_state: str | None
    to_state: str


@registry.register
@attrs.define(kw_only=True)
class KVMHostAsyncHttpCallReply(Reply):
    """
    The agent's response to a L{KVMHostAsyncHttpCallMsg}, as its JSON object (camelCase
    keys, as L{agent.protocol.Message.to_dict} gives them; decode it with the command's
    response type's C{from_dict}).
    """

    response: dict[str, Any] = attrs.field(factory=dict)


@registry.register
@attrs.define(kw_only=True)
class KVMHostAsyncHttpCallMsg(NeedReplyMessage):
    """
    Run an agent command on a Connected host, through the host's chain (ZStack's
    C{KVMHostAsyncHttpCallMsg}): how a service on any node (primary storage, networks)
    commands a host its own node may not own. Send it with C{resource_uuid} = C{host_uuid}.

    @ivar path: the command path, a key of L{agent.protocol.COMMANDS} (e.g.
        C{"/localstorage/init"}).
    @ivar command: the command body as a JSON object (C{cmd.to_dict()}).
    @ivar command_timeout: seconds the agent has to answer (default: the host service's
        C{command_timeout}); the message's deadline caps it.

    Fails with C{HOST.1002} (not Connected), C{HOST.1003} (unknown), C{SYS.1007} (unknown
    path or a body that is not the path's command), or as the agent client's C{call}
    (C{AGENT.1000} not sent, C{SYS.1001} timeout, ...). An agent answering C{success=false}
    is a successful reply whose C{response} says so: the caller decides.
    """

    reply_type: ClassVar[type[Reply]] = KVMHostAsyncHttpCallReply

    host_uuid: str
    path: str
    command: dict[str, Any] = attrs.field(factory=dict)
    command_timeout: float | None = None


@registry.register
@attrs.define(kw_only=True)
class HostDeletedEvent(Event):
    """
    A host was deleted (its row is gone): services drop what they kept for it.
    """

    topic: ClassVar[str] = "host.deleted"

    host_uuid: str
    cluster_uuid: str | None = None
    zone_uuid: str | None = None


#: C{ChangeHostStateMsg.state_event} -> the state it ends in (ZStack's C{HostStateEvent}
#: C{enable}, C{disable}, C{maintain}; C{preMaintain} is internal).
HOST_STATE_EVENTS = {"enable": "Enabled", "disable": "Disabled", "maintain": "Maintenance"}


@registry.register
@attrs.define(kw_only=True)
class ChangeHostStateMsg(NeedReplyMessage):
    """
    Change a host's administrative state (ZStack's C{APIChangeHostStateMsg}):
    C{state_event} C{enable} -> C{Enabled}, C{disable} -> C{Disabled}, C{maintain} ->
    C{PreMaintenance} -> C{Maintenance}. Send with C{resource_uuid} = C{uuid}.

    Only an C{Enabled} host gets new VMs (the allocator filters on the state). C{maintain}
    (ZStack's maintenance) passes through C{PreMaintenance} (no new VMs), live-migrates
    the active VMs away where their storage allows (not LocalStorage) and stops the others
    (and those whose migration failed), then reaches C{Maintenance}; when a VM could be
    neither migrated nor stopped (or capacity is still held on the host), the host returns
    to its previous state and the reply fails with C{HOST.1005} naming the VMs and why (see
    Note [maintenance] in L{zcontrol.services.host.operations}).
    """

    reply_type: ClassVar[type[Reply]] = HostReply

    uuid: str
    state_event: str


@registry.register
@attrs.define(kw_only=True)
class UpdateHostMsg(NeedReplyMessage):
    """
    Change a host's name and/or description (None: unchanged). ZStack's
    C{APIUpdateHostMsg} can change C{managementIp} too; here a host moves by delete and add.
    """

    reply_type: ClassVar[type[Reply]] = HostReply

    uuid: str
    name: str | None = None
    description: str | None = None


@registry.register
@attrs.define(kw_only=True)
class ReconnectHostMsg(NeedReplyMessage):
    """
    Reconnect a host (ZStack's C{APIReconnectHostMsg}): the same as L{ConnectHostMsg}.
    """

    reply_type: ClassVar[type[Reply]] = HostReply

    uuid: str


@registry.register
@attrs.define(kw_only=True)
class DeleteHostMsg(NeedReplyMessage):
    """
    Delete a host (ZStack's C{APIDeleteHostMsg}). Refused with C{HOST.1005} while VMs (in
    any state but C{Destroyed}) are on it. Every primary storage attached to the host's
    cluster is told first (L{zcontrol.services.primarystorage.messages.
    RemoveHostFromPrimaryStorageMsg}); one refusing stops the delete with C{HOST.1006}
    (its error the cause). Then the agent client and the service forget the host, the row
    goes, and L{HostDeletedEvent} is published.
    """

    reply_type: ClassVar[type[Reply]] = HostReply

    uuid: str


@registry.register
@attrs.define(kw_only=True)
class HostStateChangedEvent(Event):
    """
    A host's administrative state changed (committed).
    """

    topic: ClassVar[str] = "host.state"

    host_uuid: str
    old_state: str
    new_state: str
