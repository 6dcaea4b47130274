"""Evaluate a trained TRM: accuracy after every supervision step (test-time depth), plots, one-puzzle solving.

    python evaluate.py --checkpoint out/sudoku-cpu/ckpt_00004000.pt [--steps 32] [--limit 1000]
    python evaluate.py --checkpoint CKPT --solve "<81 characters>"
"""
import argparse
import dataclasses
import glob
import importlib
import json
import math
import os
import sys
import time

import numpy as np
import torch

from data import Dataset, DataError, Ranks, SettingsError, TrainConfig, eval_rows, resolve_config, to_device
from model import TRM, SwiGLU, TRMConfig, from_reference_state_dict


class Progress:
    """Prints "eval: done/total rows, ETA" at most every `every` seconds."""

    def __init__(self, total, every=5.0):
        self.total, self.every, self.start = total, every, time.time()
        self.last = self.start

    def __call__(self, done):
        now = time.time()
        if now - self.last >= self.every and done < self.total:
            eta = (now - self.start) / done * (self.total - done)
            print(f"eval: {done}/{self.total} rows, ETA {eta:.0f}s", flush=True)
            self.last = now


class Logger:
    """Prints a line and appends its record, if any, to metrics.jsonl; ranks other than 0 say nothing."""

    def __init__(self, out, quiet=False):
        self.file = open(os.path.join(out, "metrics.jsonl"), "a") if out else None
        self.quiet = quiet

    def __call__(self, line, **record):
        if not self.quiet:
            print(line, flush=True)
        if self.file and record:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()


def format_time(seconds):
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@torch.no_grad()
def evaluate(model, ds, N, batch_size, device, autocast, limit=None, check=None, keep=(), ranks=None):
    """Run the test rows of the first `limit` puzzles (all when None) for N supervision steps (no halting) and
    score the answer after each step. Returns one dict per step: exact (whole answer right), token (share of
    labelled tokens right), count, valid (share the task's checker accepts, when it has one), and for the steps
    in keep the predictions (uint8 [rows, L]) and halt probabilities (sigmoid of the halt logit, [rows]).
    Under torchrun (ranks) every rank runs an equal share of the rows; rank 0 gets the whole results."""
    model.eval()
    mine = (ranks or Ranks()).rows(eval_rows(ds, limit))
    progress = Progress(mine.stop - mine.start)
    sums = torch.zeros(3, N, dtype=torch.float64, device=device)    # exact, token, valid after each step
    tokens = count = 0
    kept = {k: ([], []) for k in keep}
    for start in range(mine.start, mine.stop, batch_size):
        batch = to_device(ds, np.arange(start, min(start + batch_size, mine.stop)), device)
        inputs, labels = batch["inputs"], batch["labels"]
        mask = labels != 0
        y, z = model.initial_state(inputs.shape[0])
        puzzle_rows = model.puzzle_emb[batch["puzzle_ids"]]
        for k in range(1, N + 1):
            with autocast:
                (y, z), logits, q_halt = model(inputs, puzzle_rows, y, z)
            preds = logits.argmax(-1)
            right = (preds == labels) & mask
            sums[0, k - 1] += (right | ~mask).all(-1).sum()
            sums[1, k - 1] += right.sum()
            if check is not None:
                sums[2, k - 1] += float(check(inputs.cpu().numpy(), preds.cpu().numpy()).sum())
            if k in kept:
                kept[k][0].append(preds.to(torch.uint8).cpu().numpy())
                kept[k][1].append(torch.sigmoid(q_halt).float().cpu().numpy())
        tokens += mask.sum().item()
        count += inputs.shape[0]
        progress(count)
    ranks = ranks or Ranks()
    exact, token, valid = ranks.sum(sums).cpu().numpy()
    tokens, count = ranks.sum(torch.tensor([tokens, count], dtype=torch.float64, device=device)).tolist()
    kept = {k: [np.concatenate([a for part in ranks.gather_objects(arrays) for a in part]) for arrays in pair]
            for k, pair in kept.items()}
    results = []
    for k in range(1, N + 1):
        r = dict(step=k, exact=exact[k - 1] / count, token=token[k - 1] / max(tokens, 1), count=int(count))
        if check is not None:
            r["valid"] = valid[k - 1] / count
        if k in kept:
            r["preds"], r["halt"] = kept[k]
        results.append(r)
    return results


