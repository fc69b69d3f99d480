-- Device credentials (fleetline/devicekeys.py, PROTOCOL.md Identities).
--
-- A device key is derived from the deployment's device-key secret and the device's
-- key_version; the registry keeps only the version and the SHA-256 of the key. The
-- broker's auth plugin (deploy/mosquitto/auth) reads key_version at CONNECT: version 0
-- means no key has been issued, and the device cannot log in. Devices registered before
-- this migration start at 0 and get a key by `POST /v1/devices/{id}/key`.
ALTER TABLE devices
    ADD COLUMN key_version     INTEGER NOT NULL DEFAULT 0 CHECK (key_version >= 0),
    ADD COLUMN key_sha256      BYTEA CHECK (length(key_sha256) = 32),
    ADD COLUMN key_created_at  TIMESTAMPTZ;

-- The broker disconnects a device whose key was regenerated, or which was deleted:
-- its auth plugin listens on this channel (the payload is the device id).
CREATE FUNCTION fleetline_device_credentials_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('fleetline_device_credentials', OLD.id);
    ELSIF NEW.key_version IS DISTINCT FROM OLD.key_version THEN
        PERFORM pg_notify('fleetline_device_credentials', NEW.id);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER devices_credentials_changed
AFTER UPDATE OF key_version OR DELETE ON devices
FOR EACH ROW EXECUTE FUNCTION fleetline_device_credentials_changed();
