"""Hugging Face datasets as data sources: rows of local data files, `save_to_disk` dirs and Hub datasets.

An entry of data.train / data.val is a dataset source when it is
  - a data file: .parquet, .arrow, .csv or .json (a glob or a directory of them too); a single split, used whole
  - a `Dataset.save_to_disk` / `DatasetDict.save_to_disk` directory (state.json / dataset_dict.json inside)
  - "hf:owner/name": a Hub dataset, resolved to its snapshot in the local Hugging Face cache (downloaded first
    when online; with HF_HUB_OFFLINE=1 only the cache is used, and a dataset not in it is a DataError saying how
    to fetch it).
`data.dataset` picks the split (`split` for data.train, `val_split` for data.val) and the subset (the dataset's
configuration, datasets' `name`) where a source has several. Rows are streamed by default (`streaming`): nothing
is converted to Arrow first and memory stays bounded, which is all the tokenize-once caches need (they read
every row once, in order). The `datasets` package is an optional extra, imported only when a source is read.

A source's fingerprint (what the token caches key on) is its kind, split, subset, Hub commit and the
path/size/mtime of its files (stat, not content, as for text files): changing any rebuilds the cache.
`iter_source_rows` yields (row dict, "where" label) from a .jsonl file or a dataset source alike: the one row
reader for SFT and preference builders.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from engine.config import DataConfig
from engine.data.cache import fingerprint
from engine.data.documents import DataError, expand_paths, iter_jsonl, split_blocks

logger = logging.getLogger("engine.data.hf_datasets")
__all__ = ["DatasetSource", "expand_sources", "iter_source_rows", "source_fingerprint"]

HUB_PREFIX = "hf:"
BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".csv": "csv", ".json": "json"}  # suffix -> datasets builder
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes at the top of its dir
INSTALL = 'pip install -e ".[datasets]"'


def _datasets():
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading a Hugging Face dataset needs the datasets package: {INSTALL}") from None
    datasets.logging.set_verbosity_warning()
    datasets.disable_progress_bars()  # ours is the only progress bar
    return datasets


@dataclass(frozen=True)
class DatasetSource:
    """One dataset split to read rows from; `spec` is what the config said, `path` the file/dir/snapshot read."""

    spec: str
    kind: str  # "file" (one data file), "disk" (a save_to_disk dir) or "hub" (a Hub snapshot dir)
    path: Path
    split: str  # "train" for a data file or a saved single Dataset: they have no other
    subset: Optional[str] = None
    streaming: bool = True

    def __str__(self) -> str:
        return f"{self.spec}[{self.split}]" if self.kind != "file" else self.spec

    def fingerprint(self) -> list:
        files = [self.path] if self.path.is_file() else sorted(p for p in self.path.rglob("*") if p.is_file())
        commit = self.path.name if self.kind == "hub" else None  # a snapshot dir is named by its commit
        return [self.spec, self.kind, self.split, self.subset, commit, fingerprint(files)]

    def open(self):
        """The split as a datasets (Iterable)Dataset; a missing split or subset is a DataError listing those there."""
        datasets = _datasets()
        try:
            if self.kind == "disk":
                saved = datasets.load_from_disk(str(self.path))
                splits = saved if isinstance(saved, datasets.DatasetDict) else {"train": saved}
            elif self.kind == "file":
                splits = datasets.load_dataset(BUILDERS[self.path.suffix.lower()], data_files=str(self.path),
                                               streaming=self.streaming)
            else:
                splits = datasets.load_dataset(str(self.path), name=self.subset, streaming=self.streaming)
        except DataError:
            raise
        except Exception as e:  # a bad file, an unknown subset ("BuilderConfig 'x' not found. Available: [...]")
            what = f"subset {self.subset!r}: " if self.subset and "BuilderConfig" in str(e) else ""
            raise DataError(f"{self.spec}: {what}cannot be read as a dataset ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
        if self.split not in splits:
            raise DataError(f"{self.spec}: no split {self.split!r}; its splits: {', '.join(splits)} (set "
                            "data.dataset.split / data.dataset.val_split)")
        return splits[self.split]

    def rows(self):
        """Yield (row dict, "spec[split]:index") in the dataset's order."""
        for i, row in enumerate(self.open()):
            yield row, f"{self}:{i}"


def names_dataset(pattern: str) -> bool:
    """Whether a data.train / data.val entry names a dataset source (by prefix, suffix or save_to_disk markers)."""
    path = Path(os.path.expanduser(pattern))
    return pattern.startswith(HUB_PREFIX) or path.suffix.lower() in BUILDERS or _is_saved_dir(path)


def _is_saved_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in SAVED_MARKERS)


