-- zcontrol schema, version 1: every resource of the design.
-- Portable SQL: it runs unchanged on PostgreSQL 15 and SQLite >= 3.35 (statements are split on
-- ";" at the end of a line, so no literal may contain one). Timestamps are epoch seconds
-- (DOUBLE PRECISION) taken from the management node's clock; uuids are text.

CREATE TABLE zones (
    uuid VARCHAR(64) PRIMARY KEY,
    name VARCHAR(255) NOT NULL UNIQUE,
    description TEXT,
    type VARCHAR(64) NOT NULL DEFAULT 'zstack',
    state VARCHAR(32) NOT NULL DEFAULT 'Enabled' CHECK (state IN ('Enabled', 'Disabled')),
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL
);

CREATE TABLE clusters (
    uuid VARCHAR(64) PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    description TEXT,
    zone_uuid VARCHAR(64) NOT NULL REFERENCES zones (uuid),
    hypervisor_type VARCHAR(64) NOT NULL,
    type VARCHAR(64) NOT NULL DEFAULT 'zstack',
    state VARCHAR(32) NOT NULL DEFAULT 'Enabled' CHECK (state IN ('Enabled', 'Disabled')),
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL
);
CREATE INDEX clusters_zone ON clusters (zone_uuid);

CREATE TABLE hosts (
    uuid VARCHAR(64) PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    description TEXT,
    zone_uuid VARCHAR(64) NOT NULL REFERENCES zones (uuid),
    cluster_uuid VARCHAR(64) NOT NULL REFERENCES clusters (uuid),
    management_ip VARCHAR(255) NOT NULL UNIQUE,
    hypervisor_type VARCHAR(64) NOT NULL,
    state VARCHAR(32) NOT NULL DEFAULT 'Enabled'
        CHECK (state IN ('Enabled', 'Disabled', 'PreMaintenance', 'Maintenance')),
    status VARCHAR(32) NOT NULL DEFAULT 'Connecting'
        CHECK (status IN ('Connecting', 'Connected', 'Disconnected')),
    cpu_num INTEGER NOT NULL DEFAULT 0 CHECK (cpu_num >= 0),
    total_cpu_capacity BIGINT NOT NULL DEFAULT 0 CHECK (total_cpu_capacity >= 0),
    available_cpu_capacity BIGINT NOT NULL DEFAULT 0,
    total_memory_capacity BIGINT NOT NULL DEFAULT 0 CHECK (total_memory_capacity >= 0),
    available_memory_capacity BIGINT NOT NULL DEFAULT 0,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL,
    CONSTRAINT hosts_cpu_bounds
        CHECK (available_cpu_capacity >= 0 AND available_cpu_capacity <= total_cpu_capacity),
    CONSTRAINT hosts_memory_bounds
        CHECK (available_memory_capacity >= 0
               AND available_memory_capacity <= total_memory_capacity)
);
CREATE INDEX hosts_cluster ON hosts (cluster_uuid);

CREATE TABLE primary_storages (
    uuid VARCHAR(64) PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    description TEXT,
    zone_uuid VARCHAR(64) NOT NULL REFERENCES zones (uuid),
    url VARCHAR(2048) NOT NULL,
    type VARCHAR(64) NOT NULL,
    mount_path VARCHAR(2048),
    state VARCHAR(32) NOT NULL DEFAULT 'Enabled'
        CHECK (state IN ('Enabled', 'Disabled', 'Maintenance', 'Deleting')),
    status VARCHAR(32) NOT NULL DEFAULT 'Connecting'
        CHECK (status IN ('Connecting', 'Connected', 'Disconnected')),
    total_capacity BIGINT NOT NULL DEFAULT 0 CHECK (total_capacity >= 0),
    available_capacity BIGINT NOT NULL DEFAULT 0,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL,
    CONSTRAINT primary_storages_bounds
        CHECK (available_capacity >= 0 AND available_capacity <= total_capacity)
);

CREATE TABLE primary_storage_cluster_refs (
    uuid VARCHAR(64) PRIMARY KEY,
    primary_storage_uuid VARCHAR(64) NOT NULL REFERENCES primary_storages (uuid) ON DELETE CASCADE,
    cluster_uuid VARCHAR(64) NOT NULL REFERENCES clusters (uuid) ON DELETE CASCADE,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL,
    UNIQUE (primary_storage_uuid, cluster_uuid)
);

