"""Every CRL URL resolves after one scheduler round, the root's too; chains check with deltas."""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import requests
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlalchemy import delete

from api.cli import main
from api.runtime import Runtime
from pki import lint
from pki.store import Database, session_scope
from pki.store.revocation_models import CRLRecord, CRLRepository
from tests.conftest import CONFIG_DIR
from tests.integration.conftest import DevCA
from tests.integration.test_va_support import VAServer, issue_device, run, serve_va
from tests.unit.pki.test_revocation_support import MovableClock

REPO = Path(__file__).resolve().parents[2]


def pem_chain(ca: DevCA) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(ca.cert("chain.pem").read_bytes())


def crl_urls(ext: x509.CRLDistributionPoints | x509.FreshestCRL) -> list[str]:
    return [
        name.value
        for point in ext
        for name in point.full_name or []
        if isinstance(name, x509.UniformResourceIdentifier)
    ]


def pointers(obj: x509.Certificate | x509.CertificateRevocationList) -> list[str]:
    """The CRL URLs a certificate (CRL Distribution Points) or a CRL (Freshest CRL) names."""
    found: list[str] = []
    for ext in obj.extensions:
        if isinstance(ext.value, x509.CRLDistributionPoints | x509.FreshestCRL):
            found += crl_urls(ext.value)
    return found


def fetch_all(va: VAServer, start: list[x509.Certificate]) -> dict[str, bytes]:
    """Follows the CRL pointers of the certificates and of every CRL fetched, from the VA.

    The URLs name the configured host (ca.toml [urls]); their path is asked of the test's VA."""
    todo = [url for cert in start for url in pointers(cert)]
    fetched: dict[str, bytes] = {}
    while todo:
        url = todo.pop()
        if url in fetched:
            continue
        r = requests.get(va.url + urllib.parse.urlsplit(url).path, timeout=10)
        assert r.status_code == 200, f"{url}: {r.status_code}"
        assert r.headers["Content-Type"] == "application/pkix-crl"
        fetched[url] = r.content
        todo += pointers(x509.load_der_x509_crl(r.content))
    return fetched


def verify(
    ca: DevCA, crls: dict[str, bytes], cert: Path, tmp: Path, *, extended: bool = True
) -> tuple[int, str]:
    """Runs openssl verify over the whole chain with the CRLs (full, delta, root) given.

    With -use_deltas alone, OpenSSL 3.0 scores a delta CRL like a complete one (the test that
    skips deltas sits in a branch taken only with extended CRL support) and, of two, uses the
    newer: a delta published after its base is then read as the complete CRL. -extended_crl
    makes it combine the base and the delta as RFC 5280 §5.2.4 says."""
    bundle = tmp / "crls.pem"
    bundle.write_bytes(
        b"".join(x509.load_der_x509_crl(d).public_bytes(Encoding.PEM) for d in crls.values())
    )
    flags = ["-crl_check_all", "-use_deltas", *(["-extended_crl"] if extended else [])]
    result = run(
        "openssl", "verify", *flags, "-CRLfile", bundle, "-CAfile", ca.cert("chain.pem"), cert
    )
    return result.returncode, result.stdout + result.stderr


def config_copy(tmp: Path, *replacements: tuple[str, str]) -> Path:
    """A copy of the test configuration with lines of ca.toml replaced."""
    target = tmp / "ca-config"
    shutil.copytree(CONFIG_DIR, target)
    toml = target / "ca.toml"
    text = toml.read_text()
    for old, new in replacements:
        assert old in text
        text = text.replace(old, new)
    toml.write_text(text)
    return target


def test_one_scheduler_round_every_crl_resolves_and_checks_the_chain(
    dev_ca_any: DevCA, tmp_path: Path
) -> None:
    ca = dev_ca_any
    good = issue_device(ca, tmp_path / "g", "RES-GOOD")
    on_full = issue_device(ca, tmp_path / "f", "RES-FULL")
    on_delta = issue_device(ca, tmp_path / "d", "RES-DELTA")
    ca.pki("revoke", on_full.serial_hex, "--reason", "keyCompromise")
    round_ = ca.pki("scheduler", "run", "--rounds", "1", "--revocation-delay", "0")
    assert "failed" not in round_.stderr, round_.stderr
    # The root's CRL was signed by pki init, where the root was online; the scheduler does
    # not open the root's token (ca.toml [processes]) and renews only the devices CA's.
    assert "root: not due" in round_.stdout and "devices: CRL number" in round_.stdout
    base = "http://127.0.0.1:8080/crl/"
    with serve_va(ca, tmp_path, workers=1) as va:
        crls = fetch_all(va, [good.certificate, *pem_chain(ca)])
        assert sorted(crls) == [base + "devices-delta.crl", base + "devices.crl", base + "root.crl"]
        full = x509.load_der_x509_crl(crls[base + "devices.crl"])
        delta = x509.load_der_x509_crl(crls[base + "devices-delta.crl"])
        root = x509.load_der_x509_crl(crls[base + "root.crl"])
        number = full.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        indicator = delta.extensions.get_extension_for_class(x509.DeltaCRLIndicator).value
        assert indicator.crl_number == number
        assert {r.serial_number for r in full} == {on_full.certificate.serial_number}
        assert len(delta) == 0 and len(root) == 0
        for url, der in crls.items():
            assert lint.blocking(lint.lint_crl(der, authority=url.endswith("root.crl"))) == []
        # The delta published with its base has the base's thisUpdate: plain -use_deltas too.
        for extended in (False, True):
            code, out = verify(ca, crls, good.path, tmp_path, extended=extended)
            assert code == 0, out
            code, out = verify(ca, crls, on_full.path, tmp_path, extended=extended)
            assert code != 0 and "certificate revoked" in out, out

        # Revoked after the full CRL: only the delta published next lists it.
        ca.pki("revoke", on_delta.serial_hex, "--reason", "keyCompromise")
        ca.pki("crl", "publish", "--delta")
        crls = fetch_all(va, [good.certificate, *pem_chain(ca)])
    later = x509.load_der_x509_crl(crls[base + "devices-delta.crl"])
    indicator = later.extensions.get_extension_for_class(x509.DeltaCRLIndicator).value
    assert indicator.crl_number == number
    assert {r.serial_number for r in later} == {on_delta.certificate.serial_number}
    assert lint.blocking(lint.lint_crl(crls[base + "devices-delta.crl"])) == []
    code, out = verify(ca, crls, good.path, tmp_path)
    assert code == 0, out
    for revoked in (on_full, on_delta):
        code, out = verify(ca, crls, revoked.path, tmp_path)
        assert code != 0 and "certificate revoked" in out, out


