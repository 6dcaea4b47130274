"""Datasets for TRM: the on-disk format, epochs over augmentation groups, batching, augmentation helpers.

A dataset is a set of fixed-length token sequences (inputs and labels, both [N, L]) grouped by puzzle:
every row of a group is one augmentation of the same puzzle. An epoch draws one row per group, in a
random order, as the reference does. Token 0 is padding everywhere and is never a training target.
"""
import functools
import http.client
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
import torch

PAD = 0
# Dihedral transforms of a grid: 0 identity, 1 rot90, 2 rot180, 3 rot270, 4 flip left-right,
# 5 flip up-down, 6 transpose, 7 anti-transpose. rot90 and rot270 undo each other; the rest are involutions.
DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)


class DataError(ValueError):
    """Bad input data: the message is one sentence naming the file, row or value and what was expected."""


def dihedral(grid, k):
    """Apply dihedral transform k to the last two axes of a numpy array [..., H, W]."""
    if k == 0:
        return grid
    if k in (1, 2, 3):
        return np.rot90(grid, k, axes=(-2, -1))
    if k == 4:
        return grid[..., :, ::-1]
    if k == 5:
        return grid[..., ::-1, :]
    if k == 6:
        return np.swapaxes(grid, -1, -2)
    if k == 7:
        return np.rot90(np.swapaxes(grid, -1, -2), 2, axes=(-2, -1))
    raise ValueError(f"dihedral transform {k} is not one of 0-7")


def inverse_dihedral(grid, k):
    return dihedral(grid, DIHEDRAL_INVERSE[k])


def permute_tokens(tokens, perm):
    """Relabel tokens through a lookup table: tokens t becomes perm[t] (colour or digit permutation)."""
    return np.asarray(perm, dtype=tokens.dtype)[tokens]


@dataclass
class Dataset:
    inputs: np.ndarray        # [N, L] uint8 tokens
    labels: np.ndarray        # [N, L] uint8 tokens, PAD where there is nothing to predict
    puzzle_ids: np.ndarray    # [N] int32, row of the puzzle-embedding table (0 for tasks with one shared id)
    group_starts: np.ndarray  # [G + 1] int64, rows group_starts[g]:group_starts[g+1] are augmentations of puzzle g
    vocab_size: int
    num_puzzle_ids: int

    def __post_init__(self):
        n, L = self.inputs.shape
        if self.labels.shape != (n, L) or self.puzzle_ids.shape != (n,):
            raise DataError(f"dataset arrays disagree: inputs {self.inputs.shape}, labels {self.labels.shape}, "
                            f"puzzle_ids {self.puzzle_ids.shape}; expected [N, L], [N, L] and [N]")
        if self.group_starts[0] != 0 or self.group_starts[-1] != n or np.any(np.diff(self.group_starts) <= 0):
            raise DataError(f"dataset groups do not tile its {n} rows; expected increasing offsets from 0 to {n}")

    @classmethod
    def grouped(cls, inputs, labels, versions, vocab_size):
        """Consecutive runs of `versions` rows are augmentations of one puzzle; one shared puzzle id."""
        n = len(inputs)
        return cls(inputs, labels, np.zeros(n, np.int32), np.arange(0, n + 1, versions, dtype=np.int64), vocab_size, 1)

    @classmethod
    def ungrouped(cls, inputs, labels, vocab_size):
        """One row per puzzle, one shared puzzle id: test sets, and tasks with no puzzle-id embedding."""
        n = len(inputs)
        return cls(inputs, labels, np.zeros(n, np.int32), np.arange(n + 1, dtype=np.int64), vocab_size, 1)

    @functools.cached_property
    def puzzle_starts(self):
        """[P + 1] row offsets of the puzzles: runs of rows sharing a puzzle id inside a group (an augmented ARC
        task and its examples), or single rows when the dataset has one shared id (Sudoku, maze). Computed once:
        an ARC epoch is only a few batches."""
        if self.num_puzzle_ids == 1:
            return np.arange(len(self.inputs) + 1, dtype=np.int64)
        change = np.flatnonzero(np.diff(self.puzzle_ids) != 0) + 1
        return np.unique(np.r_[change, self.group_starts]).astype(np.int64)

    @property
    def seq_len(self):
        return self.inputs.shape[1]

    @property
    def num_groups(self):
        return len(self.group_starts) - 1

    def save(self, path):
        """Write the arrays and a meta.json into the folder path; meta.json is written last, so a folder
        without it is an unfinished build."""
        os.makedirs(path, exist_ok=True)
        for name in ("inputs", "labels", "puzzle_ids", "group_starts"):
            np.save(os.path.join(path, name + ".npy"), getattr(self, name))
        meta = dict(vocab_size=self.vocab_size, num_puzzle_ids=self.num_puzzle_ids,
                    rows=len(self.inputs), seq_len=self.seq_len, groups=self.num_groups)
        with open(os.path.join(path, "meta.json.tmp"), "w") as f:
            json.dump(meta, f)
        os.replace(os.path.join(path, "meta.json.tmp"), os.path.join(path, "meta.json"))

    @classmethod
    def load(cls, path):
        meta_path = os.path.join(path, "meta.json")
        if not os.path.exists(meta_path):
            raise DataError(f"{path} holds no finished dataset (meta.json is missing)")
        with open(meta_path) as f:
            meta = json.load(f)
        # Tokens stay on disk and are read per batch: ARC-AGI-1 with 1000 augmentations holds gigabytes of them.
        arrays = {name: np.load(os.path.join(path, name + ".npy"), mmap_mode="r" if name in ("inputs", "labels") else None)
                  for name in ("inputs", "labels", "puzzle_ids", "group_starts")}
        return cls(vocab_size=meta["vocab_size"], num_puzzle_ids=meta["num_puzzle_ids"], **arrays)


