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

DEFAULTS = dict(max_iters=300, batch_size=16, lr=None, eval_interval=75, warmup=20, log_interval=25)
LR = {
    "full": 2e-3,
    "lora": 3e-3,
    "oft": 3e-3,
    "prompt": 3e-2,
}  # --lr per method: why, docs/forgetting.md, docs/peft.md
ALPHAS = (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)  # --alphas (extras/rewind.py)
# the flags main hands on by name: to extras/peft.py sft_setup, to extras/rewind.py, to sft.json
PEFT_FLAGS = (
    "lora_rank",
    "lora_alpha",
    "lora_on",
    "oft_block",
    "prompt_tokens",
    "prompt_init",
    "prompt_mlp",
    "new_rows",
)
REWIND_FLAGS = ("rewind", "alphas", "rewind_tolerance", "rewind_loss_tolerance", "rewind_min_gain")
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
# too. cross_entropy(ignore_index=-1) skips those.


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
    window = 8 * batch_size
    batches = []
    for w in range(0, per_epoch * batch_size, window):
        chunk = sorted(perm[w : min(w + window, per_epoch * batch_size)], key=lengths.__getitem__)
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
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


def projection_bytes(model):
    """The bytes of the blocks' projection weights (sft.json's frozen_bytes without PEFT)."""
    return sum(
        m.weight.numel() * m.weight.element_size()
        for m in model.h.modules()
        if isinstance(m, torch.nn.Linear)
    )


# ----------------------------------------------------------------------------------------
# 4. arguments and checkpoints


# the world's attributes (data/world.py writes them; tests/test_core.py checks)
ATTRS = ["city", "job", "food", "pet", "hobby"]


def sft_attributes(spec):
    """--sft-attributes "city,job,food" -> ["city", "job", "food"] (the world's order): the
    attributes whose questions SFT trains on; the others are asked only in evaluation, a
    question type SFT never showed (cross-domain). None: every attribute."""
    names = ATTRS if spec is None else [a.strip() for a in spec.split(",") if a.strip()]
    unknown = [a for a in names if a not in ATTRS]
    if unknown or not names:
        raise nanosft.UserError(
            f"--sft-attributes {spec}: unknown attribute {', '.join(unknown) or '(none named)'}; "
            f"the world's attributes are {','.join(ATTRS)}"
        )
    return [a for a in ATTRS if a in names]


def method(lora_rank, oft_block, prompt_tokens):
    """What trains: "lora", "oft", "prompt" or "full" (every weight; also --init scratch)."""
    return "lora" if lora_rank else "oft" if oft_block else "prompt" if prompt_tokens else "full"