CREATE TABLE backup_storages (
    uuid VARCHAR(64) PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    description TEXT,
    url VARCHAR(2048) NOT NULL,
    type VARCHAR(64) NOT NULL,
    state VARCHAR(32) NOT NULL DEFAULT 'Enabled'
        CHECK (state IN ('Enabled', 'Disabled', 'Maintenance', 'Deleting')),
    status VARCHAR(32) NOT NULL DEFAULT 'Connecting'
        CHECK (status IN ('Connecting', 'Connected', 'Disconnected')),
    total_capacity BIGINT NOT NULL DEFAULT 0 CHECK (total_capacity >= 0),
    available_capacity BIGINT NOT NULL DEFAULT 0,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL,
    CONSTRAINT backup_storages_bounds
        CHECK (available_capacity >= 0 AND available_capacity <= total_capacity)
);

CREATE TABLE backup_storage_zone_refs (
    uuid VARCHAR(64) PRIMARY KEY,
    backup_storage_uuid VARCHAR(64) NOT NULL REFERENCES backup_storages (uuid) ON DELETE CASCADE,
    zone_uuid VARCHAR(64) NOT NULL REFERENCES zones (uuid) ON DELETE CASCADE,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL,
    UNIQUE (backup_storage_uuid, zone_uuid)
);

CREATE TABLE accounts (
    uuid VARCHAR(64) PRIMARY KEY,
    name VARCHAR(255) NOT NULL UNIQUE,
    description TEXT,
    type VARCHAR(32) NOT NULL DEFAULT 'Normal' CHECK (type IN ('SystemAdmin', 'Normal')),
    password VARCHAR(255) NOT NULL,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL
);

CREATE TABLE users (
    uuid VARCHAR(64) PRIMARY KEY,
    account_uuid VARCHAR(64) NOT NULL REFERENCES accounts (uuid) ON DELETE CASCADE,
    name VARCHAR(255) NOT NULL,
    description TEXT,
    password VARCHAR(255) NOT NULL,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL,
    UNIQUE (account_uuid, name)
);

CREATE TABLE sessions (
    uuid VARCHAR(64) PRIMARY KEY,
    account_uuid VARCHAR(64) NOT NULL REFERENCES accounts (uuid) ON DELETE CASCADE,
    user_uuid VARCHAR(64) REFERENCES users (uuid) ON DELETE CASCADE,
    expired_date DOUBLE PRECISION NOT NULL,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL
);
CREATE INDEX sessions_account ON sessions (account_uuid);

CREATE TABLE images (
    uuid VARCHAR(64) PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    description TEXT,
    url VARCHAR(2048),
    state VARCHAR(32) NOT NULL DEFAULT 'Enabled' CHECK (state IN ('Enabled', 'Disabled')),
    status VARCHAR(32) NOT NULL DEFAULT 'Creating'
        CHECK (status IN ('Creating', 'Downloading', 'Ready', 'Error', 'Deleted', 'Migrating')),
    media_type VARCHAR(32) NOT NULL DEFAULT 'RootVolumeTemplate'
        CHECK (media_type IN ('RootVolumeTemplate', 'ISO', 'DataVolumeTemplate')),
    format VARCHAR(32) NOT NULL DEFAULT 'qcow2',
    platform VARCHAR(32) NOT NULL DEFAULT 'Linux',
    guest_os_type VARCHAR(255),
    size BIGINT NOT NULL DEFAULT 0 CHECK (size >= 0),
    actual_size BIGINT NOT NULL DEFAULT 0 CHECK (actual_size >= 0),
    md5sum VARCHAR(255),
    system BOOLEAN NOT NULL DEFAULT FALSE,
    account_uuid VARCHAR(64) REFERENCES accounts (uuid) ON DELETE SET NULL,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL
);

CREATE TABLE image_backup_storage_refs (
    uuid VARCHAR(64) PRIMARY KEY,
    image_uuid VARCHAR(64) NOT NULL REFERENCES images (uuid) ON DELETE CASCADE,
    backup_storage_uuid VARCHAR(64) NOT NULL REFERENCES backup_storages (uuid) ON DELETE CASCADE,
    install_path VARCHAR(2048),
    status VARCHAR(32) NOT NULL DEFAULT 'Downloading'
        CHECK (status IN ('Downloading', 'Ready', 'Error', 'Deleted')),
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL,
    UNIQUE (image_uuid, backup_storage_uuid)
);