@torch.no_grad()
def evaluate_halting(model, ds, N, batch_size, device, autocast, limit=None, ranks=None, threshold=0.5):
    """Inference with halting: each puzzle stops after the first step whose halt probability (sigmoid of the
    halt logit) exceeds threshold, at most N steps; 0.5 is training's rule, halt logit > 0. A halted slot
    takes the next puzzle at once, so batches stay full while puzzles remain (the paper halts only in
    training). Returns exact, token accuracy, mean steps used and count."""
    model.eval()
    ranks = ranks or Ranks()
    mine = ranks.rows(eval_rows(ds, limit))
    lo, hi = mine.start, mine.stop
    B, L = max(1, min(batch_size, hi - lo)), ds.seq_len
    inputs = torch.zeros(B, L, dtype=torch.long, device=device)
    labels = torch.zeros_like(inputs)
    ids = torch.zeros(B, dtype=torch.long, device=device)
    steps = torch.zeros(B, dtype=torch.long, device=device)
    active = torch.zeros(B, dtype=torch.bool, device=device)
    y0, z0 = model.initial_state(B)
    y, z = y0, z0
    sums = torch.zeros(4, dtype=torch.float64, device=device)     # exact, right tokens, labelled tokens, steps
    free, next_row = torch.arange(B, device=device), lo
    progress = Progress(hi - lo)
    while True:
        take = min(len(free), hi - next_row)
        fresh = torch.zeros(B, dtype=torch.bool, device=device)
        if take:
            slots, new = free[:take], to_device(ds, np.arange(next_row, next_row + take), device)
            inputs[slots], labels[slots], ids[slots] = new["inputs"], new["labels"], new["puzzle_ids"]
            fresh[slots] = True
            next_row += take
        active = active | fresh
        if not active.any():
            break
        y = torch.where(fresh[:, None, None], y0, y)
        z = torch.where(fresh[:, None, None], z0, z)
        steps = torch.where(fresh, 0, steps) + 1
        with autocast:
            (y, z), logits, q_halt = model(inputs, model.puzzle_emb[ids], y, z)
        done = active & ((q_halt > math.log(threshold / (1 - threshold))) | (steps >= N))
        mask = labels != 0
        right = (logits.argmax(-1) == labels) & mask
        sums += torch.stack([((right | ~mask).all(-1) & done).sum(), (right & done[:, None]).sum(),
                             (mask & done[:, None]).sum(), (steps * done).sum()]).double()
        active = active & ~done
        free = (~active).nonzero()[:, 0]       # one host sync per step: which slots take new puzzles
        progress(next_row - lo)
    exact, right, tokens, used = ranks.sum(sums).tolist()
    count = ranks.sum(torch.tensor(float(hi - lo), dtype=torch.float64, device=device)).item()
    return dict(exact=exact / count, token=right / max(tokens, 1), mean_steps=used / count, count=int(count))


