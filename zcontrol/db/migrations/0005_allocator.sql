-- zcontrol schema, version 5: indexes of the host allocator (zcontrol.scheduler; Note
-- [allocation pre-filter] in zcontrol.db.components.scheduler). Portable SQL as version 1.

-- The primary storages and L2 networks attached to a host's cluster (the pre-filter's
-- EXISTS and the snapshot's reads go by cluster).
CREATE INDEX primary_storage_cluster_refs_cluster ON primary_storage_cluster_refs (cluster_uuid);
CREATE INDEX l2_network_cluster_refs_cluster ON l2_network_cluster_refs (cluster_uuid);

-- The least-used strategy's order: the first page of fitting hosts is an index walk.
CREATE INDEX hosts_least_used ON hosts (available_memory_capacity DESC, available_cpu_capacity DESC, uuid);

-- A VM's host reservations (an AllocateHostMsg retried after a lost reply finds them).
CREATE INDEX host_capacity_holders_holder ON host_capacity_holders (holder_type, holder_uuid);
