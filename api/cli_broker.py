"""`pki broker` commands: CRL sync for brokers and broker server certificates."""

from __future__ import annotations

import datetime
import signal
from pathlib import Path
from types import FrameType
from typing import NoReturn

import click

from api.crl_sync import (
    DEFAULT_MAX_BYTES,
    DEFAULT_SKEW,
    DEFAULT_TIMEOUT,
    MAX_INTERVAL,
    MAX_TIMEOUT,
    MIN_INTERVAL,
    CommandReloader,
    CRLSource,
    CRLSync,
    HTTPFetcher,
    Reloader,
    ReloadFailed,
    SignalReloader,
    SyncResult,
    load_certificates,
)
from api.runtime import Runtime
from pki.errors import PKIError, config_error
from pki.serial import serial_hex


def _runtime(ctx: click.Context) -> Runtime:
    obj = ctx.find_root().obj
    rt: Runtime | None = obj.get("runtime")
    if rt is None:
        rt = Runtime.open(obj["config_dir"], obj["data_dir"])
        obj["runtime"] = rt
    return rt


def build_sources(
    urls: tuple[str, ...], issuer_certs: tuple[Path, ...], chain: Path | None
) -> list[CRLSource]:
    """Pairs each --url with its --issuer-cert, or gives every URL the whole --chain."""
    if not urls:
        raise config_error("give at least one --url")
    if chain is not None and issuer_certs:
        raise config_error("give --issuer-cert per URL or one --chain, not both")
    if chain is not None:
        certs = tuple(load_certificates(chain.read_bytes(), str(chain)))
        return [CRLSource(url, certs) for url in urls]
    if len(issuer_certs) != len(urls):
        raise config_error(
            f"{len(urls)} --url but {len(issuer_certs)} --issuer-cert: give one issuer "
            "certificate per URL, in the same order, or a --chain file"
        )
    sources = []
    for url, path in zip(urls, issuer_certs, strict=True):
        found = load_certificates(path.read_bytes(), str(path))
        if len(found) != 1:
            raise config_error(f"{path}: holds {len(found)} certificates; --issuer-cert takes one")
        sources.append(CRLSource(url, (found[0],)))
    return sources


def build_reloader(
    pid_file: Path | None, pid: int | None, reload_command: str | None
) -> Reloader | None:
    """Picks the one reload method given, or none."""
    given = [x for x in (pid_file, pid, reload_command) if x is not None]
    if len(given) > 1:
        raise config_error("give one of --pid-file, --pid and --reload-command")
    if pid is not None:
        return SignalReloader(pid=pid)
    if pid_file is not None:
        return SignalReloader(pid_file=pid_file)
    if reload_command is not None:
        return CommandReloader.parse(reload_command)
    return None


def _exit_on_signal(signum: int, frame: FrameType | None) -> NoReturn:
    del signum, frame
    raise SystemExit(0)


def _echo(outcome: SyncResult | PKIError, out: Path) -> None:
    if isinstance(outcome, ReloadFailed):
        click.echo(f"error: {outcome.message}", err=True)
    elif isinstance(outcome, PKIError):
        click.echo(f"error: {outcome.message}; {out} left unchanged", err=True)
    else:
        click.echo(outcome.summary(out))


