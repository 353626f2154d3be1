"""
Running a stage: what every stage needs to run but the lesson does not name. Each stage's
main() imports it in one line; nothing here changes what a step computes.

    ArgumentParser, add_common_args   flags: a bad one is one line and exit code 2; the shared ones
    setup_runtime -> Runtime          device and dtype from what the hardware can do; torchrun's processes
    Steps                             a stage's clock: the lr schedule, --time-budget, the log line, when to evaluate
    all_reduce, wrap_ddp, barrier     several processes (DDP: NCCL on CUDA, gloo on CPU)
    resume                            --resume: a stage continues from its <stage>_last.pt
"""
import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import distributed

import nanosft
from nanosft import UserError
from extras.cpu import cpu_has_native_bf16


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line and exit code 2 like every other bad input (not
    the whole usage), and values argparse's types cannot rule out are checked at parse time."""

    def __init__(self, description):
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message):
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    def parse_args(self, argv=None):
        args = super().parse_args(argv)
        flags = vars(args)
        for name in ("max_iters", "batch_size", "grad_accum", "eval_interval", "block_size", "n_layer",
                     "n_head", "n_embd", "vocab_size", "max_new_tokens", "num_samples"):
            if flags.get(name) is not None and flags[name] <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {flags[name]}")
        for name in ("lr", "time_budget", "beta", "grad_clip"):
            v = flags.get(name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {v}")
        for name in ("rpo_alpha", "min_margin", "lora_rank", "oft_block", "prompt_tokens", "prompt_mlp", "replay"):
            v = flags.get(name)
            if v is not None and not (math.isfinite(v) and v >= 0):
                raise UserError(f"--{name.replace('_', '-')} must be a number >= 0, got {v}")
        smoothing = flags.get("label_smoothing")  # dpo.py: conservative DPO flips a label with this probability
        if smoothing is not None and (not 0 <= smoothing < 0.5 or (smoothing and flags["loss"] != "sigmoid")):
            raise UserError(f"--label-smoothing (the sigmoid loss only) must be in [0, 0.5), got {smoothing} "
                            f"with --loss {flags['loss']}")
        world = int(os.environ.get("WORLD_SIZE", 1))  # processes, under torchrun
        if flags.get("grad_accum") and flags.get("batch_size") and flags["batch_size"] % (world * flags["grad_accum"]):
            raise UserError(f"--batch-size {flags['batch_size']} must be divisible by processes x --grad-accum "
                            f"({world} x {flags['grad_accum']})")
        if flags.get("vocab_size") and flags["vocab_size"] < 256 + len(nanosft.SPECIALS):
            raise UserError(f"--vocab-size must be at least {256 + len(nanosft.SPECIALS)} (256 bytes + "
                            f"{len(nanosft.SPECIALS)} special tokens), got {flags['vocab_size']}")
        if flags.get("n_embd") and flags.get("n_head") and flags["n_embd"] % flags["n_head"]:
            raise UserError(f"--n-embd ({flags['n_embd']}) must be divisible by --n-head ({flags['n_head']})")
        out_dir = flags.get("out_dir")
        if out_dir and os.path.exists(out_dir) and not os.path.isdir(out_dir):  # now, not at the first save
            raise UserError(f"--out-dir {out_dir}: exists and is not a directory")
        return args


def add_common_args(ap, out_dir="out"):
    """The flags every stage shares, under two headings of --help: training, and running."""
    train = ap.add_argument_group("training (every stage)")
    train.add_argument("--out-dir", default=out_dir, help="where checkpoints, JSON and plots go")
    train.add_argument("--max-iters", type=int, help="optimizer steps")
    train.add_argument("--batch-size", type=int, help="sequences (or pairs) per optimizer step")
    train.add_argument("--lr", type=float, help="peak learning rate")
    train.add_argument("--warmup", type=int, help="steps of linear warmup before the cosine decay")
    train.add_argument("--grad-clip", type=float, default=1.0, help="clip the step's gradient to this norm")
    train.add_argument("--eval-interval", type=int, help="evaluate (and checkpoint) every N steps")
    train.add_argument("--log-interval", type=int, help="print the loss every N steps")
    train.add_argument("--seed", type=int, default=1337)
    run = ap.add_argument_group("running: hardware, processes, time, resume")
    run.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    run.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                     help="auto: bf16 where the hardware runs it natively, else fp32 (fp16 on old GPUs)")
    run.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    run.add_argument("--time-budget", type=float, default=None,
                     help="stop after this many seconds of training (then evaluate and save)")
    run.add_argument("--resume", action="store_true", help="continue from this stage's checkpoint in --out-dir")
    run.add_argument("--compile", action="store_true", help="torch.compile the model")


def pick_device(name="auto"):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def pick_dtype(device, name="auto"):
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if device.type == "cpu" and cpu_has_native_bf16() else "float32"


@dataclass
class Runtime:
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


