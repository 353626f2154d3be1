"""
Stage 3: Direct Preference Optimization (DPO), from scratch, against a frozen reference.

    python dpo.py --ckpt out/sft.pt                       # the world's community votes
                                                          # -> out/dpo.pt
    python dpo.py --ckpt out/sft.pt --data pairs.jsonl    # {"prompt","chosen","rejected"} lines
    python dpo.py --ckpt out/sft.pt --loss sigmoid --rpo-alpha 0   # the DPO paper's loss
                                                                   # (Eq. 7), nothing added
    python dpo.py --ckpt out/sft.pt --rewind --plot       # keep the latest good point of the
                                                          # dev half's path; charts
    python dpo.py --ckpt out/sft.pt --resume              # continue out/dpo_last.pt
    torchrun --nproc_per_node 2 dpo.py --ckpt out/sft.pt  # several processes (DDP)

SFT taught the model WHAT to answer; DPO refines HOW, from pairs "this answer is better than
that one" (here read off a community's votes): the policy starts as a copy of the starting
checkpoint, the reference is that checkpoint frozen, and the loss raises each chosen answer's
log-probability relative to the reference and lowers the rejected one's. No reward model, no
sampling. The default loss is IPO plus 0.1 x the chosen answer's per-token NLL, not the paper's
Eq. 7 (that is --loss sigmoid --rpo-alpha 0): IPO pulls each pair's gap to a target instead of
pushing it without end, and the NLL term keeps the chosen answers likely (DEFAULTS says more).
Reported (dpo.json): the held-out pairs' preference accuracy and margin, the KL to the reference
and, on the world, the answers' task accuracy, clean style and degenerate rate before and after.
Writes out/dpo.pt (the final weights), dpo_last.pt (--resume) and dpo.json. Formats:
docs/own_data.md.
"""

import os
import time

import nanosft
import torch
from torch.nn import functional
from data import preferences, world_eval, world_qa

# Every default of this stage in one place. The loss is IPO plus rpo_alpha 0.1 x the chosen
# answer's per-token NLL, not the DPO paper's Eq. 7 (--loss sigmoid --rpo-alpha 0): on the
# acceptance seeds Eq. 7 fell to 0.890 held-out preference accuracy, and without the NLL term
# the chosen answers lose likelihood too and what they free lands on degenerate text, a
# repeated closing (docs/dpo.md).
DEFAULTS = dict(
    max_iters=300,
    batch_size=16,
    lr=6e-5,
    eval_interval=50,
    warmup=20,
    log_interval=25,
    beta=0.1,
    loss="ipo",
    label_smoothing=0.0,
    rpo_alpha=0.1,
    min_margin=10.0,
    pairs="top",
    strict=False,  # this and below: flags of extras/flags.py
    pack=False,
    rewind=False,
)
EVAL_PAIRS = 2048  # held-out pairs scored at each evaluation (more: an evenly spaced subset)
HELDOUT_RULE = (
    10.0,
    True,
)  # the world's held-out pairs, whatever --min-margin and --pairs train on:
# each thread's top answer against those it beat by >= 10 net votes
KL_PROMPTS, KL_TOKENS = 32, 32  # the KL estimate: held-out prompts, and tokens sampled for each


# ----------------------------------------------------------------------------------------
# the loss: pure functions of summed log-probs
def dpo_loss(
    policy_chosen,
    policy_rejected,
    ref_chosen,
    ref_rejected,
    beta,
    loss_type="sigmoid",
    label_smoothing=0.0,
):
    """Per-pair losses (B,) and the implicit rewards of chosen and rejected, each (B,), from the
    summed log-probs (B,) of each answer under the policy pi and the frozen reference pi_ref.
    DPO (Rafailov et al. 2023, Eq. 7), y_w the chosen (winning) answer, y_l the rejected one:

        L_DPO = -log sigma(beta h),
            h = log pi(y_w|x) / pi_ref(y_w|x) - log pi(y_l|x) / pi_ref(y_l|x)

    beta log pi(y|x) / pi_ref(y|x) is the implicit reward of y: a Bradley-Terry reward defined
    through the policy itself, so the policy that maximises it comes for free. Beside Eq. 7:
    label_smoothing eps (conservative DPO, each label flipped with probability eps)
    -(1 - eps) log sigma(beta h) - eps log sigma(-beta h); "ipo" (Azar et al. 2023)
    (h - 1/(2 beta))^2, which pulls h to a fixed target instead of pushing it without end;
    "hinge" (SLiC) max(0, 1 - beta h)."""
    chosen_ratio = policy_chosen - ref_chosen  # log pi(y_w|x) / pi_ref(y_w|x), (B,)
    rejected_ratio = policy_rejected - ref_rejected  # log pi(y_l|x) / pi_ref(y_l|x), (B,)
    h = chosen_ratio - rejected_ratio  # (B,)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * functional.logsigmoid(
            beta * h
        ) - label_smoothing * functional.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def token_logprobs(logits, labels):
    """log p(label_t | tokens < t) at every position: (B, T, V), (B, T) -> (B, T).
    Labels of -1 (not supervised) read token 0; callers mask those positions out."""
    logp = functional.log_softmax(logits.float(), dim=-1)  # (B, T, V), fp32 even under autocast
    return logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)


