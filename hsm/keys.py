"""Private keys that live in the token and sign through it, as cryptography's own key types."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

from cryptography.hazmat.primitives import _serialization, hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric import padding as _padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature
from cryptography.utils import Buffer
from pkcs11 import MGF, Mechanism

from hsm.errors import HSMError, HSMErrorKind
from hsm.uri import PKCS11URI

if TYPE_CHECKING:
    # NoDigestInfo exists from cryptography 47 on; it is only named in a signature here.
    from cryptography.hazmat.primitives.asymmetric.utils import NoDigestInfo

    from hsm.token import Token

# SHA-1 and MD5 are refused: a CA has no business making new signatures with them.
_HASHES: dict[str, tuple[Mechanism, MGF, Mechanism, Mechanism]] = {
    # name: (hash mechanism, MGF1 with that hash, hash-and-sign PKCS#1 v1.5, hash-and-sign PSS)
    "sha256": (
        Mechanism.SHA256,
        MGF.SHA256,
        Mechanism.SHA256_RSA_PKCS,
        Mechanism.SHA256_RSA_PKCS_PSS,
    ),
    "sha384": (
        Mechanism.SHA384,
        MGF.SHA384,
        Mechanism.SHA384_RSA_PKCS,
        Mechanism.SHA384_RSA_PKCS_PSS,
    ),
    "sha512": (
        Mechanism.SHA512,
        MGF.SHA512,
        Mechanism.SHA512_RSA_PKCS,
        Mechanism.SHA512_RSA_PKCS_PSS,
    ),
}

# RFC 8017 §9.2, note 1: the DER encoding T of the DigestInfo value is, for SHA-256,
# 30 31 30 0d 06 09 60 86 48 01 65 03 04 02 01 05 00 04 20 || H (likewise SHA-384, SHA-512).
# CKM_RSA_PKCS signs what it is given, so a prehashed PKCS#1 v1.5 signature needs this prefix.
_DIGEST_INFO_PREFIX = {
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}

# ECDSA hashes in Python, so any of these digests can be signed with CKM_ECDSA.
_ECDSA_HASHES = frozenset(
    {"sha224", "sha256", "sha384", "sha512", "sha3-224", "sha3-256", "sha3-384", "sha3-512"}
)


class _TokenKey:
    """Holds what every token key shares: its token, label, CKA_ID and cached public key."""

    def __init__(self, token: Token, label: str, key_id: bytes) -> None:
        self._token = token
        self._label = label
        self._key_id = key_id

    @property
    def label(self) -> str:
        """Returns the key's CKA_LABEL."""
        return self._label

    @property
    def key_id(self) -> bytes:
        """Returns the key's CKA_ID."""
        return self._key_id

    @property
    def uri(self) -> str:
        """Returns the RFC 7512 URI that names this key."""
        return str(
            PKCS11URI(token=self._token.label, object=self._label, id=self._key_id, type="private")
        )

    @property
    def token(self) -> Token:
        """Returns the token the key lives in."""
        return self._token

    def _refusal(self, operation: str) -> HSMError:
        return HSMError(
            HSMErrorKind.UNSUPPORTED,
            f"{operation} is not possible: key {self._label!r} lives in token "
            f"{self._token.label!r} (sensitive, not extractable) and never leaves it",
        )

    def _copy_refused(self) -> NoReturn:
        # A copy would share the token handle anyway; refusing keeps callers from believing
        # they hold an independent, exportable key.
        raise TypeError(
            f"key {self._label!r} lives in token {self._token.label!r}; "
            "it cannot be copied or pickled, load it again with Token.load_key"
        )

    def __reduce__(self) -> NoReturn:
        self._copy_refused()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.uri}>"


