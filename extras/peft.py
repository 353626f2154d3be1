"""
Parameter-efficient fine-tuning for finetune.py: the base model stays frozen and a few new
parameters learn the task.

  LoRA           a low-rank update added to chosen projections (Hu et al. 2021)
  OFT            a learned rotation of each chosen projection's input (Qiu et al. 2023)
  prompt tuning  learned vectors in front of every sequence (Lester et al. 2021), started
                 from task words' embeddings or reparametrised by an MLP (prefix tuning)
  int8 base      the frozen projections of LoRA/OFT stored as int8 (as QLoRA stores 4-bit)

Adapters are merged into plain weights when a checkpoint is saved (`plain_state`), so every
later stage loads an ordinary GPT. A prompt-tuning prefix cannot be merged: it is saved as
the model's `prefix` (GPTConfig.n_prefix), and nanosft.model_from_checkpoint rebuilds a
PromptTuned model from it.
"""
import copy
import dataclasses
import math

import torch
from torch import nn
from torch.nn.utils import parametrize

import nanosft


# ----------------------------------------------------------------------------------------
# LoRA


def dense(linear):
    """The weight matrix (out, in) of a plain or an int8 Linear, in float."""
    return linear.dequantized() if isinstance(linear, Int8Linear) else linear.weight.data


def plain_linear(weight, bias):
    lin = nn.Linear(weight.size(1), weight.size(0), bias=bias is not None)
    lin.weight.data = weight
    if bias is not None:  # an imported GPT-2's
        lin.bias.data = bias.data.clone()
    return lin


class LoRALinear(nn.Module):
    """y = x W^T + (alpha / r) * x A^T B^T with W frozen. B starts at zero, so at init the
    adapted model computes exactly what the base model computes."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scale

    def merged(self):
        w = dense(self.base)
        return plain_linear(w + self.scale * (self.B @ self.A).to(w.dtype), self.base.bias)


# ----------------------------------------------------------------------------------------
# OFT


class OFTLinear(nn.Module):
    """y = base(x R): the input features rotated by a block-diagonal orthogonal R, W frozen.

    Each b x b block is the Cayley transform of a skew-symmetric Q (Q^T = -Q), built from
    its b(b-1)/2 free entries:  R = (I - Q)(I + Q)^-1.  For every such Q, R is orthogonal
    (R^T R = I) with det +1: a pure rotation. It keeps the angles between the weight's
    neurons, which is why OFT forgets little (Qiu et al. 2023). Q = 0 at the start, so
    R = I and the adapted model computes exactly what the base model computes.
    (I - Q) and (I + Q)^-1 commute, so R = solve(I + Q, I - Q): an exact inverse, no series."""

    def __init__(self, base, block):
        super().__init__()
        if base.in_features % block:
            raise ValueError(f"--oft-block {block} must divide the layer's {base.in_features} input features")
        self.base, self.block = base, block
        self.base.requires_grad_(False)
        n = base.in_features // block
        self.register_buffer("iu", torch.triu_indices(block, block, offset=1), persistent=False)
        self.q = nn.Parameter(torch.zeros(n, block * (block - 1) // 2))  # (blocks, b(b-1)/2)

    def rotation(self):
        """R's blocks, (n, b, b), in float32 (the solve is not for bf16)."""
        n, b = self.q.size(0), self.block
        Q = self.q.new_zeros(n, b, b, dtype=torch.float32)
        Q[:, self.iu[0], self.iu[1]] = self.q.float()
        Q = Q - Q.transpose(1, 2)  # skew-symmetric
        eye = torch.eye(b, device=Q.device).expand(n, b, b)
        return torch.linalg.solve(eye + Q, eye - Q)

    def forward(self, x):
        R = self.rotation().to(x.dtype)  # (n, b, b)
        xs = x.unflatten(-1, (R.size(0), self.block))  # (..., n, b): the input, block by block
        return self.base(torch.einsum("...nb,nbc->...nc", xs, R).flatten(-2))  # (..., in) rotated

    def merged(self):
        # x R W^T = x (W R^T)^T: the merged weight is W R^T, with R block-diagonal
        w = dense(self.base)
        R = torch.block_diag(*self.rotation().detach()).to(w.dtype)
        return plain_linear(w @ R.t(), self.base.bias)


# ----------------------------------------------------------------------------------------
# where adapters go, merging them, and the int8 base


TARGETS = ("c_attn", "c_proj", "c_fc")  # the projections of attention and MLP


def projections(model, where=("attn", "mlp")):
    """(parent module, name) of each projection in the attention and/or MLP of every block."""
    return [(parent, name) for block in model.h for parent in (getattr(block, w) for w in where)
            for name in TARGETS if hasattr(parent, name)]


def add_lora(model, rank, alpha=None, where=("attn", "mlp")):
    """Freeze every weight, then wrap the projections of the attention and/or the MLP
    (`where`) of every block with LoRA adapters."""
    model.requires_grad_(False)
    for parent, name in projections(model, where):
        setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha or 2 * rank))
    return model


