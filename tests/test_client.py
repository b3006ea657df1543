"""The ClientApp called directly (no Ray): replies follow the message contract."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict
from flwr.serverapp.strategy.strategy_utils import validate_message_reply_consistency

from client.app import app
from hdf import contract as K
from hdf.config import compose, model_settings, settings, to_yaml
from hdf.models import build_model
from tests.fedmock import instruction


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    return compose(["experiment=tiny", f"data.root={root}"])


def _message(cfg, kind: str, node: int = 1):
    model = build_model(model_settings(cfg.model), cfg.data.num_frames, cfg.data.size)
    config = ConfigRecord(
        {K.RUN_CONFIG: to_yaml(cfg), K.SERVER_ROUND: 1, K.LOCAL_EPOCHS: 1, K.LR: 1e-3}
    )
    content = RecordDict({K.ARRAYS: ArrayRecord(model.state_dict()), K.CONFIG: config})
    return instruction(node, content, kind), model


def _context(node_config):
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


# The synthetic sources in config order are studio 0, webcam 1, movie 2, phone 3, cctv 4,
# night_ir 5; `phone` is held out, so the training partitions 0..4 serve sources 0, 1, 2, 4, 5.
PARTITION_SOURCE = {0: 0, 3: 4}
HELDOUT_SOURCE = ("phone", 3)


def test_train_reply_passes_flower_consistency_check(cfg) -> None:
    """Replies follow Flower's contract and name the source of their partition (not its id)."""
    msg, model = _message(cfg, MessageType.TRAIN)
    replies = [
        app(msg, _context({"partition-id": pid, "num-partitions": 5})).content
        for pid in PARTITION_SOURCE
    ]
    validate_message_reply_consistency(replies, K.NUM_EXAMPLES, check_arrayrecord=True)
    got = [reply[K.METRICS][K.SOURCE_INDEX] for reply in replies]
    assert got == list(PARTITION_SOURCE.values())
    metrics = replies[0][K.METRICS]
    for key in (K.LOSS_BEFORE, K.TRAIN_LOSS, K.TRAIN_UAR, K.TRAIN_WAR):
        assert np.isfinite(metrics[key])
    assert metrics[K.LOSS_BEFORE] > 0
    # the update changed the weights and kept every key and shape
    sent = model.state_dict()
    got = replies[0][K.ARRAYS].to_torch_state_dict()
    assert set(got) == set(sent)
    assert any(not np.array_equal(got[k].numpy(), sent[k].numpy()) for k in sent)


def test_local_val_loss_is_the_trained_model_on_its_val_split(cfg) -> None:
    """Asked with `local-val`, train reports the loss an evaluate of its own update would give;
    unasked, it spends no time on it."""
    msg, _ = _message(cfg, MessageType.TRAIN)
    node = {"partition-id": 1, "num-partitions": 2}
    plain = app(msg, _context(node)).content[K.METRICS]
    assert K.LOCAL_VAL_LOSS not in plain
    msg.content[K.CONFIG][K.LOCAL_VAL] = 1
    reply = app(msg, _context(node)).content
    local = reply[K.METRICS][K.LOCAL_VAL_LOSS]
    ev, _ = _message(cfg, MessageType.EVALUATE)
    ev.content[K.ARRAYS] = reply[K.ARRAYS]
    scored = app(ev, _context(node)).content[K.METRICS]
    assert local == pytest.approx(scored[K.LOSS], rel=1e-5)
    assert local != pytest.approx(reply[K.METRICS][K.TRAIN_LOSS], rel=1e-3)


@pytest.mark.parametrize(
    ("node", "source"),
    [
        ({"partition-id": 3, "num-partitions": 5}, PARTITION_SOURCE[3]),
        ({"source": HELDOUT_SOURCE[0]}, HELDOUT_SOURCE[1]),
    ],
)
def test_evaluate_reply_reports_source_and_recall(cfg, node, source) -> None:
    """A training partition and a held-out site (named in its node config) report their index."""
    msg, _ = _message(cfg, MessageType.EVALUATE)
    reply = app(msg, _context(node)).content[K.METRICS]
    assert reply[K.SOURCE_INDEX] == source
    assert 0 <= reply[K.UAR] <= 1 and 0 <= reply[K.WAR] <= 1
    assert all(f"{K.RECALL_PREFIX}{c}" in reply for c in range(7))


def test_unknown_source_name_is_a_clear_error(cfg) -> None:
    """Called directly the ClientApp raises; Flower's runtime turns this into an error reply."""
    msg, _ = _message(cfg, MessageType.TRAIN)
    with pytest.raises(ValueError, match=r"source='no-such-site'.*known sources"):
        app(msg, _context({"source": "no-such-site"}))


