-- zcontrol schema, version 2: capacity and IP addresses are held by named holders.
-- A holder is (holder_type, holder_uuid), e.g. ('VmInstanceVO', <vm uuid>). It holds at most
-- one reservation per resource (the primary keys below), so a retried reservation (its
-- acknowledgement lost with the connection) finds the first one instead of taking twice,
-- and the available figures can be recomputed from the holders at any time (the audit).
-- A host or primary storage cannot be deleted while something holds its capacity.

CREATE TABLE host_capacity_holders (
    host_uuid VARCHAR(64) NOT NULL REFERENCES hosts (uuid),
    holder_type VARCHAR(64) NOT NULL,
    holder_uuid VARCHAR(64) NOT NULL,
    cpu BIGINT NOT NULL CHECK (cpu >= 0),
    memory BIGINT NOT NULL CHECK (memory >= 0),
    create_date DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (host_uuid, holder_type, holder_uuid)
);

CREATE TABLE primary_storage_capacity_holders (
    primary_storage_uuid VARCHAR(64) NOT NULL REFERENCES primary_storages (uuid),
    holder_type VARCHAR(64) NOT NULL,
    holder_uuid VARCHAR(64) NOT NULL,
    size BIGINT NOT NULL CHECK (size >= 0),
    create_date DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (primary_storage_uuid, holder_type, holder_uuid)
);

-- One address per holder and L3 network (rows of version 1 have no holder: NULLs are
-- distinct in a unique index on both backends).
ALTER TABLE used_ips ADD COLUMN holder_type VARCHAR(64);
ALTER TABLE used_ips ADD COLUMN holder_uuid VARCHAR(64);
CREATE UNIQUE INDEX used_ips_holder ON used_ips (l3_network_uuid, holder_type, holder_uuid);
