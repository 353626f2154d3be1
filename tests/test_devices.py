"""The Mac (MPS) and CUDA paths, checked from a CPU with the device's availability
monkeypatched: what cannot run is one clear line, never a crash deep in torch. MPS itself has
not run on hardware here (docs/known_gaps.md)."""
import ast
import os
import subprocess
import sys

import pytest
import torch

import nanosft
from conftest import ROOT, tiny_gpt


def test_a_device_that_is_not_there_is_one_line_and_exit_2(tmp_path):
    if torch.backends.mps.is_available() or torch.cuda.is_available():
        pytest.skip("this machine has the device")
    for device, says in (("mps", "MPS is not available"), ("cuda", "CUDA is not available")):
        r = subprocess.run([sys.executable, "pretrain.py", "--device", device, "--out-dir", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and says in r.stderr, r.stderr
        assert not os.listdir(tmp_path)  # refused before anything is written


@pytest.mark.parametrize("macos14", [False, True])
def test_mps_dtypes_follow_what_the_os_supports(monkeypatch, macos14):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos14 or major < 14)
    mps = nanosft.pick_device("mps")
    assert mps.type == "mps"
    assert nanosft.pick_dtype(mps, "auto") == "float32" and nanosft.pick_dtype(mps, "float32") == "float32"
    with pytest.raises(nanosft.UserError, match="fp16 needs CUDA"):  # its loss scaling is CUDA's
        nanosft.pick_dtype(mps, "float16")
    if macos14:
        assert nanosft.pick_dtype(mps, "bfloat16") == "bfloat16"
    else:
        with pytest.raises(nanosft.UserError, match="macOS 14"):
            nanosft.pick_dtype(mps, "bfloat16")


def test_cuda_dtype_is_bf16_where_supported_else_fp16(monkeypatch):
    cuda = torch.device("cuda")
    for supported, expect in ((True, "bfloat16"), (False, "float16")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert nanosft.pick_dtype(cuda, "auto") == expect


def test_a_bf16_checkpoint_loads_on_the_cpu_as_fp32(tok, tmp_path):
    """Weights saved in bf16 (a GPU run's, or a GPT-2 in bf16) load to the CPU first and are
    upcast into the model's fp32 parameters: the same values, trainable."""
    model = tiny_gpt(tok)
    checkpoint = nanosft.checkpoint_dict("sft", model, tok)
    checkpoint["model"] = {k: v.to(torch.bfloat16) for k, v in checkpoint["model"].items()}
    torch.save(checkpoint, tmp_path / "bf16.pt")
    loaded, _ = nanosft.model_from_checkpoint(nanosft.load_checkpoint(str(tmp_path / "bf16.pt")))
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32 and v.device.type == "cpu", k
        assert torch.equal(v, checkpoint["model"][k].float()), k


CUDA_ONLY_ALLOWED = {"is_available", "is_bf16_supported", "set_device"}


def test_no_unguarded_cuda_only_call():
    """Every torch.cuda call in the code is one of the few that are safe (is_available) or
    sits under a check that the device is CUDA: found by reading the code, not by hope."""
    files = [os.path.join(d, f) for d in (ROOT, os.path.join(ROOT, "extras"), os.path.join(ROOT, "data"))
             for f in os.listdir(d) if f.endswith(".py")]
    used = {}
    for path in files:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "cuda" and isinstance(node.value.value, ast.Name)
                    and node.value.value.id == "torch"):
                used.setdefault(node.attr, []).append(f"{os.path.basename(path)}:{node.lineno}")
    assert set(used) <= CUDA_ONLY_ALLOWED, used
    # the two that need a GPU are read under a CUDA check
    src = open(os.path.join(ROOT, "nanosft.py"), encoding="utf-8").read()
    assert 'if device.type == "cuda":\n        return "bfloat16" if torch.cuda.is_bf16_supported()' in src
    src = open(os.path.join(ROOT, "extras", "runtime.py"), encoding="utf-8").read()
    assert src.split("torch.cuda.set_device")[0].splitlines()[-3].strip() == 'if process.device.type == "cuda":'


def test_the_fp16_loss_scale_is_set_up_by_every_stage_and_only_for_fp16():
    """Each stage's loop is backward / clip / optimizer.step() whatever the dtype; fp16 runs
    (and only they) set up extras/fp16.py's loss scaling on the model and its optimizer first."""
    for stage in ("pretrain.py", "finetune.py", "dpo.py"):
        src = open(os.path.join(ROOT, stage), encoding="utf-8").read()
        assert 'if process.dtype == "float16":' in src and "fp16.LossScaling(model, optimizer)" in src, stage
        assert "GradScaler" not in src and "optimizer.step()" in src, stage


