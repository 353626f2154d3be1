"""
nanosft: what the stages of the pre-train -> SFT -> DPO pipeline share, nothing else. What
they read is in data/ (text, records, preference pairs, the world's files and evaluation);
what only some runs need (torchrun, --resume, --time-budget, PEFT, packed rows, GPT-2, your
own data's formats) in extras/, imported where its flag is handled. Top to bottom:
  1. running      bad input is one line and exit code 2; flags; device, dtype; Ctrl-C; the log
  2. tokenizer    a byte-level BPE (trained here) served by tiktoken
  3. model        a small GPT (pre-LayerNorm, learned positions, tied weights, KV cache)
  4. optimizer    AdamW (decay on matrices only), warmup + cosine schedule
  5. checkpoints  one .pt written atomically, loaded with weights_only=True; <stage>_last.pt resumes
  6. chat         rendering with the loss mask, padding
  7. generation   batched greedy / sampled decoding with the KV cache; mixed precision, mean loss
"""

import argparse
import json
import math
import os
import signal
import sys
import threading
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict, dataclass, fields

# OpenMP reads this once, when torch loads: its idle threads then sleep instead of spinning, which
# on shared cores took the core from the thread they waited for (3x slower; docs/performance.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import regex  # noqa: E402 (installed with tiktoken; needed for \p{L} in the GPT-2 split pattern)
import tiktoken  # noqa: E402
import torch  # noqa: E402 (after the setting above)
from torch import distributed, nn  # noqa: E402
from torch.nn import functional  # noqa: E402

# ----------------------------------------------------------------------------------------
# 1. running: errors, flags, device and dtype


class UserError(Exception):
    """Bad input from the user: reported as one line on stderr, exit code 2."""


def cli(main):
    """Run a script's main(): a UserError is one line and exit code 2 (a bug still raises)."""
    try:
        main()
        if distributed.is_available() and distributed.is_initialized():
            # under torchrun a rank that exits while another works can abort it
            distributed.barrier()
            distributed.destroy_process_group()
    except UserError as e:
        print(
            "error: " + " ".join(str(e).split()), file=sys.stderr
        )  # one line, even if it quotes a newline
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C: one line, exit code 130 (the shell's for SIGINT)
        print(
            f"interrupted: {str(e) or 'checkpoints on disk are complete (written atomically)'}",
            file=sys.stderr,
        )
        sys.exit(130)


# the flags checked at parse time: name -> the least value and whether it is allowed
LEAST = {
    "max_iters": (0, False),
    "batch_size": (0, False),
    "grad_accum": (0, False),
    "eval_interval": (0, False),
    "log_interval": (0, False),
    "block_size": (0, False),
    "n_layer": (0, False),
    "n_head": (0, False),
    "n_embd": (0, False),
    "vocab_size": (0, False),
    "max_new_tokens": (0, False),
    "num_samples": (0, False),
    "lr": (0, False),
    "time_budget": (0, False),
    "beta": (0, False),
    "grad_clip": (0, False),
    "warmup": (0, True),
    "rpo_alpha": (0, True),
    "min_margin": (0, True),
    "lora_rank": (0, True),
    "oft_block": (0, True),
    "prompt_tokens": (0, True),
    "prompt_mlp": (0, True),
    "replay": (0, True),
}


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and exit code 2 like every other bad input (not
    the whole usage), and a number out of its range (LEAST) is refused at parse time.

    stage: "pretrain", "finetune" or "dpo": the flags of the runs that ask for more than the
    lesson (--resume, PEFT, rewinding, ...) are declared in extras/flags.py and read only when
    the command line holds a flag the stage does not declare (or asks for --help); their
    defaults are the stage's DEFAULTS, so a default run never parses them."""

    def __init__(self, description, stage=None):
        super().__init__(
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            allow_abbrev=False,  # an abbreviation could name another flag once the rest are read
        )
        self.stage, self.more = stage, False

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see --help)")

    def add_more(self):
        """The flags of the runs that ask for more (extras/flags.py), declared once."""
        if self.stage and not self.more:
            from extras import flags

            flags.add(self, self.stage)
            self.more = True

    def format_help(self):  # --help lists every flag
        self.add_more()
        return super().format_help()

    def parse_args(self, argv=None):
        args, unknown = self.parse_known_args(argv)
        if unknown and self.stage:  # a flag of the runs that ask for more (or a mistake)
            from extras import flags

            args = flags.parse_args(self, argv, self.stage)
        elif unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        for name, v in vars(args).items():
            if (
                name in LEAST
                and v is not None
                and not (math.isfinite(v) and (v > 0 or LEAST[name][1] and v == 0))
            ):
                kind = "integer" if isinstance(v, int) else "number"
                rule = f"a {kind} >= 0" if LEAST[name][1] else f"a positive {kind}"
                raise UserError(f"--{name.replace('_', '-')} must be {rule}, got {v}")
        values, world = vars(args), int(os.environ.get("WORLD_SIZE", 1))  # processes (torchrun)
        if values.get("batch_size") and values["batch_size"] % (world * values["grad_accum"]):
            raise UserError(
                f"--batch-size {values['batch_size']} must be divisible by processes x "
                f"--grad-accum ({world} x {values['grad_accum']})"
            )
        if (
            values.get("out_dir")
            and os.path.exists(args.out_dir)
            and not os.path.isdir(args.out_dir)
        ):
            raise UserError(f"--out-dir {args.out_dir}: exists and is not a directory")
        return args


