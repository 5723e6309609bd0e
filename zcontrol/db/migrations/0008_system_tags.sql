-- zcontrol schema, version 8: tags (ZStack's SystemTagVO and UserTagVO in one table). Portable
-- SQL as version 1. A system tag is `key::value[::value]` text the services read as behaviour
-- hints (`staticIp::<l3Uuid>::<ip>`, `hostname::<name>`); a user tag is the user's own label.
-- A resource's tags go with it (the service that deletes the resource deletes them).
CREATE TABLE tags (
    uuid VARCHAR(64) PRIMARY KEY,
    resource_uuid VARCHAR(64) NOT NULL,
    resource_type VARCHAR(64) NOT NULL,
    tag VARCHAR(2048) NOT NULL,
    type VARCHAR(16) NOT NULL DEFAULT 'System' CHECK (type IN ('System', 'User')),
    inherent BOOLEAN NOT NULL DEFAULT FALSE,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL
);
CREATE INDEX tags_resource ON tags (resource_uuid);
-- The VMs of one account (queries filtered by owner: the API's tenancy).
CREATE INDEX vm_instances_account ON vm_instances (account_uuid);
CREATE INDEX volumes_account ON volumes (account_uuid);
