-- X.509 device identities and disabled devices (docs/security.md).
--
-- A device authenticates in one way (`auth`):
--   key               its derived key or a SAS token (migration 0009);
--   x509_self_signed  a client certificate whose SHA-256 thumbprint (of its DER) is the
--                     device's primary or secondary one (two, for rotation);
--   x509_ca           a client certificate whose common name is the device id, signed by
--                     its CA (ca_name), one of the verified CAs in x509_cas: a CA vouches
--                     only for the devices registered with it.
-- The broker's auth plugin reads these at CONNECT. A disabled device is refused.
ALTER TABLE devices
    ADD COLUMN enabled              BOOLEAN NOT NULL DEFAULT true,
    ADD COLUMN auth                 TEXT NOT NULL DEFAULT 'key'
        CHECK (auth IN ('key', 'x509_self_signed', 'x509_ca')),
    ADD COLUMN primary_thumbprint   BYTEA CHECK (length(primary_thumbprint) = 32),
    ADD COLUMN secondary_thumbprint BYTEA CHECK (length(secondary_thumbprint) = 32),
    ADD COLUMN ca_name              TEXT,
    -- Counts every change of how the device may log in (key, auth, thumbprints, CA,
    -- enabled):
    -- the plugin disconnects a device connected under an older count.
    ADD COLUMN credentials_version  INTEGER NOT NULL DEFAULT 0,
    ADD CONSTRAINT devices_self_signed_has_thumbprint CHECK (
        auth <> 'x509_self_signed' OR primary_thumbprint IS NOT NULL
        OR secondary_thumbprint IS NOT NULL),
    ADD CONSTRAINT devices_ca_signed_has_ca CHECK (auth <> 'x509_ca' OR ca_name IS NOT NULL);

CREATE FUNCTION fleetline_count_credentials() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF (NEW.key_version, NEW.enabled, NEW.auth, NEW.primary_thumbprint,
        NEW.secondary_thumbprint, NEW.ca_name)
       IS DISTINCT FROM (OLD.key_version, OLD.enabled, OLD.auth, OLD.primary_thumbprint,
                         OLD.secondary_thumbprint, OLD.ca_name) THEN
        NEW.credentials_version := OLD.credentials_version + 1;
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER devices_count_credentials
BEFORE UPDATE ON devices
FOR EACH ROW EXECUTE FUNCTION fleetline_count_credentials();

CREATE OR REPLACE FUNCTION fleetline_device_credentials_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('fleetline_device_credentials', OLD.id);
    ELSE
        PERFORM pg_notify('fleetline_device_credentials', NEW.id);
    END IF;
    RETURN NULL;
END $$;

-- Not "UPDATE OF credentials_version": that fires only when the statement itself sets
-- the column, never for the count the BEFORE trigger keeps.
DROP TRIGGER devices_credentials_changed ON devices;
CREATE TRIGGER devices_credentials_changed
AFTER UPDATE ON devices
FOR EACH ROW WHEN (OLD.credentials_version IS DISTINCT FROM NEW.credentials_version)
EXECUTE FUNCTION fleetline_device_credentials_changed();
CREATE TRIGGER devices_deleted
AFTER DELETE ON devices
FOR EACH ROW EXECUTE FUNCTION fleetline_device_credentials_changed();

-- CA certificates that sign devices' certificates. One is trusted only once verified:
-- its owner signed a certificate whose common name is verification_code with the CA's
-- key (proof of possession). Changing the set of verified CAs notifies the plugin, which
-- disconnects devices that logged in through a CA no longer there.
CREATE TABLE x509_cas (
    name              TEXT PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9_.:-]{1,128}$'),
    certificate       TEXT NOT NULL,           -- PEM
    thumbprint        BYTEA NOT NULL UNIQUE CHECK (length(thumbprint) = 32),
    subject           TEXT NOT NULL,
    not_after         TIMESTAMPTZ NOT NULL,
    verification_code TEXT NOT NULL,
    verified_at       TIMESTAMPTZ,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE FUNCTION fleetline_x509_cas_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('fleetline_x509_cas', '');
    RETURN NULL;
END $$;

CREATE TRIGGER x509_cas_changed
AFTER INSERT OR UPDATE OR DELETE ON x509_cas
FOR EACH STATEMENT EXECUTE FUNCTION fleetline_x509_cas_changed();
