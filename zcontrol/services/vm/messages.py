# -*- test-case-name: tests.test_vm_lifecycle -*-
"""
The VM and volume services' bus messages and events: ZStack's VM API messages
(C{header/vm/APICreateVmInstanceMsg.java} and its siblings, C{header/volume/APICreateDataVolumeMsg.java}
and its siblings), with the field names of their C{@APIParam}s in snake_case (the bus codec
speaks camelCase on the wire: C{instanceOfferingUuid}).

Routing: a message about one VM is sent with C{resource_uuid} = the VM's uuid, so the bus runs
it on the VM's owner node, where the VM service runs it in the VM's chain C{vm-<uuid>} (level
1: one operation at a time per VM, in arrival order). A create picks the VM uuid first (the
message's C{resource_uuid} when the sender chose it, else a new one) and forwards itself to its
owner. Volume messages are routed by the volume's uuid to the volume service; attach and detach
go to the VM service (routed by the VM uuid), which serialises them with the VM's other
operations.

Every long operation is a journaled job (L{zcontrol.core.journal}); its job uuid is the trace id
of everything it causes, and is returned in the reply's C{job_uuid}.
"""

from __future__ import annotations

from typing import Any, ClassVar

import attrs

from zcontrol.bus.message import Event, NeedReplyMessage, Reply, registry
from zcontrol.core.errors import register_codes

__all__ = [
    "CREATE_STRATEGIES",
    "DELETION_POLICIES",
    "SERVICE_ID",
    "STOP_TYPES",
    "VOLUME",
    "VOLUME_SERVICE_ID",
    "AttachDataVolumeToVmMsg",
    "AttachL3NetworkToVmMsg",
    "ChangeInstanceOfferingMsg",
    "CreateDataVolumeMsg",
    "CreateVmInstanceMsg",
    "DeleteDataVolumeMsg",
    "DestroyVmInstanceMsg",
    "DetachDataVolumeFromVmMsg",
    "DetachL3NetworkFromVmMsg",
    "ExpungeDataVolumeMsg",
    "ExpungeVmInstanceMsg",
    "MigrateVmMsg",
    "RebootVmInstanceMsg",
    "RecoverVmInstanceMsg",
    "StartVmInstanceMsg",
    "StopVmInstanceMsg",
    "VmInstanceReply",
    "VmStateChangedOnHostMsg",
    "VmInstanceStateChangedEvent",
    "VolumeReply",
]

#: The bus service id of the VM service (ZStack: C{vmInstance}).
SERVICE_ID = "vmInstance"
#: The bus service id of the volume service (ZStack: C{volume}).
VOLUME_SERVICE_ID = "volume"

#: ZStack's C{VmCreationStrategy}: C{InstantStart} (start at once), C{CreateStopped} (create the
#: VM and its resources, leave it Stopped), C{JustCreate} (record it only: Created, nothing
#: allocated; started later).
CREATE_STRATEGIES = ("InstantStart", "CreateStopped", "JustCreate")
#: ZStack's C{StopVmType}: C{grace} (shutdown, forced after the timeout), C{cold} (forced).
STOP_TYPES = ("grace", "cold")
#: ZStack's C{VmInstanceDeletionPolicy} (global config C{vm.deletionPolicy}): C{Delay}
#: (Destroyed; expunged after C{vm.expungePeriod}), C{Direct} (expunged at once), C{Never}.
DELETION_POLICIES = ("Delay", "Direct", "Never")


class VOLUME:
    """
    The volume service's error codes (ZStack's C{VolumeErrors} C{VOLUME.1000..}).
    """

    _codes = register_codes(
        "VOLUME",
        {
            1000: "Unable to create the volume",
            1001: "Unable to delete the volume",
            1002: "The volume is not in a state that allows the operation",
            1003: "No such volume",
            1004: "The volume is attached to a VM instance",
            1005: "Unable to instantiate the volume",
        },
    )
    CREATE_ERROR = _codes[1000]
    DELETE_ERROR = _codes[1001]
    NOT_IN_CORRECT_STATE = _codes[1002]
    NOT_FOUND = _codes[1003]
    ATTACHED = _codes[1004]
    INSTANTIATE_ERROR = _codes[1005]


