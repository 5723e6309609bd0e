"""
The primary storage store functions (L{zcontrol.db.components.storage}) on SQLite and the
real PostgreSQL: LocalStorage reservations take from the storage and the host's ref
atomically, concurrent reservations (raced on several threads and connections) never exceed
the capacity of the host or the storage, caches hold capacity, removals and deletion leave
nothing behind, and the audit recomputes the host refs.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from tests.db_support import TOPOLOGY, pg_create_database_sync, pg_drop_database_sync, pg_dsn
from tests.test_db_property import WORKERS, Env
from zcontrol.core.errors import SYS, OperationError
from zcontrol.db import DB
from zcontrol.db import _store as thd
from zcontrol.db.components import storage as st
from zcontrol.db.postgres import PostgresDialect
from zcontrol.db.sqlite import SQLiteDialect

PS = "ps-local"
NFS = "ps-nfs"


class StorageDbMixin:
    """
    The tests, given C{make_dialect}.
    """

    def make_dialect(self) -> Any:
        raise NotImplementedError

    def setUp(self) -> None:
        self.env = Env(self.make_dialect())
        self.addCleanup(self.env.close)
        self.db = self.env.check
        for i in (1, 2):
            thd.insert_thd(self.db, "host", dict(TOPOLOGY["host"], uuid=f"h{i}",
                                                 managementIp=f"10.1.0.{i}",
                                                 availableCpuCapacity=16,
                                                 availableMemoryCapacity=1024), 0.0)
        thd.insert_thd(self.db, "primaryStorage", dict(TOPOLOGY["primaryStorage"], uuid=PS,
                                                       totalCapacity=0,
                                                       availableCapacity=0), 0.0)
        thd.insert_thd(self.db, "primaryStorage", dict(TOPOLOGY["primaryStorage"], uuid=NFS,
                                                       type="NFS", url="s:/e", totalCapacity=0,
                                                       availableCapacity=0), 0.0)
        for h in ("h1", "h2"):
            st.set_local_storage_host_capacity_thd(self.db, PS, h, 1000, 900, 1.0)

    def ps(self, uuid: str = PS) -> dict[str, Any]:
        return thd.get_thd(self.db, "primaryStorage", uuid)

    def ref(self, host: str) -> dict[str, Any]:
        r = self.db.one("SELECT total_capacity, available_capacity FROM local_storage_host_refs"
                        " WHERE primary_storage_uuid = ? AND host_uuid = ?", (PS, host))
        return {"total": int(r[0]), "available": int(r[1])}

    def error(self, fn: Any, *args: Any, **kw: Any) -> Any:
        with self.assertRaises(OperationError) as cm:
            fn(self.db, *args, **kw)
        return cm.exception.error

    def audit(self) -> list[dict]:
        return thd.audit_capacity_thd(self.db, False, 2.0)

    def test_host_refs_make_the_totals(self) -> None:
        """
        The storage's totals are the sums of its host refs; a new total keeps what is held.
        """
        row = self.ps()
        self.assertEqual((row["totalCapacity"], row["availableCapacity"]), (2000, 2000))
        self.assertEqual(row["availablePhysicalCapacity"], 1800)
        st.reserve_primary_storage_thd(self.db, PS, 300, ("VolumeVO", "v"), 1.0, "h1")
        st.set_local_storage_host_capacity_thd(self.db, PS, "h1", 1500, 900, 1.0)
        self.assertEqual(self.ref("h1"), {"total": 1500, "available": 1200})
        self.assertEqual((self.ps()["totalCapacity"], self.ps()["availableCapacity"]),
                         (2500, 2200))
        self.assertEqual(self.audit(), [])

    def test_local_reservation_takes_both(self) -> None:
        """
        A reservation on a host takes from the host's ref and the storage; a retry changes
        nothing; the same holder on another host is DB.1000; release gives both back.
        """
        holder = ("VolumeVO", "v1")
        row = st.reserve_primary_storage_thd(self.db, PS, 300, holder, 1.0, "h1")
        self.assertEqual(row["availableCapacity"], 1700)
        self.assertEqual(self.ref("h1")["available"], 700)
        st.reserve_primary_storage_thd(self.db, PS, 300, holder, 1.0, "h1")
        self.assertEqual(self.ref("h1")["available"], 700)
        self.assertEqual(self.error(st.reserve_primary_storage_thd, PS, 300, holder, 1.0,
                                    "h2").code, DB.DUPLICATE)
        err = self.error(st.reserve_primary_storage_thd, PS, 800, ("VolumeVO", "v2"), 1.0, "h1")
        self.assertEqual((err.code, err.opaque["availableCapacity"]), (DB.STORAGE_CAPACITY, 700))
        self.assertEqual(self.ps()["availableCapacity"], 1700)
        self.assertEqual(self.audit(), [])
        row = st.release_primary_storage_thd(self.db, PS, holder, 1.0)
        self.assertEqual(row["availableCapacity"], 2000)
        self.assertEqual(self.ref("h1")["available"], 1000)
        st.release_primary_storage_thd(self.db, PS, holder, 1.0)
        self.assertEqual(self.ps()["availableCapacity"], 2000)

    def test_concurrent_reservations_never_exceed(self) -> None:
        """
        30 reservations of 100 bytes raced on each host (1000 bytes each): exactly 10 win
        per host, the rest are DB.1004; no figure goes below zero and the audit is clean.
        """
        calls = [lambda db, i=i, h=h: st.reserve_primary_storage_thd(
            db, PS, 100, ("VolumeVO", f"{h}-{i}"), 1.0, h)
            for i in range(30) for h in ("h1", "h2")]
        results = []
        for start in range(0, len(calls), WORKERS):
            results.extend(self.env.race(calls[start:start + WORKERS]))
        wins = [r for ok, r in results if ok]
        self.assertEqual(len(wins), 20)
        self.assertEqual({r.code for ok, r in results if not ok}, {DB.STORAGE_CAPACITY})
        self.assertEqual((self.ref("h1")["available"], self.ref("h2")["available"]), (0, 0))
        self.assertEqual(self.ps()["availableCapacity"], 0)
        self.assertEqual(self.audit(), [])

    def test_concurrent_mixed(self) -> None:
        """
        Reservations, releases and capacity updates raced together keep the figures equal
        to what the holders say.
        """
        for i in range(5):
            st.reserve_primary_storage_thd(self.db, PS, 50, ("VolumeVO", f"old{i}"), 1.0, "h1")
        st.set_primary_storage_capacity_thd(self.db, NFS, 100, 100, 1.0)
        calls: list[Any] = []
        for i in range(5):
            calls.append(lambda db, i=i: st.reserve_primary_storage_thd(
                db, PS, 70, ("VolumeVO", f"new{i}"), 1.0, "h1"))
            calls.append(lambda db, i=i: st.release_primary_storage_thd(
                db, PS, ("VolumeVO", f"old{i}"), 1.0))
        calls.append(lambda db: st.set_local_storage_host_capacity_thd(db, PS, "h1", 1200, 1, 1.0))
        calls.append(lambda db: st.reserve_primary_storage_thd(db, NFS, 1, ("V", "x"), 1.0))
        for start in range(0, len(calls), WORKERS):
            for ok, result in self.env.race(calls[start:start + WORKERS]):
                self.assertTrue(ok, result)
        self.assertEqual(self.ref("h1"), {"total": 1200, "available": 1200 - 350})
        self.assertEqual(self.ps()["availableCapacity"], 2200 - 350)
        self.assertEqual(self.audit(), [])

    def test_image_cache_and_remove_host(self) -> None:
        """
        A cache row holds its size on its host; removing the host is refused while a volume
        holds capacity there, and then drops the caches, the ref and its share of the totals.
        """
        cache = st.create_image_cache_thd(self.db, {
            "uuid": "cache-1", "primaryStorageUuid": PS, "hostUuid": "h1", "imageUuid": "img",
            "size": 200, "status": "Downloading"}, 1.0)
        self.assertEqual(cache["status"], "Downloading")
        self.assertEqual(self.ref("h1")["available"], 800)
        with self.assertRaises(Exception):  # noqa: B017 (the driver's unique violation)
            st.create_image_cache_thd(self.db, {
                "uuid": "cache-2", "primaryStorageUuid": PS, "hostUuid": "h1",
                "imageUuid": "img", "size": 200}, 1.0)
        err = self.error(st.create_image_cache_thd, {
            "uuid": "cache-3", "primaryStorageUuid": PS, "hostUuid": "h2", "imageUuid": "big",
            "size": 5000}, 1.0)
        self.assertEqual(err.code, DB.STORAGE_CAPACITY)
        self.assertIsNone(thd.get_thd(self.db, "imageCache", "cache-3"))
        st.reserve_primary_storage_thd(self.db, PS, 100, ("VolumeVO", "v"), 1.0, "h1")
        err = self.error(st.remove_local_storage_host_thd, PS, "h1", 1.0)
        self.assertEqual(err.code, SYS.OPERATION_ERROR)
        self.assertEqual([h["holderUuid"] for h in err.opaque["holders"]], ["v"])
        st.release_primary_storage_thd(self.db, PS, ("VolumeVO", "v"), 1.0)
        row = st.remove_local_storage_host_thd(self.db, PS, "h1", 1.0)
        self.assertEqual((row["totalCapacity"], row["availableCapacity"]), (1000, 1000))
        self.assertIsNone(thd.get_thd(self.db, "imageCache", "cache-1"))
        self.assertEqual(st.primary_storage_holders_thd(self.db, PS, None, None), [])
        self.assertEqual(self.audit(), [])

    def test_delete_cache(self) -> None:
        """
        Deleting a cache gives its capacity back, once.
        """
        st.create_image_cache_thd(self.db, {
            "uuid": "c", "primaryStorageUuid": NFS, "imageUuid": "img", "size": 0}, 1.0)
        st.set_primary_storage_capacity_thd(self.db, NFS, 1000, 1000, 1.0)
        st.create_image_cache_thd(self.db, {
            "uuid": "c2", "primaryStorageUuid": NFS, "imageUuid": "img2", "size": 300}, 1.0)
        row = st.set_primary_storage_capacity_thd(self.db, NFS, 2000, 1500, 1.0)
        self.assertEqual(row["availableCapacity"], 1700)
        self.assertTrue(st.delete_image_cache_thd(self.db, "c2", 1.0))
        self.assertFalse(st.delete_image_cache_thd(self.db, "c2", 1.0))
        self.assertEqual(self.ps(NFS)["availableCapacity"], 2000)
        self.assertEqual(self.audit(), [])

    def test_delete_storage(self) -> None:
        """
        Deleting is refused while attached or while volumes hold capacity; then the storage
        goes with its caches, refs and cache reservations.
        """
        thd.insert_thd(self.db, "primaryStorageClusterRef", {
            "uuid": "ref", "primaryStorageUuid": PS, "clusterUuid": "cluster-1"}, 1.0)
        err = self.error(st.delete_primary_storage_thd, PS)
        self.assertEqual(err.opaque["clusterUuids"], ["cluster-1"])
        thd.delete_thd(self.db, "primaryStorageClusterRef", "ref")
        st.reserve_primary_storage_thd(self.db, PS, 1, ("VolumeVO", "v"), 1.0, "h2")
        self.assertEqual(self.error(st.delete_primary_storage_thd, PS).opaque["holders"][0]
                         ["holderUuid"], "v")
        st.release_primary_storage_thd(self.db, PS, ("VolumeVO", "v"), 1.0)
        st.create_image_cache_thd(self.db, {
            "uuid": "c", "primaryStorageUuid": PS, "hostUuid": "h2", "imageUuid": "i",
            "size": 10}, 1.0)
        self.assertTrue(st.delete_primary_storage_thd(self.db, PS))
        for table in ("primary_storages WHERE uuid = 'ps-local'", "image_caches",
                      "local_storage_host_refs", "primary_storage_capacity_holders"):
            self.assertEqual(self.db.all(f"SELECT * FROM {table}"), [], table)
        self.assertFalse(st.delete_primary_storage_thd(self.db, PS))

    def test_audit_repairs_host_refs(self) -> None:
        """
        Drift in a host ref's available figure is reported and repaired.
        """
        st.reserve_primary_storage_thd(self.db, PS, 100, ("VolumeVO", "v"), 1.0, "h1")
        self.db.run("UPDATE local_storage_host_refs SET available_capacity = 1000"
                    " WHERE host_uuid = 'h1'")
        drift = self.audit()
        self.assertEqual([(d["resource"], d["recorded"], d["computed"]) for d in drift],
                         [("localStorageHostRef", 1000, 900)])
        thd.audit_capacity_thd(self.db, True, 2.0)
        self.assertEqual(self.ref("h1")["available"], 900)
        self.assertEqual(self.audit(), [])

    def test_reserve_reports_insert(self) -> None:
        """
        With C{report}, a reservation says whether it recorded the holder (a resend: not),
        on shared and local storage; nothing changes the second time.
        """
        st.set_primary_storage_capacity_thd(self.db, NFS, 1000, 1000, 1.0)
        for ps, host in ((PS, "h1"), (NFS, None)):
            _, inserted = st.reserve_primary_storage_thd(self.db, ps, 10, ("VolumeVO", "v"),
                                                         1.0, host, True)
            self.assertTrue(inserted)
            row, inserted = st.reserve_primary_storage_thd(self.db, ps, 10, ("VolumeVO", "v"),
                                                           1.0, host, True)
            self.assertFalse(inserted)
            self.assertEqual(row["availableCapacity"], (2000 if ps == PS else 1000) - 10)
        self.assertEqual(self.audit(), [])

    def test_detach_all_or_nothing(self) -> None:
        """
        The detach's dependency check and the removal of every host's refs and caches are
        one transaction: refused by a volume on h2, nothing changed; then all goes.
        """
        self.db.run("UPDATE hosts SET cluster_uuid = 'cluster-1'")
        thd.insert_thd(self.db, "primaryStorageClusterRef", {
            "uuid": "ref", "primaryStorageUuid": PS, "clusterUuid": "cluster-1"}, 1.0)
        st.create_image_cache_thd(self.db, {
            "uuid": "c1", "primaryStorageUuid": PS, "hostUuid": "h1", "imageUuid": "i",
            "size": 10}, 1.0)
        st.reserve_primary_storage_thd(self.db, PS, 5, ("VolumeVO", "v"), 1.0, "h2")
        before = (self.ps(), self.ref("h1"), self.ref("h2"))
        err = self.error(st.detach_primary_storage_thd, PS, "cluster-1", 2.0)
        self.assertEqual(err.code, SYS.OPERATION_ERROR)
        self.assertEqual([h["holderUuid"] for h in err.opaque["holders"]], ["v"])
        self.assertEqual((self.ps(), self.ref("h1"), self.ref("h2")), before)
        self.assertIsNotNone(thd.get_thd(self.db, "imageCache", "c1"))
        st.release_primary_storage_thd(self.db, PS, ("VolumeVO", "v"), 1.0)
        done = st.detach_primary_storage_thd(self.db, PS, "cluster-1", 2.0)
        self.assertEqual([c["uuid"] for c in done["imageCaches"]], ["c1"])
        self.assertEqual((done["primaryStorage"]["totalCapacity"],
                          done["primaryStorage"]["availableCapacity"]), (0, 0))
        for table in ("image_caches", "local_storage_host_refs",
                      "primary_storage_capacity_holders", "primary_storage_cluster_refs"):
            self.assertEqual(self.db.all(f"SELECT * FROM {table}"), [], table)
        err = self.error(st.detach_primary_storage_thd, PS, "cluster-1", 2.0)
        self.assertEqual(err.code, SYS.RESOURCE_NOT_FOUND)

    def test_cache_volume_refs(self) -> None:
        """
        A referenced cache is not deleted when only unreferenced ones may be; removing the
        last ref names the cache; refs go with their cache (cascade).
        """
        st.create_image_cache_thd(self.db, {
            "uuid": "c1", "primaryStorageUuid": PS, "hostUuid": "h1", "imageUuid": "i",
            "size": 10}, 1.0)
        self.assertTrue(st.add_image_cache_volume_ref_thd(self.db, "c1", "v1", 1.0))
        self.assertFalse(st.add_image_cache_volume_ref_thd(self.db, "c1", "v1", 1.0))
        self.assertTrue(st.add_image_cache_volume_ref_thd(self.db, "c1", "v2", 1.0))
        self.assertFalse(st.delete_image_cache_thd(self.db, "c1", 1.0, True))
        self.assertEqual(st.remove_image_cache_volume_refs_thd(self.db, PS, "v1", None), [])
        self.assertEqual([c["uuid"] for c in st.remove_image_cache_volume_refs_thd(
            self.db, PS, "v2", "c1")], ["c1"])
        self.assertTrue(st.add_image_cache_volume_ref_thd(self.db, "c1", "v3", 1.0))
        self.assertTrue(st.delete_image_cache_thd(self.db, "c1", 1.0))
        self.assertEqual(self.db.all("SELECT * FROM image_cache_volume_refs"), [])
        err = self.error(st.add_image_cache_volume_ref_thd, "c1", "v4", 1.0)
        self.assertEqual(err.code, SYS.RESOURCE_NOT_FOUND)
        self.assertEqual(self.audit(), [])

    def test_recompute(self) -> None:
        """
        After a host's ref went with its host, the totals are recomputed from the refs.
        """
        self.db.run("DELETE FROM local_storage_host_refs WHERE host_uuid = 'h2'")
        row = st.recompute_local_storage_thd(self.db, PS, 1.0)
        self.assertEqual((row["totalCapacity"], row["availableCapacity"]), (1000, 1000))
        self.assertEqual(self.audit(), [])


class SQLiteStorageDbTests(StorageDbMixin, SynchronousTestCase):
    """
    On SQLite (a temp file shared by several connections: writers really contend).
    """

    def make_dialect(self) -> Any:
        path = os.path.abspath(self.mktemp() + ".db")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return SQLiteDialect(path)


class PostgresStorageDbTests(StorageDbMixin, SynchronousTestCase):
    """
    On the real PostgreSQL (a fresh database).
    """

    def make_dialect(self) -> Any:
        name = pg_create_database_sync()
        self.addCleanup(pg_drop_database_sync, name)
        return PostgresDialect(pg_dsn(name))