def per_sequence(values, segments=None):
    """(R, T) per-token values -> (R,) sums per row, or (N,) per sequence of packed rows
    (--pack)."""
    if segments is None:
        return values.sum(-1)
    from extras import packing  # packed rows (collate_pairs)

    return packing.segment_sums(values, segments)


def sequence_logprobs(logits, labels, mask, segments=None):
    """log pi(y|x) of each response: the SUM of its tokens' log-probs. (B, T, V) -> (B,)

    The sum, not the mean, because DPO's derivation compares probabilities of whole
    sequences: log pi(y|x) = sum_t log pi(y_t | x, y_<t). A mean over the response length
    optimises a different objective (it takes the length of y out of the comparison, so the
    implicit reward is no longer the KL-regularised one the paper derives), and a mean over
    the padded length also counts padding: every log-ratio shrinks by the batch's longest
    row, an effective beta that changes from batch to batch.
    mask (B, T) is 1 on response tokens; prompt tokens and padding never enter the sum.
    segments (B, T), for packed rows: (N,) sums, one per sequence."""
    lp = token_logprobs(logits, labels)  # (B, T)
    lp = torch.where(mask.bool(), lp, torch.zeros_like(lp))  # (B, T)
    return per_sequence(lp, segments)  # (B,) or (N,)


def concatenated_logprobs(model, X, Y, segments=None):
    """Chosen and rejected answers (collate_pairs: the B chosen, then the B rejected) in ONE
    forward: half the kernel launches, and one forward per backward under DDP. -> two (B,)."""
    if segments is None:
        logits, _ = model(X)  # (2B, T, V)
    else:
        from extras import packing  # packed rows (--pack): each sequence sees only itself

        logits = packing.logits(model, X, segments)  # (R, T, V)
    return sequence_logprobs(logits, Y, Y != -1, segments).chunk(
        2
    )  # (2B,) -> the B chosen, the B rejected


def pair_loss(
    model,
    X,
    Y,
    ref_chosen,
    ref_rejected,
    beta,
    loss="sigmoid",
    label_smoothing=0.0,
    rpo_alpha=0.0,
    segments=None,
):
    """The SUM over a micro-batch's pairs (X, Y, segments: collate_pairs) of dpo_loss, plus
    rpo_alpha times each chosen answer's per-token NLL (Pang et al. 2024, TRL's rpo_alpha);
    the step divides by its number of pairs. Also the implicit rewards (B,) of chosen, rejected."""
    policy_chosen, policy_rejected = concatenated_logprobs(model, X, Y, segments)  # (B,), (B,)
    losses, reward_chosen, reward_rejected = dpo_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        beta=beta,
        loss_type=loss,
        label_smoothing=label_smoothing,
    )
    if (
        rpo_alpha
    ):  # each chosen answer's NLL per token: long and short answers weigh the same, as in SFT
        n_chosen = per_sequence((Y != -1).float(), segments)[: len(policy_chosen)].clamp(
            min=1
        )  # (B,) its tokens
        losses = losses + rpo_alpha * (-policy_chosen / n_chosen)
    return losses.sum(), reward_chosen, reward_rejected


