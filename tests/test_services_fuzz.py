"""
Every inventory-service message, one field at a time replaced by junk: bad input gets a
clear, structured error (a code, a description, details naming the field) and loses
nothing.

All the inventory services run on one L{MemoryStore}, one L{LocalBus} and one
L{task.Clock}, with the in-memory agents (simulated hosts and an Sftp backup storage), over
a small valid cloud: zone C{z}, cluster C{c}, two Connected hosts, an NFS and a LocalStorage
primary storage attached to C{c}, a backup storage attached to C{z} holding image C{img},
an instance and a disk offering, an L2 network attached to C{c} with an L3 network, an IP
range, a DNS server and a network service.

For every L{NeedReplyMessage} class the inventory services register (L{MESSAGES}, checked
against the services' handlers) and every one of its own fields, the message is sent with
that one field replaced by each value of L{junk} (the other fields valid), and:

  - a refusal is never C{SYS.1000} (internal error) nor a raw store code (C{DB.*});
  - a C{SYS.1007} names the junk field (C{opaque["field"]}); a C{SYS.1003} names a field;
  - an unknown uuid, or the uuid of another kind of resource, where a uuid of an existing
    resource is expected, is refused naming that uuid (the service's own NOT_FOUND);
  - a refusal changes no row of any table (nothing half-created, nothing lost);
  - a success took a value of the field's declared type (and no string a field could never
    hold: a NUL, a lone surrogate, 70,000 characters, or a blank where a value is required);
  - every message is answered (nothing hangs), and the capacity audit finds no drift.

On the LocalBus messages travel as objects, so the junk reaches the handlers as is (on the
AMQP bus the codec would turn some of it into other junk; the REST layer decodes JSON into
these classes the same way later).

L{FuzzTests.test_any_junk} then draws (hypothesis, derandomized) any JSON-like value for
any field of the messages of the services fixed with this test, with the same checks.

L{KNOWN_ELSEWHERE} lists the faults of services other engineers are fixing: the test
asserts they still fail as recorded (so it fails once one is fixed: take it off the list).
"""

from __future__ import annotations

import math
import sqlite3
import sys
import types
import typing
from typing import Any, Callable

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from tests.agent_fakes import InMemoryPair, base
from tests.test_agent_sftp import SftpPair, bs_base
from zcontrol.bus.local import LocalBus
from zcontrol.bus.message import NeedReplyMessage
from zcontrol.core.errors import SYS, OperationError
from zcontrol.db.memory import MemoryStore
from zcontrol.scheduler import messages as sched_m
from zcontrol.scheduler.service import HostAllocatorService
from zcontrol.services import inventory as inv_m
from zcontrol.services import validate
from zcontrol.services.backupstorage import messages as bs_m
from zcontrol.services.backupstorage.service import BackupStorageConfig, BackupStorageService
from zcontrol.services.cluster import messages as cluster_m
from zcontrol.services.cluster.service import ClusterService
from zcontrol.services.host import HostConfig, HostService
from zcontrol.services.host import messages as host_m
from zcontrol.services.image import messages as image_m
from zcontrol.services.image.service import ImageService
from zcontrol.services.network import messages as net_m
from zcontrol.services.network.l2 import L2NetworkService
from zcontrol.services.network.l3 import L3NetworkService
from zcontrol.services.offering import messages as offering_m
from zcontrol.services.offering.service import OfferingService
from zcontrol.services.primarystorage import messages as ps_m
from zcontrol.services.primarystorage.service import PrimaryStorageService
from zcontrol.services.zone import messages as zone_m
from zcontrol.services.zone.service import ZoneService

GiB = 1024**3
MODULES = (zone_m, cluster_m, offering_m, host_m, net_m, ps_m, bs_m, image_m, sched_m, inv_m)
UNKNOWN = "0f0f0f0f0f0f4f0f8f0f0f0f0f0f0f0f"
IMAGE_SPEC = {"uuid": "img", "size": 3000, "actualSize": 1000, "format": "qcow2",
              "mediaType": "RootVolumeTemplate", "backupStorageUuid": "bs",
              "installPath": "/zstack_bs/templates/img.qcow2",
              "backupStorageHostname": "10.0.0.9"}


def junk(wrong_kind: str) -> list[tuple[str, Callable[[], Any]]]:
    """
    The junk values, by label, each built afresh (lists and dicts are mutable).
    """
    return [
        ("None", lambda: None), ("True", lambda: True), ("False", lambda: False),
        ("0", lambda: 0), ("-1", lambda: -1), ("2**63", lambda: 2**63),
        ("2**70", lambda: 2**70), ("1.5", lambda: 1.5), ("nan", lambda: float("nan")),
        ("''", lambda: ""), ("' '", lambda: " "), ("'x'*70000", lambda: "x" * 70000),
        ("NUL", lambda: "\x00"), ("surrogate", lambda: "\ud800"), ("[]", lambda: []),
        ("[None]", lambda: [None]), ("['a','a']", lambda: ["a", "a"]), ("{}", lambda: {}),
        ("{'a':1}", lambda: {"a": 1}), ("wrong-kind", lambda: wrong_kind),
        ("unknown", lambda: UNKNOWN),
    ]


