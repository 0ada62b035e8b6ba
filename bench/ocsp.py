"""OCSP benchmark: our VA (pre-signed POST/GET, nonce POST) against CFSSL and openssl ocsp.

All three answer for the same device certificates of the same population. CFSSL pre-signs
its own responses (`cfssl ocsprefresh` over a certdb holding the same certificates, then
`cfssl ocspdump`) with its own software responder key; openssl ocsp answers from an
index.txt with the same key. That responder certificate is issued by our devices CA
(profile ocsp-signer) so that every response verifies against the same chain.
"""

from __future__ import annotations

import base64
import datetime
import json
import random
import sqlite3
import subprocess
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import NameOID
from sqlalchemy import select

from api.runtime import Runtime
from bench.common import HOST, PKI, free_port, run, server, write_lua, wrk
from pki.csr import check_request, load_csr
from pki.store import CertificateRecord, CertificateStatus, session_scope

OCSP_HEADERS = '{["Content-Type"] = "application/ocsp-request"}'
REASON_CODES = {
    "unspecified": 0,
    "keyCompromise": 1,
    "cACompromise": 2,
    "affiliationChanged": 3,
    "superseded": 4,
    "cessationOfOperation": 5,
    "certificateHold": 6,
}


@dataclass(frozen=True)
class Cert:
    serial_hex: str
    revoked: bool
    revoked_at: datetime.datetime | None
    reason: str | None
    not_after: datetime.datetime
    cert_der: bytes


def load_population(rt: Runtime) -> list[Cert]:
    """Reads the issued and revoked device certificates of the devices issuer."""
    with session_scope(rt.db) as session:
        rows = session.execute(
            select(
                CertificateRecord.serial_hex,
                CertificateRecord.status,
                CertificateRecord.revoked_at,
                CertificateRecord.revocation_reason,
                CertificateRecord.not_after,
                CertificateRecord.cert_der,
            ).where(
                CertificateRecord.issuer_id == "devices",
                CertificateRecord.profile == "device",
                CertificateRecord.cert_der.is_not(None),
            )
        ).all()
    return [
        Cert(s, st is CertificateStatus.REVOKED, ra, rr, na, der)
        for s, st, ra, rr, na, der in rows
        if st in (CertificateStatus.ISSUED, CertificateStatus.REVOKED)
    ]


def issue_peer_responder(rt: Runtime, out: Path) -> tuple[Path, Path]:
    """Issues a software-key OCSP responder certificate for the peers (profile ocsp-signer)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench peer OCSP")]))
        .sign(key, hashes.SHA256())
    )
    profile = rt.config.profile("ocsp-signer")
    request = check_request(load_csr(csr.public_bytes(serialization.Encoding.DER)), profile)
    issued = rt.issuance().issue(rt.issuer("devices"), profile, request, actor="bench:ocsp")
    cert_path, key_path = out / "peer-responder.pem", out / "peer-responder.key"
    cert_path.write_bytes(issued.certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def _ts(t: datetime.datetime) -> str:
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S+00:00")


def prepare_cfssl(
    certs: list[Cert], ca_pem: Path, responder: Path, key: Path, out: Path
) -> tuple[Path, float]:
    """Loads CFSSL's certdb, lets it pre-sign every response; returns the dump and seconds."""
    db_path = out / "cfssl.db"
    db_path.unlink(missing_ok=True)
    con = sqlite3.connect(db_path)
    con.executescript(
        """
        CREATE TABLE certificates (
          serial_number blob NOT NULL, authority_key_identifier blob NOT NULL, ca_label blob,
          status blob NOT NULL, reason int, expiry timestamp, revoked_at timestamp,
          pem blob NOT NULL, PRIMARY KEY(serial_number, authority_key_identifier));
        CREATE TABLE ocsp_responses (
          serial_number blob NOT NULL, authority_key_identifier blob NOT NULL,
          body blob NOT NULL, expiry timestamp,
          PRIMARY KEY(serial_number, authority_key_identifier));
        """
    )
    rows = []
    for c in certs:
        cert = x509.load_der_x509_certificate(c.cert_der)
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        rows.append(
            (
                str(cert.serial_number),
                (aki.key_identifier or b"").hex(),
                "devices",
                "revoked" if c.revoked else "good",
                REASON_CODES.get(c.reason or "", 0),
                _ts(c.not_after),
                _ts(c.revoked_at) if c.revoked_at else "0001-01-01 00:00:00+00:00",
                cert.public_bytes(serialization.Encoding.PEM).decode(),
            )
        )
    con.executemany("INSERT INTO certificates VALUES (?,?,?,?,?,?,?,?)", rows)
    con.commit()
    con.close()
    config = out / "cfssl-db.json"
    config.write_text(json.dumps({"driver": "sqlite3", "data_source": str(db_path)}))
    import time

    t0 = time.perf_counter()
    run(
        [
            "cfssl",
            "ocsprefresh",
            "-db-config",
            config,
            "-ca",
            ca_pem,
            "-responder",
            responder,
            "-responder-key",
            key,
        ]
    )
    seconds = time.perf_counter() - t0
    dump = out / "cfssl-responses.txt"
    dump.write_text(run(["cfssl", "ocspdump", "-db-config", config]).stdout)
    return dump, seconds


