"""The dataset registry: name -> upstream files (URL, sha256) and the parser that reads them.

The project never ships data. It reads a local copy from a data directory (``--data-dir``, else the
environment variable ``HETCOMP_DATA``, else ``./datasets``), looking in ``<data-dir>/<folder>/`` and then in
``<data-dir>/`` itself. A missing file is downloaded from upstream when the network allows and verified
against its sha256; otherwise the error says where we looked, which file we expect, and where to get it.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from hetcomp.data import parsers
from hetcomp.data.errors import DataError
from hetcomp.data.interactions import Interactions

DATA_ENV = "HETCOMP_DATA"
DEFAULT_DATA_DIR = Path("datasets")


@dataclass(frozen=True)
class RemoteFile:
    """One upstream file: its expected name, download URL and sha256."""

    name: str
    url: str
    sha256: str


@dataclass(frozen=True)
class FileSet:
    """A set of files that together make the dataset (concatenated in order) and how to parse them."""

    files: tuple[RemoteFile, ...]
    parser: parsers.Parser
    description: str


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset. ``layouts`` are alternative file sets; the first found locally wins.

    Only the first layout is downloaded automatically: the others are the upstream originals that users may
    place by hand (their release is too large, or behind a form, to fetch here).
    """

    name: str
    folder: str
    source: str
    layouts: tuple[FileSet, ...]
    notes: str = ""
    aliases: tuple[str, ...] = field(default=())
    #: evaluate (and snapshot) teachers every this many epochs instead of each model's default: where teachers
    #: converge within a few tens of epochs, a coarse interval puts E1..E4 on the same evaluated epoch
    teacher_eval_every: int | None = None


def _gh(repo: str, commit: str, path: str) -> str:
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


_LBSN = ("YijunSu/LBSN_Dataset", "5626465a415cd52a27696277bb61f78579c8df91")
_SIGFORMER = ("StupidThree/SIGformer", "e52ce204c8d16457717730eb8d8d54453c07ea76")

