"""Factory line benchmark: `pki factory run` in station mode against `pki serve ca`.

Station mode registers the batch over the admin API, draws a one-time secret per device,
makes each device's key and CSR and enrolls it over EST; the devices/s figure is the whole
command's wall time (start-up included) over the number of devices.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import HOST, PKI, free_port, run, server


def bench_factory(
    data_dir: Path,
    env: dict[str, str],
    work: Path,
    *,
    devices: int,
    ca_workers: int,
    threads: int,
    factory_workers: int,
) -> dict[str, object]:
    """Provisions `devices` devices in one batch; returns devices/s."""
    batch = "BENCHLINE"
    manifest = work / "factory-manifest.csv"
    manifest.write_text(
        "device_id,model,batch\n"
        + "".join(f"LINE-{i:06d},sensor-v1,{batch}\n" for i in range(devices))
    )
    token = run([PKI, "admin", "token", "create", "--role", "factory"], env=env).stdout.strip()
    env = dict(env, PKI_ADMIN_TOKEN=token)
    port = free_port()
    out = work / "factory-out"
    with server(
        [
            PKI,
            "serve",
            "ca",
            "--bind",
            f"{HOST}:{port}",
            "--workers",
            str(ca_workers),
            "--threads",
            str(threads),
        ],
        work / "ca-factory.log",
        env=env,
        ready_url=f"https://{HOST}:{port}/healthz",
    ):
        t0 = time.perf_counter()
        run(
            [
                PKI,
                "factory",
                "run",
                manifest,
                "--batch",
                batch,
                "--ca-url",
                f"https://{HOST}:{port}",
                "--cacert",
                data_dir / "certs" / "chain.pem",
                "--out",
                out,
                "--workers",
                str(factory_workers),
            ],
            env=env,
            timeout=3600,
        )
        seconds = time.perf_counter() - t0
    provisioned = sum(1 for p in (out / batch / "devices").iterdir() if (p / "cert.pem").exists())
    rate = devices / seconds
    print(
        f"  factory station mode: {devices} devices in {seconds:.1f} s = {rate:.1f} devices/s "
        f"({provisioned} certificate files)",
        flush=True,
    )
    return {
        "devices": devices,
        "seconds": seconds,
        "rate": rate,
        "provisioned": provisioned,
        "factory_workers": factory_workers,
    }
