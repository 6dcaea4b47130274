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
The batch shape stays constant. This file reads top-down as the algorithm: the loss, the refill, one
supervision step, the update, the loop (`train`); the plumbing (checkpoints, logs, command line, benchmark)
comes after it.
"""
import copy
import dataclasses
import importlib
import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

import evaluate
from data import (Batches, Ranks, SettingsError, TrainConfig, curriculum_stages,
                  fit_to_data, micro_batch_size, parse_args, resolve_config, rows_per_epoch)
from evaluate import (Interrupted, Logger, OutputFolder, StopRequest, check_out_folder, check_out_use,
                      format_time, one_sentence_on_failure, plot_curves, restore_training, resumed_config,
                      setup_runtime, training_state)
from model import TRM, TRMConfig


class StopTraining(Exception):
    """Training cannot go on (a non-finite loss, say): the message says why and what is safe on disk."""


# ---------------------------------------------------------------------------------------------- loss

def stablemax_cross_entropy(logits, labels, mask):
    """-log(s(x_label) / sum s(x)) with s(x) = x + 1 for x >= 0, 1 / (1 - x) for x < 0, in float64 as the
    reference: unlike softmax it grows linearly, so large logits stay finite. Per token [B, L]."""
    x = logits.double()
    # Clamping keeps the branch torch.where does not pick finite, else its gradient is 0 * inf = NaN at x = 1.
    s = torch.where(x >= 0, x + 1, 1 / (1 - x.clamp_max(0)))
    logp = torch.log(s / s.sum(-1, keepdim=True))
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
    position and restart from the initial states (as the reference does); the others keep theirs."""
    halted = carry["halted"]
    y0, z0 = model.initial_state(halted.shape[0])
    fresh = dict(batch, y=y0, z=z0, steps=torch.zeros_like(carry["steps"]))
    # halted [B] spread over each tensor's other dimensions: [B, L], [B, S, D], multi-scale z's [B, n, S, D]
    return dict({k: torch.where(halted.view(-1, *[1] * (v.dim() - 1)), v, carry[k]) for k, v in fresh.items()},
                halted=halted)


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
    with autocast:
        puzzle_rows = model.task_rows(carry)      # table rows as a leaf, or the encoder's output with its graph
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
        part = step_fn(model, {k: v[rows] for k, v in carry.items()}, min_steps[rows], autocast, depth, decay)
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


