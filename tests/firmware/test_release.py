"""Signed firmware releases: `fleetline firmware keygen` and `sign` (fleetline/releases.py)
against the device's checks (firmware/common/fleetline_release.py and its ECDSA P-256
verifier, fleetline_ecdsa.py), under CPython and under the real MicroPython unix port
with an ESP32 application's heap, where the signature check's time and heap are
measured and reported. A tampered image or manifest, or one for another board, is
refused with the reason the device reports.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.firmware.conftest import REPORT, MicroPython
from tests.firmware.test_unix_port import HEAP_KIB, run_micropython

ROOT = Path(__file__).resolve().parents[2]
COMMON = ROOT / "firmware" / "common"
sys.path.insert(0, str(COMMON))
import fleetline_ecdsa  # noqa: E402
import fleetline_release  # noqa: E402

from fleetline import releases  # noqa: E402

MANIFEST = b'{"kind":"bundle","sha256":"00ff","size":1234,"target":"esp32","version":"2.0.0"}'


def signed(message: bytes) -> tuple[bytes, bytes]:
    """A new key's public point (65 bytes, uncompressed) and its r || s over ``message``."""
    key = ec.generate_private_key(ec.SECP256R1())
    public = key.public_key().public_bytes(serialization.Encoding.X962,
                                           serialization.PublicFormat.UncompressedPoint)
    r, s = decode_dss_signature(key.sign(message, ec.ECDSA(hashes.SHA256())))
    return public, r.to_bytes(32, "big") + s.to_bytes(32, "big")


def test_signatures_of_the_release_key_verify_and_nothing_else_does() -> None:
    digest = hashlib.sha256(MANIFEST).digest()
    for _ in range(40):
        public, signature = signed(MANIFEST)
        key = fleetline_ecdsa.public_key(public)
        assert fleetline_ecdsa.public_key(public[1:]) == key
        assert fleetline_ecdsa.verify(key, digest, signature)
        tampered = hashlib.sha256(MANIFEST.replace(b"2.0.0", b"2.0.1")).digest()
        assert not fleetline_ecdsa.verify(key, tampered, signature)
        flipped = signature[:31] + bytes([signature[31] ^ 1]) + signature[32:]
        assert not fleetline_ecdsa.verify(key, digest, flipped)
        other, _ = signed(MANIFEST)
        assert not fleetline_ecdsa.verify(fleetline_ecdsa.public_key(other), digest, signature)
    n = fleetline_ecdsa.N.to_bytes(32, "big")
    for bad in (bytes(64), n + signature[32:], signature[:32] + n, signature[:63], b""):
        assert not fleetline_ecdsa.verify(key, digest, bad)
    with pytest.raises(ValueError, match="not a point"):
        fleetline_ecdsa.public_key(public[:64] + bytes([public[64] ^ 1]))
    with pytest.raises(ValueError, match="64 bytes"):
        fleetline_ecdsa.public_key(public[:40])


PROBE = """
import gc, hashlib, json, time
import fleetline_ecdsa as e
v = json.loads(open(VECTOR).read())
import binascii
key = e.public_key(binascii.unhexlify(v["key"]))
sig = binascii.unhexlify(v["sig"])
digest = hashlib.sha256(v["manifest"].encode()).digest()
gc.collect()
before = gc.mem_free()
start = time.ticks_us()
ok = e.verify(key, digest, sig)
took = time.ticks_diff(time.ticks_us(), start)
used = before - gc.mem_free()
bad = e.verify(key, hashlib.sha256(v["manifest"].encode() + b" ").digest(), sig)
print(json.dumps({"ok": ok, "bad": bad, "us": took, "allocated": used}))
"""


@pytest.mark.parametrize("heap_kib", [HEAP_KIB, 32])
def test_verification_under_micropython_in_an_esp32_heap(
    micropython: MicroPython, tmp_path: Path, heap_kib: int,
) -> None:
    public, signature = signed(MANIFEST)
    (tmp_path / "vector.json").write_text(json.dumps(
        {"key": public.hex(), "sig": signature.hex(), "manifest": MANIFEST.decode()}))
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE.replace("VECTOR", repr(str(tmp_path / "vector.json"))))
    done = run_micropython(micropython, heap_kib, [str(probe)], COMMON, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"] is True and result["bad"] is False, result
    REPORT.append(
        f"ECDSA P-256 manifest check, heap {heap_kib}K: {result['us'] / 1000:.1f} ms on this "
        f"machine's core, {result['allocated'] / 1024:.0f} KiB allocated during the check")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetline_cli", "firmware", *args],
                          capture_output=True, text=True, timeout=60)


