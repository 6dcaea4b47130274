"""The Tiny Recursive Model: one tiny network applied recursively, as in "Less is More: Recursive
Reasoning with Tiny Networks" (arXiv 2510.04871), whose TRM pseudocode is, in outline:

    def latent_recursion(x, y, z, n=6):
        for i in range(n):           # latent reasoning
            z = net(x, y, z)
        y = net(y, z)                # refine output answer
        return y, z

    def deep_recursion(x, y, z, n=6, T=3):
        with torch.no_grad():        # recursing T-1 times to improve y and z (no gradients needed)
            for j in range(T-1):
                y, z = latent_recursion(x, y, z, n)
        y, z = latent_recursion(x, y, z, n)   # recursing once to improve y and z
        return (y.detach(), z.detach()), output_head(y), Q_head(y)

x is the embedded question, y the embedded answer, z the latent reasoning state; all are [B, P + L, D]
with P prefix positions holding the puzzle embedding (or, with --task-embedding encoder, what the DemoEncoder
reads from the task's demonstration pairs). The deep-supervision loop around deep_recursion
lives in train.py. The paper's steps from HRM to TRM (two networks, the 1-step gradient, ACT's continue
loss, single and multi-scale z) are switches in TRMConfig, each its own function at the end of TRM.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TRMConfig:
    vocab_size: int = 11
    seq_len: int = 81            # L, tokens of the puzzle
    d_model: int = 512           # D
    n_layers: int = 2            # blocks in net
    n_heads: int = 8
    expansion: float = 4.0       # SwiGLU width factor
    mlp_t: bool = True           # token-mixing MLP instead of self-attention (the paper's Sudoku variant)
    rope: bool = False           # rotary positions for attention (maze, ARC)
    puzzle_emb_len: int = 16     # P, prefix positions; the puzzle embedding fills the first
    num_puzzle_ids: int = 1      # rows of the puzzle-embedding table
    n: int = 6                   # latent recursions per latent_recursion
    T: int = 3                   # latent_recursion calls per deep_recursion
    N_sup: int = 16              # supervision steps
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    # The paper's steps from HRM to TRM (Tables 1-2) as switches; all off is TRM. See the variants below.
    separate_nets: bool = False  # f_L updates z, f_H updates y, each with its own n_layers blocks
    one_step_grad: bool = False  # HRM's 1-step gradient: only the last f_L and f_H calls get gradient
    act_continue: bool = False   # HRM's ACT: a continue logit learnt by Q-learning; halt when halt > continue
    latents: str = "yz"          # yz (TRM), single (one state z), multi (n latent features z besides y)
    # What fills the prefix: a learnt row per augmented puzzle (id, the paper's), or the DemoEncoder's reading
    # of the task's demonstration pairs (encoder, ARC only), which can attempt tasks it never trained on.
    task_embedding: str = "id"
    encoder_layers: int = 2      # blocks of the DemoEncoder


def trunc_normal_(w, std):
    """Truncated normal cut at 2 standard deviations, as the reference initialises every weight."""
    return nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


def rms_norm(h, eps, dim=-1):
    # No learnable gain, computed in float32 even under bf16 (as the reference).
    h32 = h.float()
    return (h32 * torch.rsqrt(h32.pow(2).mean(dim, keepdim=True) + eps)).to(h.dtype)


def stablemax(logits):
    """The reference's output distribution, s(x) / sum s(x) with s(x) = x + 1 for x >= 0 and 1 / (1 - x) below, in
    float64: unlike softmax it grows linearly, so large logits stay finite. The training loss scores its log."""
    x = logits.double()
    # Clamping keeps the branch torch.where does not pick finite, else its gradient is 0 * inf = NaN at x = 1.
    s = torch.where(x >= 0, x + 1, 1 / (1 - x.clamp_max(0)))
    return s / s.sum(-1, keepdim=True)


class Linear(nn.Linear):
    def __init__(self, fan_in, fan_out, bias=False):
        super().__init__(fan_in, fan_out, bias=bias)
        trunc_normal_(self.weight, 1.0 / math.sqrt(fan_in))
        if bias:
            nn.init.zeros_(self.bias)


class SwiGLU(nn.Module):
    @staticmethod
    def width(width, expansion):
        return 256 * math.ceil(round(expansion * width * 2 / 3) / 256)  # 512 -> 1536, 97 -> 512

    def __init__(self, width, expansion):
        super().__init__()
        inner = self.width(width, expansion)
        self.gate_up = Linear(width, 2 * inner)   # fused [gate | up]
        self.down = Linear(inner, width)

    def forward(self, h):
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def rotate_half(h):
    h1, h2 = h.chunk(2, dim=-1)
    return torch.cat((-h2, h1), dim=-1)


def rope(h, cos, sin):
    """Rotary positions, in float32 as the reference: h [B, S, ..., hd], cos and sin [S, hd] float32."""
    h = h.float()
    shape = (h.shape[1],) + (1,) * (h.dim() - 3) + (h.shape[-1],)    # [S, 1, ..., hd] against h's positions
    return h * cos.view(shape) + rotate_half(h) * sin.view(shape)


def attend(q, k, v):
    """Non-causal softmax(q k^T / sqrt(hd)) v over [B, H, S, hd]. On a CPU in bf16 the fused kernel ran 4x slower
    than its arithmetic as two batched matmuls: the scores of the bf16 q, k in float32 (as the fused kernel keeps
    them), their softmax in float32, then the bf16 weights times v."""
    if q.device.type != "cpu" or q.dtype == torch.float32:
        return F.scaled_dot_product_attention(q, k, v)
    with torch.autocast("cpu", enabled=False):
        scores = q.float() @ k.float().transpose(-2, -1)                             # [B, H, S, S]
    return torch.softmax(scores * q.shape[-1] ** -0.5, dim=-1).to(v.dtype) @ v


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = Linear(cfg.d_model, 3 * cfg.d_model)   # [q heads | k heads | v heads]
        self.o = Linear(cfg.d_model, cfg.d_model)

    def forward(self, h, cos_sin):
        B, S, D = h.shape
        qk, v = self.qkv(h).view(B, S, 3, self.n_heads, self.head_dim).split((2, 1), dim=2)
        if cos_sin is not None:     # q and k rotated together, then rounded back to v's dtype as the reference does
            qk = rope(qk, *cos_sin).to(v.dtype)
        q, k = qk.unbind(2)
        out = attend(q.transpose(1, 2), k.transpose(1, 2), v.squeeze(2).transpose(1, 2))       # [B, H, S, hd]
        return self.o(out.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    """Post-norm block. The MLP variant mixes tokens with a SwiGLU over the position axis instead of
    attention, and its norm runs over positions too (the reference's runs while transposed)."""

    def __init__(self, cfg):
        super().__init__()
        self.mlp_t = cfg.mlp_t
        if cfg.mlp_t:
            self.token_mlp = SwiGLU(cfg.puzzle_emb_len + cfg.seq_len, cfg.expansion)
        else:
            self.attn = Attention(cfg)
        self.mlp = SwiGLU(cfg.d_model, cfg.expansion)
        self.eps = cfg.rms_eps

    def forward(self, h, cos_sin):                                      # h [B, S, D]
        if self.mlp_t:
            # The positions of each (row, channel) as one matrix row [B*D, S]: given the transposed view itself,
            # inductor multiplies by a copy of the weight per row (bmm), 8% slower for the cpu preset's step.
            B, S, D = h.shape
            t = self.token_mlp(h.transpose(1, 2).reshape(B * D, S)).view(B, D, S).transpose(1, 2)
            h = rms_norm(h + t, self.eps, dim=1)                        # over positions, h stays [B, S, D]
        else:
            h = rms_norm(h + self.attn(h, cos_sin), self.eps)
        return rms_norm(h + self.mlp(h), self.eps)


class DemoEncoder(nn.Module):
    """--task-embedding encoder: the P prefix vectors read from the task's demonstration pairs instead of looked
    up by puzzle id. Each pair is one sequence: P learnt summary slots, then its L cells, a cell's (input,
    output) tokens embedded as one symbol of V*V (both canvases start at the top left), so that even a plain
    average over the cells keeps which colour became which. Blocks of TRM's kind mix it; the slots of a
    task's pairs are averaged, so the pairs' order cannot matter and any number from 1 up reads the same way."""

    def __init__(self, cfg):
        super().__init__()
        D = cfg.d_model
        self.vocab_size = cfg.vocab_size
        self.embed_pair = nn.Embedding(cfg.vocab_size ** 2, D)
        trunc_normal_(self.embed_pair.weight, 1.0)
        self.slots = nn.Parameter(trunc_normal_(torch.empty(cfg.puzzle_emb_len, D), 1.0))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.encoder_layers))

    def forward(self, demos, mask, cos_sin):     # demos [B, M, 2, L] tokens, mask [B, M]: the pairs to read
        B, M = demos.shape[:2]
        P, D = self.slots.shape
        demos = demos.long()
        cells = self.embed_pair(demos[:, :, 0] * self.vocab_size + demos[:, :, 1])              # [B, M, L, D]
        h = torch.cat((self.slots.expand(B * M, P, D), cells.flatten(0, 1)), 1)               # [B*M, P+L, D]
        for block in self.blocks:
            h = block(h, cos_sin)
        pairs = h[:, :P].unflatten(0, (B, M))                                                   # [B, M, P, D]
        w = mask.to(pairs.dtype)[:, :, None, None]
        # The mean over the counted pairs [B, P, D], of RMS at most 1; embed_input's sqrt(D) then makes it stand
        # out of x as trained table rows do (at 1/sqrt(D) scale, as tokens, the TRM learnt to ignore it).
        return (pairs * w).sum(1) / w.sum(1).clamp_min(1)


