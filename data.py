"""Datasets for TRM: the on-disk format, epochs over augmentation groups, batching, augmentation helpers,
and the settings a run reads its data by (TrainConfig, shared by train.py, evaluate.py and the task files),
with the split of every batch between torchrun processes (Ranks).

A dataset is a set of fixed-length token sequences (inputs and labels, both [N, L]) grouped by puzzle:
every row of a group is one augmentation of the same puzzle. An epoch draws one row per group, in a
random order, as the reference does. Token 0 is padding everywhere and is never a training target.
"""
import argparse
import contextlib
import dataclasses
import functools
import http.client
import importlib
import inspect
import json
import math
import os
import re
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


def shown(value, limit=40):
    """A value from a file or the command line as it goes into a message: quoted, at most limit characters, with
    anything unprintable escaped, so that a binary file or a 10 MB header cannot flood the terminal."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    printable = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text[:limit])
    return f"'{printable[:limit]}" + ("...'" if len(printable) > limit or len(text) > limit else "'")


class SettingsError(ValueError):
    """A setting that cannot work (a flag out of range, an unknown preset): one sentence naming it."""


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
        """The dataset saved in path, checked against its meta.json: a missing, truncated or edited array, or a
        token outside the vocabulary, raises DataError (the caller rebuilds a cache that fails here)."""
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
        for name, top in (("inputs", ds.vocab_size), ("labels", ds.vocab_size), ("puzzle_ids", ds.num_puzzle_ids)):
            if len(ds.inputs) and not 0 <= getattr(ds, name).min() <= getattr(ds, name).max() < top:
                raise DataError(f"{path} has {name} outside 0..{top - 1}")
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
    if demos:
        if ds.demos is None:
            raise DataError("this model reads demonstrations, and its data has none; "
                            "expected ARC data (--task-embedding encoder is for ARC tasks)")
        arrays["demos"], arrays["demo_mask"] = ds.demos.of_rows(ds, rows)
    return {k: torch.from_numpy(v if k.startswith("demo") else v.astype(np.int64)).to(device, non_blocking=True)
            for k, v in arrays.items()}


def eval_rows(ds, limit=None):
    """Rows of the first `limit` groups (test puzzles; an ARC task with all its augmentations), all when None."""
    return int(ds.group_starts[ds.num_groups if limit is None else min(limit, ds.num_groups)])


# ------------------------------------------------------------------------------------------ settings

TASKS = ("sudoku", "maze", "arc")


@dataclass
class TrainConfig:
    task: str = "sudoku"
    preset: str = "auto"                 # paper on CUDA, cpu otherwise; hrm, hrm-paper: HRM at their scales
    preset_note: str = ""                # why this preset: chosen, or the default for this machine
    out: str = ""                        # default out/{task}-{preset}
    # data (each task reads the fields it needs)
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
    # optimisation
    batch_size: int = 768
    micro_batch: int = 0                 # rows per forward/backward, gradients accumulated; 0 = auto
    lr: float = 1e-4
    warmup_steps: int = 2000
    lr_min_ratio: float = 1.0            # cosine decay to lr x this after warmup; 1: constant, as the reference runs
    weight_decay: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    puzzle_emb_lr: float = 1e-4
    puzzle_emb_weight_decay: float = 1.0
    ema: float = 0.999
    epochs: int = 50000
    max_steps: int = 0                   # 0: epochs * train puzzles / batch_size, as the reference counts
    halt_exploration_prob: float = 0.1
    # training-time depth (train.depth_at); evaluation always uses the model's n, T, N_sup
    depth_schedule: str = "fixed"        # fixed, curriculum (CGAR's three stages) or random (per optimizer step)
    curriculum_stages: str = "0.3,0.6"   # fractions of the run where the curriculum's stages 2 and 3 begin
    depth_width: int = 1                 # random: n and T drawn uniformly from value +- width
    random_n_sup: bool = False           # random: draw N_sup as well
    supervision_decay: float = 1.0       # CGAR's loss weight lambda^(k-1) for supervision step k; 1 = off
    # running
    eval_interval: int = 2000            # steps; 0 evaluates only at the end
    eval_limit: int = 1000               # held-out puzzles (arc: tasks) per periodic evaluation, 0 = all
    checkpoint_interval: int = 2000
    log_interval: float = 5.0            # seconds between log lines
    dtype: str = "auto"                  # bfloat16 on CUDA, float32 elsewhere
    compile: str = "auto"                # on for CUDA, off elsewhere
    device: str = "auto"                 # cuda, then mps, then cpu
    threads: int = 0                     # CPU threads, 0 = torch's default
    seed: int = 0
    resume: str = ""                     # a checkpoint path, or "auto" for the newest complete one in --out
    overwrite: bool = False
    skip_nonfinite: int = 0              # steps with a non-finite loss or gradient to skip before stopping
    bench: str = ""                      # time training steps instead: e.g. float32,bfloat16,bfloat16+compile
    bench_steps: int = 5                 # timed steps per variant, after 2 warm-up steps


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a flag it cannot read (--lr abc, an unknown --flag) as one sentence, not the usage text."""

    def error(self, message):
        self.exit(2, f"error: {message}; see --help\n")