def add_common_args(ap, out_dir="out"):
    """The flags every stage shares, under two headings of --help: training, and running."""
    train = ap.add_argument_group("training (every stage)")
    train.add_argument("--out-dir", default=out_dir, help="where checkpoints, JSON and plots go")
    train.add_argument("--max-iters", type=int, help="optimizer steps")
    train.add_argument("--batch-size", type=int, help="sequences (or pairs) per optimizer step")
    train.add_argument("--lr", type=float, help="peak learning rate")
    train.add_argument("--eval-interval", type=int, help="evaluate (and checkpoint) every N steps")
    train.add_argument("--seed", type=int, default=1337)
    run = ap.add_argument_group("running: the device and the dtype")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    run.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bf16 where the hardware runs it natively, else fp32 (fp16 on old GPUs)",
    )
    # --warmup, --log-interval (their defaults: the stage's), --grad-clip, --grad-accum, --resume,
    # --time-budget, --compile, --plot: extras/flags.py
    ap.set_defaults(
        grad_clip=1.0, grad_accum=1, resume=False, time_budget=None, compile=False, plot=False
    )


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError(
            "--device mps: MPS is not available (a Mac with Apple silicon and macOS 12.3 or later)"
        )
    return torch.device(name)


def cpu_has_native_bf16():
    """True when this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX). Where bf16
    is emulated (AVX2 only) it is hundreds of times slower than fp32. A CPU limited to AVX2
    (ATEN_CPU_CAPABILITY=avx2) has none; without /proc/cpuinfo (not Linux), none assumed."""
    if torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2", "NO AVX"):
        return False
    with suppress(OSError), open("/proc/cpuinfo") as f:
        flags = f.read()
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def pick_dtype(device, name="auto"):
    """auto: bf16 where the hardware runs it natively, else fp32; fp16 on CUDA GPUs without bf16.
    On a Mac's GPU (MPS): fp32, or bf16 from macOS 14 (before it MPS has no bf16); never fp16,
    whose loss scaling is written for CUDA (and runs on a CPU, slowly: the tests check it)."""
    if device.type == "mps":
        if name == "float16":
            raise UserError("--dtype float16: fp16 needs CUDA; on MPS use float32 or bfloat16")
        if name == "bfloat16" and not torch.backends.mps.is_macos_or_newer(14, 0):
            raise UserError("--dtype bfloat16 on MPS needs macOS 14 or later; use --dtype float32")
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if device.type == "cpu" and cpu_has_native_bf16() else "float32"


@dataclass
class Process:
    """Where this process runs: its device and dtype; under torchrun its rank among `world`
    processes."""

    device: torch.device
    dtype: str
    rank: int = 0
    world: int = 1

    @property
    def master(self):
        return self.rank == 0

    def log(self, *a, **k):
        if self.master:
            print(*a, **k, flush=True)