REGISTRY: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            name="citeulike",
            folder="citeulike",
            source="citeulike-t users.dat (Wang et al., IJCAI 2013), the file HetComp's authors used",
            layouts=(FileSet(
                files=(RemoteFile("users.dat",
                                  _gh("js05212/citeulike-t", "4f103c6ea0fe407b23be230837b65517e613c34a",
                                      "users.dat"),
                                  "02d5d429b2c0362e0ed79f6ef204666b4092563d21493abf4dfb521e8a7078bf"),),
                parser=parsers.parse_user_lines,
                description="users.dat: line n = user n, '<count> <item> <item> ...'"),),
        ),
        DatasetSpec(
            name="foursquare",
            folder="foursquare_fgcrec",
            source="Foursquare check-ins of Liu et al. (VLDB 2017), FGCRec cut: 7,642 users",
            layouts=(FileSet(
                files=tuple(
                    RemoteFile(f"Foursquare_{part}.txt",
                               _gh(*_LBSN, f"Foursquare_FGCRec/Foursquare_{part}.txt"), sha)
                    for part, sha in [
                        ("train", "ecc46a2edaf474e8c017130eda3348948a976d19784eeec5bd15acb16c1640f5"),
                        ("tune", "3790664ab80482b9ab2bbaf33d5491247a585f2d2495f63183013b9a0897d872"),
                        ("test", "292d0dd59e94a9f9c61c06229262c745954a7b81ddf6a7b5425f52ce8d7ff666"),
                    ]),
                parser=parsers.parse_tab_triples,
                description="user<TAB>poi<TAB>count; train + tune + test concatenated, then re-split"),),
            notes="a smaller user cut of the source HetComp used",
            teacher_eval_every=2,
        ),
        DatasetSpec(
            name="foursquare-small",
            folder="foursquare",
            source="Foursquare check-ins of Liu et al. (VLDB 2017), LBSNDatasets 5,000-user cut",
            layouts=(FileSet(
                files=tuple(
                    RemoteFile(f"Foursquare_{part}.txt",
                               _gh("rahmanidashti/LBSNDatasets", "b55cccad6ad49684705cabeed81472ce03ddb2df",
                                   f"Foursquare/Foursquare_1/Foursquare_{part}.txt"), sha)
                    for part, sha in [
                        ("train", "bc864de35619834385d11a9b1a5c481cd69ef12395e626560d831337e7bebffb"),
                        ("test", "da1442b7fba3a9250d217a8ad0cda38c5b7a868b4c86cffd229d4c5364b297b0"),
                    ]),
                parser=parsers.parse_tab_triples,
                description="user<TAB>poi<TAB>count; train + test concatenated, then re-split"),),
            notes="for quick runs",
        ),
        DatasetSpec(
            name="amusic",
            folder="amusic",
            source="Amazon Digital Music (McAuley et al.); SIGformer's 6-core copy, or the upstream files",
            layouts=(
                FileSet(
                    files=tuple(
                        RemoteFile(f"{part}.txt", _gh(*_SIGFORMER, f"data/amazon-music/{part}.txt"), sha)
                        for part, sha in [
                            ("train", "e9c1585af45827ef4b5e9d351b3523785e62694440678f0c0ada8ae1b3298c92"),
                            ("valid", "b60f7fd415fe27aa24a62313f4602f3551bb9480f7bbea479f0fa9307dcd8669"),
                            ("test", "a495dc54a11a4a5d31d065f0dd25055b96d921a9e737c89f634bf3b875247397"),
                        ]),
                    parser=parsers.parse_space_triples,
                    description="'user item rating', train + valid + test concatenated, every rating positive"),
                FileSet(
                    files=(RemoteFile("ratings_Digital_Music.csv",
                                      "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
                                      "ratings_Digital_Music.csv", ""),),
                    parser=parsers.parse_amazon_ratings_csv,
                    description="2014/2018 ratings CSV 'user,item,rating,timestamp', no header"),
                FileSet(
                    files=(RemoteFile("Digital_Music_5.json",
                                      "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
                                      "reviews_Digital_Music_5.json.gz", ""),),
                    parser=parsers.parse_amazon_reviews_json,
                    description="5-core JSON lines with reviewerID / asin / unixReviewTime"),
                FileSet(
                    files=(RemoteFile("Digital_Music_5.json.gz",
                                      "http://snap.stanford.edu/data/amazon/productGraph/categoryFiles/"
                                      "reviews_Digital_Music_5.json.gz", ""),),
                    parser=parsers.parse_amazon_reviews_json,
                    description="the same 5-core JSON lines, gzip-compressed"),
            ),
            notes="stand-in: a smaller 6-core cut than the paper's",
        ),
        DatasetSpec(
            name="gowalla",
            folder="gowalla_fgcrec",
            source="Gowalla check-ins (Cho et al., KDD 2011), FGCRec cut: 5,628 users",
            layouts=(FileSet(
                files=tuple(
                    RemoteFile(f"Gowalla_{part}.txt", _gh(*_LBSN, f"Gowalla_FGCRec/Gowalla_{part}.txt"), sha)
                    for part, sha in [
                        ("train", "91f3d4ca9cc585aeabf60710fadc88397b1822b68faaa3738ccbf37f724be59c"),
                        ("tune", "8067d60f82d00d62c86c504cafd321d7301b566613b408febb3eae14b453660b"),
                        ("test", "c51713059910602427a6e98d7b0ba3f7bf45024c02de966ebec029ae1791fbc5"),
                    ]),
                parser=parsers.parse_tab_triples,
                description="user<TAB>poi<TAB>count; train + tune + test concatenated, then re-split"),),
        ),
        DatasetSpec(
            name="lastfm",
            folder="lastfm-hetrec",
            source="HetRec 2011 Last.fm user-artist listening counts",
            layouts=(FileSet(
                files=(RemoteFile("ratings_data.txt",
                                  _gh("rahmanidashti/FairRecSys", "6ebf2462f1b3e6c799512727f5a158ea93c56a84",
                                      "datasets/LastFM/ratings_data.txt"),
                                  "ad39f61e1240e14119ad9764708203801a1665a31afb2b5dd5787e45e29942c3"),),
                parser=parsers.parse_tab_triples,
                description="user<TAB>artist<TAB>count, CRLF line ends"),),
        ),
    ]
}

