"""
Stage 3: Direct Preference Optimization (DPO), from scratch, against a frozen reference.

    python dpo.py --ckpt out/sft.pt                       # the world's community votes -> out/dpo.pt
    python dpo.py --ckpt out/sft.pt --data pairs.jsonl    # {"prompt","chosen","rejected"} lines
    python dpo.py --ckpt out/sft.pt --loss sigmoid --beta 0.1   # the DPO paper's loss (Eq. 7)
    python dpo.py --ckpt out/sft.pt --resume              # continue out/dpo_final.pt
    torchrun --nproc_per_node 2 dpo.py --ckpt out/sft.pt  # several processes (DDP)

SFT taught the model WHAT to answer. DPO refines HOW, from pairs "this answer is better
than that one" -- here pairs read off a community's up/down votes instead of expert labels.
The policy starts as a copy of the starting checkpoint; the reference is that checkpoint,
frozen. The loss raises the policy's log-probability of each chosen answer relative to the
reference, and lowers that of the rejected one, with no reward model and no sampling.

The DEFAULT loss is IPO (Azar et al. 2023, `--loss ipo`): it pulls each pair's log-ratio gap
to 1 / (2 beta) nats and no further. `--loss sigmoid` is the DPO paper's Eq. 7, which keeps
pushing the gap. Both are in `dpo_loss`; see DEFAULTS for why IPO is the default.

On the world data the run is REWOUND along its own path, like SFT: every --eval-interval
steps the policy answers the dev half of the held-out people's questions, and out/dpo.pt is
the latest checkpoint that shows the voted style without degenerate answers and without
losing task accuracy (the rule is in `rewind`). The last step is out/dpo_final.pt.

Preference data (read by data/formats.py), detected from the file's first record:
    votes    {"prompt", "answers": [{"text", "up", "down"}], "split"?}   (the default world)
    pairs    {"prompt", "chosen", "rejected"}
    conversational  the same with TRL's lists of {"role", "content"} messages ("prompt" optional)
    hh       {"chosen", "rejected"}: Anthropic HH dialogues ("\\n\\nHuman: ..." / "\\n\\nAssistant: ...")
    alpaca   {"instruction", "input"?, "chosen", "rejected"}
    sharegpt {"conversations": [{"from", "value"}], "chosen": {"from", "value"}, "rejected": {...}}
    scores   {"prompt", "responses": [{"text", "score"}]}
Votes and scores give pairs of answers whose net votes (up - down) or scores differ by at
least --min-margin, the higher one chosen: by default (--pairs top) the thread's top answer
against each other answer, with --pairs all every two answers. On the world, held-out pairs
come from the threads about the held-out people (data/world_community_eval.jsonl), whom
neither SFT nor DPO trains on. Pairs that teach nothing (chosen == rejected, exact copies)
are skipped, and pairs too long for the block are cut (see `pair_example`); each is counted
and reported, and --strict makes any of them an error.

Writes out/dpo.pt (the rewound policy), out/dpo_final.pt (the last step, for --resume),
out/dpo_path/ (the checkpoints rewinding chooses from), out/dpo.json (preference accuracy,
strict and loose style rate, degenerate rate, task accuracy, KL, response length: before and
after), out/dpo_logratio.png (which tokens DPO pushed up and down) and out/dpo_margin.png
(the reward margin during training).
"""
import functools
import math
import os
import time

import nanosft as ns  # first: it sets OpenMP's wait policy before torch loads
import torch
import torch.nn.functional as F
from data import formats


WORLD_VOTES = os.path.join(ns.HERE, "data", "world_community.jsonl")
# threads about the world's held-out people: held-out pairs of people neither SFT nor DPO
# trained on (pairs split off the training people's threads would share people, and the
# other phrasing of the question, with the training pairs)
WORLD_EVAL_VOTES = os.path.join(ns.HERE, "data", "world_community_eval.jsonl")

# Every default of this stage in one place (calibrated on the default world; change here).
# The loss is IPO by default: it pulls every pair's log-ratio gap to 1 / (2 beta) = 5 nats
# and no further, where the sigmoid loss keeps pushing. From one SFT checkpoint (README,
# section 6): the sigmoid loss at beta 0.1 cost 3.6 points of dev task accuracy by step 150,
# so rewinding fell back to step 50, before the voted style had formed; IPO at beta 0.05 and
# 0.025 reached lower preference accuracies on the held-out people's pairs (0.881, 0.877)
# than at beta 0.1 (0.896): the harder push blurs the facts that decide a correct-vs-wrong pair.
DEFAULTS = dict(max_iters=300, batch_size=16, lr=2e-5, eval_interval=50, warmup=20,
                log_interval=25, beta=0.1, loss="ipo", label_smoothing=0.0, rpo_alpha=0.1,
                min_margin=10.0, pairs="top")
EVAL_PAIRS = 2048      # held-out pairs scored at each evaluation (more: an evenly spaced subset;
                       # the world's 1,333 are all scored: 512 of them left a sampling error of
                       # +-1.3 points on a preference accuracy near 0.90)
