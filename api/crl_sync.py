"""CRL sync for brokers: fetch the chain's CRLs, check them, install a PEM bundle, reload.

A broker such as Mosquitto reads one PEM file of CRLs (`crlfile`) at start and on SIGHUP.
CRLSync keeps that file current: it fetches each configured CRL over HTTP with a conditional
GET, checks it against its issuer certificate (signature, freshness, CRL Number), writes the
bundle atomically, and then signals the broker. Any refusal leaves the installed file as it
was: a broker keeps enforcing the last good CRLs rather than an expired, forged or older one.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pki.clock import Clock, SystemClock
from pki.errors import ErrorKind, PKIError, bad_request, config_error, policy

# RFC 5280 §5.1.2.4: thisUpdate is the issue date; a publisher's clock a little ahead of ours
# is normal, one far ahead means a CRL from the future (or our clock is wrong).
DEFAULT_SKEW = datetime.timedelta(minutes=5)
DEFAULT_TIMEOUT = 10.0
# A CRL of 10^6 entries is about 40 MB of DER; refuse anything much larger before parsing it.
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
MIN_INTERVAL = 1.0
MAX_INTERVAL = 86_400.0
MAX_TIMEOUT = 300.0
RELOAD_COMMAND_TIMEOUT = 60.0

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----\r?\n.+?\r?\n-----END X509 CRL-----", re.DOTALL)
_STATE_VERSION = 1


def unavailable(message: str) -> PKIError:
    return PKIError(ErrorKind.UNAVAILABLE, message)


class ReloadFailed(PKIError):
    """ReloadFailed says the bundle is current on disk but the broker was not told."""

    def __init__(self, out: Path, cause: PKIError) -> None:
        super().__init__(
            cause.kind,
            f"{out} is current but the broker was not reloaded ({cause.message}); "
            "the next round tries again",
        )


def fingerprint(cert: x509.Certificate) -> str:
    """Returns the lower-case hex SHA-256 of a certificate's DER."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def _describe(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()


@dataclass(frozen=True)
class CRLSource:
    """CRLSource is one CRL URL and the CA certificates that may have signed it.

    With one issuer the CRL must come from it; with several (a chain file) the CRL's
    issuer name picks one, and its key must verify the signature.
    """

    url: str
    issuers: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        scheme = urllib.parse.urlsplit(self.url).scheme
        if scheme not in ("http", "https"):
            raise config_error(f"CRL URL {self.url!r} is not http:// or https://")
        if not self.issuers:
            raise config_error(f"no issuer certificate for {self.url}")


def load_certificates(pem: bytes, origin: str) -> list[x509.Certificate]:
    """Parses every certificate of a PEM file; refuses a file without any."""
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise config_error(f"{origin}: not a PEM certificate file") from None
    if not certs:
        raise config_error(f"{origin}: no certificate in it")
    for cert in certs:
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise config_error(f"{origin}: {_describe(cert)} is not a CA certificate")
    return certs


@dataclass(frozen=True)
class Fetched:
    """Fetched is one HTTP answer: a new body (200) or 'not modified' (304)."""

    not_modified: bool
    body: bytes
    etag: str | None
    last_modified: str | None


class Fetcher(Protocol):
    """Fetcher does the conditional GET of one URL."""

    def __call__(self, url: str, *, etag: str | None, last_modified: str | None) -> Fetched: ...


