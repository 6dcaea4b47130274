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
with P prefix positions holding the puzzle embedding. The deep-supervision loop around deep_recursion
lives in train.py.
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


def trunc_normal_(w, std):
    """Truncated normal cut at 2 standard deviations, as the reference initialises every weight."""
    return nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


def rms_norm(h, eps):
    # No learnable gain, computed in float32 even under bf16 (as the reference).
    h32 = h.float()
    return (h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)


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


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = Linear(cfg.d_model, 3 * cfg.d_model)   # [q heads | k heads | v heads]
        self.o = Linear(cfg.d_model, cfg.d_model)

    def forward(self, h, cos_sin):
        B, S, D = h.shape
        qkv = self.qkv(h).view(B, S, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.unbind(2)                                        # each [B, S, H, hd]
        if cos_sin is not None:
            cos, sin = cos_sin                                         # [S, hd] float32
            cos, sin = cos[:, None], sin[:, None]
            q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
            k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(out.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    """Post-norm block. The MLP variant mixes tokens with a SwiGLU over the position axis instead of
    attention; its norm runs while still transposed, so over positions (as in the reference)."""

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
            ht = h.transpose(1, 2)                                      # [B, D, S]
            h = rms_norm(ht + self.token_mlp(ht), self.eps).transpose(1, 2)
        else:
            h = rms_norm(h + self.attn(h, cos_sin), self.eps)
        return rms_norm(h + self.mlp(h), self.eps)


class TRM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        D = cfg.d_model
        self.embed_tokens = nn.Embedding(cfg.vocab_size, D)
        trunc_normal_(self.embed_tokens.weight, 1.0 / math.sqrt(D))
        self.embed_scale = math.sqrt(D)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
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
        if cfg.rope:
            S, hd = cfg.puzzle_emb_len + cfg.seq_len, D // cfg.n_heads
            inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
            freqs = torch.outer(torch.arange(S, dtype=torch.float32), inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)                      # [S, hd]
            self.register_buffer("rope_cos", emb.cos(), persistent=False)
            self.register_buffer("rope_sin", emb.sin(), persistent=False)

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def embed_input(self, inputs, puzzle_rows):
        """x: the question tokens [B, L] with the puzzle embedding rows [B, D] as prefix position 0 of P."""
        prefix = F.pad(puzzle_rows[:, None], (0, 0, 0, self.cfg.puzzle_emb_len - 1))      # [B, P, D], row then zeros
        tokens = self.embed_tokens(inputs)                                                  # [B, L, D]
        return self.embed_scale * torch.cat((prefix.to(tokens.dtype), tokens), dim=1)       # [B, P+L, D]

    def initial_state(self, batch_size):
        """y, z at the start of a puzzle: the fixed vectors at every position, [B, P+L, D] each."""
        S = self.cfg.puzzle_emb_len + self.cfg.seq_len
        return self.y_init.expand(batch_size, S, -1), self.z_init.expand(batch_size, S, -1)

    def net(self, h, injection):
        """The one tiny network: net(x, y, z) of the paper is net(z, x + y); net(y, z) is net(y, z)."""
        cos_sin = (self.rope_cos, self.rope_sin) if self.cfg.rope else None
        h = h + injection       # the reference injects by addition, never concatenation
        for block in self.blocks:
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
        """One supervision step: logits [B, L, V] and the halt logit [B] (float32), plus the next (y, z).
        n and T default to the config's; training-time depth schedules pass their own (train.depth_at)."""
        if inputs.shape[1] != self.cfg.seq_len:
            raise ValueError(f"this model was built for puzzles of {self.cfg.seq_len} tokens, "
                             f"got {inputs.shape[1]}; train a model for this size")
        x = self.embed_input(inputs, puzzle_rows)
        (y, z), logits, q = self.deep_recursion(x, y, z, n or self.cfg.n, T or self.cfg.T)
        return (y, z), logits, q[:, 0].float()     # only the halt logit is used (Q_head's second output is not)


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


def from_reference_state_dict(ref):
    """Rename a state_dict saved by the reference code (torch.compile's `_orig_mod.` prefix allowed) to ours."""
    out = {}
    for key, value in ref.items():
        key = key.removeprefix("_orig_mod.")
        if key in REFERENCE_NAMES:
            out[REFERENCE_NAMES[key]] = value
            continue
        parts = key.split(".", 4)       # inner, L_level, layers, i, rest
        if parts[:3] == ["inner", "L_level", "layers"] and parts[4] in REFERENCE_LAYER_NAMES:
            out[f"blocks.{parts[3]}.{REFERENCE_LAYER_NAMES[parts[4]]}"] = value
            continue
        raise KeyError(f"reference checkpoint key {key!r} has no counterpart in this model")
    return out
