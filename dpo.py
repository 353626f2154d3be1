"""
Stage 3: Direct Preference Optimization (DPO), from scratch, against a frozen reference.

    python dpo.py --ckpt out/sft.pt                       # the world's community votes -> out/dpo.pt
    python dpo.py --ckpt out/sft.pt --data pairs.jsonl    # {"prompt","chosen","rejected"} lines
    python dpo.py --ckpt out/sft.pt --loss sigmoid --lr 4e-5   # the DPO paper's loss (Eq. 7)
    python dpo.py --ckpt out/sft.pt --resume              # continue out/dpo_last.pt
    torchrun --nproc_per_node 2 dpo.py --ckpt out/sft.pt  # several processes (DDP)

SFT taught the model WHAT to answer; DPO refines HOW, from pairs "this answer is better than
that one" (here read off a community's votes). The policy starts as a copy of the starting
checkpoint, the reference is that checkpoint frozen, and the loss raises the policy's
log-probability of each chosen answer relative to the reference and lowers the rejected
one's: no reward model, no sampling. The DEFAULT loss is IPO (Azar et al. 2023, --loss ipo):
it pulls each pair's log-ratio gap to 1 / (2 beta) nats and no further; --loss sigmoid is
the DPO paper's, which keeps pushing. On the world the run is rewound along its own path.

Preference formats (data/formats.py, detected from the first record): votes (the world's:
{"prompt", "answers": [{"text", "up", "down"}]}), pairs ({"prompt", "chosen", "rejected"}),
conversational (TRL's messages), hh (Anthropic HH), alpaca, sharegpt, scores ({"prompt",
"responses": [{"text", "score"}]}). Votes and scores pair answers whose net votes or scores
differ by at least --min-margin. Writes out/dpo.pt (the rewound policy), out/dpo_last.pt
(for --resume), out/dpo_path/, out/dpo.json, out/dpo_logratio.png and out/dpo_margin.png.
"""
import functools
import math
import os
import time

from extras import dpo_eval, packing
from extras import hf  # noqa: F401  (--ckpt may name a Hugging Face GPT-2 directory)
import nanosft as ns
import torch
import torch.nn.functional as F
from data import formats
from data import world_eval as we

# Every default of this stage in one place (calibrated on the default world; change here).
# The loss is IPO: it pulls every pair's log-ratio gap to 1 / (2 beta) = 5 nats and no
# further. On the acceptance seeds the DPO paper's loss (--loss sigmoid) cost up to 2 points
# of task accuracy and fell below 0.90 preference accuracy on two of five; IPO kept both, but
# reaches the voted closing only when SFT learned it well enough. Measured: docs/dpo.md.
DEFAULTS = dict(max_iters=300, batch_size=16, lr=6e-5, eval_interval=50, warmup=20,
                log_interval=25, beta=0.1, loss="ipo", label_smoothing=0.0, rpo_alpha=0.1,
                min_margin=10.0, pairs="top")
EVAL_PAIRS = 2048      # held-out pairs scored at each evaluation (more: an evenly spaced subset;
                       # the world's 1,333 are all scored: 512 of them left a sampling error of
                       # +-1.3 points on a preference accuracy near 0.90)
HELDOUT_RULE = (10.0, True)  # the world's held-out pairs, whatever --min-margin and --pairs train on:
                             # each thread's top answer against those it beat by >= 10 net votes
DEGENERATE_MAX = 0.01  # rewinding: the most degenerate dev answers a chosen checkpoint may give


