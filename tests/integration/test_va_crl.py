"""CRLs over real HTTP: `pki crl publish`, served by gunicorn `pki serve va`, checked by openssl."""

from __future__ import annotations

import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from cryptography import x509

from pki import lint
from tests.integration.conftest import PKI, DevCA
from tests.integration.test_va_support import (
    DeviceCert,
    VAServer,
    issue_device,
    run,
    serve_va,
)


@pytest.fixture
def va(dev_ca: DevCA, tmp_path: Path) -> Iterator[VAServer]:
    with serve_va(dev_ca, tmp_path, workers=1) as server:
        yield server


def fetch(va: VAServer, name: str, out: Path) -> requests.Response:
    r = requests.get(f"{va.url}/crl/{name}", timeout=10)
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "application/pkix-crl"
    out.write_bytes(r.content)
    return r


def to_pem(der: Path) -> Path:
    pem = der.with_suffix(".pem")
    result = run("openssl", "crl", "-inform", "DER", "-in", der, "-out", pem)
    assert result.returncode == 0, result.stderr
    return pem


def verify(
    ca: DevCA, crls: list[Path], cert: DeviceCert, tmp: Path
) -> subprocess.CompletedProcess[str]:
    bundle = tmp / "crls.pem"
    bundle.write_bytes(b"".join(p.read_bytes() for p in crls))
    return run(
        "openssl", "verify", "-crl_check", "-CRLfile", bundle,
        "-CAfile", ca.cert("chain.pem"), cert.path,
    )  # fmt: skip


class TestCRLOverHTTP:
    def test_full_crl_rejects_revoked_accepts_good(
        self, dev_ca: DevCA, va: VAServer, tmp_path: Path
    ) -> None:
        good = issue_device(dev_ca, tmp_path, "good-1")
        bad = issue_device(dev_ca, tmp_path, "bad-1")
        dev_ca.pki("revoke", bad.serial_hex, "--reason", "keyCompromise")
        dev_ca.pki("crl", "publish")
        der = tmp_path / "devices.der"
        fetch(va, "devices.crl", der)
        text = run("openssl", "crl", "-inform", "DER", "-in", der, "-text", "-noout").stdout
        assert "X509v3 CRL Number" in text
        assert "X509v3 Authority Key Identifier" in text
        assert "Next Update" in text
        assert "Issuing Distribution Point" in text and "Freshest CRL" in text
        assert bad.serial_hex.upper() in text.replace(":", "")
        assert lint.blocking(lint.lint_crl(der.read_bytes())) == []

        pem = to_pem(der)
        accepted = verify(dev_ca, [pem], good, tmp_path)
        assert accepted.returncode == 0, accepted.stdout + accepted.stderr
        refused = verify(dev_ca, [pem], bad, tmp_path)
        assert refused.returncode != 0
        assert "certificate revoked" in refused.stdout + refused.stderr

    def test_delta_lists_revocation_after_base(
        self, dev_ca: DevCA, va: VAServer, tmp_path: Path
    ) -> None:
        later = issue_device(dev_ca, tmp_path, "later-1")
        dev_ca.pki("crl", "publish")
        dev_ca.pki("revoke", later.serial_hex, "--reason", "superseded")
        dev_ca.pki("crl", "publish", "--delta")
        base, delta = tmp_path / "base.der", tmp_path / "delta.der"
        fetch(va, "devices.crl", base)
        fetch(va, "devices-delta.crl", delta)
        assert later.certificate.serial_number not in {
            r.serial_number for r in x509.load_der_x509_crl(base.read_bytes())
        }
        text = run("openssl", "crl", "-inform", "DER", "-in", delta, "-text", "-noout").stdout
        assert "Delta CRL Indicator" in text
        assert later.serial_hex.upper() in text.replace(":", "")
        assert lint.blocking(lint.lint_crl(delta.read_bytes())) == []
        base_number = x509.load_der_x509_crl(base.read_bytes()).extensions.get_extension_for_class(
            x509.CRLNumber
        )
        indicator = x509.load_der_x509_crl(delta.read_bytes()).extensions.get_extension_for_class(
            x509.DeltaCRLIndicator
        )
        assert indicator.value.crl_number == base_number.value.crl_number

    def test_root_crl_on_request(self, dev_ca: DevCA, va: VAServer, tmp_path: Path) -> None:
        # pki init signs the root's first CRL; a root ceremony publishes the next on request.
        first = requests.get(f"{va.url}/crl/root.crl", timeout=10)
        assert first.status_code == 200
        dev_ca.pki("crl", "publish", "--issuer", "root")
        der = tmp_path / "root.der"
        fetch(va, "root.crl", der)
        crl = x509.load_der_x509_crl(der.read_bytes())
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        assert (
            number
            == x509.load_der_x509_crl(first.content)
            .extensions.get_extension_for_class(x509.CRLNumber)
            .value.crl_number
            + 1
        )
        root = x509.load_pem_x509_certificate(dev_ca.cert("root.pem").read_bytes())
        assert crl.issuer == root.subject
        assert crl.is_signature_valid(root.public_key())  # type: ignore[arg-type]
        assert lint.blocking(lint.lint_crl(der.read_bytes(), authority=True)) == []

    def test_conditional_get_answers_304(self, dev_ca: DevCA, va: VAServer, tmp_path: Path) -> None:
        dev_ca.pki("crl", "publish")
        first = fetch(va, "devices.crl", tmp_path / "c.der")
        for header in ("ETag", "Last-Modified", "Expires", "Cache-Control"):
            assert header in first.headers
        etag = first.headers["ETag"]
        by_etag = requests.get(
            f"{va.url}/crl/devices.crl", headers={"If-None-Match": etag}, timeout=10
        )
        assert by_etag.status_code == 304
        by_date = requests.get(
            f"{va.url}/crl/devices.crl",
            headers={"If-Modified-Since": first.headers["Last-Modified"]},
            timeout=10,
        )
        assert by_date.status_code == 304
        dev_ca.pki("crl", "publish")
        newer = requests.get(
            f"{va.url}/crl/devices.crl", headers={"If-None-Match": etag}, timeout=10
        )
        assert newer.status_code == 200 and newer.headers["ETag"] != etag
        assert requests.get(f"{va.url}/crl/nope.crl", timeout=10).status_code == 404


