"""
Stage 2: supervised fine-tuning (SFT). The model learns to answer: the loss covers the
assistant's tokens only, including the closing <|end|> (so the model learns to stop).

    python finetune.py --ckpt out/pretrain.pt                  # world Q&A, community labels
    python finetune.py --ckpt out/pretrain.pt --show-mask      # see what the loss trains on
    python finetune.py --ckpt out/pretrain.pt --init scratch   # same, from random weights
    python finetune.py --ckpt out/pretrain.pt --data alpaca.json   # your own data
    python finetune.py --ckpt out/pretrain.pt --lora-rank 8    # LoRA; OFT, prompt tuning:
                                                               # docs/peft.md

Read the loss (1), the data it sees (2), what trains (3), how it is measured (5), then
main (6). On the world's data sft.json reports held-out accuracy (what SFT makes usable)
and retention (what it costs), before and after; out/sft.pt holds the final weights (with
--rewind path|interpolate the checkpoint rewinding picks: extras/rewind.py,
docs/forgetting.md).
"""

import functools
import os
import random
import sys
import time

import nanosft
import torch
from data import corpus, formats, world_eval, world_qa

# Every default of this stage in one place; those of the flags that extras/flags.py declares
# (PEFT, replay, rewinding, other worlds) too, so a default run has them without reading it.
DEFAULTS = dict(
    max_iters=300,
    batch_size=16,
    lr=2e-3,  # full SFT's; LoRA, OFT and prompt tuning have their own (extras/flags.py LR)
    eval_interval=75,
    warmup=20,
    log_interval=25,
    world=world_eval.HERE,
    sft_attributes=None,
    strict=False,
    train_embeddings=False,
    lora_rank=0,
    lora_alpha=None,
    oft_block=0,
    lora_on="attn",
    quantize_base="none",
    prompt_tokens=0,
    prompt_init="random",
    prompt_mlp=0,
    new_rows="train",
    replay=0.0,
    rewind="none",
    rewind_min_gain=0.05,
    rewind_tolerance=0.01,
    rewind_loss_tolerance=0.02,
    alphas=(),
)
REPORTED_FLAGS = (
    "init",
    "lora_rank",
    "oft_block",
    "prompt_tokens",
    "prompt_init",
    "prompt_mlp",
    "new_rows",
    "quantize_base",
    "replay",
    "lr",
)


# ----------------------------------------------------------------------------------------
# 1. the idea: a loss on the answer only. nanosft.render_chat renders a conversation and its
# loss mask: 1 on every assistant token and its closing <|end|>, 0 on the roles, the question
# and the system message. nanosft.example_tensors shifts by one (position t predicts token
# t + 1) and sets the target of every unmasked position to -1; nanosft.collate pads with -1
# too. cross_entropy(ignore_index=-1) skips those. render_all (2.) does both for every record.


def sft_loss(model, X, Y):
    """The SUM of the next-token cross-entropy over the supervised targets (Y >= 0) of one
    micro-batch. The step divides it by its supervised tokens over every micro-batch and
    process (step_batches): each answer token weighs the same, whatever the batching."""
    _, loss_sum = model(X, Y, reduction="sum")
    return loss_sum


# ----------------------------------------------------------------------------------------
# 2. data: conversations -> (inputs, targets), and the examples of each step


def top_voted(answers):
    """A community thread's best answer by net votes (up - down), the first of a tie."""
    return max(answers, key=lambda a: a["up"] - a["down"])["text"]


