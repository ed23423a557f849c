"""Token sampling: composable logit processors and filters, per sequence, batched.

`sample_batch(logits [B, V], params per row, generators per row, histories)` runs, for all
rows at once (each with its own parameters), in this order:

1. logit bias (`logit_bias` {token: value}, added) and bans (`banned_tokens`, -inf);
2. penalties over the sequence so far: `repetition_penalty` r (prompt and completion; a
   seen token's logit is divided by r if positive, multiplied by r if not — the CTRL /
   Hugging Face rule), `presence_penalty` (subtracted once from every token the completion
   has used) and `frequency_penalty` (subtracted per use), as in the OpenAI API; DRY
   (`dry_multiplier`, `dry_base`, `dry_allowed_length`, `dry_breakers`, `dry_range`): tokens
   that would continue a repeated run are penalised exponentially in the run's length;
3. greedy rows (temperature 0, or top_k 1) take the argmax here;
4. temperature, then the filters, each on the distribution the previous ones left:
   `top_k`, `top_p` (smallest set of most likely tokens reaching the mass), `min_p` (drop
   tokens below min_p × the top probability), `typical_p` (locally typical sampling: the
   tokens whose surprise is closest to the entropy, up to the mass), and XTC (with
   probability `xtc_probability`, drop every token at or above `xtc_threshold` except the
   least likely of them, when there are at least two);
5. one draw per row from its own generator (seeded jobs repeat whatever runs beside them):
   Gumbel-max sampling with counter-based noise keyed per row (`gumbel_argmax`), one batched draw
   for rows with different seeds.

The order of 4 follows the usual Hugging Face pipeline (temperature, top-k, top-p), so
seeded results are comparable across tools.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from trellm.errors import GenerationError


@dataclass(slots=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    typical_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    banned_tokens: Sequence[int] = ()
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0  # 0 = off
    dry_multiplier: float = 0.0  # 0 = off
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_breakers: Sequence[int] = ()  # token ids a repeated run cannot cross (e.g. newline, ":", quotes)
    dry_range: int = 0  # look back this many tokens (0 = the whole sequence)
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0 (0 = greedy)", self.temperature),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)", self.top_k),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]", self.top_p),
            (0 <= self.min_p <= 1, "min_p must be in [0, 1]", self.min_p),
            (0 < self.typical_p <= 1, "typical_p must be in (0, 1]", self.typical_p),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 = off)", self.repetition_penalty),
            (-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]", self.presence_penalty),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]", self.frequency_penalty),
            (0 <= self.xtc_threshold <= 1, "xtc_threshold must be in [0, 1]", self.xtc_threshold),
            (0 <= self.xtc_probability <= 1, "xtc_probability must be in [0, 1]", self.xtc_probability),
            (self.dry_multiplier >= 0, "dry_multiplier must be >= 0 (0 = off)", self.dry_multiplier),
            (self.dry_base >= 1, "dry_base must be >= 1", self.dry_base),
            (self.dry_allowed_length >= 1, "dry_allowed_length must be >= 1", self.dry_allowed_length),
            (self.dry_range >= 0, "dry_range must be >= 0 (0 = whole sequence)", self.dry_range),
        ]
        for ok, what, value in checks:
            if not ok:  # NaN fails every comparison, so it lands here too
                raise GenerationError(f"{what}, got {value}")
        for token, bias in self.logit_bias.items():
            if not -100 <= bias <= 100 or math.isnan(bias):
                raise GenerationError(f"logit_bias values must be in [-100, 100], got {bias} for token {token}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def uses_history(self) -> bool:
        return (self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.dry_multiplier > 0)


def dry_penalties(context: Sequence[int], params: SamplingParams) -> dict[int, float]:
    """DRY ("don't repeat yourself"): token -> penalty for every token that would extend a run of
    tokens that already occurred earlier. If the sequence ends with the n tokens that once came
    right before token t (n >= allowed length, no breaker inside), t gets multiplier · base^(n -
    allowed). The longest such n per token counts. O(len) with the Z-function of the reversed
    sequence: z[j] = how far the sequence's end and the end of its first n - j tokens agree."""
    seq = list(context[-params.dry_range:] if params.dry_range else context)
    n = len(seq)
    if n < 2:
        return {}
    breakers = set(params.dry_breakers)
    # A run cannot cross a breaker: the sequence's end may match at most back to its last breaker.
    tail = next((n - 1 - i for i in range(n - 1, -1, -1) if seq[i] in breakers), n)
    r = seq[::-1]
    z = [0] * n
    left = right = 0
    for j in range(1, n):
        if j < right:
            z[j] = min(right - j, z[j - left])
        while j + z[j] < n and r[z[j]] == r[j + z[j]]:
            z[j] += 1
        if j + z[j] > right:
            left, right = j, j + z[j]
    since_breaker = 0  # tokens since the last breaker before position i (exclusive)
    best: dict[int, int] = {}
    for i in range(1, n):  # seq[i] followed seq[:i]; their common end with the whole sequence: z[n - i]
        since_breaker = 0 if seq[i - 1] in breakers else since_breaker + 1
        length = min(z[n - i], tail, since_breaker)
        t = seq[i]
        if length >= params.dry_allowed_length and t not in breakers and length > best.get(t, 0):
            best[t] = length
    return {t: params.dry_multiplier * params.dry_base ** (length - params.dry_allowed_length)
            for t, length in best.items()}


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None]  # [B, 1]