def test_a_site_holds_exactly_the_received_model_or_is_not_built(cfg) -> None:
    """The site's model (built without weight init) is the received one bit for bit; a
    received model missing a key, with an extra key or a wrong shape fails loudly, for a new
    site (which is then not kept) and for a kept one."""
    import torch

    from client import site

    sent = build_model(model_settings(cfg.model), cfg.data.num_frames, cfg.data.size)
    weights = {k: v + 0.5 if v.is_floating_point() else v for k, v in sent.state_dict().items()}
    first = next(iter(weights))
    missing = {k: v for k, v in weights.items() if k != first}
    extra = {**weights, "head.bias2": torch.zeros(1)}
    wrong = {**weights, first: torch.zeros(3)}
    yaml, node = to_yaml(cfg), {"partition-id": 0}
    site._SITES.clear()
    try:
        for bad, why in ((missing, "Missing key"), (extra, "Unexpected key"), (wrong, "size")):
            with pytest.raises(RuntimeError, match=why):
                site.get_site(yaml, node, bad)
            assert not site._SITES
        built = site.get_site(yaml, node, weights)
        got = built.model.state_dict()
        assert got.keys() == weights.keys()
        assert all(torch.equal(got[k], v) for k, v in weights.items())
        with pytest.raises(RuntimeError, match="Missing key"):
            site.get_site(yaml, node, missing)
    finally:
        site._SITES.clear()


def test_heldout_site_sends_adapted_scores_and_nothing_else(cfg) -> None:
    """An evaluation-only site (source phone, held out) with server.heldout_adapt=[none,bn]:
    the reply carries only metrics; its plain scores are those of the received model and its
    `adapted-bn-*` scores those of hdf.adapt.evaluate_adapted on its test split. A training site
    sends no adapted scores."""
    import torch

    from hdf.adapt import evaluate_adapted
    from hdf.data import build_sources
    from hdf.evaluate import evaluate

    run = compose(
        ["experiment=tiny", f"data.root={cfg.data.root}", "server.heldout_adapt=[none,bn]"]
    )
    msg, model = _message(run, MessageType.EVALUATE)
    content = app(msg, _context({"source": "phone"})).content
    assert list(content.keys()) == [K.METRICS]
    reply = content[K.METRICS]
    phone = next(s for s in build_sources(run.data) if s.name == "phone").split("test")
    plain = evaluate(model, phone, torch.device("cpu"), batch_size=32)
    bn = evaluate_adapted(
        model, phone, "bn", torch.device("cpu"), settings(run).adapt,
        batch_size=32,
    )  # fmt: skip
    assert reply[K.LOSS] == pytest.approx(plain["loss"], rel=1e-6)
    assert reply[K.adapted_key("bn", K.LOSS)] == pytest.approx(bn["loss"], rel=1e-6)
    assert reply[K.adapted_key("bn", K.UAR)] == pytest.approx(bn["uar"], abs=1e-12)
    assert bn["loss"] != pytest.approx(plain["loss"], rel=1e-6)
    assert all(K.adapted_key("bn", f"{K.RECALL_PREFIX}{c}") in reply for c in range(7))
    assert not any(k.startswith("adapted-tent") for k in reply)
    msg, _ = _message(run, MessageType.EVALUATE)
    train_site = app(msg, _context({"partition-id": 0, "num-partitions": 2})).content[K.METRICS]
    assert not any(k.startswith(K.ADAPTED_PREFIX) for k in train_site)


def test_recompute_scores_the_received_weights_with_statistics_of_the_sites_train_clips(
    cfg,
) -> None:
    """`local_norm=recompute`: a training site scores the received model after re-estimating its
    BN statistics on its own training clips (hdf.adapt.recompute_bn_stats by hand gives the same
    loss), whatever statistics arrived; the train reply's score-first scores are the same; a
    held-out site still scores the received statistics."""
    import torch

    from hdf.adapt import recompute_bn_stats, unlabeled_batches
    from hdf.data import build_sources
    from hdf.evaluate import evaluate

    msg, model = _message(cfg, MessageType.EVALUATE)
    with torch.no_grad():  # statistics that fit no site: every score depends on replacing them
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.fill_(3.0)
                m.running_var.fill_(0.01)
    msg.content[K.ARRAYS] = ArrayRecord(model.state_dict())
    node = {"partition-id": 0, "num-partitions": 5}  # studio
    plain = app(msg, _context(node)).content[K.METRICS]
    msg.content[K.CONFIG][K.LOCAL_NORM] = "recompute"
    got = app(msg, _context(node)).content[K.METRICS]
    studio = next(s for s in build_sources(cfg.data) if s.name == "studio")
    recompute_bn_stats(
        model, unlabeled_batches(studio.split("train"), settings(cfg).adapt.batch_size), "cpu"
    )
    want = evaluate(model, studio.split("val"), torch.device("cpu"), batch_size=32)
    assert got[K.LOSS] == pytest.approx(want["loss"], rel=1e-5)
    assert got[K.LOSS] != pytest.approx(plain[K.LOSS], rel=1e-3)

    train, _ = _message(cfg, MessageType.TRAIN)
    train.content[K.ARRAYS] = msg.content[K.ARRAYS]
    train.content[K.CONFIG][K.LOCAL_NORM] = "recompute"
    train.content[K.CONFIG][K.SCORE_FIRST] = 1
    first = app(train, _context(node)).content[K.EVAL_METRICS]
    assert first[K.LOSS] == pytest.approx(want["loss"], rel=1e-5)

    held = app(msg, _context({"source": HELDOUT_SOURCE[0]})).content[K.METRICS]
    msg.content[K.CONFIG][K.LOCAL_NORM] = "none"
    assert held[K.LOSS] == pytest.approx(
        app(msg, _context({"source": HELDOUT_SOURCE[0]})).content[K.METRICS][K.LOSS], rel=1e-6
    )


