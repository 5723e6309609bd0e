"""
The Sftp backup storage agent plugin over the agent app, driven by the real agent client in
memory (StubTreq both ways, one Clock).
"""

from __future__ import annotations

import random
from typing import Any

from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from agent import protocol as p
from agent.app import AgentApp
from agent.hypervisor.backup_sim import DEFAULT_ACTUAL_SIZE, DEFAULT_CAPACITY, DEFAULT_SIZE
from agent.hypervisor.simulator import SimulatedCluster, SimulatorConfig, parse_latency
from agent.sftpbackupstorage import SftpBackupStoragePlugin
from agent.tap import PLUGINS
from tests.agent_fakes import CALLBACK_URL, _LateStub
from zcontrol.core.errors import SYS, OperationError

BS_AGENT_URL = "http://bs-agent.example:7171"


def bs_base(i: int = 0) -> str:
    """
    The base URL of backup storage slot C{i} of the in-memory Sftp agent.
    """
    return p.host_base_url(BS_AGENT_URL, i)


class SftpPair:
    """
    An agent serving C{slots} simulated Sftp backup storages and an agent client, talking
    through StubTreq on one Clock (as L{tests.agent_fakes.InMemoryPair} for hosts).
    """

    def __init__(self, clock: Clock, slots: int = 4, **config: Any) -> None:
        from zcontrol.agentclient import AgentClient, CallbackEndpoint

        self.clock = clock
        self.to_endpoint = _LateStub()
        self.cluster = SimulatedCluster(SimulatorConfig(clock=clock, rng=random.Random(5),
                                                        **config))
        self.agent = AgentApp(clock=clock, http=self.to_endpoint,
                              backend_factory=self.cluster.backends,
                              plugins=[SftpBackupStoragePlugin()], host_count=slots,
                              rng=random.Random(5), reset_host=self.cluster.reset)
        self.to_agent = StubTreq(self.agent.app.resource())
        self.client = AgentClient(clock, self.to_agent, CALLBACK_URL, default_timeout=60.0)
        self.endpoint = CallbackEndpoint(self.client)
        self.to_endpoint.stub = StubTreq(self.endpoint.resource())

    def bs(self, i: int = 0) -> Any:
        """
        The simulated backup storage of slot C{i}.
        """
        return self.cluster.backends(str(i)).backup_storage

    def flush(self) -> None:
        for _ in range(3):
            self.clock.advance(0)
            self.to_agent.flush()
            self.to_endpoint.stub.flush()