def setup(device="auto", dtype="auto"):
    """The Process: device, dtype and, under torchrun (WORLD_SIZE > 1), the process group."""
    process = Process(
        pick_device(device),
        "float32",
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
    )
    if process.world > 1:
        from extras import runtime  # torchrun: one process per device (DDP)

        runtime.join_processes(process)
    if (
        process.device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ
    ):  # the cores, shared by the processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // process.world))
    process.dtype = pick_dtype(process.device, dtype)
    if process.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return process


def check_finite(step_loss, it, lr):
    """Stop on a NaN or infinite loss BEFORE the step is taken, so the last checkpoint on disk
    is a good one."""
    if not math.isfinite(step_loss):
        raise UserError(
            f"non-finite loss at step {it} (lr {lr:.2e}); stopped, the last checkpoint on disk "
            f"is the last good one. Try a lower --lr"
        )


@contextmanager
def finish_step_on_interrupt(process):
    """Around a training loop: Ctrl-C (SIGINT) asks it to stop after the step under way. The
    loop sees `interrupted()` true before its next step, keeps that step in <stage>_last.pt and
    exits 130, so --resume continues exactly where it stopped. A second Ctrl-C stops at once.
    Outside the loop, and under torchrun (every process would have to stop at the same step),
    Ctrl-C stops at once as usual."""
    asked = []

    def handler(signum, frame):
        if asked:
            raise KeyboardInterrupt
        asked.append(signum)

    here = process.world == 1 and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, handler) if here else None
    try:
        yield lambda: bool(asked)
    finally:
        if here:
            signal.signal(signal.SIGINT, previous)


def log_step(process, it, max_iters, loss, lr, seconds, tokens):
    """The log line after step `it` (counted from 1) of max_iters: loss, learning rate, this
    process's `tokens` per second over `seconds` of training (x the processes)."""
    rate = tokens * process.world / max(seconds, 1e-9)
    process.log(f"step {it:5d}/{max_iters} | loss {loss:.4f} | lr {lr:.2e} | {rate:,.0f} tok/s")


# ----------------------------------------------------------------------------------------
# 2. tokenizer

