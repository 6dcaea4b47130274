"""Sudoku for TRM: grids as text, the Sudoku-Extreme CSV files, a solver, a puzzle generator, the
validity-preserving augmentations, a solution checker and a picture of a prediction.

A grid is a numpy uint8 array of 81 digits, row-major, 0 for a blank ([N, 81] for a batch).
The solver works on candidate bitmasks: bit k of a cell's mask set means digit k + 1 is still possible.
"""
import csv
import functools
import io
import os

import numpy as np

from data import Dataset, DataError, Progress, cached_splits, held_out_splits, hub_csv, shown, source_key

ROWS = [[r * 9 + c for c in range(9)] for r in range(9)]
COLS = [[r * 9 + c for r in range(9)] for c in range(9)]
BOXES = [[(3 * br + r) * 9 + 3 * bc + c for r in range(3) for c in range(3)] for br in range(3) for bc in range(3)]
UNITS = ROWS + COLS + BOXES
UNIT_INDEX = np.array(UNITS)  # [27, 9]
PEERS = [tuple(sorted({j for u in UNITS if i in u for j in u} - {i})) for i in range(81)]
ALL = 0b111111111
BITS = [tuple(1 << k for k in range(9) if m >> k & 1) for m in range(512)]  # the single bits of each mask
# Blanks a generated puzzle may have. Random removal until no cell can go ends with 53-60 blanks
# (in 2500 grids: 4% reached 59, 0.3% reached 60, none more), so 61-64 would need an endless search.
MAX_BLANKS = 60
CHUNK = 1 << 16  # rows per numpy pass: on a million rows, paging in huge temporaries costs more than the work

HEADER = ["source", "question", "answer", "rating"]
HUB_URL = "https://huggingface.co/datasets/sapientinc/sudoku-extreme/resolve/main/{split}.csv"
CACHE_DIR = "~/.cache/trm/sudoku-extreme"


# ----------------------------------------------------------------------------- grids as text

def parse_grid(s, what="puzzle"):
    """81 characters, digits 1-9 and '.' or '0' for a blank, as a uint8 [81] grid."""
    shown = repr(s if len(s) <= 20 else s[:20] + "...") if isinstance(s, str) else f"of type {type(s).__name__}"
    expected = "expected 81 characters, digits 1-9 and '.' or '0' for a blank"
    if not isinstance(s, str) or len(s) != 81:
        found = f"has {len(s)} characters" if isinstance(s, str) else "is not a string"
        raise DataError(f"{what} {shown} {found}; {expected}")
    bad = next((k for k, ch in enumerate(s) if ch not in ".0123456789"), None)
    if bad is not None:
        raise DataError(f"{what} {shown} has {s[bad]!r} at character {bad + 1}; {expected}")
    return np.frombuffer(s.replace(".", "0").encode(), np.uint8) - ord("0")


def grid_to_string(g):
    return "".join(str(d) if d else "." for d in np.asarray(g).reshape(81).tolist())


# ----------------------------------------------------------------------------- Sudoku-Extreme files

def _check_chars(path, chars, allowed, what, expected):
    """Raise for the first row of chars [N, 81] (ASCII codes) holding a character outside allowed."""
    ok = np.zeros(256, bool)
    ok[np.frombuffer(allowed.encode(), np.uint8)] = True
    bad = ~ok[chars]
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise DataError(f"{path} line {row + 2} has the {what} character {chr(chars[row, col])!r} at position "
                        f"{col + 1}; expected {expected}")


