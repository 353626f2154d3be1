"""
SFT rewinding (finetune.py --rewind, on the world's data): out/sft.pt becomes the checkpoint
that has learned the task at the least cost to what pre-training stored (without the flag it
holds the final weights). Where it looks:

  path         the checkpoints saved along the training path (sft_path/stepNNNNN.pt)
  interpolate  the straight line from the pre-trained to the final weights,
               (1 - alpha) theta_pretrained + alpha theta_final (PEFT-Arena's path-wise rewinding)

Both are measured and reported in sft.json; --rewind says whose choice becomes out/sft.pt.
Why, and what it recovers: docs/forgetting.md.
"""
import os

import torch

import nanosft
from data import formats, world_eval, world_qa
from extras import charts, peft


def sft_rewind(points, tolerance, final=None, min_gain=0.0, loss_tolerance=None):
    """The rule: among candidate points (the path's checkpoints, or weights on the line) keep
    those that have learned the task: held-out DEV accuracy within `tolerance` of the best
    point's and, with loss_tolerance, dev answer loss (finetune.py dev_answer_batches)
    within loss_tolerance nats per token of the lowest. Of these take the one with the
    LOWEST retention loss: the good-enough point where SFT has paid the least of the
    pre-trained model's knowledge. Only the dev half chooses; the test half is reported.
    The loss too, because accuracy is reached before the model writes the answers as SFT
    teaches them (the run that showed it: docs/verify.md).

    final, min_gain: when the chosen point saves less than min_gain nats of retention loss
    over `final`, return `final`: a run that has not overshot gains nothing from rewinding
    but the noise of a different checkpoint's accuracy."""
    best = max(p["dev"] for p in points)
    ok = [p for p in points if p["dev"] >= best - tolerance]
    if loss_tolerance is not None and all(p.get("dev_loss") is not None for p in points):
        least = min(p["dev_loss"] for p in points)
        # when no point is near the best at both, the task decides: an overshot final step
        # can have the lowest answer loss and have lost accuracy (docs/forgetting.md)
        ok = [p for p in ok if p["dev_loss"] <= least + loss_tolerance] or ok
    pick = min(ok, key=lambda p: (p["retention"] if p["retention"] is not None else 0,
                                  p.get("step", p.get("alpha"))))
    if final is not None and None not in (pick["retention"], final["retention"]) \
            and final["retention"] - pick["retention"] < min_gain:
        return final
    return pick


# the flags finetune.py hands on to rewind() by name (extras/flags.py declares them)
FLAGS = ("rewind", "alphas", "rewind_tolerance", "rewind_loss_tolerance", "rewind_min_gain")


def dev_answer_batches(tok, prompts, world_dir, top_voted, batch=64):
    """The community's top-voted answers (top_voted: finetune.py's) to the dev half's questions
    `prompts` (world_community_eval.jsonl: threads no stage trains on), as fixed (x, y) batches:
    their loss says how closely the model writes the answers SFT teaches -- the voted
    style included -- for people it was never trained on."""
    threads = formats.read_records(world_eval.path("world_community_eval.jsonl", world_dir))
    convs = [[{"role": "user", "content": t["prompt"]}, {"role": "assistant", "content": top_voted(t["answers"])}]
             for _, t in threads if t["prompt"] in prompts]
    examples = [nanosft.example_tensors(*nanosft.render_chat(tok, c)) for c in convs]
    return [nanosft.collate(examples[i:i + batch], tok.pad) for i in range(0, len(examples), batch)]


class DevHalf:
    """What rewinding chooses by, added to every point of the path (finetune.SFTEvaluator's
    `more`): accuracy on the DEV half of the held-out people's questions (the test half is
    reported, never chosen by) and the dev answer loss (dev_answer_batches). With
    --sft-attributes only the dev questions about those attributes, so nothing about a
    cross-domain attribute informs the choice."""

    def __init__(self, evaluator, attributes, top_voted):
        self.evaluator = evaluator
        dev = world_qa.heldout_halves(evaluator.world_dir)[0]
        self.dev = [r for r in dev if attributes is None or r["attribute"] in attributes]
        self.answers = dev_answer_batches(evaluator.tok, {r["prompt"] for r in self.dev}, evaluator.world_dir,
                                          top_voted)

    def __call__(self, model, test_answers):
        return {"dev": self.evaluator.qa(model, self.dev)["accuracy"],
                "dev_loss": nanosft.mean_loss(model, self.answers, self.evaluator.process)}


