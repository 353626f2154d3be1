"""
--replay for finetune.py: mix pre-training text into every SFT step, a counter to
forgetting (docs/forgetting.md). The windows are supervised on every token and join the
step's micro-batches; their tokens join the step's count, so the loss stays one mean.
"""
import torch

import nanosft
from data import corpus


def train_split(pretrain_stream, file, block_size):
    """The pre-training text's train split as one token stream (the one pre-training used).
    pretrain_stream: the text's tokens, None when the file is missing."""
    if pretrain_stream is None:
        raise nanosft.UserError(f"--replay needs the pre-training text ({file}), which is missing")
    return corpus.split_corpus(pretrain_stream, block_size)[0]


def sampler(pretrain_stream, file, block_size, ratio, seed, process):
    """replay(it, supervised) -> (this process's windows, the tokens of all processes'):
    `ratio` pre-training tokens per supervised SFT token of step `it` (finetune.step_batches)."""
    tokens = train_split(pretrain_stream, file, block_size)
    return lambda it, supervised: replay_windows(tokens, ratio * supervised, block_size=block_size, seed=seed, it=it,
                                                 rank=process.rank, world=process.world)


def replay_windows(tokens, n_tokens, block_size, seed, it, rank=0, world=1):
    """--replay at step `it`: about n_tokens of pre-training text (at least one window), as
    windows of block_size + 1 tokens at random starts (a stream per (seed, step)), every
    token supervised. Returns this process's share as [(x, y)] or [], and the tokens of all
    processes' windows."""
    n = max(1, round(n_tokens / block_size))
    g = torch.Generator().manual_seed(seed * 7_000_003 + it)  # 7,000,003 is prime
    starts = torch.randint(len(tokens) - block_size - 1, (n,), generator=g)[rank::world].tolist()
    if not starts:
        return [], n * block_size
    windows = torch.stack([tokens[s:s + block_size + 1] for s in starts])
    return [(windows[:, :-1], windows[:, 1:])], n * block_size
