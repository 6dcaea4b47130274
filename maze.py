"""Maze-Hard: 30x30 mazes whose label is the shortest path from S to G (Hugging Face dataset
sapientinc/maze-30x30-hard-1k), a generator of similar mazes that needs no download, a path checker,
dihedral augmentation and a picture of a prediction.

A maze is a row-major string over CHARSET: '#' wall, ' ' open, 'S' start, 'G' goal, and in the answer
'o' on the cells of the shortest path between S and G. Tokens are the CHARSET index plus 1 (0 is padding).
Path lengths count cells, S and G included (S next to G is a path of 2); ratings from generate() use
the same convention.
"""
import csv
import functools
import math
import os

import numpy as np

from data import (PAD, Dataset, DataError, Progress, SettingsError, cached_splits, dihedral, held_out_splits,
                  hub_csv, shown, source_key)

CHARSET = "# SGo"
WALL, OPEN, START, GOAL, PATH = 1, 2, 3, 4, 5
VOCAB_SIZE = len(CHARSET) + 1
HEADER = ["source", "question", "answer", "rating"]
HUB_URL = "https://huggingface.co/datasets/sapientinc/maze-30x30-hard-1k/resolve/main/{split}.csv"
CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "trm", "maze-30x30-hard-1k")

# character code -> token, PAD for every character outside CHARSET
_LUT = np.zeros(128, np.uint8)
_LUT[[ord(c) for c in CHARSET]] = np.arange(1, VOCAB_SIZE)


def _tokens(strings, size):
    """Tokens [N, size*size] of strings already known to be size*size long; PAD marks foreign characters."""
    codes = np.array(strings, dtype=f"<U{size * size}").view(np.uint32).reshape(len(strings), size * size)
    return _LUT[np.minimum(codes, 127)]  # code 127 (DEL) is not in CHARSET, so it stands for every foreign character


def _cell(j, size):
    return f"row {j // size + 1}, column {j % size + 1}"


def encode(strings, size):
    """Maze strings -> tokens [N, size*size] uint8; a single string gives N = 1."""
    strings = [strings] if isinstance(strings, str) else list(strings)
    for i, s in enumerate(strings):
        if len(s) != size * size:
            raise DataError(f"maze string {i} has {len(s)} characters; expected {size * size} for a {size}x{size} maze")
    tokens = _tokens(strings, size)
    bad = np.argwhere(tokens == PAD)
    if len(bad):
        i, j = bad[0]
        raise DataError(f"maze string {i} has {strings[i][j]!r} at {_cell(j, size)}; expected one of {CHARSET!r}")
    return tokens


def decode(tokens, size):
    """Tokens [N, size*size] -> a list of N maze strings; one row [size*size] gives one string."""
    tokens = np.asarray(tokens)
    if tokens.ndim not in (1, 2) or tokens.shape[-1] != size * size:
        raise DataError(f"maze tokens have shape {tuple(tokens.shape)}; "
                        f"expected [N, {size * size}] for {size}x{size} mazes")
    rows = tokens.reshape(-1, size * size)
    bad = np.argwhere((rows < 1) | (rows >= VOCAB_SIZE))
    if len(bad):
        i, j = bad[0]
        raise DataError(f"maze {i} has token {rows[i, j]} at {_cell(j, size)}; expected 1-{VOCAB_SIZE - 1}")
    strings = _text(rows)
    return strings[0] if tokens.ndim == 1 else strings


def _text(rows):
    """Token rows [N, L] -> strings, with '?' for padding and any token outside the vocabulary."""
    rows = np.where((rows >= 1) & (rows < VOCAB_SIZE), rows, 0)
    return [row.tobytes().decode() for row in np.frombuffer(("?" + CHARSET).encode(), np.uint8)[rows]]


