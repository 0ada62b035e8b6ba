"""bench/run: builds bench CAs, runs each benchmark bounded in time, prints the table.

Everything listens on 127.0.0.1 only and stops by itself. Results go to stdout (a table
with ratios and targets marked met / not met) and to bench/results/<UTC time>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import PKI, REPO, VENV_BIN, pki_env, run

POSTGRES_ADMIN = os.environ.get("PKI_BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432")
RESULTS = REPO / "bench" / "results"
GIB = 1024.0
LOADERS = 1


@dataclasses.dataclass(frozen=True)
class Plan:
    """Plan sizes one bench run."""

    name: str
    issued: int
    revoked: int
    linted: int
    wrk_seconds: int
    connections: tuple[int, ...]
    est_levels: dict[int, int]
    hello_requests: int
    crl_sizes: tuple[int, ...]
    factory_devices: int
    hsm_seconds: float


FULL = Plan(
    "full", 100_000, 10_000, 500, 10, (1, 10, 50), {1: 60, 4: 160, 16: 400}, 400,
    (10_000, 100_000, 1_000_000), 2000, 5.0,
)  # fmt: skip
QUICK = Plan(
    "quick", 10_000, 1_000, 200, 5, (1, 10, 50), {1: 30, 4: 80, 16: 200}, 200,
    (10_000, 100_000, 1_000_000), 300, 3.0,
)  # fmt: skip


def _version(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20, check=False)
    except OSError:
        return "not installed"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else ""


def machine() -> dict[str, Any]:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": {
            "openssl": _version(["openssl", "version"]),
            "wrk": _version(["wrk", "-v"]),
            "cfssl": _version(["cfssl", "version"]),
            "softhsm": _version(["softhsm2-util", "--version"]),
            "postgresql": _version(
                ["psql", f"{POSTGRES_ADMIN}/postgres", "-tAc", "select version()"]
            ),
            "git": _version(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        },
    }


def ensure_tools() -> None:
    """Installs what the bench needs and is missing (apt: wrk, golang-cfssl)."""
    missing = [
        pkg
        for tool, pkg in (("wrk", "wrk"), ("cfssl", "golang-cfssl"))
        if subprocess.run(["which", tool], capture_output=True, check=False).returncode
    ]
    if missing:
        sudo = [] if os.geteuid() == 0 else ["sudo"]
        subprocess.run([*sudo, "apt-get", "install", "-y", *missing], check=True)


def init_ca(directory: Path, env: dict[str, str]) -> None:
    run([PKI, "init", "--dev", directory], env=env, timeout=600)


def create_database(name: str) -> str:
    for sql in (f"DROP DATABASE IF EXISTS {name}", f"CREATE DATABASE {name}"):
        run(["psql", f"{POSTGRES_ADMIN}/postgres", "-qc", sql])
    return f"{POSTGRES_ADMIN}/{name}"


def drop_database(name: str) -> None:
    subprocess.run(
        ["psql", f"{POSTGRES_ADMIN}/postgres", "-qc", f"DROP DATABASE IF EXISTS {name}"],
        capture_output=True,
        check=False,
    )


def load_population(plan: Plan, env: dict[str, str], work: Path) -> dict[str, Any]:
    """Issues and revokes the OCSP population in one in-process loader (bench/population.py).

    One process: two loaders on SQLite were slower in total (152/s against 192/s), as each
    issuance takes the write lock twice."""
    t0 = time.perf_counter()
    jobs = []
    for j in range(LOADERS):
        args = [
            str(VENV_BIN / "python"),
            "-m",
            "bench.population",
            "--issue",
            str(plan.issued // LOADERS),
            "--revoke",
            str(plan.revoked // LOADERS),
            "--linted",
            str(plan.linted // LOADERS),
            "--prefix",
            f"POP{j}",
            "--json",
            str(work / f"population-{j}.json"),
        ]
        jobs.append(subprocess.Popen(args, env=env, cwd=REPO))
    for p in jobs:
        if p.wait() != 0:
            raise RuntimeError("population loader failed")
    seconds = time.perf_counter() - t0
    parts = [json.loads((work / f"population-{j}.json").read_text()) for j in range(LOADERS)]
    out: dict[str, Any] = {"wall_seconds": seconds, "loader_processes": LOADERS}
    for k in ("linted", "unlinted", "revoked"):
        out[k] = {
            "count": sum(p[k]["count"] for p in parts),
            "seconds_per_process": max(p[k]["seconds"] for p in parts),
        }
    print(
        f"  population: {plan.issued} issued + {plan.revoked} revoked in {seconds:.0f} s "
        f"({LOADERS} loader process; first {plan.linted} with pkilint, the rest without)",
        flush=True,
    )
    return out


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _fmt(v: Any, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def _ratio(a: Any, b: Any) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def targets(r: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """Evaluates the issue's targets; None means not measured."""
    out: list[tuple[str, str, bool | None]] = []
    ours = _get(r, "ocsp", "runs", "ours presigned POST", "10")
    cfssl = _get(r, "ocsp", "runs", "cfssl POST", "10")
    nonce = _get(r, "ocsp", "runs", "ours nonce POST", "10")
    if ours and cfssl:
        ratio = ours["rps"] / cfssl["rps"]
        out.append(
            (
                "OCSP pre-signed >= 1.2x CFSSL req/s at 10 conns, p99 < 10 ms",
                f"{ratio:.2f}x, p99 {ours['p99_ms']:.1f} ms",
                ratio >= 1.2 and ours["p99_ms"] < 10,
            )
        )
    else:
        out.append(("OCSP pre-signed >= 1.2x CFSSL", "not measured", None))
    if ours and nonce:
        ratio = nonce["rps"] / ours["rps"]
        out.append(("OCSP nonce >= 0.5x our pre-signed (10 conns)", f"{ratio:.2f}x", ratio >= 0.5))
    else:
        out.append(("OCSP nonce >= 0.5x our pre-signed", "not measured", None))
    est = _get(r, "est", "postgresql", "runs", "16")
    if est:
        complete = est["ok"] == est["attempted"] == est["recorded"]
        out.append(
            (
                "EST 16 clients >= 300/s on PostgreSQL, all recorded",
                f"{est['rate']:.1f}/s, {est['recorded']}/{est['attempted']} recorded",
                est["rate"] >= 300 and complete,
            )
        )
    else:
        out.append(("EST 16 clients >= 300/s on PostgreSQL", "not measured", None))
    big = _get(r, "crl", "1000000")
    if big:
        out.append(
            (
                "CRL 1M entries < 10 s and < 1 GiB",
                f"{big['publish_seconds']:.1f} s, {big['peak_rss_mib']:.0f} MiB",
                big["publish_seconds"] < 10 and big["peak_rss_mib"] < GIB,
            )
        )
    else:
        why = _get(r, "crl", "skipped") or "not measured"
        out.append(("CRL 1M entries < 10 s and < 1 GiB", str(why), None))
    delta = _get(r, "crl", "delta")
    if delta:
        out.append(
            (
                f"delta CRL after 100 revocations (on {delta['on_top_of']}) < 1 s",
                f"{delta['in_process_seconds']:.2f} s publishing "
                f"({delta['publish_seconds']:.2f} s as a `pki` command with start-up)",
                delta["in_process_seconds"] < 1,
            )
        )
    else:
        out.append(("delta CRL after 100 revocations < 1 s", "not measured", None))
    return out


