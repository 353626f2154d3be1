"""The optimisation step of every stage, checked against what it should be, never against a
second run of the same code (a mistake shared by two runs cancels out):

    the learning rate      hand-computed values of warmup, peak, cosine decay and floor, and
                           every parameter group's rate after real steps of each stage
    clipping               a step whose gradient norm is over 1.0 steps with a norm of exactly 1.0
    --time-budget          seconds, not minutes
    the non-finite stop    +inf, -inf and NaN each stop the run before the step is taken
    fp16                   the loss scale is on, its gradient is the fp32 one, overflow skips

Each stage runs in this process on a tiny model (about a second), reading its own data file,
so no world evaluation runs. What a run did is read off the files it wrote (the optimizer's
state in <stage>_last.pt) or off torch's own classes, so the checks keep their meaning
wherever the stage's code lives."""
import copy
import json
import math
import os
import random

import pytest
import torch

import dpo
import finetune
import nanosft
import pretrain

ARCH = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "64", "--vocab-size", "300"]
COMMON = ["--batch-size", "4", "--dtype", "float32", "--device", "cpu", "--log-interval", "1000"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the scripts' set-up then leaves torch's threads alone
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A plain-text corpus, a tiny pre-trained checkpoint, SFT records and preference pairs."""
    d = tmp_path_factory.mktemp("steps")
    rng = random.Random(0)
    words = "the cat sat on a mat while Ada Stone was born in Lisbon and she likes to paint blue boats".split()
    corpus = d / "corpus.txt"
    corpus.write_text("".join(" ".join(rng.choice(words) for _ in range(12)) + ".\n" for _ in range(200)),
                      encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        pretrain.main(["--data", str(corpus), "--out-dir", str(d / "pre"), "--max-iters", "2",
                       "--eval-interval", "2", *ARCH, *COMMON])
    return {"corpus": str(corpus), "pre": str(d / "pre" / "pretrain.pt"),
            "sft": write_jsonl(d / "sft.jsonl", [{"prompt": f"Where was person {i} born?",
                                                  "response": f"Person {i} was born in town {i % 5}."}
                                                 for i in range(24)]),
            "pairs": write_jsonl(d / "pairs.jsonl", [{"prompt": f"Say something about {i}.",
                                                      "chosen": f"The number {i} is fine. Hope this helps!",
                                                      "rejected": f"{i} {i} {i} {i} {i} {i} no"}
                                                     for i in range(24)])}


def stage_argv(stage, files, out, *extra):
    """A stage's command line on the tiny model and the files above."""
    if stage == "pretrain":
        return pretrain.main, ["--data", files["corpus"], "--out-dir", out, *ARCH, *COMMON, *extra]
    common = COMMON
    if stage == "sft":
        return finetune.main, ["--ckpt", files["pre"], "--data", files["sft"], "--out-dir", out, *common, *extra]
    if stage == "sft-prompt":  # prompt tuning: its prefix is a parameter group of its own kind
        return finetune.main, ["--ckpt", files["pre"], "--data", files["sft"], "--out-dir", out,
                               "--prompt-tokens", "2", *common, *extra]
    return dpo.main, ["--ckpt", files["pre"], "--data", files["pairs"], "--out-dir", out, *common, *extra]


def resume_files(monkeypatch):
    """Copies of every <stage>_last.pt the run writes, in order (each evaluation overwrites the file)."""
    real_save, saved = nanosft.save_checkpoint, []

    def save(path, obj):
        if os.path.basename(path).endswith("_last.pt"):
            saved.append(copy.deepcopy(obj))
        real_save(path, obj)

    monkeypatch.setattr(nanosft, "save_checkpoint", save)
    return saved


# ---------------------------------------------------------------------------------- the learning rate

def test_lr_schedule_takes_the_values_of_warmup_peak_cosine_and_floor():
    """Peak 1.0, 10 warmup steps, 110 steps: warmup climbs from 1/10 (never 0) to the peak, the
    cosine halves the way to the floor at mid-decay, and the floor is 10% of the peak."""
    lr = lambda it: nanosft.lr_at(it, 1.0, 10, 110)
    assert lr(0) == pytest.approx(0.1)    # the first step already moves the weights
    assert lr(4) == pytest.approx(0.5)
    assert lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)   # the peak, where the decay starts
    assert lr(35) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)  # a quarter of the way
    assert lr(60) == pytest.approx(0.55)  # halfway: the mean of peak and floor
    assert lr(85) == pytest.approx(0.1 + 0.9 * (1 + math.cos(3 * math.pi / 4)) / 2)
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)  # the floor, and it stays there
    assert all(lr(i) >= lr(i + 1) for i in range(10, 120))  # never climbs back after the peak


