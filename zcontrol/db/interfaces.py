# -*- test-case-name: tests.test_db_contract -*-
"""
The store: one interface, two backends (L{zcontrol.db.sqlite}, L{zcontrol.db.postgres}), held
to one contract suite (C{tests/test_db_contract.py}).

Rows are plain dicts keyed by the API field names of L{zcontrol.db.query.RESOURCES}
(C{"uuid"}, C{"clusterUuid"}, C{"availableCpuCapacity"}, ...). Every method returns a
L{Deferred}; every failure is an L{zcontrol.core.errors.OperationError} whose C{.error} is an
L{ErrorCode}. Codes common to every method:

  - C{SYS.1007} (invalid argument): unknown resource or field (the whitelist), a value of
    the wrong type, too long for its column, out of its integer range, holding NUL, control
    characters or lone surrogates, a malformed query; C{opaque["field"]} names the field
    or argument. Every backend refuses exactly the same inputs;
  - C{SYS.1016} (I/O error): the database connection failed or was lost while the operation
    was in flight (the pool reconnects by itself: a later call can succeed). The outcome
    is then unknown: the change may have been committed before the acknowledgement was
    lost. Allocations are idempotent per holder (a retry is safe, see
    C{reserve_host_capacity}); a compare-and-swap that is retried may answer C{SYS.1005}
    with the new state it had itself set;
  - C{SYS.1010} (not ready): the store is not started, or is stopping;
  - C{DB.1000} a uniqueness constraint was violated, C{DB.1001} a foreign key was violated (a
    referenced row is missing, or a row is still referenced), C{DB.1002} a check or not-null
    constraint was violated (e.g. capacity above its total).

Atomicity: each mutating method is one SQL statement, or one transaction that two concurrent
callers cannot both win, on both backends.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

from zcontrol.core.errors import register_codes

__all__ = ["DB", "IStore"]


class DB:
    """
    The store's domain error codes (C{DB.<n>}).
    """

    _codes = register_codes(
        "DB",
        {
            1000: "A resource with the same unique key already exists",
            1001: "A referenced resource does not exist, or the resource is still referenced",
            1002: "A value violates a database constraint",
            1003: "Not enough CPU or memory left on the host",
            1004: "Not enough capacity left on the primary storage",
            1005: "No free IP address left in the L3 network",
            1006: "The database schema is newer than this management node knows",
            1007: "Too many concurrent callers competed for the same rows; try again",
            1008: "The host takes no new VM (its state or status, or its cluster's or zone's)",
        },
    )
    DUPLICATE = _codes[1000]
    REFERENCE = _codes[1001]
    CONSTRAINT = _codes[1002]
    HOST_CAPACITY = _codes[1003]
    STORAGE_CAPACITY = _codes[1004]
    NO_FREE_IP = _codes[1005]
    SCHEMA_TOO_NEW = _codes[1006]
    CONTENTION = _codes[1007]
    HOST_NOT_ALLOCATABLE = _codes[1008]


class IStore(Interface):
    """
    Persistence for the management node: resources, atomic allocation, jobs and management
    node heartbeats.
    """

    backend = Attribute("C{'sqlite'}, C{'postgresql'} or C{'memory'}.")
    pool_size = Attribute("The number of OS threads (and connections) the store uses.")
    schema_version = Attribute("The schema version after L{start}, else None.")

    # -- lifecycle -------------------------------------------------------------------------

    def start():
        """
        Connect and apply the pending migrations (idempotent; concurrent starts are
        serialised by the database).

        @return: Deferred firing with the schema version once the store is usable; fails
            with C{DB.1006} when the database holds a newer schema than this code knows (the
            node must not start), C{SYS.1016} when the database is unreachable.
        """

    def stop():
        """
        Refuse new operations (C{SYS.1010}), wait for those in flight, close the pool.

        @return: Deferred firing with None.
        """

    # -- generic CRUD over the whitelist ---------------------------------------------------

    def insert(resource, values):
        """
        Insert one row. C{values} must hold C{uuid}; C{createDate}/C{lastOpDate} default
        to now.

        @param resource: API resource name, e.g. C{"zone"}.
        @param values: API field -> value.
        @return: Deferred firing with the stored row (defaults filled in); fails with
            C{DB.1000}, C{DB.1001}, C{DB.1002} or C{SYS.1007}.
        """

    def get(resource, uuid):
        """
        @return: Deferred firing with the row, or None when there is no such row.
        """

    def update(resource, uuid, changes, expected=None):
        """
        Change fields of one row; with C{expected} (field -> value, field -> list of
        acceptable values, or field -> None for NULL) only if the row still has those values:
        a compare-and-swap done in one conditional C{UPDATE}. C{lastOpDate} is set to now.

        @return: Deferred firing with the updated row; fails with C{SYS.1003} when the row
            does not exist, C{SYS.1005} when C{expected} does not hold (opaque C{expected}
            and C{actual} name both values), or a constraint code.
        """

    def delete(resource, uuid):
        """
        @return: Deferred firing with True if a row was deleted, False if there was none;
            fails with C{DB.1001} while other rows still reference it, C{SYS.1006} for a
            usedIp that has a holder (see L{free_ip}).
        """

    def query(resource, query):
        """
        Run an API query (L{zcontrol.db.query.Query}).

        @return: Deferred firing with a L{zcontrol.db.QueryResult} (C{inventories}: list of
            rows restricted to C{query.fields}; C{total}: the count when C{count} or
            C{reply_with_count} was asked, else None); fails with C{SYS.1007} on anything
            outside the language or the whitelist.
        """

    # -- hosts -----------------------------------------------------------------------------

    def add_host(values):
        """
        Insert a host; C{availableCpuCapacity}/C{availableMemoryCapacity} default to the
        totals.

        @return: Deferred firing with the host row (fails as L{insert}).
        """

    def update_host_status(host_uuid, status, expected=None):
        """
        Set the host's connection status (C{Connecting}/C{Connected}/C{Disconnected}), only
        from C{expected} (a status or a list of them) when given.

        @return: Deferred firing with the host row; C{SYS.1003}, C{SYS.1005} as L{update}.
        """

    def set_host_capacity(host_uuid, total_cpu, total_memory, cpu_num=None):
        """
        Set the host's totals (as its agent reports them) keeping what is reserved:
        C{available = new total - (old total - old available)}, in one statement.

        @return: Deferred firing with the host row; C{DB.1002} if the new totals are below
            what is reserved, C{SYS.1003} for an unknown host.
        """

    def reserve_host_capacity(host_uuid, cpu, memory, holder):
        """
        Atomically take C{cpu} and C{memory} from the host's available capacity, both or
        neither, held by C{holder} (a L{zcontrol.db.Holder} or a C{(type, uuid)} pair, e.g.
        C{("VmInstanceVO", vm_uuid)}). Idempotent: when C{holder} already holds the same
        amounts on this host nothing changes, so a call that failed with C{SYS.1016}
        (outcome unknown: the acknowledgement may have been lost) can simply be retried.

        @return: Deferred firing with the host row after the reservation (as it is now, for
            a retry); fails with C{DB.1003} when either is short (opaque C{availableCpu},
            C{availableMemory}), C{DB.1000} when C{holder} already holds other amounts on
            this host, C{SYS.1003} for an unknown host, C{SYS.1007} for negative amounts or
            a malformed holder.
        """

    def reserve_host_capacity_for_allocation(host_uuid, cpu, memory, holder):
        """
        L{reserve_host_capacity} for the host allocator: the same statement also requires
        the host C{Enabled} and C{Connected} and its cluster and zone C{Enabled} (the
        allocator's C{state} filter), so a host moved out of allocation after the
        allocator's snapshot (maintenance, disable, disconnect) gets nothing new.

        @return: as L{reserve_host_capacity}; also fails with C{DB.1008} (opaque C{state},
            C{status}, C{clusterState}, C{zoneState}) when the host takes no new VM.
        """

    def host_capacity_holders(host_uuid, limit=20):
        """
        Who holds the host's CPU and memory.

        @return: Deferred firing with C{{"total": n, "holders": [{"holderType",
            "holderUuid", "cpu", "memory"}]}} (at most C{limit}, by holder type and uuid).
        """

    def delete_host(host_uuid):
        """
        Delete a host; in the same transaction its C{Destroyed} VMs let go of it
        (C{hostUuid} cleared, C{lastHostUuid} set to it, as ZStack's destroyed VMs).

        @return: Deferred firing with True if the host was deleted, False if there was
            none; fails with C{DB.1001} (nothing changed) while anything else refers to it.
        """

    def release_host_capacity(host_uuid, holder):
        """
        Atomically give back what C{holder} holds on the host. Idempotent: when it holds
        nothing, nothing changes.

        @return: Deferred firing with the host row; C{SYS.1003} for an unknown host.
        """

    # -- primary storage -------------------------------------------------------------------

    def reserve_primary_storage_capacity(primary_storage_uuid, size, holder, host_uuid=None):
        """
        Atomically take C{size} bytes from the primary storage's available capacity, held
        by C{holder}; idempotent as L{reserve_host_capacity}. With C{host_uuid}
        (LocalStorage), from the storage and that host's C{localStorageHostRef} at once.

        @return: Deferred firing with the storage row; C{DB.1004} when short (on the
            storage or on the host), C{DB.1000} when C{holder} holds another size (or host)
            there, C{SYS.1003}, C{SYS.1007}.
        """

    def release_primary_storage_capacity(primary_storage_uuid, holder):
        """
        Atomically give back what C{holder} holds on the primary storage (nothing held: a
        no-op).

        @return: Deferred firing with the storage row; C{SYS.1003}.
        """

    def audit_capacity(repair=False):
        """
        Recompute the available capacity of every host (CPU, memory) and primary storage
        from its holders (C{total - sum(held)}) and report where the recorded figure
        differs; with C{repair}, also set the recomputed figures.

        @return: Deferred firing with a list of dicts, one per drifted figure: C{resource}
            (C{"host"}/C{"primaryStorage"}/C{"localStorageHostRef"}), C{uuid}, C{field} (e.g.
            C{"availableCpuCapacity"}), C{recorded}, C{computed}, C{held}, C{repaired}.
        """

    # -- IP addresses ----------------------------------------------------------------------

    def allocate_ip(l3_network_uuid, holder, ip=None, uuid=None, strategy="random"):
        """
        Take a free IP of the L3 network's ranges for C{holder} (as in
        L{reserve_host_capacity}; e.g. C{("VmNicVO", nic_uuid)}), recorded as a C{usedIp}
        row: exactly C{ip} when given, else a random free one (C{strategy="random"},
        ZStack's default, constant cost) or the lowest free one (C{strategy="first"}). Two
        concurrent callers never get the same address (a unique key on the L3 and the
        address). Idempotent: a holder holds at most one address per L3 network, and asking
        again returns the one it holds.

        @return: Deferred firing with the usedIp row (C{uuid}, C{ip}, C{ipInLong},
            C{ipRangeUuid}, C{l3NetworkUuid}, C{netmask}, C{gateway}, C{holderType},
            C{holderUuid}); fails with C{DB.1005} when no address is free, C{DB.1000} when
            C{ip} is already taken (or the holder holds another address there),
            C{SYS.1007} when C{ip} is not in any range of the network (or the strategy is
            unknown), C{SYS.1003} for an unknown network.
        """

    def free_ip(used_ip_uuid):
        """
        Legacy: give back, by its uuid, an address that has no holder (a usedIp row of
        schema version 1, before holders; idempotent). An address is released by its
        holder with L{release_ip}, the one way for every address L{allocate_ip} gives:
        a held address is refused here (and by C{delete("usedIp", uuid)}), so that a
        retried or late call by uuid can never free an address that has since gone to
        another holder.

        @return: Deferred firing with True when it was allocated, False when not (e.g.
            freed already); C{SYS.1006} when the address has a holder (the details name
            the holder and the call to make: C{release_ip(l3NetworkUuid, holder)});
            C{DB.1001} while a VM NIC still uses it.
        """

    def release_ip(l3_network_uuid, holder):
        """
        Give back the IP C{holder} holds in the L3 network (idempotent): the way to give
        back an address (see L{free_ip} for the holder-less rows of schema version 1).

        @return: Deferred firing with the freed usedIp row, or None when it held none;
            C{DB.1001} while a VM NIC still uses it.
        """

    # -- VM state --------------------------------------------------------------------------

    def change_vm_state(vm_uuid, expected, new, changes=None):
        """
        Compare-and-swap the VM's state: C{expected} (a state or a list of states) -> C{new},
        with optional extra field C{changes} in the same statement (e.g. C{hostUuid}).

        @return: Deferred firing with the VM row; fails with C{SYS.1005} naming the expected
            and actual states (opaque C{expected}, C{actual}) when another caller won,
            C{SYS.1003} for an unknown VM.
        """

    # -- jobs ------------------------------------------------------------------------------

    def create_job(uuid, api_name, api_message, management_node_uuid, resource_uuid=None,
                   account_uuid=None):
        """
        Record a long task as a C{Running} job owned by C{management_node_uuid}.

        @param api_message: the API message, JSON-serialisable.
        @return: Deferred firing with the job row; C{DB.1000} if the uuid exists.
        """

    def finish_job(uuid, result=None, error=None, management_node_uuid=None):
        """
        Move a C{Running} job to C{Succeeded} (with C{result}, JSON-serialisable) or, when
        C{error} (an L{ErrorCode}) is given, to C{Failed}; sets C{finishDate}. With
        C{management_node_uuid}, only while that node owns the job (a compare-and-swap: a
        node whose job another node claimed cannot finish it).

        @return: Deferred firing with the job row; C{SYS.1005} if the job is not running
            (or not owned by C{management_node_uuid}), C{SYS.1003} if unknown.
        """

    def record_job_flow(uuid, management_node_uuid, name, took):
        """
        Journal a completed flow of a job (L{zcontrol.core.journal}): append
        C{{"name": name, "took": took}} to the job's C{flows} (a JSON list, schema version
        7), atomically, while the job is C{Running} and owned by C{management_node_uuid}.
        Idempotent for a retry of the same record.

        @param took: a JSON object: what the flow holds (e.g. C{{"host": uuid, "cpu": 2,
            "memory": 1073741824}}, memory in bytes).
        @return: Deferred firing with the job row; C{SYS.1005} when the job is not
            C{Running} or another node owns it (details name its state and owner),
            C{SYS.1003} if unknown, C{SYS.1007} (field C{flow}) for a bad name or C{took}.
        """

    def begin_job_rollback(uuid, management_node_uuid, error):
        """
        Mark a failed job I{rolling back} (L{zcontrol.core.journal}): store C{error} (an
        L{ErrorCode}) as its C{rollbackError} (schema version 7), a compare-and-swap on the
        job being C{Running} and owned by C{management_node_uuid}; the job stays C{Running}
        until its rollbacks are done. Idempotent: the first error is kept.

        @return: Deferred firing with the job row; C{SYS.1005} when the job is not
            C{Running} or another node owns it, C{SYS.1003} if unknown.
        """

    def record_job_rollback(uuid, management_node_uuid, name):
        """
        Journal that the rollback of flow C{name} of a job completed: append C{name} to its
        C{rolledBack} (a JSON list); compare-and-swap and errors as L{begin_job_rollback}
        (plus C{SYS.1007}, field C{flow}, for a bad name). Idempotent.
        """

    def running_jobs(management_node_uuid):
        """
        @return: Deferred firing with the list of C{Running} job rows owned by that node,
            oldest first (what a restarted node must finish or fail).
        """

    def claim_jobs(from_node_uuid, to_node_uuid):
        """
        Take over every C{Running} job of a (dead) node in one statement, so that two nodes
        never both claim the same job.

        @return: Deferred firing with the claimed job rows (now owned by C{to_node_uuid}).
        """

    # -- management nodes ------------------------------------------------------------------

    def heartbeat(uuid, hostname, port=None, state="RUNNING"):
        """
        Insert or refresh the management node's row with C{heartbeat} = now (one upsert).

        @return: Deferred firing with the node row.
        """

    def live_management_nodes(max_age):
        """
        @return: Deferred firing with the rows whose heartbeat is at most C{max_age} seconds
            old, ordered by uuid (the input of the consistent-hash ring).
        """

    def delete_management_node(uuid):
        """
        @return: Deferred firing with True if a row was deleted.
        """