#: Formats that read a file the user names (``--path``) rather than a registered dataset.
FILE_FORMATS = ("recbole", "csv")


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data directory: the explicit argument, else ``$HETCOMP_DATA``, else ``./datasets``."""
    if data_dir is not None:
        return Path(data_dir)
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV])
    return DEFAULT_DATA_DIR


def get_spec(name: str) -> DatasetSpec:
    """Look a dataset up by name; an unknown name lists the known ones."""
    if name in REGISTRY:
        return REGISTRY[name]
    known = ", ".join(sorted(REGISTRY)) + "; or a file of format " + " / ".join(FILE_FORMATS) + " with --path"
    raise DataError(f"unknown dataset {name!r}. Known datasets: {known}")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _candidates(data_dir: Path, spec: DatasetSpec, name: str) -> list[Path]:
    return [data_dir / spec.folder / name, data_dir / name]


def _find(data_dir: Path, spec: DatasetSpec, remote: RemoteFile) -> Path | None:
    for candidate in _candidates(data_dir, spec, remote.name):
        if candidate.is_file():
            return candidate
    return None


def _download(remote: RemoteFile, target: Path, timeout: float) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    with urllib.request.urlopen(remote.url, timeout=timeout) as response, open(partial, "wb") as out:
        while block := response.read(1 << 20):
            out.write(block)
    partial.replace(target)


def verify_checksum(path: Path, expected: str) -> str:
    """Return the file's sha256, raising when it differs from the registry's (empty = not pinned)."""
    actual = sha256_of(path)
    if expected and actual != expected:
        raise DataError(f"{path}: sha256 mismatch: expected {expected}, found {actual}. The file is not the "
                        "registered upstream copy (truncated download, or another release); delete it and "
                        "fetch it again from the URL in `hetcomp datasets list`.")
    return actual


def locate_files(spec: DatasetSpec, data_dir: Path, download: bool = True,
                 timeout: float = 20.0) -> tuple[FileSet, list[Path]]:
    """Find (or fetch) the files of a dataset, verified against their checksums.

    Tries each layout in order; the first whose files are all present is used. When none is, the first
    layout is downloaded if ``download`` and the network allow, otherwise a :class:`DataError` says which
    paths were searched, which names are expected, and the upstream URLs.
    """
    for layout in spec.layouts:
        found = [_find(data_dir, spec, remote) for remote in layout.files]
        if all(path is not None for path in found):
            paths = [path for path in found if path is not None]
            for path, remote in zip(paths, layout.files, strict=True):
                verify_checksum(path, remote.sha256)
            return layout, paths

    primary = spec.layouts[0]
    download_error = ""
    if download:
        try:
            paths = []
            for remote in primary.files:
                target = data_dir / spec.folder / remote.name
                if not target.is_file():
                    _download(remote, target, timeout)
                verify_checksum(target, remote.sha256)
                paths.append(target)
            return primary, paths
        except DataError:
            raise
        except OSError as exc:
            download_error = f" Download from upstream failed ({exc.__class__.__name__}: {exc})."
    looked = ", ".join(str(p) for p in _candidates(data_dir, spec, primary.files[0].name))
    expected = "\n".join(f"  {remote.name}  <-  {remote.url}" for remote in primary.files)
    others = "".join(f"\n  or: {' + '.join(r.name for r in layout.files)} ({layout.description})"
                     for layout in spec.layouts[1:])
    raise DataError(
        f"dataset {spec.name!r} not found in data directory {data_dir} (looked for e.g. {looked}).{download_error}\n"
        f"Expected files ({primary.description}):\n{expected}{others}\n"
        f"Put them in {data_dir / spec.folder}/ or point --data-dir / ${DATA_ENV} at a folder that has them.")


def load_registered(name: str, data_dir: str | Path | None = None,
                    download: bool = True) -> tuple[Interactions, list[Path], str]:
    """Parse a registered dataset; returns its interactions, the files read and a combined checksum."""
    spec = get_spec(name)
    layout, paths = locate_files(spec, resolve_data_dir(data_dir), download=download)
    interactions = layout.parser(paths)
    return interactions, paths, combined_checksum(paths)


def combined_checksum(paths: list[Path]) -> str:
    """sha256 of a single file, or the sha256 of the files' sha256s (in order) for a multi-file dataset."""
    sums = [sha256_of(path) for path in paths]
    if len(sums) == 1:
        return sums[0]
    return hashlib.sha256(" ".join(sums).encode()).hexdigest()
