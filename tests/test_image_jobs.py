"""
The image service's add as a journaled job (L{zcontrol.services.image.service}, Note [add
jobs]): a crash of its management node at every store call of an add (in process: the node's
store stops answering, a new L{ImageService} starts on the same store as the same node and
recovers), for an add whose downloads all succeed, one fails, or all fail (the rollback);
and the job uuid as the trace id of what the add sends.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from agent import protocol as p
from tests.test_agent_sftp import bs_base
from tests.test_image_faults import FaultsTestCase, GatedAgents
from zcontrol.services.backupstorage import (
    SERVICE_ID,
    DeleteBackupStorageMsg,
    DeleteBitsOnBackupStorageMsg,
    DownloadImageMsg,
)
from zcontrol.services.image import IMAGE, AddImageMsg, DeleteImageMsg
from zcontrol.services.image import SERVICE_ID as IMAGE_SERVICE
from zcontrol.services.image.service import ADD_IMAGE_JOB, RESTARTED, ImageService


class CrashingStore:
    """
    The store of a management node that stops at its C{k}-th store call (counted from
    L{arm}): C{"before"}, the call never runs; C{"after"}, it runs and its answer never
    comes. From then on every call hangs (a stopped node does nothing more), and L{crash}
    stops it at once.
    """

    def __init__(self, real: Any) -> None:
        self.real = real
        self.calls: list[str] = []
        self.point: tuple[int, str] | None = None
        self.crashed = False

    def arm(self, k: int | None, phase: str = "before") -> None:
        self.calls = []
        self.point = None if k is None else (k, phase)

    def crash(self) -> None:
        self.crashed = True

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.real, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.crashed:
                return Deferred()
            self.calls.append(name)
            if self.point is not None and self.point[0] == len(self.calls):
                self.crashed = True
                if self.point[1] == "after":
                    attr(*args, **kwargs)  # done; its answer is lost with the node
                return Deferred()
            return attr(*args, **kwargs)

        return call


#: The image service's store calls during an add to two backup storages whose downloads
#: end (both succeed, or one fails): the checks, the job, the insert, the downloads'
#: records, the finish, the reply's reads.
ADD_CALLS = ["get", "query", "get", "query", "create_job", "add_image", "record_job_flow",
             "record_image_ref_download", "record_image_ref_download", "record_job_flow",
             "finish_image_download", "record_job_flow", "finish_job", "get", "query"]
#: ... when both downloads fail: the finish fails and the flows are rolled back.
FAILED_ADD_CALLS = ADD_CALLS[:11] + [
    "begin_job_rollback", "record_job_rollback", "get", "record_job_rollback",
    "resolve_interrupted_image_download", "record_job_rollback", "finish_job"]


def expected_ready(k: int, phase: str) -> str:
    """
    The outcome of a crash at call C{k} of an add whose two downloads succeed: C{none} (no
    job, no image), C{gone} (the job Failed IMAGE.1001, no image), C{error} (the image Error,
    the job Failed IMAGE.1000), C{ready-N} (the image Ready with N copies, the job
    Succeeded).
    """
    at = (k, phase)
    if k <= 4 or at == (5, "before"):
        return "none"
    if at in ((5, "after"), (6, "before")):
        return "gone"
    if k <= 7 or at == (8, "before"):
        return "error"  # no download recorded: each interrupted, RESTARTED
    if at in ((8, "after"), (9, "before")):
        return "ready-1"  # one recorded, the other interrupted
    return "ready-2"


def expected_failed(k: int, phase: str) -> str:
    """
    As L{expected_ready}, for an add whose two downloads fail: never Ready.
    """
    outcome = expected_ready(k, phase)
    return "error" if outcome.startswith("ready") else outcome


def expected_half(k: int, phase: str) -> str:
    """
    As L{expected_ready}, for an add whose download to bs2 fails: Ready with bs1's copy
    once bs1's download is recorded (it is recorded first).
    """
    outcome = expected_ready(k, phase)
    return "ready-1" if outcome.startswith("ready") else outcome


class CrashTests(FaultsTestCase):
    """
    A crash at each store call of an add (so at each flow, before and after its work), then
    a restart: no job Running, the image Ready or Error as far as its downloads had been
    recorded (or absent when it was never inserted), the job's outcome the add's, the
    partial bits deleted, and everything deletable after.
    """

    URL = "http://h/i.qcow2?size=3000&actualSize=1000"

    def setUp(self) -> None:
        super().setUp()
        self.add_bs("bs1", 0)
        self.add_bs("bs2", 1)
        self.deletes: list[DeleteBitsOnBackupStorageMsg] = []
        self.bus.unregister_service(IMAGE_SERVICE)
        self.crashing = CrashingStore(self.store)
        self.node = ImageService(self.clock, self.bus, self.crashing)
        self.node.start()
        self.pump()

    def restart(self) -> ImageService:
        """
        The node stopped: a new image service on the same store, as the same node; the BS
        service's handler spied for the deletes of bits.
        """
        self.crashing.crash()
        self.bus.unregister_service(IMAGE_SERVICE)
        bs_handle = self.bus._services[SERVICE_ID]

        def spy(msg: Any) -> Any:
            if isinstance(msg, DeleteBitsOnBackupStorageMsg):
                self.deletes.append(msg)
            return bs_handle(msg)

        self.bus.unregister_service(SERVICE_ID)
        self.bus.register_service(SERVICE_ID, spy)
        service = ImageService(self.clock, self.bus, self.store)
        service.start()
        self.result(service.recovered)
        self.pump(10)  # the background deletes of partial bits
        return service

    def crash_add(self, url: str, k: int, phase: str) -> None:
        self.crashing.arm(k, phase)
        d = self.bus.send(AddImageMsg(service_id=IMAGE_SERVICE, name="i", uuid="i1", url=url,
                                      backup_storage_uuids=["bs1", "bs2"]))
        d.addErrback(lambda f: None)
        self.pump(10)  # the downloads end on the agents, the node stopped or not
        self.assertTrue(self.crashing.crashed, (k, phase, self.crashing.calls))
        self.restart()

    def bits(self) -> dict[str, set[str]]:
        """
        The install paths of image i1 on each backup storage's agent.
        """
        return {bs: {path for path, img in self.pair.bs(i).images.items()
                     if img.image_uuid == "i1"}
                for i, bs in enumerate(("bs1", "bs2"))}

    def check(self, expected: str, where: Any) -> None:
        self.assertEqual(self.result(self.store.running_jobs("mn-1")), [], where)
        jobs = self.jobs("i1")
        images = [r for r in self.rows("image") if r["uuid"] == "i1"]
        if expected == "none":
            self.assertEqual((jobs, images), ([], []), where)
            return
        [job] = jobs
        self.assertEqual(job["apiName"], ADD_IMAGE_JOB, where)
        if expected == "gone":
            self.assertEqual(images, [], where)
            self.assertEqual((job["state"], job["error"]["code"]), ("Failed", IMAGE.NOT_FOUND),
                             where)
            self.assertEqual(self.bits(), {"bs1": set(), "bs2": set()}, where)
            return
        [image] = images
        refs = image["backupStorageRefs"]
        self.assertNotIn("Downloading", [r["status"] for r in refs], where)
        ready = [r for r in refs if r["status"] == "Ready"]
        # The partial bits are deleted: bits remain exactly where a copy is Ready.
        self.assertEqual(self.bits(), {bs: {r["installPath"] for r in ready
                                            if r["backupStorageUuid"] == bs}
                                       for bs in ("bs1", "bs2")}, where)
        for r in refs:
            if r["status"] == "Error":
                self.assertTrue(r["lastError"], where)
        if expected == "error":
            self.assertEqual((image["status"], ready), ("Error", []), where)
            self.assertEqual((job["state"], job["error"]["code"]), ("Failed", IMAGE.ADD_ERROR),
                             where)
            self.assertEqual(len(refs), 2, where)
        else:
            self.assertEqual((image["status"], len(ready), image["size"],
                              image["actualSize"]),
                             ("Ready", int(expected[-1]), 3000, 1000), where)
            self.assertEqual((job["state"], job["result"]), ("Succeeded", {"imageUuid": "i1"}),
                             where)
        # Nothing is stuck: the image and both backup storages can be deleted.
        self.ok(DeleteImageMsg(service_id=IMAGE_SERVICE, uuid="i1"))
        self.assertEqual(self.bits(), {"bs1": set(), "bs2": set()}, where)

    def assert_deletable(self) -> None:
        for bs in ("bs1", "bs2"):
            self.ok(DeleteBackupStorageMsg(service_id=SERVICE_ID, uuid=bs))
        self.assert_clean()

    def test_calls(self) -> None:
        """
        The store calls of an add, in order, on which the crash points below are counted:
        every flow writes its record before the next one runs.
        """
        self.crashing.arm(None)
        self.assertTrue(self.send(AddImageMsg(
            service_id=IMAGE_SERVICE, name="i", uuid="i1", url=self.URL,
            backup_storage_uuids=["bs1", "bs2"]), 10).success)
        self.assertEqual(self.crashing.calls, ADD_CALLS)
        self.crashing.arm(None)
        self.assertEqual(self.send(AddImageMsg(
            service_id=IMAGE_SERVICE, name="f", uuid="i2", url="http://h/x?fail=gone",
            backup_storage_uuids=["bs1", "bs2"]), 10).error.code, IMAGE.ADD_ERROR)
        self.assertEqual(self.crashing.calls, FAILED_ADD_CALLS)
        [job] = self.jobs("i2")
        self.assertEqual((job["state"], job["error"]["code"], job["rolledBack"]),
                         ("Failed", IMAGE.ADD_ERROR, ["finish", "download", "insert"]))

    def test_interrupted_download_partial_bits(self) -> None:
        """
        Both downloads in flight when the node stops (the agents still hold them): the
        image is Error, each ref Error with RESTARTED, the job Failed IMAGE.1000, a delete
        of the partial bits sent to each backup storage once, at the image's install path.
        """
        agents = GatedAgents(self.pair.client)
        self.bs_service.agents = agents
        for slot in (0, 1):
            agents.hold(bs_base(slot), p.SftpDownloadCmd)
        d = self.bus.send(AddImageMsg(service_id=IMAGE_SERVICE, name="i", uuid="i1",
                                      url=self.URL, backup_storage_uuids=["bs1", "bs2"]))
        d.addErrback(lambda f: None)
        self.pump(60)
        self.assertEqual([j["state"] for j in self.jobs("i1")], ["Running"])
        self.restart()
        [image] = [r for r in self.rows("image") if r["uuid"] == "i1"]
        self.assertEqual([(r["status"], r["lastError"]) for r in image["backupStorageRefs"]],
                         [("Error", RESTARTED), ("Error", RESTARTED)])
        self.assertEqual(sorted((m.backup_storage_uuid, m.install_path) for m in self.deletes),
                         [(bs, "/zstack_bs/rootVolumeTemplates/i1/i1.template")
                          for bs in ("bs1", "bs2")])
        self.check("error", "in flight")
        self.assert_deletable()


def _crash_test(calls: list[str], expected: Any, url: str | None, k: int, phase: str,
                failing_bs2: bool = False) -> Any:
    def test(self: CrashTests) -> None:
        if failing_bs2:
            self.pair.bs(1).failing_urls.add(self.URL)
        self.crash_add(url or self.URL, k, phase)
        self.check(expected(k, phase), (k, calls[k - 1], phase))
        self.assert_deletable()

    test.__doc__ = (f"A crash {phase} store call {k} ({calls[k - 1]}) of the add"
                    f" ({expected.__name__}).")
    return test


for _k in range(1, len(ADD_CALLS) + 1):
    for _phase in ("before", "after"):
        setattr(CrashTests, f"test_ready_{_k:02d}_{_phase}",
                _crash_test(ADD_CALLS, expected_ready, None, _k, _phase))
        setattr(CrashTests, f"test_half_{_k:02d}_{_phase}",
                _crash_test(ADD_CALLS, expected_half, None, _k, _phase, failing_bs2=True))
for _k in range(1, len(FAILED_ADD_CALLS) + 1):
    for _phase in ("before", "after"):
        setattr(CrashTests, f"test_failed_{_k:02d}_{_phase}",
                _crash_test(FAILED_ADD_CALLS, expected_failed, "http://h/x?fail=gone", _k,
                            _phase))


class TraceTests(FaultsTestCase):
    """
    The job uuid is the trace id of what the add sends, live and at recovery.
    """

    def setUp(self) -> None:
        super().setUp()
        self.add_bs("bs1", 0)
        self.sent: list[Any] = []
        bs_handle = self.bus._services[SERVICE_ID]

        def spy(msg: Any) -> Any:
            self.sent.append(msg)
            return bs_handle(msg)

        self.bus.unregister_service(SERVICE_ID)
        self.bus.register_service(SERVICE_ID, spy)

    def test_trace_is_the_job(self) -> None:
        """
        The download an add sends carries its job's uuid as trace id; so does the delete of
        partial bits its recovery sends.
        """
        self.assertTrue(self.add_image("i1", ["bs1"]).success)
        [job] = self.jobs("i1")
        self.assertEqual([(type(m), m.trace_id) for m in self.sent],
                         [(DownloadImageMsg, job["uuid"])])
        agents = GatedAgents(self.pair.client)
        self.bs_service.agents = agents
        agents.hold(bs_base(0), p.SftpDownloadCmd)
        self.sent.clear()
        d = self.bus.send(AddImageMsg(service_id=IMAGE_SERVICE, name="i", uuid="i2",
                                      url="http://h/i", backup_storage_uuids=["bs1"]))
        d.addErrback(lambda f: None)
        self.pump(60)
        self.bus.unregister_service(IMAGE_SERVICE)
        service = ImageService(self.clock, self.bus, self.store)
        service.start()
        [outcome] = self.result(service.recovered)
        self.pump(10)
        [job] = self.jobs("i2")
        self.assertEqual((outcome["job"], outcome["outcome"]), (job["uuid"], "forward"))
        self.assertEqual([(type(m), m.trace_id) for m in self.sent],
                         [(DownloadImageMsg, job["uuid"]),
                          (DeleteBitsOnBackupStorageMsg, job["uuid"])])