def add_oft(model, block, where=("attn", "mlp")):
    """Freeze every weight, then rotate the input of the chosen projections (OFTLinear)."""
    model.requires_grad_(False)
    for parent, name in projections(model, where):
        setattr(parent, name, OFTLinear(getattr(parent, name), block))
    return model


def merge(model):
    """Fold every adapter into a plain Linear (and every int8 weight back to float), so
    later stages load an ordinary GPT."""
    for parent, name in projections(model):
        m = getattr(parent, name)
        if isinstance(m, (LoRALinear, OFTLinear)):
            setattr(parent, name, m.merged())
        elif isinstance(m, Int8Linear):
            setattr(parent, name, plain_linear(m.dequantized(), m.bias))
    return model


class Int8Linear(nn.Module):
    """A frozen Linear stored as int8, one scale per output channel (absmax / 127), turned
    back into float for each matmul. A quarter of fp32's bytes; the rounding error of each
    weight is at most half a step, scale / 2."""

    def __init__(self, linear):
        super().__init__()
        w = linear.weight.data.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # (out,)
        self.register_buffer("qweight", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.data.clone(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def dequantized(self):
        return self.qweight.float() * self.scale[:, None]

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantized().to(x.dtype), bias)


def quantize_base(model):
    """Every projection of every block -> Int8Linear (before the adapters wrap them)."""
    for parent, name in projections(model):
        setattr(parent, name, Int8Linear(getattr(parent, name)))
    return model


def frozen_bytes(model):
    """Bytes of the projections' frozen weights as stored (int8 + scales, or float)."""
    total = 0
    for parent, name in projections(model):
        m = getattr(parent, name)
        m = getattr(m, "base", m)
        total += sum(t.numel() * t.element_size() for t in
                     ((m.qweight, m.scale) if isinstance(m, Int8Linear) else (m.weight,)))
    return total


# ----------------------------------------------------------------------------------------
# prompt tuning


class PromptTuned(nanosft.GPT):
    """A GPT with config.n_prefix learned vectors (`prefix`) in front of every sequence.
    They have no position, their outputs are dropped, and a decoder's KV cache keeps them
    (its `pos` counts tokens only)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.prefix = nn.Parameter(torch.zeros(cfg.n_prefix, cfg.n_embd))

    def embed(self, idx, start):
        x = super().embed(idx, start)  # (B, T, C)
        if start:  # a continued sequence: the cache holds the prefix already
            return x
        return torch.cat([self.prefix.to(x.dtype).expand(x.size(0), -1, -1), x], dim=1)  # (B, P+T, C)




def new_gpt(cfg):
    """A GPT of this config: a PromptTuned one when config.n_prefix > 0."""
    return PromptTuned(cfg) if cfg.n_prefix else nanosft.GPT(cfg)


def add_prompt(model, n_tokens, seed):
    """A copy of `model` with n_tokens learned vectors in front of every sequence, the only
    trainable parameters. They start as the embeddings of n_tokens random vocabulary tokens
    (real token embeddings train better than random vectors: Lester et al. 2021)."""
    cfg = dataclasses.replace(model.config, n_prefix=n_tokens)
    tuned = PromptTuned(cfg)
    tuned.load_state_dict(model.state_dict(), strict=False)
    tuned.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    init = torch.randint(0, cfg.vocab_size, (n_tokens,), generator=g)
    tuned.prefix.data = model.wte.weight.data[init].clone()
    tuned.prefix.requires_grad_(True)
    return tuned


def init_prompt(model, token_ids):
    """Start the prefix from the embeddings of these tokens (e.g. the task's most frequent
    answer words: Lester et al. 2021 start from the class labels' embeddings), cycled to
    the prefix's length."""
    ids = torch.tensor(token_ids)[torch.arange(model.config.n_prefix) % len(token_ids)]
    with torch.no_grad():
        model.prefix.copy_(model.wte.weight[ids.to(model.wte.weight.device)])
    return model


class PromptMLP(nn.Module):
    """A reparametrised prefix: prefix = P + MLP(P), with P the stored vectors. The MLP
    couples the prefix's vectors, so each step moves them together (prefix tuning, Li &
    Liang 2021; P-tuning, Liu et al. 2021; the residual form of Razdaibiedina et al. 2023).
    The last layer starts at zero: at the start the prefix is exactly P."""

    def __init__(self, width, hidden):
        super().__init__()
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, P):
        return P + self.down(torch.tanh(self.up(P)))


def reparametrise_prompt(model, hidden):
    """model.prefix becomes PromptMLP(hidden)(P): P and the MLP train; `plain_state` saves
    the prefix they compute."""
    parametrize.register_parametrization(model, "prefix", PromptMLP(model.config.n_embd, hidden))
    return model


# ----------------------------------------------------------------------------------------
# saving: plain weights


def plain_state(model):
    """A state dict an ordinary GPT loads: adapters merged into their weights."""
    if any(isinstance(m, (LoRALinear, OFTLinear, Int8Linear)) for m in model.modules()):
        model = merge(copy.deepcopy(model))
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.startswith("parametrizations.")}
    if parametrize.is_parametrized(model, "prefix"):  # a reparametrised prompt: its output is the prefix
        state["prefix"] = model.prefix.detach().cpu().clone()
    return state


