"""
Your own data, measured on records no stage trains on. finetune.py and dpo.py use this only
when --data names a file (the world's data has its own verifier, in data/):

    split_instructions(path, records)  SFT: which records are held out. A record's "split"
                                       field when the file has one, else about 10% of the
                                       prompts, picked by a hash of the prompt's text
    exact_match, token_f1, rouge_l,    how an answer compares with a reference, and how it
    repetition_rate, answer_stats      reads on its own (pure Python)
    SFTHeldout                         finetune.py: the held-out answer loss at every
                                       evaluation, start model vs now; at the end greedy
                                       answers start -> final and out/sft_eval.jsonl
    dpo_answers(...)                   dpo.py: greedy answers of the starting (reference) and
                                       the final policy to held-out prompts, the chosen answer
                                       as reference, and out/dpo_eval.jsonl

What the numbers mean, and what they do not: docs/own_data.md, "What the numbers mean".
"""

import copy
import json
import math
import os
import re
import string
import unicodedata
from collections import Counter

import torch
from torch.nn import functional

import nanosft
from data import formats
from extras import own_data

TRAIN_NAMES = ("train",)
HELDOUT_NAMES = ("heldout", "test", "validation", "valid", "val", "dev", "eval")
MAX_PROMPTS = 200  # held-out prompts answered, start and final (an evenly spaced subset)
MAX_SCORED = 2048  # held-out answers whose likelihood is measured at each evaluation
MIN_PROMPT = 8  # a prompt cut from the left keeps at least this many tokens (as finetune.py's)


# ----------------------------------------------------------------------------------------
# the split: which records are held out


prompt_key, hash_share = own_data.prompt_key, own_data.hash_share  # as DPO's split


def record_splits(path):
    """{record number: "train", "heldout" or None} of an instruction file, numbered as
    own_data.load_instructions numbers them (from 1, in file order). load_instructions keeps
    the conversation only, so the "split" field is read here, from the same records.
    "test", "validation", "valid", "val", "dev" and "eval" mean held out; any other value is
    an error naming the record."""
    out = {}
    for n, (where, r) in enumerate(formats.read_records(path), 1):
        value = r.get("split") if isinstance(r, dict) else None
        if value is None:
            out[n] = None
        elif value in TRAIN_NAMES:
            out[n] = "train"
        elif value in HELDOUT_NAMES:
            out[n] = "heldout"
        else:
            raise nanosft.UserError(
                f'{where}: field \'split\' must be "train" or "heldout" (or '
                f"{', '.join(repr(s) for s in HELDOUT_NAMES[1:])}), got {value!r}"
            )
    return out


def instruction_splits(path, report=None):
    """An instruction file -> [(record number, conversation, "train" | "heldout" | None)]:
    own_data.load_instructions (every format, every skip counted in `report`) with each
    record's "split" field."""
    from extras import own_data

    splits = record_splits(path)
    return [(n, conv, splits[n]) for n, conv in own_data.load_instructions(path, report)]


def split_instructions(path, records, frac=own_data.HELDOUT_FRAC):
    """The held-out split of an instruction file's records [(record number, conversation)]
    (own_data.load_instructions's) -> (train records, held-out records, counts).

    As dpo.py's pairs (own_data.load_preferences): when any record has a "split" field, the
    field decides, and a record without one is trained on; otherwise a share `frac` of the
    PROMPTS is held out, those whose prompt_key hashes below `frac` (hash_share). Records
    with the same prompt then land on the same side, and the split does not depend on the
    seed, the order of the file or the process. counts: train and held-out records, distinct
    held-out prompts, the rule, and held-out prompts that a train record also asks (only a
    "split" field can make those)."""
    fields = record_splits(path)
    by_field = any(fields.get(n) is not None for n, _ in records)
    train, heldout = [], []
    for n, conv in records:
        key = prompt_key(conv[:-1])
        held = fields.get(n) == "heldout" if by_field else hash_share(key) < frac
        (heldout if held else train).append((n, conv))
    if not train:
        raise nanosft.UserError(f"{path}: every record is held out; no training records")
    train_keys = {prompt_key(c[:-1]) for _, c in train}
    held_keys = {prompt_key(c[:-1]) for _, c in heldout}
    counts = {
        "rule": "the records' split field" if by_field else f"{frac:.0%} of the prompts by hash",
        "records_train": len(train),
        "records_heldout": len(heldout),
        "prompts_heldout": len(held_keys),
        "heldout_prompts_also_trained": len(held_keys & train_keys),
        "records_without_split": sum(fields.get(n) is None for n, _ in records) if by_field else 0,
    }
    return train, heldout, counts


