"""Puzzles as token rows: the data settings (DataConfig), the dataset format and its caches, the CSV files from the
Hugging Face hub, the dihedral transforms the tasks augment with, epochs over augmentation groups and batching.
Also what every file shares about bad input (DataError, SettingsError, each one sentence, and how a command ends on
one) and long work (Progress).

A dataset is a set of fixed-length token sequences (inputs and labels, both [N, L]) grouped by puzzle:
every row of a group is one augmentation of the same puzzle. An epoch draws one row per group, in a
random order, as the reference does. Token 0 is padding everywhere and is never a training target.
"""
import argparse
import dataclasses
import functools
import http.client
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import numpy as np
import torch

PAD = 0
# Dihedral transforms of a grid: 0 identity, 1 rot90, 2 rot180, 3 rot270, 4 flip left-right,
# 5 flip up-down, 6 transpose, 7 anti-transpose. rot90 and rot270 undo each other; the rest are involutions.
DIHEDRAL_INVERSE = (0, 3, 2, 1, 4, 5, 6, 7)


# ------------------------------------------------------------------------------ bad input, in one sentence

class DataError(ValueError):
    """Bad input data: the message is one sentence naming the file, row or value and what was expected."""


class SettingsError(ValueError):
    """A setting that cannot work (a flag out of range, an unknown preset): one sentence naming it."""


def shown(value, limit=40):
    """A value from a file or the command line as it goes into a message: quoted, at most limit characters, with
    anything unprintable escaped, so that a binary file or a 10 MB header cannot flood the terminal."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    printable = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text[:limit])
    return f"'{printable[:limit]}" + ("...'" if len(printable) > limit or len(text) > limit else "'")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a flag it cannot read (--lr abc, an unknown --flag) as one sentence, not the usage text."""

    def error(self, message):
        self.exit(2, f"error: {message}; see --help\n")


def one_sentence_on_failure(main, memory_settings, expected=()):
    """main(), with every failure a user can mend ending in one sentence on stderr and a non-zero exit (2; 130
    for Ctrl-C; an exception with an exit_code attribute, its own) instead of a traceback. A RuntimeError that is
    not out of memory is a bug and keeps its traceback."""
    try:
        return main()
    except (DataError, SettingsError, *expected) as e:
        code = getattr(e, "exit_code", 2)
        message = f"error: {e}" if code == 2 else str(e)
    except OSError as e:              # a full disk while writing, say
        code, message = 2, f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}"
    except KeyboardInterrupt:
        code, message = 130, ("error: interrupted at once; the work in flight was abandoned, and the files "
                              "already written are intact")
    except (MemoryError, RuntimeError) as e:
        text = str(e).strip().splitlines()[-1] if str(e).strip() else ""
        if not (isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "allocate" in text):
            raise
        code, message = 2, (f"error: out of memory ({shown(text, 100)}); expected smaller settings: "
                            f"{memory_settings}")
    print(message, file=sys.stderr)
    sys.exit(code)


# ------------------------------------------------------------------------------------- long work

