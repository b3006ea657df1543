"""Add a SuperLink connection to the Flower configuration file ($FLWR_HOME/config.toml).

    python deploy/connection.py hdf --address superlink.example.org:8000 --ca certs/ca.crt

makes `flwr run . hdf`, `flwr supernode register KEY.pub hdf` and `flwr ls hdf` talk to that
SuperLink over TLS, trusting the federation's own CA. `--default` also makes it the connection
used when none is named. Other connections in the file are kept.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def config_path() -> Path:
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr") / "config.toml"


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def _quote_key(k: str) -> str:
    return k if k.replace("-", "").replace("_", "").isalnum() else _value(k)


def dump_toml(data: dict[str, Any]) -> str:
    """TOML for nested tables of scalars (all the Flower configuration file holds)."""
    lines: list[str] = []

    def table(prefix: list[str], d: dict[str, Any]) -> None:
        scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
        if prefix and (scalars or not any(isinstance(v, dict) for v in d.values())):
            lines.append(f"[{'.'.join(_quote_key(p) for p in prefix)}]")
        for k, v in scalars.items():
            lines.append(f"{_quote_key(k)} = {_value(v)}")
        if scalars:
            lines.append("")
        for k, v in d.items():
            if isinstance(v, dict):
                table([*prefix, k], v)

    table([], data)
    return "\n".join(lines).rstrip() + "\n"


def add_connection(
    name: str, address: str, ca: str | None, *, insecure: bool = False, default: bool = False
) -> Path:
    path = config_path()
    data: dict[str, Any] = tomllib.loads(path.read_text()) if path.exists() else {}
    superlink = data.setdefault("superlink", {})
    superlink.setdefault("default", "local")
    superlink.setdefault("local", {"address": ":local:"})
    conn: dict[str, Any] = {"address": address}
    if insecure:
        conn["insecure"] = True
    elif ca:
        conn["root-certificates"] = str(Path(ca).resolve())
    superlink[name] = conn
    if default:
        superlink["default"] = name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_toml(data))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("name", help="connection name, e.g. hdf")
    p.add_argument("--address", required=True, help="SuperLink host:port")
    p.add_argument("--ca", default="certs/ca.crt", help="CA certificate (default: certs/ca.crt)")
    p.add_argument("--insecure", action="store_true", help="no TLS (loopback experiments only)")
    p.add_argument("--default", action="store_true", help="make it the default connection")
    args = p.parse_args(argv)
    if not args.insecure and not Path(args.ca).is_file():
        msg = f"no CA certificate at {args.ca}; pass --ca or copy it from the operator"
        print(msg, file=sys.stderr)
        return 2
    path = add_connection(
        args.name, args.address, args.ca, insecure=args.insecure, default=args.default
    )
    print(f"{path}: connection {args.name!r} -> {args.address}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
