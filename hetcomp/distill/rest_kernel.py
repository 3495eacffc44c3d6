"""Fused CPU passes over the rows of the unsampled LambdaMRR rest term (numba).

:func:`hetcomp.distill.losses.lambda_mrr_rest_loss` sorts each user's row in the student's order, cuts it into
segments and sums every segment's moments; in eager torch that was some twenty memory passes over [rows, n_items]
float64 tensors, three quarters of an unsampled CL-DRD epoch (``experiments/results/bench.md``, 2026-12-05). These
kernels make the same quantities in one or two passes a row:

- :func:`descending_order`: the student's order, a radix sort of its keys;
- :func:`segment_rows`: the segments (bucket of warped score, listed items above) and each place's kind;
- :func:`segment_moments`: each segment's centre, listed count above it and moments Σ δ^m, Σ δ^m / p_j;
- :func:`taylor_terms`: the expansion's terms per listed item and segment, from torch's σ and softplus;
- :func:`rest_gradient`: each rest item's slope Σ_m δ^m (a_m − b_m / p_j), written in column order.

The products of the terms with the moments (batched matmuls) stay in torch. The order is the one every sort of the
unique keys gives, so a faster sort does not change it. The maths is that of torch's passes
(:func:`hetcomp.distill.losses._segments_by_torch`, :func:`hetcomp.distill.losses._softplus_taylor`) and so is the
order of every float64 operation, so the results are the same bits (tested), as long as libm's ``asinh`` is
monotone, as glibc's is. :func:`segments`, :func:`taylor` and :func:`gradient` split a chunk's rows over threads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numba import njit, uintp

#: a place of the sorted row: a rest item (unobserved, not listed), a listed item, a training item
REST, LISTED, OBSERVED = 0, 1, 2


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _place_score(scores, order, row, k, n_unobserved, bottom):
    """The score the warp reads at sorted place k: the student's score, or the lowest unobserved one for a
    training item (they share the last segment)."""
    return float(scores[row, order[row, k]]) if k < n_unobserved else bottom


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _warped(score, anchors, at_anchor, midpoints):
    """(the nearest anchor, the warped score u), exactly as torch's passes compute them: the anchor is the first
    whose midpoint with the next is at or above the score, u = u(anchor) + π·asinh((f − anchor)/π)."""
    nearest = np.searchsorted(midpoints, score)
    return nearest, at_anchor[nearest] + math.pi * math.asinh((score - anchors[nearest]) / math.pi)


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _bucket_of(score, anchors, at_anchor, midpoints, top, bucket):
    """(the nearest anchor, the bucket floor((u_top − u)/bucket)) of a score."""
    nearest, warped = _warped(score, anchors, at_anchor, midpoints)
    return nearest, math.floor((top - warped) / bucket)


@njit(cache=True, nogil=True, error_model="numpy")
def segment_rows(scores, order, unobserved, listed, valid, anchors, at_anchor, midpoints, bucket):  # noqa: PLR0913
    """Per row: ``segment`` [B, n] int32 (ids from 0 along the sorted row), ``kind`` [B, n] int8, the segment
    count [B], and each listed item's 0-based sorted place [B, N]. A place's warped score u (π·asinh from the
    nearest anchor, as :func:`hetcomp.distill.losses._warped_scores`) gives its bucket floor((u_0 − u)/bucket);
    a segment is a run of one bucket and one count of listed items at or above it.

    The (anchor, bucket) pair only moves one way along the sorted row (the scores fall, every step of its
    arithmetic is monotone), so a run of places with one pair is found by a galloping search from its first
    place: O(log run) evaluations of asinh a run instead of one a place, and the same buckets."""
    rows, n_items = scores.shape
    n_listed = listed.shape[1]
    segment = np.empty((rows, n_items), dtype=np.int32)
    kind = np.empty((rows, n_items), dtype=np.int8)
    n_segments = np.empty(rows, dtype=np.int64)
    listed_place = np.empty((rows, n_listed), dtype=np.int64)
    place_of = np.empty(n_items, dtype=np.int64)  # written for the listed items only, as the walk meets them
    member = np.zeros(n_items, dtype=np.int8)  # per item: 0, 1 (in the list, padding), 2 (a valid listed item)
    for row in range(rows):
        for i in range(n_listed):
            member[listed[row, i]] = max(member[listed[row, i]], 2 if valid[row, i] else 1)
        n_unobserved = 0
        for k in range(n_items):
            n_unobserved += unobserved[row, k]
        bottom = float(scores[row, order[row, max(n_unobserved - 1, 0)]])
        anchors_row, at_anchor_row, midpoints_row = anchors[row], at_anchor[row], midpoints[row]
        top = _warped(_place_score(scores, order, row, 0, n_unobserved, bottom), anchors_row, at_anchor_row,
                      midpoints_row)[1]
        previous_key = -1
        current = -1
        above = 0
        k = 0
        while k < n_items:
            score = _place_score(scores, order, row, k, n_unobserved, bottom)
            pair = _bucket_of(score, anchors_row, at_anchor_row, midpoints_row, top, bucket)
            last, beyond, step = k, n_items, 1  # [k, last] share the pair; beyond: the first known not to
            while last + step < beyond:
                probe = last + step
                if _bucket_of(_place_score(scores, order, row, probe, n_unobserved, bottom), anchors_row,
                              at_anchor_row, midpoints_row, top, bucket) == pair:
                    last = probe
                    step *= 2
                else:
                    beyond = probe
            while beyond - last > 1:
                probe = (last + beyond) // 2
                if _bucket_of(_place_score(scores, order, row, probe, n_unobserved, bottom), anchors_row,
                              at_anchor_row, midpoints_row, top, bucket) == pair:
                    last = probe
                else:
                    beyond = probe
            base = int(pair[1]) * (n_listed + 1)
            for j in range(k, last + 1):
                item = order[row, j]
                listed_here = member[item]
                if listed_here:
                    place_of[item] = j
                if j < n_unobserved:
                    if listed_here == 2:
                        kind[row, j] = LISTED
                        above += 1
                    else:
                        kind[row, j] = REST
                else:
                    kind[row, j] = OBSERVED
                key = base + above
                if key != previous_key:
                    current += 1
                    previous_key = key
                segment[row, j] = current
            k = last + 1
        n_segments[row] = current + 1
        for i in range(n_listed):
            listed_place[row, i] = place_of[listed[row, i]]
        for i in range(n_listed):
            member[listed[row, i]] = 0
    return segment, kind, n_segments, listed_place


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _block_sum(values, channel, start, count):
    """numpy's pairwise sum of at most 128 values: sequential below 8 (from −0.0), else eight accumulators. The
    indices are unsigned, which spares numba's negative-index checks and lets LLVM load the eight lanes at once."""
    row = values[channel]
    first = uintp(start)
    if count < 8:
        total = -0.0
        for i in range(count):
            total += row[first + uintp(i)]
        return total
    r0, r1, r2, r3 = row[first], row[first + uintp(1)], row[first + uintp(2)], row[first + uintp(3)]
    r4, r5, r6, r7 = row[first + uintp(4)], row[first + uintp(5)], row[first + uintp(6)], row[first + uintp(7)]
    at = first + uintp(8)
    stop = first + uintp(count - count % 8)
    while at < stop:
        r0 += row[at]
        r1 += row[at + uintp(1)]
        r2 += row[at + uintp(2)]
        r3 += row[at + uintp(3)]
        r4 += row[at + uintp(4)]
        r5 += row[at + uintp(5)]
        r6 += row[at + uintp(6)]
        r7 += row[at + uintp(7)]
        at += uintp(8)
    total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    end = first + uintp(count)
    while at < end:
        total += row[at]
        at += uintp(1)
    return total


