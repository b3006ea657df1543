"""SAM, sharpness-aware minimisation around a base optimizer, as in HDF (docs/hdf_method.md §R5).

Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021.
The released HDF trainer uses a non-adaptive SAM around AdamW with rho = 0.05 and stores the
first-pass gradient norm without using it; here that norm is returned and drives DSM's balance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch


class SAM:
    """Two-pass SAM: perturb by rho * grad / ||grad||, recompute the gradient, restore, step.

    ``rho = 0`` turns the perturbation off: ``first_step`` then only measures g, and the caller
    runs a single pass (``second_step`` still steps the base optimizer).
    """

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        base_optimizer: torch.optim.Optimizer,
        rho: float,
    ) -> None:
        if rho < 0:
            raise ValueError(f"sam.rho must be >= 0, got {rho}")
        self.params = [p for p in params if p.requires_grad]
        self.base_optimizer = base_optimizer
        self.rho = float(rho)
        # Copies of the weights, allocated once and refilled every step; `_perturbed` says
        # whether they hold weights to restore.
        self._saved: list[torch.Tensor] | None = None
        self._perturbed = False
        self.skipped = 0  # base steps not taken because a gradient was not finite

    @property
    def two_pass(self) -> bool:
        """True when a second forward/backward pass at the perturbed weights is needed."""
        return self.rho > 0

    @torch.no_grad()
    def grad_norm(self, grad_scale: float = 1.0) -> float:
        """Global L2 norm of the current gradients (divided by a loss scale, for fp16)."""
        grads = [p.grad.float() for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        # one multi-tensor call instead of a Python loop of per-tensor norms
        norms = torch.stack(torch._foreach_norm(grads))
        return float(torch.linalg.vector_norm(norms)) / grad_scale

    @torch.no_grad()
    def first_step(self, grad_scale: float = 1.0) -> float:
        """Return g = ||grad||; if rho > 0, save the weights and move them by rho * grad / g.

        ``grad_scale`` is the loss scale of fp16 training (the gradients are scaled by it); a
        non-finite g (an fp16 overflow) leaves the weights unperturbed.
        """
        g = self.grad_norm(grad_scale)
        if self._perturbed:
            raise RuntimeError("SAM.first_step called twice without second_step in between")
        if self.rho > 0 and math.isfinite(g) and g > 0:
            if self._saved is None:
                self._saved = [torch.empty_like(p) for p in self.params]
            torch._foreach_copy_(self._saved, self.params)
            self._perturbed = True
            step = self.rho / (g * grad_scale + 1e-12)
            moved = [p for p in self.params if p.grad is not None]
            grads = [p.grad.to(p.dtype) for p in moved]
            torch._foreach_add_(moved, grads, alpha=step)
        return g

    @torch.no_grad()
    def restore(self) -> None:
        """Put back the weights saved by ``first_step`` (exactly, by copy)."""
        if not self._perturbed:
            return
        torch._foreach_copy_(self.params, self._saved)
        self._perturbed = False

    def second_step(self, scaler: torch.amp.GradScaler | None = None) -> None:
        """Restore the weights, then step the base optimizer with the current gradients.

        A non-finite gradient skips the step and counts it in ``skipped``, as fp16's GradScaler
        does for its overflows; why: one NaN would otherwise spread into every weight through
        the optimiser's update (seen with torch 2.14's oneDNN bf16 conv3d weight gradients on
        CPU, which are non-finite at random for short temporal inputs).
        """
        self.restore()
        if scaler is None:
            if math.isfinite(self.grad_norm()):
                self.base_optimizer.step()
            else:
                self.skipped += 1
        else:
            scaler.step(self.base_optimizer)
            scaler.update()

    def step(
        self,
        loss: torch.Tensor,
        perturbed_loss: Callable[[float], torch.Tensor],
        scaler: torch.amp.GradScaler | None = None,
    ) -> float:
        """One SAM update from ``loss`` at the current weights; returns its gradient norm g.

        Backpropagates ``loss``, takes g and the ascent step, backpropagates
        ``perturbed_loss(g)`` (the same batch at w + e(w); g is handed over because HDF's DSM
        weighs its terms by it), restores w and steps the base optimizer with that gradient.
        With rho = 0 there is no second pass and the base step uses the first gradient.
        """
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        (scaler.scale(loss) if scaler is not None else loss).backward()
        g = self.first_step(grad_scale=scale)
        if self.two_pass:
            self.zero_grad()
            loss2 = perturbed_loss(g)
            (scaler.scale(loss2) if scaler is not None else loss2).backward()
        self.second_step(scaler)
        self.zero_grad()
        return g

    def zero_grad(self) -> None:
        """Clear the gradients (set to None) of every parameter."""
        self.base_optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None