def read_csv(path, size=30):
    """A Maze-Hard CSV -> (questions, answers) tokens [N, size*size] uint8; the source and rating columns are not
    used."""
    if not os.path.isfile(path):
        raise DataError(f"{path} {'is not a regular file' if os.path.exists(path) else 'does not exist'}; expected a "
                        f"Maze-Hard CSV file with columns {','.join(HEADER)}")
    lines, questions, answers = [], [], []
    # errors="replace" turns undecodable bytes into U+FFFD, which the character check reports with its line
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path} is empty; expected the header {','.join(HEADER)} and one maze per line")
            if header != HEADER:
                raise DataError(f"{path} line 1 has columns {shown(','.join(header), 80)}; expected {','.join(HEADER)}")
            for row in reader:
                line = reader.line_num
                if not row:
                    continue
                if len(row) != len(HEADER):
                    raise DataError(f"{path} line {line} has {len(row)} fields; expected {len(HEADER)} "
                                    f"({','.join(HEADER)})")
                for name, s in zip(("question", "answer"), row[1:3]):
                    if len(s) != size * size:
                        raise DataError(f"{path} line {line}: the {name} has {len(s)} characters; "
                                        f"expected {size * size} for a {size}x{size} maze")
                lines.append(line)
                questions.append(row[1])
                answers.append(row[2])
        except csv.Error as e:
            raise DataError(f"{path} line {reader.line_num} is not valid CSV ({e}); expected a text file with "
                            f"columns {','.join(HEADER)}") from None
    if not lines:
        raise DataError(f"{path} has a header but no mazes; expected one maze per line")
    q, a = _tokens(questions, size), _tokens(answers, size)

    def fail(rows, message):
        i = np.flatnonzero(rows)[0]
        raise DataError(f"{path} line {lines[i]}: {message(i)}")

    for name, tokens, strings in (("question", q, questions), ("answer", a, answers)):
        bad = tokens == PAD
        if bad.any():
            fail(bad.any(1), lambda i: f"the {name} has {strings[i][np.argmax(bad[i])]!r} at "
                                       f"{_cell(np.argmax(bad[i]), size)}; expected one of {CHARSET!r}")
    if (q == PATH).any():
        fail((q == PATH).any(1), lambda i: f"the question has a path cell 'o' at {_cell(np.argmax(q[i] == PATH), size)}"
                                           f"; expected only '#', ' ', 'S' and 'G'")
    for token, letter in ((START, "S"), (GOAL, "G")):
        counts = (q == token).sum(1)
        if (counts != 1).any():
            fail(counts != 1, lambda i: f"the question has {counts[i]} '{letter}' cells; expected exactly one")
    changed = (a != q) & ~((q == OPEN) & (a == PATH))
    if changed.any():
        fail(changed.any(1), lambda i: f"the answer differs from the question at {_cell(np.argmax(changed[i]), size)} "
                                       f"({questions[i][np.argmax(changed[i])]!r} became "
                                       f"{answers[i][np.argmax(changed[i])]!r}); expected only ' ' to become 'o'")
    is_path, _ = check_paths(q, a)
    if not is_path.all():
        fail(~is_path, lambda i: "the answer's 'o' cells do not form one path from S to G")
    return q, a


def load_hard(split, path=None, cache_dir=None):
    """Maze-Hard split 'train' or 'test' as read_csv's pair: from path (a CSV file, or a folder holding
    {split}.csv), else from the cache, else downloaded into the cache."""
    return hub_csv("Maze-Hard", split, path, cache_dir or CACHE_DIR, HUB_URL, read_csv)


# ---------------------------------------------------------------------------------------------------------
# Generator. Independent random walls do not make hard mazes: at any wall density from 0.25 to 0.55 not one
# of 32k random 30x30 grids had a shortest path of 110 cells (they stay under about 60). Long paths need long
# walls, so a maze starts as a random tree of corridors. Loops then make the shortest path a choice, but a
# loop between distant corridors is a shortcut that kills the long paths, so loops only join corridors a few
# steps apart. Last, dead ends are walled up until the wall density is reached.

LOOPS_PER_CELL = 1 / 50  # 18 loops in a 30x30 maze; nearly every solution then passes at least one
LOOP_REACH = 10  # a loop joins two corridors at most this many steps apart
BATCH = 64  # mazes tried per numpy pass (part of what a seed means)


def default_min_path(size):
    """The shortest-path length, in cells, that makes a size x size maze "hard": Maze-Hard's 110 at 30x30,
    scaled as size**1.6 because that is how the path lengths of these mazes grow (measured from 8 to 30)."""
    return max(2, round(110 * (size / 30) ** 1.6))


