-- zcontrol schema, version 4: the cloud's inventory services (zone, cluster, host, primary
-- and backup storage, image, offerings, L2/L3 networks) with the shapes of ZStack's VOs.
-- Portable SQL as version 1 (partial unique indexes exist on both backends).

-- Primary storage: the physical figures ZStack's PrimaryStorageInventory shows.
ALTER TABLE primary_storages ADD COLUMN total_physical_capacity BIGINT NOT NULL DEFAULT 0;
ALTER TABLE primary_storages ADD COLUMN available_physical_capacity BIGINT NOT NULL DEFAULT 0;

-- LocalStorage: each host's own disk (ZStack LocalStorageHostRefVO). The storage's totals are
-- the sums over its hosts; a reservation on a local storage takes from both.
CREATE TABLE local_storage_host_refs (
    uuid VARCHAR(64) PRIMARY KEY,
    primary_storage_uuid VARCHAR(64) NOT NULL REFERENCES primary_storages (uuid) ON DELETE CASCADE,
    host_uuid VARCHAR(64) NOT NULL REFERENCES hosts (uuid) ON DELETE CASCADE,
    total_capacity BIGINT NOT NULL DEFAULT 0 CHECK (total_capacity >= 0),
    available_capacity BIGINT NOT NULL DEFAULT 0,
    total_physical_capacity BIGINT NOT NULL DEFAULT 0 CHECK (total_physical_capacity >= 0),
    available_physical_capacity BIGINT NOT NULL DEFAULT 0,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL,
    UNIQUE (primary_storage_uuid, host_uuid),
    CONSTRAINT local_storage_host_refs_bounds
        CHECK (available_capacity >= 0 AND available_capacity <= total_capacity)
);
CREATE INDEX local_storage_host_refs_host ON local_storage_host_refs (host_uuid);

-- A LocalStorage reservation names the host it is on (NULL for shared storage). No cascade:
-- a host cannot be deleted while something holds its local capacity.
ALTER TABLE primary_storage_capacity_holders ADD COLUMN host_uuid VARCHAR(64) REFERENCES hosts (uuid);

-- Shared (NFS) storage mounted on each host of its attached clusters (ZStack
-- PrimaryStorageHostRefVO).
CREATE TABLE primary_storage_host_refs (
    uuid VARCHAR(64) PRIMARY KEY,
    primary_storage_uuid VARCHAR(64) NOT NULL REFERENCES primary_storages (uuid) ON DELETE CASCADE,
    host_uuid VARCHAR(64) NOT NULL REFERENCES hosts (uuid) ON DELETE CASCADE,
    status VARCHAR(32) NOT NULL DEFAULT 'Connected'
        CHECK (status IN ('Connected', 'Disconnected')),
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL,
    UNIQUE (primary_storage_uuid, host_uuid)
);
CREATE INDEX primary_storage_host_refs_host ON primary_storage_host_refs (host_uuid);

-- Image caches on primary storage (ZStack ImageCacheVO): one per (storage, image) for shared
-- storage, one per (storage, host, image) for LocalStorage. Capacity is held by the cache
-- entry (holder ('ImageCacheVO', uuid)).
CREATE TABLE image_caches (
    uuid VARCHAR(64) PRIMARY KEY,
    primary_storage_uuid VARCHAR(64) NOT NULL REFERENCES primary_storages (uuid),
    host_uuid VARCHAR(64) REFERENCES hosts (uuid),
    image_uuid VARCHAR(64) NOT NULL,
    install_url VARCHAR(2048),
    media_type VARCHAR(32),
    size BIGINT NOT NULL DEFAULT 0 CHECK (size >= 0),
    md5sum VARCHAR(255),
    status VARCHAR(32) NOT NULL DEFAULT 'Downloading' CHECK (status IN ('Downloading', 'Ready')),
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL
);
CREATE UNIQUE INDEX image_caches_on_host ON image_caches (primary_storage_uuid, host_uuid, image_uuid)
    WHERE host_uuid IS NOT NULL;
CREATE UNIQUE INDEX image_caches_shared ON image_caches (primary_storage_uuid, image_uuid)
    WHERE host_uuid IS NULL;
CREATE INDEX image_caches_image ON image_caches (image_uuid);

-- Sftp backup storage: where its agent is (ZStack SftpBackupStorageInventory; the password is
-- accepted by the API and never stored).
ALTER TABLE backup_storages ADD COLUMN hostname VARCHAR(2048);
ALTER TABLE backup_storages ADD COLUMN username VARCHAR(255);
ALTER TABLE backup_storages ADD COLUMN ssh_port INTEGER;

-- An image's copy on a backup storage: its size there and the agent's reason when it failed.
ALTER TABLE image_backup_storage_refs ADD COLUMN size BIGINT NOT NULL DEFAULT 0;
ALTER TABLE image_backup_storage_refs ADD COLUMN last_error TEXT;

-- Offerings (ZStack InstanceOfferingVO.sortKey, DiskOfferingVO).
ALTER TABLE instance_offerings ADD COLUMN sort_key INTEGER NOT NULL DEFAULT 0;

CREATE TABLE disk_offerings (
    uuid VARCHAR(64) PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    description TEXT,
    disk_size BIGINT NOT NULL CHECK (disk_size > 0),
    sort_key INTEGER NOT NULL DEFAULT 0,
    allocator_strategy VARCHAR(64),
    type VARCHAR(64) NOT NULL DEFAULT 'DefaultDiskOfferingType',
    state VARCHAR(32) NOT NULL DEFAULT 'Enabled' CHECK (state IN ('Enabled', 'Disabled')),
    account_uuid VARCHAR(64) REFERENCES accounts (uuid) ON DELETE SET NULL,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL
);

-- L2: two VLAN networks on one physical interface of a zone cannot share a vlan id.
CREATE UNIQUE INDEX l2_networks_vlan ON l2_networks (zone_uuid, physical_interface, vlan)
    WHERE vlan IS NOT NULL;

-- L3: IP version, DNS servers (ordered) and the network services attached to it.
ALTER TABLE l3_networks ADD COLUMN ip_version INTEGER NOT NULL DEFAULT 4;
ALTER TABLE ip_ranges ADD COLUMN network_cidr VARCHAR(64);
ALTER TABLE ip_ranges ADD COLUMN prefix_len INTEGER;
ALTER TABLE ip_ranges ADD COLUMN ip_version INTEGER NOT NULL DEFAULT 4;

CREATE TABLE l3_network_dns (
    uuid VARCHAR(64) PRIMARY KEY,
    l3_network_uuid VARCHAR(64) NOT NULL REFERENCES l3_networks (uuid) ON DELETE CASCADE,
    dns VARCHAR(64) NOT NULL,
    position INTEGER NOT NULL DEFAULT 0,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL,
    UNIQUE (l3_network_uuid, dns)
);

CREATE TABLE network_service_l3_refs (
    uuid VARCHAR(64) PRIMARY KEY,
    l3_network_uuid VARCHAR(64) NOT NULL REFERENCES l3_networks (uuid) ON DELETE CASCADE,
    network_service_provider_uuid VARCHAR(64) NOT NULL,
    network_service_type VARCHAR(64) NOT NULL,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL,
    UNIQUE (l3_network_uuid, network_service_type)
);
