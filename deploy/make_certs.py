"""Create the TLS certificates and the SuperNode key pairs of a deployment.

    python deploy/make_certs.py --out certs --san superlink.example.org --san 10.0.0.5 \
        --node site-a --node site-b --node heldout-site

writes into `certs/`:

- `ca.crt`, `ca.key`           the federation's own certificate authority (keep ca.key offline);
- `server.pem`, `server.key`   the SuperLink's TLS certificate, signed by the CA, valid for every
                               `--san` (DNS names and IP addresses the sites use to reach it;
                               `localhost` and `127.0.0.1` are always added);
- `superexec.secret`           shared secret between the SuperLink/SuperNodes and the SuperExec
                               processes of docker-compose.yml (process isolation);
- `nodes/<name>`, `nodes/<name>.pub`
                               one EC P-384 key pair per SuperNode in OpenSSH format: the site
                               starts its SuperNode with `--auth-supernode-private-key nodes/<name>`
                               and the operator registers `nodes/<name>.pub` with
                               `flwr supernode register nodes/<name>.pub <connection>`.

Existing files are kept (run it again to add nodes) unless `--force` is given. Only the
`cryptography` package is needed (a dependency of the project and of flwr).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS = ("localhost", "127.0.0.1")


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_ca(out: Path, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hdf-fed federation CA")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    _write(out / "ca.key", _pem_key(key), private=True)
    _write(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def load_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SystemExit(f"{out / 'ca.key'} is not an EC key; delete the folder or pass --force")
    return cert, key


def make_server_cert(
    out: Path,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    sans: Sequence[str],
    days: int,
) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP384R1())
    names = list(dict.fromkeys([*sans, *DEFAULT_SANS]))  # keep order, drop duplicates
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([_san_entry(n) for n in names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    _write(out / "server.key", _pem_key(key), private=True)
    _write(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM))
    return cert


def make_node_keys(out: Path, name: str) -> Path:
    """An EC P-384 key pair in OpenSSH format (what flower-supernode and `flwr` read)."""
    key = ec.generate_private_key(ec.SECP384R1())
    priv = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    pub = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    path = out / "nodes" / name
    _write(path, priv, private=True)
    _write(path.with_name(name + ".pub"), pub + f" {name}\n".encode())
    return path


def server_sans(cert_path: Path) -> list[str]:
    """The subject alternative names of an existing certificate (for checks and tests)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in ext.get_values_for_type(x509.DNSName)] + [
        str(v) for v in ext.get_values_for_type(x509.IPAddress)
    ]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="certs", help="output folder (default: certs)")
    p.add_argument(
        "--san",
        action="append",
        default=[],
        help="DNS name or IP address the SuperLink is reached at (repeat); "
        "localhost and 127.0.0.1 are always included",
    )
    p.add_argument("--node", action="append", default=[], help="SuperNode key pair to create")
    p.add_argument("--days", type=int, default=365, help="validity in days (default: 365)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    p.add_argument(
        "--node-only",
        action="store_true",
        help="only the --node key pairs (on a site's own machine: its private key never leaves it)",
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    if args.node_only:
        if not args.node:
            print("--node-only needs at least one --node NAME", file=sys.stderr)
            return 2
    elif args.force or not (out / "ca.crt").exists():
        ca_cert, ca_key = make_ca(out, args.days)
        print(f"created CA            {out / 'ca.crt'}")
        new_ca = True
    else:
        ca_cert, ca_key = load_ca(out)
        new_ca = False
    if not args.node_only and (
        args.force or new_ca or args.san or not (out / "server.pem").exists()
    ):
        make_server_cert(out, ca_cert, ca_key, args.san, args.days)
        sans = server_sans(out / "server.pem")
        print(f"created server cert   {out / 'server.pem'}  SANs: {sans}")
    secret = out / "superexec.secret"
    if not args.node_only and (args.force or not secret.exists()):
        _write(secret, secrets.token_hex(32).encode(), private=True)
        print(f"created SuperExec secret {secret}")
    for name in args.node:
        if not name or "/" in name or name.startswith("."):
            print(f"invalid node name {name!r}", file=sys.stderr)
            return 2
        path = out / "nodes" / name
        if path.exists() and not args.force:
            print(f"kept node key pair    {path} (exists)")
            continue
        make_node_keys(out, name)
        print(f"created node key pair {path} and {path}.pub")
    return 0


if __name__ == "__main__":
    sys.exit(main())
