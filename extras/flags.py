"""
The flags of the runs that ask for more than the lesson: --resume, --time-budget, --compile,
--plot; SFT's PEFT, replay, rewinding, other worlds and attributes; DPO's pair rules, packing,
rewinding. nanosft.ArgumentParser declares them (add) only when a command line holds a flag
that its stage does not declare, or asks for --help, then parses and checks the combinations
(parse_args).
Their defaults are the stages' DEFAULTS (and nanosft.add_common_args'), so a default run,
which never reads this file, sees the same values.
"""

import argparse
import os
import sys

import nanosft
from data import world_eval, world_qa
from extras import cross_domain, peft

# SFT's --lr of each PEFT method when --lr is not given (full SFT's: finetune.DEFAULTS); why:
# docs/forgetting.md, docs/peft.md
LR = {"lora": 3e-3, "oft": 3e-3, "prompt": 3e-2}
# the alphas of the line pre-trained -> final that --rewind interpolate evaluates (extras/rewind.py)
ALPHAS = (0.0, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0)


def add(ap, stage):
    tune = ap.add_argument_group("training: schedule, clipping, log, micro-batches")
    tune.add_argument("--warmup", type=int, help="steps of linear warmup before the cosine decay")
    tune.add_argument("--grad-clip", type=float, help="clip the step's gradient to this norm")
    tune.add_argument("--log-interval", type=int, help="print the loss every N steps")
    tune.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    run = ap.add_argument_group("running: time, resume, compile, charts")
    run.add_argument(
        "--time-budget", type=float, help="stop after this many seconds of training (then save)"
    )
    run.add_argument(
        "--resume", action="store_true", help="continue from this stage's checkpoint in --out-dir"
    )
    run.add_argument("--compile", action="store_true", help="torch.compile the model")
    run.add_argument(
        "--plot", action="store_true", help="also draw the stage's chart (a PNG in --out-dir)"
    )
    if stage == "pretrain":
        pretrain(ap)
    elif stage == "finetune":
        finetune(ap)
    elif stage == "dpo":
        dpo(ap)


def pretrain(ap):
    more = ap.add_argument_group("pre-training: other worlds, the vocabulary, weight decay")
    more.add_argument(
        "--world",
        help="a world directory (python data/world.py --out-dir DIR): "
        "train on its corpus and measure its knowledge probe (default: data/, unless --data)",
    )
    more.add_argument(
        "--vocab-size",
        type=int,
        help="BPE vocabulary incl. special tokens (default: 2048 for the world, else "
        "picked from the text's size, see pretrain.vocab_size_for)",
    )
    more.add_argument(
        "--weight-decay",
        type=float,
        help="AdamW decay on matrices; 0 by default: decay erases memorised facts",
    )


def finetune(ap):
    data = ap.add_argument_group("data options (the world's questions)")
    data.add_argument("--world", help="the world directory (pretrain.py --world)")
    data.add_argument(
        "--sft-attributes",
        help="train on the questions about these attributes only, e.g. "
        "city,job,food; held-out accuracy is then also reported in- and cross-domain "
        "(extras/cross_domain.py)",
    )
    data.add_argument(
        "--strict",
        action="store_true",
        help="a record that would be skipped or truncated is an error",
    )
    data.add_argument(
        "--train-embeddings",
        action="store_true",
        help="train every row (see finetune.freeze_vocabulary)",
    )
    peft = ap.add_argument_group("PEFT: LoRA, OFT, prompt tuning (extras/peft.py, docs/peft.md)")
    peft.add_argument("--lora-rank", type=int, help="LoRA adapters of this rank, base frozen")
    peft.add_argument("--lora-alpha", type=float, help="LoRA scale numerator (default 2*rank)")
    peft.add_argument(
        "--oft-block", type=int, help="OFT rotations in blocks of this size, base frozen"
    )
    peft.add_argument("--lora-on", choices=["attn", "mlp", "attn,mlp"], help="what LoRA/OFT adapts")
    peft.add_argument("--quantize-base", choices=["none", "int8"], help="LoRA/OFT: int8 base")
    peft.add_argument("--prompt-tokens", type=int, help="prompt tuning: learned prefix length")
    peft.add_argument("--prompt-init", choices=["random", "task"], help="prompt tuning: its start")
    peft.add_argument("--prompt-mlp", type=int, help="prompt tuning through an MLP of this width")
    peft.add_argument("--new-rows", choices=["train", "freeze"], help="new tokens' embeddings")
    forget = ap.add_argument_group(
        "forgetting: replay, rewinding (extras/replay.py, extras/rewind.py)"
    )
    forget.add_argument(
        "--replay", type=float, help="mix this many pre-training tokens per SFT token"
    )
    forget.add_argument(
        "--rewind",
        choices=["none", "path", "interpolate"],
        help="out/sft.pt: the final weights, or rewound along the path or the line",
    )
    forget.add_argument(
        "--rewind-min-gain", type=float, help="the least retention loss it must save"
    )
    forget.add_argument("--rewind-tolerance", type=float, help="dev accuracy below the best")
    forget.add_argument(
        "--rewind-loss-tolerance", type=float, help="dev answer loss above the lowest"
    )
    forget.add_argument(
        "--alphas",
        type=lambda v: tuple(sorted({0.0, 1.0} | {float(a) for a in v.split(",")})),
        help="with --rewind: the alphas of the line evaluated (comma-separated; 0 and 1 "
        "always; default: with --rewind interpolate, ALPHAS, else none)",
    )


