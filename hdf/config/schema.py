"""The run configuration's schema: every key, its type, its one default and what it does.

Hydra composes `simulations/conf/` (the presets) on top of these dataclasses (`hdf.config.store`),
so a key that is not here, or a value of the wrong type, fails before anything is built. Groups
whose presets differ in their keys have one class per kind: a data preset is checked against its
dataset's class (`DATA_KINDS`), a model preset against its backbone's (`MODEL_KINDS`), a strategy
preset against its strategy's (`STRATEGY_KINDS`). `hdf` code receives these objects (typed
settings), never the raw tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import II, MISSING

# ---- model ---------------------------------------------------------------------------------------


@dataclass
class DAMConfig:
    """Time-Frequency Distributional Attention Module after each backbone stage (hdf/models/dam)."""

    enabled: bool = True  # false: no DAM anywhere (the base model)
    temporal: bool = True  # temporal attention branch
    frequency: bool = True  # DCT frequency branch
    stages: list[bool] | None = None  # one true/false per stage; null = after every stage


@dataclass
class ModelConfig:
    """What every backbone's model preset sets (`build_model`); a backbone adds its own keys."""

    backbone: str = MISSING  # a registered backbone (hdf/models/registry.py)
    width: int = 16  # first-stage channels (fixed-width torchvision backbones ignore it)
    norm: str = "batch"  # batch | group (GroupNorm keeps no running statistics to average)
    dropout: float = 0.1  # before the linear head
    dsu: float = 0.0  # DSU feature-statistics resampling in training: probability (paper: 0.5)
    channels_last: bool = False  # channels-last-3D weights and inputs (a GPU speed-up)
    weights: str | None = None  # local state_dict file (whole HDFNet or backbone); never downloaded
    dam: DAMConfig = field(default_factory=DAMConfig)

    def backbone_kwargs(self) -> dict[str, Any]:
        """The keys only this backbone's builder takes (those a subclass adds)."""
        common = {f for f in ModelConfig.__dataclass_fields__}
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in common}


@dataclass
class Tiny3DModel(ModelConfig):
    """Tiny3D, the fast CPU default: (2+1)D residual stages of widths w, 2w, 4w, 8w, keeping T."""

    backbone: str = "tiny3d"
    depth: int = 1  # residual blocks per stage


@dataclass
class VideoResNetModel(ModelConfig):
    """torchvision R3D-18 / MC3-18 / R(2+1)D-18 (widths fixed at 64..512, features 512-d)."""

    width: int = 64  # ignored: the widths are fixed
    channels_last: bool = True  # faster convs on GPU under bf16


@dataclass
class X3DSModel(ModelConfig):
    """X3D-S, the paper's backbone family: depthwise 3D bottlenecks, T kept at every stage."""

    backbone: str = "x3d_s"
    width: int = 24  # first-stage channels: stages 24, 48, 96, 192; features 432-d (conv5)
    depths: list[int] = field(default_factory=lambda: [3, 5, 11, 7])  # bottlenecks per stage
    dropout: float = 0.5  # X3D's head dropout
    channels_last: bool = True  # faster convs on GPU under bf16


# backbone name -> its model schema; a new backbone registers here beside its builder.
MODEL_KINDS: dict[str, type[ModelConfig]] = {
    "tiny3d": Tiny3DModel,
    "r3d_18": VideoResNetModel,
    "mc3_18": VideoResNetModel,
    "r2plus1d_18": VideoResNetModel,
    "x3d_s": X3DSModel,
}

# ---- data ----------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """What every dataset's data preset sets (hdf/data/source.py); a dataset adds its own keys."""

    name: str = MISSING  # the dataset (hdf/data registry)
    seed: int = 0  # frame-sampling offsets / generation stream
    num_frames: int = 16  # T: frames sampled per clip
    size: int = 112  # H = W the model sees
    sources: list[str] | None = None  # null = every source of the dataset; else these, in order
    heldout: list[str] = field(default_factory=list)  # scored every round, never trained on
    train: list[str] | None = None  # null = every source not held out


@dataclass
class SyntheticData(DataConfig):
    """The embedded synthetic multi-source benchmark (hdf/data/synthetic), generated then cached."""

    name: str = "synthetic"
    root: str = "${oc.env:HDF_CACHE,.cache}/synthetic"  # cache folder (relative to the cwd)
    num_frames: int = 8
    size: int = 48  # sources with a low native resolution are upsampled
    scale: float = 1.0  # multiplies every preset's clip counts (0.1 for quick tests)
    heldout: list[str] = field(default_factory=lambda: ["phone"])