APPLY = """
import json, sys
import fleetline_release as release
config = json.loads(open(CONFIG).read())
signed = json.loads(open(config["release"]).read())
try:
    manifest = release.check_manifest(signed["manifest"].encode(), signed["signature"],
                                      config["key"], config["target"], config["running"])
    check = release.ImageCheck(manifest)
    with open(config["image"], "rb") as f:
        while True:
            chunk = f.read(512)
            if not chunk:
                break
            check.update(chunk)
    check.finish()
    print(json.dumps({"applied": manifest["version"]}))
except release.Refused as exc:
    print(json.dumps({"refused": str(exc)}))
"""


def test_a_release_signed_by_the_cli_is_checked_by_the_device_and_tampering_refused(
    micropython: MicroPython, tmp_path: Path,
) -> None:
    key_file = tmp_path / "release-key.pem"
    made = cli("keygen", "--out", str(key_file))
    assert made.returncode == 0, made.stderr
    assert key_file.stat().st_mode & 0o077 == 0
    public = made.stdout.split('RELEASE_KEY = "')[1][:128]
    assert bytes.fromhex(public) == releases.public_point(releases.load_key(key_file))
    again = cli("keygen", "--out", str(key_file))
    assert again.returncode == 1 and "never overwritten" in again.stderr
    image = tmp_path / "app.bin"
    image.write_bytes(bytes(range(256)) * 40 + b"v2")
    signed = cli("sign", str(image), "--version", "2.0.0", "--target", "esp32",
                 "--key", str(key_file))
    assert signed.returncode == 0, signed.stderr
    release = json.loads((tmp_path / "app.bin.release.json").read_text())
    assert releases.verify(bytes.fromhex(public), release["manifest"].encode(),
                           bytes.fromhex(release["signature"]))
    assert releases.Manifest.from_bytes(release["manifest"].encode()).size == 10242

    def on_device(name: str, *, image_bytes: bytes | None = None, manifest: str | None = None,
                  target: str = "esp32", key: str = public, running: str = "1.9.12"
                  ) -> dict[str, str]:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "app.bin").write_bytes(image_bytes or image.read_bytes())
        (folder / "release.json").write_text(json.dumps(
            {**release, "manifest": manifest or release["manifest"]}))
        (folder / "config.json").write_text(json.dumps(
            {"key": key, "target": target, "image": str(folder / "app.bin"), "running": running,
             "release": str(folder / "release.json")}))
        probe = folder / "apply.py"
        probe.write_text(APPLY.replace("CONFIG", repr(str(folder / "config.json"))))
        done = run_micropython(micropython, HEAP_KIB, [str(probe)], COMMON, timeout=60)
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout.strip().splitlines()[-1]))

    assert on_device("good") == {"applied": "2.0.0"}
    assert on_device("flipped", image_bytes=image.read_bytes()[:-1] + b"3") == {
        "refused": "the image's SHA-256 is not its manifest's"}
    assert on_device("longer", image_bytes=image.read_bytes() + b"!") == {
        "refused": "the image is larger than its manifest says"}
    assert on_device("shorter", image_bytes=image.read_bytes()[:100]) == {
        "refused": "the image is 100 bytes, its manifest says 10242"}
    assert on_device("relabelled", manifest=release["manifest"].replace("2.0.0", "9.0.0")) == {
        "refused": "the manifest's signature is not the release key's"}
    assert on_device("other board", target="esp8266") == {
        "refused": "the release is for esp32, this board is esp8266"}
    other = releases.public_point(releases.generate_key()).hex()
    assert on_device("other key", key=other) == {
        "refused": "the manifest's signature is not the release key's"}
    # The same release again, or an older one signed as it was: no downgrade.
    assert on_device("running it", running="2.0.0") == {
        "refused": "the release 2.0.0 is not newer than the running 2.0.0"}
    assert on_device("running newer", running="2.0.10") == {
        "refused": "the release 2.0.0 is not newer than the running 2.0.10"}
    assert on_device("bad key", key="00" * 64) == {
        "refused": "the release key in the config is not a P-256 public key"}


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("version", "../1", "version must be"),
    ("target", "", "target must be"),
    ("kind", "zip", "kind must be"),
    ("size", 0, "size must be"),
    ("sha256", "AB" * 32, "sha256 must be"),
])
def test_a_manifest_names_only_what_a_device_can_check(
    field: str, value: object, reason: str
) -> None:
    good: dict[str, object] = {"version": "1.0.0", "target": "esp32", "kind": "bundle",
                               "size": 10, "sha256": "ab" * 32}
    releases.Manifest(**good)  # type: ignore[arg-type]
    with pytest.raises(releases.ReleaseError, match=reason):
        releases.Manifest(**{**good, field: value})  # type: ignore[arg-type]
    with pytest.raises(releases.ReleaseError, match="canonical"):
        releases.Manifest.from_bytes(json.dumps(good).encode())


def test_versions_order_as_people_read_them() -> None:
    for older, newer in (("1.9", "1.10"), ("1.0", "1.0.1"), ("2.0.9", "2.1")):
        assert fleetline_release.newer(newer, older) and not fleetline_release.newer(older, newer)
    assert not fleetline_release.newer("1.0.0", "1.0.0")
