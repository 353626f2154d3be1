"""
Your own data: instruction and preference files in the common formats, read with the
machinery of data/formats.py (one clear error per malformed record; a valid record that
teaches nothing skipped and counted). The stages import this where --data names a file.

    load_instructions(path, report)  SFT: Alpaca, {prompt,response}, {messages}, ShareGPT
    read_pairs(path, ...)            DPO: pairs as strings or TRL's messages, HH, Alpaca
                                     pairs, ShareGPT pairs, votes, scores
    load_preferences(path, ...)      and the train/held-out split by prompt
Formats with examples: docs/own_data.md.
"""
import hashlib
import json
import re
import unicodedata

import nanosft
from data import formats, preferences


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "system": "system",
                  # tool use: valid data, but this chat format has no role for it (skipped, counted)
                  "function_call": "tool", "observation": "tool", "tool": "tool", "function": "tool"}


def alpaca_prompt(r, where):
    """An Alpaca record's prompt as messages: its optional "system", then the instruction
    and its optional "input" as one user turn."""
    system = formats.field(r, "system", where, optional=True)
    extra = formats.field(r, "input", where, optional=True)
    return ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": formats.field(r, "instruction", where) + ("\n\n" + extra if extra else "")}]


def instruction_record(r, where):
    """One instruction record -> a conversation [{"role", "content"}, ...]. Formats:
      Alpaca        {"instruction", "input" (optional), "output"}
      prompt pairs  {"prompt", "response"}
      chat          {"messages": [{"role": "user"|"assistant"|"system", "content"}, ...]}
      ShareGPT      {"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}"""
    if not isinstance(r, dict):
        raise nanosft.UserError(f"{where}: expected a JSON object, got {type(r).__name__}")
    if "messages" in r or "conversations" in r:
        key, role_key, text_key = ("messages", "role", "content") if "messages" in r else ("conversations", "from", "value")
        msgs = r[key]
        if not isinstance(msgs, list):
            raise nanosft.UserError(f"{where}: '{key}' must be a list of messages")
        conv = []
        for j, m in enumerate(msgs):
            w = f"{where}: message {j + 1}"
            role = formats.field(m, role_key, w)
            if key == "messages" and role not in ("system", "user", "assistant"):
                raise nanosft.UserError(f"{w}: role must be system, user or assistant, got '{role}'")
            if key == "conversations" and role not in SHAREGPT_ROLES:
                raise nanosft.UserError(f"{w}: 'from' must be human, gpt, system (or a tool turn), got '{role}'")
            conv.append({"role": SHAREGPT_ROLES.get(role, role), "content": formats.field(m, text_key, w)})
        return conv
    if "instruction" in r:
        return alpaca_prompt(r, where) + [{"role": "assistant", "content": formats.field(r, "output", where)}]
    if "prompt" in r and "response" in r:
        return [{"role": "user", "content": formats.field(r, "prompt", where)},
                {"role": "assistant", "content": formats.field(r, "response", where)}]
    keys = ", ".join(sorted(r)) or "none"
    raise nanosft.UserError(f"{where}: unknown record shape (keys: {keys}); expected Alpaca "
                    "{instruction,input,output}, {prompt,response}, {messages:[...]} or ShareGPT "
                    "{conversations:[...]}")


def load_instructions(path, report=None):
    """An instruction file -> [(record number, conversation)]. A malformed record is an
    error; a valid one that teaches nothing is skipped and counted in `report`: no assistant
    turn, an empty answer, or an exact copy of an earlier record. Messages after the last
    assistant turn are dropped (no target follows them, so they change no loss)."""
    report = report or formats.DataReport(path)
    out, seen = [], set()
    records = formats.read_records(path)
    report.total = len(records)
    for n, (where, r) in enumerate(records, 1):
        conv = instruction_record(r, where)
        last = max((i for i, m in enumerate(conv) if m["role"] == "assistant"), default=None)
        if last is None:
            report.skip(n, "with no assistant turn", "no assistant message to learn from")
            continue
        if any(m["role"] == "tool" for m in conv[:last]):
            report.skip(n, "with tool-call turns (this chat format has no role for them)",
                        "has tool-call turns ('function_call' / 'observation'), which this chat format cannot hold")
            continue
        conv = conv[:last + 1]
        if not conv[-1]["content"].strip():
            report.skip(n, "whose answer is empty", "the answer is empty")
            continue
        key = json.dumps(conv)
        if key in seen:
            report.skip(n, "that repeat an earlier record exactly", "an exact copy of an earlier record")
            continue
        seen.add(key)
        out.append((n, conv))
    return out