def read_csv(path):
    """A Sudoku-Extreme CSV file (header source,question,answer,rating; '.' for a blank) as
    (questions [N, 81] uint8, answers [N, 81] uint8); the source and rating columns are not used.
    The file is checked and cut with numpy and one bytes.split, not row by row, so the 3.8M rows of
    train.csv take seconds."""
    columns = ",".join(HEADER)
    if not os.path.isfile(path):
        raise DataError(f"{path} {'is not a regular file' if os.path.exists(path) else 'does not exist'}; expected a "
                        f"Sudoku-Extreme CSV file with columns {columns}")
    with open(path, "rb") as f:
        data = f.read().replace(b"\r", b"")
    if not data or data.isspace():
        raise DataError(f"{path} is empty; expected a header {columns} and one row per puzzle")
    if b"\0" in data[:4096]:
        raise DataError(f"{path} is not a text file (it holds NUL bytes); expected a CSV file with columns {columns}")
    header, _, body = data.partition(b"\n")
    del data
    header = header[:1000].decode("utf-8-sig", "replace").strip()   # a header is short: a long one is wrong anyway
    header = ",".join(next(csv.reader([header]), []))
    if header != columns:
        raise DataError(f"{path} line 1 has the columns {shown(header, 80)}; expected {columns}")
    if b'"' in body:   # standard CSV quoting, which no valid field needs: unquoted the slow way, then checked
        reader = csv.reader(io.StringIO(body.decode("utf-8", "replace"), newline=""))
        rows, ended = [], 0
        for row in reader:
            if any("\n" in field or "\r" in field for field in row):
                raise DataError(f"{path} line {ended + 2} has a line break inside a quoted field; expected one puzzle "
                                f"per line")
            rows.append(",".join(row) + "\n")
            ended = reader.line_num
        body = "".join(rows).encode()
    if max(body, default=0) >= 0x80:     # counted in bytes, a line's lengths would be wrong: name the character
        at = next(i for i, byte in enumerate(body) if byte >= 0x80)
        line = body[:at].count(b"\n") + 2
        character = body[at:at + 4].decode("utf-8", "replace")[0]
        raise DataError(f"{path} line {line} has the character {shown(character)}, which is not ASCII; expected "
                        f"digits 1-9 and '.' or '0' for a blank")
    body = body.rstrip(b"\n") + b"\n"
    if body == b"\n":
        raise DataError(f"{path} has a header but no rows; expected one row per puzzle after it")
    buf = np.frombuffer(body, np.uint8)
    line_ends = np.flatnonzero(buf == ord("\n"))
    fields = np.bincount(np.searchsorted(line_ends, np.flatnonzero(buf == ord(","))), minlength=len(line_ends)) + 1
    if (fields != 4).any():
        k = int(np.argmax(fields != 4))
        found = "1 field" if fields[k] == 1 else f"{fields[k]} fields"
        raise DataError(f"{path} line {k + 2} has {found}; expected 4 ({columns})")
    cells = body.replace(b"\n", b",").split(b",")  # row k is cells[4k:4k + 4]
    for column, what in ((1, "question"), (2, "answer")):
        sizes = np.fromiter(map(len, cells[column::4]), np.int64, len(line_ends))
        if (sizes != 81).any():
            k = int(np.argmax(sizes != 81))
            raise DataError(f"{path} line {k + 2} has {sizes[k]} characters in its {what}; expected 81")
    q = np.frombuffer(b"".join(cells[1::4]), np.uint8).reshape(-1, 81)
    a = np.frombuffer(b"".join(cells[2::4]), np.uint8).reshape(-1, 81)
    _check_chars(path, q, ".0123456789", "question", "digits 1-9 and '.' or '0' for a blank")
    _check_chars(path, a, "123456789", "answer", "digits 1-9 (an answer has no blanks)")
    questions = np.where(q == ord("."), 0, q - ord("0")).astype(np.uint8)
    answers = a - np.uint8(ord("0"))
    clash = (questions != 0) & (questions != answers)
    if clash.any():
        k, cell = np.argwhere(clash)[0]
        raise DataError(f"{path} line {k + 2} has an answer with {answers[k, cell]} at position {cell + 1} where "
                        f"the question gives {questions[k, cell]}; expected the answer to keep every given")
    broken = ~valid_solutions(questions, answers)
    if broken.any():
        k = int(np.argmax(broken))
        raise DataError(f"{path} line {k + 2} has an answer that breaks the rules (a digit twice in a row, "
                        f"column or box); expected a solved grid")
    return questions, answers


