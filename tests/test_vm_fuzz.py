"""
Every VM lifecycle message (issue 10, deliverable 6), one field at a time replaced by junk:
bad input gets a clear, structured error (a code, a description, details naming the field)
and loses nothing (no half-made VM, volume, NIC, tag or job row; no capacity or address
held).

The messages are those L{zcontrol.services.vm.lifecycle} handles (L{MESSAGES}, checked
against the VM service's handlers): C{CreateVmInstanceMsg} and the start, stop, reboot,
destroy, recover and expunge of a VM. They go through the node's bus to the VM service of
a cloud of L{tests.vm_scenario} (two KVM hosts of a simulated agent over loopback HTTP, NFS
primary storage, an image, offerings, an L3 with a range), which also holds three VMs for
the operations to act on: one Running, one Stopped, one Destroyed (L{FuzzScenario.targets}).

For every message and every one of its own fields, the message is sent with that one field
replaced by each value of L{tests.test_services_fuzz.junk} (the other fields valid), and:

  - a refusal carries a registered code and no C{SYS.1000} (internal error: a Python
    exception's text) nor store code (C{DB.*}) anywhere in its cause chain;
  - a refusal names the junk field (C{opaque["field"]}, or the field in its description);
    an unknown uuid, or the uuid of another kind of resource, is refused naming that uuid
    too (unless the code is C{SYS.1007});
  - a refusal changes no row of the VM tables, the jobs, the hosts, the primary storages
    or the addresses (nothing half-made, nothing taken: input is checked before any job);
  - a success took a value of the field's declared type that a field may hold (not a NUL,
    a lone surrogate, 70,000 characters, a blank where a value is required), or is one of
    the documented no-ops (L{IDEMPOTENT}), which change nothing;
  - after each field's batch the cloud is consistent
    (L{tests.vm_scenario.CloudScenario.consistent}).

L{FuzzScenario.test_any_junk} then sends (hypothesis, derandomized, bounded) any JSON-like
value in any field of these messages, with the same checks. The examples are drawn first
and sent afterwards (the sends are asynchronous, on the real reactor), so a fault is
reported as drawn, not shrunk.
"""

from __future__ import annotations

import typing
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.test_agent_loopback import LoopbackTestCase
from tests.test_services_fuzz import ANY_JUNK, _camel, _conforms, _hints, junk, own_fields
from tests.vm_scenario import CloudScenario, EmbeddedBackends, codes_of, gather
from zcontrol.core.errors import SYS, OperationError
from zcontrol.services import validate
from zcontrol.services.vm import messages as vm_m
from zcontrol.services.vm.lifecycle import LifecycleMixin
from zcontrol.services.vm.messages import SERVICE_ID as VM_SERVICE
from zcontrol.services.vm.messages import (
    CreateVmInstanceMsg,
    DestroyVmInstanceMsg,
    ExpungeVmInstanceMsg,
    RebootVmInstanceMsg,
    RecoverVmInstanceMsg,
    StartVmInstanceMsg,
    StopVmInstanceMsg,
)

#: The messages of L{LifecycleMixin}, in the order they are fuzzed.
MESSAGES: list[type] = [CreateVmInstanceMsg, StartVmInstanceMsg, StopVmInstanceMsg,
                        RebootVmInstanceMsg, DestroyVmInstanceMsg, RecoverVmInstanceMsg,
                        ExpungeVmInstanceMsg]

#: What each operation acts on: the target VM (L{FuzzScenario.targets}) in the state it needs.
TARGET = {StartVmInstanceMsg: "stopped", StopVmInstanceMsg: "running",
          RebootVmInstanceMsg: "running", DestroyVmInstanceMsg: "running",
          RecoverVmInstanceMsg: "destroyed", ExpungeVmInstanceMsg: "destroyed"}

#: Documented no-ops: an unknown (or other kind's) uuid there succeeds and changes nothing.
IDEMPOTENT: dict[tuple[str, str], str] = {
    ("DestroyVmInstanceMsg", "uuid"): "destroying what does not exist succeeds (ZStack's "
                                      "successIfResourceNotExisting)",
    ("ExpungeVmInstanceMsg", "uuid"): "expunging what does not exist succeeds",
}

#: The fields that name a resource that must exist. A create's C{uuid} names the VM to be
#: made; C{account_uuid} must exist too (the store references it) but is set by the API.
def _referencing(cls: type, field: str) -> bool:
    if field == "uuid":
        return cls is not CreateVmInstanceMsg
    return field.endswith("_uuid") or field.endswith("_uuids")