def plain_model(model):
    """An ordinary GPT with the adapted model's weights (adapters merged)."""
    m = new_gpt(model.config)
    m.load_state_dict(plain_state(model))
    return m.to(next(model.parameters()).device)


# ----------------------------------------------------------------------------------------
# finetune.py's set-up: --lora-rank, --oft-block, --prompt-tokens and their options


# the flags finetune.py hands on to sft_setup by name (extras/flags.py declares them)
FLAGS = ("lora_rank", "lora_alpha", "lora_on", "oft_block", "prompt_tokens", "prompt_init", "prompt_mlp",
         "new_rows")


def method(lora_rank, oft_block, prompt_tokens):
    """What SFT trains: "lora", "oft", "prompt" or "full" (every weight; also --init scratch)."""
    return "lora" if lora_rank else "oft" if oft_block else "prompt" if prompt_tokens else "full"


def sft_setup(model, tok, examples, seed, lora_rank=0, lora_alpha=None, lora_on="attn", oft_block=0,
              quantize="none", prompt_tokens=0, prompt_init="random", prompt_mlp=0, new_rows="train",
              counts=None, chat_tokens=(), rare=10, train_rows=None):
    """finetune.py's model under PEFT -> (model, the embedding rows that train or None): a
    prompt-tuning prefix (prompt_tokens), or LoRA adapters (lora_rank) or OFT rotations
    (oft_block) on the projections of lora_on (e.g. "attn,mlp"), which freeze everything
    else; quantize "int8" (--quantize-base) stores the frozen projections under LoRA/OFT as int8 first.
    new_rows "train": the embedding rows of the tokens new to the model (new_token_rows;
    counts: the pre-training text's token counts, None for a model without pre-training)
    train with them, through train_rows (finetune.train_rows). prompt_init, prompt_mlp:
    prompt_setup."""
    if prompt_tokens:
        model = add_prompt(model, prompt_tokens, seed)
    if quantize == "int8":
        quantize_base(model)
    if lora_rank:
        torch.manual_seed(seed)
        add_lora(model, lora_rank, lora_alpha, lora_on.split(","))
    if oft_block:
        if model.config.n_embd % oft_block:  # (the MLP's 4 * n_embd inputs then divide too)
            raise nanosft.UserError(f"--oft-block {oft_block} must divide the model's width {model.config.n_embd}")
        add_oft(model, oft_block, lora_on.split(","))
    rows = None
    if new_rows == "train":
        rows = train_rows(model, new_token_rows(counts, examples, chat_tokens, rare))
    prompt_setup(model, tok, examples, chat_tokens, init=prompt_init, mlp_hidden=prompt_mlp)
    return model, rows



def new_token_rows(counts, examples, chat_tokens, rare):
    """The tokens that are new to the pre-trained model: the chat tokens, and the tokens of
    the SFT data that pre-training saw fewer than `rare` times (in the world: the question
    words, "?", the list tasks' digits -- the questions are phrased in words the biographies
    never use). Frozen at their untrained start (--new-rows freeze), the model could read
    "<|user|>" or write "<|end|>" only by bending every layer around them, and that bending
    shows up as forgetting on ordinary text; PEFT libraries let added tokens train too."""
    rows = set(chat_tokens)
    if counts is not None:
        used = torch.cat([x for x, _ in examples] + [y[y >= 0] for _, y in examples]).unique()
        rows |= {t for t in used.tolist() if counts[t] < rare}
    return sorted(rows)


def prompt_setup(model, tok, examples, chat_tokens, init="random", mlp_hidden=0):
    """Prompt tuning's remedies (none without a prefix): init "task" starts the prefix from
    the embeddings of the most frequent answer tokens of `examples`; mlp_hidden > 0
    reparametrises it through an MLP (PromptMLP)."""
    if not model.config.n_prefix:
        return
    if init == "task":
        targets = torch.cat([y[y >= 0] for _, y in examples])
        counts = torch.bincount(targets, minlength=tok.vocab_size)
        counts[list(chat_tokens) + [tok.endoftext, tok.pad]] = 0  # words, not the chat format's tokens
        init_prompt(model, counts.argsort(descending=True)[:model.config.n_prefix].tolist())
    if mlp_hidden:
        reparametrise_prompt(model, mlp_hidden)


def trainable_params(model, rows=None):
    """Parameters the optimizer can change: with `rows`, of the embedding matrix only those
    rows (the others get zero gradients and, without weight decay, stay put)."""
    n = model.num_params(trainable_only=True)
    if rows is not None:
        n -= (model.wte.weight.size(0) - len(rows)) * model.config.n_embd
    return n
