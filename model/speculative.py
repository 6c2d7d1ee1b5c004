"""Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a small model drafts,
the big model checks, and the output is still exactly the big model's.

Decoding is slow because every token needs its own forward pass of the big (target)
model, and one position at a time uses the hardware poorly. A small *draft* model is
cheap to run: let it propose k tokens d_1..d_k one by one, then score all k with the
target in ONE forward pass (its cache holds the sequence so far; the k drafts are k
new positions). That pass gives the target's distributions p_1..p_{k+1} at every
drafted position. Walking left to right:

    accept d_i with probability min(1, p_i(d_i) / q_i(d_i))      (q_i: the draft's)
    on the first rejection, draw from normalize(max(0, p_i - q_i)) and stop the round;
    if all k are accepted, draw a bonus token from p_{k+1}.

NOTE: why this keeps the target's distribution exactly. The token at position i is
d_i = x with probability q(x) min(1, p(x)/q(x)) = min(p(x), q(x)); a rejection happens
with probability 1 - sum_y min(p(y), q(y)) = sum_y max(0, p(y) - q(y)), and then x
comes with probability max(0, p(x) - q(x)) / sum_y max(0, p(y) - q(y)). Adding up:
min(p, q) + max(0, p - q) = p. Greedy decoding is the special case where p and q are
one-hot, so greedy speculative output equals plain greedy output token for token.

A round costs one target pass and yields between 1 and k + 1 tokens. After a rejection
both caches are rolled back to the accepted tokens (`Context.rollback` moves `pos`).
One sequence at a time (batch 1): rows of a batch would accept different numbers of
tokens and their caches would drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from tinygrad_lite import backend

from .generate import Context, Sampler, TextFollower, _check_max_new_tokens, _check_stops, prompt_rows


@dataclass
class SpeculativeStats:
    """What a speculative run did; `passes_saved` compares with plain decoding, which
    needs one target pass per token (the prefill gives the first)."""

    generated: int = 0  # tokens produced
    target_passes: int = 0  # target forward passes: one per round
    draft_passes: int = 0  # draft forward passes: one per drafted token
    drafted: int = 0  # tokens the draft proposed
    accepted: int = 0  # of those, tokens the target accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def passes_saved(self) -> int:
        return self.generated - self.target_passes

    def __str__(self) -> str:
        return (f"acceptance rate {100 * self.acceptance_rate:.1f}% ({self.accepted}/{self.drafted} drafts); "
                f"{self.target_passes} target passes for {self.generated} tokens "
                f"({self.passes_saved} saved)")


def verify(drafts: list[int], q: list[Any], p: Any, sampler: Sampler) -> tuple[list[int], int]:
    """The accept/reject rule for one round.

    drafts: k ids; q: k arrays (1, V), the draft distributions they were drawn from;
    p (k + 1, V): the target's distributions at the same positions plus the one after.
    Returns (the round's tokens: accepted drafts + one token from the target, accepted).
    """
    xp = backend.xp_of(p)
    for i, d in enumerate(drafts):
        p_d, q_d = float(p[i, d]), float(q[i][0, d])
        if sampler.rng.random() * q_d < p_d:  # accept with probability min(1, p/q); q_d > 0, d came from q
            continue
        residual = xp.maximum(p[i] - q[i][0], 0.0)  # (V,): where the target wants more than the draft gave
        if float(residual.sum()) <= 0:  # only if p == q, where a rejection cannot happen; guards rounding
            residual = p[i]
        return drafts[:i] + sampler.draw(residual[None]), i
    return drafts + sampler.draw(p[len(drafts)][None]), len(drafts)  # all accepted: a bonus token


def speculative_stream(target: Any, draft: Any, prompt: Sequence[int], max_new_tokens: int, *,
                       num_draft: int = 4, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, seed: int | None = None, use_cache: bool = True,
                       stats: SpeculativeStats | None = None) -> Iterator[int]:
    """Yield new token ids for one prompt (ids (T,)) as rounds complete, distributed as the
    target's samples with the same settings. Pass `stats` to have it filled in."""
    if target.config.vocab_size != draft.config.vocab_size:
        raise ValueError(f"the draft's vocabulary ({draft.config.vocab_size}) differs from the "
                         f"target's ({target.config.vocab_size})")
    if int(num_draft) != num_draft or num_draft < 1:
        raise ValueError(f"num_draft must be an integer >= 1, got {num_draft}")
    (tokens,) = prompt_rows(target, prompt)
    _check_max_new_tokens(max_new_tokens)
    sampler = Sampler(temperature, top_k, top_p, seed)
    return _rounds(target, draft, tokens, max_new_tokens, num_draft, sampler, use_cache,
                   stats if stats is not None else SpeculativeStats())


def _rounds(target: Any, draft: Any, tokens: list[int], max_new_tokens: int, num_draft: int,
            sampler: Sampler, use_cache: bool, stats: SpeculativeStats) -> Iterator[int]:
    target_ctx, draft_ctx = Context(target, 1, use_cache), Context(draft, 1, use_cache)
    tokens, produced = list(tokens), 0
    while produced < max_new_tokens:
        # drafts this round: the target's window must hold them (so that it sees the
        # same window as plain decoding), and one target token always follows them
        k = min(num_draft, max_new_tokens - produced - 1, target_ctx.room(len(tokens)))

        # 1. the draft proposes k tokens, one at a time (its own cache makes each one cheap)
        drafts, q = [], []
        for _ in range(k):
            q.append(sampler.probs(draft_ctx.logits([tokens + drafts])[:, -1]))  # (1, V)
            drafts += sampler.draw(q[-1])

        # 2. the target scores every drafted position in ONE forward pass
        p = sampler.probs(target_ctx.logits([tokens + drafts], last=k + 1)[0])  # (k + 1, V)

        # 3. accept or reject, left to right
        new, accepted = verify(drafts, q, p, sampler)
        tokens += new

        # 4. roll both caches back to the tokens kept: all but the last one are valid
        target_ctx.rollback(len(tokens) - 1)
        draft_ctx.rollback(len(tokens) - 1)

        stats.target_passes += 1
        stats.draft_passes += k
        stats.drafted += k
        stats.accepted += accepted
        stats.generated += len(new)
        produced += len(new)
        yield from new


def speculative_generate(target: Any, draft: Any, prompt: Sequence[int], max_new_tokens: int, *,
                         num_draft: int = 4, temperature: float = 1.0, top_k: int | None = None,
                         top_p: float | None = None, seed: int | None = None, use_cache: bool = True,
                         stop: Sequence[str] = (), decode: Callable[[list[int]], str] | None = None,
                         ) -> tuple[list[int], SpeculativeStats]:
    """The new ids of one prompt and the run's statistics; stop strings as in generate()."""
    stops = _check_stops(stop)
    if stops and decode is None:
        raise ValueError("stop strings need decode= (the tokenizer's decode)")
    stats = SpeculativeStats()
    tokens = speculative_stream(target, draft, prompt, max_new_tokens, num_draft=num_draft,
                                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                use_cache=use_cache, stats=stats)
    if not stops:
        return list(tokens), stats
    follower = TextFollower(decode, stops)
    for token in tokens:
        follower.add(token)
        if follower.stopped:
            break
    return follower.kept_ids(), stats