def plot(results, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps = [r["step"] for r in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("exact", "token", "valid"):
        if key in results[0]:
            ax.plot(steps, [100 * r[key] for r in results], marker=".", label=key)
    ax.set_xlabel("supervision step")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------ devices and checkpoints

def setup_runtime(tcfg):
    """(device, dtype name, whether to compile, the autocast context) for the settings. --device auto takes
    CUDA, then Apple's MPS, then the CPU; under torchrun each process takes the GPU of its LOCAL_RANK."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    name = tcfg.device if tcfg.device != "auto" else "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # MPS is untested here (no Mac): float32 unless --dtype bfloat16 asks for autocast there.
    dtype = tcfg.dtype if tcfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    compile_on = tcfg.compile == "on" or (tcfg.compile == "auto" and device.type == "cuda")
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    # bf16 forward with float32 master weights: autocast casts each weight once per region.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    return device, dtype, compile_on, autocast


def read_torch_file(path):
    """torch.load of a checkpoint file, with a missing or unreadable file as one sentence."""
    if not os.path.isfile(path):
        raise DataError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise DataError(f"checkpoint {path} could not be read ({type(e).__name__}); "
                        f"it is truncated or not a checkpoint") from None


def load_checkpoint(path, state=None):
    """One of our checkpoints (state: its contents when already read), checked for the parts a run needs."""
    state = read_torch_file(path) if state is None else state
    if not isinstance(state, dict) or not {"model", "model_config", "train_config"} <= state.keys():
        raise DataError(f"{path} is not a checkpoint of this project (model, model_config and train_config expected)")
    return state


def save_checkpoint(path, state):
    """Write to a temporary file, flush it to disk, then rename: a crash leaves the old file or the new one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoints_in(folder):
    return sorted(glob.glob(os.path.join(folder, "ckpt_*.pt")))


def find_checkpoint(resume, out):
    """--resume PATH, or --resume auto: the newest checkpoint in out that loads (a damaged one is skipped)."""
    if resume != "auto":
        return resume, load_checkpoint(resume)
    for path in reversed(checkpoints_in(out)):
        try:
            return path, load_checkpoint(path)
        except DataError as e:
            print(f"skipping {path}: {e}")
    raise DataError(f"--resume auto found no complete checkpoint in {out}")


def flops_per_sample(mcfg):
    """Matmul FLOPs of one training supervision step for one sample, counted from the shapes (norms, RoPE, the
    loss and the optimizer are not matmuls and not counted). S = P + L positions, F and Ft the SwiGLU widths
    over D channels and over S positions. Per net call and layer:
        attention:   2·S·D·4D (qkv, o) + 4·S²·D (scores, weighted values) + 6·S·D·F (gate, up, down)
        token MLP:   6·D·S·Ft (SwiGLU over positions)                     + 6·S·D·F
    A step makes T(n+1) net calls forward; backward costs twice the forward of the n+1 calls with gradient.
    The heads run once with gradient, x3: output head 2·S·D·V (it sees the prefix positions too), Q head
    2·D·2."""
    S, D, V = mcfg.puzzle_emb_len + mcfg.seq_len, mcfg.d_model, mcfg.vocab_size
    F = SwiGLU.width(D, mcfg.expansion)
    if mcfg.mlp_t:
        mix = 6 * D * S * SwiGLU.width(S, mcfg.expansion)
    else:
        mix = 2 * S * D * 4 * D + 4 * S * S * D
    net = mcfg.n_layers * (mix + 6 * S * D * F)
    return (mcfg.T * (mcfg.n + 1) + 2 * (mcfg.n + 1)) * net + 3 * (2 * S * D * V + 2 * D * 2)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype):
    """FLOP/s of a large square matmul in dtype on device, measured now (best of 7): the MFU denominator."""
    N = 8192 if device.type == "cuda" else 2048
    a, b = (torch.randn(N, N, device=device).to(getattr(torch, dtype)) for _ in range(2))
    best = float("inf")
    for _ in range(7):
        synchronize(device)
        t = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * N ** 3 / best


def peak_memory(device, reset=False):
    """Peak bytes: CUDA memory allocated, or on a CPU the process's peak resident set (Linux), reset on request."""
    if device.type == "cuda":
        if reset:
            torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.max_memory_allocated(device)
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    except OSError:
        return float("nan")


def reference_config(sd, task):
    """A TRMConfig for a reference checkpoint, read off its tensor shapes; n and T are the paper's for the task."""
    V, D = sd["embed_tokens.weight"].shape
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    mlp_t = "blocks.0.token_mlp.gate_up.weight" in sd
    seq_len = {"sudoku": 81, "maze": 900, "arc": 900}[task]
    return TRMConfig(vocab_size=V, seq_len=seq_len, d_model=D, n_layers=n_layers, mlp_t=mlp_t, rope=not mlp_t,
                     num_puzzle_ids=sd["puzzle_emb"].shape[0], n=6 if task == "sudoku" else 4, T=3, N_sup=16)


def load_for_eval(path, task=None):
    """Our checkpoint (EMA weights) or a reference state_dict. Returns (model, train config dict, model config)."""
    raw = read_torch_file(path)
    if isinstance(raw, dict) and any(k.removeprefix("_orig_mod.").startswith("inner.") for k in raw):
        task = task or "sudoku"
        sd = from_reference_state_dict(raw)
        mcfg = reference_config(sd, task)
        tcfg = dataclasses.asdict(resolve_config({"task": task, "preset": "paper"})[0])   # the paper's test set
    else:
        state = load_checkpoint(path, raw)
        mcfg, tcfg = TRMConfig(**state["model_config"]), state["train_config"]
        sd = {**state["model"], **state["ema"]}   # EMA parameters, the live puzzle-embedding buffer
        sd["puzzle_emb"] = state["model"]["puzzle_emb"]
    model = TRM(mcfg)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
        raise DataError(f"checkpoint {path} does not fit its own model config: {first}") from None
    return model.eval(), tcfg, mcfg


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate a TRM checkpoint after every supervision step.")
    p.add_argument("--checkpoint", required=True, help="our ckpt_*.pt, or a reference state_dict")
    p.add_argument("--task", default=None, help="for a reference checkpoint: sudoku, maze or arc")
    p.add_argument("--steps", type=int, default=None, help="supervision steps at test time (default: the training N_sup)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first K test puzzles (arc: tasks)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--data", default=None, help="override the test data source (generate, hub, or a path)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--out", default=None, help="folder for the table, plot and pictures (default: the checkpoint's)")
    p.add_argument("--solve", default=None, help="solve one puzzle given as a string (sudoku: 81 characters)")
    p.add_argument("--halt", action="store_true", help="also run with halting: each puzzle stops when its halt "
                   "probability exceeds --halt-threshold; reports accuracy and the mean steps used")
    p.add_argument("--halt-threshold", type=float, default=0.95,
                   help="halt probability that stops a puzzle (0.5: training's rule, halt logit > 0)")
    args = p.parse_args(argv)
    try:
        run(args)
    except (DataError, SettingsError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(args):
    ranks = Ranks.from_env()     # under torchrun every rank evaluates a share; rank 0 reports
    if not ranks.main:
        sys.stdout = open(os.devnull, "w")
    model, tcfg_dict, mcfg = load_for_eval(args.checkpoint, args.task)
    tcfg = TrainConfig(**{**tcfg_dict, "dtype": args.dtype, **({"data": args.data} if args.data else {})})
    task = importlib.import_module(tcfg.task)
    device, _, _, autocast = setup_runtime(tcfg)
    model.to(device)
    N = mcfg.N_sup if args.steps is None else args.steps
    if not 0 < args.halt_threshold < 1:
        raise SettingsError(f"--halt-threshold is {args.halt_threshold}; expected a probability between 0 and 1")
    if N < 1 or args.limit < 0 or args.batch_size < 1:
        raise SettingsError("--steps, --limit and --batch-size must be positive whole numbers")
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    os.makedirs(out, exist_ok=True)

    if args.solve is not None:
        if not hasattr(task, "parse_solve"):
            raise SettingsError(f"--solve is not available for {tcfg.task}: the model only knows the tasks it was trained on")
        inputs, labels = task.parse_solve(args.solve, mcfg)
        ds = Dataset.ungrouped(inputs, labels, mcfg.vocab_size)
        res = evaluate(model, ds, N, 1, device, autocast, keep=range(1, N + 1))
        steps = [r["preds"][0] for r in res]
        print(task.describe_solution(inputs, steps[-1]))
        path = task.draw_steps(inputs, labels, steps, os.path.join(out, f"{tcfg.task}_solve.png"))
        print(f"picture: {path}")
        return

    _, test_ds = task.build_datasets(tcfg, splits=("test",))
    score = getattr(task, "score", None)
    res = evaluate(model, test_ds, N, args.batch_size, device, autocast, limit=args.limit or None,
                   check=getattr(task, "check", None), keep=(N,) if score else (), ranks=ranks)
    halting = args.halt and evaluate_halting(model, test_ds, N, args.batch_size, device, autocast,
                                             limit=args.limit or None, ranks=ranks, threshold=args.halt_threshold)
    if not ranks.main:     # the others only took part in the evaluations
        return
    has_valid = "valid" in res[0]
    print(f"{res[0]['count']} test rows, {N} supervision steps (trained with N_sup {mcfg.N_sup})")
    print("step   exact   token" + ("   valid" if has_valid else ""))
    for r in res:
        print(f"{r['step']:>4} {100 * r['exact']:6.2f}% {100 * r['token']:6.2f}%" + (f" {100 * r['valid']:6.2f}%" if has_valid else ""))
    path = plot(res, os.path.join(out, f"{tcfg.task}_accuracy_by_step.png"),
                f"{tcfg.task}: accuracy by supervision step (trained N_sup={mcfg.N_sup})")
    print(f"plot: {path}")
    if score:
        print(f"after {N} steps: " + score(tcfg, res[-1]["preds"], res[-1]["halt"], out=out)[1])
    if halting:
        print(f"with halting at p > {args.halt_threshold}: exact {halting['exact']:.2%}, token {halting['token']:.2%}, "
              f"{halting['mean_steps']:.2f} steps on average (at most {N}); "
              f"fixed depth {N}: exact {res[-1]['exact']:.2%}, token {res[-1]['token']:.2%}")


if __name__ == "__main__":
    main()
