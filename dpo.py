"""
Stage 3: Direct Preference Optimization (DPO), from scratch, against a frozen reference.

    python dpo.py --ckpt out/sft.pt                       # the world's community votes -> out/dpo.pt
    python dpo.py --ckpt out/sft.pt --data pairs.jsonl    # {"prompt","chosen","rejected"} lines
    python dpo.py --ckpt out/sft.pt --loss sigmoid --lr 4e-5   # the DPO paper's loss (Eq. 7)
    python dpo.py --ckpt out/sft.pt --resume              # continue out/dpo_last.pt
    torchrun --nproc_per_node 2 dpo.py --ckpt out/sft.pt  # several processes (DDP)

SFT taught the model WHAT to answer; DPO refines HOW, from pairs "this answer is better than
that one" (here read off a community's votes): the policy starts as a copy of the starting
checkpoint, the reference is that checkpoint frozen, and the loss raises each chosen answer's
log-probability relative to the reference and lowers the rejected one's. No reward model, no
sampling. Formats: docs/own_data.md. Writes out/dpo.pt, dpo_last.pt (--resume), dpo.json, plots.
"""
import math
import os
import time

import nanosft
import torch
from torch.nn import functional
from data import formats, world_eval

# Every default of this stage in one place. The loss is IPO, not the DPO paper's Eq. 7 (--loss sigmoid):
# on the acceptance seeds Eq. 7 fell to 0.890 held-out preference accuracy (docs/dpo.md).
DEFAULTS = dict(max_iters=300, batch_size=16, lr=6e-5, eval_interval=50, warmup=20, log_interval=25, beta=0.1,
                loss="ipo", label_smoothing=0.0, rpo_alpha=0.1, min_margin=10.0, pairs="top")


