"""Rewinding by interpolation: alpha on the line (1 - alpha) pre-trained + alpha final is
chosen on the DEV half alone; the test half's answers are only reported."""
import pytest
import torch

import nanosft
from extras import flags
import finetune
from extras import rewind
from conftest import tiny_gpt


class LineEvaluator:
    """A stand-in for finetune.SFTEvaluator on weights that lie on the line pre-trained ->
    final: it reads alpha back from ln_f.bias (0 pre-trained, 1 final). Dev accuracy peaks at
    alpha 0.8, retention loss grows with alpha, and the TEST half's accuracy is `test(alpha)`."""

    def __init__(self, test):
        self.process, self.test, self.calls = nanosft.Process(torch.device("cpu"), "float32"), test, 0

    def __call__(self, model, full=False):
        self.calls += 1
        a = round(model.ln_f.bias.mean().item(), 4)
        return {"dev": 1 - (a - 0.8) ** 2, "dev_loss": 1.0, "heldout": self.test(a), "degenerate": 0.0,
                "retention": 3.0 + a, "probe": 1 - a / 2,
                "heldout_in": self.test(a), "heldout_cross": None}


def line_choice(tok, test):
    pre = tiny_gpt(tok)
    with torch.no_grad():
        pre.ln_f.bias.zero_()
    fin = tiny_gpt(tok, seed=1)
    with torch.no_grad():
        fin.ln_f.bias.fill_(1.0)
    checkpoint = nanosft.checkpoint_dict("pretrain", pre, tok)
    ev = LineEvaluator(test)
    path = [{"step": 0, **ev(pre)}, {"step": 300, **ev(fin)}]
    return rewind.choose_rewound(ev, checkpoint, fin, path, path[-1], where="interpolate", alphas=flags.ALPHAS,
                                 tolerance=0.01, loss_tolerance=0.02, min_gain=0.05)


def test_alpha_is_chosen_on_dev_and_the_test_half_cannot_move_it(tok):
    # dev within 0.01 of the best (alpha 0.8): alpha in [0.7, 0.9]; of those the least
    # retention loss: 0.7, which saves 0.3 nats over the final weights (>= 0.05)
    a = line_choice(tok, test=lambda a: 1 - (a - 0.8) ** 2)
    assert a["rewound_alpha"] == 0.7 and a["rewind"] == "interpolate"
    # test-half answers that peak elsewhere (or are all wrong) leave alpha where it was ...
    for test in (lambda a: 1 - (a - 0.5) ** 2, lambda a: 0.0, lambda a: a):
        b = line_choice(tok, test)
        assert b["rewound_alpha"] == 0.7
        # ... while they are what is reported at the chosen point
        assert b["rewind_interpolate"]["heldout"] == test(0.7)
    # every alpha of the line was evaluated, the two ends reused
    assert [p["alpha"] for p in a["interpolation"]] == list(flags.ALPHAS)


def test_interpolated_weights_are_the_convex_combination(tok):
    pre, fin = tiny_gpt(tok).state_dict(), tiny_gpt(tok, seed=1).state_dict()
    mid = rewind.interpolated(pre, fin, 0.25)
    for k in pre:
        torch.testing.assert_close(mid[k], 0.75 * pre[k] + 0.25 * fin[k])


def test_the_line_is_evaluated_only_when_rewinding_along_it_or_asked():
    """The default run does not rewind (--rewind none: out/sft.pt holds the final weights);
    --rewind path does not evaluate the line pre-trained -> final either unless asked
    (--alphas), which would double its evaluation time for numbers nobody reads."""
    import finetune
    assert finetune.parse_args([]).rewind == "none" and finetune.parse_args([]).alphas == ()
    assert finetune.parse_args(["--rewind", "path"]).alphas == ()
    assert finetune.parse_args(["--rewind", "interpolate"]).alphas == flags.ALPHAS
    assert finetune.parse_args(["--rewind", "path", "--alphas", "0.5"]).alphas == (0.0, 0.5, 1.0)
    with pytest.raises(nanosft.UserError, match="add --rewind"):
        finetune.parse_args(["--alphas", "0.5"])
    assert finetune.parse_args(["--rewind", "interpolate", "--init", "scratch"]).alphas == ()


def test_when_accuracy_and_answer_loss_disagree_the_task_decides():
    """An overshot run whose final point has the lowest answer loss but lost dev accuracy:
    no point is near the best at both, so the rule falls back on accuracy and rewinds (the
    line of a bf16 overshoot run, rounded). Keeping the final one there would rewind nothing."""
    line = [{"alpha": a, "dev": d, "dev_loss": l, "retention": r} for a, d, l, r in (
        (0.6, 0.900, 0.73, 1.16), (0.7, 0.996, 0.48, 1.35), (0.8, 0.992, 0.35, 1.62),
        (0.9, 0.972, 0.28, 2.02), (1.0, 0.960, 0.27, 2.50))]
    pick = rewind.sft_rewind(line, tolerance=0.01, final=line[-1], min_gain=0.05, loss_tolerance=0.02)
    assert pick["alpha"] == 0.7
    # where a point is near the best at both, the answer loss still narrows the choice
    line[2]["dev_loss"] = 0.28
    assert rewind.sft_rewind(line, tolerance=0.01, final=line[-1], min_gain=0.05, loss_tolerance=0.02)["alpha"] == 0.8