#: message class -> the valid fields it is sent with (the junk replaces one at a time).
#: The cloud's uuids: zone z, cluster c, hosts h0 h1, primary storages nfs ls, backup
#: storage bs, image img, offerings io do, l2 (attached to c), l3, range r, dns 8.8.8.8.
VALID: dict[type, dict[str, Any]] = {
    zone_m.CreateZoneMsg: {"name": "z-new", "description": "d", "uuid": "z-new"},
    zone_m.UpdateZoneMsg: {"uuid": "z", "name": "z", "description": "d"},
    zone_m.ChangeZoneStateMsg: {"uuid": "z", "state_event": "enable"},
    zone_m.DeleteZoneMsg: {"uuid": "z"},
    cluster_m.CreateClusterMsg: {"zone_uuid": "z", "name": "c-new", "hypervisor_type": "KVM",
                                 "description": "d", "type": "zstack", "uuid": "c-new"},
    cluster_m.UpdateClusterMsg: {"uuid": "c", "name": "c", "description": "d"},
    cluster_m.ChangeClusterStateMsg: {"uuid": "c", "state_event": "enable"},
    cluster_m.DeleteClusterMsg: {"uuid": "c"},
    offering_m.CreateInstanceOfferingMsg: {
        "name": "io-new", "cpu_num": 1, "memory_size": GiB, "cpu_speed": 0,
        "description": "d", "allocator_strategy": None, "sort_key": 0, "type": "UserVm",
        "uuid": "io-new"},
    offering_m.UpdateInstanceOfferingMsg: {"uuid": "io", "name": "io", "description": "d",
                                           "allocator_strategy": None},
    offering_m.ChangeInstanceOfferingStateMsg: {"uuid": "io", "state_event": "enable"},
    offering_m.DeleteInstanceOfferingMsg: {"uuid": "io"},
    offering_m.CreateDiskOfferingMsg: {"name": "do-new", "disk_size": GiB, "description": "d",
                                       "allocation_strategy": None, "sort_key": 0,
                                       "uuid": "do-new"},
    offering_m.UpdateDiskOfferingMsg: {"uuid": "do", "name": "do", "description": "d"},
    offering_m.ChangeDiskOfferingStateMsg: {"uuid": "do", "state_event": "enable"},
    offering_m.DeleteDiskOfferingMsg: {"uuid": "do"},
    host_m.AddHostMsg: {"name": "h-new", "zone_uuid": "z", "cluster_uuid": "c",
                        "management_ip": base(3), "uuid": "h-new", "description": "d",
                        "hypervisor_type": "KVM"},
    host_m.ConnectHostMsg: {"host_uuid": "h0"},
    host_m.PingHostMsg: {"host_uuid": "h0"},
    host_m.KVMHostAsyncHttpCallMsg: {"host_uuid": "h0",
                                     "path": "/localstorage/getphysicalcapacity",
                                     "command": {"storagePath": "/zstack_ps"},
                                     "command_timeout": 30},
    host_m.ChangeHostStateMsg: {"uuid": "h0", "state_event": "enable"},
    host_m.UpdateHostMsg: {"uuid": "h0", "name": "h0", "description": "d"},
    host_m.ReconnectHostMsg: {"uuid": "h0"},
    host_m.DeleteHostMsg: {"uuid": "h0"},
    net_m.CreateL2NoVlanNetworkMsg: {"name": "l2-new", "zone_uuid": "z",
                                     "physical_interface": "eth9", "description": "d",
                                     "uuid": "l2-new"},
    net_m.CreateL2VlanNetworkMsg: {"name": "l2v-new", "zone_uuid": "z",
                                   "physical_interface": "eth0", "vlan": 100,
                                   "description": "d", "uuid": "l2v-new"},
    net_m.UpdateL2NetworkMsg: {"uuid": "l2", "name": "l2", "description": "d"},
    net_m.AttachL2NetworkToClusterMsg: {"l2_network_uuid": "l2", "cluster_uuid": "c"},
    net_m.DetachL2NetworkFromClusterMsg: {"l2_network_uuid": "l2", "cluster_uuid": "c"},
    net_m.DeleteL2NetworkMsg: {"uuid": "l2"},
    net_m.CreateL3NetworkMsg: {"name": "l3-new", "l2_network_uuid": "l2",
                               "type": "L3BasicNetwork", "category": "Private",
                               "system": False, "dns_domain": "example.com", "ip_version": 4,
                               "description": "d", "uuid": "l3-new"},
    net_m.UpdateL3NetworkMsg: {"uuid": "l3", "name": "l3", "description": "d",
                               "dns_domain": "example.com", "category": "Private",
                               "system": False},
    net_m.ChangeL3NetworkStateMsg: {"uuid": "l3", "state_event": "enable"},
    net_m.DeleteL3NetworkMsg: {"uuid": "l3"},
    net_m.AddIpRangeMsg: {"l3_network_uuid": "l3", "name": "r-new", "start_ip": "10.0.0.150",
                          "end_ip": "10.0.0.160", "netmask": "255.255.255.0",
                          "gateway": "10.0.0.1", "description": "d", "uuid": "r-new"},
    net_m.AddIpRangeByNetworkCidrMsg: {"l3_network_uuid": "l3", "name": "r-new",
                                       "network_cidr": "10.0.0.0/24", "gateway": "10.0.0.1",
                                       "description": "d"},
    net_m.DeleteIpRangeMsg: {"uuid": "r"},
    net_m.AddDnsToL3NetworkMsg: {"l3_network_uuid": "l3", "dns": "1.1.1.1"},
    net_m.RemoveDnsFromL3NetworkMsg: {"l3_network_uuid": "l3", "dns": "8.8.8.8"},
    net_m.AttachNetworkServiceToL3NetworkMsg: {"l3_network_uuid": "l3",
                                               "network_services": {"vr": ["SNAT"]}},
    net_m.DetachNetworkServiceFromL3NetworkMsg: {"l3_network_uuid": "l3",
                                                 "network_services": {"vr": ["DHCP"]}},
    net_m.GetFreeIpMsg: {"l3_network_uuid": "l3", "ip_range_uuid": "r",
                         "start": "10.0.0.10", "limit": 10},
    net_m.CheckIpAvailabilityMsg: {"l3_network_uuid": "l3", "ip": "10.0.0.20"},
    net_m.GetIpAddressCapacityMsg: {"ip_range_uuids": ["r"], "l3_network_uuids": ["l3"],
                                    "zone_uuids": ["z"], "all": False},
    net_m.AllocateIpMsg: {"l3_network_uuid": "l3", "holder_type": "VmInstanceVO",
                          "holder_uuid": "vm-new", "required_ip": "10.0.0.30",
                          "allocate_strategy": None, "used_ip_uuid": None},
    net_m.ReturnIpMsg: {"l3_network_uuid": "l3", "holder_type": "VmInstanceVO",
                        "holder_uuid": "vm-1"},
    ps_m.AddLocalPrimaryStorageMsg: {"name": "ls-new", "zone_uuid": "z", "url": "/ps_new",
                                     "uuid": "ls-new", "description": "d"},
    ps_m.AddNfsPrimaryStorageMsg: {"name": "nfs-new", "zone_uuid": "z",
                                   "url": "nfs.example:/export/new", "mount_path": None,
                                   "uuid": "nfs-new", "description": "d"},
    ps_m.AttachPrimaryStorageToClusterMsg: {"primary_storage_uuid": "nfs",
                                            "cluster_uuid": "c"},
    ps_m.DetachPrimaryStorageFromClusterMsg: {"primary_storage_uuid": "nfs",
                                              "cluster_uuid": "c"},
    ps_m.DeletePrimaryStorageMsg: {"uuid": "nfs"},
    ps_m.ChangePrimaryStorageStateMsg: {"uuid": "nfs", "state_event": "enable"},
    ps_m.ReconnectPrimaryStorageMsg: {"uuid": "nfs"},
    ps_m.UpdatePrimaryStorageMsg: {"uuid": "nfs", "name": "nfs", "description": "d"},
    ps_m.AllocatePrimaryStorageMsg: {"size": GiB, "holder_uuid": "vol-new",
                                     "holder_type": "VolumeVO",
                                     "required_primary_storage_uuid": "nfs",
                                     "required_host_uuid": None},
    ps_m.ReturnPrimaryStorageCapacityMsg: {"primary_storage_uuid": "nfs",
                                           "holder_uuid": "vol-1", "holder_type": "VolumeVO"},
    ps_m.InstantiateRootVolumeFromTemplateOnPrimaryStorageMsg: {"primary_storage_uuid": "nfs", "volume_uuid": "vol-new",
                                "image": IMAGE_SPEC, "host_uuid": "h0", "size": None},
    ps_m.InstantiateVolumeOnPrimaryStorageMsg: {"primary_storage_uuid": "nfs", "volume_uuid": "vol-new",
                                "size": GiB, "host_uuid": "h0"},
    ps_m.DeleteVolumeBitsOnPrimaryStorageMsg: {
        "primary_storage_uuid": "nfs", "volume_uuid": "vol-1",
        "install_path": "/opt/zstack/nfsprimarystorage/prim-nfs/rootVolumes/vol-1.qcow2",
        "host_uuid": "h0", "volume_type": "Root"},
    ps_m.DownloadImageToPrimaryStorageCacheMsg: {"primary_storage_uuid": "nfs",
                                                 "image": IMAGE_SPEC, "host_uuid": "h0"},
    ps_m.RemoveHostFromPrimaryStorageMsg: {"primary_storage_uuid": "ls", "host_uuid": "h1"},
    bs_m.AddSftpBackupStorageMsg: {"name": "bs-new", "url": "/zstack_bs",
                                   "hostname": bs_base(1), "username": "root",
                                   "password": "secret", "ssh_port": 22, "description": "d",
                                   "uuid": "bs-new", "type": "SftpBackupStorage"},
    bs_m.AttachBackupStorageToZoneMsg: {"zone_uuid": "z", "backup_storage_uuid": "bs"},
    bs_m.DetachBackupStorageFromZoneMsg: {"zone_uuid": "z", "backup_storage_uuid": "bs"},
    bs_m.DeleteBackupStorageMsg: {"uuid": "bs"},
    bs_m.ChangeBackupStorageStateMsg: {"uuid": "bs", "state_event": "enable"},
    bs_m.ReconnectBackupStorageMsg: {"uuid": "bs"},
    bs_m.UpdateBackupStorageMsg: {"uuid": "bs", "name": "bs", "description": "d",
                                  "username": "root", "password": "secret", "ssh_port": 22},
    bs_m.DownloadImageMsg: {"backup_storage_uuid": "bs", "image_uuid": "img-new",
                            "url": "http://h/new.qcow2?size=3000&actualSize=1000",
                            "format": "qcow2", "media_type": "RootVolumeTemplate"},
    bs_m.DeleteBitsOnBackupStorageMsg: {"backup_storage_uuid": "bs",
                                        "install_path": "/zstack_bs/templates/none.qcow2"},
    image_m.AddImageMsg: {"name": "img-new", "url": "http://h/new.qcow2?size=3000&"
                          "actualSize=1000", "backup_storage_uuids": ["bs"],
                          "media_type": "RootVolumeTemplate", "format": "qcow2",
                          "platform": "Linux", "guest_os_type": None, "system": False,
                          "description": "d", "uuid": "img-new"},
    image_m.DeleteImageMsg: {"uuid": "img"},
    image_m.ChangeImageStateMsg: {"uuid": "img", "state_event": "enable"},
    image_m.UpdateImageMsg: {"uuid": "img", "name": "img", "description": "d",
                             "guest_os_type": None, "platform": "Linux", "system": False},
    image_m.SelectBackupStorageMsg: {"image_uuid": "img", "zone_uuid": "z"},
    image_m.DeleteImageRefsOnBackupStorageMsg: {"backup_storage_uuid": "bs"},
    sched_m.AllocateHostMsg: {"vm_instance_uuid": "vm-new", "cpu_num": 1,
                              "memory_size": GiB, "cpu_speed": 0, "disk_size": 0,
                              "l3_network_uuids": ["l3"], "zone_uuid": "z",
                              "cluster_uuid": "c", "host_uuid": None,
                              "avoid_host_uuids": [], "allocator_strategy": None,
                              "primary_storage_uuid": None, "last_host_uuid": None},
    sched_m.ReturnHostCapacityMsg: {"host_uuid": "h0", "vm_instance_uuid": "vm-1"},
    inv_m.QueryInventoryMsg: {"resource": "zone", "conditions": ["state=Enabled"],
                              "limit": 10, "start": 0, "count": False,
                              "reply_with_count": False, "sort": "name",
                              "fields": ["uuid", "name"]},
}

