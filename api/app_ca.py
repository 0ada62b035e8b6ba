"""The CA front's Flask app: EST enrollment, the admin API and /healthz.

Built in each gunicorn worker after the fork (no preload_app): the token is opened in the
worker that uses it, through the Runtime, and its keys are handed to `pki` as key objects.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from flask import Flask, Response, jsonify

from api import admin, errors
from api.est.views import create_blueprint
from api.refusals import est_refusal_hook
from api.runtime import Runtime, domain_error
from pki import issuer_standing
from pki.device import DeviceService
from pki.enrollment import EnrollmentService
from pki.errors import ErrorKind, PKIError
from pki.est_config import ESTConfig, load_anchors, load_est_config, load_intermediates
from pki.issuer import Issuer
from pki.refusal import RefusalRecorder
from pki.revocation import RevocationService

log = logging.getLogger(__name__)


class RuntimeIssuers:
    """RuntimeIssuers opens issuers through the Runtime, one thread at a time.

    The Runtime caches issuers and the token lazily; worker threads must not race to open
    them. A token that cannot be opened becomes an `unavailable` domain error (HTTP 503).
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.lock = threading.Lock()

    def issuer(self, issuer_id: str) -> Issuer:
        with self.lock:
            try:
                return self.runtime.issuer(issuer_id)
            except PKIError:
                raise
            except Exception as e:
                error = domain_error(e)
                if error is None:
                    raise
                # Logged once, by whoever answers the error (one line per request).
                raise PKIError(ErrorKind.UNAVAILABLE, "the CA's token is unavailable") from e

    def ping_token(self) -> None:
        with self.lock:
            self.runtime.ping_tokens("ca")


def device_service(runtime: Runtime, est: ESTConfig) -> DeviceService:
    """Builds the device registry with est.toml's secret lifetime and lock-out."""
    return DeviceService(
        runtime.db,
        runtime.clock,
        secret_lifetime=est.secret_lifetime,
        max_failures=est.max_failures,
        max_address_failures=est.max_address_failures,
        lockout=est.lockout,
        revocation=RevocationService(runtime.db, runtime.clock),
    )


def enrollment_service(
    runtime: Runtime, est: ESTConfig, issuers: RuntimeIssuers | None = None
) -> EnrollmentService:
    """Builds the EST enrollment service of a runtime."""
    anchors = {
        name: load_anchors(est, name, runtime.data_dir)
        for name, label in est.labels.items()
        if label.manufacturer_anchors
    }
    return EnrollmentService(
        db=runtime.db,
        clock=runtime.clock,
        config=runtime.config,
        est=est,
        issuance=runtime.issuance(),
        issuers=issuers or RuntimeIssuers(runtime),
        devices=device_service(runtime, est),
        revocation=RevocationService(runtime.db, runtime.clock),
        anchors=anchors,
        intermediates={
            name: load_intermediates(est, name, runtime.data_dir)
            for name, label in est.labels.items()
            if label.manufacturer_intermediates
        },
    )


def create_ca_app(runtime: Runtime, *, est: ESTConfig | None = None, warm: bool = False) -> Flask:
    """Creates the CA front app: EST under /.well-known/est, admin API, /healthz."""
    est = est or load_est_config(runtime.config)
    app = Flask("pki-ca")
    issuers = RuntimeIssuers(runtime)
    service = enrollment_service(runtime, est, issuers)
    if warm:
        _warm(issuers, sorted({label.issuer for label in est.labels.values()}))

    refusals = RefusalRecorder(runtime.db, runtime.clock)
    errors.install(
        app,
        plain=True,
        observe=est_refusal_hook(refusals, est.proxy_networks(), est.proxy_cert_header),
        translate=domain_error,
    )

    app.register_blueprint(create_blueprint(service, est))
    label_issuers = sorted({label.issuer for label in est.labels.values()})

    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        # A write that changes nothing (a full disk or a read-only store fails it, a SELECT
        # would not) and a call into the token (fails while the token is gone, at once
        # after a PIN error: the PIN is never tried again here).
        database = _probe("database", runtime.db.check_write)
        token = _probe("token", issuers.ping_token)
        try:
            unfit = issuer_standing.problems(runtime.db, runtime.clock.now(), label_issuers)
        except Exception:  # the database probe above already says what went wrong
            unfit = {}
        healthy = database == token == "ok" and not unfit
        body: dict[str, object] = {
            "status": "ok" if healthy else "degraded",
            "database": database,
            "token": token,
        }
        if unfit:
            # A revoked or expired issuer issues nothing: EST answers 503 until it is replaced.
            body["issuers"] = unfit
        return jsonify(body), 200 if healthy else 503

    admin.register(app, runtime)
    return app


def _probe(name: str, check: Callable[[], None]) -> str:
    try:
        check()
    except Exception as e:  # any failure is the answer here
        if domain_error(e) is None:
            log.exception("health check of the %s failed", name)
        else:
            log.warning("health check: %s unavailable: %s", name, errors.describe(e))
        return "unavailable"
    return "ok"


def _warm(issuers: RuntimeIssuers, issuer_ids: list[str]) -> None:
    # One attempt per issuer: the token retries the login race of workers starting together
    # itself, and a PIN error must not be tried again. A token still closed leaves the
    # worker up, answering 503 until the token comes back.
    for issuer_id in issuer_ids:
        try:
            issuers.issuer(issuer_id)
        except PKIError as e:
            log.error("issuer %s not ready: %s", issuer_id, errors.describe(e))


def app_from_environ() -> Flask:
    """Builds the app from PKI_CONFIG_DIR and PKI_DATA_DIR; gunicorn calls it in each worker."""
    return create_ca_app(Runtime.open().use_process("ca"), warm=True)