# HRM (Wang et al. 2025) as the TRM paper's Table 1 starts from: two 4-layer networks f_L and f_H, n 2, T 2, the
# 1-step gradient, ACT with a continue loss, and no EMA. The paper-scale HRM uses attention with RoPE, as HRM did.
HRM = dict(separate_nets=True, one_step_grad=True, act_continue=True, n_layers=4, n=2, T=2, ema=0.0)


def with_hrm(presets):
    """A task's presets plus `hrm` (HRM at the cpu preset's scale, net and data) and `hrm-paper` (HRM at the paper
    preset's)."""
    return {**presets, "hrm": {**presets["cpu"], **HRM},
            "hrm-paper": {**presets["paper"], **HRM, "mlp_t": False, "rope": True}}


def field_notes(cls):
    """The comment after each field of a config dataclass, for its --help line (% escaped for argparse)."""
    fields = (re.match(r"\s+(\w+): [^#]*#\s*(.+)", line) for line in inspect.getsource(cls).splitlines())
    return {m[1]: m[2].replace("%", "%%") for m in fields if m}


def parse_args(argv, description=None):
    """train.py's command line: every field of TrainConfig and TRMConfig becomes a --flag; only the flags
    actually given are returned, so that a preset fills the rest."""
    from model import TRMConfig
    p = ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for cls in (TrainConfig, TRMConfig):
        notes = field_notes(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            if f.name == "bench":    # a bare --bench compares float32 and bfloat16
                p.add_argument(flag, nargs="?", const="float32,bfloat16", default=argparse.SUPPRESS,
                               help="time training steps of each variant (dtype, +compile) instead of training; "
                                    "a bare --bench is float32,bfloat16")
            elif f.type is bool or f.type == "bool":
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"{notes.get(f.name, '')} (default {f.default})")
            else:
                p.add_argument(flag, type=type(f.default), default=argparse.SUPPRESS,
                               help=f"{notes.get(f.name, '')} (default {f.default})")
    p.add_argument("--n-sup", dest="N_sup", type=int, default=argparse.SUPPRESS,
                   help="supervision steps (default 16)")
    return vars(p.parse_args(argv))


