"""Evaluate a trained TRM: accuracy after every supervision step (test-time depth), halting, depth x breadth, ARC's
voted scores, one puzzle solved step by step, training runs compared, and the pictures of each.

    python evaluate.py --checkpoint out/sudoku-cpu/ckpt_00003000.pt [--steps 32] [--limit 1000] [--halt]
    python evaluate.py --checkpoint CKPT --steps 8,16,32 --breadth 1,4,16 --init random --noise 0.3
    python evaluate.py --checkpoint CKPT --solve "<81 characters>"
    python evaluate.py --checkpoint CKPT --solve TASK.json      # ARC, a model trained with --task-embedding encoder
    python evaluate.py --checkpoint CKPT --solve TASK_ID --html # ARC, one of the model's own evaluation tasks, and
                                                                # a page that steps through the solve
    python evaluate.py --runs out/a,out/b --out figures/

A checkpoint is read as the plain dict train.py saved (or a reference state_dict), so this file needs nothing of
train.py; train.py calls `during_training` for its periodic evaluations.
"""
import dataclasses
import hashlib
import importlib
import json
import math
import os
import pickle
import signal
import time

import numpy as np
import torch

import arc
from data import (TASKS, ArgumentParser, Dataset, DataConfig, DataError, Progress, SettingsError, count_rows,
                  one_sentence_on_failure, shown, to_device)
from model import TRM, TRMConfig, from_reference_state_dict, reference_name, stablemax


# ---------------------------------------------------------------------------------- reading a trained model

def config_from(cls, values, source):
    """cls(**values) for settings read from a file (a checkpoint): a field missing, one this version does not know, or
    a value of the wrong type is one sentence naming source. None of the defaults is filled in: a model trained
    with n 1 must never be evaluated as n 6."""
    fields = {f.name: type(f.default) for f in dataclasses.fields(cls)}
    if not isinstance(values, dict):
        raise DataError(f"{source} holds no {cls.__name__} settings (a dict expected)")
    missing = [name for name in fields if name not in values]
    if missing:
        raise DataError(f"{source} lacks the setting {missing[0]} of {cls.__name__} ({len(missing)} missing); "
                        f"expected every setting, as train.py saves them")
    for name, value in values.items():
        want = fields.get(name)
        if want is None:
            raise DataError(f"{source} has the setting {shown(name)}, which {cls.__name__} does not have")
        ok = type(value) is want or (want is float and type(value) is int)
        if not ok:
            raise DataError(f"{source} has {name} = {shown(value)} ({type(value).__name__}); expected "
                            f"{want.__name__}")
    return cls(**values)


