# -*- test-case-name: tests.test_vm_lifecycle -*-
"""
The VM service (ZStack's C{VmInstanceManagerImpl} and C{VmInstanceBase}) and the volume
service: the operations of L{zcontrol.services.vm.messages}, each a mixin of its own module on
the frame L{zcontrol.services.vm.base.VmServiceBase}.
"""

from __future__ import annotations

from typing import Any

from zcontrol.services.vm.base import VmServiceBase
from zcontrol.services.vm.lifecycle import LifecycleMixin
from zcontrol.services.vm.volumes import VolumeAttachMixin

__all__ = ["VmService", "make"]


class VmService(LifecycleMixin, VolumeAttachMixin, VmServiceBase):
    """
    The VM service: every VM operation (see the mixins' modules).
    """


def make(node: Any) -> VmService:
    """
    The VM service of C{node}.
    """
    return VmService(node.reactor, node.bus, node.store, node.config.vm)