class TRM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.embed_tokens = nn.Embedding(cfg.vocab_size, D)
        trunc_normal_(self.embed_tokens.weight, 1.0 / math.sqrt(D))
        self.embed_scale = math.sqrt(D)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        if cfg.separate_nets:     # f_H's own blocks; f_L is `blocks`, TRM's one net
            self.blocks_H = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.output_head = Linear(D, cfg.vocab_size)
        self.Q_head = Linear(D, 2, bias=True)
        # Q_head starts by predicting "do not halt" with confidence, so early training runs deep.
        nn.init.zeros_(self.Q_head.weight)
        nn.init.constant_(self.Q_head.bias, -5.0)
        # Buffers, not parameters: the fixed initial states, and the puzzle embedding, which has its own
        # sign-SGD optimizer and stays out of the EMA.
        self.register_buffer("y_init", trunc_normal_(torch.empty(D), 1.0))
        self.register_buffer("z_init", trunc_normal_(torch.empty(D), 1.0))
        self.register_buffer("puzzle_emb", torch.zeros(cfg.num_puzzle_ids, D))
        if cfg.task_embedding == "encoder":
            self.encoder = DemoEncoder(cfg)
        if cfg.rope:
            S, hd = cfg.puzzle_emb_len + cfg.seq_len, D // cfg.n_heads
            inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
            freqs = torch.outer(torch.arange(S, dtype=torch.float32), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)                      # [S, hd]
            self.register_buffer("rope_cos", emb.cos(), persistent=False)
            self.register_buffer("rope_sin", emb.sin(), persistent=False)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def task_rows(self, batch):
        """What fills the prefix for a batch: its puzzle-embedding rows [B, D] (the paper), in training as a leaf
        so that backward gives exactly their gradient for the sparse sign-SGD step (train.refill takes them, outside
        the compiled step); or with the encoder its reading of each row's demonstrations [B, P, D], whose graph
        reaches the encoder's weights."""
        if self.reads_demos:
            return self.encoder(batch["demos"], batch["demo_mask"], self.positions())
        return self.puzzle_emb[batch["puzzle_ids"]].requires_grad_(self.training)

    @property
    def reads_demos(self):
        """Whether batches must bring each row's demonstrations (data.to_device's demos)."""
        return self.cfg.task_embedding == "encoder"

    def positions(self):
        return (self.rope_cos, self.rope_sin) if self.cfg.rope else None

    def embed_input(self, inputs, puzzle_rows):
        """x: the question tokens [B, L] after P prefix positions: a puzzle-embedding row [B, D] in the first and
        zeros in the rest, or the encoder's P vectors [B, P, D]."""
        prefix = (puzzle_rows if puzzle_rows.dim() == 3 else                                # [B, P, D]
                  F.pad(puzzle_rows[:, None], (0, 0, 0, self.cfg.puzzle_emb_len - 1)))
        tokens = self.embed_tokens(inputs)                                                  # [B, L, D]
        return self.embed_scale * torch.cat((prefix.to(tokens.dtype), tokens), dim=1)       # [B, P+L, D]

    def initial_state(self, batch_size):
        """y, z at the start of a puzzle: the fixed vectors at every position, [B, P+L, D] each (multi-scale
        latents: z is [B, n, P+L, D], n features)."""
        S = self.cfg.puzzle_emb_len + self.cfg.seq_len
        z_shape = (batch_size, self.cfg.n, S, -1) if self.cfg.latents == "multi" else (batch_size, S, -1)
        return self.y_init.expand(batch_size, S, -1), self.z_init.expand(z_shape)

    def net(self, h, injection, blocks=None):
        """The one tiny network: net(x, y, z) of the paper is net(z, x + y); net(y, z) is net(y, z)."""
        cos_sin = self.positions()
        h = h + injection       # the reference injects by addition, never concatenation
        for block in self.blocks if blocks is None else blocks:
            h = block(h, cos_sin)
        return h

    def latent_recursion(self, x, y, z, n):
        for i in range(n):          # latent reasoning
            z = self.net(z, x + y)
        y = self.net(y, z)          # refine output answer
        return y, z

    def deep_recursion(self, x, y, z, n, T):
        with torch.no_grad():       # recursing T-1 times to improve y and z (no gradients needed)
            for j in range(T - 1):
                y, z = self.latent_recursion(x, y, z, n)
        y, z = self.latent_recursion(x, y, z, n)    # recursing once to improve y and z
        # output_head drops the P prefix positions; Q_head reads the first prefix position.
        return (y.detach(), z.detach()), self.output_head(y)[:, self.cfg.puzzle_emb_len:], self.Q_head(y[:, 0])

    def forward(self, inputs, puzzle_rows, y, z, n=None, T=None):
        """One supervision step: logits [B, L, V] and Q_head's [halt, continue] logits [B, 2] (float32; TRM uses
        only the halt logit), plus the next (y, z). n and T default to the config's; training-time depth
        schedules pass their own (train.depth_at)."""
        if inputs.shape[1] != self.cfg.seq_len:
            raise ValueError(f"this model was built for puzzles of {self.cfg.seq_len} tokens, "
                             f"got {inputs.shape[1]}; train a model for this size")
        x = self.embed_input(inputs, puzzle_rows)
        (y, z), logits, q = self.recursion(x, y, z, n or self.cfg.n, T or self.cfg.T)
        return (y, z), logits, q.float()

    def halt_logit(self, q):
        """The logit whose sign says halt: TRM's q_halt, or HRM's q_halt - q_continue (--act-continue)."""
        return q[:, 0] - q[:, 1] if self.cfg.act_continue else q[:, 0]

    @torch.no_grad()
    def act_continue_target(self, inputs, puzzle_rows, y, z, last, n, T):
        """HRM's ACT (--act-continue) learns its continue logit by Q-learning: the target is the sigmoid of the
        best Q value one supervision step later, from an extra forward pass without gradient: the next halt
        logit on a slot's last step (last [B]), else max(next halt, next continue)."""
        _, _, q_next = self(inputs, puzzle_rows, y, z, n, T)
        return torch.sigmoid(torch.where(last, q_next[:, 0], q_next.max(-1).values))

    # ------------------------------------------------------------------ the paper's ablations (Tables 1-2)
    # Each is its own function beside TRM's, as the paper writes it; TRM's functions above stay as they are.

    def recursion(self, x, y, z, n, T):
        """TRM's deep_recursion, or the variant the config's switches name."""
        cfg = self.cfg
        variant = {"single": self.single_z_recursion, "multi": self.multi_z_recursion}.get(cfg.latents)
        if variant is None:
            variant = (self.one_step_grad_recursion if cfg.one_step_grad else
                       self.separate_nets_recursion if cfg.separate_nets else self.deep_recursion)
        return variant(x, y, z, n, T)

    def heads(self, h):
        return self.output_head(h)[:, self.cfg.puzzle_emb_len:], self.Q_head(h[:, 0])

    def f_L(self, h, injection):
        """HRM's low-level network, which updates z (z_L): TRM's net."""
        return self.net(h, injection)

    def f_H(self, h, injection):
        """HRM's high-level network, which updates y (z_H): its own blocks with --separate-nets, else TRM's net."""
        return self.net(h, injection, self.blocks_H if self.cfg.separate_nets else None)

    def separate_nets_recursion(self, x, y, z, n, T):
        """'w/ separate f_H, f_L' (Table 1): deep_recursion with HRM's two networks in latent_recursion."""
        with torch.no_grad():
            for j in range(T - 1):
                y, z = self.two_net_latent_recursion(x, y, z, n)
        y, z = self.two_net_latent_recursion(x, y, z, n)
        return (y.detach(), z.detach()), *self.heads(y)

    def two_net_latent_recursion(self, x, y, z, n):
        for i in range(n):
            z = self.f_L(z, x + y)
        y = self.f_H(y, z)
        return y, z

    def one_step_grad_recursion(self, x, y, z, n, T):
        """HRM as the paper's Figure 2 writes it (z_L is z, z_H is y): f_L n times for each f_H call, T
        times, with the 1-step gradient approximation: every call but the last f_L and f_H runs without
        gradient. With one net (no --separate-nets) it is Table 1's 'w/ 1-step gradient'. The figure's loop
        reads range(n*T - 2) and (i+1) % T; HRM's code and Table 1's depth (24 = 6 calls x 4 layers) make
        it n*T f_L calls and T f_H calls, as here."""
        with torch.no_grad():
            for i in range(n * T - 1):
                z = self.f_L(z, x + y)
                if (i + 1) % n == 0:
                    y = self.f_H(y, z)
        z = self.f_L(z, x + y)      # 1-step gradient: the last f_L call
        y = self.f_H(y, z)          # and the last f_H call
        return (y.detach(), z.detach()), *self.heads(y)

    def single_z_recursion(self, x, y, z, n, T):
        """'single z' (Table 2): one state that is both reasoning and answer, net(x, z) n + 1 times per
        latent recursion; the heads read z. y is carried unchanged, unused."""
        with torch.no_grad():
            for j in range(T - 1):
                for i in range(n + 1):
                    z = self.net(z, x)
        for i in range(n + 1):
            z = self.net(z, x)
        return (y, z.detach()), *self.heads(z)

    def multi_z_recursion(self, x, y, z, n, T):
        """'multi-scale z' (Table 2): n latent features z[0..n-1] besides y (n + 1 in all), z[i] updated from
        x, y and all the others in turn, then y from all of them; z [B, n, S, D] is carried whole."""
        z = list(z.unbind(1))
        with torch.no_grad():
            for j in range(T - 1):
                y, z = self.multi_z_latent_recursion(x, y, z, n)
        y, z = self.multi_z_latent_recursion(x, y, z, n)
        return (y.detach(), torch.stack(z, 1).detach()), *self.heads(y)

    def multi_z_latent_recursion(self, x, y, z, n):
        for i in range(n):
            z[i] = self.net(z[i], x + y + sum(z[:i] + z[i + 1:]))
        y = self.net(y, sum(z))
        return y, z


