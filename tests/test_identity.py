"""Which node may serve which source (server/identity.py, issue 12 item 5)."""

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server.identity import DuplicateSource, SourceBinding, key_fingerprint, load_registry

SOURCES = {"studio": 0, "webcam": 1, "phone": 2}


def _key() -> tuple[bytes, bytes]:
    """(OpenSSH public key, as `flwr supernode register` takes it; PEM, as NodeInfo holds it)."""
    public = ec.generate_private_key(ec.SECP384R1()).public_key()
    ssh = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    pem = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return ssh, pem


def test_the_openssh_and_pem_forms_of_a_key_have_one_fingerprint() -> None:
    (ssh, pem), (other, _) = _key(), _key()
    assert key_fingerprint(ssh) == key_fingerprint(pem) == key_fingerprint(ssh.decode())
    assert key_fingerprint(other) != key_fingerprint(ssh)


def test_registry_binds_each_key_to_its_source(tmp_path) -> None:
    (a_ssh, a_pem), (b_ssh, b_pem), (c_ssh, c_pem), (_, stranger) = _key(), _key(), _key(), _key()
    (tmp_path / "webcam.pub").write_bytes(b_ssh + b" webcam\n")  # as deploy/make_certs.py writes
    registry_file = tmp_path / "sites.yaml"
    registry_file.write_text(f"studio: {a_ssh.decode()}\nwebcam: [webcam.pub, {c_ssh.decode()}]\n")
    registry = load_registry(registry_file, SOURCES)
    assert registry == {
        key_fingerprint(a_ssh): 0,
        key_fingerprint(b_ssh): 1,
        key_fingerprint(c_ssh): 1,
    }
    binding = SourceBinding(registry)
    claim = {"online": {1, 2, 3, 4}, "simulated": False}
    assert binding.claim(1, 0, key=a_pem, **claim) == (None, [])
    assert binding.claim(2, 1, key=b_pem, **claim) == (None, [])
    assert binding.claim(3, 1, key=c_pem, **claim) == (None, [])  # two sites serve webcam
    why, _ = binding.claim(4, 0, key=stranger, **claim)
    assert "is not in server.site_registry" in why
    why, _ = binding.claim(5, 0, key=b_pem, **claim)
    assert why == "claims source 0 but its key is registered for source 1"
    assert binding.claim(6, 0, key=None, **claim)[0] == (
        "the SuperLink reports no public key for the node"
    )
    assert binding.node_source == {1: 0, 2: 1, 3: 1}


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("kitchen: ecdsa-sha2-nistp384 AAAA", "'kitchen' is not a source of this run"),
        ("studio: missing.pub", "neither a public key nor a file: 'missing.pub'"),
        ("studio: ecdsa-sha2-nistp384 AAAAnotakey", "a key of source 'studio' cannot be read"),
        ("[1, 2]", "expected a mapping 'source name: public key or [keys]'"),
    ],
)
def test_a_bad_registry_names_the_file_and_the_entry(tmp_path, text, error) -> None:
    path = tmp_path / "sites.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"sites\.yaml") as e:
        load_registry(path, SOURCES)
    assert error in str(e.value)
    with pytest.raises(ValueError, match="is not a file"):
        load_registry(tmp_path / "none.yaml", SOURCES)


def test_a_key_registered_for_two_sources_is_an_error(tmp_path) -> None:
    ssh, _ = _key()
    path = tmp_path / "sites.yaml"
    path.write_text(f"studio: {ssh.decode()}\nwebcam: {ssh.decode()}\n")
    with pytest.raises(ValueError, match="one key is registered for two sources"):
        load_registry(path, SOURCES)


def test_without_a_registry_the_first_claim_wins_and_a_node_keeps_its_source() -> None:
    binding = SourceBinding()
    online = {1, 2, 3}
    assert binding.claim(1, 0, key=None, online=online, simulated=False) == (None, [])
    why, gone = binding.claim(2, 0, key=None, online=online, simulated=False)
    assert why == "claims source 0, already served by node 1 (first claim wins without " + (
        "server.site_registry)"
    )
    assert gone == []
    assert binding.claim(1, 0, key=None, online=online, simulated=False) == (None, [])
    why, _ = binding.claim(1, 1, key=None, online=online, simulated=False)
    assert why == "claims source 1 but serves source 0; a node keeps its source"
    # node 1 went offline: a reconnecting site (new id 3) takes its source over
    assert binding.claim(3, 0, key=None, online={2, 3}, simulated=False) == (None, [1])
    assert binding.node_source == {3: 0}


def test_two_nodes_claiming_one_source_in_a_simulation_is_an_error() -> None:
    binding = SourceBinding()
    binding.claim(1, 0, key=None, online={1, 2}, simulated=True)
    with pytest.raises(DuplicateSource, match="nodes 1 and 2 both claim source index 0"):
        binding.claim(2, 0, key=None, online={1, 2}, simulated=True)


@pytest.mark.slow
def test_a_site_registry_in_a_simulation_is_refused_before_round_1(tmp_path) -> None:
    """Simulated nodes have random keys: a registry would refuse them all, so it is an error."""
    from hdf.config import compose
    from server.app import open_run
    from simulations.run import simulate

    ssh, _ = _key()
    registry = tmp_path / "sites.yaml"
    registry.write_text(f"studio: {ssh.decode()}\n")
    cfg = compose(
        [
            "experiment=tiny",
            "data.sources=[studio,webcam]",
            "data.heldout=[]",
            f"server.site_registry={registry}",
            f"data.root={tmp_path / 'cache'}",
            f"output.root={tmp_path / 'runs'}",
        ]
    )
    run = open_run(cfg)
    with pytest.raises(ValueError, match="simulated nodes have random keys"):
        simulate(cfg, run)
    assert not (run.path / "metrics.jsonl").exists()