def step_file(out_dir, it):
    """The path's checkpoint of step `it`."""
    return os.path.join(out_dir, "sft_path", f"step{it:05d}.pt")


def keep_step(model, tok, it, flags, out_dir):
    """At an evaluation point of training: keep the checkpoint of step `it` (the plain model:
    PEFT adapters merged) as a candidate for rewinding."""
    nanosft.save_checkpoint(step_file(out_dir, it), nanosft.checkpoint_dict("sft", model, tok, it=it, flags=flags))


def rewind(evaluator, start_checkpoint, model, tok, path, final, flags, rewind, alphas, rewind_tolerance,
           rewind_loss_tolerance, rewind_min_gain, out_dir, plot=False):
    """After training on the world's data (final: the final weights' full evaluation): choose
    the rewound point (choose_rewound; `rewind` says where, the rest is sft_rewind's rule) and
    evaluate it; with `plot` draw the path (sft_path.png). Returns the rewound checkpoint
    (out/sft.pt), sft.json's fields on rewinding and the rewound point's full evaluation."""
    choice = choose_rewound(evaluator, start_checkpoint, model, path, final, where=rewind, alphas=alphas,
                            tolerance=rewind_tolerance, loss_tolerance=rewind_loss_tolerance, min_gain=rewind_min_gain)
    rewound = rewound_checkpoint(choice, start_checkpoint, model, tok, it=path[-1]["step"], flags=flags,
                                 out_dir=out_dir)
    rewound_model = nanosft.model_from_checkpoint(rewound)[0].to(evaluator.process.device)
    on_path = [p for p in path if p["step"] == choice["rewound_step"]]  # a step of the path: measured already
    rewound_eval = evaluator.complete(on_path[0], rewound_model) if on_path else evaluator(rewound_model, full=True)
    probe_rewound_points(choice, rewound_eval, evaluator, start_checkpoint=start_checkpoint, model=model,
                         out_dir=out_dir)
    if plot:
        plot_path(os.path.join(out_dir, "sft_path.png"), path, path[-1]["step"], choice)
    return rewound, choice, rewound_eval


def pretrained_state(start_checkpoint):
    return nanosft.model_from_checkpoint(start_checkpoint)[0].state_dict()


def interpolated(pre, fin, alpha):
    """theta(alpha) = (1 - alpha) theta_pretrained + alpha theta_final, tensor by tensor (a
    tensor the pre-trained model lacks, such as a prompt-tuning prefix, is the final one's)."""
    return {k: (1 - alpha) * pre[k] + alpha * v if k in pre and pre[k].shape == v.shape else v
            for k, v in fin.items()}


@torch.no_grad()
def interpolate(evaluator, start_checkpoint, model, known, alphas):
    """Evaluate the weights on the straight line from the pre-trained to the final ones.
    known: {alpha: evaluation} already measured (the two ends). The knowledge probe is
    measured at the ends only (and at the rewound point: probe_rewound_points)."""
    pre, fin = pretrained_state(start_checkpoint), peft.plain_state(model)
    on_line = peft.new_gpt(model.config).to(evaluator.process.device)
    out, keys = [], ("dev", "dev_loss", "heldout", "heldout_in", "heldout_cross", "degenerate", "retention", "probe")
    for alpha in alphas:
        if alpha not in known:
            on_line.load_state_dict(interpolated(pre, fin, alpha))
        result = known.get(alpha) or evaluator(on_line)
        out.append({"alpha": alpha, **{k: result.get(k) for k in keys}})
    return out


