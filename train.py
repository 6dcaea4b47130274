"""Train a TRM with deep supervision: `python train.py --task sudoku [--preset cpu|paper] [--key value ...]`.

One optimizer step per supervision step. Every slot of the batch carries its own (y, z) across steps and
is refilled with a fresh puzzle when it halts (the Q head says so, or N_sup steps are done): the paper's
`for step in range(N_sup): ... if q_hat > 0: break` made per sample, with a constant batch shape.
"""
import argparse
import contextlib
import copy
import dataclasses
import glob
import importlib
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import Batches, DataError, rows_per_epoch
from model import TRM, SwiGLU, TRMConfig

TASKS = ("sudoku", "maze", "arc")


class StopTraining(Exception):
    """Training cannot go on (a non-finite loss, say): the message says why and what is safe on disk."""


@dataclass
class TrainConfig:
    task: str = "sudoku"
    preset: str = "auto"                 # paper on CUDA, cpu otherwise
    preset_note: str = ""                # why this preset: chosen, or the default for this machine
    out: str = ""                        # default out/{task}-{preset}
    # data (each task reads the fields it needs)
    data: str = "generate"               # "generate", "hub", a local CSV file / folder; arc: arcagi1, kaggle2025, a folder
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
    micro_batch: int = 0                 # rows per forward/backward, gradients accumulated; 0 = auto (see micro_batch_size)
    lr: float = 1e-4
    warmup_steps: int = 2000
    weight_decay: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.95
    puzzle_emb_lr: float = 1e-4
    puzzle_emb_weight_decay: float = 1.0
    ema: float = 0.999
    epochs: int = 50000
    max_steps: int = 0                   # 0: epochs * train puzzles / batch_size, as the reference counts
    halt_exploration_prob: float = 0.1
    # running
    eval_interval: int = 2000            # steps; 0 evaluates only at the end
    eval_limit: int = 1000               # held-out puzzles (arc: tasks) per periodic evaluation
    checkpoint_interval: int = 2000
    log_interval: float = 5.0            # seconds between log lines
    dtype: str = "auto"                  # bfloat16 on CUDA, float32 on CPU
    compile: str = "auto"                # on for CUDA, off for CPU
    device: str = "auto"
    threads: int = 0                     # CPU threads, 0 = torch's default
    seed: int = 0
    resume: str = ""                     # a checkpoint path, or "auto" for the newest complete one in --out
    overwrite: bool = False
    skip_nonfinite: int = 0              # steps with a non-finite loss or gradient to skip before stopping
    bench: str = ""                      # measure instead of training: variants such as float32,bfloat16,bfloat16+compile
    bench_steps: int = 5                 # timed steps per variant, after 2 warm-up steps


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


def deep_supervision_loss(logits, q_halt, labels):
    """Per sample: mean stablemax CE over its labelled tokens + 0.5 * BCE(halt logit, answer exactly right).
    Returns the batch sums (the trainer divides by the global batch size) and the exactness per sample."""
    mask = labels != 0
    counts = mask.sum(-1).clamp_min(1)
    with torch.no_grad():
        correct = ((logits.argmax(-1) == labels) | ~mask).all(-1)          # whole answer exact [B]
    lm_loss = (stablemax_cross_entropy(logits, labels, mask).sum(-1) / counts).sum()
    halt_loss = F.binary_cross_entropy_with_logits(q_halt, correct.to(q_halt.dtype), reduction="sum")
    return lm_loss + 0.5 * halt_loss, lm_loss.detach(), halt_loss.detach(), correct


# ---------------------------------------------------------------------------------- deep supervision

def initial_carry(model, batch):
    """Every slot starts halted, so the first step fills all of them from the first batch."""
    y, z = model.initial_state(batch["inputs"].shape[0])
    return dict(y=y, z=z, steps=torch.zeros_like(batch["puzzle_ids"]),
                halted=torch.ones_like(batch["puzzle_ids"], dtype=torch.bool), **batch)


