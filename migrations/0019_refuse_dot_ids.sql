-- Device and module ids are path segments (in MQTT topics and REST paths): "." and ".."
-- would name the parent or the same folder there. They are refused from now on; NOT
-- VALID leaves rows made by an earlier release in place (rename or delete them: the
-- API cannot address them), so this migration cannot fail on existing data.
ALTER TABLE devices
    ADD CONSTRAINT devices_id_not_dots CHECK (id NOT IN ('.', '..')) NOT VALID;
ALTER TABLE device_modules
    ADD CONSTRAINT device_modules_id_not_dots CHECK (module_id NOT IN ('.', '..')) NOT VALID;
