"""
Preference data (dpo.py): a file's records -> (chosen, rejected) pairs -> token examples. The
world's threads are ranked by their net votes; your own formats (pairs, HH, scores, ...) come
in through `reader` (extras/own_data.py). The same rules as data/formats.py: a malformed
record is one clear error, a pair that teaches nothing (a tie, an exact copy) is skipped and
counted, a pair too long for the block is cut and counted.

    read_pairs(path, ..., report)    a thread's answers ranked by net votes -> pairs
    load_preferences(...)            and the train/held-out split by record
    load_pairs(...)                  dpo.py's pairs as token examples, cut to the block size
"""

import hashlib
import unicodedata

import nanosft
from data.formats import DataReport, field, read_records

HELDOUT_FRAC = 0.1  # share of preference records held out when the file has no "split" field


# {"prompt": [messages], "chosen", "rejected", "split", "group", "record"}


def ranked_pairs(items, min_margin, top_only=True):
    """(text, score) items -> (chosen, rejected) pairs whose scores differ by at least
    min_margin (and at all: a tie says nothing).

    top_only: the best-scored answer against each other answer (as UltraFeedback's
    "binarized" pairs are built), else every two answers. Pairs between two answers that
    are both below the top teach the middle of the ranking, which net votes order badly:
    a correct curt answer beats a wrong full sentence, and DPO, crediting whatever
    differs, then learns "curt is good" from those pairs and "curt is bad" from others."""
    out = []
    if top_only:
        best = max(s for _, s in items)
        tops = [t for t, s in items if s == best]
        if len(tops) == 1:  # a tie at the top: no single best answer, no pairs
            out = [(tops[0], t) for t, s in items if s != best and best - s >= min_margin]
        return out
    for i in range(len(items)):
        for j in range(i + 1, len(items)):
            (a, sa), (b, sb) = items[i], items[j]
            if sa != sb and abs(sa - sb) >= min_margin:
                out.append((a, b) if sa > sb else (b, a))
    return out


def number(x, key, where, integer=False):
    ok = isinstance(x, int) if integer else isinstance(x, (int, float))
    # abs(x) < 1e300: finite, and no integer too large for float arithmetic later
    if isinstance(x, bool) or not ok or not abs(x) < 1e300:
        shown = repr(x) if len(repr(x)) < 40 else repr(x)[:37] + "..."
        raise nanosft.UserError(
            f"{where}: field '{key}' must be a {'whole' if integer else 'finite'} number, "
            f"got {shown}"
        )
    return x


def scored_items(r, key, where, score):
    lst = r.get(key)
    if not isinstance(lst, list) or len(lst) < 2:
        raise nanosft.UserError(f"{where}: '{key}' must be a list of at least two answers")
    return [
        (field(a, "text", f"{where}: {key}[{i}]"), score(a, f"{where}: {key}[{i}]"))
        for i, a in enumerate(lst)
    ]


def votes_format(r, where):
    """The world's preference format: a thread,
    {"prompt", "answers": [{"text", "up", "down"}, ...]}."""
    if not isinstance(r, dict) or "answers" not in r:
        raise nanosft.UserError(
            f"{where}: expected a thread {{prompt, answers: [{{text, up, down}}, ...]}} "
            "(your own formats: extras/own_data.py)"
        )
    return "votes"


def votes_pairs(fmt, r, where, min_margin, top_only=True):
    """A thread -> (its question as messages, [(chosen, rejected)] by net votes: ranked_pairs)."""

    def net(a, w):  # a is a dict here: its "text" was read first
        return number(a.get("up"), "up", w, integer=True) - number(
            a.get("down"), "down", w, integer=True
        )

    user = [{"role": "user", "content": field(r, "prompt", where)}]
    return user, ranked_pairs(scored_items(r, "answers", where, net), min_margin, top_only)