def parse_args(argv=None):
    ap = nanosft.ArgumentParser(__doc__)
    lesson = ap.add_argument_group("fine-tuning: the model, the data, what trains")
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
        "--train-embeddings", action="store_true", help="train every row (see freeze_vocabulary)"
    )
    lesson.add_argument(
        "--show-mask", action="store_true", help="print one rendered example and exit"
    )
    nanosft.add_common_args(ap)
    data = ap.add_argument_group("data options (the world's questions)")
    data.add_argument(
        "--labels", default="top-voted", choices=["gold", "top-voted", "random-community"]
    )
    data.add_argument(
        "--world", default=world_eval.HERE, help="the world directory (pretrain.py --world)"
    )
    data.add_argument(
        "--sft-attributes",
        help="train on the questions about these attributes only, e.g. "
        "city,job,food; held-out accuracy is then also reported in- and cross-domain",
    )
    data.add_argument(
        "--strict",
        action="store_true",
        help="a record that would be skipped or truncated is an error",
    )
    peft = ap.add_argument_group("PEFT: LoRA, OFT, prompt tuning (extras/peft.py, docs/peft.md)")
    peft.add_argument(
        "--lora-rank", type=int, default=0, help="LoRA adapters of this rank, base frozen"
    )
    peft.add_argument("--lora-alpha", type=float, help="LoRA scale numerator (default 2*rank)")
    peft.add_argument(
        "--oft-block", type=int, default=0, help="OFT rotations in blocks of this size, base frozen"
    )
    peft.add_argument(
        "--lora-on",
        default="attn",
        choices=["attn", "mlp", "attn,mlp"],
        help="what LoRA/OFT adapts",
    )
    peft.add_argument(
        "--quantize-base", default="none", choices=["none", "int8"], help="LoRA/OFT: int8 base"
    )
    peft.add_argument(
        "--prompt-tokens", type=int, default=0, help="prompt tuning: learned prefix length"
    )
    peft.add_argument(
        "--prompt-init",
        default="random",
        choices=["random", "task"],
        help="prompt tuning: its start",
    )
    peft.add_argument(
        "--prompt-mlp", type=int, default=0, help="prompt tuning through an MLP of this width"
    )
    peft.add_argument(
        "--new-rows", default="train", choices=["train", "freeze"], help="new tokens' embeddings"
    )
    forget = ap.add_argument_group(
        "forgetting: replay, rewinding (extras/replay.py, extras/rewind.py)"
    )
    forget.add_argument(
        "--replay", type=float, default=0.0, help="mix this many pre-training tokens per SFT token"
    )
    forget.add_argument(
        "--rewind",
        default="none",
        choices=["none", "path", "interpolate"],
        help="out/sft.pt: the final weights, or rewound along the path or the line",
    )
    forget.add_argument(
        "--rewind-min-gain", type=float, default=0.05, help="the least retention loss it must save"
    )
    forget.add_argument(
        "--rewind-tolerance", type=float, default=0.01, help="dev accuracy below the best"
    )
    forget.add_argument(
        "--rewind-loss-tolerance", type=float, default=0.02, help="dev answer loss above the lowest"
    )
    forget.add_argument(
        "--alphas",
        type=lambda v: tuple(sorted({0.0, 1.0} | {float(a) for a in v.split(",")})),
        help="with --rewind: the alphas of the line evaluated (comma-separated; 0 and 1 "
        "always; default: with --rewind interpolate, ALPHAS, else none)",
    )
    ap.set_defaults(**DEFAULTS)
    args = ap.parse_args(argv)
    if sum(map(bool, (args.lora_rank, args.oft_block, args.prompt_tokens))) > 1:
        raise nanosft.UserError(
            "--lora-rank, --oft-block and --prompt-tokens are alternatives; pick one"
        )
    if (args.prompt_mlp or args.prompt_init != "random") and not args.prompt_tokens:
        raise nanosft.UserError(
            "--prompt-init and --prompt-mlp shape a prompt: add --prompt-tokens"
        )
    if args.quantize_base != "none" and not (args.lora_rank or args.oft_block):
        raise nanosft.UserError(
            "--quantize-base needs a frozen base: add --lora-rank or --oft-block"
        )
    if args.data and args.sft_attributes:
        raise nanosft.UserError(
            "--sft-attributes picks the world's questions: it does not apply to --data"
        )
    args.sft_attributes = None if args.data else sft_attributes(args.sft_attributes)
    world_eval.check_world_dir(args.world)
    if args.lr is None:
        args.lr = LR[method(args.lora_rank, args.oft_block, args.prompt_tokens)]
    if args.data and args.rewind != "none":
        raise nanosft.UserError(
            "--rewind chooses by the world's held-out questions: it does not apply to --data"
        )
    if args.alphas and args.rewind == "none":
        raise nanosft.UserError(
            "--alphas evaluates the line for rewinding: add --rewind path or --rewind interpolate"
        )
    if args.alphas is None:
        args.alphas = ALPHAS if args.rewind == "interpolate" else ()
    if args.init == "scratch":  # no pre-trained end: no line pre-trained -> final to evaluate
        args.alphas = ()
    return args