def format_time(seconds):
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Prints "what: done/total, rate, ETA" at most every `every` seconds, so that long work is never silent."""
    every = 5.0

    def __init__(self, what, total):
        self.what, self.total, self.start = what, total, time.time()
        self.last = self.start

    def __call__(self, done):
        now = time.time()
        if now - self.last >= self.every and 0 < done < self.total:
            rate = done / (now - self.start)
            print(f"{self.what}: {done:,}/{self.total:,} ({rate:,.{1 if rate < 10 else 0}f}/s), "
                  f"ETA {format_time((self.total - done) / rate)}", flush=True)
            self.last = now


# ------------------------------------------------------------------------------------- data settings

TASKS = ("sudoku", "maze", "arc")


@dataclass
class DataConfig:
    """What a task builds its data from. train.py's TrainConfig holds these among the run's settings, and a
    checkpoint keeps them, so that evaluate.py rebuilds the same held-out puzzles."""
    task: str = "sudoku"                 # sudoku, maze or arc
    data: str = "generate"               # generate, hub, a local CSV file / folder; arc: arcagi1, kaggle2025, a folder
    train_puzzles: int = 1000            # arc: training tasks (the smallest), 0 = all
    test_puzzles: int = 1000             # arc: evaluation tasks (the smallest), 0 = all
    num_aug: int = 1000                  # augmentations per training puzzle
    min_blanks: int = 40                 # sudoku generator
    max_blanks: int = 58                 # random removal of givens rarely gets past 60 blanks
    difficulty: int = 0                  # sudoku generator: least solver effort (guesses) a puzzle needs
    size: int = 30                       # maze side; arc: canvas side
    min_path: int = 0                    # maze generator: shortest path length, 0 = scaled to the size
    extra: str = ""                      # arc: more training tasks (task folders or Kaggle files, comma-separated)
    data_seed: int = 0

    @classmethod
    def of(cls, settings):
        """The data settings among a dict of settings (a checkpoint's train_config, say)."""
        return cls(**{f.name: settings[f.name] for f in dataclasses.fields(cls) if f.name in settings})


# ------------------------------------------------------------------------------------------ dihedral

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
    demos: object = None      # ARC: the tasks' demonstrations for the DemoEncoder (arc.Demonstrations), not saved
    source: str = None        # the cache folder it was loaded from, for messages

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
        """The dataset saved in path, checked against its meta.json: a missing, truncated or reshaped array raises
        DataError (the caller rebuilds a cache that fails here). The tokens are not scanned here, which would read
        gigabytes at every start for ARC: `to_device` checks each batch's."""
        meta_path = os.path.join(path, "meta.json")
        if not os.path.exists(meta_path):
            raise DataError(f"{path} holds no finished dataset (meta.json is missing)")
        try:
            with open(meta_path) as f:
                meta = json.load(f)
            # Tokens stay on disk and are read per batch: ARC-AGI-1 with 1000 augmentations holds gigabytes.
            arrays = {name: np.load(os.path.join(path, name + ".npy"),
                                    mmap_mode="r" if name in ("inputs", "labels") else None)
                      for name in ("inputs", "labels", "puzzle_ids", "group_starts")}
            ds = cls(vocab_size=meta["vocab_size"], num_puzzle_ids=meta["num_puzzle_ids"], **arrays)
            expected = (meta["rows"], meta["seq_len"], meta["groups"])
        except (OSError, ValueError, EOFError, KeyError, TypeError) as e:
            why = str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e}"
            raise DataError(f"{path} could not be read ({shown(why, 200)})") from None
        if (len(ds.inputs), ds.seq_len, ds.num_groups) != expected:
            raise DataError(f"{path} holds {len(ds.inputs)} rows of {ds.seq_len} tokens in {ds.num_groups} groups; "
                            f"its meta.json says {expected[0]}, {expected[1]} and {expected[2]}")
        if len(ds.inputs) and not 0 <= ds.puzzle_ids.min() <= ds.puzzle_ids.max() < ds.num_puzzle_ids:
            raise DataError(f"{path} has puzzle_ids outside 0..{ds.num_puzzle_ids - 1}")
        ds.source = path
        return ds


def cached(folder, build):
    """The dataset saved in folder, built by build() and saved there first if it is not there or is damaged."""
    if os.path.exists(os.path.join(folder, "meta.json")):
        try:
            return Dataset.load(folder)
        except DataError as e:
            print(f"rebuilding the data cache {folder}: {e}")
            shutil.rmtree(folder)
    ds = build()
    ds.save(folder)
    print(f"built {folder}: {len(ds.inputs)} rows in {ds.num_groups} groups")
    return Dataset.load(folder)


def source_key(data, split, cache_dir):
    """The part of a cache name that says which CSV a split was read from: for a file, its name, size and
    modification time (ns). Any edit or replacement changes the time; hashing the content instead would read the
    3.8M rows of Sudoku-Extreme's train.csv at every start. --data hub and auto name the downloaded file (or
    'none', when auto falls back to generated puzzles); generate names nothing."""
    if data in ("hub", "auto"):
        file = os.path.join(os.path.expanduser(cache_dir), f"{split}.csv")
    elif os.path.exists(data):
        file = os.path.join(data, f"{split}.csv") if os.path.isdir(data) else data
    else:
        return data
    if not os.path.isfile(file):
        return f"{data}-none"
    st = os.stat(file)
    return f"{os.path.basename(file)}-{st.st_size}-{st.st_mtime_ns}"


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