def load_extreme(split, path=None, cache_dir=None):
    """Sudoku-Extreme split "train" or "test" as read_csv's pair: from path (the CSV file or a folder
    holding {split}.csv), else from cache_dir, downloaded from the Hugging Face hub when absent."""
    return hub_csv("Sudoku-Extreme", split, path, cache_dir or CACHE_DIR, HUB_URL, read_csv)


# ----------------------------------------------------------------------------- solver

def _propagate(cand, queue):
    """Apply naked and hidden singles to the candidate masks in place until nothing changes.
    queue: cells fixed to one digit whose digit is not yet removed from their peers.
    Returns False on a contradiction (a cell without candidates, a digit without a place in a unit)."""
    while True:
        while queue:
            i = queue.pop()
            m = cand[i]
            for p in PEERS[i]:
                c = cand[p]
                if c & m:
                    c ^= m
                    if not c:
                        return False
                    cand[p] = c
                    if not c & (c - 1):
                        queue.append(p)
        for unit in UNITS:
            once = twice = 0
            for i in unit:
                m = cand[i]
                twice |= once & m
                once |= m
            if once != ALL:
                return False
            hidden = once & ~twice  # digits with a single place in this unit
            if hidden:
                for i in unit:
                    h = cand[i] & hidden
                    if h and h != cand[i]:
                        if h & (h - 1):
                            return False
                        cand[i] = h
                        queue.append(i)
        if not queue:
            return True


def _search(cand, queue, limit, solutions, rng=None):
    """Depth-first search from the masks cand, appending solved masks to solutions until there are limit.
    Branches on a cell with the fewest candidates, in random digit order when rng is given.
    Returns the number of branching decisions made."""
    if not _propagate(cand, queue):
        return 0
    best, fewest = -1, 10
    for i, c in enumerate(cand):
        if c & (c - 1):
            n = c.bit_count()
            if n < fewest:
                best, fewest = i, n
                if n == 2:
                    break
    if best < 0:
        solutions.append(cand)
        return 0
    bits = BITS[cand[best]] if rng is None else rng.permutation(BITS[cand[best]]).tolist()
    guesses = 1
    for bit in bits:
        branch = cand[:]
        branch[best] = bit
        guesses += _search(branch, [best], limit, solutions, rng)
        if len(solutions) >= limit:
            break
    return guesses


def _masks(cells):
    """Candidate masks of a puzzle given as a list of 81 digits, and the cells already fixed."""
    cand = [ALL if d == 0 else 1 << (d - 1) for d in cells]
    return cand, [i for i, d in enumerate(cells) if d]


def _digits(cand):
    return np.array([m.bit_length() for m in cand], np.uint8)


def solve(puzzle, limit=2):
    """Up to limit solutions of a [81] puzzle, and the effort: branching decisions the search made
    (0 when naked and hidden singles alone solve it). limit=2 tells a unique puzzle from an ambiguous one."""
    cells = np.asarray(puzzle).reshape(-1).tolist()
    if len(cells) != 81 or not all(0 <= d <= 9 for d in cells):
        raise DataError(f"a puzzle of {len(cells)} values from {min(cells, default=0)} to {max(cells, default=0)} "
                        f"cannot be solved; expected 81 digits 0-9")
    solutions = []
    effort = _search(*_masks(cells), limit, solutions)
    return [_digits(s) for s in solutions], effort


# ----------------------------------------------------------------------------- generator

