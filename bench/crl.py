"""CRL benchmark: `pki crl publish` time and peak memory for 10k, 100k and 1M revoked entries.

The revoked rows are inserted directly into the certificates table (status revoked, a random
serial, no certificate body): issuing a million certificates is not what this measures. The
CRLs are signed by the devices CA key in SoftHSM and linted, as in production. The delta CRL
comes after 100 certificates revoked through RevocationService on top of the largest CRL.
Each publication is a separate `pki crl publish` process (start-up, ~1 s of imports,
included); its peak RSS comes from wait4(). The delta is also timed in-process.
"""

from __future__ import annotations

import datetime
import secrets
import time

from cryptography import x509
from sqlalchemy import insert, select

from api.runtime import Runtime
from bench.common import PKI, timed_rusage
from pki.crl_publisher import CRLPublisher
from pki.revocation import RevocationService
from pki.store import CertificateRecord, CertificateStatus, session_scope
from pki.store.revocation_models import CRLRecord

CHUNK = 20_000


def _rows(count: int, status: CertificateStatus, now: datetime.datetime) -> list[dict[str, object]]:
    reasons = ["keyCompromise", "superseded", "cessationOfOperation", "affiliationChanged"]
    rows = []
    for i in range(count):
        rows.append(
            {
                "issuer_id": "devices",
                "serial_hex": format(secrets.randbits(127) | (1 << 126), "x"),
                "profile": "device",
                "status": status,
                "subject": "serialNumber=BULK",
                "sans": "[]",
                "device_id": None,
                "not_before": now - datetime.timedelta(days=30),
                "not_after": now + datetime.timedelta(days=335),
                "tbs_der": b"\x30\x00",
                "cert_der": None,
                "created_at": now,
                "issued_at": now,
                "revoked_at": (
                    now - datetime.timedelta(seconds=i % 86400)
                    if status is CertificateStatus.REVOKED
                    else None
                ),
                "revocation_reason": (
                    reasons[i % len(reasons)] if status is CertificateStatus.REVOKED else None
                ),
            }
        )
    return rows


def insert_rows(rt: Runtime, count: int, status: CertificateStatus) -> list[str]:
    """Inserts rows directly, in chunks; returns their serials."""
    now = rt.clock.now()
    serials: list[str] = []
    done = 0
    while done < count:
        rows = _rows(min(CHUNK, count - done), status, now)
        with session_scope(rt.db) as session:
            session.execute(insert(CertificateRecord.__table__), rows)  # type: ignore[arg-type]
        serials += [str(r["serial_hex"]) for r in rows]
        done += len(rows)
    return serials


def _publish(env: dict[str, str], delta: bool) -> tuple[float, float]:
    args = [PKI, "crl", "publish", "--issuer", "devices"] + (["--delta"] if delta else [])
    seconds, rss_mib, _out = timed_rusage(args, env=env)
    return seconds, rss_mib


def _latest_size(rt: Runtime, delta: bool) -> tuple[int, int]:
    with session_scope(rt.db) as session:
        row = session.execute(
            select(CRLRecord.crl_der, CRLRecord.entries)
            .where(CRLRecord.issuer_id == "devices", CRLRecord.is_delta == delta)
            .order_by(CRLRecord.crl_number.desc())
            .limit(1)
        ).one()
    return len(row[0] or b""), int(row[1] or 0)


def bench_crl(env: dict[str, str], sizes: tuple[int, ...]) -> dict[str, object]:
    """Publishes full CRLs at each size (cumulative), then a delta after 100 revocations."""
    rt = Runtime.open(environ=env)
    out: dict[str, object] = {}
    try:
        have = 0
        for size in sizes:
            t0 = time.perf_counter()
            insert_rows(rt, size - have, CertificateStatus.REVOKED)
            load = time.perf_counter() - t0
            have = size
            seconds, rss = _publish(env, delta=False)
            der_bytes, entries = _latest_size(rt, delta=False)
            out[str(size)] = {
                "insert_seconds": load,
                "publish_seconds": seconds,
                "peak_rss_mib": rss,
                "der_bytes": der_bytes,
                "entries": entries,
            }
            print(
                f"  crl {size:>8} entries: {seconds:6.2f} s  peak {rss:6.0f} MiB  "
                f"DER {der_bytes / 1e6:6.1f} MB  (rows inserted in {load:.0f} s)",
                flush=True,
            )
        fresh = insert_rows(rt, 100, CertificateStatus.ISSUED)
        service = RevocationService(rt.db, rt.clock)
        for s in fresh:
            service.revoke(
                s, x509.ReasonFlags.key_compromise, actor="bench:crl", issuer_id="devices"
            )
        # In-process first (the publication itself, as the scheduler runs it), then the CLI.
        publisher = CRLPublisher(rt.db, rt.clock, rt.config.ca.urls, rt.crl_config())
        issuer = rt.issuer("devices")
        t0 = time.perf_counter()
        publisher.publish(issuer, delta=True)
        in_process = time.perf_counter() - t0
        seconds, rss = _publish(env, delta=True)
        der_bytes, entries = _latest_size(rt, delta=True)
        out["delta"] = {
            "on_top_of": have,
            "in_process_seconds": in_process,
            "publish_seconds": seconds,
            "peak_rss_mib": rss,
            "der_bytes": der_bytes,
            "entries": entries,
        }
        print(
            f"  crl delta after 100 revocations on {have}: {seconds:.2f} s as a command, "
            f"{in_process:.2f} s in-process;  "
            f"{entries} entries  DER {der_bytes} B",
            flush=True,
        )
    finally:
        rt.close()
    return out
