"""A site's long-lived state: its config, source, model and device, built once per process.

Flower calls the ClientApp once per message; rebuilding the data set and the model each time
would cost more than a small round's training, so a site is cached per (config, source).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from hdf.config import RunConfig, load, settings
from hdf.data import Source, build_sources, split_sources
from hdf.device import resolve_device, set_deterministic
from hdf.models import HDFNet, build_model


@dataclass
class Site:
    cfg: DictConfig  # the run config, checked against the schema
    settings: RunConfig  # the same, typed, for `hdf` calls
    source: Source
    heldout: bool
    model: HDFNet
    device: torch.device


log = logging.getLogger(__name__)
_SITES: dict[tuple[str, str], Site] = {}
# In simulation one worker process runs the ClientApp of several virtual nodes in turn; keeping
# each one's site avoids rebuilding its model and reloading its data on every message.
MAX_SITES = 32


def where() -> str:
    """This process, its machine and, in a Ray simulation, its Ray node: printed when a site is
    built, so a run on a Ray cluster shows which node served which site (docs/architecture.md)."""
    ray = sys.modules.get("ray")  # imported only inside Ray's workers; never imported here
    node = ""
    if ray is not None and ray.is_initialized():
        node = f", Ray node {ray.get_runtime_context().get_node_id()}"
    return f"pid {os.getpid()} on {socket.gethostname()}{node}"


def config_key(cfg_yaml: str) -> str:
    return hashlib.sha1(cfg_yaml.encode()).hexdigest()[:16]


def resolve_source(cfg: DictConfig, node_config: dict[str, Any]) -> tuple[Source, bool]:
    """The source this node serves, and whether it is held out.

    A deployed site names its source in `--node-config 'source="NAME"'` (and may point the data
    root elsewhere with `data-root=PATH`); in simulation the partition id indexes the training
    sources in config order.
    """
    data_cfg = cfg.data
    if "data-root" in node_config and "root" in data_cfg:
        data_cfg = OmegaConf.merge(data_cfg, {"root": str(node_config["data-root"])})
    elif "data-root" in node_config:  # as before the schema: such a dataset has no root to move
        log.warning(
            "node-config data-root is ignored: data=%s has no data.root (set its own path keys)",
            data_cfg.name,
        )
    sources = build_sources(data_cfg)
    train, held = split_sources(sources, list(cfg.data.heldout), cfg.data.train)
    if "source" in node_config:
        name = str(node_config["source"])
        by_name = {s.name: s for s in sources}
        if name not in by_name:
            raise ValueError(
                f"node-config source={name!r} is not a source of data={cfg.data.name}; "
                f"known sources: {sorted(by_name)}"
            )
        source = by_name[name]
        return source, source in held
    if "partition-id" in node_config:
        pid = int(node_config["partition-id"])
        if not 0 <= pid < len(train):
            raise ValueError(
                f"partition-id {pid} out of range: the run has {len(train)} training sources "
                f"({[s.name for s in train]}); start one SuperNode per training source"
            )
        return train[pid], False
    raise ValueError(
        "this SuperNode does not say which source it serves: start it with "
        '--node-config \'source="<name>" data-root="<path>"\' (TOML strings are quoted)'
    )


def site_threads(run: RunConfig, node_config: dict[str, Any]) -> int:
    """Torch threads of a site: `train.threads`; else a simulated node's CPUs rounded down, at
    least 1 (Ray's rule for OMP_NUM_THREADS); else every core of the machine.

    Training rounds differently with the thread count, so a simulated site's count comes from
    the config alone: a fraction such as 0.5 once meant every core, which made a run's numbers
    depend on the machine it ran on.
    """
    if run.train.threads:
        return int(run.train.threads)
    if run.train.threads is None and "partition-id" in node_config:
        return max(1, math.floor(run.simulation.num_cpus_per_client))
    return os.cpu_count() or 1


def get_site(cfg_yaml: str, node_config: dict[str, Any], weights: dict[str, torch.Tensor]) -> Site:
    """The cached site for this node and run config (built on first use), its model holding
    `weights` (the model a message carries; a strict load: a missing or extra key, or a shape
    that differs, raises and leaves no site behind).

    Every message overwrites the whole model, so it is built without its weight initialisation
    (`build_model(init=False)`): a deployed site builds it for every message.
    """
    key = (config_key(cfg_yaml), repr(sorted(node_config.items())))
    if key in _SITES:
        _SITES[key].model.load_state_dict(weights)
        # a process keeping several sites (a warm worker, a simulation worker) gives each its
        # own thread count: training rounds differently with it
        torch.set_num_threads(site_threads(_SITES[key].settings, node_config))
    else:
        cfg = load(cfg_yaml, "the run config the server sent")
        run = settings(cfg)
        torch.set_num_threads(site_threads(run, node_config))
        if run.deterministic:  # false leaves torch's defaults as they are
            set_deterministic(True)
        source, heldout = resolve_source(cfg, node_config)
        device = resolve_device(run.device)
        model = build_model(run.model, run.data.num_frames, run.data.size, init=False)
        model = model.to(device)
        model.load_state_dict(weights)
        if len(_SITES) >= MAX_SITES:  # a process serves a few sources in turn (simulation)
            _SITES.pop(next(iter(_SITES)))
        _SITES[key] = Site(cfg, run, source, heldout, model, device)
        print(f"site {source.name}: built in {where()}", flush=True)
    return _SITES[key]