def _counts(seqs: Sequence[Sequence[int]], vocab: int, like: torch.Tensor) -> torch.Tensor:
    """[B, V] how often each token occurs in each row's sequence."""
    counts = torch.zeros(len(seqs), vocab, dtype=like.dtype, device=like.device)
    longest = max((len(s) for s in seqs), default=0)
    if longest:
        ids = torch.full((len(seqs), longest), vocab, dtype=torch.long)  # padding hits a dropped extra column
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        wide = torch.zeros(len(seqs), vocab + 1, dtype=like.dtype, device=like.device)
        wide.scatter_add_(1, ids.to(like.device), torch.ones(ids.shape, dtype=like.dtype, device=like.device))
        counts = wide[:, :vocab]
    return counts


def process_logits(logits: torch.Tensor, params: Sequence[SamplingParams],
                   contexts: Sequence[Sequence[int]] | None = None,
                   completions: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """Steps 1–2: bias, bans and penalties. logits [B, V] -> float32 [B, V]. contexts: each row's
    prompt + completion so far (repetition penalty); completions: the completion so far."""
    logits = logits.float()
    if any(p.logit_bias or p.banned_tokens or p.dry_multiplier > 0 for p in params):
        logits = logits.clone()  # edited in place below; the caller's logits stay as they were (logprobs)
    b, vocab = logits.shape
    rows, cols, vals, bans = [], [], [], []
    for i, p in enumerate(params):
        for token, bias in p.logit_bias.items():
            rows.append(i), cols.append(int(token)), vals.append(float(bias))
        bans += [(i, int(t)) for t in p.banned_tokens]
    bad = [c for c in cols + [t for _, t in bans] if not 0 <= c < vocab]
    if bad:
        raise GenerationError(f"logit_bias / banned token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
    if rows:
        logits.index_put_((torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)),
                          torch.tensor(vals, device=logits.device), accumulate=True)
    if any(p.uses_history for p in params):
        if any(p.repetition_penalty != 1 for p in params):
            if contexts is None:
                raise ValueError("a repetition penalty needs the rows' token histories")
            seen = _counts(contexts, vocab, logits) > 0
            r = _column([p.repetition_penalty for p in params], logits)
            logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            if completions is None:
                raise ValueError("presence / frequency penalties need the rows' completions")
            used = _counts(completions, vocab, logits)
            logits = logits - _column([p.presence_penalty for p in params], logits) * (used > 0) \
                - _column([p.frequency_penalty for p in params], logits) * used
        if any(p.dry_multiplier > 0 for p in params):
            if contexts is None:
                raise ValueError("DRY needs the rows' token histories")
            for i, p in enumerate(params):
                if p.dry_multiplier > 0:
                    for token, penalty in dry_penalties(contexts[i], p).items():
                        logits[i, token] -= penalty
    if bans:
        logits[[i for i, _ in bans], [t for _, t in bans]] = float("-inf")
    return logits


def _keep_top_mass(probs: torch.Tensor, order_key: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Bool [B, V]: per row the smallest set of tokens, taken in ascending order of order_key,
    whose probability reaches `mass` [B, 1] (the first token always stays)."""
    order = torch.sort(order_key, dim=-1).indices
    p_sorted = probs.gather(-1, order)
    drop = (p_sorted.cumsum(-1) - p_sorted) >= mass
    drop[:, 0] = False
    return torch.zeros_like(drop).scatter(-1, order, ~drop)


def filter_logits(logits: torch.Tensor, params: SamplingParams | Sequence[SamplingParams],
                  generators: Sequence[torch.Generator | None] | None = None) -> torch.Tensor:
    """Step 4: temperature and filters. Processed logits [B, V] -> scaled logits with the excluded
    tokens at -inf (rows with temperature 0 are returned unscaled)."""
    rows = logits.shape[0]
    ps = [params] * rows if isinstance(params, SamplingParams) else list(params)
    neg = float("-inf")
    t = _column([p.temperature if p.temperature > 0 else 1.0 for p in ps], logits)
    logits = logits.float() / t
    vocab = logits.shape[-1]
    if any(0 < p.top_k < vocab for p in ps):
        k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in ps], device=logits.device)
        kth = torch.sort(logits, dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])  # [B, 1]
        logits = logits.masked_fill(logits < kth, neg)
    if any(p.top_p < 1 for p in ps):
        probs = logits.softmax(-1)
        keep = _keep_top_mass(probs, -probs, _column([p.top_p for p in ps], probs))
        logits = logits.masked_fill(~keep, neg)
    if any(p.min_p > 0 for p in ps):
        probs = logits.softmax(-1)
        floor = probs.max(-1, keepdim=True).values * _column([p.min_p for p in ps], probs)
        logits = logits.masked_fill(probs < floor, neg)
    if any(p.typical_p < 1 for p in ps):
        probs = logits.softmax(-1)
        logp = torch.log(probs.clamp_min(1e-30))
        entropy = -(probs * logp).nansum(-1, keepdim=True)
        surprise_gap = (-logp - entropy).abs().masked_fill(probs == 0, float("inf"))
        keep = _keep_top_mass(probs, surprise_gap, _column([p.typical_p for p in ps], probs))
        logits = logits.masked_fill(~keep, neg)
    if any(p.xtc_probability > 0 for p in ps):
        probs = logits.softmax(-1)
        for i, p in enumerate(ps):
            if p.xtc_probability <= 0:
                continue
            g = generators[i] if generators is not None else None
            if torch.rand(1, generator=g).item() >= p.xtc_probability:
                continue
            above = probs[i] >= p.xtc_threshold
            if int(above.sum()) >= 2:
                least = torch.where(above, probs[i], torch.inf).argmin()
                above[least] = False
                logits[i] = logits[i].masked_fill(above, neg)
    return logits


def sample_batch(logits: torch.Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator | None], contexts: Sequence[Sequence[int]] | None = None,
                 completions: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """logits [B, V], one SamplingParams and generator per row -> token ids [B]."""
    logits = process_logits(logits, params, contexts, completions)
    out = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        sub = [params[i] for i in sampled]
        gens = [generators[i] for i in sampled]
        out[sampled] = gumbel_argmax(filter_logits(logits[sampled], sub, gens), _row_keys(gens))
    return out


# A draw from softmax(logits) is argmax(logits + Gumbel noise). The noise of row i and token v is a
# hash of (key_i, v), the key being one 64-bit number per row and step from the row's own generator
# (CPU; the global one for rows without). So a batch of rows with different seeds samples in a few
# elementwise kernels (torch.multinomial takes one generator per call: a chain of launches per seeded
# row and step), and a seeded row's tokens depend on its seed alone, not on the rows beside it or the
# batch order. 24 bits of noise bound it to [-2.9, 17.3]: a token more than ~20 below the best logit
# (probability < 1e-8) is never drawn.
_GOLDEN = -0x61C8864680B583EB  # 0x9E3779B97F4A7C15 (the golden ratio in 64 bits) as a signed int64
_MIX1 = -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9
_MIX2 = -0x6B2FB644ECCEEE15  # 0x94D049BB133111EB


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> keeps the sign)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser: a bijection of int64 whose output bits all depend on every input bit
    (multiplications wrap modulo 2^64)."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def _row_keys(generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One int64 per row from its generator; rows sharing a generator (None: the global one) take
    consecutive draws of one call, in row order."""
    def draw(n: int, g: torch.Generator | None) -> torch.Tensor:
        return torch.randint(-2**63, 2**63 - 1, (n,), dtype=torch.int64, generator=g)

    rows: dict[int, list[int]] = {}  # generator (by identity; None = global) -> its rows in order
    for i, g in enumerate(generators):
        if g is not None and g.device.type != "cpu":
            raise ValueError("sampling generators must be CPU torch.Generators (they draw one key per row)")
        rows.setdefault(id(g), []).append(i)
    keys = torch.empty(len(generators), dtype=torch.int64)
    for idx in rows.values():
        keys[idx] = draw(len(idx), generators[idx[0]])
    return keys


@functools.lru_cache(maxsize=8)
def _token_offsets(vocab: int, device: torch.device) -> torch.Tensor:
    """(v + 1)·golden for every token v: the per-token half of the hash input, the same every step."""
    return torch.arange(1, vocab + 1, device=device, dtype=torch.int64) * _GOLDEN


def gumbel_argmax(logits: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Token ids [B] drawn from softmax(logits [B, V]) (-inf = excluded) with noise from keys [B] int64."""
    h = _mix64(keys.to(logits.device)[:, None] + _token_offsets(logits.shape[-1], logits.device)[None, :])
    u = (_shr(h, 40).float() + 0.5) * 2.0**-24  # 24 uniform bits in (0, 1): exact in float32
    return (logits.float() - torch.log(-torch.log(u))).argmax(dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
           contexts: Sequence[Sequence[int]] | None = None,
           completions: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
    """logits [B, V], the same parameters and generator for every row -> token ids [B]."""
    rows = logits.shape[0]
    return sample_batch(logits, [params] * rows, [generator] * rows, contexts, completions)