def parse_args(argv=None):
    ap = nanosft.ArgumentParser(__doc__, stage="dpo")  # more flags: extras/flags.py
    lesson = ap.add_argument_group("DPO: the starting model, the pairs, the loss")
    lesson.add_argument(
        "--ckpt", default="out/sft.pt", help="starting checkpoint (sft); also the frozen reference"
    )
    lesson.add_argument("--data", default=world_qa.THREADS, help="preference file (formats above)")
    lesson.add_argument("--beta", type=float, help="strength of the KL anchor to the reference")
    lesson.add_argument(
        "--loss",
        choices=["sigmoid", "ipo", "hinge"],
        help="ipo: Azar et al.; sigmoid: DPO's Eq. 7; hinge: SLiC",
    )
    lesson.add_argument(
        "--rpo-alpha", type=float, help="add alpha x the chosen answers' per-token NLL (0 = off)"
    )
    nanosft.add_common_args(ap)
    ap.set_defaults(**DEFAULTS)
    return ap.parse_args(argv)  # (nanosft.ArgumentParser checks each number's range)


# ----------------------------------------------------------------------------------------
# the batches and the frozen reference
def collate_pairs(examples, pad_id, packed=True):
    """B pair examples -> X, Y, segments: the 2B sequences, the B chosen then the B rejected;
    packed, several per row (segments (R, T) numbers them), else one row each (segments None)."""
    seqs = [e[:2] for e in examples] + [e[2:] for e in examples]
    if not packed:
        return (*nanosft.collate(seqs, pad_id), None)
    from extras import packing  # several sequences per row: less padding, the same log-probs

    return packing.pack(seqs, pad_id)


