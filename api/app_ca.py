"""The CA front's Flask app: EST enrollment, the admin API and /healthz.

Built in each gunicorn worker after the fork (no preload_app): the token is opened in the
worker that uses it, through the Runtime, and its keys are handed to `pki` as key objects.
"""

from __future__ import annotations

import logging
import threading
import time

from flask import Flask, Response, jsonify
from werkzeug.exceptions import HTTPException

from api import admin, errors
from api.est.views import create_blueprint
from api.refusals import est_refusal_hook
from api.runtime import Runtime
from pki.device import DeviceService
from pki.enrollment import EnrollmentService
from pki.errors import ErrorKind, PKIError
from pki.est_config import ESTConfig, load_anchors, load_est_config, load_intermediates
from pki.issuer import Issuer
from pki.refusal import RefusalRecorder
from pki.revocation import RevocationService

log = logging.getLogger(__name__)

WARM_ATTEMPTS = 5
WARM_PAUSE_SECONDS = 0.5


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
            except Exception as e:  # token errors (hsm.HSMError) and the like
                log.error("cannot open issuer %s: %s", issuer_id, e)
                raise PKIError(ErrorKind.UNAVAILABLE, "the CA's token is unavailable") from e

    def ping_token(self) -> None:
        with self.lock:
            self.runtime.token.ping()


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


def _is_token_error(error: Exception) -> bool:
    # api.app_ca may not import hsm (import-linter); the token's one error type lives there.
    return type(error).__module__.split(".")[0] == "hsm"


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
    )

    @app.errorhandler(Exception)
    def _unexpected(error: Exception) -> Response | HTTPException:
        if isinstance(error, HTTPException):
            return error
        if _is_token_error(error):
            log.error("token error: %s", error)
            return errors.error_response(
                PKIError(ErrorKind.UNAVAILABLE, "the CA's token is unavailable"), plain=True
            )
        log.exception("unexpected error")
        return errors.error_response(PKIError(ErrorKind.INTERNAL, "internal error"), plain=True)

    app.register_blueprint(create_blueprint(service, est))

    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        database = token = "ok"  # noqa: S105 (a state, not a credential)
        try:
            runtime.db.ping()
        except Exception:  # any failure is the answer here
            database = "unavailable"
        try:
            issuers.ping_token()
        except Exception:
            token = "unavailable"  # noqa: S105 (a state, not a credential)
        healthy = database == token == "ok"
        body = {"status": "ok" if healthy else "degraded", "database": database, "token": token}
        return jsonify(body), 200 if healthy else 503

    admin.register(app, runtime)
    return app


def _warm(issuers: RuntimeIssuers, issuer_ids: list[str]) -> None:
    # Two workers logging in to SoftHSM at the same instant fail now and then (DESIGN.md):
    # retry after a short pause. A token still closed leaves the worker up, saying 503.
    for issuer_id in issuer_ids:
        for attempt in range(WARM_ATTEMPTS):
            try:
                issuers.issuer(issuer_id)
                break
            except PKIError as e:
                if e.kind is not ErrorKind.UNAVAILABLE or attempt == WARM_ATTEMPTS - 1:
                    log.error("issuer %s not ready: %s", issuer_id, e.message)
                    break
                time.sleep(WARM_PAUSE_SECONDS * (attempt + 1))


def app_from_environ() -> Flask:
    """Builds the app from PKI_CONFIG_DIR and PKI_DATA_DIR; gunicorn calls it in each worker."""
    return create_ca_app(Runtime.open(), warm=True)
