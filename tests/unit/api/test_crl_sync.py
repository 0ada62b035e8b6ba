"""Tests for api.crl_sync and `pki broker crl-sync`: fetch, check, install atomically, reload."""

from __future__ import annotations

import datetime
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from api.cli import main
from api.crl_sync import (
    CommandReloader,
    CRLSource,
    CRLSync,
    HTTPFetcher,
    ReloadFailed,
    SignalReloader,
    SyncResult,
    read_bundle,
    write_atomically,
)
from pki.clock import FixedClock
from pki.errors import ErrorKind, PKIError
from tests.unit.api.test_crl_sync_support import (
    CRLServer,
    HupRecorder,
    crl_server,
    hup_recorder,
    make_crl,
    now,
)
from tests.unit.pki.revocation_pki import RevocationPKI, make_pki

INT_PATH = "/crl/int.crl"
ROOT_PATH = "/crl/root.crl"


@pytest.fixture(scope="module")
def pki() -> RevocationPKI:
    return make_pki(leaf_count=2)


@pytest.fixture(scope="module")
def impostor() -> RevocationPKI:
    """Another hierarchy with the same names and different keys."""
    return make_pki(leaf_count=0)


@pytest.fixture
def server() -> Iterator[CRLServer]:
    with crl_server() as s:
        yield s


@pytest.fixture
def recorder(tmp_path: Path) -> Iterator[HupRecorder]:
    with hup_recorder(tmp_path) as r:
        yield r


def numbers(path: Path) -> list[int]:
    return [
        crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        for crl in read_bundle(path)
    ]


def der_to_pem(der: bytes) -> bytes:
    return x509.load_der_x509_crl(der).public_bytes(Encoding.PEM)


def int_sync(
    pki: RevocationPKI, server: CRLServer, out: Path, recorder: HupRecorder | None = None
) -> CRLSync:
    return CRLSync(
        [CRLSource(server.url(INT_PATH), (pki.intermediate,))],
        out,
        reloader=SignalReloader(pid=recorder.pid) if recorder else None,
        fetcher=HTTPFetcher(timeout=5),
    )


