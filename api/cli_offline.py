"""`pki` commands of the offline root: sign a carried CSR, import what the root produced."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click
from cryptography.hazmat.primitives import serialization

from api.cli_actor import actor as _actor
from api.cli_revoke import _runtime
from api.runtime import Runtime
from pki.errors import ErrorKind, PKIError
from pki.offline import ImportService, load_certificate_file, load_csr_file, sign_intermediate
from pki.serial import serial_hex

FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def register(
    group: click.Group,
    ceremony: click.Group,
    issuer_group: click.Group,
    init_dev_token: Callable[[Runtime, str], None],
) -> None:
    """Adds this module's commands to the pki group and its ceremony and issuer groups."""

    @group.group("token")
    def token() -> None:
        """Tokens of ca.toml [tokens]."""

    @token.command("init")
    @click.argument("name")
    @click.pass_context
    def token_init(ctx: click.Context, name: str) -> None:
        """Create the SoftHSM token [tokens.NAME] with random PINs (development, tests)."""
        init_dev_token(_runtime(ctx), name)

    @ceremony.command("sign")
    @click.argument("config", type=FILE)
    @click.option("--csr", "csr_path", type=FILE, required=True, help="The carried CSR.")
    @click.option(
        "--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="PEM out."
    )
    @click.pass_context
    def ceremony_sign(ctx: click.Context, config: Path, csr_path: Path, out: Path) -> None:
        """On the root's side: certify an intermediate's CSR as its reviewed ceremony file says."""
        rt = _runtime(ctx)
        cer = rt.config.ceremony(config)
        parent_id = rt.config.ca.issuers[cer.issuer].parent
        if parent_id is None:
            raise PKIError(ErrorKind.CONFIG, f"{config}: issuer {cer.issuer} has no parent")
        csr = load_csr_file(csr_path.read_bytes())
        issued = sign_intermediate(
            rt.issuance(),
            cer,
            rt.config.profile(cer.profile),
            csr,
            rt.issuer(parent_id),
            actor=_actor(),
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(issued.certificate.public_bytes(serialization.Encoding.PEM))
        click.echo(
            f"{cer.issuer}: certified by {parent_id}, serial {serial_hex(issued.serial)}, "
            f"SHA-256 {issued.fingerprint} -> {out}"
        )

    @issuer_group.command("import")
    @click.argument("issuer_id")
    @click.argument("cert_path", type=FILE)
    @click.pass_context
    def issuer_import(ctx: click.Context, issuer_id: str, cert_path: Path) -> None:
        """Install a certificate made on the root's side: the root's, or an intermediate's."""
        rt = _runtime(ctx)
        cfg = rt.config.ca.issuers.get(issuer_id)
        if cfg is None:
            raise PKIError(ErrorKind.NOT_FOUND, f"no issuer {issuer_id!r} in ca.toml")
        cert = load_certificate_file(cert_path.read_bytes())
        profile = "root" if cfg.parent is None else "intermediate"
        if cfg.parent is None:
            # The root's key stays in the root's token, which this side never opens.
            public_key, key_uri = None, f"offline:{rt.config.ca.issuer_token(issuer_id)}"
        else:
            key = rt.issuer_token(issuer_id).load_key(cfg.key_label)
            public_key, key_uri = key.public_key(), key.uri
        ImportService(rt.db, rt.clock).issuer_certificate(
            issuer_id,
            cert,
            parent_id=cfg.parent,
            profile=rt.config.profile(profile),
            token_public_key=public_key,
            key_uri=key_uri,
            actor=_actor(),
        )
        out = rt.data_dir / "certs" / f"{issuer_id}.pem"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        click.echo(f"{issuer_id}: {cert.subject.rfc4514_string()} installed -> {out}")
        if cfg.parent is not None:
            # The chain EST's /cacerts and TLS clients use: this intermediate up to the root.
            chain = [cert]
            parent_id: str | None = cfg.parent
            while parent_id is not None:
                chain.append(rt.issuer_certificate(parent_id))
                parent_id = rt.config.ca.issuers[parent_id].parent
            chain_path = rt.data_dir / "certs" / "chain.pem"
            chain_path.write_bytes(
                b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
            )
            click.echo(f"chain -> {chain_path}")

    crl_group = group.commands["crl"]
    ocsp_group = group.commands["ocsp"]
    assert isinstance(crl_group, click.Group) and isinstance(ocsp_group, click.Group)

    @crl_group.command("import")
    @click.argument("paths", type=FILE, nargs=-1, required=True)
    @click.pass_context
    def crl_import(ctx: click.Context, paths: tuple[Path, ...]) -> None:
        """Store CRLs signed on the root's side so the VA serves them."""
        rt = _runtime(ctx)
        service = ImportService(rt.db, rt.clock)
        for path in paths:
            issuer_id, number = service.crl(path.read_bytes(), actor=_actor())
            click.echo(f"{path}: CRL number {number} of {issuer_id} imported")

    @ocsp_group.command("import")
    @click.argument("paths", type=FILE, nargs=-1, required=True)
    @click.pass_context
    def ocsp_import(ctx: click.Context, paths: tuple[Path, ...]) -> None:
        """Store OCSP responses pre-signed on the root's side so the VA serves them."""
        rt = _runtime(ctx)
        service = ImportService(rt.db, rt.clock)
        for path in paths:
            issuer_id, serial, status = service.ocsp_response(path.read_bytes(), actor=_actor())
            click.echo(f"{path}: {issuer_id}/{serial} {status} imported")
