import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(2)

import nanosft

SAMPLE_TEXT = open(os.path.join(ROOT, "data", "world_corpus.txt"), encoding="utf-8").read()[:60_000]


@pytest.fixture
def one_thread():
    """For tiny models one thread beats two (synchronising costs more than the math)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tok():
    return nanosft.train_tokenizer(SAMPLE_TEXT, 600)


def tiny_gpt(tok, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(block_size=64, vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32)
    cfg.update(kw)
    return nanosft.GPT(nanosft.GPTConfig(**cfg))


def run_script(*args, cwd=ROOT, timeout=120, env=None):
    """Run a stage script in a fresh process; returns CompletedProcess."""
    e = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE", PYTHONHASHSEED="0")
    e.update(env or {})
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=e)
