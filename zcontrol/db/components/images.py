# -*- test-case-name: tests.test_image -*-
"""
The store component of backup storage and images (the backup storage and image services):
the steps that must be atomic (an image with its backup storage refs, the outcome of its
downloads, a backup storage's refs dropped, a detach); single-row changes use the generic
C{insert/get/update/delete}.
"""

from __future__ import annotations

import uuid as uuidlib
from typing import Sequence

from twisted.internet.defer import Deferred

from zcontrol.core.errors import SYS, OperationError
from zcontrol.db.components.base import (
    Db,
    StoreComponent,
    _copy,
    _uuid,
    get_thd,
    insert_thd,
    update_thd,
)

__all__ = ["ImagesComponent"]


def add_image_thd(db: Db, image: dict, backup_storage_uuids: Sequence[str], now: float
                  ) -> dict:
    """
    Insert the image row and one C{Downloading} ref per backup storage, atomically.

    @return: the image row.
    """
    with db.transaction():
        row = insert_thd(db, "image", image, now)
        for bs in backup_storage_uuids:
            insert_thd(db, "imageBackupStorageRef", {
                "uuid": uuidlib.uuid4().hex, "imageUuid": row["uuid"],
                "backupStorageUuid": bs, "status": "Downloading"}, now)
    return row


def record_image_ref_download_thd(db: Db, image_uuid: str, result: dict, now: float) -> bool:
    """
    Record the outcome of one download (C{result} as one of L{finish_image_download_thd}'s)
    as soon as it is known, atomically, so that a management node restarting before the
    others end finds it (L{resolve_interrupted_image_download_thd}): the ref C{Ready} with
    its install path and size (and the image's C{size}, C{actualSize}, C{md5sum} from the
    first success), or C{Error} with its C{lastError}. The image stays C{Downloading}.

    @return: whether the ref was there, still C{Downloading}.
    """
    image_uuid = _uuid("image_uuid", image_uuid)
    with db.transaction():
        ref = db.one("SELECT uuid FROM image_backup_storage_refs WHERE image_uuid = ?"
                     " AND backup_storage_uuid = ? AND status = ?",
                     (image_uuid, result["backupStorageUuid"], "Downloading"))
        if ref is None:
            return False
        if result.get("error") is not None:
            update_thd(db, "imageBackupStorageRef", ref[0], {
                "status": "Error", "lastError": result["error"]}, None, now)
            return True
        first = not db.one("SELECT COUNT(*) FROM image_backup_storage_refs WHERE image_uuid = ?"
                           " AND status = ?", (image_uuid, "Ready"))[0]
        update_thd(db, "imageBackupStorageRef", ref[0], {
            "status": "Ready", "installPath": result["installPath"],
            "size": result["actualSize"], "lastError": None}, None, now)
        if first:
            update_thd(db, "image", image_uuid, {
                "size": result["size"], "actualSize": result["actualSize"],
                "md5sum": result.get("md5sum")}, None, now)
        return True


def resolve_interrupted_image_download_thd(db: Db, image_uuid: str, reason: str, now: float
                                           ) -> dict | None:
    """
    Resolve the downloads of an image whose add was interrupted (its management node
    restarted: nothing downloads any more), atomically: every ref still C{Downloading}
    becomes C{Error} with C{lastError} C{reason}; an image still C{Downloading} becomes
    C{Ready} when a ref is C{Ready} (a download that ended before the restart, see
    L{record_image_ref_download_thd}), else C{Error}. Idempotent.

    @return: C{{"image": row, "interrupted": [backup storage uuids]}} (C{interrupted}: the
        refs that were still C{Downloading}), or None when the image row is gone.
    """
    image_uuid = _uuid("image_uuid", image_uuid)
    with db.transaction():
        row = get_thd(db, "image", image_uuid)
        if row is None:
            return None
        refs = db.all("SELECT uuid, backup_storage_uuid, status FROM image_backup_storage_refs"
                      " WHERE image_uuid = ? ORDER BY backup_storage_uuid", (image_uuid,))
        interrupted = []
        for ref_uuid, bs, status in refs:
            if status == "Downloading":
                update_thd(db, "imageBackupStorageRef", ref_uuid, {
                    "status": "Error", "lastError": reason}, None, now)
                interrupted.append(bs)
        if row["status"] == "Downloading":
            ready = any(status == "Ready" for _, _, status in refs)
            row = update_thd(db, "image", image_uuid,
                             {"status": "Ready" if ready else "Error"}, None, now)
        return {"image": row, "interrupted": interrupted}