@dataclass
class DFEWData(DataConfig):
    """DFEW in its official layout (hdf/data/dfew.py); one 5-fold protocol fold per run."""

    name: str = "dfew"
    root: str = MISSING  # the DFEW folder holding Clip/ and EmoLabel_DataSplit/
    variant: str = "clip_224x224"  # clip_224x224 (all frames) | clip_224x224_16f (16 TIM frames)
    fold: int = 1  # 1..5: train on set_K train, test on set_K test
    val_fraction: float = 0.1  # share of each source's fold-train clips held back as val
    label_base: int = 1  # official split files are 1-based; 0 for 0-based copies (S2D)
    sources_rule: str = "whole"  # whole (one source) | hash (num_sources parts by clip id) | csv
    num_sources: int = 4  # hash rule: how many sources, named part0..part{N-1}
    source_csv: str | None = None  # csv rule: a CSV with columns video_name,source


@dataclass
class FERV39kData(DataConfig):
    """FERV39k in its official layout (hdf/data/ferv39k.py); classes mapped into the DFEW order."""

    name: str = "ferv39k"
    root: str = MISSING  # the FERV39k folder holding 2_ClipsforFaceCrop/ and 4_setups/
    sources_by: str = "scene"  # scene (22 sources) | scenario (4 sources) | whole (one source)
    scenarios: dict[str, list[str]] | None = None  # null = our scene->scenario grouping
    val_fraction: float = 0.1  # share of each source's train clips held back as val


@dataclass
class ManifestData(DataConfig):
    """A site's own clips listed in a CSV (hdf/data/manifest.py): path,label[,source][,split]."""

    name: str = "manifest"
    manifest: str = MISSING  # the CSV; relative paths inside it are relative to its folder
    val_fraction: float = 0.1  # rows without a split value: share that goes to val
    test_fraction: float = 0.2  # ... and to test


@dataclass
class MultiData(DataConfig):
    """Several datasets at once (hdf/data/multi.py); every source is named <alias>/<source>."""

    name: str = "multi"
    # alias -> that dataset's data config (or a list of them, each with an optional `alias`)
    datasets: Any = None
    one_source_per_dataset: bool = False  # true: each whole dataset is one source named <alias>


# data.name -> its schema; a new dataset registers here beside its reader.
DATA_KINDS: dict[str, type[DataConfig]] = {
    "synthetic": SyntheticData,
    "dfew": DFEWData,
    "ferv39k": FERV39kData,
    "manifest": ManifestData,
    "multi": MultiData,
}

# ---- strategy ------------------------------------------------------------------------------------


@dataclass
class StrategyConfig:
    """What every strategy preset sets (server/strategy); a strategy adds its own section."""

    name: str = MISSING  # the registered strategy (server/strategy/__init__.py)
    fraction_train: float = 1.0  # share of training nodes sampled each round
    min_train_replies: int = 1  # fewer valid updates and the round keeps the previous model
    proximal_mu: float = 0.0  # FedProx: (mu/2)||w - w_global||^2 in every client's loss
    # recompute (a site re-estimates the received model's BN statistics on its own training
    # clips before scoring it; adapt.stats_clips) | stats (SiloBN: a site keeps the BN running
    # statistics of its last local model) | all (FedBN) | none
    local_norm: str = "recompute"


@dataclass
class DROSettingsConfig:
    """Distributionally robust aggregation over sources (server/strategy/dro.py, dro_math.py)."""

    mode: str = "eg"  # a registered lambda update (dro_math.DRO_MODES), e.g. eg, kl, cvar, drfa
    eta: float = 1.0  # step on lambda per unit of loss: lambda_k *= exp(eta * loss_k)
    eps: float = 0.1  # mixing toward the prior each round: every source keeps >= eps * p_k
    cap: float = 0.5  # no source weighs more than this (must be >= 1/K)
    loss_clip: float = 10.0  # losses above this count as loss_clip (negative ones are rejected)
    max_step: float = 0.1  # no lambda_k moves more than this in one round (1.0: unbounded)
    tau: float = 1.0  # kl mode only: temperature
    alpha: float = 0.5  # cvar mode only: share of the prior mass counted as the worst
    prior: str = "uniform"  # uniform | size
    sample_by_lambda: bool | None = None  # null: the mode's default (drfa samples by lambda)
    loss: str = "plain"  # plain | balanced (mean of per-class CE, ranks sources as UAR does)
    estimate: str | None = None  # sample | val | null (the mode's default: val for drfa, regret)
    smoothing: float = 0.0  # beta of an EMA across rounds of the per-source loss (0 = none)


