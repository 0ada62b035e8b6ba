"""gunicorn configuration of the CA front (`pki serve ca` runs gunicorn with this file).

Settings come from the environment that `pki serve ca` prepares:
PKI_CA_BIND, PKI_CA_WORKERS, PKI_CA_THREADS, PKI_CA_CERTFILE, PKI_CA_KEYFILE and
PKI_CA_CLIENT_CAS (files joined with os.pathsep), plus PKI_CONFIG_DIR and PKI_DATA_DIR for
the app. No preload_app: each worker builds the app, and so opens the PKCS#11 token, after
the fork; a token session must never be shared across processes.
"""

import os

from api.tls import ssl_context_hook

bind = [os.environ.get("PKI_CA_BIND", "127.0.0.1:8443")]
workers = int(os.environ.get("PKI_CA_WORKERS", "2"))
threads = int(os.environ.get("PKI_CA_THREADS", "8"))
worker_class = "api.tls.PeerCertThreadWorker"
wsgi_app = "api.app_ca:app_from_environ()"
preload_app = False

# TLS 1.2 or newer, client certificates optional but verified (api/tls.py).
certfile = os.environ["PKI_CA_CERTFILE"]
keyfile = os.environ["PKI_CA_KEYFILE"]
ssl_context = ssl_context_hook(os.environ["PKI_CA_CLIENT_CAS"].split(os.pathsep))

timeout = 60
graceful_timeout = 10
keepalive = 5
# A request line and headers are small in EST; the body limit is enforced by the app.
limit_request_line = 4094
limit_request_fields = 50
# gunicorn 27 opens a control socket under $HOME by default; the CA front needs none.
control_socket_disable = True
# The access log names the Basic user (device ID), never the password or the body.
accesslog = "-"
# Control characters in logged fields (user, request line, User-Agent) print escaped.
logger_class = "api.escape.EscapingLogger"
errorlog = "-"
loglevel = os.environ.get("PKI_CA_LOGLEVEL", "info")