def resolve_config(given):
    """Defaults < task preset < the settings given (a dict of field names). Returns (TrainConfig, TRMConfig)."""
    from model import TRMConfig
    task = given.get("task", TrainConfig.task)
    if task not in TASKS:
        raise SettingsError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    module = importlib.import_module(task)
    preset = given.get("preset", "auto")
    if preset == "auto":
        preset = "paper" if torch.cuda.is_available() else "cpu"
        given = {**given, "preset_note": f"default {'with' if preset == 'paper' else 'without'} CUDA"}
    if preset not in module.PRESETS:
        raise SettingsError(f"unknown preset {preset!r} for {task}; expected one of {', '.join(module.PRESETS)}")
    settings = {**module.PRESETS[preset], **given, "task": task, "preset": preset}
    settings.setdefault("preset_note", "chosen")
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    tcfg = TrainConfig(**{k: v for k, v in settings.items() if k in train_names})
    mcfg = TRMConfig(**{k: v for k, v in settings.items() if k not in train_names})
    check_config(tcfg, mcfg)
    return tcfg, mcfg


def config_from(cls, values, source):
    """cls(**values) for settings read from a file (a checkpoint), with a field this version does not know or a
    value of the wrong type as one sentence naming source."""
    fields = {f.name: type(f.default) for f in dataclasses.fields(cls)}
    if not isinstance(values, dict):
        raise DataError(f"{source} holds no {cls.__name__} settings (a dict expected)")
    for name, value in values.items():
        want = fields.get(name)
        if want is None:
            raise DataError(f"{source} has the setting {shown(name)}, which {cls.__name__} does not have")
        ok = type(value) is want or (want is float and type(value) is int)
        if not ok:
            raise DataError(f"{source} has {name} = {shown(value)} ({type(value).__name__}); expected "
                            f"{want.__name__}")
    return cls(**values)


def check_config(tcfg, mcfg):
    """Settings that cannot work fail here, before any data is built or any file is touched."""
    finite = math.isfinite
    rules = [  # (names, test, what is expected)
        (("n", "T", "N_sup", "batch_size", "d_model", "n_layers", "n_heads", "vocab_size", "seq_len",
          "num_puzzle_ids", "bench_steps"), lambda v: v >= 1, "a whole number of at least 1"),
        (("max_steps", "epochs", "skip_nonfinite", "num_aug", "micro_batch", "threads", "seed", "data_seed",
          "train_puzzles", "test_puzzles", "warmup_steps", "eval_interval", "eval_limit", "checkpoint_interval",
          "puzzle_emb_len", "min_path", "difficulty"), lambda v: v >= 0, "a whole number of at least 0"),
        (("size",), lambda v: 2 <= v <= 30, "a side of 2 to 30 cells (ARC grids are at most 30x30)"),
        # above 1 is a typo (1e4 for 1e-4), and near float32's limit AdamW fails converting its step size
        (("lr", "puzzle_emb_lr"), lambda v: 0 < v <= 1, "a positive learning rate, at most 1"),
        (("expansion", "rope_theta", "rms_eps"), lambda v: finite(v) and v > 0, "a positive number"),
        (("weight_decay", "puzzle_emb_weight_decay", "log_interval"), lambda v: finite(v) and v >= 0,
         "a number of at least 0"),
        (("ema", "beta1", "beta2"), lambda v: 0 <= v < 1, "a rate in [0, 1)"),
        (("lr_min_ratio",), lambda v: 0 <= v <= 1, "a ratio in [0, 1]"),
        (("halt_exploration_prob",), lambda v: 0 <= v <= 1, "a probability in [0, 1]"),
    ]
    for names, test, expected in rules:
        for name in names:
            value = getattr(tcfg, name, getattr(mcfg, name, None))
            if not test(value):
                flag = "--n-sup" if name == "N_sup" else "--" + name.replace("_", "-")
                raise SettingsError(f"{flag} is {value}; expected {expected}")
    if tcfg.train_puzzles and tcfg.batch_size > tcfg.train_puzzles * (tcfg.num_aug + 1):
        raise SettingsError(f"--batch-size {tcfg.batch_size} is larger than the "
                            f"{tcfg.train_puzzles * (tcfg.num_aug + 1)} training rows "
                            f"({tcfg.train_puzzles} puzzles x {tcfg.num_aug + 1} versions)")
    if round(mcfg.expansion * min(mcfg.d_model, mcfg.puzzle_emb_len + mcfg.seq_len) * 2 / 3) < 1:
        raise SettingsError(f"--expansion {mcfg.expansion} leaves the SwiGLU no hidden channels; expected a larger "
                            f"factor (the paper's is 4)")
    if tcfg.resume and tcfg.overwrite:
        raise SettingsError("--resume continues the run in --out and --overwrite replaces it; expected one of them")
    if mcfg.d_model % mcfg.n_heads:
        raise SettingsError(f"--d-model {mcfg.d_model} is not divisible by --n-heads {mcfg.n_heads}")
    if mcfg.rope and not mcfg.mlp_t and mcfg.d_model // mcfg.n_heads % 2:
        raise SettingsError(f"--d-model {mcfg.d_model} over --n-heads {mcfg.n_heads} gives heads of "
                            f"{mcfg.d_model // mcfg.n_heads} channels; RoPE rotates channel pairs, so expected an "
                            f"even head size")
    if not 0 < tcfg.supervision_decay <= 1:
        raise SettingsError(f"--supervision-decay is {tcfg.supervision_decay}; expected a factor in (0, 1]")
    curriculum_stages(tcfg)
    if tcfg.depth_schedule == "random":
        least = min(mcfg.n, mcfg.T, mcfg.N_sup if tcfg.random_n_sup else mcfg.n)
        if least < 2:
            raise SettingsError(f"--depth-schedule random with n {mcfg.n}, T {mcfg.T}: random depth draws n and T "
                                f"from value +- width, so they must be at least 2")
        if not 1 <= tcfg.depth_width < least:
            raise SettingsError(f"--depth-width is {tcfg.depth_width}; random depth draws n and T from value +- width "
                                f"and each must stay at least 1, so expected 1 to {least - 1}")
    for name, value, allowed in (("depth-schedule", tcfg.depth_schedule, ("fixed", "curriculum", "random")),
                                 ("latents", mcfg.latents, ("yz", "single", "multi")),
                                 ("task-embedding", mcfg.task_embedding, ("id", "encoder")),
                                 ("dtype", tcfg.dtype, ("auto", "float32", "bfloat16")),
                                 ("compile", tcfg.compile, ("auto", "on", "off"))):
        if value not in allowed:
            raise SettingsError(f"--{name} is {value!r}; expected {', '.join(allowed[:-1])} or {allowed[-1]}")
    check_variant(tcfg, mcfg)


