"""
The simulator backend: capacity, VM states and refusals, latency distributions, injected
failures.
"""

from __future__ import annotations

import random

import attrs
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from agent import protocol as p
from agent.hypervisor.interfaces import (
    HypervisorError,
    IConsoleProxy,
    IHypervisor,
    IVirtualRouter,
    NoCapacity,
    UnknownResource,
    UnknownVm,
    VmSpec,
    WrongState,
)
from agent.hypervisor.simulator import SimulatedCluster, SimulatorConfig, parse_latency


def spec(uuid: str = "vm", cpu: int = 2, mem: int = 1024) -> VmSpec:
    return VmSpec(uuid=uuid, name=None, cpu_num=cpu, memory_size=mem)


class SimulatorTestCase(SynchronousTestCase):
    """
    A cluster of simulated hosts with 4 CPUs and 4096 bytes each.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.config = SimulatorConfig(clock=self.clock, rng=random.Random(1), cpu_num=4,
                                      memory=4096)
        self.cluster = SimulatedCluster(self.config)
        self.hv = self.cluster.backends("0").hypervisor


class HypervisorTests(SimulatorTestCase):
    """
    VM state and capacity.
    """

    def test_interfaces(self) -> None:
        """
        The simulated backends provide their interfaces.
        """
        backends = self.cluster.backends("0")
        self.assertTrue(verifyObject(IHypervisor, backends.hypervisor))
        self.assertTrue(verifyObject(IConsoleProxy, backends.console))
        self.assertTrue(verifyObject(IVirtualRouter, backends.vrouter))

    def test_capacity_held_by_running_vms(self) -> None:
        """
        Running VMs hold CPU and memory; stopping frees it; destroying forgets the VM.
        """
        self.successResultOf(self.hv.start_vm(spec("a", 2, 1000)))
        cap = self.successResultOf(self.hv.capacity())
        self.assertEqual((cap.used_cpu, cap.used_memory), (2, 1000))
        self.successResultOf(self.hv.stop_vm("a"))
        self.assertEqual(self.successResultOf(self.hv.capacity()).used_cpu, 0)
        self.successResultOf(self.hv.destroy_vm("a"))
        self.assertEqual(self.successResultOf(self.hv.vm_states()), {})

    def test_no_capacity(self) -> None:
        """
        A VM that does not fit is refused (CPU or memory).
        """
        self.successResultOf(self.hv.start_vm(spec("a", 3, 100)))
        self.failureResultOf(self.hv.start_vm(spec("b", 2, 100)), NoCapacity)
        self.failureResultOf(self.hv.start_vm(spec("c", 1, 4000)), NoCapacity)
        self.successResultOf(self.hv.start_vm(spec("d", 1, 100)))

    def test_wrong_state_and_unknown(self) -> None:
        """
        Starting a running VM, rebooting a stopped one, or touching an unknown one is refused;
        stopping or destroying an unknown VM succeeds.
        """
        self.successResultOf(self.hv.start_vm(spec()))
        self.failureResultOf(self.hv.start_vm(spec()), WrongState)
        self.successResultOf(self.hv.reboot_vm("vm"))
        self.successResultOf(self.hv.stop_vm("vm"))
        self.successResultOf(self.hv.stop_vm("vm"))
        self.failureResultOf(self.hv.reboot_vm("vm"), WrongState)
        self.failureResultOf(self.hv.vnc_port("vm"), WrongState)
        self.failureResultOf(self.hv.migrate_vm("vm", "1"), WrongState)
        for call in (self.hv.reboot_vm, self.hv.vnc_port):
            self.failureResultOf(call("ghost"), UnknownVm)
        # Stopping an unknown VM succeeds (idempotent, as ZStack's kvmagent) and adds nothing.
        self.successResultOf(self.hv.stop_vm("ghost"))
        self.assertNotIn("ghost", self.successResultOf(self.hv.vm_states()))
        self.failureResultOf(self.hv.attach_nic("ghost", p.NicTO(mac="m")), UnknownVm)
        self.failureResultOf(self.hv.detach_nic("vm", p.NicTO(mac="m")), WrongState)
        self.successResultOf(self.hv.destroy_vm("ghost"))

    def test_data_volumes(self) -> None:
        """
        A data volume is hot-plugged into a running VM at its device id and unplugged again;
        a VM the host does not have is L{UnknownVm}; a stopped VM, a second attach, a taken
        or root device id are L{WrongState}; detaching a volume that is not attached
        succeeds (idempotent, as ZStack's kvmagent for a volume it detached before).
        """
        vol = p.VolumeTO(volume_uuid="v1", install_path="/ps/v1.qcow2", device_id=1)
        self.failureResultOf(self.hv.attach_volume("ghost", vol), UnknownVm)
        self.failureResultOf(self.hv.detach_volume("ghost", vol), UnknownVm)
        self.successResultOf(self.hv.start_vm(spec()))
        self.successResultOf(self.hv.attach_volume("vm", vol))
        self.assertEqual(self.successResultOf(self.hv.attached_volumes("vm")), {"v1": vol})
        self.failureResultOf(self.hv.attach_volume("vm", vol), WrongState)
        other = p.VolumeTO(volume_uuid="v2", install_path="/ps/v2.qcow2", device_id=1)
        f = self.failureResultOf(self.hv.attach_volume("vm", other), WrongState)
        self.assertIn("taken by volume v1", str(f.value))
        root = p.VolumeTO(volume_uuid="v2", install_path="/ps/v2.qcow2", device_id=0)
        self.failureResultOf(self.hv.attach_volume("vm", root), WrongState)
        self.successResultOf(self.hv.detach_volume("vm", vol))
        self.assertEqual(self.successResultOf(self.hv.attached_volumes("vm")), {})
        self.successResultOf(self.hv.detach_volume("vm", vol))
        self.successResultOf(self.hv.attach_volume("vm", other))
        self.successResultOf(self.hv.stop_vm("vm"))
        self.failureResultOf(self.hv.attach_volume("vm", vol), WrongState)
        self.failureResultOf(self.hv.detach_volume("vm", other), WrongState)
        self.failureResultOf(self.hv.attached_volumes("ghost"), UnknownVm)

    def test_start_defines_data_volumes(self) -> None:
        """
        A start defines the VM with exactly the data volumes it names (ZStack's
        C{StartVmCmd.dataVolumes}); a live migration takes them along.
        """
        other = self.cluster.backends("1").hypervisor
        vol = p.VolumeTO(volume_uuid="v1", install_path="/ps/v1.qcow2", device_id=1)
        self.successResultOf(self.hv.start_vm(attrs.evolve(spec(), data_volumes=(vol,))))
        self.assertEqual(self.successResultOf(self.hv.attached_volumes("vm")), {"v1": vol})
        self.successResultOf(self.hv.migrate_vm("vm", "http://a:7070/hosts/1"))
        self.assertEqual(self.successResultOf(other.attached_volumes("vm")), {"v1": vol})
        self.successResultOf(other.stop_vm("vm"))
        self.successResultOf(other.start_vm(spec()))
        self.assertEqual(self.successResultOf(other.attached_volumes("vm")), {})

    def test_restart_keeps_vnc_port(self) -> None:
        """
        A stopped VM starts again with its VNC port.
        """
        port = self.successResultOf(self.hv.start_vm(spec()))
        self.successResultOf(self.hv.stop_vm("vm"))
        self.assertEqual(self.successResultOf(self.hv.start_vm(spec())), port)

    def test_migrate(self) -> None:
        """
        Migration moves a running VM to another host of the cluster if it fits there.
        """
        other = self.cluster.backends("1").hypervisor
        self.successResultOf(other.start_vm(spec("big", 3, 100)))
        self.successResultOf(self.hv.start_vm(spec("vm", 2, 100)))
        self.failureResultOf(self.hv.migrate_vm("vm", "http://a:7070/hosts/1"), NoCapacity)
        self.failureResultOf(self.hv.migrate_vm("vm", "http://a:7070/hosts/9"), HypervisorError)
        self.failureResultOf(self.hv.migrate_vm("vm", "http://a:7070/hosts/0"), HypervisorError)
        self.successResultOf(other.destroy_vm("big"))
        self.successResultOf(self.hv.migrate_vm("vm", "http://a:7070/hosts/1"))
        self.assertEqual(self.successResultOf(other.vm_states()), {"vm": "Running"})
        self.assertEqual(self.successResultOf(self.hv.vm_states()), {})

    def test_reset(self) -> None:
        """
        A reset host comes back empty.
        """
        self.successResultOf(self.hv.start_vm(spec()))
        self.cluster.reset("0")
        fresh = self.cluster.backends("0").hypervisor
        self.assertEqual(self.successResultOf(fresh.vm_states()), {})
        self.assertIsNone(self.cluster.hypervisor("5"))


class LatencyAndFailureTests(SimulatorTestCase):
    """
    Latency per operation and injected failures.
    """

    def test_latency_per_operation(self) -> None:
        """
        An operation completes after its own latency, or the default one.
        """
        self.config.latency = {"*": parse_latency("1"), "/vm/start": parse_latency("const:5")}
        d = self.hv.start_vm(spec())
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.1)
        self.successResultOf(d)
        d = self.hv.capacity()
        self.clock.advance(1)
        self.successResultOf(d)

    def test_state_checked_at_completion(self) -> None:
        """
        Two starts racing for the last CPUs: the first to complete wins.
        """
        self.config.latency = {"*": parse_latency("uniform:1,2")}
        d1 = self.hv.start_vm(spec("a", 3, 1))
        d2 = self.hv.start_vm(spec("b", 3, 1))
        self.clock.advance(2)
        outcomes: list[str] = []
        for d in (d1, d2):
            d.addCallbacks(lambda _: outcomes.append("ok"),
                           lambda f: outcomes.append(f.trap(NoCapacity) and "full"))
        self.assertEqual(sorted(outcomes), ["full", "ok"])

    def test_error_rate(self) -> None:
        """
        error_rate=1 fails every operation with an injected failure.
        """
        self.config.error_rate = 1.0
        f = self.failureResultOf(self.hv.capacity(), HypervisorError)
        self.assertIn("injected", str(f.value))

    def test_parse_latency(self) -> None:
        """
        Distributions parse and sample within their bounds; bad ones are refused.
        """
        rng = random.Random(2)
        self.assertEqual(parse_latency("0.5").sample(rng), 0.5)
        self.assertTrue(1 <= parse_latency("uniform:1,2").sample(rng) <= 2)
        self.assertGreaterEqual(parse_latency("normal:0,1").sample(rng), 0)
        self.assertGreaterEqual(parse_latency("exp:2").sample(rng), 0)
        self.assertEqual(parse_latency("exp:0").sample(rng), 0)
        self.assertEqual(str(parse_latency("uniform:1,2")), "uniform:1,2")
        for bad in ("gamma:1", "uniform:1", "uniform:2,1", "const:-1", "const:x", "exp:1,2"):
            self.assertRaises(ValueError, parse_latency, bad)


class ConsoleAndRouterTests(SimulatorTestCase):
    """
    The console proxy and virtual router backends.
    """

    def test_console(self) -> None:
        """
        A proxy is established, checked, deleted; a bad port is refused.
        """
        console = self.cluster.backends("0").console
        port, url = self.successResultOf(console.establish("vm", "h", 5901, "t", "px"))
        self.assertIn("px", url)
        self.assertTrue(self.successResultOf(console.check("t")))
        self.successResultOf(console.delete("t"))
        self.successResultOf(console.delete("t"))
        self.assertFalse(self.successResultOf(console.check("t")))
        self.failureResultOf(console.establish("vm", "h", 0, "t", None), HypervisorError)

    def test_router_requires_init(self) -> None:
        """
        Every router operation before init is refused.
        """
        router = self.cluster.backends("0").vrouter
        self.failureResultOf(router.configure_nics("r", []), UnknownResource)
        self.failureResultOf(router.add_dhcp("r", [], False), UnknownResource)
        self.failureResultOf(router.refresh_firewall("r", []), UnknownResource)
        self.successResultOf(router.init("r", None))
        entry = p.DhcpInfo(ip="1", mac="m", netmask="n")
        self.successResultOf(router.add_dhcp("r", [entry], False))
        self.successResultOf(router.add_dhcp("r", [], True))
        self.assertEqual(router.routers["r"].dhcp, {})