@dataclass
class DROStrategy(StrategyConfig):
    name: str = "dro"
    dro: DROSettingsConfig = field(default_factory=DROSettingsConfig)


@dataclass
class QFedAvgSettingsConfig:
    """q-FFL (Li et al., 2020) fed with loss-before (server/strategy/qfedavg.py)."""

    q: float = 1.0  # fairness exponent (0 = FedAvg; the paper uses 1-5)
    client_lr: float = II("train.lr")  # L = 1 / client lr (Flower's QFedAvg) when lipschitz is null
    # L = 1/lr = 1000 assumes SGD clients: with AdamW the h term's q*L*||dw||^2 dwarfs F^q and the
    # step is ~1e-4 of FedAvg's (measured, tiny preset: ||dw||^2 = 13.7 after one epoch), so nothing
    # trains. 0.01 keeps it a mild trust region (step ~0.93 of the F^q-weighted mean); null: 1/lr.
    lipschitz: float | None = 0.01
    weighted_by_examples: bool = True  # p_k in both sums: q = 0 equals size-weighted FedAvg


@dataclass
class QFedAvgStrategy(StrategyConfig):
    name: str = "qfedavg"
    qfedavg: QFedAvgSettingsConfig = field(default_factory=QFedAvgSettingsConfig)


@dataclass
class FedDGGASettingsConfig:
    """FedDG-GA (Zhang et al., CVPR 2023): generalisation-gap-driven weights (feddg_ga.py)."""

    step: float = 0.2  # d, the paper's default, decayed linearly to 0 over the run
    num_rounds: int = II("rounds")  # R of the decay


@dataclass
class FedDGGAStrategy(StrategyConfig):
    name: str = "feddg_ga"
    feddg_ga: FedDGGASettingsConfig = field(default_factory=FedDGGASettingsConfig)


# strategy.name -> its schema; the presets without a section of their own use the base class.
STRATEGY_KINDS: dict[str, type[StrategyConfig]] = {
    "fedavg": StrategyConfig,
    "fedprox": StrategyConfig,
    "fedbn": StrategyConfig,
    "sequential": StrategyConfig,
    "local": StrategyConfig,
    "dro": DROStrategy,
    "qfedavg": QFedAvgStrategy,
    "feddg_ga": FedDGGAStrategy,
}

# ---- the rest of the run -------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Local training (hdf/train.py) and the server's lr schedule over rounds."""

    # Passes over the client's training split per round; a fraction (0.5) takes that share of a
    # pass's steps, a fresh random subset each round: more rounds fit one budget of client epochs.
    # 0.5 with 80 rounds (40 client epochs): shorter rounds with server_opt.lr=2 beat whole epochs
    # at equal client epochs, for DRO and FedAvg (README, Results, "More, shorter rounds").
    local_epochs: float = 0.5
    batch_size: int = 16
    # Peak lr of the base optimiser (AdamW's; SGD wants ~10-50x). A site takes ~1/K of the pooled
    # steps per round, and 4e-3 beat 2e-3 federated (README, Results); pooled does better at 2e-3.
    lr: float = 4.0e-3
    weight_decay: float = 0.05
    optimizer: str = "adamw"  # adamw | sgd (SGD + momentum, coupled weight decay); SAM wraps either
    momentum: float = 0.9  # sgd only: heavy-ball momentum
    # true: each site keeps its optimiser state (AdamW moments and step, SGD momentum) between
    # rounds in Flower's context.state, used again only if saved in the previous round of the same
    # run (client/optimizer_state.py); the pooled baseline keeps it across its rounds alike
    keep_optimizer_state: bool = False
    warmup_rounds: int = 1  # rounds of linear warm-up of the lr (the server sends each round's lr)
    round_min_lr_ratio: float = 0.1  # cosine over rounds down to this fraction of lr
    warmup_frac: float = 0.0  # warm-up inside one round's local steps (0: one lr per round)
    min_lr_ratio: float = 1.0  # cosine floor inside one round (1: constant within the round)
    # FixBN (Zhong et al., ICLR 2024): in rounds after this fraction of the run, local training
    # normalises with the received model's BatchNorm running statistics instead of each batch's,
    # and leaves them as received; null: batch statistics throughout. Aimed at the held-out gap
    # of the model as sent; measured no gain here at 0.5 (README, Results), so off by default.
    fixed_norm_after: float | None = None
    # Pooled baseline (and a site pooling several data sets): each batch holds one source's clips,
    # as a federated site's always do, instead of a mix. A control: it measures what mixing sources
    # in a batch (BatchNorm statistics, DSM's cross-source positives) is worth to the pooled model.
    source_batches: bool = False
    loss_before_clips: int = 64  # fixed sample of training clips scored before training (DRO)
    num_workers: int = 0  # data-loader worker processes (0 = in process)
    augment: bool = True  # random horizontal flip and crop jitter in training
    # torch threads of a site; null: a simulated site's CPUs rounded down (at least 1), a deployed
    # site every core (training rounds differently with the count: client/site.py site_threads)
    threads: int | None = None