def table(r: dict[str, Any]) -> str:
    """Formats the results as Markdown tables (stdout and bench/README.md)."""
    lines = []
    conns = r["plan"]["connections"]
    lines.append("### OCSP (wrk; req/s at each connection count; p50/p99 ms at 10)")
    lines.append("")
    head = " | ".join(f"c={c}" for c in conns)
    lines.append(f"| responder | {head} | p50 @10 | p99 @10 | errors @50 |")
    lines.append("|---" * (len(conns) + 4) + "|")
    for label, runs in (_get(r, "ocsp", "runs") or {}).items():
        if "skipped" in runs:
            lines.append(f"| {label} | " + " | ".join("-" for _ in conns) + " | - | - | skipped |")
            continue
        cells = " | ".join(_fmt(_get(runs, str(c), "rps")) for c in conns)
        ten = runs.get("10", {})
        last = runs.get(str(conns[-1]), {})
        errs = f"{last.get('socket_errors', 0)}/{last.get('non_2xx', 0)}"
        lines.append(
            f"| {label} | {cells} | {_fmt(ten.get('p50_ms'), '.2f')} | "
            f"{_fmt(ten.get('p99_ms'), '.2f')} | {errs} |"
        )
    runs = _get(r, "ocsp", "runs") or {}
    lines.append("")
    for ours, peer in (
        ("ours presigned POST", "cfssl POST"),
        ("ours presigned GET", "cfssl GET"),
        ("ours presigned POST (py)", "openssl ocsp POST (py)"),
        ("ours presigned POST (py)", "cfssl POST (py)"),
    ):
        cells = []
        for c in conns:
            cells.append(_ratio(_get(runs, ours, str(c), "rps"), _get(runs, peer, str(c), "rps")))
        lines.append(
            f"- ratio {ours} / {peer}: "
            + ", ".join(f"c={c} {x}" for c, x in zip(conns, cells, strict=True))
        )
    val = _get(r, "ocsp", "validation") or {}
    lines.append(
        "- validation (openssl ocsp -respin, status and nonce checked): "
        + ", ".join(f"{k} {v['valid']}/{v['checked']}" for k, v in val.items())
    )
    lines.append("")
    lines.append("### EST enrollment (enrollments/s, new TLS connection per device)")
    lines.append("")
    lines.append(
        "| database | clients | enroll/s | p50 ms | p99 ms | ok/attempted | recorded"
        " | TLS hello req/s |"
    )
    lines.append("|---|---|---|---|---|---|---|---|")
    for db in ("sqlite", "postgresql"):
        est = _get(r, "est", db)
        if not est:
            continue
        for c, run_ in est["runs"].items():
            hello = _get(est, "tls_hello", c, "rate")
            lines.append(
                f"| {db} | {c} | {run_['rate']:.1f} | {run_['p50_ms']:.0f} | "
                f"{run_['p99_ms']:.0f} | "
                f"{run_['ok']}/{run_['attempted']} | {run_['recorded']} | {_fmt(hello)} |"
            )
    hsm = _get(r, "hsm")
    if hsm:
        lines.append("")
        lines.append(
            f"- HSM ceiling (P-256 sign through the CA's Token/key): {hsm['one_process']:.0f}/s "
            f"one process, {hsm['two_processes']:.0f}/s two processes"
        )
    lines.append("")
    lines.append("### CRL (`pki crl publish`, one process each, SoftHSM signature, pkilint)")
    lines.append("")
    lines.append("| revoked entries | seconds | peak RSS MiB | DER bytes |")
    lines.append("|---|---|---|---|")
    for k, v in (_get(r, "crl") or {}).items():
        if isinstance(v, dict) and "publish_seconds" in v:
            name = f"delta (+100 on {v['on_top_of']})" if k == "delta" else k
            lines.append(
                f"| {name} | {v['publish_seconds']:.2f} | {v['peak_rss_mib']:.0f} | "
                f"{v['der_bytes']} |"
            )
    if _get(r, "crl", "skipped"):
        lines.append(f"\n- skipped: {r['crl']['skipped']}")
    fac = _get(r, "factory")
    lines.append("")
    lines.append("### Factory line")
    lines.append("")
    if fac:
        lines.append(
            f"- `pki factory run` station mode: {fac['devices']} devices in {fac['seconds']:.1f} s "
            f"= {fac['rate']:.1f} devices/s ({fac['factory_workers']} workers)"
        )
    lines.append("")
    lines.append("### Targets")
    lines.append("")
    lines.append("| target | measured | |")
    lines.append("|---|---|---|")
    for name, measured, met in targets(r):
        mark = "not measured" if met is None else ("met" if met else "NOT MET")
        lines.append(f"| {name} | {measured} | {mark} |")
    return "\n".join(lines)