@njit(cache=True, nogil=True, error_model="numpy", inline="always")
def _block_terms(sorted_scores, kind, row, start, count, c, taylor_order, tile, delta):
    """Places start .. start + count − 1 (at most 128): each one's δ^m and δ^m / p_j (m = 0..order) into
    ``tile[:, column]`` and its δ into ``delta``, a channel at a time (loops that vectorize). On the rest δ^0 is
    1.0 and δ^m = δ^{m−1}·δ, δ^m / p_j = δ^m·(1/p_j); elsewhere δ is taken as 0.0 with δ^0 = 0.0, so every
    channel is 0.0 off the rest."""
    for column in range(count):
        k = start + column
        if kind[row, k] == REST:
            d = sorted_scores[k] - c
            delta[row, k] = d
            tile[0, column] = 1.0
            tile[1, column] = 1.0 / (k + 1)
            tile[2, column] = d
        else:
            tile[0, column] = 0.0
            tile[1, column] = 0.0
            tile[2, column] = 0.0
    for column in range(count):  # δ^1 / p_j, the rest's inverse place kept in channel 1 until now
        tile[3, column] = tile[2, column] * tile[1, column]
    for m in range(2, taylor_order + 1):
        for column in range(count):
            tile[2 * m, column] = tile[2 * m - 2, column] * tile[2, column]
            tile[2 * m + 1, column] = tile[2 * m, column] * tile[1, column]
    for column in range(count):  # δ^0 / p_j: the inverse place itself (1.0 · 1/p_j)
        tile[1, column] = tile[0, column] * tile[1, column]