# --- replies ---------------------------------------------------------------------------------


@registry.register
@attrs.define(kw_only=True)
class VmInstanceReply(Reply):
    """
    A reply carrying the VM's inventory (its row plus C{vmNics} and C{allVolumes}, ZStack's
    C{VmInstanceInventory}) and the uuid of the job that ran the operation (its trace id).
    """

    inventory: dict[str, Any] | None = None
    job_uuid: str | None = None


@registry.register
@attrs.define(kw_only=True)
class VolumeReply(Reply):
    """
    A reply carrying a volume's inventory (ZStack's C{VolumeInventory}) and the job uuid.
    """

    inventory: dict[str, Any] | None = None
    job_uuid: str | None = None


# --- VM operations ---------------------------------------------------------------------------


@registry.register
@attrs.define(kw_only=True)
class CreateVmInstanceMsg(NeedReplyMessage):
    """
    Create a VM (ZStack's C{APICreateVmInstanceMsg}): allocate a host (the allocator, honouring
    C{zone_uuid}/C{cluster_uuid}/C{host_uuid}), primary storage and the root volume (and one data
    volume per C{data_disk_offering_uuids}), a NIC and IP on each of C{l3_network_uuids} (the
    default L3 is C{default_l3_network_uuid}, else the first), instantiate the volumes through
    the storage agent and start it on the hypervisor (C{strategy} InstantStart), as a journaled
    job (ZStack's C{createVmWorkFlowElements}). A failed create rolls back everything it took
    and removes the VM; the reply fails with C{VM.1000} whose cause chain is the flow's error.

    System tags: C{staticIp::<l3Uuid>::<ip>} (that NIC's address), C{hostname::<name>}.
    Memory in bytes; C{cpu_num}/C{memory_size} come from the instance offering.

    Refusals: C{SYS.1007} naming the field; the NOT_FOUND code of an unknown image
    (C{IMAGE.1001}), offering (C{OFFERING.x}), L3 (C{L3.x}), zone, cluster or host, naming
    the field; the allocator's reasoned error when no host fits.
    """

    reply_type: ClassVar[type[Reply]] = VmInstanceReply

    name: str
    instance_offering_uuid: str
    image_uuid: str
    l3_network_uuids: list[str]
    default_l3_network_uuid: str | None = None
    type: str = "UserVm"
    root_disk_offering_uuid: str | None = None
    data_disk_offering_uuids: list[str] = attrs.field(factory=list)
    zone_uuid: str | None = None
    cluster_uuid: str | None = None
    host_uuid: str | None = None
    primary_storage_uuid_for_root_volume: str | None = None
    description: str | None = None
    strategy: str = "InstantStart"
    system_tags: list[str] = attrs.field(factory=list)
    user_tags: list[str] = attrs.field(factory=list)
    #: The VM's uuid (ZStack's C{resourceUuid}); None: a new one.
    uuid: str | None = None
    #: The account that owns the VM (set by the API from the session).
    account_uuid: str | None = None


@registry.register
@attrs.define(kw_only=True)
class StartVmInstanceMsg(NeedReplyMessage):
    """
    Start a Created or Stopped VM (ZStack's C{APIStartVmInstanceMsg}): its last host when it
    is Connected and has room, else another (or C{host_uuid}/C{cluster_uuid} when given).
    Starting a Running VM succeeds at once. Fails with C{VM.1001} after the rollback (the VM
    is Stopped again, nothing held).
    """

    reply_type: ClassVar[type[Reply]] = VmInstanceReply

    uuid: str
    cluster_uuid: str | None = None
    host_uuid: str | None = None


@registry.register
@attrs.define(kw_only=True)
class StopVmInstanceMsg(NeedReplyMessage):
    """
    Stop a VM (ZStack's C{APIStopVmInstanceMsg}): C{type} C{grace} shuts it down and forces
    it off when the guest has not stopped after the stop timeout; C{cold} forces it at once.
    The host capacity is given back (the VM keeps its IPs and volumes). Stopping a Stopped VM
    succeeds at once. Fails with C{VM.1002}.
    """

    reply_type: ClassVar[type[Reply]] = VmInstanceReply

    uuid: str
    type: str = "grace"