#: The services whose work is all in the store: after one of their messages changed rows,
#: putting the seeded rows back restores the cloud (the others' agents saw the change too:
#: the cloud is built again).
DB_ONLY = {zone_m.SERVICE_ID, cluster_m.SERVICE_ID, offering_m.SERVICE_ID,
           net_m.L2_SERVICE_ID, net_m.L3_SERVICE_ID, sched_m.SERVICE_ID, inv_m.SERVICE_ID}

#: Any JSON-like value (what a decoded API body may hold), small.
ANY_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                 max_size=3),
    max_leaves=5)

L2_MESSAGES = {"CreateL2NoVlanNetworkMsg", "CreateL2VlanNetworkMsg", "UpdateL2NetworkMsg",
               "AttachL2NetworkToClusterMsg", "DetachL2NetworkFromClusterMsg",
               "DeleteL2NetworkMsg"}

#: The fields that name a resource that must exist (an unknown uuid there is refused with
#: the owner's NOT_FOUND naming it): (message class, field) -> the kind it names. Fields
#: that name a resource to be created (a create's C{uuid}, a holder) are not here.
def _referencing(cls: type, field: str) -> bool:
    if not (field == "uuid" or field.endswith("_uuid") or field.endswith("_uuids")):
        return False
    name = cls.__name__
    if field == "uuid":
        return not (name.startswith("Create") or name.startswith("Add"))
    return field not in ("holder_uuid", "vm_instance_uuid", "volume_uuid", "image_uuid",
                         "used_ip_uuid", "avoid_host_uuids")


