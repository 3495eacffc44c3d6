"""Dataset registry, parsers, the authors' split and the cache."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from hetcomp.data import DataError, load_dataset, load_interactions
from hetcomp.data.interactions import Interactions
from hetcomp.data.parsers import normalize_ids
from hetcomp.data.registry import REGISTRY, sha256_of
from hetcomp.data.split import split_interactions


def naive_authors_split(rows: list[tuple[int, int]], seed: int):
    """The authors' loader written plainly with dicts, as the reference for the vectorized split."""
    counts: dict[int, int] = {}
    for user, _ in rows:
        counts[user] = counts.get(user, 0) + 1
    user_index: dict[int, int] = {}
    item_index: dict[int, int] = {}
    total: dict[int, dict[int, int]] = {}
    for user, item in rows:
        if counts[user] < 5:
            continue
        user_index.setdefault(user, len(user_index))
        item_index.setdefault(item, len(item_index))
        total.setdefault(user_index[user], {})[item_index[item]] = 1
    np.random.seed(seed)
    train, valid, test = {}, {}, {}
    for user, items in total.items():
        order = list(items.keys())
        np.random.shuffle(order)
        n = int(len(order) * 0.2)
        test[user], valid[user], train[user] = set(order[:n]), set(order[n:2 * n]), set(order[2 * n:])
    seen = {item for items in train.values() for item in items}
    for user in list(valid):
        valid[user] = {item for item in valid[user] if item in seen}
        if not valid[user]:
            del valid[user], test[user]
    for user in list(test):
        test[user] = {item for item in test[user] if item in seen}
        if not test[user]:
            del test[user], valid[user]
    return len(user_index), len(item_index), train, valid, test


def csr_as_dict(matrix) -> dict[int, set[int]]:
    return {u: set(matrix.indices[matrix.indptr[u]:matrix.indptr[u + 1]].tolist())
            for u in range(matrix.shape[0]) if matrix.indptr[u + 1] > matrix.indptr[u]}


def write_users_dat(path: Path, rows_per_user: list[list[int]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(" ".join(map(str, [len(items)] + items)) for items in rows_per_user))


def test_authors_split_matches_naive_reference():
    rng = np.random.default_rng(3)
    rows = []
    for user in rng.permutation(80):
        for item in rng.choice(120, size=int(rng.integers(2, 25)), replace=False):
            rows.append((int(user) + 1000, int(item) * 7))
    rows.append(rows[0])  # a duplicate: binarization keeps the first
    interactions = Interactions(np.array([r[0] for r in rows]), np.array([r[1] for r in rows]))
    split = split_interactions(interactions, "toy", "0" * 64, seed=5)
    n_users, n_items, train, valid, test = naive_authors_split(rows, seed=5)
    assert (split.n_users, split.n_items) == (n_users, n_items)
    assert csr_as_dict(split.train) == {u: items for u, items in train.items() if items}
    assert csr_as_dict(split.valid) == valid
    assert csr_as_dict(split.test) == test


def test_real_citeulike_split_matches_reference_and_is_stable(citeulike_dir, tmp_path):
    path = citeulike_dir / "citeulike" / "users.dat"
    rows = []
    for user, line in enumerate(path.read_text().split("\n")):
        rows.extend((user, int(item)) for item in line.split()[1:])
    split = load_dataset("citeulike", data_dir=citeulike_dir, cache_dir=tmp_path)
    n_users, n_items, _, valid, test = naive_authors_split(rows, seed=0)
    assert (split.n_users, split.n_items) == (n_users, n_items) == (5219, 25181)
    assert csr_as_dict(split.valid) == valid and csr_as_dict(split.test) == test
    again = load_dataset("citeulike", data_dir=citeulike_dir, use_cache=False)
    cached = load_dataset("citeulike", data_dir=citeulike_dir, cache_dir=tmp_path)
    assert split.digest() == again.digest() == cached.digest()
    other_seed = load_dataset("citeulike", data_dir=citeulike_dir, seed=1, use_cache=False)
    assert other_seed.digest() != split.digest()


def test_split_parts_are_disjoint_and_clean(tiny_split):
    train, valid, test = tiny_split.train, tiny_split.valid, tiny_split.test
    assert train.multiply(valid).nnz == 0 and train.multiply(test).nnz == 0 and valid.multiply(test).nnz == 0
    in_train = np.asarray(train.sum(0)).ravel() > 0
    assert in_train[valid.indices].all() and in_train[test.indices].all()
    valid_users = np.diff(valid.indptr) > 0
    assert (valid_users == (np.diff(test.indptr) > 0)).all()


def test_random_and_leave_last_out_protocols():
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(30), 10)
    items = np.concatenate([rng.choice(25, 10, replace=False) for _ in range(30)])
    stamps = rng.permutation(len(users)).astype(float)
    interactions = Interactions(users, items, stamps)
    random = split_interactions(interactions, "t", "0" * 64, protocol="random", seed=1)
    assert random.train.nnz + random.valid.nnz + random.test.nnz <= 300
    last = split_interactions(interactions, "t", "0" * 64, protocol="leave-last-out")
    for user in np.flatnonzero(np.diff(last.test.indptr) > 0)[:5]:
        mine = np.flatnonzero(users == int(last.user_ids[user]))
        newest = items[mine[np.argmax(stamps[mine])]]
        assert str(newest) == last.item_ids[last.test.indices[last.test.indptr[user]]]
    with pytest.raises(DataError, match="timestamps"):
        split_interactions(Interactions(users, items), "t", "0" * 64, protocol="leave-last-out")


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(DataError) as error:
        load_dataset("movielens-999", use_cache=False)
    for name in REGISTRY:
        assert name in str(error.value)


