"""
C{python -m zcontrol.demo}: the README's way to try the inventory before the REST API exists
runs every step against a real node and a real agent, and cleans up after itself.
"""

from __future__ import annotations

import io
import os

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from zcontrol import demo


class DemoTests(TestCase):
    async def test_every_step_succeeds(self) -> None:
        """
        The demo builds the cloud through a real node and agent, shows each step's service
        and inventory, ends with no capacity drift and one download for 20 volumes, and
        returns 0; the data dir it was given keeps the store.
        """
        out = io.StringIO()
        data = os.path.abspath(self.mktemp())
        os.makedirs(data)
        status = await demo.run(reactor, out, data_dir=data)
        text = out.getvalue()
        self.assertEqual(status, 0, text)
        for line in ("CreateZoneMsg [zone]", "AttachPrimaryStorageToClusterMsg [storage.primary]",
                     "AddImageMsg [image] uuid=", "status=Ready", "AllocateHostMsg [host.allocator]",
                     "host-3 connected later: NFS mount Connected",
                     "20 root volumes on NFS: 1 image cache entry (one download)",
                     "CreateVmInstanceMsg [vmInstance] uuid=", "state=Running",
                     "StopVmInstanceMsg [vmInstance]", "state=Stopped",
                     "DestroyVmInstanceMsg [vmInstance]", "state=Destroyed",
                     "ExpungeVmInstanceMsg [vmInstance] gone",
                     "20 concurrent creates: 20 Running, 0 failed",
                     "capacity audit: 0 drifted figure(s)", "done: every step succeeded"):
            self.assertIn(line, text)
        self.assertNotIn("FAILED", text)
        self.assertTrue(os.path.exists(os.path.join(data, "zcontrol.db")))
