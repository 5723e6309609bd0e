"""
A VM's NICs and its instance offering end to end (issue 10): attach an L3 network, detach a
NIC, change the instance offering, through the bus of a whole management node with a real
simulated agent over loopback HTTP (the cloud of L{tests.test_vm_migrate.VmScenario}, VMs made by
L{CreateVmInstanceMsg}).

After each operation the store (the NIC rows, their addresses and their holders, the VM's
default L3), the simulated hypervisor (the NICs plugged into the guest) and the capacity
audit are checked; failures injected in the agent, the L3 service and the address return
are rolled back with nothing leaked. On the embedded backends and on PostgreSQL + RabbitMQ.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import fail

from agent.hypervisor.interfaces import HypervisorError
from agent.hypervisor.simulator import GiB
from tests.test_agent_loopback import LoopbackTestCase
from tests.test_vm_migrate import VM_CPU, VM_MEMORY, VmScenario, _query
from tests.vm_scenario import EmbeddedBackends, RabbitPostgresBackends
from zcontrol.core.errors import SYS
from zcontrol.services.network.messages import (
    L2_SERVICE_ID,
    L3,
    L3_SERVICE_ID,
    AddIpRangeMsg,
    CreateL2NoVlanNetworkMsg,
    CreateL3NetworkMsg,
    ReturnIpMsg,
)
from zcontrol.services.offering.messages import OFFERING, CreateInstanceOfferingMsg
from zcontrol.services.offering.messages import SERVICE_ID as OFFERING_SERVICE
from zcontrol.services.vm.errors import VM
from zcontrol.services.vm.lifecycle import new_mac
from zcontrol.services.vm.messages import SERVICE_ID as VM_SERVICE
from zcontrol.services.vm.messages import (
    AttachL3NetworkToVmMsg,
    ChangeInstanceOfferingMsg,
    DetachL3NetworkFromVmMsg,
    StartVmInstanceMsg,
)


class NicScenario(VmScenario):
    """
    The NIC and offering tests, for a backend chosen by L{node_overrides}.
    """

    async def nics(self, vm: str) -> list[dict[str, Any]]:
        page = await self.store.query("vmNic", _query(f"vmInstanceUuid={vm}"))
        return sorted(page.inventories, key=lambda n: n["deviceId"])

    async def used_ips(self, holder: str) -> list[dict[str, Any]]:
        page = await self.store.query("usedIp", _query(f"holderUuid={holder}"))
        return page.inventories

    async def assert_nics(self, vm: str, l3s: list[str], default: str | None) -> list[dict]:
        """
        The VM has exactly one NIC on each of C{l3s} (in device order), each holding its
        address (the usedIp's holder is the NIC); its default L3 is C{default}; a Running
        VM's guest has exactly those NICs plugged; the audit finds no drift.
        """
        nics = await self.nics(vm)
        self.assertEqual([n["l3NetworkUuid"] for n in nics], l3s)
        for nic in nics:
            [ip] = await self.used_ips(nic["uuid"])
            self.assertEqual((ip["uuid"], ip["ip"], ip["holderType"], ip["l3NetworkUuid"]),
                             (nic["usedIpUuid"], nic["ip"], "VmNicVO", nic["l3NetworkUuid"]))
        row = await self.store.get("vmInstance", vm)
        self.assertEqual(row["defaultL3NetworkUuid"], default)
        if row["state"] == "Running":
            guest = self.hv(row["hostUuid"]).vms[vm]
            self.assertEqual(sorted(guest.nics), sorted(n["mac"] for n in nics))
        await self.consistent()
        return nics

    def attach(self, vm: str, l3: str, ip: str | None = None) -> AttachL3NetworkToVmMsg:
        return AttachL3NetworkToVmMsg(vm_instance_uuid=vm, l3_network_uuid=l3, static_ip=ip)

    def detach(self, nic: str, vm: str | None = None) -> DetachL3NetworkFromVmMsg:
        return DetachL3NetworkFromVmMsg(vm_nic_uuid=nic, vm_instance_uuid=vm)

    # --- attach ---------------------------------------------------------------------------

    async def test_attach_running_and_stopped(self) -> None:
        """
        Attaching to a Running VM: a NIC with a fresh MAC and the next device id, an
        address of the L3 held by the NIC, plugged into the guest; the default L3 kept.
        Attaching to a Stopped VM without NICs, with a static IP: that address, and the L3
        becomes the default; no agent is involved.
        """
        await self.build()
        l3a, l3b = self.l3s
        vm = await self.running_vm(1)
        reply = await self.ok(self.attach(vm, l3b), VM_SERVICE, vm)
        self.assertEqual([n["l3NetworkUuid"] for n in reply.inventory["vmNics"]], [l3a, l3b])
        nics = await self.assert_nics(vm, [l3a, l3b], l3a)
        new = nics[1]
        self.assertEqual(new["deviceId"], 1)
        self.assertTrue(new["mac"].startswith("fa:"))
        self.assertNotEqual(new["mac"], nics[0]["mac"])
        self.assertTrue(new["ip"].startswith("10.1.0."))
        [job] = await self.jobs(vm, "AttachL3NetworkToVm")
        self.assertEqual((job["uuid"], job["state"]), (reply.job_uuid, "Succeeded"))

        stopped = await self.stopped_vm()
        [only] = await self.nics(stopped)
        await self.ok(self.detach(only["uuid"], stopped), VM_SERVICE, stopped)
        await self.assert_nics(stopped, [], None)
        reply = await self.ok(self.attach(stopped, l3a, "10.0.0.50"), VM_SERVICE, stopped)
        [nic] = await self.assert_nics(stopped, [l3a], l3a)
        self.assertEqual((nic["ip"], nic["deviceId"]), ("10.0.0.50", 0))
        self.assertFalse(any(stopped in self.hv(h).vms for h in self.hosts.values()))

    async def test_attach_refusals(self) -> None:
        """
        Refused before any job, nothing changed: an L3 the VM already has a NIC on
        (C{VM.1007}), an unknown L3 (C{L3.1000}), a malformed static IP (C{SYS.1007}), an L3
        whose L2 is not attached to the running VM's cluster (C{VM.1007} naming it), a VM
        neither Running nor Stopped (C{VM.1010}), an unknown VM (C{VM.1100}).
        """
        await self.build()
        l3a = self.l3s[0]
        vm = await self.running_vm(1)
        await self.refused(self.attach(vm, l3a), VM_SERVICE, vm, VM.ATTACH_NETWORK_ERROR,
                           "already has a NIC")
        await self.refused(self.attach(vm, "no-such-l3"), VM_SERVICE, vm, L3.NOT_FOUND,
                           "l3NetworkUuid")
        await self.refused(self.attach(vm, self.l3s[1], "10.1.0.x"), VM_SERVICE, vm,
                           SYS.INVALID_ARGUMENT_ERROR, "staticIp")
        l2 = (await self.ok(CreateL2NoVlanNetworkMsg(name="far", zone_uuid=self.cloud.zone,
                                                     physical_interface="eth9"),
                            L2_SERVICE_ID)).inventory["uuid"]
        far = (await self.ok(CreateL3NetworkMsg(name="far", l2_network_uuid=l2),
                             L3_SERVICE_ID)).inventory["uuid"]
        await self.ok(AddIpRangeMsg(l3_network_uuid=far, name="r", start_ip="10.9.0.10",
                                    end_ip="10.9.0.20", netmask="255.255.255.0",
                                    gateway="10.9.0.1"), L3_SERVICE_ID, far)
        await self.refused(self.attach(vm, far), VM_SERVICE, vm, VM.ATTACH_NETWORK_ERROR, l2)
        paused = await self.stopped_vm()
        await self.store.update("vmInstance", paused, {"state": "Error"})
        await self.refused(self.attach(paused, self.l3s[1]), VM_SERVICE, paused,
                           VM.NOT_IN_CORRECT_STATE, "Error")
        await self.refused(self.attach("no-such-vm", l3a), VM_SERVICE, "no-such-vm",
                           VM.NOT_FOUND, "no-such-vm")
        self.assertEqual(await self.jobs(vm, "AttachL3NetworkToVm"), [])
        await self.assert_nics(vm, [l3a], l3a)

    async def test_attach_failures_rolled_back(self) -> None:
        """
        The agent fails C{/vm/attachnic}: C{VM.1007} whose cause is the job's failure at
        C{attach-on-hypervisor} with the agent's text; the NIC row gone, its address given
        back, the guest unchanged. A static IP another NIC holds: the L3 service's
        C{L3.1007} at C{allocate-ip}; the NIC row gone. Each job Failed, rolled back.
        """
        await self.build()
        l3a, l3b = self.l3s
        vm = await self.running_vm(1)
        hv = self.hv(self.hosts[1])
        real = hv.attach_nic
        hv.attach_nic = lambda uuid, nic: fail(HypervisorError("injected attach failure"))
        err = await self.refused(self.attach(vm, l3b), VM_SERVICE, vm,
                                 VM.ATTACH_NETWORK_ERROR, "injected attach failure")
        self.assertEqual((err.cause.code, err.cause.location),
                         (SYS.OPERATION_ERROR, "attach-on-hypervisor"))
        hv.attach_nic = real
        await self.assert_nics(vm, [l3a], l3a)
        [job] = await self.jobs(vm, "AttachL3NetworkToVm")
        self.assertEqual(job["state"], "Failed")
        self.assertEqual(sorted(job["rolledBack"]),
                         sorted(["create-nic", "allocate-ip", "attach-on-hypervisor"]))
        page = await self.store.query("usedIp", _query(f"l3NetworkUuid={l3b}"))
        self.assertEqual(page.inventories, [])

        other = await self.stopped_vm()
        await self.ok(self.attach(other, l3b, "10.1.0.77"), VM_SERVICE, other)
        err = await self.refused(self.attach(vm, l3b, "10.1.0.77"), VM_SERVICE, vm,
                                 VM.ATTACH_NETWORK_ERROR, L3.IP_IN_USE)
        self.assertEqual(err.cause.location, "allocate-ip")
        await self.assert_nics(vm, [l3a], l3a)
        await self.assert_nics(other, [l3a, l3b], l3a)

    # --- detach ---------------------------------------------------------------------------

    async def test_detach(self) -> None:
        """
        Detaching the NIC on the default L3 of a Running VM unplugs it, deletes it, gives
        its address back and moves the default to the other NIC's L3 (ZStack's
        C{selectDefaultL3}); detaching the last NIC leaves no default. A Stopped VM's NIC
        goes without the agent.
        """
        await self.build()
        l3a, l3b = self.l3s
        vm = await self.running_vm(1, l3s=[l3a, l3b])
        first, second = await self.assert_nics(vm, [l3a, l3b], l3a)
        reply = await self.ok(self.detach(first["uuid"], vm), VM_SERVICE, vm)
        self.assertEqual([n["uuid"] for n in reply.inventory["vmNics"]], [second["uuid"]])
        await self.assert_nics(vm, [l3b], l3b)
        self.assertEqual(await self.used_ips(first["uuid"]), [])
        [job] = await self.jobs(vm, "DetachL3NetworkFromVm")
        self.assertEqual(job["state"], "Succeeded")

        await self.ok(self.detach(second["uuid"]), VM_SERVICE, vm)
        await self.assert_nics(vm, [], None)

        stopped = await self.stopped_vm(l3s=[l3a, l3b])
        _, nic = await self.nics(stopped)
        await self.ok(self.detach(nic["uuid"], stopped), VM_SERVICE, stopped)
        await self.assert_nics(stopped, [l3a], l3a)

    async def test_detach_refusals(self) -> None:
        """
        An unknown NIC (C{SYS.1003} naming C{vmNicUuid}); a VM uuid that is not the NIC's
        (C{SYS.1007}); a VM neither Running nor Stopped (C{VM.1010}). Nothing changed.
        """
        await self.build()
        vm = await self.running_vm(1)
        [nic] = await self.nics(vm)
        await self.refused(self.detach("no-such-nic"), VM_SERVICE, None,
                           SYS.RESOURCE_NOT_FOUND, "vmNicUuid")
        await self.refused(self.detach(nic["uuid"], "another-vm"), VM_SERVICE, vm,
                           SYS.INVALID_ARGUMENT_ERROR, "vmInstanceUuid")
        other = await self.stopped_vm()
        [other_nic] = await self.nics(other)
        await self.store.update("vmInstance", other, {"state": "Error"})
        await self.refused(self.detach(other_nic["uuid"]), VM_SERVICE, other,
                           VM.NOT_IN_CORRECT_STATE, "Error")
        await self.assert_nics(vm, [self.l3s[0]], self.l3s[0])

    async def test_detach_failures_rolled_back(self) -> None:
        """
        The agent fails C{/vm/detachnic}: C{VM.1007} at C{detach-on-hypervisor}, the NIC
        and its address kept. Giving the address back fails after the row was deleted
        (C{delete-nic}): the address is taken again (the same one), the row put back, the
        NIC plugged again and the default L3 restored.
        """
        await self.build()
        l3a, l3b = self.l3s
        vm = await self.running_vm(1, l3s=[l3a, l3b])
        first, _ = await self.assert_nics(vm, [l3a, l3b], l3a)
        hv = self.hv(self.hosts[1])
        real = hv.detach_nic
        hv.detach_nic = lambda uuid, nic: fail(HypervisorError("injected detach failure"))
        err = await self.refused(self.detach(first["uuid"], vm), VM_SERVICE, vm,
                                 VM.ATTACH_NETWORK_ERROR, "injected detach failure")
        self.assertEqual(err.cause.location, "detach-on-hypervisor")
        hv.detach_nic = real
        again, _ = await self.assert_nics(vm, [l3a, l3b], l3a)
        self.assertEqual((again["uuid"], again["ip"]), (first["uuid"], first["ip"]))

        self.fail_send_once(lambda m: isinstance(m, ReturnIpMsg), "injected: return failed")
        err = await self.refused(self.detach(first["uuid"], vm), VM_SERVICE, vm,
                                 VM.ATTACH_NETWORK_ERROR, "injected: return failed")
        self.assertEqual(err.cause.location, "delete-nic")
        again, _ = await self.assert_nics(vm, [l3a, l3b], l3a)
        self.assertEqual((again["uuid"], again["ip"], again["mac"]),
                         (first["uuid"], first["ip"], first["mac"]))
        jobs = await self.jobs(vm, "DetachL3NetworkFromVm")
        self.assertEqual([j["state"] for j in jobs], ["Failed", "Failed"])

    # --- instance offering ----------------------------------------------------------------

    async def test_change_instance_offering(self) -> None:
        """
        A Stopped VM takes the offering's CPUs and memory, and its next start holds and boots
        with them;
        a Running VM is refused (C{VM.1010} naming Running), an unknown offering too
        (C{OFFERING.1000}); nothing changes on a refusal.
        """
        await self.build()
        big = (await self.ok(CreateInstanceOfferingMsg(name="big", cpu_num=4,
                                                       memory_size=8 * GiB),
                             OFFERING_SERVICE)).inventory["uuid"]
        stopped = await self.stopped_vm()
        reply = await self.ok(ChangeInstanceOfferingMsg(vm_instance_uuid=stopped,
                                                        instance_offering_uuid=big),
                              VM_SERVICE, stopped)
        self.assertEqual((reply.inventory["cpuNum"], reply.inventory["memorySize"],
                          reply.inventory["instanceOfferingUuid"]), (4, 8 * GiB, big))
        row = await self.store.get("vmInstance", stopped)
        self.assertEqual((row["cpuNum"], row["memorySize"], row["state"]),
                         (4, 8 * GiB, "Stopped"))
        await self.refused(ChangeInstanceOfferingMsg(vm_instance_uuid=stopped,
                                                     instance_offering_uuid="no-such"),
                           VM_SERVICE, stopped, OFFERING.INSTANCE_OFFERING_NOT_FOUND,
                           "instanceOfferingUuid")
        self.assertEqual((await self.store.get("vmInstance", stopped))["cpuNum"], 4)
        started = (await self.ok(StartVmInstanceMsg(uuid=stopped), VM_SERVICE,
                                 stopped)).inventory
        host = started["hostUuid"]
        self.assertEqual(await self.held(stopped), {host: (4, 8 * GiB)})
        guest = self.hv(host).vms[stopped]
        self.assertEqual((guest.cpu_num, guest.memory_size), (4, 8 * GiB))
        await self.consistent()
        running = await self.running_vm(1)
        await self.refused(ChangeInstanceOfferingMsg(vm_instance_uuid=running,
                                                     instance_offering_uuid=big),
                           VM_SERVICE, running, VM.NOT_IN_CORRECT_STATE, "Running")
        row = await self.store.get("vmInstance", running)
        self.assertEqual((row["cpuNum"], row["memorySize"]), (VM_CPU, VM_MEMORY))
        self.assertEqual(await self.held(running), {self.hosts[1]: (VM_CPU, VM_MEMORY)})
        await self.consistent()

    def test_new_mac(self) -> None:
        """
        MACs are ZStack's C{fa:xx:xx:xx:xx:xx}, lower-case hex, and differ.
        """
        macs = {new_mac() for _ in range(100)}
        self.assertEqual(len(macs), 100)
        for mac in macs:
            parts = mac.split(":")
            self.assertEqual((len(parts), parts[0]), (6, "fa"))
            self.assertTrue(all(len(x) == 2 and int(x, 16) >= 0 and x == x.lower()
                                for x in parts))


class EmbeddedNicTests(NicScenario, EmbeddedBackends, LoopbackTestCase):
    """
    On the embedded defaults: SQLite in the node's data dir, the LocalBus.
    """


class RabbitPostgresNicTests(NicScenario, RabbitPostgresBackends, LoopbackTestCase):
    """
    The NIC and offering tests on PostgreSQL and RabbitMQ.
    """
