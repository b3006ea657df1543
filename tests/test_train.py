"""Local training loop: learns a tiny problem, SAM passes, determinism, FedProx, loss-before."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from hdf.config.schema import DSMConfig, RunConfig, SAMConfig, Tiny3DModel, TrainConfig
from hdf.data.source import ConcatClipDataset, PartBatchSampler, TensorClipDataset
from hdf.losses.dsm import DSMLoss
from hdf.optim.sam import SAM
from hdf.train import augment_batch, loss_on_sample, train_local


class StandIn(nn.Module):
    """HDFNet's two methods on a tiny model: preprocess uint8 B,T,C,H,W; forward -> (logits, f)."""

    def __init__(self, num_classes: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 8, 1)
        self.norm = nn.BatchNorm3d(8)
        self.head = nn.Linear(8, num_classes)
        self.calls = 0

    def preprocess(self, clips: torch.Tensor) -> torch.Tensor:
        return clips.float().div(255.0).permute(0, 2, 1, 3, 4).contiguous()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        features = torch.relu(self.norm(self.conv(x))).mean(dim=(2, 3, 4))
        return self.head(features), features


def _dataset(n: int = 24, seed: int = 0) -> TensorClipDataset:
    """Class c in {0, 1, 2} has a bright channel c plus noise: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    clips = torch.randint(0, 60, (n, 2, 3, 8, 8), generator=g, dtype=torch.uint8)
    for i, y in enumerate(labels.tolist()):
        clips[i, :, y] += 150
    return TensorClipDataset(clips, labels.numpy(), source_index=0)


def _cfg(**sam: object) -> RunConfig:
    """fp32, a short warm-up and cosine inside the call, DSM with the paper's fixed-form
    alpha = 1, beta = 0.5 (balanced by g), SAM on unless `sam` says otherwise."""
    return RunConfig(
        precision="fp32",
        train=TrainConfig(batch_size=8, weight_decay=0.0, warmup_frac=0.1, min_lr_ratio=0.1),
        dsm=DSMConfig(alpha=1.0, beta=0.5),
        sam=SAMConfig(**sam),  # type: ignore[arg-type]
    )


CPU = torch.device("cpu")


class Recorded(torch.utils.data.Dataset):
    """A dataset that records the order its clips are read in."""

    def __init__(self, base: TensorClipDataset) -> None:
        self.base, self.read = base, []

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        self.read.append(int(i))
        return self.base[i]


@pytest.mark.parametrize(("epochs", "steps"), [(0.5, 2), (1.25, 5), (2, 8), (0.01, 1)])
def test_a_fraction_of_an_epoch_takes_that_share_of_the_steps(epochs: float, steps: int) -> None:
    """32 clips at batch 8 are 4 steps a pass; 0.01 of a pass still takes one step."""
    stats = train_local(StandIn(), _dataset(32), _cfg(), CPU, epochs=epochs, lr=1e-2, seed=0)
    assert stats["steps"] == steps


def test_a_fraction_reads_a_prefix_of_a_pass_and_whole_passes_read_as_before() -> None:
    """Half an epoch reads the first half of the pass's shuffled order (another seed, another
    half); two epochs read exactly what two passes of the seeded loader read, so whole-epoch
    runs are unchanged by fractions (the sampler's closing draw from the generator included)."""
    cfg = _cfg()
    cfg.train.augment = False  # the sampler is then the only draw from the loader's generator
    read = {}
    for epochs, seed in [(2, 3), (0.5, 3), (0.5, 4)]:
        data = Recorded(_dataset(32))
        train_local(StandIn(), data, cfg, CPU, epochs=epochs, lr=1e-2, seed=seed)
        read[epochs, seed] = data.read
    hand = Recorded(_dataset(32))
    gen = torch.Generator().manual_seed(3)
    loader = torch.utils.data.DataLoader(hand, batch_size=8, shuffle=True, generator=gen)
    for _pass in range(2):
        for _batch in loader:
            pass
    hand = hand.read
    assert read[2, 3] == hand
    assert read[0.5, 3] == hand[:16]
    assert read[0.5, 4] != read[0.5, 3] and sorted(set(read[0.5, 4])) != list(range(32))


@pytest.mark.parametrize("epochs", [0, -1, float("nan"), float("inf")])
def test_epochs_must_be_a_positive_number(epochs: float) -> None:
    with pytest.raises(ValueError, match="epochs must be a positive number"):
        train_local(StandIn(), _dataset(), _cfg(), CPU, epochs=epochs, lr=1e-2, seed=0)


def test_train_local_reduces_loss() -> None:
    """Plain CE on a fixed sample falls after a few local epochs; training accuracy is high."""
    torch.manual_seed(0)
    model, data = StandIn(), _dataset()
    before = loss_on_sample(model, data, CPU, num_clips=24, seed=1, batch_size=12).plain
    stats = train_local(model, data, _cfg(), CPU, epochs=8, lr=0.05, seed=0)
    after = loss_on_sample(model, data, CPU, num_clips=24, seed=1, batch_size=12).plain
    assert after < 0.5 * before
    for key in ("loss", "uar", "war", "num_examples", "steps", "grad_norm", "ce", "lambda_ce"):
        assert key in stats and math.isfinite(stats[key]), key
    assert stats["num_examples"] == 24 and stats["steps"] == 8 * 3
    assert stats["war"] > 0.5


@pytest.mark.parametrize(("enabled", "passes"), [(True, 2), (False, 1)])
def test_sam_runs_two_forward_passes_per_step(enabled: bool, passes: int) -> None:
    model = StandIn()
    stats = train_local(model, _dataset(), _cfg(enabled=enabled), CPU, epochs=1, lr=1e-3, seed=0)
    assert model.calls == passes * stats["steps"]


@pytest.mark.parametrize("sam_on", [True, False])
def test_dsm_balance_follows_sams_first_pass_g(
    monkeypatch: pytest.MonkeyPatch, sam_on: bool
) -> None:
    """Each step's g (the first-pass gradient norm SAM measures) sets DSM's balance.

    SAM on: first pass (previous step's g, or g = 1 before any), first_step -> g, then the second
    pass, whose gradient is the one applied, gets this g: lambda_CE = alpha g / (g + 1),
    lambda_SC = beta / (g + 1). SAM off: g is remembered for the next step's single pass.
    """
    events: list[tuple] = []
    dsm_forward, sam_first_step = DSMLoss.forward, SAM.first_step

    def recorded_forward(
        self: DSMLoss,
        logits: torch.Tensor,
        features: torch.Tensor,
        labels: torch.Tensor,
        grad_norm: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        loss, parts = dsm_forward(self, logits, features, labels, grad_norm)
        events.append(("loss", grad_norm, parts["lambda_ce"], parts["lambda_sc"]))
        return loss, parts

    def recorded_first_step(self: SAM, grad_scale: float = 1.0) -> float:
        g = sam_first_step(self, grad_scale)
        events.append(("g", g))
        return g

    monkeypatch.setattr(DSMLoss, "forward", recorded_forward)
    monkeypatch.setattr(SAM, "first_step", recorded_first_step)
    cfg = _cfg(enabled=sam_on)  # dsm alpha = 1, beta = 0.5, balance on
    stats = train_local(StandIn(), _dataset(), cfg, CPU, epochs=1, lr=1e-2, seed=0)

    def balance(g: float) -> tuple[float, float]:
        return pytest.approx((1.0 * g / (g + 1), 0.5 / (g + 1)))

    per_step = 3 if sam_on else 2
    assert stats["steps"] == 3 and len(events) == per_step * 3
    previous_g = 1.0
    gs = []
    for step in range(3):
        first, (kind, g), *second = events[per_step * step : per_step * (step + 1)]
        assert kind == "g" and first[0] == "loss" and first[1] is None
        assert first[2:] == balance(previous_g)
        if sam_on:
            kind, second_g, *lambdas = second[0]
            assert kind == "loss" and second_g == g and tuple(lambdas) == balance(g)
        previous_g = g
        gs.append(g)
    assert stats["grad_norm"] == pytest.approx(np.mean(gs))


def test_train_local_is_deterministic_for_a_seed() -> None:
    """Same initial weights and seed: identical weights and metrics after training."""
    torch.manual_seed(0)
    a = StandIn()
    b = copy.deepcopy(a)
    sa = train_local(a, _dataset(), _cfg(), CPU, epochs=2, lr=1e-2, seed=7)
    sb = train_local(b, _dataset(), _cfg(), CPU, epochs=2, lr=1e-2, seed=7)
    assert {k: v for k, v in sa.items() if k != "seconds"} == {
        k: v for k, v in sb.items() if k != "seconds"
    }
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_fedprox_keeps_weights_near_the_global_model() -> None:
    """A large proximal mu moves the weights far less than mu = 0."""
    torch.manual_seed(0)
    start = StandIn()
    moved = {}
    for mu in (0.0, 100.0):
        model = copy.deepcopy(start)
        train_local(model, _dataset(), _cfg(), CPU, epochs=2, lr=0.05, seed=0, proximal_mu=mu)
        moved[mu] = sum(
            float((p.detach() - q.detach()).square().sum())
            for p, q in zip(model.parameters(), start.parameters(), strict=True)
        )
    assert moved[100.0] < 0.5 * moved[0.0]


def test_loss_on_sample_is_fixed_by_seed() -> None:
    """Same seed: same clips and the same loss; eval mode is used and training mode restored."""
    torch.manual_seed(0)
    model, data = StandIn(), _dataset(n=30)
    model.train()
    first = loss_on_sample(model, data, CPU, num_clips=10, seed=3, batch_size=4)
    second = loss_on_sample(model, data, CPU, num_clips=10, seed=3, batch_size=7)
    assert first == pytest.approx(second, rel=1e-6)
    assert model.training
    other = loss_on_sample(model, data, CPU, num_clips=10, seed=4, batch_size=4)
    assert other != pytest.approx(first, rel=1e-6)
    # more clips than the dataset holds: scores all of them
    everything = loss_on_sample(model, data, CPU, num_clips=1000, seed=0, batch_size=64)
    assert math.isfinite(everything.plain) and math.isfinite(everything.balanced)


class Fixed(nn.Module):
    """Logits that depend only on the label hidden in the clip: class 0 clips get p(0) = .5,
    class 1 clips get p(1) = .25 (the rest spread over the other classes)."""

    def preprocess(self, clips: torch.Tensor) -> torch.Tensor:
        return clips.float()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = x[:, 0, 0, 0, 0].long()
        p = torch.full((len(y), 7), 0.5 / 6)
        p[y == 0, 0] = 0.5
        p[y == 1] = 0.75 / 6
        p[y == 1, 1] = 0.25
        return p.log(), p


def test_balanced_loss_weighs_every_class_alike() -> None:
    """3 clips of class 0 (CE ln 2) and 1 of class 1 (CE ln 4): plain (3 ln 2 + ln 4) / 4 =
    1.25 ln 2; balanced (ln 2 + ln 4) / 2 = 1.5 ln 2."""
    labels = np.array([0, 0, 0, 1])
    clips = torch.zeros(4, 1, 3, 2, 2, dtype=torch.uint8)
    clips[:, 0, 0, 0, 0] = torch.from_numpy(labels).to(torch.uint8)
    data = TensorClipDataset(clips, labels, source_index=0)
    out = loss_on_sample(Fixed(), data, CPU, num_clips=4, seed=0, batch_size=3)
    assert out.plain == pytest.approx(1.25 * math.log(2), rel=1e-5)
    assert out.balanced == pytest.approx(1.5 * math.log(2), rel=1e-5)


def test_augment_batch_flip_and_shift() -> None:
    """Shape kept; with max_shift 0 every clip is either unchanged or mirrored left-right."""
    x = torch.randn(6, 3, 2, 5, 7)
    g = torch.Generator().manual_seed(0)
    y = augment_batch(x, g, max_shift=0)
    assert y.shape == x.shape
    for i in range(6):
        assert torch.equal(y[i], x[i]) or torch.equal(y[i], x[i].flip(-1))
    shifted = augment_batch(x, torch.Generator().manual_seed(1), max_shift=2)
    assert shifted.shape == x.shape


def _augment_by_loops(x: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """The augmentation pixel by pixel: pad by replication, crop at (dy, dx), then mirror."""
    b, _, _, h, w = x.shape
    flip = torch.rand(b, generator=generator) < 0.5  # the same draws, in the same order
    shifts = torch.randint(-max_shift, max_shift + 1, (b, 2), generator=generator)
    out = torch.empty_like(x)
    for i in range(b):
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        for r in range(h):
            for c in range(w):
                col = w - 1 - c if flip[i] else c
                src_r = min(max(r + dy, 0), h - 1)
                src_c = min(max(col + dx, 0), w - 1)
                out[i, :, :, r, c] = x[i, :, :, src_r, src_c]
    return out


@pytest.mark.parametrize("max_shift", [0, 1, 3])
def test_augment_batch_equals_pad_crop_flip_by_loops(max_shift: int) -> None:
    """Bit-identical to the loop reference on a non-square batch; channels-last stays so."""
    x = torch.randn(6, 3, 2, 5, 7)
    for seed in range(3):
        got = augment_batch(x, torch.Generator().manual_seed(seed), max_shift)
        want = _augment_by_loops(x, torch.Generator().manual_seed(seed), max_shift)
        assert torch.equal(got, want), seed
    cl = x.contiguous(memory_format=torch.channels_last_3d)
    got = augment_batch(cl, torch.Generator().manual_seed(0), max_shift)
    assert torch.equal(got, _augment_by_loops(x, torch.Generator().manual_seed(0), max_shift))
    assert got.is_contiguous(memory_format=torch.channels_last_3d)


def test_all_dsm_switches_off_gives_plain_ce() -> None:
    loss_fn = DSMLoss(supcon=False, ib=False, balance=False, alpha=1.0)
    logits, labels = torch.randn(4, 7), torch.tensor([0, 1, 2, 3])
    loss, _ = loss_fn(logits, torch.randn(4, 5), labels)
    expected = nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(loss, expected)


def test_train_local_hdfnet_smoke() -> None:
    """The real default model (tiny3d + DAM) trains one epoch with DSM and SAM, finite outputs."""
    from hdf.models import build_model

    torch.manual_seed(0)
    model = build_model(Tiny3DModel(width=4), num_frames=4, size=32)
    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (6, 4, 3, 32, 32), generator=g, dtype=torch.uint8)
    data = TensorClipDataset(clips, np.array([0, 1, 2, 0, 1, 2]), source_index=0)
    cfg = _cfg()
    cfg.train.batch_size = 3
    stats = train_local(model, data, cfg, CPU, epochs=1, lr=1e-3, seed=0)
    assert (
        stats["steps"] == 2 and math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])
    )
    assert all(torch.isfinite(p).all() for p in model.parameters())