@registry.register
@attrs.define(kw_only=True)
class RebootVmInstanceMsg(NeedReplyMessage):
    """
    Reboot a Running VM (ZStack's C{APIRebootVmInstanceMsg}); C{VM.1003} on failure.
    """

    reply_type: ClassVar[type[Reply]] = VmInstanceReply

    uuid: str


@registry.register
@attrs.define(kw_only=True)
class DestroyVmInstanceMsg(NeedReplyMessage):
    """
    Destroy a VM (ZStack's C{APIDestroyVmInstanceMsg}): off the hypervisor, host capacity and
    IPs given back; with the deletion policy C{Delay} the VM is C{Destroyed} and its volumes
    kept until it is expunged (by L{ExpungeVmInstanceMsg} or after the expunge period) or
    recovered; C{Direct}: expunged at once. Idempotent: destroying a VM that does not exist
    succeeds (empty inventory). C{VM.1004} on failure.
    """

    reply_type: ClassVar[type[Reply]] = VmInstanceReply

    uuid: str
    delete_mode: str = "Permissive"


@registry.register
@attrs.define(kw_only=True)
class RecoverVmInstanceMsg(NeedReplyMessage):
    """
    Bring a Destroyed VM back as Stopped (ZStack's C{APIRecoverVmInstanceMsg}).
    """

    reply_type: ClassVar[type[Reply]] = VmInstanceReply

    uuid: str


@registry.register
@attrs.define(kw_only=True)
class ExpungeVmInstanceMsg(NeedReplyMessage):
    """
    Expunge a Destroyed VM (ZStack's C{APIExpungeVmInstanceMsg}): its volumes' bits are
    deleted through the storage agent, their capacity given back, the VM's rows removed.
    Idempotent.
    """

    reply_type: ClassVar[type[Reply]] = VmInstanceReply

    uuid: str


@registry.register
@attrs.define(kw_only=True)
class MigrateVmMsg(NeedReplyMessage):
    """
    Live-migrate a Running VM (ZStack's C{APIMigrateVmMsg}) to C{host_uuid}, or to a host the
    allocator picks in the VM's cluster(s) that share its primary storage (local storage
    cannot migrate live). The destination's capacity is taken before the move and the
    source's given back only after it succeeded. C{VM.1008} on failure (the VM stays Running
    on its source).
    """

    reply_type: ClassVar[type[Reply]] = VmInstanceReply

    vm_instance_uuid: str
    host_uuid: str | None = None


@registry.register
@attrs.define(kw_only=True)
class AttachL3NetworkToVmMsg(NeedReplyMessage):
    """
    Add a NIC on C{l3_network_uuid} (ZStack's C{APIAttachL3NetworkToVmMsg}): an IP (C{static_ip}
    when given), hot-plugged when the VM runs. C{VM.1007} on failure.
    """

    reply_type: ClassVar[type[Reply]] = VmInstanceReply

    vm_instance_uuid: str
    l3_network_uuid: str
    static_ip: str | None = None


@registry.register
@attrs.define(kw_only=True)
class DetachL3NetworkFromVmMsg(NeedReplyMessage):
    """
    Remove a NIC (ZStack's C{APIDetachL3NetworkFromVmMsg}, by the NIC's uuid); its IP is given
    back. The VM is found from the NIC: send it with C{resource_uuid} = the VM uuid when known.
    """

    reply_type: ClassVar[type[Reply]] = VmInstanceReply

    vm_nic_uuid: str
    vm_instance_uuid: str | None = None


@registry.register
@attrs.define(kw_only=True)
class ChangeInstanceOfferingMsg(NeedReplyMessage):
    """
    Give a Stopped VM another instance offering's CPU and memory (ZStack's
    C{APIChangeInstanceOfferingMsg}); applies at its next start.
    """

    reply_type: ClassVar[type[Reply]] = VmInstanceReply

    vm_instance_uuid: str
    instance_offering_uuid: str