def flops_per_sample(cfg, demo_pairs=3):
    """Matmul FLOPs of one training supervision step for one sample, counted from the shapes (norms, RoPE, the
    loss and the optimizer are not matmuls and not counted). S = P + L positions, F and Ft the SwiGLU widths
    over D channels and over S positions. Per net call and layer:
        attention:   2·S·D·4D (qkv, o) + 4·S²·D (scores, weighted values) + 6·S·D·F (gate, up, down)
        token MLP:   6·D·S·Ft (SwiGLU over positions)                     + 6·S·D·F
    A step makes T(n+1) net calls forward; backward costs twice the forward of the n+1 calls with gradient.
    The heads run once with gradient, x3: output head 2·S·D·V (it sees the prefix positions too), Q head
    2·D·2. The DemoEncoder, with gradient, x3: demo_pairs pairs through encoder_layers blocks."""
    S, D, V = cfg.puzzle_emb_len + cfg.seq_len, cfg.d_model, cfg.vocab_size
    F = SwiGLU.width(D, cfg.expansion)
    if cfg.mlp_t:
        mix = 6 * D * S * SwiGLU.width(S, cfg.expansion)
    else:
        mix = 2 * S * D * 4 * D + 4 * S * S * D
    layer = mix + 6 * S * D * F
    encoder = 3 * demo_pairs * cfg.encoder_layers * layer if cfg.task_embedding == "encoder" else 0
    return ((cfg.T * (cfg.n + 1) + 2 * (cfg.n + 1)) * cfg.n_layers * layer + 3 * (2 * S * D * V + 2 * D * 2)
            + encoder)


