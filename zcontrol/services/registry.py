# -*- test-case-name: tests.test_node -*-
"""
The inventory services a management node runs (besides the host service, which the node
wires itself: it serves the agents' reports). Each entry is the dotted name of a factory
C{make(node) -> Service} (L{zcontrol.services.base.Service}), called once the bus, the store,
the agent client and HTTP are up; the services start in this order and stop in reverse.
"""

from __future__ import annotations

__all__ = ["SERVICE_FACTORIES"]

SERVICE_FACTORIES: list[str] = [
    "zcontrol.services.inventory.make",
    # zone, cluster, offerings
    "zcontrol.services.zone.make",
    "zcontrol.services.cluster.make",
    "zcontrol.services.offering.make",
    # primary storage
    "zcontrol.services.primarystorage.service.make",
    # backup storage, image
    "zcontrol.services.backupstorage.service.make",
    "zcontrol.services.image.service.make",
    # networks
    "zcontrol.services.network.l2.make",
    "zcontrol.services.network.l3.make",
    # allocator
    "zcontrol.scheduler.service.make",
    # VMs and their volumes (issue 10)
    "zcontrol.services.vm.service.make",
    "zcontrol.services.vm.volumes.make",
]