def _wrong_kind(cls: type, field: str) -> str:
    """
    The uuid of an existing resource of another kind than C{field} names.
    """
    zone_field = field.startswith("zone_") or (field == "uuid" and "Zone" in cls.__name__)
    return "c" if zone_field else "z"


#: Preferences: an unknown (or other kind's) uuid there is ignored and the operation goes on.
PREFERENCES: dict[tuple[str, str], str] = {
    ("AllocateHostMsg", "last_host_uuid"): "a VM's last host may be gone: first-fit then",
}

#: Documented no-ops: an unknown (or other kind's) uuid there succeeds and changes nothing.
IDEMPOTENT: dict[tuple[str, str], str] = {
    ("DeleteL2NetworkMsg", "uuid"): "deleting a network that does not exist (ZStack)",
    ("DeleteL3NetworkMsg", "uuid"): "deleting a network that does not exist (ZStack)",
    ("DeleteIpRangeMsg", "uuid"): "deleting a range that does not exist",
    **{(f"Delete{kind}Msg", "uuid"): "deleting what does not exist succeeds (ZStack's "
       "successIfResourceNotExisting)"
       for kind in ("Zone", "Cluster", "Host", "InstanceOffering", "DiskOffering",
                    "PrimaryStorage", "BackupStorage", "Image")},
    ("DetachL2NetworkFromClusterMsg", "cluster_uuid"): "detaching a cluster not attached",
    ("ReturnIpMsg", "l3_network_uuid"): "returning an address not held",
    ("RemoveHostFromPrimaryStorageMsg", "host_uuid"): "a host the storage keeps nothing of",
    ("DeleteImageRefsOnBackupStorageMsg", "backup_storage_uuid"): "a storage with no refs",
}