# The reference implementation's state_dict names (SamsungSAILMontreal/TinyRecursiveModels), ours on the right.
REFERENCE_NAMES = {
    "inner.embed_tokens.embedding_weight": "embed_tokens.weight",
    "inner.lm_head.weight": "output_head.weight",
    "inner.q_head.weight": "Q_head.weight",
    "inner.q_head.bias": "Q_head.bias",
    "inner.H_init": "y_init",
    "inner.L_init": "z_init",
    "inner.puzzle_emb.weights": "puzzle_emb",
}
REFERENCE_LAYER_NAMES = {
    "self_attn.qkv_proj.weight": "attn.qkv.weight",
    "self_attn.o_proj.weight": "attn.o.weight",
    "mlp_t.gate_up_proj.weight": "token_mlp.gate_up.weight",
    "mlp_t.down_proj.weight": "token_mlp.down.weight",
    "mlp.gate_up_proj.weight": "mlp.gate_up.weight",
    "mlp.down_proj.weight": "mlp.down.weight",
}


def reference_name(name):
    """Our state_dict name as the reference's: the inverse of from_reference_state_dict's renaming."""
    ours_to_ref = {v: k for k, v in REFERENCE_NAMES.items()}
    if name in ours_to_ref:
        return ours_to_ref[name]
    _, i, rest = name.split(".", 2)      # blocks, i, rest
    return f"inner.L_level.layers.{i}." + {v: k for k, v in REFERENCE_LAYER_NAMES.items()}[rest]


def from_reference_state_dict(ref):
    """Rename a state_dict saved by the reference code (torch.compile's `_orig_mod.` prefix allowed) to ours; a key
    with no counterpart here raises KeyError(key)."""
    out = {}
    for original, value in ref.items():
        key = original.removeprefix("_orig_mod.")
        if key in REFERENCE_NAMES:
            out[REFERENCE_NAMES[key]] = value
            continue
        parts = key.split(".", 4)       # inner, L_level, layers, i, rest
        if parts[:3] == ["inner", "L_level", "layers"] and len(parts) == 5 and parts[4] in REFERENCE_LAYER_NAMES:
            out[f"blocks.{parts[3]}.{REFERENCE_LAYER_NAMES[parts[4]]}"] = value
            continue
        raise KeyError(original)
    return out