class TestCRLSyncInstall:
    def test_crl_sync_good_crl_installed_and_sighup_sent(
        self, pki: RevocationPKI, server: CRLServer, recorder: HupRecorder, tmp_path: Path
    ) -> None:
        der = make_crl(pki, 5, revoked=[pki.leaves[1]])
        server.serve(INT_PATH, der)
        out = tmp_path / "broker" / "crl.pem"
        result = int_sync(pki, server, out, recorder).run_once()
        assert result.changed
        assert out.read_bytes() == der_to_pem(der)
        assert recorder.wait_for(1) == 1
        assert result.reload == f"sent SIGHUP to process {recorder.pid}"
        assert out.stat().st_mode & 0o777 == 0o644
        assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")] == []

    def test_crl_sync_second_run_gets_304_and_changes_nothing(
        self, pki: RevocationPKI, server: CRLServer, recorder: HupRecorder, tmp_path: Path
    ) -> None:
        server.serve(INT_PATH, make_crl(pki, 5))
        out = tmp_path / "crl.pem"
        int_sync(pki, server, out, recorder).run_once()
        assert recorder.wait_for(1) == 1
        before = out.stat()
        content = out.read_bytes()
        # A second process (a fresh CRLSync) reads the validators from the state file.
        result = int_sync(pki, server, out, recorder).run_once()
        assert not result.changed
        assert result.not_modified == [server.url(INT_PATH)]
        assert result.reload is None
        assert server.statuses(INT_PATH) == [200, 304]
        assert server.requests[-1].if_none_match == server.files[INT_PATH].etag
        after = out.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert out.read_bytes() == content
        assert recorder.wait_for(0) == 1

    def test_crl_sync_newer_crl_replaces_installed_and_reloads(
        self, pki: RevocationPKI, server: CRLServer, recorder: HupRecorder, tmp_path: Path
    ) -> None:
        out = tmp_path / "crl.pem"
        server.serve(INT_PATH, make_crl(pki, 5))
        int_sync(pki, server, out, recorder).run_once()
        newer = make_crl(pki, 6, revoked=[pki.leaves[0]])
        server.serve(INT_PATH, newer)
        result = int_sync(pki, server, out, recorder).run_once()
        assert result.changed
        assert out.read_bytes() == der_to_pem(newer)
        assert numbers(out) == [6]
        assert recorder.wait_for(2) == 2

    def test_crl_sync_same_bytes_without_validators_does_not_reload(
        self, pki: RevocationPKI, server: CRLServer, recorder: HupRecorder, tmp_path: Path
    ) -> None:
        out = tmp_path / "crl.pem"
        server.serve(INT_PATH, make_crl(pki, 5), validators=False)
        int_sync(pki, server, out, recorder).run_once()
        result = int_sync(pki, server, out, recorder).run_once()
        assert server.statuses(INT_PATH) == [200, 200]
        assert not result.changed and result.reload is None
        assert recorder.wait_for(0) == 1

    def test_crl_sync_bundle_holds_every_crl_of_the_chain_in_order(
        self, pki: RevocationPKI, server: CRLServer, tmp_path: Path
    ) -> None:
        root_der = make_crl(pki, 1, issuer=pki.root, key=pki.root_key)
        int_der = make_crl(pki, 7)
        server.serve(ROOT_PATH, root_der)
        server.serve(INT_PATH, int_der)
        chain = (pki.root, pki.intermediate)
        out = tmp_path / "crl.pem"
        sync = CRLSync(
            [CRLSource(server.url(INT_PATH), chain), CRLSource(server.url(ROOT_PATH), chain)],
            out,
        )
        result = sync.run_once()
        assert out.read_bytes() == der_to_pem(int_der) + der_to_pem(root_der)
        assert [c.issuer for c in result.crls] == [pki.intermediate, pki.root]

    def test_crl_sync_accepts_pem_body(
        self, pki: RevocationPKI, server: CRLServer, tmp_path: Path
    ) -> None:
        pem = der_to_pem(make_crl(pki, 3))
        server.serve(INT_PATH, pem)
        out = tmp_path / "crl.pem"
        int_sync(pki, server, out).run_once()
        assert out.read_bytes() == pem

    def test_crl_sync_failed_reload_is_retried_next_round(
        self, pki: RevocationPKI, server: CRLServer, recorder: HupRecorder, tmp_path: Path
    ) -> None:
        out = tmp_path / "crl.pem"
        server.serve(INT_PATH, make_crl(pki, 5))
        missing = tmp_path / "gone.pid"
        failing = CRLSync(
            [CRLSource(server.url(INT_PATH), (pki.intermediate,))],
            out,
            reloader=SignalReloader(pid_file=missing),
        )
        with pytest.raises(ReloadFailed, match="is current but the broker was not reloaded"):
            failing.run_once()
        assert numbers(out) == [5]
        result = int_sync(pki, server, out, recorder).run_once()
        assert not result.changed
        assert result.reload is not None
        assert recorder.wait_for(1) == 1
        state = json.loads((tmp_path / "crl.pem.sync.json").read_text())
        assert state["reload_pending"] is False


