# -*- test-case-name: tests.test_agent_app -*-
"""
HTTP plumbing shared by the agent and the management node's agent client: a treq client over
a deliberately sized connection pool, a body producer that writes at once, and a quiet site.

Note [sizing]: Twisted's defaults collapse under the callback pattern (shared/STACK_NOTES.md):
treq's module-level pool keeps 2 persistent connections per host, so with 1,000 commands in
flight 998 connections are opened and closed per wave; C{listenTCP}'s backlog of 50 overflows
and SYN retransmits add seconds. Both sides therefore build their own
L{HTTPConnectionPool} with C{maxPersistentPerHost} of the expected concurrency and listen with a
backlog of 1,024 (somaxconn permitting). The pool does not bound concurrency: callers bound it
with a semaphore of the same size, so that the pool never opens more connections than it keeps.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IConsumer
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
)
from twisted.web.error import SchemeNotSupported
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer
from twisted.web.server import Request, Site
from zope.interface import implementer

from agent.protocol import MAX_BODY_SIZE

__all__ = [
    "BytesProducer",
    "CachingEndpointFactory",
    "JSONRequest",
    "QuietSite",
    "make_http_client",
    "make_pool",
    "server_tls_options",
    "trust_root_from_pem",
]

DEFAULT_POOL_SIZE = 1000
DEFAULT_BACKLOG = 1024
#: The largest request body a L{QuietSite} reads, bytes: the wire contract's
#: L{agent.protocol.MAX_BODY_SIZE} (one limit, defined once).
DEFAULT_MAX_BODY_SIZE = MAX_BODY_SIZE


@implementer(IBodyProducer)
class BytesProducer:
    """
    A body producer for a byte string that writes it in one go. treq's default adapter wraps
    bytes in a C{FileBodyProducer}, which goes through a cooperator and costs reactor turns on
    every request.
    """

    __slots__ = ("_body", "length")

    def __init__(self, body: bytes) -> None:
        self._body = body
        self.length = len(body) if body is not None else UNKNOWN_LENGTH

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def make_pool(reactor: Any, max_persistent: int = DEFAULT_POOL_SIZE,
              cached_timeout: float = 240.0) -> HTTPConnectionPool:
    """
    A persistent connection pool keeping up to C{max_persistent} idle connections per
    endpoint (scheme, host, port).
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max_persistent
    pool.cachedConnectionTimeout = cached_timeout
    pool.retryAutomatically = True
    return pool


@implementer(IAgentEndpointFactory)
class CachingEndpointFactory:
    """
    Endpoints for C{http} and C{https} URIs, built once per (scheme, host, port). The standard
    factory builds a C{HostnameEndpoint} (with an IDNA encoding of the host) on every request;
    a management node talks to a bounded set of agents, and an agent to a few management nodes.
    """

    def __init__(self, reactor: Any, connect_timeout: float | None = None,
                 max_entries: int = 100_000, trust_root: Any = None) -> None:
        """
        @param trust_root: an C{IOpenSSLTrustRoot} HTTPS servers' certificates are checked
            against (e.g. L{trust_root_from_pem}); None: the platform's CAs.
        """
        self._reactor = reactor
        self._connect_timeout = connect_timeout
        self._policy = BrowserLikePolicyForHTTPS(trustRoot=trust_root)
        self._max_entries = max_entries
        self._cache: dict[tuple[bytes, bytes, int], Any] = {}

    def endpointForURI(self, uri: Any) -> Any:
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._cache.get(key)
        if endpoint is not None:
            return endpoint
        kwargs = {} if self._connect_timeout is None else {"timeout": self._connect_timeout}
        endpoint = HostnameEndpoint(self._reactor, uri.host.decode("ascii"), uri.port, **kwargs)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(self._policy.creatorForNetloc(uri.host, uri.port), endpoint)
        elif uri.scheme != b"http":
            raise SchemeNotSupported(f"unsupported scheme: {uri.scheme!r}")
        if len(self._cache) < self._max_entries:
            self._cache[key] = endpoint
        return endpoint


