"""Several processes: two gloo ranks under torchrun must train exactly the model that one
process trains on the same global batch.

Why this holds: pretrain.py gives each rank every other row of the step's batch, the loss
is a SUM over tokens scaled by world / global token count, and DDP averages gradients
over ranks, so both runs step with the gradient of the same mean loss. Only the order of
the floating-point additions differs (two half-sums all-reduced vs one sum), hence a
tolerance of 1e-5 on the weights after a few AdamW steps, not bit equality."""
import os
import re
import subprocess
import sys

import pytest
import torch

import nanosft
from conftest import ROOT, SAMPLE_TEXT

TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32",
        "--vocab-size", "300", "--max-iters", "5", "--batch-size", "4", "--eval-interval", "5",
        "--warmup", "2", "--log-interval", "1", "--device", "cpu", "--dtype", "float32"]
SFT_FLAGS = ["--max-iters", "4", "--batch-size", "4", "--eval-interval", "4", "--warmup", "1", "--log-interval", "1",
             "--device", "cpu", "--dtype", "float32"]
# Both stages in one process (one torchrun launch costs seconds): pre-training, then SFT on its checkpoint.
DRIVER = """
import os, sys
sys.path.insert(0, {root!r})
import finetune, pretrain, torch
out, text, sft = sys.argv[1:4]
pretrain.main(["--data", text, "--out-dir", out] + {tiny!r})
if torch.distributed.is_initialized():
    torch.distributed.barrier()  # rank 0 has written pretrain.pt
if os.environ.get("RANK", "0") == "0":
    print("=== sft", flush=True)
finetune.main(["--ckpt", out + "/pretrain.pt", "--data", sft, "--out-dir", out + "/sft"] + {sft_flags!r})
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process and two gloo processes (torchrun), each pre-training then fine-tuning:
    {"one" | "two": (out dir, log)}."""
    d = tmp_path_factory.mktemp("ddp")
    text, sft, driver = d / "text.txt", d / "sft.jsonl", d / "driver.py"
    text.write_text(SAMPLE_TEXT[:20_000], encoding="utf-8")
    sft.write_text("".join(f'{{"prompt": "Where is thing {i}?", "response": "Thing {i} is in box {i % 3}."}}\n'
                           for i in range(16)), encoding="utf-8")
    driver.write_text(DRIVER.format(root=ROOT, tiny=TINY, sft_flags=SFT_FLAGS), encoding="utf-8")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # never inherit a surrounding torchrun's process group
    # both runs at once: the test costs the slower of the two, not their sum; --standalone: a
    # private rendezvous on a free localhost port
    launchers = {"one": [sys.executable],
                 "two": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]}
    procs = {name: subprocess.Popen(cmd + [str(driver), str(d / name), str(text), str(sft)], cwd=ROOT, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cmd in launchers.items()}
    out = {}
    for name, p in procs.items():
        log, _ = p.communicate(timeout=180)
        assert p.returncode == 0, log[-3000:]
        out[name] = (d / name, log)
    return out


def logged_losses(log):
    return [float(x) for x in re.findall(r"\| loss ([0-9.]+) \|", log)]


def test_two_gloo_ranks_equal_one_process(runs):
    (one, log_one), (two, log_two) = runs["one"], runs["two"]
    logs = [log_one.split("=== sft")[0], log_two.split("=== sft")[0]]
    a = torch.load(one / "pretrain.pt", weights_only=True)
    b = torch.load(two / "pretrain.pt", weights_only=True)
    assert a["iter"] == b["iter"] == 5
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=1e-5, msg=k)
    # Adam's update is nearly blind to the gradient's scale (only clipping and eps see it), so
    # a gradient off by the world size barely moves the weights; Adam's first moment, a
    # running mean of the gradients, shows it directly.
    # (the optimizer's state is in the resume file, pretrain_last.pt, written at the last eval)
    la = torch.load(one / "pretrain_last.pt", weights_only=True)
    lb = torch.load(two / "pretrain_last.pt", weights_only=True)
    assert la["iter"] == lb["iter"] == 5
    sa, sb = la["optimizer"]["state"], lb["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        torch.testing.assert_close(sb[i]["exp_avg"], sa[i]["exp_avg"], rtol=1e-4, atol=1e-6)
    # the weights moved, so the equality is not just the shared initialisation ...
    torch.manual_seed(1337)  # pretrain.py's default --seed, set right before building the GPT
    init = nanosft.GPT(nanosft.GPTConfig(**a["config"])).state_dict()
    assert max((a["model"][k] - init[k]).abs().max() for k in init) > 1e-3
    # ... and the logged loss is the whole step's, not rank 0's half of it
    losses = [logged_losses(log) for log in logs]
    assert len(losses[0]) == len(losses[1]) == 5
    for x, y in zip(*losses):
        assert abs(x - y) < 1e-3, (losses[0], losses[1])


def test_sft_shares_each_step_between_the_processes():
    """Each process trains on its own share of the step's examples (rank r: every world-th one),
    the shares together are the step's examples, and every process divides by the WHOLE
    step's supervised tokens."""
    import finetune
    tok = nanosft.train_tokenizer(SAMPLE_TEXT[:20_000], 300)
    examples = [nanosft.example_tensors(*nanosft.render_chat(tok, [
        {"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "Yes. " * (1 + i % 4)}]))
        for i in range(16)]
    chosen = finetune.step_order(16, 4, seed=3, it=5, lengths=[len(x) for x, _ in examples])
    supervised = sum(int((examples[i][1] != -1).sum()) for i in chosen)
    rows = []
    for rank in (0, 1):
        process = nanosft.Process(torch.device("cpu"), "float32", rank=rank, world=2)
        batches, n = finetune.step_batches(examples, 5, batch_size=4, seed=3, grad_accum=1, pad=tok.pad, process=process)
        assert n == supervised  # the step's, not this process's
        [(X, _)] = batches
        assert X.size(0) == 2  # half of the 4
        rows += [tuple(x[x != tok.pad].tolist()) for x in X]
    whole = [tuple(examples[i][0].tolist()) for i in chosen]
    assert sorted(rows) == sorted(whole)




def test_sft_under_two_gloo_ranks_equals_one_process(runs):
    """finetune.py under torchrun (2 gloo processes) trains the model that one process trains."""
    (one, log_one), (two, log_two) = runs["one"], runs["two"]
    a = torch.load(one / "sft" / "sft.pt", weights_only=True)
    b = torch.load(two / "sft" / "sft.pt", weights_only=True)
    start = torch.load(one / "pretrain.pt", weights_only=True)["model"]
    assert a["iter"] == b["iter"] == 4
    for k in a["model"]:
        torch.testing.assert_close(b["model"][k], a["model"][k], rtol=0, atol=1e-5, msg=k)
    assert max((a["model"][k] - start[k]).abs().max() for k in a["model"]) > 1e-3  # it trained
    sa = torch.load(one / "sft" / "sft_last.pt", weights_only=True)["optimizer"]["state"]
    sb = torch.load(two / "sft" / "sft_last.pt", weights_only=True)["optimizer"]["state"]
    for i in sa:  # Adam's first moment shows a gradient off by the world size (the weights barely do)
        torch.testing.assert_close(sb[i]["exp_avg"], sa[i]["exp_avg"], rtol=1e-4, atol=1e-6)
    losses = [logged_losses(log.split("=== sft")[1]) for log in (log_one, log_two)]
    assert len(losses[0]) == len(losses[1]) == 4 and all(abs(x - y) < 1e-3 for x, y in zip(*losses)), losses