def split_line(path, counts):
    """The split's counts as the log line."""
    line = (
        f"{path}: held out by {counts['rule']}: {counts['records_train']:,} train records, "
        f"{counts['records_heldout']:,} held-out records, {counts['prompts_heldout']:,} "
        f"distinct held-out prompts"
    )
    if counts["records_without_split"]:
        line += f" ({counts['records_without_split']:,} records without a split field trained on)"
    if counts["heldout_prompts_also_trained"]:
        line += (
            f"; warning: {counts['heldout_prompts_also_trained']:,} held-out prompts are also "
            "asked by train records (the split field says so): they measure recall, not "
            "generalisation"
        )
    return line


# ----------------------------------------------------------------------------------------
# the metrics: one answer against its reference(s), or on its own

ARTICLES = re.compile(r"\b(a|an|the)\b")


def is_punctuation(ch):
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_answer(text):
    """SQuAD's normalisation: lower case, punctuation deleted, the articles "a", "an" and
    "the" dropped, whitespace collapsed. "The Light!" and "light" become the same string."""
    text = "".join(ch for ch in text.lower() if not is_punctuation(ch))
    return " ".join(ARTICLES.sub(" ", text).split())


def words(text):
    """Lower-cased words, punctuation as a separator (articles kept): what ROUGE-L, the
    repetition rate and the lengths count."""
    return "".join(" " if is_punctuation(ch) else ch for ch in text.lower()).split()


def exact_match(answer, reference):
    """1.0 when the two are the same text after normalize_answer, else 0.0. It means the
    answer says the reference's words in the reference's order, nothing more and nothing
    less; it does not mean a different but correct answer is wrong (it scores 0), nor that a
    matching answer was reasoned rather than remembered."""
    return float(normalize_answer(answer) == normalize_answer(reference))


def token_f1(answer, reference):
    """SQuAD's token F1: the harmonic mean of precision (shared words / the answer's words)
    and recall (shared words / the reference's words), words after normalize_answer, shared
    counted with multiplicity. It means word overlap in any order: "light there was" scores
    1.0 against "there was light", and an answer that copies the question's words scores
    well. It is not correctness."""
    a, r = normalize_answer(answer).split(), normalize_answer(reference).split()
    if not a or not r:
        return float(a == r)
    shared = sum((Counter(a) & Counter(r)).values())
    if not shared:
        return 0.0
    precision, recall = shared / len(a), shared / len(r)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a, b):
    """Length of the longest common subsequence of two sequences (in order, not necessarily
    adjacent), by dynamic programming over one row."""
    row = [0] * (len(b) + 1)  # row[j]: the LCS of a[:i] and b[:j], for the i done so far
    for x in a:
        diagonal = 0  # the previous row's row[j - 1]
        for j, y in enumerate(b, 1):
            above = row[j]
            row[j] = diagonal + 1 if x == y else max(above, row[j - 1])
            diagonal = above
    return row[-1]


