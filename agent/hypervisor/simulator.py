# -*- test-case-name: tests.test_agent_simulator -*-
"""
The simulator backend: hypervisor, console proxy and virtual router of many hosts, in memory.

It keeps each host's VMs and capacity and refuses what a real host would (no capacity, unknown
VM, wrong state). Each operation takes a latency drawn from a per-operation distribution and
fails with a configurable probability. Operation names are the command paths
(C{"/vm/start"}), so that C{--latency /vm/start=uniform:1,5} reads naturally.

State is checked and changed at the end of an operation's latency, in one reactor turn, so that
concurrent operations on one host never overcommit it.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any, Callable

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import deferLater
from zope.interface import implementer

from agent.hypervisor.interfaces import (
    HostBackends,
    HostCapacity,
    HostFacts,
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
from agent.hypervisor.storage_sim import NfsExport, SimulatedStorage
from agent.protocol import HOSTS_PREFIX, VmState

__all__ = [
    "Latency",
    "SimulatedCluster",
    "SimulatedConsoleProxy",
    "SimulatedHypervisor",
    "SimulatedVirtualRouter",
    "SimulatorConfig",
    "parse_latency",
]

GiB = 1024**3


@attrs.frozen
class Latency:
    """
    A latency distribution in seconds: C{const:S}, C{uniform:A,B}, C{normal:MU,SIGMA} (clipped
    at 0) or C{exp:MEAN}.
    """

    kind: str
    params: tuple[float, ...]

    def sample(self, rng: random.Random) -> float:
        """
        One latency drawn from C{rng}.
        """
        p = self.params
        if self.kind == "const":
            return p[0]
        if self.kind == "uniform":
            return rng.uniform(p[0], p[1])
        if self.kind == "normal":
            return max(0.0, rng.gauss(p[0], p[1]))
        return rng.expovariate(1.0 / p[0]) if p[0] > 0 else 0.0

    def __str__(self) -> str:
        return f"{self.kind}:{','.join(f'{x:g}' for x in self.params)}"


_ARITY = {"const": 1, "uniform": 2, "normal": 2, "exp": 1}


def parse_latency(text: str) -> Latency:
    """
    Parse a distribution (see L{Latency}); a bare number means C{const}.

    @raise ValueError: not a distribution.
    """
    text = text.strip()
    kind, sep, rest = text.partition(":")
    if not sep:
        kind, rest = "const", text
    if kind not in _ARITY:
        raise ValueError(f"unknown latency distribution {kind!r} (const, uniform, normal, exp)")
    try:
        params = tuple(float(x) for x in rest.split(","))
    except ValueError:
        raise ValueError(f"bad latency parameters in {text!r}") from None
    if len(params) != _ARITY[kind] or any(x < 0 for x in params):
        raise ValueError(f"{kind} takes {_ARITY[kind]} non-negative parameter(s): {text!r}")
    if kind == "uniform" and params[0] > params[1]:
        raise ValueError(f"uniform needs low <= high: {text!r}")
    return Latency(kind, params)


@attrs.define
class SimulatorConfig:
    """
    How simulated hosts behave.

    @ivar latency: operation name (command path) to distribution; C{"*"} is the default.
    @ivar error_rate: probability that an operation fails ("injected failure").
    @ivar cpu_num: CPUs per host.
    @ivar memory: bytes of memory per host.
    @ivar local_disk: bytes of each host's local disk (L{agent.hypervisor.storage_sim}).
    @ivar nfs_capacity: bytes of each NFS export.
    """

    clock: Any
    rng: random.Random = attrs.Factory(random.Random)
    latency: dict[str, Latency] = attrs.Factory(dict)
    error_rate: float = 0.0
    cpu_num: int = 32
    cpu_speed: int = 2600
    memory: int = 128 * GiB
    #: bytes of each simulated Sftp backup storage (L{agent.hypervisor.backup_sim})
    backup_storage_capacity: int = 10 * 1024**4
    #: bytes of each host's local disk (LocalStorage)
    local_disk: int = 2 * 1024 * GiB
    #: bytes of each simulated NFS export (one per url, shared by the hosts that mount it)
    nfs_capacity: int = 10 * 1024 * GiB

    def latency_for(self, op: str) -> float:
        """
        A latency for C{op}, or 0 if none is configured.
        """
        dist = self.latency.get(op) or self.latency.get("*")
        return 0.0 if dist is None else dist.sample(self.rng)


class _Simulated:
    """
    Runs operations after their latency, with injected failures.
    """

    def __init__(self, config: SimulatorConfig) -> None:
        self._config = config

    def _op(self, op: str, fn: Callable[..., Any], *args: Any) -> Deferred:
        config = self._config
        delay = config.latency_for(op)
        failing = config.error_rate > 0 and config.rng.random() < config.error_rate

        def run() -> Any:
            if failing:
                raise HypervisorError(f"injected failure in {op}")
            return fn(*args)

        if delay <= 0:
            try:
                return succeed(run())
            except Exception:
                return fail()
        return deferLater(config.clock, delay, run)


@attrs.define
class _Vm:
    uuid: str
    name: str | None
    cpu_num: int
    memory_size: int
    state: str
    vnc_port: int
    nics: dict[str, Any] = attrs.Factory(dict)
    root_volume_install_path: str | None = None
    #: attached data volumes: volume uuid -> protocol C{VolumeTO}
    volumes: dict[str, Any] = attrs.Factory(dict)


@implementer(IHypervisor)
class SimulatedHypervisor(_Simulated):
    """
    One simulated host: VMs and capacity in memory. Capacity is held by running VMs only.
    """

    def __init__(self, key: str, config: SimulatorConfig, cluster: SimulatedCluster) -> None:
        super().__init__(config)
        self.key = key
        self._cluster = cluster
        self.vms: dict[str, _Vm] = {}
        self._next_vnc = 5900

    # --- accounting -----------------------------------------------------------------------

    def _used(self) -> tuple[int, int]:
        cpu = mem = 0
        for vm in self.vms.values():
            if vm.state == VmState.RUNNING:
                cpu += vm.cpu_num
                mem += vm.memory_size
        return cpu, mem

    def _reserve(self, cpu: int, mem: int) -> None:
        used_cpu, used_mem = self._used()
        if used_cpu + cpu > self._config.cpu_num:
            raise NoCapacity(
                f"host {self.key}: {cpu} CPU requested, "
                f"{self._config.cpu_num - used_cpu} free"
            )
        if used_mem + mem > self._config.memory:
            raise NoCapacity(
                f"host {self.key}: {mem} bytes of memory requested, "
                f"{self._config.memory - used_mem} free"
            )

    def _vm(self, uuid: str) -> _Vm:
        vm = self.vms.get(uuid)
        if vm is None:
            raise UnknownVm(f"VM {uuid} is not on host {self.key}")
        return vm

    def _running(self, uuid: str) -> _Vm:
        vm = self._vm(uuid)
        if vm.state != VmState.RUNNING:
            raise WrongState(f"VM {uuid} is {vm.state}, not Running")
        return vm

    def _vnc(self) -> int:
        port = self._next_vnc
        self._next_vnc += 1
        return port

    # --- IHypervisor ----------------------------------------------------------------------

    def capacity(self) -> Deferred[HostCapacity]:
        def do() -> HostCapacity:
            cpu, mem = self._used()
            c = self._config
            return HostCapacity(c.cpu_num, c.cpu_speed, c.memory, cpu, mem)

        return self._op("/host/capacity", do)

    def facts(self) -> Deferred[HostFacts]:
        return self._op(
            "/host/fact",
            lambda: HostFacts(
                hypervisor_type="KVM",
                os_distribution="zsimulator",
                os_version="1.0",
                os_release="sim",
                qemu_version="8.2.0",
                libvirt_version="10.0.0",
                cpu_model_name="Simulated CPU",
            ),
        )

    def start_vm(self, spec: VmSpec) -> Deferred[int]:
        def do() -> int:
            vm = self.vms.get(spec.uuid)
            if vm is not None and vm.state == VmState.RUNNING:
                raise WrongState(f"VM {spec.uuid} is already Running")
            self._reserve(spec.cpu_num, spec.memory_size)
            if vm is None:
                vm = self.vms[spec.uuid] = _Vm(
                    uuid=spec.uuid,
                    name=spec.name,
                    cpu_num=spec.cpu_num,
                    memory_size=spec.memory_size,
                    state=VmState.STOPPED,
                    vnc_port=self._vnc(),
                    nics={n.mac: n for n in spec.nics},
                    root_volume_install_path=spec.root_volume_install_path,
                )
            else:
                vm.cpu_num, vm.memory_size = spec.cpu_num, spec.memory_size
            # The start defines the VM with exactly the data volumes it names (ZStack's
            # StartVmCmd.dataVolumes), as libvirt defines the domain anew.
            vm.volumes = {v.volume_uuid: v for v in spec.data_volumes}
            vm.state = VmState.RUNNING
            return vm.vnc_port

        return self._op("/vm/start", do)

    def stop_vm(self, uuid: str, force: bool = False) -> Deferred[None]:
        # As ZStack's KVM agent (kvmagent vm_plugin stop_vm): stopping a VM the host does
        # not have succeeds, so that a retried or recovered stop is idempotent.
        def do() -> None:
            vm = self.vms.get(uuid)
            if vm is not None:
                vm.state = VmState.STOPPED

        return self._op("/vm/stop", do)

    def reboot_vm(self, uuid: str) -> Deferred[None]:
        return self._op("/vm/reboot", lambda: self._running(uuid) and None)

    def destroy_vm(self, uuid: str) -> Deferred[None]:
        return self._op("/vm/destroy", lambda: self.vms.pop(uuid, None) and None)

    def migrate_vm(self, uuid: str, dest: str) -> Deferred[None]:
        def do() -> None:
            vm = self._running(uuid)
            key = dest.rsplit(HOSTS_PREFIX, 1)[-1].strip("/")
            target = self._cluster.hypervisor(key)
            if target is None or target is self:
                raise HypervisorError(f"destination host {dest} is unreachable")
            there = target.vms.get(uuid)
            if there is not None and there.state == VmState.RUNNING:
                raise WrongState(f"VM {uuid} already runs on {dest}")
            target._reserve(vm.cpu_num, vm.memory_size)
            del self.vms[uuid]
            target.vms[uuid] = attrs.evolve(vm, vnc_port=target._vnc())

        return self._op("/vm/migrate", do)

    def attach_nic(self, uuid: str, nic: Any) -> Deferred[None]:
        def do() -> None:
            vm = self._vm(uuid)
            if nic.mac in vm.nics:
                raise WrongState(f"NIC {nic.mac} is already attached to VM {uuid}")
            vm.nics[nic.mac] = nic

        return self._op("/vm/attachnic", do)

    def detach_nic(self, uuid: str, nic: Any) -> Deferred[None]:
        def do() -> None:
            vm = self._vm(uuid)
            if vm.nics.pop(nic.mac, None) is None:
                raise WrongState(f"NIC {nic.mac} is not attached to VM {uuid}")

        return self._op("/vm/detachnic", do)

    def attach_volume(self, uuid: str, volume: Any) -> Deferred[None]:
        def do() -> None:
            vm = self._running(uuid)
            if volume.volume_uuid in vm.volumes:
                raise WrongState(f"volume {volume.volume_uuid} is already attached to VM {uuid}")
            if volume.device_id < 1:
                raise WrongState(f"device id {volume.device_id} of VM {uuid} is its root"
                                 f" volume's, not a data volume's")
            taken = [v.volume_uuid for v in vm.volumes.values()
                     if v.device_id == volume.device_id]
            if taken:
                raise WrongState(f"device id {volume.device_id} of VM {uuid} is taken by"
                                 f" volume {taken[0]}")
            vm.volumes[volume.volume_uuid] = volume

        return self._op("/vm/attachdatavolume", do)

    def detach_volume(self, uuid: str, volume: Any) -> Deferred[None]:
        def do() -> None:
            vm = self._running(uuid)
            vm.volumes.pop(volume.volume_uuid, None)

        return self._op("/vm/detachdatavolume", do)

    def attached_volumes(self, uuid: str) -> Deferred[dict[str, Any]]:
        return self._op("/vm/attachedvolumes", lambda: dict(self._vm(uuid).volumes))

    def vm_states(self) -> Deferred[dict[str, str]]:
        return self._op("/vm/vmsync", lambda: {u: vm.state for u, vm in self.vms.items()})

    def vnc_port(self, uuid: str) -> Deferred[int]:
        return self._op("/vm/getvncport", lambda: self._running(uuid).vnc_port)


@implementer(IConsoleProxy)
class SimulatedConsoleProxy(_Simulated):
    """
    Console proxies as a token table.
    """

    PORT = 4900

    def __init__(self, config: SimulatorConfig) -> None:
        super().__init__(config)
        self.proxies: dict[str, tuple[str, int]] = {}

    def establish(self, vm_uuid: str, target_hostname: str, target_port: int, token: str,
                  proxy_hostname: str | None) -> Deferred[tuple[int, str]]:
        def do() -> tuple[int, str]:
            if not 0 < target_port < 65536:
                raise HypervisorError(f"bad VNC port {target_port} for VM {vm_uuid}")
            self.proxies[token] = (target_hostname, target_port)
            host = proxy_hostname or "localhost"
            return self.PORT, f"http://{host}:{self.PORT}/thirdparty/vnc_auto.html?token={token}"

        return self._op("/console/establish", do)

    def check(self, token: str) -> Deferred[bool]:
        return self._op("/console/check", lambda: token in self.proxies)

    def delete(self, token: str) -> Deferred[None]:
        return self._op("/console/delete", lambda: self.proxies.pop(token, None) and None)


@attrs.define
class _Router:
    nics: dict[str, Any] = attrs.Factory(dict)
    snat: list[Any] = attrs.Factory(list)
    dhcp: dict[str, Any] = attrs.Factory(dict)
    rules: list[Any] = attrs.Factory(list)


@implementer(IVirtualRouter)
class SimulatedVirtualRouter(_Simulated):
    """
    Virtual routers as in-memory tables.
    """

    def __init__(self, config: SimulatorConfig) -> None:
        super().__init__(config)
        self.routers: dict[str, _Router] = {}

    def _router(self, uuid: str) -> _Router:
        router = self.routers.get(uuid)
        if router is None:
            raise UnknownResource(f"virtual router {uuid} is not initialised")
        return router

    def init(self, vrouter_uuid: str, management_nic_mac: str | None) -> Deferred[None]:
        def do() -> None:
            self.routers.setdefault(vrouter_uuid, _Router())

        return self._op("/vrouter/init", do)

    def configure_nics(self, vrouter_uuid: str, nics: list[Any]) -> Deferred[None]:
        def do() -> None:
            router = self._router(vrouter_uuid)
            for nic in nics:
                router.nics[nic.mac] = nic

        return self._op("/vrouter/configurenic", do)

    def set_snat(self, vrouter_uuid: str, snat: Any) -> Deferred[None]:
        def do() -> None:
            router = self._router(vrouter_uuid)
            for mac in (snat.private_nic_mac, snat.public_nic_mac):
                if mac not in router.nics:
                    raise WrongState(f"NIC {mac} is not configured on router {vrouter_uuid}")
            router.snat = [s for s in router.snat if s.private_nic_mac != snat.private_nic_mac]
            router.snat.append(snat)

        return self._op("/vrouter/setsnat", do)

    def add_dhcp(self, vrouter_uuid: str, entries: list[Any], rebuild: bool) -> Deferred[None]:
        def do() -> None:
            router = self._router(vrouter_uuid)
            if rebuild:
                router.dhcp.clear()
            for entry in entries:
                router.dhcp[entry.mac] = entry

        return self._op("/vrouter/adddhcp", do)

    def refresh_firewall(self, vrouter_uuid: str, rules: list[Any]) -> Deferred[None]:
        def do() -> None:
            self._router(vrouter_uuid).rules = list(rules)

        return self._op("/vrouter/refreshfirewall", do)


def _backup_storage(key: str, config: SimulatorConfig) -> Any:
    # imported here: agent.hypervisor.backup_sim builds on this module
    from agent.hypervisor.backup_sim import SimulatedBackupStorage

    return SimulatedBackupStorage(key, config)


class SimulatedCluster:
    """
    The simulated hosts of one agent process, created on first use. Its L{backends} method is
    the agent's backend factory; L{reset} forgets a host (a simulated crash or reboot).
    """

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self._hosts: dict[str, HostBackends] = {}
        #: NFS url -> the export all hosts mounting that url share (Note [simulated storage]).
        self.nfs_exports: dict[str, NfsExport] = {}
        #: (cache location, image uuid) -> image downloads into that cache.
        self.downloads: Counter[tuple[str, str]] = Counter()

    def backends(self, key: str) -> HostBackends:
        """
        The backends of host C{key}, created if new.
        """
        backends = self._hosts.get(key)
        if backends is None:
            backends = self._hosts[key] = HostBackends(
                hypervisor=SimulatedHypervisor(key, self.config, self),
                console=SimulatedConsoleProxy(self.config),
                vrouter=SimulatedVirtualRouter(self.config),
                backup_storage=_backup_storage(key, self.config),
                storage=SimulatedStorage(key, self.config, self),
            )
        return backends

    def hypervisor(self, key: str) -> SimulatedHypervisor | None:
        """
        The hypervisor of an existing host C{key}, or None.
        """
        backends = self._hosts.get(key)
        return None if backends is None else backends.hypervisor

    def storage(self, key: str) -> SimulatedStorage | None:
        """
        The primary storage of an existing host C{key}, or None.
        """
        backends = self._hosts.get(key)
        return None if backends is None else backends.storage

    def nfs_export(self, url: str) -> NfsExport:
        """
        The NFS export at C{url}, created (empty, C{config.nfs_capacity} bytes) if new.
        """
        export = self.nfs_exports.get(url)
        if export is None:
            export = self.nfs_exports[url] = NfsExport(total=self.config.nfs_capacity, url=url)
        return export

    def count_download(self, location: str, image_uuid: str) -> None:
        """
        Count one image download into the cache at C{location}.
        """
        self.downloads[(location, image_uuid)] += 1

    def reset(self, key: str) -> None:
        """
        Forget host C{key}: its VMs and tables are gone, as after a crash.
        """
        self._hosts.pop(key, None)