# GPT-2's pre-split: contractions, words, numbers, punctuation runs, whitespace; no merge
# crosses them.
SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SPECIALS = ["<|endoftext|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


class Tokenizer:
    """Our BPE merges handed to tiktoken for fast encode/decode. Text is always encoded with
    encode_ordinary: a special-token string typed in data (say "<|assistant|>") stays plain
    text and can never switch roles; role tokens enter only through render_chat, as ids.
    ids: bytes 0-255, merge k creates 256 + k, then the specials; or a BPE trained elsewhere's
    own {"bytes", "merges", "specials"} (GPT-2, extras/hf.py), growing with the merge order."""

    def __init__(self, merges, pattern=SPLIT_PATTERN, specials=tuple(SPECIALS), ids=None):
        self.merges, self.pattern = [tuple(int(x) for x in m) for m in merges], pattern
        n = 256 + len(self.merges)
        self.ids = ids or {
            "bytes": range(256),
            "merges": range(256, n),
            "specials": range(n, n + len(specials)),
        }
        token_bytes = {int(i): bytes([b]) for b, i in enumerate(self.ids["bytes"])}
        for (a, b), i in zip(self.merges, self.ids["merges"], strict=True):
            token_bytes[int(i)] = token_bytes[a] + token_bytes[b]
        self.ranks = {b: i for i, b in token_bytes.items()}
        self.special = dict(zip(specials, map(int, self.ids["specials"]), strict=True))
        if len(self.ranks) != 256 + len(self.merges) or set(self.special.values()) & set(
            token_bytes
        ):
            raise UserError("tokenizer: merges produce duplicate tokens (corrupt tokenizer)")
        self.enc = tiktoken.Encoding(
            name="nanosft", pat_str=pattern, mergeable_ranks=self.ranks, special_tokens=self.special
        )
        self.vocab_size = max([*token_bytes, *self.special.values()]) + 1
        sp = self.special.get  # the special tokens' ids by name: tok.end, tok.user, ...
        self.endoftext, self.pad, self.system = sp("<|endoftext|>"), sp("<|pad|>"), sp("<|system|>")
        self.user, self.assistant, self.end = sp("<|user|>"), sp("<|assistant|>"), sp("<|end|>")

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        return self.enc.decode(list(ids))

    def state(self):
        """Plain tensors, strings and lists: safe under torch.load(weights_only=True)."""
        return {
            "merges": torch.tensor(self.merges, dtype=torch.int64).reshape(-1, 2),
            "pattern": self.pattern,
            "specials": list(self.special),
            "ids": {k: torch.tensor(list(v), dtype=torch.int64) for k, v in self.ids.items()},
        }

    @classmethod
    def from_state(cls, s):
        ids = {k: v.tolist() for k, v in s["ids"].items()} if "ids" in s else None
        return cls(s["merges"].tolist(), s["pattern"], tuple(s["specials"]), ids)


def train_tokenizer(text, vocab_size):
    """A byte-level BPE of vocab_size tokens in all: the 256 bytes, then repeatedly the most
    frequent adjacent pair merged into a new token (merge k creates 256 + k), then the specials.
    Fast enough for megabytes in pure Python: identical chunks are counted once, pair counts are
    updated only in the chunks that hold the merged pair, and a max-heap finds the next best
    pair."""
    import heapq
    from collections import Counter, defaultdict

    chunk_counts = Counter(regex.findall(SPLIT_PATTERN, text))
    words = [list(c.encode("utf-8")) for c in chunk_counts]
    counts = list(chunk_counts.values())
    pairs, where = Counter(), defaultdict(set)
    for i, w in enumerate(words):
        for p in zip(w, w[1:]):
            pairs[p] += counts[i]
            where[p].add(i)
    heap = [(-c, p) for p, c in pairs.items()]
    heapq.heapify(heap)
    token_bytes = [bytes([i]) for i in range(256)]
    known = {b: i for i, b in enumerate(token_bytes)}
    merges = []
    while len(token_bytes) < vocab_size - len(SPECIALS) and heap:
        neg, pair = heapq.heappop(heap)
        if pairs.get(pair, 0) != -neg or neg == 0:
            continue  # stale heap entry
        a, b = pair
        new_bytes = token_bytes[a] + token_bytes[b]
        if new_bytes in known:  # same bytes reached by another merge path: reuse that id
            new_id = known[new_bytes]
        else:
            new_id = len(token_bytes)
            token_bytes.append(new_bytes)
            known[new_bytes] = new_id
            merges.append(pair)
        changed = set()
        for i in list(where[pair]):
            w, c = words[i], counts[i]
            merged, j = [], 0
            while j < len(w):  # w with every (a, b), left to right, replaced by new_id
                hit = w[j : j + 2] == [a, b]
                merged.append(new_id if hit else w[j])
                j += 2 if hit else 1
            if len(merged) == len(w):
                continue
            for p in zip(w, w[1:]):
                pairs[p] -= c
                changed.add(p)
            for p in zip(merged, merged[1:]):
                pairs[p] += c
                where[p].add(i)
                changed.add(p)
            words[i] = merged
        del where[pair]
        pairs.pop(pair, None)
        for p in changed:
            if pairs.get(p, 0) > 0:
                heapq.heappush(heap, (-pairs[p], p))
    return Tokenizer(merges)


# ----------------------------------------------------------------------------------------
# 3. model


@dataclass
class GPTConfig:
    block_size: int = 128
    vocab_size: int = 2048
    n_layer: int = (
        2  # 0.6M parameters: pre-training plateaus in minutes on any CPU (docs/pretrain.md)
    )
    n_head: int = 4
    n_embd: int = 128
    n_prefix: int = 0  # prompt tuning (extras/peft.py): learned vectors in front of every sequence
    bias: bool = False  # biases on the linear layers: GPT-2 has them (extras/hf.py), ours not
    gelu: str = "none"  # gelu's `approximate`: "none" (exact erf, ours) or "tanh" (GPT-2's)


GPT_FIELDS = {f.name for f in fields(GPTConfig)}  # (a newer version's other keys are dropped)


class KVCache:
    """Keys and values of the positions seen, one (k, v) per layer: a new token costs one
    position, not the prefix."""

    def __init__(self, n_layer):
        self.layers = [None] * n_layer
        self.pos = 0  # token positions consumed so far (a prompt-tuning prefix has none)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x, cache=None, layer=0, mask=None):
        """mask (B, 1, T, T) bool, for packed rows (extras/packing.py): True where a query may
        attend a key."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (
            t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v)
        )  # (B, nh, T, hs)
        if cache is not None:
            if cache.layers[layer] is not None:
                pk, pv = cache.layers[layer]
                k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)  # (B, nh, Tp+T, hs)
            cache.layers[layer] = (k, v)
        past = k.size(2) - T
        if mask is not None:  # packed rows: causal within each sequence, blind across them
            y = functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif past == 0:
            y = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif T == 1:  # one new token may look at everything before it
            y = functional.scaled_dot_product_attention(q, k, v)
        else:  # several new tokens after a cached prefix: causal mask shifted by `past`
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.gelu = cfg.gelu

    def forward(self, x):
        return self.c_proj(functional.gelu(self.c_fc(x), approximate=self.gelu))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x, cache=None, layer=0, mask=None):
        x = x + self.attn(self.ln_1(x), cache, layer, mask)  # pre-LayerNorm residual blocks
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one matrix reads and writes tokens
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # keep the residual stream's variance flat in depth
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self, trainable_only=False):
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def forward(self, idx, targets=None, cache=None, reduction="mean"):
        """idx (B, T) token ids; targets (B, T) next-token ids, -1 where not supervised. Returns
        logits (B, T, V) and the loss: the mean over supervised tokens (0 when there are none, never
        NaN), or with reduction="sum" the sum, for a caller that normalises over a whole step."""
        logits = self.lm_head(self.hidden(idx, cache))  # (B, T, V)
        if targets is None:
            return logits, None
        loss = functional.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="none"
        ).sum()  # (B*T,) -> a sum
        if reduction == "mean":
            loss = loss / (targets != -1).sum().clamp(min=1)
        return logits, loss

    def hidden(self, idx, cache=None):
        """The final hidden states (B, T, C), before lm_head. With a cache, idx continues the
        tokens it holds."""
        T = idx.size(1)
        start = cache.pos if cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds block_size {self.config.block_size}"
            )
        x = self.embed(idx, start)  # (B, T', C)
        for i, block in enumerate(self.h):
            x = block(x, cache, i)
        if cache is not None:
            cache.pos = start + T
        return self.ln_f(x[:, x.size(1) - T :])  # (B, T, C): vectors embed put in front are dropped

    def embed(self, idx, start):
        """Token plus position embeddings (B, T, C), positions from `start` (a subclass may put
        vectors in front: extras/peft.py's prompt tuning)."""
        return self.wte(idx) + self.wpe(torch.arange(start, start + idx.size(1), device=idx.device))


# ----------------------------------------------------------------------------------------
# 4. optimizer and schedule


def configure_optimizer(model, lr, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu"):
    """AdamW; weight decay only on matrices (2-D), never on biases, LayerNorm gains or a
    prompt-tuning prefix."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2 and p is not getattr(model, "prefix", None)]
    no_decay = [p for p in params if not any(p is q for q in decay)]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # fused: one kernel updates every tensor (not a Python loop of small ops per parameter);
    # the same update up to rounding (~1e-7). CUDA has it, CPU since torch 2.4; elsewhere
    # (MPS) the loop.
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=device_type in ("cuda", "cpu"))


def lr_at(it, max_lr, warmup, max_iters, min_frac=0.1):
    """Linear warmup, then cosine decay to min_frac * max_lr at max_iters."""
    if it < warmup:
        return max_lr * (it + 1) / warmup
    progress = min(1.0, (it - warmup) / max(1, max_iters - warmup))
    return max_lr * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


# ----------------------------------------------------------------------------------------
# 5. checkpoints


def save_checkpoint(path, obj):
    """Atomic write of obj (torch.save, or a str as text): a temp file, fsync, os.replace. Killed at
    any moment, it leaves the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") if isinstance(obj, str) else open(tmp, "wb") as f:
            f.write(obj) if isinstance(obj, str) else torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    save_checkpoint(path, json.dumps(obj, indent=2) + "\n")


def load_checkpoint(path, expect_kind=None):
    """Load a .pt with weights_only=True: tensors and plain containers only, so a pickle
    that would run code is refused, never executed. A directory: a Hugging Face GPT-2
    (extras/hf.py)."""
    import pickle
    import zipfile

    if os.path.isdir(path):
        from extras import hf  # a Hugging Face GPT-2 directory, read as a checkpoint

        return hf.load_dir(path, expect_kind)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip; a cut-off zip loses its directory
        raise UserError(
            f"{path}: not a readable checkpoint, expected a complete file written by torch.save "
            "(this one is truncated or in another format)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError
    ) as e:  # torch's advice to retry with weights_only=False is dropped: keep the reason
        boilerplate = (
            "Weights only load failed",
            "Please file an issue",
            "Check the documentation",
        )
        lines = [
            ln.strip()
            for ln in str(e).splitlines()
            if ln.strip() and not ln.strip().startswith(boilerplate)
        ]
        raise UserError(
            f"{path}: refused to load, not a plain-tensor checkpoint "
            f"({lines[0][:120] if lines else 'unsafe content'})"
        )
    except Exception as e:  # truncated, not a zip, not a torch file at all
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UserError(
            f"{path}: not a readable checkpoint, expected a complete file written by torch.save "
            f"(truncated or another format? {type(e).__name__}: {first[:80]})"
        )
    if not isinstance(checkpoint, dict) or not {"model", "config", "tokenizer", "kind"} <= set(
        checkpoint
    ):
        raise UserError(
            f"{path}: not a nanosft checkpoint (expected keys model, config, tokenizer, kind)"
        )
    if expect_kind and checkpoint["kind"] not in expect_kind:
        raise UserError(
            f"{path}: a '{checkpoint['kind']}' checkpoint, expected one of {', '.join(expect_kind)}"
        )
    return checkpoint


def model_from_checkpoint(checkpoint, path="checkpoint"):
    """The GPT and its tokenizer from a checkpoint dict, checked like any input before it is
    built."""
    sizes = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")
    cfg = (
        GPTConfig(**{k: v for k, v in checkpoint["config"].items() if k in GPT_FIELDS})
        if isinstance(checkpoint["config"], dict)
        else None
    )
    if cfg is None or not all(
        isinstance(getattr(cfg, k), int) and getattr(cfg, k) > 0 for k in sizes
    ):
        raise UserError(
            f"{path}: config must hold positive integers {', '.join(sizes)}; "
            f"got {checkpoint['config']!r:.120}"
        )
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"{path}: config n_embd {cfg.n_embd} not divisible by n_head {cfg.n_head}")
    if cfg.gelu not in ("none", "tanh"):
        raise UserError(f"{path}: config gelu must be 'none' or 'tanh', got {cfg.gelu!r:.40}")
    try:
        tok = Tokenizer.from_state(checkpoint["tokenizer"])
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:
        raise UserError(
            f"{path}: tokenizer state is damaged, expected merges, pattern and specials "
            f"({type(e).__name__}: {str(e)[:80]})"
        )
    if tok.vocab_size != cfg.vocab_size:
        raise UserError(
            f"{path}: tokenizer has {tok.vocab_size} tokens but the model expects {cfg.vocab_size}"
        )
    if cfg.n_prefix:  # a prompt-tuned model: its learned prefix is a parameter of its own class
        from extras.peft import PromptTuned

        model = PromptTuned(cfg)
    else:
        model = GPT(cfg)
    try:
        model.load_state_dict(checkpoint["model"])
    except (
        RuntimeError,
        TypeError,
        AttributeError,
    ) as e:  # the first mismatch named under torch's heading
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
        raise UserError(
            f"{path}: weights do not match the config ({lines[min(1, len(lines) - 1)][:150]})"
        )
    return model, tok


def checkpoint_dict(kind, model, tok, optimizer=None, it=0, flags=None, metrics=None, state=None):
    """What a .pt holds: the weights, config and tokenizer (all a later stage needs); for a
    <stage>_last.pt also the optimizer, the RNG and the stage's `state` (its history, its path):
    all --resume needs."""
    return {
        "kind": kind,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "config": asdict(model.config),
        "tokenizer": tok.state(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "iter": it,
        "rng": {"torch": torch.get_rng_state()},
        "args": {  # the flags that are plain values
            k: v
            for k, v in (flags or {}).items()
            if isinstance(v, (int, float, str, bool, type(None)))
        },
        "metrics": metrics or {},
        "state": state,
    }


# ----------------------------------------------------------------------------------------
# 6. chat: rendering with the loss mask, padding


def encode_content(tok, text):
    """A message's text as tokens, with one leading space: in running text a word is a " word"
    token, and a name that opens an answer must be the same token as in the question and the
    prose, or a small model cannot tell they are the same person."""
    return tok.encode(" " + text)


def render_chat(tok, messages):
    """Token ids and the loss mask of a conversation:

        <|endoftext|><|user|>question<|end|><|assistant|>answer<|end|>

    mask[i] = 1 where token i is something the model must learn to write: the content of
    every assistant turn AND its closing <|end|> (so it learns to stop). Everything else
    (roles, user/system text) is context only."""
    role_token = {"system": tok.system, "user": tok.user, "assistant": tok.assistant}
    ids, mask = [tok.endoftext], [0]
    for m in messages:
        body = encode_content(tok, m["content"])  # special-token strings stay plain text
        train = int(m["role"] == "assistant")
        ids += [role_token[m["role"]]] + body + [tok.end]
        mask += [0] + [train] * len(body) + [train]
    return ids, mask


def chat_prompt(tok, messages):
    """Ids that ask the model for the next assistant turn."""
    return render_chat(tok, messages)[0] + [tok.assistant]


def example_tensors(ids, mask):
    """Inputs and shifted targets: position t predicts token t+1, supervised iff mask[t+1]."""
    return torch.tensor(ids[:-1]), torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])


def collate(examples, pad_id):
    """Right-pad to the longest example: inputs with <|pad|>, targets with -1 (causal attention
    never lets a real token see the padding)."""
    T = max(len(x) for x, _ in examples)
    X = torch.full((len(examples), T), pad_id, dtype=torch.long)
    Y = torch.full((len(examples), T), -1, dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        X[i, : len(x)], Y[i, : len(y)] = x, y
    return X, Y


# ----------------------------------------------------------------------------------------
# 7. generation


DECODE_ROWS = 256  # sequences decoded together in generate_batch (bounds the KV cache's memory)


@torch.no_grad()
def generate_batch(
    model, prompts, max_new_tokens, stop, temperature=0.0, generator=None, keep_stop=False
):
    """Answers to many prompts at once (lists of ids), greedy (temperature 0) or sampled. Prompts
    are grouped by length, so no padding (and no position shift) is needed: each row is decoded
    exactly as alone. keep_stop: an answer ends with its stop token (ended, not cut off)."""
    model.eval()
    device = next(model.parameters()).device
    by_len = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    results = [None] * len(prompts)
    for n, idx in sorted(by_len.items()):
        for s in range(0, len(idx), DECODE_ROWS):
            rows = idx[s : s + DECODE_ROWS]
            cache = KVCache(model.config.n_layer)
            hidden = model.hidden(torch.tensor([prompts[i] for i in rows], device=device), cache)
            logits = model.lm_head(hidden[:, -1:])  # (b, 1, V): only the last position is needed
            outs, done = [[] for _ in rows], [False] * len(rows)
            for _ in range(min(max_new_tokens, model.config.block_size - n)):
                if temperature == 0:
                    nxt = logits[:, -1].argmax(-1, keepdim=True).cpu()  # (b, 1)
                else:
                    probs = functional.softmax(
                        logits[:, -1].float() / temperature, dim=-1
                    ).cpu()  # (b, V)
                    nxt = torch.multinomial(probs, 1, generator=generator)  # (b, 1)
                for j, t in enumerate(nxt[:, 0].tolist()):
                    if not done[j]:
                        done[j] = t in stop
                        if keep_stop or not done[j]:
                            outs[j].append(t)
                if all(done):
                    break
                logits, _ = model(nxt.to(device), cache=cache)
            for j, i in enumerate(rows):
                results[i] = outs[j]
    return results


def autocast(device, dtype):
    """Mixed precision: weights and optimizer stay fp32, matmuls run in dtype."""
    return (
        nullcontext()
        if dtype == "float32"
        else torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))
    )


@torch.no_grad()
def mean_loss(model, batches, process):
    """Average next-token loss over fixed batches (tokens weighted equally)."""
    model.eval()
    total, n = 0.0, 0
    for x, y in batches:
        with autocast(process.device, process.dtype):
            _, loss = model(x.to(process.device), y.to(process.device), reduction="sum")
        total += loss.item()
        n += int((y != -1).sum())
    model.train()
    return total / max(n, 1)
