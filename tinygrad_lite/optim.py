"""Optimizers, in order of increasing complexity: SGD, Adam, AdamW.
Then the learning-rate schedule (warmup + cosine) and gradient clipping.

Every optimizer follows PyTorch's definitions, so numbers transfer both ways. Updates
are done in place on `p.data` (no graph is recorded: this is not part of the model).
"""
from __future__ import annotations

import math
from typing import Any, Iterable

from . import backend
from .tensor import Tensor


class Optimizer:
    """Holds parameter groups: [{"params": [...], "lr": ..., "weight_decay": ...}, ...].

    Pass either a list of parameters or a list of such dicts (so e.g. biases and norm
    weights can skip weight decay). Group options default to the constructor's.
    """

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = []
        for group in groups:
            g = {**defaults, **group, "params": list(group["params"])}
            if g["lr"] < 0:
                raise ValueError(f"learning rate must be >= 0, got {g['lr']}")
            self.param_groups.append(g)
        self.state: dict[int, dict[str, Any]] = {}  # id(param) -> its buffers
        self.step_count = 0

    def zero_grad(self) -> None:
        """Forget the gradients (set to None, as PyTorch's default)."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def params_with_grad(self):
        """(group, parameter, its state) for each parameter with a gradient. The gradient
        and the state's arrays come in the parameter's memory layout (backend.in_layout_of:
        the elementwise update would run 10-20x slower on two layouts); a copy is made only
        where they differ, such as moments loaded before the parameter became a view of
        shared memory (tinygrad_lite/parallel.py)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad = backend.in_layout_of(p.grad, p.data)
                    state = self.state.setdefault(id(p), {})
                    for name, value in state.items():
                        state[name] = backend.in_layout_of(value, p.data)
                    yield group, p, state

    # --- saving and restoring (for checkpoints and exact resume) ---
    def state_dict(self) -> dict[str, Any]:
        """{"step": int, "lr": [per group], "buffers": {"<param index>.<name>": host array}}."""
        buffers, index = {}, 0
        for group in self.param_groups:
            for p in group["params"]:
                for name, value in self.state.get(id(p), {}).items():
                    buffers[f"{index}.{name}"] = backend.to_numpy(value).copy()
                index += 1
        return {"step": self.step_count, "lr": [g["lr"] for g in self.param_groups], "buffers": buffers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        self.state = {}
        for key, value in state["buffers"].items():
            index, name = key.split(".", 1)
            if not index.isdigit() or int(index) >= len(params):
                raise ValueError(f"optimizer state {key!r} names parameter {index}, but this "
                                 f"optimizer has {len(params)} parameters")
            p = params[int(index)]
            if tuple(value.shape) != p.shape:
                raise ValueError(f"optimizer state {key} has shape {tuple(value.shape)}, "
                                 f"parameter has {p.shape}")
            self.state.setdefault(id(p), {})[name] = backend.in_layout_of(backend.asarray(value, p.device, p.dtype),
                                                                          p.data)
        self.step_count = int(state["step"])
        for group, lr in zip(self.param_groups, state["lr"]):
            group["lr"] = lr


class SGD(Optimizer):
    """Stochastic gradient descent with momentum (Polyak 1964; Nesterov 1983 variant).

    g = grad + weight_decay * p;  buf = momentum * buf + g;  p -= lr * (nesterov ? g + momentum * buf : buf)
    """

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0) -> None:
        if momentum < 0:
            raise ValueError(f"momentum must be >= 0, got {momentum}")
        if nesterov and momentum <= 0:
            raise ValueError("nesterov momentum needs momentum > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                      weight_decay=weight_decay))

    def step(self) -> None:
        self.step_count += 1
        for group, p, state in self.params_with_grad():
            g = p.grad
            if group["weight_decay"]:
                g = g + group["weight_decay"] * p.data
            if group["momentum"]:
                if "momentum" not in state:
                    state["momentum"] = g.copy()  # the first step starts the buffer at g
                else:
                    state["momentum"] *= group["momentum"]
                    state["momentum"] += g
                buf = state["momentum"]
                g = g + group["momentum"] * buf if group["nesterov"] else buf
            p.data -= group["lr"] * g


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015): step by a running mean of gradients over the root of a
    running mean of squared gradients, both bias-corrected.

    m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr * (m/(1-b1^t)) / (sqrt(v/(1-b2^t)) + eps)
    Adam's weight_decay is an L2 term added to the gradient (as in PyTorch's Adam).
    """

    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._scratch: dict[tuple, Any] = {}  # (device, dtype) -> a flat scratch buffer

    def _scratch_for(self, p: Tensor):
        """A scratch array shaped like p: a view of one buffer, as large as the largest
        parameter, shared by all of them (NOTE: no temporary per step, and not a second
        copy of the model either, as one buffer per parameter would be)."""
        key = (p.device, str(p.dtype))
        buffer = self._scratch.get(key)
        if buffer is None or buffer.size < p.size:
            buffer = self._scratch[key] = p.xp.empty(max(p.size, 0 if buffer is None else buffer.size), dtype=p.dtype)
        return backend.unflatten(buffer[:p.size], p.data)  # (laid out as p is)

    def step(self) -> None:
        self.step_count += 1
        t = self.step_count
        for group, p, state in self.params_with_grad():
            beta1, beta2 = group["betas"]
            lr, wd, g = group["lr"], group["weight_decay"], p.grad
            if wd and self.decoupled:
                p.data *= 1 - lr * wd  # AdamW: shrink the weights directly
            elif wd:
                g = g + wd * p.data  # Adam: L2 penalty through the gradient
            if "exp_avg" not in state:
                state["exp_avg"] = p.xp.zeros_like(p.data)
                state["exp_avg_sq"] = p.xp.zeros_like(p.data)
            m, v, xp = state["exp_avg"], state["exp_avg_sq"], p.xp
            scratch = self._scratch_for(p)
            m *= beta1
            m += xp.multiply(g, 1 - beta1, out=scratch)  # m = b1 m + (1 - b1) g
            v *= beta2
            xp.multiply(g, g, out=scratch)
            scratch *= 1 - beta2
            v += scratch  # v = b2 v + (1 - b2) g^2
            xp.sqrt(v, out=scratch)
            scratch *= 1 / math.sqrt(1 - beta2 ** t)
            scratch += group["eps"]  # sqrt(v_hat) + eps
            xp.divide(m, scratch, out=scratch)
            scratch *= lr / (1 - beta1 ** t)  # lr m_hat / (sqrt(v_hat) + eps)
            p.data -= scratch


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter 2019): Adam with weight decay decoupled from the
    gradient: p *= 1 - lr * weight_decay, then the Adam step."""

    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def cosine_lr(it: int, max_lr: float, min_lr: float, warmup_iters: int, decay_iters: int) -> float:
    """The learning rate at iteration `it`: linear warmup, then cosine decay to min_lr."""
    # 1) warmup: rise linearly from max_lr/(warmup+1) to max_lr
    if it < warmup_iters:
        return max_lr * (it + 1) / (warmup_iters + 1)
    # 2) after decay_iters: stay at min_lr
    if it > decay_iters:
        return min_lr
    # 3) in between: half a cosine from max_lr down to min_lr
    progress = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def clip_grad_norm(params: Iterable[Tensor], max_norm: float) -> float:
    """Scale all gradients together so their global L2 norm is at most max_norm.

    Returns the norm before clipping (nan/inf if a gradient is not finite).
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    grads = [p for p in params if p.grad is not None]
    # vdot: one BLAS pass, no temporary (flatten: in memory order, so a column-major gradient is not copied)
    flat = [backend.flatten(p.grad) for p in grads]
    total = math.sqrt(sum(float(p.xp.vdot(g, g)) for p, g in zip(grads, flat)))
    scale = max_norm / (total + 1e-6)
    if scale < 1.0:
        for p in grads:
            p.grad = p.grad * scale  # not in place: gradient arrays may be shared
    return total
