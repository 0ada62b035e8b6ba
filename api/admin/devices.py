"""Admin API for the device registry: bulk registration and one-time secrets (factory role)."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from flask import Blueprint, Response, jsonify, request

from api.runtime import Runtime
from pki.admin_token import AdminIdentity, Role
from pki.device import DeviceService
from pki.errors import bad_request
from pki.est_config import load_est_config

PROVISIONERS = frozenset({Role.FACTORY, Role.OPERATOR})
READERS = frozenset({Role.FACTORY, Role.OPERATOR, Role.AUDITOR})
MAX_DEVICES = 100_000


def pem_of(der: bytes) -> str:
    return x509.load_der_x509_certificate(der).public_bytes(Encoding.PEM).decode()


def _csv_of(devices: list[Any]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["id", "model", "batch", "manufacturer"])
    for i, item in enumerate(devices, start=1):
        if not isinstance(item, dict):
            raise bad_request(f"devices[{i}]: must be an object with id, model, batch")
        values = [
            item.get("id") or item.get("device_id"),
            item.get("model"),
            item.get("batch"),
            item.get("manufacturer"),
        ]
        if not all(v is None or isinstance(v, str) for v in values):
            raise bad_request(f"devices[{i}]: id, model, batch and manufacturer must be strings")
        writer.writerow([v or "" for v in values])
    return out.getvalue()


def _labels(body: dict[str, Any]) -> list[str]:
    """Reads the labels a secret is for: {"labels": [...]} or {"label": "..."}; none: default."""
    labels = body.get("labels", [body["label"]] if "label" in body else [])
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise bad_request("labels must be a list of EST label names")
    return labels


def add_device_routes(
    bp: Blueprint,
    runtime: Runtime,
    identity: Callable[[frozenset[Role]], AdminIdentity],
    json_body: Callable[[], dict[str, Any]],
) -> None:
    """Adds /devices routes to the admin blueprint."""
    est = load_est_config(runtime.config)
    devices = DeviceService(
        runtime.db,
        runtime.clock,
        secret_lifetime=est.secret_lifetime,
        max_failures=est.max_failures,
        lockout=est.lockout,
    )

    @bp.post("/devices")
    def register_devices() -> Response:
        """Registers devices in bulk; idempotent, all or nothing, offending rows named."""
        ident = identity(PROVISIONERS)
        items = json_body().get("devices")
        if not isinstance(items, list) or not items:
            raise bad_request("devices must be a non-empty list")
        if len(items) > MAX_DEVICES:
            raise bad_request(f"at most {MAX_DEVICES} devices per call")
        result = devices.import_csv(_csv_of(items), actor=ident.actor, source="devices")
        return jsonify({"added": result.added, "unchanged": result.unchanged})

    @bp.post("/devices/<device_id>/secret")
    def new_secret(device_id: str) -> Response:
        """Draws a new one-time enrollment secret; it is in this answer and nowhere else.

        For a device that has enrolled, only an admin may, with a "reason" in the body.
        """
        ident = identity(PROVISIONERS)
        body = json_body() if request.content_length else {}
        reason = body.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise bad_request("reason must be a string")
        labels = est.secret_labels(_labels(body))
        secret = devices.new_secret(
            device_id,
            actor=ident.actor,
            labels=labels,
            may_redraw=ident.role is Role.ADMIN,
            reason=reason,
        )
        return jsonify(
            {
                "device_id": secret.device_id,
                "secret": secret.secret,
                "expires_at": secret.expires_at.isoformat(),
                "labels": list(labels),
            }
        )

    @bp.get("/devices/<device_id>")
    def show_device(device_id: str) -> Response:
        identity(READERS)
        return jsonify(devices.show(device_id).as_dict())

    @bp.get("/devices/<device_id>/certificates")
    def device_certificates(device_id: str) -> Response:
        """Lists a device's issued certificates (PEM): a resumed factory run finds its own."""
        identity(READERS)
        pems = [pem_of(der) for der in devices.certificates(device_id)]
        return jsonify({"device_id": device_id, "certificates": pems})