def prepare_openssl_index(certs: list[Cert], out: Path) -> Path:
    """Writes an openssl ca index.txt of the population."""

    def t(d: datetime.datetime) -> str:
        return d.astimezone(datetime.UTC).strftime("%y%m%d%H%M%SZ")

    lines = []
    for c in certs:
        rev = ""
        if c.revoked and c.revoked_at:
            rev = t(c.revoked_at) + (f",{c.reason}" if c.reason else "")
        status = "R" if c.revoked else "V"
        lines.append(f"{status}\t{t(c.not_after)}\t{rev}\t{c.serial_hex.upper()}\tunknown\t/CN=x")
    index = out / "index.txt"
    index.write_text("\n".join(lines) + "\n")
    (out / "index.txt.attr").write_text("unique_subject = no\n")
    return index


def build_requests(
    certs: list[Cert], issuer: x509.Certificate, count: int, *, nonce: bool, seed: int
) -> list[tuple[Cert, bytes]]:
    """Builds OCSP requests (SHA-1 CertIDs, as clients send) over a random sample."""
    rnd = random.Random(seed)  # noqa: S311 (a reproducible sample, not a secret)
    sample = rnd.sample(certs, min(count, len(certs)))
    out = []
    for c in sample:
        builder = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
            _name_hash(issuer),
            _key_hash(issuer),
            int(c.serial_hex, 16),
            hashes.SHA1(),  # noqa: S303 (RFC 5019 CertID hash)
        )
        if nonce:
            builder = builder.add_extension(x509.OCSPNonce(rnd.randbytes(16)), critical=False)
        out.append((c, builder.build().public_bytes(serialization.Encoding.DER)))
    return out


def _name_hash(issuer: x509.Certificate) -> bytes:
    h = hashes.Hash(hashes.SHA1())  # noqa: S303
    h.update(issuer.subject.public_bytes())
    return h.finalize()


def _key_hash(issuer: x509.Certificate) -> bytes:
    from asn1crypto import keys

    spki = issuer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    bits = keys.PublicKeyInfo.load(spki)["public_key"].contents[1:]
    h = hashes.Hash(hashes.SHA1())  # noqa: S303
    h.update(bits)
    return h.finalize()


def get_path(prefix: str, request_der: bytes, *, plus: str = "%2B") -> str:
    """URL-encodes a GET request (RFC 5019 §5); `plus` overrides the encoding of '+'."""
    encoded = urllib.parse.quote(base64.b64encode(request_der).decode(), safe="")
    return prefix + encoded.replace("%2B", plus)