def _crl_numbers(output: str) -> list[int]:
    return [int(n) for n in re.findall(r"CRL number (\d+)", output)]


def test_two_publishers_at_once_strictly_increasing(dev_ca_any: DevCA) -> None:
    """Two `pki crl publish` loops at once: each run publishes or, while the other holds the
    issuer's CRL lock, refuses (exit 5); numbers never repeat and each loop's increase."""
    outputs: list[str] = ["", ""]
    refused: list[int] = [0, 0]
    runs = 4

    def loop(index: int) -> None:
        for _ in range(runs):
            result = subprocess.run(
                [PKI, "crl", "publish"],
                env=dev_ca_any.env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if result.returncode == 5:
                assert "another publisher is signing its CRLs now; try again" in result.stderr
                assert "Traceback" not in result.stderr
                refused[index] += 1
            else:
                assert result.returncode == 0, result.stderr
                outputs[index] += result.stdout

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    numbers = [_crl_numbers(o) for o in outputs]
    # Each published run prints one full CRL number (its delta's line reads "(base N) number").
    assert [len(n) for n in numbers] == [runs - r for r in refused], (outputs, refused)
    assert sum(refused) < 2 * runs
    every = numbers[0] + numbers[1]
    assert len(set(every)) == len(every)
    for own in numbers:
        assert own == sorted(own)


def test_publish_if_due_for_cron(dev_ca: DevCA, tmp_path: Path) -> None:
    first = dev_ca.pki("crl", "publish", "--if-due")
    assert _crl_numbers(first.stdout) == [1], first.stdout
    second = dev_ca.pki("crl", "publish", "--if-due")
    assert "devices: not due" in second.stdout and _crl_numbers(second.stdout) == []
    cert = issue_device(dev_ca, tmp_path, "due-1")
    dev_ca.pki("revoke", cert.serial_hex, "--reason", "keyCompromise")
    third = dev_ca.pki("crl", "publish", "--if-due", "--delay", "0")
    # The first full CRL (1) came with its delta (2).
    assert _crl_numbers(third.stdout) == [3], third.stdout + third.stderr