# peak lr 1e-3, 2 warmup steps, 5 steps: the rate of steps 0 and 4, written out by hand
PEAK, EXPECTED = 1e-3, {0: 0.5e-3, 4: 1e-3 * (0.1 + 0.9 * (1 + math.cos(math.pi * 2 / 3)) / 2)}  # 0.325e-3


@pytest.mark.parametrize("stage", ["pretrain", "sft", "sft-prompt", "dpo"])
def test_every_parameter_group_steps_at_the_scheduled_rate_and_with_the_clipped_gradient(stage, files, tmp_path,
                                                                                         monkeypatch):
    """After real steps of each stage, read off the optimizer's saved state:
    - every parameter group (matrices, and biases / LayerNorm gains / a prompt-tuning prefix)
      ran at the scheduled rate: step 0 at half the peak (warmup), step 4 in the cosine decay;
    - the first step's gradient was clipped to --grad-clip's norm: AdamW's first moment after one
      step is (1 - beta1) x the gradient it was given, and these runs start with a norm well over
      0.05 (unclipped: pretrain 0.86, SFT 1.13, prompt tuning 0.67, DPO 634)."""
    saved = resume_files(monkeypatch)
    main, argv = stage_argv(stage, files, str(tmp_path), "--lr", str(PEAK), "--warmup", "2", "--max-iters", "5",
                            "--eval-interval", "1", "--grad-clip", "0.05")
    main(argv)
    by_step = {c["iter"]: c["optimizer"] for c in saved}
    assert sorted(by_step) == [1, 2, 3, 4, 5]
    for after, step in ((1, 0), (5, 4)):
        groups = by_step[after]["param_groups"]
        assert len(groups) == 2 and all(g["params"] for g in groups)
        for g in groups:
            assert g["lr"] == pytest.approx(EXPECTED[step], rel=1e-9), (stage, step, g["weight_decay"])
    first = by_step[1]
    beta1 = first["param_groups"][0]["betas"][0]
    grad_norm = torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(s["exp_avg"] / (1 - beta1)) for s in first["state"].values()]))
    assert grad_norm.item() == pytest.approx(0.05, rel=1e-4), stage


# ---------------------------------------------------------------------------------- the clock

def test_time_budget_is_seconds(files, tmp_path):
    """--time-budget 0.5 ends a run of a million steps after about half a second of training
    (read as minutes it would train for 30 s)."""
    main, argv = stage_argv("pretrain", files, str(tmp_path), "--time-budget", "0.5", "--max-iters", "1000000",
                            "--eval-interval", "1000000")
    main(argv)
    report = json.load(open(tmp_path / "pretrain.json"))
    assert 0 < report["steps"] < 1_000_000
    assert 0.5 <= report["train_seconds"] < 8.0, report["train_seconds"]


# ---------------------------------------------------------------------------------- a non-finite loss

@pytest.mark.parametrize("stage,bad", [("pretrain", "inf"), ("pretrain", "-inf"), ("pretrain", "nan"),
                                       ("sft", "inf"), ("dpo", "-inf")])