#: Faults known and not yet fixed: (message, field, junk labels, what is seen). The test
#: asserts each still fails as seen here: once one is fixed the test fails, and its row must
#: go. Empty: every fault the fuzz found is fixed.
KNOWN_ELSEWHERE: list[tuple[str, str, tuple[str, ...], str]] = []


def _known_elsewhere() -> dict[tuple[str, str, str], str]:
    return {(cls, field, label): seen for cls, field, labels, seen in KNOWN_ELSEWHERE
            for label in labels}


def _is_uuid(value: Any) -> bool:
    """
    Whether C{value} may route a message (the sender's C{resource_uuid}): a sender routes
    by a uuid it has checked, so junk travels in the message's fields only.
    """
    try:
        validate.uuid(value, "uuid")
    except OperationError:
        return False
    return True


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # a field named like a builtin (type) shadows it
        return {f.name: eval(f.type, {**vars(typing), **vars(sys.modules[cls.__module__])})
                if isinstance(f.type, str) else f.type for f in attrs.fields(cls)}


def _conforms(value: Any, hint: Any) -> bool:
    """
    Whether C{value} is of the declared type C{hint}.
    """
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value))
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    if origin is dict:
        k, v = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(
            _conforms(a, k) and _conforms(b, v) for a, b in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _camel(field: str) -> str:
    head, *rest = field.split("_")
    return head + "".join(p.title() for p in rest)


def own_fields(cls: type) -> list[str]:
    envelope = {f.name for f in attrs.fields(NeedReplyMessage)}
    return [f.name for f in attrs.fields(cls) if f.name not in envelope]


def registered_messages() -> list[type]:
    """
    Every NeedReplyMessage class defined in the inventory services' message modules.
    """
    out = []
    for mod in MODULES:
        for value in vars(mod).values():
            if (isinstance(value, type) and issubclass(value, NeedReplyMessage)
                    and value.__module__ == mod.__name__):
                out.append(value)
    return out


#: The messages the hypothesis test draws from: those of the services fixed here (the
#: others' fields are in the exhaustive tests, their faults in KNOWN_ELSEWHERE).
HYPOTHESIS_MESSAGES = [c for c in VALID if c.__module__ in (
    zone_m.__name__, cluster_m.__name__, offering_m.__name__, host_m.__name__,
    net_m.__name__, sched_m.__name__, inv_m.__name__)]


class Cloud:
    """
    The services and the seeded cloud on one Clock; C{send} answers a message.
    """

    def __init__(self, case: SynchronousTestCase) -> None:
        self.case = case
        self.clock = Clock()
        self.pair = InMemoryPair(host_count=4, clock=self.clock)
        self.sftp = SftpPair(self.clock, slots=2)
        self.bus = LocalBus(self.clock, node_id="mn-1")
        self.bus.start()
        self.store = MemoryStore(self.clock)
        case.successResultOf(self.store.start())
        self.hosts = HostService(self.clock, self.bus, self.store, self.pair.client,
                                 HostConfig(command_timeout=30, vm_sync_on_ping=False))
        self.hosts.start(track=False)
        self.services = [
            self.hosts,
            ZoneService(self.clock, self.bus, self.store),
            ClusterService(self.clock, self.bus, self.store),
            OfferingService(self.clock, self.bus, self.store),
            PrimaryStorageService(self.clock, self.bus, self.store),
            BackupStorageService(self.clock, self.bus, self.store, self.sftp.client,
                                 BackupStorageConfig(echo_interval=3600, connect_timeout=10,
                                                     echo_timeout=2)),
            ImageService(self.clock, self.bus, self.store),
            L2NetworkService(self.clock, self.bus, self.store),
            L3NetworkService(self.clock, self.bus, self.store),
            HostAllocatorService(self.clock, self.bus, self.store),
            inv_m.QueryService(self.clock, self.bus, self.store),
        ]
        for s in self.services[1:]:
            s.start()
        self.service_of: dict[type, str] = {
            c: host_m.SERVICE_ID for c in vars(host_m).values()
            if isinstance(c, type) and issubclass(c, NeedReplyMessage)}
        for s in self.services[1:]:
            for mtype in s._handlers:
                self.service_of[mtype] = s.service_id
        self.seed()
        self.pump()
        self.seeded = sqlite3.connect(":memory:")
        self.store._db.raw.backup(self.seeded)
        self.seeded_rows = self.dump()

    def restore(self) -> None:
        """
        Put the seeded rows back (for changes no agent saw: see L{DB_ONLY}).
        """
        self.pump()
        self.seeded.backup(self.store._db.raw)
        self.case.assertEqual(self.dump(), self.seeded_rows)

    # --- plumbing -------------------------------------------------------------------------

    def pump(self, until: Any = None) -> None:
        """
        Run what is due now: 20 rounds, or 3 more after C{until} (a Deferred) fired.
        """
        left = 20
        while left:
            self.pair.flush()
            self.sftp.flush()
            self.clock.advance(0)
            left -= 1
            if until is not None and until.called:
                left, until = min(left, 3), None

    def send(self, cls: type, fields: dict[str, Any]) -> Any:
        """
        The reply to C{cls(**fields)}, or None when none came (after 10 minutes of clock).
        """
        uuid = next((fields[f] for f in ("uuid", "host_uuid", "primary_storage_uuid",
                                          "backup_storage_uuid", "l3_network_uuid",
                                          "l2_network_uuid")
                     if _is_uuid(fields.get(f))), None)
        msg = cls(service_id=self.service_of[cls], resource_uuid=uuid, **fields)
        d = self.bus.send(msg)
        self.pump(d)
        for _ in range(4):
            if d.called:
                break
            self.clock.advance(150)
            self.pump(d)
        if not d.called:
            d.addErrback(lambda f: None)
            return None
        return self.case.successResultOf(d)

    def ok(self, cls: type, **fields: Any) -> Any:
        reply = self.send(cls, fields)
        self.case.assertTrue(reply is not None and reply.success,
                             f"seeding {cls.__name__}: {reply and reply.error}")
        return reply

    def seed(self) -> None:
        self.ok(zone_m.CreateZoneMsg, name="z", uuid="z")
        self.ok(cluster_m.CreateClusterMsg, name="c", zone_uuid="z", uuid="c")
        for i in (0, 1):
            self.ok(host_m.AddHostMsg, name=f"h{i}", zone_uuid="z", cluster_uuid="c",
                    uuid=f"h{i}", management_ip=base(i))
        self.ok(ps_m.AddNfsPrimaryStorageMsg, name="nfs", zone_uuid="z",
                url="nfs.example:/export/ps", uuid="nfs")
        self.ok(ps_m.AddLocalPrimaryStorageMsg, name="ls", zone_uuid="z", url="/zstack_ps",
                uuid="ls")
        for ps in ("nfs", "ls"):
            self.ok(ps_m.AttachPrimaryStorageToClusterMsg, primary_storage_uuid=ps,
                    cluster_uuid="c")
        self.ok(bs_m.AddSftpBackupStorageMsg, name="bs", url="/zstack_bs",
                hostname=bs_base(0), username="root", password="secret", uuid="bs")
        self.ok(bs_m.AttachBackupStorageToZoneMsg, backup_storage_uuid="bs", zone_uuid="z")
        self.ok(image_m.AddImageMsg, name="img", uuid="img", backup_storage_uuids=["bs"],
                url="http://h/i.qcow2?size=3000&actualSize=1000")
        self.ok(offering_m.CreateInstanceOfferingMsg, name="io", uuid="io", cpu_num=1,
                memory_size=GiB)
        self.ok(offering_m.CreateDiskOfferingMsg, name="do", uuid="do", disk_size=GiB)
        self.ok(net_m.CreateL2NoVlanNetworkMsg, name="l2", uuid="l2", zone_uuid="z",
                physical_interface="eth0")
        self.ok(net_m.AttachL2NetworkToClusterMsg, l2_network_uuid="l2", cluster_uuid="c")
        self.ok(net_m.CreateL3NetworkMsg, name="l3", uuid="l3", l2_network_uuid="l2")
        self.ok(net_m.AddIpRangeMsg, l3_network_uuid="l3", name="r", uuid="r",
                start_ip="10.0.0.10", end_ip="10.0.0.100", netmask="255.255.255.0",
                gateway="10.0.0.1")
        self.ok(net_m.AddDnsToL3NetworkMsg, l3_network_uuid="l3", dns="8.8.8.8")
        self.ok(net_m.AttachNetworkServiceToL3NetworkMsg, l3_network_uuid="l3",
                network_services={"vr": ["DHCP"]})
        self.ok(net_m.AllocateIpMsg, l3_network_uuid="l3", holder_type="VmInstanceVO",
                holder_uuid="vm-1")
        self.ok(ps_m.AllocatePrimaryStorageMsg, size=GiB, holder_uuid="vol-1",
                required_primary_storage_uuid="nfs")
        self.ok(sched_m.AllocateHostMsg, vm_instance_uuid="vm-1", cpu_num=1,
                memory_size=GiB, zone_uuid="z")

    # --- what the store holds --------------------------------------------------------------

    def tables(self) -> list[str]:
        raw = self.store._db.raw
        return [r[0] for r in raw.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            " ORDER BY name")]

    def changes(self) -> int:
        return self.store._db.raw.total_changes

    def dump(self) -> dict[str, list[str]]:
        raw = self.store._db.raw
        return {t: sorted(map(repr, raw.execute(f'SELECT * FROM "{t}"')))
                for t in self.tables()}

    def audit(self) -> list[dict]:
        d = self.store.audit_capacity()
        self.pump()
        return self.case.successResultOf(d)

    def stop(self) -> None:
        self.seeded.close()
        for s in self.services:
            d = s.stop()
            self.pump()
            self.case.successResultOf(d)
        self.pump()
        self.store.flush()
        d = self.store.stop()
        self.store.flush()
        self.case.successResultOf(d)


