# -*- test-case-name: tests.test_agent_simulator -*-
"""
What an agent plugin needs from the machine it runs on: a hypervisor (VMs, capacity, facts), a
console proxy and a virtual router, one set per host. The simulator
(L{agent.hypervisor.simulator}) implements all three in memory; a libvirt backend would
implement the same interfaces. Plugins only ever talk to these interfaces.

Every method returns a Deferred; a refusal (what a real host would refuse) fails it with a
L{HypervisorError} subclass, whose text becomes the response's C{error}.
"""

from __future__ import annotations

import attrs
from zope.interface import Attribute, Interface

__all__ = [
    "HostBackends",
    "HostCapacity",
    "HostFacts",
    "HypervisorError",
    "IConsoleProxy",
    "IHypervisor",
    "IVirtualRouter",
    "NoCapacity",
    "UnknownResource",
    "UnknownVm",
    "VmSpec",
    "WrongState",
]


class HypervisorError(Exception):
    """
    The host refused or failed an operation; C{str(error)} says why.
    """


class NoCapacity(HypervisorError):
    """Not enough free CPU or memory."""


class UnknownVm(HypervisorError):
    """No such VM on this host."""


class WrongState(HypervisorError):
    """The VM (or router) is not in a state that allows the operation."""


class UnknownResource(HypervisorError):
    """No such console proxy or virtual router."""


@attrs.frozen
class HostCapacity:
    """
    CPU (count, MHz) and memory (bytes), total and used.
    """

    cpu_num: int
    cpu_speed: int
    total_memory: int
    used_cpu: int
    used_memory: int


@attrs.frozen
class HostFacts:
    """
    What the host says about itself (these become system tags).
    """

    hypervisor_type: str
    os_distribution: str
    os_version: str
    os_release: str
    qemu_version: str
    libvirt_version: str
    cpu_model_name: str


@attrs.frozen
class VmSpec:
    """
    What is needed to create and start a VM.

    @ivar nics: protocol C{NicTO} values.
    """

    uuid: str
    name: str | None
    cpu_num: int
    memory_size: int
    nics: tuple = ()
    root_volume_install_path: str | None = None
    #: protocol C{VolumeTO} values: the data volumes the VM is defined with
    data_volumes: tuple = ()


class IHypervisor(Interface):
    """
    One host's hypervisor.
    """

    def capacity():
        """
        @return: a Deferred firing with a L{HostCapacity}.
        """

    def facts():
        """
        @return: a Deferred firing with L{HostFacts}.
        """

    def start_vm(spec):
        """
        Create the VM if it is new, and start it. Fails with L{NoCapacity} if the host cannot
        hold it, L{WrongState} if it is already running.

        @type spec: L{VmSpec}
        @return: a Deferred firing with the VM's VNC port (int).
        """

    def stop_vm(uuid, force):
        """
        Stop a VM (stopping a stopped VM succeeds). Fails with L{UnknownVm}.

        @return: a Deferred firing with None.
        """

    def reboot_vm(uuid):
        """
        Reboot a running VM. Fails with L{UnknownVm} or L{WrongState}.

        @return: a Deferred firing with None.
        """

    def destroy_vm(uuid):
        """
        Destroy a VM and free its capacity; destroying an unknown VM succeeds.

        @return: a Deferred firing with None.
        """

    def migrate_vm(uuid, dest):
        """
        Live-migrate a running VM to the host at C{dest} (its agent base URL). Fails with
        L{UnknownVm}, L{WrongState}, or L{HypervisorError} if the destination is unreachable or
        refuses it.

        @return: a Deferred firing with None.
        """

    def attach_nic(uuid, nic):
        """
        Attach a NIC (a protocol C{NicTO}); fails with L{UnknownVm} or L{WrongState} if the MAC
        is already attached.

        @return: a Deferred firing with None.
        """

    def detach_nic(uuid, nic):
        """
        Detach the NIC with C{nic.mac}; fails with L{UnknownVm} or L{WrongState} if it is not
        attached.

        @return: a Deferred firing with None.
        """

    def attach_volume(uuid, volume):
        """
        Hot-plug a data volume (a protocol C{VolumeTO}) into a running VM at
        C{volume.device_id} (ZStack's kvmagent C{attach_data_volume}). Fails with
        L{UnknownVm}, or L{WrongState} if the VM is not running, the volume is already
        attached, or another volume has that device id (0 is the root volume's).

        @return: a Deferred firing with None.
        """

    def detach_volume(uuid, volume):
        """
        Unplug the data volume C{volume.volume_uuid} from a running VM. A volume that is not
        attached succeeds (as ZStack's kvmagent answers for a volume it detached before), so
        that a retried or rolled-back detach is idempotent. Fails with L{UnknownVm}, or
        L{WrongState} if the VM is not running.

        @return: a Deferred firing with None.
        """

    def attached_volumes(uuid):
        """
        @return: a Deferred firing with the VM's attached data volumes, a dict of volume uuid
            to protocol C{VolumeTO}; fails with L{UnknownVm}.
        """

    def vm_states():
        """
        @return: a Deferred firing with a dict of VM uuid to state (C{Running}, C{Stopped}).
        """

    def vnc_port(uuid):
        """
        @return: a Deferred firing with the VNC port of a running VM; fails with L{UnknownVm}
            or L{WrongState}.
        """


class IConsoleProxy(Interface):
    """
    A console proxy: forwards a browser's websocket to a VM's VNC port.
    """

    def establish(vm_uuid, target_hostname, target_port, token, proxy_hostname):
        """
        Start (or reuse) a proxy for C{token}.

        @return: a Deferred firing with C{(proxy_port, url)}.
        """

    def check(token):
        """
        @return: a Deferred firing with whether a proxy for C{token} exists.
        """

    def delete(token):
        """
        Remove the proxy for C{token} (idempotent).

        @return: a Deferred firing with None.
        """


class IVirtualRouter(Interface):
    """
    A virtual router appliance (routing, SNAT, DHCP, firewall).
    """

    def init(vrouter_uuid, management_nic_mac):
        """
        Initialise (or re-initialise) the router.

        @return: a Deferred firing with None.
        """

    def configure_nics(vrouter_uuid, nics):
        """
        Configure NICs (protocol C{VRouterNic}); fails with L{UnknownResource} before init.

        @return: a Deferred firing with None.
        """

    def set_snat(vrouter_uuid, snat):
        """
        Set a source-NAT rule (protocol C{SNATInfo}); both NICs must be configured, else
        L{WrongState}.

        @return: a Deferred firing with None.
        """

    def add_dhcp(vrouter_uuid, entries, rebuild):
        """
        Add DHCP entries (protocol C{DhcpInfo}); C{rebuild} replaces the table.

        @return: a Deferred firing with None.
        """

    def refresh_firewall(vrouter_uuid, rules):
        """
        Replace the firewall rule set (protocol C{FirewallRule}).

        @return: a Deferred firing with None.
        """


class IHostBackends(Interface):
    """
    The backends of one host (any may be None if its plugin is not loaded).
    """

    hypervisor = Attribute("an IHypervisor or None")
    console = Attribute("an IConsoleProxy or None")
    vrouter = Attribute("an IVirtualRouter or None")


@attrs.define
class HostBackends:
    """
    The backends of one host.
    """

    hypervisor: object = None
    console: object = None
    vrouter: object = None
    #: the host's primary storage: its local disk and NFS mounts
    storage: object = None

    #: a backup storage served by this agent (Sftp)
    backup_storage: object = None
