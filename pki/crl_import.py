"""Import of a full CRL signed elsewhere: an offline root's CRL, signed in a ceremony.

The hook of `pki crl import`. The CRL is checked as if this process had signed it (signature,
issuer, number, validity, lint) and against the database: it must list every revoked,
unexpired certificate of the issuer, so that it can record the issuer's revocation marker and
the scheduler counts it as complete (pki/crl_publisher.py).
"""

from __future__ import annotations

import datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from pki import lint
from pki.clock import Clock
from pki.crl_publisher import PublishedCRL, is_self_signed
from pki.errors import bad_request, conflict
from pki.store import Database, session_scope
from pki.store.revocation_models import CertificateStateReader, CRLRepository

# A CRL signed on another machine may start a little ahead of this clock.
CLOCK_SKEW = datetime.timedelta(minutes=5)


class CRLImporter:
    """CRLImporter stores full CRLs that an issuer's key signed outside this process."""

    def __init__(self, db: Database, clock: Clock) -> None:
        self.db = db
        self.clock = clock

    def store(self, issuer_id: str, issuer_cert: x509.Certificate, crl_der: bytes) -> PublishedCRL:
        """Checks a full CRL of the issuer and stores it as the issuer's latest CRL."""
        try:
            crl = x509.load_der_x509_crl(crl_der)
        except ValueError as e:
            raise bad_request(f"not a DER CRL: {e}") from None
        if crl.issuer != issuer_cert.subject:
            raise bad_request(f"the CRL is not issued by {issuer_id}")
        public_key = issuer_cert.public_key()
        if not isinstance(
            public_key,
            ec.EllipticCurvePublicKey
            | rsa.RSAPublicKey
            | ed25519.Ed25519PublicKey
            | ed448.Ed448PublicKey,
        ) or not crl.is_signature_valid(public_key):
            raise bad_request(f"the CRL's signature does not verify with {issuer_id}'s key")
        extensions = {type(e.value) for e in crl.extensions}
        if x509.DeltaCRLIndicator in extensions:
            raise bad_request("a delta CRL cannot be imported; import the full CRL")
        if x509.CRLNumber not in extensions:
            raise bad_request("the CRL has no CRL Number (RFC 5280 §5.2.3)")
        number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        now = self.clock.now()
        next_update = crl.next_update_utc
        if next_update is None or next_update <= now:
            raise bad_request("the CRL has expired (or has no nextUpdate)")
        if crl.last_update_utc > now + CLOCK_SKEW:
            raise bad_request("the CRL's thisUpdate is in the future")
        lint.require_clean(
            lint.lint_crl(crl_der, authority=is_self_signed(issuer_cert)),
            f"CRL {number} of {issuer_id}",
        )
        listed = {r.serial_number for r in crl}
        with session_scope(self.db) as session:
            reader = CertificateStateReader(session)
            repo = CRLRepository(session)
            # Read first, as a publisher does: every revocation up to it is seen below.
            marker = reader.marker(issuer_id)
            if number <= repo.highest_number(issuer_id):
                raise conflict(f"CRL number {number} is not above {issuer_id}'s latest")
            missing = [
                serial
                for serial, _at, _reason in reader.revoked_entries(issuer_id, now)
                if int(serial, 16) not in listed
            ]
            if missing:
                raise conflict(
                    f"the CRL lacks {len(missing)} revoked certificate(s) of {issuer_id}, "
                    f"e.g. {missing[0]}: sign a new one"
                )
            repo.add_signed(
                issuer_id,
                crl_number=number,
                this_update=crl.last_update_utc,
                next_update=next_update,
                entries=len(listed),
                crl_der=crl_der,
                marker=marker,
                created_at=now,
            )
        return PublishedCRL(
            issuer_id,
            number,
            False,
            None,
            crl.last_update_utc,
            next_update,
            len(listed),
            crl_der,
            marker,
        )
