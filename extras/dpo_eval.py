"""
What dpo.py measures and reports: the held-out pairs' implicit rewards, the KL to the
reference, the answers' behaviour (on the world: task accuracy and the voted style, per
half of the held-out people) along the path, the rewinding along that path, the training
pairs' rewards, and the files and lines of the final report. The DPO data, loss and loop
are in dpo.py; this module imports nothing of dpo.py (the held-out pairs come in scored).
"""
import os
import time

import nanosft
import torch
from data import world_eval
from extras import charts

KL_PROMPTS = 32        # held-out prompts sampled for the KL estimate
KL_TOKENS = 32         # tokens sampled per KL prompt
DEGENERATE_MAX = 0.01  # rewinding: the most degenerate dev answers a chosen checkpoint may give
EVAL_PAIRS = 2048      # held-out pairs scored at each evaluation (more: an evenly spaced subset)
HELDOUT_RULE = (10.0, True)  # the world's held-out pairs, whatever --min-margin and --pairs train on:
                             # each thread's top answer against those it beat by >= 10 net votes
REWIND_RULE = (f"latest dev-half checkpoint within 0.01 of the best clean-style rate among "
               f"those with degenerate rate <= {DEGENERATE_MAX} and task accuracy >= start - 0.01")  # for dpo.json