def test_deltas_off_no_crl_names_a_freshest_crl(dev_ca: DevCA, tmp_path: Path) -> None:
    config = config_copy(tmp_path, ("delta_crls = true", "delta_crls = false"))
    ca = DevCA(dev_ca.data_dir, config, None)
    round_ = ca.pki("scheduler", "run", "--rounds", "1", "--revocation-delay", "0")
    assert "failed" not in round_.stderr, round_.stderr
    explicit = ca.pki("crl", "publish", "--delta", check=False)
    assert explicit.returncode == 4 and "delta_crls" in explicit.stderr
    db = Database(ca.db_url())
    try:
        with session_scope(db) as s:
            repo = CRLRepository(s)
            for issuer_id in ("root", "devices"):
                assert repo.latest(issuer_id, is_delta=True) is None
                latest = repo.latest(issuer_id, is_delta=False)
                assert latest is not None and latest.crl_der is not None
                crl = x509.load_der_x509_crl(latest.crl_der)
                assert x509.FreshestCRL not in {type(e.value) for e in crl.extensions}
    finally:
        db.dispose()


def test_offline_root_is_left_to_import_without_failing_the_round(
    dev_ca: DevCA, tmp_path: Path
) -> None:
    config = config_copy(tmp_path, ('key_label = "root-ca"', 'key_label = "root-ca-offline"'))
    ca = DevCA(dev_ca.data_dir, config, None)
    # pki init signed the root's first CRL; without it the round finds the root's CRL due.
    db = Database(ca.db_url())
    with session_scope(db) as s:
        s.execute(delete(CRLRecord).where(CRLRecord.issuer_id == "root"))
    db.dispose()
    round_ = ca.pki("scheduler", "run", "--rounds", "1", "--revocation-delay", "0")
    assert "failed" not in round_.stderr, round_.stderr
    assert "root: CRL due (no CRL yet) but the issuer key is not in this token" in round_.stderr
    assert "pki crl import" in round_.stderr
    assert "devices: CRL number" in round_.stdout
    explicit = ca.pki("crl", "publish", "--issuer", "root", check=False)
    assert explicit.returncode == 3, explicit.stdout + explicit.stderr
    assert explicit.stderr.count("\n") == 1 and "pki crl import" in explicit.stderr


def renewal_rounds(config: Path, data_dir: Path) -> None:
    """Runs scheduler rounds on a movable clock and checks the root CRL is renewed in time."""
    clock = MovableClock()
    rt = Runtime.open(config, data_dir, environ=dict(os.environ))
    rt.clock = clock
    obj = {"config_dir": str(config), "data_dir": str(data_dir), "runtime": rt}
    # The first round signs the root's CRL at this clock's time, not pki init's.
    with session_scope(rt.db) as s:
        s.execute(delete(CRLRecord).where(CRLRecord.issuer_id == "root"))
    # A period longer than the validity: only the renewal fraction makes the CRL due.
    args = ["scheduler", "run", "--rounds", "1", "--crl-period", "43200"]

    def root_crls() -> list[tuple[int, datetime.datetime]]:
        with session_scope(rt.db) as s:
            latest = CRLRepository(s).latest("root", is_delta=False)
            assert latest is not None
            return [(latest.crl_number, latest.this_update)]

    try:
        first = CliRunner().invoke(main, args, obj=obj)
        assert first.exit_code == 0 and "failed" not in first.output, first.output
        published = root_crls()
        validity = datetime.timedelta(hours=rt.config.ca.revocation.crl_validity_hours)
        renew_at = validity * rt.config.ca.revocation.crl_renew_fraction
        clock.advance(renew_at - datetime.timedelta(minutes=1))
        CliRunner().invoke(main, args, obj=obj)
        assert root_crls() == published
        clock.advance(datetime.timedelta(minutes=1))
        second = CliRunner().invoke(main, args, obj=obj)
        assert "root: due (renewal before nextUpdate)" in second.output, second.output
        ((number, this_update),) = root_crls()
        assert number > published[0][0] and this_update == clock.now()
    finally:
        rt.db.dispose()


def test_scheduler_renews_the_root_crl_before_its_next_update(
    dev_ca: DevCA, tmp_path: Path
) -> None:
    # Where the root is online, the scheduler may open its token ([processes] lists it).
    config = config_copy(tmp_path, ('scheduler = ["ca", "va"]', 'scheduler = ["ca", "va", "root"]'))
    # The rounds run in a child process: SoftHSM reads its configuration once per process, and
    # this one keeps the token store of the unit tests.
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path;"
            "from tests.integration.test_crl_resolve import renewal_rounds;"
            "renewal_rounds(Path(sys.argv[1]), Path(sys.argv[2]))",
            str(config),
            str(dev_ca.data_dir),
        ],
        env=dev_ca.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert child.returncode == 0, child.stdout + child.stderr