def test_missing_file_names_place_file_and_url(tmp_path):
    with pytest.raises(DataError) as error:
        load_dataset("citeulike", data_dir=tmp_path, use_cache=False, download=False)
    message = str(error.value)
    url = REGISTRY["citeulike"].layouts[0].files[0].url
    assert str(tmp_path) in message and "users.dat" in message and url in message


def test_wrong_checksum_is_an_error(tmp_path):
    write_users_dat(tmp_path / "citeulike" / "users.dat", [[1, 2, 3, 4, 5]])
    with pytest.raises(DataError, match="sha256 mismatch"):
        load_dataset("citeulike", data_dir=tmp_path, use_cache=False)


def test_malformed_line_reports_file_and_line(tmp_path):
    bad = tmp_path / "bad.inter"
    bad.write_text("user_id:token\titem_id:token\n1\t2\n1\n")
    with pytest.raises(DataError, match=r"bad.inter: line 3"):
        load_interactions("recbole", path=bad)
    from hetcomp.data.parsers import parse_user_lines
    users = tmp_path / "users.dat"
    users.write_text("2 1 2\n3 1 x 2\n")
    with pytest.raises(DataError, match=r"users.dat: line 2"):
        parse_user_lines([users])
    users.write_text("2 1 2\n3 1 2\n")
    with pytest.raises(DataError, match=r"line 2 is malformed \(expected a count equal"):
        parse_user_lines([users])


def test_filter_leaving_nothing_is_an_error(tmp_path):
    file = tmp_path / "few.csv"
    file.write_text("u,i\n1,1\n1,2\n2,1\n")
    with pytest.raises(DataError, match="left the dataset empty"):
        load_dataset("csv", path=file, user_col="u", item_col="i", use_cache=False)