class TestCRLSyncRefuses:
    """Each refusal leaves the installed bundle byte for byte as it was, and does not reload."""

    @pytest.fixture
    def installed(
        self, pki: RevocationPKI, server: CRLServer, recorder: HupRecorder, tmp_path: Path
    ) -> Path:
        out = tmp_path / "crl.pem"
        server.serve(INT_PATH, make_crl(pki, 5, revoked=[pki.leaves[1]]))
        int_sync(pki, server, out, recorder).run_once()
        assert recorder.wait_for(1) == 1
        return out

    def refused(
        self,
        pki: RevocationPKI,
        server: CRLServer,
        recorder: HupRecorder,
        out: Path,
        body: bytes,
        **served: object,
    ) -> PKIError:
        before = out.read_bytes()
        stat = out.stat()
        state = out.with_name(out.name + ".sync.json").read_bytes()
        server.serve(INT_PATH, body, **served)
        with pytest.raises(PKIError) as caught:
            int_sync(pki, server, out, recorder).run_once()
        assert out.read_bytes() == before
        assert (out.stat().st_ino, out.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
        assert out.with_name(out.name + ".sync.json").read_bytes() == state
        assert recorder.wait_for(0) == 1
        assert [p.name for p in out.parent.iterdir() if p.name.endswith(".tmp")] == []
        return caught.value

    def test_crl_sync_refuses_expired_crl(
        self, pki: RevocationPKI, server: CRLServer, recorder: HupRecorder, installed: Path
    ) -> None:
        past = now() - datetime.timedelta(days=2)
        body = make_crl(pki, 6, this_update=past, next_update=past + datetime.timedelta(days=1))
        error = self.refused(pki, server, recorder, installed, body)
        assert error.kind is ErrorKind.POLICY
        assert "expired" in error.message and "nextUpdate" in error.message

    def test_crl_sync_refuses_crl_signed_by_another_key(
        self,
        pki: RevocationPKI,
        impostor: RevocationPKI,
        server: CRLServer,
        recorder: HupRecorder,
        installed: Path,
    ) -> None:
        assert impostor.intermediate.subject == pki.intermediate.subject
        body = make_crl(impostor, 99)
        error = self.refused(pki, server, recorder, installed, body)
        assert error.kind is ErrorKind.POLICY
        assert "signed by another key" in error.message

    def test_crl_sync_refuses_lower_crl_number(
        self, pki: RevocationPKI, server: CRLServer, recorder: HupRecorder, installed: Path
    ) -> None:
        body = make_crl(pki, 4)
        error = self.refused(pki, server, recorder, installed, body)
        assert error.kind is ErrorKind.POLICY
        assert "CRL Number 4 is lower than the installed CRL Number 5" in error.message

    def test_crl_sync_refuses_higher_number_with_older_this_update(
        self, pki: RevocationPKI, server: CRLServer, recorder: HupRecorder, installed: Path
    ) -> None:
        body = make_crl(pki, 6, this_update=now() - datetime.timedelta(hours=1))
        error = self.refused(pki, server, recorder, installed, body)
        assert "is before the installed CRL's" in error.message

    def test_crl_sync_refuses_same_number_other_contents(
        self, pki: RevocationPKI, server: CRLServer, recorder: HupRecorder, installed: Path
    ) -> None:
        error = self.refused(pki, server, recorder, installed, make_crl(pki, 5))
        assert "contents differ" in error.message

    def test_crl_sync_refuses_body_that_is_not_a_crl(
        self, pki: RevocationPKI, server: CRLServer, recorder: HupRecorder, installed: Path
    ) -> None:
        error = self.refused(pki, server, recorder, installed, b"<html>maintenance</html>")
        assert error.kind is ErrorKind.BAD_REQUEST
        assert "not a CRL" in error.message

    def test_crl_sync_refuses_a_certificate_as_crl(
        self, pki: RevocationPKI, server: CRLServer, recorder: HupRecorder, installed: Path
    ) -> None:
        body = pki.intermediate.public_bytes(Encoding.DER)
        error = self.refused(pki, server, recorder, installed, body)
        assert "not a CRL" in error.message

    @pytest.mark.parametrize("status", [404, 500, 503])
    def test_crl_sync_refuses_http_error(
        self,
        pki: RevocationPKI,
        server: CRLServer,
        recorder: HupRecorder,
        installed: Path,
        status: int,
    ) -> None:
        error = self.refused(pki, server, recorder, installed, b"oops", status=status)
        assert error.kind is ErrorKind.UNAVAILABLE
        assert f"HTTP {status}" in error.message

    def test_crl_sync_refuses_unreachable_server(
        self, pki: RevocationPKI, recorder: HupRecorder, installed: Path
    ) -> None:
        before = installed.read_bytes()
        with crl_server() as gone:
            url = gone.url(INT_PATH)
        sync = CRLSync(
            [CRLSource(url, (pki.intermediate,))],
            installed,
            reloader=SignalReloader(pid=recorder.pid),
            fetcher=HTTPFetcher(timeout=2),
        )
        with pytest.raises(PKIError) as caught:
            sync.run_once()
        assert caught.value.kind is ErrorKind.UNAVAILABLE
        assert installed.read_bytes() == before
        assert recorder.wait_for(0) == 1

    def test_crl_sync_refuses_delta_crl(
        self, pki: RevocationPKI, server: CRLServer, recorder: HupRecorder, installed: Path
    ) -> None:
        error = self.refused(pki, server, recorder, installed, make_crl(pki, 6, delta_of=5))
        assert "delta CRL" in error.message

    def test_crl_sync_refuses_crl_from_the_future(
        self, pki: RevocationPKI, server: CRLServer, recorder: HupRecorder, installed: Path
    ) -> None:
        body = make_crl(pki, 6, this_update=now() + datetime.timedelta(hours=1))
        error = self.refused(pki, server, recorder, installed, body)
        assert "in the future" in error.message

    def test_crl_sync_refuses_crl_of_another_issuer(
        self, pki: RevocationPKI, server: CRLServer, recorder: HupRecorder, installed: Path
    ) -> None:
        body = make_crl(pki, 6, issuer=pki.root, key=pki.root_key)
        error = self.refused(pki, server, recorder, installed, body)
        assert "issued by" in error.message and "expected" in error.message

    def test_crl_sync_refuses_whole_bundle_when_one_crl_is_bad(
        self, pki: RevocationPKI, server: CRLServer, tmp_path: Path
    ) -> None:
        chain = (pki.root, pki.intermediate)
        out = tmp_path / "crl.pem"
        server.serve(ROOT_PATH, make_crl(pki, 1, issuer=pki.root, key=pki.root_key))
        server.serve(INT_PATH, make_crl(pki, 5))
        sources = [CRLSource(server.url(INT_PATH), chain), CRLSource(server.url(ROOT_PATH), chain)]
        CRLSync(sources, out).run_once()
        before = out.read_bytes()
        server.serve(ROOT_PATH, make_crl(pki, 2, issuer=pki.root, key=pki.root_key))
        server.serve(INT_PATH, make_crl(pki, 3))
        with pytest.raises(PKIError, match="lower than the installed"):
            CRLSync(sources, out).run_once()
        assert out.read_bytes() == before

    def test_crl_sync_expired_installed_crl_with_304_is_an_error(
        self, pki: RevocationPKI, server: CRLServer, tmp_path: Path
    ) -> None:
        out = tmp_path / "crl.pem"
        server.serve(INT_PATH, make_crl(pki, 5, next_update=now() + datetime.timedelta(hours=1)))
        int_sync(pki, server, out).run_once()
        later = CRLSync(
            [CRLSource(server.url(INT_PATH), (pki.intermediate,))],
            out,
            clock=FixedClock(now() + datetime.timedelta(hours=2)),
        )
        with pytest.raises(PKIError, match=r"expired at .* has nothing newer"):
            later.run_once()


class TestWriteAtomically:
    def test_write_atomically_replaces_and_keeps_mode(self, tmp_path: Path) -> None:
        path = tmp_path / "crl.pem"
        path.write_bytes(b"old")
        path.chmod(0o640)
        write_atomically(path, b"new")
        assert path.read_bytes() == b"new"
        assert path.stat().st_mode & 0o777 == 0o640
        assert sorted(p.name for p in tmp_path.iterdir()) == ["crl.pem"]

    def test_write_atomically_failure_leaves_old_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = tmp_path / "crl.pem"
        path.write_bytes(b"old")

        def broken(src: object, dst: object) -> None:
            raise OSError("disk full")

        monkeypatch.setattr(os, "replace", broken)
        with pytest.raises(OSError, match="disk full"):
            write_atomically(path, b"new")
        assert path.read_bytes() == b"old"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["crl.pem"]


class TestReloaders:
    def test_command_reloader_runs_without_shell(self, tmp_path: Path) -> None:
        marker = tmp_path / "reloaded"
        reloader = CommandReloader.parse(
            f"{sys.executable} -c 'import pathlib,sys; pathlib.Path(sys.argv[1]).touch()' {marker}"
        )
        assert reloader().startswith("ran ")
        assert marker.exists()

    def test_command_reloader_failure_names_exit_code(self) -> None:
        reloader = CommandReloader.parse(f"{sys.executable} -c 'import sys; sys.exit(3)'")
        with pytest.raises(PKIError, match="exited with 3"):
            reloader()

    def test_signal_reloader_missing_process(self, tmp_path: Path) -> None:
        pid_file = tmp_path / "p.pid"
        pid_file.write_text("999999999\n")
        with pytest.raises(PKIError, match="no process 999999999"):
            SignalReloader(pid_file=pid_file)()

    def test_signal_reloader_garbage_pid_file(self, tmp_path: Path) -> None:
        pid_file = tmp_path / "p.pid"
        pid_file.write_text("mosquitto\n")
        with pytest.raises(PKIError, match="does not hold a process id"):
            SignalReloader(pid_file=pid_file)()


class TestRunLoop:
    def test_run_loop_reports_failures_and_keeps_going(
        self, pki: RevocationPKI, server: CRLServer, tmp_path: Path
    ) -> None:
        out = tmp_path / "crl.pem"
        server.serve(INT_PATH, b"garbage")
        outcomes: list[SyncResult | PKIError] = []
        sleeps: list[float] = []
        good = make_crl(pki, 1)

        def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            if server.files[INT_PATH].body != good:
                server.serve(INT_PATH, good)

        last = int_sync(pki, server, out).run_loop(5, rounds=3, report=outcomes.append, sleep=sleep)
        assert isinstance(outcomes[0], PKIError)
        assert isinstance(outcomes[1], SyncResult) and outcomes[1].changed
        assert isinstance(last, SyncResult) and not last.changed
        assert len(sleeps) == 2 and all(0 <= s <= 5 for s in sleeps)

    @pytest.mark.parametrize("interval", [0.0, 86_401.0])
    def test_run_loop_interval_is_bounded(
        self, pki: RevocationPKI, server: CRLServer, tmp_path: Path, interval: float
    ) -> None:
        with pytest.raises(PKIError, match="interval must be between"):
            int_sync(pki, server, tmp_path / "c.pem").run_loop(interval, report=print)


class TestCLI:
    def invoke(self, *args: str) -> tuple[int, str]:
        result = CliRunner().invoke(main, ["broker", "crl-sync", *args])
        return result.exit_code, result.output

    def test_cli_installs_and_signals_pid_file(
        self, pki: RevocationPKI, server: CRLServer, recorder: HupRecorder, tmp_path: Path
    ) -> None:
        paths = pki.write(tmp_path)
        out = tmp_path / "crl.pem"
        url = server.serve(INT_PATH, make_crl(pki, 5))
        args = ["--url", url, "--issuer-cert", str(paths["int"]), "--out", str(out)]
        code, output = self.invoke(*args, "--pid-file", str(recorder.pid_file))
        assert code == 0, output
        assert f"installed 1 CRL(s) in {out}" in output
        assert "CRL Number 5" in output
        assert recorder.wait_for(1) == 1
        code, output = self.invoke(*args, "--pid-file", str(recorder.pid_file))
        assert code == 0, output
        assert "nothing to install" in output and "not modified (304)" in output
        assert recorder.wait_for(0) == 1

    def test_cli_refusal_exits_non_zero_with_message(
        self, pki: RevocationPKI, server: CRLServer, tmp_path: Path
    ) -> None:
        paths = pki.write(tmp_path)
        out = tmp_path / "crl.pem"
        url = server.serve(INT_PATH, make_crl(pki, 5))
        args = ["--url", url, "--chain", str(paths["chain"]), "--out", str(out)]
        assert self.invoke(*args)[0] == 0
        before = out.read_bytes()
        server.serve(INT_PATH, make_crl(pki, 2))
        code, output = self.invoke(*args)
        assert code == 2
        assert "error: refused CRL from" in output and "lower than the installed" in output
        assert f"{out} left unchanged" in output
        assert out.read_bytes() == before

    def test_cli_reload_failure_says_installed_not_unchanged(
        self, pki: RevocationPKI, server: CRLServer, tmp_path: Path
    ) -> None:
        paths = pki.write(tmp_path)
        url = server.serve(INT_PATH, make_crl(pki, 5))
        code, output = self.invoke(
            "--url", url, "--issuer-cert", str(paths["int"]), "--out", str(tmp_path / "c.pem"),
            "--reload-command", "false",
        )  # fmt: skip
        assert code == 5
        assert "is current but the broker was not reloaded" in output
        assert "left unchanged" not in output
        assert numbers(tmp_path / "c.pem") == [5]

    def test_cli_reload_command(
        self, pki: RevocationPKI, server: CRLServer, tmp_path: Path
    ) -> None:
        paths = pki.write(tmp_path)
        marker = tmp_path / "reloaded"
        url = server.serve(INT_PATH, make_crl(pki, 5))
        code, output = self.invoke(
            "--url", url, "--issuer-cert", str(paths["int"]), "--out", str(tmp_path / "c.pem"),
            "--reload-command", f"touch {marker}",
        )  # fmt: skip
        assert code == 0, output
        assert marker.exists()
        assert f"reload: ran touch {marker}" in output

    def test_cli_loop_with_rounds(
        self, pki: RevocationPKI, server: CRLServer, tmp_path: Path
    ) -> None:
        paths = pki.write(tmp_path)
        url = server.serve(INT_PATH, make_crl(pki, 5))
        code, output = self.invoke(
            "--url", url, "--issuer-cert", str(paths["int"]), "--out", str(tmp_path / "c.pem"),
            "--loop", "--interval", "1", "--rounds", "2",
        )  # fmt: skip
        assert code == 0, output
        assert output.count("installed 1 CRL(s)") == 1
        assert output.count("nothing to install") == 1

    @pytest.mark.parametrize(
        ("extra", "message"),
        [
            (["--pid", "1234", "--reload-command", "true"], "give one of --pid-file"),
            (["--issuer-cert", "ROOT"], "2 --issuer-cert"),
            (["--chain", "CHAIN"], "not both"),
            (["--rounds", "2"], "--rounds needs --loop"),
        ],
    )
    def test_cli_rejects_bad_option_combinations(
        self, pki: RevocationPKI, tmp_path: Path, extra: list[str], message: str
    ) -> None:
        paths = pki.write(tmp_path)
        extra = [
            str(paths["root"]) if e == "ROOT" else str(paths["chain"]) if e == "CHAIN" else e
            for e in extra
        ]
        code, output = self.invoke(
            "--url", "http://127.0.0.1:9/crl/int.crl", "--issuer-cert", str(paths["int"]),
            "--out", str(tmp_path / "c.pem"), *extra,
        )  # fmt: skip
        assert code != 0
        assert message in output

    def test_cli_rejects_non_ca_issuer_and_bad_scheme(
        self, pki: RevocationPKI, tmp_path: Path
    ) -> None:
        paths = pki.write(tmp_path)
        out = str(tmp_path / "c.pem")
        code, output = self.invoke(
            "--url", "http://127.0.0.1:9/x.crl", "--issuer-cert", str(paths["leaf0"]), "--out", out
        )
        assert code == 4 and "is not a CA certificate" in output
        code, output = self.invoke(
            "--url", "file:///etc/passwd", "--issuer-cert", str(paths["int"]), "--out", out
        )
        assert code == 4 and "is not http:// or https://" in output