def setup_runtime(device="auto", dtype="auto"):
    """Device, dtype and (under torchrun) the process group."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        if not distributed.is_initialized():
            distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dtype = pick_dtype(device, dtype)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(device, dtype, rank, world)


class Steps:
    """The bookkeeping around a stage's steps; the step itself (forward, backward, clip,
    optimizer.step) is written out in each stage file:

        steps = Steps(process, model, optimizer, vars(args), start_iter)
        for it in steps:                          # sets the lr; stops early at --time-budget
            ...                                   # forward and backward of every micro-batch
            step_loss = steps.total(step_loss)    # over every process; stops on a non-finite loss
            ...                                   # clip, optimizer.step(), zero_grad
            if steps.log(step_loss / count, tokens):  # True every eval_interval steps
                on_eval(it + 1)
        on_eval(steps.it)                         # and at the end

    flags: max_iters, lr (the peak), warmup, eval_interval, log_interval, time_budget (s or
    None). `scaler` scales fp16 losses on the run's device (else a no-op); `params`: the trained ones."""

    def __init__(self, process, model, optimizer, flags, start_iter=0):
        self.process, self.optimizer, self.start = process, optimizer, start_iter
        self.max_iters, self.peak_lr, self.warmup = flags["max_iters"], flags["lr"], flags["warmup"]
        self.eval_interval, self.log_interval = flags["eval_interval"], flags["log_interval"]
        self.time_budget = flags["time_budget"]
        self.scaler = torch.amp.GradScaler(process.device.type, enabled=(process.dtype == "float16"))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.it, self.lr, self.tokens, self.t0, self.t_end = start_iter, 0.0, 0, time.time(), None

    def __iter__(self):
        while self.it < self.max_iters and not self.out_of_time():
            self.lr = nanosft.lr_at(self.it, self.peak_lr, self.warmup, self.max_iters)
            for g in self.optimizer.param_groups:
                g["lr"] = self.lr
            yield self.it
        self.t_end = time.time()  # the training clock stops before the final evaluation

    def out_of_time(self):
        out = bool(self.time_budget) and time.time() - self.t0 > self.time_budget
        if self.process.world > 1 and self.time_budget:  # every rank stops at the same step
            out = all_reduce(float(out), self.process, op="max") > 0
        if out:
            self.process.log(f"time budget of {self.time_budget:.0f}s reached at step {self.it}")
        return out

    def total(self, step_loss):
        """The step's summed loss over every process; a NaN stops the run before the step is
        taken, so the last checkpoint on disk is a good one."""
        if self.process.world > 1:
            step_loss = all_reduce(step_loss, self.process)
        if not math.isfinite(step_loss):
            raise UserError(f"non-finite loss at step {self.it} (lr {self.lr:.2e}); stopped, the last "
                            f"checkpoint on disk is the last good one. Try a lower --lr")
        return step_loss

    def log(self, loss, tokens):
        """Count the step (tokens: this process's), print the log line on the log cadence;
        True when an evaluation is due (not at the last step: the caller evaluates then)."""
        self.it, self.tokens = self.it + 1, self.tokens + tokens
        it, end = self.it, self.max_iters
        if it % max(1, self.log_interval) == 0 or it == end:
            dt = time.time() - self.t0
            self.process.log(f"step {it:5d}/{end} | loss {loss:.4f} | lr {self.lr:.2e} | "
                        f"{self.tokens_per_sec():,.0f} tok/s | eta {dt / (it - self.start) * (end - it):.0f}s")
        return it % self.eval_interval == 0 and it < end

    def seconds(self):
        return (self.t_end or time.time()) - self.t0

    def tokens_per_sec(self):
        return self.tokens * self.process.world / max(self.seconds(), 1e-9)


def all_reduce(value, process, op="sum"):
    """A Python number summed (or maxed) over every process."""
    t = torch.tensor([value], dtype=torch.float64, device=process.device)
    distributed.all_reduce(t, op=distributed.ReduceOp.MAX if op == "max" else distributed.ReduceOp.SUM)
    return t.item()


def wrap_ddp(model, process):
    if process.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[process.device.index] if process.device.type == "cuda" else None)


def barrier(process):
    if process.world > 1:
        distributed.barrier()


def resume(out_dir, stage, model, tok, optimizer):
    """Continue a stage from <stage>_last.pt: weights (in their training form, adapters
    unmerged), optimizer, RNG and step. Returns (step, the stage's saved state)."""
    path = nanosft.last_path(out_dir, stage)
    checkpoint = nanosft.load_checkpoint(path, expect_kind=(stage,))
    try:
        if not torch.equal(checkpoint["tokenizer"]["merges"], tok.state()["merges"]):
            raise RuntimeError("another tokenizer")
        model.load_state_dict(checkpoint.get("train_state") or checkpoint["model"])
    except RuntimeError:
        raise UserError(f"{path}: was trained from another model or tokenizer (or other adapter "
                        "flags) than this run's; expected the same --ckpt and flags")
    if checkpoint.get("optimizer"):
        optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    return checkpoint["iter"], checkpoint.get("state") or {}
