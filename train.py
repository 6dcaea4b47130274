"""Train a TRM with deep supervision: `python train.py --task sudoku [--preset cpu|paper] [--key value ...]`.

The paper's training loop, in outline (its pseudocode):

    for x_input, y_true in train_dataloader:
        y, z = y_init, z_init
        for step in range(N_sup):                               # deep supervision
            x = input_embedding(x_input)
            (y, z), y_hat, q_hat = deep_recursion(x, y, z)
            loss = softmax_cross_entropy(y_hat, y_true)
            loss += binary_cross_entropy(q_hat, (y_hat == y_true))
            loss.backward(); opt.step(); opt.zero_grad()
            if q_hat > 0: break                                 # early stopping

Here every slot of the batch runs its own copy of the inner loop: one optimizer step is one supervision
step of every slot, each slot carries its (y, z) to the next optimizer step, and a slot that halts (the Q
head says so, or N_sup steps are done) takes a fresh puzzle and restarts from y_init, z_init (`refill`).
The batch shape stays constant. This file reads top-down: first the algorithm (the loss, the refill, one
supervision step, the update, the loop `train`), then, below a divider, the run's plumbing, which changes nothing
that is computed: the settings and command line, devices and torchrun's processes, the run with its logs and
evaluations, checkpoints and the output folder, signals, and the benchmark.
"""
import argparse
import contextlib
import copy
import ctypes
import dataclasses
import functools
import fcntl
import glob
import importlib
import inspect
import json
import math
import os
import re
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import evaluate
from data import (TASKS, ArgumentParser, Batches, DataConfig, DataError, SettingsError, format_time,
                  one_sentence_on_failure, rows_per_epoch, shown)
from model import TRM, TRMConfig, flops_per_sample, stablemax


class StopTraining(Exception):
    """Training cannot go on (a non-finite loss, say): the message says why and what is safe on disk."""


# ---------------------------------------------------------------------------------------------- loss

def stablemax_cross_entropy(logits, labels, mask):
    """-log of the label's stablemax probability (model.stablemax, in float64 as the reference), per token [B, L]."""
    logp = torch.log(stablemax(logits))
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -torch.where(mask, picked, 0)


def deep_supervision_loss(logits, q_halt, labels, weights=None, continue_loss=None):
    """Per sample: mean stablemax CE over its labelled tokens + 0.5 * BCE(halt logit, answer exactly right)
    (+ HRM's continue loss with --act-continue), times its weight (CGAR's decay, [B]; none: 1). Returns the
    batch sums (the trainer divides by the global batch size; CE and halt BCE unweighted, for the log) and the
    exactness per sample."""
    mask = labels != 0
    counts = mask.sum(-1).clamp_min(1)
    with torch.no_grad():
        correct = ((logits.argmax(-1) == labels) | ~mask).all(-1)          # whole answer exact [B]
    lm = stablemax_cross_entropy(logits, labels, mask).sum(-1) / counts              # softmax_cross_entropy
    halt = F.binary_cross_entropy_with_logits(q_halt, correct.to(q_halt.dtype), reduction="none")
    q_loss = 0.5 * halt if continue_loss is None else 0.5 * halt + continue_loss
    lm_loss, halt_loss = lm.sum(), halt.sum()
    total = lm_loss + q_loss.sum() if weights is None else ((lm + q_loss) * weights).sum()
    return total, lm_loss.detach(), halt_loss.detach(), correct


# ---------------------------------------------------------------------------------- deep supervision

def initial_carry(model, batch):
    """Every slot starts halted, so the first refill fills all of them from the first batch."""
    y, z = model.initial_state(batch["inputs"].shape[0])
    return dict(y=y, z=z, steps=torch.zeros_like(batch["puzzle_ids"]),
                halted=torch.ones_like(batch["puzzle_ids"], dtype=torch.bool), **batch)


def refill(model, carry, batch):
    """`y, z = y_init, z_init` for a new puzzle: slots that halted last step take the batch's puzzle at their
    position and restart from the initial states (as the reference does); the others keep theirs. Then every
    slot reads its puzzle's row of the puzzle-embedding table as sign-SGD has left it, as a leaf whose .grad
    backward fills for the sparse update. It is made here, outside the compiled step, because a tensor made a
    leaf inside a compiled region and returned from it splits the graph. The encoder reads its rows in the step."""
    halted = carry["halted"]
    y0, z0 = model.initial_state(halted.shape[0])
    fresh = dict(batch, y=y0, z=z0, steps=torch.zeros_like(carry["steps"]))
    # halted [B] spread over each tensor's other dimensions: [B, L], [B, S, D], multi-scale z's [B, n, S, D]
    carry = {k: torch.where(halted.view(-1, *[1] * (v.dim() - 1)), v, carry[k]) for k, v in fresh.items()}
    if not model.reads_demos:
        carry["puzzle_rows"] = model.task_rows(carry)                                           # [B, D]
    return dict(carry, halted=halted)


def exploration_min_steps(batch_size, N_sup, p, device):
    """The halting exploration: with probability p a slot must run at least randint(2, N_sup) steps this step.
    Drawn for the whole global batch, so every rank and micro-batch uses the draws a single process would."""
    if N_sup < 2:
        return torch.zeros(batch_size, dtype=torch.long, device=device)
    explore = torch.rand(batch_size, device=device) < p
    return explore * torch.randint(2, N_sup + 1, (batch_size,), device=device)


@dataclass
class StepResult:
    """One supervision step of a batch, as the update needs it."""
    loss: torch.Tensor                # summed over the samples (the loss of the paper's loop)
    carry: dict                       # y, z and the puzzles in flight, for the next step
    stats: dict                       # sums over the batch for the log line
    puzzle_ids: torch.Tensor          # [B] the rows of the puzzle-embedding table used
    puzzle_rows: torch.Tensor         # [B, D] those rows, as a leaf tensor that backward fills (encoder: [B, P, D])
    puzzle_grad: torch.Tensor = None  # [B, D] their gradient, once backward has run; None with the encoder


def supervision_step(model, carry, min_steps, autocast, depth=None, decay=1.0):
    """One pass of the paper's `for step in range(N_sup)` body for every slot: deep_recursion, the loss, and
    `if q_hat > 0: break` (a halted slot is refilled before the next step). min_steps [B]: the exploration's
    least steps per slot; depth: this step's (n, T, N_sup) (default the config's, see `depth_at`); decay:
    CGAR's lambda, supervision step k of a slot weighted lambda^(k-1). torch.compile compiles this."""
    n, T, N_sup = depth or (model.cfg.n, model.cfg.T, model.cfg.N_sup)
    steps = carry["steps"] + 1
    carry = dict(carry)
    with autocast:
        # the encoder's reading with its graph, or the table rows refill read as a leaf (not carried on)
        puzzle_rows = model.task_rows(carry) if model.reads_demos else carry.pop("puzzle_rows")
        (y, z), logits, q = model(carry["inputs"], puzzle_rows, carry["y"], carry["z"], n, T)
        continue_loss = None
        if model.cfg.act_continue:     # HRM's ACT: its continue loss needs one more step, without gradient
            target = model.act_continue_target(carry["inputs"], puzzle_rows, y, z, steps >= N_sup, n, T)
            continue_loss = 0.5 * F.binary_cross_entropy_with_logits(q[:, 1], target, reduction="none")
    weights = decay ** carry["steps"].double() if decay != 1.0 else None     # carry's steps are k - 1
    loss, lm_loss, halt_loss, correct = deep_supervision_loss(logits, q[:, 0], carry["labels"], weights,
                                                              continue_loss)

    with torch.no_grad():
        halted = steps >= N_sup
        if model.training and N_sup > 1:
            halted = halted | (model.halt_logit(q) > 0)      # the paper's "if q_hat > 0: break"
            halted = halted & (steps >= min_steps)
    new_carry = dict(carry, y=y, z=z, steps=steps, halted=halted)
    stats = dict(lm_loss=lm_loss, halt_loss=halt_loss, halted=halted.sum(), exact=(correct & halted).sum(),
                 steps=(steps * halted).sum())
    return StepResult(loss, new_carry, stats, carry["puzzle_ids"], puzzle_rows)