def test_amazon_ratings_csv_and_reviews_json(tmp_path):
    rows = [(f"A{u}", f"B{(u * 3 + k) % 9}", 4.0, 1_400_000_000 + u * 10 + k) for u in range(6) for k in range(6)]
    csv_file = tmp_path / "amusic" / "ratings_Digital_Music.csv"
    csv_file.parent.mkdir()
    csv_file.write_text("\n".join(f"{u},{i},{r},{t}" for u, i, r, t in rows) + "\n")
    from_csv, label, _ = load_interactions("amusic", data_dir=tmp_path, download=False)
    assert label == "amusic" and len(from_csv) == 36 and from_csv.timestamps is not None
    csv_file.unlink()
    json_file = tmp_path / "amusic" / "Digital_Music_5.json.gz"
    with gzip.open(json_file, "wt") as handle:
        for u, i, r, t in rows:
            handle.write(json.dumps({"reviewerID": u, "asin": i, "overall": r, "unixReviewTime": t}) + "\n")
    from_json, _, _ = load_interactions("amusic", data_dir=tmp_path, download=False)
    assert list(from_json.users) == list(from_csv.users) and list(from_json.items) == list(from_csv.items)
    split = load_dataset("amusic", data_dir=tmp_path, protocol="leave-last-out", use_cache=False, download=False)
    assert split.n_users == 6 and split.test.nnz == 6


def test_recbole_and_csv_formats(tmp_path):
    inter = tmp_path / "toy.inter"
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    lines += [f"u{u}\ti{(u + k) % 8}\t1\t{k}" for u in range(10) for k in range(6)]
    inter.write_text("\n".join(lines) + "\n")
    split = load_dataset("recbole", path=inter, cache_dir=tmp_path)
    assert split.n_users == 10 and split.meta["dataset"] == "recbole:toy"
    table = tmp_path / "toy.tsv"
    table.write_text("who\twhat\n" + "\n".join(f"{u}\t{(u + k) % 8}" for u in range(10) for k in range(6)))
    split = load_dataset("csv", path=table, user_col="who", item_col="what", sep="\t", use_cache=False)
    assert split.n_items == 8
    with pytest.raises(DataError, match="no column named 'user'"):
        load_dataset("csv", path=table, user_col="user", item_col="what", sep="\t", use_cache=False)


def test_float_renderings_of_integer_ids_are_the_integer(tmp_path):
    assert list(normalize_ids(["5096", "5096.0", "5096.", "5.096e3", "-3.0", "0.00", "1.5E+2"])) == [
        "5096", "5096", "5096", "5096", "-3", "0", "150"]
    kept = ["5096.5", "A12", "007", "x5096.0", "1e400", "nan", "12345678901234567890.0"]
    assert list(normalize_ids(kept)) == kept  # not integers, not numbers, or beyond a float's exact integers
    # one tool wrote the item as 5096, another as 5096.0: one item, in csv and recbole files alike
    rows = [(u, 5096 if k == 0 else 100 + (u + k) % 7) for u in range(10) for k in range(6)]
    table = tmp_path / "mixed.csv"
    table.write_text("user,item\n" + "\n".join(f"{u}.0,{i}.0" if u % 2 else f"{u},{i}" for u, i in rows))
    split = load_dataset("csv", path=table, user_col="user", item_col="item", use_cache=False)
    assert split.n_users == 10 and split.n_items == 8 and "5096" in split.item_ids
    inter = tmp_path / "mixed.inter"
    inter.write_text("user_id:token\titem_id:token\n" + "\n".join(f"{u}\t{i}.0" if u % 2 else f"{u}\t{i}"
                                                                    for u, i in rows) + "\n")
    assert load_dataset("recbole", path=inter, use_cache=False).n_items == 8


def test_download_is_verified(tmp_path, monkeypatch):
    """A downloaded file goes through the same checksum check as a local one."""
    from hetcomp.data import registry

    def fake_download(remote, target, timeout):
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("1 1\n")

    monkeypatch.setattr(registry, "_download", fake_download)
    with pytest.raises(DataError, match="sha256 mismatch"):
        load_dataset("citeulike", data_dir=tmp_path, use_cache=False)
    assert sha256_of(tmp_path / "citeulike" / "users.dat")


def test_env_var_sets_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HETCOMP_DATA", str(tmp_path))
    with pytest.raises(DataError, match=str(tmp_path)):
        load_dataset("lastfm", use_cache=False, download=False)