def _maze(rng, size, density):
    """Open cells [size, size] bool of one random maze whose wall density is density, or the lowest the
    maze allows if that is higher."""
    n = size + 2
    cells = bytearray(n * n)  # flat, for fast scalar access: 0 wall, 1 open, 2 the frame, which never opens
    for i in range(n):
        cells[i] = cells[n * (n - 1) + i] = cells[n * i] = cells[n * i + n - 1] = 2
    _carve(cells, n, iter(rng.random(size * size + 2).tolist()))  # python floats: numpy draws one at a time are slow
    _braid(cells, n, rng.permutation(n * n).tolist(), round(size * size * LOOPS_PER_CELL))
    open_ = np.frombuffer(bytes(cells), np.uint8).reshape(n, n)[1:-1, 1:-1] == 1
    _prune(rng, open_, density)
    return open_


def _carve(cells, n, picks):
    """Open a random tree of corridors. Depth-first growth (Prim-like growth gives short bushy paths) that
    opens a wall only when the cell it comes from is its sole open neighbour, so corridors never merge."""
    size = n - 2
    c = n * (1 + int(next(picks) * size)) + 1 + int(next(picks) * size)
    cells[c] = 1
    stack = [c]
    while stack:
        c = stack[-1]
        steps = [v for v in (c - n, c + n, c - 1, c + 1) if cells[v] == 0 and
                 (cells[v - n] == 1) + (cells[v + n] == 1) + (cells[v - 1] == 1) + (cells[v + 1] == 1) == 1]
        if steps:
            c = steps[int(next(picks) * len(steps))]
            cells[c] = 1
            stack.append(c)
        else:
            stack.pop()


def _braid(cells, n, order, loops):
    """Open up to `loops` walls, tried in the given order, that each join two corridors at most LOOP_REACH
    steps apart."""
    for v in order:
        if loops == 0:
            return
        if cells[v] != 0:
            continue
        ends = [u for u in (v - n, v + n, v - 1, v + 1) if cells[u] == 1]
        # never open a 2x2 block: the two equal routes around it would make every path through it ambiguous
        if (len(ends) == 2 and _near(cells, n, *ends) and
                not any(cells[v + i] == cells[v + j] == cells[v + i + j] == 1 for i in (-n, n) for j in (-1, 1))):
            cells[v] = 1
            loops -= 1


def _near(cells, n, a, b):
    """Whether b is at most LOOP_REACH steps from a through open cells."""
    seen, frontier = {a}, [a]
    for _ in range(LOOP_REACH):
        reached = []
        for c in frontier:
            for v in (c - n, c + n, c - 1, c + 1):
                if cells[v] == 1 and v not in seen:
                    seen.add(v)
                    reached.append(v)
        if b in seen:
            return True
        frontier = reached
    return False


def _prune(rng, open_, density):
    """Wall up dead ends chosen at random (which changes no other distance) until the wall density reaches
    density."""
    size = len(open_)
    p = np.pad(open_, 1)
    inner = p[1:-1, 1:-1]
    missing = round(density * size * size) - (size * size - int(inner.sum()))
    while missing > 0:
        degree = p[:-2, 1:-1].astype(np.uint8) + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:]
        ends = rng.permutation(np.argwhere(inner & (degree == 1)))[:missing]
        if not len(ends):
            break
        # dead ends are never neighbours (unless two cells are all that is left), so many can go at once
        inner[ends[:, 0], ends[:, 1]] = False
        missing -= len(ends)
    open_[:] = inner