def finish_image_download_thd(db: Db, image_uuid: str, results: Sequence[dict], now: float
                              ) -> dict | None:
    """
    Record the outcome of an image's downloads, atomically. C{results}: one dict per backup
    storage, C{backupStorageUuid} and either C{installPath}, C{size}, C{actualSize},
    C{md5sum} (it succeeded) or C{error} (the agent's reason).

    When one succeeded at least, the image is C{Ready} (sizes of the first success), the
    refs that succeeded C{Ready} with their install paths and the failed refs deleted. When
    all failed, the image is C{Error} and each ref C{Error} with its C{lastError}.

    @return: the image row, or None when the image was deleted meanwhile (nothing changed).
    """
    image_uuid = _uuid("image_uuid", image_uuid)
    good = [r for r in results if r.get("error") is None]
    with db.transaction():
        if get_thd(db, "image", image_uuid) is None:
            return None
        for r in results:
            ref = db.one("SELECT uuid FROM image_backup_storage_refs WHERE image_uuid = ?"
                         " AND backup_storage_uuid = ?", (image_uuid, r["backupStorageUuid"]))
            if ref is None:
                continue  # the backup storage was deleted meanwhile
            if r.get("error") is None:
                update_thd(db, "imageBackupStorageRef", ref[0], {
                    "status": "Ready", "installPath": r["installPath"],
                    "size": r["actualSize"], "lastError": None}, None, now)
            elif good:
                db.run("DELETE FROM image_backup_storage_refs WHERE uuid = ?", (ref[0],))
            else:
                update_thd(db, "imageBackupStorageRef", ref[0], {
                    "status": "Error", "lastError": r["error"]}, None, now)
        if good:
            first = good[0]
            changes = {"status": "Ready", "size": first["size"],
                       "actualSize": first["actualSize"], "md5sum": first.get("md5sum")}
        else:
            changes = {"status": "Error"}
        return update_thd(db, "image", image_uuid, changes, None, now)


def drop_image_refs_on_backup_storage_thd(db: Db, backup_storage_uuid: str, now: float
                                          ) -> list[dict]:
    """
    Delete every image ref on the backup storage, atomically; an image left with no ref is
    set to C{Deleted} (its bits are gone; the row stays for the VMs created from it until
    it is deleted).

    @return: C{{"imageUuid", "installPath", "deleted"}} per ref dropped (C{deleted}: the
        image became C{Deleted}).
    @raise OperationError: C{SYS.1006} when a ref on it is C{Downloading} (the details name
        the images: C{imageUuids}).
    """
    backup_storage_uuid = _uuid("backup_storage_uuid", backup_storage_uuid)
    with db.transaction():
        refs = db.all("SELECT image_uuid, install_path, status FROM image_backup_storage_refs"
                      " WHERE backup_storage_uuid = ? ORDER BY image_uuid",
                      (backup_storage_uuid,))
        busy = [r[0] for r in refs if r[2] == "Downloading"]
        if busy:
            raise OperationError.of(
                SYS.OPERATION_ERROR,
                f"images {', '.join(busy)} are downloading to backup storage "
                f"{backup_storage_uuid}", imageUuids=busy,
                backupStorageUuid=backup_storage_uuid)
        db.run("DELETE FROM image_backup_storage_refs WHERE backup_storage_uuid = ?",
               (backup_storage_uuid,))
        out = []
        for image_uuid, install_path, _status in refs:
            left = db.one("SELECT COUNT(*) FROM image_backup_storage_refs WHERE image_uuid = ?",
                          (image_uuid,))[0]
            if not left:
                update_thd(db, "image", image_uuid, {"status": "Deleted"}, None, now)
            out.append({"imageUuid": image_uuid, "installPath": install_path,
                        "deleted": not left})
        return out


