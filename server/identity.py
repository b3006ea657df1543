"""Which node may speak for which source (issue 12 item 5).

What a Flower 1.42 ServerApp can see of a node: `Grid.get_nodes()` returns each node's `NodeInfo`
(`node_id`, `public_key`, `owner_aid`, `owner_name`, `name`, `status`, timestamps); a Message's
metadata names only `src_node_id`. The SuperLink checks every Fleet request of a node against the
public key the node was registered with (a signature by the matching private key). With
`flower-superlink --enable-supernode-auth`, that key is registered by an account (`flwr supernode
register KEY.pub`) and the SuperNode proves it holds the private key (`flower-supernode
--auth-supernode-private-key`): the key is the site's authenticated identity, and its node id
stays the same when it reconnects. Without it, every SuperNode registers a fresh random key when it
starts (and simulation draws random bytes), which names a connection, not a site.

So: with `server.site_registry` (a YAML file mapping each source name to the OpenSSH public key(s)
of the sites allowed to serve it) a node serves the source its key is registered for and nothing
else. Without one, a source is bound to the first node that claims it: another online node
claiming it is refused (a node whose holder went offline takes it over: a reconnecting site has a
new node id), and in a simulation, one node per source, two claims are a configuration error.
A node never changes its source.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization

KEY_PREFIXES = (b"ecdsa-", b"ssh-", b"sk-", b"-----BEGIN")


def key_fingerprint(key: bytes | str) -> str:
    """SHA-256 (hex) of the DER SubjectPublicKeyInfo of an OpenSSH or PEM public key.

    `flwr supernode register` takes the OpenSSH form; `NodeInfo.public_key` holds the PEM form of
    the same key: both come to the same fingerprint.
    """
    data = (key.encode() if isinstance(key, str) else bytes(key)).strip()
    if data.startswith(b"-----BEGIN"):
        public = serialization.load_pem_public_key(data)
    else:
        public = serialization.load_ssh_public_key(data)
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def load_registry(path: str | Path, source_index: dict[str, int]) -> dict[str, int]:
    """Key fingerprint -> source index, from a YAML file `{source name: key or [keys]}`.

    A key is the text of an OpenSSH (or PEM) public key, or the path of a file holding one
    (relative to the registry's folder). Errors name the file, the entry and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"server.site_registry={str(path)!r} is not a file; give the YAML file mapping each "
            "source name to its sites' public keys, or null to bind by first claim"
        )
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: expected a mapping 'source name: public key or [keys]'")
    out: dict[str, int] = {}
    for name, keys in data.items():
        if name not in source_index:
            raise ValueError(
                f"{path}: {name!r} is not a source of this run; known: {sorted(source_index)}"
            )
        for entry in [keys] if isinstance(keys, str) else list(keys or []):
            text = str(entry).strip().encode()
            if not text.startswith(KEY_PREFIXES):
                key_file = path.parent / str(entry)
                if not key_file.is_file():
                    raise ValueError(
                        f"{path}: the key of source {name!r} is neither a public key nor a "
                        f"file: {entry!r}"
                    )
                text = key_file.read_bytes()
            try:
                fp = key_fingerprint(text)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{path}: a key of source {name!r} cannot be read: {e}") from e
            if fp in out and out[fp] != source_index[name]:
                raise ValueError(
                    f"{path}: one key is registered for two sources ({name!r} and another)"
                )
            out[fp] = source_index[name]
    return out


class DuplicateSource(ValueError):
    """Two nodes claim one source in a simulation, where each source has exactly one node."""


class SourceBinding:
    """The node -> source map the server believes, and the rule that extends it."""

    def __init__(self, registry: dict[str, int] | None = None) -> None:
        self.registry = registry
        self.node_source: dict[int, int] = {}

    def claim(
        self, node: int, source: int, *, key: bytes | None, online: set[int], simulated: bool
    ) -> tuple[str | None, list[int]]:
        """(why the claim is refused or None, nodes that lost their source to this one).

        Raises DuplicateSource when `simulated` and another node already holds the source.
        """
        if node in self.node_source:
            held = self.node_source[node]
            if held == source:
                return None, []
            return f"claims source {source} but serves source {held}; a node keeps its source", []
        if self.registry is not None:
            return self._claim_by_key(node, source, key), []
        holders = [n for n, s in self.node_source.items() if s == source]
        live = [n for n in holders if n in online]
        if live and simulated:
            raise DuplicateSource(
                f"nodes {live[0]} and {node} both claim source index {source}; a simulation runs "
                "one node per source, so one ClientApp reports a source it does not serve"
            )
        if live:
            return (
                f"claims source {source}, already served by node {live[0]} (first claim wins "
                "without server.site_registry)",
                [],
            )
        for n in holders:  # the holder went offline: a reconnecting site has a new node id
            del self.node_source[n]
        self.node_source[node] = source
        return None, holders

    def _claim_by_key(self, node: int, source: int, key: bytes | None) -> str | None:
        assert self.registry is not None
        if not key:
            return "the SuperLink reports no public key for the node"
        try:
            fp = key_fingerprint(key)
        except (ValueError, TypeError):
            return "the node's public key cannot be read"
        if fp not in self.registry:
            return f"its public key (sha256 {fp[:16]}...) is not in server.site_registry"
        if self.registry[fp] != source:
            return (
                f"claims source {source} but its key is registered for source {self.registry[fp]}"
            )
        self.node_source[node] = source
        return None