def check_variant(tcfg, mcfg):
    """The paper's ablation switches combine as its tables do: two nets and the 1-step gradient are about y and z,
    so they need both; multi-scale latents have n features, so n cannot change during training."""
    if mcfg.latents != "yz" and (mcfg.separate_nets or mcfg.one_step_grad):
        raise SettingsError(f"--latents {mcfg.latents} has no separate y to update, so --separate-nets and "
                            f"--one-step-grad do not apply; expected --latents yz with them")
    if mcfg.task_embedding == "encoder" and (tcfg.task != "arc" or mcfg.encoder_layers < 1):
        raise SettingsError(f"--task-embedding encoder with --task {tcfg.task} and --encoder-layers "
                            f"{mcfg.encoder_layers}: the encoder reads ARC demonstrations, so expected --task arc "
                            f"and at least 1 layer")
    if mcfg.latents == "multi" and tcfg.depth_schedule != "fixed":
        raise SettingsError(f"--latents multi keeps n latent features, so n cannot follow --depth-schedule "
                            f"{tcfg.depth_schedule}; expected --depth-schedule fixed")


def curriculum_stages(tcfg):
    """--curriculum-stages as two fractions 0 < a < b < 1."""
    try:
        a, b = (float(v) for v in tcfg.curriculum_stages.split(","))
    except ValueError:
        a = b = -1.0
    if not 0 < a < b < 1:
        raise SettingsError(f"--curriculum-stages is {shown(tcfg.curriculum_stages)}; expected two fractions such as "
                            f"0.3,0.6, where the second and third stages begin")
    return a, b


