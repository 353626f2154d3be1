"""
Stage 2: supervised fine-tuning (SFT) with a masked loss on instruction pairs.

    python finetune.py --ckpt out/pretrain.pt                  # world Q&A, community labels
    python finetune.py --ckpt out/pretrain.pt --show-mask      # see what the loss trains on
    python finetune.py --ckpt out/pretrain.pt --init scratch   # same, from random weights
    python finetune.py --ckpt out/pretrain.pt --sft-attributes city,job,food   # + cross-domain accuracy
    python finetune.py --ckpt out/pretrain.pt --lora-rank 8    # LoRA (merged on save)
    python finetune.py --ckpt out/pretrain.pt --oft-block 32   # OFT: rotations (merged on save)
    python finetune.py --ckpt out/pretrain.pt --lora-rank 8 --quantize-base int8   # on an int8 base
    python finetune.py --ckpt out/pretrain.pt --prompt-tokens 16   # prompt tuning
    python finetune.py --ckpt out/pretrain.pt --data alpaca.json   # your own data

Defaults are in DEFAULTS; without --lr the rate is the method's (LR). Retention is measured
two ways: the pre-training validation loss and the knowledge probe.

The loss covers assistant tokens only, including the closing <|end|> (so the model learns
to stop), averaged over the supervised tokens of the whole optimizer step.

On the world data it measures what the concept guide claims: held-out accuracy (people whose
facts were only in the pre-training prose: knowledge that SFT makes usable), retention (the
pre-training validation loss and the knowledge probe of the current weights: what SFT
costs), and the path between.
Checkpoints along the path are kept; out/sft.pt is the REWOUND one (the rule is in
`rewind`), the last step is out/sft_last.pt (what --resume continues from).
"""
import functools
import os
import random
import sys
import time

import nanosft as ns
from extras import charts, peft
from extras import hf  # noqa: F401  (--ckpt may name a Hugging Face GPT-2 directory)
import torch
from data import formats, world_eval


# ----------------------------------------------------------------------------------------
# arguments: one table of defaults

DEFAULTS = dict(max_iters=300, batch_size=16, lr=None, eval_interval=25, warmup=20, log_interval=25)
# --lr's default depends on what trains: the rates of docs/peft.md's table (experiments.py sft).
# Full SFT (also --init scratch) at 2e-3: the 0.6M default model answered a tuning seed's
# held-out people better than at 1e-3, and forgot more (docs/forgetting.md).
# LoRA and prompt tuning change only a few new parameters (adapters that start at zero, a
# prefix), and were run at higher rates.
LR = {"full": 2e-3, "lora": 3e-3, "oft": 3e-3, "prompt": 3e-2}
ALPHAS = (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)  # --alphas, see `interpolate`


def method(lora_rank, oft_block, prompt_tokens):
    """What trains: "lora", "oft", "prompt" or "full" (every weight; also --init scratch)."""
    return "lora" if lora_rank else "oft" if oft_block else "prompt" if prompt_tokens else "full"