@dataclass(frozen=True)
class HTTPFetcher:
    """HTTPFetcher is a conditional GET over urllib with a timeout and a size limit."""

    timeout: float = DEFAULT_TIMEOUT
    max_bytes: int = DEFAULT_MAX_BYTES

    def __call__(self, url: str, *, etag: str | None, last_modified: str | None) -> Fetched:
        headers = {"Accept": "application/pkix-crl", "User-Agent": "iot-pki-crl-sync"}
        # RFC 9110 §13.1.2 and §13.1.3: If-None-Match takes precedence; send both so a
        # server that keeps only dates still answers 304.
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
        request = urllib.request.Request(url, headers=headers)  # noqa: S310 (scheme checked)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                body: bytes = response.read(self.max_bytes + 1)
                if len(body) > self.max_bytes:
                    raise PKIError(ErrorKind.TOO_LARGE, f"{url}: body over {self.max_bytes} bytes")
                return Fetched(
                    not_modified=False,
                    body=body,
                    etag=response.headers.get("ETag"),
                    last_modified=response.headers.get("Last-Modified"),
                )
        except urllib.error.HTTPError as e:
            e.close()  # it holds the connection's response
            if e.code == 304:
                return Fetched(
                    not_modified=True,
                    body=b"",
                    etag=e.headers.get("ETag") or etag,
                    last_modified=e.headers.get("Last-Modified") or last_modified,
                )
            raise unavailable(f"{url}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise unavailable(f"{url}: {e.reason}") from None
        except (OSError, TimeoutError) as e:
            raise unavailable(f"{url}: {e}") from None


def parse_crl(body: bytes, origin: str) -> x509.CertificateRevocationList:
    """Parses a CRL in DER or PEM; anything else is a clear bad_request."""
    try:
        if body.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(body)
        return x509.load_der_x509_crl(body)
    except ValueError:
        snippet = body[:40]
        raise bad_request(
            f"{origin}: the body is not a CRL (neither DER nor PEM; starts with {snippet!r})"
        ) from None


def crl_number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None


def _signed_by(crl: x509.CertificateRevocationList, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    try:
        return crl.is_signature_valid(key)  # type: ignore[arg-type]
    except TypeError:  # a key type that cannot sign CRLs (X25519...)
        return False


def _issuer_of(
    crl: x509.CertificateRevocationList, issuers: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    """Finds the certificate whose name issued the CRL and whose key verifies it."""
    for cert in issuers:
        if cert.subject == crl.issuer and _signed_by(crl, cert):
            return cert
    return None


@dataclass(frozen=True)
class InstalledCRL:
    """InstalledCRL is one CRL of the bundle, with the CA certificate that signed it."""

    issuer: x509.Certificate
    crl: x509.CertificateRevocationList
    url: str | None = None

    @property
    def number(self) -> int | None:
        return crl_number(self.crl)

    @property
    def crl_pem(self) -> bytes:
        return self.crl.public_bytes(serialization.Encoding.PEM)

    @property
    def crl_der(self) -> bytes:
        return self.crl.public_bytes(serialization.Encoding.DER)

    def describe(self) -> str:
        next_update = self.crl.next_update_utc
        nxt = next_update.isoformat() if next_update else "none"
        return f"{_describe(self.issuer)}: CRL Number {self.number}, nextUpdate {nxt}"


def check_crl(
    crl: x509.CertificateRevocationList,
    source: CRLSource,
    *,
    installed: InstalledCRL | None,
    now: datetime.datetime,
    skew: datetime.timedelta,
) -> x509.Certificate:
    """Checks a fetched CRL against its issuer and the installed one; returns the issuer.

    Refuses (PKIError, kind policy) a CRL not signed by a configured issuer, a delta CRL, a
    CRL without nextUpdate or CRL Number, an expired one, one from the future, and one whose
    CRL Number is lower than the installed one's (RFC 5280 §5.2.3: "monotonically increasing").
    """
    url = source.url
    named = [c for c in source.issuers if c.subject == crl.issuer]
    if not named:
        expected = " or ".join(_describe(c) for c in source.issuers)
        raise policy(
            f"refused CRL from {url}: issued by {crl.issuer.rfc4514_string()}, expected {expected}"
        )
    issuer = _issuer_of(crl, named)
    if issuer is None:
        raise policy(
            f"refused CRL from {url}: its signature does not verify with the key of "
            f"{_describe(named[0])} (signed by another key)"
        )
    try:
        crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
    except x509.ExtensionNotFound:
        pass
    else:
        raise policy(f"refused CRL from {url}: it is a delta CRL; the broker needs the full CRL")
    next_update = crl.next_update_utc
    if next_update is None:
        raise policy(f"refused CRL from {url}: it has no nextUpdate")
    if next_update <= now:
        raise policy(
            f"refused CRL from {url}: expired, nextUpdate {next_update.isoformat()} is not after "
            f"now ({now.isoformat()})"
        )
    this_update = crl.last_update_utc
    if this_update > now + skew:
        raise policy(
            f"refused CRL from {url}: thisUpdate {this_update.isoformat()} is in the future "
            f"(now {now.isoformat()}, allowed skew {int(skew.total_seconds())} s)"
        )
    number = crl_number(crl)
    if number is None:
        raise policy(f"refused CRL from {url}: it has no CRL Number")
    if installed is not None and installed.number is not None:
        if number < installed.number:
            raise policy(
                f"refused CRL from {url}: CRL Number {number} is lower than the installed "
                f"CRL Number {installed.number} of {_describe(issuer)} (a replay or a rollback)"
            )
        installed_this_update = installed.crl.last_update_utc
        if this_update < installed_this_update:
            # OpenSSL (and so Mosquitto, which keeps every CRL it ever loaded in its store)
            # prefers the CRL with the latest thisUpdate: an older one would be ignored.
            raise policy(
                f"refused CRL from {url}: thisUpdate {this_update.isoformat()} is before the "
                f"installed CRL's {installed_this_update.isoformat()}"
            )
        if (
            number == installed.number
            and crl.public_bytes(serialization.Encoding.DER) != installed.crl_der
        ):
            raise policy(
                f"refused CRL from {url}: CRL Number {number} is the installed one's but the "
                f"contents differ"
            )
    return issuer


def read_bundle(path: Path) -> list[x509.CertificateRevocationList]:
    """Reads every CRL of a PEM bundle; a missing file is an empty bundle."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    crls = []
    for block in _PEM_CRL.findall(data):
        try:
            crls.append(x509.load_pem_x509_crl(block))
        except ValueError:
            continue  # a damaged block: the next install replaces the file
    return crls


def write_atomically(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replaces path with data so a reader sees the old file or the new one, never a part.

    The temporary file lives in the same directory (os.replace is atomic only within one file
    system) and is fsynced before the rename; the directory is fsynced after it.
    """
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        mode = path.stat().st_mode & 0o777
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Reloader(Protocol):
    """Reloader tells the broker to read its CRL file again; returns what it did."""

    def __call__(self) -> str: ...


@dataclass(frozen=True)
class SignalReloader:
    """SignalReloader sends SIGHUP to a PID given as a number or read from a pid file."""

    pid: int | None = None
    pid_file: Path | None = None
    signum: int = signal.SIGHUP

    def _pid(self) -> int:
        if self.pid is not None:
            return self.pid
        assert self.pid_file is not None
        try:
            text = self.pid_file.read_text().strip()
        except OSError as e:
            raise unavailable(f"cannot read pid file {self.pid_file}: {e.strerror}") from None
        if not text.isdigit() or int(text) <= 1:
            raise config_error(f"pid file {self.pid_file} does not hold a process id: {text!r}")
        return int(text)

    def __call__(self) -> str:
        pid = self._pid()
        name = signal.Signals(self.signum).name
        try:
            os.kill(pid, self.signum)
        except ProcessLookupError:
            raise unavailable(f"cannot send {name}: no process {pid}") from None
        except PermissionError:
            raise unavailable(f"cannot send {name} to process {pid}: not permitted") from None
        return f"sent {name} to process {pid}"


@dataclass(frozen=True)
class CommandReloader:
    """CommandReloader runs a command (no shell), such as `systemctl reload mosquitto`."""

    argv: tuple[str, ...]
    timeout: float = RELOAD_COMMAND_TIMEOUT

    @classmethod
    def parse(cls, command: str) -> CommandReloader:
        argv = tuple(shlex.split(command))
        if not argv:
            raise config_error("the reload command is empty")
        return cls(argv)

    def __call__(self) -> str:
        shown = shlex.join(self.argv)
        try:
            result = subprocess.run(
                self.argv, capture_output=True, text=True, timeout=self.timeout, check=False
            )
        except FileNotFoundError:
            raise unavailable(f"reload command not found: {self.argv[0]}") from None
        except subprocess.TimeoutExpired:
            raise unavailable(f"reload command {shown!r} ran over {self.timeout:g} s") from None
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or [""]
            raise unavailable(
                f"reload command {shown!r} exited with {result.returncode}: {detail[0]}"
            )
        return f"ran {shown}"


@dataclass
class SyncResult:
    """SyncResult says what one round did: installed or not, and the bundle's CRLs."""

    changed: bool
    crls: list[InstalledCRL]
    not_modified: list[str] = field(default_factory=list)
    reload: str | None = None

    def summary(self, out: Path) -> str:
        lines = []
        if self.changed:
            lines.append(f"installed {len(self.crls)} CRL(s) in {out}")
        else:
            lines.append(f"{out} is current: nothing to install")
        for installed in self.crls:
            lines.append(f"  {installed.describe()}")
        if self.not_modified:
            lines.append(f"  not modified (304): {', '.join(self.not_modified)}")
        if self.reload:
            lines.append(f"  reload: {self.reload}")
        return "\n".join(lines)


class CRLSync:
    """CRLSync installs the CRLs of a chain where a broker reads them, then reloads it.

    The conditional-GET validators and the URL-to-issuer map live in a small JSON file beside
    the bundle (`<out>.sync.json`), so a run started by cron also sends If-None-Match.
    """

    def __init__(
        self,
        sources: Sequence[CRLSource],
        out: Path,
        *,
        reloader: Reloader | None = None,
        fetcher: Fetcher | None = None,
        clock: Clock | None = None,
        skew: datetime.timedelta = DEFAULT_SKEW,
        state_path: Path | None = None,
    ) -> None:
        if not sources:
            raise config_error("no CRL URL to sync")
        urls = [s.url for s in sources]
        if len(set(urls)) != len(urls):
            raise config_error("a CRL URL is given twice")
        self.sources = list(sources)
        self.out = out
        self.reloader = reloader
        self.fetch: Fetcher = fetcher or HTTPFetcher()
        self.clock: Clock = clock or SystemClock()
        self.skew = skew
        self.state_path = state_path or out.with_name(out.name + ".sync.json")

    # --- state ------------------------------------------------------------------------

    def _load_state(self) -> dict[str, Any]:
        try:
            state = json.loads(self.state_path.read_text())
        except (FileNotFoundError, ValueError):
            return {"version": _STATE_VERSION, "urls": {}, "reload_pending": False}
        if (
            not isinstance(state, dict)
            or state.get("version") != _STATE_VERSION
            or not isinstance(state.get("urls", {}), dict)
        ):
            # An unknown or damaged state only costs one unconditional GET.
            return {"version": _STATE_VERSION, "urls": {}, "reload_pending": False}
        state.setdefault("urls", {})
        state.setdefault("reload_pending", False)
        return state

    def _save_state(self, state: dict[str, Any]) -> None:
        write_atomically(
            self.state_path, json.dumps(state, indent=2, sort_keys=True).encode() + b"\n", 0o644
        )

    def _installed(self) -> dict[str, InstalledCRL]:
        """Maps issuer fingerprint to the installed CRL of the issuer, from the bundle."""
        every = [c for s in self.sources for c in s.issuers]
        found: dict[str, InstalledCRL] = {}
        for crl in read_bundle(self.out):
            issuer = _issuer_of(crl, every)
            if issuer is not None:
                found[fingerprint(issuer)] = InstalledCRL(issuer, crl)
        return found

    # --- one round --------------------------------------------------------------------

    def run_once(self) -> SyncResult:
        """Fetches, checks and (if anything changed) installs the bundle, then reloads.

        Either every CRL passes and the new bundle is installed, or PKIError is raised and
        the installed file, the sync state and the broker are left as they were.
        """
        state = self._load_state()
        installed = self._installed()
        now = self.clock.now()
        chosen: list[InstalledCRL] = []
        seen: dict[str, str] = {}
        validators: dict[str, dict[str, str | None]] = {}
        not_modified: list[str] = []
        for source in self.sources:
            known = state["urls"].get(source.url) or {}
            current = installed.get(str(known.get("issuer", "")))
            conditional = current is not None
            fetched = self.fetch(
                source.url,
                etag=known.get("etag") if conditional else None,
                last_modified=known.get("last_modified") if conditional else None,
            )
            if fetched.not_modified:
                if current is None:
                    raise unavailable(f"{source.url}: answered 304 to an unconditional GET")
                not_modified.append(source.url)
                entry = InstalledCRL(current.issuer, current.crl, source.url)
            else:
                crl = parse_crl(fetched.body, source.url)
                named = [c for c in source.issuers if c.subject == crl.issuer]
                signer = _issuer_of(crl, named)
                previous = installed.get(fingerprint(signer)) if signer is not None else None
                issuer = check_crl(crl, source, installed=previous, now=now, skew=self.skew)
                entry = InstalledCRL(issuer, crl, source.url)
            key = fingerprint(entry.issuer)
            if key in seen:
                raise config_error(
                    f"{source.url} and {seen[key]} both give CRLs of {_describe(entry.issuer)}"
                )
            seen[key] = source.url
            validators[source.url] = {
                "issuer": key,
                "etag": fetched.etag,
                "last_modified": fetched.last_modified,
            }
            chosen.append(entry)

        for entry in chosen:
            if entry.url in not_modified:
                next_update = entry.crl.next_update_utc
                if next_update is not None and next_update <= now:
                    raise policy(
                        f"the installed CRL of {_describe(entry.issuer)} expired at "
                        f"{next_update.isoformat()} and {entry.url} has nothing newer (304)"
                    )

        bundle = b"".join(e.crl_pem for e in chosen)
        try:
            old = self.out.read_bytes()
        except FileNotFoundError:
            old = None
        changed = old != bundle
        if changed:
            write_atomically(self.out, bundle)
        new_state = {"version": _STATE_VERSION, "urls": validators}
        reload_needed = changed or bool(state.get("reload_pending"))
        new_state["reload_pending"] = reload_needed and self.reloader is not None
        if new_state != state:
            self._save_state(new_state)
        result = SyncResult(changed=changed, crls=chosen, not_modified=not_modified)
        if reload_needed and self.reloader is not None:
            # A failed reload stays pending in the state, so the next round signals again
            # even though the bundle on disk is already current.
            try:
                result.reload = self.reloader()
            except PKIError as e:
                raise ReloadFailed(self.out, e) from None
            new_state["reload_pending"] = False
            self._save_state(new_state)
        return result

    def run_loop(
        self,
        interval: float,
        *,
        rounds: int | None = None,
        report: Callable[[SyncResult | PKIError], None],
        sleep: Callable[[float], None] = time.sleep,
    ) -> SyncResult | PKIError:
        """Runs a round every interval seconds (rounds times, or until stopped).

        A failed round is reported and the loop goes on: the installed file stays as it was
        and the next round tries again. Returns the outcome of the last round.
        """
        if not MIN_INTERVAL <= interval <= MAX_INTERVAL:
            raise config_error(
                f"interval must be between {MIN_INTERVAL:g} and {MAX_INTERVAL:g} seconds"
            )
        if rounds is not None and rounds < 1:
            raise config_error("rounds must be at least 1")
        done = 0
        while True:
            started = time.monotonic()
            outcome: SyncResult | PKIError
            try:
                outcome = self.run_once()
            except PKIError as e:
                outcome = e
            report(outcome)
            done += 1
            if rounds is not None and done >= rounds:
                return outcome
            sleep(max(0.0, interval - (time.monotonic() - started)))
