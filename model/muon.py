"""Muon: momentum, orthogonalised, for the weight matrices inside the transformer blocks.

AdamW scales every number of a gradient on its own. For a weight matrix that is a poor fit:
a gradient matrix of a transformer layer is dominated by a few directions (its largest
singular values), so a step along it mostly pushes on what the layer already does. Muon
replaces the update matrix G = U S V^T by its nearest orthogonal matrix U V^T: every
direction the gradient names gets the same step size. Measured by the GPT-2 speedrun
community, this reaches a given loss in markedly fewer steps than AdamW.

Computing U V^T by an SVD is slow on a GPU; a few Newton-Schulz iterations get close enough
(the singular values land near 1, not exactly on it, and that is all Muon needs). Only 2-D
weights inside the blocks use Muon. Embeddings (a lookup, not a linear map of a direction),
the output head, norms' gains and biases keep AdamW, in the same optimizer, so one
state_dict holds both and resume stays exact.

Under DDP every rank computes the same orthogonalisation of the same all-reduced gradient:
redundant, and simple. (The speedrun splits the matrices between the ranks instead.)
"""

import torch

# Coefficients of the quintic iteration X <- aX + b(XX^T)X + c(XX^T)^2 X, chosen (by the Muon
# authors) to pull every singular value in (0, 1] up towards 1 as fast as possible, at the
# price of leaving them in roughly [0.7, 1.2] instead of converging exactly.
NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix, steps=5):
    """An approximation of U V^T for matrix = U S V^T, by Newton-Schulz iterations. A stack of
    matrices (..., rows, cols) is done in one go: a few big matmuls instead of many small ones."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    # bfloat16 on a GPU is fast and accurate enough; CPUs do float32 faster
    x = matrix.to(torch.bfloat16 if matrix.is_cuda else torch.float32)
    transposed = x.size(-2) > x.size(-1)
    if transposed:  # iterate on the wide orientation: X X^T is then the smaller square
        x = x.mT
    # the Frobenius norm bounds the largest singular value: all are now <= 1
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.mT
    return x.to(matrix.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for the groups with use_muon=True, AdamW for the others.

    Muon groups: lr, momentum, weight_decay (decoupled, as in AdamW), nesterov.
    AdamW groups: lr, betas, eps, weight_decay."""

    def __init__(self, param_groups, momentum=0.95, betas=(0.9, 0.95), eps=1e-8, nesterov=True):
        defaults = dict(lr=0.02, momentum=momentum, betas=betas, eps=eps, weight_decay=0.0, nesterov=nesterov,
                        use_muon=False)
        super().__init__(param_groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group):
        by_shape = {}  # matrices of one shape are orthogonalised together, as one stack
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buffer = state["momentum_buffer"]
            buffer.lerp_(p.grad, 1 - group["momentum"])  # an exponential average of the gradients
            # Nesterov: look one momentum step ahead, which damps the oscillation plain momentum has
            direction = p.grad.lerp(buffer, group["momentum"]) if group["nesterov"] else buffer
            by_shape.setdefault(tuple(p.shape), []).append((p, direction))
        for (rows, cols), pairs in by_shape.items():
            updates = orthogonalize(torch.stack([direction for _, direction in pairs]))
            # An orthogonal update has entries of size ~1/sqrt(max(rows, cols)); the scale makes a
            # tall matrix's step as large, per entry, as a square one's.
            scale = max(1.0, rows / cols) ** 0.5
            for (p, _), update in zip(pairs, updates):
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"] * scale)

    def _adamw_step(self, group):
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            step = state["step"].item()
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            # bias correction: the averages start at zero and would make the first steps too small
            step_size = group["lr"] / (1 - beta1 ** step)
            denominator = (state["exp_avg_sq"] / (1 - beta2 ** step)).sqrt_().add_(group["eps"])
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.addcdiv_(state["exp_avg"], denominator, value=-step_size)