def read_pairs(path, min_margin=1.0, top_only=True, report=None, reader=None):
    """A preference file -> (format, pairs), each pair carrying its record's "split" field
    (None when the file has none) and its record number as "group". A malformed record is
    an error; a pair that teaches nothing is skipped and counted in `report`: chosen and
    rejected the same text (a tie), or an exact copy of an earlier pair. reader: (record_format,
    record_pairs) of the formats read: the world's votes, or every format (extras/own_data.py)."""
    record_format, record_pairs = reader or (votes_format, votes_pairs)
    report = report or DataReport(path, unit="pairs")
    records = read_records(path)
    fmt = record_format(records[0][1], records[0][0])
    pairs, seen = [], set()
    for group, (where, r) in enumerate(records):
        n = group + 1
        got = record_format(r, where)
        if got != fmt:
            raise nanosft.UserError(
                f"{where}: a '{got}' record, but the file's first record is '{fmt}'"
            )
        split = r.get("split")
        if split not in (None, "train", "heldout"):
            raise nanosft.UserError(
                f'{where}: field \'split\' must be "train" or "heldout", got {split!r}'
            )
        prompt, pr = record_pairs(fmt, r, where, min_margin=min_margin, top_only=top_only)
        if any(m["role"] == "tool" for m in prompt):
            report.total += len(pr)
            for _ in pr:
                report.skip(
                    n,
                    "with tool-call turns (this chat format has no role for them)",
                    "has tool-call turns ('function_call' / 'observation'), "
                    "which this chat format cannot hold",
                )
            continue
        for chosen, rejected in pr:
            report.total += 1
            if chosen.strip() == rejected.strip():
                report.skip(
                    n,
                    "whose chosen == rejected",
                    f"chosen and rejected answers are the same text ({chosen[:40]!r}); "
                    "a pair must differ",
                )
                continue
            key = repr((prompt, chosen, rejected))
            if key in seen:
                report.skip(
                    n, "that repeat an earlier pair exactly", "an exact copy of an earlier pair"
                )
                continue
            seen.add(key)
            pairs.append(
                {
                    "prompt": prompt,
                    "chosen": chosen,
                    "rejected": rejected,
                    "split": split,
                    "group": group,
                    "record": n,
                }
            )
    report.check()
    if not pairs:
        raise nanosft.UserError(
            f"{path}: no preference pairs (no two answers differ by --min-margin {min_margin})"
        )
    return fmt, pairs


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


def load_preferences(path, min_margin=1.0, top_only=True, report=None, reader=None):
    """A preference file -> (format, train pairs, held-out pairs). A record's "split" field
    ("train" / "heldout") when the file has one; else the pairs whose prompt hashes below
    HELDOUT_FRAC (hash_share of prompt_key): about 10% of the prompts, every pair of a prompt on
    the same side, and the same prompts finetune.py holds out of an instruction file with
    those prompts (extras/own_eval.py), so DPO's held-out prompts are not SFT's training
    ones. (A file whose every prompt hashes below it keeps them all for training.)"""
    fmt, pairs = read_pairs(path, min_margin, top_only, report, reader=reader)
    if all(p["split"] is None for p in pairs):
        held = [hash_share(prompt_key(p["prompt"])) < HELDOUT_FRAC for p in pairs]
        for p, h in zip(pairs, held):
            p["split"] = "heldout" if h and not all(held) else "train"
    train = [p for p in pairs if p["split"] == "train"]
    heldout = [p for p in pairs if p["split"] == "heldout"]
    if not train:
        raise nanosft.UserError(f"{path}: every pair is held out; no training pairs")
    return fmt, train, heldout


# ----------------------------------------------------------------------------------------
# preference pairs as token examples (dpo.py), cut to the model's block size