def _bfs(open_, start):
    """Breadth-first search in many grids at once. open_ [B, H, W] bool, start [B] flat cell indices.
    Returns dist [B, H, W] int16 (steps from start, -1 where unreachable) and the number of shortest paths
    [B, H, W] uint8, capped at 2 (so 1 means unique)."""
    B, H, W = open_.shape
    free = np.pad(open_, ((0, 0), (1, 1), (1, 1)))
    front = np.zeros(free.shape, np.uint8)  # shortest-path counts on the frontier, 0 elsewhere
    front[np.arange(B), start // W + 1, start % W + 1] = 1
    free &= front == 0
    dist = np.where(front > 0, 0, -1).astype(np.int16)
    paths = front.copy()
    step = 0
    while front.any():
        step += 1
        nxt = np.zeros_like(front)
        nxt[:, 1:-1, 1:-1] = front[:, :-2, 1:-1] + front[:, 2:, 1:-1] + front[:, 1:-1, :-2] + front[:, 1:-1, 2:]
        nxt *= free
        np.minimum(nxt, 2, out=nxt)
        reached = nxt > 0
        free &= ~reached
        np.copyto(dist, step, where=reached)
        paths += nxt
        front = nxt
    return dist[:, 1:-1, 1:-1], paths[:, 1:-1, 1:-1]


def _random_cell(rng, mask):
    """One cell per grid, uniform among the True cells of mask [B, H, W], as flat indices."""
    return np.argmax((rng.random(mask.shape) * mask).reshape(len(mask), -1), axis=1)


def _trace(dist, goal):
    """The cells of the shortest path ending at goal [A] (flat indices) in grids dist [A, H, W] whose shortest
    path to goal is unique: bool [A, H, W], True from start to goal."""
    A, H, W = dist.shape
    d = np.pad(dist, ((0, 0), (1, 1), (1, 1)), constant_values=-1).reshape(A, (H + 2) * (W + 2))
    on = np.zeros(d.shape, bool)
    rows = np.arange(A)
    pos = (goal // W + 1) * (W + 2) + goal % W + 1
    on[rows, pos] = True
    offsets = np.array([-(W + 2), W + 2, -1, 1])
    for _ in range(int(d[rows, pos].max())):
        nbrs = pos[:, None] + offsets
        here = d[rows, pos]
        # the unique neighbour one step closer; once at the start (distance 0) the walk stays put
        back = (d[rows[:, None], nbrs] == here[:, None] - 1) & (here > 0)[:, None]
        pos = np.where(back.any(1), nbrs[rows, np.argmax(back, 1)], pos)
        on[rows, pos] = True
    return on.reshape(A, H + 2, W + 2)[:, 1:-1, 1:-1]


def generate(count, size=30, min_path=None, density=(0.38, 0.5), seed=0):
    """count random mazes with a unique shortest path of at least min_path cells (S and G included;
    default default_min_path(size)) and a wall density drawn uniformly from density (or the lowest a maze
    with its loops allows, about 0.38 at 30x30 and 0.34 at 10x10, when that is higher).
    Returns (questions, answers) tokens [count, size*size] uint8 and ratings [count] int64, the path lengths.
    Deterministic for a seed, and a smaller count gives a prefix of a larger one."""
    min_path = default_min_path(size) if min_path is None else min_path
    if not 0 <= density[0] <= density[1] < 1:
        raise DataError(f"maze wall density range {density} is not valid; expected 0 <= low <= high < 1")
    rng = np.random.default_rng(seed)
    questions, answers, ratings = [], [], []
    tries = found = 0
    progress = Progress(f"generating {size}x{size} mazes", count)
    while found < count:
        progress(found)
        open_ = np.stack([_maze(rng, size, d) for d in rng.uniform(*density, BATCH)])
        start = _random_cell(rng, open_)
        dist, paths = _bfs(open_, start)
        far = (dist >= min_path - 1) & (paths == 1)
        keep = far.any((1, 2))
        tries, found = tries + BATCH, found + int(keep.sum())
        if not found and tries >= 1000:
            raise DataError(f"no {size}x{size} maze in {tries} tries had a unique shortest path of {min_path} cells; "
                            f"expected min_path near default_min_path({size}) = {default_min_path(size)}")
        if not keep.any():
            continue
        open_, start, dist, far = open_[keep], start[keep], dist[keep], far[keep]
        end = _random_cell(rng, far)
        on_path = _trace(dist, end)
        # the search start is uniform but its far end is not: swap half of the pairs so neither S nor G is special
        swap = rng.random(len(end)) < 0.5
        start, goal = np.where(swap, end, start), np.where(swap, start, end)
        q = np.where(open_, OPEN, WALL).astype(np.uint8).reshape(len(goal), -1)
        q[np.arange(len(goal)), start] = START
        q[np.arange(len(goal)), goal] = GOAL
        questions.append(q)
        answers.append(np.where(on_path.reshape(len(goal), -1) & (q == OPEN), PATH, q).astype(np.uint8))
        ratings.append(on_path.sum((1, 2)).astype(np.int64))
    return tuple(np.concatenate(x)[:count] for x in (questions, answers, ratings))


# ---------------------------------------------------------------------------------------------------------
# Checking predictions

def _grids(tokens, what):
    """Tokens [N, size*size] -> grids [N, size, size]."""
    tokens = np.asarray(tokens)
    size = math.isqrt(tokens.shape[-1]) if tokens.ndim == 2 else 0
    if size < 1 or size * size != tokens.shape[-1]:
        raise DataError(f"{what} have shape {tuple(tokens.shape)}; expected [N, size*size] for square mazes")
    return tokens.reshape(len(tokens), size, size)


def _path_length(on_path, start, goal):
    """Cells on the walk from start to goal [N] (flat indices) through on_path [N, H, W], where start and goal
    have one on_path neighbour and every other on_path cell two, so the walk cannot branch or stop early."""
    N, H, W = on_path.shape
    grid = np.pad(on_path, ((0, 0), (1, 1), (1, 1))).reshape(N, (H + 2) * (W + 2))
    offsets = np.array([-(W + 2), W + 2, -1, 1])
    pos, goal = (start // W + 1) * (W + 2) + start % W + 1, (goal // W + 1) * (W + 2) + goal % W + 1
    prev = np.full(N, -1)
    length = np.ones(N, np.int64)
    walking = np.flatnonzero(pos != goal)
    while len(walking):
        nbrs = pos[walking, None] + offsets
        ahead = grid[walking[:, None], nbrs] & (nbrs != prev[walking, None])
        prev[walking], pos[walking] = pos[walking], nbrs[np.arange(len(walking)), np.argmax(ahead, 1)]
        length[walking] += 1
        walking = walking[pos[walking] != goal[walking]]
    return length


def check_paths(questions, predictions):
    """Judge predicted answers, tokens [N, size*size]. Returns is_path and is_shortest, bool [N].
    is_path: the prediction is the question with some open cells marked 'o', and those cells with S and G
    form one simple path from S to G (4-neighbours; S and G have one path neighbour, 'o' cells two, so a
    path that touches itself or a stray 'o' fails). is_shortest: also as short as the shortest path."""
    q, p = _grids(questions, "questions"), _grids(predictions, "predictions")
    if q.shape != p.shape:
        raise DataError(f"questions {q.shape} and predictions {p.shape} differ in shape; "
                        f"expected the same [N, size*size]")
    N, size, _ = q.shape
    ends = (q == START) | (q == GOAL)
    on_path = (p == PATH) | ends
    pad = np.pad(on_path, ((0, 0), (1, 1), (1, 1))).astype(np.uint8)
    degree = pad[:, :-2, 1:-1] + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
    is_path = (np.all((p == q) | ((q == OPEN) & (p == PATH)), axis=(1, 2))
               & ((q == START).sum((1, 2)) == 1) & ((q == GOAL).sum((1, 2)) == 1)
               & np.all(~on_path | (degree == np.where(ends, 1, 2)), axis=(1, 2)))
    # the degrees allow closed loops of 'o' beside the S-G path: walk the path and compare its length with the count
    rows = np.flatnonzero(is_path)
    start = np.argmax((q[rows] == START).reshape(len(rows), size * size), 1)
    goal = np.argmax((q[rows] == GOAL).reshape(len(rows), size * size), 1)
    length = _path_length(on_path[rows], start, goal)
    is_path[rows] = length == on_path[rows].sum((1, 2))
    dist, _ = _bfs(q[rows] != WALL, start)
    is_shortest = np.zeros(N, bool)
    is_shortest[rows] = is_path[rows] & (dist.reshape(len(rows), size * size)[np.arange(len(rows)), goal] + 1 == length)
    return is_path, is_shortest


# ---------------------------------------------------------------------------------------------------------
# Augmentation and pictures

def augment(questions, answers, k):
    """Dihedral transform k (0-7, numbered as in data.dihedral) of every maze: tokens [N, size*size], same shape out."""
    q, a = _grids(questions, "questions"), _grids(answers, "answers")
    return tuple(np.ascontiguousarray(dihedral(x, k)).reshape(x.shape[0], x.shape[1] ** 2) for x in (q, a))


def all_dihedral(questions, answers):
    """The 8 dihedral versions of every maze: tokens [N, size*size] -> [N, 8, size*size], version k on axis 1
    (reshape to [8N, size*size] for augmentation groups of 8 consecutive rows)."""
    versions = [augment(questions, answers, k) for k in range(8)]
    return tuple(np.stack([v[i] for v in versions], axis=1) for i in (0, 1))


# RGB for tokens 0-5: pad, wall, open, start, goal, path
_COLOURS = np.array([[0.6, 0.6, 0.6], [0.15, 0.15, 0.2], [1, 1, 1],
                     [0.1, 0.7, 0.2], [0.85, 0.1, 0.1], [0.2, 0.4, 0.95]])


def draw(question, prediction, answer=None, path="maze.png", title=None):
    """Save a picture of a predicted maze (tokens [size*size] or [size, size]) beside the true answer when
    given: walls dark, S green, G red, path blue. Crosses mark the predicted cells that differ from the answer
    (without one, the cells that are not allowed to change). Returns path."""
    from matplotlib.figure import Figure  # a bare Figure draws with Agg and leaves pyplot's global state alone

    q, p = (_grids(np.asarray(g).reshape(1, -1), "maze tokens")[0] for g in (question, prediction))
    panels = [("prediction", p)]
    if answer is not None:
        panels.append(("answer", _grids(np.asarray(answer).reshape(1, -1), "maze tokens")[0]))
        wrong = p != panels[1][1]
    else:
        wrong = (p != q) & ~((q == OPEN) & (p == PATH))
    fig = Figure(figsize=(4 * len(panels), 4.4))
    for i, (name, grid) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(_COLOURS[np.clip(grid, 0, len(_COLOURS) - 1)], interpolation="nearest")
        ax.set_title(name)
        ax.set_xticks([])
        ax.set_yticks([])
    rows, cols = np.nonzero(wrong)
    fig.axes[0].scatter(cols, rows, marker="x", s=20, c="orange", linewidths=1.5)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


# ------------------------------------------------------------------------------------ training glue

# What differs from the defaults of train.TrainConfig, data.DataConfig and model.TRMConfig (the reference's Sudoku run).
PRESETS = {
    # The reference's Maze-Hard run: attention with RoPE, n 4, T 3, 1000 mazes x the 8 dihedral transforms.
    "paper": dict(data="auto", num_aug=7, test_puzzles=0, mlp_t=False, rope=True, n=4, eval_interval=5000,
                  checkpoint_interval=5000),
    # 8x8 mazes (shortest paths of 13+ cells) with the token-mixing MLP: attention is the slow part on a CPU
    # and a fixed size needs no positions. 20000 generated mazes (seconds to make) keep it from overfitting;
    # lr 2e-3 learns faster than 1e-3 (65% vs 35% exact at step 1250) and 3e-3 (92.7% vs 95.3% at step 2000).
    # torch.compile (1.5x faster steps on a CPU, when a C++ compiler is there) buys the 2400 steps that reach
    # 98% in under 10 minutes (README, Maze-Hard).
    "cpu": dict(size=8, train_puzzles=20000, num_aug=7, d_model=64, n_heads=4, puzzle_emb_len=1, n=2, T=2, N_sup=8,
                batch_size=128, lr=2e-3, warmup_steps=100, weight_decay=0.1, puzzle_emb_lr=1e-3,
                puzzle_emb_weight_decay=0.1, ema=0.99, max_steps=2400, eval_interval=600, checkpoint_interval=600,
                dtype="bfloat16", compile="on"),
}


# The task's own data settings (train.py refuses another task's), and those read only when puzzles are generated.
SETTINGS = ("size", "min_path")
GENERATOR_SETTINGS = ("min_path",)


def shape(dcfg):
    """(vocabulary size, tokens per maze) of the data these settings build: what the model is sized by."""
    return VOCAB_SIZE, dcfg.size * dcfg.size


def build_datasets(dcfg, splits=("train", "test")):
    """Train: each maze in a group with its first 1 + num_aug dihedral transforms; test: mazes as they are.
    Cached under data/maze/ by their settings."""
    if not 0 <= dcfg.num_aug <= 7:
        raise SettingsError(f"--num-aug is {dcfg.num_aug}; a maze has 8 dihedral versions, so expected 0 to 7")

    def hard(split, path):
        if dcfg.size != 30:
            raise SettingsError(f"Maze-Hard has 30x30 mazes, not {dcfg.size}x{dcfg.size}")
        return load_hard(split, path)

    def generated(count, seed):
        return generate(count, size=dcfg.size, min_path=dcfg.min_path or None, seed=seed)[:2]

    @functools.cache          # both splits at once, so that the test split can be kept apart from training
    def both():
        return held_out_splits(dcfg, "Maze-Hard", hard, generated)

    def build(split):
        q, a, source = both()[split]
        print(f"{split} set: {len(q)} {source} mazes")
        if split == "test":
            return Dataset.ungrouped(q, a, VOCAB_SIZE)
        versions = dcfg.num_aug + 1
        q8, a8 = all_dihedral(q, a)                                            # [N, 8, L] each
        return Dataset.grouped(q8[:, :versions].reshape(-1, q.shape[1]), a8[:, :versions].reshape(-1, q.shape[1]),
                               versions, VOCAB_SIZE)

    def key(split):
        count, aug = (dcfg.train_puzzles, dcfg.num_aug) if split == "train" else (dcfg.test_puzzles, 0)
        return (f"{source_key(dcfg.data, split, CACHE_DIR)}-{split}-{count}-aug{aug}"
                f"-n{dcfg.size}-p{dcfg.min_path}-s{dcfg.data_seed}")

    return cached_splits("maze", splits, key, build)


def check(inputs, preds):
    """Share of predictions that are shortest start-to-goal paths (token arrays [N, L] in, bool [N] out)."""
    return check_paths(inputs.astype(np.uint8), preds.astype(np.uint8))[1]


def parse_solve(text, mcfg):
    """`evaluate.py --solve FILE`: a maze as lines of "# SG" characters (or one string). No labels: the
    prediction is judged by the checker instead."""
    size = math.isqrt(mcfg.seq_len)
    expected = f"expected a file of {size} rows of {size} '# SG' characters, or one string of {size * size}"
    source = f"--solve {shown(text, 60)}"
    if os.path.isfile(text):
        with open(text, encoding="utf-8", errors="replace") as f:
            text = "".join(line.rstrip("\r\n") for line in f)
    elif set(text) - set(CHARSET):
        raise DataError(f"{source} is neither a file nor a maze (it has {shown(min(set(text) - set(CHARSET)))}); "
                        f"{expected}")
    foreign = sorted(set(text) - set(CHARSET))
    if len(text) != size * size or foreign:
        among = f", among them {shown(foreign[0])}" if foreign else ""
        raise DataError(f"{source} holds {len(text)} characters{among}; {expected}")
    q = encode(text, size)
    if (q == START).sum() != 1 or (q == GOAL).sum() != 1 or (q == PATH).any():
        raise DataError(f"{source}: the maze needs exactly one S and one G and no 'o' cells")
    return q, np.zeros_like(q)


def describe_solution(inputs, pred):
    size = math.isqrt(inputs.shape[1])
    is_path, is_shortest = check_paths(inputs.astype(np.uint8), pred[None].astype(np.uint8))
    grid = _text(pred[None].astype(np.int64))[0]     # an untrained model may predict padding: drawn as '?'
    rows = [grid[r * size:(r + 1) * size] for r in range(size)]
    verdict = ("a shortest path" if is_shortest[0]
               else "a path, but not a shortest one" if is_path[0] else "NOT a path")
    return "\n".join(rows + [f"the model's answer is {verdict} from S to G"])


def draw_steps(inputs, labels, steps, path):
    answer = labels[0] if labels[0].any() else None
    return draw(inputs[0], steps[-1], answer=answer, path=path)


def unique_shortest_path(question):
    """The answer tokens [L] of a maze, tokens [L], whose shortest path from S to G is unique, else None: a
    --solve maze comes without its answer, and only a unique one is the answer."""
    size = math.isqrt(len(question))
    start, goal = np.flatnonzero(question == START), np.flatnonzero(question == GOAL)
    dist, paths = _bfs((question != WALL).reshape(1, size, size), start)
    if dist.flat[goal[0]] < 0 or paths.flat[goal[0]] != 1:
        return None
    on_path = _trace(dist, goal).reshape(-1)
    return np.where(on_path & (question == OPEN), PATH, question)


def page_view(inputs, labels):
    """How evaluate.py's --html page draws a maze, inputs and labels tokens [L]: each token's colour as in draw()
    (S and G lettered), and the answer: the labels, else the shortest path when it is unique, else None."""
    answer = labels if labels.any() else unique_shortest_path(inputs)
    colours = ["#" + "".join(f"{round(255 * v):02x}" for v in rgb) for rgb in _COLOURS]
    size = math.isqrt(len(inputs))
    return dict(title="maze", rows=size, cols=size, box=0, ink="#ffffff", givens=[False] * len(inputs),
                tokens=[(CHARSET[t - 1] if t in (START, GOAL) else "", c) for t, c in enumerate(colours)],
                answer=None if answer is None else answer.tolist())