def step_pair_ids(seed, it, batch_size, n, process=None):
    """The pair indices of step `it`: slices of seeded per-epoch permutations, a pure function
    of (seed, it), so a resumed run continues exactly. With process: this process's share."""
    first, last = it * batch_size, (it + 1) * batch_size
    orders = {
        epoch: torch.randperm(
            n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        ).tolist()
        for epoch in range(first // n, (last - 1) // n + 1)
    }  # a stream per (seed, epoch); 1,000,003 is prime
    ids = [orders[k // n][k % n] for k in range(first, last)]
    return ids if process is None else ids[process.rank :: process.world]


def micro_batches(examples, ids, pad_id, packed, grad_accum, device):
    """The pairs `ids` in grad_accum micro-batches -> [(X, Y, segments, ids)] on `device`."""
    to_device = lambda t: None if t is None else t.to(device)  # (segments: None unless packed)
    return [
        (*map(to_device, collate_pairs([examples[i] for i in c.tolist()], pad_id, packed)), c)
        for c in torch.tensor(ids).chunk(grad_accum)
    ]


@torch.no_grad()
def pair_logprobs(model, examples, ids, pad_id, process, packed, pairs_per_forward=64):
    """log pi(chosen), log pi(rejected) of the pairs `ids` -> two (N,) tensors, NaN off `ids`,
    in length order. The reference's, once before training: a step costs one policy forward."""
    order = sorted(ids, key=lambda i: max(len(examples[i][0]), len(examples[i][2])))
    logps = torch.full((2, len(examples)), float("nan"))  # chosen, rejected
    for first in range(0, len(order), pairs_per_forward):
        rows = order[first : first + pairs_per_forward]
        [(X, Y, segments, _)] = micro_batches(
            examples, rows, pad_id, packed, grad_accum=1, device=process.device
        )
        with nanosft.autocast(process.device, process.dtype):
            logps[:, rows] = torch.stack(concatenated_logprobs(model, X, Y, segments)).float().cpu()
    return logps[0], logps[1]


def load_data(path, tok, block_size, min_margin, top_only, strict, log):
    """The pairs -> world, (train pairs, their examples), (held-out pairs, examples), counts: the
    world's votes (world: its verifier, world_eval.load_world), held out the threads about the
    held-out people (HELDOUT_RULE); or your own file in any format extras/own_data.py reads
    (world None), held out about 10% of its prompts. Logs what was read."""
    world = world_eval.load_world() if world_eval.is_default(path, world_qa.THREADS) else None
    if not world:
        from extras import own_data  # your own file's formats
    return world, *preferences.load_pairs(
        path,
        heldout_path=world_qa.EVAL_THREADS if world else None,
        tok=tok,
        block_size=block_size,
        min_margin=min_margin,
        top_only=top_only,
        strict=strict,
        log=log,
        max_scored=EVAL_PAIRS,
        heldout_rule=HELDOUT_RULE if world else None,
        split=None if world else own_data.load_preferences,
    )


# ----------------------------------------------------------------------------------------
# what the run reports
def fmt(v):  # a number for the log
    return "n/a" if v is None else f"{v:.3f}"


def heldout_rewards(policy, reference, beta):
    """The implicit rewards of the held-out pairs, from their summed log-probs (chosen, rejected),
    two (N,) each, under the policy and the frozen reference: the margins (N,) and their mean,
    the preference accuracy (a tie, as before any training, counts as a coin flip) and, apart,
    whether the plain likelihood prefers the chosen answer (logp_accuracy)."""
    (pi_c, pi_r), (ref_c, ref_r) = policy, reference
    m = beta * ((pi_c - ref_c) - (pi_r - ref_r))  # (N,) implicit reward margins (dpo_loss)
    return {
        "pref_accuracy": ((m > 0).float() + 0.5 * (m == 0).float()).mean().item(),
        "margin": m.mean().item(),
        "logp_accuracy": (pi_c > pi_r).float().mean().item(),
        "margins": m,
    }


@torch.no_grad()
def kl_estimate(model, ref, tok, prompts, process, seed):
    """KL(pi || pi_ref) per response on held-out prompts. y is sampled from the policy
    (temperature 1, at most KL_TOKENS tokens) and at every position of y we add the exact KL
    of the two next-token distributions: by the chain rule E_y~pi[sum_t KL_t] is the
    sequence-level KL, and the exact per-position KL has less noise than
    log pi(y|x) - log pi_ref(y|x) of the sample alone (and is never negative)."""
    n_new = min(KL_TOKENS, model.config.block_size // 2)
    ids = [nanosft.chat_prompt(tok, p)[-(model.config.block_size - n_new) :] for p in prompts]
    with nanosft.autocast(
        process.device, process.dtype
    ):  # y keeps a stop token it drew: pi chose it too
        ys = nanosft.generate_batch(
            model,
            ids,
            n_new,
            {tok.end},
            temperature=1.0,
            generator=torch.Generator().manual_seed(seed),
            keep_stop=True,
        )
        X, Y = (
            t.to(process.device)
            for t in nanosft.collate(
                [
                    nanosft.example_tensors(x + y, [0] * len(x) + [1] * len(y))
                    for x, y in zip(ids, ys)
                ],
                tok.pad,
            )
        )
        lp = torch.log_softmax(model(X)[0].float(), -1)  # (N, T, V)
        lq = torch.log_softmax(ref(X)[0].float(), -1)  # (N, T, V)
    kl_t = (lp.exp() * (lp - lq)).sum(-1)  # (N, T)
    return (kl_t * (Y != -1)).sum(-1).mean().item()


def evaluate(model, ref, tok, held, prompts, beta, process, seed):
    """What every evaluation reports: the held-out pairs' implicit rewards (held: score, where
    score(model) gives their log-probs, and the reference's scores; None without held-out pairs)
    and the KL(pi || ref) on the first KL_PROMPTS `prompts`."""
    return {
        **(heldout_rewards(held[0](model), held[1], beta) if held else {}),
        "kl": kl_estimate(model, ref, tok, prompts[:KL_PROMPTS], process=process, seed=seed),
    }


def behaviour(model, tok, world, questions):
    """Greedy answers to `questions`: on the world (its rows) graded by its verifier
    (world_qa.qa_eval): task accuracy, the voted style strictly and loosely, the degenerate
    rate; on other data (chat prompts) ungraded. Also their mean length in tokens and five
    (question, answer) samples."""
    if world:
        r = world_qa.qa_eval(model, tok, world, questions, longest=world_qa.world_longest())
        texts, said = [q["prompt"] for q in questions], r.pop("answers")
        r.pop("degenerate")  # (why each answer is degenerate: only the rate is reported)
    else:  # a prompt too long keeps its end and leaves 8 positions to answer in
        ids = [nanosft.chat_prompt(tok, p)[-(model.config.block_size - 8) :] for p in questions]
        texts = [p[-1]["content"] for p in questions]
        said = [
            tok.decode(o)
            for o in nanosft.generate_batch(model, ids, 64, stop={tok.end, tok.endoftext})
        ]
        r = dict.fromkeys(("accuracy", "clean_style_rate", "style_rate", "degenerate_rate"))
    # shown: on the world the first question about each attribute, else the first five
    keys = [q["attribute"] if world else i for i, q in enumerate(questions)]
    return {
        **r,
        "response_tokens": sum(len(tok.encode(a)) for a in said) / max(1, len(said)),
        "samples": [[texts[keys.index(k)], said[keys.index(k)]] for k in dict.fromkeys(keys)][:5],
    }


def start_state(ref, tok, world, questions, held, beta, log):
    """A run's state at step 0, where the policy IS the reference: every implicit reward is 0
    (ties), the KL too; and the reference's answers (behaviour) before training, logged."""
    zero = {"step": 0, **(heldout_rewards(held[1], held[1], beta) if held else {}), "kl": 0.0}
    before = behaviour(ref, tok, world, questions)
    log(
        "before: "
        + " | ".join(f"{k} {fmt(v)}" for k, v in before.items() if k != "samples" and v is not None)
    )
    return {
        "before": before,
        "train": {},
        "eval": {
            k: [zero.get(k)] for k in ("step", "margin", "pref_accuracy", "logp_accuracy", "kl")
        },
    }


def add_rewards(history, step, sums):
    """The implicit rewards of a step's training pairs (sums: of chosen, of rejected, pairs ranked
    right, pairs), as means per pair under TRL's names, appended to `history`."""
    chosen, rejected, right, pairs = sums
    for k, v in (
        ("step", step),
        ("rewards/chosen", chosen / pairs),
        ("rewards/rejected", rejected / pairs),
        ("rewards/margins", (chosen - rejected) / pairs),
        ("rewards/accuracies", right / pairs),
    ):
        history.setdefault(k, []).append(v)


def report(state, after, kept, step, flags, counts, process, t_start):
    """Writes and returns dpo.json: the held-out pairs' implicit rewards and the KL after training
    (the history's first evaluation is the starting model's), the behaviour before and after,
    samples, the history; the step whose weights dpo.pt holds (`kept`), the steps taken, the
    `flags` that set the loss and the pairs, the data's `counts`, the device and the seconds
    since `t_start`. Logs the closing line."""
    before, ev, seconds = state["before"], state["eval"], time.time() - t_start
    process.log(
        f"done, {kept} of {step} steps kept: held-out pref accuracy "
        f"{fmt(after.get('pref_accuracy'))} | KL "
        f"{after['kl']:.3f} | "
        + " | ".join(
            f"{k} {fmt(before[k])} -> {fmt(after[k])}"
            for k in ("accuracy", "clean_style_rate", "degenerate_rate", "response_tokens")
        )
        + f" | {seconds:.0f}s"
    )
    result = {
        "pref_accuracy_heldout": after.get("pref_accuracy"),
        "heldout_reward_margin": after.get("margin"),
        "logp_accuracy_heldout_before": ev["logp_accuracy"][0],
        "logp_accuracy_heldout_after": after.get("logp_accuracy"),
        "kl": after["kl"],
        "samples": [
            {"prompt": p, "before": b, "after": a}
            for (p, b), (_, a) in zip(before["samples"], after["samples"])
        ],
        **{  # heldout_accuracy_before, ..._after, clean_style_rate_before, ...
            f"{'heldout_accuracy' if k == 'accuracy' else k}_{when}": d[k]
            for k in (
                "accuracy",
                "clean_style_rate",
                "style_rate",
                "degenerate_rate",
                "response_tokens",
            )
            for when, d in (("before", before), ("after", after))
        },
        "rewound_step": kept,
        "steps": step,
        **{  # the flags that set the loss and the pairs
            k: flags[k]
            for k in (
                "beta",
                "loss",
                "label_smoothing",
                "rpo_alpha",
                "lr",
                "batch_size",
                "pairs",
                "min_margin",
                "pack",
            )
        },
        **counts,
        "device": str(process.device),
        "dtype": process.dtype,
        "seconds": seconds,
        "history": {"train": state["train"], "eval": ev, "path": state.get("path", [])},
    }
    nanosft.write_json(os.path.join(flags["out_dir"], "dpo.json"), result)
    return result


# ----------------------------------------------------------------------------------------
# the run
def main(argv=None):
    args = parse_args(argv)
    process, t_start = nanosft.setup(args.device, args.dtype), time.time()
    if args.resume or args.time_budget or process.world > 1:
        from extras import runtime  # --resume, --time-budget, torchrun's processes
    if args.rewind or args.plot:
        from extras import dpo_eval  # rewinding along the dev half's path, the charts
    # ---- the reference (the starting checkpoint, frozen), the policy (a copy of it), the pairs
    start_ckpt = nanosft.load_checkpoint(args.ckpt, expect_kind=("sft", "dpo", "pretrain"))
    ref = (
        nanosft.model_from_checkpoint(start_ckpt, args.ckpt)[0]
        .requires_grad_(False)
        .eval()
        .to(process.device)
    )
    model, tok = nanosft.model_from_checkpoint(
        start_ckpt, args.ckpt
    )  # an independent copy: the policy
    world, (train_pairs, train_examples), (held_pairs, held_examples), counts = load_data(
        args.data,
        tok,
        model.config.block_size,
        min_margin=args.min_margin,
        top_only=args.pairs == "top",
        strict=args.strict,
        log=process.log,
    )
    process.log(
        f"{args.ckpt}: a {start_ckpt['kind']} checkpoint, {model.num_params():,} parameters | "
        f"{process.device} "
        f"{process.dtype}"
        + (
            " | warning: DPO expects a model that chats (SFT)"
            if start_ckpt["kind"] == "pretrain"
            else ""
        )
    )
    packed = (
        args.pack and not model.config.n_prefix
    )  # --pack (not a prompt-tuned model: its prefix takes each row)
    model.to(process.device).train()
    optimizer = nanosft.configure_optimizer(model, args.lr, device_type=process.device.type)
    start_iter, state = (
        runtime.resume(args.out_dir, "dpo", model, tok, optimizer=optimizer)
        if args.resume
        else (0, {})
    )
    # ---- the reference's log-probs, once: for the pairs this process's steps visit, and the
    # held-out pairs
    visited = {
        i
        for it in range(start_iter, args.max_iters)
        for i in step_pair_ids(args.seed, it, args.batch_size, len(train_examples), process=process)
    }
    ref_cache = pair_logprobs(
        ref, train_examples, sorted(visited), tok.pad, process=process, packed=packed
    )
    score = lambda policy: pair_logprobs(
        policy, held_examples, range(len(held_examples)), tok.pad, process=process, packed=packed
    )
    held = (score, score(ref)) if held_examples else None
    prompts = list(
        {str(p["prompt"]): p["prompt"] for p in held_pairs or train_pairs[:64]}.values()
    )  # each once
    questions = (
        world_qa.heldout_halves()[1] if world else prompts[:64]
    )  # the world: the TEST half, reported
    measure = lambda m: evaluate(
        m, ref, tok, held, prompts=prompts, beta=args.beta, process=process, seed=args.seed
    )
    # ---- before: the reference's answers (and at step 0 the policy IS the reference: no
    # margin, no KL)
    state = state or start_state(
        ref, tok, world, questions, held=held, beta=args.beta, log=process.log
    )
    if args.rewind:
        state.setdefault("path", dpo_eval.path_start(ref, tok))

    def on_eval(it):  # every --eval-interval steps and at the end
        if process.master:
            now = measure(model)
            for k, v in state["eval"].items():
                v.append(it if k == "step" else now.get(k))
            process.log(
                f"eval step {it}: held-out pref accuracy {fmt(now.get('pref_accuracy'))} "
                "| held-out margin "
                f"{fmt(now.get('margin'))} | KL(pi||ref) {now['kl']:.3f} nats/answer"
            )
            if args.rewind:  # the dev half's answers and these weights, for rewinding to pick from
                dpo_eval.path_point(
                    model,
                    tok,
                    state["path"],
                    it,
                    out_dir=args.out_dir,
                    flags=vars(args),
                    log=process.log,
                )
            model.train()  # (generating put it in eval mode)
            keep(it)
        if process.world > 1:
            runtime.barrier(process)

    def keep(it):  # dpo_last.pt: what --resume needs to continue after step `it`
        nanosft.save_checkpoint(
            os.path.join(args.out_dir, "dpo_last.pt"),
            nanosft.checkpoint_dict(
                "dpo", model, tok, optimizer=optimizer, it=it, flags=vars(args), state=state
            ),
        )

    # ---- train: the loss of a step is the mean over its pairs (every process and micro-batch)
    ddp_model = torch.compile(model) if args.compile else model
    if process.world > 1:
        ddp_model = runtime.wrap_ddp(ddp_model, process)
    if process.dtype == "float16":  # the loss scaled, so small gradients do not underflow
        from extras import fp16

        fp16.LossScaling(model, optimizer)
    step, tokens, t0 = start_iter, 0, time.time()  # step: the steps taken
    with nanosft.finish_step_on_interrupt(process) as interrupted:
        for it in range(start_iter, args.max_iters):
            if interrupted():  # Ctrl-C: the steps taken are kept for --resume, then exit 130
                keep(step)
                raise KeyboardInterrupt(f"step {step} kept in dpo_last.pt; --resume continues")
            if args.time_budget and runtime.out_of_time(t0, args.time_budget, process, it):
                break
            # warmup, then cosine decay
            lr = nanosft.lr_at(it, args.lr, args.warmup, args.max_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = micro_batches(
                train_examples,
                step_pair_ids(args.seed, it, args.batch_size, len(train_examples), process=process),
                tok.pad,
                packed,
                grad_accum=args.grad_accum,
                device=process.device,
            )
            # the step's loss; rewards of chosen, of rejected; right; pairs
            sums = torch.zeros(5, device=process.device)
            for i, batch in enumerate(batches):
                # DDP averages the gradients over the processes after the last micro-batch
                if process.world > 1:
                    ddp_model.require_backward_grad_sync = i == len(batches) - 1
                X, Y, segments, ids = batch
                # the frozen reference's log-probs of these pairs (computed once, before training)
                ref_chosen, ref_rejected = (c[ids].to(process.device) for c in ref_cache)
                with nanosft.autocast(process.device, process.dtype):
                    loss_sum, reward_chosen, reward_rejected = pair_loss(
                        ddp_model,
                        X,
                        Y,
                        ref_chosen=ref_chosen,
                        ref_rejected=ref_rejected,
                        beta=args.beta,
                        loss=args.loss,
                        label_smoothing=args.label_smoothing,
                        rpo_alpha=args.rpo_alpha,
                        segments=segments,
                    )
                # x world: DDP averages
                (loss_sum * (process.world / args.batch_size)).backward()
                sums += torch.stack(
                    [
                        loss_sum.detach(),
                        reward_chosen.sum(),
                        reward_rejected.sum(),
                        (reward_chosen > reward_rejected).sum(),
                        reward_chosen.new_tensor(len(reward_chosen)),
                    ]
                )
                tokens += X.numel()
            if process.world > 1:
                torch.distributed.all_reduce(sums)  # the whole step's, every process's
            step_loss, *rewards = sums.tolist()
            nanosft.check_finite(step_loss, it, lr)  # a NaN or inf stops the run before the step
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step = it + 1
            add_rewards(state["train"], step, rewards)
            if step % args.log_interval == 0 or step == args.max_iters:
                nanosft.log_step(
                    process,
                    step,
                    args.max_iters,
                    loss=step_loss / args.batch_size,
                    lr=lr,
                    seconds=time.time() - t0,
                    tokens=tokens,
                )
                process.log(  # the step's mean implicit rewards (TRL's names)
                    "  "
                    + " | ".join(
                        f"{k} {v[-1]:+.3f}" for k, v in state["train"].items() if k != "step"
                    )
                )
            if step % args.eval_interval == 0 and step < args.max_iters:
                on_eval(step)
    on_eval(step)
    if not process.master:
        return
    # ---- after (--rewind: the latest good point of the dev half's path): measured, saved, reported
    kept = (
        dpo_eval.rewound(model, state["path"], step, start_ckpt, out_dir=args.out_dir)
        if args.rewind
        else step
    )
    after = {**measure(model), **behaviour(model, tok, world, questions)}  # (the saved weights')
    if not world:  # your own pairs: greedy answers start -> final, the chosen answer as reference
        from extras import own_eval

        counts["own_eval"] = own_eval.dpo_answers(
            ref, model, tok, held_pairs, process=process, out_dir=args.out_dir
        )
    result = report(
        state, after, kept, step, flags=vars(args), counts=counts, process=process, t_start=t_start
    )
    nanosft.save_checkpoint(
        os.path.join(args.out_dir, "dpo.pt"),
        nanosft.checkpoint_dict(
            "dpo",
            model,
            tok,
            it=kept,
            flags=vars(args),
            metrics={k: v for k, v in result.items() if isinstance(v, (int, float, str))},
        ),
    )
    if args.plot:  # out/dpo_margin.png, out/dpo_logratio.png
        dpo_eval.plot(
            args.out_dir,
            result,
            model,
            ref,
            tok=tok,
            pairs=held_pairs,
            examples=held_examples,
            process=process,
            token_logprobs=token_logprobs,
            margins=after.get("margins"),
        )


if __name__ == "__main__":
    nanosft.cli(main)  # bad input is one line and exit code 2, never a traceback
