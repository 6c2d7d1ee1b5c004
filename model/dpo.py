"""Direct preference optimization (DPO, Rafailov et al. 2023): tuning on preferences.

After SFT the model answers; people then say which of two answers they prefer. RLHF
turns those preferences into a reward model and runs reinforcement learning against
it; DPO shows the same optimum can be reached with one supervised loss on the pairs.
For a prompt x, a preferred answer y_w ("chosen") and a worse one y_l ("rejected"):

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

pi is the model being trained, ref a frozen copy of where it started (the SFT model).
Each bracket is an implicit reward, beta * (log pi - log ref): how much more likely the
policy makes an answer than the reference did. The loss pushes the chosen answer's
reward above the rejected one's; measuring rewards against the reference keeps the
policy from wandering far from it (beta sets how far; small beta, far). At the start
pi == ref, both rewards are 0 and the loss is -log sigmoid(0) = ln 2 = 0.693.

The data is JSONL in the common shape of preference datasets:

    {"prompt": "shout: good morrow", "chosen": "GOOD MORROW!", "rejected": "GOOD MORROW."}

Each answer is rendered as a chat (model/chat.py): the prompt as the user's turn, the
answer as the assistant's. log pi(y|x) is the sum of the log-probabilities of the
answer's tokens and its <|end|> (the same mask as SFT's), not of the prompt.
"""
from __future__ import annotations

import numpy as np

import tinygrad_lite.functional as F
from tinygrad_lite import Tensor, where

from .chat import ChatTokenizer, render
from .sft import IGNORE, ChatDataError, padded_batch, read_jsonl


def log_sigmoid(z: Tensor) -> Tensor:
    """log sigmoid(z), from primitives: -log(1 + e^-z) for z >= 0, z - log(1 + e^z) below.

    NOTE: both forms use e = exp(-|z|) <= 1, so nothing overflows (log(sigmoid(z)) itself
    is log(0) = -inf below z ~ -100 in float32). They are picked with `where`, not written
    as max(-z, 0) + log(1 + exp(-|z|)): that sum has kinks at z = 0 whose (zero) slopes do
    not add up to the true slope 1/2, and DPO starts exactly at z = 0.
    """
    e = (-where(z >= 0, z, -z)).exp()  # exp(-|z|)
    return where(z >= 0, -(1 + e).log(), z - (1 + e).log())


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, reference_chosen_logps,
             reference_rejected_logps, beta: float) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """(loss, chosen_rewards, rejected_rewards) for a batch of B pairs.

    Log-probabilities (B,) are summed over each answer's tokens; the reference's are
    constants (no gradient). loss is the batch mean; the rewards beta * (log pi - log
    ref), (B,) host arrays, are detached: they are for logging, not for the gradient.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    ref_chosen, ref_rejected = (r.detach() if isinstance(r, Tensor) else Tensor(r) for r in
                                (reference_chosen_logps, reference_rejected_logps))
    chosen_logratio = policy_chosen_logps - ref_chosen  # log pi(y_w|x) - log ref(y_w|x)
    rejected_logratio = policy_rejected_logps - ref_rejected
    loss = -log_sigmoid(beta * (chosen_logratio - rejected_logratio)).mean()
    return loss, beta * chosen_logratio.detach().numpy(), beta * rejected_logratio.detach().numpy()


def sequence_logps(logits: Tensor, targets: np.ndarray) -> Tensor:
    """(B,): the sum, over the positions whose target is not IGNORE, of log p(target).
    logits (B, T, V), targets (B, T)."""
    B, T, V = logits.shape
    xp = logits.xp
    log_probs = F.log_softmax(logits, axis=-1)  # (B, T, V)
    targets = Tensor(targets, device=logits.device).data  # the tensors' device, not the host
    keep = targets != IGNORE
    picked = log_probs[xp.arange(B)[:, None], xp.arange(T)[None, :], xp.where(keep, targets, 0)]  # (B, T)
    return (picked * Tensor(keep.astype(picked.dtype))).sum(axis=-1)


def kl_to_reference(policy_logits: Tensor, reference_logits: Tensor, targets: np.ndarray) -> float:
    """Mean over the answer positions of KL(pi || ref) between the next-token distributions:
    how far the policy has moved from the reference, where it writes answers."""
    p = F.log_softmax(policy_logits.detach(), axis=-1).numpy().astype(np.float64)  # host copies: for the log
    r = F.log_softmax(reference_logits.detach(), axis=-1).numpy().astype(np.float64)
    # (a KL is >= 0, but float32 log-probs of two nearly equal models can sum to -1e-9)
    kl = np.maximum((np.exp(p) * (p - r)).sum(axis=-1), 0.0)  # (B, T)
    keep = targets != IGNORE
    return float(kl[keep].mean()) if keep.any() else 0.0


def encode_preferences(path, chat: ChatTokenizer, block_size: int) -> list[tuple]:
    """Every pair of a JSONL file as (chosen (ids, mask), rejected (ids, mask));
    ChatDataError names the line of the first bad one."""
    pairs = []
    for n, record in read_jsonl(path):
        where = f"{path}:{n}"
        for key in ("prompt", "chosen", "rejected"):
            if key not in record:
                raise ChatDataError(f"{where}: missing {key!r}")
            if not isinstance(record[key], str):
                raise ChatDataError(f"{where}: {key!r} must be text")
        if not record["chosen"].strip() or not record["rejected"].strip():
            raise ChatDataError(f"{where}: an empty assistant turn ('chosen' and 'rejected' need text)")
        pair = []
        for key in ("chosen", "rejected"):
            messages = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record[key]}]
            try:
                ids, mask = render(chat, messages)
            except ValueError as e:
                raise ChatDataError(f"{where}: {e}") from None
            if len(ids) > block_size + 1:
                raise ChatDataError(f"{where}: the {key} conversation is {len(ids)} tokens, longer than "
                                    f"block_size {block_size} + 1: no room for the whole answer")
            pair.append((ids, mask))
        pairs.append(tuple(pair))
    return pairs


def preference_batch(pairs: list, indices, block_size: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """x, y (2B, T): the chosen answers of the pairs at `indices`, then their rejected ones."""
    rows = [pairs[i][0] for i in indices] + [pairs[i][1] for i in indices]
    return padded_batch(rows, range(len(rows)), block_size, pad_id)