def fit_to_data(mcfg, ds, fresh):
    """The model config for this data: ARC's puzzle-id count comes from the data (one id per augmented task).
    The encoder keeps a one-row table: its data's ids only find each row's demonstrations."""
    ids = mcfg.task_embedding == "id"
    if ids and ds.num_puzzle_ids > 1 and fresh:
        mcfg = dataclasses.replace(mcfg, num_puzzle_ids=ds.num_puzzle_ids)
    if (mcfg.seq_len != ds.seq_len or mcfg.vocab_size != ds.vocab_size
            or ids and mcfg.num_puzzle_ids < ds.num_puzzle_ids):
        raise DataError(f"the data has sequences of {ds.seq_len} tokens over {ds.vocab_size} symbols and "
                        f"{ds.num_puzzle_ids} puzzle ids, but the model is set for {mcfg.seq_len}, "
                        f"{mcfg.vocab_size} and {mcfg.num_puzzle_ids}")
    return mcfg


def micro_batch_size(tcfg, mcfg, device, world=1):
    """Rows per forward/backward: the whole batch on a GPU; on a CPU few enough that the activations kept for
    the backward pass stay near 6 GB. Measured: about 160 bytes per (net call with gradient) x layer x
    position x width in float32, i.e. 112 MB per row of the paper's Sudoku model (22 GB peak at 168 rows). The
    DemoEncoder adds its layers for each of a row's pairs, padded to the most of any task: 10 in ARC-AGI-1."""
    local = tcfg.batch_size // world
    if tcfg.micro_batch:
        return min(tcfg.micro_batch, local)
    if device.type != "cpu":
        return local
    pairs = 10 * mcfg.encoder_layers if mcfg.task_embedding == "encoder" else 0
    per_row = 160 * ((mcfg.n + 1) * mcfg.n_layers + pairs) * (mcfg.puzzle_emb_len + mcfg.seq_len) * mcfg.d_model
    return max(1, min(local, int(6e9 // per_row)))


# ------------------------------------------------------------------------------ several processes

class Ranks:
    """This process's place among the torchrun processes (rank 0 of 1 without torchrun). Every rank takes an
    equal contiguous share of each global batch (and of the evaluation rows); results are summed or gathered
    so that rank 0 sees the whole."""

    def __init__(self, rank=0, world=1, backend=None):
        self.rank, self.world, self.backend, self.main = rank, world, backend, rank == 0

    @classmethod
    def from_env(cls):
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world == 1:
            return cls()
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), world, dist.get_backend())

    def finish(self):
        """All ranks leave together: a rank that exits while rank 0 still writes its checkpoint and pictures can
        take gloo's threads down with it (an abort, 'terminate called without an active exception')."""
        if self.world > 1:
            import torch.distributed as dist
            dist.barrier()
            dist.destroy_process_group()

    def rows(self, n):
        """This rank's contiguous share of n global rows (equal shares when world divides n)."""
        return slice(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (building cached data, say); the others wait, then run it."""
        import torch.distributed as dist
        if self.world > 1 and not self.main:
            dist.barrier()
        yield
        if self.world > 1 and self.main:
            dist.barrier()

    def sum(self, tensor):
        """tensor summed over the ranks, in place."""
        if self.world > 1:
            import torch.distributed as dist
            dist.all_reduce(tensor)
        return tensor

    def sum_all(self, tensors):
        """Each tensor summed over the ranks in place, all in one all-reduce of their concatenation."""
        flat = self.sum(torch.cat([t.reshape(-1) for t in tensors]))
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def gather_objects(self, obj):
        """Every rank's picklable obj (arrays of predictions, say), in rank order."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather(self, tensor):
        """Every rank's tensor, concatenated along dim 0 in rank order (None, a tensor the run lacks, stays None)."""
        if self.world == 1 or tensor is None:
            return tensor
        import torch.distributed as dist
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)
