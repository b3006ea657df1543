"""The optimisers without torch._dynamo: the same numbers as torch's, and no import (issue 16)."""

import subprocess
import sys

import pytest
import torch

from hdf.optim.base import build_optimizer


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3)
    )


def _train(
    model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int = 4
) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 6, generator=g)).square().mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_same_bits_and_state_as_torch(name) -> None:
    ours_model, theirs_model = _model(), _model()
    ours = build_optimizer(ours_model, name, lr=0.05, weight_decay=0.01, momentum=0.9)
    params = list(theirs_model.parameters())
    theirs = (
        torch.optim.AdamW(params, lr=0.05, weight_decay=0.01, fused=True)
        if name == "adamw"
        else torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01, foreach=True)
    )
    for a, b in zip(_train(ours_model, ours), _train(theirs_model, theirs), strict=True):
        assert torch.equal(a, b)
    state = ours.state_dict()
    assert state["param_groups"][0]["lr"] == 0.05 and len(state["state"]) == len(params)
    again = build_optimizer(_model(), name, lr=0.05, weight_decay=0.01, momentum=0.9)
    again.load_state_dict(state)
    key = "exp_avg" if name == "adamw" else "momentum_buffer"
    assert torch.equal(again.state_dict()["state"][0][key], theirs.state_dict()["state"][0][key])


def test_building_and_stepping_never_imports_torch_dynamo() -> None:
    code = (
        "import sys, torch\n"
        "from hdf.optim.base import build_optimizer\n"
        "m = torch.nn.Linear(3, 2)\n"
        "opt = build_optimizer(m, 'adamw', 0.1, 0.0, 0.0)\n"
        "m(torch.ones(1, 3)).sum().backward(); opt.step(); opt.zero_grad()\n"
        "opt.load_state_dict(opt.state_dict())\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
