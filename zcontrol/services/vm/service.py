# -*- test-case-name: tests.test_vm_lifecycle -*-
"""
The VM service (ZStack's C{VmInstanceManagerImpl} and C{VmInstanceBase}) and the volume
service: the operations of L{zcontrol.services.vm.messages}, each a mixin of its own module on
the frame L{zcontrol.services.vm.base.VmServiceBase}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from zcontrol.services.vm.base import VmServiceBase
from zcontrol.services.vm.hoststate import HostStateMixin
from zcontrol.services.vm.lifecycle import LifecycleMixin
from zcontrol.services.vm.migrate import MigrateVmMixin
from zcontrol.services.vm.nics import VmNicsMixin
from zcontrol.services.vm.volumes import VolumeAttachMixin

__all__ = ["VmService", "make"]


class VmService(HostStateMixin, LifecycleMixin, VolumeAttachMixin, MigrateVmMixin,
                VmNicsMixin, VmServiceBase):
    """
    The VM service: every VM operation (see the mixins' modules).
    """


def make(node: Any) -> VmService:
    """
    The VM service of C{node}; its recovery waits for the node's host reconnect (the
    C{reconnected} Deferred of the node's C{host} part, L{zcontrol.node.HostComponent}).
    """
    service = VmService(node.reactor, node.bus, node.store, node.config.vm)
    host = node.getServiceNamed("host")
    service.hosts_ready = lambda: _when_fired(host.reconnected)
    return service


def _when_fired(d: Deferred | None) -> Deferred:
    """
    A new Deferred firing (with None) once C{d} fired, whatever its result (which C{d}
    keeps); at once for None.
    """
    out: Deferred = Deferred()
    if d is None:
        out.callback(None)
        return out

    def fire(result: Any) -> Any:
        if not out.called:
            out.callback(None)
        return result

    d.addBoth(fire)
    return out