class SftpAgentTests(SynchronousTestCase):
    """
    connect, download, delete through the framework's signed asynchronous pattern.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.pair = SftpPair(self.clock, latency={
            "/sftpbackupstorage/download": parse_latency("const:5")})
        self.connected(0)

    def run_(self, d: Any, advance: float = 0.0) -> Any:
        self.pair.flush()
        if advance:
            self.clock.advance(advance)
            self.pair.flush()
        return d

    def result(self, d: Any, advance: float = 0.0) -> Any:
        return self.successResultOf(self.run_(d, advance))

    def connected(self, i: int) -> None:
        self.result(self.pair.client.connect(bs_base(i), f"bs-{i}"))
        rsp = self.result(self.pair.client.call(
            bs_base(i), p.SftpConnectCmd(uuid=f"bs-{i}", storage_path="/zstack_bs")))
        self.assertEqual((rsp.total_capacity, rsp.available_capacity),
                         (DEFAULT_CAPACITY, DEFAULT_CAPACITY))

    def download(self, url: str, path: str = "/zstack_bs/img/a.template",
                 i: int = 0) -> Any:
        d = self.pair.client.call(bs_base(i), p.SftpDownloadCmd(
            image_uuid="img", install_path=path, url=url, url_scheme=url.split(":")[0],
            format="qcow2"), raise_on_failure=False)
        return self.result(d, advance=5)

    def test_plugin_listed(self) -> None:
        """
        The plugin is in C{twistd zagent}'s plugin table and serves ZStack's paths.
        """
        self.assertEqual(PLUGINS["sftpbackupstorage"][0],
                         "agent.sftpbackupstorage.SftpBackupStoragePlugin")
        self.assertEqual(sorted(SftpBackupStoragePlugin().handlers()), [
            "/sftpbackupstorage/connect", "/sftpbackupstorage/delete",
            "/sftpbackupstorage/download"])

    def test_download_takes_latency_and_capacity(self) -> None:
        """
        A download completes only after the path's latency; sizes come from the URL query;
        the capacity drops by the actual size and a delete gives it back.
        """
        d = self.pair.client.call(bs_base(0), p.SftpDownloadCmd(
            image_uuid="img", install_path="/zstack_bs/x", url="http://h/i.qcow2?size=3000&"
            "actualSize=1000", url_scheme="http"))
        self.pair.flush()
        self.clock.advance(4)
        self.pair.flush()
        self.assertNoResult(d)
        rsp = self.result(d, advance=1)
        self.assertEqual((rsp.size, rsp.actual_size, rsp.install_path),
                         (3000, 1000, "/zstack_bs/x"))
        self.assertEqual(rsp.available_capacity, DEFAULT_CAPACITY - 1000)
        self.assertEqual(rsp.total_capacity, DEFAULT_CAPACITY)
        self.assertEqual(self.pair.bs(0).available_capacity, DEFAULT_CAPACITY - 1000)
        gone = self.result(self.pair.client.call(bs_base(0), p.SftpDeleteCmd(
            install_url="/zstack_bs/x")))
        self.assertEqual(gone.available_capacity, DEFAULT_CAPACITY)
        self.assertEqual(self.pair.bs(0).images, {})

    def test_default_sizes(self) -> None:
        """
        A URL naming no size gives the defaults (8 GiB virtual, 1 GiB actual).
        """
        rsp = self.download("https://h/i.qcow2")
        self.assertTrue(rsp.success, rsp.error)
        self.assertEqual((rsp.size, rsp.actual_size), (DEFAULT_SIZE, DEFAULT_ACTUAL_SIZE))

    def test_failing_url(self) -> None:
        """
        A URL containing "fail" fails with its reason, and the response still carries the
        capacity; nothing is kept.
        """
        rsp = self.download("http://h/i.qcow2?fail=no+route+to+host")
        self.assertFalse(rsp.success)
        self.assertIn("no route to host", rsp.error)
        self.assertEqual(rsp.available_capacity, DEFAULT_CAPACITY)
        self.assertEqual(self.pair.bs(0).images, {})

    def test_configured_failing_url(self) -> None:
        """
        A URL in the storage's failing_urls fails with the default reason.
        """
        self.pair.bs(0).failing_urls.add("http://h/ok.qcow2")
        rsp = self.download("http://h/ok.qcow2")
        self.assertFalse(rsp.success)
        self.assertIn("simulated download failure", rsp.error)

    def test_unsupported_scheme(self) -> None:
        """
        A scheme the storage cannot download from fails with a reason naming it.
        """
        rsp = self.download("nfs://server/export/i.qcow2")
        self.assertFalse(rsp.success)
        self.assertIn("unsupported url scheme[nfs]", rsp.error)

    def test_no_capacity(self) -> None:
        """
        An image larger than the available capacity is refused.
        """
        rsp = self.download(f"http://h/i.qcow2?size={DEFAULT_CAPACITY + 1}")
        self.assertFalse(rsp.success)
        self.assertIn("available", rsp.error)

    def test_injected_failure(self) -> None:
        """
        The simulator's error rate fails downloads too.
        """
        pair = SftpPair(Clock(), error_rate=1.0)
        self.pair, self.clock = pair, pair.clock
        self.result(pair.client.connect(bs_base(1), "bs-1"))
        rsp = self.download("http://h/i.qcow2", i=1)
        self.assertFalse(rsp.success)
        self.assertIn("injected failure in /sftpbackupstorage/download", rsp.error)

    def test_slots_are_separate(self) -> None:
        """
        Two slots of one agent are two storages with their own capacity.
        """
        self.connected(1)
        self.download("http://h/i?actualSize=10", i=1)
        self.assertEqual(self.pair.bs(1).available_capacity, DEFAULT_CAPACITY - 10)
        self.assertEqual(self.pair.bs(0).available_capacity, DEFAULT_CAPACITY)

    def test_not_connected_refused(self) -> None:
        """
        A storage slot never connected gets no command: the client has no secret for it.
        """
        d = self.pair.client.call(bs_base(2), p.SftpDeleteCmd(install_url="/x"))
        err = self.failureResultOf(self.run_(d), OperationError).value.error
        self.assertEqual(err.code, SYS.OPERATION_ERROR)
        self.assertIn("not connected", err.details)
