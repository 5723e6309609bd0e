"""
twistd plugins: C{twistd zcontrol} (a management node) and C{twistd zagent} (a hypervisor
agent). Both import their modules lazily, as Twisted's own plugins do.
"""

from twisted.application.service import ServiceMaker

zcontrol = ServiceMaker(
    "zcontrol",
    "zcontrol.tap",
    "A zcontrol management node (API, bus, store, agent client).",
    "zcontrol",
)

zagent = ServiceMaker(
    "zagent",
    "agent.tap",
    "A zcontrol hypervisor agent (KVM, console proxy, virtual router; simulated backends).",
    "zagent",
)
