"""Sharpness-aware minimisation: SAM (Foret et al., ICLR 2021) and its adaptive form ASAM (Kwon et al., ICML 2021),
as a wrapper around any torch optimizer. DyTox++ uses ASAM with rho = 3.0 (dytox.md section 1.3).

One step, with gradient g at the weights w:
    scale  T_w = |w| + eta (ASAM) or 1 (SAM), per element
    eps    = rho * T_w^2 g / || T_w g ||_2          (the norm over all parameters together)
    w     <- w + eps;  g' = grad of the loss at w + eps;  w <- w - eps;  base optimizer step with g'.
ASAM's eta is 0 by default, as in the common implementation DyTox's ASAM follows (adaptive rho 3.0 is tuned for
that form). Parameters without a gradient are not perturbed.

SAM is a harness.core.method.ClosureOptimizer: the loop calls `zero_grad()` then `step(closure)`, where the
closure runs the forward pass under autocast, computes the loss and calls backward; the loop sets each epoch's
lr through `param_groups`, which are the base optimizer's, so learning-rate changes reach the real optimizer.
"""
from __future__ import annotations

from typing import Callable

import torch


class SAM:
    """Wraps `base_optimizer`; `step(closure)` does the two forward-backward passes. Returns the first loss."""

    requires_closure = True          # the ClosureOptimizer protocol

    def __init__(self, base_optimizer: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False,
                 eta: float = 0.0) -> None:
        if rho < 0:
            raise ValueError(f"SAM rho must be >= 0, got {rho}")
        if eta < 0:
            raise ValueError(f"ASAM eta must be >= 0, got {eta}")
        self.base_optimizer = base_optimizer
        self.rho, self.adaptive, self.eta = float(rho), bool(adaptive), float(eta)
        self._eps: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    # ---- what the loop and schedulers see ---------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.base_optimizer.param_groups

    @property
    def state(self):
        return self.base_optimizer.state

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.base_optimizer.load_state_dict(state)

    # ---- the two half-steps --------------------------------------------------------------------------------
    def _scale(self, p: torch.Tensor) -> torch.Tensor | float:
        return p.detach().abs() + self.eta if self.adaptive else 1.0

    @torch.no_grad()
    def perturb(self) -> float:
        """w <- w + eps from the current gradients; returns || T_w g ||."""
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            self._eps = []
            return 0.0
        # float32 norm of the scaled gradient over every parameter together
        norms = [(self._scale(p) * p.grad).float().norm(p=2) for p in params]
        grad_norm = torch.linalg.vector_norm(torch.stack([n.to(params[0].device) for n in norms]))
        factor = self.rho / (grad_norm + 1e-12)
        self._eps = []
        for p in params:
            scale = self._scale(p)
            eps = (scale * scale * p.grad * factor.to(p.device)).to(p.dtype)
            p.add_(eps)
            self._eps.append((p, eps))
        return float(grad_norm)

    @torch.no_grad()
    def restore(self) -> None:
        """w <- w - eps (back to the weights the gradient of the first pass was taken at)."""
        for p, eps in self._eps:
            p.sub_(eps)
        self._eps = []

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        if closure is None:
            raise RuntimeError("SAM needs a closure (forward + loss + backward); set requires_closure")
        loss = closure()                      # gradients at w
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(f"non-finite loss {float(loss)} before the SAM step; lower the learning rate "
                                     "or disable AMP (the original runs SAM in fp32)")
        self.perturb()
        self.zero_grad(set_to_none=True)
        closure()                             # gradients at w + eps
        self.restore()
        self.base_optimizer.step()
        return loss.detach()


def ASAM(base_optimizer: torch.optim.Optimizer, rho: float = 3.0, eta: float = 0.0) -> SAM:
    """Adaptive SAM (DyTox++: rho 3.0)."""
    return SAM(base_optimizer, rho=rho, adaptive=True, eta=eta)