def cached(folder, build):
    """The dataset saved in folder, built by build() and saved there first if it is not."""
    if not os.path.exists(os.path.join(folder, "meta.json")):
        ds = build()
        ds.save(folder)
        print(f"built {folder}: {len(ds.inputs)} rows in {ds.num_groups} groups")
    return Dataset.load(folder)


def cached_splits(task, splits, key, build):
    """(train, test): each split asked for comes from data/{task}/{key(split)}, built by build(split) there
    first if absent; a split not asked for is None."""
    return tuple(cached(os.path.join("data", task, key(split).replace(os.sep, "_")), lambda: build(split))
                 if split in splits else None for split in ("train", "test"))


# ------------------------------------------------------------------------------ data from the hub

def download(url, dest):
    """Fetch url to dest through a temporary file, so an interrupted download never looks finished."""
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=30) as r:
            print(f"downloading {url} to {dest}")
            shutil.copyfileobj(r, f, 1 << 20)
            size = r.headers.get("Content-Length")
            # http.client returns a short body without raising when the connection drops
            if size is not None and f.tell() != int(size):
                raise OSError(f"the connection closed after {f.tell()} of {size} bytes")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def hub_csv(name, split, path, cache_dir, url, read_csv):
    """read_csv of a split's CSV: from path (a file, or a folder holding {split}.csv), else from cache_dir,
    else downloaded from the Hugging Face hub (url has a {split} field) into cache_dir."""
    if split not in ("train", "test"):
        raise DataError(f"{name} has no split {split!r}; expected 'train' or 'test'")
    if path is not None:
        return read_csv(os.path.join(path, f"{split}.csv") if os.path.isdir(path) else path)
    file = os.path.join(os.path.expanduser(cache_dir), f"{split}.csv")
    if not os.path.isfile(file):
        url = url.format(split=split)
        try:
            download(url, file)
        except (OSError, http.client.HTTPException) as e:   # every failure to fetch ends in the same advice
            reason = f"HTTP {e.code}" if isinstance(e, urllib.error.HTTPError) else getattr(e, "reason", None) or e
            raise DataError(f"{name} {split}.csv was not found locally ({file}) and {url} could not be downloaded "
                            f"({reason}); pass a local file or folder with --data PATH") from None
    return read_csv(file)