def load_pairs(
    path,
    heldout_path,
    tok,
    block_size,
    min_margin,
    top_only,
    strict,
    log,
    max_scored,
    heldout_rule=None,
    reader=None,
):
    """dpo.py's data: training and held-out pairs, each as (pairs, examples), and their counts
    for dpo.json. The held-out pairs come from `heldout_path` (on the world: people neither
    SFT nor DPO trains on; pairs split off the training people's threads would share people,
    and the other phrasing of the question, with the training pairs) or, when it is None, are
    a share of `path`'s records. At most `max_scored` held-out pairs are kept for scoring.
    heldout_rule: (min_margin, top_only) for `heldout_path`'s votes (default: the training
    pairs' rule), so that a fixed benchmark stays the same whatever pairs the training uses.
    reader: how the files' records are read (read_pairs: the world's votes by default)."""
    report = DataReport(path, strict, unit="pairs")
    if heldout_path:
        fmt, train = read_pairs(path, min_margin, top_only, report, reader=reader)
        held = read_pairs(heldout_path, *(heldout_rule or (min_margin, top_only)), reader=reader)[1]
    else:
        fmt, train, held = load_preferences(
            path, min_margin=min_margin, top_only=top_only, report=report, reader=reader
        )
    train = pair_examples(tok, train, block_size, report)
    held = pair_examples(
        tok,
        held,
        block_size,
        DataReport(heldout_path, strict, unit="pairs") if heldout_path else report,
    )
    for line in report.lines():
        log(line)
    step = max(1, len(held[0]) // max_scored)  # scored at every evaluation: an evenly spaced subset
    scored = tuple(h[::step][:max_scored] for h in held)
    return (
        train,
        scored,
        {
            "data": path,
            "format": fmt,
            "data_report": report.state(),
            "pairs_train": len(train[0]),
            "pairs_heldout": len(held[0]),
            "pairs_heldout_scored": len(scored[0]),
        },
    )


def pair_example(tok, pair, block_size, report=None):
    """(x_chosen, y_chosen, x_rejected, y_rejected): inputs and targets, -1 off the response.
    The response ends with <|end|>, a target like any other token: stopping is part of it.

    Too long for the block: the prompt loses its OLDEST tokens first, the same ones for both
    answers (a pair compares two answers to one prompt), but keeps at least half the window;
    then each answer is cut to what is left (as TRL does: the log-probabilities of two
    answers' beginnings still compare them). Both are counted in `report`. Returns None when
    the two cut answers are the same tokens: nothing is left to prefer."""
    prompt = nanosft.chat_prompt(tok, pair["prompt"])
    answers = [nanosft.encode_content(tok, pair[k]) + [tok.end] for k in ("chosen", "rejected")]
    limit = block_size + 1
    keep = min(len(prompt), max(limit - max(map(len, answers)), limit // 2))
    n, report = pair.get("record", 0), report or DataReport("pairs", unit="pairs")
    cut_prompt, cut_answer = keep < len(prompt), any(len(a) > limit - keep for a in answers)
    prompt, answers = prompt[len(prompt) - keep :], [a[: limit - keep] for a in answers]
    if answers[0] == answers[1]:
        report.skip(
            n,
            "whose answers are the same within the block",
            f"chosen and rejected are the same in their first {limit - keep} tokens",
        )
        return None
    if cut_prompt:
        report.truncate(
            n,
            "prompts cut from the left to fit",
            f"the prompt is longer than the model's block size {block_size}",
        )
    if cut_answer:
        report.truncate(
            n,
            "answers cut to fit the block",
            f"an answer is longer than the model's block size {block_size}",
        )
    return tuple(
        t
        for a in answers
        for t in nanosft.example_tensors(prompt + a, [0] * len(prompt) + [1] * len(a))
    )


def pair_examples(tok, pairs, block_size, report):
    """pair_example for many pairs -> (kept pairs, their examples)."""
    kept = [(p, e) for p in pairs if (e := pair_example(tok, p, block_size, report)) is not None]
    report.check(block_size)
    return [p for p, _ in kept], [e for _, e in kept]
