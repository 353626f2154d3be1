"""
What dpo.py does beyond its lesson, imported only when a flag asks for it:

    --rewind   at every evaluation the policy answers the DEV half of the held-out people's
               questions (a point of the path) and its weights are kept in out/dpo_path/; at
               the end out/dpo.pt is the latest good point of the path (`rewind`), not the last step
    --plot     out/dpo_margin.png (the reward margin along training) and out/dpo_logratio.png
               (the held-out pair whose margin is largest: which tokens moved)

The held-out people are split by person: the dev half chooses where to rewind, the test half
(dpo.py's report) chose nothing. This module imports nothing of dpo.py: what it needs comes in
as arguments.
"""
import os

import nanosft
import torch
from data import world_eval, world_qa
from extras import charts

DEGENERATE_MAX = 0.01  # rewinding: the most degenerate dev answers a chosen checkpoint may give


def dev_behaviour(model, tok):
    """The dev half's greedy answers graded by the world's verifier (world_qa.qa_eval): task
    accuracy, the voted style strictly and loosely, the degenerate rate."""
    r = world_qa.qa_eval(model, tok, world_eval.load_world(), world_qa.heldout_halves()[0],
                           longest=world_qa.world_longest())
    return {k: v for k, v in r.items() if k not in ("answers", "degenerate")}


def path_start(ref, tok):
    """The path's first point: the starting model (its weights: the starting checkpoint's)."""
    return [{"step": 0, **dev_behaviour(ref, tok)}]


def path_point(model, tok, path, it, out_dir, flags, log):
    """At an evaluation: the dev half's behaviour at step `it` joins `path` (once), and the
    weights are kept in out_dir/dpo_path/ for rewinding to pick from."""
    if path[-1]["step"] != it:
        path.append(d := {"step": it, **dev_behaviour(model, tok)})
        log(f"eval step {it} (dev): accuracy {d['accuracy']:.3f} | clean style {d['clean_style_rate']:.3f} | "
            f"degenerate {d['degenerate_rate']:.3f}")
    nanosft.save_checkpoint(path_checkpoint(out_dir, it), nanosft.checkpoint_dict("dpo", model, tok, it=it, flags=flags))


def rewind(path, tolerance=0.01):
    """DPO rewinding along its own path, on the DEV half of the held-out people (the test half
    is only reported). A checkpoint qualifies when at most DEGENERATE_MAX of its answers
    are degenerate and its task accuracy is within `tolerance` of the starting model's;
    among those within `tolerance` of the best clean-style rate, take the LATEST: the most
    optimised point that still answers cleanly. DPO can over-optimise (the chosen answers'
    likelihood falls too and the freed probability lands on a repeated closing); this
    stops it before it breaks, as SFT rewinding does. path[0] is the start, which always
    qualifies: when no later point does, DPO changes nothing."""
    start = path[0]
    ok = [p for p in path if p["degenerate_rate"] <= DEGENERATE_MAX
          and p["accuracy"] >= start["accuracy"] - tolerance] or [start]
    best = max(p["clean_style_rate"] for p in ok)
    return max((p for p in ok if p["clean_style_rate"] >= best - tolerance), key=lambda p: p["step"])


def rewound(model, path, final_step, start_ckpt, out_dir):
    """Load into `model` the weights of the step that `rewind` picks on `path` (step 0: the
    starting checkpoint `start_ckpt`; `final_step`: the weights already in `model`) -> that step."""
    step = rewind(path)["step"]
    if step != final_step:
        model.load_state_dict((nanosft.load_checkpoint(path_checkpoint(out_dir, step)) if step else start_ckpt)["model"])
    return step


def path_checkpoint(out_dir, it):
    """Where a --rewind run keeps step `it` of its path, for rewinding to pick from."""
    return os.path.join(out_dir, "dpo_path", f"step{it:05d}.pt")


def plot(out_dir, result, model, ref, tok, pairs, examples, process, token_logprobs, margins=None):
    """--plot: out_dir/dpo_margin.png, the training pairs' reward margin per step and the
    held-out pairs' at each evaluation (dpo.json's history); with held-out pairs (`pairs`,
    their `examples` and `margins` (N,) now) out_dir/dpo_logratio.png, the pair whose margin
    is the largest, token by token. token_logprobs(logits, labels) -> (B, T): dpo.token_logprobs."""
    if examples:
        k = int(margins.argmax())
        plot_logratio(os.path.join(out_dir, "dpo_logratio.png"), model, ref, tok, pair=pairs[k], example=examples[k],
                      process=process, token_logprobs=token_logprobs)
    tr, ev = result["history"]["train"], result["history"]["eval"]
    series = {"train (per step)": (tr.get("step", []), tr.get("rewards/margins", []))}
    if result["pref_accuracy_heldout"] is not None:
        series["held-out"] = (ev["step"], ev["margin"])
    charts.plot(os.path.join(out_dir, "dpo_margin.png"), "DPO reward margin", xlabel="step",
                ylabel="beta x (log-ratio chosen - log-ratio rejected)", series=series)


@torch.no_grad()
def plot_logratio(path, model, ref, tok, pair, example, process, token_logprobs, max_tokens=40):
    """A heatmap of log pi(y_t|...) - log pi_ref(y_t|...) over the first max_tokens tokens of a
    pair's two answers, a strip each: red = DPO pushed the token up, blue = pushed down.
    token_logprobs(logits, labels) -> (B, T): dpo.token_logprobs."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    strips = []
    for name, (x, y) in (("chosen", example[:2]), ("rejected", example[2:])):
        X, Y = x[None].to(process.device), y[None].to(process.device)
        with nanosft.autocast(process.device, process.dtype):
            d = token_logprobs(model(X)[0], Y) - token_logprobs(ref(X)[0], Y)  # (1, T)
        keep = (Y[0] != -1).nonzero().squeeze(-1)[:max_tokens]
        vals = d[0, keep].tolist()
        toks = [tok.decode([t]).replace(" ", "\u00b7").replace("\n", "\\n") for t in Y[0, keep].tolist()]
        strips.append((f"{name}: {sum(vals):+.2f} nats in all", toks, vals))
    lim, width = max(1e-3, max(abs(v) for *_, vals in strips for v in vals)), max(len(t) for _, t, _ in strips)
    fig, axes = pyplot.subplots(2, 1, figsize=(max(6.0, 0.45 * width), 4.0), constrained_layout=True)
    for ax, (label, toks, vals) in zip(axes, strips):
        im = ax.imshow([vals], cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax.set_xticks(range(len(toks)), toks, rotation=60, ha="right", fontsize=8)
        ax.set(yticks=[], xlim=(-0.5, width - 0.5))
        ax.set_title(label, fontsize=9, loc="left")
        for i, v in enumerate(vals):
            ax.text(i, 0, f"{v:+.1f}", ha="center", va="center", fontsize=6, color="white" if abs(v) > 0.6 * lim else "black")
    fig.suptitle(f"prompt: {pair['prompt'][-1]['content'][:100]}", fontsize=10)
    fig.colorbar(im, ax=list(axes), label="log pi - log pi_ref (nats)", shrink=0.9, pad=0.01)
    fig.savefig(path + ".tmp.png", dpi=110, bbox_inches="tight")
    pyplot.close(fig)
    os.replace(path + ".tmp.png", path)