def exploration_min_steps(batch_size, N_sup, p, device):
    """The halting exploration: with probability p a slot must run at least randint(2, N_sup) steps this step.
    Drawn for the whole global batch, so every rank and micro-batch uses the draws a single process would."""
    if N_sup < 2:
        return torch.zeros(batch_size, dtype=torch.long, device=device)
    explore = torch.rand(batch_size, device=device) < p
    return explore * torch.randint(2, N_sup + 1, (batch_size,), device=device)


def supervision_step(model, carry, batch, min_steps, autocast):
    """One step of the paper's deep-supervision loop for every slot. Slots that halted last step take the
    next batch's puzzle at their position and restart from the initial y, z (as the reference does).
    min_steps [B]: the exploration's least steps per slot (exploration_min_steps)."""
    halted = carry["halted"]
    y0, z0 = model.initial_state(halted.shape[0])
    h3 = halted[:, None, None]
    y = torch.where(h3, y0, carry["y"])
    z = torch.where(h3, z0, carry["z"])
    steps = torch.where(halted, 0, carry["steps"])
    inputs = torch.where(halted[:, None], batch["inputs"], carry["inputs"])
    labels = torch.where(halted[:, None], batch["labels"], carry["labels"])
    puzzle_ids = torch.where(halted, batch["puzzle_ids"], carry["puzzle_ids"])

    # The batch's rows of the puzzle-embedding table as a leaf, so backward gives exactly their gradient.
    puzzle_rows = model.puzzle_emb[puzzle_ids].requires_grad_(model.training)
    with autocast:
        (y, z), logits, q_halt = model(inputs, puzzle_rows, y, z)
    loss, lm_loss, halt_loss, correct = deep_supervision_loss(logits, q_halt, labels)

    with torch.no_grad():
        steps = steps + 1
        N_sup = model.cfg.N_sup
        halted = steps >= N_sup
        if model.training and N_sup > 1:
            halted = halted | (q_halt > 0)      # the paper's "if q_hat > 0: break"
            halted = halted & (steps >= min_steps)
    new_carry = dict(y=y, z=z, steps=steps, halted=halted, inputs=inputs, labels=labels, puzzle_ids=puzzle_ids)
    stats = dict(lm_loss=lm_loss, halt_loss=halt_loss, halted=halted.sum(), exact=(correct & halted).sum(),
                 steps=(steps * halted).sum())
    return loss, new_carry, puzzle_ids, puzzle_rows, stats