def test_stats_sample_is_a_fixed_bounded_subset() -> None:
    """`adapt.stats_clips`: at most that many clips, the same ones for the same seed, in
    dataset order; 0 or a count above the split's size takes it all."""
    from hdf.adapt import stats_sample

    data = list(range(10))
    a = stats_sample(data, 4, seed=3)
    assert len(a) == 4 and list(a) == sorted(a) and list(a) == list(stats_sample(data, 4, seed=3))
    assert list(stats_sample(data, 4, seed=4)) != list(a)
    assert stats_sample(data, 0, seed=3) is data and stats_sample(data, 10, seed=3) is data


def test_the_runs_weight_decay_reaches_the_clients_optimizer(cfg, monkeypatch) -> None:
    """Regularisation for DRO runs (issue 14): `train.weight_decay` set on the run is what every
    client's AdamW uses (the run config travels in each train message)."""
    from hdf.optim import base

    used = []

    class Recording(base.EagerAdamW):
        def __init__(self, params, **kw):
            used.append(kw["weight_decay"])
            super().__init__(params, **kw)

    monkeypatch.setattr(base, "EagerAdamW", Recording)
    run = compose(["experiment=tiny", f"data.root={cfg.data.root}", "train.weight_decay=0.37"])
    msg, _ = _message(run, MessageType.TRAIN)
    app(msg, _context({"partition-id": 0, "num-partitions": 2}))
    assert used == [0.37]


@pytest.mark.parametrize(
    ("extra", "node_config", "threads"),
    [
        ((), {"partition-id": 0}, 1),  # the default: one CPU per simulated site
        (("simulation.num_cpus_per_client=0.5",), {"partition-id": 0}, 1),  # not every core
        (("simulation.num_cpus_per_client=2.5",), {"partition-id": 0}, 2),
        (("train.threads=3",), {"partition-id": 0}, 3),
        ((), {"source": "studio"}, 64),  # a deployed site: every core of its machine
    ],
)
def test_site_threads_come_from_the_config(monkeypatch, extra, node_config, threads) -> None:
    """Training rounds differently with the thread count: a simulated site's count is the
    config's, never the machine's (this machine has 64 cores here)."""
    import client.site

    monkeypatch.setattr(client.site.os, "cpu_count", lambda: 64)
    run = settings(compose(["experiment=tiny", *extra]))
    assert client.site.site_threads(run, node_config) == threads


_QUERY_IN_FRESH_PROCESS = """
import json, sys
from flwr.app import ConfigRecord, Context, MessageType, RecordDict
from client.app import app
from hdf import contract as K
from tests.fedmock import instruction
cfg_yaml, node = sys.stdin.read(), json.loads(sys.argv[1])
content = RecordDict({K.CONFIG: ConfigRecord({K.RUN_CONFIG: cfg_yaml})})
msg = instruction(1, content, MessageType.QUERY)
ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
reply = dict(app(msg, ctx).content[K.METRICS])
decoders = sorted({"PIL", "av"} & set(sys.modules))
print(json.dumps({"reply": reply, "torch": "torch" in sys.modules, "decoders": decoders}))
"""