@dataclass
class DSMConfig:
    """Distribution-aware Scaling Module, the loss (hdf/losses/dsm.py, docs/hdf_method.md)."""

    supcon: bool = True  # the supervised contrastive term
    ib: bool = True  # the information-bottleneck term Tr(Cov(Z)) inside it
    balance: bool = True  # weights from SAM's gradient norm g (false: alpha and beta fixed)
    alpha: float = 10.0  # lambda_CE = alpha * g / (g + 1); the released code's fixed CE weight
    beta: float = 0.1  # lambda_SC = beta / (g + 1) (alpha=1, beta=0.5 let SC swamp CE)
    tau: float = 0.1  # contrastive temperature
    eta: float = 0.2  # centre and width of the Gaussian pair weights on cosine similarity
    ib_weight: float = 0.01  # weight of Tr(Cov(Z)) inside the contrastive term
    label_smoothing: float = 0.1  # of the cross-entropy term


@dataclass
class ServerOptConfig:
    """The server's step along mix - global, after any strategy's mix (server_opt.py)."""

    name: str = "none"  # none | avgm (FedAvgM) | adam (FedAdam) | yogi (FedYogi)
    # none/avgm ~1-2 (none: 2 doubles the mix's step, which the default's short rounds want; < 1
    # damps it); adam/yogi ~1e-3..1e-1. Not above 1 with train.keep_optimizer_state (collapses).
    lr: float = 2.0
    momentum: float = 0.9  # avgm: m = momentum * m + delta
    beta1: float = 0.9  # adam/yogi first moment
    beta2: float = 0.99  # adam/yogi second moment
    tau: float = 1.0e-3  # adam/yogi: adaptivity floor in lr * m / (sqrt(v) + tau)
    # Gradient masked averaging (FedGMA, Tenison et al., TMLR 2023): each weight's step is scaled
    # by how many sites' updates agree on its sign, A = |mean_k sign(u_k - x)| (1 where A >= this
    # threshold, A below it), so directions only some sources take are damped. null: off.
    # Measured at 0.4 (FedAvg 80 x 0.25, 10 pairs): held-out phone +4.7, in-dist. mean -3.3.
    mask_tau: float | None = None


@dataclass
class SAMConfig:
    """Sharpness-aware minimisation around the base optimiser (hdf/optim/sam.py)."""

    enabled: bool = True  # false: one pass per step, no perturbation
    rho: float = 0.05  # radius of the weight perturbation


@dataclass
class EvalConfig:
    batch_size: int = 64  # clips per evaluation batch


@dataclass
class AdaptConfig:
    """Test-time adaptation of a held-out site before scoring (hdf/adapt.py)."""

    batch_size: int = 64  # clips per adaptation batch (AdaBN averages the per-batch statistics)
    tent_steps: int = 10  # TENT: Adam steps on the prediction entropy, one batch each
    tent_lr: float = 1.0e-3  # TENT: learning rate of the normalisation affine parameters
    # strategy.local_norm=recompute: a training site re-estimates BN statistics on at most this
    # many of its training clips (a fixed sample; 0 = all) before it scores a received model
    stats_clips: int = 512


@dataclass
class SimulationConfig:
    """Resources of each virtual SuperNode in `python -m simulations.run`."""

    num_cpus_per_client: float = 1
    num_gpus_per_client: float = 0.0
    # host:port of a running Ray cluster's head (what `ray start --head` prints) to join instead of
    # starting Ray here; clients then spread over all its nodes. null: $RAY_ADDRESS if set, else a
    # local Ray with all cores (simulations/ray_cluster.py)
    ray_address: str | None = None


