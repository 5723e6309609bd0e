# -*- test-case-name: tests.test_agent_protocol -*-
"""
The wire contract between the management node and its agents, defined once and imported by
both sides (the management node's C{zcontrol.agentclient} and the agent's L{agent.app}).

Transport
=========
The management node POSTs a JSON command to C{<host base URL><path>}. Asynchronous commands
carry two headers: C{taskuuid} (a fresh uuid per call) and C{callbackurl}. The agent answers
C{200} with an empty body at once ("accepted"), does the work, then POSTs the JSON response to
C{callbackurl} with the same C{taskuuid} header and a signature header (see L{sign}).
Synchronous commands (L{ECHO_PATH}, L{CONNECT_PATH}, L{PING_PATH}) carry no C{taskuuid} and
are answered inline with the JSON response.

Addressing many hosts
=====================
One agent process simulates many hosts. A host is addressed by a path prefix on one port:
C{http://<agent ip>:<port>/hosts/<host id>} is that host's I{base URL}, and a command path is
appended to it (C{.../hosts/17/vm/start}). A host id is the simulated host's index
(C{0 .. N-1}). The management node only ever sees base URLs (L{host_base_url}), so a real
one-host agent (base URL C{http://<ip>:7070}, unprefixed paths) and a simulated host look the
same to it.

Note [why a path prefix]: thousands of hosts behind one port share one TCP endpoint, so the
management node keeps B{one} connection pool per management-node/agent-process pair, whose
size it controls, instead of thousands of pools of a few connections each (a port range), and
it needs no DNS or C{Host} header tricks (virtual hosts). One listening socket also means one
listen backlog to size (see L{agent.tap}).

Authentication
==============
At C{/host/connect} the management node generates a per-host secret and sends it in
L{ConnectCmd.callback_secret}; the agent keeps it per host. Every message after connect is
signed with it (hex HMAC-SHA256 in the L{SIGNATURE_HEADER}), each kind over its own labelled
string (Note [signed strings]):

 - a command (L{sign_command}) binds its path, its C{callbackurl}, its expiry
   (L{EXPIRY_HEADER}), its task uuid and its body: a captured C{/vm/stop} is not valid at
   C{/vm/destroy}, nor with another callback URL, nor after its expiry. The agent refuses an
   expired command, one whose expiry is more than L{MAX_COMMAND_AGE} ahead, and a task uuid
   it accepted before (it remembers them longer than any expiry it admits);
 - a callback (L{sign}) binds its task uuid and body: a callback captured for one task cannot
   complete another, and a replayed one finds no pending task;
 - a report (L{sign_report}) binds its command path, task uuid and body, and carries a
   sequence number (Note [report order]).

A connect carries the operator's bootstrap token (L{ConnectCmd.bootstrap_token}, checked by
L{token_matches}) and the URL prefixes the host's callbacks may go to
(L{ConnectCmd.callback_url_prefixes}, see L{url_under}). Every body is bounded
(L{MAX_BODY_SIZE}), its signature is checked before it is parsed, and it is parsed by
L{decode_body}, which raises nothing but L{ProtocolError}.

Note [signed strings]: a signature is computed over C{label "\\n" field "\\n" ... "\\n"
body}: the label names the kind and direction (L{COMMAND_LABEL}, L{CALLBACK_LABEL},
L{REPORT_LABEL}), the fields are header values (which hold no line break: one that does is
never signed nor verified), the body comes last. The string is therefore unambiguous, and a
signature of one kind is never valid as another's. Header values are signed as sent (the
expiry as its decimal text), so the verifier signs exactly the bytes it received.

Either side may serve HTTPS (L{agent.http.server_tls_options}) and check the other's
certificate against a configured CA (L{agent.http.trust_root_from_pem}).

Encoding
========
Commands and responses are frozen attrs classes (L{Message}) with snake_case attributes and
camelCase JSON names (ZStack's dialect: C{vmInstanceUuid}), encoded by the project's one codec
(L{agent.codec}, shared with the bus) and under its policy: unknown fields are ignored (a
newer peer's additions), missing required fields and wrong types raise L{ProtocolError}
naming the field, and every body carries the wire version C{"_v": "MAJOR.MINOR"} (another
major is refused). Every response field has a default, so that C{Rsp(success=False,
error="...")} is always a valid response of any type.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import urllib.parse
from typing import Any, ClassVar, Mapping, TypeVar

import attrs

from agent import codec
from agent.codec import Codec, CodecError, camel_case, dumps

__all__ = [
    "CALLBACK_URL_HEADER",
    "COMMANDS",
    "COMMAND_PATH_HEADER",
    "CONNECT_PATH",
    "CommandDef",
    "ECHO_PATH",
    "EXPIRY_HEADER",
    "MAX_COMMAND_AGE",
    "HOSTS_PREFIX",
    "Message",
    "PING_PATH",
    "REPORTS",
    "REPORT_VM_STATE_PATH",
    "RESOURCE_UUID_HEADER",
    "MAX_BODY_SIZE",
    "ProtocolError",
    "Response",
    "SIGNATURE_HEADER",
    "TASK_UUID_HEADER",
    "TRACE_ID_HEADER",
    "VmState",
    "allowed_callback_prefixes",
    "command_for",
    "decode_body",
    "format_expiry",
    "host_base_url",
    "loads",
    "parse_expiry",
    "sign",
    "sign_command",
    "sign_report",
    "token_matches",
    "trace_id_of",
    "url_under",
    "verify",
    "verify_command",
    "verify_report",
]

#: Header naming the task; the same value comes back on the callback.
TASK_UUID_HEADER = "taskuuid"
#: Header carrying the URL the agent POSTs the result to.
CALLBACK_URL_HEADER = "callbackurl"
#: Header carrying the hex HMAC-SHA256 of a callback (see L{sign}).
SIGNATURE_HEADER = "x-zcontrol-signature"
#: Header naming the management-node path an agent-initiated command is for.
COMMAND_PATH_HEADER = "commandpath"
#: Header naming the resource a command is about (informative).
RESOURCE_UUID_HEADER = "X-Resource-UUID"
#: Header of an asynchronous command: the absolute time (seconds since the epoch, a decimal,
#: see L{format_expiry}) after which the agent must not accept it; signed with it.
EXPIRY_HEADER = "X-Command-Expiry"
#: Header carrying the trace id of the job a command belongs to (L{zcontrol.core.trace}):
#: informative, not signed; the agent logs it with the command's accept and callback and
#: sends it back on the callback.
TRACE_ID_HEADER = "X-Trace-Id"

_TRACE_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def trace_id_of(values: list[bytes] | None) -> str | None:
    """
    The trace id in a request's raw L{TRACE_ID_HEADER} values, or None when there is none or
    it is not 1 to 64 characters of C{[A-Za-z0-9._-]} (a bad one is ignored, never refused:
    the header is informative).
    """
    if not values:
        return None
    text = values[0].decode("ascii", "replace")
    return text if _TRACE_ID.fullmatch(text) else None

#: Labels opening the signed strings (Note [signed strings]): one per direction and kind, so
#: that no signature is valid as another kind's.
COMMAND_LABEL = b"zcontrol-command-v2"
CALLBACK_LABEL = b"zcontrol-callback-v2"
REPORT_LABEL = b"zcontrol-report-v2"
#: The longest a command may stay acceptable, seconds: an agent refuses a command whose
#: expiry is further in the future than this (plus its clock skew allowance), and remembers
#: the task uuids it accepted at least this long (see L{agent.app.TaskMemory}); the management
#: node never asks for more.
MAX_COMMAND_AGE = 3300.0

_EXPIRY = re.compile(r"[0-9]{1,15}(\.[0-9]{1,9})?")

#: Path prefix addressing one of the hosts an agent process serves.
HOSTS_PREFIX = "/hosts/"

M = TypeVar("M", bound="Message")


#: A message does not match the contract (bad JSON, missing field, wrong type, refused wire
#: version): the shared codec's error (see L{agent.codec}).
ProtocolError = CodecError


def host_base_url(agent_url: str, host_id: str | int | None = None) -> str:
    """
    The base URL of one host of the agent at C{agent_url} (C{http://ip:port}); with no
    C{host_id}, the agent's own unprefixed base URL (a one-host agent).
    """
    base = agent_url.rstrip("/")
    if host_id is None:
        return base
    return f"{base}{HOSTS_PREFIX}{host_id}"


def _mac(secret: str, label: bytes, fields: tuple[str, ...], body: bytes) -> str:
    """
    Hex HMAC-SHA256 keyed by C{secret} over the canonical string C{label}, then each field,
    then the body, separated by newlines (Note [signed strings]).

    @raise ValueError: a field holds a newline (it would make the string ambiguous).
    """
    parts = [label]
    for field in fields:
        if "\n" in field or "\r" in field:
            raise ValueError("a signed header value holds a line break")
        parts.append(field.encode("utf-8", "surrogatepass"))
    parts.append(body)
    return hmac.new(secret.encode("utf-8", "surrogatepass"), b"\n".join(parts),
                    hashlib.sha256).hexdigest()


def _matches(expected: Any, signature: str | bytes | None) -> bool:
    """
    Whether C{signature} equals the signature C{expected()} computes, in constant time; a
    missing signature, or fields that cannot be signed, never match.
    """
    if not signature:
        return False
    if isinstance(signature, str):
        signature = signature.encode("ascii", "replace")
    try:
        mac = expected()
    except ValueError:
        return False
    return hmac.compare_digest(mac.encode("ascii"), signature)


def sign(secret: str, taskuuid: str, body: bytes) -> str:
    """
    The signature of a callback (agent -> management node, the result of a command): the
    L{CALLBACK_LABEL}, the task uuid and the body under the host's secret (Note [signed
    strings]).

    @raise ValueError: C{taskuuid} holds a line break.
    """
    return _mac(secret, CALLBACK_LABEL, (taskuuid,), body)


def verify(secret: str, taskuuid: str, body: bytes, signature: str | bytes | None) -> bool:
    """
    Whether C{signature} is the callback signature L{sign} of (C{taskuuid}, C{body}) under
    C{secret}, compared in constant time.
    """
    return _matches(lambda: sign(secret, taskuuid, body), signature)


# The agent wire's codec: the project's one codec (L{agent.codec}, shared with the bus) with
# camelCase wire names.
_CODEC = Codec(rename=camel_case)


def _decode_value(tp: Any, value: Any, where: str) -> Any:
    return _CODEC.converter(tp)(value, where)


def _encode_value(value: Any) -> Any:
    return _CODEC.encode_value(value)


@attrs.frozen(kw_only=True)
class Message:
    """
    Base of every command, response and nested value on the wire. Subclasses are declared
    with L{message}.
    """

    _wire: ClassVar[tuple[tuple[str, str, Any, bool], ...]] = ()

    def to_dict(self) -> dict[str, Any]:
        """
        The JSON-ready dict with camelCase keys and the wire version (L{agent.codec}).
        """
        return _CODEC.encode_top(self)

    def to_json(self) -> bytes:
        """
        The UTF-8 JSON encoding.
        """
        return dumps(_CODEC.encode_top(self))

    @classmethod
    def from_dict(cls: type[M], data: Mapping[str, Any]) -> M:
        """
        Decode from a JSON object: unknown fields are ignored, missing or ill-typed ones and
        a wire version of another major are refused.

        @raise ProtocolError: the data does not match the contract; the message names the
            field.
        """
        return _CODEC.decode_top(cls, data)

    @classmethod
    def from_json(cls: type[M], body: bytes | str) -> M:
        """
        Decode from JSON text, as L{from_dict}.

        @raise ProtocolError: not JSON, or not this message.
        """
        return _CODEC.decode_top(cls, loads(body))


def message(cls: type[M]) -> type[M]:
    """
    Declare a wire message: make C{cls} a frozen, keyword-only attrs class and compute its
    wire field table (camelCase names, resolved types, which fields are required).
    """
    cls = attrs.frozen(kw_only=True)(cls)
    attrs.resolve_types(cls)
    table = []
    for f in _CODEC.wire_fields(cls):
        table.append((f.name, camel_case(f.name), f.type, f.default is attrs.NOTHING))
    cls._wire = tuple(table)
    response_base = globals().get("Response")
    if response_base is not None and issubclass(cls, response_base):
        required = [wire for _a, wire, _t, req in table if req]
        if required:
            raise TypeError(f"every field of response {cls.__name__} needs a default: {required}")
    return cls


class VmState:
    """
    VM states as the hypervisor reports them (ZStack's C{VmInstanceState} names).
    """

    RUNNING = "Running"
    STOPPED = "Stopped"
    UNKNOWN = "Unknown"


# --- shared values ---------------------------------------------------------------------------


@message
class NicTO(Message):
    """A VM NIC."""

    mac: str
    ip: str | None = None
    netmask: str | None = None
    gateway: str | None = None
    bridge_name: str | None = None
    device_id: int = 0
    l3_network_uuid: str | None = None


@message
class VolumeTO(Message):
    """
    A volume as the hypervisor sees it (ZStack's C{KVMAgentCommands.VolumeTO}): C{device_id}
    0 is the root volume, data volumes 1 and up (the guest's C{vdb}, C{vdc}, ...).
    """

    volume_uuid: str
    install_path: str
    device_id: int
    device_type: str = "file"
    use_virtio: bool = True
    cache_mode: str = "none"
    wwn: str | None = None


@message
class Response(Message):
    """
    Base of every agent response (ZStack's C{AgentResponse}).
    """

    success: bool = True
    error: str | None = None


# --- host (the framework's synchronous URIs and the KVM host commands) -----------------------


@message
class EchoCmd(Message):
    """C{/host/echo}: is the agent up? (sync)"""


@message
class EchoRsp(Response):
    """Answer to L{EchoCmd}."""


@message
class ConnectCmd(Message):
    """
    C{/host/connect} (sync): the management node takes the host over.

    @ivar callback_secret: the per-host secret that signs this host's callbacks from now on.
    @ivar bootstrap_token: the token the operator configured on both the management node and
        the agent; an agent configured with one refuses a connect without it (see
        L{token_matches}).
    @ivar callback_url_prefixes: the management-node URLs under which this host's callbacks
        may be POSTed from now on (see L{allowed_callback_prefixes} and L{url_under}).
    """

    host_uuid: str
    callback_secret: str
    send_command_url: str | None = None
    version: str | None = None
    bootstrap_token: str | None = None
    callback_url_prefixes: list[str] = attrs.Factory(list)


@message
class ConnectRsp(Response):
    """Answer to L{ConnectCmd}."""

    libvirt_version: str | None = None
    qemu_version: str | None = None


@message
class PingCmd(Message):
    """C{/host/ping} (sync)."""

    host_uuid: str


@message
class PingRsp(Response):
    """
    Answer to L{PingCmd}: the host uuid the agent was connected with (None before any
    connect); a mismatch means the management node must reconnect.
    """

    host_uuid: str | None = None


@message
class HostCapacityCmd(Message):
    """C{/host/capacity}."""


@message
class HostCapacityRsp(Response):
    """Total and used CPU and memory (bytes)."""

    cpu_num: int = 0
    cpu_speed: int = 0
    total_memory: int = 0
    used_cpu: int = 0
    used_memory: int = 0


@message
class HostFactCmd(Message):
    """C{/host/fact}."""


@message
class HostFactRsp(Response):
    """Facts that become system tags."""

    hypervisor_type: str | None = None
    os_distribution: str | None = None
    os_version: str | None = None
    os_release: str | None = None
    qemu_version: str | None = None
    libvirt_version: str | None = None
    cpu_model_name: str | None = None


# --- VMs -------------------------------------------------------------------------------------


@message
class StartVmCmd(Message):
    """C{/vm/start}: create (if new) and start a VM."""

    vm_instance_uuid: str
    vm_name: str | None = None
    cpu_num: int
    memory_size: int
    nics: list[NicTO] = attrs.Factory(list)
    root_volume_install_path: str | None = None
    boot_dev: list[str] = attrs.Factory(lambda: ["hd"])
    #: the data volumes attached to the VM (ZStack's C{StartVmCmd.dataVolumes}): the VM is
    #: defined with exactly these.
    data_volumes: list[VolumeTO] = attrs.Factory(list)


@message
class StartVmRsp(Response):
    """Answer to L{StartVmCmd}."""

    vnc_port: int | None = None


@message
class StopVmCmd(Message):
    """C{/vm/stop}."""

    uuid: str
    type: str = "grace"
    timeout: int = 60


@message
class StopVmRsp(Response):
    """Answer to L{StopVmCmd}."""


@message
class RebootVmCmd(Message):
    """C{/vm/reboot}."""

    uuid: str
    timeout: int = 60


@message
class RebootVmRsp(Response):
    """Answer to L{RebootVmCmd}."""


@message
class DestroyVmCmd(Message):
    """C{/vm/destroy} (idempotent: destroying an unknown VM succeeds)."""

    uuid: str


@message
class DestroyVmRsp(Response):
    """Answer to L{DestroyVmCmd}."""


@message
class MigrateVmCmd(Message):
    """C{/vm/migrate}: live-migrate a running VM to another host (by its agent base URL)."""

    vm_uuid: str
    dest_host_address: str


@message
class MigrateVmRsp(Response):
    """Answer to L{MigrateVmCmd}."""


@message
class AttachNicCmd(Message):
    """C{/vm/attachnic}."""

    vm_uuid: str
    nic: NicTO


@message
class AttachNicRsp(Response):
    """Answer to L{AttachNicCmd}."""


@message
class DetachNicCmd(Message):
    """C{/vm/detachnic}."""

    vm_uuid: str
    nic: NicTO


@message
class DetachNicRsp(Response):
    """Answer to L{DetachNicCmd}."""


@message
class AttachDataVolumeCmd(Message):
    """
    C{/vm/attachdatavolume} (ZStack's C{AttachDataVolumeCmd}, without its C{addons}, which
    this agent has no use for; a sender's C{addons} is ignored as any unknown field): hot-plug
    a data volume into a running VM at C{volume.device_id}.
    """

    vm_instance_uuid: str
    volume: VolumeTO


@message
class AttachDataVolumeRsp(Response):
    """Answer to L{AttachDataVolumeCmd}."""


@message
class DetachDataVolumeCmd(Message):
    """
    C{/vm/detachdatavolume} (ZStack's C{DetachDataVolumeCmd}): unplug a data volume from a
    running VM (one that is not attached: success, as ZStack's agent answers for a volume it
    detached before).
    """

    vm_instance_uuid: str
    volume: VolumeTO


@message
class DetachDataVolumeRsp(Response):
    """Answer to L{DetachDataVolumeCmd}."""


@message
class VmSyncCmd(Message):
    """C{/vm/vmsync}: the state of every VM on the host."""


@message
class VmSyncRsp(Response):
    """VM uuid to state (L{VmState})."""

    states: dict[str, str] = attrs.Factory(dict)


@message
class CheckVmStateCmd(Message):
    """C{/vm/checkstate}: the state of some VMs (unknown ones are reported C{Stopped})."""

    vm_uuids: list[str]


@message
class CheckVmStateRsp(Response):
    """VM uuid to state."""

    states: dict[str, str] = attrs.Factory(dict)


@message
class GetVncPortCmd(Message):
    """C{/vm/getvncport}."""

    vm_uuid: str


@message
class GetVncPortRsp(Response):
    """The VNC port of a running VM."""

    port: int | None = None
    protocol: str = "vnc"


# --- agent -> management node ----------------------------------------------------------------


@message
class ReportVmStateCmd(Message):
    """
    C{/kvm/reportvmstate}: the agent tells the management node a VM changed state on its own;
    POSTed to the C{sendCommandUrl} given at connect with the L{COMMAND_PATH_HEADER}.

    @ivar seq: the report's sequence number (see Note [report order]).
    """

    host_uuid: str
    vm_uuid: str
    vm_state: str
    seq: int | None = None


# --- console proxy ---------------------------------------------------------------------------


@message
class EstablishProxyCmd(Message):
    """C{/console/establish}: proxy a VM's console, reached with a one-time token."""

    vm_uuid: str
    target_hostname: str
    target_port: int
    token: str
    proxy_hostname: str | None = None


@message
class EstablishProxyRsp(Response):
    """The proxy's address and the URL a browser opens."""

    proxy_port: int | None = None
    url: str | None = None


@message
class CheckProxyCmd(Message):
    """C{/console/check}: is a console proxy still there?"""

    token: str


@message
class CheckProxyRsp(Response):
    """Answer to L{CheckProxyCmd}."""

    available: bool = False


@message
class DeleteProxyCmd(Message):
    """C{/console/delete} (idempotent)."""

    token: str


@message
class DeleteProxyRsp(Response):
    """Answer to L{DeleteProxyCmd}."""


# --- virtual router --------------------------------------------------------------------------


@message
class VRouterNic(Message):
    """A virtual router NIC."""

    mac: str
    ip: str
    netmask: str
    gateway: str | None = None
    category: str = "Private"


@message
class InitVRouterCmd(Message):
    """C{/vrouter/init}."""

    vrouter_uuid: str
    management_nic_mac: str | None = None


@message
class InitVRouterRsp(Response):
    """Answer to L{InitVRouterCmd}."""


@message
class ConfigureNicCmd(Message):
    """C{/vrouter/configurenic}."""

    vrouter_uuid: str
    nics: list[VRouterNic]


@message
class ConfigureNicRsp(Response):
    """Answer to L{ConfigureNicCmd}."""


@message
class SNATInfo(Message):
    """One source-NAT rule."""

    private_nic_mac: str
    private_nic_ip: str
    public_ip: str
    public_nic_mac: str
    snat_netmask: str


@message
class SetSNATCmd(Message):
    """C{/vrouter/setsnat}."""

    vrouter_uuid: str
    snat: SNATInfo


@message
class SetSNATRsp(Response):
    """Answer to L{SetSNATCmd}."""


@message
class DhcpInfo(Message):
    """One DHCP entry."""

    ip: str
    mac: str
    netmask: str
    gateway: str | None = None
    hostname: str | None = None
    dns: list[str] = attrs.Factory(list)


@message
class AddDhcpEntryCmd(Message):
    """C{/vrouter/adddhcp}."""

    vrouter_uuid: str
    dhcp_entries: list[DhcpInfo]
    rebuild: bool = False


@message
class AddDhcpEntryRsp(Response):
    """Answer to L{AddDhcpEntryCmd}."""


@message
class FirewallRule(Message):
    """One firewall rule."""

    action: str
    protocol: str = "all"
    source_ip: str | None = None
    dest_ip: str | None = None
    dest_port: str | None = None


@message
class RefreshFirewallCmd(Message):
    """C{/vrouter/refreshfirewall}: replace the whole rule set."""

    vrouter_uuid: str
    rules: list[FirewallRule]


@message
class RefreshFirewallRsp(Response):
    """Answer to L{RefreshFirewallCmd}."""


# --- Sftp backup storage (messages) -----------------------------------------------------------
# ZStack's SftpBackupStorageCommands (zstack-utility sftpbackupstorage agent): every response
# carries the storage's totalCapacity and availableCapacity (bytes).


@message
class SftpBackupStorageRsp(Response):
    """
    Base of the Sftp backup storage responses: the storage's capacity (bytes) after the
    command, sent on failures too (ZStack's C{AgentResponse.totalCapacity/availableCapacity}).
    """

    total_capacity: int | None = None
    available_capacity: int | None = None


@message
class SftpConnectCmd(Message):
    """
    C{/sftpbackupstorage/connect}: take the storage at C{storage_path} into use (after the
    framework's C{/host/connect} agreed the callback secret), answering its capacity.
    """

    uuid: str
    storage_path: str


@message
class SftpConnectRsp(SftpBackupStorageRsp):
    """Answer to L{SftpConnectCmd}."""


@message
class SftpDownloadCmd(Message):
    """
    C{/sftpbackupstorage/download}: download the image at C{url} to C{install_path} on the
    storage. C{url_scheme} is the URL's scheme (ZStack sends it apart); C{timeout} seconds.
    """

    image_uuid: str
    install_path: str
    url: str
    url_scheme: str | None = None
    format: str | None = None
    timeout: int | None = None


@message
class SftpDownloadRsp(SftpBackupStorageRsp):
    """
    Answer to L{SftpDownloadCmd}: the image's virtual C{size} and C{actual_size} on disk
    (bytes), its C{md5_sum} and C{format}.
    """

    image_uuid: str | None = None
    install_path: str | None = None
    md5_sum: str | None = None
    size: int | None = None
    actual_size: int | None = None
    format: str | None = None


@message
class SftpDeleteCmd(Message):
    """
    C{/sftpbackupstorage/delete}: delete the bits at C{install_url} (idempotent: deleting
    what is not there succeeds).
    """

    install_url: str


@message
class SftpDeleteRsp(SftpBackupStorageRsp):
    """Answer to L{SftpDeleteCmd}."""


# --- end of Sftp backup storage (messages) ----------------------------------------------------


# --- primary storage on KVM hosts (LocalStorage, NFS) ----------------------------------------
#
# ZStack's LocalStorageKvmBackend and NfsPrimaryStorageKVMBackend commands, simulated by
# L{agent.storage.StoragePlugin} on L{agent.hypervisor.storage_sim.SimulatedStorage}. Every
# response reports the storage's capacity (C{totalCapacity}, C{availableCapacity}, bytes):
# for LocalStorage the host's local disk, for NFS the whole NFS export.


@message
class StorageCapacityRsp(Response):
    """
    A primary storage command's answer: the capacity after it (bytes; ZStack's
    C{AgentResponse} of the storage backends).
    """

    total_capacity: int = 0
    available_capacity: int = 0


@message
class StorageVolumeRsp(StorageCapacityRsp):
    """
    The answer to a command that created bits: where they are and their size (bytes).
    """

    install_path: str | None = None
    size: int = 0
    actual_size: int = 0


@message
class LocalStorageInitCmd(Message):
    """C{/localstorage/init}: prepare C{path} (the storage's url) on the host's local disk."""

    path: str
    host_uuid: str | None = None


@message
class LocalStorageGetPhysicalCapacityCmd(Message):
    """C{/localstorage/getphysicalcapacity}: the local disk's capacity."""

    storage_path: str
    host_uuid: str | None = None


@message
class LocalStorageDownloadCmd(Message):
    """
    C{/localstorage/sftp/download}: copy an image from a backup storage into the host's
    image cache at C{primary_storage_install_path}.
    """

    storage_path: str
    image_uuid: str
    primary_storage_install_path: str
    backup_storage_install_path: str | None = None
    backup_storage_hostname: str | None = None
    size: int = 0
    actual_size: int = 0


@message
class LocalStorageCreateVolumeFromCacheCmd(Message):
    """C{/localstorage/volume/createvolumefromcache}: a root volume on a cached image."""

    storage_path: str
    volume_uuid: str
    template_path_in_cache: str
    install_url: str
    virtual_size: int = 0


@message
class LocalStorageCreateEmptyVolumeCmd(Message):
    """C{/localstorage/volume/createempty}: an empty (data) volume."""

    storage_path: str
    volume_uuid: str
    install_url: str
    size: int = 0


@message
class LocalStorageDeleteCmd(Message):
    """C{/localstorage/delete}: delete bits (a volume or a cached image); missing is fine."""

    storage_path: str
    path: str


@message
class NfsMountCmd(Message):
    """C{/nfsprimarystorage/mount}: mount C{url} (C{server:/export}) at C{mount_path}."""

    uuid: str
    url: str
    mount_path: str
    options: str | None = None


@message
class NfsUnmountCmd(Message):
    """C{/nfsprimarystorage/unmount}: unmount; not mounted is fine."""

    uuid: str
    url: str
    mount_path: str


@message
class NfsGetCapacityCmd(Message):
    """C{/nfsprimarystorage/getcapacity}: the export's capacity (it must be mounted)."""

    uuid: str
    url: str
    mount_path: str


@message
class NfsDownloadCmd(Message):
    """
    C{/nfsprimarystorage/downloadfromsftpbackupstorage}: copy an image into the storage's
    image cache.
    """

    uuid: str
    url: str
    mount_path: str
    image_uuid: str
    primary_storage_install_path: str
    backup_storage_install_path: str | None = None
    backup_storage_hostname: str | None = None
    size: int = 0
    actual_size: int = 0


@message
class NfsCreateRootVolumeCmd(Message):
    """C{/nfsprimarystorage/sftp/createvolumefromtemplate}: a root volume on a cached image."""

    uuid: str
    url: str
    mount_path: str
    volume_uuid: str
    template_path_in_cache: str
    install_url: str
    virtual_size: int = 0


@message
class NfsCreateEmptyVolumeCmd(Message):
    """C{/nfsprimarystorage/createemptyvolume}: an empty (data) volume."""

    uuid: str
    url: str
    mount_path: str
    volume_uuid: str
    install_url: str
    size: int = 0


@message
class NfsDeleteCmd(Message):
    """C{/nfsprimarystorage/delete}: delete bits; missing is fine."""

    uuid: str
    url: str
    mount_path: str
    install_path: str


# --- end of primary storage ------------------------------------------------------------------


# --- the command table -----------------------------------------------------------------------


@attrs.frozen
class CommandDef:
    """
    One command of the contract.

    @ivar path: the path under a host's base URL.
    @ivar cmd_type: the request body type.
    @ivar rsp_type: the response type (inline for sync commands, the callback body otherwise).
    @ivar sync: answered inline (no C{taskuuid}) rather than by callback.
    """

    path: str
    cmd_type: type[Message]
    rsp_type: type[Response]
    sync: bool = False


ECHO_PATH = "/host/echo"
CONNECT_PATH = "/host/connect"
PING_PATH = "/host/ping"

_DEFS = [
    CommandDef(ECHO_PATH, EchoCmd, EchoRsp, sync=True),
    CommandDef(CONNECT_PATH, ConnectCmd, ConnectRsp, sync=True),
    CommandDef(PING_PATH, PingCmd, PingRsp, sync=True),
    CommandDef("/host/capacity", HostCapacityCmd, HostCapacityRsp),
    CommandDef("/host/fact", HostFactCmd, HostFactRsp),
    CommandDef("/vm/start", StartVmCmd, StartVmRsp),
    CommandDef("/vm/stop", StopVmCmd, StopVmRsp),
    CommandDef("/vm/reboot", RebootVmCmd, RebootVmRsp),
    CommandDef("/vm/destroy", DestroyVmCmd, DestroyVmRsp),
    CommandDef("/vm/migrate", MigrateVmCmd, MigrateVmRsp),
    CommandDef("/vm/attachnic", AttachNicCmd, AttachNicRsp),
    CommandDef("/vm/detachnic", DetachNicCmd, DetachNicRsp),
    CommandDef("/vm/attachdatavolume", AttachDataVolumeCmd, AttachDataVolumeRsp),
    CommandDef("/vm/detachdatavolume", DetachDataVolumeCmd, DetachDataVolumeRsp),
    CommandDef("/vm/vmsync", VmSyncCmd, VmSyncRsp),
    CommandDef("/vm/checkstate", CheckVmStateCmd, CheckVmStateRsp),
    CommandDef("/vm/getvncport", GetVncPortCmd, GetVncPortRsp),
    CommandDef("/console/establish", EstablishProxyCmd, EstablishProxyRsp),
    CommandDef("/console/check", CheckProxyCmd, CheckProxyRsp),
    CommandDef("/console/delete", DeleteProxyCmd, DeleteProxyRsp),
    CommandDef("/vrouter/init", InitVRouterCmd, InitVRouterRsp),
    CommandDef("/vrouter/configurenic", ConfigureNicCmd, ConfigureNicRsp),
    CommandDef("/vrouter/setsnat", SetSNATCmd, SetSNATRsp),
    CommandDef("/vrouter/adddhcp", AddDhcpEntryCmd, AddDhcpEntryRsp),
    CommandDef("/vrouter/refreshfirewall", RefreshFirewallCmd, RefreshFirewallRsp),
    # --- primary storage on KVM hosts (LocalStorage, NFS) ---
    CommandDef("/localstorage/init", LocalStorageInitCmd, StorageCapacityRsp),
    CommandDef("/localstorage/getphysicalcapacity", LocalStorageGetPhysicalCapacityCmd,
               StorageCapacityRsp),
    CommandDef("/localstorage/sftp/download", LocalStorageDownloadCmd, StorageVolumeRsp),
    CommandDef("/localstorage/volume/createvolumefromcache",
               LocalStorageCreateVolumeFromCacheCmd, StorageVolumeRsp),
    CommandDef("/localstorage/volume/createempty", LocalStorageCreateEmptyVolumeCmd,
               StorageVolumeRsp),
    CommandDef("/localstorage/delete", LocalStorageDeleteCmd, StorageCapacityRsp),
    CommandDef("/nfsprimarystorage/mount", NfsMountCmd, StorageCapacityRsp),
    CommandDef("/nfsprimarystorage/unmount", NfsUnmountCmd, StorageCapacityRsp),
    CommandDef("/nfsprimarystorage/getcapacity", NfsGetCapacityCmd, StorageCapacityRsp),
    CommandDef("/nfsprimarystorage/downloadfromsftpbackupstorage", NfsDownloadCmd,
               StorageVolumeRsp),
    CommandDef("/nfsprimarystorage/sftp/createvolumefromtemplate", NfsCreateRootVolumeCmd,
               StorageVolumeRsp),
    CommandDef("/nfsprimarystorage/createemptyvolume", NfsCreateEmptyVolumeCmd,
               StorageVolumeRsp),
    CommandDef("/nfsprimarystorage/delete", NfsDeleteCmd, StorageCapacityRsp),
    # --- end of primary storage ---
    # --- Sftp backup storage ---
    CommandDef("/sftpbackupstorage/connect", SftpConnectCmd, SftpConnectRsp),
    CommandDef("/sftpbackupstorage/download", SftpDownloadCmd, SftpDownloadRsp),
    CommandDef("/sftpbackupstorage/delete", SftpDeleteCmd, SftpDeleteRsp),
    # --- end of Sftp backup storage ---
]

#: Every command of the contract by path.
COMMANDS: dict[str, CommandDef] = {d.path: d for d in _DEFS}
_BY_TYPE: dict[type, CommandDef] = {d.cmd_type: d for d in _DEFS}

#: Paths of agent-initiated commands (agent -> management node) and their body types. The
#: agent POSTs them to the C{sendCommandUrl} it got at connect, with the path in the
#: L{COMMAND_PATH_HEADER}, its host uuid in the L{RESOURCE_UUID_HEADER}, a fresh
#: L{TASK_UUID_HEADER} and the signature of (that task uuid, body) under the host's secret.
REPORT_VM_STATE_PATH = "/kvm/reportvmstate"
REPORTS: dict[str, type[Message]] = {REPORT_VM_STATE_PATH: ReportVmStateCmd}


def command_for(cmd: Message) -> CommandDef:
    """
    The definition of the command C{cmd} is an instance of.

    @raise KeyError: C{cmd} is not a command of the contract.
    """
    return _BY_TYPE[type(cmd)]


# --- hardening: bounded decoding, the bootstrap token, callback URLs, report order -----------
#
# Note [report order]: agent-initiated reports carry C{seq}, a number the agent increases by
# one per report of a host and resets to 1 at every C{/host/connect}. The pair (callback secret
# agreed at that connect, seq) orders a host's reports and survives an agent restart: a
# restarted agent forgets its secret and cannot report until the management node connects it
# again with a fresh secret, which starts a new sequence on both sides; a report signed with an
# older secret fails its signature. The management node applies a host's reports one at a
# time in arrival order and orders them per resource (the VM a report is about, its
# C{vm_uuid}): it refuses (C{409}) a report whose seq is not above the last one applied for
# the same VM with the current secret (a replayed report, or a retried one that a later report
# of that VM overtook), and accepts a retried report of one VM that a later report of another
# VM overtook (their orders are independent: dropping it would lose that VM's state). See
# L{zcontrol.agentclient.endpoint} for how that memory stays bounded.

#: Largest request or callback body accepted, bytes (commands and responses are small; the
#: largest, a VM sync of a full host, is a few hundred kilobytes).
MAX_BODY_SIZE = 4 * 1024 * 1024
#: Bounds of integers on the wire (signed 64 bits), as the one parser checks them
#: (L{agent.codec.loads}).
MAX_INT = codec.MAX_INT
MIN_INT = codec.MIN_INT
#: Sequence numbers of reports run from 1 to this.
MAX_SEQ = MAX_INT


def loads(body: bytes | str, max_size: int = MAX_BODY_SIZE) -> Any:
    """
    Parse a body with the project's one defensive parser (L{agent.codec.loads}: bounded size,
    no C{NaN}/C{Infinity}, integers within 64 bits, no lone surrogates, bounded nesting).

    @param max_size: the largest body accepted, bytes.
    @raise ProtocolError: whatever is wrong with C{body}; nothing else is raised.
    """
    return codec.loads(body, max_size)


def decode_body(cls: type[M], body: bytes | str, max_size: int = MAX_BODY_SIZE) -> M:
    """
    Decode a request or callback body into message type C{cls}: L{loads}, then the strict
    decoding of C{cls.from_dict}.

    @raise ProtocolError: the body is too large, not JSON, or not a C{cls}; nothing else is
        raised, whatever the input.
    """
    data = loads(body, max_size)
    try:
        return cls.from_dict(data)
    except ProtocolError:
        raise
    except RecursionError:
        raise ProtocolError(f"{cls.__name__}: nested too deeply") from None
    except (ValueError, TypeError) as e:
        raise ProtocolError(f"{cls.__name__}: {e}") from None


def token_matches(expected: str | None, given: str | None) -> bool:
    """
    Whether the bootstrap token C{given} at connect is the one configured, compared in
    constant time. With none configured (C{expected} None), any connect is accepted.
    """
    if expected is None:
        return True
    if not given:
        return False
    # Digests of equal length: the comparison does not even leak the token's length.
    return hmac.compare_digest(
        hashlib.sha256(expected.encode("utf-8", "surrogatepass")).digest(),
        hashlib.sha256(given.encode("utf-8", "surrogatepass")).digest())


def _split(url: str) -> tuple[str, str, int | None, str] | None:
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    if parts.username is not None or parts.password is not None:
        return None
    if port is None:
        port = 443 if scheme == "https" else 80
    return scheme, parts.hostname.lower(), port, parts.path or "/"


def url_under(url: str, prefixes: list[str] | tuple[str, ...]) -> bool:
    """
    Whether C{url} is under one of C{prefixes}: the same scheme, host and port (default ports
    made explicit), no user info, and a path equal to the prefix's path or below it as a
    directory (C{/cb} admits C{/cb} and C{/cb/x}, not C{/cbx}); a path with C{..} or C{.}
    segments, a query or a fragment is never admitted.
    """
    target = _split(url)
    if target is None:
        return False
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:  # pragma: no cover - _split parsed it
        return False
    if parts.query or parts.fragment or "?" in url or "#" in url:
        return False
    segments = target[3].split("/")
    if ".." in segments or "." in segments or "%" in target[3]:
        return False
    for prefix in prefixes:
        allowed = _split(prefix)
        if allowed is None or allowed[:3] != target[:3]:
            continue
        path = allowed[3].rstrip("/")
        if target[3] == path or target[3].startswith(path + "/") or not path:
            return True
    return False


def allowed_callback_prefixes(cmd: ConnectCmd) -> tuple[str, ...]:
    """
    The URL prefixes a host connected with C{cmd} may call back under: the command's
    C{callback_url_prefixes}, or if it names none, the origin (scheme, host and port) of its
    C{send_command_url}; none at all if it has neither (every command is then refused).
    """
    prefixes = [u for u in cmd.callback_url_prefixes if _split(u) is not None]
    if prefixes:
        return tuple(prefixes)
    if cmd.send_command_url:
        split = _split(cmd.send_command_url)
        if split is not None:
            scheme, host, port, _ = split
            if ":" in host:
                host = f"[{host}]"
            return (f"{scheme}://{host}:{port}/",)
    return ()


def format_expiry(expiry: float) -> str:
    """
    The L{EXPIRY_HEADER} value of the absolute time C{expiry} (seconds since the epoch, on
    the management node's clock): a decimal with three fraction digits.
    """
    return f"{max(0.0, expiry):.3f}"


def parse_expiry(text: str | bytes | None) -> float | None:
    """
    The absolute time an L{EXPIRY_HEADER} value names, or None if it is missing or not a
    plain non-negative decimal (no sign, exponent, C{nan} or C{inf}).
    """
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    if not text or not _EXPIRY.fullmatch(text):
        return None
    return float(text)


def sign_command(secret: str, path: str, taskuuid: str, callback_url: str, expiry: str,
                 body: bytes) -> str:
    """
    The signature of an asynchronous command (management node -> agent): the
    L{COMMAND_LABEL}, the command path (C{/vm/stop}, without the host's base URL), the
    C{callbackurl} header, the L{EXPIRY_HEADER} value (as sent, see L{format_expiry}), the
    task uuid and the body under the host's secret (Note [signed strings]). A captured
    command is therefore valid for no other path, callback URL or task, and for nothing
    once its expiry has passed.

    @raise ValueError: a field holds a line break.
    """
    return _mac(secret, COMMAND_LABEL, (path, callback_url, expiry, taskuuid), body)


def verify_command(secret: str, path: str, taskuuid: str, callback_url: str, expiry: str,
                   body: bytes, signature: str | bytes | None) -> bool:
    """
    Whether C{signature} is L{sign_command} of these values under C{secret}, compared in
    constant time.
    """
    return _matches(
        lambda: sign_command(secret, path, taskuuid, callback_url, expiry, body), signature)


def sign_report(secret: str, command_path: str, taskuuid: str, body: bytes) -> str:
    """
    The signature of an agent-initiated command (a report, agent -> management node): the
    L{REPORT_LABEL}, the L{COMMAND_PATH_HEADER} value, the task uuid and the body under the
    host's secret (Note [signed strings]). Its label keeps it from being valid as a callback
    or a command, and it binds the handler it is for.

    @raise ValueError: a field holds a line break.
    """
    return _mac(secret, REPORT_LABEL, (command_path, taskuuid), body)


def verify_report(secret: str, command_path: str, taskuuid: str, body: bytes,
                  signature: str | bytes | None) -> bool:
    """
    Whether C{signature} is L{sign_report} of these values under C{secret}, compared in
    constant time.
    """
    return _matches(lambda: sign_report(secret, command_path, taskuuid, body), signature)