def register(group: click.Group) -> None:
    """Adds this module's commands to the pki group."""

    @group.group("broker")
    def broker() -> None:
        """MQTT broker integration: CRL sync and the broker's TLS certificate."""

    @broker.command("crl-sync")
    @click.option(
        "--url", "urls", multiple=True, required=True, help="CRL URL (repeatable, one per CA)."
    )
    @click.option(
        "--issuer-cert",
        "issuer_certs",
        multiple=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="PEM certificate of the CA that signs the CRL at the --url of the same position.",
    )
    @click.option(
        "--chain",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        default=None,
        help="PEM file of the chain's CA certificates; each CRL is matched by issuer name.",
    )
    @click.option(
        "--out",
        required=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help="PEM bundle to install (Mosquitto `crlfile`).",
    )
    @click.option(
        "--pid-file",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="Send SIGHUP to the PID in this file after installing.",
    )
    @click.option(
        "--pid", type=click.IntRange(min=2), default=None, help="Send SIGHUP to this PID."
    )
    @click.option(
        "--reload-command",
        default=None,
        help="Run this command (no shell) after installing, e.g. 'systemctl reload mosquitto'.",
    )
    @click.option("--loop", is_flag=True, help="Keep running, one round every --interval.")
    @click.option(
        "--interval",
        type=click.FloatRange(MIN_INTERVAL, MAX_INTERVAL),
        default=300.0,
        show_default=True,
        help="Seconds between rounds with --loop.",
    )
    @click.option(
        "--rounds",
        type=click.IntRange(min=1),
        default=None,
        help="With --loop, stop after this many rounds (default: run until stopped).",
    )
    @click.option(
        "--timeout",
        type=click.FloatRange(0.1, MAX_TIMEOUT),
        default=DEFAULT_TIMEOUT,
        show_default=True,
        help="HTTP timeout in seconds.",
    )
    @click.option(
        "--max-bytes",
        type=click.IntRange(min=1024),
        default=DEFAULT_MAX_BYTES,
        show_default=True,
        help="Largest CRL accepted.",
    )
    @click.option(
        "--skew",
        type=click.IntRange(0, 3600),
        default=int(DEFAULT_SKEW.total_seconds()),
        show_default=True,
        help="Seconds a CRL's thisUpdate may lie in the future.",
    )
    def crl_sync(
        urls: tuple[str, ...],
        issuer_certs: tuple[Path, ...],
        chain: Path | None,
        out: Path,
        pid_file: Path | None,
        pid: int | None,
        reload_command: str | None,
        loop: bool,
        interval: float,
        rounds: int | None,
        timeout: float,
        max_bytes: int,
        skew: int,
    ) -> None:
        """Fetch the chain's CRLs, check them, install the PEM bundle, reload the broker.

        Refuses, and leaves OUT untouched, on an expired CRL, one not signed by its issuer,
        one with a lower CRL Number than the installed one, a body that is not a CRL, and
        HTTP errors. A 304 answer keeps the installed CRL; nothing changed, nothing reloaded.
        """
        sync = CRLSync(
            build_sources(urls, issuer_certs, chain),
            out,
            reloader=build_reloader(pid_file, pid, reload_command),
            fetcher=HTTPFetcher(timeout=timeout, max_bytes=max_bytes),
            skew=datetime.timedelta(seconds=skew),
        )
        if not loop:
            if rounds is not None:
                raise config_error("--rounds needs --loop")
            try:
                result = sync.run_once()
            except ReloadFailed:
                raise
            except PKIError as e:
                e.message = f"{e.message}; {out} left unchanged"
                raise
            _echo(result, out)
            return
        # SIGTERM (systemd stop) ends the loop like Ctrl-C; SystemExit unwinds through
        # write_atomically, which removes its temporary file.
        previous = signal.signal(signal.SIGTERM, _exit_on_signal)
        try:
            last = sync.run_loop(interval, rounds=rounds, report=lambda o: _echo(o, out))
        except KeyboardInterrupt:
            return
        finally:
            signal.signal(signal.SIGTERM, previous)
        if isinstance(last, PKIError):
            raise click.exceptions.Exit(2)

    @broker.command("server-cert")
    @click.argument("names", nargs=-1, required=True)
    @click.option(
        "--out-dir",
        required=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Directory for server.pem (certificate and issuer) and server.key (0600).",
    )
    @click.option(
        "--issuer",
        "issuer_id",
        default=None,
        help="Issuer (default: the first in ca.toml that issues the server profile).",
    )
    @click.pass_context
    def server_cert(
        ctx: click.Context, names: tuple[str, ...], out_dir: Path, issuer_id: str | None
    ) -> None:
        """Issue the broker's TLS server certificate for DNS names and IP addresses.

        The key is generated here and written to OUT_DIR/server.key; the first NAME is the CN.
        """
        # api.cli imports this module to register it, so its helper is imported at call time.
        from api.cli import issue_server_certificate

        issued = issue_server_certificate(_runtime(ctx), list(names), out_dir, issuer_id)
        click.echo(
            f"issued server certificate serial {serial_hex(issued.serial)} for "
            f"{', '.join(names)}: {out_dir / 'server.pem'}, key {out_dir / 'server.key'}"
        )
