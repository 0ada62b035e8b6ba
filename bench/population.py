"""Bench-only population loader: issues and revokes many device certificates in-process.

Every certificate goes through the real issuance code (CSR parse and policy, profile,
record-before-sign, HSM signature, audit). Certificates come from ONE in-memory P-256 key
with one CSR per certificate. The first `--linted` certificates run the full cycle with
pkilint; the rest skip only the pkilint step (IssuanceService(lint_certificates=False)),
because pkilint costs ~10 ms a certificate. Both rates are printed and written as JSON.

Usage: python -m bench.population --issue N --revoke M --linted L --json OUT
(PKI_CONFIG_DIR, PKI_DATA_DIR and PKI_DATABASE_URL name the CA, as for `pki`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from api.runtime import Runtime
from pki.csr import check_request, load_csr
from pki.issuer import IssuanceService
from pki.revocation import RevocationService
from pki.serial import serial_hex

ACTOR = "bench:population"


def device_csr_der(key: ec.EllipticCurvePrivateKey, device_id: str) -> bytes:
    """Builds a device CSR for a device ID, signed with the shared bench key."""
    from cryptography.hazmat.primitives.serialization import Encoding

    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, device_id),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, device_id),
        ]
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(Encoding.DER)


def issue_many(
    rt: Runtime, service: IssuanceService, count: int, start: int, prefix: str
) -> list[str]:
    """Issues `count` device certificates; returns their serials (lower-case hex)."""
    key = ec.generate_private_key(ec.SECP256R1())
    profile = rt.config.profile("device")
    issuer = rt.issuer("devices")
    serials = []
    for i in range(start, start + count):
        request = check_request(load_csr(device_csr_der(key, f"{prefix}-{i:07d}")), profile)
        issued = service.issue(issuer, profile, request, actor=ACTOR)
        serials.append(serial_hex(issued.serial))
    return serials


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--issue", type=int, required=True)
    parser.add_argument("--revoke", type=int, default=0)
    parser.add_argument("--linted", type=int, default=200)
    parser.add_argument("--prefix", default="BENCH")
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)

    rt = Runtime.open()
    out: dict[str, object] = {}
    try:
        linted = min(args.linted, args.issue)
        t0 = time.perf_counter()
        serials = issue_many(rt, rt.issuance(), linted, 0, args.prefix)
        t1 = time.perf_counter()
        fast = IssuanceService(rt.db, rt.clock, rt.config.ca.urls, lint_certificates=False)
        serials += issue_many(rt, fast, args.issue - linted, linted, args.prefix)
        t2 = time.perf_counter()
        out["linted"] = {"count": linted, "seconds": t1 - t0}
        out["unlinted"] = {"count": args.issue - linted, "seconds": t2 - t1}
        revocation = RevocationService(rt.db, rt.clock)
        revoked = serials[:: max(1, len(serials) // max(1, args.revoke))][: args.revoke]
        t3 = time.perf_counter()
        for s in revoked:
            revocation.revoke(s, x509.ReasonFlags.key_compromise, actor=ACTOR, issuer_id="devices")
        t4 = time.perf_counter()
        out["revoked"] = {"count": len(revoked), "seconds": t4 - t3}
        out["serials"] = serials
        out["revoked_serials"] = revoked
    finally:
        rt.close()
    args.json.write_text(json.dumps(out))
    for k in ("linted", "unlinted", "revoked"):
        v = out[k]
        assert isinstance(v, dict)
        rate = v["count"] / v["seconds"] if v["seconds"] else 0.0
        print(f"population {k}: {v['count']} in {v['seconds']:.1f} s ({rate:.0f}/s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