CREATE TABLE instance_offerings (
    uuid VARCHAR(64) PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    description TEXT,
    cpu_num INTEGER NOT NULL CHECK (cpu_num > 0),
    cpu_speed BIGINT NOT NULL DEFAULT 0 CHECK (cpu_speed >= 0),
    memory_size BIGINT NOT NULL CHECK (memory_size > 0),
    allocator_strategy VARCHAR(64),
    type VARCHAR(64) NOT NULL DEFAULT 'UserVm',
    state VARCHAR(32) NOT NULL DEFAULT 'Enabled' CHECK (state IN ('Enabled', 'Disabled')),
    account_uuid VARCHAR(64) REFERENCES accounts (uuid) ON DELETE SET NULL,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL
);

CREATE TABLE l2_networks (
    uuid VARCHAR(64) PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    description TEXT,
    zone_uuid VARCHAR(64) NOT NULL REFERENCES zones (uuid),
    physical_interface VARCHAR(255) NOT NULL,
    type VARCHAR(64) NOT NULL DEFAULT 'L2NoVlanNetwork'
        CHECK (type IN ('L2NoVlanNetwork', 'L2VlanNetwork')),
    vlan INTEGER CHECK (vlan IS NULL OR (vlan >= 0 AND vlan <= 4094)),
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL
);

CREATE TABLE l2_network_cluster_refs (
    uuid VARCHAR(64) PRIMARY KEY,
    l2_network_uuid VARCHAR(64) NOT NULL REFERENCES l2_networks (uuid) ON DELETE CASCADE,
    cluster_uuid VARCHAR(64) NOT NULL REFERENCES clusters (uuid) ON DELETE CASCADE,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL,
    UNIQUE (l2_network_uuid, cluster_uuid)
);

CREATE TABLE l3_networks (
    uuid VARCHAR(64) PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    description TEXT,
    l2_network_uuid VARCHAR(64) NOT NULL REFERENCES l2_networks (uuid),
    zone_uuid VARCHAR(64) NOT NULL REFERENCES zones (uuid),
    type VARCHAR(64) NOT NULL DEFAULT 'L3BasicNetwork',
    category VARCHAR(32) NOT NULL DEFAULT 'Private',
    state VARCHAR(32) NOT NULL DEFAULT 'Enabled' CHECK (state IN ('Enabled', 'Disabled')),
    system BOOLEAN NOT NULL DEFAULT FALSE,
    dns_domain VARCHAR(255),
    account_uuid VARCHAR(64) REFERENCES accounts (uuid) ON DELETE SET NULL,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL
);

CREATE TABLE ip_ranges (
    uuid VARCHAR(64) PRIMARY KEY,
    name VARCHAR(255),
    description TEXT,
    l3_network_uuid VARCHAR(64) NOT NULL REFERENCES l3_networks (uuid) ON DELETE CASCADE,
    start_ip VARCHAR(64) NOT NULL,
    end_ip VARCHAR(64) NOT NULL,
    netmask VARCHAR(64) NOT NULL,
    gateway VARCHAR(64) NOT NULL,
    start_ip_in_long BIGINT NOT NULL CHECK (start_ip_in_long >= 0),
    end_ip_in_long BIGINT NOT NULL,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL,
    CONSTRAINT ip_ranges_order CHECK (start_ip_in_long <= end_ip_in_long)
);
CREATE INDEX ip_ranges_l3 ON ip_ranges (l3_network_uuid);

CREATE TABLE used_ips (
    uuid VARCHAR(64) PRIMARY KEY,
    ip_range_uuid VARCHAR(64) NOT NULL REFERENCES ip_ranges (uuid),
    l3_network_uuid VARCHAR(64) NOT NULL REFERENCES l3_networks (uuid),
    ip VARCHAR(64) NOT NULL,
    ip_in_long BIGINT NOT NULL,
    netmask VARCHAR(64) NOT NULL,
    gateway VARCHAR(64) NOT NULL,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL,
    CONSTRAINT used_ips_once_per_l3 UNIQUE (l3_network_uuid, ip_in_long)
);

