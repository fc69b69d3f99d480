# ECDSA P-256 signature verification in pure Python, for MicroPython and CPython.
#
# fleetline signs each firmware manifest with its release key (ECDSA over NIST P-256
# with SHA-256); the device carries the public half and checks a manifest before it
# trusts the image's hash. P-256 and not Ed25519: Ed25519 needs SHA-512, which
# MicroPython's hashlib does not have on the ESP32, while SHA-256 it has everywhere.
#
# A signature is r || s, 32 bytes each, big-endian; a public key is x || y (64 bytes),
# or the 65-byte uncompressed point 04 || x || y. Points are computed in Jacobian
# coordinates (a = -3), u1*G + u2*Q in one pass (Shamir's trick). MicroPython's
# three-argument pow returns 0 for a negative exponent, so inverses are by Fermat
# (pow(a, m - 2, m), m prime). Verification time and heap are measured under the unix
# port with an ESP32 application's heap (tests/firmware/test_release.py).

P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
GX = 0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296
GY = 0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5


def _int(b):
    return int.from_bytes(b, "big")


def public_key(raw):
    """(x, y) of a public key given as 64 bytes (x || y) or 65 (04 || x || y); raises
    ValueError unless it is a point of the curve."""
    if len(raw) == 65 and raw[0] == 4:
        raw = raw[1:]
    if len(raw) != 64:
        raise ValueError("a P-256 public key is 64 bytes (x || y)")
    x, y = _int(raw[:32]), _int(raw[32:])
    if not (x < P and y < P and (y * y - (x * x * x - 3 * x + B)) % P == 0):
        raise ValueError("not a point of P-256")
    return x, y


def _double(pt):
    x, y, z = pt
    if not y or not z:
        return None
    delta = z * z % P
    gamma = y * y % P
    beta = x * gamma % P
    alpha = 3 * (x - delta) * (x + delta) % P
    x3 = (alpha * alpha - 8 * beta) % P
    z3 = ((y + z) * (y + z) - gamma - delta) % P
    y3 = (alpha * (4 * beta - x3) - 8 * gamma * gamma) % P
    return x3, y3, z3


def _add(p1, p2):
    if p1 is None:
        return p2
    if p2 is None:
        return p1
    x1, y1, z1 = p1
    x2, y2, z2 = p2
    z1z1 = z1 * z1 % P
    z2z2 = z2 * z2 % P
    u1 = x1 * z2z2 % P
    u2 = x2 * z1z1 % P
    s1 = y1 * z2 * z2z2 % P
    s2 = y2 * z1 * z1z1 % P
    h = (u2 - u1) % P
    r = 2 * (s2 - s1) % P
    if not h:
        return _double(p1) if not r else None
    i = 4 * h * h % P
    j = h * i % P
    v = u1 * i % P
    x3 = (r * r - j - 2 * v) % P
    y3 = (r * (v - x3) - 2 * s1 * j) % P
    z3 = ((z1 + z2) * (z1 + z2) - z1z1 - z2z2) * h % P
    return x3, y3, z3


def verify(key, digest, signature):
    """Whether ``signature`` (r || s) is the signature of the SHA-256 ``digest`` (32
    bytes) by ``key`` ((x, y) from public_key). Never raises for a bad signature."""
    if len(signature) != 64 or len(digest) != 32:
        return False
    r, s = _int(signature[:32]), _int(signature[32:])
    if not (0 < r < N and 0 < s < N):
        return False
    w = pow(s, N - 2, N)
    u1 = _int(digest) * w % N
    u2 = r * w % N
    g = (GX, GY, 1)
    q = (key[0], key[1], 1)
    both = _add(g, q)
    acc = None
    for bit in range(255, -1, -1):
        acc = _double(acc) if acc else None
        a, b = (u1 >> bit) & 1, (u2 >> bit) & 1
        if a and b:
            acc = _add(acc, both)
        elif a:
            acc = _add(acc, g)
        elif b:
            acc = _add(acc, q)
    if acc is None or not acc[2]:
        return False
    zinv = pow(acc[2], P - 2, P)
    x = acc[0] * zinv * zinv % P
    return x % N == r