def held_out_splits(dcfg, name, load, generate):
    """{"train": (questions, answers, source), "test": ...} from --data: a local CSV folder (train.csv, test.csv) or
    file, "hub", "generate", or "auto" (the real set from the cache or hub, else generated puzzles, saying so). The
    test split is held out by construction: a single CSV file serves both splits split apart (a seeded draw of
    --test-puzzles rows is held out, a tenth when that is 0 = all, and training takes the rest), and a test puzzle
    whose question is also a training puzzle's is removed with a note. A count below a split's size takes a
    seeded random subset, as the reference samples its 1000 training puzzles."""
    if os.path.isfile(dcfg.data):
        q, a = load("train", dcfg.data)
        test_count = dcfg.test_puzzles or max(1, len(q) // 10)
        if test_count >= len(q):
            raise DataError(f"--data {dcfg.data} holds {len(q)} puzzles, too few to hold out {test_count} and train "
                            f"on the rest; expected a smaller --test-puzzles or a folder with train.csv and test.csv")
        order = np.random.default_rng(dcfg.data_seed).permutation(len(q))
        test, train = np.sort(order[:test_count]), np.sort(order[test_count:])
        print(f"--data {dcfg.data} serves both splits: {test_count} of its {len(q)} puzzles, drawn with --data-seed "
              f"{dcfg.data_seed}, are held out for testing and the other {len(train)} are for training")
        splits = {"train": subset(q[train], a[train], dcfg.train_puzzles, dcfg.data_seed) + (dcfg.data,),
                  "test": (q[test], a[test], dcfg.data)}
    else:
        splits = {split: real_or_generated(dcfg, split, name, load, generate) for split in ("train", "test")}
    q, a, source = splits["test"]
    trained = {row.tobytes() for row in splits["train"][0]}
    again = np.array([row.tobytes() in trained for row in q], bool)
    if again.all():
        raise DataError(f"every one of the {len(q)} held-out puzzles of {source} is also a training puzzle; expected "
                        f"test puzzles the model does not train on")
    if again.any():
        print(f"removed {again.sum()} of the {len(q)} held-out puzzles of {source} whose question is also a training "
              f"puzzle's, so that the held-out set is held out")
        splits["test"] = (q[~again], a[~again], source)
    return splits


def subset(q, a, count, seed):
    """A seeded random subset of count puzzles, in their order (all of them when count is 0 or more than there are)."""
    if not count or count >= len(q):
        return q, a
    keep = np.sort(np.random.default_rng(seed).choice(len(q), count, replace=False))
    return q[keep], a[keep]


def real_or_generated(dcfg, split, name, load, generate):
    """(inputs, answers, source) of one split from a CSV folder, the hub or the generator (held_out_splits)."""
    count = dcfg.train_puzzles if split == "train" else dcfg.test_puzzles
    if dcfg.data in ("hub", "auto") or os.path.isdir(dcfg.data):
        try:
            q, a = load(split, None if dcfg.data in ("hub", "auto") else dcfg.data)
        except DataError as e:
            if dcfg.data != "auto":
                raise
            print(f"{name} is not available ({e}); using generated puzzles instead")
        else:
            return (*subset(q, a, count, dcfg.data_seed), dcfg.data if os.path.isdir(dcfg.data) else name)
    elif os.path.exists(dcfg.data):
        raise DataError(f"--data {shown(dcfg.data, 200)} is neither a regular file nor a folder; expected a CSV file "
                        f"or a folder with train.csv and test.csv")
    elif dcfg.data != "generate":
        raise DataError(f"--data {shown(dcfg.data, 200)} is neither generate, hub, auto nor an existing CSV file or "
                        f"folder")
    # Different seeds keep the held-out puzzles apart from the training puzzles.
    q, a = generate(count or 1000, seed=dcfg.data_seed * 2 + (split == "test"))
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

    def __init__(self, ds, batch_size, seed, device, part=slice(None), demos=False):
        if not 1 <= batch_size <= len(ds.inputs):
            raise DataError(f"batch size {batch_size} does not fit a dataset of {len(ds.inputs)} rows; "
                            f"expected 1 to {len(ds.inputs)}")
        self.ds, self.batch_size, self.seed, self.device = ds, batch_size, seed, device
        self.part = part    # this process's share of every global batch
        self.demos = demos  # batches bring each row's demonstrations (the DemoEncoder reads them)
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
        return to_device(self.ds, np.concatenate(take)[self.part], self.device, self.demos)


def to_device(ds, rows, device, demos=False):
    """A batch as tensors: inputs/labels [B, L] int64, puzzle_ids [B] int64; with demos, each row's
    demonstrations (arc.Demonstrations): demos [B, M, 2, L] uint8 (a tenth of a paper-scale batch's memory as
    int64; the encoder widens them) and demo_mask [B, M] bool."""
    arrays = dict(inputs=ds.inputs[rows], labels=ds.labels[rows], puzzle_ids=ds.puzzle_ids[rows])
    for name in ("inputs", "labels"):
        if len(rows) and arrays[name].max() >= ds.vocab_size:      # uint8: never below 0
            raise DataError(f"{ds.source or 'the data'} has {name} tokens outside 0..{ds.vocab_size - 1}; expected "
                            f"a cache as it was built (delete the folder to build it afresh)")
    if demos:
        if ds.demos is None:
            raise DataError("this model reads demonstrations, and its data has none; "
                            "expected ARC data (--task-embedding encoder is for ARC tasks)")
        arrays["demos"], arrays["demo_mask"] = ds.demos.of_rows(ds, rows)
    return {k: torch.from_numpy(v if k.startswith("demo") else v.astype(np.int64)).to(device, non_blocking=True)
            for k, v in arrays.items()}


def count_rows(ds, groups=None):
    """How many rows the first `groups` groups hold (test puzzles; an ARC task with all its augmentations), all
    when None."""
    return int(ds.group_starts[ds.num_groups if groups is None else min(groups, ds.num_groups)])


