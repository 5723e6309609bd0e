"""
Fakes and wiring shared by the agent tests: a recording HTTP client, and an agent and an
agent client wired to each other in memory through C{StubTreq}.
"""

from __future__ import annotations

import random
from typing import Any

import attrs
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from agent import protocol
from agent.app import AgentApp, CallbackPolicy, Faults
from agent.console import ConsolePlugin
from agent.hypervisor.simulator import SimulatedCluster, SimulatorConfig
from agent.kvm import KvmPlugin
from agent.sftpbackupstorage import SftpBackupStoragePlugin
from agent.storage import StoragePlugin
from agent.vrouter import VRouterPlugin


@attrs.define
class FakeResponse:
    """
    Enough of a treq response.
    """

    code: int
    body: bytes = b""

    def content(self) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        d.callback(self.body)
        return d


@attrs.define
class Post:
    """
    One recorded POST; answer it by firing C{result}.
    """

    url: str
    data: bytes
    headers: Headers
    kwargs: dict
    result: Deferred

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.encode("ascii")) if isinstance(self.headers, dict) else (
            self.headers.getRawHeaders(name)
        )
        if not values:
            return None
        value = values[0]
        return value.decode("ascii") if isinstance(value, bytes) else value

    def answer(self, code: int, body: bytes = b"") -> None:
        self.result.callback(FakeResponse(code, body))


class RecordingHTTP:
    """
    A treq-like client that records POSTs and leaves them unanswered until the test answers.
    """

    def __init__(self) -> None:
        self.posts: list[Post] = []

    def post(self, url: str, data: bytes = b"", headers: Any = None, **kwargs: Any) -> Deferred:
        d: Deferred = Deferred()
        self.posts.append(Post(url, data, headers or {}, kwargs, d))
        return d


def make_agent(http: Any, clock: Clock | None = None, host_count: int = 4,
               faults: Faults = Faults(), policy: CallbackPolicy = CallbackPolicy(),
               **config: Any) -> tuple[AgentApp, SimulatedCluster]:
    """
    An agent with every plugin on simulated hosts.
    """
    clock = clock if clock is not None else Clock()
    rng = random.Random(7)
    cluster = SimulatedCluster(SimulatorConfig(clock=clock, rng=rng, **config))
    agent = AgentApp(
        clock=clock,
        http=http,
        backend_factory=cluster.backends,
        plugins=[KvmPlugin(), ConsolePlugin(), VRouterPlugin(), StoragePlugin(),
                 SftpBackupStoragePlugin()],
        host_count=host_count,
        faults=faults,
        policy=policy,
        rng=rng,
        reset_host=cluster.reset,
    )
    return agent, cluster


AGENT_URL = "http://agent.example:7070"
CALLBACK_URL = "http://mn.example:8080/zstack/asyncrest/callback"


def base(i: int = 0) -> str:
    """
    The base URL of simulated host C{i} of the in-memory agent.
    """
    return protocol.host_base_url(AGENT_URL, i)


class InMemoryPair:
    """
    An agent and an agent client talking through StubTreq in both directions, each on its own
    Clock unless one is given for both.
    """

    def __init__(self, host_count: int = 4, faults: Faults = Faults(),
                 policy: CallbackPolicy = CallbackPolicy(), default_timeout: float = 60.0,
                 clock: Clock | None = None, **config: Any) -> None:
        from zcontrol.agentclient import AgentClient, CallbackEndpoint

        self.agent_clock = clock if clock is not None else Clock()
        self.client_clock = clock if clock is not None else Clock()
        self.to_endpoint = _LateStub()
        self.agent, self.cluster = make_agent(self.to_endpoint, self.agent_clock, host_count,
                                              faults, policy, **config)
        self.to_agent = StubTreq(self.agent.app.resource())
        self.client = AgentClient(self.client_clock, self.to_agent, CALLBACK_URL,
                                  default_timeout=default_timeout)
        self.endpoint = CallbackEndpoint(self.client)
        self.to_endpoint.stub = StubTreq(self.endpoint.resource())

    def flush(self) -> None:
        """
        Deliver whatever the StubTreq sites left pending, and run the agent's callback
        outbox (scheduled on its clock).
        """
        for _ in range(3):
            self.agent_clock.advance(0)
            self.to_agent.flush()
            self.to_endpoint.stub.flush()


class _LateStub:
    """
    A StubTreq set after construction (the endpoint needs the client, which needs the agent).
    """

    stub: Any = None

    def post(self, *args: Any, **kwargs: Any) -> Deferred:
        return self.stub.post(*args, **kwargs)


async def seed_zone_and_cluster(store: Any) -> None:
    """
    Insert zone C{z} and KVM cluster C{c}, which a host row needs (their services come with
    the inventory issue).
    """
    await store.insert("zone", {"uuid": "z", "name": "zone"})
    await store.insert("cluster", {"uuid": "c", "name": "cluster", "zoneUuid": "z",
                                   "hypervisorType": "KVM"})


def add_kvm_host(bus: Any, management_ip: str, uuid: str = "h1") -> Deferred:
    """
    Send C{AddHostMsg} for host C{uuid} in zone C{z}, cluster C{c}; fires with the reply.
    """
    from zcontrol.services.host import SERVICE_ID, AddHostMsg

    return bus.send(AddHostMsg(service_id=SERVICE_ID, name=uuid, zone_uuid="z",
                               cluster_uuid="c", uuid=uuid, management_ip=management_ip))