class FuzzTests(SynchronousTestCase):
    """
    One test per group of services (trial --jobs spreads them).
    """

    def setUp(self) -> None:
        self.cloud: Cloud | None = None
        self.addCleanup(self.stop_cloud)

    def stop_cloud(self) -> None:
        if self.cloud is not None:
            self.cloud.stop()
            self.cloud = None

    def fresh(self) -> Cloud:
        self.stop_cloud()
        self.cloud = Cloud(self)
        self.snapshot: dict[str, list[str]] | None = None  # the rows, while unchanged
        return self.cloud

    def fault(self, cls: type, field: str, label: str, value: Any, reply: Any,
              before: dict | None, after: dict | None, changed: bool) -> str | None:
        """
        What is wrong with C{reply} to C{cls} with C{field} = C{value}, or None.
        """
        if reply is None:
            return "no reply"
        hint = _hints(cls)[field]
        if reply.success:
            if not _conforms(value, hint):
                return "success"
            if isinstance(value, str) and (
                    len(value) > 65535 or "\x00" in value or "\ud800" in value
                    or (not value.strip() and typing.get_origin(hint) is None)):
                return "success"
            if label in ("wrong-kind", "unknown") and _referencing(cls, field):
                if (cls.__name__, field) in PREFERENCES:
                    return None
                if (cls.__name__, field) not in IDEMPOTENT:
                    return "success"
                if changed and before != after:
                    return "success changing rows"
            return None
        err = reply.error
        code = err.code
        if code == SYS.INTERNAL or code.startswith("DB."):
            return code
        named = err.opaque.get("field")
        if code in (SYS.INVALID_ARGUMENT_ERROR, SYS.RESOURCE_NOT_FOUND):
            if not isinstance(named, str) or not named:
                return f"{code} names no field"
            # a check of two fields together may name the other one, and say why
            if code == SYS.INVALID_ARGUMENT_ERROR and named.split("[")[0].split(".")[0] \
                    != _camel(field) and _camel(field) not in (err.details or ""):
                return f"{code} names {named}"
        if label in ("wrong-kind", "unknown") and _referencing(cls, field) and \
                code != SYS.INVALID_ARGUMENT_ERROR:
            shown = [err.details or "", *map(repr, err.opaque.values())]
            if not any(value in s for s in shown):
                return f"{code} does not name the uuid"
        if changed and before != after:
            lost = [t for t in before if before[t] != after.get(t)]
            return f"{code} changed {','.join(lost)}"
        return None

    def probe(self, cls: type, field: str, label: str, value: Any) -> str | None:
        """
        Send C{cls} with C{field} = C{value} (the other fields valid) on L{cloud}: what is
        wrong with the outcome, or None. A cloud whose rows the message changed is put
        back (or built again).
        """
        cloud = self.cloud
        assert cloud is not None
        fields = dict(VALID[cls])
        fields[field] = value
        before_n = cloud.changes()
        if self.snapshot is None:
            self.snapshot = cloud.dump()
        before = self.snapshot
        reply = cloud.send(cls, fields)
        changed = cloud.changes() != before_n
        after = cloud.dump() if changed else before
        seen = self.fault(cls, field, label, value, reply, before, after, changed)
        logged = self.flushLoggedErrors()
        if logged:
            seen = (seen or "") + f" logged {logged[0].getErrorMessage()[:200]}"
        drift = cloud.audit()
        if drift:
            seen = (seen or "") + f" drift {drift}"
        if seen is not None and reply is not None and not reply.success:
            seen += f" ({str(reply.error)[:300]})"
        if changed and before != after:
            if cloud.service_of[cls] in DB_ONLY:
                cloud.restore()
            else:
                self.fresh()
            self.snapshot = None
        return None if seen is None else seen.encode("ascii", "backslashreplace").decode()

    def fuzz(self, classes: list[type]) -> None:
        self.fresh()
        faults: list[str] = []
        known = _known_elsewhere()
        seen_elsewhere: dict[tuple[str, str, str], str] = {}
        for cls in classes:
            self.assertEqual(sorted(VALID[cls]), sorted(own_fields(cls)), cls.__name__)
            for field in own_fields(cls):
                for label, make in junk(_wrong_kind(cls, field)):
                    seen = self.probe(cls, field, label, make())
                    key = (cls.__name__, field, label)
                    if key in known:
                        seen_elsewhere[key] = (seen or "fixed").split(" logged")[0].split(
                            " (")[0]
                    elif seen is not None:
                        faults.append(f"{cls.__name__}.{field}={label}: {seen}")
        self.assertFalse(faults, "\n" + "\n".join(faults))
        names = {c.__name__ for c in classes}
        self.assertEqual(seen_elsewhere, {k: v for k, v in known.items() if k[0] in names},
                         "a KNOWN_ELSEWHERE fault changed: take it off the list")

    def test_registered(self) -> None:
        """
        Every registered message has its valid fields here, and a service handles it.
        """
        cloud = self.fresh()
        self.assertEqual(sorted(c.__name__ for c in registered_messages()),
                         sorted(c.__name__ for c in VALID))
        for cls in VALID:
            self.assertIn(cls, cloud.service_of)

    def _group(self, *modules: Any) -> list[type]:
        return [c for c in registered_messages() if any(c.__module__ == m.__name__
                                                        for m in modules)]

    def test_zone_cluster_offering(self) -> None:
        """
        The zone, cluster and offering services.
        """
        self.fuzz(self._group(zone_m, cluster_m, offering_m))

    def test_host(self) -> None:
        """
        The host service.
        """
        self.fuzz(self._group(host_m))

    def test_l2_network(self) -> None:
        """
        The L2 network service.
        """
        self.fuzz([c for c in self._group(net_m) if c.__name__ in L2_MESSAGES])

    def test_l3_network(self) -> None:
        """
        The L3 network service.
        """
        self.fuzz([c for c in self._group(net_m) if c.__name__ not in L2_MESSAGES])

    def test_primary_storage(self) -> None:
        """
        The primary storage service.
        """
        self.fuzz(self._group(ps_m))

    def test_backup_storage_image(self) -> None:
        """
        The backup storage and image services.
        """
        self.fuzz(self._group(bs_m, image_m))

    def test_allocator_query(self) -> None:
        """
        The host allocator and the query service.
        """
        self.fuzz(self._group(sched_m, inv_m))

    @settings(max_examples=1500, derandomize=True, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def test_any_junk(self, data: st.DataObject) -> None:
        """
        Beyond the fixed junk: any JSON-like value (text of any code points, integers of
        any size, floats, nested lists and maps) in any field of the messages of the
        services fixed with this test (the store-only ones and the host service).
        """
        if self.cloud is None:
            self.fresh()
        cls = data.draw(st.sampled_from(HYPOTHESIS_MESSAGES), label="message")
        field = data.draw(st.sampled_from(own_fields(cls)), label="field")
        value = data.draw(ANY_JUNK, label="value")
        seen = self.probe(cls, field, "any", value)
        self.assertIsNone(seen, f"{cls.__name__}.{field}={value!r}"[:300])
