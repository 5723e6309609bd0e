-- zcontrol schema, version 6: which volumes were created from which image cache (ZStack's
-- ImageCacheVolumeRefVO). Portable SQL as version 1. A cache is dropped (its image deleted)
-- only while no volume references it; the refs go with their cache.

CREATE TABLE image_cache_volume_refs (
    uuid VARCHAR(64) PRIMARY KEY,
    image_cache_uuid VARCHAR(64) NOT NULL REFERENCES image_caches (uuid) ON DELETE CASCADE,
    volume_uuid VARCHAR(64) NOT NULL,
    primary_storage_uuid VARCHAR(64) NOT NULL,
    create_date DOUBLE PRECISION NOT NULL,
    last_op_date DOUBLE PRECISION NOT NULL,
    UNIQUE (image_cache_uuid, volume_uuid)
);
CREATE INDEX image_cache_volume_refs_volume ON image_cache_volume_refs (volume_uuid);
