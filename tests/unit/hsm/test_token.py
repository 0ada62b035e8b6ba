"""Tests for Token against a real SoftHSM2: keys, attributes, errors, threads, fork."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import Attribute, ObjectClass

from hsm import (
    PKCS11URI,
    HSMECPrivateKey,
    HSMError,
    HSMPrivateKey,
    HSMRSAPrivateKey,
    SoftHSMStore,
    Token,
    init_softhsm_token,
)
from hsm.errors import HSMErrorKind

REPO = Path(__file__).resolve().parents[3]
ECDSA = ec.ECDSA(hashes.SHA256())


def _sign_and_verify(key: HSMPrivateKey, data: bytes) -> None:
    assert isinstance(key, HSMECPrivateKey)
    key.public_key().verify(key.sign(data, ECDSA), data, ECDSA)


class TestGenerateKey:
    @pytest.mark.parametrize(
        ("key_type", "cls", "size"),
        [
            ("ec-p256", HSMECPrivateKey, 256),
            ("ec-p384", HSMECPrivateKey, 384),
            ("rsa-2048", HSMRSAPrivateKey, 2048),
        ],
    )
    def test_generate_key_types(
        self, softhsm_token: Token, key_type: str, cls: type, size: int
    ) -> None:
        key = softhsm_token.generate_key("k", key_type)
        assert isinstance(key, cls)
        assert key.key_size == size
        assert key.label == "k"
        assert len(key.key_id) == 16

    def test_generate_key_private_key_is_sensitive_and_not_extractable(
        self, softhsm_token: Token
    ) -> None:
        softhsm_token.generate_key("ca", "ec-p256")
        attributes = softhsm_token.key_attributes("ca")
        assert attributes["sensitive"] is True
        assert attributes["extractable"] is False
        assert attributes["token"] is True
        assert attributes["private"] is True
        assert attributes["always_sensitive"] is True
        assert attributes["never_extractable"] is True
        assert attributes["sign"] is True
        assert attributes["decrypt"] is False

    def test_generate_key_is_neither_modifiable_nor_destroyable(self, softhsm_token: Token) -> None:
        softhsm_token.generate_key("ca", "ec-p256")
        attributes = softhsm_token.key_attributes("ca")
        assert attributes["modifiable"] is False
        assert attributes["destroyable"] is False

    @pytest.mark.parametrize("object_class", [ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY])
    def test_generate_key_label_cannot_be_set_with_user_pin(
        self, softhsm_token: Token, object_class: ObjectClass
    ) -> None:
        key = softhsm_token.generate_key("ca", "ec-p256")

        def relabel(state: Any) -> None:
            (handle,) = state.session.get_objects(
                {Attribute.CLASS: object_class, Attribute.LABEL: "ca"}
            )
            handle[Attribute.LABEL] = "ca-renamed"

        # PKCS#11 C_SetAttributeValue: "CKR_ACTION_PROHIBITED" for an object whose
        # CKA_MODIFIABLE is false (SoftHSM answers CKR_ATTRIBUTE_READ_ONLY).
        with pytest.raises(HSMError):
            softhsm_token._run("relabel", relabel)
        softhsm_token.close()
        assert softhsm_token.load_key("ca").key_id == key.key_id

    @pytest.mark.parametrize("object_class", [ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY])
    def test_generate_key_cannot_be_destroyed_with_user_pin(
        self, softhsm_token: Token, object_class: ObjectClass
    ) -> None:
        softhsm_token.generate_key("ca", "ec-p256")

        def destroy(state: Any) -> None:
            (handle,) = state.session.get_objects(
                {Attribute.CLASS: object_class, Attribute.LABEL: "ca"}
            )
            handle.destroy()

        with pytest.raises(HSMError):
            softhsm_token._run("destroy", destroy)
        softhsm_token.close()
        _sign_and_verify(softhsm_token.load_key("ca"), b"still here")

    @pytest.mark.parametrize("key_type", ["ec-p256", "rsa-2048"])
    def test_generate_key_private_value_cannot_be_read(
        self, softhsm_token: Token, key_type: str
    ) -> None:
        softhsm_token.generate_key("ca", key_type)
        with pytest.raises(HSMError) as caught:
            softhsm_token.read_private_value("ca")
        assert caught.value.token_error == "AttributeSensitive"
        assert caught.value.kind is HSMErrorKind.UNSUPPORTED

    def test_generate_key_same_label_refused(self, softhsm_token: Token) -> None:
        first = softhsm_token.generate_key("ca", "ec-p256")
        with pytest.raises(HSMError, match="already holds a key 'ca'") as caught:
            softhsm_token.generate_key("ca", "ec-p384")
        assert caught.value.kind is HSMErrorKind.EXISTS
        assert softhsm_token.load_key("ca").key_id == first.key_id
        assert softhsm_token.load_key("ca").key_size == 256

    def test_generate_key_unknown_type_refused(self, softhsm_token: Token) -> None:
        with pytest.raises(HSMError, match="ed25519") as caught:
            softhsm_token.generate_key("k", "ed25519")
        assert caught.value.kind is HSMErrorKind.UNSUPPORTED

    def test_generate_key_empty_label_refused(self, softhsm_token: Token) -> None:
        with pytest.raises(HSMError) as caught:
            softhsm_token.generate_key("", "ec-p256")
        assert caught.value.kind is HSMErrorKind.INVALID

    def test_generate_key_ids_differ(self, softhsm_token: Token) -> None:
        a = softhsm_token.generate_key("a", "ec-p256")
        b = softhsm_token.generate_key("b", "ec-p256")
        assert a.key_id != b.key_id


class TestLoadKey:
    def test_load_key_by_label_is_cached(self, softhsm_token: Token) -> None:
        softhsm_token.generate_key("ca", "ec-p256")
        assert softhsm_token.load_key("ca") is softhsm_token.load_key("ca")

    def test_load_key_from_a_second_token_object(self, softhsm_store: SoftHSMStore) -> None:
        info, pin = softhsm_store.create_token()
        first = info.open(pin)
        generated = first.generate_key("ca", "ec-p256")
        other = info.open(pin)
        loaded = other.load_key("ca")
        assert loaded is not generated
        assert loaded.key_id == generated.key_id
        assert loaded.public_key() == generated.public_key()
        _sign_and_verify(loaded, b"from a second Token object")
        _sign_and_verify(generated, b"and from the first")
        first.close()
        other.close()

    def test_load_key_by_uri(self, softhsm_token: Token) -> None:
        generated = softhsm_token.generate_key("ca", "ec-p384")
        uri = softhsm_token.key_uri("ca")
        parsed = PKCS11URI.parse(uri)
        assert (parsed.token, parsed.object, parsed.id, parsed.type) == (
            softhsm_token.label,
            "ca",
            generated.key_id,
            "private",
        )
        loaded = softhsm_token.load_key(uri)
        assert loaded.public_key() == generated.public_key()

    def test_load_key_by_id_only(self, softhsm_token: Token) -> None:
        generated = softhsm_token.generate_key("ca", "ec-p256")
        softhsm_token.close()
        loaded = softhsm_token.load_key(str(PKCS11URI(id=generated.key_id)))
        assert loaded.label == "ca"
        _sign_and_verify(loaded, b"by id")

    def test_load_key_missing_names_label(self, softhsm_token: Token) -> None:
        with pytest.raises(HSMError, match="no-such-key") as caught:
            softhsm_token.load_key("no-such-key")
        assert caught.value.kind is HSMErrorKind.NOT_FOUND

    def test_load_key_uri_for_another_token_refused(self, softhsm_token: Token) -> None:
        softhsm_token.generate_key("ca", "ec-p256")
        with pytest.raises(HSMError, match="other-token") as caught:
            softhsm_token.load_key("pkcs11:token=other-token;object=ca")
        assert caught.value.kind is HSMErrorKind.NOT_FOUND

    def test_load_key_uri_of_public_object_refused(self, softhsm_token: Token) -> None:
        with pytest.raises(HSMError, match="type=public") as caught:
            softhsm_token.load_key("pkcs11:object=ca;type=public")
        assert caught.value.kind is HSMErrorKind.INVALID

    def test_load_key_uri_without_object_or_id_refused(self, softhsm_token: Token) -> None:
        with pytest.raises(HSMError, match="object= or id="):
            softhsm_token.load_key(f"pkcs11:token={softhsm_token.label}")

    def test_load_key_uri_with_pin_value_refused(self, softhsm_token: Token) -> None:
        with pytest.raises(HSMError, match="pin-value") as caught:
            softhsm_token.load_key("pkcs11:object=ca?pin-value=123456")
        assert "123456" not in str(caught.value)


class TestSessionAndErrors:
    def test_ping_ok(self, softhsm_token: Token) -> None:
        softhsm_token.ping()

    def test_ping_missing_module_unavailable(self) -> None:
        token = Token("/nonexistent/libpkcs11.so", "t", "1234")
        with pytest.raises(HSMError, match=r"/nonexistent/libpkcs11\.so") as caught:
            token.ping()
        assert caught.value.kind is HSMErrorKind.UNAVAILABLE

    def test_ping_missing_token_unavailable(self, softhsm_token: Token) -> None:
        token = Token(softhsm_token.module_path, "no-such-token", "1234")
        with pytest.raises(HSMError, match="no-such-token") as caught:
            token.ping()
        assert caught.value.kind is HSMErrorKind.UNAVAILABLE
        # The re-scan for the missing token re-initialised the module; others carry on.
        softhsm_token.ping()

    def test_wrong_pin_is_a_login_error_without_the_pin(self, softhsm_token: Token) -> None:
        wrong = "wrong-" + secrets.token_hex(6)
        softhsm_token.close()
        token = Token(softhsm_token.module_path, softhsm_token.label, wrong)
        with pytest.raises(HSMError) as caught:
            token.ping()
        assert caught.value.kind is HSMErrorKind.LOGIN
        assert caught.value.token_error == "PinIncorrect"
        chain: BaseException | None = caught.value
        while chain is not None:
            assert wrong not in str(chain)
            assert wrong not in repr(chain)
            chain = chain.__cause__ or chain.__context__
        assert wrong not in repr(token)

    def test_empty_pin_refused(self) -> None:
        with pytest.raises(HSMError, match="PIN"):
            Token("/usr/lib/softhsm/libsofthsm2.so", "t", "")

    def test_close_then_use_reopens(self, softhsm_token: Token) -> None:
        key = softhsm_token.generate_key("ca", "ec-p256")
        softhsm_token.close()
        _sign_and_verify(key, b"after close")
        softhsm_token.close()
        softhsm_token.close()

    def test_token_created_after_module_loaded_is_found(
        self, softhsm_store: SoftHSMStore, softhsm_token: Token
    ) -> None:
        key = softhsm_token.generate_key("ca", "ec-p256")
        _sign_and_verify(key, b"before")
        later = softhsm_store.open_token()
        later_key = later.generate_key("ca", "ec-p256")
        _sign_and_verify(later_key, b"new token")
        # Finding the new token re-initialised the module, which closed the first token's
        # session; the first token reopens it and its key handle transparently.
        _sign_and_verify(key, b"after")
        assert later_key.public_key() != key.public_key()
        later.close()

    def test_other_softhsm_conf_in_same_process_refused(
        self, softhsm_token: Token, tmp_path: Path
    ) -> None:
        softhsm_token.ping()
        other = init_softhsm_token(tmp_path, "elsewhere", so_pin="so-1234", user_pin="user-1234")
        token = other.open("user-1234")
        with pytest.raises(HSMError, match="SOFTHSM2_CONF") as caught:
            token.ping()
        assert caught.value.kind is HSMErrorKind.INVALID

    def test_other_softhsm_conf_works_in_its_own_process(self, tmp_path: Path) -> None:
        other = init_softhsm_token(tmp_path, "elsewhere", so_pin="so-1234", user_pin="user-1234")
        script = (
            "import sys\n"
            "from cryptography.hazmat.primitives import hashes\n"
            "from cryptography.hazmat.primitives.asymmetric import ec\n"
            "from hsm import SoftHSMToken\n"
            "from pathlib import Path\n"
            "t = SoftHSMToken(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4])\n"
            "token = t.open('user-1234')\n"
            "key = token.generate_key('k', 'ec-p256')\n"
            "alg = ec.ECDSA(hashes.SHA256())\n"
            "key.public_key().verify(key.sign(b'x', alg), b'x', alg)\n"
        )
        env = dict(os.environ, PYTHONPATH=str(REPO))
        env.pop("SOFTHSM2_CONF", None)
        completed = subprocess.run(
            [
                sys.executable,
                "-c",
                script,
                str(other.conf_path),
                str(other.token_dir),
                other.module_path,
                other.label,
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert completed.returncode == 0, completed.stderr


class TestConcurrency:
    def test_threads_share_one_session(self, softhsm_token: Token) -> None:
        key = softhsm_token.generate_key("ca", "ec-p256")
        failures: list[BaseException] = []
        verified = []

        def work(n: int) -> None:
            try:
                for i in range(25):
                    data = f"{n}-{i}".encode()
                    _sign_and_verify(key, data)
                    verified.append(data)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert failures == []
        assert len(verified) == 200

    @pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
    def test_forked_child_reopens_and_signs(self, softhsm_token: Token) -> None:
        key = softhsm_token.generate_key("ca", "ec-p256")
        assert isinstance(key, HSMECPrivateKey)
        _sign_and_verify(key, b"parent before fork")
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: must never return into pytest
            code = 1
            try:
                os.close(read_end)
                signature = key.sign(b"child", ECDSA)
                key.public_key().verify(signature, b"child", ECDSA)
                os.write(write_end, signature)
                code = 0
            except BaseException:
                code = 2
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            signature = pipe.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        key.public_key().verify(signature, b"child", ECDSA)
        _sign_and_verify(key, b"parent after fork")
