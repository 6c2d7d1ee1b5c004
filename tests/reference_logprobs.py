"""The log-probabilities a model gives, the plain way: what the engine's and the server's
logprobs are checked against."""
import numpy as np

from tinygrad_lite import Tensor, backend, no_grad


def log_softmax_of(model, ids: list[int]) -> np.ndarray:
    """(T, V) float64: row t holds log p(next token | ids[:t + 1]), by one forward pass over the ids."""
    with no_grad():
        logits, _ = model(Tensor([ids], dtype="int64", device=model.wte.weight.device))
    z = backend.to_numpy(logits.data[0]).astype(np.float64)  # (a host copy: the strict device's arrays refuse NumPy)
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
