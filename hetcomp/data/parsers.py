"""Parsers for the file formats of the registered datasets.

Every parser reads a list of paths (concatenated in order) and returns :class:`Interactions` in file order.
A line that cannot be parsed is an error naming the file and the line number: never a silent skip.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from hetcomp.data.errors import DataError
from hetcomp.data.interactions import Interactions

Parser = Callable[[list[Path]], Interactions]


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, line without its end-of-line), skipping blank lines."""
    with _open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield number, line


def _malformed(path: Path, number: int, line: str, expected: str) -> DataError:
    shown = line if len(line) <= 80 else line[:77] + "..."
    return DataError(f"{path}: line {number} is malformed (expected {expected}): {shown!r}")


def parse_user_lines(paths: list[Path]) -> Interactions:
    """citeulike-t ``users.dat``: line n is user n, ``<count> <item> <item> ...`` with integer item ids.

    The leading count must equal the number of items that follow; a mismatch means a truncated or edited file.
    """
    users: list[int] = []
    items: list[int] = []
    user = 0
    for path in paths:
        for number, line in _lines(path):
            fields = line.split()
            try:
                values = [int(field) for field in fields]
            except ValueError:
                raise _malformed(path, number, line, "integers '<count> <item> <item> ...'") from None
            if values[0] != len(values) - 1:
                raise _malformed(path, number, line, f"a count equal to the {len(values) - 1} items listed")
            users.extend([user] * values[0])
            items.extend(values[1:])
            user += 1
    return Interactions(np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64))


def _delimited_int_parser(delimiter: str | None, expected: str) -> Parser:
    """Files of ``user <sep> item <sep> value`` with integer ids (Foursquare, Gowalla, Last.fm, Amusic copy)."""

    def parse(paths: list[Path]) -> Interactions:
        users: list[int] = []
        items: list[int] = []
        for path in paths:
            for number, line in _lines(path):
                fields = line.split(delimiter)
                if len(fields) < 2:
                    raise _malformed(path, number, line, expected)
                try:
                    user, item = int(fields[0]), int(fields[1])
                    if len(fields) > 2:
                        float(fields[2])
                except ValueError:
                    raise _malformed(path, number, line, expected) from None
                users.append(user)
                items.append(item)
        return Interactions(np.asarray(users, dtype=np.int64), np.asarray(items, dtype=np.int64))

    return parse


parse_tab_triples = _delimited_int_parser("\t", "'user<TAB>item<TAB>count' with integer ids")
parse_space_triples = _delimited_int_parser(None, "'user item rating' with integer ids")


def parse_amazon_ratings_csv(paths: list[Path]) -> Interactions:
    """Amazon ratings-only CSV (2014 and 2018 releases): ``user,item,rating,timestamp`` with no header."""
    users: list[str] = []
    items: list[str] = []
    stamps: list[int] = []
    expected = "'user,item,rating,timestamp'"
    for path in paths:
        with _open_text(path) as handle:
            for number, row in enumerate(csv.reader(handle), start=1):
                if not row:
                    continue
                if len(row) != 4:
                    raise _malformed(path, number, ",".join(row), expected)
                try:
                    float(row[2])
                    stamp = int(float(row[3]))
                except ValueError:
                    raise _malformed(path, number, ",".join(row), expected) from None
                users.append(row[0])
                items.append(row[1])
                stamps.append(stamp)
    return Interactions(np.asarray(users, dtype=object), np.asarray(items, dtype=object),
                        np.asarray(stamps, dtype=np.int64))


def parse_amazon_reviews_json(paths: list[Path]) -> Interactions:
    """Amazon 5-core review file, one JSON object per line with ``reviewerID``, ``asin`` and ``unixReviewTime``.

    The 2014 release writes Python-literal lines in some categories; only strict JSON is accepted here and
    anything else is reported with its line number.
    """
    users: list[str] = []
    items: list[str] = []
    stamps: list[int] = []
    for path in paths:
        for number, line in _lines(path):
            try:
                record = json.loads(line)
                users.append(str(record["reviewerID"]))
                items.append(str(record["asin"]))
                stamps.append(int(record.get("unixReviewTime", 0)))
            except (ValueError, KeyError, TypeError):
                raise _malformed(path, number, line, "a JSON object with 'reviewerID' and 'asin'") from None
    return Interactions(np.asarray(users, dtype=object), np.asarray(items, dtype=object),
                        np.asarray(stamps, dtype=np.int64))