def _query_fresh(cfg_yaml: str, node: dict, cache) -> dict:
    """The query reply of a fresh process, as Flower starts one per deployed message."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "HDF_CACHE": str(cache)}
    out = subprocess.run(
        [sys.executable, "-c", _QUERY_IN_FRESH_PROCESS, json.dumps(node)],
        input=cfg_yaml, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("node", "source", "heldout", "split"),
    [({"source": "webcam"}, 1, 0, "train"), ({"source": "phone"}, 3, 1, "test")],
)
def test_query_answers_from_the_site_index_without_torch(
    cfg, tmp_path, node, source, heldout, split
) -> None:
    """The first query of a site builds its source and writes the index; a later query, in a
    fresh process as deployed, answers the same from the index without importing torch. In-memory
    clips need no image or video decoder either."""
    from hdf.data import build_sources

    cfg_yaml = to_yaml(cfg)
    first = _query_fresh(cfg_yaml, node, tmp_path)
    assert first["torch"]  # nothing indexed yet: the source was loaded
    assert first["decoders"] == []
    clips = len(build_sources(cfg.data)[source].split(split))
    want = {K.SOURCE_INDEX: source, K.NUM_EXAMPLES: clips, K.HELDOUT: heldout}
    assert {k: first["reply"][k] for k in want} == want
    again = _query_fresh(cfg_yaml, node, tmp_path)
    assert not again["torch"]
    assert again["reply"] == first["reply"]


def test_a_site_index_is_keyed_by_data_config_and_node_and_checked(cfg, monkeypatch, tmp_path):
    """Another data config or node has its own entry; a file with bad values is not believed."""
    from client import site_index

    monkeypatch.setenv("HDF_CACHE", str(tmp_path))
    cfg_yaml = to_yaml(cfg)
    answer = {"source": 1, "heldout": 0, "clips": 12}
    site_index.write(cfg_yaml, {"source": "webcam"}, answer)
    assert site_index.read(cfg_yaml, {"source": "webcam"}) == answer
    assert site_index.read(cfg_yaml, {"source": "studio"}) is None
    other = compose(["experiment=tiny", f"data.root={cfg.data.root}", "data.scale=0.5"])
    assert site_index.read(to_yaml(other), {"source": "webcam"}) is None
    lr = compose(["experiment=tiny", f"data.root={cfg.data.root}", "train.lr=0.5"])
    assert site_index.read(to_yaml(lr), {"source": "webcam"}) == answer  # not a data key
    path = site_index.index_path(cfg_yaml, {"source": "webcam"})
    path.write_text('{"source": 1, "heldout": 2, "clips": 12}')
    assert site_index.read(cfg_yaml, {"source": "webcam"}) is None
    path.write_text("not json")
    assert site_index.read(cfg_yaml, {"source": "webcam"}) is None
    path.write_text('{"source": 1, "heldout": 0, "clips": 12}' + " " * 5000)
    assert site_index.read(cfg_yaml, {"source": "webcam"}) is None


def test_no_index_for_a_dataset_whose_files_decide_its_sizes(cfg, monkeypatch, tmp_path) -> None:
    """A dataset that reads its clips from files (sizes may change) is loaded for every query."""
    from client import handlers
    from hdf.data.synthetic import SyntheticSources

    monkeypatch.setenv("HDF_CACHE", str(tmp_path))
    monkeypatch.setattr(SyntheticSources, "sizes_from_config", False)
    answer = handlers.query_answer(to_yaml(cfg), {"source": "webcam"})
    assert answer["source"] == 1 and answer["clips"] > 0
    assert not (tmp_path / "sites").exists()


def test_fixed_norm_trains_with_the_received_statistics_and_returns_them(cfg) -> None:
    """FixBN (`fixed-norm`=1): the update carries the received running statistics unchanged,
    even with `local_norm=recompute` (which re-estimates them for scoring first), while the
    weights, BatchNorm's affine parameters included, still train; without it the statistics
    move."""
    import torch

    from hdf.models.hdf_net import norm_state_keys

    msg, model = _message(cfg, MessageType.TRAIN)
    with torch.no_grad():  # statistics no site would estimate: any re-estimate shows
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.fill_(0.25)
                m.running_var.fill_(2.0)
    sent = {k: v.clone() for k, v in model.state_dict().items()}
    msg.content[K.ARRAYS] = ArrayRecord(model.state_dict())
    msg.content[K.CONFIG][K.LOCAL_NORM] = "recompute"
    node = {"partition-id": 0, "num-partitions": 5}
    stats = norm_state_keys(model, "stats")
    affine = [k for k in norm_state_keys(model) if k not in stats]
    assert stats and affine

    moved = app(msg, _context(node)).content[K.ARRAYS].to_torch_state_dict()
    assert not all(torch.equal(moved[k], sent[k]) for k in stats if "running_" in k)

    msg.content[K.CONFIG][K.FIXED_NORM] = 1
    got = app(msg, _context(node)).content[K.ARRAYS].to_torch_state_dict()
    for k in stats:
        assert torch.equal(got[k], sent[k]), k
    assert any(not torch.equal(got[k], sent[k]) for k in affine)