class HSMECPrivateKey(_TokenKey, ec.EllipticCurvePrivateKey):
    """Signs with an EC key in the token: hashes in Python, then CKM_ECDSA, then DER."""

    def __init__(
        self, token: Token, label: str, key_id: bytes, public_key: ec.EllipticCurvePublicKey
    ) -> None:
        super().__init__(token, label, key_id)
        self._public_key = public_key

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """Returns the public key read from the token's public object."""
        return self._public_key

    @property
    def curve(self) -> ec.EllipticCurve:
        """Returns the key's curve."""
        return self._public_key.curve

    @property
    def key_size(self) -> int:
        """Returns the bit size of the curve."""
        return self._public_key.curve.key_size

    def sign(self, data: Buffer, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        """Returns a DER ECDSA signature over `data` made in the token."""
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise HSMError(HSMErrorKind.UNSUPPORTED, "EC token keys sign with ECDSA only")
        if signature_algorithm.deterministic_signing:
            raise HSMError(
                HSMErrorKind.UNSUPPORTED,
                "deterministic ECDSA (RFC 6979) is not offered through CKM_ECDSA",
            )
        algorithm = signature_algorithm.algorithm
        hash_algorithm = algorithm._algorithm if isinstance(algorithm, Prehashed) else algorithm
        if hash_algorithm.name not in _ECDSA_HASHES:
            raise HSMError(
                HSMErrorKind.UNSUPPORTED, f"ECDSA with {hash_algorithm.name} is not allowed"
            )
        digest = _digest(data, algorithm)
        # SoftHSM 2.6.1 offers CKM_ECDSA but not CKM_ECDSA_SHA256 and friends, so the hash is
        # computed here and the token signs the digest. PKCS#11 (mechanisms, ECDSA): "The
        # signature octets correspond to the concatenation of the ECDSA values r and s, both
        # represented as an octet string of equal length"; X.509 wants the DER SEQUENCE.
        raw = self._token._sign(self._label, self._key_id, Mechanism.ECDSA, digest)
        half = len(raw) // 2
        return encode_dss_signature(
            int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
        )

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        """Refuses: token keys are created for signing only (CKA_DERIVE false)."""
        raise self._refusal("ECDH key exchange")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        """Refuses: the private value never leaves the token."""
        raise self._refusal("private_numbers()")

    def private_bytes(
        self,
        encoding: _serialization.Encoding,
        format: _serialization.PrivateFormat,
        encryption_algorithm: _serialization.KeySerializationEncryption,
    ) -> bytes:
        """Refuses: the private value never leaves the token."""
        raise self._refusal("private_bytes()")

    def __copy__(self) -> ec.EllipticCurvePrivateKey:
        self._copy_refused()

    def __deepcopy__(self, memo: dict[Any, Any]) -> ec.EllipticCurvePrivateKey:
        self._copy_refused()


class HSMRSAPrivateKey(_TokenKey, rsa.RSAPrivateKey):
    """Signs with an RSA key in the token with PKCS#1 v1.5 or PSS."""

    def __init__(
        self, token: Token, label: str, key_id: bytes, public_key: rsa.RSAPublicKey
    ) -> None:
        super().__init__(token, label, key_id)
        self._public_key = public_key

    def public_key(self) -> rsa.RSAPublicKey:
        """Returns the public key read from the token's public object."""
        return self._public_key

    @property
    def key_size(self) -> int:
        """Returns the modulus size in bits."""
        return self._public_key.key_size

    def sign(
        self,
        data: Buffer,
        padding: _padding.AsymmetricPadding,
        algorithm: Prehashed | hashes.HashAlgorithm | NoDigestInfo,
    ) -> bytes:
        """Returns an RSA signature over `data` made in the token."""
        if not isinstance(algorithm, Prehashed | hashes.HashAlgorithm):
            # NoDigestInfo asks for a bare PKCS#1 v1.5 signature over caller-made bytes; a CA
            # signs hashes of what it built, so that door stays shut.
            raise HSMError(
                HSMErrorKind.UNSUPPORTED, "RSA token keys sign a hash (or Prehashed) only"
            )
        prehashed = isinstance(algorithm, Prehashed)
        hash_algorithm = algorithm._algorithm if isinstance(algorithm, Prehashed) else algorithm
        mechanisms = _HASHES.get(hash_algorithm.name)
        if mechanisms is None:
            raise HSMError(
                HSMErrorKind.UNSUPPORTED,
                f"RSA signatures with {hash_algorithm.name} are not supported "
                "(use SHA-256, SHA-384 or SHA-512)",
            )
        hash_mechanism, mgf, pkcs1_mechanism, pss_mechanism = mechanisms
        payload = _digest(data, algorithm) if prehashed else bytes(data)

        if isinstance(padding, _padding.PKCS1v15):
            if prehashed:
                payload = _DIGEST_INFO_PREFIX[hash_algorithm.name] + payload
                return self._token._sign(self._label, self._key_id, Mechanism.RSA_PKCS, payload)
            return self._token._sign(self._label, self._key_id, pkcs1_mechanism, payload)

        if isinstance(padding, _padding.PSS):
            mgf_function = padding.mgf
            if (
                not isinstance(mgf_function, _padding.MGF1)
                or mgf_function._algorithm.name != hash_algorithm.name
            ):
                # SoftHSM checks that CK_RSA_PKCS_PSS_PARAMS.mgf matches the hash; so do we.
                raise HSMError(
                    HSMErrorKind.UNSUPPORTED,
                    "PSS needs MGF1 with the same hash as the signature",
                )
            salt_length = self._pss_salt_length(padding, hash_algorithm.digest_size)
            # PKCS#11 CK_RSA_PKCS_PSS_PARAMS = {hashAlg, mgf, sLen}.
            param = (hash_mechanism, mgf, salt_length)
            mechanism = Mechanism.RSA_PKCS_PSS if prehashed else pss_mechanism
            return self._token._sign(self._label, self._key_id, mechanism, payload, param)

        raise HSMError(
            HSMErrorKind.UNSUPPORTED,
            f"RSA token keys sign with PKCS1v15 or PSS, not {type(padding).__name__}",
        )

    def _pss_salt_length(self, pss: _padding.PSS, digest_size: int) -> int:
        # RFC 8017 §9.1.1: emLen = ceil((modBits - 1) / 8) and "If emLen < hLen + sLen + 2,
        # output 'encoding error'", so the longest salt is emLen - hLen - 2. That is what
        # OpenSSL signs with for PSS.MAX_LENGTH, and what we ask the token for.
        max_salt = (self.key_size + 6) // 8 - digest_size - 2
        salt = pss._salt_length
        if salt is _padding.PSS.DIGEST_LENGTH:
            length = digest_size
        elif salt is _padding.PSS.MAX_LENGTH:
            length = max_salt
        elif isinstance(salt, int):
            length = salt
        else:
            raise HSMError(
                HSMErrorKind.UNSUPPORTED,
                "PSS.AUTO is for verification; sign with DIGEST_LENGTH, MAX_LENGTH or a number",
            )
        if length > max_salt:
            raise ValueError(f"PSS salt length {length} is too long for a {self.key_size}-bit key")
        return length

    def decrypt(self, ciphertext: bytes, padding: _padding.AsymmetricPadding) -> bytes:
        """Refuses: token keys are created for signing only (CKA_DECRYPT false)."""
        raise self._refusal("RSA decryption")

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        """Refuses: the private value never leaves the token."""
        raise self._refusal("private_numbers()")

    def private_bytes(
        self,
        encoding: _serialization.Encoding,
        format: _serialization.PrivateFormat,
        encryption_algorithm: _serialization.KeySerializationEncryption,
    ) -> bytes:
        """Refuses: the private value never leaves the token."""
        raise self._refusal("private_bytes()")

    def __copy__(self) -> rsa.RSAPrivateKey:
        self._copy_refused()

    def __deepcopy__(self, memo: dict[Any, Any]) -> rsa.RSAPrivateKey:
        self._copy_refused()


HSMPrivateKey = HSMECPrivateKey | HSMRSAPrivateKey


def _digest(data: Buffer, algorithm: Prehashed | hashes.HashAlgorithm) -> bytes:
    if isinstance(algorithm, Prehashed):
        digest = bytes(data)
        if len(digest) != algorithm.digest_size:
            raise ValueError(
                f"prehashed data is {len(digest)} bytes, {algorithm._algorithm.name} "
                f"digests are {algorithm.digest_size}"
            )
        return digest
    hasher = hashes.Hash(algorithm)
    hasher.update(data)
    return hasher.finalize()
