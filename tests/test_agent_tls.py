"""
Issue 8 item 10c: the agent and the management node's callback listener serve HTTPS with
certificates from configuration, and each side checks the other's certificate against a
configured CA. Real sockets on 127.0.0.1, a self-signed certificate made in the test.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
from typing import Any

import treq
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import UNKNOWN_LENGTH

from agent import protocol as p
from agent.app import CallbackPolicy
from agent.http import (
    QuietSite,
    make_http_client,
    make_pool,
    server_tls_options,
    trust_root_from_pem,
)
from agent.tap import Options, makeService
from tests.agent_fakes import make_agent
from zcontrol.agentclient import AgentClient, CallbackEndpoint, listen_callback
from zcontrol.config import ConfigError, load_config
from zcontrol.core.errors import OperationError

TIMEOUT = 10.0


def make_self_signed(directory: str, name: str = "localhost") -> tuple[str, str]:
    """
    A self-signed certificate for C{localhost} and C{127.0.0.1} and its key, written as PEM
    files under C{directory}; returns their paths.
    """
    import os

    os.makedirs(directory, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path = os.path.join(directory, "cert.pem")
    key_path = os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


class TLSTests(TestCase):
    """
    A command and its callback over TLS both ways.
    """

    def setUp(self) -> None:
        self.cert, self.key = make_self_signed(self.mktemp())
        self.trust = trust_root_from_pem(self.cert)
        self.pools: list[Any] = []

    def pool(self) -> Any:
        pool = make_pool(reactor, 10)
        self.pools.append(pool)
        self.addCleanup(pool.closeCachedConnections)
        return pool

    def listen_agent(self, token: str | None = None) -> str:
        http = make_http_client(reactor, self.pool(), trust_root=self.trust)
        agent, _ = make_agent(http, reactor, host_count=2,
                              policy=CallbackPolicy(time_slice=None, max_attempts=1,
                                                    timeout=TIMEOUT))
        agent.bootstrap_token = token
        port = reactor.listenSSL(0, QuietSite(agent.app.resource()),
                                 server_tls_options(self.cert, self.key),
                                 interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return f"https://127.0.0.1:{port.getHost().port}"

    def node(self, trust: Any, token: str | None = None) -> AgentClient:
        client = AgentClient(reactor, make_http_client(reactor, self.pool(), trust_root=trust),
                             "", default_timeout=TIMEOUT, bootstrap_token=token)
        port = listen_callback(reactor, CallbackEndpoint(client), interface="127.0.0.1",
                               tls_options=server_tls_options(self.cert, self.key))
        self.addCleanup(port.stopListening)
        return client

    @defer.inlineCallbacks
    def test_command_and_callback_over_tls(self) -> Any:
        """
        Fault (issue 8 item 10c): neither the agent nor the callback listener could serve
        TLS. With both on HTTPS (a certificate from files) and each trusting the other's
        certificate, connect and an asynchronous command complete.
        """
        base = p.host_base_url(self.listen_agent(token="t"), 1)
        client = self.node(self.trust, token="t")
        self.assertTrue(client.callback_url.startswith("https://127.0.0.1:"))
        yield client.connect(base, "h1")
        rsp = yield client.call(base, p.HostCapacityCmd(), timeout=TIMEOUT)
        self.assertTrue(rsp.success)
        self.assertEqual(client.stats["completed"], 1)

    @defer.inlineCallbacks
    def test_untrusted_certificate_refused(self) -> Any:
        """
        A node that does not trust the agent's certificate cannot connect (an I/O error,
        not a silent success).
        """
        base = p.host_base_url(self.listen_agent(), 0)
        other_cert, _ = make_self_signed(self.mktemp(), name="other")
        client = self.node(trust_root_from_pem(other_cert))
        error = yield self.assertFailure(client.connect(base, "h0"), OperationError)
        self.assertIn(error.error.code, ("SYS.1015", "SYS.1016"))
        self.assertIsNone(client.secret_for(base))

    @defer.inlineCallbacks
    def test_oversized_body_413(self) -> Any:
        """
        Fault (issue 8 item 10e): a request body of any size was buffered whole before the
        resource saw it. A QuietSite answers 413 past its limit without buffering the body.
        """
        http = make_http_client(reactor, self.pool())
        agent, _ = make_agent(http, reactor)
        site = QuietSite(agent.app.resource())
        site.max_body_size = 1000
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = f"http://127.0.0.1:{port.getHost().port}/host/echo"
        response = yield treq.post(url, data=b"{" + b" " * 5000 + b"}", pool=self.pool())
        self.assertEqual(response.code, 413)
        yield response.content()
        response = yield treq.post(url, data=b"{}", pool=self.pool())
        self.assertEqual(response.code, 200)
        yield response.content()

        # A chunked body (no Content-Length) is cut off as it arrives.
        producer = FileBodyProducer(io.BytesIO(b"{" + b" " * 2000 + b"}"), readSize=100)
        producer.length = UNKNOWN_LENGTH
        response = yield treq.post(url, data=producer, pool=self.pool())
        self.assertEqual(response.code, 413)
        yield response.content()


class OptionsTests(TestCase):
    """
    C{twistd zagent} and the node's config take the trust settings.
    """

    def test_agent_options(self) -> None:
        """
        --bootstrap-token-file, --tls-cert/--tls-key and --tls-ca are read at parse time and
        refused clearly when wrong.
        """
        cert, key = make_self_signed(self.mktemp())
        token_file = self.mktemp()
        with open(token_file, "w") as f:
            f.write("  tok\n")
        options = Options()
        options.parseOptions(["--bootstrap-token-file", token_file, "--tls-cert", cert,
                              "--tls-key", key, "--tls-ca", cert, "--port", "0"])
        self.assertEqual(options["bootstrap-token"], "tok")
        self.assertIsNotNone(options["tls-options"])
        service = makeService(options)
        self.assertEqual(type(list(service)[1]).__name__, "SSLServer")
        from twisted.python import usage

        for bad in (["--tls-cert", cert], ["--tls-cert", cert, "--tls-key", token_file],
                    ["--bootstrap-token-file", "/nonexistent"], ["--bootstrap-token", ""],
                    ["--tls-ca", token_file]):
            self.assertRaises(usage.UsageError, Options().parseOptions, bad)

    def test_node_config(self) -> None:
        """
        [agents] and [http] TLS keys load; a callback base is https with a certificate.
        """
        token_file = self.mktemp()
        with open(token_file, "w") as f:
            f.write("tok\n")
        config = load_config(overrides={
            "agents": {"bootstrap_token_file": token_file},
            "http": {"tls_cert": "c.pem", "tls_key": "k.pem", "port": 0}})
        self.assertEqual(config.agents.token(), "tok")
        self.assertEqual(config.http.callback_base(8443), "https://127.0.0.1:8443")
        self.assertRaises(ConfigError, load_config, overrides={"http": {"tls_cert": "c"}})
        self.assertRaises(ConfigError, load_config, overrides={
            "agents": {"bootstrap_token": "a", "bootstrap_token_file": token_file}})
        self.assertRaises(ConfigError, load_config(overrides={
            "agents": {"bootstrap_token_file": "/nonexistent"}}).agents.token)


class OneDefinitionTests(SynchronousTestCase):
    """
    The body-size limit and the PEM reading are defined once.
    """

    def test_one_body_size_limit(self) -> None:
        """
        Fault (issue 8 item 10, review): the site's body limit
        (C{agent.http.DEFAULT_MAX_BODY_SIZE}) and the wire's (L{p.MAX_BODY_SIZE}) were two
        literals of the same value, free to drift apart. The site's is the wire's.
        """
        import agent.http

        self.assertIs(agent.http.DEFAULT_MAX_BODY_SIZE, p.MAX_BODY_SIZE)
        self.assertIs(QuietSite.max_body_size, p.MAX_BODY_SIZE)

    def test_one_pem_reader(self) -> None:
        """
        Fault (issue 8 item 10, review): the PEM splitting was copied in
        C{trust_root_from_pem} and C{server_tls_options}. Both read certificates through one
        helper, and both refuse a file without one with the same message.
        """
        import agent.http

        cert, key = make_self_signed(self.mktemp())
        read: list[str] = []
        real = agent.http._certificates_from_pem
        self.patch(agent.http, "_certificates_from_pem",
                   lambda pem, path: read.append(path) or real(pem, path))
        trust_root_from_pem(cert)
        server_tls_options(cert, key)
        self.assertEqual(read, [cert, cert])
        empty = self.mktemp()
        with open(empty, "wb") as f:
            f.write(b"no PEM here\n")
        for call in (lambda: trust_root_from_pem(empty),
                     lambda: server_tls_options(empty, key)):
            self.assertEqual(str(self.assertRaises(ValueError, call)),
                             f"no certificate in {empty}")