def save_last(file, plain_model, model, tok, optimizer, it, flags, state):
    """out/sft_last.pt, written at every evaluation: an ordinary final checkpoint, plus what
    --resume needs (runtime.resume): the optimizer, the stage's state (its path) and the weights
    in their training form (adapters unmerged)."""
    checkpoint = nanosft.checkpoint_dict(
        "sft", plain_model, tok, optimizer, it=it, flags=flags, state=state
    )
    checkpoint["train_state"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    nanosft.save_checkpoint(file, checkpoint)


# ----------------------------------------------------------------------------------------
# 5. the world's evaluation: what SFT makes usable (held-out accuracy), what it costs (retention)


def by_domain(rows, attributes):
    """(in-domain rows, cross-domain rows) of world questions: those about an attribute SFT
    asked about (`attributes`), and the rest. Together they are `rows`."""
    return [r for r in rows if r["attribute"] in attributes], [
        r for r in rows if r["attribute"] not in attributes
    ]


def domain_accuracy(world, rows, answers, attributes):
    """(in-domain, cross-domain) accuracy of the answers to `rows` (split by by_domain), graded
    by the world's verifier; None for a side without rows."""
    said = {id(r): a for r, a in zip(rows, answers)}
    return tuple(
        sum(world_eval.grade(world, r["person"], r["attribute"], said[id(r)]) for r in part)
        / len(part)
        if part
        else None
        for part in by_domain(rows, attributes)
    )


def task_accuracy(model, tok, rows):
    """List tasks (copy / reverse / count): exact match."""
    answers, _ = world_qa.answer_questions(model, tok, [r["prompt"] for r in rows])
    return sum(a.strip() == r["answer"] for r, a in zip(rows, answers)) / max(1, len(rows))


def dev_answer_batches(tok, prompts, world_dir=world_eval.HERE, batch=64):
    """The community's top-voted answers to the dev half's questions `prompts`
    (world_community_eval.jsonl: threads no stage trains on), as fixed (x, y) batches:
    their loss says how closely the model writes the answers SFT teaches -- the voted
    style included -- for people it was never trained on."""
    threads = formats.read_records(world_eval.path("world_community_eval.jsonl", world_dir))
    convs = [
        [
            {"role": "user", "content": t["prompt"]},
            {"role": "assistant", "content": top_voted(t["answers"])},
        ]
        for _, t in threads
        if t["prompt"] in prompts
    ]
    examples = [nanosft.example_tensors(*nanosft.render_chat(tok, c)) for c in convs]
    return [
        nanosft.collate(examples[i : i + batch], tok.pad) for i in range(0, len(examples), batch)
    ]


class SFTEvaluator:
    """Held-out accuracy (dev half used for rewinding, test half reported, also split into
    in-domain and cross-domain: the attributes SFT asked about and the others), training-people
    accuracy, list-task accuracy and retention measured two ways: the pre-training
    validation loss, and the knowledge probe (the biographies' facts completed as plain
    text, as after pre-training; a stand-in for PEFT-Arena's general-ability benchmarks).

    evaluator(model) measures what the path and rewinding read at every evaluation point
    (the probe is None there); evaluator(model, full=True) adds the training people, the
    list tasks and the knowledge probe (before SFT, final, rewound: what sft.json reports).

    pretrain_stream: the pre-training text's tokens (None: no retention loss).
    attributes: those SFT trains on (--sft-attributes). Rewinding sees the dev half's
    questions about these only, so nothing about a cross-domain attribute informs the choice."""

    def __init__(
        self, process, tok, pretrain_stream, block_size, world_dir=world_eval.HERE, attributes=None
    ):
        self.process, self.tok = process, tok
        self.world = world_eval.load_world(world_dir)
        self.attributes = attributes or self.world["attributes"]
        self.longest = world_qa.world_longest(world_dir)
        dev, self.test = world_qa.heldout_halves(world_dir)
        self.dev = by_domain(dev, self.attributes)[0]
        self.dev_answers = dev_answer_batches(tok, {r["prompt"] for r in self.dev}, world_dir)
        self.train = world_qa.load_eval_rows("train", world_dir)[:250]  # as many as a held-out half
        self.tasks = world_qa.load_eval_rows("tasks", world_dir)
        self.retention = None
        if (
            pretrain_stream is not None
        ):  # the same split pre-training used: retention = its validation loss
            self.retention = corpus.fixed_windows(
                corpus.split_corpus(pretrain_stream, block_size)[1], block_size
            )

    def __call__(self, model, full=False):
        qa = lambda rows: world_qa.qa_eval(model, self.tok, self.world, rows, longest=self.longest)
        test = qa(self.test)
        inside, cross = domain_accuracy(self.world, self.test, test["answers"], self.attributes)
        result = {
            "dev": qa(self.dev)["accuracy"],
            "heldout": test["accuracy"],
            "heldout_in": inside,
            "heldout_cross": cross,
            "dev_loss": nanosft.mean_loss(model, self.dev_answers, self.process),
            "degenerate": test["degenerate_rate"],
            "retention": nanosft.mean_loss(model, self.retention, self.process)
            if self.retention
            else None,
            "probe": None,
        }
        return self.complete(result, model) if full else result

    def complete(self, point, model):
        """A point measured already (evaluator(model) at the same weights), completed with what
        the report adds: the training people, the list tasks and the knowledge probe."""
        full = {
            **point,
            "train": world_qa.qa_eval(
                model, self.tok, self.world, self.train, longest=self.longest
            )["accuracy"],
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


def log_eval(log, result):
    cross = (
        ""
        if result["heldout_cross"] is None
        else f", in-domain {result['heldout_in']:.3f}, cross-domain {result['heldout_cross']:.3f}"
    )
    probe = "" if result["probe"] is None else f" | knowledge probe {result['probe']:.3f}"
    log(
        f"eval step {result['step']}: held-out {result['heldout']:.3f} "
        f"(dev {result['dev']:.3f}, dev answer loss "
        f"{result['dev_loss']:.4f}{cross}) | retention loss {fmt_loss(result['retention'])}{probe}"
    )


def not_rewound(step):
    """sft.json's rewinding fields of a run without --rewind: out/sft.pt holds the final weights."""
    return {
        "rewound": f"the final weights (step {step}; no --rewind)",
        "rewound_step": step,
        "rewound_alpha": None,
        "rewind": "none",
    }


def world_report(log, path, final, rewound, choice, chance, attributes):
    """sft.json's world numbers: before SFT (the path's step 0), at the final step and at the
    rewound point (`final`, `rewound`: their full evaluations); the headline is logged.
    attributes: those SFT asked about; held-out accuracy is split into these (in-domain) and
    the others (cross-domain; None when SFT asked about every attribute)."""
    start = path[0]
    log(
        f"held-out accuracy: before {start['heldout']:.3f} | final {final['heldout']:.3f} | "
        f"rewound ({choice['rewound']}) {rewound['heldout']:.3f}"
    )
    if rewound["heldout_cross"] is not None:
        log(
            f"  of it, rewound: in-domain ({','.join(attributes)}) {rewound['heldout_in']:.3f} | "
            f"cross-domain (the other attributes) {rewound['heldout_cross']:.3f}, "
            f"before SFT {start['heldout_cross']:.3f}"
        )
    log(
        f"retention loss:    before {fmt_loss(start['retention'])} | "
        f"final {fmt_loss(final['retention'])} | rewound {fmt_loss(rewound['retention'])}"
    )
    log(
        f"knowledge probe:   before {start['probe']:.3f} | final {final['probe']:.3f} | "
        f"rewound {rewound['probe']:.3f}"
    )
    tasks = (
        f" | list tasks {rewound['tasks']:.3f}" if rewound["tasks"] is not None else ""
    )  # (world.py --list-tasks)
    log(
        f"training people {rewound['train']:.3f}{tasks} | "
        f"degenerate answers {rewound['degenerate']:.3f}"
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
        "sft_attributes": attributes,
        "heldout_accuracy_in_domain": rewound["heldout_in"],
        "heldout_accuracy_cross_domain": rewound["heldout_cross"],
        "heldout_accuracy_in_domain_final": final["heldout_in"],
        "heldout_accuracy_cross_domain_final": final["heldout_cross"],
        "heldout_accuracy_cross_domain_before": start["heldout_cross"],
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
        evaluator = SFTEvaluator(
            process,
            tok,
            pretrain_stream(tok, args.pretrain_data),
            block_size,
            world_dir=args.world,
            attributes=args.sft_attributes,
        )
    else:  # your own file: its held-out records are measured, never trained on
        from extras import own_eval

        own = own_eval.SFTHeldout(args.data, records, tok, model=model, process=process)
        records = own.train
    # what was skipped or cut: report.lines()
    examples = formats.render_all(tok, records, block_size, report)
    if args.lora_rank or args.oft_block or args.prompt_tokens:
        from extras import (
            peft,
        )  # --lora-rank, --oft-block, --prompt-tokens: adapters or a prefix train

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
            **{k: getattr(args, k) for k in PEFT_FLAGS},
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
    if args.rewind != "none":
        from extras import (
            rewind,
        )  # --rewind: every evaluation point's checkpoint kept, one chosen at the end
    optimizer = nanosft.configure_optimizer(
        model.to(process.device), args.lr, weight_decay=0.0, device_type=process.device.type
    )
    start_iter, state = (
        runtime.resume(args.out_dir, "sft", model, tok=tok, optimizer=optimizer)
        if args.resume
        else (0, {})
    )
    path = state.get("path") or (
        evaluator.start(model) if evaluator else []
    )  # the world's evaluations
    trainable = (
        peft.trainable_params(model, rows) if peft else model.num_params(trainable_only=True)
    )
    process.log(
        "\n".join(
            report.lines()
            + [
                f"{len(examples)} examples from {report.path} | {trainable:,} trainable of "
                f"{model.num_params():,} parameters | "
                f"{method(args.lora_rank, args.oft_block, args.prompt_tokens)}, lr {args.lr:g} | "
                f"{process.device} {process.dtype}"
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
        save_last(
            nanosft.last_path(args.out_dir, "sft"),
            peft.plain_model(model) if peft else model,
            model,
            tok=tok,
            optimizer=optimizer,
            it=it,
            flags=vars(args),
            state={"path": path},
        )

    # ---- train: every answer token is a target; the loss is their mean over the whole step
    # (sft_loss)
    model.train()
    ddp_model = torch.compile(model) if args.compile else model
    if process.world > 1:
        ddp_model = runtime.wrap_ddp(ddp_model, process)
    scaler = torch.amp.GradScaler(
        process.device.type, enabled=process.dtype == "float16"
    )  # fp16 only: see below
    params = [p for p in model.parameters() if p.requires_grad]
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
                # x world: DDP averages. fp16 only: the loss scaled up so small gradients do not
                # underflow (else scale() is the identity)
                scaler.scale(loss_sum * (process.world / supervised)).backward()
                step_loss += loss_sum.item()
                tokens += X.numel()
            if process.world > 1:  # the whole step's, every process's
                step_loss = runtime.all_reduce(step_loss, process)
            nanosft.check_finite(step_loss, it, lr)  # a NaN or inf stops the run before the step
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            scaler.step(optimizer)  # optimizer.step() (fp16: skipped if the gradient overflowed)
            scaler.update()
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
            (step, train_seconds, tokens),
            process,
            data=report.state(),
            flags=vars(args),
            frozen_bytes=peft.frozen_bytes(model) if peft else projection_bytes(model),
        )
        sft_file, plain_model = (
            os.path.join(args.out_dir, "sft.pt"),
            peft.plain_model(model) if peft else model,
        )
        checkpoint = nanosft.checkpoint_dict(
            "sft", plain_model, tok, it=step, flags=vars(args)
        )  # final weights
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
                    **{k: getattr(args, k) for k in REWIND_FLAGS},
                )
            out.update(
                world_report(
                    process.log,
                    path,
                    final,
                    rewound=rewound,
                    choice=choice,
                    chance=world_qa.chance(evaluator.world),
                    attributes=evaluator.attributes,
                )
            )
            checkpoint["metrics"] = {
                k: v for k, v in out.items() if isinstance(v, (int, float, str))
            }
        elif own:  # your own file: held-out answers, start -> final (out/sft_eval.jsonl)
            out["own_eval"] = own.finish(plain_model, args.out_dir)
        nanosft.save_checkpoint(sft_file, checkpoint)
        out["seconds"] = time.time() - t_start
        nanosft.write_json(os.path.join(args.out_dir, "sft.json"), out)
        process.log(f"done in {out['seconds']:.0f}s -> {sft_file}")


def summary(model, trainable, steps, process, data, flags, frozen_bytes):
    """sft.json's fields of every run (the world's: world_report).
    steps: (steps taken, seconds of training, this process's tokens)."""
    step, seconds, tokens = steps
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
