"""
What only some runs of a stage need, imported where its flag is handled:

    join_processes, wrap_ddp, all_reduce, barrier   torchrun: several processes (DDP: NCCL on CUDA, gloo on CPU)
    out_of_time                                      --time-budget: seconds of training, the same step on every process
    resume                                           --resume: a stage continues from its <stage>_last.pt
"""
import os
import time

import torch
from torch import distributed

import nanosft


def join_processes(process):
    """Under torchrun: this process's device (cuda:LOCAL_RANK on GPUs) and the process group."""
    if process.device.type == "cuda":
        process.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(process.device)
    if not distributed.is_initialized():
        distributed.init_process_group(backend="nccl" if process.device.type == "cuda" else "gloo")


def wrap_ddp(model, process):
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(model, device_ids=[process.device.index] if process.device.type == "cuda" else None)


def all_reduce(value, process, op="sum"):
    """A Python number summed (or maxed) over every process."""
    t = torch.tensor([value], dtype=torch.float64, device=process.device)
    distributed.all_reduce(t, op=distributed.ReduceOp.MAX if op == "max" else distributed.ReduceOp.SUM)
    return t.item()


def barrier(process):
    if process.world > 1:
        distributed.barrier()


def out_of_time(t0, budget, process, it):
    """--time-budget: True once `budget` seconds have passed since t0 (on any process: every
    process stops at the same step)."""
    out = time.time() - t0 > budget
    if process.world > 1:
        out = all_reduce(float(out), process, op="max") > 0
    if out:
        process.log(f"time budget of {budget:g}s reached at step {it}")
    return out


def resume(out_dir, stage, model, tok, optimizer):
    """Continue a stage from <stage>_last.pt: weights (in their training form, adapters
    unmerged), optimizer, RNG and step. Returns (step, the stage's saved state)."""
    path = os.path.join(out_dir, f"{stage}_last.pt")
    checkpoint = nanosft.load_checkpoint(path, expect_kind=(stage,))
    try:
        if not torch.equal(checkpoint["tokenizer"]["merges"], tok.state()["merges"]):
            raise RuntimeError("another tokenizer")
        model.load_state_dict(checkpoint.get("train_state") or checkpoint["model"])
    except RuntimeError:
        raise nanosft.UserError(f"{path}: was trained from another model or tokenizer (or other adapter "
                                "flags) than this run's; expected the same --ckpt and flags")
    if checkpoint.get("optimizer"):
        optimizer.load_state_dict(checkpoint["optimizer"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    return checkpoint["iter"], checkpoint.get("state") or {}