CREATE TABLE vm_instances (
    uuid VARCHAR(64) PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    description TEXT,
    zone_uuid VARCHAR(64) REFERENCES zones (uuid),
    cluster_uuid VARCHAR(64) REFERENCES clusters (uuid),
    host_uuid VARCHAR(64) REFERENCES hosts (uuid),
    last_host_uuid VARCHAR(64),
    image_uuid VARCHAR(64),
    instance_offering_uuid VARCHAR(64),
    root_volume_uuid VARCHAR(64),
    default_l3_network_uuid VARCHAR(64),
    type VARCHAR(64) NOT NULL DEFAULT 'UserVm',
    hypervisor_type VARCHAR(64),
    platform VARCHAR(32),
    allocator_strategy VARCHAR(64),
    cpu_num INTEGER NOT NULL CHECK (cpu_num > 0),
    cpu_speed BIGINT NOT NULL DEFAULT 0 CHECK (cpu_speed >= 0),
    memory_size BIGINT NOT NULL CHECK (memory_size > 0),
    state VARCHAR(32) NOT NULL DEFAULT 'Created'
        CHECK (state IN ('Created', 'Starting', 'Running', 'Stopping', 'Stopped', 'Rebooting',
                         'Destroying', 'Destroyed', 'Migrating', 'Expunging', 'Pausing',
                         'Paused', 'Resuming', 'VolumeMigrating', 'VolumeRecovering', 'Error',
                         'NoState', 'Unknown', 'Crashed')),
    account_uuid VARCHAR(64) REFERENCES accounts (uuid) ON DELETE SET NULL,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL
);
CREATE INDEX vm_instances_host ON vm_instances (host_uuid);
CREATE INDEX vm_instances_state ON vm_instances (state);

CREATE TABLE volumes (
    uuid VARCHAR(64) PRIMARY KEY,
    name VARCHAR(255) NOT NULL,
    description TEXT,
    primary_storage_uuid VARCHAR(64) REFERENCES primary_storages (uuid),
    vm_instance_uuid VARCHAR(64) REFERENCES vm_instances (uuid),
    root_image_uuid VARCHAR(64),
    disk_offering_uuid VARCHAR(64),
    install_path VARCHAR(2048),
    type VARCHAR(32) NOT NULL CHECK (type IN ('Root', 'Data')),
    format VARCHAR(32) NOT NULL DEFAULT 'qcow2',
    size BIGINT NOT NULL DEFAULT 0 CHECK (size >= 0),
    actual_size BIGINT NOT NULL DEFAULT 0 CHECK (actual_size >= 0),
    device_id INTEGER,
    state VARCHAR(32) NOT NULL DEFAULT 'Enabled' CHECK (state IN ('Enabled', 'Disabled')),
    status VARCHAR(32) NOT NULL DEFAULT 'NotInstantiated'
        CHECK (status IN ('Creating', 'Ready', 'NotInstantiated', 'Deleted', 'Migrating')),
    account_uuid VARCHAR(64) REFERENCES accounts (uuid) ON DELETE SET NULL,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL
);
CREATE INDEX volumes_vm ON volumes (vm_instance_uuid);

CREATE TABLE vm_nics (
    uuid VARCHAR(64) PRIMARY KEY,
    vm_instance_uuid VARCHAR(64) NOT NULL REFERENCES vm_instances (uuid) ON DELETE CASCADE,
    l3_network_uuid VARCHAR(64) NOT NULL REFERENCES l3_networks (uuid),
    used_ip_uuid VARCHAR(64) REFERENCES used_ips (uuid),
    ip VARCHAR(64),
    mac VARCHAR(32) NOT NULL UNIQUE,
    netmask VARCHAR(64),
    gateway VARCHAR(64),
    device_id INTEGER NOT NULL CHECK (device_id >= 0),
    internal_name VARCHAR(255),
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL,
    UNIQUE (vm_instance_uuid, device_id)
);

CREATE TABLE management_nodes (
    uuid VARCHAR(64) PRIMARY KEY,
    hostname VARCHAR(255) NOT NULL,
    port INTEGER,
    state VARCHAR(32) NOT NULL DEFAULT 'JOINING' CHECK (state IN ('JOINING', 'RUNNING')),
    heartbeat DOUBLE PRECISION NOT NULL,
    join_date DOUBLE PRECISION NOT NULL
);

CREATE TABLE jobs (
    uuid VARCHAR(64) PRIMARY KEY,
    api_name VARCHAR(255) NOT NULL,
    api_message TEXT NOT NULL,
    management_node_uuid VARCHAR(64) NOT NULL,
    resource_uuid VARCHAR(64),
    account_uuid VARCHAR(64),
    state VARCHAR(32) NOT NULL DEFAULT 'Running'
        CHECK (state IN ('Running', 'Succeeded', 'Failed')),
    result TEXT,
    error TEXT,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL,
    finish_date DOUBLE PRECISION
);
CREATE INDEX jobs_owner_state ON jobs (management_node_uuid, state);