@dataclass
class OutputConfig:
    root: str = "runs"  # each run writes runs/<timestamp>-<name>/
    wandb: str = "offline"  # offline | online | disabled
    wandb_project: str = "hdf-fed"  # the wandb project runs are logged to


@dataclass
class ServerConfig:
    """The ServerApp's round loop (server/federation.py)."""

    heldout_eval: str = "server"  # server: the ServerApp scores held-out sources | clients
    wait_for_nodes_s: float = 120  # how long to wait at start for every site to connect
    round_timeout_s: float = 3600  # a round ends when every site replied or this elapsed
    # Held-out scores each round: none = the plain score (always recorded, `heldout`); add bn
    # (AdaBN) and/or tent to also score each held-out source after adapting on its own unlabeled
    # test clips (`heldout_adapted` in metrics.jsonl); adapt.* sets how
    heldout_adapt: list[str] = field(default_factory=lambda: ["none", "bn"])
    loss_tolerance: float = 2.0  # a loss-before above this multiple of the server's is replaced
    # YAML file: source name -> OpenSSH public key(s) of the SuperNodes allowed to serve it (needs
    # flower-superlink --enable-supernode-auth); null: a source is bound to the first node
    # claiming it
    site_registry: str | None = None
    # One exchange a round: training sites score the model they receive on their val split in the
    # train message (before training) and the other sites get their evaluate message in the same
    # exchange; the last model gets one evaluate exchange of its own. Same numbers and
    # metrics.jsonl rows as false (a train then an evaluate exchange each round), every strategy
    eval_in_train: bool = True
    reply_poll_s: float = 0.25  # how often the ServerApp asks for replies (Flower's own Grid: 3 s)
    # Models (and updates) travel as one packed array plus a layout record (hdf/packing.py), one
    # transfer instead of one per tensor; false: one Array per tensor (the same model bit for bit)
    wire_pack: bool = True
    # float32 | bfloat16 | float16: precision of float32 arrays on the wire (needs wire_pack); the
    # server and sites keep float32, replies carry 16-bit deltas; integer buffers travel exactly
    wire_dtype: str = "float32"
    # Also score the average of the global models of the rounds after this fraction of the run
    # (SWA; hdf/runfolder/averaging.py): average.pt and average.json beside best.pt, scored once
    # at the end; training is unchanged. The pooled baseline averages alike. null: no average.
    # Measured at 0.5 under the cosine schedule: 2.5 points below the last round (README, Results)
    average_after: float | None = None


@dataclass
class LosoConfig:
    """A leave-one-source-out sweep (simulations/loso.py); only sweep presets set it."""

    strategies: list[str] = field(default_factory=lambda: ["fedavg", "dro"])  # conf/strategy files
    seeds: list[int] = field(default_factory=lambda: [0])
    heldout: list[str] | None = None  # null: every source in turn
    root: str | None = None  # null: <output.root>/loso
    jobs: int = 1  # runs at once, each its own process
    variants: dict[str, list[str]] | None = None  # {name: [overrides]}: each strategy per variant


@dataclass
class RunConfig:
    """One run. The field order is the order of a run's config.yaml."""

    model: ModelConfig = MISSING  # group model/: the backbone and DAM
    data: DataConfig = MISSING  # group data/: the dataset and its sources
    strategy: StrategyConfig = MISSING  # group strategy/: how the server aggregates
    name: str = "default"  # names the run folder
    seed: int = 0  # seeds data order, model init and client sampling
    rounds: int = 80  # federated rounds (x train.local_epochs = client epochs: 40 by default)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16
    deterministic: bool = False  # torch deterministic algorithms and cuDNN (hdf/device.py)
    train: TrainConfig = field(default_factory=TrainConfig)
    dsm: DSMConfig = field(default_factory=DSMConfig)
    server_opt: ServerOptConfig = field(default_factory=ServerOptConfig)
    sam: SAMConfig = field(default_factory=SAMConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    resume: str | None = None  # path of a run folder to continue
    server: ServerConfig = field(default_factory=ServerConfig)
    loso: LosoConfig | None = None  # set by sweep presets (experiment=loso_*) only


# Keys that existed once and were replaced: the error names the replacement.
RENAMED: dict[str, str] = {
    "strategy.dro.server_lr": (
        "server_opt.lr (with server_opt.name=none the new model is old + lr * (mix - old), as "
        "before; it applies to every strategy)"
    ),
}