def world_conversations(labels, seed, world_dir=world_eval.HERE, attributes=None):
    """The world's instruction set. Questions about training people come from the community
    threads, answered by the gold fact sentence, the best net-voted answer (up - down), or a
    random community answer; the list tasks (copy/reverse/count) always use their gold answer.
    attributes (--sft-attributes; None: all): only the questions about these are kept, so
    the other attributes' questions stay unseen question types (cross-domain evaluation)."""
    gold = formats.read_records(world_eval.path("world_sft.jsonl", world_dir))
    threads = {
        r["prompt"]: r
        for _, r in formats.read_records(world_eval.path("world_community.jsonl", world_dir))
    }
    rng = random.Random(seed)
    convs = []
    for _, r in gold:
        answer = r["response"]
        # a fact question's attribute is its thread's (every one has a thread; a list task has none)
        if (
            attributes is not None
            and r["prompt"] in threads
            and threads[r["prompt"]]["attribute"] not in attributes
        ):
            continue
        if labels != "gold" and r["prompt"] in threads:
            answers = threads[r["prompt"]]["answers"]
            answer = top_voted(answers) if labels == "top-voted" else rng.choice(answers)["text"]
        convs.append(
            [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": answer}]
        )
    return convs


def load_records(data, labels, seed, strict, world_dir=world_eval.HERE, attributes=None):
    """finetune.py's records: ([(record number, conversation)], its DataReport) of the file
    `data` (any format extras/own_data.py reads) or, without one, the world's questions."""
    report = formats.DataReport(data or world_eval.path("world_sft.jsonl", world_dir), strict)
    if data:  # your own file: its formats are extras/own_data.py's
        from extras import own_data

        return own_data.load_instructions(data, report), report
    records = list(
        enumerate(world_conversations(labels, seed, world_dir=world_dir, attributes=attributes), 1)
    )
    report.total = len(records)
    return records, report


def show_mask(tok, conv):
    """Print one rendered example, supervised tokens marked: green on a terminal, [brackets]
    otherwise. What is marked is exactly what the loss trains on."""
    ids, mask = nanosft.render_chat(tok, conv)
    tty = sys.stdout.isatty()
    parts = []
    for t, m in zip(ids, mask):
        s = tok.decode([t]).replace("\n", "\\n")
        parts.append((f"\033[42;30m{s}\033[0m" if tty else f"[{s}]") if m else s)
    print("".join(parts))
    print(
        f"\n{sum(mask)} of {len(ids)} tokens supervised "
        f"({'green' if tty else '[bracketed]'}): the assistant's answer and its <|end|>."
    )


MIN_PROMPT = 8  # a prompt cut from the left keeps at least this many of its tokens


def fit_conversation(tok, conv, block_size):
    """A conversation's (ids, mask), made to fit block_size + 1 tokens, and what was done:
    None (it fit), "turns" (the oldest turns were dropped), "prompt" (the last question was
    cut from the left) or "answer" (the answer alone does not fit: skip the record). An
    answer is never cut: without its <|end|> it would teach the model to stop nowhere, with
    it to stop mid-sentence."""
    ids, mask = nanosft.render_chat(tok, conv)
    if len(ids) - 1 <= block_size:
        return ids, mask, None
    system = conv[:1] if conv[0]["role"] == "system" else []
    rest = conv[len(system) :]
    cuts = [i for i, m in enumerate(rest) if m["role"] == "user" and i > 0]
    for head in (system, []):  # drop turns first, the system message last
        for i in cuts:
            ids, mask = nanosft.render_chat(tok, head + rest[i:])
            if len(ids) - 1 <= block_size:
                return ids, mask, "turns"
    # the last question and its answer alone are too long: cut the question from the left
    question = next((m for m in reversed(conv[:-1]) if m["role"] == "user"), {"content": ""})
    body, answer = (
        nanosft.encode_content(tok, question["content"]),
        nanosft.encode_content(tok, conv[-1]["content"]),
    )
    frame = [tok.endoftext, tok.user, tok.end, tok.assistant, tok.end]
    room = block_size + 1 - len(frame) - len(answer)
    if room < min(MIN_PROMPT, len(body)):
        return None, None, "answer"
    ids = (
        [tok.endoftext, tok.user]
        + body[len(body) - room :]
        + [tok.end, tok.assistant]
        + answer
        + [tok.end]
    )
    return ids, [0] * (len(ids) - len(answer) - 1) + [1] * (len(answer) + 1), "prompt"


def render_all(tok, records, block_size, report):
    """(inputs, targets) per (record number, conversation), each fitted to the block; what
    fitting did is counted in `report` (see fit_conversation)."""
    out = []
    too_long = f"longer than the model's block size {block_size}; shorten it"
    for n, conv in records:
        ids, mask, change = fit_conversation(tok, conv, block_size)
        answer = len(nanosft.encode_content(tok, conv[-1]["content"]))
        report.needs.append(answer + MIN_PROMPT + 5)  # the answer, a short question, the chat frame
        if change == "answer":
            tokens = len(nanosft.render_chat(tok, conv)[0]) - 1
            report.skip(
                n,
                f"whose answer alone is longer than block_size {block_size}",
                f"{tokens} tokens, {too_long}",
            )
            continue
        if change == "turns":
            report.truncate(n, "conversations cut to their last turns that fit", too_long)
        elif change == "prompt":
            report.truncate(n, "prompts cut from the left to fit", too_long)
        out.append(nanosft.example_tensors(ids, mask))
    report.check(block_size)
    if not out:
        raise nanosft.UserError(f"{report.path}: no assistant tokens to train on")
    return out


def step_order(n_examples, batch_size, seed, it, lengths):
    """The examples of optimizer step `it`, a pure function of (seed, it): shuffle once per
    epoch, then sort each window of 8 batches by length and cut it into batches, so a batch
    holds examples of similar length (little padding) while batches still vary."""
    per_epoch = max(1, n_examples // batch_size)
    epoch, k = divmod(it, per_epoch)
    g = torch.Generator().manual_seed(
        seed * 1_000_003 + epoch
    )  # a stream per (seed, epoch); 1,000,003 is prime
    perm = torch.randperm(n_examples, generator=g).tolist()
    # windows of 8 batches, each sorted by length, cut into batches
    windows = [
        sorted(perm[w : min(w + 8 * batch_size, per_epoch * batch_size)], key=lengths.__getitem__)
        for w in range(0, per_epoch * batch_size, 8 * batch_size)
    ]
    batches = [c[i : i + batch_size] for c in windows for i in range(0, len(c), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return batches[order[k % len(batches)]]


def step_batches(examples, it, batch_size, seed, grad_accum, pad, process, replay=None):
    """Step `it`'s examples (step_order) as this process's micro-batches on the device, and
    the supervised tokens of the whole step (every process, every micro-batch; at least 1).
    replay(it, supervised) -> (windows, their tokens): --replay's pre-training windows."""
    chosen = step_order(
        len(examples), batch_size, seed=seed, it=it, lengths=[len(x) for x, _ in examples]
    )
    supervised = sum(int((examples[i][1] != -1).sum()) for i in chosen)  # the targets other than -1
    mine = chosen[process.rank :: process.world]
    micro_batches = [
        nanosft.collate([examples[i] for i in part], pad)
        for part in [mine[j::grad_accum] for j in range(grad_accum)]
        if part
    ]
    if replay is not None:
        windows, n = replay(it, supervised)
        micro_batches, supervised = micro_batches + windows, supervised + n
    return [(X.to(process.device), Y.to(process.device)) for X, Y in micro_batches], max(
        supervised, 1
    )


# ----------------------------------------------------------------------------------------
# 3. what trains: every weight, but the well-trained vocabulary stays as pre-training left it


def build_model(ckpt, init="pretrained", seed=1337, train_embeddings=False):
    """(model, tokenizer, checkpoint) to fine-tune from the checkpoint file `ckpt`: the
    pre-trained weights with their well-trained vocabulary frozen (unless train_embeddings),
    or random ones (init "scratch": the no-pre-training baseline). PEFT wraps it next
    (extras/peft.py sft_setup)."""
    start_checkpoint = nanosft.load_checkpoint(ckpt, expect_kind=("pretrain", "sft", "dpo"))
    model, tok = nanosft.model_from_checkpoint(start_checkpoint, ckpt)
    if init == "scratch":
        torch.manual_seed(seed)
        model = nanosft.GPT(model.config)
    elif not train_embeddings:
        freeze_vocabulary(model, tok, pretraining_counts(tok, start_checkpoint))
    return model, tok, start_checkpoint


def chat_tokens(tok):
    return [tok.user, tok.assistant, tok.end, tok.system]


RARE = 10  # a token pre-training saw fewer times than this has no trustworthy embedding


def freeze_vocabulary(model, tok, counts, min_count=RARE):
    """Keep the embeddings of tokens that pre-training saw often (tied with the output
    layer) as they are; train the rest: the chat tokens and rare or unseen tokens. Tied, every
    SFT step would raise the output rows of the training people's names and lower all
    others: the model would answer with a TRAINING person's name instead of copying the name
    from the question. Rare tokens stay trainable, or SFT could not write new words."""
    if counts is None:
        return
    rare = (counts < min_count).nonzero().flatten().tolist()
    train_rows(model, sorted(set(rare) | set(chat_tokens(tok))))


def train_rows(model, rows):
    """Of the token embedding (tied: also the output layer) let only the rows `rows` train:
    a gradient hook zeroes the others' gradients."""
    keep = torch.zeros(model.wte.weight.size(0), 1)
    keep[rows] = 1.0
    model.wte.weight.requires_grad_(True)
    model.wte.weight.register_hook(lambda g: g * keep.to(g.device, g.dtype))
    return rows


def pretrain_text(start_checkpoint):
    """The pre-training text's file name, carried from stage to stage in the checkpoints'
    args: the vocabulary freeze counts its tokens, retention is its validation loss."""
    flags = start_checkpoint.get("args", {})
    return flags.get("pretrain_data") or (
        flags.get("data") if start_checkpoint["kind"] == "pretrain" else None
    )


@functools.lru_cache(maxsize=2)
def pretrain_stream(tok, file):
    """The pre-training text as one token stream, read and encoded once per run (None when
    the file is not at hand)."""
    return (
        corpus.encode_corpus(tok, corpus.read_text(file)) if file and os.path.isfile(file) else None
    )


def pretraining_counts(tok, start_checkpoint):
    """How often each token occurs in the pre-training text (None when it is not at hand)."""
    stream = pretrain_stream(tok, pretrain_text(start_checkpoint))
    if start_checkpoint["kind"] != "pretrain" or stream is None:
        return None
    return torch.bincount(stream, minlength=tok.vocab_size)


# ----------------------------------------------------------------------------------------
# 4. arguments (the flags beyond the lesson: extras/flags.py)


def parse_args(argv=None):
    ap = nanosft.ArgumentParser(__doc__, stage="finetune")  # more flags: extras/flags.py
    lesson = ap.add_argument_group("fine-tuning: the model, the data, the labels")
    lesson.add_argument(
        "--ckpt", default="out/pretrain.pt", help="pre-trained checkpoint to start from"
    )
    lesson.add_argument(
        "--data",
        help="instruction file (formats: extras/own_data.py); default: the world's questions",
    )
    lesson.add_argument(
        "--init",
        default="pretrained",
        choices=["pretrained", "scratch"],
        help="scratch: random weights (the no-pre-training baseline)",
    )
    lesson.add_argument(
        "--labels",
        default="top-voted",
        choices=["gold", "top-voted", "random-community"],
        help="the world's answers: the gold fact, the community's top-voted or a random one",
    )
    lesson.add_argument(
        "--show-mask", action="store_true", help="print one rendered example and exit"
    )
    nanosft.add_common_args(ap)
    ap.set_defaults(**DEFAULTS)
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------------------
# 5. the world's evaluation: what SFT makes usable (held-out accuracy), what it costs (retention)


def task_accuracy(model, tok, rows):
    """List tasks (copy / reverse / count): exact match."""
    answers, _ = world_qa.answer_questions(model, tok, [r["prompt"] for r in rows])
    return sum(a.strip() == r["answer"] for r, a in zip(rows, answers)) / max(1, len(rows))


class SFTEvaluator:
    """What SFT makes usable and what it costs, on the world: held-out accuracy (the test half
    of the held-out people's questions), the degenerate rate, and retention measured two ways:
    the pre-training validation loss, and the knowledge probe (the biographies' facts completed
    as plain text, as after pre-training; a stand-in for PEFT-Arena's general-ability
    benchmarks).

    evaluator(model) measures a point of the path (its probe None: measured at the ends);
    evaluator(model, full=True) adds the training people, the list tasks and the knowledge
    probe (before SFT and final: what sft.json reports). `more`: measures that flags add to
    every point, more(model, test answers) -> their fields: the dev half that rewinding
    chooses by (extras/rewind.py DevHalf), the in- and cross-domain split of --sft-attributes
    (extras/cross_domain.py).

    pretrain_file: the pre-training text (None, or not at hand: no retention loss)."""

    def __init__(self, process, tok, pretrain_file, block_size, world_dir=world_eval.HERE):
        self.process, self.tok, self.world_dir = process, tok, world_dir
        self.world = world_eval.load_world(world_dir)
        self.longest = world_qa.world_longest(world_dir)
        self.test = world_qa.heldout_halves(world_dir)[1]
        self.train = world_qa.load_eval_rows("train", world_dir)[:250]  # as many as a held-out half
        self.tasks = world_qa.load_eval_rows("tasks", world_dir)
        self.retention, self.more = None, []
        stream = pretrain_stream(tok, pretrain_file)
        if stream is not None:  # the split pre-training used: its validation loss
            self.retention = corpus.fixed_windows(
                corpus.split_corpus(stream, block_size)[1], block_size
            )

    def qa(self, model, rows):
        return world_qa.qa_eval(model, self.tok, self.world, rows, longest=self.longest)

    def __call__(self, model, full=False):
        test = self.qa(model, self.test)
        point = {
            "heldout": test["accuracy"],
            "degenerate": test["degenerate_rate"],
            "retention": nanosft.mean_loss(model, self.retention, self.process)
            if self.retention
            else None,
            "probe": None,
        }
        for more in self.more:
            point.update(more(model, test["answers"]))
        return self.complete(point, model) if full else point

    def complete(self, point, model):
        """A point measured already (evaluator(model) at the same weights), completed with what
        the report adds: the training people, the list tasks and the knowledge probe."""
        full = {
            **point,
            "train": self.qa(model, self.train)["accuracy"],
            "tasks": task_accuracy(model, self.tok, self.tasks) if self.tasks else None,
        }
        return {**full, "probe": self.probe(model) if point["probe"] is None else point["probe"]}

    def probe(self, model):
        return world_eval.knowledge_probe(model, self.tok, self.world)

    def start(self, model):
        """The path's first point: the model before SFT, with its knowledge probe."""
        return [{"step": 0, **self(model), "probe": self.probe(model)}]


def fmt_loss(v):  # a loss for the log: None (no pre-training text at hand) as "n/a"
    return "n/a" if v is None else f"{v:.4f}"


def log_eval(log, p):
    """An evaluation's log line (and what the flags' measures added: dev, in/cross-domain)."""
    log(
        f"eval step {p['step']}: held-out {p['heldout']:.3f} | retention loss "
        f"{fmt_loss(p['retention'])}"
        + ("" if p["probe"] is None else f" | knowledge probe {p['probe']:.3f}")
        + "".join(
            f" | {k} {v:.3f}"
            for k, v in p.items()
            if k not in ("step", "heldout", "degenerate", "retention", "probe") and v is not None
        )
    )


def not_rewound(step):
    """sft.json's rewinding fields of a run without --rewind: out/sft.pt holds the final weights."""
    return {
        "rewound": f"the final weights (step {step}; no --rewind)",
        "rewound_step": step,
        "rewound_alpha": None,
        "rewind": "none",
    }


def chance_accuracy(world, attributes=None):
    """Accuracy of guessing uniformly among an attribute's values, averaged over `attributes`
    (all)."""
    attributes = attributes or world["attributes"]
    return sum(1 / len(world["values"][a]) for a in attributes) / len(attributes)


def world_report(log, path, final, rewound, choice, chance):
    """sft.json's world numbers: before SFT (the path's step 0), at the final step and at the
    rewound point (`final`, `rewound`: their full evaluations; the same without --rewind); the
    headline is logged."""
    start = path[0]
    log(
        f"held-out accuracy: before {start['heldout']:.3f} | final {final['heldout']:.3f} | "
        f"out/sft.pt: {choice['rewound']} {rewound['heldout']:.3f}\n"
        f"retention loss:    before {fmt_loss(start['retention'])} | "
        f"final {fmt_loss(final['retention'])} | out/sft.pt {fmt_loss(rewound['retention'])}\n"
        f"knowledge probe:   before {start['probe']:.3f} | final {final['probe']:.3f} | "
        f"out/sft.pt {rewound['probe']:.3f}\n"
        f"training people {rewound['train']:.3f}"
        + ("" if rewound["tasks"] is None else f" | list tasks {rewound['tasks']:.3f}")
        + f" | degenerate answers {rewound['degenerate']:.3f}"
    )
    return {
        "heldout_accuracy": rewound["heldout"],
        "train_accuracy": rewound["train"],
        "task_accuracy": rewound["tasks"],
        "heldout_accuracy_before": start["heldout"],
        "heldout_accuracy_final": final["heldout"],
        "heldout_accuracy_rewound": rewound["heldout"],
        "heldout_accuracy_peak": max(p["heldout"] for p in path),
        "train_accuracy_final": final["train"],
        "task_accuracy_final": final["tasks"],
        "degenerate_rate": rewound["degenerate"],
        "degenerate_rate_final": final["degenerate"],
        "retention_val_loss_before": start["retention"],
        "retention_val_loss_final": final["retention"],
        "retention_val_loss_rewound": rewound["retention"],
        "knowledge_probe_before": start["probe"],
        "knowledge_probe_final": final["probe"],
        "knowledge_probe_rewound": rewound["probe"],
        **choice,
        "chance_accuracy": chance,
        "path": path,
    }


# ----------------------------------------------------------------------------------------
# 6. the stage: load, train (the optimisation step written out), save, report


def main(argv=None):
    args = parse_args(argv)
    process, t_start = nanosft.setup(args.device, args.dtype), time.time()
    if args.resume or args.time_budget or process.world > 1:
        from extras import runtime  # --resume, --time-budget, torchrun's processes
    # ---- load: checkpoint, model, data (all input validated before anything is written)
    model, tok, start_checkpoint = build_model(
        args.ckpt, init=args.init, seed=args.seed, train_embeddings=args.train_embeddings
    )
    # the pre-training text's name travels on to the next stage
    block_size, args.pretrain_data = model.config.block_size, pretrain_text(start_checkpoint)
    records, report = load_records(
        args.data,
        labels=args.labels,
        seed=args.seed,
        strict=args.strict,
        world_dir=args.world,
        attributes=args.sft_attributes,
    )
    if args.show_mask:
        return show_mask(tok, records[0][1])
    rows = peft = replay_windows = evaluator = own = None  # what the extras below set
    if not args.data:  # the world's questions: held-out accuracy and retention along the way
        evaluator = SFTEvaluator(process, tok, args.pretrain_data, block_size, world_dir=args.world)
        if args.sft_attributes:  # held-out accuracy also in-domain and cross-domain
            from extras import cross_domain

            evaluator.more.append(cross_domain.Domains(evaluator, args.sft_attributes))
    else:  # your own file: its held-out records are measured, never trained on
        from extras import own_eval

        own = own_eval.SFTHeldout(args.data, records, tok, model=model, process=process)
        records = own.train
    examples = render_all(tok, records, block_size, report)
    if args.lora_rank or args.oft_block or args.prompt_tokens:
        from extras import peft  # --lora-rank, --oft-block, --prompt-tokens: adapters, a prefix

        counts = None if args.init == "scratch" else pretraining_counts(tok, start_checkpoint)
        model, rows = peft.sft_setup(
            model,
            tok,
            examples,
            seed=args.seed,
            quantize=args.quantize_base,
            counts=counts,
            chat_tokens=chat_tokens(tok),
            rare=RARE,
            train_rows=train_rows,
            **{k: getattr(args, k) for k in peft.FLAGS},
        )
    if args.replay:
        from extras import replay  # --replay: pre-training windows in every step

        replay_windows = replay.sampler(
            pretrain_stream(tok, args.pretrain_data),
            file=args.pretrain_data,
            block_size=block_size,
            ratio=args.replay,
            seed=args.seed,
            process=process,
        )
    if args.rewind != "none":  # every evaluation point's checkpoint kept, one chosen at the end
        from extras import rewind

        evaluator.more.append(rewind.DevHalf(evaluator, args.sft_attributes, top_voted))
    optimizer = nanosft.configure_optimizer(
        model.to(process.device), args.lr, weight_decay=0.0, device_type=process.device.type
    )
    start_iter, state = (
        runtime.resume(args.out_dir, "sft", model, tok=tok, optimizer=optimizer)
        if args.resume
        else (0, {})
    )
    # the world's evaluations along the way, from the model before SFT
    path = state.get("path") or (evaluator.start(model) if evaluator else [])
    trainable, what = (  # the weights that train, and the method
        (model.num_params(trainable_only=True), "full")
        if not peft
        else (
            peft.trainable_params(model, rows),
            peft.method(args.lora_rank, args.oft_block, args.prompt_tokens),
        )
    )
    process.log(  # what was skipped or cut, then what trains
        "\n".join(
            [
                *report.lines(),
                f"{len(examples)} examples from {report.path} | {trainable:,} trainable of "
                f"{model.num_params():,} parameters | {what}, lr {args.lr:g} | "
                f"{process.device} {process.dtype}",
            ]
        )
    )

    # every --eval-interval steps and at the end: the path's step (world), sft_last.pt
    def on_eval(it):
        if process.master:
            # (after --resume the last point may be measured already)
            if evaluator and path[-1]["step"] != it:
                path.append({"step": it, **evaluator(model)})
                log_eval(process.log, path[-1])
                if args.rewind != "none":
                    plain_model = peft.plain_model(model) if peft else model  # adapters merged
                    rewind.keep_step(
                        plain_model, tok, it=it, flags=vars(args), out_dir=args.out_dir
                    )
            elif own:  # your own file: the held-out answer loss, start model vs now
                own.evaluate(model, it)
            keep(it)
        if process.world > 1:
            runtime.barrier(process)

    def keep(it):  # sft_last.pt: what --resume needs to continue after step `it`
        checkpoint = nanosft.checkpoint_dict(
            "sft",
            peft.plain_model(model) if peft else model,  # adapters merged: an ordinary GPT
            tok,
            optimizer,
            it=it,
            flags=vars(args),
            state={"path": path},
        )
        if peft:  # and unmerged, as they train (what --resume loads: extras/runtime.py)
            checkpoint["train_state"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        nanosft.save_checkpoint(os.path.join(args.out_dir, "sft_last.pt"), checkpoint)

    # ---- train: every answer token is a target; the loss is their mean over the whole step
    # (sft_loss)
    model.train()
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
                raise KeyboardInterrupt(f"step {step} kept in sft_last.pt; --resume continues")
            if args.time_budget and runtime.out_of_time(t0, args.time_budget, process, it):
                break
            # warmup, then cosine decay
            lr = nanosft.lr_at(it, args.lr, args.warmup, args.max_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches, supervised = step_batches(
                examples,
                it,
                batch_size=args.batch_size,
                seed=args.seed,
                grad_accum=args.grad_accum,
                pad=tok.pad,
                process=process,
                replay=replay_windows,
            )
            step_loss = 0.0
            for i, (X, Y) in enumerate(micro_batches):
                # DDP averages the gradients over the processes after the last micro-batch
                if process.world > 1:
                    ddp_model.require_backward_grad_sync = i == len(micro_batches) - 1
                with nanosft.autocast(process.device, process.dtype):
                    loss_sum = sft_loss(ddp_model, X, Y)  # summed over the supervised tokens
                # x world: DDP averages
                (loss_sum * (process.world / supervised)).backward()
                step_loss += loss_sum.item()
                tokens += X.numel()
            if process.world > 1:  # the whole step's, every process's
                step_loss = runtime.all_reduce(step_loss, process)
            nanosft.check_finite(step_loss, it, lr)  # a NaN or inf stops the run before the step
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step = it + 1
            if step % args.log_interval == 0 or step == args.max_iters:
                nanosft.log_step(
                    process,
                    step,
                    args.max_iters,
                    loss=step_loss / supervised,
                    lr=lr,
                    seconds=time.time() - t0,
                    tokens=tokens,
                )
            if step % args.eval_interval == 0 and step < args.max_iters:
                on_eval(step)
    train_seconds = time.time() - t0
    on_eval(step)
    # ---- save and report (world data: before and after; with --rewind out/sft.pt is the
    # rewound checkpoint)
    if process.master:
        out = summary(
            model,
            trainable,
            process,
            step=step,
            seconds=train_seconds,
            tokens=tokens,
            data=report.state(),
            flags=vars(args),
            frozen_bytes=peft.frozen_bytes(model) if peft else None,  # nothing frozen
        )
        plain_model = peft.plain_model(model) if peft else model  # adapters merged
        # the final weights (with --rewind: the checkpoint rewinding picks, below)
        checkpoint = nanosft.checkpoint_dict("sft", plain_model, tok, it=step, flags=vars(args))
        if evaluator:  # the final weights' full evaluation: the path's last point, completed
            final = path[-1] = evaluator.complete(path[-1], model)
            rewound, choice = final, not_rewound(step)
            if args.rewind != "none":  # out/sft.pt: the checkpoint rewinding picks
                checkpoint, choice, rewound = rewind.rewind(
                    evaluator,
                    start_checkpoint,
                    model,
                    tok,
                    path=path,
                    final=final,
                    flags=vars(args),
                    out_dir=args.out_dir,
                    plot=args.plot,
                    **{k: getattr(args, k) for k in rewind.FLAGS},
                )
            out.update(
                world_report(
                    process.log,
                    path,
                    final,
                    rewound=rewound,
                    choice=choice,
                    chance=chance_accuracy(evaluator.world),
                )
            )
            if args.sft_attributes:
                out.update(
                    cross_domain.report(
                        process.log, path, final, rewound=rewound, attributes=args.sft_attributes
                    )
                )
            checkpoint["metrics"] = {
                k: v for k, v in out.items() if isinstance(v, (int, float, str))
            }
        elif own:  # your own file: held-out answers, start -> final (out/sft_eval.jsonl)
            out["own_eval"] = own.finish(plain_model, args.out_dir)
        nanosft.save_checkpoint(os.path.join(args.out_dir, "sft.pt"), checkpoint)
        out["seconds"] = time.time() - t_start
        nanosft.write_json(os.path.join(args.out_dir, "sft.json"), out)
        process.log(f"done in {out['seconds']:.0f}s -> {os.path.join(args.out_dir, 'sft.pt')}")


def summary(model, trainable, process, step, seconds, tokens, data, flags, frozen_bytes):
    """sft.json's fields of every run (the world's: world_report): `step` steps taken in
    `seconds` of training, this process's `tokens`."""
    return {
        "trainable_params": trainable,
        "total_params": model.num_params(),
        "steps": step,
        "train_seconds": seconds,
        "tokens_per_sec": tokens * process.world / max(seconds, 1e-9),
        "device": str(process.device),
        "dtype": process.dtype,
        "data": data,
        "labels": None if flags["data"] else flags["labels"],
        "frozen_bytes": frozen_bytes,
        **{k: flags[k] for k in REPORTED_FLAGS},
    }


if __name__ == "__main__":
    nanosft.cli(main)  # bad input is one line and exit code 2, never a traceback
