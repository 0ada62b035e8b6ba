"""gunicorn configuration of the validation authority (`pki serve va` runs gunicorn with it).

Settings come from the environment that `pki serve va` prepares: PKI_VA_BIND, PKI_VA_WORKERS,
PKI_VA_TIMEOUT, plus PKI_CONFIG_DIR and PKI_DATA_DIR for the app. Run by hand:

    PKI_CONFIG_DIR=ca-config PKI_DATA_DIR=dev-data gunicorn -c scripts/gunicorn_va.py

No preload_app: each worker builds the app after the fork and opens the PKCS#11 token (only
the OCSP-signer keys) lazily on its first OCSP request; a token session is never shared
across processes. The worker (api/ocsp_worker.py) answers OCSP on an event loop with
keep-alive and hands every other request to the Flask app: a response is a database lookup
and at most one signature, SoftHSM serialises signatures per process anyway, so scale with
workers, one per core.
"""

import os

bind = [os.environ.get("PKI_VA_BIND", "127.0.0.1:8080")]
workers = int(os.environ.get("PKI_VA_WORKERS", "2"))
worker_class = "api.ocsp_worker.OCSPWorker"
wsgi_app = "api.va:app_from_environment()"
preload_app = False

timeout = int(os.environ.get("PKI_VA_TIMEOUT", "30"))
graceful_timeout = 10
keepalive = 5
# RFC 6960 Appendix A.1 GET requests carry the base64 request in the path; a request for a
# few certificates fits well below gunicorn's largest request line.
limit_request_line = 8190
limit_request_fields = 50
# gunicorn 27 opens a control socket under $HOME by default; the VA needs none.
control_socket_disable = True
accesslog = "-"
# Control characters in logged fields (user, request line, User-Agent) print escaped.
logger_class = "api.escape.EscapingLogger"
errorlog = "-"
loglevel = os.environ.get("PKI_VA_LOGLEVEL", "info")