#: The resources a refusal must leave as they were (rows compared whole).
WATCHED = ("vmInstance", "volume", "vmNic", "tag", "job", "usedIp", "host",
           "primaryStorage", "imageCache")

#: How many JSON-like values L{FuzzScenario.test_any_junk} sends.
ANY_EXAMPLES = 200


def _is_uuid(value: Any) -> bool:
    """
    Whether C{value} may route a message (the sender routes by a uuid it has checked).
    """
    try:
        validate.uuid(value, "uuid")
    except OperationError:
        return False
    return True


def _holdable(value: Any, hint: Any) -> bool:
    """
    Whether a field of type C{hint} may hold C{value}: of the type, and no string the store
    could never hold or a required field leaves blank.
    """
    if not _conforms(value, hint):
        return False
    texts = [value] if isinstance(value, str) else (
        [v for v in value if isinstance(v, str)] if isinstance(value, list) else [])
    for text in texts:
        if len(text) > 65535 or validate.has_control(text):
            return False
        if not text.strip() and typing.get_origin(hint) is None:
            return False
    return True


def draw_any(n: int) -> list[tuple[type, str, Any]]:
    """
    C{n} (message, field, value) triples drawn by hypothesis, derandomized: any message of
    L{MESSAGES}, any of its fields, any JSON-like value.
    """
    out: list[tuple[type, str, Any]] = []

    @settings(max_examples=n, derandomize=True, deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def draw(data: st.DataObject) -> None:
        cls = data.draw(st.sampled_from(MESSAGES), label="message")
        field = data.draw(st.sampled_from(own_fields(cls)), label="field")
        out.append((cls, field, data.draw(ANY_JUNK, label="value")))

    draw()
    return out


class FuzzScenario(CloudScenario):
    """
    The VM messages fuzzed (see the module docstring).
    """

    cloud_hosts = 2
    storage = "nfs"

    async def build(self) -> None:
        """
        The cloud and the three target VMs.
        """
        await self.build_cloud()
        self._snapshot: dict[str, list[str]] | None = None
        self.targets: dict[str, str] = {}
        for name in ("running", "stopped", "destroyed"):
            self.targets[name] = (await self.create(f"target-{name}"))["uuid"]
        await self.settle()
        await self.consistent()

    # --- the targets ------------------------------------------------------------------

    async def settle(self) -> None:
        """
        Put each target VM back in its state (after an operation that succeeded), or make a
        new one when it is gone.
        """
        self._snapshot = None
        for name, want in (("running", "Running"), ("stopped", "Stopped"),
                           ("destroyed", "Destroyed")):
            u = self.targets[name]
            rows = await self.rows("vmInstance", uuid=u)
            if not rows:
                u = self.targets[name] = (await self.create(f"target-{name}"))["uuid"]
                state = "Running"
            else:
                state = rows[0]["state"]
            if state == want:
                continue
            if state == "Destroyed":
                await self.vm(RecoverVmInstanceMsg(uuid=u), u)
                state = "Stopped"
            if want == "Running":
                await self.vm(StartVmInstanceMsg(uuid=u), u)
            elif want == "Stopped":
                if state != "Stopped":
                    await self.vm(StopVmInstanceMsg(uuid=u), u)
            else:
                await self.vm(DestroyVmInstanceMsg(uuid=u), u)

    async def clean_created(self, reply: Any) -> None:
        """
        Destroy and expunge the VM a create that succeeded made.
        """
        inventory = reply.inventory or {}
        u = inventory.get("uuid")
        if u is not None:
            await self.vm(DestroyVmInstanceMsg(uuid=u), u)
            await self.vm(ExpungeVmInstanceMsg(uuid=u), u)

    # --- probing ----------------------------------------------------------------------

    def valid(self, cls: type) -> dict[str, Any]:
        """
        The valid fields C{cls} is sent with (the junk replaces one at a time).
        """
        c = self.cloud
        if cls is CreateVmInstanceMsg:
            return {"name": "fuzz", "instance_offering_uuid": c.offering,
                    "image_uuid": c.image, "l3_network_uuids": [c.l3],
                    "default_l3_network_uuid": c.l3, "type": "UserVm",
                    "root_disk_offering_uuid": c.disk_offering,
                    "data_disk_offering_uuids": [], "zone_uuid": c.zone,
                    "cluster_uuid": c.cluster, "host_uuid": c.hosts[0],
                    "primary_storage_uuid_for_root_volume": c.nfs, "description": "d",
                    "strategy": "InstantStart", "system_tags": ["hostname::fuzz-1"],
                    "user_tags": ["fuzz"], "uuid": None, "account_uuid": None}
        target = self.targets[TARGET[cls]]
        return {StartVmInstanceMsg: {"uuid": target, "cluster_uuid": c.cluster,
                                     "host_uuid": c.hosts[0]},
                StopVmInstanceMsg: {"uuid": target, "type": "grace"},
                RebootVmInstanceMsg: {"uuid": target},
                DestroyVmInstanceMsg: {"uuid": target, "delete_mode": "Permissive"},
                RecoverVmInstanceMsg: {"uuid": target},
                ExpungeVmInstanceMsg: {"uuid": target}}[cls]

    def wrong_kind(self, field: str) -> str:
        """
        The uuid of an existing resource of another kind than C{field} names.
        """
        return self.cloud.cluster if field == "zone_uuid" else self.cloud.zone

    async def snapshot(self) -> dict[str, list[str]]:
        """
        The rows of L{WATCHED}, each as text, sorted (kept until a probe changes them).
        """
        if self._snapshot is None:
            pages = await gather(*[self.rows(r) for r in WATCHED])
            self._snapshot = {r: sorted(repr(sorted(row.items())) for row in page)
                              for r, page in zip(WATCHED, pages, strict=True)}
        return self._snapshot

    def fault(self, cls: type, field: str, label: str, value: Any, reply: Any,
              changed: list[str]) -> str | None:
        """
        What is wrong with C{reply} to C{cls} with C{field} = C{value}, or None.
        """
        referencing = label in ("wrong-kind", "unknown") and _referencing(cls, field)
        if reply.success:
            if not _holdable(value, _hints(cls)[field]):
                return "success"
            if referencing:
                if (cls.__name__, field) not in IDEMPOTENT:
                    return "success"
                if changed:
                    return f"success changing {','.join(changed)}"
            return None
        err = reply.error
        codes = codes_of(err)
        bad = [c for c in codes if c == SYS.INTERNAL or c.startswith("DB.")]
        if bad:
            return f"{err.code} caused by {bad[0]}"
        if not err.details:
            return f"{err.code} with no description"
        named = err.opaque.get("field")
        want = _camel(field)
        if not (isinstance(named, str) and named.split("[")[0] == want) \
                and want not in err.details:
            return f"{err.code} names {named!r}, not {want}"
        if referencing and err.code != SYS.INVALID_ARGUMENT_ERROR:
            shown = [err.details, *map(repr, err.opaque.values())]
            if not any(value in s for s in shown):
                return f"{err.code} does not name the uuid"
        if changed:
            return f"{err.code} changed {','.join(changed)}"
        return None

    async def probe(self, cls: type, field: str, label: str, value: Any) -> str | None:
        """
        Send C{cls} with C{field} = C{value} (the other fields valid): what is wrong with
        the outcome, or None. The targets are settled again afterwards.
        """
        fields = self.valid(cls)
        fields[field] = value
        route = None if cls is CreateVmInstanceMsg else fields["uuid"]
        before = await self.snapshot()
        self._snapshot = None
        try:
            reply = await self.send(cls(**fields), VM_SERVICE,
                                    route if _is_uuid(route) else None)
        except Exception as e:  # the bus answers every send: this is a fault
            return f"raised {type(e).__name__}: {e}"[:300]
        after = await self.snapshot()  # kept as the next probe's "before"
        changed = [r for r in WATCHED if before[r] != after[r]]
        seen = self.fault(cls, field, label, value, reply, changed)
        if seen is not None and not reply.success:
            seen += f" ({str(reply.error)[:300]})"
        if reply.success and cls is CreateVmInstanceMsg:
            await self.clean_created(reply)
        if reply.success or changed:
            await self.settle()
        logged = self.flushLoggedErrors()
        if logged:
            seen = (seen or "") + f" logged {logged[0].getErrorMessage()[:200]}"
        return None if seen is None else seen.encode("ascii", "backslashreplace").decode()

    async def fuzz(self, classes: list[type]) -> None:
        """
        Every junk value in every field of C{classes}; consistent after each field.
        """
        await self.build()
        faults: list[str] = []
        for cls in classes:
            ok = await self.send(cls(**self.valid(cls)), VM_SERVICE,
                                 None if cls is CreateVmInstanceMsg else self.valid(cls)["uuid"])
            self.assertTrue(ok.success, f"{cls.__name__} with valid fields: {ok.error}")
            if cls is CreateVmInstanceMsg:
                await self.clean_created(ok)
            await self.settle()
            for field in own_fields(cls):
                for label, make in junk(self.wrong_kind(field)):
                    seen = await self.probe(cls, field, label, make())
                    if seen is not None:
                        faults.append(f"{cls.__name__}.{field}={label}: {seen}")
                await self.consistent()
        self.assertFalse(faults, "\n" + "\n".join(faults))

    # --- tests ------------------------------------------------------------------------

    async def test_messages(self) -> None:
        """
        L{MESSAGES} are the messages the lifecycle handles, with their fields here.
        """
        await self.build()
        handled = {m for m in self.vm_service._handlers
                   if self.vm_service._handlers[m].__func__ in vars(LifecycleMixin).values()}
        self.assertEqual(sorted(c.__name__ for c in handled),
                         sorted(c.__name__ for c in MESSAGES))
        for cls in MESSAGES:
            self.assertEqual(sorted(self.valid(cls)), sorted(own_fields(cls)), cls.__name__)
            self.assertIs(getattr(vm_m, cls.__name__), cls)

    async def test_fixed_refusals(self) -> None:
        """
        The faults this fuzz found, each refused before any job with C{SYS.1007} or the
        NOT_FOUND code naming the field: tags not a list (a string was taken one character a
        tag), a tag not a string (a store error in insert-vm, after the job began), a tag
        twice, data disk offerings not a list (an internal error), an unknown account (a
        store reference error in insert-vm), a deletion mode ZStack does not have (taken),
        and a start on an unknown cluster (the allocator's error after the job began).
        """
        await self.build()
        c, running, stopped = self.cloud, self.targets["running"], self.targets["stopped"]
        cases = [
            (self.create_msg(system_tags="hostname::abc"), None, "SYS.1007", "systemTags"),
            (self.create_msg(user_tags=[None]), None, "SYS.1007", "userTags[0]"),
            (self.create_msg(user_tags=["a", "a"]), None, "SYS.1007", "userTags"),
            (self.create_msg(data_disk_offering_uuids=5), None, "SYS.1007",
             "dataDiskOfferingUuids"),
            (self.create_msg(data_disk_offering_uuids=c.disk_offering), None, "SYS.1007",
             "dataDiskOfferingUuids"),
            (self.create_msg(account_uuid="no-such-account"), None, "SYS.1003",
             "accountUuid"),
            (DestroyVmInstanceMsg(uuid=running, delete_mode="Sometimes"), running,
             "SYS.1007", "deleteMode"),
            (StartVmInstanceMsg(uuid=stopped, cluster_uuid=c.zone), stopped, "CLUSTER.1000",
             "clusterUuid"),
        ]
        jobs = len(await self.rows("job"))
        for msg, route, code, field in cases:
            error = await self.refused(msg, VM_SERVICE, route, code, field)
            self.assertEqual(error.opaque.get("field"), field, error)
        self.assertEqual(len(await self.rows("job")), jobs)
        [row] = await self.rows("vmInstance", uuid=running)
        self.assertEqual(row["state"], "Running")
        self.assertEqual(len(await self.rows("vmInstance")), 3)
        await self.consistent()

    async def test_create(self) -> None:
        """
        Every junk value in every field of a create.
        """
        await self.fuzz([CreateVmInstanceMsg])

    async def test_operations(self) -> None:
        """
        Every junk value in every field of start, stop, reboot, destroy, recover, expunge.
        """
        await self.fuzz(MESSAGES[1:])

    async def test_any_junk(self) -> None:
        """
        Beyond the fixed junk: any JSON-like value (text of any code points, integers of any
        size, floats, nested lists and maps) in any field of any of the messages.
        """
        await self.build()
        faults = []
        for i, (cls, field, value) in enumerate(draw_any(ANY_EXAMPLES)):
            seen = await self.probe(cls, field, "any", value)
            if seen is not None:
                faults.append(f"{cls.__name__}.{field}={value!r}"[:200] + f": {seen}")
            if i % 50 == 49:
                await self.consistent()
        await self.consistent()
        self.assertFalse(faults, "\n" + "\n".join(faults))


class EmbeddedFuzzTests(FuzzScenario, EmbeddedBackends, LoopbackTestCase):
    """
    On SQLite and the LocalBus (the messages travel as objects: the junk reaches the
    handlers as is).
    """
