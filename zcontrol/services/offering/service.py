# -*- test-case-name: tests.test_offering -*-
"""
The offering service (ZStack's C{ConfigurationManagerImpl}): instance offerings (CPU,
memory, host allocator strategy) and disk offerings (size, primary storage allocator
strategy). An offering's inventory is its row.

Every operation on one offering runs in the chain C{instanceOffering-<uuid>} or
C{diskOffering-<uuid>}; state changes are compare-and-swaps.

Deleting an offering that VMs or volumes were created from is allowed, as in ZStack: a VM
copies C{cpuNum}, C{cpuSpeed}, C{memorySize} and C{allocatorStrategy} into its own row at
creation, and a volume its size, so nothing refers to the offering afterwards (the
C{instanceOfferingUuid}/C{diskOfferingUuid} they keep is a plain column, no foreign key).

ZStack answers the delete of an unknown offering with success (its interceptor stops
routing); here, as every service of issue 9, it is the NOT_FOUND code naming the uuid.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import attrs

from zcontrol.core.errors import SYS, OperationError
from zcontrol.db.interfaces import DB
from zcontrol.services import validate
from zcontrol.services.base import Service, handles, succeeds_if_gone
from zcontrol.services.offering.messages import (
    DISK_ALLOCATOR_STRATEGIES,
    HOST_ALLOCATOR_STRATEGIES,
    INSTANCE_OFFERING_TYPES,
    MIN_DISK_SIZE,
    MIN_MEMORY_SIZE,
    OFFERING,
    SERVICE_ID,
    ChangeDiskOfferingStateMsg,
    ChangeInstanceOfferingStateMsg,
    CreateDiskOfferingMsg,
    CreateInstanceOfferingMsg,
    DeleteDiskOfferingMsg,
    DeleteInstanceOfferingMsg,
    DiskOfferingReply,
    InstanceOfferingReply,
    UpdateDiskOfferingMsg,
    UpdateInstanceOfferingMsg,
)
from zcontrol.services.zone.service import new_uuid, state_after

__all__ = ["OfferingService", "make"]

_INT32 = (-(2**31), 2**31 - 1)


@attrs.frozen
class _Kind:
    resource: str
    not_found: str
    reply: Callable[..., Any]


_INSTANCE = _Kind("instanceOffering", OFFERING.INSTANCE_OFFERING_NOT_FOUND,
                  InstanceOfferingReply)
_DISK = _Kind("diskOffering", OFFERING.DISK_OFFERING_NOT_FOUND, DiskOfferingReply)


class OfferingService(Service):
    """
    The C{offering} service on one management node.
    """

    service_id = SERVICE_ID

    # --- shared ---------------------------------------------------------------------------

    def _not_found(self, kind: _Kind, uuid: str) -> OperationError:
        return OperationError.of(kind.not_found, f"no {kind.resource} with uuid {uuid}",
                                 resource=kind.resource, uuid=uuid, field="uuid")

    def _run(self, kind: _Kind, uuid: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        return self.serialized(f"{kind.resource}-{uuid}", fn)

    async def _create(self, kind: _Kind, values: dict[str, Any]) -> Any:
        uuid = values["uuid"]

        async def create() -> Any:
            try:
                row = await self.store.insert(kind.resource, values)
            except OperationError as e:
                if e.error.code == DB.DUPLICATE:
                    raise OperationError.of(OFFERING.DUPLICATE,
                                            f"a {kind.resource} with uuid {uuid} exists",
                                            field="uuid", value=uuid) from None
                raise
            return kind.reply(inventory=row)

        return await self._run(kind, uuid, create)

    async def _update(self, kind: _Kind, uuid: str, changes: dict[str, Any]) -> Any:
        async def update() -> Any:
            row = await self.must_get(kind.resource, uuid, kind.not_found, field="uuid")
            if changes:
                row = await self._store_update(kind, uuid, changes)
            return kind.reply(inventory=row)

        return await self._run(kind, uuid, update)

    async def _store_update(self, kind: _Kind, uuid: str, changes: dict[str, Any],
                            expected: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            return await self.store.update(kind.resource, uuid, changes, expected)
        except OperationError as e:
            if e.error.code == SYS.RESOURCE_NOT_FOUND:
                raise self._not_found(kind, uuid) from None
            raise

    async def _change_state(self, kind: _Kind, uuid: Any, state_event: Any) -> Any:
        uuid = validate.uuid(uuid, "uuid")
        new = state_after(state_event)

        async def change() -> Any:
            row = await self.must_get(kind.resource, uuid, kind.not_found, field="uuid")
            if row["state"] != new:
                row = await self._store_update(kind, uuid, {"state": new},
                                               {"state": row["state"]})
            return kind.reply(inventory=row)

        return await self._run(kind, uuid, change)

    async def _delete(self, kind: _Kind, uuid: Any) -> Any:
        uuid = validate.uuid(uuid, "uuid")

        async def delete() -> Any:
            await self.must_get(kind.resource, uuid, kind.not_found, field="uuid")
            if not await self.store.delete(kind.resource, uuid):
                raise self._not_found(kind, uuid)
            return kind.reply(inventory=None)

        return await self._run(kind, uuid, delete)

    @staticmethod
    def _texts(msg: Any) -> dict[str, Any]:
        changes: dict[str, Any] = validate.common_changes(msg)
        return changes

    # --- instance offerings ---------------------------------------------------------------

    @handles(CreateInstanceOfferingMsg)
    async def create_instance_offering(self, msg: CreateInstanceOfferingMsg
                                       ) -> InstanceOfferingReply:
        """
        L{CreateInstanceOfferingMsg}: every field checked (C{SYS.1007} naming it).
        """
        values = {
            "name": validate.name(msg.name),
            "description": validate.optional_text(msg.description, "description"),
            "cpuNum": validate.integer(msg.cpu_num, "cpuNum", 1, 1024),
            "cpuSpeed": validate.integer(msg.cpu_speed, "cpuSpeed", 0, 2**31 - 1),
            "memorySize": validate.size(msg.memory_size, "memorySize", MIN_MEMORY_SIZE),
            "allocatorStrategy": None if msg.allocator_strategy is None else validate.one_of(
                msg.allocator_strategy, "allocatorStrategy", HOST_ALLOCATOR_STRATEGIES),
            "sortKey": validate.integer(msg.sort_key, "sortKey", *_INT32),
            "type": validate.one_of(msg.type, "type", INSTANCE_OFFERING_TYPES),
            "uuid": new_uuid() if msg.uuid is None else validate.uuid(msg.uuid, "uuid"),
        }
        return await self._create(_INSTANCE, values)

    @handles(UpdateInstanceOfferingMsg)
    async def update_instance_offering(self, msg: UpdateInstanceOfferingMsg
                                       ) -> InstanceOfferingReply:
        """
        L{UpdateInstanceOfferingMsg}.
        """
        uuid = validate.uuid(msg.uuid, "uuid")
        changes = self._texts(msg)
        if msg.allocator_strategy is not None:
            changes["allocatorStrategy"] = validate.one_of(
                msg.allocator_strategy, "allocatorStrategy", HOST_ALLOCATOR_STRATEGIES)
        return await self._update(_INSTANCE, uuid, changes)

    @handles(ChangeInstanceOfferingStateMsg)
    async def change_instance_offering_state(self, msg: ChangeInstanceOfferingStateMsg
                                             ) -> InstanceOfferingReply:
        """
        L{ChangeInstanceOfferingStateMsg}.
        """
        return await self._change_state(_INSTANCE, msg.uuid, msg.state_event)

    @handles(DeleteInstanceOfferingMsg)
    @succeeds_if_gone(OFFERING.INSTANCE_OFFERING_NOT_FOUND)
    async def delete_instance_offering(self, msg: DeleteInstanceOfferingMsg
                                       ) -> InstanceOfferingReply:
        """
        L{DeleteInstanceOfferingMsg}.
        """
        return await self._delete(_INSTANCE, msg.uuid)

    # --- disk offerings -------------------------------------------------------------------

    @handles(CreateDiskOfferingMsg)
    async def create_disk_offering(self, msg: CreateDiskOfferingMsg) -> DiskOfferingReply:
        """
        L{CreateDiskOfferingMsg}: every field checked (C{SYS.1007} naming it).
        """
        values = {
            "name": validate.name(msg.name),
            "description": validate.optional_text(msg.description, "description"),
            "diskSize": validate.size(msg.disk_size, "diskSize", MIN_DISK_SIZE),
            "allocatorStrategy": None if msg.allocation_strategy is None else validate.one_of(
                msg.allocation_strategy, "allocationStrategy", DISK_ALLOCATOR_STRATEGIES),
            "sortKey": validate.integer(msg.sort_key, "sortKey", *_INT32),
            "uuid": new_uuid() if msg.uuid is None else validate.uuid(msg.uuid, "uuid"),
        }
        return await self._create(_DISK, values)

    @handles(UpdateDiskOfferingMsg)
    async def update_disk_offering(self, msg: UpdateDiskOfferingMsg) -> DiskOfferingReply:
        """
        L{UpdateDiskOfferingMsg}.
        """
        uuid = validate.uuid(msg.uuid, "uuid")
        return await self._update(_DISK, uuid, self._texts(msg))

    @handles(ChangeDiskOfferingStateMsg)
    async def change_disk_offering_state(self, msg: ChangeDiskOfferingStateMsg
                                         ) -> DiskOfferingReply:
        """
        L{ChangeDiskOfferingStateMsg}.
        """
        return await self._change_state(_DISK, msg.uuid, msg.state_event)

    @handles(DeleteDiskOfferingMsg)
    @succeeds_if_gone(OFFERING.DISK_OFFERING_NOT_FOUND)
    async def delete_disk_offering(self, msg: DeleteDiskOfferingMsg) -> DiskOfferingReply:
        """
        L{DeleteDiskOfferingMsg}.
        """
        return await self._delete(_DISK, msg.uuid)


def make(node: Any) -> OfferingService:
    """
    The offering service of C{node}.
    """
    return OfferingService(node.reactor, node.bus, node.store)