def _hub_snapshot(repo_id: str) -> Path:
    """The local snapshot dir of Hub dataset `repo_id`: from the cache offline, else downloaded (and cached)."""
    from huggingface_hub import snapshot_download

    from engine.model.hf_format import _hub_unreachable  # the model resolver's reachability probe, shared

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    kwargs = dict(repo_type="dataset", cache_dir=os.environ.get("HF_HUB_CACHE"), endpoint=endpoint)
    why = None if offline else _hub_unreachable(endpoint)
    if offline or why:
        try:
            return Path(snapshot_download(repo_id, local_files_only=True, **kwargs))
        except Exception:
            reason = "HF_HUB_OFFLINE=1 is set" if offline else f"the hub at {endpoint} is unreachable ({why})"
            raise DataError(f"{HUB_PREFIX}{repo_id}: dataset not in the local Hugging Face cache and {reason}; fetch "
                            f"it once while online: hf download --repo-type dataset {repo_id}") from None
    try:
        return Path(snapshot_download(repo_id, **kwargs))
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise DataError(f"{HUB_PREFIX}{repo_id}: could not be fetched from the Hugging Face hub ({type(e).__name__}: "
                        f"{first}); with HF_HUB_OFFLINE=1 the cache is used") from None


def expand_sources(patterns, where: str, data: DataConfig, split: Optional[str] = None) -> list:
    """Paths (text/.jsonl files, as engine.data.documents.expand_paths) and DatasetSources for `patterns`.
    `split` defaults to data.dataset.split; data.val passes data.dataset.val_split."""
    opts = data.dataset
    split = opts.split if split is None else split
    out = []
    for pattern in patterns:
        path = Path(os.path.expanduser(pattern))
        if pattern.startswith(HUB_PREFIX):
            repo_id = pattern[len(HUB_PREFIX):]
            if repo_id.count("/") > 1 or not repo_id.strip("/"):
                raise DataError(f"{where}: {pattern!r}: expected hf:<dataset id>, e.g. hf:tatsu-lab/alpaca")
            out.append(DatasetSource(pattern, "hub", _hub_snapshot(repo_id), split, opts.subset, opts.streaming))
        elif _is_saved_dir(path):
            out.append(DatasetSource(pattern, "disk", path.resolve(), split, None, opts.streaming))
        else:
            for f in expand_paths([pattern], where):
                if f.suffix.lower() in BUILDERS:
                    # a data file holds one split ("train" to datasets): whichever split is asked for, it is the data
                    out.append(DatasetSource(str(f), "file", f, "train", None, opts.streaming))
                else:
                    out.append(f)
    return list(dict.fromkeys(out))


def source_fingerprint(sources) -> list:
    """The cache-key entry of expand_sources' result: stat fingerprints of files, DatasetSource.fingerprint()."""
    return [s.fingerprint() if isinstance(s, DatasetSource) else fingerprint([s])[0] for s in sources]


def source_bytes(source) -> int:
    """Bytes a progress bar counts for a source: a file's size; 0 for a dataset (its rows report no bytes)."""
    return 0 if isinstance(source, DatasetSource) else source.stat().st_size


def iter_source_rows(source):
    """Yield (row, "where") from a .jsonl file (JSON per line, "file:line") or a DatasetSource ("spec[split]:i")."""
    if isinstance(source, DatasetSource):
        yield from source.rows()
        return
    for record, where, _ in iter_jsonl(source):
        yield record, where


def _columns(dataset, row: dict) -> str:
    return ", ".join(getattr(dataset, "column_names", None) or row) or "none"


def iter_dataset_pieces(source: DatasetSource, text_field: str, max_chars: Optional[int]):
    """documents.iter_pieces for a dataset: (piece, where, 0, ends_document) for the `text_field` column of each
    row, a row being one document; a missing column is a DataError listing the columns there are."""
    dataset = source.open()
    for i, row in enumerate(dataset):
        where = f"{source}:{i}"
        if text_field not in row:
            raise DataError(f"{source}: no column {text_field!r} (data.text_field); its columns: "
                            f"{_columns(dataset, row)}")
        text = row[text_field]
        if not isinstance(text, str):
            raise DataError(f"{where}: {text_field!r}: expected a string, got {type(text).__name__}")
        pieces = list(split_blocks([(text, 0)], max_chars))
        for k, (piece, _) in enumerate(pieces):
            yield piece, where, 0, k == len(pieces) - 1


def check_text_column(sources, text_field: str) -> None:
    """Before anything is written: every dataset source has the `text_field` column (DataError listing them)."""
    for source in sources:
        if isinstance(source, DatasetSource):
            dataset = source.open()
            row = next(iter(dataset), None)
            if row is None:
                raise DataError(f"{source}: the split has no rows")
            if text_field not in row:
                raise DataError(f"{source}: no column {text_field!r} (data.text_field); its columns: "
                                f"{_columns(dataset, row)}")
