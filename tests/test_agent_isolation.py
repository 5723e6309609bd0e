"""
The agent is deployable alone: nothing under C{agent/} imports C{zcontrol}.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

import agent

AGENT_DIR = os.path.dirname(os.path.abspath(agent.__file__))
ALLOWED = {"twisted", "klein", "treq", "attrs", "zope", "agent", "__future__"}

_SCRIPT = """
import pkgutil, importlib, sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "zcontrol" or name.startswith("zcontrol."):
            raise ImportError("zcontrol is not deployed with the agent")
        return None

sys.meta_path.insert(0, Block())
import agent
names = [m.name for m in pkgutil.walk_packages(agent.__path__, "agent.")]
for name in names:
    importlib.import_module(name)
from agent.tap import Options, build_agent
from twisted.internet.task import Clock
options = Options()
options.parseOptions(["--hosts", "2", "--bootstrap-token", "t"])
build_agent(options, Clock())
assert not [m for m in sys.modules if m.split(".")[0] == "zcontrol"]
print("ok", len(names))
"""


def _python_files() -> list[str]:
    out = []
    for root, _dirs, files in os.walk(AGENT_DIR):
        out.extend(os.path.join(root, f) for f in files if f.endswith(".py"))
    return out


class IsolationTests(SynchronousTestCase):
    """
    The agent package depends only on twisted, klein, treq, attrs, zope.interface and the
    standard library.
    """

    def test_static_imports(self) -> None:
        """
        No module under agent/ imports zcontrol or a third-party package outside the allowed
        set.
        """
        stdlib = set(sys.stdlib_module_names)
        offenders = []
        for path in _python_files():
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in ALLOWED and top not in stdlib:
                        offenders.append((path, name))
        self.assertEqual(offenders, [])

    def test_imports_without_zcontrol(self) -> None:
        """
        In a fresh interpreter where zcontrol cannot be imported, every agent module imports
        and an agent can be built.
        """
        env = dict(os.environ)
        env["PYTHONPATH"] = os.path.dirname(AGENT_DIR)
        result = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True,
                                text=True, env=env, timeout=60)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.startswith("ok"), result.stdout)