@njit(cache=True, nogil=True, error_model="numpy")
def _pairwise_terms(sorted_scores, kind, row, c, start, count, taylor_order, delta, tile, nodes, firsts, value,
                    result):
    """Each channel's sum over places start .. start + count − 1 into ``value``, in the order of numpy's pairwise
    summation (which ``np.add.reduceat`` uses after a run's first value, and so torch's passes,
    :func:`hetcomp.distill.losses._segment_sums`): blocks of at most 128 values by :func:`_block_sum`, above that
    the two halves (the first a multiple of 8) summed apart and added. The halving is walked once for all channels
    with a stack (numba caches no recursive function), each block's terms made into ``tile`` [channels, 128] as
    the walk reaches it (:func:`_block_terms`), so no segment's terms are staged whole (one far below the list
    holds thousands of places). ``nodes`` [3, 64] (a node's start, count, state), ``firsts`` [64, channels] (its
    first half's sums) and ``result`` [channels] are the caller's scratch."""
    channels = 2 * (taylor_order + 1)
    node_start, node_count, node_state = nodes[0], nodes[1], nodes[2]
    node_start[0], node_count[0], node_state[0] = start, count, 0
    top = 0
    while top >= 0:
        n = node_count[top]
        half = n // 2
        half -= half % 8
        if n <= 128 or node_state[top] == 2:
            if n <= 128:
                _block_terms(sorted_scores, kind, row, node_start[top], n, c, taylor_order, tile, delta)
                for channel in range(channels):
                    value[channel] = _block_sum(tile, channel, 0, n)
            else:
                for channel in range(channels):
                    value[channel] = firsts[top, channel] + result[channel]
            top -= 1
            if top < 0:
                return
            if node_state[top] == 0:
                for channel in range(channels):
                    firsts[top, channel] = value[channel]
                node_state[top] = 1
            else:
                for channel in range(channels):
                    result[channel] = value[channel]
                node_state[top] = 2
            continue
        top += 1
        node_state[top] = 0
        if node_state[top - 1] == 0:
            node_start[top], node_count[top] = node_start[top - 1], half
        else:
            node_start[top], node_count[top] = node_start[top - 1] + half, n - half