def rouge_l(answer, reference):
    """ROUGE-L F-measure (Lin 2004, beta 1, as the rouge-score package without stemming):
    LCS / the answer's words and LCS / the reference's words, their harmonic mean, over
    words(). Unlike F1 it rewards words in the reference's order: "light there was" against
    "there was light" scores 2/3, not 1. It is still overlap, not correctness."""
    a, r = words(answer), words(reference)
    if not a or not r:
        return float(a == r)
    lcs = lcs_length(a, r)
    if not lcs:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def repetition_rate(text, n=3):
    """The share of an answer's word n-grams (words(), n = 3) that repeat an n-gram earlier
    in the same answer: 1 - distinct / all; 0.0 when it has fewer than n words. A loop
    ("and the and the and the ...") tends to 1. It does not see repetition across answers,
    and a reference that repeats itself (a refrain, a list) scores above 0 too."""
    w = words(text)
    grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def score_answer(answer, references, stopped):
    """One answer's row metrics. Against several references (records asking the same thing)
    exact match, F1 and ROUGE-L take the best one, as SQuAD does."""
    return {
        "exact_match": max(exact_match(answer, r) for r in references),
        "f1": max(token_f1(answer, r) for r in references),
        "rouge_l": max(rouge_l(answer, r) for r in references),
        "repetition": repetition_rate(answer),
        "stopped": bool(stopped),
        "words": len(words(answer)),
    }


def answer_stats(rows, references):
    """The statistics of answers (their score_answer rows) to prompts with `references`:
    the means of exact match, F1, ROUGE-L and the repetition rate; the stop rate (answers
    that ended with a stop token, not at the token budget); the length ratio, mean answer
    words / mean reference words (a prompt's reference length: the mean of its references)."""
    n = max(1, len(rows))
    ref_words = sum(sum(len(words(r)) for r in refs) / len(refs) for refs in references)
    return {
        "exact_match": sum(r["exact_match"] for r in rows) / n,
        "f1": sum(r["f1"] for r in rows) / n,
        "rouge_l": sum(r["rouge_l"] for r in rows) / n,
        "repetition_rate": sum(r["repetition"] for r in rows) / n,
        "stop_rate": sum(r["stopped"] for r in rows) / n,
        "length_ratio": sum(r["words"] for r in rows) / ref_words if ref_words else None,
    }


# ----------------------------------------------------------------------------------------
# a model on held-out prompts: the answers' likelihood, and its own greedy answers


def answer_example(tok, messages, answer, block_size):
    """(inputs, targets) of a prompt and an answer, the targets on the answer's tokens and
    its closing <|end|> only (what SFT trains on). A prompt too long for the block keeps its
    last tokens; None when the answer leaves fewer than MIN_PROMPT for it."""
    prompt = nanosft.chat_prompt(tok, messages)
    body = nanosft.encode_content(tok, answer) + [tok.end]
    room = block_size + 1 - len(body)
    if room < min(MIN_PROMPT, len(prompt)):
        return None
    prompt = prompt[max(0, len(prompt) - room) :]
    return nanosft.example_tensors(prompt + body, [0] * len(prompt) + [1] * len(body))