class EvalNorm(nn.Module):
    """BatchNorm3d's eval-mode formula by hand, with statistics no batch updates."""

    def __init__(self, norm: nn.BatchNorm3d) -> None:
        super().__init__()
        self.weight, self.bias = copy.deepcopy(norm.weight), copy.deepcopy(norm.bias)
        self.mean, self.var, self.eps = (
            norm.running_mean.clone(),
            norm.running_var.clone(),
            norm.eps,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1, 1)
        scale = (self.var + self.eps).rsqrt().view(shape)
        return (x - self.mean.view(shape)) * scale * self.weight.view(shape) + self.bias.view(shape)


def test_fixed_norm_trains_as_the_eval_mode_formula_and_keeps_the_statistics() -> None:
    """`fixed_norm=True` (FixBN): training equals training the same model whose BatchNorm is
    its eval-mode formula by hand (running statistics, affine parameters learning); the
    running statistics and the batch counter stay as they were. Without it training differs."""
    torch.manual_seed(0)
    model = StandIn()
    with torch.no_grad():
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
    hand, free = copy.deepcopy(model), copy.deepcopy(model)
    hand.norm = EvalNorm(model.norm)
    kept = {
        k: v.clone() for k, v in model.norm.state_dict().items() if "running" in k or "num" in k
    }
    data, cfg = _dataset(), _cfg(enabled=False)
    train_local(model, data, cfg, CPU, epochs=2, lr=1e-2, seed=3, fixed_norm=True)
    train_local(hand, data, cfg, CPU, epochs=2, lr=1e-2, seed=3)
    train_local(free, data, cfg, CPU, epochs=2, lr=1e-2, seed=3)
    for k, v in kept.items():
        assert torch.equal(model.norm.state_dict()[k], v), k
    assert not torch.equal(model.norm.weight, hand.norm.weight.new_ones(8))  # affine trained
    for name in ("conv.weight", "head.weight"):
        got, want = model.get_parameter(name), hand.get_parameter(name)
        assert torch.allclose(got, want, atol=1e-5), name
        assert not torch.allclose(got, free.get_parameter(name), atol=1e-3), name
    assert torch.allclose(model.norm.weight, hand.norm.weight, atol=1e-5)