def _unique_without(givens, i):
    """Whether the puzzle givens (masks, 0 for a blank), known to have one solution, keeps it when cell i
    is blanked: true iff no solution puts another digit in cell i, which is quicker to refute than to
    count solutions."""
    cand = [g or ALL for g in givens]
    cand[i] = ALL ^ givens[i]
    for p in PEERS[i]:
        cand[i] &= ~givens[p]
    if not cand[i]:  # the givens around cell i already force its digit
        return True
    found = []
    _search(cand, [j for j, c in enumerate(cand) if not c & (c - 1)], 1, found)
    return not found


def _full_grid(rng):
    """A random full grid as masks. The three diagonal boxes share no unit, so random permutations fill them
    at once (any such filling completes); search in random digit order does the rest, twice as fast as from
    an empty grid."""
    diagonal = BOXES[0] + BOXES[4] + BOXES[8]
    cand = [ALL] * 81
    for i, d in zip(diagonal, _permutations(rng, (3, 9)).reshape(27).tolist()):
        cand[i] = 1 << d
    grid = []
    _search(cand, diagonal, 1, grid, rng)
    return grid[0]


def _puzzle(rng, blanks):
    """A puzzle with exactly `blanks` blanks and one solution, and that solution, from a fresh random grid;
    None when removing cells in random order got stuck first."""
    grid = _full_grid(rng)
    givens = grid[:]
    removed = 0
    for i in rng.permutation(81).tolist():
        if removed == blanks:
            break
        if _unique_without(givens, i):
            givens[i] = 0
            removed += 1
    return (_digits(givens), _digits(grid)) if removed == blanks else None


def generate(count, min_blanks=40, max_blanks=58, seed=0, min_effort=0):
    """count puzzles with one solution each: (questions [count, 81] uint8, answers [count, 81] uint8,
    ratings [count] int64, the solver effort of each question). Each puzzle draws its blank count uniformly
    from [min_blanks, max_blanks]; a puzzle rated below min_effort is dropped and drawn afresh (blank count
    included), so a high min_effort favours high blank counts. Deterministic for a given seed."""
    if not 0 <= min_blanks <= max_blanks <= MAX_BLANKS:
        raise DataError(f"blank counts {min_blanks} to {max_blanks} cannot be generated; expected "
                        f"0 <= min_blanks <= max_blanks <= {MAX_BLANKS} (more blanks are too rare to find by "
                        f"random removal)")
    if count < 0 or min_effort < 0:
        raise DataError(f"count {count} and min_effort {min_effort} cannot be used; expected both >= 0")
    rng = np.random.default_rng(seed)
    questions, answers, ratings = [], [], []
    progress = Progress("generating sudoku puzzles", count)
    while len(questions) < count:
        progress(len(questions))
        blanks = int(rng.integers(min_blanks, max_blanks + 1))
        made = None
        while made is None:
            made = _puzzle(rng, blanks)
        effort = solve(made[0])[1]
        if effort >= min_effort:
            questions.append(made[0])
            answers.append(made[1])
            ratings.append(effort)
    return (np.array(questions, np.uint8).reshape(count, 81), np.array(answers, np.uint8).reshape(count, 81),
            np.array(ratings, np.int64))


# ----------------------------------------------------------------------------- augmentation and checking

def _permutations(rng, shape):
    """Independent uniform permutations of range(shape[-1]), one per leading index."""
    return np.argsort(rng.random(shape), axis=-1)


def _lines(rng, n):
    """For each of n grids, a random order of the 9 rows (or columns) that keeps the 3 bands together."""
    return (3 * _permutations(rng, (n, 3))[:, :, None] + _permutations(rng, (n, 3, 3))).reshape(n, 9)


def _augment(questions, answers, rng):
    n = len(questions)
    digits = np.zeros((n, 10), np.uint8)  # 0 stays 0
    digits[:, 1:] = _permutations(rng, (n, 9)) + 1
    rows, cols, flip = 9 * _lines(rng, n), _lines(rng, n), rng.random((n, 1)) < 0.5
    # out (r, c) reads in (rows[r], cols[c]), or in (rows[c], cols[r]) when transposed
    index = (np.where(flip, cols, rows)[:, :, None] + np.where(flip, rows, cols)[:, None, :]).reshape(n, 81)
    return tuple(np.take_along_axis(digits, np.take_along_axis(g, index, 1), 1) for g in (questions, answers))