def all_finite(*tensors):
    """Whether every element is finite, with one host sync: the price of never applying an update computed
    from a NaN or inf (a NaN or inf anywhere makes the sum non-finite). None, a tensor the run lacks, is skipped."""
    return bool(torch.isfinite(torch.stack([t.detach().float().sum() for t in tensors if t is not None]).sum()))


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
    optimizer): gradients of repeated ids are summed first."""
    uniq, inverse = ids.unique(return_inverse=True)
    g = torch.zeros(len(uniq), grad.shape[-1], dtype=grad.dtype, device=grad.device)
    g.index_add_(0, inverse, grad)
    table[uniq] = table[uniq] * (1 - lr * weight_decay) - lr * g.sign()


def adamw(model, tcfg, device):
    # The reference uses Adam-atan2; plain AdamW is reported to reach the same accuracy (see README).
    return torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2),
                             weight_decay=tcfg.weight_decay, fused=device.type == "cuda")


@torch.no_grad()
def update(optimizer, model, ema_params, result, step, total, tcfg):
    """`opt.step(); opt.zero_grad()`: AdamW on the weights, sign-SGD on the puzzle-embedding rows, then the
    EMA of the weights (the paper's EMA 0.999)."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if result.puzzle_grad is not None:     # None: the encoder, whose weights AdamW has just updated
        puzzle_emb_step(model.puzzle_emb, result.puzzle_ids, result.puzzle_grad,
                        lr_at(step, total, tcfg, tcfg.puzzle_emb_lr), tcfg.puzzle_emb_weight_decay)
    for e, p in zip(ema_params, model.parameters()):
        e.lerp_(p, 1 - tcfg.ema)


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
            if not all_finite(result.loss, result.puzzle_grad, *grads):
                run.skip_nonfinite()                   # or StopTraining, past --skip-nonfinite steps
                continue
            update(run.optimizer, model, run.ema_model.parameters(), result, run.step, run.total_steps, tcfg)
            run.stop_if_weights_nonfinite(result, lr)
            run.step += 1
            run.carry = result.carry
            if run.folder:                             # --overwrite: the old run goes once a step has worked
                run.folder.drop_replaced()
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


# ------------------------------------------------------------------------------------------ the run

@dataclass
class Run:
    """Everything a training run holds besides the loop itself: built by `start`, saved by `save`; as a
    context it gives its output folder back at the end (`OutputFolder.release`)."""
    tcfg: TrainConfig
    mcfg: TRMConfig
    task: object
    ranks: Ranks
    log: "Logger"
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
    folder: OutputFolder = None   # --out, claimed by rank 0
    eval_seconds: float = 0.0     # spent in periodic evaluations, left out of train_seconds

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
            train_ds, test_ds = task.build_datasets(tcfg)
        mcfg = fit_to_data(mcfg, train_ds, resume_state is None)
        log(f"data: {len(train_ds.inputs)} training rows in {train_ds.num_groups} groups, "
            f"{len(test_ds.inputs)} test rows ({time.time() - t0:.1f}s)")

        torch.manual_seed(tcfg.seed)     # every rank: the same weights, the same exploration draws
        model = TRM(mcfg).to(device)
        # The puzzle-embedding table is not averaged (the reference keeps it out of the EMA): both models
        # share it, so its memory (1.8 GB for ARC-AGI-1) is held once, and saved once.
        ema_model = copy.deepcopy(model, memo={id(model.puzzle_emb): model.puzzle_emb}).eval()
        ema_model.requires_grad_(False)
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
                  optimizer, batches, total_steps, micro, last_ckpt=tcfg.resume)
        if resume_state is not None:
            restore_training(run, resume_state)
            if run.step >= total_steps:
                raise SettingsError(f"checkpoint {tcfg.resume} is at step {run.step} of a {total_steps}-step "
                                    f"run, so nothing is left to train; expected a larger --max-steps")
        if ranks.main:        # last: a run that fails its checks leaves no folder behind
            run.folder = OutputFolder(tcfg, log)
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
        self.optimizer.zero_grad(set_to_none=True)
        self.carry = None    # the states in flight may be non-finite too: refill every slot

    def stop_if_weights_nonfinite(self, result, lr):
        """After an update: NaN or inf weights, EMA or updated puzzle-embedding rows stop the run before a save."""
        rows = None if result.puzzle_grad is None else self.model.puzzle_emb[result.puzzle_ids]
        if not all_finite(*self.params, *self.ema_model.parameters(), rows):
            raise StopTraining(f"step {self.step + 1} made the weights non-finite (learning rate {lr:g}), so "
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
        s = {k: float(v) for k, v in self.sums.items()}
        halted, per_sample = max(s["halted"], 1), self.steps_logged * B
        rate = (self.step - self.start_step) * B / (now - self.t0)
        eta = (self.total_steps - self.step) * B / max(rate, 1e-9)
        r = dict(step=self.step, epoch=self.batches.epochs_done, lm_loss=s["lm_loss"] / per_sample,
                 halt_loss=s["halt_loss"] / per_sample, exact=s["exact"] / halted,
                 mean_halt_steps=s["steps"] / halted, samples_per_s=rate, lr=lr, elapsed=now - self.t0,
                 train_seconds=self.train_seconds(now), n=depth[0], T=depth[1], N_sup=depth[2])
        shown_depth = "" if self.tcfg.depth_schedule == "fixed" else "n {} T {} N_sup {} | ".format(*depth)
        self.log(f"step {self.step}/{self.total_steps} epoch {r['epoch']:.1f} | loss {r['lm_loss']:.4f} "
                 f"halt {r['halt_loss']:.4f} | exact {r['exact']:.1%} steps {r['mean_halt_steps']:.1f} | "
                 f"{shown_depth}"
                 f"{rate:,.{1 if rate < 10 else 0}f} samples/s | lr {lr:.2e} | ETA {format_time(eta)}"
                 + (f" | {self.skipped} non-finite steps skipped" if self.skipped else ""), kind="train", **r)
        self.sums, self.steps_logged, self.last_log = None, 0, now

    def train_seconds(self, now):
        """Seconds of training since the start, evaluations left out: the clock of time-to-accuracy."""
        return now - self.t0 - self.eval_seconds

    def evaluate(self):
        t = time.time()
        res, line, scores = evaluate.during_training(self.task, self.tcfg, self.ema_model, self.test_ds,
                                                     self.device, self.autocast, self.ranks)
        if self.ranks.main:
            self.eval_seconds += time.time() - t
            self.log(f"eval step {self.step}: {line}", kind="eval", step=self.step, per_step=res,
                     train_seconds=self.train_seconds(time.time()), **scores)
            plot_curves(self.log.path, os.path.join(self.tcfg.out, "curves.png"),
                        f"{self.tcfg.task}/{self.tcfg.preset}")
        return res

    def save(self):
        """A checkpoint (evaluate.training_state); the newest two are kept. Every rank takes part."""
        state = training_state(self)
        if state is None:
            return None
        self.last_ckpt = self.folder.save(state, self.step)
        return self.last_ckpt


# ------------------------------------------------------------------------------------- command line

def main(argv=None):
    given = parse_args(argv, __doc__.split("\n")[0])
    sizes = "--batch-size, --micro-batch, --d-model, --puzzle-emb-len or --num-aug"
    one_sentence_on_failure(lambda: start(given), sizes, expected=(StopTraining,))


def start(given):
    """The command line's run: a benchmark, a new run, or a resumed one (settings from its checkpoint)."""
    tcfg, mcfg = resolve_config(given)
    if tcfg.bench:
        return evaluate.bench(tcfg, mcfg, bench_step)
    tcfg.out = tcfg.out or os.path.join("out", f"{tcfg.task}-{tcfg.preset}")
    check_out_folder(tcfg.out)
    resume_state = None
    if tcfg.resume:
        tcfg, mcfg, resume_state = resumed_config(given, tcfg)
    check_out_use(tcfg)
    train(tcfg, mcfg, resume_state)


# ---------------------------------------------------------------------------------------------- bench

def bench_step(model, tcfg, device, autocast, compile_on, micro):
    """For `evaluate.bench`: one full training step (refill, forward, backward, AdamW, sign-SGD, EMA) as the loop
    runs it, on whatever batch it is given."""
    ema_params = [p.detach().clone() for p in model.parameters()]
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


if __name__ == "__main__":
    main()