@torch.no_grad()
def answer_logprobs(model, examples, pad, process):
    """Each example's answer log-likelihood under `model`: [(sum of log p over its target
    tokens, their count)], in the examples' order. Batched by length, at most about 2^25
    logits a batch."""
    training, device = model.training, process.device
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    longest = max((len(x) for x, _ in examples), default=1)
    batch = max(1, min(64, (1 << 25) // (longest * model.config.vocab_size)))  # 2^25 floats
    out = [None] * len(examples)
    for first in range(0, len(order), batch):
        rows = order[first : first + batch]
        X, Y = nanosft.collate([examples[i] for i in rows], pad)
        X, Y = X.to(device), Y.to(device)
        with nanosft.autocast(device, process.dtype):
            logits, _ = model(X)
        lp = -functional.cross_entropy(
            logits.float().transpose(1, 2), Y, ignore_index=-1, reduction="none"
        )  # (B, T), 0 off the answer
        for i, s, n in zip(rows, lp.sum(-1).tolist(), (Y != -1).sum(-1).tolist()):
            out[i] = (s, n)
    model.train(training)
    return out


def greedy_answers(model, tok, prompts, max_new_tokens, process):
    """Greedy (temperature 0) answers to prompts (lists of messages), batched by
    nanosft.generate_batch -> [(text, stopped)]: stopped is False when the answer ran into
    max_new_tokens without a stop token (<|end|> or <|endoftext|>), as the world's
    answer_questions decides it. A prompt too long keeps its end, leaving max_new_tokens."""
    training, keep = model.training, model.config.block_size - max_new_tokens
    ids = [nanosft.chat_prompt(tok, p)[-keep:] for p in prompts]
    stop = {tok.end, tok.endoftext}
    with nanosft.autocast(process.device, process.dtype):
        outs = nanosft.generate_batch(model, ids, max_new_tokens, stop=stop, keep_stop=True)
    model.train(training)
    ended = [bool(o) and o[-1] in stop for o in outs]
    return [(tok.decode(o[:-1] if e else o).strip(), e) for o, e in zip(outs, ended)]


def evenly(items, k):
    """At most k items, evenly spaced (all of them when there are no more than k)."""
    return list(items) if len(items) <= k else [items[i * len(items) // k] for i in range(k)]


class Heldout:
    """Held-out prompts, each with its reference answers, ready to measure a model on.

    groups: [{"messages": the prompt, "references": [answers], ...}], one per distinct prompt
    (prompt_key); other keys are copied into the rows of the .jsonl. Up to max_prompts of
    them are answered; the likelihood is measured for up to max_scored (prompt, reference)
    answers, evenly spaced."""

    def __init__(self, groups, tok, block_size, max_prompts=MAX_PROMPTS, max_scored=MAX_SCORED):
        self.groups, self.tok = groups, tok
        pairs = [(g, ref) for g, group in enumerate(groups) for ref in group["references"]]
        built = [(g, answer_example(tok, groups[g]["messages"], r, block_size)) for g, r in pairs]
        self.too_long = sum(e is None for _, e in built)
        scored = evenly([(g, e) for g, e in built if e is not None], max_scored)
        self.owner, self.examples = [g for g, _ in scored], [e for _, e in scored]
        self.asked = evenly(range(len(groups)), max_prompts)
        refs = [r for g in self.asked for r in groups[g]["references"]]
        longest = max((len(nanosft.encode_content(tok, r)) + 1 for r in refs), default=1)
        # twice the longest reference (and its <|end|>), at least 16, at most half the block
        self.budget = max(1, min(block_size // 2, max(16, 2 * longest)))
        self.over_budget = sum(len(nanosft.encode_content(tok, r)) + 1 > self.budget for r in refs)

    def measure(self, model, process, answers=True):
        """{"loss": the mean negative log-likelihood per answer token (the answers' tokens
        and their <|end|>, nothing of the prompt), "perplexity": exp(loss), "tokens",
        "by_prompt": {group: summed log-likelihood of its scored answers}, "answers":
        [(text, stopped)] to the asked prompts (with answers=True)}."""
        lps = answer_logprobs(model, self.examples, self.tok.pad, process)
        total, tokens = sum(s for s, _ in lps), sum(n for _, n in lps)
        by_prompt = {}
        for g, (s, _) in zip(self.owner, lps):
            by_prompt[g] = by_prompt.get(g, 0.0) + s
        loss = -total / tokens if tokens else None
        out = {
            "loss": loss,
            "perplexity": math.exp(min(loss, 700)) if loss is not None else None,
            "tokens": tokens,
            "by_prompt": by_prompt,
        }
        if answers:
            prompts = [self.groups[g]["messages"] for g in self.asked]
            out["answers"] = greedy_answers(model, self.tok, prompts, self.budget, process)
        return out

    def compare(self, start, final, path, log, names=("start", "final")):
        """Start vs final (two measure() results): the rows of `path` (a .jsonl, written
        atomically), the summary logged one line per statistic, and the dict for the stage's
        JSON report."""
        rows, stats = [], {}
        for name, m in zip(names, (start, final)):
            scored = [
                score_answer(a, self.groups[g]["references"], e)
                for g, (a, e) in zip(self.asked, m["answers"])
            ]
            stats[name] = {
                "answer_loss": m["loss"],
                "perplexity": m["perplexity"],
                **answer_stats(scored, [self.groups[g]["references"] for g in self.asked]),
            }
            rows.append(scored)
        up = [g for g in start["by_prompt"] if final["by_prompt"][g] > start["by_prompt"][g]]
        more_likely = len(up) / len(start["by_prompt"]) if start["by_prompt"] else None
        lines = []
        for i, g in enumerate(self.asked):
            group = self.groups[g]
            user = [m["content"] for m in group["messages"] if m["role"] == "user"]
            row = {
                "prompt": user[-1] if user else "",
                "messages": group["messages"],
                "reference": group["references"][0],
                "references": group["references"],
                **{k: v for k, v in group.items() if k not in ("messages", "references")},
            }
            for name, m, scored in zip(names, (start, final), rows):
                row[f"{name}_answer"] = m["answers"][i][0]
                row[name] = {**scored[i], "reference_logprob": m["by_prompt"].get(g)}
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        nanosft.save_checkpoint(path, "".join(lines))  # a str: written as text, atomically
        a, b = (stats[n] for n in names)
        log(
            f"held-out answers ({len(self.asked)} prompts, greedy, at most {self.budget} "
            f"tokens; likelihood: {len(self.examples)} answers): {names[0]} -> {names[1]}"
        )
        for key, label in STAT_LABELS:
            log(f"  {label:<26} {fmt(a[key])} -> {fmt(b[key])}")
        log(
            f"  {'reference more likely':<26} {fmt(more_likely)} of {len(start['by_prompt'])} "
            f"prompts (its log-likelihood, {names[1]} > {names[0]})"
        )
        log(f"  -> {path}")
        return {
            **stats,
            "reference_more_likely": more_likely,
            "prompts_scored": len(start["by_prompt"]),
            "answers_scored": len(self.examples),
            "answer_tokens": start["tokens"],
            "answers_too_long": self.too_long,
            "prompts_answered": len(self.asked),
            "max_new_tokens": self.budget,
            "references_over_budget": self.over_budget,
            "file": path,
        }


STAT_LABELS = (
    ("answer_loss", "answer loss (nats/token)"),
    ("perplexity", "answer perplexity"),
    ("exact_match", "exact match"),
    ("f1", "token F1"),
    ("rouge_l", "ROUGE-L"),
    ("repetition_rate", "repeated 3-grams"),
    ("stop_rate", "stop rate"),
    ("length_ratio", "length ratio"),
)


def fmt(v):  # a number for the log
    return "n/a" if v is None else f"{v:.3f}"


def instruction_groups(records):
    """Held-out records [(record number, conversation)] -> one group per distinct prompt:
    the first record's prompt messages, every record's last answer as a reference."""
    groups = {}
    for n, conv in records:
        g = groups.setdefault(
            prompt_key(conv[:-1]), {"messages": conv[:-1], "references": [], "records": []}
        )
        if conv[-1]["content"] not in g["references"]:
            g["references"].append(conv[-1]["content"])
        g["records"].append(n)
    return list(groups.values())


# ----------------------------------------------------------------------------------------
# the stages' hooks


class SFTHeldout:
    """finetune.py's evaluation of your own instruction file, made before training from the
    records own_data.load_instructions read and the model SFT starts from:

        own.train                 the records to train on: the held-out ones are left out
        own.counts                the split's counts (split_instructions), logged
        own.evaluate(model, it)   at every evaluation: the held-out answer loss and
                                  perplexity now, against the start model's (logged)
        own.finish(model, dir)    at the end: greedy answers of the start and the final model,
                                  their statistics start -> final, dir/sft_eval.jsonl;
                                  returns the dict for sft.json

    The start model is measured here, once (its answers too), on process.device; the rank
    that is not the master only splits."""

    def __init__(self, path, records, tok, model, process, max_prompts=MAX_PROMPTS):
        self.process, self.history = process, []
        self.train, heldout, self.counts = split_instructions(path, records)
        process.log(split_line(path, self.counts))
        self.heldout = Heldout(
            instruction_groups(heldout), tok, model.config.block_size, max_prompts=max_prompts
        )
        self.start = None
        if process.master and self.heldout.examples:
            on_device = next(model.parameters()).device == process.device
            start = model if on_device else copy.deepcopy(model).to(process.device)
            self.start = self.heldout.measure(start, process)
            self.evaluate(None, 0, measured=self.start)

    def evaluate(self, model, step, measured=None):
        """The held-out answer loss at `step`, logged beside the start model's."""
        if self.start is None:
            return None
        now = measured or self.heldout.measure(model, self.process, answers=False)
        self.history.append({"step": step, "answer_loss": now["loss"]})
        than = (
            f"({len(self.heldout.examples):,} answers, {now['tokens']:,} tokens)"
            if measured
            else f"| start model {self.start['loss']:.4f} ({self.start['perplexity']:.2f})"
        )
        self.process.log(
            f"own data, step {step}: held-out answer loss {now['loss']:.4f} (perplexity "
            f"{now['perplexity']:.2f}) {than}"
        )
        return now["loss"]

    def finish(self, model, out_dir):
        """The final model against the start model on the held-out prompts: statistics
        logged, out_dir/sft_eval.jsonl written; sft.json's "own_eval"."""
        if self.start is None:
            why = "every held-out answer is too long" if self.heldout.groups else "none held out"
            self.process.log(f"own data: {why}, nothing measured")
            return {"split": self.counts}
        final = self.heldout.measure(model, self.process)
        path = os.path.join(out_dir, "sft_eval.jsonl")
        result = self.heldout.compare(self.start, final, path, self.process.log)
        return {"split": self.counts, **result, "answer_loss_path": self.history}


def pair_groups(pairs):
    """Held-out preference pairs (dicts with "prompt" messages, "chosen", "rejected",
    "record") -> one group per distinct prompt: its chosen answers are the references, its
    rejected ones kept for the rows."""
    groups = {}
    for p in pairs:
        g = groups.setdefault(
            prompt_key(p["prompt"]),
            {"messages": p["prompt"], "references": [], "rejected": [], "records": []},
        )
        for key, answer in (("references", p["chosen"]), ("rejected", p["rejected"])):
            if answer not in g[key]:
                g[key].append(answer)
        if p.get("record") not in g["records"]:
            g["records"].append(p.get("record"))
    return list(groups.values())


def dpo_answers(ref, model, tok, pairs, process, out_dir, max_prompts=MAX_PROMPTS):
    """dpo.py on your own pairs, at the end: greedy answers of the reference (the starting
    checkpoint, frozen) and of the final policy to the held-out prompts of `pairs`, each
    against its chosen answer(s); the statistics start -> final logged (the chosen answers'
    loss and the share of prompts whose chosen answer became more likely among them),
    out_dir/dpo_eval.jsonl written; returns the dict for dpo.json. Preference accuracy,
    margin and KL are dpo.py's own (heldout_rewards, kl_estimate)."""
    if not pairs:
        process.log("own pairs: no held-out pairs, no answers measured")
        return None
    heldout = Heldout(pair_groups(pairs), tok, model.config.block_size, max_prompts=max_prompts)
    if not heldout.examples:
        process.log("own pairs: every held-out chosen answer is too long for the block")
        return None
    start, final = heldout.measure(ref, process), heldout.measure(model, process)
    return heldout.compare(start, final, os.path.join(out_dir, "dpo_eval.jsonl"), process.log)
