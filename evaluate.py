"""Evaluate a trained TRM: accuracy after every supervision step (test-time depth), plots, one-puzzle solving.

    python evaluate.py --checkpoint out/sudoku-cpu/ckpt_00004000.pt [--steps 32] [--limit 1000]
    python evaluate.py --checkpoint CKPT --solve "<81 characters>"
    python evaluate.py --checkpoint CKPT --solve TASK.json      # ARC, a model trained with --task-embedding encoder
"""
import dataclasses
import functools
import glob
import importlib
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch

from data import (ArgumentParser, Dataset, DataError, Ranks, SettingsError, TrainConfig, check_config, config_from,
                  eval_rows, micro_batch_size, resolve_config, shown, to_device)
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
        # opened at the first record, so that a run that fails before its first step leaves no empty file
        self.path = os.path.join(out, "metrics.jsonl") if out else None
        self.file, self.quiet = None, quiet

    def __call__(self, line, **record):
        if not self.quiet:
            print(line, flush=True)
        if self.path and record:
            self.file = self.file or open(self.path, "a")
            self.file.write(json.dumps(null_for_nan(record)) + "\n")
            self.file.flush()


def null_for_nan(value):
    """A record with NaN (an unscored accuracy) as null: json.dumps would write NaN, which is not JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: null_for_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [null_for_nan(v) for v in value]
    return value


def format_time(seconds):
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


@torch.no_grad()
def evaluate(model, ds, N, batch_size, device, autocast, limit=None, check=None, keep=(), ranks=None):
    """Run the test rows of the first `limit` puzzles (all when None) for N supervision steps (no halting) and
    score the answer after each step. Returns one dict per step: exact (whole answer right), token (share of
    labelled tokens right), count, scored (rows with a known answer: exact and token are NaN when none has one,
    never 100%), valid (share the task's checker accepts, when it has one), and for the steps
    in keep the predictions (uint8 [rows, L]) and halt probabilities (sigmoid of the halt logit, [rows]).
    Under torchrun (ranks) every rank runs an equal share of the rows; rank 0 gets the whole results."""
    model.eval()
    mine = (ranks or Ranks()).rows(eval_rows(ds, limit))
    progress = Progress(mine.stop - mine.start)
    sums = torch.zeros(3, N, dtype=torch.float64, device=device)    # exact, token, valid after each step
    tokens = count = scored = 0
    kept = {k: ([], []) for k in keep}
    for start in range(mine.start, mine.stop, batch_size):
        batch = to_device(ds, np.arange(start, min(start + batch_size, mine.stop)), device, model.reads_demos)
        inputs, labels = batch["inputs"], batch["labels"]
        mask = labels != 0
        y, z = model.initial_state(inputs.shape[0])
        puzzle_rows = model.task_rows(batch)
        for k in range(1, N + 1):
            with autocast:
                (y, z), logits, q = model(inputs, puzzle_rows, y, z)
            preds = logits.argmax(-1)
            right = (preds == labels) & mask
            sums[0, k - 1] += ((right | ~mask).all(-1) & mask.any(-1)).sum()
            sums[1, k - 1] += right.sum()
            if check is not None:
                sums[2, k - 1] += float(check(inputs.cpu().numpy(), preds.cpu().numpy()).sum())
            if k in kept:
                kept[k][0].append(preds.to(torch.uint8).cpu().numpy())
                kept[k][1].append(torch.sigmoid(model.halt_logit(q)).cpu().numpy())
        tokens += mask.sum().item()
        scored += mask.any(-1).sum().item()
        count += inputs.shape[0]
        progress(count)
    ranks = ranks or Ranks()
    exact, token, valid = ranks.sum(sums).cpu().numpy()
    tokens, count, scored = ranks.sum(torch.tensor([tokens, count, scored], dtype=torch.float64,
                                                   device=device)).tolist()
    kept = {k: [np.concatenate([a for part in ranks.gather_objects(arrays) for a in part]) for arrays in pair]
            for k, pair in kept.items()}
    results = []
    for k in range(1, N + 1):
        r = dict(step=k, exact=exact[k - 1] / scored if scored else math.nan,
                 token=token[k - 1] / tokens if tokens else math.nan, count=int(count), scored=int(scored))
        if check is not None:
            r["valid"] = valid[k - 1] / count
        if k in kept:
            r["preds"], r["halt"] = kept[k]
        results.append(r)
    return results


@torch.no_grad()
def during_training(task, tcfg, model, ds, device, autocast, ranks):
    """train.py's periodic evaluation: held-out accuracy after N_sup steps, and for ARC its voted pass@k (and an
    encoder's collapse diagnostics). Returns the per-step results, the log line's text and the task's scores
    (rank 0's; the others' are empty)."""
    N, score = model.cfg.N_sup, getattr(task, "score", None)
    B = tcfg.batch_size // ranks.world
    res = evaluate(model, ds, N, B, device, autocast, limit=tcfg.eval_limit or None,
                   check=getattr(task, "check", None), keep=(N,) if score else (), ranks=ranks)
    last = res[-1]
    preds, halt = last.pop("preds", None), last.pop("halt", None)
    diagnosed = (task.diagnostics(model, tcfg, ds, device, autocast, ranks, B, evaluate) if model.reads_demos
                 else ({}, ""))
    if not ranks.main:
        return res, "", {}
    scores, line = score(tcfg, preds, halt) if score else ({}, "")
    scores, line = {**scores, **diagnosed[0]}, "\n".join(filter(None, (line, diagnosed[1])))
    accuracy = (f"exact {last['exact']:.2%}, token {last['token']:.2%} on {last['scored']} held-out rows"
                if last["scored"] else f"unscored: none of the {last['count']} held-out rows has a known answer")
    return res, f"{accuracy} after {N} supervision steps (EMA weights)" + (f"; {line}" if line else ""), scores


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
    rows = None       # per slot, what fills its prefix (model.task_rows), allocated at the first fill
    steps = torch.zeros(B, dtype=torch.long, device=device)
    active = torch.zeros(B, dtype=torch.bool, device=device)
    y0, z0 = model.initial_state(B)
    y, z = y0, z0
    sums = torch.zeros(5, dtype=torch.float64, device=device)     # exact, right tokens, labelled tokens, steps, scored
    free, next_row = torch.arange(B, device=device), lo
    progress = Progress(hi - lo)
    while True:
        take = min(len(free), hi - next_row)
        fresh = torch.zeros(B, dtype=torch.bool, device=device)
        if take:
            slots, new = free[:take], to_device(ds, np.arange(next_row, next_row + take), device, model.reads_demos)
            new_rows = model.task_rows(new)
            rows = new_rows.new_zeros((B, *new_rows.shape[1:])) if rows is None else rows
            inputs[slots], labels[slots], rows[slots] = new["inputs"], new["labels"], new_rows
            fresh[slots] = True
            next_row += take
        active = active | fresh
        if not active.any():
            break
        y = torch.where(fresh[:, None, None], y0, y)
        z = torch.where(fresh.view(-1, *[1] * (z.dim() - 1)), z0, z)      # multi-scale z is 4-D
        steps = torch.where(fresh, 0, steps) + 1
        with autocast:
            (y, z), logits, q = model(inputs, rows, y, z)
        done = active & ((model.halt_logit(q) > math.log(threshold / (1 - threshold))) | (steps >= N))
        mask = labels != 0
        right = (logits.argmax(-1) == labels) & mask
        labelled = mask.any(-1) & done
        sums += torch.stack([((right | ~mask).all(-1) & labelled).sum(), (right & done[:, None]).sum(),
                             (mask & done[:, None]).sum(), (steps * done).sum(), labelled.sum()]).double()
        active = active & ~done
        free = (~active).nonzero()[:, 0]       # one host sync per step: which slots take new puzzles
        progress(next_row - lo)
    exact, right, tokens, used, scored = ranks.sum(sums).tolist()
    count = ranks.sum(torch.tensor(float(hi - lo), dtype=torch.float64, device=device)).item()
    return dict(exact=exact / scored if scored else math.nan, token=right / tokens if tokens else math.nan,
                mean_steps=used / count, count=int(count))


# ------------------------------------------------------------------------------ depth x breadth
# Test-time compute beyond more supervision steps: K trajectories of every puzzle run side by side in the
# batch, each from its own start and with Gaussian noise on its carried state after every supervision step
# (PTRM, arXiv 2605.19943; Equilibrium Reasoners, arXiv 2605.21488); one answer per puzzle is then chosen.
# model.py's recursion runs unchanged: only the (y, z) carried between supervision steps differ.

SELECTIONS = ("q", "vote", "converged")


def start_states(model, n, init, generator):
    """y, z [n, S, D] for n trajectories: the model's y_init, z_init ("fixed"), or ("random") one truncated-normal
    vector of std 1 per trajectory for each, shared by its positions as y_init is."""
    y, z = model.initial_state(n)
    if init == "fixed":
        return y, z
    draw = [torch.nn.init.trunc_normal_(torch.empty(n, *[1] * (s.dim() - 2), s.shape[-1], device=s.device),
                                        std=1.0, generator=generator).expand_as(s) for s in (y, z)]
    return draw[0], draw[1]


def select(correct, q, preds, residual, K, valid=None):
    """Right answers (sums over the batch) under each way of choosing one of the first K trajectories of every
    puzzle, and pass@K. correct [B, K'] (whole answer exact), q [B, K'] final halt logits, preds [B, K', L],
    residual [B, K'] (how much y still moved), valid [B, K'] (the task's checker accepts), for K' >= K."""
    c, q, p, r = correct[:, :K], q[:, :K], preds[:, :K], residual[:, :K]
    rows = torch.arange(len(c), device=c.device)
    same = (p[:, :, None] == p[:, None]).all(-1)                    # [B, K, K] trajectories with equal answers
    votes = same.sum(-1)                                            # [B, K] votes for each trajectory's answer
    mean_q = (same * q[:, None, :]).sum(-1) / votes                 # the mean halt logit of those voters
    # the vote: most votes, ties to the higher mean halt probability (a term below 1 cannot outweigh a vote)
    picks = dict(q=q.argmax(1), vote=(votes + 0.999 * torch.sigmoid(mean_q)).argmax(1), converged=r.argmin(1))
    out = {name: c[rows, i].sum() for name, i in picks.items()}
    if valid is not None:                 # the first trajectory the rules accept, else the Q head's choice
        v = valid[:, :K]
        out["valid"] = c[rows, torch.where(v.any(1), v.int().argmax(1), picks["q"])].sum()
    out["pass@K"] = c.any(1).sum()
    return out


@torch.no_grad()
def evaluate_breadth(model, ds, steps, breadths, batch_size, device, autocast, init="fixed", noise=0.0,
                     noise_y=False, seed=0, limit=None, check=None, threshold=None, keep=False, ranks=None):
    """K = max(breadths) trajectories of every test puzzle for N = max(steps) supervision steps, scored after each
    k in steps from the first K' trajectories, for each K' in breadths (trajectory j of a run with K' = 64 is
    trajectory j of one with K' = 4, so one run gives the whole table). noise: the std of the Gaussian noise
    added to the carried z (and y with noise_y) after every step. threshold: a trajectory stops after the first
    step whose halt probability exceeds it (its state and answer frozen, its later steps not counted).
    Returns ({(k, K'): accuracy under each selection, pass@K, net calls per puzzle}, the kept predictions and
    halt probabilities {k: ([rows, K, L], [rows, K])} when keep, seconds taken)."""
    model.eval()
    ranks, t0 = ranks or Ranks(), time.time()
    mine = ranks.rows(eval_rows(ds, limit))
    N, K, per_batch = max(steps), max(breadths), max(1, batch_size // max(breadths))
    generator = torch.Generator(device=device).manual_seed(seed)
    names = SELECTIONS + (("valid",) if check else ()) + ("pass@K", "steps")
    sums = torch.zeros(len(steps), len(breadths), len(names), dtype=torch.float64, device=device)
    kept = {k: ([], []) for k in steps} if keep else {}
    progress = Progress(mine.stop - mine.start)
    for start in range(mine.start, mine.stop, per_batch):
        batch = to_device(ds, np.arange(start, min(start + per_batch, mine.stop)), device, model.reads_demos)
        labels, B = batch["labels"], len(batch["labels"])
        inputs = batch["inputs"].repeat_interleave(K, 0)                 # [B*K, L], a puzzle's K side by side
        puzzle_rows = model.task_rows(batch).repeat_interleave(K, 0)
        y, z = start_states(model, B * K, init, generator)
        y_out, live = y, torch.ones(B * K, dtype=torch.bool, device=device)
        used, change = torch.zeros(B * K, device=device), torch.zeros(B * K, device=device)
        preds = q = residual = None
        for k in range(1, N + 1):
            with autocast:
                (y_next, z_next), logits, q_next = model(inputs, puzzle_rows, y, z)
                q_next = model.halt_logit(q_next)
            last_change, change = change, (y_next.float() - y_out.float()).pow(2).mean((1, 2)).sqrt()
            if k == 1:
                preds, q, residual = logits.argmax(-1), q_next, change
            keep_new = live[:, None, None]                               # frozen trajectories keep their state
            y_out = torch.where(keep_new, y_next, y_out.to(y_next.dtype))
            z = torch.where(live.view(-1, *[1] * (z.dim() - 1)), z_next, z.to(z_next.dtype))   # multi z: 4-D
            preds = torch.where(live[:, None], logits.argmax(-1), preds)
            q = torch.where(live, q_next, q)
            residual = torch.where(live, (change + last_change) / 2 if k > 1 else change, residual)
            used += live
            if threshold is not None:
                live = live & ~(q_next > math.log(threshold / (1 - threshold)))
            y = y_out
            if noise:
                z = (z + noise * torch.randn(z.shape, device=device, generator=generator)).to(z.dtype)
                if noise_y:
                    y = (y + noise * torch.randn(y.shape, device=device, generator=generator)).to(y.dtype)
            if k in steps:
                i, P, Q = steps.index(k), preds.view(B, K, -1), q.view(B, K).float()
                correct = ((P == labels[:, None]) | (labels[:, None] == 0)).all(-1)              # [B, K]
                valid = check and torch.from_numpy(check(inputs.cpu().numpy(), preds.cpu().numpy())).view(B, K)
                for j, Kb in enumerate(breadths):
                    s = select(correct, Q, P, residual.view(B, K), Kb, valid.to(device) if check else None)
                    s["steps"] = used.view(B, K)[:, :Kb].sum()
                    sums[i, j] += torch.stack([s[name].double() for name in names])
                if keep:
                    kept[k][0].append(P.to(torch.uint8).cpu().numpy())
                    kept[k][1].append(torch.sigmoid(Q).cpu().numpy())
        progress(start + B - mine.start)
    count = ranks.sum(torch.tensor(float(mine.stop - mine.start), dtype=torch.float64, device=device)).item()
    sums = ranks.sum(sums).cpu() / count
    calls = model.cfg.T * (model.cfg.n + 1)          # net calls per supervision step
    results = {(k, Kb): {**{name: sums[i, j, n].item() for n, name in enumerate(names[:-1])},
                         "calls": calls * sums[i, j, -1].item(), "count": int(count)}
               for i, k in enumerate(steps) for j, Kb in enumerate(breadths)}
    kept = {k: [np.concatenate([a for part in ranks.gather_objects(arrays) for a in part]) for arrays in pair]
            for k, pair in kept.items()}
    return results, kept, time.time() - t0


def save_figure(fig, ax, title, path):
    """The finish every plot here shares: title, grid, legend, written to path and closed. Returns path."""
    import matplotlib.pyplot as plt
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_depth_breadth(results, steps, breadths, selection, path, title):
    """Exact accuracy against net calls per puzzle, one line per breadth, a point per number of steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for Kb in breadths:
        points = [(results[k, Kb]["calls"], 100 * results[k, Kb][selection]) for k in steps]
        ax.plot(*zip(*points), marker="o", label=f"breadth {Kb}")
        for (x, acc), k in zip(points, steps):
            ax.annotate(str(k), (x, acc), textcoords="offset points", xytext=(3, -10), fontsize=7)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("net calls per puzzle (points labelled by supervision steps)")
    ax.set_ylabel(f"exact accuracy (%), selection {selection}")
    return save_figure(fig, ax, title, path)


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
    return save_figure(fig, ax, title, path)


def plot_curves(metrics, path, title):
    """curves.png beside metrics.jsonl, redrawn at every evaluation so a learner can watch a run without other
    tools: training loss, training exact and mean halting steps (of the puzzles that halted), held-out exact."""
    from matplotlib.figure import Figure   # a bare Figure draws with Agg and leaves pyplot's state alone
    with open(metrics) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if r.get("kind") == "train"]
    held = [dict(step=r["step"], exact=r["per_step"][-1]["exact"]) for r in records if r.get("kind") == "eval"]
    fig = Figure(figsize=(13, 3.2))
    for i, (name, rows, key) in enumerate((("training loss (CE)", train, "lm_loss"),
                                           ("training exact (%)", train, "exact"),
                                           ("mean halting steps", train, "mean_halt_steps"),
                                           ("held-out exact (%, EMA)", held, "exact"))):
        ax = fig.add_subplot(1, 4, i + 1)
        scale = 100 if key == "exact" else 1
        ax.plot([r["step"] for r in rows], [scale * (math.nan if r[key] is None else r[key]) for r in rows],
                marker="o" if rows is held else None)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path


def plot_runs(folders, out):
    """Runs compared, one per folder (its metrics.jsonl): held-out exact accuracy against minutes of training
    (evaluations left out), for settings such as depth schedules, and each run's last held-out exact accuracy
    as a bar, for ablations such as the HRM -> TRM ladder. Returns the two paths."""
    from matplotlib.figure import Figure
    check_out_folder(out)
    lines = []
    for folder in folders:
        path = os.path.join(folder, "metrics.jsonl")
        if not os.path.isfile(path):
            raise DataError(f"{folder} holds no metrics.jsonl; expected a training run's output folder")
        with open(path) as f:
            evals = [r for r in map(json.loads, f) if r.get("kind") == "eval" and "train_seconds" in r]
        lines.append((os.path.basename(os.path.normpath(folder)), evals))
    make_folder(out)
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    for name, evals in lines:
        ax.plot([r["train_seconds"] / 60 for r in evals], [100 * (r["per_step"][-1]["exact"] or 0) for r in evals],
                marker="o", label=name)
    ax.set_xlabel("minutes of training (evaluations left out)")
    ax.set_ylabel("held-out exact accuracy (%)")
    ax.set_title("time to accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    time_path = os.path.join(out, "runs_time_to_accuracy.png")
    fig.savefig(time_path, dpi=120)

    fig = Figure(figsize=(6.5, 0.9 + 0.35 * len(lines)))
    ax = fig.add_subplot()
    final = [100 * (evals[-1]["per_step"][-1]["exact"] or 0) if evals else 0.0 for _, evals in lines]
    bars = ax.barh(range(len(lines)), final, color="tab:blue")
    ax.bar_label(bars, fmt="%.1f", fontsize=8, padding=2)
    ax.set_yticks(range(len(lines)), [f"{name} (step {evals[-1]['step'] if evals else 0})" for name, evals in lines])
    ax.invert_yaxis()
    ax.set_xlabel("held-out exact accuracy at the last evaluation (%)")
    ax.set_xlim(0, 100)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    bar_path = os.path.join(out, "runs_final_accuracy.png")
    fig.savefig(bar_path, dpi=120)
    return time_path, bar_path


# ------------------------------------------------------------------------ devices and checkpoints

def setup_runtime(tcfg):
    """(device, dtype name, whether to compile, the autocast context) for the settings. --device auto takes
    CUDA, then Apple's MPS, then the CPU; under torchrun each process takes the GPU of its LOCAL_RANK."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    name = tcfg.device if tcfg.device != "auto" else "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise SettingsError(f"--device {shown(name)} is not a device; expected auto, cpu, cuda, cuda:N or mps")
    usable = dict(cpu=1, cuda=torch.cuda.device_count() if torch.cuda.is_available() else 0, mps=int(mps))
    if (device.index or 0) >= usable[device.type]:
        raise SettingsError(f"--device {name}: this machine has {usable[device.type] or 'no'} {device.type} "
                            f"device{'s' * (usable[device.type] != 1)} that torch {torch.__version__} can use; "
                            f"expected auto or cpu")
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    # MPS is untested here (no Mac): float32 unless --dtype bfloat16 asks for autocast there.
    dtype = tcfg.dtype if tcfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    compile_on = tcfg.compile == "on" or (tcfg.compile == "auto" and device.type == "cuda")
    why_not = compile_on and device.type == "cpu" and cpu_compile_fails()
    if why_not:   # the cpu presets ask for it; a laptop without a C++ compiler still trains, eagerly
        print(f"torch.compile cannot build CPU code here ({why_not}), so training runs without it, about 1.5x "
              f"slower", file=sys.stderr, flush=True)
        compile_on = False
    if compile_on:         # each (n, T, N_sup) of a training depth schedule compiles once: keep them all
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 2 * depth_count(tcfg))
    if tcfg.threads:       # capped at the machine's: a checkpoint may come from a bigger one, and 10^5 crashes torch
        torch.set_num_threads(min(tcfg.threads, os.cpu_count() or 1))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    # bf16 forward with float32 master weights: autocast casts each weight once per region.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    return device, dtype, compile_on, autocast


@functools.lru_cache(maxsize=None)
def cpu_compile_fails():
    """Why torch.compile cannot build CPU code on this machine (it needs a working C++ compiler), or "" when it
    can: a seconds-long probe on a two-line function."""
    try:
        torch.compile(lambda t: t * 2 + 1)(torch.ones(4))
        return ""
    except Exception as e:      # InductorError, a compiler's CalledProcessError, ...: any failure means eager
        return str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__


def depth_count(tcfg):
    """How many distinct (n, T, N_sup) train.depth_at can give: what torch.compile compiles."""
    if tcfg.depth_schedule == "random":
        return (2 * tcfg.depth_width + 1) ** (3 if tcfg.random_n_sup else 2)
    return 3 if tcfg.depth_schedule == "curriculum" else 1


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM ask the training loop to stop after the step in flight and save a checkpoint;
    the same signal again abandons the step at once (KeyboardInterrupt)."""

    def __enter__(self):
        self.signum = None
        self.old = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"{signal.Signals(signum).name}: stopping after this step to save a checkpoint "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def agreed(self, ranks, device):
        """Whether to stop now: under torchrun all ranks stop at the same step, when any of them was asked."""
        if ranks.world == 1:
            return self.signum is not None
        return bool(ranks.sum(torch.tensor([float(self.signum is not None)], device=device)) > 0)

    def __exit__(self, *exc):
        for s, handler in self.old.items():
            signal.signal(s, handler)


class Interrupted(Exception):
    """A run stopped by a signal after saving: one line says where and how to resume; exit 128 + signum."""

    def __init__(self, signum, path, out):
        self.exit_code, name = 128 + signum, signal.Signals(signum).name
        super().__init__(f"stopped by {name} at a step boundary; checkpoint {path}; continue with "
                         f"python train.py --resume auto --out {out}" if path else
                         f"stopped by {name} before the first step; nothing was saved")


def one_sentence_on_failure(main, memory_settings, expected=()):
    """main(), with every failure a user can mend ending in one sentence on stderr and a non-zero exit (2; 130
    for Ctrl-C; an Interrupted run its own) instead of a traceback. A RuntimeError that is not out of memory is
    a bug and keeps its traceback."""
    try:
        return main()
    except (DataError, SettingsError, Interrupted, *expected) as e:
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


def read_torch_file(path):
    """torch.load of a checkpoint file, with a missing or unreadable file as one sentence."""
    if not os.path.isfile(path):
        raise DataError(f"checkpoint {path} is a folder; expected a checkpoint file" if os.path.isdir(path) else
                        f"checkpoint {path} does not exist")
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
    tcfg = config_from(TrainConfig, state["train_config"], f"checkpoint {path}")
    mcfg = config_from(TRMConfig, state["model_config"], f"checkpoint {path}")
    try:
        check_config(tcfg, mcfg)
    except SettingsError as e:
        raise DataError(f"checkpoint {path} holds settings that cannot work: {e}") from None
    for part in ("model", "ema"):
        bad = next((k for k, v in state.get(part, {}).items() if torch.is_tensor(v) and v.is_floating_point()
                    and not torch.isfinite(v).all()), None)
        if bad:
            raise DataError(f"checkpoint {path} has non-finite {part} weights ({bad}); expected a checkpoint "
                            f"saved before training diverged")
    return state


def load_weights(module, state_dict, path):
    """module.load_state_dict, with weights whose names or shapes were edited as one sentence naming path."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
        raise DataError(f"checkpoint {path} does not fit its own model config: {shown(first, 200)}") from None


def save_checkpoint(path, state):
    """Write to a temporary file, flush it to disk, then rename: a crash leaves the old file or the new one, and
    a failed write (a full disk) removes its temporary file and says so in one sentence."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):   # torch's zip writer reports a failed write as RuntimeError
            reason = e.strerror if isinstance(e, OSError) and e.strerror else shown(str(e), 80)
            raise DataError(f"checkpoint {path} could not be written ({reason}); the partial file was removed and "
                            f"the checkpoints before it are intact") from None
        raise


def training_state(run):
    """What a resumed train.Run needs to compute the same weights: models, optimizer, data position, the carry
    of every rank (each takes part in the gather) and the random state. None on ranks other than 0."""
    carry = {k: run.ranks.gather(v).cpu() for k, v in run.carry.items()}
    if not run.ranks.main:
        return None
    return dict(model=run.model.state_dict(), ema=run.ema_model.state_dict(), optimizer=run.optimizer.state_dict(),
                step=run.step, batches=run.batches.state_dict(), train_config=dataclasses.asdict(run.tcfg),
                model_config=dataclasses.asdict(run.mcfg), carry=carry,
                rng=dict(torch=torch.get_rng_state(),
                         cuda=torch.cuda.get_rng_state() if run.device.type == "cuda" else None))


def restore_training(run, state):
    """The inverse of training_state, into a freshly built train.Run of the same settings."""
    path = run.tcfg.resume
    load_weights(run.model, state["model"], path)
    load_weights(run.ema_model, state["ema"], path)
    try:
        run.optimizer.load_state_dict(state["optimizer"])
        run.batches.load_state_dict(state["batches"])
        run.step = int(state["step"])
        run.carry = {k: v[run.mine].to(run.device) for k, v in state["carry"].items()}
        torch.set_rng_state(state["rng"]["torch"])
        if run.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"])
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:
        raise DataError(f"checkpoint {path} cannot be resumed: its optimizer, data position or random "
                        f"state is damaged ({type(e).__name__})") from None
    run.log(f"resumed at step {run.step} from {path}")


def checkpoints_in(folder):
    return sorted(glob.glob(os.path.join(folder, "ckpt_*.pt")))


def prune_checkpoints(folder, keep, good):
    """Delete all but the newest `keep` checkpoints in folder that load; good: paths known to load (updated).
    A damaged checkpoint is deleted, so it can never outlive a good one."""
    kept = 0
    for path in reversed(checkpoints_in(folder)):
        if kept < keep and path not in good:
            try:
                load_checkpoint(path)
                good.add(path)
            except DataError as e:
                print(f"removing {path}: {e}")
        if kept < keep and path in good:
            kept += 1
        else:
            os.remove(path)
            good.discard(path)


def check_out_folder(out, flag="--out"):
    """Fail before anything is written unless out is a folder, or can be made as one."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SettingsError(f"{flag} {out} is a file; expected a folder")
    parent = out
    while not os.path.exists(parent):
        parent = os.path.dirname(parent) or "."
    if not os.path.isdir(parent):
        raise SettingsError(f"{flag} {out} cannot be made: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SettingsError(f"{flag} {out} cannot be written: {parent} is not writable")


def make_folder(out, flag="--out"):
    """os.makedirs, with a refusal (a read-only place, say) as one sentence. Returns whether it made out."""
    made = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise SettingsError(f"{flag} {out} cannot be made ({e.strerror})") from None
    return made


def lock_folder(out):
    """Claim out for this process with a lock file holding its process id. A lock held by a live process fails;
    one left by a process that is gone (killed) is taken over. Returns (lock path, a line to log or None)."""
    path, note = os.path.join(out, "run.lock"), None
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pid = 0                             # unreadable or half-written: a holder that died writing it
            if pid and pid != os.getpid() and pid_alive(pid):
                raise SettingsError(f"{out} is in use by process {pid}, which holds {path}; wait for it to end "
                                    f"or choose another --out") from None
            try:      # rename rather than remove: of two processes taking over, only one can succeed
                os.replace(path, f"{path}.{os.getpid()}.stale")
                os.remove(f"{path}.{os.getpid()}.stale")
                note = f"took over {path}: process {pid or '(unknown)'} that held it is gone"
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        return path, note
    raise SettingsError(f"{out} is being claimed by other processes at the same time; choose another --out")


class OutputFolder:
    """A training run's --out, claimed by one process: made if absent and locked (`lock_folder`), checked again
    under the lock (`check_out_use`), cleared of the .tmp a killed run left. `save` writes a checkpoint and keeps
    the newest two that load. With --overwrite the old run's files are noted and go in `drop_replaced`, once the
    new run has made a step. Leaving releases the lock, and the folder too if the run wrote nothing there."""

    def __init__(self, tcfg, log):
        self.out, self.log, self.good = tcfg.out, log, {tcfg.resume} if tcfg.resume else set()
        self.made = make_folder(self.out)
        self.lock, note = lock_folder(self.out)
        if note:
            log(note)
        try:
            check_out_use(tcfg)      # another run may have finished into the folder since main checked
        except SettingsError:
            self.release()
            raise
        for tmp in glob.glob(os.path.join(self.out, "ckpt_*.pt.tmp")):
            os.remove(tmp)
            log(f"removed {tmp}, a checkpoint whose writing was cut off")
        old = checkpoints_in(self.out) + [os.path.join(self.out, f) for f in ("metrics.jsonl", "curves.png")]
        self.replaced = [p for p in old if os.path.exists(p)] if tcfg.overwrite else []

    def drop_replaced(self):
        for path in self.replaced:
            os.remove(path)
        if self.replaced:
            self.log(f"--overwrite: removed the {len(self.replaced)} files of the previous run in {self.out}")
        self.replaced = []

    def save(self, state, step):
        path = os.path.join(self.out, f"ckpt_{step:08d}.pt")
        save_checkpoint(path, state)
        self.good.add(path)
        prune_checkpoints(self.out, 2, self.good)
        return path

    def release(self):
        os.remove(self.lock)
        if self.made and not os.listdir(self.out):
            os.rmdir(self.out)


def check_out_use(tcfg):
    """A run may not mix into a folder holding another run's checkpoints unless told to replace them; a run
    resumed from a checkpoint elsewhere counts as another run."""
    theirs = checkpoints_in(tcfg.out)
    if tcfg.resume and os.path.abspath(tcfg.resume) in map(os.path.abspath, theirs):
        return
    if theirs and not tcfg.overwrite:
        raise SettingsError(f"{tcfg.out} already holds a run; use --resume auto to continue it, "
                            f"--overwrite to replace it, or --out for a new folder")


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # alive, another user's
        pass
    return True


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


BENCH_DEMOS = 3      # demonstrations per row in --bench of an encoder model: the synthetic tasks' (ARC's mean is 3.3)


def bench(tcfg, mcfg, make_step):
    """`train.py --bench`: time full training steps (train.bench_step: forward, backward, AdamW, sign-SGD, EMA)
    on random puzzles of the configured shape, one line per variant; no data is built and nothing written."""
    flops = flops_per_sample(mcfg)
    print(f"bench {tcfg.task}/{tcfg.preset}: batch {tcfg.batch_size}, D {mcfg.d_model}, "
          f"{'token MLP' if mcfg.mlp_t else 'attention'}, n {mcfg.n}, T {mcfg.T}, "
          f"{mcfg.puzzle_emb_len + mcfg.seq_len} positions; {flops / 1e9:.2f} GFLOP per sample and step")
    for variant in tcfg.bench.split(","):
        dtype, _, compiled = variant.partition("+")
        if compiled not in ("", "compile"):
            raise SettingsError(f"--bench variant {variant!r}; expected a dtype, optionally with +compile")
        vcfg = dataclasses.replace(tcfg, dtype=dtype, compile="on" if compiled else "off")
        check_config(vcfg, mcfg)
        device, dtype, compile_on, autocast = setup_runtime(vcfg)
        torch.manual_seed(tcfg.seed)
        model = TRM(mcfg).to(device).train()
        micro = micro_batch_size(tcfg, mcfg, device)
        step = make_step(model, vcfg, device, autocast, compile_on, micro)
        B, L, V = tcfg.batch_size, mcfg.seq_len, mcfg.vocab_size
        batch = dict(inputs=torch.randint(1, V, (B, L), device=device),
                     labels=torch.randint(1, V, (B, L), device=device),
                     puzzle_ids=torch.randint(0, mcfg.num_puzzle_ids, (B,), device=device))
        if model.reads_demos:
            batch.update(demos=torch.randint(1, V, (B, BENCH_DEMOS, 2, L), device=device),
                         demo_mask=torch.ones(B, BENCH_DEMOS, dtype=torch.bool, device=device))

        def timed(steps):
            synchronize(device)
            t = time.perf_counter()
            for _ in range(steps):
                step(batch)
            synchronize(device)
            return time.perf_counter() - t

        peak_memory(device, reset=True)
        warm = timed(2)
        per_step = timed(tcfg.bench_steps) / tcfg.bench_steps
        memory = peak_memory(device)
        achieved, peak = flops * B / per_step, matmul_peak(device, dtype)
        print(f"{variant:>18}: {B / per_step:8,.1f} samples/s | {1000 * per_step:9,.1f} ms/step | "
              f"peak memory {memory / 1e9:5.2f} GB | {achieved / 1e12:6.3f} TFLOP/s = {achieved / peak:5.1%} "
              f"MFU of {peak / 1e12:.3f} TFLOP/s measured {dtype} matmul | warm-up (compile) {warm:.0f}s"
              + (f", micro-batches of {micro}" if micro < B else ""), flush=True)


def resumed_config(given, tcfg):
    """--resume: the checkpoint's settings, changed where the command line says so (--max-steps, say), except
    the task and the model's shape. Returns them with the checkpoint's state."""
    path, state = find_checkpoint(tcfg.resume, tcfg.out)
    saved = {**state["train_config"], **state["model_config"]}
    for k in ("task", *state["model_config"]):
        if k in given and given[k] != saved[k]:
            raise SettingsError(f"checkpoint {path} was trained with {k} {saved[k]}, not {given[k]}")
    return (*resolve_config({**saved, **given, "resume": path, "out": tcfg.out}), state)


def flops_per_sample(mcfg):
    """Matmul FLOPs of one training supervision step for one sample, counted from the shapes (norms, RoPE, the
    loss and the optimizer are not matmuls and not counted). S = P + L positions, F and Ft the SwiGLU widths
    over D channels and over S positions. Per net call and layer:
        attention:   2·S·D·4D (qkv, o) + 4·S²·D (scores, weighted values) + 6·S·D·F (gate, up, down)
        token MLP:   6·D·S·Ft (SwiGLU over positions)                     + 6·S·D·F
    A step makes T(n+1) net calls forward; backward costs twice the forward of the n+1 calls with gradient.
    The heads run once with gradient, x3: output head 2·S·D·V (it sees the prefix positions too), Q head
    2·D·2. The DemoEncoder, with gradient, x3: BENCH_DEMOS pairs through encoder_layers blocks."""
    S, D, V = mcfg.puzzle_emb_len + mcfg.seq_len, mcfg.d_model, mcfg.vocab_size
    F = SwiGLU.width(D, mcfg.expansion)
    if mcfg.mlp_t:
        mix = 6 * D * S * SwiGLU.width(S, mcfg.expansion)
    else:
        mix = 2 * S * D * 4 * D + 4 * S * S * D
    layer = mix + 6 * S * D * F
    encoder = 3 * BENCH_DEMOS * mcfg.encoder_layers * layer if mcfg.task_embedding == "encoder" else 0
    return ((mcfg.T * (mcfg.n + 1) + 2 * (mcfg.n + 1)) * mcfg.n_layers * layer + 3 * (2 * S * D * V + 2 * D * 2)
            + encoder)


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
    load_weights(model, sd, path)
    return model.eval(), tcfg, mcfg


def positive_ints(text, flag):
    """--steps and --breadth: one whole number or a comma-separated list of them, sorted."""
    try:
        values = sorted({int(v) for v in text.split(",")})
    except ValueError:
        values = []
    if not values or values[0] < 1:
        raise SettingsError(f"{flag} {text!r}: expected a positive whole number or a list such as 8,16,32")
    return values


def main(argv=None):
    p = ArgumentParser(description="Evaluate a TRM checkpoint after every supervision step.")
    p.add_argument("--checkpoint", help="our ckpt_*.pt, or a reference state_dict")
    p.add_argument("--runs", default=None, help="instead: training output folders, comma-separated; draws their "
                   "held-out exact accuracy against training minutes (runs_time_to_accuracy.png) and their last "
                   "one as bars (runs_final_accuracy.png) into --out")
    p.add_argument("--task", default=None, help="for a reference checkpoint: sudoku, maze or arc")
    p.add_argument("--steps", default=None,
                   help="supervision steps at test time (default: the training N_sup); with --breadth a list")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first K test puzzles (arc: tasks)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="test rows per batch (default 256); with --breadth, trajectories per batch (default 128: "
                        "on a 2-core CPU a batch that fits the caches runs 2x faster)")
    p.add_argument("--data", default=None, help="override the test data source (generate, hub, or a path)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16"))
    p.add_argument("--out", default=None, help="folder for the table, plot and pictures (default: the checkpoint's)")
    p.add_argument("--solve", default=None, help="solve one puzzle given as a string (sudoku: 81 characters; arc: "
                   "an ARC task file, for a model trained with --task-embedding encoder)")
    p.add_argument("--halt", action="store_true", help="also run with halting: each puzzle stops when its halt "
                   "probability exceeds --halt-threshold; reports accuracy and the mean steps used")
    p.add_argument("--halt-threshold", type=float, default=0.95,
                   help="halt probability that stops a puzzle (0.5: training's rule, halt logit > 0)")
    g = p.add_argument_group("depth x breadth", "K trajectories per puzzle, one answer chosen; a sweep over "
                             "lists of steps and breadths prints a table and draws {task}_depth_breadth.png")
    g.add_argument("--breadth", default=None, help="trajectories per puzzle, e.g. 1,4,16,64")
    g.add_argument("--init", default="fixed", choices=("fixed", "random"),
                   help="start states: the model's y_init, z_init, or truncated-normal std 1 per trajectory")
    g.add_argument("--noise", type=float, default=0.0,
                   help="std of the Gaussian noise added to the carried z after every supervision step")
    g.add_argument("--noise-y", action="store_true", help="add the noise to the carried y as well")
    g.add_argument("--select", default="q", choices=SELECTIONS + ("valid",),
                   help="the selection drawn in the picture and named best (all are printed)")
    g.add_argument("--seed", type=int, default=0, help="seed of the start states and the noise")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # SIGTERM ends like Ctrl-C: one line, exit 130
    one_sentence_on_failure(lambda: run(args), "--batch-size, --breadth or --steps")


def run(args):
    if args.runs:
        return print("plot: {} and {}".format(*plot_runs(args.runs.split(","), args.out or ".")))
    if not args.checkpoint:
        raise SettingsError("--checkpoint CKPT is needed (or --runs to compare training runs)")
    ranks = Ranks.from_env()     # under torchrun every rank evaluates a share; rank 0 reports
    if not ranks.main:
        sys.stdout = open(os.devnull, "w")
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    check_out_folder(out)
    model, tcfg_dict, mcfg = load_for_eval(args.checkpoint, args.task)
    if args.task and args.task != tcfg_dict["task"]:
        raise SettingsError(f"--task {args.task}: checkpoint {args.checkpoint} was trained on {tcfg_dict['task']}")
    # the best device of this machine, whichever the checkpoint was trained on; evaluation runs eagerly, so a
    # checkpoint from a compiling preset costs no compile probe here
    tcfg = TrainConfig(**{**tcfg_dict, "dtype": args.dtype, "device": "auto", "compile": "off",
                          **({"data": args.data} if args.data else {})})
    task = importlib.import_module(tcfg.task)
    device, _, _, autocast = setup_runtime(tcfg)
    model.to(device)
    steps = [mcfg.N_sup] if args.steps is None else positive_ints(args.steps, "--steps")
    args.breadth = args.breadth and positive_ints(args.breadth, "--breadth")
    N = steps[-1]
    if not 0 < args.halt_threshold < 1:
        raise SettingsError(f"--halt-threshold is {args.halt_threshold}; expected a probability between 0 and 1")
    for flag, value, least in (("--limit", args.limit, 0), ("--batch-size", args.batch_size or 1, 1),
                               ("--seed", args.seed, 0)):
        if value < least:
            raise SettingsError(f"{flag} is {value}; expected a whole number of at least {least}")
    if len(steps) > 1 and args.breadth is None:
        raise SettingsError(f"--steps {args.steps} is a list, and a list of steps needs --breadth (e.g. --breadth 1)")
    if args.noise < 0 or not math.isfinite(args.noise):
        raise SettingsError(f"--noise is {args.noise}; expected a finite standard deviation of at least 0")

    if args.solve is not None and hasattr(task, "solve_task_file"):     # ARC: a task file, read by an encoder model
        return task.solve_task_file(args.solve, model, tcfg, N, device, autocast, out, evaluate)
    if args.solve is not None:
        inputs, labels = task.parse_solve(args.solve, mcfg)
        ds = Dataset.ungrouped(inputs, labels, mcfg.vocab_size)
        res = evaluate(model, ds, N, 1, device, autocast, keep=range(1, N + 1))
        make_folder(out)     # only now: an evaluation that fails or is interrupted leaves no folder
        answers = [r["preds"][0] for r in res]
        print(task.describe_solution(inputs, answers[-1]))
        path = task.draw_steps(inputs, labels, answers, os.path.join(out, f"{tcfg.task}_solve.png"))
        print(f"picture: {path}")
        return

    if tcfg.task == "arc" and tcfg.data != tcfg_dict["data"] and not model.reads_demos:
        raise SettingsError(f"--data {tcfg.data}: this model was trained on {tcfg_dict['data']} with puzzle ids, which "
                            f"exist only for the tasks it trained on; expected a model trained with --task-embedding "
                            f"encoder to attempt other tasks")
    _, test_ds = task.build_datasets(tcfg, splits=("test",))
    if args.breadth is not None:
        return run_breadth(args, model, mcfg, tcfg, task, test_ds, steps, device, autocast, ranks, out)
    score = getattr(task, "score", None)
    res = evaluate(model, test_ds, N, args.batch_size or 256, device, autocast, limit=args.limit or None,
                   check=getattr(task, "check", None), keep=(N,) if score else (), ranks=ranks)
    halting = args.halt and evaluate_halting(model, test_ds, N, args.batch_size or 256, device, autocast,
                                             limit=args.limit or None, ranks=ranks, threshold=args.halt_threshold)
    diagnosed = model.reads_demos and task.diagnostics(model, dataclasses.replace(tcfg, eval_limit=args.limit), test_ds,
                                                        device, autocast, ranks, args.batch_size or 256, evaluate)
    if not ranks.main:     # the others only took part in the evaluations
        return
    make_folder(out)
    has_valid = "valid" in res[0]
    print(f"{res[0]['count']} test rows, {N} supervision steps (trained with N_sup {mcfg.N_sup})"
          + (f"; {res[0]['scored']} rows have a known answer, and only those are scored"
             if res[0]["scored"] < res[0]["count"] else ""))
    print("step   exact   token" + ("   valid" if has_valid else ""))
    for r in res:
        print(f"{r['step']:>4} {100 * r['exact']:6.2f}% {100 * r['token']:6.2f}%"
              + (f" {100 * r['valid']:6.2f}%" if has_valid else ""))
    path = plot(res, os.path.join(out, f"{tcfg.task}_accuracy_by_step.png"),
                f"{tcfg.task}: accuracy by supervision step (trained N_sup={mcfg.N_sup})")
    print(f"plot: {path}")
    if score:
        print(f"after {N} steps: " + score(tcfg, res[-1]["preds"], res[-1]["halt"], out=out)[1])
    if diagnosed:
        print(diagnosed[1])
    if halting:
        print(f"with halting at p > {args.halt_threshold}: exact {halting['exact']:.2%}, token {halting['token']:.2%}, "
              f"{halting['mean_steps']:.2f} steps on average (at most {N}); "
              f"fixed depth {N}: exact {res[-1]['exact']:.2%}, token {res[-1]['token']:.2%}")


def run_breadth(args, model, mcfg, tcfg, task, test_ds, steps, device, autocast, ranks, out):
    """The depth x breadth sweep: exact accuracy per (steps, breadth, selection), the best choice that uses no
    rules, how often the Q head finds a right trajectory, and the picture."""
    breadths, check, score = args.breadth, getattr(task, "check", None), getattr(task, "score", None)
    if args.select == "valid" and check is None:
        raise SettingsError(f"--select valid needs a checker of the rules, and {tcfg.task} has none")
    threshold = args.halt_threshold if args.halt else None
    results, kept, seconds = evaluate_breadth(
        model, test_ds, steps, breadths, args.batch_size or 128, device, autocast, init=args.init,
        noise=args.noise, noise_y=args.noise_y, seed=args.seed, limit=args.limit or None, check=check,
        threshold=threshold, keep=score is not None, ranks=ranks)
    if not ranks.main:
        return
    make_folder(out)
    count, per_step = results[steps[0], breadths[0]]["count"], mcfg.T * (mcfg.n + 1)
    print(f"{count} test rows x up to {breadths[-1]} trajectories: init {args.init}, noise {args.noise} on z"
          + (" and y" if args.noise_y else "") + f", seed {args.seed}"
          + (f", halting at p > {threshold}" if threshold else "") + f"; {count / seconds:.2f} puzzles/s")
    names = SELECTIONS + (("valid",) if check else ())
    print("steps breadth calls/puzzle" + "".join(f"{n + ('*' if n == 'valid' else ''):>10}" for n in names)
          + "  pass@K (ceiling)" + ("  calls saved" if threshold else ""))
    for (k, K), r in results.items():
        saved = f"  {1 - r['calls'] / (k * K * per_step):11.1%}" if threshold else ""
        print(f"{k:>5} {K:>7} {r['calls']:>12.0f}" + "".join(f"{100 * r[n]:9.2f}%" for n in names)
              + f"{100 * r['pass@K']:16.2f}%" + saved)
    if check:
        print("valid*: the first trajectory the task's checker accepts, else q; it uses the rules")
    (k, K), r, name = max(((key, r, n) for key, r in results.items() for n in SELECTIONS),
                          key=lambda e: (e[1][e[2]], -e[1]["calls"]))
    print(f"best without rules: {r[name]:.2%} exact with select {name} at {k} steps x {K} trajectories "
          f"({r['calls']:.0f} net calls per puzzle)")
    r = results[steps[-1], breadths[-1]]
    if r["pass@K"] > 0:
        print(f"the highest halt logit picks a right trajectory in {r['q'] / r['pass@K']:.1%} of the puzzles "
              f"where one of the {breadths[-1]} is right ({steps[-1]} steps)")
    if score:     # ARC: every trajectory of every augmented version votes
        for (k, K) in results:
            preds, halt = kept[k]
            rows = np.repeat(np.arange(len(preds)), K)
            last = (k, K) == (steps[-1], breadths[-1])
            line = score(tcfg, preds[:, :K].reshape(len(rows), -1), halt[:, :K].reshape(-1), rows=rows,
                         out=out if last else None)[1]
            print(f"{k} steps x {K} trajectories, voting: {line}")
    path = plot_depth_breadth(results, steps, breadths, args.select,
                              os.path.join(out, f"{tcfg.task}_depth_breadth.png"),
                              f"{tcfg.task}: depth x breadth (init {args.init}, noise {args.noise})")
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
