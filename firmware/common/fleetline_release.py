# Checking a firmware release on the device, before anything of it is applied.
#
# The manifest (canonical JSON: version, target, kind, size, sha256) must carry the
# release key's signature (fleetline_ecdsa: ECDSA P-256 over SHA-256, r || s in hex) and
# name this board's target; then the image, fed in chunks as it downloads, must have
# exactly the manifest's size and SHA-256. Any failure raises Refused with the reason
# the device reports. The release key's public half (x || y, hex) is RELEASE_KEY in
# config_local.py (`fleetline firmware keygen` prints it).

import binascii
import hashlib
import json

import fleetline_ecdsa

FIELDS = ("kind", "sha256", "size", "target", "version")


class Refused(Exception):
    """A release this device will not apply; str() is the reason it reports."""


def _unhex(text, what):
    try:
        return binascii.unhexlify(text)
    except (ValueError, TypeError):
        raise Refused(what + " is not hex") from None


def _version_key(version):
    # Dotted parts, numbers compared as numbers (2.10 after 2.9), words after numbers.
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in version.split(".")]


def newer(version, than):
    """Whether release ``version`` comes after ``than`` (the running one)."""
    return _version_key(version) > _version_key(than)


def check_manifest(manifest, signature, release_key, target, running=None):
    """The manifest (bytes) as a dict, if ``signature`` (hex) is the release key's
    (``release_key``: hex x || y), it is for ``target`` and (given the ``running``
    version) newer than what runs: an old release, signed as it was, is refused, so no
    one can put a version with known faults back on the board. Else Refused."""
    try:
        key = fleetline_ecdsa.public_key(_unhex(release_key, "the release key"))
    except ValueError:
        raise Refused("the release key in the config is not a P-256 public key") from None
    digest = hashlib.sha256(manifest).digest()
    if not fleetline_ecdsa.verify(key, digest, _unhex(signature, "the signature")):
        raise Refused("the manifest's signature is not the release key's")
    try:
        doc = json.loads(manifest)
    except ValueError:
        raise Refused("the manifest is not JSON") from None
    if not isinstance(doc, dict) or sorted(doc) != list(FIELDS):
        raise Refused("the manifest has other fields than " + ", ".join(FIELDS))
    if doc["target"] != target:
        raise Refused("the release is for " + str(doc["target"]) + ", this board is " + target)
    if not isinstance(doc["size"], int) or doc["size"] < 1:
        raise Refused("the manifest's size is not a positive number")
    if doc["kind"] not in ("bundle", "image"):
        raise Refused("the manifest's kind is neither bundle nor image")
    if not isinstance(doc["sha256"], str) or len(doc["sha256"]) != 64:
        raise Refused("the manifest's sha256 is not 64 hex digits")
    if not isinstance(doc["version"], str):
        raise Refused("the manifest's version is not text")
    if running is not None and not newer(doc["version"], running):
        raise Refused("the release " + doc["version"] + " is not newer than the running "
                      + running)
    return doc


class ImageCheck:
    """The image's bytes against its manifest, chunk by chunk as they arrive."""

    def __init__(self, manifest):
        self.manifest = manifest
        self.size = 0
        self._hash = hashlib.sha256()

    def update(self, chunk):
        self.size += len(chunk)
        if self.size > self.manifest["size"]:
            raise Refused("the image is larger than its manifest says")
        self._hash.update(chunk)

    def finish(self):
        if self.size != self.manifest["size"]:
            raise Refused("the image is " + str(self.size) + " bytes, its manifest says "
                          + str(self.manifest["size"]))
        digest = binascii.hexlify(self._hash.digest()).decode()
        if digest != self.manifest["sha256"]:
            raise Refused("the image's SHA-256 is not its manifest's")
