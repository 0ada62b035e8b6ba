"""EST enrollment benchmark: simpleenroll end to end over HTTPS, one new TLS connection each.

The load client is Python with one process per concurrent client (multiprocessing), so the
GIL of the client is not the limit; client and server share the machine's cores. Keys and
CSRs are made before the clock starts; each device has a one-time secret (HTTP Basic).
Beside it: the HSM ceiling (P-256 signatures/s through the same Token and key object the CA
uses) and a TLS "hello" ceiling: bench/hello.py, fixed bytes, under the same gunicorn config
(scripts/gunicorn_ca.py: worker class, workers, threads, TLS), a new TLS connection per request.
"""

from __future__ import annotations

import base64
import http.client
import multiprocessing
import ssl
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID
from sqlalchemy import func, select

from api.runtime import Runtime
from bench.common import GUNICORN_CA, HOST, PKI, PYTHON, free_port, server
from pki.device import DeviceService
from pki.store import CertificateRecord, CertificateStatus, session_scope

EST_PATH = "/.well-known/est/simpleenroll"

Job = tuple[str, str, bytes]  # device id, secret, base64 CSR body


def _csr_body(device_id: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, device_id),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, device_id),
        ]
    )
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return base64.encodebytes(csr.public_bytes(serialization.Encoding.DER))


def _secret(args: tuple[dict[str, str], str]) -> Job:
    env, device_id = args
    rt = Runtime.open(environ=env)
    try:
        secret = DeviceService(rt.db, rt.clock).new_secret(device_id, actor="bench:est").secret
    finally:
        rt.close()
    return device_id, secret, _csr_body(device_id)


def prepare(env: dict[str, str], prefix: str, count: int) -> list[Job]:
    """Registers devices and draws their one-time secrets in two processes."""
    rt = Runtime.open(environ=env)
    ids = [f"{prefix}-{i:05d}" for i in range(count)]
    try:
        DeviceService(rt.db, rt.clock).import_csv(
            "id,model\n" + "".join(f"{d},bench\n" for d in ids), actor="bench:est"
        )
    finally:
        rt.close()
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        return pool.map(_secret, [(env, d) for d in ids], chunksize=8)