def _child(fn: Any, out: Path, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    out.write_text(json.dumps(fn(*args, **kwargs), default=str))


def isolated(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Runs one benchmark in its own (spawned) process: SoftHSM reads its configuration once
    per process, and each benchmark has its own CA and token."""
    import multiprocessing

    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    try:
        p = multiprocessing.get_context("spawn").Process(
            target=_child, args=(fn, out, args, kwargs)
        )
        p.start()
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"{fn.__name__} failed (exit {p.exitcode})")
        return json.loads(out.read_text())
    finally:
        out.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller populations, shorter runs")
    parser.add_argument(
        "--only",
        action="append",
        choices=["ocsp", "est", "crl", "factory"],
        help="run only these benchmarks (repeatable)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    only = set(args.only or ["ocsp", "est", "crl", "factory"])
    ensure_tools()
    started = datetime.datetime.now(datetime.UTC)
    result: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "plan": dataclasses.asdict(plan),
        "machine": machine(),
        "load_before": os.getloadavg(),
    }
    work = Path(tempfile.mkdtemp(prefix="pki-bench-"))
    db_name = f"pki_bench_{os.getpid()}"
    print(f"bench/run {plan.name}: work directory {work}", flush=True)
    t_all = time.perf_counter()
    try:
        if "ocsp" in only or "est" in only:
            from bench.est import bench_est, bench_hsm
            from bench.ocsp import bench_ocsp

            main_dir = work / "ca"
            env = pki_env(main_dir)
            init_ca(main_dir, env)
            if "ocsp" in only:
                print("OCSP", flush=True)
                result["population"] = load_population(plan, env, work)
                result["ocsp"] = isolated(
                    bench_ocsp,
                    main_dir,
                    env,
                    work,
                    seconds=plan.wrk_seconds,
                    connections=plan.connections,
                    va_workers=2,
                )
            if "est" in only:
                print("EST", flush=True)
                result["hsm"] = isolated(bench_hsm, env, plan.hsm_seconds)
                result["est"] = {}
                result["est"]["sqlite"] = isolated(
                    bench_est, main_dir, env, work, name="sqlite", levels=plan.est_levels,
                    workers=2, threads=8, hello_requests=plan.hello_requests,
                )  # fmt: skip
                pg_dir = work / "ca-pg"
                pg_env = pki_env(pg_dir, create_database(db_name))
                init_ca(pg_dir, pg_env)
                result["est"]["postgresql"] = isolated(
                    bench_est, pg_dir, pg_env, work, name="postgresql", levels=plan.est_levels,
                    workers=2, threads=8, hello_requests=plan.hello_requests,
                )  # fmt: skip
        if "factory" in only:
            from bench.factory import bench_factory

            print("Factory line", flush=True)
            f_dir = work / "ca-factory"
            f_env = pki_env(f_dir, create_database(db_name + "_f"))
            init_ca(f_dir, f_env)
            result["factory"] = isolated(
                bench_factory, f_dir, f_env, work, devices=plan.factory_devices,
                ca_workers=2, threads=8, factory_workers=8,
            )  # fmt: skip
        if "crl" in only:
            from bench.crl import bench_crl

            print("CRL", flush=True)
            c_dir = work / "ca-crl"
            c_env = pki_env(c_dir)
            init_ca(c_dir, c_env)
            result["crl"] = isolated(bench_crl, c_env, plan.crl_sizes)
    finally:
        drop_database(db_name)
        drop_database(db_name + "_f")
        result["load_after"] = os.getloadavg()
        result["seconds"] = time.perf_counter() - t_all
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"{started.strftime('%Y%m%dT%H%M%SZ')}-{plan.name}.json"
        out.write_text(json.dumps(result, indent=1, default=str))
        if not args.keep:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    m = result["machine"]
    print()
    print(
        f"## bench/run {plan.name}: {m['cores']} cores, {m['cpu_model']}, "
        f"load {result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f}, "
        f"{result['seconds'] / 60:.1f} min"
    )
    print()
    print(table(result))
    print(f"\nJSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