KL_PROMPTS = 32        # held-out prompts sampled for the KL estimate
KL_TOKENS = 32         # tokens sampled per KL prompt

# ----------------------------------------------------------------------------------------
# the loss: a few pure functions


def token_logprobs(logits, labels):
    """log p(label_t | tokens < t) at every position: (B, T, V), (B, T) -> (B, T).
    Labels of -1 (not supervised) read token 0; callers mask those positions out."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, T, V), fp32 even under autocast
    return logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)


def sequence_logprobs(logits, labels, mask, segments=None):
    """log pi(y|x) of each response: the SUM of its tokens' log-probs. (B, T, V) -> (B,)

    The sum, not the mean, because DPO's derivation compares probabilities of whole
    sequences: log pi(y|x) = sum_t log pi(y_t | x, y_<t). A mean over the response length
    optimises a different objective (it takes the length of y out of the comparison, so the
    implicit reward is no longer the KL-regularised one the paper derives), and a mean over
    the padded length also counts padding: every log-ratio shrinks by the batch's longest
    row, an effective beta that changes from batch to batch.
    mask (B, T) is 1 on response tokens; prompt tokens and padding never enter the sum.
    segments (B, T), for packed rows (ns.pack): sum per sequence instead of per row, giving
    (N,) for the N = segments.max() + 1 sequences."""
    lp = token_logprobs(logits, labels)  # (B, T)
    lp = torch.where(mask.bool(), lp, torch.zeros_like(lp))  # (B, T)
    return lp.sum(-1) if segments is None else segment_sums(lp, segments)  # (B,) or (N,)


def segment_sums(values, segments):
    """(R, T) per-token values of packed rows -> (N,) sums per sequence (N = segments.max()
    + 1). Values must be 0 on padding (segment -1), which is sent to sequence 0, adding
    nothing."""
    n = int(segments.max()) + 1
    return values.new_zeros(n).index_add(0, segments.clamp(min=0).flatten(), values.flatten())


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta,
             loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair losses (B,) and the implicit rewards of chosen and rejected, each (B,).

    DPO, Rafailov et al. 2023, Eq. 7:

        L_DPO(pi; pi_ref) = -E_(x, y_w, y_l)~D [ log sigma( beta log pi(y_w|x) / pi_ref(y_w|x)
                                                           - beta log pi(y_l|x) / pi_ref(y_l|x) ) ]

    y_w is the chosen (winning) answer, y_l the rejected one. beta * log pi(y|x)/pi_ref(y|x)
    is the implicit reward of y: DPO fits a Bradley-Terry reward model whose reward is
    defined through the policy itself, so the policy that maximises it comes for free.

    label_smoothing eps (conservative DPO): each label is assumed flipped with probability
    eps, so the loss is -(1 - eps) log sigma(beta h) - eps log sigma(-beta h).
    loss_type "ipo" (Azar et al. 2023): (h - 1/(2 beta))^2 regresses the log-ratio gap h to a
    fixed target instead of pushing it to infinity, which resists over-fitting to
    deterministic preferences. Inputs are summed sequence log-probs, (B,) each, for every
    variant (some libraries average per token for IPO; here only the loss differs)."""
    chosen_ratio = policy_chosen - ref_chosen        # log pi(y_w|x) / pi_ref(y_w|x), (B,)
    rejected_ratio = policy_rejected - ref_rejected  # log pi(y_l|x) / pi_ref(y_l|x), (B,)
    h = chosen_ratio - rejected_ratio                # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def concatenated_logprobs(model, X, Y, S=None):
    """Chosen and rejected responses in ONE forward. Unpacked (S None): X, Y (2B, T) hold
    the B chosen rows first, then the B rejected rows. Packed (collate_pairs): X, Y, S
    (R, T) hold the 2B sequences in R <= 2B rows, S numbering them the same way (chosen
    0..B-1, rejected B..2B-1). One forward instead of two halves the kernel launches and,
    under DDP, keeps a single forward per backward. Returns two (B,) tensors."""
    logits, _ = model(X, segments=S)  # (R, T, V)
    logps = sequence_logprobs(logits, Y, Y != -1, S)  # (2B,)
    B = logps.size(0) // 2
    return logps[:B], logps[B:]


def pair_loss(model, X, Y, ref_chosen, ref_rejected, beta, loss="sigmoid", label_smoothing=0.0,
              rpo_alpha=0.0, S=None):
    """The SUM over the pairs of a micro-batch of the DPO loss (dpo_loss with beta, loss and
    label_smoothing), plus rpo_alpha times each chosen answer's per-token NLL (Pang et al.
    2024, TRL's rpo_alpha). Summed, because train_loop divides by the global number of pairs
    of the step. Also returns the implicit rewards (B,) of chosen and rejected for logging."""
    pi_c, pi_r = concatenated_logprobs(model, X, Y, S)  # (B,), (B,)
    losses, r_c, r_r = dpo_loss(pi_c, pi_r, ref_chosen, ref_rejected, beta, loss, label_smoothing)
    if rpo_alpha:
        # per-token NLL of each chosen answer: its own mean, so long and short answers
        # weigh the same and the term stays on the scale of an SFT loss
        sup = (Y != -1).float()  # (R, T)
        n_tokens = sup.sum(-1) if S is None else segment_sums(sup, S)  # (2B,) response tokens
        n_chosen = n_tokens[:len(pi_c)].clamp(min=1)  # (B,)
        losses = losses + rpo_alpha * (-pi_c / n_chosen)
    return losses.sum(), r_c, r_r