def augment(questions, answers, rng):
    """A random validity-preserving transform per row of [N, 81] questions and answers, the same for a
    question and its answer: relabel digits 1-9, permute bands, rows within a band, stacks and columns
    within a stack, and transpose with probability 1/2."""
    questions, answers = np.asarray(questions), np.asarray(answers)
    if questions.ndim != 2 or questions.shape[1] != 81 or answers.shape != questions.shape:
        raise DataError(f"questions {questions.shape} and answers {answers.shape} cannot be augmented; "
                        f"expected two [N, 81] arrays")
    q2, a2 = np.empty_like(questions), np.empty_like(answers)
    for s in range(0, len(questions), CHUNK):
        q2[s:s + CHUNK], a2[s:s + CHUNK] = _augment(questions[s:s + CHUNK], answers[s:s + CHUNK], rng)
    return q2, a2


def _valid(puzzles, grids):
    bits = np.left_shift(np.uint16(1), grids.astype(np.uint16))  # a blank sets bit 0, which no full unit has
    units_full = np.bitwise_or.reduce(bits[..., UNIT_INDEX.T], axis=-2) == 0b1111111110
    return units_full.all(-1) & ((puzzles == 0) | (puzzles == grids)).all(-1)


def valid_solutions(puzzles, grids):
    """Whether each grid ([N, 81] or one [81]) solves its puzzle: no blank, every row, column and box holds
    1-9 once, every given kept."""
    puzzles, grids = np.asarray(puzzles), np.asarray(grids)
    if puzzles.shape != grids.shape or grids.shape[-1:] != (81,) or grids.ndim > 2:
        raise DataError(f"puzzles {puzzles.shape} and grids {grids.shape} cannot be checked; "
                        f"expected two [N, 81] or two [81] arrays")
    if grids.ndim == 1:
        return _valid(puzzles, grids)
    ok = np.empty(len(grids), bool)
    for s in range(0, len(grids), CHUNK):
        ok[s:s + CHUNK] = _valid(puzzles[s:s + CHUNK], grids[s:s + CHUNK])
    return ok


# ----------------------------------------------------------------------------- picture

def _draw_grid(ax, puzzle, prediction, answer, fontsize):
    from matplotlib.patches import Rectangle
    wrong = prediction != (answer if answer is not None else np.where(puzzle > 0, puzzle, prediction))
    for i in range(81):
        r, c = divmod(i, 9)
        if wrong[i]:
            ax.add_patch(Rectangle((c, r), 1, 1, color="#fdd"))
        if prediction[i]:
            color = "red" if wrong[i] else "black" if puzzle[i] else "blue"
            ax.text(c + 0.5, r + 0.55, str(prediction[i]), ha="center", va="center", fontsize=fontsize, color=color)
    for k in range(10):
        width = 2 if k % 3 == 0 else 0.5
        ax.plot([k, k], [0, 9], color="black", lw=width)
        ax.plot([0, 9], [k, k], color="black", lw=width)
    ax.set_xlim(-0.1, 9.1)
    ax.set_ylim(9.1, -0.1)
    ax.set_aspect("equal")
    ax.axis("off")