def _context(cafile: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = False  # the server certificate names 127.0.0.1 as an IP SAN
    return ctx


def _client(args: tuple[int, str, list[Job], str]) -> list[tuple[bool, float, str]]:
    port, cafile, jobs, mode = args
    ctx = _context(cafile)
    out = []
    for device_id, secret, body in jobs:
        t0 = time.perf_counter()
        conn = http.client.HTTPSConnection(HOST, port, context=ctx, timeout=60)
        try:
            if mode == "hello":
                conn.request("GET", "/healthz")
            else:
                auth = base64.b64encode(f"{device_id}:{secret}".encode()).decode()
                conn.request(
                    "POST",
                    EST_PATH,
                    body=body,
                    headers={
                        "Content-Type": "application/pkcs10",
                        "Authorization": f"Basic {auth}",
                        "Connection": "close",
                    },
                )
            r = conn.getresponse()
            data = r.read()
            ok = r.status == 200
            serial = ""
            if ok and mode != "hello":
                certs = pkcs7.load_der_pkcs7_certificates(base64.b64decode(data))
                serial = format(certs[0].serial_number, "x")
        except OSError:
            ok, serial = False, ""
        finally:
            conn.close()
        out.append((ok, time.perf_counter() - t0, serial))
    return out


def drive(port: int, cafile: str, jobs: list[Job], clients: int, mode: str) -> dict[str, object]:
    """Runs jobs split over `clients` processes; returns rate, latency percentiles, serials."""
    shares = [jobs[i::clients] for i in range(clients)]
    with multiprocessing.get_context("fork").Pool(clients) as pool:
        t0 = time.perf_counter()
        results = pool.map(_client, [(port, cafile, s, mode) for s in shares], chunksize=1)
        seconds = time.perf_counter() - t0
    flat = [r for rs in results for r in rs]
    ok = [r for r in flat if r[0]]
    lat = sorted(r[1] for r in ok) or [0.0]
    return {
        "clients": clients,
        "attempted": len(flat),
        "ok": len(ok),
        "seconds": seconds,
        "rate": len(ok) / seconds if seconds else 0.0,
        "p50_ms": lat[len(lat) // 2] * 1000,
        "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000,
        "serials": [r[2] for r in ok],
    }


def recorded(env: dict[str, str], serials: list[str]) -> int:
    """Counts how many of the returned serials are recorded as issued in the database."""
    rt = Runtime.open(environ=env)
    try:
        with session_scope(rt.db) as session:
            found = 0
            for i in range(0, len(serials), 500):
                chunk = serials[i : i + 500]
                found += int(
                    session.execute(
                        select(func.count()).where(
                            CertificateRecord.serial_hex.in_(chunk),
                            CertificateRecord.status == CertificateStatus.ISSUED,
                            CertificateRecord.cert_der.is_not(None),
                        )
                    ).scalar_one()
                )
    finally:
        rt.close()
    return found


def hsm_ceiling(env: dict[str, str], seconds: float) -> float:
    """Signs P-256 digests with the devices CA key through the runtime's token for `seconds`."""
    from cryptography.hazmat.primitives.asymmetric import ec as _ec

    rt = Runtime.open(environ=env)
    try:
        key = rt.issuer("devices").key
        assert isinstance(key, _ec.EllipticCurvePrivateKey)
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            key.sign(b"bench %d" % n, _ec.ECDSA(hashes.SHA256()))
            n += 1
        return n / (time.perf_counter() - t0)
    finally:
        rt.close()


def _hsm_proc(args: tuple[dict[str, str], float]) -> float:
    return hsm_ceiling(*args)


def bench_est(
    data_dir: Path,
    env: dict[str, str],
    work: Path,
    *,
    name: str,
    levels: dict[int, int],
    workers: int,
    threads: int,
    hello_requests: int,
) -> dict[str, object]:
    """Measures enrollments/s at each concurrency level (clients -> device count)."""
    total = sum(levels.values())
    t0 = time.perf_counter()
    jobs = prepare(env, f"EST{name.upper()}", total)
    result: dict[str, object] = {"prepare_seconds": time.perf_counter() - t0}
    cafile = str(data_dir / "certs" / "chain.pem")
    port = free_port()
    runs: dict[str, object] = {}
    with server(
        [
            PKI,
            "serve",
            "ca",
            "--bind",
            f"{HOST}:{port}",
            "--workers",
            str(workers),
            "--threads",
            str(threads),
        ],
        work / f"ca-{name}.log",
        env=env,
        ready_url=f"https://{HOST}:{port}/healthz",
    ):
        start = 0
        for clients, count in levels.items():
            share = jobs[start : start + count]
            start += count
            r = drive(port, cafile, share, clients, "enroll")
            serials = r.pop("serials")
            assert isinstance(serials, list)
            r["recorded"] = recorded(env, serials)
            runs[str(clients)] = r
            print(
                f"  est {name:<10} clients={clients:<3} {r['rate']:7.1f} enroll/s  "
                f"p50 {r['p50_ms']:.0f} ms p99 {r['p99_ms']:.0f} ms  ok {r['ok']}/{r['attempted']}"
                f"  recorded {r['recorded']}",
                flush=True,
            )
    hello: dict[str, object] = {}
    hello_port = free_port()
    hello_env = dict(env)
    hello_env.update(
        {
            "PKI_CA_BIND": f"{HOST}:{hello_port}",
            "PKI_CA_WORKERS": str(workers),
            "PKI_CA_THREADS": str(threads),
            "PKI_CA_CERTFILE": str(data_dir / "tls" / "server.pem"),
            "PKI_CA_KEYFILE": str(data_dir / "tls" / "server.key"),
            "PKI_CA_CLIENT_CAS": cafile,
        }
    )
    with server(
        [PYTHON, "-m", "gunicorn", "-c", str(GUNICORN_CA), "bench.hello:app"],
        work / f"hello-{name}.log",
        env=hello_env,
        ready_url=f"https://{HOST}:{hello_port}/",
    ):
        for clients in levels:
            fake = [("", "", b"")] * hello_requests
            h = drive(hello_port, cafile, fake, clients, "hello")
            h.pop("serials")
            hello[str(clients)] = h
            print(
                f"  est {name:<10} hello clients={clients:<3} {h['rate']:7.1f} req/s"
                " (new TLS each)",
                flush=True,
            )
        result["tls_hello"] = hello
    result["runs"] = runs
    return result


def bench_hsm(env: dict[str, str], seconds: float) -> dict[str, float]:
    """The HSM ceiling in one process and in two processes at once (2 cores)."""
    one = hsm_ceiling(env, seconds)
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        two = sum(pool.map(_hsm_proc, [(env, seconds)] * 2))
    print(f"  hsm P-256 sign: {one:.0f}/s one process, {two:.0f}/s two processes", flush=True)
    return {"one_process": one, "two_processes": two}