def fetch(url: str, body: bytes | None) -> bytes:
    req = urllib.request.Request(  # noqa: S310 (127.0.0.1 only)
        url, data=body, headers={"Content-Type": "application/ocsp-request"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
        return bytes(r.read())


def validate(
    name: str,
    fetcher: list[tuple[Cert, bytes, str, bytes | None]],
    issuer_pem: Path,
    chain_pem: Path,
    work: Path,
) -> dict[str, object]:
    """Checks sampled responses with openssl ocsp -respin: signature, chain, status, nonce."""
    ok = 0
    problems: list[str] = []
    for i, (cert, request_der, url, body) in enumerate(fetcher):
        try:
            resp_der = fetch(url, body)
        except OSError as exc:
            problems.append(f"{cert.serial_hex}: {exc}")
            continue
        rpath = work / f"v-{name}-{i}.der"
        rpath.write_bytes(resp_der)
        out = subprocess.run(
            [
                "openssl",
                "ocsp",
                "-respin",
                str(rpath),
                "-issuer",
                str(issuer_pem),
                "-CAfile",
                str(chain_pem),
                "-serial",
                "0x" + cert.serial_hex,
                "-no_nonce",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        text = out.stdout + out.stderr
        want = "revoked" if cert.revoked else "good"
        nonce_ok = _nonce_echoed(request_der, resp_der)
        if "Response verify OK" in text and f": {want}" in text and nonce_ok:
            ok += 1
        else:
            problems.append(f"{cert.serial_hex}: want {want}: {text.strip()[:300]}")
    return {"checked": len(fetcher), "valid": ok, "problems": problems[:3]}


def _nonce_echoed(request_der: bytes, resp_der: bytes) -> bool:
    """True when the request has no nonce or the response carries the same one."""
    req = ocsp.load_der_ocsp_request(request_der)
    try:
        want = req.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        return True
    resp = ocsp.load_der_ocsp_response(resp_der)
    try:
        got = resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        return False
    return bool(got == want)


def bench_ocsp(
    data_dir: Path,
    env: dict[str, str],
    work: Path,
    *,
    seconds: int,
    connections: tuple[int, ...],
    va_workers: int,
    sample: int = 20,
) -> dict[str, object]:
    """Runs the whole OCSP comparison; returns results per responder, kind and connections."""
    import time

    rt = Runtime.open(environ=env)
    try:
        certs = load_population(rt)
        responder, responder_key = issue_peer_responder(rt, work)
        issuer = rt.issuer("devices").certificate
    finally:
        rt.close()
    issuer_pem, chain_pem = data_dir / "certs" / "devices.pem", data_dir / "certs" / "chain.pem"
    result: dict[str, object] = {
        "population": {"certificates": len(certs), "revoked": sum(c.revoked for c in certs)}
    }

    t0 = time.perf_counter()
    run([PKI, "ocsp", "presign"], env=env, timeout=3600)
    result["presign_seconds"] = time.perf_counter() - t0
    dump, cfssl_seconds = prepare_cfssl(certs, issuer_pem, responder, responder_key, work)
    result["cfssl_presign_seconds"] = cfssl_seconds
    index = prepare_openssl_index(certs, work)

    plain = build_requests(certs, issuer, 2000, nonce=False, seed=1)
    nonced = build_requests(certs, issuer, 2000, nonce=True, seed=2)
    # Make sure revoked certificates are in the validation sample.
    revoked_req = build_requests(
        [c for c in certs if c.revoked], issuer, sample // 2, nonce=False, seed=3
    )
    checks = revoked_req + plain[: sample - len(revoked_req)]
    nonce_checks = nonced[:sample]

    scripts = {
        "ours_post": write_lua(
            work / "ours_post.lua", "POST", [("/ocsp", b) for _, b in plain], OCSP_HEADERS
        ),
        "ours_get": write_lua(
            work / "ours_get.lua", "GET", [(get_path("/ocsp/", b), b"") for _, b in plain], "nil"
        ),
        "ours_nonce": write_lua(
            work / "ours_nonce.lua", "POST", [("/ocsp", b) for _, b in nonced], OCSP_HEADERS
        ),
        "peer_post": write_lua(
            work / "peer_post.lua", "POST", [("/", b) for _, b in plain], OCSP_HEADERS
        ),
        "peer_get": write_lua(
            work / "peer_get.lua",
            "GET",
            [(get_path("/", b, plus="%252B"), b"") for _, b in plain],
            "nil",
        ),
    }
    runs: dict[str, dict[str, object]] = {}
    validation: dict[str, object] = {}

    def measure(label: str, base: str, script: str, checked: str, python: bool = False) -> None:
        check = validation[checked]
        assert isinstance(check, dict)
        if not check["valid"]:
            runs[label] = {"skipped": f"no valid response in validation ({checked})"}
            print(f"  ocsp {label:<22} skipped: no valid response", flush=True)
            return
        runs[label] = {}
        for c in connections:
            if python:
                path = "/ocsp" if script.startswith("ours") else "/"
                port_ = int(base.rsplit(":", 1)[1])
                r = python_load(port_, path, [b for _, b in plain], c, seconds)
            else:
                r = wrk(base, scripts[script], c, seconds)
            runs[label][str(c)] = r
            print(
                f"  ocsp {label:<22} c={c:<3} {r['rps']:9.0f} req/s  p50 {r['p50_ms']:.2f} ms"
                f"  p99 {r['p99_ms']:.2f} ms  errors {r['socket_errors']}/{r['non_2xx']}",
                flush=True,
            )

    port = free_port()
    base = f"http://{HOST}:{port}"
    with server(
        [PKI, "serve", "va", "--bind", f"{HOST}:{port}", "--workers", str(va_workers)],
        work / "va.log",
        env=env,
        ready_url=f"{base}/healthz",
    ):
        validation["ours_post"] = validate(
            "ours_post", [(c, b, f"{base}/ocsp", b) for c, b in checks], issuer_pem, chain_pem, work
        )
        validation["ours_get"] = validate(
            "ours_get",
            [(c, b, base + get_path("/ocsp/", b), None) for c, b in checks],
            issuer_pem,
            chain_pem,
            work,
        )
        validation["ours_nonce"] = validate(
            "ours_nonce",
            [(c, b, f"{base}/ocsp", b) for c, b in nonce_checks],
            issuer_pem,
            chain_pem,
            work,
        )
        measure("ours presigned POST", base, "ours_post", "ours_post")
        measure("ours presigned GET", base, "ours_get", "ours_get")
        measure("ours nonce POST", base, "ours_nonce", "ours_nonce")
        # The Python client that drives openssl ocsp, against us: the fair openssl ratio.
        measure("ours presigned POST (py)", base, "ours_post", "ours_post", python=True)

    port = free_port()
    base = f"http://{HOST}:{port}"
    with server(
        ["cfssl", "ocspserve", "-address", HOST, "-port", str(port), "-responses", str(dump)],
        work / "cfssl.log",
        ready_port=port,
    ):
        validation["cfssl_post"] = validate(
            "cfssl_post", [(c, b, f"{base}/", b) for c, b in checks], issuer_pem, chain_pem, work
        )
        validation["cfssl_get"] = validate(
            "cfssl_get",
            [(c, b, base + get_path("/", b, plus="%252B"), None) for c, b in checks],
            issuer_pem,
            chain_pem,
            work,
        )
        # CFSSL 1.2 unescapes the path twice ('+' becomes ' '): standard RFC 5019 encoding
        # fails; the measured GET run double-encodes '+' (%252B) so that it can answer.
        validation["cfssl_get_standard_encoding"] = validate(
            "cfssl_get_std",
            [(c, b, base + get_path("/", b), None) for c, b in checks],
            issuer_pem,
            chain_pem,
            work,
        )
        measure("cfssl POST", base, "peer_post", "cfssl_post")
        measure("cfssl GET", base, "peer_get", "cfssl_get")
        # The same Python client against CFSSL: shows whether the client limits openssl.
        measure("cfssl POST (py)", base, "peer_post", "cfssl_post", python=True)

    port = free_port()
    base = f"http://{HOST}:{port}"
    with server(
        [
            "openssl",
            "ocsp",
            "-index",
            str(index),
            "-CA",
            str(issuer_pem),
            "-rsigner",
            str(responder),
            "-rkey",
            str(responder_key),
            "-port",
            str(port),
            "-ignore_err",
            "-nmin",
            "60",
        ],
        work / "openssl.log",
        ready_log="waiting for OCSP client connections",
    ):
        validation["openssl_post"] = validate(
            "openssl_post", [(c, b, f"{base}/", b) for c, b in checks], issuer_pem, chain_pem, work
        )
        measure("openssl ocsp POST (py)", base, "peer_post", "openssl_post", python=True)

    result["runs"] = runs
    result["validation"] = validation
    return result


def _py_client(args: tuple[str, int, str, list[bytes], float]) -> list[float]:
    """One closed-loop client: new connection per request; latencies (s), -1 for a failure."""
    import http.client
    import time

    host, port, path, bodies, seconds = args
    out: list[float] = []
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        body = bodies[i % len(bodies)]
        i += 1
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection(host, port, timeout=5)
        try:
            conn.request(
                "POST", path, body=body, headers={"Content-Type": "application/ocsp-request"}
            )
            r = conn.getresponse()
            r.read()
            out.append(time.perf_counter() - t0 if r.status == 200 else -1.0)
        except OSError:
            out.append(-1.0)
        finally:
            conn.close()
    return out


def python_load(
    port: int, path: str, bodies: list[bytes], connections: int, seconds: int
) -> dict[str, float]:
    """Closed-loop load from `connections` client processes, a new TCP connection per request.

    Used for `openssl ocsp`, which serves one connection at a time and stalled under wrk
    (it accepted wrk's connections but never read a request from them)."""
    import multiprocessing
    import time

    share = [
        (HOST, port, path, bodies[i::connections] or bodies, float(seconds))
        for i in range(connections)
    ]
    with multiprocessing.get_context("fork").Pool(connections) as pool:
        t0 = time.perf_counter()
        results = pool.map(_py_client, share, chunksize=1)
        wall = time.perf_counter() - t0
    flat = [x for r in results for x in r]
    ok = sorted(x for x in flat if x >= 0) or [0.0]
    failed = sum(1 for x in flat if x < 0)
    return {
        "rps": (len(flat) - failed) / wall if wall else 0.0,
        "requests": len(flat) - failed,
        "p50_ms": ok[len(ok) // 2] * 1000,
        "p99_ms": ok[min(len(ok) - 1, int(len(ok) * 0.99))] * 1000,
        "socket_errors": failed,
        "non_2xx": 0,
        "timeouts": failed,
        "client": "python",
    }