def accumulated_step(step_fn, model, carry, min_steps, micro, global_batch, autocast, depth=None, decay=1.0):
    """Forward and `loss.backward()` of one optimizer step over this process's rows, `micro` rows at a time.
    The loss is a sum over samples divided by the global batch size, so the accumulated gradients (summed
    over ranks when there are several) are the whole batch's."""
    parts = []
    for i in range(0, len(min_steps), micro):
        rows = slice(i, i + micro)
        part = {k: v[rows] for k, v in carry.items()}
        if not model.reads_demos:      # each micro-batch's table rows a leaf of their own, for their .grad
            part["puzzle_rows"] = part["puzzle_rows"].detach().requires_grad_()
        part = step_fn(model, part, min_steps[rows], autocast, depth, decay)
        (part.loss / global_batch).backward()
        parts.append(dataclasses.replace(part, loss=part.loss.detach(),
                                         puzzle_grad=None if model.reads_demos else part.puzzle_rows.grad))
    if len(parts) == 1:
        return parts[0]
    return StepResult(loss=sum(p.loss for p in parts),
                      carry={k: torch.cat([p.carry[k] for p in parts]) for k in parts[0].carry},
                      stats={k: sum(p.stats[k] for p in parts) for k in parts[0].stats},
                      puzzle_ids=torch.cat([p.puzzle_ids for p in parts]),
                      puzzle_rows=torch.cat([p.puzzle_rows.detach() for p in parts]),
                      puzzle_grad=None if model.reads_demos else torch.cat([p.puzzle_grad for p in parts]))


def all_reduce_step(ranks, params, result):
    """The global step from the ranks' parts: gradients, loss and statistics summed in one all-reduce, and
    every rank's puzzle-embedding rows with their gradients gathered, so each rank applies the same sparse
    update to its copy of the table, and all ranks the same AdamW update to the same weights."""
    if ranks.world == 1:
        return result
    names = list(result.stats)
    extra = torch.stack([result.loss.float()] + [result.stats[k].float() for k in names])
    ranks.sum_all([p.grad for p in params] + [extra])
    return dataclasses.replace(result, loss=extra[0], stats=dict(zip(names, extra[1:])),
                               puzzle_ids=ranks.gather(result.puzzle_ids),
                               puzzle_grad=ranks.gather(result.puzzle_grad))


def finite(*tensors):
    """Whether every element is finite, as a 0-dim bool tensor, so without a host sync: a NaN or inf anywhere makes
    the sum non-finite. None, a tensor the run lacks, is skipped."""
    return torch.isfinite(torch.stack([t.detach().float().sum() for t in tensors if t is not None]).sum())


def depth_at(step, total, tcfg, mcfg):
    """(n, T, N_sup) for optimizer step `step` of `total` under --depth-schedule (evaluation always uses the
    config's). fixed: the config's. curriculum (CGAR, arXiv 2511.08653): (ceil(n/3), ceil(T/3)) until the
    first --curriculum-stages fraction, (ceil(2n/3), ceil(2T/3)) until the second, then (n, T). random: n and
    T (and N_sup with --random-n-sup) each drawn uniformly from value +- --depth-width, so the expected
    compute is the fixed run's; the draw depends on the seed and the step only, so every torchrun rank and a
    resumed run draw the same."""
    n, T, N_sup = mcfg.n, mcfg.T, mcfg.N_sup
    if tcfg.depth_schedule == "curriculum":
        stage = 1 + sum(step >= f * total for f in curriculum_stages(tcfg))
        return math.ceil(stage * n / 3), math.ceil(stage * T / 3), N_sup
    if tcfg.depth_schedule == "random":
        w, rng = tcfg.depth_width, np.random.default_rng([tcfg.seed, step])
        n, T, N = (v + int(d) for v, d in zip((n, T, N_sup), rng.integers(-w, w + 1, 3)))
        return n, T, N if tcfg.random_n_sup else N_sup
    return n, T, N_sup


def lr_at(step, total, cfg, base):
    """The reference's schedule: linear warmup, then a cosine to base x lr_min_ratio at the last step (it runs 1)."""
    w = cfg.warmup_steps
    cos = 0.5 * (1 + math.cos(math.pi * max(0, step - w) / max(1, total - w)))
    return base * min(1.0, (step + 1) / max(1, w)) * (cfg.lr_min_ratio + (1 - cfg.lr_min_ratio) * cos)


@torch.no_grad()
def puzzle_emb_step(table, ids, grad, lr, weight_decay):
    """Sign-SGD with decoupled weight decay on the rows used in the batch only (the reference's sparse
    optimizer): gradients of repeated ids are summed first, in batch order, at the id's first position (so no
    host sync counts the distinct ids); every position of an id then writes the same new row."""
    first = (ids[:, None] == ids).int().argmax(1)                     # [B] where each row's id first occurs
    g = torch.zeros_like(grad).index_add_(0, first, grad)[first]      # [B, D] its id's summed gradient
    table[ids] = table[ids] * (1 - lr * weight_decay) - lr * g.sign()


def ema_copy(model):
    """The EMA model that `update` averages into and evaluations use. The puzzle-embedding table is not averaged (the
    reference keeps it out of the EMA): both models share it, so its memory (1.8 GB for ARC-AGI-1) is held once."""
    return copy.deepcopy(model, memo={id(model.puzzle_emb): model.puzzle_emb}).eval().requires_grad_(False)


def adamw(model, tcfg, device):
    # The reference uses Adam-atan2; plain AdamW is reported to reach the same accuracy (see README). Fused: one
    # kernel for all the weights, 7x faster than the foreach path on a CPU (1.2 vs 8.8 ms for the paper's model).
    return torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2),
                             weight_decay=tcfg.weight_decay, fused=device.type in ("cpu", "cuda"))