def make_http_client(reactor: Any, pool: HTTPConnectionPool, connect_timeout: float = 10.0,
                     trust_root: Any = None):
    """
    A treq C{HTTPClient} over C{pool} (endpoints cached by L{CachingEndpointFactory}) that
    sends byte bodies with L{BytesProducer}.

    @param trust_root: what HTTPS servers' certificates are checked against (see
        L{CachingEndpointFactory}).
    """
    from treq.client import HTTPClient

    agent = Agent.usingEndpointFactory(
        reactor, CachingEndpointFactory(reactor, connect_timeout, trust_root=trust_root),
        pool=pool
    )
    return HTTPClient(agent, data_to_body_producer=BytesProducer)


class JSONRequest(Request):
    """
    A request that never parses its body as an HTML form: commands and callbacks are JSON, and
    form parsing costs an C{email.message} parse of the C{Content-Type} on every POST.

    Its body is bounded by its site's C{max_body_size} (bytes; L{DEFAULT_MAX_BODY_SIZE} for a
    site without one): a body declared or found larger is discarded as it arrives (never
    buffered) and the request is answered C{413} without reaching the resource.
    """

    _too_large = False
    _body_size = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(*args, **kwargs)

    def _limit(self) -> int:
        site = getattr(self.channel, "site", None)
        return getattr(site, "max_body_size", DEFAULT_MAX_BODY_SIZE)

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._limit():
            self._too_large = True
            self.content = BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._too_large:
            return
        self._body_size += len(data)
        if self._body_size > self._limit():
            self._too_large = True
            self.content.close()
            self.content = BytesIO()
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        if self._too_large:
            self.setResponseCode(413)
            self.setHeader(b"content-type", b"text/plain")
            self.write(f"request body over {self._limit()} bytes".encode())
            self.finish()
            return
        super().process()


class QuietSite(Site):
    """
    A site for JSON endpoints: no access-log line per request (a line per callback is a cost
    at thousands per second; failures are logged by the handlers) and no form parsing
    (L{JSONRequest}).
    """

    noisy = False
    requestFactory = JSONRequest
    #: The largest request body read, bytes (see L{JSONRequest}).
    max_body_size = DEFAULT_MAX_BODY_SIZE

    def log(self, request: Any) -> None:
        pass


_PEM_END = b"-----END CERTIFICATE-----"
_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"


def _certificates_from_pem(pem: bytes, path: str) -> list[Any]:
    """
    The certificates of the PEM blocks in C{pem} (read from C{path}), in order.

    @raise ValueError: C{pem} holds no certificate, or one that does not load.
    """
    from twisted.internet.ssl import Certificate

    blocks = [b + _PEM_END for b in pem.split(_PEM_END) if _PEM_BEGIN in b]
    if not blocks:
        raise ValueError(f"no certificate in {path}")
    try:
        return [Certificate.loadPEM(b) for b in blocks]
    except Exception as e:
        raise ValueError(f"bad certificate in {path}: {e}") from None


def trust_root_from_pem(path: str) -> Any:
    """
    A trust root of the CA certificates in the PEM file at C{path} (a self-signed server
    certificate is its own CA), for L{make_http_client}.

    @raise ValueError: the file cannot be read or holds no certificate.
    """
    from twisted.internet.ssl import trustRootFromCertificates

    try:
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise ValueError(f"cannot read CA file {path}: {e.strerror}") from None
    try:
        return trustRootFromCertificates(_certificates_from_pem(pem, path))
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"bad certificate in {path}: {e}") from None


def server_tls_options(cert_path: str, key_path: str) -> Any:
    """
    Server TLS options (an C{IOpenSSLContextFactory}) from a PEM certificate (chain) and its
    PEM private key, for C{SSL4ServerEndpoint} / C{listenSSL}.

    @raise ValueError: a file cannot be read or does not hold what it should.
    """
    from twisted.internet.ssl import CertificateOptions, KeyPair

    try:
        with open(cert_path, "rb") as f:
            cert_pem = f.read()
        with open(key_path, "rb") as f:
            key_pem = f.read()
    except OSError as e:
        raise ValueError(f"cannot read {e.filename}: {e.strerror}") from None
    try:
        certs = _certificates_from_pem(cert_pem, cert_path)
        key = KeyPair.load(key_pem, format=1)  # FILETYPE_PEM
        return CertificateOptions(
            privateKey=key.original, certificate=certs[0].original,
            extraCertChain=[c.original for c in certs[1:]],
        )
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"bad TLS certificate {cert_path} or key {key_path}: {e}") from None