def real_or_generated(tcfg, split, name, load, generate):
    """(inputs, answers, source) of a split from --data: a local CSV path, "hub", "generate", or "auto" (the
    real set from the cache or hub, else generated puzzles, saying so). A puzzle count below the file's size
    takes a seeded random subset, as the reference samples its 1000 training puzzles."""
    count = tcfg.train_puzzles if split == "train" else tcfg.test_puzzles
    if tcfg.data in ("hub", "auto") or os.path.exists(tcfg.data):
        try:
            q, a, _ = load(split, None if tcfg.data in ("hub", "auto") else tcfg.data)
        except DataError as e:
            if tcfg.data != "auto":
                raise
            print(f"{name} is not available ({e}); using generated puzzles instead")
        else:
            if count and count < len(q):
                keep = np.sort(np.random.default_rng(tcfg.data_seed).choice(len(q), count, replace=False))
                q, a = q[keep], a[keep]
            return q, a, name
    elif tcfg.data != "generate":
        raise DataError(f"--data {tcfg.data!r} is neither generate, hub, auto nor an existing CSV file or folder")
    # Different seeds keep the held-out puzzles apart from the training puzzles.
    q, a, _ = generate(count or 1000, seed=tcfg.data_seed * 2 + (split == "test"))
    return q, a, "generated"


# ------------------------------------------------------------------------------------------ batching

def epoch_rows(ds, seed, epoch):
    """The rows of one epoch, as the reference draws them: one random puzzle of every group with all its rows,
    groups in random order. Depends only on (seed, epoch), so a resumed run replays the same order."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(ds.num_groups)
    starts = ds.puzzle_starts
    first = np.searchsorted(starts, ds.group_starts)                 # [G + 1] first puzzle of every group
    count = np.diff(first)[order]
    puzzle = first[order] + (rng.random(len(order)) * count).astype(np.int64)
    lo, hi = starts[puzzle], starts[puzzle + 1]
    # concatenated ranges lo[i]:hi[i] without a Python loop
    sizes = hi - lo
    return np.repeat(lo - np.r_[0, np.cumsum(sizes)[:-1]], sizes) + np.arange(sizes.sum())


def rows_per_epoch(ds):
    """Expected rows of an epoch (the mean puzzle size of each group, summed): epochs x this / batch size is the
    reference's step count."""
    starts = ds.puzzle_starts
    puzzles = np.diff(np.searchsorted(starts, ds.group_starts))
    return float((np.diff(ds.group_starts) / puzzles).sum())


class Batches:
    """An endless stream of training batches that crosses epoch boundaries. Its whole state is
    (epoch, position), so it resumes exactly from a checkpoint."""

    def __init__(self, ds, batch_size, seed, device, part=slice(None)):
        if not 1 <= batch_size <= len(ds.inputs):
            raise DataError(f"batch size {batch_size} does not fit a dataset of {len(ds.inputs)} rows; "
                            f"expected 1 to {len(ds.inputs)}")
        self.ds, self.batch_size, self.seed, self.device = ds, batch_size, seed, device
        self.part = part    # this process's share of every global batch
        self.epoch, self.pos = 0, 0
        self._rows = epoch_rows(ds, seed, 0)

    def state_dict(self):
        return dict(epoch=self.epoch, pos=self.pos)

    def load_state_dict(self, state):
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._rows = epoch_rows(self.ds, self.seed, self.epoch)

    @property
    def epochs_done(self):
        return self.epoch + self.pos / len(self._rows)

    def __next__(self):
        take = []
        need = self.batch_size
        while need > 0:
            chunk = self._rows[self.pos:self.pos + need]
            take.append(chunk)
            need -= len(chunk)
            self.pos += len(chunk)
            if self.pos == len(self._rows):
                self.epoch, self.pos = self.epoch + 1, 0
                self._rows = epoch_rows(self.ds, self.seed, self.epoch)
        return to_device(self.ds, np.concatenate(take)[self.part], self.device)


def to_device(ds, rows, device):
    """A batch as tensors: inputs/labels [B, L] int64, puzzle_ids [B] int64."""
    return dict(
        inputs=torch.from_numpy(ds.inputs[rows].astype(np.int64)).to(device, non_blocking=True),
        labels=torch.from_numpy(ds.labels[rows].astype(np.int64)).to(device, non_blocking=True),
        puzzle_ids=torch.from_numpy(ds.puzzle_ids[rows].astype(np.int64)).to(device, non_blocking=True),
    )


def eval_rows(ds, limit=None):
    """Rows of the first `limit` groups (test puzzles; an ARC task with all its augmentations), all when None."""
    return int(ds.group_starts[ds.num_groups if limit is None else min(limit, ds.num_groups)])