def dpo(ap):
    extra = ap.add_argument_group(
        "pair construction (votes and scores formats), packing, rewinding"
    )
    extra.add_argument(
        "--label-smoothing", type=float, help="conservative DPO (--loss sigmoid): label-flip rate"
    )
    extra.add_argument(
        "--min-margin", type=float, help="least difference of net votes or scores that makes a pair"
    )
    extra.add_argument(
        "--pairs",
        choices=["top", "all"],
        help="the top answer against each other one, or every "
        "two answers (the world's held-out pairs stay the same: dpo.HELDOUT_RULE)",
    )
    extra.add_argument(
        "--strict",
        action="store_true",
        help="a pair that would be skipped or truncated "
        "(a tie, a duplicate, too long) is an error instead",
    )
    extra.add_argument(
        "--pack",
        action="store_true",
        help="several answers per row (extras/packing.py): less "
        "padding, the same log-probs up to float rounding",
    )
    extra.add_argument(
        "--rewind",
        action="store_true",
        help="the world only: measure the dev half's path, keep its "
        "checkpoints in out/dpo_path/ and save its latest good point (extras/dpo_eval.py)",
    )


def check_world_dir(world_dir):
    """One clear error for a directory that holds no world, before anything is written."""
    if not os.path.isfile(world_eval.path("world.json", world_dir)):
        raise nanosft.UserError(
            f"--world {world_dir}: no world.json there; write a world with "
            f"python data/world.py --out-dir {world_dir}"
        )
    return world_dir


def parse_args(ap, argv, stage):
    """Every flag of `stage` (add), parsed, then the combinations that a single flag's range
    cannot say (nanosft.LEAST checks those): nanosft.ArgumentParser calls it when the command
    line holds a flag that the stage itself does not declare."""
    ap.add_more()
    args = argparse.ArgumentParser.parse_args(ap, argv)  # an unknown flag is an error now
    if stage == "pretrain":
        if args.vocab_size and args.vocab_size < 256 + len(nanosft.SPECIALS):
            raise nanosft.UserError(
                f"--vocab-size must be at least {256 + len(nanosft.SPECIALS)} (256 bytes + "
                f"{len(nanosft.SPECIALS)} special tokens), got {args.vocab_size}"
            )
        if args.world and args.data:
            raise nanosft.UserError(
                "--world DIR trains on DIR/world_corpus.txt: give --world or --data, not both"
            )
        if args.world:
            args.data = world_eval.path("world_corpus.txt", check_world_dir(args.world))
    if stage == "dpo":
        if not 0 <= args.label_smoothing < 0.5 or (args.label_smoothing and args.loss != "sigmoid"):
            raise nanosft.UserError(
                f"--label-smoothing (the sigmoid loss only) must be in [0, 0.5), got "
                f"{args.label_smoothing} with --loss {args.loss}"
            )
        if args.rewind and not world_eval.is_default(args.data, world_qa.THREADS):
            raise nanosft.UserError(
                "--rewind reads the world's dev half: it needs the world's votes, not --data"
            )
    if stage != "finetune":
        return args
    if sum(map(bool, (args.lora_rank, args.oft_block, args.prompt_tokens))) > 1:
        raise nanosft.UserError(
            "--lora-rank, --oft-block and --prompt-tokens are alternatives; pick one"
        )
    if (args.prompt_mlp or args.prompt_init != "random") and not args.prompt_tokens:
        raise nanosft.UserError("--prompt-init and --prompt-mlp shape a prompt: add --prompt-tokens")
    if args.quantize_base != "none" and not (args.lora_rank or args.oft_block):
        raise nanosft.UserError("--quantize-base needs a frozen base: add --lora-rank or --oft-block")
    if args.data and args.sft_attributes:
        raise nanosft.UserError(
            "--sft-attributes picks the world's questions: it does not apply to --data"
        )
    if args.sft_attributes:
        args.sft_attributes = cross_domain.attributes(args.sft_attributes)
    check_world_dir(args.world)
    method = peft.method(args.lora_rank, args.oft_block, args.prompt_tokens)
    if method in LR and "--lr" not in (sys.argv[1:] if argv is None else argv):
        args.lr = LR[method]
    if args.data and args.rewind != "none":
        raise nanosft.UserError(
            "--rewind chooses by the world's held-out questions: it does not apply to --data"
        )
    if args.alphas and args.rewind == "none":
        raise nanosft.UserError(
            "--alphas evaluates the line for rewinding: add --rewind path or --rewind interpolate"
        )
    if not args.alphas:  # (--alphas always holds 0 and 1)
        args.alphas = ALPHAS if args.rewind == "interpolate" else ()
    if args.init == "scratch":  # no pre-trained end: no line pre-trained -> final to evaluate
        args.alphas = ()
    return args