def parse_args(argv=None):
    ap = ns.ArgumentParser(__doc__)
    ap.add_argument("--ckpt", default="out/pretrain.pt", help="pre-trained checkpoint to start from")
    ap.add_argument("--data", default=None, help="instruction file (Alpaca {instruction,input,output}, "
                    "{prompt,response}, {messages:[...]} or ShareGPT {conversations:[...]}, as JSON or "
                    "JSONL); default: the world's questions")
    ap.add_argument("--labels", default="top-voted", choices=["gold", "top-voted", "random-community"],
                    help="world data only: where the answers come from (gold facts, the best-voted "
                    "community answer, or any community answer)")
    ap.add_argument("--world", default=world_eval.HERE, help="world data only: the world directory to train and "
                    "evaluate on (python data/world.py --out-dir DIR; the one the checkpoint was pre-trained "
                    "on, pretrain.py --world); default: data/")
    ap.add_argument("--sft-attributes", default=None, help="world data only: train on the questions about "
                    "these attributes only, e.g. city,job,food (list tasks kept; default: all). Held-out "
                    "accuracy is then also reported in-domain (these) and cross-domain (the others: a "
                    "question type SFT never showed, about facts only the pre-training prose states)")
    ap.add_argument("--init", default="pretrained", choices=["pretrained", "scratch"],
                    help="scratch: same architecture, random weights (the no-pre-training baseline)")
    ap.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank, base frozen")
    ap.add_argument("--lora-alpha", type=float, default=None, help="LoRA scale numerator (default 2*rank)")
    ap.add_argument("--oft-block", type=int, default=0,
                    help="OFT: rotate each adapted projection's input in blocks of this size, base frozen")
    ap.add_argument("--lora-on", default="attn", choices=["attn", "mlp", "attn,mlp"],
                    help="which projections get LoRA or OFT adapters: attention (default, as in the "
                    "LoRA paper), MLP or both")
    ap.add_argument("--quantize-base", default="none", choices=["none", "int8"],
                    help="LoRA/OFT: store the frozen projections as per-channel int8")
    ap.add_argument("--prompt-tokens", type=int, default=0, help="prompt tuning: learned prefix length")
    ap.add_argument("--prompt-init", default="random", choices=["random", "task"],
                    help="prompt tuning: start from random tokens' embeddings, or from the task's most "
                    "frequent answer tokens'")
    ap.add_argument("--prompt-mlp", type=int, default=0,
                    help="prompt tuning: reparametrise the prefix through an MLP of this hidden width "
                    "(prefix tuning; 0 = off)")
    ap.add_argument("--new-rows", default="train", choices=["train", "freeze"],
                    help="LoRA, OFT, prompt tuning: the embedding rows of tokens new to the model (chat "
                    "tokens, words pre-training never saw) train with the adapters (default), or stay frozen")
    ap.add_argument("--train-embeddings", action="store_true",
                    help="also train the pre-trained token embeddings (default: only the chat tokens')")
    ap.add_argument("--replay", type=float, default=0.0,
                    help="mix this many pre-training tokens per SFT token (counters forgetting)")
    ap.add_argument("--rewind", default="path", choices=["path", "interpolate"],
                    help="where rewinding looks: the checkpoints saved along the training path "
                    "(default), or the straight line from the pre-trained to the final weights")
    ap.add_argument("--rewind-min-gain", type=float, default=0.05,
                    help="rewind only when it saves at least this much retention loss (nats) over "
                    "the final checkpoint; otherwise keep the final one")
    ap.add_argument("--rewind-tolerance", type=float, default=0.01,
                    help="rewinding keeps the points within this much held-out (dev) accuracy of "
                    "the best one, and takes the one with the lowest retention loss")
    ap.add_argument("--rewind-loss-tolerance", type=float, default=0.02,
                    help="... and whose dev answer loss is within this many nats per token of the "
                    "lowest (a point must also write the answers as SFT teaches them)")
    ap.add_argument("--alphas", type=lambda v: tuple(sorted({0.0, 1.0} | {float(a) for a in v.split(",")})),
                    default=ALPHAS, help="the points of the line pre-trained -> final that are evaluated "
                    "(comma-separated; 0 and 1 always); default: 0, 0.5, 0.6, 0.7, 0.75, ..., 0.95, 1")
    ap.add_argument("--warmup", type=int, help="learning-rate warmup steps")
    ap.add_argument("--log-interval", type=int, help="log the loss every N steps")
    ap.add_argument("--show-mask", action="store_true", help="print one rendered example and exit")
    ap.add_argument("--strict", action="store_true",
                    help="a record that would be skipped or truncated (too long, a duplicate, no "
                    "answer) is an error instead")
    ns.add_common_args(ap)
    ap.set_defaults(**DEFAULTS)
    args = ap.parse_args(argv)
    if sum(map(bool, (args.lora_rank, args.oft_block, args.prompt_tokens))) > 1:
        raise ns.UserError("--lora-rank, --oft-block and --prompt-tokens are alternatives; pick one")
    if min(args.lora_rank, args.oft_block, args.prompt_tokens, args.prompt_mlp, args.replay) < 0:
        raise ns.UserError("--lora-rank, --oft-block, --prompt-tokens, --prompt-mlp and --replay must be >= 0")
    if (args.prompt_mlp or args.prompt_init != "random") and not args.prompt_tokens:
        raise ns.UserError("--prompt-init and --prompt-mlp shape a prompt: add --prompt-tokens")
    if args.quantize_base != "none" and not (args.lora_rank or args.oft_block):
        raise ns.UserError("--quantize-base needs a frozen base: add --lora-rank or --oft-block")
    if args.data and args.sft_attributes:
        raise ns.UserError("--sft-attributes picks the world's questions: it does not apply to --data")
    args.sft_attributes = None if args.data else world_eval.sft_attributes(args.sft_attributes)
    world_eval.check_world_dir(args.world)
    if args.lr is None:
        args.lr = LR[method(args.lora_rank, args.oft_block, args.prompt_tokens)]
    if args.init == "scratch":  # no pre-trained end: no line pre-trained -> final to evaluate
        args.alphas = ()
    return args


# ----------------------------------------------------------------------------------------
# data


def top_voted(answers):
    """A thread's best answer by net votes (up - down), the first of a tie."""
    return max(answers, key=lambda a: a["up"] - a["down"])["text"]