def choose_rewound(evaluator, start_checkpoint, model, path, final, where, alphas, tolerance, loss_tolerance,
                   min_gain):
    """Rewinding both ways (sft_rewind's rule and settings): among the path's checkpoints
    (its step 0, the pre-trained model, is no candidate) and, given `alphas`, on the line
    pre-trained -> final (a scratch run has no pre-trained end). `where` says whose choice
    becomes out/sft.pt; both are reported. final: the final weights' evaluation.
    Returns sft.json's fields on rewinding."""
    rule = dict(tolerance=tolerance, loss_tolerance=loss_tolerance, min_gain=min_gain)
    by_path = sft_rewind(path[1:] if len(path) > 1 else path, final=path[-1], **rule)
    ends = {0.0: path[0], 1.0: final} if path[0]["step"] == 0 else {1.0: final}
    line = interpolate(evaluator, start_checkpoint, model, ends, alphas) if alphas else []
    by_line = sft_rewind(line, final=line[-1], **rule) if line else None
    on_line = where == "interpolate" and by_line is not None
    return {"rewound": f"alpha {by_line['alpha']:.2f} of the line pre-trained -> final" if on_line
            else f"step {by_path['step']} of the path",
            "rewound_step": None if on_line else by_path["step"],
            "rewound_alpha": by_line["alpha"] if on_line else None, "rewind": where,
            "rewind_rule": f"lowest retention loss among the {where} points within {tolerance} of the best "
                           f"dev held-out accuracy and {loss_tolerance} nats/token of the lowest dev answer "
                           f"loss, if it saves >= {min_gain} nats over the final checkpoint (else the final one)",
            # both rules, each as measured at its point (test-half accuracy, retention)
            "rewind_path": by_path, "rewind_interpolate": by_line, "interpolation": line}


def point_model(point, start_checkpoint, model, out_dir):
    """The weights of a point: a step of the path as saved then, or those at an alpha of the
    line pre-trained -> final, made now."""
    if "step" in point:
        return nanosft.model_from_checkpoint(nanosft.load_checkpoint(step_file(out_dir, point["step"])))[0]
    on_line = peft.new_gpt(model.config)
    on_line.load_state_dict(interpolated(pretrained_state(start_checkpoint), peft.plain_state(model), point["alpha"]))
    return on_line


def rewound_checkpoint(choice, start_checkpoint, model, tok, it, flags, out_dir):
    """The chosen point's checkpoint: a step of the path as saved then, or the weights at the
    chosen alpha of the line pre-trained -> final, made now."""
    if choice["rewound_alpha"] is None:
        return nanosft.load_checkpoint(step_file(out_dir, choice["rewound_step"]))
    on_line = point_model({"alpha": choice["rewound_alpha"]}, start_checkpoint, model, out_dir)
    return nanosft.checkpoint_dict("sft", on_line, tok, None, it, flags)


def probe_rewound_points(choice, rewound, evaluator, start_checkpoint, model, out_dir):
    """The knowledge probe of both rewound points (by path, by line), which sft.json reports:
    the path and the line measure it at their ends only. rewound: the chosen point's full
    evaluation."""
    chosen = choice["rewind_path"] if choice["rewound_alpha"] is None else choice["rewind_interpolate"]
    for point in (choice["rewind_path"], choice["rewind_interpolate"]):
        if point is None or point["probe"] is not None:
            continue
        if point is chosen:
            point["probe"] = rewound["probe"]
        else:
            weights = point_model(point, start_checkpoint, model, out_dir)
            point["probe"] = evaluator.probe(weights.to(evaluator.process.device))


def plot_path(png, path, final_step, choice):
    """Held-out accuracy against retention loss: the path, the line (if evaluated), and the
    pre-trained, final and rewound points (choice: see choose_rewound)."""
    line, by_line = choice["interpolation"], choice["rewind_interpolate"]
    rewound_step = choice["rewind_path"]["step"]
    at = lambda s: next(p for p in path if p["step"] == s)
    series = {"SFT path": ([p["retention"] for p in path], [p["heldout"] for p in path])}
    if line:
        series["interpolation pre-trained -> final"] = ([p["retention"] for p in line], [p["heldout"] for p in line])
    marks = [(path[0]["retention"], path[0]["heldout"], "pre-trained")]
    if rewound_step == final_step:  # rewinding kept the final checkpoint: one mark
        marks.append((at(final_step)["retention"], at(final_step)["heldout"], "final = rewound on the path"))
    else:
        marks += [(at(final_step)["retention"], at(final_step)["heldout"], "final"),
                  (at(rewound_step)["retention"], at(rewound_step)["heldout"], f"rewound on the path (step {rewound_step})")]
    if by_line and by_line["alpha"] != 1.0:
        marks.append((by_line["retention"], by_line["heldout"], f"on the line: alpha {by_line['alpha']:.2f}"))
    charts.plot(png, "SFT: task accuracy vs forgetting", "retention loss (pre-training val loss; lower = less forgetting)",
            "held-out accuracy", series, marks)
