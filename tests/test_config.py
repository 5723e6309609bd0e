"""
L{zcontrol.config}: values an operator can get wrong are refused at load, naming the key
(issue 8, the new-user trial).
"""

from __future__ import annotations

import json

from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from zcontrol.config import _SECTIONS, ConfigError, HttpConfig, load_config
from zcontrol.tap import Options


class ConfigFileTestCase(SynchronousTestCase):
    def write(self, text: str) -> str:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path


class PublicUrlTests(ConfigFileTestCase):
    """
    C{[http] public_url}, the base URL agents call back.
    """

    def test_bad_public_url_refused(self) -> None:
        """
        Fault (new-user trial): C{public_url = "127.0.0.1:8080"} (no scheme) was accepted,
        and adding a host then failed obscurely, far from the cause. A public URL without an
        http/https scheme or a host, or with a query, fragment, credentials, a bad port or
        whitespace, is a ConfigError naming C{http.public_url}, from a file, an option or
        the constructor.
        """
        for url in ["127.0.0.1:8080", "10.0.0.5", "ftp://10.0.0.5/", "http://", "http:///x",
                    "//10.0.0.5:8080", "http://10.0.0.5:8080/?a=1", "http://10.0.0.5/#f",
                    "http://10.0.0.5:8080?", "http://u:p@10.0.0.5/", "http://10.0.0.5:99999",
                    "http://10.0.0.5:port", " http://10.0.0.5", "http://10.0.0.5\n",
                    "http://10.0.0.5/a b", ""]:
            e = self.assertRaises(ConfigError, HttpConfig, public_url=url)
            self.assertIn("http.public_url", str(e), url)
            # a JSON string is a TOML basic string
            e = self.assertRaises(ConfigError, load_config,
                                  self.write(f"[http]\npublic_url = {json.dumps(url)}\n"))
            self.assertIn("http.public_url", str(e), url)
        e = self.assertRaises(UsageError, Options().parseOptions,
                              ["--public-url", "127.0.0.1:8080"])
        self.assertIn("http.public_url", str(e))

    def test_good_public_url_accepted(self) -> None:
        """
        Absolute http and https URLs with a host, with or without a port or a path prefix,
        are accepted; the callback base drops a trailing slash.
        """
        for url, base in [("http://10.0.0.5:8080", "http://10.0.0.5:8080"),
                          ("https://mn.example.com/", "https://mn.example.com"),
                          ("HTTP://[::1]:8080/zc/", "HTTP://[::1]:8080/zc")]:
            config = load_config(None, {"http": {"public_url": url}})
            self.assertEqual(config.http.callback_base(8080), base)


class FiniteFloatTests(ConfigFileTestCase):
    """
    Every float key of the config tree.
    """

    FLOAT_KEYS = [(section, key) for section, keys in _SECTIONS.items()
                  for key, kind in keys.items() if kind is float]

    def test_float_keys_found(self) -> None:
        """
        The keys below include the ones the trial found (and the list is not empty).
        """
        self.assertIn(("shutdown", "drain_timeout"), self.FLOAT_KEYS)
        self.assertIn(("bus", "message_timeout"), self.FLOAT_KEYS)
        self.assertIn(("host", "command_timeout"), self.FLOAT_KEYS)

    def test_non_finite_floats_refused(self) -> None:
        """
        Fault (new-user trial): C{--drain-timeout nan} or C{inf}, and any float config value
        nan/inf, was accepted: nan passes every "must be positive" check (its comparisons
        are all false), and with it every stop of the node failed with an AssertionError;
        inf is a wait without a bound. Each float key refuses nan, inf and -inf, from a TOML
        file (where they are literals), from overrides (strings or floats) and from the
        twistd options, with an error naming the key.
        """
        for section, key in self.FLOAT_KEYS:
            name = f"{section}.{key}"
            for literal in ("nan", "inf", "-inf", "+inf"):
                e = self.assertRaises(ConfigError, load_config,
                                      self.write(f"[{section}]\n{key} = {literal}\n"))
                self.assertIn(name, str(e))
                self.assertIn("finite", str(e))
                for value in (literal, float(literal)):
                    e = self.assertRaises(ConfigError, load_config, None,
                                          {section: {key: value}})
                    self.assertIn(name, str(e))
        for option, name in [("--drain-timeout", "shutdown.drain_timeout"),
                             ("--message-timeout", "bus.message_timeout")]:
            for value in ("nan", "inf", "1e999"):
                e = self.assertRaises(UsageError, Options().parseOptions, [option, value])
                self.assertIn(name, str(e))

    def test_type_errors_name_the_key(self) -> None:
        """
        A value of the wrong type names its key, from a file or from overrides.
        """
        for section, key in self.FLOAT_KEYS:
            for value in ('"abc"', "true", "[1]"):
                e = self.assertRaises(ConfigError, load_config,
                                      self.write(f"[{section}]\n{key} = {value}\n"))
                self.assertIn(f"{section}.{key} must be a float", str(e))
            e = self.assertRaises(ConfigError, load_config, None, {section: {key: "abc"}})
            self.assertIn(f"{section}.{key} must be a float", str(e))
        e = self.assertRaises(ConfigError, load_config, None, {"http": {"port": "80x"}})
        self.assertIn("http.port must be a int", str(e))

    def test_finite_floats_accepted(self) -> None:
        """
        Finite values, given as ints, floats or numeric strings, still load as floats.
        """
        c = load_config(self.write("[shutdown]\ndrain_timeout = 3\n[bus]\n"
                                   "message_timeout = 2.5\n"),
                        {"host": {"command_timeout": "7.5"}})
        self.assertEqual((c.shutdown.drain_timeout, c.bus.message_timeout,
                          c.host.command_timeout), (3.0, 2.5, 7.5))


class BusPrefixTests(ConfigFileTestCase):
    """
    C{[bus] prefix}: the AMQP names' prefix.
    """

    def test_prefix(self) -> None:
        """
        A prefix of letters, digits, C{.}, C{_} and C{-} is taken and reaches the AMQP bus's
        topology; anything else is a ConfigError naming C{bus.prefix}.
        """
        from twisted.internet.task import Clock

        from zcontrol.node import make_bus

        config = load_config(self.write('[node]\nid = "mn-p"\n[bus]\nbackend = "amqp"\n'
                                        'prefix = "cloud-a."\n'))
        self.assertEqual(config.bus.prefix, "cloud-a.")
        bus = make_bus(config, Clock())
        self.assertTrue(bus.topology.p2p.startswith("cloud-a."), bus.topology.p2p)
        for bad in ("a b", "x/y", "a" * 65, "é"):
            e = self.assertRaises(ConfigError, load_config,
                                  self.write(f"[bus]\nprefix = {json.dumps(bad)}\n"))
            self.assertIn("bus.prefix", str(e))