def _parts(sizes: tuple[int, ...] = (5, 7, 3)) -> ConcatClipDataset:
    """Part k's clips are all the value 40 * k + 10, so a batch's pixels name its parts."""
    parts = []
    for k, n in enumerate(sizes):
        clips = torch.full((n, 2, 3, 8, 8), 40 * k + 10, dtype=torch.uint8)
        parts.append(TensorClipDataset(clips, (torch.arange(n) % 3).numpy(), source_index=k))
    return ConcatClipDataset(parts)


def test_part_batches_hold_one_part_each_and_cover_every_clip_once_a_pass() -> None:
    """Parts of 5, 7 and 3 clips at batch 4: 2 + 2 + 1 = 5 batches, not ceil(15 / 4) = 4."""
    data = _parts()
    sampler = PartBatchSampler(data, 4, torch.Generator().manual_seed(0))
    assert len(sampler) == 5
    batches = list(sampler)
    assert len(batches) == 5
    assert sorted(i for b in batches for i in b) == list(range(15))
    bounds = data.offsets
    for b in batches:
        assert len({int(np.searchsorted(bounds, i, side="right")) - 1 for i in b}) == 1, b
    assert sorted(len(b) for b in batches) == [1, 3, 3, 4, 4]
    again = list(PartBatchSampler(data, 4, torch.Generator().manual_seed(0)))
    other = list(PartBatchSampler(data, 4, torch.Generator().manual_seed(1)))
    assert again == batches and other != batches
    assert list(sampler) != batches  # the next pass, a fresh order from the same generator


@pytest.mark.parametrize("source_batches", [False, True])
def test_train_local_batches_pooled_data_by_source_only_when_asked(source_batches: bool) -> None:
    seen: list[set[int]] = []

    class Watching(StandIn):
        def preprocess(self, clips: torch.Tensor) -> torch.Tensor:
            seen.append(set(clips[:, 0, 0, 0, 0].tolist()))
            return super().preprocess(clips)

    cfg = _cfg()
    cfg.train.batch_size = 4
    cfg.train.source_batches = source_batches
    stats = train_local(Watching(), _parts(), cfg, CPU, epochs=3, lr=1e-2, seed=0)
    assert stats["steps"] == len(seen) == (15 if source_batches else 12)
    mixed = sum(len(values) > 1 for values in seen)
    assert mixed == 0 if source_batches else mixed > 0