def freeze(model):
    """The reference: no gradients (it is never trained, never in the optimizer), eval mode."""
    model.requires_grad_(False)
    return model.eval()


# ----------------------------------------------------------------------------------------
# pairs -> tensors and batches


def pair_example(tok, pair, block_size, report=None):
    """(x_chosen, y_chosen, x_rejected, y_rejected): inputs and targets, -1 off the response.
    The response ends with <|end|>, a target like any other token: stopping is part of it.

    Too long for the block: the prompt loses its OLDEST tokens first, the same ones for both
    answers (a pair compares two answers to one prompt), but keeps at least half the window;
    then each answer is cut to what is left (as TRL does: the log-probabilities of two
    answers' beginnings still compare them). Both are counted in `report`. Returns None when
    the two cut answers are the same tokens: nothing is left to prefer."""
    prompt = ns.chat_prompt(tok, pair["prompt"])
    answers = [ns.encode_content(tok, pair[k]) + [tok.end] for k in ("chosen", "rejected")]
    limit = block_size + 1
    keep = min(len(prompt), max(limit - max(map(len, answers)), limit // 2))
    n, report = pair.get("record", 0), report or formats.DataReport("pairs", unit="pairs")
    cut_prompt, cut_answer = keep < len(prompt), any(len(a) > limit - keep for a in answers)
    prompt, answers = prompt[len(prompt) - keep:], [a[:limit - keep] for a in answers]
    if answers[0] == answers[1]:
        report.skip(n, "whose answers are the same within the block",
                    f"chosen and rejected are the same in their first {limit - keep} tokens")
        return None
    if cut_prompt:
        report.truncate(n, "prompts cut from the left to fit", f"the prompt is longer than the model's block size {block_size}")
    if cut_answer:
        report.truncate(n, "answers cut to fit the block", f"an answer is longer than the model's block size {block_size}")
    return tuple(t for a in answers for t in ns.example_tensors(prompt + a, [0] * len(prompt) + [1] * len(a)))


def pair_examples(tok, pairs, block_size, report):
    """pair_example for many pairs -> (kept pairs, their examples)."""
    kept = [(p, e) for p in pairs if (e := pair_example(tok, p, block_size, report)) is not None]
    report.check(block_size)
    return [p for p, _ in kept], [e for _, e in kept]


def collate_pairs(examples, pad_id, packed=True):
    """B pair examples -> X, Y, S: the 2B sequences, the B chosen then the B rejected.
    packed: several sequences per row (ns.pack; S (R, T) numbers them 0..2B-1), which
    wastes little on padding although a pair's two answers differ in length (a curt "Oslo."
    against a sentence with a closing remark). Otherwise one row each (2B, T), S None
    (needed by a prompt-tuned model, whose prefix belongs at the start of every row)."""
    seqs = [e[:2] for e in examples] + [e[2:] for e in examples]
    return ns.pack(seqs, pad_id) if packed else (*ns.collate(seqs, pad_id), None)


@functools.lru_cache(maxsize=4)
def epoch_order(seed, epoch, n):
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # a stream per (seed, epoch); 1,000,003 is prime
    return torch.randperm(n, generator=g).tolist()


def step_pair_ids(seed, it, batch_size, n):
    """The pair indices of step `it`: consecutive slices of seeded per-epoch permutations.
    Every pair is seen once per epoch and the batch is a pure function of (seed, it), so a
    resumed run continues exactly."""
    return [epoch_order(seed, k // n, n)[k % n] for k in range(it * batch_size, (it + 1) * batch_size)]


@torch.no_grad()
def pair_logprobs(model, examples, ids, pad_id, rt, batch=64):
    """log pi(chosen), log pi(rejected) of the pairs `ids` -> two (N,) tensors (N = len(ids)).
    Pairs are batched in length order to waste little on padding."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(ids)), key=lambda i: max(len(examples[ids[i]][0]), len(examples[ids[i]][2])))
    chosen, rejected = torch.zeros(len(ids)), torch.zeros(len(ids))
    for s in range(0, len(order), batch):
        rows = order[s:s + batch]
        X, Y, S = collate_pairs([examples[ids[i]] for i in rows], pad_id, not model.config.n_prefix)
        with ns.autocast(rt.device, rt.dtype):
            c, r = concatenated_logprobs(model, *(t if t is None else t.to(rt.device) for t in (X, Y, S)))
        chosen[rows], rejected[rows] = c.float().cpu(), r.float().cpu()
    model.train(was_training)
    return chosen, rejected


# ----------------------------------------------------------------------------------------
# evaluation


def heldout_scores(model, examples, ref_c, ref_r, pad_id, rt, args):
    """Implicit rewards on held-out pairs: margins, preference accuracy, and whether the
    plain likelihood already prefers the chosen answer."""
    pi_c, pi_r = pair_logprobs(model, examples, list(range(len(examples))), pad_id, rt)
    _, r_c, r_r = dpo_loss(pi_c, pi_r, ref_c, ref_r, args.beta)
    m = r_c - r_r
    # a tie (exactly zero margin, as before any training) counts as a coin flip
    acc = ((m > 0).float() + 0.5 * (m == 0).float()).mean().item()
    return {"pref_accuracy": acc, "margin": m.mean().item(), "chosen": r_c.mean().item(),
            "rejected": r_r.mean().item(), "logp_accuracy": (pi_c > pi_r).float().mean().item(),
            "margins": m}


@torch.no_grad()
def sample_batch(model, prompts, n_new, stop, generator):
    """Answers sampled at temperature 1 for many prompts at once, the stop token included
    when one was drawn. Prompts are grouped by length, so no padding (and no position
    shift) is needed, as in ns.generate_greedy_batch."""
    device = next(model.parameters()).device
    by_len = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    out = [None] * len(prompts)
    for n, idx in sorted(by_len.items()):
        cache = ns.KVCache(model.config.n_layer)
        logits, _ = model(torch.tensor([prompts[i] for i in idx], device=device), cache=cache, last_only=True)
        seqs, done = [[] for _ in idx], [False] * len(idx)
        for _ in range(n_new):
            probs = F.softmax(logits[:, -1].float(), dim=-1).cpu()  # (b, V)
            nxt = torch.multinomial(probs, 1, generator=generator)  # (b, 1)
            for j, t in enumerate(nxt[:, 0].tolist()):
                if not done[j]:
                    seqs[j].append(t)
                    done[j] = t in stop
            if all(done):
                break
            logits, _ = model(nxt.to(device), cache=cache)
        for j, i in enumerate(idx):
            out[i] = seqs[j]
    return out


@torch.no_grad()
def kl_estimate(model, ref, tok, prompts, rt, seed):
    """KL(pi || pi_ref) per response on held-out prompts. y is sampled from the policy
    (temperature 1, at most KL_TOKENS tokens) and at every position of y we add the exact KL
    of the two next-token distributions: by the chain rule E_y~pi[sum_t KL_t] is the
    sequence-level KL, and the exact per-position KL has less noise than
    log pi(y|x) - log pi_ref(y|x) of the sample alone (and is never negative)."""
    was_training = model.training
    model.eval()
    n_new = min(KL_TOKENS, model.config.block_size // 2)
    ids = [ns.chat_prompt(tok, p)[-(model.config.block_size - n_new):] for p in prompts]
    with ns.autocast(rt.device, rt.dtype):
        ys = sample_batch(model, ids, n_new, {tok.end}, torch.Generator().manual_seed(seed))
    X, Y = ns.collate([ns.example_tensors(x + y, [0] * len(x) + [1] * len(y)) for x, y in zip(ids, ys)], tok.pad)
    X, Y = X.to(rt.device), Y.to(rt.device)
    with ns.autocast(rt.device, rt.dtype):
        lp = F.log_softmax(model(X)[0].float(), -1)  # (N, T, V)
        lq = F.log_softmax(ref(X)[0].float(), -1)    # (N, T, V)
    kl_t = (lp.exp() * (lp - lq)).sum(-1)  # (N, T)
    model.train(was_training)
    return (kl_t * (Y != -1)).sum(-1).mean().item()


def behaviour(model, tok, world, rows, prompts, longest=None):
    """Greedy answers: on the world (rows = questions about held-out people) task accuracy,
    the voted style strictly and loosely (see ns.qa_eval), the degenerate rate and the
    length; on other data only the length."""
    was_training = model.training
    if world is not None:
        r = ns.qa_eval(model, tok, world, rows, longest)
        answers = r.pop("answers")
        r["degenerate_examples"] = [a for a, d in zip(answers, r.pop("degenerate")) if d][:5]
    else:
        answers = greedy(model, tok, prompts, 64)
        r = {"accuracy": None, "clean_style_rate": None, "style_rate": None, "degenerate_rate": None}
    model.train(was_training)
    # length of the answer text re-encoded: the generated count for any well-formed text
    # (only an untrained model's stray byte fragments re-encode longer)
    r["response_tokens"] = sum(len(tok.encode(a)) for a in answers) / max(1, len(answers))
    return r


DEGENERATE_MAX = 0.01  # rewinding: the most degenerate dev answers a chosen checkpoint may give


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


GREEDY_ROOM = 8  # positions a too-long prompt leaves free for the answer in `greedy`


def greedy(model, tok, prompts, max_new_tokens):
    """Greedy answers to chat prompts (lists of messages)."""
    was_training = model.training
    room = model.config.block_size - GREEDY_ROOM  # keep the prompt's end, leave room to answer
    ids = [ns.chat_prompt(tok, p)[-room:] for p in prompts]
    outs = ns.generate_greedy_batch(model, ids, max_new_tokens, stop={tok.end, tok.endoftext})
    model.train(was_training)
    return [tok.decode(o) for o in outs]


def sample_answers(model, tok, eval_rows, held_prompts):
    """The same few prompts, answered greedily before and after: on the world one question
    per attribute about held-out (test-half) people; otherwise the first held-out prompts."""
    if eval_rows is not None:
        seen, prompts = set(), []
        for r in eval_rows:
            if r["attribute"] not in seen:
                seen.add(r["attribute"])
                prompts.append([{"role": "user", "content": r["prompt"]}])
    else:
        prompts = held_prompts[:5]
    return [(p[-1]["content"], a) for p, a in zip(prompts, greedy(model, tok, prompts, 48))]


def plot_logratio(path, title, rows):
    """A token-level heatmap of log pi(y_t|...) - log pi_ref(y_t|...), one strip per
    response: red = DPO pushed the token up, blue = pushed down."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm
    lim = max(1e-3, max(abs(v) for _, _, vals in rows for v in vals))
    norm = TwoSlopeNorm(vmin=-lim, vcenter=0.0, vmax=lim)
    width = max(len(t) for _, t, _ in rows)
    fig, axes = plt.subplots(len(rows), 1, figsize=(max(6.0, 0.45 * width), 2.0 * len(rows)),
                             squeeze=False, constrained_layout=True)
    for ax, (label, tokens, vals) in zip(axes[:, 0], rows):
        im = ax.imshow([vals], cmap="RdBu_r", norm=norm, aspect="auto")
        ax.set_xticks(range(len(tokens)))
        ax.set_xticklabels(tokens, rotation=60, ha="right", fontsize=8)
        ax.set_yticks([])
        ax.set_xlim(-0.5, width - 0.5)
        for i, v in enumerate(vals):
            ax.text(i, 0, f"{v:+.1f}", ha="center", va="center", fontsize=6,
                    color="white" if abs(v) > 0.6 * lim else "black")
        ax.set_title(label, fontsize=9, loc="left")
    fig.suptitle(title, fontsize=10)
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="log pi - log pi_ref (nats)", shrink=0.9, pad=0.01)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)


@torch.no_grad()
def token_logratios(model, ref, tok, example, rt, max_tokens=40):
    """Per-token log pi - log pi_ref over one response (its first max_tokens tokens)."""
    x, y = example
    X, Y = x[None].to(rt.device), y[None].to(rt.device)
    with ns.autocast(rt.device, rt.dtype):
        d = token_logprobs(model(X)[0], Y) - token_logprobs(ref(X)[0], Y)  # (1, T)
    keep = (Y[0] != -1).nonzero().squeeze(-1)[:max_tokens]
    tokens = [tok.decode([t]).replace(" ", "\u00b7").replace("\n", "\\n") for t in Y[0, keep].tolist()]
    return tokens, d[0, keep].tolist()


# ----------------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = ns.ArgumentParser(__doc__)
    ap.add_argument("--ckpt", default="out/sft.pt", help="starting checkpoint (sft); also the frozen reference")
    ap.add_argument("--data", default=WORLD_VOTES, help="preference file (formats above)")
    ap.add_argument("--beta", type=float, help="strength of the KL anchor to the reference")
    ap.add_argument("--loss", choices=["sigmoid", "ipo"], help="sigmoid: DPO (Eq. 7); ipo: Azar et al.")
    ap.add_argument("--label-smoothing", type=float, help="conservative DPO: assumed label-flip rate eps")
    ap.add_argument("--rpo-alpha", type=float, help="add alpha x the chosen answers' per-token NLL (0 = off)")
    ap.add_argument("--min-margin", type=float, help="votes/scores: least difference that makes a pair")
    ap.add_argument("--pairs", choices=["top", "all"],
                    help="votes/scores: the top answer against each other one, or every two answers")
    ap.add_argument("--no-ref-cache", action="store_true",
                    help="run the reference every step instead of caching its log-probs once")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--log-interval", type=int)
    ap.add_argument("--strict", action="store_true",
                    help="a pair that would be skipped or truncated (a tie, a duplicate, too long) "
                    "is an error instead")
    ns.add_common_args(ap)
    ap.set_defaults(**DEFAULTS)
    args = ap.parse_args(argv)
    ns.check_args(args)
    if not 0 <= args.label_smoothing < 0.5:
        raise ns.UserError(f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.loss == "ipo" and args.label_smoothing:
        raise ns.UserError("--label-smoothing applies to the sigmoid loss (add --loss sigmoid), not to --loss ipo")
    for name in ("rpo_alpha", "min_margin"):
        v = getattr(args, name)
        if not (math.isfinite(v) and v >= 0):
            raise ns.UserError(f"--{name.replace('_', '-')} must be a number >= 0, got {v}")
    return args


def main(argv=None):
    args = parse_args(argv)
    rt = ns.setup_runtime(args)
    ckpt_path = os.path.join(args.out_dir, "dpo.pt")          # the rewound checkpoint: what later stages use
    final_path = os.path.join(args.out_dir, "dpo_final.pt")   # the last step, with the state --resume needs
    path_dir = os.path.join(args.out_dir, "dpo_path")
    t_start = time.time()

    # ---- reference, policy and data (everything is validated before anything is written)
    ck0 = ns.load_checkpoint(args.ckpt, expect_kind=("sft", "dpo", "pretrain"))
    if ck0["kind"] == "pretrain":
        rt.log(f"warning: {args.ckpt} is a pre-trained checkpoint, not SFT; DPO expects a model "
               "that already answers in the chat format")
    ref, tok = ns.model_from_checkpoint(ck0, args.ckpt)
    is_world = os.path.abspath(args.data) == os.path.abspath(WORLD_VOTES)
    report = formats.DataReport(args.data, args.strict, unit="pairs")
    if is_world:  # train on the training people's threads; hold out whole PEOPLE
        fmt, train_pairs = formats.read_pairs(args.data, args.min_margin, args.pairs == "top", report)
        held_pairs = formats.read_pairs(WORLD_EVAL_VOTES, args.min_margin, args.pairs == "top")[1]
    else:
        fmt, train_pairs, held_pairs = formats.load_preferences(args.data, args.min_margin, args.seed,
                                                        args.pairs == "top", report)
    if args.resume:
        ck = ns.load_checkpoint(final_path, expect_kind=("dpo",))
        model, _ = ns.model_from_checkpoint(ck, final_path)
        if ck["config"] != ck0["config"]:
            raise ns.UserError(f"{final_path}: model config differs from the reference {args.ckpt}")
        start_iter, state = ck["iter"], ck["metrics"]
        torch.set_rng_state(ck["rng"]["torch"])
    else:
        model, _ = ns.model_from_checkpoint(ck0, args.ckpt)  # an independent copy: the policy
        start_iter, state, ck = 0, None, None
    ref = freeze(ref).to(rt.device)
    cfg = model.config
    packed = not cfg.n_prefix  # several sequences per row (see collate_pairs)
    train_pairs, train_ex = pair_examples(tok, train_pairs, cfg.block_size, report)
    held_pairs, held_ex = pair_examples(tok, held_pairs, cfg.block_size, report if not is_world else
                                        formats.DataReport(WORLD_EVAL_VOTES, args.strict, unit="pairs"))
    for line in report.lines():
        rt.log(line)
    n_held = len(held_pairs)
    step = max(1, n_held // EVAL_PAIRS)  # scored at every eval: an evenly spaced subset
    held_pairs, held_ex = held_pairs[::step][:EVAL_PAIRS], held_ex[::step][:EVAL_PAIRS]
    rt.log(f"{args.data}: {fmt} format, {len(train_pairs):,} train / {n_held:,} held-out pairs "
           f"({len(held_pairs)} scored) | {model.num_params():,} parameters | {rt.device} {rt.dtype}")
    B = args.batch_size
    if B % (rt.world * args.grad_accum):
        raise ns.UserError(f"--batch-size {B} must be divisible by processes x --grad-accum "
                           f"({rt.world} x {args.grad_accum})")
    model.to(rt.device).train()
    optimizer = ns.configure_optimizer(model, args.lr, device_type=rt.device.type)
    if ck is not None and ck.get("optimizer"):
        optimizer.load_state_dict(ck["optimizer"])
    ddp_model = ns.wrap_ddp(torch.compile(model) if args.compile else model, rt)
    world = ns.load_world() if is_world else None
    dev_rows, test_rows = ns.heldout_halves() if is_world else (None, None)
    longest = ns.world_longest() if is_world else None
    held_prompts = list({str(p["prompt"]): p["prompt"] for p in held_pairs or train_pairs[:64]}.values())

    # ---- the reference's log-probs, once: for the pairs this run's steps will visit (this
    # rank's shard) and for the held-out pairs. A step then costs one policy forward.
    t0 = time.time()
    shard = lambda it: step_pair_ids(args.seed, it, B, len(train_ex))[rt.rank::rt.world]
    ref_c, ref_r = torch.full((len(train_ex),), math.nan), torch.full((len(train_ex),), math.nan)
    if not args.no_ref_cache:
        need = sorted({i for it in range(start_iter, args.max_iters) for i in shard(it)})
        ref_c[need], ref_r[need] = pair_logprobs(ref, train_ex, need, tok.pad, rt)
    held_ref = pair_logprobs(ref, held_ex, list(range(len(held_ex))), tok.pad, rt)
    rt.log(f"reference log-probs cached in {time.time() - t0:.1f}s")

    # ---- before: the reference IS the starting model
    if state is None:
        dev0 = behaviour(ref, tok, world, dev_rows, None, longest) if world else None  # path[0]
        state = {"before": behaviour(ref, tok, world, test_rows, held_prompts[:64], longest), "train": {},
                 # step 0 needs no measuring: policy == reference, so every margin and the KL are 0
                 "eval": {"step": [0], "margin": [0.0 if held_ex else None],
                          "pref_accuracy": [0.5 if held_ex else None], "kl": [0.0]},
                 "path": [{"step": 0, **dev0}] if world else [],
                 "samples_before": sample_answers(ref, tok, test_rows, held_prompts)}
    before = state["before"]
    if world:
        rt.log(f"before (test half): held-out accuracy {before['accuracy']:.3f} | clean style "
               f"{before['clean_style_rate']:.3f} | degenerate {before['degenerate_rate']:.3f} | "
               f"{before['response_tokens']:.1f} tokens per answer")

    # ---- batches: this rank's share of the step's pairs, cut into micro-batches
    sums = {}  # step -> [sum rewards/chosen, sum rewards/rejected, sum correct, pairs]

    def get_batch(it):
        ids = torch.tensor(shard(it))
        return [(*collate_pairs([train_ex[i] for i in c.tolist()], tok.pad, packed), c, it)
                for c in ids.chunk(args.grad_accum)], B

    def loss_fn(m, mb):
        X, Y, S, ids, it = mb  # it: the step this micro-batch belongs to (for the logged rewards)
        X, Y = X.to(rt.device), Y.to(rt.device)
        S = S if S is None else S.to(rt.device)
        if args.no_ref_cache:
            with torch.no_grad():
                rc, rr = concatenated_logprobs(ref, X, Y, S)
        else:
            rc, rr = ref_c[ids].to(rt.device), ref_r[ids].to(rt.device)
        loss, r_c, r_r = pair_loss(m, X, Y, rc, rr, args.beta, args.loss, args.label_smoothing, args.rpo_alpha, S)
        s = torch.stack([r_c.sum(), r_r.sum(), (r_c > r_r).float().sum(), torch.tensor(float(len(ids)))])
        sums[it] = sums.get(it, 0) + s.float().cpu()
        return loss

    def evaluate(it):
        steps = sorted(sums)
        tot = torch.stack([sums.pop(s) for s in steps]) if steps else torch.zeros(0, 4)  # (S, 4)
        if rt.world > 1:
            import torch.distributed as dist
            dist.all_reduce(tot)
        if not rt.master:
            return
        tr = state["train"]
        for s, (c, r, a, n) in zip(steps, tot.tolist()):
            for k, v in (("step", s + 1), ("rewards/chosen", c / n), ("rewards/rejected", r / n),
                         ("rewards/margins", (c - r) / n), ("rewards/accuracies", a / n)):
                tr.setdefault(k, []).append(v)
        ev = state["eval"]
        h = heldout_scores(model, held_ex, *held_ref, tok.pad, rt, args) if held_ex else None
        kl = kl_estimate(model, ref, tok, held_prompts[:KL_PROMPTS], rt, args.seed)
        ev["step"].append(it)
        ev["margin"].append(h and h["margin"])
        ev["pref_accuracy"].append(h and h["pref_accuracy"])
        ev["kl"].append(kl)
        if steps:
            c, r, a, n = tot.sum(0).tolist()
            rt.log(f"step {it}: rewards/chosen {c / n:+.3f} | rewards/rejected {r / n:+.3f} | "
                   f"rewards/margins {(c - r) / n:+.3f} | rewards/accuracies {a / n:.3f} (train, "
                   f"since the last eval)")
        rt.log(f"eval step {it}: held-out pref accuracy {h and round(h['pref_accuracy'], 3)} | "
               f"held-out margin {h and round(h['margin'], 3)} | KL(pi||ref) {kl:.3f} nats/answer")
        if world:  # a point of the path: dev behaviour, and the weights to rewind to
            if not state["path"] or state["path"][-1]["step"] != it:
                d = behaviour(model, tok, world, dev_rows, None, longest)
                state["path"].append({"step": it, **d})
                rt.log(f"eval step {it} (dev): accuracy {d['accuracy']:.3f} | clean style "
                       f"{d['clean_style_rate']:.3f} | degenerate {d['degenerate_rate']:.3f}")
            ns.save_checkpoint(os.path.join(path_dir, f"step{it:05d}.pt"),
                               ns.checkpoint_dict("dpo", model, tok, None, it, args))
        ns.save_checkpoint(final_path, ns.checkpoint_dict("dpo", model, tok, optimizer, it, args, state))

    def on_eval(it):
        evaluate(it)
        ns.barrier(rt)

    # ---- train
    it, seconds, tok_per_s = ns.train_loop(rt, ddp_model, optimizer, ns.Loop.of(args), start_iter,
                                           get_batch, loss_fn, on_eval)

    # ---- rewinding (world: on the dev half), then after: evaluate, plot, report
    if not rt.master:
        return
    chosen_step = it
    if world:
        chosen_step = rewind(state["path"])["step"]
        if chosen_step != it:
            rewound = ns.load_checkpoint(os.path.join(path_dir, f"step{chosen_step:05d}.pt")) if chosen_step else ck0
            model.load_state_dict(ns.model_from_checkpoint(rewound)[0].state_dict())
    after = behaviour(model, tok, world, test_rows, held_prompts[:64], longest)
    h = heldout_scores(model, held_ex, *held_ref, tok.pad, rt, args) if held_ex else {}
    samples = [{"prompt": p, "before": b, "after": a} for (p, b), a in
               zip(state["samples_before"], [a for _, a in sample_answers(model, tok, test_rows, held_prompts)])]
    kl = kl_estimate(model, ref, tok, held_prompts[:KL_PROMPTS], rt, args.seed)
    result = {"pref_accuracy_heldout": h.get("pref_accuracy"),
              # before training every implicit reward is 0: a tie, counted as a coin flip
              "pref_accuracy_heldout_before": 0.5 if held_ex else None,
              # does the plain likelihood prefer the chosen answer (length-biased; for reference)
              "logp_accuracy_heldout_before": (held_ref[0] > held_ref[1]).float().mean().item() if held_ex else None,
              "logp_accuracy_heldout_after": h.get("logp_accuracy"),
              "heldout_reward_margin": h.get("margin"),
              "heldout_pairs_from": "people never trained on (data/world_community_eval.jsonl)" if world
                                    else "held-out records of --data",
              "rewound_step": chosen_step, "final_step": it,
              "rewind_rule": (f"latest dev-half checkpoint within 0.01 of the best clean-style rate among "
                              f"those with degenerate rate <= {DEGENERATE_MAX} and task accuracy >= start - 0.01")
                             if world else "none (no behaviour checks on this data): the last step",
              "kl": kl, "seconds": time.time() - t_start, "train_seconds": seconds, "steps": it,
              "tokens_per_sec": tok_per_s, "data": args.data, "format": fmt, "data_report": report.state(),
              "pairs_train": len(train_pairs), "pairs_heldout": n_held, "pairs_heldout_scored": len(held_pairs),
              "beta": args.beta, "loss": args.loss, "label_smoothing": args.label_smoothing,
              "rpo_alpha": args.rpo_alpha, "lr": args.lr, "batch_size": B,
              "pairs": args.pairs, "min_margin": args.min_margin,
              "device": str(rt.device), "dtype": rt.dtype, "samples": samples,
              "history": {"train": state["train"], "eval": state["eval"], "path": state.get("path", [])}}
    for k in ("accuracy", "clean_style_rate", "style_rate", "degenerate_rate", "response_tokens"):
        name = "heldout_accuracy" if k == "accuracy" else k
        result[f"{name}_before"], result[f"{name}_after"] = before[k], after[k]
    result["degenerate_examples_after"] = after.get("degenerate_examples")
    ns.save_checkpoint(ckpt_path, ns.checkpoint_dict("dpo", model, tok, None, it, args,
                                                     {k: v for k, v in result.items() if isinstance(v, (int, float, str))}))
    ns.write_json(os.path.join(args.out_dir, "dpo.json"), result)

    if held_ex:  # the held-out pair with the largest margin now: which tokens moved
        k = int(h["margins"].argmax())
        rows = []
        for name, ex in (("chosen", held_ex[k][:2]), ("rejected", held_ex[k][2:])):
            toks, vals = token_logratios(model, ref, tok, ex, rt)
            rows.append((f"{name}: {sum(vals):+.2f} nats in all", toks, vals))
        prompt = held_pairs[k]["prompt"][-1]["content"]
        plot_logratio(os.path.join(args.out_dir, "dpo_logratio.png"), f"prompt: {prompt[:100]}", rows)
    tr, ev = state["train"], state["eval"]
    series = {"train (per step)": (tr.get("step", []), tr.get("rewards/margins", []))}
    if held_ex:
        series["held-out"] = (ev["step"], ev["margin"])
    ns.plot(os.path.join(args.out_dir, "dpo_margin.png"), "DPO reward margin",
            "step", "beta x (log-ratio chosen - log-ratio rejected)", series)
    fmt_num = lambda v: "n/a" if v is None else f"{v:.3f}"
    rt.log(f"rewound to step {chosen_step} of {it}" if world else f"{it} steps")
    rt.log(f"done: held-out pref accuracy {fmt_num(result['pref_accuracy_heldout'])} | clean style "
           f"{fmt_num(result['clean_style_rate_before'])} -> {fmt_num(result['clean_style_rate_after'])} | "
           f"degenerate {fmt_num(result['degenerate_rate_before'])} -> {fmt_num(result['degenerate_rate_after'])} | "
           f"held-out accuracy {fmt_num(result['heldout_accuracy_before'])} -> "
           f"{fmt_num(result['heldout_accuracy_after'])} | KL {result['kl']:.3f} | answer tokens "
           f"{result['response_tokens_before']:.1f} -> {result['response_tokens_after']:.1f} | "
           f"{result['seconds']:.0f}s -> {ckpt_path}")


if __name__ == "__main__":
    ns.cli(main)
