"""Device bindings: a device enrolls only the way, and with the manufacturer, it is bound to.

A device registered for one-time secrets never enrolls with a manufacturer certificate; a
device of manufacturer X never enrolls with Y's; the first IDevID that enrolls a device is
bound to it and no other IDevID enrolls it afterwards (DESIGN.md invariant 3). Re-enrollment
with the device's own certificate is outside of this: that certificate is ours.
"""

from __future__ import annotations

import datetime
import re

from pki.errors import ErrorKind, PKIError, bad_request
from pki.idevid import IDevID
from pki.store import Device, audit
from pki.store.enrollment_models import DeviceBinding, EnrollMethod
from pki.store.enrollment_repository import BindingRepository, session_of

_SHA256_RE = re.compile(r"^(?:[0-9a-f]{2}:?){31}[0-9a-f]{2}$")


def _forbidden(message: str) -> PKIError:
    return PKIError(ErrorKind.FORBIDDEN, message)


def manufacturer_fingerprint(text: str) -> str:
    """Normalises a manufacturer anchor's SHA-256 fingerprint (hex, colons allowed)."""
    value = text.strip().lower()
    if not _SHA256_RE.match(value):
        raise bad_request(
            "manufacturer must be the SHA-256 fingerprint of its anchor certificate "
            "(openssl x509 -noout -fingerprint -sha256 -in anchor.pem)"
        )
    return value.replace(":", "")


def check(
    device_id: str, binding: DeviceBinding | None, idevid: IDevID | None, *, new: bool = False
) -> None:
    """Refuses an initial enrollment the binding does not allow (None idevid: a secret).

    `new`: the device joins the registry by this enrollment (a label's auto-registration).
    """
    if binding is None:
        # A device registered before bindings were recorded may have enrolled by any
        # means: an IDevID that merely names it proves nothing, so only a device new to
        # the registry is bound by its first IDevID. A secret was drawn by an operator.
        if idevid is not None and not new:
            raise _forbidden(
                f"device {device_id} has no enrollment binding: an operator registers its "
                "manufacturer or draws a secret for it"
            )
        return  # bound by this enrollment
    if idevid is None:
        if binding.method is not EnrollMethod.SECRET:
            raise _forbidden(f"device {device_id} enrolls with its manufacturer certificate")
        return
    if binding.method is not EnrollMethod.IDEVID:
        raise _forbidden(f"device {device_id} enrolls with a one-time secret, not an IDevID")
    if binding.manufacturer_sha256 not in (None, idevid.anchor_sha256):
        raise _forbidden(f"device {device_id} is registered to another manufacturer")
    if binding.idevid_sha256 not in (None, idevid.sha256):
        raise _forbidden(f"device {device_id} is bound to another manufacturer certificate")


def bind(
    device: Device, idevid: IDevID | None, now: datetime.datetime, *, new: bool = False
) -> None:
    """Checks and records the binding in the enrollment's transaction (device row locked)."""
    session = session_of(device)
    device_id = device.id
    repo = BindingRepository(session)
    binding = repo.find(device_id)
    check(device_id, binding, idevid, new=new)
    if binding is None:
        method = EnrollMethod.SECRET if idevid is None else EnrollMethod.IDEVID
        binding = repo.add(DeviceBinding(device_id=device_id, method=method))
    if idevid is None or binding.idevid_sha256 is not None:
        return
    binding.manufacturer_sha256 = idevid.anchor_sha256
    binding.idevid_sha256 = idevid.sha256
    binding.idevid_issuer = idevid.issuer
    binding.idevid_serial = idevid.serial
    binding.bound_at = now
    audit.append(
        session,
        at=now,
        actor=f"device:{device_id}",
        action="device.idevid_bound",
        target=device_id,
        details={
            "idevid_sha256": idevid.sha256,
            "issuer": idevid.issuer,
            "serial": idevid.serial,
            "manufacturer_sha256": idevid.anchor_sha256,
            "manufacturer": idevid.anchor_subject,
        },
    )