def read_torch_file(path):
    """A checkpoint file's contents, loaded as tensors and plain values only (weights_only): a file that would run
    code when unpickled is refused, not run. A missing, unreadable or unsafe file is one sentence."""
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "is not a regular file" if os.path.exists(path) else \
            "does not exist"
        raise DataError(f"checkpoint {path} {what}; expected a checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and "GLOBAL" in str(e):      # weights_only refused a callable
            raise DataError(f"checkpoint {path} holds objects other than tensors and plain values, which loading "
                            f"could run as code, so it was not loaded; expected a checkpoint saved by train.py or a "
                            f"state_dict of tensors") from None
        raise DataError(f"checkpoint {path} could not be read ({type(e).__name__}); "
                        f"it is truncated or not a checkpoint") from None


def checksum(value):
    """SHA-256 of a checkpoint's contents: every tensor's dtype, shape and bytes and every plain value, in order.
    train.py writes it into each checkpoint and read_checkpoint compares, so a file damaged on disk after it was
    saved is refused (torch's zip reader does not check its own CRCs)."""
    digest = hashlib.sha256()

    def add(v):
        if torch.is_tensor(v):
            t = v.detach().cpu().contiguous()
            digest.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(v, dict):
            digest.update(f"dict {len(v)};".encode())
            for k, item in v.items():
                add(k)
                add(item)
        elif isinstance(v, (list, tuple)):
            digest.update(f"{type(v).__name__} {len(v)};".encode())
            for item in v:
                add(item)
        else:
            digest.update(f"{type(v).__name__} {v!r};".encode())

    add(value)
    return digest.hexdigest()


def read_checkpoint(path, state=None):
    """One of train.py's checkpoints as the dict it saved (state: its contents when already read), checked for what
    every reader needs: intact on disk (its checksum), the weights finite and of the model's names and shapes,
    the model's and the data's settings complete, of known names, types and task."""
    state = read_torch_file(path) if state is None else state
    if not isinstance(state, dict) or not {"model", "ema", "model_config", "train_config"} <= state.keys():
        raise DataError(f"{path} is not a checkpoint of this project (model, ema, model_config and train_config "
                        f"expected)")
    if "checksum" not in state:
        print(f"note: checkpoint {path} has no checksum (an older version saved it), so damage on disk since then "
              f"cannot be detected")
    elif state["checksum"] != checksum({k: v for k, v in state.items() if k != "checksum"}):
        raise DataError(f"checkpoint {path} is damaged: its contents no longer match the checksum saved with them; "
                        f"expected an intact copy")
    config_from(TRMConfig, state["model_config"], f"checkpoint {path}")
    if not isinstance(state["train_config"], dict):
        raise DataError(f"checkpoint {path} holds no training settings (a dict expected)")
    dcfg = config_from(DataConfig, DataConfig.of(state["train_config"]).__dict__, f"checkpoint {path}")
    if dcfg.task not in TASKS:
        raise DataError(f"checkpoint {path} has the task {shown(dcfg.task)}; expected one of {', '.join(TASKS)}")
    for part in ("model", "ema"):
        if not isinstance(state[part], dict) or not all(torch.is_tensor(v) for v in state[part].values()):
            raise DataError(f"checkpoint {path} has {part} weights that are not a dict of tensors")
        check_finite(state[part], f"checkpoint {path}", f"{part} weights")
    return state


def tensors_in(value, name):
    """(name, tensor) for every tensor in nested dicts and lists, named by its path (optimizer.state.3.exp_avg)."""
    if torch.is_tensor(value):
        yield name, value
    elif isinstance(value, (dict, list, tuple)):
        for k, item in value.items() if isinstance(value, dict) else enumerate(value):
            yield from tensors_in(item, f"{name}.{k}")


def check_finite(tensors, source, what):
    """Refuse NaN or inf among a dict of tensors: a model that would evaluate to 0% and say nothing of why."""
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad:
        raise DataError(f"{source} has non-finite {what} ({bad}); expected a checkpoint saved before training "
                        f"diverged")


def load_weights(module, state_dict, path, what="its own model config"):
    """module.load_state_dict, with weights whose names or shapes do not fit as one sentence naming path."""
    try:
        module.load_state_dict(state_dict)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = str(e).split("\n")[1].strip() if "\n" in str(e) else str(e)
        raise DataError(f"checkpoint {path} does not fit {what}: {shown(first, 200)}") from None


def reference_config(sd, task, path):
    """A TRMConfig for a reference checkpoint, read off its tensor shapes; n and T are the paper's for the task."""
    needed = ("embed_tokens.weight", "puzzle_emb", "blocks.0.mlp.gate_up.weight")
    if any(k not in sd for k in needed):
        raise DataError(f"reference checkpoint {path} lacks {next(k for k in needed if k not in sd)} (ours; its "
                        f"name there is inner.*); expected a whole state_dict saved by the reference code")
    V, D = sd["embed_tokens.weight"].shape
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    mlp_t = "blocks.0.token_mlp.gate_up.weight" in sd
    seq_len = importlib.import_module(task).shape(DataConfig.of(reference_settings(task)))[1]
    return TRMConfig(vocab_size=V, seq_len=seq_len, d_model=D, n_layers=n_layers, mlp_t=mlp_t, rope=not mlp_t,
                     num_puzzle_ids=sd["puzzle_emb"].shape[0], n=6 if task == "sudoku" else 4, T=3, N_sup=16)


def reference_settings(task):
    """What a reference checkpoint was trained on: the task's paper preset, whose test set it is evaluated on."""
    return {"task": task, **importlib.import_module(task).PRESETS["paper"]}


def load_for_eval(path, task=None):
    """Our checkpoint (its EMA weights) or a reference state_dict (task: which task it was trained on, sudoku when
    None). Returns (model, data settings, whether it is a reference state_dict, whose data settings are its task's
    paper preset's). The model must read the data its settings build: a checkpoint edited into another task, or a
    reference state_dict given the wrong --task, is one sentence."""
    raw = read_torch_file(path)
    reference = isinstance(raw, dict) and any(str(k).removeprefix("_orig_mod.").startswith("inner.") for k in raw)
    if reference:
        task = task or "sudoku"
        if not all(torch.is_tensor(v) for v in raw.values()):
            raise DataError(f"reference checkpoint {path} holds values that are not tensors; expected a state_dict")
        try:
            sd = from_reference_state_dict(raw)
        except KeyError as e:
            raise DataError(f"reference checkpoint {path} has the key {shown(e.args[0], 80)}, which no weight of "
                            f"this model matches; expected a state_dict saved by the reference code") from None
        check_finite(sd, f"reference checkpoint {path}", "weights")
        mcfg, train_config = reference_config(sd, task, path), reference_settings(task)
    else:
        state = read_checkpoint(path, raw)
        mcfg, train_config = TRMConfig(**state["model_config"]), state["train_config"]
        sd = {**state["model"], **state["ema"]}   # EMA parameters, the live puzzle-embedding buffer
        sd["puzzle_emb"] = state["model"].get("puzzle_emb")
    dcfg = DataConfig.of(train_config)
    data_shape, model_shape = importlib.import_module(dcfg.task).shape(dcfg), (mcfg.vocab_size, mcfg.seq_len)
    if data_shape != model_shape:
        raise DataError(f"checkpoint {path} holds a model of {model_shape[1]} tokens over {model_shape[0]} symbols, "
                        f"but {dcfg.task} data of its settings has {data_shape[1]} over {data_shape[0]}; expected "
                        + ("the --task it was trained on" if reference else "the settings it was saved with"))
    model = TRM(mcfg)
    missing = [k for k in model.state_dict() if k not in sd]
    if missing and reference:
        raise DataError(f"reference checkpoint {path} lacks {reference_name(missing[0])} ({len(missing)} missing); "
                        f"expected a whole state_dict saved by the reference code")
    load_weights(model, sd, path, "the reference model its shapes describe" if reference else "its own model config")
    return model.eval(), dcfg, reference


# ---------------------------------------------------------------------------------------- the test rows
# One loop serves every evaluation: accuracy after each supervision step, halting, and test-time breadth, where K
# trajectories of every puzzle run side by side, each from its own start and with Gaussian noise on its carried
# state after every supervision step (PTRM, arXiv 2605.19943; Equilibrium Reasoners, arXiv 2605.21488), and one
# answer per puzzle is chosen. model.py's recursion runs unchanged: only the (y, z) carried between steps differ.

SELECTIONS = ("q", "vote", "converged")


class OneProcess:
    """The processes an evaluation is shared by when train.py's Ranks (torchrun) is not given: this one alone."""
    main = True

    def rows(self, n):
        return slice(0, n)

    def sum(self, tensor):
        return tensor

    def gather_objects(self, obj):
        return [obj]


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
    """Right answers (sums over the puzzles) under each way of choosing one of the first K trajectories of every
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
def run_steps(model, ds, steps, batch_size, device, autocast, breadths=(1,), init="fixed", noise=0.0, noise_y=False,
              seed=0, limit=None, check=None, threshold=None, keep=(), ranks=None):
    """The test rows of the first `limit` puzzles (all when None), each as K = max(breadths) trajectories side by
    side, for up to N = max(steps) supervision steps, scored after each k in steps from the first K' trajectories
    for each K' in breadths (trajectory j of a run with K' = 64 is trajectory j of one with K' = 4, so one run
    gives the whole table). noise: the std of the Gaussian noise added to the carried z (and y with noise_y) after
    every step. threshold: a trajectory stops after the first step whose halt probability exceeds it, its state
    and answer frozen, its later steps not counted; a puzzle whose trajectories have all stopped gives its place in
    the batch to the next puzzle at once, so batches stay full while puzzles remain. check: the task's checker,
    (inputs, predictions) -> bool, on numpy arrays.
    Returns ({(k, K'): scores}, {k: (predictions [rows, K, L] uint8, halt probabilities [rows, K])} for k in keep).
    The scores: the share of the puzzles with a known answer answered right under each selection, and pass@K;
    "steps", the supervision steps a trajectory ran (mean), and "calls", net calls per puzzle; the first
    trajectory's "token" (labelled tokens right) and, with check, "valid share" (answers the checker accepts);
    "count", and "scored", the puzzles with a known answer (every share of them is NaN when none has one).
    Under torchrun (ranks) every rank runs an equal share of the rows; rank 0 gets the whole results."""
    model.eval()
    ranks = ranks or OneProcess()
    mine = ranks.rows(count_rows(ds, limit))
    steps, breadths = sorted(steps), sorted(breadths)
    N, K, S, L = steps[-1], breadths[-1], len(steps), ds.seq_len
    total = mine.stop - mine.start
    generator = torch.Generator(device=device).manual_seed(seed)
    halt_above = math.inf if threshold is None else math.log(threshold / (1 - threshold))
    names = SELECTIONS + (("valid",) if check else ()) + ("pass@K", "steps")
    tally = dict(table=torch.zeros(S, len(breadths), len(names), dtype=torch.float64, device=device),
                 first=torch.zeros(S, 2, dtype=torch.float64, device=device),    # first trajectory: tokens, valid
                 counts=torch.zeros(3, dtype=torch.float64, device=device),      # puzzles, scored, labelled tokens
                 kept={k: (np.zeros((total, K, L), np.uint8), np.zeros((total, K), np.float32)) for k in keep})
    progress = Progress("eval", total)

    # Each place in the batch holds one puzzle as K rows (puzzle-major); per row its input, state and, for each step
    # in steps, its answer then ("at").
    G = max(1, min(batch_size // K, total))
    puzzle = np.full(G, -1)                                 # the puzzle in each place, -1 for none
    inputs = labels = emb = None
    y, z = (s.clone() for s in model.initial_state(G * K))
    dy = torch.zeros_like(y) if noise and noise_y else 0.0  # the noise on y for the next step (--noise-y)
    step = torch.zeros(G * K, dtype=torch.long, device=device)
    live = torch.zeros(G * K, dtype=torch.bool, device=device)
    preds = torch.zeros(G * K, L, dtype=torch.long, device=device)
    q, change, residual = (torch.zeros(G * K, device=device) for _ in range(3))
    at = dict(preds=torch.zeros(G * K, S, L, dtype=torch.uint8, device=device),
              q=torch.zeros(G * K, S, device=device), residual=torch.zeros(G * K, S, device=device),
              steps=torch.zeros(G * K, S, device=device))
    started = finished = 0
    while True:
        free = np.flatnonzero(puzzle < 0)[:total - started]
        if len(free):                                       # the next puzzles take the free places
            new = to_device(ds, mine.start + started + np.arange(len(free)), device, model.reads_demos)
            rows = torch.from_numpy((free[:, None] * K + np.arange(K)).reshape(-1)).to(device)
            new_emb = model.task_rows(new).repeat_interleave(K, 0)     # the encoder reads each puzzle once
            if inputs is None:
                inputs, labels = torch.zeros(2, G * K, L, dtype=torch.long, device=device)
                emb = new_emb.new_zeros((G * K, *new_emb.shape[1:]))
            inputs[rows], labels[rows], emb[rows] = (new["inputs"].repeat_interleave(K, 0),
                                                     new["labels"].repeat_interleave(K, 0), new_emb)
            y0, z0 = start_states(model, len(rows), init, generator)
            y, z = y.to(torch.promote_types(y.dtype, y0.dtype)), z.to(torch.promote_types(z.dtype, z0.dtype))
            y[rows], z[rows] = y0, z0
            if torch.is_tensor(dy):
                dy[rows] = 0.0
            step[rows], live[rows], change[rows] = 0, True, 0.0
            puzzle[free] = started + np.arange(len(free))
            started += len(free)
        # Once no puzzle is left to start, the batch shrinks to its last occupied place.
        places = int(np.flatnonzero(puzzle >= 0).max(initial=-1)) + 1
        if places == 0:
            break
        if places < len(puzzle) and started == total:
            n = places * K
            puzzle, inputs, labels, emb, y, z = puzzle[:places], inputs[:n], labels[:n], emb[:n], y[:n], z[:n]
            step, live, preds, q, change, residual = step[:n], live[:n], preds[:n], q[:n], change[:n], residual[:n]
            at = {name: value[:n] for name, value in at.items()}
            dy = dy[:n] if torch.is_tensor(dy) else dy
        with autocast:
            (y_next, z_next), logits, q_next = model(inputs, emb, (y + dy).to(y.dtype) if noise_y else y, z)
            q_next = model.halt_logit(q_next)
        step = step + live
        if K > 1:                                           # how much y moves: the converged selection's judge
            moved = (y_next.float() - y.float()).pow(2).mean((1, 2)).sqrt()
            last_change, change = change, torch.where(live, moved, change)
            residual = torch.where(live, torch.where(step > 1, (change + last_change) / 2, change), residual)
        y = torch.where(live[:, None, None], y_next, y.to(y_next.dtype))             # stopped rows keep their state
        z = torch.where(live.view(-1, *[1] * (z.dim() - 1)), z_next, z.to(z_next.dtype))     # multi-scale z: 4-D
        preds = torch.where(live[:, None], logits.argmax(-1), preds)
        q = torch.where(live, q_next.float(), q)
        stops = live & ((q > halt_above) | (step >= N))
        for s, k in enumerate(steps):                       # a stopped row's answer stands for its later steps
            hit = (live & (step == k)) | (stops & (step < k))
            for name, value in (("preds", preds.to(torch.uint8)), ("q", q), ("residual", residual),
                                ("steps", step.float())):
                at[name][:, s] = torch.where(hit.view(-1, *[1] * (value.dim() - 1)), value, at[name][:, s])
        live = live & ~stops
        if noise:
            z = (z + noise * torch.randn(z.shape, device=device, generator=generator)).to(z.dtype)
            if noise_y:
                dy = noise * torch.randn(y.shape, device=device, generator=generator)
        done = np.flatnonzero((puzzle >= 0) & ~live.view(-1, K).any(1).cpu().numpy())     # one host sync a step
        if len(done):
            tally_puzzles(tally, done, puzzle, steps, breadths, at, inputs, labels, check)
            puzzle[done] = -1
            finished += len(done)
            progress(finished)
    count, scored, tokens = ranks.sum(tally["counts"]).tolist()
    table, first = ranks.sum(tally["table"]).cpu(), ranks.sum(tally["first"]).cpu()
    calls = model.cfg.T * (model.cfg.n + 1)                 # net calls per supervision step
    results = {}
    for s, k in enumerate(steps):
        for j, Kb in enumerate(breadths):
            r = {name: table[s, j, i].item() / scored if scored else math.nan for i, name in enumerate(names[:-1])}
            r.update(steps=table[s, j, -1].item() / (count * Kb), calls=calls * table[s, j, -1].item() / count,
                     token=first[s, 0].item() / tokens if tokens else math.nan, count=int(count), scored=int(scored))
            if check:
                r["valid share"] = first[s, 1].item() / count
            results[k, Kb] = r
    kept = {k: tuple(np.concatenate(ranks.gather_objects(a)) for a in arrays) for k, arrays in tally["kept"].items()}
    return results, kept


def tally_puzzles(tally, places, puzzle, steps, breadths, at, inputs, labels, check):
    """run_steps' sums over the puzzles in the given places, all of whose trajectories have stopped: each selection
    at each step in steps, the first trajectory's right tokens and valid answers, the counts, and the answers of
    the steps kept."""
    K = len(at["q"]) // len(puzzle)
    rows = torch.from_numpy(places).to(labels.device)
    answers = at["preds"].view(len(puzzle), K, *at["preds"].shape[1:])[rows]                           # [P, K, S, L]
    q, residual, used = (at[name].view(len(puzzle), K, -1)[rows] for name in ("q", "residual", "steps"))  # [P, K, S]
    truth, question = (t.view(len(puzzle), K, -1)[rows, 0] for t in (labels, inputs))                   # [P, L]
    mask = truth != 0
    labelled = mask.any(-1)
    correct = ((answers == truth[:, None, None]) | ~mask[:, None, None]).all(-1) & labelled[:, None, None]
    valid = None
    if check:
        P, _, S, L = answers.shape
        valid = check(np.repeat(question.cpu().numpy(), K * S, 0), answers.reshape(-1, L).cpu().numpy())
        valid = torch.from_numpy(valid).view(P, K, S).to(labels.device)
    for s in range(len(steps)):
        for j, Kb in enumerate(breadths):
            picked = select(correct[:, :, s], q[:, :, s], answers[:, :, s], residual[:, :, s], Kb,
                            None if valid is None else valid[:, :, s])
            picked["steps"] = used[:, :Kb, s].sum()
            tally["table"][s, j] += torch.stack([v.double() for v in picked.values()])
        tally["first"][s, 0] += ((answers[:, 0, s] == truth) & mask).sum()
        if valid is not None:
            tally["first"][s, 1] += valid[:, 0, s].sum()
    tally["counts"] += torch.stack([labelled.new_tensor(len(places), dtype=torch.float64), labelled.sum(),
                                    mask.sum()]).double()
    for k, (preds, halt) in tally["kept"].items():
        s = steps.index(k)
        preds[puzzle[places]] = answers[:, :, s].cpu().numpy()
        halt[puzzle[places]] = torch.sigmoid(q[:, :, s]).cpu().numpy()


def accuracy_by_step(model, ds, N, batch_size, device, autocast, limit=None, check=None, keep=(), ranks=None):
    """run_steps with one trajectory per puzzle and no halting, scored after every step 1..N: one dict per step,
    with step, exact, token, count, scored, valid (the checker's share, with check) and, for the steps in keep, the
    predictions [rows, L] and halt probabilities [rows]."""
    results, kept = run_steps(model, ds, range(1, N + 1), batch_size, device, autocast, limit=limit, check=check,
                              keep=keep, ranks=ranks)
    out = []
    for k in range(1, N + 1):
        r = results[k, 1]
        out.append(dict(step=k, exact=r["q"], token=r["token"], count=r["count"], scored=r["scored"],
                        **({"valid": r["valid share"]} if check else {})))
        if k in kept:
            out[-1].update(preds=kept[k][0][:, 0], halt=kept[k][1][:, 0])
    return out


@torch.no_grad()
def during_training(task, dcfg, model, ds, device, autocast, ranks, batch_size, limit):
    """train.py's periodic evaluation: held-out accuracy after N_sup steps, and for ARC its voted pass@k (and an
    encoder's collapse diagnostics). Returns the per-step results, the log line's text and the task's scores
    (rank 0's; the others' are empty)."""
    N, score = model.cfg.N_sup, getattr(task, "score", None)
    res = accuracy_by_step(model, ds, N, batch_size, device, autocast, limit=limit, check=getattr(task, "check", None),
                           keep=(N,) if score else (), ranks=ranks)
    last = res[-1]
    preds, halt = last.pop("preds", None), last.pop("halt", None)
    diagnosed = encoder_diagnostics(model, dcfg, ds, device, autocast, ranks, batch_size, limit) if model.reads_demos \
        else ({}, "")
    if not ranks.main:
        return res, "", {}
    scores, line = score(dcfg, preds, halt) if score else ({}, "")
    scores, line = {**scores, **diagnosed[0]}, "\n".join(filter(None, (line, diagnosed[1])))
    accuracy = (f"exact {last['exact']:.2%}, token {last['token']:.2%} on {last['scored']} held-out rows"
                if last["scored"] else f"unscored: none of the {last['count']} held-out rows has a known answer")
    return res, f"{accuracy} after {N} supervision steps (EMA weights)" + (f"; {line}" if line else ""), scores


# ----------------------------------------------------------------------------------------------------- ARC

@torch.no_grad()
def encoder_diagnostics(model, dcfg, ds, device, autocast, ranks, batch_size, limit):
    """Whether an encoder model reads the demonstrations. The task vectors, averaged over each held-out task's
    augmented versions: their mean cosine similarity between different tasks (1: the encoder says the same
    whatever it reads, collapse), and their spread, the share of their squared norm that differs between tasks
    (0: collapse; the cosine alone stays near 1 when a large shared part hides what differs). And the answers when
    every test input is given another task's demonstrations: token accuracy and pass@2 must fall if the model reads
    the demonstrations. Returns (scores, line); rank 0's only."""
    _, _, meta, _ = arc.prepared(dcfg)
    rows = np.arange(count_rows(ds, limit))
    tasks = torch.from_numpy(meta["task"][rows]).long().to(device)
    sums = torch.zeros(int(tasks.max()) + 1, model.cfg.puzzle_emb_len * model.cfg.d_model, device=device)
    for i in range(0, len(rows), batch_size):     # summed batch by batch: ARC-AGI-1 has 420k test rows
        vectors = model.task_rows(to_device(ds, rows[i:i + batch_size], device, True)).flatten(1).float()
        sums.index_add_(0, tasks[i:i + batch_size], vectors)                                     # [tasks, P*D]
    counts = torch.bincount(tasks, minlength=len(sums))
    means = sums[counts > 0] / counts[counts > 0, None]
    spread = float((means - means.mean(0)).pow(2).sum() / means.pow(2).sum().clamp_min(1e-30))
    unit = torch.nn.functional.normalize(means, dim=1)
    cosine = float(((unit @ unit.T).sum() - len(unit)) / (len(unit) * (len(unit) - 1))) if len(unit) > 1 else math.nan
    shuffled = dataclasses.replace(ds, demos=ds.demos.shuffled())
    res = accuracy_by_step(model, shuffled, model.cfg.N_sup, batch_size, device, autocast, limit=limit,
                           keep=(model.cfg.N_sup,), ranks=ranks)
    if not ranks.main:
        return {}, ""
    scores, _ = arc.score(dcfg, res[-1]["preds"], res[-1]["halt"])
    out = {"task_vector_cosine": cosine, "task_vector_spread": spread, "shuffled_demos_token": res[-1]["token"],
           "shuffled_demos_exact": res[-1]["exact"], "shuffled_demos_pass@2": scores["pass@2"]}
    if "per_family_pass@2" in scores:
        out["shuffled_per_family_pass@2"] = scores["per_family_pass@2"]
    shown_pass = "unscored" if scores["pass@2"] is None else f"{scores['pass@2']:.2%}"
    return out, (f"encoder: task vectors of different tasks at mean cosine similarity {cosine:.3f} (1: collapsed), "
                 f"spread {spread:.3f} (0: collapsed); with another task's demonstrations: "
                 f"token {res[-1]['token']:.2%}, pass@2 {shown_pass}")


def solve_task_file(path, model, dcfg, N, device, autocast, out):
    """--solve TASK.json: an encoder model's two attempts at each test input of a task it has never seen, from its
    demonstrations alone, voted across the run's augmentations; or --solve TASK_ID: any model's attempts at one of
    its own evaluation tasks (an id model can attempt no other). Printed, and drawn into out. Returns (task id,
    task, its test rows, their metadata, the last step's results), for the solve page."""
    if os.path.isfile(path) or path.endswith(".json"):
        if not model.reads_demos:
            raise SettingsError("this model was trained with puzzle ids (--task-embedding id), which exist only for "
                                "the tasks it trained on, so it cannot attempt a new task; expected a model trained "
                                "with --task-embedding encoder, which reads the task's demonstrations, or one of "
                                "this model's evaluation tasks by id")
        name = os.path.splitext(os.path.basename(path))[0]
        task = arc.read_task_file(path, name)
        _, test_ds, meta, _ = arc.build({}, {name: task}, dcfg.num_aug, dcfg.data_seed, dcfg.size, unseen=True)
    else:
        name = path
        task, test_ds, meta = arc.own_task(dcfg, name)
    res = accuracy_by_step(model, test_ds, N, 256, device, autocast, keep=(N,))
    ranked = arc.vote(arc.unaugment(meta, np.arange(len(test_ds.inputs)), res[-1]["preds"], res[-1]["halt"]))
    make_folder(out)
    for i, (grid, truth) in enumerate(task["test"]):
        attempts = ranked.get((name, i), [])[:2]
        print(f"task {name}, test input {i} ({grid.shape[0]}x{grid.shape[1]}), from {len(task['train'])} "
              f"demonstrations and {len(meta['k']) // len(task['test'])} augmented versions:")
        for j, attempt in enumerate(attempts):
            verdict = "" if truth is None else " (right)" if np.array_equal(attempt, truth) else " (wrong)"
            print(f"attempt {j + 1}{verdict}:\n" + "\n".join("".join(map(str, row)) for row in attempt))
        if not attempts:
            print("no attempt: no augmented version produced a readable grid")
        picture = arc.draw_task(task, i, attempts, truth, os.path.join(out, f"arc_solve_{name}_{i}.png"),
                                title=f"task {name}")
        print(f"picture: {picture}")
    return name, task, test_ds, meta, res[-1]


# ------------------------------------------------------------------------------------------ pictures

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


def read_metrics(path):
    """The records of a run's metrics.jsonl, in order. A damaged line (a full disk can leave half a line) or a record
    without its step and kind is skipped with a note, so one bad line never hides the rest of a run's history."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not sound(record):
                print(f"note: {path} line {number} is damaged and was skipped")
                continue
            records.append(record)
    return records


def sound(record):
    """Whether a metrics record holds what its readers need: a training line's losses and halting figures, an
    evaluation's accuracy after each step."""
    if not (isinstance(record, dict) and type(record.get("step")) is int):
        return False
    if record.get("kind") == "train":
        return all(k in record for k in ("lm_loss", "exact", "mean_halt_steps"))
    per_step = record.get("per_step") if record.get("kind") == "eval" else None
    return isinstance(per_step, list) and bool(per_step) and all(isinstance(r, dict) and "exact" in r for r in per_step)


def plot_curves(metrics, path, title):
    """curves.png beside metrics.jsonl, redrawn at every evaluation so a learner can watch a run without other
    tools: training loss, training exact and mean halting steps (of the puzzles that halted), held-out exact."""
    from matplotlib.figure import Figure   # a bare Figure draws with Agg and leaves pyplot's state alone
    records = read_metrics(metrics)
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
        evals = [r for r in read_metrics(path) if r["kind"] == "eval" and "train_seconds" in r]
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




# ------------------------------------------------------------------------------ watch it think: the solve page
# `--solve ... --html`: one self-contained HTML file (the data inlined as JSON, plain JavaScript and CSS, nothing
# fetched) that steps through a solve net call by net call: the answer y and the latent z read through
# output_head after every call, the halting probability and the wrong cells after every supervision step. The
# trajectory is recorded from model.forward by wrapping model.net; nothing here runs a copy of the recursion.

def check_html(args, mcfg):
    """--html's settings, checked before anything runs."""
    if args.solve is None:
        raise SettingsError("--html writes the page of one solve; expected --solve too")
    if args.html:
        if os.path.isdir(args.html):
            raise SettingsError(f"--html {args.html} is a folder; expected a file name such as solve.html")
        check_out_folder(os.path.dirname(os.path.abspath(args.html)), "--html")
    if mcfg.latents != "yz":
        raise SettingsError(f"--html draws the answer y and the latent z of TRM's recursion, and this model's "
                            f"--latents {mcfg.latents} keeps no such pair; expected a model with --latents yz")


def decoded(model, h, autocast):
    """A state h [1, P+L, D] read as the answer is read, through output_head without the P prefix positions:
    dict(tokens: the argmax tokens, confidence: their stablemax probability in whole percent), lists of L ints."""
    with torch.no_grad(), autocast:
        logits = model.output_head(h)[0, model.cfg.puzzle_emb_len:]                       # [L, V]
    tokens = logits.argmax(-1)                                      # as run_steps reads it, in the same dtype
    p = stablemax(logits.float()).gather(-1, tokens[:, None])[:, 0]
    return dict(tokens=tokens.tolist(), confidence=(100 * p).round().int().tolist())


def recorded_solve(model, batch, N, autocast):
    """One puzzle (a batch of one row) solved by model.forward for N supervision steps, as run_steps runs it, with
    every net call recorded and decoded. Gradient mode is on, as in training, so that the grad mode seen at each call
    is the one model.py gives it (the no_grad rounds, the round that carries the gradient); nothing is
    backpropagated. Whether a call updates z or y is read from the state it is handed, so any variant that keeps
    TRM's y and z is labelled truly. Returns dict(start: y_init and z_init decoded, calls: one per net call in
    order, each with its supervision step, round, state (z or y), grad and decoding, halt: the halting
    probability after each step)."""
    model.eval()
    seen, net, own = [], model.net, vars(model).get("net")     # own: a wrapper already there, put back below

    def recording_net(h, injection, blocks=None):
        out = net(h, injection, blocks)
        seen.append((h, out, torch.is_grad_enabled()))
        return out

    puzzle_rows = model.task_rows(batch)
    y, z = model.initial_state(1)
    start = dict(y=decoded(model, y, autocast), z=decoded(model, z, autocast))
    calls, halt = [], []
    model.net = recording_net        # an instance attribute over the class's method
    try:
        for k in range(1, N + 1):
            seen.clear()
            with torch.enable_grad(), autocast:
                (y_next, z_next), _, q = model(batch["inputs"], puzzle_rows, y, z)
            state, round_ = {"z": z, "y": y}, 1
            for h, out, grad in seen:
                name = next((name for name, s in state.items() if h is s), None)
                if name is None:
                    raise SettingsError(f"--html: net call {len(calls) + 1} of this model's recursion updates "
                                        f"neither y nor z, so the page cannot say what it shows; expected TRM's "
                                        f"recursion or a variant of it that keeps y and z")
                state[name] = out
                calls.append(dict(step=k, round=round_, state=name, grad=grad,
                                  **decoded(model, out.detach(), autocast)))
                round_ += name == "y"
            halt.append(round(torch.sigmoid(model.halt_logit(q.detach()))[0].item(), 6))
            y, z = y_next, z_next
    finally:
        if own is None:
            del model.net
        else:
            model.net = own
    return dict(start=start, calls=calls, halt=halt)


def solve_page(path, model, task, ds, row, N, device, autocast, checkpoint, title=None, extra=None):
    """Record the solve of row `row` of ds by the model of the file checkpoint and write its page to path, drawn as
    the task's page_view says (title: in place of the view's; extra: more for the page, ARC's demonstrations and
    votes), and say so."""
    solve = recorded_solve(model, to_device(ds, np.array([row]), device, model.reads_demos), N, autocast)
    view = task.page_view(ds.inputs[row], ds.labels[row])
    answer = view["answer"]
    answers = {c["step"]: c["tokens"] for c in solve["calls"] if c["state"] == "y"}     # each step's last y
    wrong = [None if answer is None else sum(a != 0 and t != a for t, a in zip(answers[k], answer))
             for k in range(1, N + 1)]
    cfg = model.cfg
    data = dict(view, title=title or view["title"], about=f"checkpoint {os.path.basename(checkpoint)}",
                input=ds.inputs[row].tolist(), **solve, wrong=wrong,
                stop=next((k for k, p in enumerate(solve["halt"], 1) if p > 0.5), None),
                config=dict(n=cfg.n, T=cfg.T, N_sup=cfg.N_sup, steps=N, d_model=cfg.d_model,
                            params=model.num_params(), separate_nets=cfg.separate_nets,
                            one_step_grad=cfg.one_step_grad, act_continue=cfg.act_continue),
                **({"arc": extra} if extra else {}))
    # "<" only occurs inside JSON strings, where \u003c reads the same and cannot close the script element
    text = PAGE.replace("DATA_JSON", json.dumps(data, separators=(",", ":")).replace("<", "\\u003c"))
    make_folder(os.path.dirname(os.path.abspath(path)), "--html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"page: {path} ({len(text.encode()) / 1e3:.0f} kB; open it in a browser)")


def arc_solve_pages(html, model, task, solved, N, device, autocast, out, checkpoint):
    """The pages of an ARC --solve, one per test input: the identity version's trajectory, the demonstrations and
    every augmented version's vote. Default paths beside the pictures, arc_solve_{task}_{i}.html; with --html
    PATH, test input i > 0 gets PATH with _i before its extension."""
    name, arc_task, ds, meta, last = solved
    for i in range(len(arc_task["test"])):
        root, ext = os.path.splitext(html)
        path = (f"{root}_{i}{ext}" if i else html) if html else os.path.join(out, f"arc_solve_{name}_{i}.html")
        extra = task.page_task(name, arc_task, i, meta, last["preds"], last["halt"])
        solve_page(path, model, task, ds, task.identity_row(meta, i), N, device, autocast, checkpoint,
                   f"ARC task {name}, test input {i}", extra)


PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>TRM solve</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; color: #222; margin: 16px 24px; max-width: 1080px; }
h1 { font-size: 20px; margin: 0 0 4px; }
h2 { font-size: 14px; margin: 10px 0 4px; }
p { margin: 4px 0; }
.dim { color: #666; }
#controls { display: flex; align-items: center; gap: 8px; margin-top: 10px; }
#controls button { min-width: 44px; }
#slider { flex: 1; }
#where { font-family: ui-monospace, monospace; font-size: 13px; white-space: pre-wrap; margin: 4px 0; }
.row { display: flex; gap: 22px; flex-wrap: wrap; align-items: flex-start; }
.grid { width: min-content; }
.note { font-size: 12px; color: #555; max-width: 380px; }
.pair { display: inline-flex; align-items: center; gap: 4px; margin: 0 14px 8px 0; vertical-align: top; }
.vote { display: inline-block; margin: 0 14px 8px 0; font-size: 12px; vertical-align: top; }
.key { display: inline-block; width: 12px; height: 12px; vertical-align: -2px; margin-right: 3px; }
canvas { display: block; }
</style>
</head>
<body>
<script>window.addEventListener("error", e => { document.body.dataset.error = e.message; });</script>
<h1 id="title"></h1>
<p class="dim" id="about"></p>
<p>One tiny network is called again and again. In each round it updates the latent <b>z</b> n times from the
question x and the answer y, <code>z = net(z, x + y)</code>, then the answer <b>y</b> once from z,
<code>y = net(y, z)</code>; T rounds make a supervision step, after which the Q head says whether to stop.
Both states are read through the output head after every call: y is the answer; z is where the model reasons,
and the paper finds that z, read the same way, is no answer. Compare the two panels.</p>
<div id="task"></div>
<div id="controls">
  <button id="back" title="previous net call (left arrow)">&#9664;</button>
  <button id="play" title="play or pause (space)">play</button>
  <button id="next" title="next net call (right arrow)">&#9654;</button>
  <input type="range" id="slider" min="0" value="0" aria-label="net call">
</div>
<canvas id="timeline" title="every net call: short bars update z, tall bars update y; pale ones ran without gradient
in training"></canvas>
<div id="where"></div>
<div class="row">
  <div class="grid"><h2>question x</h2><canvas id="question"></canvas></div>
  <div class="grid"><h2>y&nbsp;decoded:&nbsp;the&nbsp;answer</h2><canvas id="y"></canvas><p class="note" id="ynote"></p>
  </div>
  <div class="grid"><h2>z&nbsp;decoded:&nbsp;the&nbsp;latent</h2><canvas id="z"></canvas><p class="note" id="znote"></p>
  </div>
</div>
<div class="row">
  <div><h2>after each supervision step</h2><canvas id="chart"></canvas></div>
  <div class="note"><h2>how to read it</h2>
    <p>A cell shows the token the output head ranks first; its colour fades to grey as that token's probability
    falls (stablemax, the probability the training loss scores).</p>
    <p><span class="key" style="outline: 3px solid #f0a000; outline-offset: -3px"></span>changed since the
    previous point &nbsp; <span class="key" style="outline: 2px solid #e00000; outline-offset: -2px"></span>differs
    from the answer &nbsp; <b>bold</b>: a given</p>
    <p>Timeline: <span class="key" style="background: #8e63c7"></span>z update
    <span class="key" style="background: #2f6fd6"></span>y update; pale calls ran under torch.no_grad in
    training, solid ones carry the gradient.</p>
    <p class="dim">Keys: &larr; &rarr; one net call, &uarr; &darr; one supervision step, Home, End, space plays.</p>
  </div>
</div>
<div id="votes"></div>
<script id="data" type="application/json">DATA_JSON</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const C = D.config, CALLS = C.T * (C.n + 1), N = D.halt.length;
const FOG = [150, 150, 150];          // a cell's colour fades to this grey as its probability falls
const CELL = Math.max(8, Math.min(32, Math.floor(330 / Math.max(D.rows, D.cols))));
const $ = id => document.getElementById(id);

// Every point of the slider: the start, then one per net call, with the decodings of y and z current there.
const points = [{call: null, y: D.start.y, z: D.start.z}];
for (const c of D.calls) {
  const last = points[points.length - 1];
  const same = last.call && last.call.step === c.step && last.call.round === c.round && last.call.state === c.state;
  c.index = c.state === "z" && same ? last.call.index + 1 : 1;    // which of the round's z updates this is
  points.push({call: c, y: c.state === "y" ? c : last.y, z: c.state === "z" ? c : last.z});
}
let current = 0, timer = null;

function mix(hex, p) {                // hex colour at probability p: all colour at 1, all FOG at 0
  const rgb = [1, 3, 5].map(i => parseInt(hex.slice(i, i + 2), 16));
  return "rgb(" + rgb.map((v, i) => Math.round(p * v + (1 - p) * FOG[i])).join(",") + ")";
}

function frame(ctx, x, y, size, inset, colour, width) {
  ctx.strokeStyle = colour;
  ctx.lineWidth = width;
  ctx.strokeRect(x + inset, y + inset, size - 2 * inset, size - 2 * inset);
}

function drawGrid(canvas, grid, previous, answer) {
  canvas.width = D.cols * CELL + 1;
  canvas.height = D.rows * CELL + 1;
  const ctx = canvas.getContext("2d");
  ctx.textAlign = "center";
  ctx.textBaseline = "middle";
  let wrong = 0, changed = 0;
  for (let i = 0; i < D.rows * D.cols; i++) {
    const x = (i % D.cols) * CELL + 0.5, y = Math.floor(i / D.cols) * CELL + 0.5, t = grid.tokens[i];
    const [text, colour] = D.tokens[t];
    const bad = answer && answer[i] !== 0 && t !== answer[i];
    ctx.fillStyle = mix(colour, grid.confidence[i] / 100);
    ctx.fillRect(x, y, CELL, CELL);
    ctx.strokeStyle = "#ccc";
    ctx.lineWidth = 1;
    ctx.strokeRect(x, y, CELL, CELL);
    if (text) {
      ctx.font = (D.givens[i] ? "bold " : "") + Math.round(CELL * 0.6) + "px system-ui, sans-serif";
      ctx.fillStyle = bad ? "#d00000" : D.givens[i] ? "#000" : D.ink;
      ctx.fillText(text, x + CELL / 2, y + CELL / 2 + 1);
    }
    if (previous && previous.tokens[i] !== t) { frame(ctx, x, y, CELL, 1.5, "#f0a000", 3); changed++; }
    if (bad && CELL >= 16) frame(ctx, x, y, CELL, 4, "#e00000", 2);
    if (bad && CELL < 16) {           // a frame would fill a small cell: a cross, as the maze pictures have
      ctx.strokeStyle = "#e00000";
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      ctx.moveTo(x + 2, y + 2); ctx.lineTo(x + CELL - 2, y + CELL - 2);
      ctx.moveTo(x + CELL - 2, y + 2); ctx.lineTo(x + 2, y + CELL - 2);
      ctx.stroke();
    }
    wrong += bad;
  }
  if (D.box) {                        // Sudoku's 3x3 boxes
    ctx.strokeStyle = "#000";
    ctx.lineWidth = 2;
    for (let k = 0; k <= D.rows; k += D.box) {
      ctx.beginPath(); ctx.moveTo(0, k * CELL + 0.5); ctx.lineTo(D.cols * CELL, k * CELL + 0.5); ctx.stroke();
      ctx.beginPath(); ctx.moveTo(k * CELL + 0.5, 0); ctx.lineTo(k * CELL + 0.5, D.rows * CELL); ctx.stroke();
    }
  }
  const sure = grid.confidence.reduce((a, b) => a + b, 0) / grid.confidence.length;
  return (answer ? wrong + " of " + answer.filter(a => a !== 0).length + " cells differ from the answer; "
                 : "the answer is not known; ") + (previous ? changed + " changed; " : "") +
         "mean probability " + sure.toFixed(0) + "%";
}

function describe(c) {
  if (!c) return "start: y = y_init and z = z_init at every position, before the first supervision step\n ";
  const call = (c.round - 1) * (C.n + 1) + (c.state === "z" ? c.index : C.n + 1);
  const what = c.state === "z" ? "z = net(z, x + y)   z update " + c.index + " of " + C.n
                               : "y = net(y, z)       the answer's update";
  return "supervision step " + c.step + " of " + N + ", round " + c.round + " of " + C.T + ", net call " + call +
         " of " + CALLS + ":  " + what + "\nin training this call " +
         (c.grad ? "carries the gradient" : "runs under torch.no_grad (no gradient)");
}

function drawTimeline(p) {
  const canvas = $("timeline"), w = Math.max(2, Math.min(12, Math.floor(1000 / points.length)));
  canvas.width = points.length * w + 8;
  canvas.height = 34;
  const ctx = canvas.getContext("2d");
  points.forEach((pt, i) => {
    const c = pt.call, x = 4 + i * w;
    if (c && (i === 1 || points[i - 1].call.step !== c.step)) { ctx.fillStyle = "#000"; ctx.fillRect(x - 1, 0, 1, 26); }
    if (!c) { ctx.fillStyle = "#999"; ctx.fillRect(x, 8, w - 1, 18); return; }
    ctx.globalAlpha = c.grad ? 1 : 0.35;
    ctx.fillStyle = c.state === "z" ? "#8e63c7" : "#2f6fd6";
    ctx.fillRect(x, c.state === "z" ? 14 : 4, Math.max(1, w - 1), c.state === "z" ? 12 : 22);
    ctx.globalAlpha = 1;
  });
  ctx.fillStyle = "#000";
  ctx.beginPath();
  ctx.moveTo(4 + p * w + w / 2, 27); ctx.lineTo(4 + p * w + w / 2 - 5, 34); ctx.lineTo(4 + p * w + w / 2 + 5, 34);
  ctx.fill();
  canvas.onclick = e => show(Math.min(points.length - 1, Math.max(0, Math.floor((e.offsetX - 4) / w))));
}

function drawChart(step) {
  const canvas = $("chart"), W = 520, H = 210, L = 44, R = 48, T = 22, B = 30;
  canvas.width = W;
  canvas.height = H;
  const ctx = canvas.getContext("2d");
  const x = k => L + (N === 1 ? 0.5 : (k - 1) / (N - 1)) * (W - L - R), y = v => H - B - v * (H - T - B);
  const most = Math.max(1, ...D.wrong.map(v => v || 0));
  ctx.font = "11px system-ui, sans-serif";
  if (step) { ctx.fillStyle = "#eee"; ctx.fillRect(x(step) - 6, T, 12, H - T - B); }
  ctx.strokeStyle = "#999";
  ctx.strokeRect(L, T, W - L - R, H - T - B);
  ctx.setLineDash([3, 3]);
  ctx.beginPath(); ctx.moveTo(L, y(0.5)); ctx.lineTo(W - R, y(0.5)); ctx.stroke();
  if (D.stop) {
    ctx.strokeStyle = "#1a9850";
    ctx.beginPath(); ctx.moveTo(x(D.stop), T); ctx.lineTo(x(D.stop), H - B); ctx.stroke();
  }
  ctx.setLineDash([]);
  const line = (values, scale, colour) => {
    ctx.strokeStyle = ctx.fillStyle = colour;
    ctx.lineWidth = 2;
    ctx.beginPath();
    values.forEach((v, i) => i ? ctx.lineTo(x(i + 1), y(v / scale)) : ctx.moveTo(x(1), y(v / scale)));
    ctx.stroke();
    values.forEach((v, i) => { ctx.beginPath(); ctx.arc(x(i + 1), y(v / scale), 2.5, 0, 7); ctx.fill(); });
  };
  line(D.halt, 1, "#2f6fd6");
  if (D.answer) line(D.wrong, most, "#d62728");
  ctx.fillStyle = "#2f6fd6";
  ctx.textAlign = "right";
  ctx.fillText("1", L - 4, y(1) + 4); ctx.fillText("0.5", L - 4, y(0.5) + 4); ctx.fillText("0", L - 4, y(0) + 4);
  ctx.save(); ctx.translate(12, H / 2); ctx.rotate(-Math.PI / 2); ctx.textAlign = "center";
  ctx.fillText("halting probability", 0, 0); ctx.restore();
  ctx.fillStyle = "#d62728";
  ctx.textAlign = "left";
  ctx.save(); ctx.translate(W - 8, H / 2); ctx.rotate(Math.PI / 2); ctx.textAlign = "center";
  ctx.fillText(D.answer ? "wrong cells" : "wrong cells: the answer is not known", 0, 0); ctx.restore();
  if (D.answer) { ctx.fillText(String(most), W - R + 4, y(1) + 4); ctx.fillText("0", W - R + 4, y(0) + 4); }
  ctx.fillStyle = "#222";
  ctx.textAlign = "center";
  for (let k = 1; k <= N; k += Math.ceil(N / 16)) ctx.fillText(String(k), x(k), H - B + 14);
  ctx.fillText("supervision step", (L + W - R) / 2, H - 4);
  ctx.fillStyle = "#1a9850";
  const label = D.stop ? "the Q head would halt here (p > 0.5, as in training)" : "the Q head never reaches 0.5";
  const half = ctx.measureText(label).width / 2;      // kept inside the plot when the stop is near an end
  ctx.fillText(label, Math.min(W - R - half, Math.max(L + half, D.stop ? x(D.stop) : (L + W - R) / 2)), T - 8);
  canvas.onclick = e => {
    const k = Math.round((e.offsetX - L) / (W - L - R) * (N - 1)) + 1;
    if (k >= 1 && k <= N) show(k * CALLS);
  };
}

function colours(grid, size) {       // an ARC grid (rows of colours 0-9) as a small canvas
  const canvas = document.createElement("canvas"), h = grid.length, w = grid[0].length;
  canvas.width = w * size + 1;
  canvas.height = h * size + 1;
  const ctx = canvas.getContext("2d");
  grid.forEach((r, i) => r.forEach((c, j) => {
    ctx.fillStyle = D.arc.palette[c];
    ctx.fillRect(j * size + 0.5, i * size + 0.5, size, size);
    ctx.strokeStyle = "#555";
    ctx.strokeRect(j * size + 0.5, i * size + 0.5, size, size);
  }));
  return canvas;
}

function drawTask() {                 // ARC: the task's demonstrations, and every augmented version's vote
  const A = D.arc;
  const size = g => Math.max(4, Math.min(14, Math.floor(90 / Math.max(g.length, g[0].length))));
  const add = (parent, tag, text) => {
    const e = document.createElement(tag);
    e.textContent = text || "";
    parent.appendChild(e);
    return e;
  };
  add($("task"), "h2", "the task: its demonstration pairs, then the test input" +
      (A.truth ? " and its true output" : ""));
  const pairs = add($("task"), "div");
  A.demos.concat([[A.test_input, A.truth]]).forEach(([i, o], k) => {
    const pair = add(pairs, "span");
    pair.className = "pair";
    if (k === A.demos.length) add(pair, "b", "test:");
    pair.appendChild(colours(i, size(i)));
    add(pair, "span", "\u2192");
    if (o) pair.appendChild(colours(o, size(o))); else add(pair, "span", "?");
  });
  add($("votes"), "h2", "after " + N + " steps, every augmented version votes (" + A.versions + " versions" +
      (A.unreadable ? ", " + A.unreadable + " with no readable grid" : "") +
      "); the trajectory above is the identity's");
  const votes = add($("votes"), "div");
  A.votes.slice(0, 12).forEach((v, k) => {
    const cell = add(votes, "span");
    cell.className = "vote";
    cell.appendChild(colours(v.grid, size(v.grid)));
    add(cell, "div", v.votes + (v.votes === 1 ? " vote" : " votes") + (k < 2 ? ", attempt " + (k + 1) : "") +
        (v.right === null ? "" : v.right ? ", right" : ", wrong"));
  });
  if (!A.votes.length) add(votes, "p", "no version produced a readable grid");
  const rest = A.votes.slice(12);
  if (rest.length) add(votes, "p", "and " + rest.length + " more candidates with " +
                       rest.reduce((a, v) => a + v.votes, 0) + " votes between them");
}

function show(p) {
  current = Math.max(0, Math.min(points.length - 1, p));
  const pt = points[current], before = current ? points[current - 1] : null;
  $("slider").value = current;
  $("where").textContent = describe(pt.call);
  $("ynote").textContent = drawGrid($("y"), pt.y, before && before.y, D.answer);
  $("znote").textContent = drawGrid($("z"), pt.z, before && before.z, D.answer);
  drawTimeline(current);
  drawChart(pt.call ? pt.call.step : 0);
}

function play() {
  if (timer) { clearInterval(timer); timer = null; $("play").textContent = "play"; return; }
  if (current === points.length - 1) show(0);
  $("play").textContent = "pause";
  timer = setInterval(() => current < points.length - 1 ? show(current + 1) : play(),
                      Math.max(30, Math.min(250, 15000 / points.length)));
}

document.title = D.title;
$("title").textContent = "Watch it think: " + D.title;
$("about").textContent = D.about + " \u00b7 " + C.params.toLocaleString("en") + " parameters, n " + C.n + ", T " +
  C.T + ": " + CALLS + " net calls per supervision step, " + N + " steps (trained with N_sup " + C.N_sup + ")" +
  (C.separate_nets ? " \u00b7 separate f_L and f_H" : "") + (C.one_step_grad ? " \u00b7 HRM's 1-step gradient" : "") +
  (C.act_continue ? " \u00b7 ACT's continue logit" : "");
$("slider").max = points.length - 1;
$("slider").oninput = e => show(Number(e.target.value));
$("back").onclick = () => show(current - 1);
$("next").onclick = () => show(current + 1);
$("play").onclick = play;
document.addEventListener("keydown", e => {
  const move = {ArrowLeft: -1, ArrowRight: 1, ArrowUp: -CALLS, ArrowDown: CALLS, PageUp: -CALLS, PageDown: CALLS,
                Home: -points.length, End: points.length}[e.key];
  const space = e.key === " " && e.target.tagName !== "BUTTON";   // a focused button takes space itself
  if (move) show(current + move);
  if (space) play();
  if (move || space) e.preventDefault();
});
drawGrid($("question"), {tokens: D.input, confidence: D.input.map(() => 100)}, null, null);
if (D.arc) drawTask();
const start = location.hash.slice(1);
show(start === "end" ? points.length - 1 : Number(start) || 0);
document.body.dataset.ready = "yes";
document.body.dataset.readyMs = Math.round(performance.now());
</script>
</body>
</html>
"""


# -------------------------------------------------------------------------------------------- command line

def check_out_folder(out, flag="--out"):
    """Fail before anything is written unless out is a folder, or can be made as one."""
    if len(os.fsencode(out)) >= 4096 or any(len(os.fsencode(part)) > 255 for part in out.split(os.sep)):
        raise SettingsError(f"{flag} {shown(out, 60)} is too long a path for this file system (a name of at most 255 "
                            f"bytes, 4095 in all); expected a shorter one")
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
    """os.makedirs, with a refusal (a read-only place, say) as one sentence and the folders it had made removed.
    Returns whether it made out."""
    made, path = [], os.path.abspath(out)
    while not os.path.exists(path):
        made.append(path)           # deepest first
        path = os.path.dirname(path)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        for path in made:
            if os.path.isdir(path) and not os.listdir(path):
                os.rmdir(path)
        raise SettingsError(f"{flag} {out} cannot be made ({e.strerror})") from None
    return bool(made)


def positive_ints(text, flag):
    """--steps and --breadth: one whole number or a comma-separated list of them, sorted, each at most 4096 (a typo
    must not start an evaluation that cannot finish; the paper's N_sup is 16)."""
    try:
        values = sorted({int(v) for v in text.split(",")})
    except ValueError:
        values = []
    if not values or values[0] < 1 or values[-1] > 4096:
        raise SettingsError(f"{flag} {shown(text)}: expected a whole number from 1 to 4096 or a list such as 8,16,32")
    return values


def device_and_autocast(dtype):
    """The best device here, whichever the checkpoint was trained on (CUDA, then Apple's MPS, then the CPU), and
    bf16 autocast where --dtype asks for it (auto: on CUDA). Evaluation runs eagerly: no compile to wait for."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    device = torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    bf16 = dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda")
    return device, torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


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
    p.add_argument("--solve", default=None, help="solve one puzzle given as a string (sudoku: 81 characters; maze: "
                   "a file or string of '# SG' characters; arc: an ARC task file, for a model trained with "
                   "--task-embedding encoder, or the id of one of the model's evaluation tasks)")
    p.add_argument("--html", nargs="?", const="", default=None, metavar="PATH",
                   help="with --solve: also write a page that steps through the solve net call by net call, at PATH "
                        "or, when no PATH is given, beside the picture ({task}_solve.html; ARC: one per test input, "
                        "arc_solve_{id}_{i}.html)")
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
    given = {name for name, value in vars(args).items() if value != p.get_default(name)}
    signal.signal(signal.SIGTERM, signal.default_int_handler)   # SIGTERM ends like Ctrl-C: one line, exit 130
    one_sentence_on_failure(lambda: run(args, given), "--batch-size, --breadth or --steps")


def check_flags(args, given):
    """Every flag in range, and none that would do nothing in this combination (each refusal says why)."""
    def flag(name):
        return "--" + name.replace("_", "-")
    if args.runs:
        extra = sorted(given - {"runs", "out"})
        if extra:
            raise SettingsError(f"{flag(extra[0])} would do nothing with --runs, which draws training runs from their "
                                f"metrics.jsonl")
        return
    if not args.checkpoint:
        raise SettingsError("--checkpoint CKPT is needed (or --runs to compare training runs)")
    only = [(("breadth", "halt", "halt_threshold", "limit", "data", "batch_size", "init", "noise", "noise_y",
              "select", "seed"), args.solve is None, "--solve solves the one puzzle given"),
            (("init", "noise", "noise_y", "select", "seed"), args.breadth is not None,
             "it shapes the trajectories of --breadth, which is not asked for"),
            (("halt_threshold",), args.halt, "it sets when --halt stops a puzzle, and --halt is not given")]
    for names, used, why in only:
        name = next((name for name in names if name in given), None)
        if name and not used:
            raise SettingsError(f"{flag(name)} would do nothing here: {why}")
    if not 0 < args.halt_threshold < 1:
        raise SettingsError(f"--halt-threshold is {args.halt_threshold}; expected a probability between 0 and 1")
    for name, value, least, most in (("limit", args.limit, 0, 10 ** 9), ("seed", args.seed, 0, 2 ** 63 - 1),
                                     ("batch_size", 1 if args.batch_size is None else args.batch_size, 1, 1 << 20)):
        if not least <= value <= most:
            raise SettingsError(f"{flag(name)} is {value}; expected a whole number from {least} to {most:,}")
    if args.noise < 0 or not math.isfinite(args.noise):
        raise SettingsError(f"--noise is {args.noise}; expected a finite standard deviation of at least 0")


def run(args, given):
    check_flags(args, given)
    if args.runs:
        return print("plot: {} and {}".format(*plot_runs(args.runs.split(","), args.out or ".")))
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    check_out_folder(out, "--out" if args.out else "the checkpoint's folder (the default --out)")
    model, dcfg, reference = load_for_eval(args.checkpoint, args.task)
    if args.task and not reference:
        raise SettingsError(f"--task {args.task} would do nothing here: checkpoint {args.checkpoint} says it was "
                            f"trained on {dcfg.task}, and --task is for a reference state_dict, which does not")
    trained_on, dcfg = dcfg.data, dataclasses.replace(dcfg, data=args.data or dcfg.data)
    task = importlib.import_module(dcfg.task)
    device, autocast = device_and_autocast(args.dtype)
    model.to(device)
    mcfg = model.cfg
    steps = [mcfg.N_sup] if args.steps is None else positive_ints(args.steps, "--steps")
    args.breadth = args.breadth and positive_ints(args.breadth, "--breadth")
    N = steps[-1]
    if len(steps) > 1 and args.breadth is None:
        raise SettingsError(f"--steps {args.steps} is a list, and a list of steps needs --breadth (e.g. --breadth 1)")

    if args.html is not None:
        check_html(args, mcfg)
    if args.solve is not None and dcfg.task == "arc":     # ARC: a task file, or one of the model's tasks by id
        solved = solve_task_file(args.solve, model, dcfg, N, device, autocast, out)
        if args.html is not None:
            arc_solve_pages(args.html, model, task, solved, N, device, autocast, out, args.checkpoint)
        return
    if args.solve is not None:
        inputs, labels = task.parse_solve(args.solve, mcfg)
        ds = Dataset.ungrouped(inputs, labels, mcfg.vocab_size)
        res = accuracy_by_step(model, ds, N, 1, device, autocast, keep=range(1, N + 1))
        make_folder(out)     # only now: an evaluation that fails or is interrupted leaves no folder
        answers = [r["preds"][0] for r in res]
        print(task.describe_solution(inputs, answers[-1]))
        print(f"picture: {task.draw_steps(inputs, labels, answers, os.path.join(out, f'{dcfg.task}_solve.png'))}")
        if args.html is not None:
            solve_page(args.html or os.path.join(out, f"{dcfg.task}_solve.html"), model, task, ds, 0, N, device,
                       autocast, args.checkpoint)
        return

    if dcfg.task == "arc" and dcfg.data != trained_on and not model.reads_demos:
        raise SettingsError(f"--data {dcfg.data}: this model was trained on {trained_on} with puzzle ids, which "
                            f"exist only for the tasks it trained on; expected a model trained with --task-embedding "
                            f"encoder to attempt other tasks")
    try:
        _, test_ds = task.build_datasets(dcfg, splits=("test",))
    except (DataError, SettingsError) as err:
        if args.data:
            raise
        raise DataError(f"{err} (the data settings are those checkpoint {args.checkpoint} was trained with; --data "
                        f"reads the test puzzles from elsewhere)") from None
    if not model.reads_demos and test_ds.num_puzzle_ids > mcfg.num_puzzle_ids:
        raise DataError(f"the test puzzles of checkpoint {args.checkpoint}'s settings have {test_ds.num_puzzle_ids} "
                        f"puzzle ids and its model {mcfg.num_puzzle_ids}; expected the settings it was saved with")
    if args.breadth is not None:
        return run_breadth(args, model, dcfg, task, test_ds, steps, device, autocast, out)
    report(args, model, dcfg, task, test_ds, N, device, autocast, out)


def report(args, model, dcfg, task, test_ds, N, device, autocast, out):
    """Accuracy after every supervision step (and with --halt, with halting), the task's scores and the picture."""
    score, check, batch_size, limit = (getattr(task, "score", None), getattr(task, "check", None),
                                       args.batch_size or 256, args.limit or None)
    res = accuracy_by_step(model, test_ds, N, batch_size, device, autocast, limit=limit, check=check,
                           keep=(N,) if score else ())
    halting = args.halt and run_steps(model, test_ds, [N], batch_size, device, autocast, limit=limit,
                                      threshold=args.halt_threshold)[0][N, 1]
    diagnosed = model.reads_demos and encoder_diagnostics(model, dcfg, test_ds, device, autocast, OneProcess(),
                                                          batch_size, limit)
    make_folder(out)
    print(f"{res[0]['count']} test rows, {N} supervision steps (trained with N_sup {model.cfg.N_sup})"
          + (f"; {res[0]['scored']} rows have a known answer, and only those are scored"
             if res[0]["scored"] < res[0]["count"] else ""))
    print("step   exact   token" + ("   valid" if check else ""))
    for r in res:
        print(f"{r['step']:>4} {100 * r['exact']:6.2f}% {100 * r['token']:6.2f}%"
              + (f" {100 * r['valid']:6.2f}%" if check else ""))
    path = plot(res, os.path.join(out, f"{dcfg.task}_accuracy_by_step.png"),
                f"{dcfg.task}: accuracy by supervision step (trained N_sup={model.cfg.N_sup})")
    print(f"plot: {path}")
    if score:
        print(f"after {N} steps: " + score(dcfg, res[-1]["preds"], res[-1]["halt"], out=out)[1])
    if diagnosed:
        print(diagnosed[1])
    if halting:
        print(f"with halting at p > {args.halt_threshold}: exact {halting['q']:.2%}, token {halting['token']:.2%}, "
              f"{halting['steps']:.2f} steps on average (at most {N}); "
              f"fixed depth {N}: exact {res[-1]['exact']:.2%}, token {res[-1]['token']:.2%}")


def run_breadth(args, model, dcfg, task, test_ds, steps, device, autocast, out):
    """The depth x breadth sweep: exact accuracy per (steps, breadth, selection), the best choice that uses no
    rules, how often the Q head finds a right trajectory, and the picture."""
    breadths, check, score = args.breadth, getattr(task, "check", None), getattr(task, "score", None)
    if args.select == "valid" and check is None:
        raise SettingsError(f"--select valid needs a checker of the rules, and {dcfg.task} has none")
    threshold = args.halt_threshold if args.halt else None
    t0 = time.time()
    results, kept = run_steps(model, test_ds, steps, args.batch_size or 128, device, autocast, breadths=breadths,
                              init=args.init, noise=args.noise, noise_y=args.noise_y, seed=args.seed,
                              limit=args.limit or None, check=check, threshold=threshold,
                              keep=steps if score else ())
    seconds = time.time() - t0
    make_folder(out)
    mcfg = model.cfg
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
            line = score(dcfg, preds[:, :K].reshape(len(rows), -1), halt[:, :K].reshape(-1), rows=rows,
                         out=out if last else None)[1]
            print(f"{k} steps x {K} trajectories, voting: {line}")
    path = plot_depth_breadth(results, steps, breadths, args.select,
                              os.path.join(out, f"{dcfg.task}_depth_breadth.png"),
                              f"{dcfg.task}: depth x breadth (init {args.init}, noise {args.noise})")
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