def draw(puzzle, prediction, answer=None, steps=None, path="sudoku.png", title=None):
    """Save a picture of a prediction: givens black, predicted digits blue, cells that differ from answer red.
    steps: the prediction after each supervision step, drawn as small panels before the final one."""
    # a bare Figure renders through Agg without pyplot, so no global backend state and nothing to close
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def grid(g):
        return None if g is None else np.asarray(g).reshape(81).astype(np.int64)

    puzzle, answer = grid(puzzle), grid(answer)
    panels = [(f"step {k + 1}", grid(s)) for k, s in enumerate(steps or [])] + [("final" if steps else None,
                                                                                 grid(prediction))]
    size = 4 if len(panels) == 1 else 2.2
    cols = min(len(panels), 6)          # wrap long refinements into rows, so each panel stays legible
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(size * cols, size * rows + (0.4 if title else 0)), layout="constrained")
    FigureCanvasAgg(fig)
    for k, (name, pred) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, k + 1)
        _draw_grid(ax, puzzle, pred, answer, fontsize=4 * size)
        if name:
            ax.set_title(name, fontsize=3.5 * size + 2)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


# ------------------------------------------------------------------------------------ training glue
# Tokens: 0 pad, 1 blank, digits 1-9 as 2-10. All 81 cells are supervised.
VOCAB_SIZE = 11

# What differs from the defaults of train.TrainConfig, data.DataConfig and model.TRMConfig, which are the
# reference's Sudoku-Extreme run (train.py adds HRM's presets, hrm and hrm-paper, to every task).
PRESETS = {
    # The reference's Sudoku-Extreme run: MLP variant without positions, 1000 puzzles x 1000 augmentations.
    # The reference evaluates on the whole test set; periodic evaluations here use eval_limit puzzles.
    "paper": dict(data="auto", test_puzzles=0, min_blanks=50, difficulty=1, eval_interval=5000,
                  checkpoint_interval=5000),
    # Chosen by measurement on 2 CPU cores (README, "Sudoku"): a 64-wide model and 1 prefix position (97 positions
    # make the token MLP 2x wider), T 2; EMA 0.99 suits a short run (0.999 would still average the first minutes
    # in). lr 4e-3 learns fastest, with a cosine down to a tenth of it. n 3 over 2400 steps (95.7% and 96.8% held
    # out, seeds 0 and 1; 2700 steps: 96.6-97.1%, a minute longer) beats n 2 over the 3600 steps of about the same
    # time (91.0%; n 2 over 3000: 93.7-95.6%): its model answered its training puzzles no better than held-out
    # ones, so it lacked depth, not data. torch.compile makes a CPU step 1.5x faster after a 30 s compile (it needs
    # a C++ compiler, else the run goes on without it). bf16 is 1.6-2x faster than float32 on a CPU with bf16
    # units; use --dtype float32 on one without.
    "cpu": dict(train_puzzles=2000, num_aug=100, max_blanks=55, d_model=64, n_heads=4, puzzle_emb_len=1, n=3, T=2,
                batch_size=128, lr=4e-3, warmup_steps=100, lr_min_ratio=0.1, weight_decay=0.1, puzzle_emb_lr=4e-3,
                puzzle_emb_weight_decay=0.1, ema=0.99, max_steps=2400, eval_interval=800, checkpoint_interval=800,
                dtype="bfloat16", compile="on"),
}


# The task's own data settings (train.py refuses another task's), and those read only when puzzles are generated.
SETTINGS = ("min_blanks", "max_blanks", "difficulty")
GENERATOR_SETTINGS = ("min_blanks", "max_blanks", "difficulty")


def shape(dcfg):
    """(vocabulary size, tokens per puzzle) of the data these settings build: what the model is sized by."""
    return VOCAB_SIZE, 81


def augmented_groups(q, a, num_aug, seed):
    """Each puzzle followed by num_aug random augmentations of it: one group of 1 + num_aug rows per puzzle."""
    rng = np.random.default_rng(seed)
    qs, as_ = np.repeat(q, num_aug + 1, axis=0), np.repeat(a, num_aug + 1, axis=0)
    aug_rows = np.flatnonzero(np.arange(len(qs)) % (num_aug + 1))
    progress = Progress("augmenting sudoku puzzles", len(aug_rows))
    for start in range(0, len(aug_rows), 200_000):   # chunks bound the index maps' memory
        progress(start)
        rows = aug_rows[start:start + 200_000]
        qs[rows], as_[rows] = augment(qs[rows], as_[rows], rng)
    return qs, as_


