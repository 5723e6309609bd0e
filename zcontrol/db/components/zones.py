# -*- test-case-name: tests.test_zone,tests.test_cluster -*-
"""
The store component of zones and clusters (the zone and cluster services).

Creating, reading, updating and changing the state of zones and clusters are the generic
C{insert}/C{get}/C{update} (a state change is an C{update} with C{expected}, a
compare-and-swap). Deleting is not: what still depends on the zone or cluster must be
checked and the row deleted in one transaction, so L{delete_zone_thd} and
L{delete_cluster_thd} do both, under the row's lock (L{Dialect.lock_row}).

Note [dependents]: the check names what holds the row (by resource kind, with uuids) so
that the service can refuse with an error a user can act on. A dependent committed by
another node between the check and the C{DELETE} (possible on PostgreSQL, whose row lock
here is advisory and not taken by other writers) makes the C{DELETE} fail on its foreign
key with C{DB.1001}; the services then ask L{ZonesComponent.zone_dependents} /
L{ZonesComponent.cluster_dependents} again and refuse the same way, so a raw C{DB.1001}
never reaches a user.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from zcontrol.db.components.base import Db, StoreComponent, _uuid

__all__ = [
    "DEPENDENTS_SHOWN",
    "ZonesComponent",
    "cluster_dependents_thd",
    "delete_cluster_thd",
    "delete_zone_thd",
    "zone_dependents_thd",
]

#: At most this many uuids of one kind of dependent are named (the count says how many).
DEPENDENTS_SHOWN = 20

# (kind, SQL selecting the dependents' uuids given the zone's uuid). Backup storages are
# named, not their zone refs: detaching them is the backup storage service's business.
_ZONE_DEPENDENTS = (
    ("cluster", "SELECT uuid FROM clusters WHERE zone_uuid = ?"),
    ("host", "SELECT uuid FROM hosts WHERE zone_uuid = ?"),
    ("l2Network", "SELECT uuid FROM l2_networks WHERE zone_uuid = ?"),
    ("l3Network", "SELECT uuid FROM l3_networks WHERE zone_uuid = ?"),
    ("primaryStorage", "SELECT uuid FROM primary_storages WHERE zone_uuid = ?"),
    ("backupStorage",
     "SELECT backup_storage_uuid FROM backup_storage_zone_refs WHERE zone_uuid = ?"),
    ("vmInstance", "SELECT uuid FROM vm_instances WHERE zone_uuid = ?"),
)

# The refs to primary storages and L2 networks are not dependents: they cascade.
_CLUSTER_DEPENDENTS = (
    ("host", "SELECT uuid FROM hosts WHERE cluster_uuid = ?"),
    ("vmInstance", "SELECT uuid FROM vm_instances WHERE cluster_uuid = ?"),
)


def _dependents(db: Db, checks: tuple[tuple[str, str], ...], uuid: str
                ) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for kind, select in checks:
        count = db.one(f"SELECT COUNT(*) FROM ({select}) d", (uuid,))[0]
        if count:
            rows = db.all(f"{select} ORDER BY 1 LIMIT {DEPENDENTS_SHOWN}", (uuid,))
            found[kind] = {"count": int(count), "uuids": [r[0] for r in rows]}
    return found


def zone_dependents_thd(db: Db, zone_uuid: str) -> dict[str, dict[str, Any]]:
    """
    What still depends on a zone: C{{kind: {"count": n, "uuids": [...]}}} for each kind
    with dependents (C{cluster}, C{host}, C{l2Network}, C{l3Network}, C{primaryStorage},
    C{backupStorage} (attached), C{vmInstance}); empty when none.
    """
    return _dependents(db, _ZONE_DEPENDENTS, _uuid("zone_uuid", zone_uuid))


def cluster_dependents_thd(db: Db, cluster_uuid: str) -> dict[str, dict[str, Any]]:
    """
    What still depends on a cluster (C{host}, C{vmInstance}), as L{zone_dependents_thd}.
    """
    return _dependents(db, _CLUSTER_DEPENDENTS, _uuid("cluster_uuid", cluster_uuid))


def _delete_checked(db: Db, table: str, checks: tuple[tuple[str, str], ...], uuid: str
                    ) -> tuple[bool, dict[str, dict[str, Any]]]:
    with db.transaction():
        db.dialect.lock_row(db, table, uuid)
        found = _dependents(db, checks, uuid)
        if found:
            return False, found
        return db.run(f"DELETE FROM {table} WHERE uuid = ?", (uuid,)) > 0, {}


def delete_zone_thd(db: Db, zone_uuid: str) -> tuple[bool, dict[str, dict[str, Any]]]:
    """
    Delete a zone unless something depends on it, in one transaction.

    @return: C{(deleted, dependents)}: C{(True, {})} deleted, C{(False, {})} there was no
        such zone, C{(False, dependents)} refused (see L{zone_dependents_thd}).
    @raise OperationError: C{DB.1001} when a dependent appeared after the check (Note
        [dependents]).
    """
    return _delete_checked(db, "zones", _ZONE_DEPENDENTS, _uuid("zone_uuid", zone_uuid))


def delete_cluster_thd(db: Db, cluster_uuid: str) -> tuple[bool, dict[str, dict[str, Any]]]:
    """
    Delete a cluster unless hosts or VMs are in it, in one transaction; its primary storage
    and L2 network refs go with it (C{ON DELETE CASCADE}). Returns as L{delete_zone_thd}.
    """
    return _delete_checked(db, "clusters", _CLUSTER_DEPENDENTS,
                           _uuid("cluster_uuid", cluster_uuid))


class ZonesComponent(StoreComponent):
    """
    Store operations of zones and clusters (the zone and cluster services), run on the
    store's one pool.
    """

    def zone_dependents(self, zone_uuid: str) -> Deferred:
        """
        See L{zone_dependents_thd}.
        """
        return self._run(zone_dependents_thd, zone_uuid)

    def cluster_dependents(self, cluster_uuid: str) -> Deferred:
        """
        See L{cluster_dependents_thd}.
        """
        return self._run(cluster_dependents_thd, cluster_uuid)

    def delete_zone(self, zone_uuid: str) -> Deferred:
        """
        See L{delete_zone_thd}.
        """
        return self._run(delete_zone_thd, zone_uuid)

    def delete_cluster(self, cluster_uuid: str) -> Deferred:
        """
        See L{delete_cluster_thd}.
        """
        return self._run(delete_cluster_thd, cluster_uuid)