@torch.no_grad()
def kl_estimate(model, ref, tok, prompts, process, seed):
    """KL(pi || pi_ref) per response on held-out prompts. y is sampled from the policy
    (temperature 1, at most KL_TOKENS tokens) and at every position of y we add the exact KL
    of the two next-token distributions: by the chain rule E_y~pi[sum_t KL_t] is the
    sequence-level KL, and the exact per-position KL has less noise than
    log pi(y|x) - log pi_ref(y|x) of the sample alone (and is never negative)."""
    n_new = min(KL_TOKENS, model.config.block_size // 2)
    ids = [nanosft.chat_prompt(tok, p)[-(model.config.block_size - n_new):] for p in prompts]
    with nanosft.autocast(process.device, process.dtype):  # y keeps a stop token it drew: pi chose it too
        ys = nanosft.generate_batch(model, ids, n_new, {tok.end}, temperature=1.0,
                               generator=torch.Generator().manual_seed(seed), keep_stop=True)
    X, Y = nanosft.collate([nanosft.example_tensors(x + y, [0] * len(x) + [1] * len(y)) for x, y in zip(ids, ys)], tok.pad)
    X, Y = X.to(process.device), Y.to(process.device)
    with nanosft.autocast(process.device, process.dtype):
        lp = torch.log_softmax(model(X)[0].float(), -1)  # (N, T, V)
        lq = torch.log_softmax(ref(X)[0].float(), -1)    # (N, T, V)
    kl_t = (lp.exp() * (lp - lq)).sum(-1)  # (N, T)
    return (kl_t * (Y != -1)).sum(-1).mean().item()


def greedy(model, tok, prompts, max_new_tokens, room=8):
    """Greedy answers to chat prompts (lists of messages); a prompt too long keeps its end
    and leaves `room` positions to answer in."""
    ids = [nanosft.chat_prompt(tok, p)[-(model.config.block_size - room):] for p in prompts]
    return [tok.decode(o) for o in nanosft.generate_batch(model, ids, max_new_tokens, stop={tok.end, tok.endoftext})]


class Evaluator:
    """What the evaluations measure, and what stays fixed for them: the held-out pairs
    (`score(model)` -> their log pi(chosen), log pi(rejected), two (N,); None without
    held-out pairs) with the reference's scores, the prompts of `pairs` (for the KL, and a few answered
    before and after) and, on the world, the held-out people's questions, split by person:
    the DEV half chooses where to rewind (its checkpoints kept in out_dir/dpo_path/), the TEST
    half is reported."""

    def __init__(self, ref, tok, pairs, score, world, beta, seed, process, out_dir=None, flags=None, examples=None):
        self.ref, self.tok, self.score, self.beta, self.seed, self.process = ref, tok, score, beta, seed, process
        self.out_dir, self.flags = out_dir, flags  # out_dir: on the world, where the path's checkpoints go
        self.held_pairs, self.examples = pairs, examples  # examples: the scored pairs' tensors (for the plot)
        self.rewards = Rewards()  # the training pairs' implicit rewards, logged at every evaluation
        self.prompts = list({str(p["prompt"]): p["prompt"] for p in pairs}.values())  # each prompt once
        self.held_ref = score and score(ref)  # two (N,)
        self.world, self.longest = (world_eval.load_world(), world_eval.world_longest()) if world else (None, None)
        self.dev, self.test = world_eval.heldout_halves() if world else (None, None)
        shown = {}  # on the world one question per attribute about test-half people
        for r in self.test or []:
            shown.setdefault(r["attribute"], [{"role": "user", "content": r["prompt"]}])
        self.shown = list(shown.values()) if world else self.prompts[:5]

    def pairs(self, model):
        """Implicit rewards on the held-out pairs: margins, preference accuracy, and whether
        the plain likelihood prefers the chosen answer. None without held-out pairs."""
        if not self.score:
            return None
        (pi_c, pi_r), (ref_c, ref_r) = self.score(model), self.held_ref
        m = self.beta * ((pi_c - ref_c) - (pi_r - ref_r))  # (N,) implicit reward margins (dpo.dpo_loss)
        # a tie (exactly zero margin, as before any training) counts as a coin flip
        return {"pref_accuracy": ((m > 0).float() + 0.5 * (m == 0).float()).mean().item(), "margin": m.mean().item(),
                "logp_accuracy": (pi_c > pi_r).float().mean().item(), "margins": m}

    def kl(self, model):
        return kl_estimate(model, self.ref, self.tok, self.prompts[:KL_PROMPTS], self.process, self.seed)

    def samples(self, model):
        return [(p[-1]["content"], a) for p, a in zip(self.shown, greedy(model, self.tok, self.shown, 48))]

    def behaviour(self, model, half="test"):
        """Greedy answers: on the world (a `half` of the held-out people's questions) task
        accuracy, the voted style strictly and loosely (see world_eval.qa_eval), the degenerate rate
        and the length; on other data only the length."""
        if self.world:
            r = world_eval.qa_eval(model, self.tok, self.world, self.dev if half == "dev" else self.test, self.longest)
            said = r.pop("answers")
            r["degenerate_examples"] = [a for a, d in zip(said, r.pop("degenerate")) if d][:5]
        else:
            said = greedy(model, self.tok, self.prompts[:64], 64)
            r = dict.fromkeys(("accuracy", "clean_style_rate", "style_rate", "degenerate_rate"))
        # length of the answer text re-encoded: the generated count for any well-formed text
        # (only an untrained model's stray byte fragments re-encode longer)
        r["response_tokens"] = sum(len(self.tok.encode(a)) for a in said) / max(1, len(said))
        return r

    def begin(self, state):
        """The resumed run's state, or the state at step 0, where the policy IS the reference
        (every margin and the KL are 0 and need no measuring). Logs the test half before."""
        held = self.score is not None
        state = state or {"before": self.behaviour(self.ref), "train": {},
                          "eval": {"step": [0], "margin": [0.0 if held else None],
                                   "pref_accuracy": [0.5 if held else None], "kl": [0.0]},
                          "path": [{"step": 0, **self.behaviour(self.ref, "dev")}] if self.world else [],
                          "samples_before": self.samples(self.ref)}
        if self.world:
            b = state["before"]
            self.process.log(f"before (test half): held-out accuracy {b['accuracy']:.3f} | clean style "
                        f"{b['clean_style_rate']:.3f} | degenerate {b['degenerate_rate']:.3f} | "
                        f"{b['response_tokens']:.1f} tokens per answer")
        return state

    def evaluate(self, model, state, it):
        """A point of the history: held-out preferences and the KL; on the world also a point
        of the path (the dev half's behaviour)."""
        held, kl = self.pairs(model) or {}, self.kl(model)
        for k, v in zip(("step", "margin", "pref_accuracy", "kl"), (it, held.get("margin"), held.get("pref_accuracy"), kl)):
            state["eval"][k].append(v)
        r3 = lambda k: None if k not in held else round(held[k], 3)
        self.process.log(f"eval step {it}: held-out pref accuracy {r3('pref_accuracy')} | "
                    f"held-out margin {r3('margin')} | KL(pi||ref) {kl:.3f} nats/answer")
        if self.world and state["path"][-1]["step"] != it:
            state["path"].append(d := {"step": it, **self.behaviour(model, "dev")})
            self.process.log(f"eval step {it} (dev): accuracy {d['accuracy']:.3f} | clean style "
                        f"{d['clean_style_rate']:.3f} | degenerate {d['degenerate_rate']:.3f}")
        model.train()  # (generating put it in eval mode)
        if self.world and self.out_dir:  # the path's point, for rewinding to pick from
            nanosft.save_checkpoint(path_checkpoint(self.out_dir, it), nanosft.checkpoint_dict(
                "dpo", model, self.tok, it=it, flags=self.flags))

    def rewind(self, model, path, final_step, start_ckpt):
        """Load into `model` the weights of the step that `rewind` picks on `path` (step 0: the
        starting checkpoint `start_ckpt`; `final_step`: the weights already in `model`) -> that step."""
        step = rewind(path)["step"]
        if step != final_step:
            model.load_state_dict((nanosft.load_checkpoint(path_checkpoint(self.out_dir, step)) if step else start_ckpt)["model"])
        return step


class Rewards:
    """The training pairs' implicit rewards, summed per step on this rank until the next
    evaluation (sums[step] = [chosen, rejected, pairs ranked right, pairs]); then summed over
    every rank into `history`, per step as means over its pairs, and logged."""

    def __init__(self):
        self.sums = {}

    def add(self, it, r_c, r_r):
        s = torch.stack([r_c.sum(), r_r.sum(), (r_c > r_r).float().sum(), r_c.new_tensor(float(len(r_c)))])
        self.sums[it] = self.sums.get(it, 0) + s.float().cpu()

    def log(self, history, it, process):
        steps = sorted(self.sums)
        tot = torch.stack([self.sums.pop(s) for s in steps]) if steps else torch.zeros(0, 4)  # (S, 4)
        if process.world > 1:
            from torch import distributed
            distributed.all_reduce(tot)
        for s, (c, r, a, n) in zip(steps, tot.tolist()):
            for k, v in (("step", s + 1), ("rewards/chosen", c / n), ("rewards/rejected", r / n),
                         ("rewards/margins", (c - r) / n), ("rewards/accuracies", a / n)):
                history.setdefault(k, []).append(v)
        if steps:
            c, r, a, n = tot.sum(0).tolist()
            process.log(f"step {it}: rewards/chosen {c / n:+.3f} | rewards/rejected {r / n:+.3f} | rewards/margins "
                   f"{(c - r) / n:+.3f} | rewards/accuracies {a / n:.3f} (train, since the last eval)")


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


def path_checkpoint(out_dir, it):
    """Where the world's run keeps step `it` of its path, for rewinding to pick from."""
    return os.path.join(out_dir, "dpo_path", f"step{it:05d}.pt")


REPORTED_FLAGS = ("beta", "loss", "label_smoothing", "rpo_alpha", "lr", "batch_size", "pairs", "min_margin")


def summary(ev, model, state, rewind_rule=REWIND_RULE, rewound_step=None, steps=None, t_start=None, counts=None,
            flags=None):
    """dpo.json: the held-out pairs' scores, the behaviour before and after (the test half), the
    KL, the samples and the history; with `steps` (steps taken, seconds of training, this process's
    tokens) also the run's steps and times, the
    data's `counts` and the REPORTED_FLAGS of `flags`. The held-out margins go to ev.margins."""
    after, held, world = ev.behaviour(model), ev.pairs(model) or {}, ev.world is not None
    result = {"pref_accuracy_heldout": held.get("pref_accuracy"),
              # before training every implicit reward is 0: a tie, counted as a coin flip
              "pref_accuracy_heldout_before": 0.5 if held else None,
              # does the plain likelihood prefer the chosen answer (length-biased; for reference)
              "logp_accuracy_heldout_before": (ev.held_ref[0] > ev.held_ref[1]).float().mean().item() if held else None,
              "logp_accuracy_heldout_after": held.get("logp_accuracy"), "heldout_reward_margin": held.get("margin"),
              "heldout_pairs_from": "people never trained on (data/world_community_eval.jsonl)" if world
                                    else "held-out records of --data",
              "rewind_rule": rewind_rule if world else "none (no behaviour checks on this data): the last step",
              "kl": ev.kl(model), "samples": [{"prompt": p, "before": b, "after": a} for (p, b), (_, a) in
                                              zip(state["samples_before"], ev.samples(model))],
              "history": {"train": state["train"], "eval": state["eval"], "path": state.get("path", [])}}
    for k in ("accuracy", "clean_style_rate", "style_rate", "degenerate_rate", "response_tokens"):
        name = "heldout_accuracy" if k == "accuracy" else k
        result[f"{name}_before"], result[f"{name}_after"] = state["before"][k], after[k]
    result["degenerate_examples_after"] = after.get("degenerate_examples")
    ev.margins = held.get("margins")
    if steps is not None:
        step, seconds, tokens = steps
        result.update(rewound_step=rewound_step, final_step=step, seconds=time.time() - t_start,
                      train_seconds=seconds, steps=step, tokens_per_sec=tokens * ev.process.world / max(seconds, 1e-9),
                      **counts,
                      device=str(ev.process.device), dtype=ev.process.dtype, **{k: flags[k] for k in REPORTED_FLAGS})
    return result


def numbers(result):
    """The plain numbers and strings of dpo.json, stored in dpo.pt's metrics."""
    return {k: v for k, v in result.items() if isinstance(v, (int, float, str))}


def report(process, out_dir, result, evaluator=None, model=None, token_logprobs=None):
    """out/dpo_logratio.png (the held-out pair with the largest margin now: which tokens moved;
    with an evaluator that scored held-out pairs), out/dpo.json, out/dpo_margin.png and the
    closing lines."""
    if evaluator is not None and evaluator.examples and evaluator.margins is not None:
        k = int(evaluator.margins.argmax())
        plot_logratio(os.path.join(out_dir, "dpo_logratio.png"), model, evaluator.ref, evaluator.tok,
                      pair=evaluator.held_pairs[k], example=evaluator.examples[k], process=process, token_logprobs=token_logprobs)
    nanosft.write_json(os.path.join(out_dir, "dpo.json"), result)
    tr, ev = result["history"]["train"], result["history"]["eval"]
    series = {"train (per step)": (tr.get("step", []), tr.get("rewards/margins", []))}
    if result["pref_accuracy_heldout"] is not None:
        series["held-out"] = (ev["step"], ev["margin"])
    charts.plot(os.path.join(out_dir, "dpo_margin.png"), "DPO reward margin", xlabel="step",
                ylabel="beta x (log-ratio chosen - log-ratio rejected)", series=series)
    f = lambda k: "n/a" if result[k] is None else f"{result[k]:.3f}"
    process.log(f"rewound to step {result['rewound_step']} of {result['steps']}" if result["history"]["path"]
           else f"{result['steps']} steps")
    process.log(f"done: held-out pref accuracy {f('pref_accuracy_heldout')} | " + " | ".join(
        f"{name} {f(k + '_before')} -> {f(k + '_after')}" for name, k in (("clean style", "clean_style_rate"),
        ("degenerate", "degenerate_rate"), ("held-out accuracy", "heldout_accuracy"))) + f" | KL {result['kl']:.3f} | "
        f"answer tokens {result['response_tokens_before']:.1f} -> {result['response_tokens_after']:.1f} | "
        f"{result['seconds']:.0f}s -> {os.path.join(out_dir, 'dpo.pt')}")


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