def micro_batch_size(tcfg, mcfg, device, world=1):
    """Rows per forward/backward: the whole batch on CUDA; on a CPU few enough that the activations kept for
    the backward pass stay near 6 GB. Measured: about 160 bytes per (net call with gradient) x layer x
    position x width in float32, i.e. 112 MB per row of the paper's Sudoku model (22 GB peak at 168 rows)."""
    local = tcfg.batch_size // world
    if tcfg.micro_batch:
        return min(tcfg.micro_batch, local)
    if device.type == "cuda":
        return local
    per_row = 160 * (mcfg.n + 1) * mcfg.n_layers * (mcfg.puzzle_emb_len + mcfg.seq_len) * mcfg.d_model
    return max(1, min(local, int(6e9 // per_row)))


def accumulated_step(step_fn, model, carry, batch, min_steps, micro, global_batch, autocast):
    """Forward and backward of one optimizer step over this process's rows, in slices of `micro` rows. The loss
    is a sum over samples divided by the global batch size, so the accumulated gradients (summed over ranks
    when there are several) are the whole batch's."""
    parts = []
    for i in range(0, len(min_steps), micro):
        rows = slice(i, i + micro)
        loss, new_carry, ids, puzzle_rows, stats = step_fn(model, {k: v[rows] for k, v in carry.items()},
                                                           {k: v[rows] for k, v in batch.items()},
                                                           min_steps[rows], autocast)
        (loss / global_batch).backward()
        parts.append((loss.detach(), new_carry, ids, puzzle_rows.grad, stats))
    if len(parts) == 1:
        return parts[0]
    loss, carries, ids, grads, stats = zip(*parts)
    return (sum(loss), {k: torch.cat([c[k] for c in carries]) for k in carries[0]}, torch.cat(ids),
            torch.cat(grads), {k: sum(s[k] for s in stats) for k in stats[0]})


@torch.no_grad()
def puzzle_emb_step(table, ids, grad, lr, weight_decay):
    """Sign-SGD with decoupled weight decay on the rows used in the batch only (the reference's sparse
    optimizer): gradients of repeated ids are summed first."""
    uniq, inverse = ids.unique(return_inverse=True)
    g = torch.zeros(len(uniq), grad.shape[-1], dtype=grad.dtype, device=grad.device).index_add_(0, inverse, grad)
    table[uniq] = table[uniq] * (1 - lr * weight_decay) - lr * g.sign()


def all_finite(loss, params, puzzle_grad):
    """One host sync per step: the price of never applying an update computed from a NaN or inf."""
    grads = [p.grad for p in params if p.grad is not None] + [puzzle_grad]
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum() + loss.detach()))


def lr_at(step, cfg, base):
    """Linear warmup, then constant (the reference's schedule with its minimum ratio 1)."""
    return base * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


# --------------------------------------------------------------------------------------- checkpoints

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


def read_torch_file(path):
    """torch.load of a checkpoint file, with a missing or unreadable file as one sentence."""
    if not os.path.isfile(path):
        raise DataError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise DataError(f"checkpoint {path} could not be read ({type(e).__name__}); it is truncated or not a checkpoint") from None


def load_checkpoint(path, state=None):
    """One of our checkpoints (state: its contents when already read), checked for the parts a run needs."""
    state = read_torch_file(path) if state is None else state
    if not isinstance(state, dict) or not {"model", "model_config", "train_config"} <= state.keys():
        raise DataError(f"{path} is not a checkpoint of this project (model, model_config and train_config expected)")
    return state


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


# ------------------------------------------------------------------------------------------- config

def parse_args(argv):
    """Every field of TrainConfig and TRMConfig becomes a --flag; only flags actually given are returned."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for cls in (TrainConfig, TRMConfig):
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            if f.name == "bench":    # a bare --bench compares float32 and bfloat16
                p.add_argument(flag, nargs="?", const="float32,bfloat16", default=argparse.SUPPRESS,
                               help="time training steps of each variant (dtype, +compile) instead of training; "
                                    "a bare --bench is float32,bfloat16")
            elif f.type is bool or f.type == "bool":
                p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=f"(default {f.default})")
            else:
                p.add_argument(flag, type=type(f.default), default=argparse.SUPPRESS, help=f"(default {f.default})")
    p.add_argument("--n-sup", dest="N_sup", type=int, default=argparse.SUPPRESS, help="supervision steps (default 16)")
    return vars(p.parse_args(argv))


def resolve_config(given):
    """Defaults < task preset < command line. Returns (TrainConfig, TRMConfig)."""
    task = given.get("task", TrainConfig.task)
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    module = importlib.import_module(task)
    preset = given.get("preset", "auto")
    if preset == "auto":
        preset = "paper" if torch.cuda.is_available() else "cpu"
        given = {**given, "preset_note": f"default {'with' if preset == 'paper' else 'without'} CUDA"}
    if preset not in module.PRESETS:
        raise DataError(f"unknown preset {preset!r} for {task}; expected one of {', '.join(module.PRESETS)}")
    settings = {**module.PRESETS[preset], **given, "task": task, "preset": preset}
    settings.setdefault("preset_note", "chosen")
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    tcfg = TrainConfig(**{k: v for k, v in settings.items() if k in train_names})
    mcfg = TRMConfig(**{k: v for k, v in settings.items() if k not in train_names})
    check_config(tcfg, mcfg)
    return tcfg, mcfg


def check_config(tcfg, mcfg):
    """Settings that cannot work fail here, before any data is built."""
    for name, value in (("n", mcfg.n), ("T", mcfg.T), ("n-sup", mcfg.N_sup), ("batch-size", tcfg.batch_size),
                        ("d-model", mcfg.d_model), ("n-layers", mcfg.n_layers), ("n-heads", mcfg.n_heads)):
        if value < 1:
            raise DataError(f"--{name} is {value}; expected a whole number of at least 1")
    for name, value in (("max-steps", tcfg.max_steps), ("epochs", tcfg.epochs), ("skip-nonfinite", tcfg.skip_nonfinite),
                        ("num-aug", tcfg.num_aug)):
        if value < 0:
            raise DataError(f"--{name} is {value}; expected a whole number of at least 0")
    if not tcfg.lr > 0:
        raise DataError(f"--lr is {tcfg.lr}; expected a positive learning rate")
    if tcfg.train_puzzles and tcfg.batch_size > tcfg.train_puzzles * (tcfg.num_aug + 1):
        raise DataError(f"--batch-size {tcfg.batch_size} is larger than the {tcfg.train_puzzles * (tcfg.num_aug + 1)} "
                        f"training rows ({tcfg.train_puzzles} puzzles x {tcfg.num_aug + 1} versions)")
    if mcfg.d_model % mcfg.n_heads:
        raise DataError(f"--d-model {mcfg.d_model} is not divisible by --n-heads {mcfg.n_heads}")
    if not 0 <= tcfg.ema < 1:
        raise DataError(f"--ema is {tcfg.ema}; expected a rate in [0, 1)")
    if tcfg.dtype not in ("auto", "float32", "bfloat16"):
        raise DataError(f"--dtype is {tcfg.dtype!r}; expected auto, float32 or bfloat16")
    if tcfg.compile not in ("auto", "on", "off"):
        raise DataError(f"--compile is {tcfg.compile!r}; expected auto, on or off")


def setup_runtime(tcfg):
    device = torch.device(tcfg.device if tcfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:   # torchrun: a GPU per process
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dtype = tcfg.dtype if tcfg.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    compile_on = tcfg.compile == "on" or (tcfg.compile == "auto" and device.type == "cuda")
    if tcfg.threads:
        torch.set_num_threads(tcfg.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    # bf16 forward with float32 master weights: autocast casts each weight once per region.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
    return device, dtype, compile_on, autocast


# ------------------------------------------------------------------------------ several processes

class Ranks:
    """This process's place among the torchrun processes (rank 0 of 1 without torchrun). Every rank takes an
    equal contiguous share of each global batch; gradients are summed in one all-reduce (each rank's loss is
    already divided by the global batch size), so all ranks apply the same update to the same weights."""

    def __init__(self, rank=0, world=1, backend=None):
        self.rank, self.world, self.backend, self.main = rank, world, backend, rank == 0

    @classmethod
    def from_env(cls):
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world == 1:
            return cls()
        import torch.distributed as dist
        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        return cls(dist.get_rank(), world, dist.get_backend())

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

    def gather_objects(self, obj):
        """Every rank's picklable obj (arrays of predictions, say), in rank order."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def gather(self, tensor):
        """Every rank's tensor, concatenated along dim 0 in rank order."""
        if self.world == 1:
            return tensor
        import torch.distributed as dist
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    def combine(self, params, loss, stats, ids, puzzle_grad):
        """The global step from the ranks' parts: gradients, loss and statistics summed in one all-reduce, and
        every rank's puzzle-embedding rows with their gradients gathered, so each rank applies the same sparse
        update to its copy of the table."""
        if self.world == 1:
            return loss, stats, ids, puzzle_grad
        grads = [p.grad for p in params]
        names = list(stats)
        extra = torch.stack([loss.float()] + [stats[k].float() for k in names])
        flat = self.sum(torch.cat([g.reshape(-1) for g in grads] + [extra]))
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        loss, values = flat[offset], flat[offset + 1:]
        return loss, dict(zip(names, values)), self.gather(ids), self.gather(puzzle_grad)


# -------------------------------------------------------------------------------------------- train

class Logger:
    def __init__(self, out, quiet=False):
        self.file = open(os.path.join(out, "metrics.jsonl"), "a") if out else None
        self.quiet = quiet    # ranks other than 0 say nothing

    def __call__(self, line, **record):
        if not self.quiet:
            print(line, flush=True)
        if self.file and record:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()


def train(tcfg, mcfg, resume_state=None):
    import evaluate  # evaluate imports train for its config helpers
    task = importlib.import_module(tcfg.task)
    device, dtype, compile_on, autocast = setup_runtime(tcfg)
    ranks = Ranks.from_env()
    out = tcfg.out
    if ranks.main:
        os.makedirs(out, exist_ok=True)
    log = Logger(out if ranks.main else None, quiet=not ranks.main)
    log(f"task {tcfg.task}, preset {tcfg.preset} ({tcfg.preset_note}), device {device}, "
        f"{dtype}, compile {'on' if compile_on else 'off'}, out {out}"
        + (f", {ranks.world} processes ({ranks.backend})" if ranks.world > 1 else ""))
    log(f"train config: {json.dumps(dataclasses.asdict(tcfg))}")
    log(f"model config: {json.dumps(dataclasses.asdict(mcfg))}")
    if tcfg.batch_size % ranks.world:
        raise DataError(f"--batch-size {tcfg.batch_size} does not split evenly over {ranks.world} processes")

    t0 = time.time()
    with ranks.main_first():     # rank 0 builds the cached data, the others then read it
        train_ds, test_ds = task.build_datasets(tcfg)
    if train_ds.num_puzzle_ids > 1 and resume_state is None:   # ARC: one id per augmented task, known from the data
        mcfg = dataclasses.replace(mcfg, num_puzzle_ids=train_ds.num_puzzle_ids)
    if mcfg.seq_len != train_ds.seq_len or mcfg.vocab_size != train_ds.vocab_size or mcfg.num_puzzle_ids < train_ds.num_puzzle_ids:
        raise DataError(f"the data has sequences of {train_ds.seq_len} tokens over {train_ds.vocab_size} symbols and "
                        f"{train_ds.num_puzzle_ids} puzzle ids, but the model is set for {mcfg.seq_len}, "
                        f"{mcfg.vocab_size} and {mcfg.num_puzzle_ids}")
    log(f"data: {len(train_ds.inputs)} training rows in {train_ds.num_groups} groups, {len(test_ds.inputs)} test rows "
        f"({time.time() - t0:.1f}s)")

    torch.manual_seed(tcfg.seed)     # every rank starts from the same weights and draws the same exploration
    model = TRM(mcfg).to(device)
    # The puzzle-embedding table is not averaged (the reference keeps it out of the EMA): both models share it,
    # so its memory (1.8 GB for ARC-AGI-1) is held once, and saved once (torch.save stores a shared tensor once).
    ema_model = copy.deepcopy(model, memo={id(model.puzzle_emb): model.puzzle_emb}).eval()
    for p in ema_model.parameters():
        p.requires_grad_(False)
    # The reference uses Adam-atan2; plain AdamW is reported to reach the same accuracy (see README).
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2),
                                  weight_decay=tcfg.weight_decay, fused=device.type == "cuda")
    mine = ranks.rows(tcfg.batch_size)
    batches = Batches(train_ds, tcfg.batch_size, tcfg.seed, device, mine)
    total_steps = tcfg.max_steps or max(1, int(tcfg.epochs * rows_per_epoch(train_ds) // tcfg.batch_size))
    micro = micro_batch_size(tcfg, mcfg, device, ranks.world)
    log(f"model: {model.num_params():,} parameters, puzzle-embedding table {tuple(model.puzzle_emb.shape)} "
        f"({model.puzzle_emb.numel() * 4 / 1e9:.2f} GB); {total_steps:,} steps of batch {tcfg.batch_size}"
        + (f" in micro-batches of {micro} rows (gradients accumulated)" if micro * ranks.world < tcfg.batch_size else ""))

    step, carry = 0, None
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        ema_model.load_state_dict(resume_state["ema"])
        optimizer.load_state_dict(resume_state["optimizer"])
        batches.load_state_dict(resume_state["batches"])
        step = resume_state["step"]
        carry = {k: v[mine].to(device) for k, v in resume_state["carry"].items()}
        torch.set_rng_state(resume_state["rng"]["torch"])
        if device.type == "cuda" and resume_state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(resume_state["rng"]["cuda"])
        log(f"resumed at step {step} from {tcfg.resume}")

    step_fn = torch.compile(supervision_step) if compile_on else supervision_step
    params = list(model.parameters())
    ema_params = list(ema_model.parameters())
    sums, steps_logged, skipped = None, 0, 0
    last_ckpt = tcfg.resume
    last_log = t0 = time.time()
    start_step = step

    def save(step):
        whole_carry = {k: ranks.gather(v).cpu() for k, v in carry.items()}   # every rank takes part
        if not ranks.main:
            return None
        state = dict(model=model.state_dict(), ema=ema_model.state_dict(), optimizer=optimizer.state_dict(),
                     step=step, batches=batches.state_dict(), train_config=dataclasses.asdict(tcfg),
                     model_config=dataclasses.asdict(mcfg), carry=whole_carry,
                     rng=dict(torch=torch.get_rng_state(),
                              cuda=torch.cuda.get_rng_state() if device.type == "cuda" else None))
        path = os.path.join(out, f"ckpt_{step:08d}.pt")
        save_checkpoint(path, state)
        for old in checkpoints_in(out)[:-2]:   # keep the newest two
            os.remove(old)
        nonlocal last_ckpt
        last_ckpt = path
        return path

    def run_eval(step):
        score = getattr(task, "score", None)    # ARC: voting across augmentations and pass@k
        res = evaluate.evaluate(ema_model, test_ds, mcfg.N_sup, tcfg.batch_size // ranks.world, device, autocast,
                                limit=tcfg.eval_limit, check=getattr(task, "check", None),
                                keep=(mcfg.N_sup,) if score else (), ranks=ranks)
        last = res[-1]
        preds, halt = last.pop("preds", None), last.pop("halt", None)
        if not ranks.main:
            return res
        scores, line = score(tcfg, preds, halt) if score else ({}, "")
        log(f"eval step {step}: exact {last['exact']:.2%}, token {last['token']:.2%} on {last['count']} held-out "
            f"rows after {mcfg.N_sup} supervision steps (EMA weights)" + (f"; {line}" if line else ""),
            kind="eval", step=step, per_step=res, **scores)
        return res

    model.train()
    while step < total_steps:
        batch = next(batches)
        if carry is None:
            carry = initial_carry(model, batch)
        lr = lr_at(step, tcfg, tcfg.lr)
        for g in optimizer.param_groups:
            g["lr"] = lr
        min_steps = exploration_min_steps(tcfg.batch_size, mcfg.N_sup, tcfg.halt_exploration_prob, device)[mine]
        loss, carry, ids, puzzle_grad, stats = accumulated_step(step_fn, model, carry, batch, min_steps, micro,
                                                                tcfg.batch_size, autocast)
        loss, stats, ids, puzzle_grad = ranks.combine(params, loss, stats, ids, puzzle_grad)
        if not all_finite(loss, params, puzzle_grad):
            skipped += 1
            if skipped > tcfg.skip_nonfinite:
                raise StopTraining(f"step {step + 1} has a non-finite loss or gradient, so training stopped before "
                                   f"updating; the last checkpoint, {last_ckpt or 'none yet'}, is intact "
                                   f"(--skip-nonfinite N skips up to N such steps)")
            log(f"step {step + 1}: non-finite loss or gradient, skipped ({skipped} of at most {tcfg.skip_nonfinite})")
            optimizer.zero_grad(set_to_none=True)
            carry = None    # the states in flight may be non-finite too: refill every slot
            continue
        update(optimizer, model, ema_params, ids, puzzle_grad, step, tcfg)
        step += 1
        sums = stats if sums is None else {k: sums[k] + v for k, v in stats.items()}
        steps_logged += 1

        now = time.time()
        if ranks.main and (now - last_log >= tcfg.log_interval or step == total_steps):
            s = {k: float(v) for k, v in sums.items()}   # the only host-device sync, once per log line
            halted, per_sample = max(s["halted"], 1), steps_logged * tcfg.batch_size
            rate = (step - start_step) * tcfg.batch_size / (now - t0)
            eta = (total_steps - step) * tcfg.batch_size / max(rate, 1e-9)
            log(f"step {step}/{total_steps} epoch {batches.epochs_done:.1f} | loss {s['lm_loss'] / per_sample:.4f} "
                f"halt {s['halt_loss'] / per_sample:.4f} | exact {s['exact'] / halted:.1%} "
                f"steps {s['steps'] / halted:.1f} | {rate:,.{1 if rate < 10 else 0}f} samples/s | lr {lr:.2e} | ETA {format_time(eta)}"
                + (f" | {skipped} non-finite steps skipped" if skipped else ""),
                kind="train", step=step, epoch=batches.epochs_done, lm_loss=s["lm_loss"] / per_sample,
                halt_loss=s["halt_loss"] / per_sample, exact=s["exact"] / halted,
                mean_halt_steps=s["steps"] / halted, samples_per_s=rate, lr=lr, elapsed=now - t0)
            sums, steps_logged, last_log = None, 0, now
        if tcfg.eval_interval and step % tcfg.eval_interval == 0 and step < total_steps:
            run_eval(step)
        if tcfg.checkpoint_interval and step % tcfg.checkpoint_interval == 0 and step < total_steps:
            save(step)
    path = save(step)
    res = run_eval(step)
    log(f"done: {step} steps in {format_time(time.time() - t0)}; checkpoint {path}")
    return model, ema_model, res


def update(optimizer, model, ema_params, ids, puzzle_grad, step, tcfg):
    """Apply a step's gradients: AdamW on the weights, sign-SGD on the puzzle-embedding rows, then the EMA."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    puzzle_emb_step(model.puzzle_emb, ids, puzzle_grad, lr_at(step, tcfg, tcfg.puzzle_emb_lr),
                    tcfg.puzzle_emb_weight_decay)
    torch._foreach_lerp_(ema_params, list(model.parameters()), 1 - tcfg.ema)


# ---------------------------------------------------------------------------------------------- bench

def flops_per_sample(mcfg):
    """Matmul FLOPs of one training supervision step for one sample, counted from the shapes (norms, RoPE, the
    loss and the optimizer are not matmuls and not counted). S = P + L positions, F and Ft the SwiGLU widths
    over D channels and over S positions. Per net call and layer:
        attention:   2·S·D·4D (qkv, o) + 4·S²·D (scores, weighted values) + 6·S·D·F (gate, up, down)
        token MLP:   6·D·S·Ft (SwiGLU over positions)                     + 6·S·D·F
    A step makes T(n+1) net calls forward; backward costs twice the forward of the n+1 calls with gradient.
    The heads run once with gradient, x3: output head 2·S·D·V (it sees the prefix positions too), Q head 2·D·2."""
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
    """FLOP/s of a large square matmul in dtype on device, measured now (best of 5): the MFU denominator."""
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


def bench(tcfg, mcfg):
    """Time full training steps (forward, backward, AdamW, sign-SGD, EMA) on random puzzles of the configured
    shape, one line per variant; no data is built and nothing is written."""
    flops = flops_per_sample(mcfg)
    print(f"bench {tcfg.task}/{tcfg.preset}: batch {tcfg.batch_size}, D {mcfg.d_model}, "
          f"{'token MLP' if mcfg.mlp_t else 'attention'}, n {mcfg.n}, T {mcfg.T}, "
          f"{mcfg.puzzle_emb_len + mcfg.seq_len} positions; {flops / 1e9:.2f} GFLOP per sample and step")
    for variant in tcfg.bench.split(","):
        dtype, _, compiled = variant.partition("+")
        vcfg = dataclasses.replace(tcfg, dtype=dtype, compile="on" if compiled == "compile" else "off")
        check_config(vcfg, mcfg)
        if compiled not in ("", "compile"):
            raise DataError(f"--bench variant {variant!r}; expected a dtype, optionally followed by +compile")
        device, dtype, compile_on, autocast = setup_runtime(vcfg)
        torch.manual_seed(tcfg.seed)
        model = TRM(mcfg).to(device).train()
        ema_params = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2),
                                      weight_decay=tcfg.weight_decay, fused=device.type == "cuda")
        B, L, V = tcfg.batch_size, mcfg.seq_len, mcfg.vocab_size
        batch = dict(inputs=torch.randint(1, V, (B, L), device=device), labels=torch.randint(1, V, (B, L), device=device),
                     puzzle_ids=torch.randint(0, mcfg.num_puzzle_ids, (B,), device=device))
        carry = initial_carry(model, batch)
        step_fn = torch.compile(supervision_step) if compile_on else supervision_step
        micro = micro_batch_size(tcfg, mcfg, device)
        min_steps = torch.zeros(B, dtype=torch.long, device=device)

        def one_step(carry):
            loss, carry, ids, puzzle_grad, _ = accumulated_step(step_fn, model, carry, batch, min_steps, micro, B,
                                                                autocast)
            update(optimizer, model, ema_params, ids, puzzle_grad, 0, tcfg)
            return carry

        peak_memory(device, reset=True)
        t = time.perf_counter()
        for _ in range(2):
            carry = one_step(carry)
        synchronize(device)
        warm = time.perf_counter() - t
        t = time.perf_counter()
        for _ in range(tcfg.bench_steps):
            carry = one_step(carry)
        synchronize(device)
        per_step = (time.perf_counter() - t) / tcfg.bench_steps
        memory = peak_memory(device)
        achieved, peak = flops * B / per_step, matmul_peak(device, dtype)
        print(f"{variant:>18}: {B / per_step:8,.1f} samples/s | {1000 * per_step:9,.1f} ms/step | "
              f"peak memory {memory / 1e9:5.2f} GB | {achieved / 1e12:6.3f} TFLOP/s = {achieved / peak:5.1%} MFU of "
              f"{peak / 1e12:.3f} TFLOP/s measured {dtype} matmul | warm-up {warm:.0f}s"
              + (f", micro-batches of {micro}" if micro < B else ""), flush=True)


def format_time(seconds):
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def main(argv=None):
    given = parse_args(argv)
    try:
        tcfg, mcfg = resolve_config(given)
        if tcfg.bench:
            return bench(tcfg, mcfg)
        tcfg.out = tcfg.out or os.path.join("out", f"{tcfg.task}-{tcfg.preset}")
        resume_state = None
        if tcfg.resume:
            path, resume_state = find_checkpoint(tcfg.resume, tcfg.out)
            saved = {**resume_state["train_config"], **resume_state["model_config"]}
            for k in ("task", *resume_state["model_config"]):   # the task and model shape cannot change
                if k in given and given[k] != saved[k]:
                    raise DataError(f"checkpoint {path} was trained with {k} {saved[k]}, not {given[k]}")
            # A resumed run keeps its settings unless the command line changes one (--max-steps, say).
            tcfg, mcfg = resolve_config({**saved, **given, "resume": path, "out": tcfg.out})
        elif checkpoints_in(tcfg.out) and not tcfg.overwrite:
            raise DataError(f"{tcfg.out} already holds a run; use --resume auto to continue it, "
                            f"--overwrite to replace it, or --out for a new folder")
        elif tcfg.overwrite and os.environ.get("RANK", "0") == "0":
            for old in checkpoints_in(tcfg.out) + glob.glob(os.path.join(tcfg.out, "metrics.jsonl")):
                os.remove(old)
        train(tcfg, mcfg, resume_state)
    except (DataError, StopTraining) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)

if __name__ == "__main__":
    main()