HH_TURN = re.compile(r"\n\n(Human|Assistant):")  # Anthropic HH: a dialogue in one string


def split_hh(text, where):
    """An HH dialogue -> (chat messages before the last Assistant turn, that turn's text)."""
    parts = HH_TURN.split(text)  # [before the first turn, role, body, role, body, ...]
    if parts[0].strip() or len(parts) < 3:
        raise nanosft.UserError(f"{where}: expected a dialogue of '\\n\\nHuman:' / '\\n\\nAssistant:' turns")
    turns = [(parts[i], parts[i + 1].strip()) for i in range(1, len(parts), 2)]
    if turns[-1][0] != "Assistant":
        raise nanosft.UserError(f"{where}: the dialogue must end with an '\\n\\nAssistant:' turn")
    msgs = [{"role": "user" if r == "Human" else "assistant", "content": b} for r, b in turns[:-1]]
    return msgs, turns[-1][1]


def record_format(r, where):
    """Which preference format a record is in, from its keys."""
    if not isinstance(r, dict):
        raise nanosft.UserError(f"{where}: expected a JSON object, got {type(r).__name__}")
    if "answers" in r:
        return "votes"
    if "responses" in r:
        return "scores"
    if "chosen" in r and "rejected" in r:
        if isinstance(r["chosen"], list):
            return "conversational"
        if isinstance(r["chosen"], dict) and "conversations" in r:
            return "sharegpt"
        return "pairs" if "prompt" in r else "alpaca" if "instruction" in r else "hh"
    keys = ", ".join(sorted(r)) or "none"
    raise nanosft.UserError(f"{where}: unknown preference record (keys: {keys}); expected "
                       "{prompt,chosen,rejected} (strings, or TRL's lists of {role,content} messages), "
                       "HH {chosen,rejected}, Alpaca {instruction,chosen,rejected}, ShareGPT "
                       "{conversations,chosen,rejected}, {prompt,answers:[{text,up,down}]} or "
                       "{prompt,responses:[{text,score}]}")


def conversational_pair(r, where):
    """TRL's conversational format: "chosen" / "rejected" are lists of {role, content}
    messages ending with the assistant's answer; the prompt is "prompt" (a list of messages,
    or a string) or, when there is none (implicit prompt), what the two lists share before
    their last message."""
    def messages(key):
        msgs = r[key]
        if not isinstance(msgs, list) or not msgs:
            raise nanosft.UserError(f"{where}: '{key}' must be a non-empty list of {{role, content}} messages")
        out = []
        for j, m in enumerate(msgs):
            w = f"{where}: {key}[{j}]"
            role = formats.field(m, "role", w)
            if role not in ("system", "user", "assistant"):
                raise nanosft.UserError(f"{w}: role must be system, user or assistant, got '{role}'")
            out.append({"role": role, "content": formats.field(m, "content", w)})
        return out
    chosen, rejected = messages("chosen"), messages("rejected")
    for key, msgs in (("chosen", chosen), ("rejected", rejected)):
        if msgs[-1]["role"] != "assistant":
            raise nanosft.UserError(f"{where}: the last message of '{key}' must be the assistant's answer")
    if "prompt" in r:
        prompt = [{"role": "user", "content": formats.field(r, "prompt", where)}] if isinstance(r["prompt"], str) \
            else messages("prompt")
        if chosen[:-1] != rejected[:-1]:  # earlier turns inside the answers: the same for both
            raise nanosft.UserError(f"{where}: 'chosen' and 'rejected' must share the messages before their last one")
        prompt = prompt + chosen[:-1]
    else:
        prompt = chosen[:-1]
        if rejected[:-1] != prompt:
            raise nanosft.UserError(f"{where}: 'chosen' and 'rejected' must share the messages before their last one")
    return prompt, chosen[-1]["content"], rejected[-1]["content"]