@torch.no_grad()
def update(optimizer, model, ema_params, result, step, total, tcfg):
    """`opt.step(); opt.zero_grad()`: AdamW on the weights, sign-SGD on the puzzle-embedding rows, then the
    EMA of the weights (the paper's EMA 0.999)."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if result.puzzle_grad is not None:     # None: the encoder, whose weights AdamW has just updated
        puzzle_emb_step(model.puzzle_emb, result.puzzle_ids, result.puzzle_grad,
                        lr_at(step, total, tcfg, tcfg.puzzle_emb_lr), tcfg.puzzle_emb_weight_decay)
    torch._foreach_lerp_(list(ema_params), list(model.parameters()), 1 - tcfg.ema)


def train(tcfg, mcfg, resume_state=None):
    """The paper's training loop (module docstring), one optimizer step per supervision step of every slot."""
    # Run holds the data, model, EMA, optimizer and the out folder; Ctrl-C and SIGTERM stop at a step boundary
    with Run.start(tcfg, mcfg, resume_state) as run, StopRequest() as stop:
        model = run.model
        step_fn = torch.compile(supervision_step) if run.compile_on else supervision_step
        model.train()
        while run.step < run.total_steps and not stop.agreed(run.ranks, run.device):
            batch = next(run.batches)
            carry = refill(model, run.carry or initial_carry(model, batch), batch)
            lr = lr_at(run.step, run.total_steps, tcfg, tcfg.lr)
            for g in run.optimizer.param_groups:
                g["lr"] = lr
            depth = depth_at(run.step, run.total_steps, tcfg, run.mcfg)     # (n, T, N_sup) of this step
            min_steps = exploration_min_steps(tcfg.batch_size, depth[2], tcfg.halt_exploration_prob,
                                              run.device)
            result = accumulated_step(step_fn, model, carry, min_steps[run.mine], run.micro, tcfg.batch_size,
                                      run.autocast, depth, tcfg.supervision_decay)
            result = all_reduce_step(run.ranks, run.params, result)
            grads = [p.grad for p in run.params if p.grad is not None]
            # The step's one host sync: whether its loss and gradients are finite, read with whether the last
            # update left the weights finite (never applying an update computed from a NaN or inf).
            step_finite, weights_finite = torch.stack((finite(result.loss, result.puzzle_grad, *grads),
                                                       run.weights_finite)).tolist()
            run.stop_if_weights_nonfinite(weights_finite)
            if not step_finite:
                run.skip_nonfinite()                   # or StopTraining, past --skip-nonfinite steps
                run.optimizer.zero_grad(set_to_none=True)
                run.carry = None                       # the states in flight may be non-finite too: refill them all
                continue
            update(run.optimizer, model, run.ema_model.parameters(), result, run.step, run.total_steps, tcfg)
            run.step += 1
            run.updated(result, lr)
            run.carry = result.carry
            run.log_step(result.stats, lr, depth)
            if run.due(tcfg.eval_interval):
                run.evaluate()
            if run.due(tcfg.checkpoint_interval):
                run.save()
        if stop.signum:
            raise Interrupted(stop.signum, run.save() if run.step > run.start_step else None, tcfg.out)
        path = run.save()
        res = run.evaluate()
        run.log(f"done: {run.step} steps in {format_time(time.time() - run.t0)}; checkpoint {path}")
        run.ranks.finish()
    return model, run.ema_model, res


# =====================================================================================================================
# The run's plumbing. Nothing below changes what is computed: it only calls the algorithm above, and no gradient
# is taken, detached or switched on here (test_trm.py checks that).
# =====================================================================================================================

# ------------------------------------------------------------------------------ settings and the command line

@dataclass
class TrainConfig(DataConfig):
    """The run's settings, each a --flag: the data's (data.DataConfig), then these. The defaults, with
    model.TRMConfig's, are the reference's Sudoku-Extreme run; a task's presets state what differs."""
    preset: str = "auto"                 # paper on CUDA, cpu otherwise; hrm, hrm-paper: HRM at their scales
    preset_note: str = ""                # not a flag: why this preset (chosen, or this machine's default), for the log
    out: str = ""                        # default out/{task}-{preset}
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
    # training-time depth (depth_at); evaluation always uses the model's n, T, N_sup
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
    deterministic: bool = True           # the same weights from the same seed (off: faster where that costs)
    seed: int = 0
    resume: str = ""                     # a checkpoint path, or "auto" for the newest complete one in --out
    overwrite: bool = False
    skip_nonfinite: int = 0              # steps with a non-finite loss or gradient to skip before stopping
    bench: str = ""                      # time training steps instead: e.g. float32,bfloat16,bfloat16+compile
    bench_steps: int = 5                 # timed steps per variant, after 2 warm-up steps


# Settings that are no flags: the data gives the model's vocabulary, length and puzzle ids, the preset its note.
NOT_FLAGS = ("preset_note", "vocab_size", "seq_len", "num_puzzle_ids")

# HRM (Wang et al. 2025) as the TRM paper's Table 1 starts from: two 4-layer networks f_L and f_H, n 2, T 2, the
# 1-step gradient, ACT with a continue loss, and no EMA. The paper-scale HRM uses attention with RoPE, as HRM did.
HRM = dict(separate_nets=True, one_step_grad=True, act_continue=True, n_layers=4, n=2, T=2, ema=0.0)


def presets_of(task):
    """A task's presets (its module's PRESETS) plus `hrm` (HRM at the cpu preset's scale, net and data) and
    `hrm-paper` (HRM at the paper preset's)."""
    presets = importlib.import_module(task).PRESETS
    return {**presets, "hrm": {**presets["cpu"], **HRM},
            "hrm-paper": {**presets["paper"], **HRM, "mlp_t": False, "rope": True}}


def field_notes(cls):
    """The comment after each field of a config dataclass, for its --help line (% escaped for argparse)."""
    fields = (re.match(r"\s+(\w+): [^#]*#\s*(.+)", line) for line in inspect.getsource(cls).splitlines())
    return {m[1]: m[2].replace("%", "%%") for m in fields if m}


def parse_args(argv, description=None):
    """The command line: every field of TrainConfig and TRMConfig but NOT_FLAGS becomes a --flag; only the flags
    actually given are returned, so that a preset fills the rest."""
    p = ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    notes = {**field_notes(DataConfig), **field_notes(TrainConfig), **field_notes(TRMConfig)}
    for f in dataclasses.fields(TrainConfig) + dataclasses.fields(TRMConfig):
        flag, unset = "--" + f.name.replace("_", "-"), argparse.SUPPRESS
        if f.name in NOT_FLAGS:
            continue
        if f.name == "bench":    # a bare --bench compares float32 and bfloat16
            p.add_argument(flag, nargs="?", const="float32,bfloat16", default=unset,
                           help="time training steps of each variant (dtype, +compile) instead of training; "
                                "a bare --bench is float32,bfloat16")
        elif f.type is bool or f.type == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=unset,
                           help=f"{notes.get(f.name, '')} (default {f.default})")
        else:
            p.add_argument(flag, type=type(f.default), default=unset,
                           help=f"{notes.get(f.name, '')} (default {f.default})")
    p.add_argument("--n-sup", dest="N_sup", type=int, default=unset, help="supervision steps (default 16)")
    return vars(p.parse_args(argv))