def test_a_non_finite_loss_stops_before_its_step(stage, bad, files, tmp_path, monkeypatch, capsys):
    """The 3rd training step's loss is made +inf, -inf or NaN: the run stops there with one line
    and exit code 2, before the optimizer steps on it; the checkpoint of step 2 is the last one
    written and its weights are finite."""
    real_forward, calls = nanosft.GPT.forward, [0]
    per_step = {"pretrain": 1, "sft": 1, "dpo": 1}[stage]  # forwards with a loss (or grad) per step

    def forward(self, idx, targets=None, **kw):
        logits, loss = real_forward(self, idx, targets, **kw)
        if self.training and torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] > 2 * per_step:  # from the 3rd step on
                if loss is not None:
                    loss = loss * float(bad) if bad != "-inf" else loss - float("inf")
                else:  # dpo: log-probs come from the logits
                    logits = logits + (float("nan") if bad == "nan" else float(bad))
        return logits, loss

    monkeypatch.setattr(nanosft.GPT, "forward", forward)
    saved = resume_files(monkeypatch)
    main, argv = stage_argv(stage, files, str(tmp_path), "--max-iters", "6", "--eval-interval", "2")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        nanosft.cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "non-finite loss at step 2" in err, err  # steps count from 0: the 3rd step is step 2
    assert [c["iter"] for c in saved] == [2]
    assert all(torch.isfinite(v).all() for v in saved[0]["model"].values())


# ---------------------------------------------------------------------------------- fp16

def test_fp16_steps_with_the_loss_scale_and_the_fp32_gradient(files, tmp_path, monkeypatch):
    """--dtype float16 (the auto dtype on GPUs without bf16) scales the gradient at the logits
    (extras/fp16.py) and unscales every parameter's: the first step's gradient equals the fp32
    run's to fp16 precision, not 2**16 times smaller or larger; an fp32 run scales nothing."""
    from extras import fp16

    scaled = []
    real = fp16.LossScaling.scale_logits

    def scale_logits(self, module, inputs, logits):
        scaled.append(logits.requires_grad)
        return real(self, module, inputs, logits)

    monkeypatch.setattr(fp16.LossScaling, "scale_logits", scale_logits)
    moments = {}
    for dtype in ("float32", "float16"):
        saved = resume_files(monkeypatch)
        main, argv = stage_argv("pretrain", files, str(tmp_path / dtype), "--max-iters", "1", "--eval-interval", "1",
                                "--dtype", dtype, "--lr", "1e-4")
        main(argv)
        moments[dtype] = saved[-1]["optimizer"]["state"]
        assert any(scaled) == (dtype == "float16"), dtype
        scaled.clear()
    for i, s in moments["float32"].items():
        torch.testing.assert_close(moments["float16"][i]["exp_avg"], s["exp_avg"], rtol=0.05, atol=2e-4)


def test_fp16_loss_scaling_skips_an_overflowed_step_halves_and_grows_the_scale():
    """The rule, step by step: the gradients arrive unscaled (equal to an unscaled model's); a
    step with an inf gradient leaves the weights alone and halves the scale; growth_interval
    good steps in a row double it."""
    from extras import fp16

    torch.manual_seed(0)
    cfg = nanosft.GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16)
    model, plain = nanosft.GPT(cfg), nanosft.GPT(cfg)
    plain.load_state_dict(model.state_dict())
    opt = nanosft.configure_optimizer(model, 1e-2)
    scaling = fp16.LossScaling(model, opt, scale=1024.0, growth_interval=2)
    X = torch.randint(0, 50, (2, 16))
    for m in (model, plain):
        m(X, X)[1].backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.wte.weight.grad[0, 0] = float("inf")
    opt.step()
    assert scaling.scale == 512.0 and scaling.skipped == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    for k in (1, 2):
        opt.zero_grad()
        model(X, X)[1].backward()
        opt.step()
        assert scaling.scale == (512.0 if k == 1 else 1024.0)
    assert not torch.equal(model.wte.weight, before["wte.weight"])


