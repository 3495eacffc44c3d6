"""Batched sampling and ranking tools the baselines share: no loop over users or items.

Random numbers are drawn on the CPU with the trainer's generator (so runs repeat exactly on any device) and
moved to the tensors' device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn import functional

from hetcomp.data.sampling import contains_keys

if TYPE_CHECKING:
    from hetcomp.data.sampling import NegativeSampler

NEG_INF = float("-inf")


def _uniform(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(shape, generator=generator).clamp_(min=1e-20).to(device)


def padded_stack(values: Sequence[torch.Tensor], fill: float = 0) -> torch.Tensor:
    """``values`` stacked along a new first dimension, each padded with ``fill`` to the largest of every dimension
    (just stacked when their shapes agree): stacked seeds' per-replica inputs of different lengths."""
    shape = [max(value.shape[dim] for value in values) for dim in range(values[0].dim())]
    if all(list(value.shape) == shape for value in values):
        return torch.stack(list(values))
    out = values[0].new_full((len(values), *shape), fill)
    for index, value in enumerate(values):
        out[(index, *(slice(0, size) for size in value.shape))] = value
    return out


def sample_without_replacement(weights: torch.Tensor, n: int,
                               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw up to ``n`` distinct columns per row with probability ∝ ``weights`` [B, C] (≥ 0), batched.

    Gumbel-top-k: the n largest log w + Gumbel noise are a draw without replacement ∝ w (the same law as
    ``torch.multinomial(..., replacement=False)``), and rows with fewer than n positive weights simply yield
    fewer valid draws instead of an error. Returns (columns [B, min(n, C)], valid mask); invalid draws are
    columns of weight 0 and must be ignored.
    """
    n = min(n, weights.shape[1])
    gumbel = -torch.log(-torch.log(_uniform(weights.shape, generator, weights.device)))
    keys = torch.log(weights.clamp(min=0)) + gumbel
    values, columns = torch.topk(keys, n, dim=1)
    return columns, torch.isfinite(values)


Draw = tuple[torch.Tensor, torch.Tensor]


def sample_disjoint_without_replacement(first: torch.Tensor, second: torch.Tensor, n_first: int, n_second: int,
                                        generator: torch.Generator | None = None,
                                        noise: torch.Tensor | None = None) -> tuple[Draw, Draw]:
    """Two :func:`sample_without_replacement` draws from weights [..., C] whose supports are disjoint (an entry
    has weight in at most one), from one noise draw with one logarithm per entry.

    Exponential keys: the n largest w / E with E = −log U ~ Exp(1) are a draw without replacement ∝ w (they are
    exp(log w + Gumbel), the same order as Gumbel-top-k). Disjoint supports read disjoint noise, so the two
    draws are independent; sharing it saves a uniform draw and five of six logarithms against two Gumbel-top-k
    draws. ``noise``: E drawn already (:func:`exponential_noise`, e.g. for several replicas' rows at once, padded
    with any positive value where the weights are 0). Returns ((columns, valid), (columns, valid)), each
    [..., min(n, C)]; invalid draws have weight 0. Overlapping supports are not checked (a per-batch device sync):
    they would make the draws dependent.
    """
    if noise is None:
        noise = exponential_noise(first.shape, generator, first.device)

    def draw(weights: torch.Tensor, n: int) -> Draw:
        weights = weights.clamp(min=0)
        columns = torch.topk(weights / noise, min(n, weights.shape[-1]), dim=-1).indices
        return columns, weights.gather(-1, columns) > 0

    return draw(first, n_first), draw(second, n_second)


def exponential_noise(shape: torch.Size, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """E = −log U ~ Exp(1) of ``shape``, U from ``generator`` (E ∈ (0, 46]: finite keys w / E)."""
    return torch.log(_uniform(shape, generator, device)).neg_()


def sample_uniform_from_mask(mask: torch.Tensor, n: int,
                             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``n`` distinct columns per row drawn uniformly among the True entries of ``mask`` [B, C]."""
    return sample_without_replacement(mask.to(torch.float32), n, generator)


def sorted_rows(values: torch.Tensor) -> torch.Tensor:
    """Each row sorted ascending (values only). On the CPU numpy's sort, about 15× faster than torch's there."""
    if values.device.type == "cpu":
        return torch.from_numpy(np.sort(values.contiguous().numpy(), axis=1))
    return values.sort(dim=1).values


def ranks_outside(scores: torch.Tensor, items: torch.Tensor, excluded: torch.Tensor,
                  excluded_valid: torch.Tensor, cap: int | None = None) -> torch.Tensor:
    """0-based rank of each of ``items`` [B, L] among the row's items of ``scores`` [B, n_items] that are not
    ``excluded`` [B, E] (item ids, e.g. each user's padded training items, with ``excluded_valid``): the number of
    such items with a strictly higher score.

    The items of the whole row with a strictly higher score (one row sort and a ``searchsorted``, O(n log n + L log n)
    per row instead of an [B, L, n_items] comparison), minus the excluded ones with a strictly higher score (a sort
    of the short excluded rows and a ``searchsorted``): no dense [B, n_items] mask, whose building, inversion and
    application cost about as much as the row sort itself. (Searching every item among the L sorted thresholds
    instead of a whole-row sort measured 6–9× slower on the CPU.)

    With ``cap``, a rank of at least ``cap`` may come back as ``cap`` (for a caller to whom every such rank is
    the same, e.g. RD's saturated tanh): on the CPU the row is then only partitioned around its T-th highest
    score, T = cap + E (numpy's ``partition``, ~3× cheaper than the sort), and an item below that threshold has
    more than T higher-scored items, at most E of them excluded; ranks below ``cap`` are exact either way.
    """
    detached = scores.detach()
    own = detached.gather(1, items).contiguous()
    left_out = detached.gather(1, excluded.clamp(min=0)).masked_fill(~excluded_valid, NEG_INF)
    left_out_above = excluded.shape[1] - torch.searchsorted(left_out.sort(dim=1).values, own, right=True)
    width = scores.shape[1] if cap is None else cap + excluded.shape[1]
    if width >= scores.shape[1] or detached.device.type != "cpu":
        above = scores.shape[1] - torch.searchsorted(sorted_rows(detached), own, right=True)
        return above - left_out_above
    split = scores.shape[1] - width  # after the partition, columns split: hold the row's ``width`` highest scores
    top = torch.from_numpy(np.partition(detached.contiguous().numpy(), split, axis=1)[:, split:])
    threshold = top[:, :1]  # the partition's pivot: the width-th highest score of the row
    above = (top.unsqueeze(1) > own.unsqueeze(2)).sum(2)
    return torch.where(own >= threshold, above - left_out_above, torch.full_like(above, cap))


def ranks_within_rows(scores: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each entry of ``scores`` [B, L] among the valid entries of its own row.

    The rank is the number of valid entries of the row with a strictly higher score (ties share the better
    rank), as :func:`ranks_outside` counts it, but within the short list itself: :func:`ranks_within_groups`
    on the rows as equal groups (one flat integer sort; a per-row float sort and a ``searchsorted`` measured
    1.6× slower on the CPU). Invalid entries get rank 0.
    """
    scores = scores.detach()
    if valid is not None:
        scores = scores.masked_fill(~valid, NEG_INF)
    n_rows, width = scores.shape
    indptr = torch.arange(0, n_rows * width + 1, max(width, 1), device=scores.device)[:n_rows + 1]
    ranks = ranks_within_groups(scores.reshape(-1), indptr).view(n_rows, width)
    return ranks if valid is None else ranks.masked_fill(~valid, 0)


def transpose_lists(lists: torch.Tensor, n_columns: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column id, the rows whose list holds it, best-placed first: the transpose of ranked lists, as CSR.

    ``lists`` [R, W] holds, per row, column ids (−1 = padding) in rank order, e.g. each user's top-W items.
    For every column c, the rows r with c in their list are ordered by the position of c in row r's list (then
    by row id) and the first ``width`` are kept. One flat sort of (column, position, row) keys, no loop.
    Returns (indptr [n_columns + 1], entries [E]): column c's entries are ``entries[indptr[c]:indptr[c + 1]]``,
    each the flat index r·W + position into ``lists`` (so the row is entry // W).
    """
    n_rows, list_width = lists.shape
    flat = lists.reshape(-1).long()
    keep = flat >= 0
    positions = torch.arange(flat.numel(), device=lists.device)[keep]
    columns = flat[keep]
    keys = (columns * list_width + positions % list_width) * n_rows + positions // list_width
    order = torch.sort(keys).indices
    columns, positions = columns[order], positions[order]
    counts = torch.bincount(columns, minlength=n_columns)
    place = torch.arange(len(columns), device=lists.device) - (torch.cumsum(counts, 0) - counts)[columns]
    indptr = torch.zeros(n_columns + 1, dtype=torch.int64, device=lists.device)
    indptr[1:] = torch.cumsum(counts.clamp(max=width), 0)
    return indptr, positions[place < width]


def _descending_keys(values: torch.Tensor) -> torch.Tensor:
    """int64 keys in [0, 2³²) whose ascending order is the descending order of the float32 ``values`` (equal
    values, −0.0 and 0.0 included, get equal keys)."""
    bits = (values.to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)  # + 0.0 turns −0.0 into 0.0
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # the floats' order as signed integers
    return 0x7FFFFFFF - ordered


def ranks_within_groups(values: torch.Tensor, indptr: torch.Tensor) -> torch.Tensor:
    """0-based rank of each of ``values`` [E] within its CSR group (``indptr`` [G + 1]): the number of the
    group's values strictly higher, as :func:`ranks_within_rows` on ragged rows.

    One flat sort of int64 keys (group in the high 32 bits, the value's descending order in the low ones):
    measured ~2× faster on the CPU than two stable float sorts. A tie run's first position is each tie's rank.
    """
    values = values.detach()
    counts = indptr[1:] - indptr[:-1]
    group = torch.repeat_interleave(torch.arange(len(counts), device=values.device), counts)
    keys = (group << 32) | _descending_keys(values)
    ordered, order = torch.sort(keys)
    new_run = torch.ones_like(ordered, dtype=torch.bool)
    new_run[1:] = ordered[1:] != ordered[:-1]
    position = torch.arange(len(values), device=values.device)
    run_start = torch.cummax(torch.where(new_run, position, torch.zeros_like(position)), 0).values
    ranks = torch.empty_like(position)
    ranks[order] = run_start - indptr[:-1][ordered >> 32]
    return ranks


def csr_rows_padded(indptr: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(entry indices [B, L], valid) of CSR ``rows``, padded to the longest (padding points at entry 0)."""
    start, count = indptr[rows], indptr[rows + 1] - indptr[rows]
    width = int(count.max()) if len(rows) else 0
    offset = torch.arange(width, device=indptr.device)
    valid = offset < count.unsqueeze(1)
    return torch.where(valid, start.unsqueeze(1) + offset, torch.zeros((), dtype=torch.int64)), valid


def _observed_dense(sampler: NegativeSampler, users: torch.Tensor) -> torch.Tensor:
    """Dense bool [B, n_items] of the users' training items, read off the sampler's sorted key array."""
    n_items, keys = sampler.n_items, sampler.observed_keys
    start = torch.searchsorted(keys, users * n_items)
    counts = torch.searchsorted(keys, (users + 1) * n_items) - start
    rows = torch.repeat_interleave(torch.arange(len(users), device=keys.device), counts)
    first = torch.cumsum(counts, 0) - counts
    position = start[rows] + torch.arange(len(rows), device=keys.device) - first[rows]
    mask = torch.zeros(len(users), n_items, dtype=torch.bool, device=keys.device)
    mask[rows, keys[position] - users[rows] * n_items] = True
    return mask


def _first_occurrences(values: torch.Tensor, bound: int) -> torch.Tensor:
    """Bool [R, C]: whether each entry of ``values`` (in [0, bound)) is the leftmost of its value in its row.

    One row sort of (value, column) keys packed as ``value << bits | column``: on the CPU numpy's, about 10×
    faster than torch's row sort, and shifts and masks instead of int64 divisions (~3× faster than one flat sort
    of (row, value, column) keys split by division).
    """
    n_rows, width = values.shape
    bits = max(width - 1, 1).bit_length()
    if (bound << bits) >= 1 << 63:
        raise ValueError(f"values below {bound} with {width} columns do not fit one int64 key")
    keys = sorted_rows((values << bits) | torch.arange(width, device=values.device))
    group = keys >> bits
    first = torch.ones_like(keys, dtype=torch.bool)
    first[:, 1:] = group[:, 1:] != group[:, :-1]
    return torch.empty_like(first).scatter_(1, keys & ((1 << bits) - 1), first)


#: the most keys (bytes) of the dense table :func:`_key_membership` builds; sparser sets keep ``searchsorted``
DENSE_MEMBERSHIP_LIMIT = 1 << 25


def _key_membership(sorted_keys: torch.Tensor, n_keys: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A lookup ``queries -> bool`` of membership in ``sorted_keys`` (all in [0, n_keys)), the same answers as
    :func:`contains_keys`: a dense byte table where it fits :data:`DENSE_MEMBERSHIP_LIMIT` (on the CPU numpy's,
    whose zeroed allocation and fancy indexing cost ~5× less than a binary search of a user batch's draws among
    its ~6k excluded keys), else the binary search. :class:`~hetcomp.data.sampling.KeyBitmap` answers the same
    with one bit a key, built once for the sampler's fixed keys; built per batch, as here, with its
    ``bitwise_or.at`` and a lookup of several passes, it measured ~3.5× slower (240 µs against 70 µs)."""
    if n_keys > DENSE_MEMBERSHIP_LIMIT:
        return lambda queries: contains_keys(sorted_keys, queries)
    if sorted_keys.device.type == "cpu":
        table = np.zeros(n_keys, dtype=bool)
        table[sorted_keys.numpy()] = True
        return lambda queries: torch.from_numpy(table[queries.numpy()])
    dense = torch.zeros(n_keys, dtype=torch.bool, device=sorted_keys.device)
    dense[sorted_keys] = True
    return lambda queries: dense[queries]


def sample_unobserved(sampler: NegativeSampler, users: torch.Tensor, n: int, excluded: torch.Tensor | None = None,
                      generator: torch.Generator | None = None,
                      max_rounds: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    """(items [B, n], valid): up to ``n`` distinct items per user, uniform without replacement among the items
    in neither the user's training row nor the row's ``excluded`` item ids [B, L] (e.g. the teacher's head).

    The law of :func:`sample_uniform_from_mask` on the allowed items, without a float [B, n_items] mask or a key
    per item: the distinct allowed items of an i.i.d. uniform stream, in order of first appearance, are a uniform
    draw without replacement. So draw a little more than n per row, reject training items (the sampler's bitmap or
    sorted keys), excluded items (a byte table of the batch's (row, item) pairs, or their sorted keys where the
    table would pass :data:`DENSE_MEMBERSHIP_LIMIT`) and repeats, keep the first n, and let only deficient rows
    draw on. Draw widths are integer functions of the data, so a seed gives the same items on every device. A
    batch with a row allowing fewer than 2n items (tiny catalogues) takes the dense path, whose valid mask marks
    missing draws.
    """
    return sample_unobserved_lockstep(sampler, [users], n, [excluded], [generator], max_rounds)[0]


def sample_unobserved_lockstep(sampler: NegativeSampler, users: Sequence[torch.Tensor], n: int,
                               excluded: Sequence[torch.Tensor | None], generators: Sequence[torch.Generator | None],
                               max_rounds: int = 100) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`sample_unobserved` for several requests at once, each with its own excluded items and generator
    (stacked seeds' replicas): each request draws exactly what it would alone (the same calls on its generator,
    in the same order: one per rejection round in which it still has rows to fill, as wide as its own rows need),
    while the look-ups, rejections and first-occurrence checks of all requests run as one call per round (a
    request's draws padded to the round's widest with entries that are never taken)."""
    device, n_items = sampler.device, sampler.n_items
    users = [part.to(device=device, dtype=torch.int64) for part in users]
    sizes = [len(part) for part in users]

    def apart(alone: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The requests ``alone`` drawn one by one (no rows, or the dense path), the others in lockstep."""
        together = [index for index in range(len(users)) if index not in alone]
        drawn = iter(sample_unobserved_lockstep(sampler, [users[i] for i in together], n,
                                                [excluded[i] for i in together], [generators[i] for i in together],
                                                max_rounds) if together else ())
        return [sample_unobserved(sampler, users[index], n, excluded[index], generators[index], max_rounds)
                if index in alone else next(drawn) for index in range(len(users))]

    if len(users) > 1 and (n <= 0 or 0 in sizes):
        return apart([index for index, size in enumerate(sizes) if n <= 0 or size == 0])
    if n <= 0 or sizes[0] == 0:
        return [(torch.zeros(sizes[0], max(n, 0), dtype=torch.int64, device=device),
                 torch.zeros(sizes[0], max(n, 0), dtype=torch.bool, device=device))]
    excluded = [torch.empty(size, 0, dtype=torch.int64, device=device) if rows_out is None
                else rows_out.to(device=device, dtype=torch.int64)
                for size, rows_out in zip(sizes, excluded, strict=True)]
    every_user = users[0] if len(users) == 1 else torch.cat(users)
    total = len(every_user)
    rows = torch.arange(total, device=device)
    # each row's excluded items sorted: the rows ascend, so their (row, item) keys are sorted as a whole
    excluded_items = torch.cat([sorted_rows(rows_out).view(-1) for rows_out in excluded])
    excluded_rows = torch.cat([part.repeat_interleave(rows_out.shape[1])
                               for part, rows_out in zip(rows.split(sizes), excluded, strict=True)])
    excluded_keys = excluded_rows * n_items + excluded_items
    fresh = ~sampler.is_observed(every_user[excluded_rows], excluded_items)
    fresh[1:] &= excluded_keys[1:] != excluded_keys[:-1]
    is_excluded = _key_membership(excluded_keys, total * n_items) if excluded_keys.numel() else None
    n_observed = (torch.searchsorted(sampler.observed_keys, (every_user + 1) * n_items)
                  - torch.searchsorted(sampler.observed_keys, every_user * n_items))
    allowed = n_items - n_observed - torch.bincount(excluded_rows[fresh], minlength=total)
    if len(sizes) > 1:
        request_of = torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                             torch.tensor(sizes, device=device))
        fewest = allowed.new_full((len(sizes),), n_items).scatter_reduce_(0, request_of, allowed, "amin").tolist()
    else:
        fewest = [int(allowed.min())]
    if min(fewest) < 2 * n:
        if len(sizes) > 1:
            return apart([index for index, value in enumerate(fewest) if value < 2 * n])
        mask = ~_observed_dense(sampler, every_user)
        mask[rows.unsqueeze(1).expand_as(excluded[0]), excluded[0]] = False
        return [sample_uniform_from_mask(mask, n, generators[0])]
    # the first round takes every row with nothing kept yet, so it skips the row selections and the kept columns
    kept, count, pending = None, None, None

    def at(values: torch.Tensor) -> torch.Tensor:
        return values if pending is None else values[pending]

    for _ in range(max_rounds):
        pending_rows = at(rows)
        need = n if count is None else n - count[pending]
        # expected draws for the missing items are at most need · n_items / (allowed − n); a quarter more + 8
        expected_rows = (need * n_items + at(allowed) - n - 1) // (at(allowed) - n)
        if len(sizes) == 1:
            counts, expected = [len(pending_rows)], [int(expected_rows.max())]
        else:
            request = at(request_of)
            counts = torch.bincount(request, minlength=len(sizes)).tolist()
            expected = torch.zeros(len(sizes), dtype=torch.int64, device=device).scatter_reduce_(
                0, request, expected_rows, "amax").tolist()
        widths = [value + value // 4 + 8 for value in expected]
        parts = [(count_rows, width, torch.randint(n_items, (count_rows, width), generator=generator))
                 for count_rows, width, generator in zip(counts, widths, generators, strict=True) if count_rows]
        widest = max(width for _, width, _ in parts)
        draws = (parts[0][2] if len(parts) == 1 else
                 torch.cat([functional.pad(part, (0, widest - width)) for _, width, part in parts])).to(device)
        fresh = ~sampler.is_observed(at(every_user).unsqueeze(1).expand_as(draws), draws)
        if any(width < widest for _, width, _ in parts):  # the padding is never taken
            row_width = torch.tensor([width for _, width, _ in parts], device=device).repeat_interleave(
                torch.tensor([count_rows for count_rows, _, _ in parts], device=device))
            fresh &= torch.arange(widest, device=device) < row_width.unsqueeze(1)
        if is_excluded is not None:
            fresh &= ~is_excluded(pending_rows.unsqueeze(1) * n_items + draws)
        if kept is None:
            candidates, ok = draws, fresh
        else:  # the kept items first: they stay first occurrences
            candidates = torch.cat([kept[pending], draws], dim=1)
            ok = torch.cat([torch.arange(n, device=device) < count[pending].unsqueeze(1), fresh], dim=1)
        width = candidates.shape[1]
        ok &= _first_occurrences(torch.where(ok, candidates, n_items + torch.arange(width, device=device)),
                                 n_items + width)
        rank = ok.cumsum(1)
        # each taken entry to its slot rank − 1; the others to a spare column n, dropped
        slot = torch.where(ok & (rank <= n), rank - 1, n)
        chosen = torch.zeros(len(pending_rows), n + 1, dtype=torch.int64, device=device).scatter_(
            1, slot, candidates)[:, :n]
        if kept is None:
            kept, count = chosen.contiguous(), rank[:, -1].clamp(max=n)
        else:
            kept[pending] = chosen
            count[pending] = rank[:, -1].clamp(max=n)
        pending = rows[count < n]
        if pending.numel() == 0:
            return [(part, torch.ones_like(part, dtype=torch.bool)) for part in kept.split(sizes)]
    raise RuntimeError("sampling unobserved items did not converge; a user allows almost no item")