def build_datasets(dcfg, splits=("train", "test")):
    """The tokenised train (augmented) and test (as is) sets, cached under data/sudoku/ by their settings."""
    def generated(count, seed):
        return generate(count, dcfg.min_blanks, dcfg.max_blanks, seed=seed, min_effort=dcfg.difficulty)[:2]

    @functools.cache          # both splits at once, so that the test split can be kept apart from training
    def both():
        return held_out_splits(dcfg, "Sudoku-Extreme", load_extreme, generated)

    def build(split):
        q, a, source = both()[split]
        print(f"{split} set: {len(q)} {source} puzzles")
        if split == "test":
            return Dataset.ungrouped(q + 1, a + 1, VOCAB_SIZE)
        q, a = augmented_groups(q, a, dcfg.num_aug, dcfg.data_seed)
        return Dataset.grouped(q + 1, a + 1, dcfg.num_aug + 1, VOCAB_SIZE)

    def key(split):
        count, aug = (dcfg.train_puzzles, dcfg.num_aug) if split == "train" else (dcfg.test_puzzles, 0)
        return (f"{source_key(dcfg.data, split, CACHE_DIR)}-{split}-{count}-aug{aug}"
                f"-b{dcfg.min_blanks}-{dcfg.max_blanks}-d{dcfg.difficulty}-s{dcfg.data_seed}")

    return cached_splits("sudoku", splits, key, build)


def check(inputs, preds):
    """Valid-solution share for the evaluator: token arrays [N, 81] in, bool [N] out."""
    return valid_solutions((inputs - 1).astype(np.uint8), np.clip(preds - 1, 0, 9).astype(np.uint8))


def parse_solve(text, mcfg):
    """A puzzle string for `evaluate.py --solve`: tokens [1, 81] and, when the puzzle has exactly one
    solution, that solution as labels (else no labels, so nothing is scored)."""
    puzzle = parse_grid(text, "--solve puzzle")
    solutions, _ = solve(puzzle, limit=2)
    labels = solutions[0] + 1 if len(solutions) == 1 else np.zeros(81, np.uint8)
    if len(solutions) != 1:
        print(f"note: this puzzle has {'no' if not solutions else 'more than one'} solution")
    return (puzzle + 1)[None].astype(np.uint8), labels[None].astype(np.uint8)


def describe_solution(inputs, pred):
    puzzle, grid = inputs[0] - 1, np.clip(pred - 1, 0, 9).astype(np.uint8)
    rows = [" ".join(grid_to_string(grid)[r * 9:(r + 1) * 9]) for r in range(9)]
    verdict = "a valid solution" if valid_solutions(puzzle.astype(np.uint8), grid) else "NOT a valid solution"
    return "\n".join(["puzzle:  " + grid_to_string(puzzle), "answer:"] + rows + [f"the answer is {verdict}"])


def draw_steps(inputs, labels, steps, path):
    answer = labels[0] - 1 if labels[0].any() else None
    return draw(inputs[0] - 1, np.clip(steps[-1] - 1, 0, 9), answer=answer,
                steps=[np.clip(s - 1, 0, 9) for s in steps], path=path)


def page_view(inputs, labels):
    """How evaluate.py's --html page draws a Sudoku, inputs and labels tokens [81]: each token's text and colour
    (pad grey, a blank empty), the givens, 3x3 boxes, and the answer when the puzzle has one solution, else None."""
    return dict(title="Sudoku", rows=9, cols=9, box=3, ink="#1f4fb4", givens=(inputs > 1).tolist(),
                tokens=[("", "#9e9e9e"), ("", "#ffffff")] + [(str(d), "#ffffff") for d in range(1, 10)],
                answer=labels.tolist() if labels.any() else None)