def detach_backup_storage_thd(db: Db, backup_storage_uuid: str, zone_uuid: str) -> bool:
    """
    Delete the backup storage's zone ref: whether there was one.
    """
    return db.run("DELETE FROM backup_storage_zone_refs WHERE backup_storage_uuid = ?"
                  " AND zone_uuid = ?", (_uuid("backup_storage_uuid", backup_storage_uuid),
                                         _uuid("zone_uuid", zone_uuid))) > 0


def delete_image_thd(db: Db, image_uuid: str) -> dict | None:
    """
    Delete the image and its refs, atomically.

    @return: the deleted row, or None when there was none.
    """
    with db.transaction():
        row = get_thd(db, "image", image_uuid)
        if row is not None:
            db.run("DELETE FROM image_backup_storage_refs WHERE image_uuid = ?", (image_uuid,))
            db.run("DELETE FROM images WHERE uuid = ?", (image_uuid,))
        return row


def delete_backup_storage_thd(db: Db, backup_storage_uuid: str) -> bool:
    """
    Delete the backup storage with its zone refs, atomically (refused by the foreign key
    while image refs remain on it: drop them first, through the image service).
    """
    with db.transaction():
        db.run("DELETE FROM backup_storage_zone_refs WHERE backup_storage_uuid = ?",
               (backup_storage_uuid,))
        left = db.one("SELECT COUNT(*) FROM image_backup_storage_refs"
                      " WHERE backup_storage_uuid = ?", (backup_storage_uuid,))[0]
        if left:
            raise OperationError.of(
                SYS.OPERATION_ERROR, f"backup storage {backup_storage_uuid} still holds "
                f"{left} image ref(s)", backupStorageUuid=backup_storage_uuid)
        return db.run("DELETE FROM backup_storages WHERE uuid = ?", (backup_storage_uuid,)) > 0


class ImagesComponent(StoreComponent):
    """
    Store operations of backup storage and images (the backup storage and image services),
    run on the store's one pool.
    """

    def add_image(self, image: dict, backup_storage_uuids: Sequence[str]) -> Deferred:
        """
        See L{add_image_thd}.
        """
        return self._run(add_image_thd, _copy(image), list(backup_storage_uuids), self._now())

    def record_image_ref_download(self, image_uuid: str, result: dict) -> Deferred:
        """
        See L{record_image_ref_download_thd}.
        """
        return self._run(record_image_ref_download_thd, image_uuid, _copy(result), self._now())

    def resolve_interrupted_image_download(self, image_uuid: str, reason: str) -> Deferred:
        """
        See L{resolve_interrupted_image_download_thd}.
        """
        return self._run(resolve_interrupted_image_download_thd, image_uuid, reason,
                         self._now())

    def finish_image_download(self, image_uuid: str, results: Sequence[dict]) -> Deferred:
        """
        See L{finish_image_download_thd}.
        """
        return self._run(finish_image_download_thd, image_uuid, _copy(list(results)),
                         self._now())

    def drop_image_refs_on_backup_storage(self, backup_storage_uuid: str) -> Deferred:
        """
        See L{drop_image_refs_on_backup_storage_thd}.
        """
        return self._run(drop_image_refs_on_backup_storage_thd, backup_storage_uuid,
                         self._now())

    def detach_backup_storage(self, backup_storage_uuid: str, zone_uuid: str) -> Deferred:
        """
        See L{detach_backup_storage_thd}.
        """
        return self._run(detach_backup_storage_thd, backup_storage_uuid, zone_uuid)

    def delete_image(self, image_uuid: str) -> Deferred:
        """
        See L{delete_image_thd}.
        """
        return self._run(delete_image_thd, image_uuid)

    def delete_backup_storage(self, backup_storage_uuid: str) -> Deferred:
        """
        See L{delete_backup_storage_thd}.
        """
        return self._run(delete_backup_storage_thd, backup_storage_uuid)