def world_conversations(labels, seed, world_dir=world_eval.HERE, attributes=None):
    """The world's instruction set. Questions about training people come from the community
    threads, answered by the gold fact sentence, the best net-voted answer (up - down), or a
    random community answer; the list tasks (copy/reverse/count) always use their gold answer.
    attributes (--sft-attributes; None: all): only the questions about these are kept, so
    the other attributes' questions stay unseen question types (cross-domain evaluation)."""
    gold = [(w, r) for w, r in formats.read_records(world_eval.path("world_sft.jsonl", world_dir))]
    threads = {r["prompt"]: r for _, r in formats.read_records(world_eval.path("world_community.jsonl", world_dir))}
    rng = random.Random(seed)
    convs = []
    for _, r in gold:
        answer = r["response"]
        # a fact question's attribute is its thread's (every one has a thread; a list task has none)
        if attributes is not None and r["prompt"] in threads and threads[r["prompt"]]["attribute"] not in attributes:
            continue
        if labels != "gold" and r["prompt"] in threads:
            answers = threads[r["prompt"]]["answers"]
            if labels == "top-voted":
                answer = top_voted(answers)
            else:
                answer = rng.choice(answers)["text"]
        convs.append([{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": answer}])
    return convs


def load_records(data, labels, seed, strict, world_dir=world_eval.HERE, attributes=None):
    """([(record number, conversation)], its DataReport): the file `data` (any format
    data/formats.py reads) or, without one, the questions of the world in world_dir about
    `attributes` (see world_conversations)."""
    report = formats.DataReport(data or world_eval.path("world_sft.jsonl", world_dir), strict)
    if data:
        return formats.load_instructions(data, report), report
    records = list(enumerate(world_conversations(labels, seed, world_dir, attributes), 1))
    report.total = len(records)
    return records, report


MIN_PROMPT = 8  # a prompt cut from the left keeps at least this many of its tokens


def fit_conversation(tok, conv, block_size):
    """A conversation's (ids, mask), made to fit block_size + 1 tokens, and what was done:
    None (it fit), "turns" (the oldest turns were dropped), "prompt" (the last question
    was cut from the left) or "answer" (the answer alone does not fit: skip the record).

    Real dialogues run long. Cutting whole turns from the left keeps what matters for the
    loss: the last question and its answer (and the system message while it fits). An
    answer is never cut: a cut answer without its <|end|> would teach the model to stop
    nowhere, and a cut one with its <|end|> to stop mid-sentence."""
    ids, mask = ns.render_chat(tok, conv)
    if len(ids) - 1 <= block_size:
        return ids, mask, None
    system = conv[:1] if conv[0]["role"] == "system" else []
    rest = conv[len(system):]
    cuts = [i for i, m in enumerate(rest) if m["role"] == "user" and i > 0]
    for head in (system, []):  # drop turns first, the system message last
        for i in cuts:
            ids, mask = ns.render_chat(tok, head + rest[i:])
            if len(ids) - 1 <= block_size:
                return ids, mask, "turns"
    # the last question and its answer alone are too long: cut the question from the left
    question = next((m for m in reversed(conv[:-1]) if m["role"] == "user"), {"content": ""})
    body, answer = ns.encode_content(tok, question["content"]), ns.encode_content(tok, conv[-1]["content"])
    frame = [tok.endoftext, tok.user, tok.end, tok.assistant, tok.end]
    room = block_size + 1 - len(frame) - len(answer)
    if room < min(MIN_PROMPT, len(body)):
        return None, None, "answer"
    ids = [tok.endoftext, tok.user] + body[len(body) - room:] + [tok.end, tok.assistant] + answer + [tok.end]
    return ids, [0] * (len(ids) - len(answer) - 1) + [1] * (len(answer) + 1), "prompt"


def render_all(tok, records, block_size, report):
    """(inputs, targets) per (record number, conversation), each fitted to the block;
    what fitting did is counted in `report` (see fit_conversation)."""
    out = []
    for n, conv in records:
        ids, mask, change = fit_conversation(tok, conv, block_size)
        answer = len(ns.encode_content(tok, conv[-1]["content"]))
        report.needs.append(answer + MIN_PROMPT + 5)  # the answer, a short question, the chat frame
        if change == "answer":
            tokens = len(ns.render_chat(tok, conv)[0]) - 1
            report.skip(n, f"whose answer alone is longer than block_size {block_size}",
                        f"{tokens} tokens, longer than the model's block size {block_size}; shorten it")
            continue
        if change == "turns":
            report.truncate(n, "conversations cut to their last turns that fit",
                            f"longer than the model's block size {block_size}; shorten it")
        elif change == "prompt":
            report.truncate(n, "prompts cut from the left to fit",
                            f"longer than the model's block size {block_size}; shorten it")
        out.append(ns.example_tensors(ids, mask))
    report.check(block_size)
    if not out:
        raise ns.UserError(f"{report.path}: no assistant tokens to train on")
    return out


def show_mask(tok, conv):
    """Print one rendered example, supervised tokens marked: green on a terminal, [brackets]
    otherwise. What is marked is exactly what the loss trains on."""
    ids, mask = ns.render_chat(tok, conv)
    tty = sys.stdout.isatty()
    parts = []
    for t, m in zip(ids, mask):
        s = tok.decode([t]).replace("\n", "\\n")
        parts.append((f"\033[42;30m{s}\033[0m" if tty else f"[{s}]") if m else s)
    print("".join(parts))
    print(f"\n{sum(mask)} of {len(ids)} tokens supervised "
          f"({'green' if tty else '[bracketed]'}): the assistant's answer and its <|end|>.")


def step_order(n_examples, batch_size, seed, it, lengths):
    """The examples of optimizer step `it`, a pure function of (seed, it): shuffle once per
    epoch, then sort each window of 8 batches by length and cut it into batches, so a batch
    holds examples of similar length (little padding) while batches still vary."""
    per_epoch = max(1, n_examples // batch_size)
    epoch, k = divmod(it, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)  # a stream per (seed, epoch); 1,000,003 is prime
    perm = torch.randperm(n_examples, generator=g).tolist()
    window = 8 * batch_size
    batches = []
    for w in range(0, per_epoch * batch_size, window):
        chunk = sorted(perm[w:min(w + window, per_epoch * batch_size)], key=lengths.__getitem__)
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=g).tolist()
    return batches[order[k % len(batches)]]


def replay_windows(tokens, n_tokens, T, seed, it, rank=0, world=1):
    """--replay at step `it`: about n_tokens of pre-training text (at least one window), as
    windows of T + 1 tokens at random starts (a stream per (seed, step)), every token
    supervised. Returns this process's share as [(x, y)] or [], and the tokens of all
    processes' windows."""
    n = max(1, round(n_tokens / T))
    g = torch.Generator().manual_seed(seed * 7_000_003 + it)  # 7,000,003 is prime
    starts = torch.randint(len(tokens) - T - 1, (n,), generator=g)[rank::world].tolist()
    if not starts:
        return [], n * T
    w = torch.stack([tokens[s:s + T + 1] for s in starts])
    return [(w[:, :-1], w[:, 1:])], n * T


# ----------------------------------------------------------------------------------------
# loss


def sft_loss(model, batch):
    """The loss of one micro-batch (x, y): the SUM over its supervised tokens. train_loop
    divides by the supervised tokens of the whole optimizer step, so a step of several
    micro-batches (or processes) has the gradient of one big batch."""
    return model(batch[0], batch[1], reduction="sum")[1]


# ----------------------------------------------------------------------------------------
# model set-up: full fine-tuning, scratch, LoRA or prompt tuning


def build_model(ck, ckpt="checkpoint", init="pretrained", seed=1337, train_embeddings=False,
                lora_rank=0, lora_alpha=None, lora_on="attn", prompt_tokens=0, oft_block=0, quantize="none"):
    """The model to train, from checkpoint `ck` (read from `ckpt`): the pre-trained weights
    with their well-trained vocabulary frozen (unless train_embeddings), or random ones
    (init "scratch"); then LoRA adapters (lora_rank) or OFT rotations (oft_block) on the
    projections of lora_on (e.g. "attn,mlp"), or a prompt-tuning prefix (prompt_tokens),
    which freeze everything else. quantize "int8": the frozen projections under LoRA/OFT
    are stored as int8 (nanopeft.quantize_base), before the adapters wrap them."""
    model, tok = ns.model_from_checkpoint(ck, ckpt)
    if init == "scratch":
        torch.manual_seed(seed)
        model = peft.new_gpt(model.config)
    elif not train_embeddings:
        freeze_vocabulary(model, tok, pretraining_counts(tok, ck))
    if prompt_tokens:
        model = peft.add_prompt(model, prompt_tokens, seed)
    if quantize == "int8":
        peft.quantize_base(model)
    if lora_rank:
        torch.manual_seed(seed)
        peft.add_lora(model, lora_rank, lora_alpha, lora_on.split(","))
    if oft_block:
        if model.config.n_embd % oft_block:  # (the MLP's 4 * n_embd inputs then divide too)
            raise ns.UserError(f"--oft-block {oft_block} must divide the model's width {model.config.n_embd}")
        peft.add_oft(model, oft_block, lora_on.split(","))
    return model, tok


def chat_tokens(tok):
    return [tok.user, tok.assistant, tok.end, tok.system]


def new_token_rows(tok, counts, examples):
    """The tokens that are new to the pre-trained model: the chat tokens, and the tokens of
    the SFT data that pre-training saw fewer than RARE times (in the world: the question
    words, "?", the list tasks' digits -- the questions are phrased in words the
    biographies never use)."""
    rows = set(chat_tokens(tok))
    if counts is not None:
        used = torch.cat([x for x, _ in examples] + [y[y >= 0] for _, y in examples]).unique()
        rows |= {t for t in used.tolist() if counts[t] < RARE}
    return sorted(rows)


def train_rows(model, rows):
    """Of the token embedding (tied: also the output layer) let only the rows `rows` train:
    a gradient hook zeroes the others' gradients. Full SFT uses it to keep the well-trained
    rows (freeze_vocabulary); LoRA to let the new tokens' rows train with the adapters, as
    PEFT libraries let added tokens train. Frozen at their untrained start, the adapters
    would have to bend every layer to read a question and to write <|end|>, and that
    bending shows up as forgetting on ordinary text."""
    keep = torch.zeros(model.wte.weight.size(0), 1)
    keep[rows] = 1.0
    model.wte.weight.requires_grad_(True)
    model.wte.weight.register_hook(lambda g: g * keep.to(g.device, g.dtype))
    return rows


def adapter_rows(model, tok, ck, examples, scratch=False, new_rows="train"):
    """Under LoRA, OFT or prompt tuning the embedding rows of the tokens new to the model
    train with the adapters or the prefix (train_rows), unless new_rows is "freeze" ->
    those rows; None for full SFT. (Frozen, a new token keeps its untrained embedding,
    which is also its output row: the model cannot read "<|user|>" or learn to write
    "<|end|>" except by bending every layer around them.)"""
    peft_model = model.config.n_prefix or any(isinstance(m, (peft.LoRALinear, peft.OFTLinear)) for m in model.modules())
    if not peft_model or new_rows == "freeze":
        return None
    return train_rows(model, new_token_rows(tok, None if scratch else pretraining_counts(tok, ck), examples))


def prompt_setup(model, tok, examples, init="random", mlp_hidden=0):
    """Prompt tuning's remedies (none without a prefix): init "task" starts the prefix from
    the embeddings of the most frequent answer tokens of `examples`; mlp_hidden > 0
    reparametrises it through an MLP (nanopeft.PromptMLP)."""
    if not model.config.n_prefix:
        return
    if init == "task":
        targets = torch.cat([y[y >= 0] for _, y in examples])
        counts = torch.bincount(targets, minlength=tok.vocab_size)
        counts[chat_tokens(tok) + [tok.endoftext, tok.pad]] = 0  # words, not the chat format's tokens
        peft.init_prompt(model, counts.argsort(descending=True)[:model.config.n_prefix].tolist())
    if mlp_hidden:
        peft.reparametrise_prompt(model, mlp_hidden)


def trainable_params(model, rows=None):
    """Parameters the optimizer can change: with `rows` (LoRA, OFT, prompt tuning), of the
    embedding matrix only those rows (the others get zero gradients and, without weight
    decay, stay put)."""
    n = model.num_params(trainable_only=True)
    if rows is not None:
        n -= (model.wte.weight.size(0) - len(rows)) * model.config.n_embd
    return n


@functools.lru_cache(maxsize=2)
def corpus_stream(tok, file):
    """The pre-training text as one token stream. The vocabulary freeze, the retention loss
    and --replay all need it: read and encoded once per run."""
    return formats.encode_corpus(tok, formats.read_text(file))


def pretrain_text(ck):
    """The file name of the pre-training text, carried from stage to stage in the checkpoints'
    args (a pre-training checkpoint names it --data): retention is measured on its val
    split, --replay draws from its train split, and the vocabulary freeze counts its tokens."""
    flags = ck.get("args", {})
    return flags.get("pretrain_data") or (flags.get("data") if ck["kind"] == "pretrain" else None)


def pretrain_split(tok, file, block_size):
    """The pre-training text's train split as one token stream (the one pre-training used)."""
    if not file or not os.path.isfile(file):
        raise ns.UserError(f"--replay needs the pre-training text ({file}), which is missing")
    return formats.split_corpus(corpus_stream(tok, file), block_size)[0]


def pretraining_counts(tok, ck):
    """How often each token occurs in the pre-training text (None when it is not at hand)."""
    file = pretrain_text(ck)
    if ck["kind"] != "pretrain" or not file or not os.path.isfile(file):
        return None
    return torch.bincount(corpus_stream(tok, file), minlength=tok.vocab_size)


RARE = 10  # a token pre-training saw fewer times than this has no trustworthy embedding


def freeze_vocabulary(model, tok, counts, min_count=RARE):
    """Keep the embeddings of tokens that pre-training saw often (tied with the output
    layer) as they are; train the rest: the chat tokens and rare or unseen tokens.

    Why: with tied weights, every SFT step raises the output rows of the names it trains on
    and lowers all others, so the model learns to answer with a TRAINING person's name
    instead of copying the name from the question. Frozen, every name keeps the place
    pre-training gave it and copying generalises to people SFT never saw. Rare tokens
    (pieces of words pre-training never used) must stay trainable, or SFT cannot learn to
    write new words."""
    if counts is None:
        return
    rare = (counts < min_count).nonzero().flatten().tolist()
    train_rows(model, sorted(set(rare) | set(chat_tokens(tok))))


# ----------------------------------------------------------------------------------------
# evaluation


def dev_answer_batches(tok, prompts, world_dir=world_eval.HERE, batch=64):
    """The community's top-voted answers to the dev half's questions `prompts`
    (world_community_eval.jsonl: threads no stage trains on), as fixed (x, y) batches:
    their loss says how closely the model writes the answers SFT teaches -- the voted
    style included -- for people it was never trained on."""
    threads = formats.read_records(world_eval.path("world_community_eval.jsonl", world_dir))
    convs = [[{"role": "user", "content": t["prompt"]}, {"role": "assistant", "content": top_voted(t["answers"])}]
             for _, t in threads if t["prompt"] in prompts]
    ex = [ns.example_tensors(*ns.render_chat(tok, c)) for c in convs]
    return [ns.collate(ex[i:i + batch], tok.pad) for i in range(0, len(ex), batch)]


class Evaluator:
    """Held-out accuracy (dev half used for rewinding, test half reported, also split into
    in-domain and cross-domain: the attributes SFT asked about and the others), training-people
    accuracy, list-task accuracy and retention measured two ways: the pre-training
    validation loss, and the knowledge probe (the biographies' facts completed as plain
    text, as after pre-training; a stand-in for PEFT-Arena's general-ability benchmarks).

    attributes: those SFT trains on (--sft-attributes). Rewinding sees the dev half's
    questions about these only, so nothing about a cross-domain attribute informs the choice."""

    def __init__(self, rt, tok, pretrain_data, block_size, world_dir=world_eval.HERE, attributes=None):
        self.rt, self.tok = rt, tok
        self.world = world_eval.load_world(world_dir)
        self.attributes = attributes or self.world[1]["attributes"]
        self.longest = world_eval.world_longest(world_dir)
        dev, self.test = world_eval.heldout_halves(world_dir)
        self.dev = world_eval.by_domain(dev, self.attributes)[0]
        self.dev_answers = dev_answer_batches(tok, {r["prompt"] for r in self.dev}, world_dir)
        # as many as a held-out half: the same sampling error
        self.train = world_eval.load_eval_rows("train", world_dir)[:250]
        self.tasks = world_eval.load_eval_rows("tasks", world_dir)
        self.retention = None
        if pretrain_data and os.path.isfile(pretrain_data):
            # the same stream and split pre-training used: retention = its validation loss
            val = formats.split_corpus(corpus_stream(tok, pretrain_data), block_size)[1]
            self.retention = formats.fixed_windows(val, block_size)

    def __call__(self, model, full=False):
        qa = lambda rows: world_eval.qa_eval(model, self.tok, self.world, rows, self.longest)
        test = qa(self.test)
        inside, cross = world_eval.domain_accuracy(self.world, self.test, test["answers"], self.attributes)
        r = {"dev": qa(self.dev)["accuracy"], "heldout": test["accuracy"], "heldout_in": inside, "heldout_cross": cross,
             "dev_loss": ns.mean_loss(model, self.dev_answers, self.rt),
             "degenerate": test["degenerate_rate"],
             "retention": ns.mean_loss(model, self.retention, self.rt) if self.retention else None,
             "probe": world_eval.knowledge_probe(model, self.tok, self.world)}
        if full:
            r["train"] = qa(self.train)["accuracy"]
            r["tasks"] = world_eval.task_accuracy(model, self.tok, self.tasks)
        return r


def log_eval(log, r):
    cross = "" if r["heldout_cross"] is None else \
        f", in-domain {r['heldout_in']:.3f}, cross-domain {r['heldout_cross']:.3f}"
    log(f"eval step {r['step']}: held-out {r['heldout']:.3f} (dev {r['dev']:.3f}, dev answer loss "
        f"{r['dev_loss']:.4f}{cross}) | retention loss {r['retention']:.4f} | knowledge probe {r['probe']:.3f}")


def rewind(points, tolerance, final=None, min_gain=0.0, loss_tolerance=None):
    """Rewinding: among candidate points -- the checkpoints along the SFT path (--rewind
    path), or weights on the line from the pre-trained to the final ones (--rewind
    interpolate) -- keep those that have learned the task: held-out DEV accuracy within
    `tolerance` of the best point's and, with loss_tolerance, dev answer loss (see
    dev_answer_batches) within loss_tolerance nats per token of the lowest. Of these take
    the one with the LOWEST retention loss: the good-enough point where SFT has paid the
    least of the pre-trained model's knowledge. Only the dev half chooses; the test half
    is reported.

    Why the loss too: accuracy is reached early, before the model writes the community's
    answers as SFT teaches them. An AMX bf16 run rewound to step 125 of 300 on accuracy
    alone; it answered as well as the final step, but its log-odds of the voted closing
    over <|end|> were -3.7 against the final's -1.5, and DPO (whose IPO loss moves a pair
    only so far) then never reached the voted style (0% instead of ~100%).

    final, min_gain: when the chosen point saves less than min_gain nats of retention loss
    over `final`, return `final`. A run that has not overshot gains nothing from rewinding
    but the noise of a different checkpoint's accuracy (a dev half of 250 questions moves
    by a question or two from one checkpoint to the next)."""
    best = max(p["dev"] for p in points)
    ok = [p for p in points if p["dev"] >= best - tolerance]
    if loss_tolerance is not None and all(p.get("dev_loss") is not None for p in points):
        least = min(p["dev_loss"] for p in points)
        ok = [p for p in ok if p["dev_loss"] <= least + loss_tolerance]
        if not ok:  # no point is best at both: keep the final one
            return final if final is not None else min(points, key=lambda p: p["dev_loss"])
    pick = min(ok, key=lambda p: (p["retention"] if p["retention"] is not None else 0,
                                  p.get("step", p.get("alpha"))))
    if final is not None and None not in (pick["retention"], final["retention"]) \
            and final["retention"] - pick["retention"] < min_gain:
        return final
    return pick


# ----------------------------------------------------------------------------------------
# checkpoints


def step_file(out_dir, it):
    """The path's checkpoint of step `it`."""
    return os.path.join(out_dir, "sft_path", f"step{it:05d}.pt")


def save_plain(file, model, tok, it, flags):
    """A checkpoint every later stage loads as an ordinary GPT (adapters merged)."""
    ns.save_checkpoint(file, ns.checkpoint_dict("sft", peft.plain_model(model), tok, None, it, flags))


def save_last(file, model, tok, optimizer, it, flags, state):
    """out/sft_last.pt, written at every evaluation: an ordinary final checkpoint (adapters
    merged into plain weights), plus what --resume needs (ns.resume): the optimizer, the
    stage's state (its path) and the weights in their training form (adapters unmerged)."""
    ck = ns.checkpoint_dict("sft", peft.plain_model(model), tok, optimizer, it, flags, state=state)
    ck["train_state"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    ns.save_checkpoint(file, ck)


# ----------------------------------------------------------------------------------------
# after training: choose the rewound point, report


def pretrained_state(ck):
    return ns.model_from_checkpoint(ck)[0].state_dict()


def interpolated(pre, fin, a):
    """theta(a) = (1 - a) theta_pretrained + a theta_final, tensor by tensor (a tensor the
    pre-trained model lacks, such as a prompt-tuning prefix, is taken from the final one)."""
    return {k: (1 - a) * pre[k] + a * v if k in pre and pre[k].shape == v.shape else v for k, v in fin.items()}


@torch.no_grad()
def interpolate(evaluator, ck, model, known, alphas=ALPHAS):
    """Evaluate the weights on the straight line from the pre-trained to the final ones.
    PEFT-Arena's path-wise rewinding moves back along this line: it does not retrace the
    training path, and here it lies above it (more accuracy for the same forgetting).
    known: {alpha: evaluation} already measured (the two ends)."""
    pre, fin = pretrained_state(ck), peft.plain_state(model)
    m = peft.new_gpt(model.config).to(evaluator.rt.device)
    out, keys = [], ("dev", "dev_loss", "heldout", "heldout_in", "heldout_cross", "degenerate", "retention", "probe")
    for a in alphas:
        if a not in known:
            m.load_state_dict(interpolated(pre, fin, a))
        r = known.get(a) or evaluator(m)
        out.append({"alpha": a, **{k: r[k] for k in keys}})
    return out


def plot_path(png, path, final_step, choice):
    """Held-out accuracy against retention loss: the path, the line (if evaluated), and the
    pre-trained, final and rewound points (choice: see choose_rewound)."""
    interp, by_line = choice["interpolation"], choice["rewind_interpolate"]
    rewound_step = choice["rewind_path"]["step"]
    at = lambda s: next(p for p in path if p["step"] == s)
    series = {"SFT path": ([p["retention"] for p in path], [p["heldout"] for p in path])}
    if interp:
        series["interpolation pre-trained -> final"] = ([p["retention"] for p in interp],
                                                        [p["heldout"] for p in interp])
    marks = [(path[0]["retention"], path[0]["heldout"], "pre-trained")]
    if rewound_step == final_step:  # rewinding kept the final checkpoint: one mark
        marks.append((at(final_step)["retention"], at(final_step)["heldout"], "final = rewound on the path"))
    else:
        marks += [(at(final_step)["retention"], at(final_step)["heldout"], "final"),
                  (at(rewound_step)["retention"], at(rewound_step)["heldout"], f"rewound on the path (step {rewound_step})")]
    if by_line and by_line["alpha"] != 1.0:
        marks.append((by_line["retention"], by_line["heldout"], f"on the line: alpha {by_line['alpha']:.2f}"))
    charts.plot(png, "SFT: task accuracy vs forgetting", xlabel="retention loss (pre-training val loss; lower = "
                "less forgetting)", ylabel="held-out accuracy", series=series, marks=marks)


def choose_rewound(evaluator, ck, model, path, final, where, alphas, tolerance, loss_tolerance, min_gain):
    """Rewinding both ways (see `rewind` for the rule and its settings): among the path's
    checkpoints (its step 0, the pre-trained model, is no candidate) and, given `alphas`, on
    the line pre-trained -> final (a scratch run has no pre-trained end). `where` says whose
    choice becomes out/sft.pt; both are reported. final: the final weights' evaluation.
    Returns sft.json's fields on rewinding."""
    rule = dict(tolerance=tolerance, loss_tolerance=loss_tolerance, min_gain=min_gain)
    by_path = rewind(path[1:] if len(path) > 1 else path, final=path[-1], **rule)
    ends = {0.0: path[0], 1.0: final} if path[0]["step"] == 0 else {1.0: final}
    interp = interpolate(evaluator, ck, model, ends, alphas) if alphas else []
    by_line = rewind(interp, final=interp[-1], **rule) if interp else None
    on_line = where == "interpolate" and by_line is not None
    return {"rewound": f"alpha {by_line['alpha']:.2f} of the line pre-trained -> final" if on_line
            else f"step {by_path['step']} of the path",
            "rewound_step": None if on_line else by_path["step"],
            "rewound_alpha": by_line["alpha"] if on_line else None, "rewind": where,
            "rewind_rule": f"lowest retention loss among the {where} points within {tolerance} of the best "
                           f"dev held-out accuracy and {loss_tolerance} nats/token of the lowest dev answer "
                           f"loss, if it saves >= {min_gain} nats over the final checkpoint (else the final one)",
            # both rules, each as measured at its point (test-half accuracy, retention)
            "rewind_path": by_path, "rewind_interpolate": by_line, "interpolation": interp}


def rewound_checkpoint(choice, ck, model, tok, it, flags, out_dir):
    """The chosen point's checkpoint: a step of the path as saved then, or the weights at the
    chosen alpha of the line pre-trained -> final, made now."""
    if choice["rewound_alpha"] is None:
        return ns.load_checkpoint(step_file(out_dir, choice["rewound_step"]))
    m = peft.new_gpt(model.config)
    m.load_state_dict(interpolated(pretrained_state(ck), peft.plain_state(model), choice["rewound_alpha"]))
    return ns.checkpoint_dict("sft", m, tok, None, it, flags)


def world_report(log, path, final, rew, choice, chance, attributes):
    """sft.json's world numbers: before SFT (the path's step 0), at the final step and at the
    rewound point (`rew`; `final` the final one's full evaluation); the headline is logged.
    attributes: those SFT asked about; held-out accuracy is split into these (in-domain) and
    the others (cross-domain; None when SFT asked about every attribute)."""
    start = path[0]
    log(f"held-out accuracy: before {start['heldout']:.3f} | final {final['heldout']:.3f} | "
        f"rewound ({choice['rewound']}) {rew['heldout']:.3f}")
    if rew["heldout_cross"] is not None:
        log(f"  of it, rewound: in-domain ({','.join(attributes)}) {rew['heldout_in']:.3f} | "
            f"cross-domain (the other attributes) {rew['heldout_cross']:.3f}, before SFT {start['heldout_cross']:.3f}")
    log(f"retention loss:    before {start['retention']:.4f} | final {final['retention']:.4f} | "
        f"rewound {rew['retention']:.4f}")
    log(f"knowledge probe:   before {start['probe']:.3f} | final {final['probe']:.3f} | rewound {rew['probe']:.3f}")
    log(f"training people {rew['train']:.3f} | list tasks {rew['tasks']:.3f} | "
        f"degenerate answers {rew['degenerate']:.3f}")
    return {
        "heldout_accuracy": rew["heldout"], "train_accuracy": rew["train"], "task_accuracy": rew["tasks"],
        "heldout_accuracy_before": start["heldout"], "heldout_accuracy_final": final["heldout"],
        "heldout_accuracy_rewound": rew["heldout"], "heldout_accuracy_peak": max(p["heldout"] for p in path),
        "train_accuracy_final": final["train"], "task_accuracy_final": final["tasks"],
        "degenerate_rate": rew["degenerate"], "degenerate_rate_final": final["degenerate"],
        "retention_val_loss_before": start["retention"], "retention_val_loss_final": final["retention"],
        "retention_val_loss_rewound": rew["retention"], "knowledge_probe_before": start["probe"],
        "knowledge_probe_final": final["probe"], "knowledge_probe_rewound": rew["probe"], **choice,
        "chance_accuracy": chance, "sft_attributes": attributes, "heldout_accuracy_in_domain": rew["heldout_in"],
        "heldout_accuracy_cross_domain": rew["heldout_cross"], "heldout_accuracy_in_domain_final": final["heldout_in"],
        "heldout_accuracy_cross_domain_final": final["heldout_cross"],
        "heldout_accuracy_cross_domain_before": start["heldout_cross"], "path": path}


# ----------------------------------------------------------------------------------------
# the stage: arguments, load, data, loss, loop, evaluate, save, report


def main(argv=None):
    args = parse_args(argv)
    rt = ns.setup_runtime(args.device, args.dtype)
    t_start = time.time()

    # ---- load: checkpoint, model, data (all input validated before anything is written)
    ck = ns.load_checkpoint(args.ckpt, expect_kind=("pretrain", "sft", "dpo"))
    model, tok = build_model(ck, args.ckpt, args.init, args.seed, args.train_embeddings, args.lora_rank,
                             args.lora_alpha, args.lora_on, args.prompt_tokens, args.oft_block, args.quantize_base)
    T = model.config.block_size
    records, report = load_records(args.data, args.labels, args.seed, args.strict, args.world, args.sft_attributes)
    if args.show_mask:
        return show_mask(tok, records[0][1])
    examples = render_all(tok, records, T, report)
    for line in report.lines():
        rt.log(line)
    rows = adapter_rows(model, tok, ck, examples, args.init == "scratch", args.new_rows)
    prompt_setup(model, tok, examples, args.prompt_init, args.prompt_mlp)
    args.pretrain_data = pretrain_text(ck)  # saved in the checkpoints' args for the next stage
    evaluator = None if args.data else Evaluator(rt, tok, args.pretrain_data, T, args.world, args.sft_attributes)
    replay_tokens = pretrain_split(tok, args.pretrain_data, T) if args.replay else None
    optimizer = ns.configure_optimizer(model.to(rt.device), args.lr, weight_decay=0.0, device_type=rt.device.type)
    start_iter, state = ns.resume(args.out_dir, "sft", model, tok, optimizer) if args.resume else (0, {})
    trainable = trainable_params(model, rows)
    rt.log(f"{len(examples)} examples from {report.path} | {trainable:,} trainable of {model.num_params():,} "
           f"parameters | {method(args.lora_rank, args.oft_block, args.prompt_tokens)}, lr {args.lr:g} | {rt.device} {rt.dtype}")

    # ---- data: this process's micro-batches of step `it`, and the supervised tokens of the whole step
    def get_batch(it):
        chosen = step_order(len(examples), args.batch_size, args.seed, it, [len(x) for x, _ in examples])
        count = sum(int((examples[i][1] != -1).sum()) for i in chosen)
        mine = chosen[rt.rank::rt.world]
        micro = [ns.collate([examples[i] for i in part], tok.pad) for part in
                 [mine[j::args.grad_accum] for j in range(args.grad_accum)] if part]
        if replay_tokens is not None:  # --replay pre-training tokens per SFT token
            windows, n = replay_windows(replay_tokens, args.replay * count, T, args.seed, it, rt.rank, rt.world)
            micro, count = micro + windows, count + n
        return [(x.to(rt.device), y.to(rt.device)) for x, y in micro], count

    # ---- loop (loss: sft_loss); every --eval-interval steps evaluate, keep the path's step, save sft_last.pt
    path = state.get("path") or ([{"step": 0, **evaluator(model)}] if evaluator else [])

    def on_eval(it):
        if rt.master:
            if evaluator and path[-1]["step"] != it:
                path.append({"step": it, **evaluator(model)})
                log_eval(rt.log, path[-1])
                save_plain(step_file(args.out_dir, it), model, tok, it, vars(args))
            save_last(ns.last_path(args.out_dir, "sft"), model, tok, optimizer, it, vars(args), {"path": path})
        ns.barrier(rt)

    model.train()
    it, seconds, tok_per_s = ns.train_loop(rt, ns.wrap_ddp(torch.compile(model) if args.compile else model, rt),
                                           optimizer, ns.Loop.of(vars(args)), start_iter, get_batch, sft_loss, on_eval)
    if not rt.master:
        return

    # ---- evaluate (on the world: rewind along the path or the line), save, report
    out = {"trainable_params": trainable, "total_params": model.num_params(), "steps": it, "train_seconds": seconds,
           "tokens_per_sec": tok_per_s, "labels": args.labels if evaluator else None, "init": args.init,
           "lora_rank": args.lora_rank, "oft_block": args.oft_block, "prompt_tokens": args.prompt_tokens,
           "prompt_init": args.prompt_init, "prompt_mlp": args.prompt_mlp, "new_rows": args.new_rows,
           "quantize_base": args.quantize_base, "frozen_bytes": peft.frozen_bytes(model), "replay": args.replay, "lr": args.lr,
           "device": str(rt.device), "dtype": rt.dtype, "data": report.state()}
    sft_file = os.path.join(args.out_dir, "sft.pt")
    if evaluator:
        final = evaluator(model, full=True)
        choice = choose_rewound(evaluator, ck, model, path, final, args.rewind, args.alphas,
                                args.rewind_tolerance, args.rewind_loss_tolerance, args.rewind_min_gain)
        rewound = rewound_checkpoint(choice, ck, model, tok, it, vars(args), args.out_dir)
        rew = evaluator(ns.model_from_checkpoint(rewound)[0].to(rt.device), full=True)
        out.update(world_report(rt.log, path, final, rew, choice, world_eval.chance(evaluator.world), evaluator.attributes))
        rewound["metrics"] = {k: v for k, v in out.items() if isinstance(v, (int, float, str))}
        ns.save_checkpoint(sft_file, rewound)
        plot_path(os.path.join(args.out_dir, "sft_path.png"), path, it, choice)
    else:
        save_plain(sft_file, model, tok, it, vars(args))
    out["seconds"] = time.time() - t_start
    ns.write_json(os.path.join(args.out_dir, "sft.json"), out)
    rt.log(f"done in {out['seconds']:.0f}s -> {sft_file}")


if __name__ == "__main__":
    from extras.cpu import tune_cpu
    tune_cpu()  # OpenMP wait policy, heap settings: see extras/cpu.py
    ns.cli(main)