# ---------------------------------------------------------------- the loss: pure functions of summed log-probs
def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta,
             loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair losses (B,) and the implicit rewards of chosen and rejected, each (B,), from the
    summed log-probs (B,) of each answer under the policy pi and the frozen reference pi_ref.
    DPO (Rafailov et al. 2023, Eq. 7), y_w the chosen (winning) answer, y_l the rejected one:

        L_DPO = -log sigma(beta h),   h = log pi(y_w|x) / pi_ref(y_w|x) - log pi(y_l|x) / pi_ref(y_l|x)

    beta log pi(y|x) / pi_ref(y|x) is the implicit reward of y: a Bradley-Terry reward defined
    through the policy itself, so the policy that maximises it comes for free. Beside Eq. 7:
    label_smoothing eps (conservative DPO, each label flipped with probability eps)
    -(1 - eps) log sigma(beta h) - eps log sigma(-beta h); "ipo" (Azar et al. 2023)
    (h - 1/(2 beta))^2, which pulls h to a fixed target instead of pushing it without end;
    "hinge" (SLiC) max(0, 1 - beta h)."""
    chosen_ratio = policy_chosen - ref_chosen        # log pi(y_w|x) / pi_ref(y_w|x), (B,)
    rejected_ratio = policy_rejected - ref_rejected  # log pi(y_l|x) / pi_ref(y_l|x), (B,)
    h = chosen_ratio - rejected_ratio                # (B,)
    if loss_type == "sigmoid":
        losses = (-(1 - label_smoothing) * functional.logsigmoid(beta * h)
                  - label_smoothing * functional.logsigmoid(-beta * h))
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def pair_loss(model, X, Y, ref_chosen, ref_rejected, beta, loss="sigmoid", label_smoothing=0.0,
              rpo_alpha=0.0, segments=None):
    """The SUM over a micro-batch's pairs (X, Y, segments: collate_pairs) of dpo_loss, plus
    rpo_alpha times each chosen answer's per-token NLL (Pang et al. 2024, TRL's rpo_alpha);
    the step divides by its number of pairs. Also the implicit rewards (B,) of chosen, rejected."""
    policy_chosen, policy_rejected = concatenated_logprobs(model, X, Y, segments)  # (B,), (B,)
    losses, reward_chosen, reward_rejected = dpo_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss,
        label_smoothing=label_smoothing)
    if rpo_alpha:  # each chosen answer's NLL per token: long and short answers weigh the same, as in SFT
        n_chosen = per_sequence((Y != -1).float(), segments)[:len(policy_chosen)].clamp(min=1)  # (B,) its tokens
        losses = losses + rpo_alpha * (-policy_chosen / n_chosen)
    return losses.sum(), reward_chosen, reward_rejected


def parse_args(argv=None):
    ap = nanosft.ArgumentParser(__doc__)
    lesson = ap.add_argument_group("DPO: the starting model, the pairs, the loss")
    lesson.add_argument("--ckpt", default="out/sft.pt", help="starting checkpoint (sft); also the frozen reference")
    lesson.add_argument("--data", default=world_eval.THREADS, help="preference file (formats above)")
    lesson.add_argument("--beta", type=float, help="strength of the KL anchor to the reference")
    lesson.add_argument("--loss", choices=["sigmoid", "ipo", "hinge"],
                        help="ipo: Azar et al.; sigmoid: DPO's Eq. 7; hinge: SLiC")
    lesson.add_argument("--label-smoothing", type=float, help="conservative DPO: assumed label-flip rate eps")
    nanosft.add_common_args(ap)
    extra = ap.add_argument_group("pair construction (votes and scores formats), NLL term, reference cache")
    extra.add_argument("--min-margin", type=float, help="least difference of net votes or scores that makes a pair")
    extra.add_argument("--pairs", choices=["top", "all"], help="the top answer against each other one, or every "
                       "two answers (the world's held-out pairs stay the same: dpo_eval.HELDOUT_RULE)")
    extra.add_argument("--rpo-alpha", type=float, help="add alpha x the chosen answers' per-token NLL (0 = off)")
    extra.add_argument("--no-ref-cache", action="store_true", help="a reference forward every step, no cache")
    extra.add_argument("--strict", action="store_true", help="a pair that would be skipped or truncated "
                       "(a tie, a duplicate, too long) is an error instead")
    ap.set_defaults(**DEFAULTS)
    args = ap.parse_args(argv)  # (nanosft.ArgumentParser checks each number's range)
    if not 0 <= args.label_smoothing < 0.5 or (args.label_smoothing and args.loss != "sigmoid"):
        raise nanosft.UserError(f"--label-smoothing (the sigmoid loss only) must be in [0, 0.5), got "
                                f"{args.label_smoothing} with --loss {args.loss}")
    return args


# ---------------------------------------------------------------- the batches and the frozen reference
def step_pair_ids(seed, it, batch_size, n, process=None):
    """The pair indices of step `it`: slices of seeded per-epoch permutations, a pure function
    of (seed, it), so a resumed run continues exactly. With process: this process's share."""
    first, last = it * batch_size, (it + 1) * batch_size
    orders = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
              for epoch in range(first // n, (last - 1) // n + 1)}  # a stream per (seed, epoch); 1,000,003 is prime
    ids = [orders[k // n][k % n] for k in range(first, last)]
    return ids if process is None else ids[process.rank::process.world]


def micro_batches(examples, ids, pad_id, packed, grad_accum, device):
    """The pairs `ids` in grad_accum micro-batches -> [(X, Y, segments, ids)] on `device`."""
    batches = []
    for chunk in torch.tensor(ids).chunk(grad_accum):
        X, Y, segments = collate_pairs([examples[i] for i in chunk.tolist()], pad_id, packed)
        batches.append((X.to(device), Y.to(device), None if segments is None else segments.to(device), chunk))
    return batches


@torch.no_grad()
def pair_logprobs(model, examples, ids, pad_id, process, pairs_per_forward=64):
    """log pi(chosen), log pi(rejected) of the pairs `ids` -> two (N,) tensors, NaN off `ids`,
    in length order. The reference's, once before training: a step costs one policy forward."""
    order = sorted(ids, key=lambda i: max(len(examples[i][0]), len(examples[i][2])))
    logps = torch.full((2, len(examples)), math.nan)  # chosen, rejected
    for first in range(0, len(order), pairs_per_forward):
        rows = order[first:first + pairs_per_forward]
        [(X, Y, segments, _)] = micro_batches(examples, rows, pad_id, packed=not model.config.n_prefix, grad_accum=1,
                                              device=process.device)
        with nanosft.autocast(process.device, process.dtype):
            logps[:, rows] = torch.stack(concatenated_logprobs(model, X, Y, segments)).float().cpu()
    return logps[0], logps[1]


def reference_logprobs(ref, cache, batch):
    """log pi_ref(chosen), log pi_ref(rejected) of a micro-batch: `cache`'s, or a forward (--no-ref-cache)."""
    X, Y, segments, ids = batch
    if cache is None:
        with torch.no_grad():
            return concatenated_logprobs(ref, X, Y, segments)
    return cache[0][ids].to(X.device), cache[1][ids].to(X.device)


# ---------------------------------------------------------------- the run
def main(argv=None):
    from extras import dpo_eval, own_data  # the world's measures and report; --data's formats
    args = parse_args(argv)
    process, t_start = nanosft.setup(args.device, args.dtype), time.time()
    if args.resume or args.time_budget or process.world > 1:
        from extras import runtime  # --resume, --time-budget, torchrun's processes
    # ---- the reference (the starting checkpoint, frozen), the policy (a copy of it), the pairs
    start_ckpt = nanosft.load_checkpoint(args.ckpt, expect_kind=("sft", "dpo", "pretrain"))
    if start_ckpt["kind"] == "pretrain":
        process.log(f"warning: {args.ckpt} is a pre-trained checkpoint, not SFT; DPO expects a model that chats")
    ref = nanosft.model_from_checkpoint(start_ckpt, args.ckpt)[0].requires_grad_(False).eval().to(process.device)
    model, tok = nanosft.model_from_checkpoint(start_ckpt, args.ckpt)  # an independent copy: the policy
    world = world_eval.is_default(args.data, world_eval.THREADS)  # the world's votes: measured, rewound
    (train_pairs, train_examples), (held_pairs, held_examples), counts = formats.load_pairs(
        args.data, heldout_path=world_eval.EVAL_THREADS if world else None, tok=tok, block_size=model.config.block_size,
        min_margin=args.min_margin, top_only=args.pairs == "top", seed=args.seed, strict=args.strict, log=process.log,
        max_scored=dpo_eval.EVAL_PAIRS, heldout_rule=dpo_eval.HELDOUT_RULE if world else None,
        reader=None if world else own_data.READER)  # the world's votes, or your file in any format
    process.log(f"{args.data}: {counts['format']} format, {len(train_examples):,} train / {counts['pairs_heldout']:,} "
           f"held-out pairs ({len(held_examples)} scored) | {model.num_params():,} parameters | {process.device} {process.dtype}")
    model.to(process.device).train()
    optimizer = nanosft.configure_optimizer(model, args.lr, device_type=process.device.type)
    start_iter, state = runtime.resume(args.out_dir, "dpo", model, tok, optimizer=optimizer) if args.resume else (0, {})
    # ---- the reference's log-probs, once: for the pairs this process's steps visit, and the held-out pairs
    visited = {i for it in range(start_iter, args.max_iters)
               for i in step_pair_ids(args.seed, it, args.batch_size, len(train_examples), process=process)}
    ref_cache = None if args.no_ref_cache else pair_logprobs(ref, train_examples, sorted(visited), tok.pad, process=process)
    score = (lambda policy: pair_logprobs(policy, examples=held_examples, ids=range(len(held_examples)),
                                          pad_id=tok.pad, process=process)) if held_examples else None  # held-out log-probs
    evaluator = dpo_eval.Evaluator(ref, tok, pairs=held_pairs or train_pairs[:64], examples=held_examples,
                                   score=score, world=world, beta=args.beta, seed=args.seed, process=process,
                                   out_dir=args.out_dir, flags=vars(args))
    state = evaluator.begin(state)  # before: the reference IS the starting model

    def on_eval(it):  # every --eval-interval steps and at the end
        evaluator.rewards.log(state["train"], it, process)
        if process.master:
            evaluator.evaluate(model, state, it)  # (on the world also keeps the step's checkpoint)
            nanosft.save_checkpoint(nanosft.last_path(args.out_dir, "dpo"), nanosft.checkpoint_dict(
                "dpo", model, tok, optimizer=optimizer, it=it, flags=vars(args), state=state))
        if process.world > 1:
            runtime.barrier(process)

    # ---- train: the loss of a step is the mean over its pairs (every process and micro-batch)
    ddp_model = torch.compile(model) if args.compile else model
    if process.world > 1:
        ddp_model = runtime.wrap_ddp(ddp_model, process)
    scaler = torch.amp.GradScaler(process.device.type, enabled=process.dtype == "float16")  # fp16 only: see below
    params = [p for p in model.parameters() if p.requires_grad]
    n_pairs = args.batch_size  # in the step, over every process and micro-batch
    step, tokens, t0 = start_iter, 0, time.time()  # step: the steps taken
    for it in range(start_iter, args.max_iters):
        if args.time_budget and runtime.out_of_time(t0, args.time_budget, process, it):
            break
        lr = nanosft.lr_at(it, args.lr, args.warmup, args.max_iters)  # warmup, then cosine decay
        for group in optimizer.param_groups:
            group["lr"] = lr
        batches = micro_batches(train_examples, step_pair_ids(args.seed, it, args.batch_size, len(train_examples), process=process),
                                tok.pad, packed=not model.config.n_prefix, grad_accum=args.grad_accum, device=process.device)
        step_loss = 0.0
        for i, batch in enumerate(batches):
            if process.world > 1:  # DDP averages the gradients over the processes after the last micro-batch
                ddp_model.require_backward_grad_sync = i == len(batches) - 1
            X, Y, segments, _ = batch
            with nanosft.autocast(process.device, process.dtype):
                ref_chosen, ref_rejected = reference_logprobs(ref, ref_cache, batch)
                loss_sum, reward_chosen, reward_rejected = pair_loss(
                    ddp_model, X, Y, ref_chosen=ref_chosen, ref_rejected=ref_rejected, beta=args.beta, loss=args.loss,
                    label_smoothing=args.label_smoothing, rpo_alpha=args.rpo_alpha, segments=segments)
                evaluator.rewards.add(it, reward_chosen, reward_rejected)  # logged at the next evaluation
            # fp16 only: the loss scaled up so small gradients do not underflow (else scale() is the identity)
            scaler.scale(loss_sum * (process.world / n_pairs)).backward()  # x world: DDP averages
            step_loss += loss_sum.item()
            tokens += X.numel()
        if process.world > 1:
            step_loss = runtime.all_reduce(step_loss, process)  # the whole step's, every process's
        nanosft.check_finite(step_loss, it, lr)  # a NaN or inf stops the run before the step
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        scaler.step(optimizer)  # optimizer.step() (fp16: skipped if the gradient overflowed)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step = it + 1
        if step % args.log_interval == 0 or step == args.max_iters:
            nanosft.log_step(process, step, args.max_iters, loss=step_loss / n_pairs, lr=lr,
                             seconds=time.time() - t0, tokens=tokens)
        if step % args.eval_interval == 0 and step < args.max_iters:
            on_eval(step)
    train_seconds = time.time() - t0
    on_eval(step)
    if not process.master:
        return
    # ---- the world: rewind to the latest good point of the dev half's path; then measure, save, report
    rewound_step = evaluator.rewind(model, state["path"], step, start_ckpt) if world else step
    result = dpo_eval.summary(evaluator, model, state, rewound_step=rewound_step, steps=(step, train_seconds, tokens),
                              t_start=t_start, counts=counts, flags=vars(args))
    nanosft.save_checkpoint(os.path.join(args.out_dir, "dpo.pt"), nanosft.checkpoint_dict(
        "dpo", model, tok, it=rewound_step, flags=vars(args), metrics=dpo_eval.numbers(result)))  # its weights' step
    dpo_eval.report(process, args.out_dir, result, evaluator=evaluator, model=model, token_logprobs=token_logprobs)


# ---------------------------------------------------------------- the pair tensors: collate, pack, one forward
def token_logprobs(logits, labels):
    """log p(label_t | tokens < t) at every position: (B, T, V), (B, T) -> (B, T).
    Labels of -1 (not supervised) read token 0; callers mask those positions out."""
    logp = functional.log_softmax(logits.float(), dim=-1)  # (B, T, V), fp32 even under autocast
    return logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T)


def collate_pairs(examples, pad_id, packed=True):
    """B pair examples -> X, Y, segments: the 2B sequences, the B chosen then the B rejected; packed,
    several per row (segments (R, T) numbers them), else one row each (None: a prompt-tuned model)."""
    seqs = [e[:2] for e in examples] + [e[2:] for e in examples]
    if not packed:
        return (*nanosft.collate(seqs, pad_id), None)
    from extras import packing  # several sequences per row: less padding, the same log-probs
    return packing.pack(seqs, pad_id)


def per_sequence(values, segments=None):
    """(R, T) per-token values -> (R,) sums per row, or (N,) per sequence of packed rows."""
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
        from extras import packing  # packed rows (collate_pairs): each sequence sees only itself
        block = getattr(model, "module", model).config.block_size  # (DDP holds the model in .module)
        logits = packing.packed_logits(model, X, packing.packed_layout(segments, block))  # (R, T, V)
    return sequence_logprobs(logits, Y, Y != -1, segments).chunk(2)  # (2B,) -> the B chosen, the B rejected


if __name__ == "__main__":
    nanosft.cli(main)  # bad input is one line and exit code 2, never a traceback