def parse_args(argv=None):
    ap = ns.ArgumentParser(__doc__)
    ap.add_argument("--ckpt", default="out/sft.pt", help="starting checkpoint (sft); also the frozen reference")
    ap.add_argument("--data", default=we.THREADS, help="preference file (formats above)")
    ap.add_argument("--beta", type=float, help="strength of the KL anchor to the reference")
    ap.add_argument("--loss", choices=["sigmoid", "ipo", "hinge"], help="sigmoid: DPO (Eq. 7); ipo: Azar et al.")
    ap.add_argument("--label-smoothing", type=float, help="conservative DPO: assumed label-flip rate eps")
    ap.add_argument("--rpo-alpha", type=float, help="add alpha x the chosen answers' per-token NLL (0 = off)")
    ap.add_argument("--min-margin", type=float, help="votes/scores: least difference that makes a pair")
    ap.add_argument("--pairs", choices=["top", "all"],
                    help="votes/scores: the top answer against each other one, or every two answers (the "
                    "world's held-out pairs stay the same: HELDOUT_RULE)")
    ap.add_argument("--no-ref-cache", action="store_true",
                    help="run the reference every step instead of caching its log-probs once")
    ap.add_argument("--warmup", type=int)
    ap.add_argument("--log-interval", type=int)
    ap.add_argument("--strict", action="store_true", help="a pair that would be skipped or truncated "
                    "(a tie, a duplicate, too long) is an error instead")
    ns.add_common_args(ap)
    ap.set_defaults(**DEFAULTS)
    args = ap.parse_args(argv)
    if not 0 <= args.label_smoothing < 0.5:
        raise ns.UserError(f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.loss == "ipo" and args.label_smoothing:
        raise ns.UserError("--label-smoothing applies to the sigmoid loss (add --loss sigmoid), not to --loss ipo")
    for name in ("rpo_alpha", "min_margin"):
        v = getattr(args, name)
        if not (math.isfinite(v) and v >= 0):
            raise ns.UserError(f"--{name.replace('_', '-')} must be a number >= 0, got {v}")
    return args


# ----------------------------------------------------------------------------------------
# the data: preference pairs -> tensors -> batches


def collate_pairs(examples, pad_id, packed=True):
    """B pair examples -> X, Y, S: the 2B sequences, the B chosen then the B rejected.
    packed: several sequences per row (packing.pack; S (R, T) numbers them 0..2B-1), which
    wastes little on padding although a pair's two answers differ in length (a curt "Oslo."
    against a sentence with a closing remark). Otherwise one row each (2B, T), S None
    (needed by a prompt-tuned model, whose prefix belongs at the start of every row)."""
    seqs = [e[:2] for e in examples] + [e[2:] for e in examples]
    return packing.pack(seqs, pad_id) if packed else (*ns.collate(seqs, pad_id), None)


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
    """log pi(chosen), log pi(rejected) of the pairs `ids` -> two (N,) tensors over all N
    examples, NaN off `ids`. Batched in length order, to waste little on padding. The frozen
    reference's are computed once, before training: a step then costs one policy forward."""
    order = sorted(ids, key=lambda i: max(len(examples[i][0]), len(examples[i][2])))
    chosen, rejected = torch.full((len(examples),), math.nan), torch.full((len(examples),), math.nan)
    for s in range(0, len(order), batch):
        rows = order[s:s + batch]
        X, Y, S = collate_pairs([examples[i] for i in rows], pad_id, not model.config.n_prefix)
        with ns.autocast(rt.device, rt.dtype):
            c, r = concatenated_logprobs(model, *(t if t is None else t.to(rt.device) for t in (X, Y, S)))
        chosen[rows], rejected[rows] = c.float().cpu(), r.float().cpu()
    return chosen, rejected


def freeze(model):
    """The reference: no gradients (it is never trained, never in the optimizer), eval mode."""
    model.requires_grad_(False)
    return model.eval()


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
    segments (B, T), for packed rows (packing.pack): sum per sequence instead of per row, giving
    (N,) for the N = segments.max() + 1 sequences."""
    lp = token_logprobs(logits, labels)  # (B, T)
    lp = torch.where(mask.bool(), lp, torch.zeros_like(lp))  # (B, T)
    return lp.sum(-1) if segments is None else packing.segment_sums(lp, segments)  # (B,) or (N,)


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
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def concatenated_logprobs(model, X, Y, S=None):
    """Chosen and rejected responses in ONE forward. Unpacked (S None): X, Y (2B, T) hold
    the B chosen rows first, then the B rejected rows. Packed (collate_pairs): X, Y, S
    (R, T) hold the 2B sequences in R <= 2B rows, S numbering them the same way (chosen
    0..B-1, rejected B..2B-1). One forward instead of two halves the kernel launches and,
    under DDP, keeps a single forward per backward. Returns two (B,) tensors."""
    block = getattr(model, "module", model).config.block_size  # (DDP holds the model in .module)
    layout = None if S is None else packing.packed_layout(S, block)
    logits = model(X)[0] if S is None else packing.packed_logits(model, X, layout)  # (R, T, V)
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
        n_tokens = sup.sum(-1) if S is None else packing.segment_sums(sup, S)  # (2B,) response tokens
        n_chosen = n_tokens[:len(pi_c)].clamp(min=1)  # (B,)
        losses = losses + rpo_alpha * (-pi_c / n_chosen)
    return losses.sum(), r_c, r_r


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


REWIND_RULE = (f"latest dev-half checkpoint within 0.01 of the best clean-style rate among "
               f"those with degenerate rate <= {DEGENERATE_MAX} and task accuracy >= start - 0.01")  # for dpo.json


# ----------------------------------------------------------------------------------------
# the run


def main(argv=None):
    args = parse_args(argv)
    rt = ns.setup_runtime(args.device, args.dtype)
    t_start, flags, B = time.time(), vars(args), args.batch_size
    step_path = lambda it: os.path.join(args.out_dir, "dpo_path", f"step{it:05d}.pt")  # what rewinding picks from

    # ---- load: the reference, the policy (a copy of it) and the pairs, all checked before anything is written
    ck0 = ns.load_checkpoint(args.ckpt, expect_kind=("sft", "dpo", "pretrain"))
    if ck0["kind"] == "pretrain":
        rt.log(f"warning: {args.ckpt} is a pre-trained checkpoint, not SFT; DPO expects a model "
               "that already answers in the chat format")
    ref, tok = ns.model_from_checkpoint(ck0, args.ckpt)
    model, _ = ns.model_from_checkpoint(ck0, args.ckpt)  # an independent copy: the policy
    ref, world = freeze(ref).to(rt.device), we.is_default(args.data, we.THREADS)
    (train_pairs, train_ex), (held_pairs, held_ex), counts = formats.load_pairs(
        args.data, we.EVAL_THREADS if world else None, tok, model.config.block_size, args.min_margin,
        args.pairs == "top", args.seed, args.strict, rt.log, EVAL_PAIRS, heldout_rule=HELDOUT_RULE if world else None)
    rt.log(f"{args.data}: {counts['format']} format, {len(train_ex):,} train / {counts['pairs_heldout']:,} held-out pairs "
           f"({len(held_ex)} scored) | {model.num_params():,} parameters | {rt.device} {rt.dtype}")
    model.to(rt.device).train()
    optimizer = ns.configure_optimizer(model, args.lr, device_type=rt.device.type)
    start_iter, state = ns.resume(args.out_dir, "dpo", model, tok, optimizer) if args.resume else (0, {})

    # ---- the reference's log-probs, once: for the pairs this run's steps will visit (this
    # rank's shard) and for the held-out pairs. A step then costs one policy forward.
    t0, shard = time.time(), lambda it: step_pair_ids(args.seed, it, B, len(train_ex))[rt.rank::rt.world]
    need = [] if args.no_ref_cache else sorted({i for it in range(start_iter, args.max_iters) for i in shard(it)})
    ref_c, ref_r = pair_logprobs(ref, train_ex, need, tok.pad, rt)
    score = (lambda m: pair_logprobs(m, held_ex, range(len(held_ex)), tok.pad, rt)) if held_ex else None
    ev = dpo_eval.Evaluator(ref, tok, held_pairs or train_pairs[:64], score, world, args.beta, args.seed, rt)
    rt.log(f"reference log-probs cached in {time.time() - t0:.1f}s")
    state = ev.begin(state)  # before: the reference IS the starting model

    # ---- batches (this rank's share of the step's pairs, in micro-batches) and the loss
    rewards = dpo_eval.Rewards()  # the training pairs' implicit rewards, logged at every evaluation
    get_batch = lambda it: ([(*collate_pairs([train_ex[i] for i in c.tolist()], tok.pad, not model.config.n_prefix),
                              c, it) for c in torch.tensor(shard(it)).chunk(args.grad_accum)], B)

    def loss_fn(m, mb):
        (X, Y, S), (ids, it) = (t if t is None else t.to(rt.device) for t in mb[:3]), mb[3:]
        if args.no_ref_cache:
            with torch.no_grad():
                rc, rr = concatenated_logprobs(ref, X, Y, S)
        else:
            rc, rr = ref_c[ids].to(rt.device), ref_r[ids].to(rt.device)
        loss, r_c, r_r = pair_loss(m, X, Y, rc, rr, args.beta, args.loss, args.label_smoothing, args.rpo_alpha, S)
        rewards.add(it, r_c, r_r)  # `it`: the step this micro-batch belongs to
        return loss

    # ---- loop: every --eval-interval steps evaluate, keep the path's step (world), save dpo_last.pt
    def on_eval(it):
        rewards.log(state["train"], it, rt)
        if rt.master:
            ev.evaluate(model, state, it)
            if world:
                ns.save_checkpoint(step_path(it), ns.checkpoint_dict("dpo", model, tok, None, it, flags))
            ns.save_checkpoint(ns.last_path(args.out_dir, "dpo"),
                               ns.checkpoint_dict("dpo", model, tok, optimizer, it, flags, state=state))
        ns.barrier(rt)

    it, seconds, tok_per_s = ns.train_loop(rt, ns.wrap_ddp(torch.compile(model) if args.compile else model, rt),
                                           optimizer, ns.Loop.of(vars(args)), start_iter, get_batch, loss_fn, on_eval)
    if not rt.master:
        return

    # ---- rewind (world: the latest good point of the dev half's path), evaluate after, save, report
    chosen = rewind(state["path"])["step"] if world else it
    if chosen != it:  # the path's weights at that step (step 0: the starting checkpoint)
        model.load_state_dict((ns.load_checkpoint(step_path(chosen)) if chosen else ck0)["model"])
    result, held = dpo_eval.summary(ev, model, state, REWIND_RULE)
    result.update(rewound_step=chosen, final_step=it, seconds=time.time() - t_start, train_seconds=seconds, steps=it,
                  tokens_per_sec=tok_per_s, **counts, device=str(rt.device), dtype=rt.dtype, **{k: flags[k] for k in (
                      "beta", "loss", "label_smoothing", "rpo_alpha", "lr", "batch_size", "pairs", "min_margin")})
    ns.save_checkpoint(os.path.join(args.out_dir, "dpo.pt"), ns.checkpoint_dict(
        "dpo", model, tok, None, it, flags, {k: v for k, v in result.items() if isinstance(v, (int, float, str))}))
    if held_ex:  # the held-out pair with the largest margin now: which tokens moved
        k = int(held["margins"].argmax())
        png = os.path.join(args.out_dir, "dpo_logratio.png")
        dpo_eval.plot_logratio(png, model, ref, tok, held_pairs[k], held_ex[k], rt, token_logprobs)
    dpo_eval.report(rt, args.out_dir, result)


if __name__ == "__main__":
    from extras.cpu import tune_cpu
    tune_cpu()  # OpenMP wait policy, heap settings: see extras/cpu.py
    ns.cli(main)
