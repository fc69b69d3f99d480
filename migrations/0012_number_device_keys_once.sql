-- Key versions are never reused, not even by a device deleted and registered again
-- with the same id: its old key (derived from the id and the version) must stay dead.
-- Every issued key takes the next number of one sequence.
CREATE SEQUENCE device_key_version_seq AS INTEGER;
SELECT setval('device_key_version_seq', greatest((SELECT max(key_version) FROM devices), 0) + 1,
              false);