_FLOAT_RENDERING = r"[+-]?(?:\d+\.\d*|\.\d+|\d+(?:\.\d*)?[eE][+-]?\d+)"


def normalize_ids(values: list[str]) -> np.ndarray:
    """Raw ids as text, with every float rendering of an integer written as that integer (``5096.0``, ``5096.``,
    ``5.096e3`` → ``5096``), so that one item written both ways by a tool is one item. Other ids are unchanged
    (integers keep their exact digits; ``5096.5`` or ``A12`` stay as they are). Integers beyond 2^53, where a
    float no longer holds every integer, are left as written."""
    ids = pd.Series(values, dtype=object).astype(str)
    looks_float = ids.str.fullmatch(_FLOAT_RENDERING)
    if looks_float.any():
        numbers = pd.to_numeric(ids[looks_float], errors="coerce")
        integral = numbers.notna() & (numbers % 1 == 0) & (numbers.abs() < 2.0 ** 53)
        integral = integral[integral].index
        ids[integral] = numbers[integral].astype(np.int64).astype(str)
    return ids.to_numpy(dtype=object)


def parse_recbole_inter(paths: list[Path]) -> Interactions:
    """RecBole atomic ``.inter`` file: a tab-separated header of ``name:type`` fields, then rows.

    Needs ``user_id`` and ``item_id`` fields; ``timestamp`` is used when present.
    """
    users: list[str] = []
    items: list[str] = []
    stamps: list[float] = []
    has_time = None
    for path in paths:
        lines = _lines(path)
        try:
            _, header = next(lines)
        except StopIteration:
            raise DataError(f"{path}: the file is empty (expected a RecBole header line)") from None
        names = [field.split(":")[0] for field in header.split("\t")]
        if "user_id" not in names or "item_id" not in names:
            raise DataError(f"{path}: line 1 must be a RecBole header with user_id:token and item_id:token "
                            f"fields, found {header!r}")
        user_col, item_col = names.index("user_id"), names.index("item_id")
        time_col = names.index("timestamp") if "timestamp" in names else None
        has_time = time_col is not None if has_time is None else (has_time and time_col is not None)
        for number, line in lines:
            fields = line.split("\t")
            if len(fields) != len(names):
                raise _malformed(path, number, line, f"{len(names)} tab-separated fields as in the header")
            users.append(fields[user_col])
            items.append(fields[item_col])
            if time_col is not None:
                try:
                    stamps.append(float(fields[time_col]))
                except ValueError:
                    raise _malformed(path, number, line, "a numeric timestamp") from None
    stamp_array = np.asarray(stamps, dtype=np.float64) if has_time else None
    return Interactions(normalize_ids(users), normalize_ids(items), stamp_array)


def make_csv_parser(user_col: str, item_col: str, sep: str = ",", time_col: str | None = None) -> Parser:
    """Any delimited file with a header row naming the user and item (and optionally timestamp) columns."""

    def parse(paths: list[Path]) -> Interactions:
        users: list[str] = []
        items: list[str] = []
        stamps: list[float] = []
        for path in paths:
            with _open_text(path) as handle:
                reader = csv.reader(handle, delimiter=sep)
                header = next(reader, None)
                if header is None:
                    raise DataError(f"{path}: the file is empty (expected a header row)")
                for wanted in [user_col, item_col] + ([time_col] if time_col else []):
                    if wanted not in header:
                        raise DataError(f"{path}: no column named {wanted!r} in the header {header}; "
                                        "pass the right names with --user-col / --item-col / --time-col")
                u_at, i_at = header.index(user_col), header.index(item_col)
                t_at = header.index(time_col) if time_col else None
                for number, row in enumerate(reader, start=2):
                    if not row:
                        continue
                    if len(row) != len(header):
                        raise _malformed(path, number, sep.join(row), f"{len(header)} fields as in the header")
                    users.append(row[u_at])
                    items.append(row[i_at])
                    if t_at is not None:
                        try:
                            stamps.append(float(row[t_at]))
                        except ValueError:
                            raise _malformed(path, number, sep.join(row), "a numeric timestamp") from None
        stamp_array = np.asarray(stamps, dtype=np.float64) if time_col else None
        return Interactions(normalize_ids(users), normalize_ids(items), stamp_array)

    return parse