def record_pairs(fmt, r, where, min_margin, top_only=True):
    """One record -> (prompt messages, [(chosen, rejected), ...])."""
    if fmt == "votes":  # the world's format
        return preferences.votes_pairs(r, where, min_margin=min_margin, top_only=top_only)[1:]
    if fmt == "scores":
        def score(a, w):
            return preferences.number(a.get("score"), "score", w)
        user = [{"role": "user", "content": formats.field(r, "prompt", where)}]
        return user, preferences.ranked_pairs(preferences.scored_items(r, "responses", where, score), min_margin, top_only)
    if fmt == "pairs":
        user = [{"role": "user", "content": formats.field(r, "prompt", where)}]
        return user, [(formats.field(r, "chosen", where), formats.field(r, "rejected", where))]
    if fmt == "alpaca":
        return alpaca_prompt(r, where), [(formats.field(r, "chosen", where), formats.field(r, "rejected", where))]
    if fmt == "conversational":
        prompt, chosen, rejected = conversational_pair(r, where)
        return prompt, [(chosen, rejected)]
    if fmt == "sharegpt":  # {"conversations": [...], "chosen": {"from","value"}, "rejected": {...}}
        prompt = instruction_record({"conversations": r["conversations"]}, where)
        answers = [instruction_record({"conversations": [r[k]]}, f"{where}: {k}")[0]["content"]
                   for k in ("chosen", "rejected")]
        return prompt, [tuple(answers)]
    # hh: both fields are whole dialogues; the prompt is what they share before the last reply
    msgs_c, chosen = split_hh(formats.field(r, "chosen", where), where + " (chosen)")
    msgs_r, rejected = split_hh(formats.field(r, "rejected", where), where + " (rejected)")
    if msgs_c != msgs_r:
        raise nanosft.UserError(f"{where}: 'chosen' and 'rejected' must share the dialogue before "
                           "their last Assistant turn")
    return msgs_c, [(chosen, rejected)]


def read_pairs(path, min_margin=1.0, top_only=True, report=None):
    """preferences.read_pairs of a file in any format above (every record in its first
    record's format). A record's "split" field must be "train" or "heldout"; a record whose
    prompt has tool-call turns is skipped and counted (this chat format has no role for them)."""
    report = report or formats.DataReport(path, unit="pairs")
    first, n = [], [0]

    def one(r, where, min_margin, top_only):
        n[0] += 1
        fmt = record_format(r, where)
        if not first:
            first.append(fmt)
        if fmt != first[0]:
            raise nanosft.UserError(f"{where}: a '{fmt}' record, but the file's first record is '{first[0]}'")
        if r.get("split") not in (None, "train", "heldout"):
            raise nanosft.UserError(f'{where}: field \'split\' must be "train" or "heldout", got {r["split"]!r}')
        prompt, pairs = record_pairs(fmt, r, where, min_margin=min_margin, top_only=top_only)
        if any(m["role"] == "tool" for m in prompt):
            report.total += len(pairs)
            for _ in pairs:
                report.skip(n[0], "with tool-call turns (this chat format has no role for them)",
                            "has tool-call turns ('function_call' / 'observation'), which this chat format cannot hold")
            return fmt, prompt, []
        return fmt, prompt, pairs
    return preferences.read_pairs(path, min_margin, top_only, report, record_pairs=one)


HELDOUT_FRAC = 0.1  # share of preference prompts held out when the file has no "split" field


def prompt_key(messages):
    """What a prompt asks, normalised: the text of its user turns (of every turn when it has
    none), NFKC, case-folded, whitespace collapsed. Records with the same key ask the same
    thing, so they are held out together."""
    turns = [m for m in messages if m["role"] == "user"] or messages
    text = "\n".join(m["content"] for m in turns)
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def hash_share(key):
    """Where a prompt key falls in [0, 1): the first 8 bytes of its SHA-1. The same on every
    machine, run and process (Python's hash() of a string is salted per process)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64


def load_preferences(path, min_margin=1.0, top_only=True, report=None):
    """A preference file in any format above -> (format, train pairs, held-out pairs). A
    record's "split" field ("train" / "heldout") when the file has one; else the pairs whose
    prompt hashes below HELDOUT_FRAC (hash_share of prompt_key): about 10% of the prompts,
    every pair of a prompt on the same side, and the same prompts finetune.py holds out of an
    instruction file with those prompts (extras/own_eval.py), so DPO's held-out prompts are not
    SFT's training ones. (A file whose every prompt hashes below it keeps them all for
    training.)"""
    fmt, pairs = read_pairs(path, min_margin, top_only, report)
    if all(p["split"] is None for p in pairs):
        held = [hash_share(prompt_key(p["prompt"])) < HELDOUT_FRAC for p in pairs]
        for p, h in zip(pairs, held):
            p["split"] = "heldout" if h and not all(held) else "train"
    train = [p for p in pairs if p["split"] == "train"]
    heldout = [p for p in pairs if p["split"] == "heldout"]
    if not train:
        raise nanosft.UserError(f"{path}: every pair is held out; no training pairs")
    return fmt, train, heldout
