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

import torch

import nanosft
from conftest import ROOT, SAMPLE_TEXT

TINY = ["--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block-size", "32",
        "--vocab-size", "300", "--max-iters", "5", "--batch-size", "4", "--eval-interval", "5",
        "--warmup", "2", "--log-interval", "1", "--device", "cpu", "--dtype", "float32"]


def launch(cmd, out_dir, data):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)  # never inherit a surrounding torchrun's process group
    return subprocess.Popen(cmd + ["pretrain.py", "--data", data, "--out-dir", out_dir] + TINY,
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_two_gloo_ranks_equal_one_process(tmp_path):
    data = tmp_path / "text.txt"
    data.write_text(SAMPLE_TEXT[:20_000], encoding="utf-8")
    one, two = tmp_path / "one", tmp_path / "two"
    # both runs at once: the test costs the slower of the two, not their sum
    procs = [launch([sys.executable], str(one), str(data)),
             # --standalone: a private rendezvous on a free localhost port
             launch([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc_per_node", "2"], str(two), str(data))]
    logs = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        logs.append(out)
        assert p.returncode == 0, out[-3000:]

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
    init = nanosft.GPT(nanosft.GPTConfig.from_dict(a["config"])).state_dict()
    assert max((a["model"][k] - init[k]).abs().max() for k in init) > 1e-3
    # ... and the logged loss is the whole step's, not rank 0's half of it
    losses = [[float(x) for x in re.findall(r"\| loss ([0-9.]+) \|", log)] for log in logs]
    assert len(losses[0]) == len(losses[1]) == 5
    for x, y in zip(*losses):
        assert abs(x - y) < 1e-3, (losses[0], losses[1])