@njit(cache=True, nogil=True, error_model="numpy")
def segment_moments(scores, order, segment, kind, n_segments, taylor_order, width):
    """Per row and segment: the centre c (the middle of its rest items' scores, 0 if it has none), the listed
    items at or above it, and the moments Σ δ^m, Σ δ^m / p_j (m = 0..order, δ = f_j − c, p_j the 1-based place)
    [B, S, order + 1, 2], S = ``width`` (at least every row's count); and δ per place [B, n] (0 off the rest).
    Each sum runs over all of its segment's places (0 off the rest), in ``np.add.reduceat``'s order: the first
    place, plus the pairwise sum of the others (:func:`_pairwise_terms`)."""
    rows, n_items = scores.shape
    channels = 2 * (taylor_order + 1)
    centre = np.zeros((rows, width))
    listed_above = np.zeros((rows, width), dtype=np.int64)
    moments = np.zeros((rows, width, taylor_order + 1, 2))
    delta = np.zeros((rows, n_items))
    low = np.empty(width)
    high = np.empty(width)
    first = np.empty(width + 1, dtype=np.int64)
    tile = np.empty((channels, 128))
    sorted_scores = np.empty(n_items)
    nodes = np.empty((3, 64), dtype=np.int64)
    firsts = np.empty((64, channels))
    head = np.empty(channels)
    value = np.empty(channels)
    result = np.empty(channels)
    for row in range(rows):
        low[:] = math.inf
        high[:] = -math.inf
        above = 0
        for k in range(n_items):
            s = segment[row, k]
            if k == 0 or s != segment[row, k - 1]:
                first[s] = k
            if kind[row, k] == LISTED:
                above += 1
            listed_above[row, s] = above
            if kind[row, k] == REST:
                score = float(scores[row, uintp(order[row, k])])
                sorted_scores[k] = score
                low[s] = min(low[s], score)
                high[s] = max(high[s], score)
        first[n_segments[row]] = n_items
        for s in range(n_segments[row]):
            if not high[s] >= low[s]:
                continue  # no rest item: every term is +0.0, and so is every sum
            c = (low[s] + high[s]) / 2
            centre[row, s] = c
            start, stop = first[s], first[s + 1]
            _block_terms(sorted_scores, kind, row, start, 1, c, taylor_order, tile, delta)  # the first place
            for channel in range(channels):
                head[channel] = tile[channel, 0]
            if stop - start > 1:
                _pairwise_terms(sorted_scores, kind, row, c, start + 1, stop - start - 1, taylor_order, delta, tile,
                                nodes, firsts, value, result)
                for channel in range(channels):
                    head[channel] += value[channel]
            for channel in range(channels):
                moments[row, s, channel // 2, channel % 2] = head[channel]
    return centre, listed_above, moments, delta


@njit(cache=True, nogil=True, error_model="numpy")
def rest_gradient(order, segment, kind, delta, a, b, out):
    """Each rest item's slope Σ_m δ^m (a_m − b_m / p_j) (Horner from the top order), ``a``, ``b`` [B, S, order + 1]
    per segment, written into ``out`` [B, n] at its column; every other place's slope times 0.0, as torch's passes
    mask it (a signed zero). A segment's places go in blocks of at most 128, one order at a time over the block
    (loops that vectorize; each place's operations and their order are the same)."""
    rows, n_items = order.shape
    top = a.shape[2] - 1
    value = np.empty(128)
    inverse_place = np.empty(128)
    for row in range(rows):
        start = 0
        while start < n_items:
            s = segment[row, start]
            stop = start + 1
            while stop < n_items and stop - start < 128 and segment[row, stop] == s:
                stop += 1
            count = stop - start
            d = delta[row, start:stop]
            for column in range(count):
                inverse_place[column] = 1.0 / (start + column + 1)
                value[column] = 0.0
            for m in range(top, -1, -1):
                a_m, b_m = a[row, s, m], b[row, s, m]
                for column in range(count):
                    value[column] = value[column] * d[column] + a_m - b_m * inverse_place[column]
            for column in range(count):
                k = start + column
                out[row, uintp(order[row, k])] = value[column] * (1.0 if kind[row, k] == REST else 0.0)
            start = stop
    return out


@njit(cache=True, nogil=True, error_model="numpy")
def taylor_terms(sigmoid, sigmoid_negated, softplus, above, listed_above, valid, coefficients, lengths, factorials,
                 out):
    """The expansion's terms sign·softplus^{(m)}(x)/m!, m = 0..order, into ``out`` [B, N, S, order + 1], from
    σ(x), σ(−x), softplus(x) [B, N, S] (torch's) with x = c_s − f_i; sign = +1 where segment s lies below listed
    item i (``above[s] >= listed_above[i]``), −1 above, times 0 for padding. For m ≥ 2, softplus^{(m)} =
    σ(x)σ(−x)·Q_{m−2}(σ) (``coefficients`` [order − 1, width], power basis, ``lengths`` used), by Horner from the
    top: :func:`hetcomp.distill.losses._softplus_taylor`'s operations in its order, so the same bits."""
    rows, n_listed, width = sigmoid.shape
    top = out.shape[3] - 1
    both = np.empty(width)
    value = np.empty(width)
    terms = np.empty((top + 1, width))  # one listed item's terms, order by order, then written out place by place
    for row in range(rows):
        for i in range(n_listed):
            valid_factor = 1.0 if valid[row, i] else 0.0
            sig = sigmoid[row, i]
            for s in range(width):  # loops over s alone, which LLVM vectorizes
                sign = (1.0 if above[row, s] >= listed_above[row, i] else -1.0) * valid_factor
                both[s] = sig[s] * sigmoid_negated[row, i, s] * sign
                terms[0, s] = softplus[row, i, s] * sign
                terms[1, s] = sig[s] * sign
            for m in range(2, top + 1):
                length = lengths[m - 2]
                leading = coefficients[m - 2, length - 1]
                for s in range(width):
                    value[s] = leading
                for c in range(length - 2, -1, -1):
                    coefficient = coefficients[m - 2, c]
                    for s in range(width):
                        value[s] = value[s] * sig[s] + coefficient
                factorial = factorials[m]
                for s in range(width):
                    terms[m, s] = both[s] * value[s] / factorial
            for s in range(width):
                for m in range(top + 1):
                    out[row, i, s, m] = terms[m, s]
    return out


#: bits a pass of :func:`descending_order`'s radix sort: three passes cover the 32 bits of a score's key
_RADIX_BITS = 11
_RADIX_PASSES = -(-32 // _RADIX_BITS)


@njit(cache=True, nogil=True, error_model="numpy")
def descending_order(scores, unobserved):
    """The student's order of :func:`hetcomp.distill.losses._descending_order_by_keys` (float32 ``scores``): each
    row's columns by their keys (the negated score's bits as an int of the same order, a training item's +inf),
    ties in column order, by a stable LSD radix sort of the 32-bit keys (three passes of 11 bits; a pass whose
    digit every key shares is skipped). The keys with their columns are unique, so this is exactly the order that
    sorting them gives; a comparison sort of 28k-item rows was 4-6x slower on some CPUs (numpy's sort of int64
    is vectorized only on some)."""
    rows, n_items = scores.shape
    size = 1 << _RADIX_BITS
    mask = np.uint64(size - 1)
    out = np.empty((rows, n_items), dtype=np.int64)
    negated = np.empty(n_items, dtype=np.float32)
    bits = negated.view(np.int32)
    first = np.empty(n_items, dtype=np.uint64)
    second = np.empty(n_items, dtype=np.uint64)
    counts = np.empty((_RADIX_PASSES, size), dtype=np.int64)
    for row in range(rows):
        for k in range(n_items):
            negated[k] = -(scores[row, k] + np.float32(0.0)) if unobserved[row, k] else np.float32(np.inf)
        counts[:] = 0
        for k in range(n_items):
            word = bits[k]
            # the int order of the float's bits, then unsigned (+2^31) so that the radix sees the same order
            key = np.uint64(np.uint32(np.int64(word ^ 0x7FFFFFFF if word < 0 else word) + 2147483648))
            first[k] = (key << np.uint64(32)) | np.uint64(k)
            for digit in range(_RADIX_PASSES):
                counts[digit, (key >> np.uint64(_RADIX_BITS * digit)) & mask] += 1
        source, target = first, second
        for digit in range(_RADIX_PASSES):
            total, shared = 0, False
            for bucket in range(size):
                count = counts[digit, bucket]
                shared = shared or count == n_items
                counts[digit, bucket] = total
                total += count
            if shared:  # every key has this digit: the pass would move nothing
                continue
            shift = np.uint64(32 + _RADIX_BITS * digit)
            for k in range(n_items):
                entry = source[k]
                bucket = (entry >> shift) & mask
                target[counts[digit, bucket]] = entry
                counts[digit, bucket] += 1
            source, target = target, source
        for k in range(n_items):
            out[row, k] = np.int64(source[k] & np.uint64(0xFFFFFFFF))
    return out


# ---- the rows of a chunk in threads (the kernels release the GIL; rows are independent, so the bits stay) ----

_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _map_rows(function: Callable[[slice], object], rows: int, threads: int) -> list:
    """``function(part)`` for each of up to ``threads`` row slices, in a thread pool where there are several (one
    per process id: a forked child does not inherit the parent's threads)."""
    count = max(1, min(threads, rows))
    bounds = [rows * i // count for i in range(count + 1)]
    parts = [slice(start, stop) for start, stop in zip(bounds[:-1], bounds[1:], strict=True)]
    if count == 1:
        return [function(parts[0])]
    key = (os.getpid(), count)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(count, thread_name_prefix="hetcomp-rest")
    return list(_POOLS[key].map(function, parts))


def student_order(scores: np.ndarray, unobserved: np.ndarray, threads: int) -> np.ndarray:
    """:func:`descending_order` of a chunk's rows, split over ``threads``."""
    parts = _map_rows(lambda part: descending_order(scores[part], unobserved[part]), len(scores), threads)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def segments(scores: np.ndarray, order: np.ndarray, unobserved: np.ndarray, listed: np.ndarray, valid: np.ndarray,
             anchors: np.ndarray, at_anchor: np.ndarray, midpoints: np.ndarray, bucket: float, taylor_order: int,
             threads: int) -> tuple[np.ndarray, ...]:
    """:func:`segment_rows` then :func:`segment_moments` over a chunk's rows, split over ``threads``: (segment,
    kind, listed places, centre, listed above, moments, δ), the segment axes as wide as the chunk's widest row."""
    first = _map_rows(lambda part: segment_rows(scores[part], order[part], unobserved[part], listed[part],
                                                valid[part], anchors[part], at_anchor[part], midpoints[part], bucket),
                      len(scores), threads)
    segment, kind, n_segments, places = (np.concatenate(pieces) if len(first) > 1 else pieces[0]
                                         for pieces in zip(*first, strict=True))
    width = max(1, int(n_segments.max()))
    second = _map_rows(lambda part: segment_moments(scores[part], order[part], segment[part], kind[part],
                                                    n_segments[part], taylor_order, width), len(scores), threads)
    centre, above, moments, delta = (np.concatenate(pieces) if len(second) > 1 else pieces[0]
                                     for pieces in zip(*second, strict=True))
    return segment, kind, places, centre, above, moments, delta


def gradient(order: np.ndarray, segment: np.ndarray, kind: np.ndarray, delta: np.ndarray, a: np.ndarray,
             b: np.ndarray, out: np.ndarray, threads: int) -> None:
    """:func:`rest_gradient` into ``out``, its rows split over ``threads``."""
    _map_rows(lambda part: rest_gradient(order[part], segment[part], kind[part], delta[part], a[part], b[part],
                                         out[part]), len(order), threads)


def taylor(sigmoid: np.ndarray, sigmoid_negated: np.ndarray, softplus: np.ndarray, above: np.ndarray,
           listed_above: np.ndarray, valid: np.ndarray, coefficients: np.ndarray, lengths: np.ndarray,
           factorials: np.ndarray, out: np.ndarray, threads: int) -> None:
    """:func:`taylor_terms` into ``out``, its rows split over ``threads``; ``coefficients``, ``lengths`` and
    ``factorials`` as :func:`hetcomp.distill.losses._sigmoid_table` makes them (once)."""
    _map_rows(lambda part: taylor_terms(sigmoid[part], sigmoid_negated[part], softplus[part], above[part],
                                        listed_above[part], valid[part], coefficients, lengths, factorials,
                                        out[part]), len(out), threads)