@registry.register
@attrs.define(kw_only=True)
class AttachDataVolumeToVmMsg(NeedReplyMessage):
    """
    Attach a data volume to a Running or Stopped VM (ZStack's C{APIAttachDataVolumeToVmMsg}),
    instantiating it on the VM's primary storage first when it is C{NotInstantiated}.
    C{VM.1005} on failure.
    """

    reply_type: ClassVar[type[Reply]] = VolumeReply

    vm_instance_uuid: str
    volume_uuid: str


@registry.register
@attrs.define(kw_only=True)
class DetachDataVolumeFromVmMsg(NeedReplyMessage):
    """
    Detach a data volume (ZStack's C{APIDetachDataVolumeFromVmMsg}: C{uuid} is the volume's,
    C{vm_uuid} the VM's). C{VM.1006} on failure.
    """

    reply_type: ClassVar[type[Reply]] = VolumeReply

    uuid: str
    vm_uuid: str | None = None


@registry.register
@attrs.define(kw_only=True)
class VmStateChangedOnHostMsg(NeedReplyMessage):
    """
    Internal: the host service tells the VM's owner that its host reports it in C{state}
    (ZStack's C{VmStateChangedOnHostMsg}); the VM service reconciles in the VM's chain
    (a Running VM its host reports Stopped becomes Stopped and gives back its host capacity).
    C{from_host_sync}: from a full VM sync rather than the agent's own report.
    C{vm_state_at_tracing_moment}: the VM's state in the store when the sync read it, before
    it asked the agent (ZStack's C{vmStateAtTracingMoment}); a VM whose state has changed
    since is left alone (the report is older than the operation that changed it).
    """

    reply_type: ClassVar[type[Reply]] = Reply

    vm_instance_uuid: str
    host_uuid: str
    state: str
    from_host_sync: bool = False
    vm_state_at_tracing_moment: str | None = None


# --- volume operations -----------------------------------------------------------------------


@registry.register
@attrs.define(kw_only=True)
class CreateDataVolumeMsg(NeedReplyMessage):
    """
    Create a data volume (ZStack's C{APICreateDataVolumeMsg}) of C{disk_offering_uuid}'s size
    or C{disk_size} bytes: recorded C{NotInstantiated}, instantiated on primary storage when
    first attached (or at once on C{primary_storage_uuid} when given).
    """

    reply_type: ClassVar[type[Reply]] = VolumeReply

    name: str
    disk_offering_uuid: str | None = None
    disk_size: int | None = None
    primary_storage_uuid: str | None = None
    description: str | None = None
    system_tags: list[str] = attrs.field(factory=list)
    user_tags: list[str] = attrs.field(factory=list)
    uuid: str | None = None
    account_uuid: str | None = None


@registry.register
@attrs.define(kw_only=True)
class DeleteDataVolumeMsg(NeedReplyMessage):
    """
    Delete a data volume that is not attached (ZStack's C{APIDeleteDataVolumeMsg}): its bits
    deleted through the storage agent, its capacity given back, its row removed. Idempotent.
    C{VOLUME.1004} while attached.
    """

    reply_type: ClassVar[type[Reply]] = VolumeReply

    uuid: str
    delete_mode: str = "Permissive"


@registry.register
@attrs.define(kw_only=True)
class ExpungeDataVolumeMsg(NeedReplyMessage):
    """
    ZStack's C{APIExpungeDataVolumeMsg}: as L{DeleteDataVolumeMsg} (volumes are deleted
    directly here), kept for the API's sake. Idempotent.
    """

    reply_type: ClassVar[type[Reply]] = VolumeReply

    uuid: str


# --- events ----------------------------------------------------------------------------------


@registry.register
@attrs.define(kw_only=True)
class VmInstanceStateChangedEvent(Event):
    """
    A VM changed state (ZStack's C{VmCanonicalEvents.VM_FULL_STATE_CHANGED_PATH}), published
    after the change committed; C{trace_id} is the job that caused it (None: a host report).
    """

    topic: ClassVar[str] = "vm.state"

    vm_uuid: str
    old_state: str | None
    new_state: str
    host_uuid: str | None = None
    trace_id: str | None = None
    inventory: dict[str, Any] | None = None