def resolve_config(given):
    """Defaults < task preset < the settings given (a dict of field names). Returns (TrainConfig, TRMConfig); the
    model's vocabulary and sequence length are the task's data's."""
    task = given.get("task", TrainConfig.task)
    if task not in TASKS:
        raise SettingsError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    presets, preset, note = presets_of(task), given.get("preset", "auto"), "chosen"
    if preset == "auto":
        preset = "paper" if torch.cuda.is_available() else "cpu"
        note = f"default {'with' if preset == 'paper' else 'without'} CUDA"
    if preset not in presets:
        raise SettingsError(f"unknown preset {preset!r} for {task}; expected one of {', '.join(presets)}")
    settings = {"preset_note": note, **presets[preset], **given, "task": task, "preset": preset}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    tcfg = TrainConfig(**{k: v for k, v in settings.items() if k in train_names})
    vocab_size, seq_len = importlib.import_module(task).shape(tcfg)
    mcfg = TRMConfig(**{**{k: v for k, v in settings.items() if k not in train_names},
                        "vocab_size": vocab_size, "seq_len": seq_len})
    check_config(tcfg, mcfg)
    return tcfg, mcfg


def check_config(tcfg, mcfg):
    """Settings that cannot work fail here, before any data is built or any file is touched."""
    finite = math.isfinite
    rules = [  # (names, test, what is expected); the data's sizes first, as the model's length follows them
        (("size",), lambda v: 2 <= v <= 30, "a side of 2 to 30 cells (ARC grids are at most 30x30)"),
        (("n", "T", "N_sup", "batch_size", "d_model", "n_layers", "n_heads", "vocab_size", "seq_len",
          "num_puzzle_ids", "bench_steps"), lambda v: v >= 1, "a whole number of at least 1"),
        (("max_steps", "epochs", "skip_nonfinite", "num_aug", "micro_batch", "threads", "seed", "data_seed",
          "train_puzzles", "test_puzzles", "warmup_steps", "eval_interval", "eval_limit", "checkpoint_interval",
          "puzzle_emb_len", "min_path", "difficulty"), lambda v: v >= 0, "a whole number of at least 0"),
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
                raise SettingsError(f"{flag_of(name)} is {value}; expected {expected}")
    for name, (most, why) in LIMITS.items():       # work that could never finish is refused before it starts
        value = getattr(tcfg, name, getattr(mcfg, name, None))
        if value > most:
            raise SettingsError(f"{flag_of(name)} is {value}; expected at most {most:,}: {why}")
    if tcfg.train_puzzles and tcfg.batch_size > tcfg.train_puzzles * (tcfg.num_aug + 1):
        raise SettingsError(f"--batch-size {tcfg.batch_size} is larger than the "
                            f"{tcfg.train_puzzles * (tcfg.num_aug + 1)} training rows "
                            f"({tcfg.train_puzzles} puzzles x {tcfg.num_aug + 1} versions)")
    if round(mcfg.expansion * min(mcfg.d_model, mcfg.puzzle_emb_len + mcfg.seq_len) * 2 / 3) < 1:
        raise SettingsError(f"--expansion {mcfg.expansion} leaves the SwiGLU no hidden channels; expected a larger "
                            f"factor (the paper's is 4)")
    if tcfg.resume and tcfg.overwrite:
        raise SettingsError("--resume continues the run in --out and --overwrite replaces it; expected one of them")
    if tcfg.max_steps == 0 and tcfg.epochs == 0:
        raise SettingsError("--max-steps 0 leaves the length to --epochs, which is 0 too; expected a number of steps "
                            "or epochs to train")
    if not mcfg.mlp_t and mcfg.d_model % mcfg.n_heads:
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


# Upper bounds, each with why: a typo (1e6 for 1e-6) must not start work that cannot finish, or fill the memory.
LIMITS = dict(
    n=(64, "the paper recurses 6 times"), T=(64, "the paper's T is 3"), N_sup=(1024, "the paper's is 16"),
    n_layers=(64, "the paper's net has 2"), encoder_layers=(64, "the encoder has 2 by default"),
    d_model=(8192, "the paper's width is 512"), n_heads=(256, "the paper's is 8"),
    expansion=(64.0, "the paper's SwiGLU factor is 4"), puzzle_emb_len=(1024, "the paper's prefix has 16"),
    batch_size=(1 << 20, "the paper's is 768"), micro_batch=(1 << 20, "the paper's batch is 768"),
    num_aug=(100_000, "the paper's is 1000"), train_puzzles=(10_000_000, "Sudoku-Extreme has 3.8M"),
    test_puzzles=(10_000_000, "Sudoku-Extreme's test set has 423K"),
    difficulty=(20, "puzzles made by removing givens at random rarely need more guesses (1 in 400 of those with "
                    "50-60 blanks needs 20), so the generator would run for days"),
    max_steps=(10 ** 9, "the paper's longest run is 518K steps"), epochs=(10 ** 9, "the paper's longest run is 100K"),
    threads=(4096, "threads beyond the cores only wait"), bench_steps=(10_000, "a timing needs a few"),
    seed=(2 ** 63 - 1, "torch takes 64-bit seeds"), data_seed=(2 ** 63 - 1, "numpy takes 64-bit seeds"))


def flag_of(name):
    """The command line's flag for a setting (or, for one the data sets, its name and where it comes from)."""
    return "--n-sup" if name == "N_sup" else f"{name} (set by the data)" if name in NOT_FLAGS else \
        "--" + name.replace("_", "-")


def check_given(given, tcfg, mcfg):
    """A flag given that these settings never read is refused, saying why: it would do nothing, in silence."""
    task = importlib.import_module(tcfg.task)
    own = {"min_blanks", "max_blanks", "difficulty", "size", "min_path", "extra"}     # each task reads some of these
    for name in given:
        if name in own and name not in task.SETTINGS:
            raise SettingsError(f"{flag_of(name)} is no setting of {tcfg.task} (its own are "
                                f"{', '.join(map(flag_of, task.SETTINGS))}), so it would do nothing")
        if name in task.GENERATOR_SETTINGS and tcfg.data not in ("generate", "auto"):
            raise SettingsError(f"{flag_of(name)} sets the puzzle generator, and --data {shown(tcfg.data, 80)} reads "
                                f"puzzles instead, so it would do nothing; expected --data generate or auto")
    attention = not mcfg.mlp_t
    rules = [  # (settings, whether they do something here, why not)
        (("encoder_layers",), mcfg.task_embedding == "encoder", "it sizes the demonstration encoder, which only "
                                                                "--task-embedding encoder has"),
        (("puzzle_emb_lr", "puzzle_emb_weight_decay"), mcfg.task_embedding == "id",
         "they train the puzzle-id table, which --task-embedding encoder does not use"),
        (("depth_width", "random_n_sup"), tcfg.depth_schedule == "random", "only --depth-schedule random draws depths"),
        (("curriculum_stages",), tcfg.depth_schedule == "curriculum", "only --depth-schedule curriculum has stages"),
        (("n_heads", "rope", "rope_theta"), attention, "the token MLP (--mlp-t) mixes positions without attention"),
        (("rope_theta",), mcfg.rope, "only --rope uses it"),
        (("bench_steps",), tcfg.bench, "it counts the steps --bench times"),
        (("resume", "overwrite", "out", "max_steps", "epochs", "eval_interval", "eval_limit", "checkpoint_interval",
          "log_interval", "skip_nonfinite"), not tcfg.bench, "--bench times training steps and trains nothing"),
    ]
    for names, used, why in rules:
        name = next((name for name in names if name in given), None)
        if name and not used:
            raise SettingsError(f"{flag_of(name)} would do nothing here: {why}")


def check_memory(mcfg, device):
    """A model whose weights, gradients, AdamW moments and EMA alone (20 bytes a parameter) outgrow this machine's
    memory is refused before any data is built (the model is counted on the meta device: no memory is taken)."""
    with torch.device("meta"):
        params = TRM(mcfg).num_params()
    if device.type == "cuda":
        have, where = gpu_memory(device), f"{device} has"
    elif device.type == "cpu":
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine has"
    else:
        return
    if 20 * params > have:
        raise SettingsError(f"the model has {params / 1e9:.1f} billion parameters, whose weights, gradients, AdamW "
                            f"moments and EMA need {20 * params / 1e9:.0f} GB, and {where} {have / 1e9:.0f} GB; "
                            f"expected a smaller --d-model, --n-layers or --expansion")


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
    """Rows per forward/backward: few enough that the activations kept for the backward pass stay near 6 GB on a
    CPU, or 60% of a GPU's memory. Measured: about 160 bytes per (net call with gradient) x layer x position x
    width in float32, i.e. 112 MB per row of the paper's Sudoku model (22 GB peak at 168 rows on a CPU, 81 GB at
    768 on a GPU), about half that in bf16 on a GPU (34 GB at 768, compiled). The DemoEncoder adds its layers for
    each of a row's pairs, padded to the most of any task: 10 in ARC-AGI-1."""
    local = tcfg.batch_size // world
    if tcfg.micro_batch:
        return min(tcfg.micro_batch, local)
    if device.type not in ("cpu", "cuda"):
        return local
    pairs = 10 * mcfg.encoder_layers if mcfg.task_embedding == "encoder" else 0
    per_row = 160 * ((mcfg.n + 1) * mcfg.n_layers + pairs) * (mcfg.puzzle_emb_len + mcfg.seq_len) * mcfg.d_model
    budget = 6e9
    if device.type == "cuda":
        budget = 0.6 * gpu_memory(device)
        if tcfg.dtype in ("auto", "bfloat16"):
            per_row //= 2
    most = max(1, min(local, int(budget // per_row)))
    # Equal micro-batches where a divisor of the batch allows (64 rows as 32 + 32, not 53 + 11): a smaller last
    # one costs a second compile of the step, and runs its matmuls at a worse shape.
    even = max(d for d in range(1, most + 1) if local % d == 0)
    return even if 2 * even > most else most


def gpu_memory(device):
    return torch.cuda.get_device_properties(device).total_memory


# ------------------------------------------------------------------------------ devices and torchrun's processes

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
    # Same seed, same weights: inductor writes scatter-adds (the token embedding's backward) as atomic adds, whose
    # order varies from run to run; in this mode it calls ATen's ordered kernel instead, and on a GPU it keeps to
    # kernel configurations that no timing chooses. The mode's NaN fill of every new tensor, a guard for code that
    # reads memory it never wrote (none here), took 2% of a cpu step. cuBLAS needs the workspace setting for it,
    # before its first use.
    if device.type == "cuda" and tcfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(tcfg.deterministic, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False
    if device.type == "cpu":
        keep_freed_memory()
    if tcfg.threads:       # capped at the machine's: a checkpoint may come from a bigger one, and 10^5 crashes torch
        torch.set_num_threads(min(tcfg.threads, os.cpu_count() or 1))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    # bf16 forward with float32 master weights: autocast casts each weight once per region.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    return device, dtype, compile_on, autocast


def keep_freed_memory():
    """glibc hands large freed blocks back to the system (munmap, heap trimming), so every training step faulted
    its buffers in again: 135,000 page faults and 10% of a compiled step at the paper's shapes spent in the
    kernel. Served from the heap and never trimmed, freed memory stays mapped for the next step's buffers."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):     # not glibc: macOS, musl
        return
    mallopt(-4, 0)          # M_MMAP_MAX: no allocation gets a mapping of its own
    mallopt(-1, 2 ** 30)    # M_TRIM_THRESHOLD: keep up to 1 GB free at the top of the heap


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
    """How many distinct (n, T, N_sup) depth_at can give: what torch.compile compiles."""
    if tcfg.depth_schedule == "random":
        return (2 * tcfg.depth_width + 1) ** (3 if tcfg.random_n_sup else 2)
    return 3 if tcfg.depth_schedule == "curriculum" else 1


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


# ------------------------------------------------------------------------------------------ the run

@dataclass
class Run:
    """Everything a training run holds besides the loop itself: built by `start`, saved by `save`; as a
    context it gives its output folder back at the end (`OutputFolder.release`)."""
    tcfg: TrainConfig
    mcfg: TRMConfig
    task: object
    ranks: Ranks
    log: object                   # the Logger
    device: torch.device
    autocast: object
    compile_on: bool
    test_ds: object
    model: TRM
    ema_model: TRM
    optimizer: torch.optim.Optimizer
    batches: Batches
    total_steps: int
    micro: int
    step: int = 0
    carry: dict = None
    last_ckpt: str = ""
    skipped: int = 0              # non-finite steps skipped so far
    t0: float = 0.0               # when the loop started, for rates and the ETA
    start_step: int = 0
    last_log: float = 0.0
    sums: dict = None             # statistics summed since the last log line
    steps_logged: int = 0
    folder: object = None         # the OutputFolder of --out, claimed by rank 0
    eval_seconds: float = 0.0     # spent in periodic evaluations, left out of train_seconds
    weights_finite: torch.Tensor = None    # whether the last update left the weights finite, not yet read
    last_lr: float = 0.0          # the last update's learning rate, for the message if it did not

    @property
    def params(self):
        return list(self.model.parameters())

    @property
    def mine(self):
        return self.ranks.rows(self.tcfg.batch_size)

    @classmethod
    def start(cls, tcfg, mcfg, resume_state):
        """Everything is built and checked first; the output folder is claimed last, so a run that fails its
        checks (settings, device, data, checkpoint) leaves no file behind."""
        device, dtype, compile_on, autocast = setup_runtime(tcfg)
        check_memory(mcfg, device)
        ranks = Ranks.from_env()
        if tcfg.batch_size % ranks.world:
            raise SettingsError(f"--batch-size {tcfg.batch_size} does not split evenly over "
                                f"{ranks.world} processes")
        log = Logger(tcfg.out if ranks.main else None, quiet=not ranks.main)
        log(f"task {tcfg.task}, preset {tcfg.preset} ({tcfg.preset_note}), device {device}, {dtype}, "
            f"compile {'on' if compile_on else 'off'}, out {tcfg.out}"
            + (f", {ranks.world} processes ({ranks.backend})" if ranks.world > 1 else ""))
        log(f"train config: {json.dumps(dataclasses.asdict(tcfg))}")
        log(f"model config: {json.dumps(dataclasses.asdict(mcfg))}")
        task = importlib.import_module(tcfg.task)
        t0 = time.time()
        with ranks.main_first():     # rank 0 builds the cached data, the others then read it
            try:
                train_ds, test_ds = task.build_datasets(tcfg)
            except (DataError, SettingsError) as e:
                if not tcfg.resume:
                    raise
                raise DataError(f"{e} (the data settings are those checkpoint {tcfg.resume} was trained with)") \
                    from None
        mcfg = fit_to_data(mcfg, train_ds, resume_state is None)
        log(f"data: {len(train_ds.inputs)} training rows in {train_ds.num_groups} groups, "
            f"{len(test_ds.inputs)} test rows ({time.time() - t0:.1f}s)")

        torch.manual_seed(tcfg.seed)     # every rank: the same weights, the same exploration draws
        model = TRM(mcfg).to(device)
        ema_model = ema_copy(model)
        optimizer = adamw(model, tcfg, device)
        batches = Batches(train_ds, tcfg.batch_size, tcfg.seed, device, ranks.rows(tcfg.batch_size),
                          demos=model.reads_demos)
        total_steps = tcfg.max_steps or max(1, int(tcfg.epochs * rows_per_epoch(train_ds) // tcfg.batch_size))
        micro = micro_batch_size(tcfg, mcfg, device, ranks.world)
        table = model.puzzle_emb
        log(f"model: {model.num_params():,} parameters, puzzle-embedding table {tuple(table.shape)} "
            f"({table.numel() * 4 / 1e9:.2f} GB); {total_steps:,} steps of batch {tcfg.batch_size}"
            + (f" in micro-batches of {micro} rows (gradients accumulated)"
               if micro * ranks.world < tcfg.batch_size else ""))
        run = cls(tcfg, mcfg, task, ranks, log, device, autocast, compile_on, test_ds, model, ema_model,
                  optimizer, batches, total_steps, micro, last_ckpt=tcfg.resume,
                  weights_finite=torch.ones((), dtype=torch.bool, device=device))
        if resume_state is not None:
            restore_training(run, resume_state)
            if run.step >= total_steps:
                raise SettingsError(f"checkpoint {tcfg.resume} is at step {run.step} of a {total_steps}-step "
                                    f"run, so nothing is left to train; expected a larger --max-steps")
        if ranks.main:        # last: a run that fails its checks leaves no folder behind
            run.folder = OutputFolder(tcfg, log, run.step)
        run.t0 = run.last_log = time.time()
        run.start_step = run.step
        return run

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.folder:
            self.folder.release()

    def due(self, interval):
        return interval and self.step % interval == 0 and self.step < self.total_steps

    def skip_nonfinite(self):
        self.skipped += 1
        if self.skipped > self.tcfg.skip_nonfinite:
            last = self.last_ckpt or "none yet"
            raise StopTraining(f"step {self.step + 1} has a non-finite loss or gradient, so training "
                               f"stopped before updating; the last checkpoint, {last}, is intact "
                               f"(--skip-nonfinite N skips up to N such steps)")
        self.log(f"step {self.step + 1}: non-finite loss or gradient, skipped "
                 f"({self.skipped} of at most {self.tcfg.skip_nonfinite})")

    def updated(self, result, lr):
        """After an update: whether the weights, EMA and updated puzzle-embedding rows are finite, kept as a tensor
        and read (a host sync) with the next step's check, or before a save or an evaluation."""
        rows = None if result.puzzle_grad is None else self.model.puzzle_emb[result.puzzle_ids]
        self.weights_finite, self.last_lr = finite(*self.params, *self.ema_model.parameters(), rows), lr

    def stop_if_weights_nonfinite(self, weights_finite=None):
        """NaN or inf weights stop the run before anything uses them; weights_finite: the value already read."""
        if weights_finite is None:
            weights_finite = bool(self.weights_finite)
        if not weights_finite:
            raise StopTraining(f"step {self.step} made the weights non-finite (learning rate {self.last_lr:g}), so "
                               f"training stopped; the last checkpoint, {self.last_ckpt or 'none yet'}, "
                               f"is intact")

    def log_step(self, stats, lr, depth):
        """Sum the step's statistics; print them every log_interval seconds (the only host sync for logs)."""
        self.sums = stats if self.sums is None else {k: self.sums[k] + v for k, v in stats.items()}
        self.steps_logged += 1
        now, B = time.time(), self.tcfg.batch_size
        quiet = now - self.last_log < self.tcfg.log_interval and self.step < self.total_steps
        if quiet or not self.ranks.main:
            return
        s = dict(zip(self.sums, torch.stack([v.double() for v in self.sums.values()]).tolist()))    # one host sync
        halted, per_sample = s["halted"], self.steps_logged * B
        rate = (self.step - self.start_step) * B / (now - self.t0)
        eta = (self.total_steps - self.step) * B / max(rate, 1e-9)
        # exact and steps are of the puzzles that halted since the last line: none halted is no data, not 0
        r = dict(step=self.step, epoch=self.batches.epochs_done, lm_loss=s["lm_loss"] / per_sample,
                 halt_loss=s["halt_loss"] / per_sample, exact=s["exact"] / halted if halted else None,
                 mean_halt_steps=s["steps"] / halted if halted else None, samples_per_s=rate, lr=lr,
                 elapsed=now - self.t0, train_seconds=self.train_seconds(now), n=depth[0], T=depth[1], N_sup=depth[2])
        shown_depth = "" if self.tcfg.depth_schedule == "fixed" else "n {} T {} N_sup {} | ".format(*depth)
        halting = (f"exact {r['exact']:.1%} steps {r['mean_halt_steps']:.1f}" if halted else
                   "none halted yet")
        self.log(f"step {self.step}/{self.total_steps} epoch {r['epoch']:.1f} | loss {r['lm_loss']:.4f} "
                 f"halt {r['halt_loss']:.4f} | {halting} | {shown_depth}"
                 f"{rate:,.{1 if rate < 10 else 0}f} samples/s | lr {lr:.2e} | ETA {format_time(eta)}"
                 + (f" | {self.skipped} non-finite steps skipped" if self.skipped else ""), kind="train", **r)
        self.sums, self.steps_logged, self.last_log = None, 0, now

    def train_seconds(self, now):
        """Seconds of training since the start, evaluations left out: the clock of time-to-accuracy."""
        return now - self.t0 - self.eval_seconds

    def evaluate(self):
        """The EMA weights on the held-out puzzles (evaluate.during_training); the log and curves.png redrawn."""
        self.stop_if_weights_nonfinite()
        t = time.time()
        res, line, scores = evaluate.during_training(self.task, self.tcfg, self.ema_model, self.test_ds, self.device,
                                                     self.autocast, self.ranks,
                                                     self.tcfg.batch_size // self.ranks.world,
                                                     self.tcfg.eval_limit or None)
        if self.ranks.main:
            self.eval_seconds += time.time() - t
            self.log(f"eval step {self.step}: {line}", kind="eval", step=self.step, per_step=res,
                     train_seconds=self.train_seconds(time.time()), **scores)
            if self.log.held is None:     # else metrics.jsonl is still the replaced run's
                evaluate.plot_curves(self.log.path, os.path.join(self.tcfg.out, "curves.png"),
                                     f"{self.tcfg.task}/{self.tcfg.preset}")
        return res

    def save(self):
        """A checkpoint (training_state); the newest two are kept. Every rank takes part. The first one ends the
        files of a run this one replaces (OutputFolder.drop_replaced)."""
        self.stop_if_weights_nonfinite()
        state = training_state(self)
        if state is None:
            return None
        self.last_ckpt = self.folder.save(state, self.step)
        return self.last_ckpt


class Logger:
    """Prints a line and appends its record, if any, to metrics.jsonl; ranks other than 0 say nothing. While a run
    replaces another's files, its records wait in memory (`held`) until its first checkpoint is on disk."""

    def __init__(self, out, quiet=False):
        # opened at the first record, so that a run that fails before its first step leaves no empty file
        self.path = os.path.join(out, "metrics.jsonl") if out else None
        self.file, self.quiet, self.held = None, quiet, None

    def __call__(self, line, **record):
        if not self.quiet:
            print(line, flush=True)
        if self.path and record:
            self.write(json.dumps(null_for_nan(record)))

    def write(self, line):
        if self.held is not None:
            self.held.append(line)
            return
        self.file = self.file or open(self.path, "a")
        self.file.write(line + "\n")
        self.file.flush()

    def release(self):
        """Write the records held back, once the files they would have mixed with are gone."""
        held, self.held = self.held or [], None
        for line in held:
            self.write(line)


def null_for_nan(value):
    """A record with NaN (an unscored accuracy) as null: json.dumps would write NaN, which is not JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: null_for_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [null_for_nan(v) for v in value]
    return value


# ------------------------------------------------------------------------------ checkpoints and the output folder

def training_state(run):
    """What a resumed Run needs to compute the same weights: models, optimizer, data position, the carry of every
    rank (each takes part in the gather) and the random state. None on ranks other than 0."""
    carry = {k: run.ranks.gather(v).cpu() for k, v in run.carry.items()}
    if not run.ranks.main:
        return None
    state = dict(model=run.model.state_dict(), ema=run.ema_model.state_dict(), optimizer=run.optimizer.state_dict(),
                 step=run.step, batches=run.batches.state_dict(), train_config=dataclasses.asdict(run.tcfg),
                 model_config=dataclasses.asdict(run.mcfg), carry=carry,
                 rng=dict(torch=torch.get_rng_state(),
                          cuda=torch.cuda.get_rng_state() if run.device.type == "cuda" else None))
    return dict(state, checksum=evaluate.checksum(state))      # verified on every load: damage on disk is caught


def restore_training(run, state):
    """The inverse of training_state, into a freshly built Run of the same settings."""
    path = run.tcfg.resume
    evaluate.load_weights(run.model, state["model"], path)
    evaluate.load_weights(run.ema_model, state["ema"], path)
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
    run.log(f"resumed at step {run.step} from {path}" + (f", changing what changes nothing computed: "
                                                           f"{', '.join(state['changed'])}" if state.get("changed")
                                                           else ""))


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


def load_checkpoint(path):
    """One of our checkpoints, to resume: evaluate.read_checkpoint's checks, its training settings, and a step, data
    position and optimizer state a run can go on from."""
    state = evaluate.read_checkpoint(path)
    tcfg = evaluate.config_from(TrainConfig, state["train_config"], f"checkpoint {path}")
    mcfg = evaluate.config_from(TRMConfig, state["model_config"], f"checkpoint {path}")
    try:
        check_config(tcfg, mcfg)
    except SettingsError as e:
        raise DataError(f"checkpoint {path} holds settings that cannot work: {e}") from None
    batches = state.get("batches")
    if not (type(state.get("step")) is int and state["step"] >= 0 and isinstance(batches, dict)
            and all(type(batches.get(k)) is int and batches[k] >= 0 for k in ("epoch", "pos"))):
        raise DataError(f"checkpoint {path} has no step and data position a run can go on from (step "
                        f"{shown(state.get('step'))}); expected whole numbers of at least 0, as train.py saves them")
    for part in ("optimizer", "carry"):
        evaluate.check_finite(dict(evaluate.tensors_in(state.get(part), part)), f"checkpoint {path}", part)
    return state


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


# What a resumed run may change: how it runs, logs, evaluates and saves, and how long it trains. Every other setting
# changes what is computed, and --resume continues a run exactly.
RESUMABLE = ("out", "resume", "max_steps", "epochs", "log_interval", "eval_interval", "eval_limit",
             "checkpoint_interval", "threads", "device", "compile", "micro_batch", "skip_nonfinite", "deterministic")


def resumed_config(given, tcfg):
    """--resume: the checkpoint's settings, with only RESUMABLE ones changed by the command line (--max-steps, say),
    each change noted. Returns them with the checkpoint's state."""
    path, state = find_checkpoint(tcfg.resume, tcfg.out)
    saved = {**state["train_config"], **state["model_config"], "preset": state["train_config"]["preset"]}
    given = {**given, "preset": tcfg.preset} if "preset" in given else given     # auto, as it resolved here
    for k, value in given.items():
        if k not in RESUMABLE and value != saved[k]:
            raise SettingsError(f"checkpoint {path} was trained with {k} {saved[k]}, not {value}; --resume continues "
                                f"a run exactly, so expected the same {flag_of(k)}, or a new run in another --out")
    state["changed"] = [f"{k} {saved[k]} -> {v}" for k, v in sorted(given.items()) if k not in ("out", "resume")
                        and v != saved[k]]
    return (*resolve_config({**saved, **given, "resume": path, "out": tcfg.out}), state)


def check_out_use(tcfg):
    """A run may not mix into a folder holding another run's checkpoints unless told to replace them; a run
    resumed from a checkpoint elsewhere counts as another run."""
    theirs = checkpoints_in(tcfg.out)
    if tcfg.resume and os.path.abspath(tcfg.resume) in map(os.path.abspath, theirs):
        return
    if theirs and not tcfg.overwrite:
        raise SettingsError(f"{tcfg.out} already holds a run; use --resume auto to continue it, "
                            f"--overwrite to replace it, or --out for a new folder")


def lock_folder(out):
    """Claim out for this process: an exclusive lock on out/run.lock, which the kernel drops when the process ends
    however it ends, so a killed run's lock never blocks the next. The file holds the process id, for messages.
    Returns (the open lock file, a line to log or None)."""
    path = os.path.join(out, "run.lock")
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "(unknown)"
            f.close()
            raise SettingsError(f"{out} is in use by process {holder}, which holds {path}; wait for it to end "
                                f"or choose another --out") from None
        if os.path.exists(path) and os.path.samestat(os.fstat(f.fileno()), os.stat(path)):
            break
        f.close()            # locked a file its last holder had just removed: lock the one at the path now
    f.seek(0)
    before = f.read().strip()
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f, f"took over {path}: process {before} that held it is gone" if before else None


class OutputFolder:
    """A training run's --out, claimed by one process: made if absent and locked (`lock_folder`), checked again
    under the lock (`check_out_use`), cleared of the .tmp a killed run left. `save` writes a checkpoint and keeps
    the newest two that load. metrics.jsonl stays the run's true history: a resumed run first drops the records
    after its checkpoint's step; a new run never appends to another's records, and the files of a run it replaces
    (--overwrite, or the metrics of one that saved no checkpoint) go only once its own first checkpoint is on disk,
    its records held back until then. Leaving releases the lock, and the folder too if the run wrote nothing."""

    def __init__(self, tcfg, log, step):
        self.out, self.log, self.good = tcfg.out, log, {tcfg.resume} if tcfg.resume else set()
        self.made = evaluate.make_folder(self.out)
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
        metrics = os.path.join(self.out, "metrics.jsonl")
        old = checkpoints_in(self.out) + [metrics, os.path.join(self.out, "curves.png")]
        self.replaced = [] if tcfg.resume else [p for p in old if os.path.exists(p)]
        if self.replaced:
            log.held = []
        if tcfg.resume and os.path.exists(metrics):
            self.cut_history(metrics, step)

    def cut_history(self, metrics, step):
        """Keep the records up to the checkpoint's step: the ones after it were made by steps this run repeats."""
        records = evaluate.read_metrics(metrics)
        kept = [r for r in records if r["step"] <= step]
        with open(metrics) as f:
            if len(kept) == sum(1 for _ in f):
                return
        with open(metrics + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        os.replace(metrics + ".tmp", metrics)
        self.log(f"metrics.jsonl: kept the {len(kept)} records up to step {step}, the checkpoint's; the "
                 f"{len(records) - len(kept)} after it (and any damaged line) belonged to steps run again now")

    def drop_replaced(self, kept):
        """The replaced run's files, all but the path kept (this run's first checkpoint may have its name)."""
        for path in self.replaced:
            if path != kept and os.path.exists(path):
                os.remove(path)
        self.log(f"removed the {len(self.replaced)} files of the run this one replaces in {self.out}, now that it "
                 f"has a checkpoint of its own")
        self.replaced = []
        self.log.release()

    def save(self, state, step):
        path = os.path.join(self.out, f"ckpt_{step:08d}.pt")
        save_checkpoint(path, state)
        self.good.add(path)
        if self.replaced:
            self.drop_replaced(path)
        prune_checkpoints(self.out, 2, self.good)
        return path

    def release(self):
        os.remove(self.lock.name)     # while still held, so no other run can have locked it
        self.lock.close()
        if self.made and not os.listdir(self.out):
            os.rmdir(self.out)


# ---------------------------------------------------------------------------------- signals and the command line

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


def main(argv=None):
    given = parse_args(argv, __doc__.split("\n")[0])
    sizes = "--batch-size, --micro-batch, --d-model, --puzzle-emb-len or --num-aug"
    one_sentence_on_failure(lambda: run_command(given), sizes, expected=(StopTraining, Interrupted))


def run_command(given):
    """The command line's run: a benchmark, a new run, or a resumed one (settings from its checkpoint)."""
    tcfg, mcfg = resolve_config(given)
    check_given(given, tcfg, mcfg)
    if tcfg.bench:
        return bench(tcfg, mcfg)
    tcfg.out = tcfg.out or os.path.join("out", f"{tcfg.task}-{tcfg.preset}")
    evaluate.check_out_folder(tcfg.out)
    resume_state = None
    if tcfg.resume:
        tcfg, mcfg, resume_state = resumed_config(given, tcfg)
    check_out_use(tcfg)
    train(tcfg, mcfg, resume_state)


# ------------------------------------------------------------------------------------------- the benchmark

BENCH_DEMOS = 3      # demonstrations per row in --bench of an encoder model: the synthetic tasks' (ARC's mean is 3.3)


def bench(tcfg, mcfg):
    """`--bench`: time full training steps (bench_step: forward, backward, AdamW, sign-SGD, EMA) on random puzzles
    of the configured shape, one line per variant; no data is built and nothing written."""
    flops = flops_per_sample(mcfg, BENCH_DEMOS)
    print(f"bench {tcfg.task}/{tcfg.preset}: batch {tcfg.batch_size}, D {mcfg.d_model}, "
          f"{'token MLP' if mcfg.mlp_t else 'attention'}, n {mcfg.n}, T {mcfg.T}, "
          f"{mcfg.puzzle_emb_len + mcfg.seq_len} positions; {flops / 1e9:.2f} GFLOP per sample and step")
    for variant in tcfg.bench.split(","):
        dtype, _, compiled = variant.partition("+")
        if compiled not in ("", "compile") or dtype not in ("float32", "bfloat16"):
            raise SettingsError(f"--bench variant {shown(variant)}; expected float32 or bfloat16, optionally with "
                                f"+compile (float32,bfloat16+compile, say)")
        vcfg = dataclasses.replace(tcfg, dtype=dtype, compile="on" if compiled else "off")
        check_config(vcfg, mcfg)
        device, dtype, compile_on, autocast = setup_runtime(vcfg)
        check_memory(mcfg, device)
        torch.manual_seed(tcfg.seed)
        model = TRM(mcfg).to(device).train()
        micro = micro_batch_size(tcfg, mcfg, device)
        step = bench_step(model, vcfg, device, autocast, compile_on, micro)
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
        share = matmul_share(lambda: step(batch), device)
        print(f"{variant:>18}: {B / per_step:8,.1f} samples/s | {1000 * per_step:9,.1f} ms/step | "
              f"peak memory {memory / 1e9:5.2f} GB | {achieved / 1e12:6.3f} TFLOP/s = {achieved / peak:5.1%} "
              f"MFU of {peak / 1e12:.3f} TFLOP/s measured {dtype} matmul | matrix products {share:.0%} of the "
              f"step, the rest {1 - share:.0%} | warm-up (compile) {warm:.0f}s"
              + (f", micro-batches of {micro}" if micro < B else ""), flush=True)


def bench_step(model, tcfg, device, autocast, compile_on, micro):
    """One full training step (refill, forward, backward, AdamW, sign-SGD, EMA) as the loop runs it, on whatever
    batch it is given."""
    ema_params = list(ema_copy(model).parameters())
    optimizer = adamw(model, tcfg, device)
    step_fn = torch.compile(supervision_step) if compile_on else supervision_step
    carry = None

    def step(batch):
        nonlocal carry
        carry = refill(model, carry or initial_carry(model, batch), batch)
        min_steps = torch.zeros_like(batch["puzzle_ids"])
        result = accumulated_step(step_fn, model, carry, min_steps, micro, tcfg.batch_size, autocast)
        update(optimizer, model, ema_params, result, 0, 1, tcfg)
        carry = result.carry
    return step


def matmul_share(step, device):
    """The share of one more step's time spent in matrix products, from torch's profiler: the self time of the
    matmul ops and attention kernels (on a GPU their kernels' time) over the step's time. The rest is
    elementwise work (SiLU, norms, RoPE, casts, copies), the loss, the optimizer and Python."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
        synchronize(device)
        t = time.perf_counter()
        step()
        synchronize(device)
        wall = time.perf_counter() - t
    events = prof.key_averages()

    def busy(e):     # seconds
        return (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e6
    matmuls = sum(busy(e) for e in events if e.key in ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")
                  or "attention" in e.key and e.key != "aten::scaled_dot_product_attention")
    # a GPU's step is its kernels' time; a CPU's, the wall clock (its Python and waits included)
    return min(1.0, matmuls / (sum(busy(e) for e in events) if cuda else wall))


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


if __name__ == "__main__":
    main()
