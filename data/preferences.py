"""
Preference data (dpo.py): a file's records -> (chosen, rejected) pairs -> token examples.
The world's threads are ranked by their net votes; your own formats (pairs, HH, scores, ...)
and the train/held-out split of a file without held-out people come in through
extras/own_data.py. The same rules as data/formats.py: a malformed
record is one clear error, a pair that teaches nothing (a tie, an exact copy) is skipped and
counted, a pair too long for the block is cut and counted.

    read_pairs(path, ..., report)    a thread's answers ranked by net votes -> pairs
    load_pairs(...)                  dpo.py's pairs as token examples, cut to the block size
"""

import nanosft
from data.formats import DataReport, field, read_records

# a pair: {"prompt": [messages], "chosen", "rejected", "split", "record"}


def ranked_pairs(items, min_margin, top_only=True):
    """(text, score) items -> (chosen, rejected) pairs whose scores differ by at least
    min_margin (and at all: a tie says nothing).

    top_only: the best-scored answer against each other answer (as UltraFeedback's
    "binarized" pairs are built), else every two answers. Pairs between two answers that
    are both below the top teach the middle of the ranking, which net votes order badly:
    a correct curt answer beats a wrong full sentence, and DPO, crediting whatever
    differs, then learns "curt is good" from those pairs and "curt is bad" from others."""
    if top_only:
        best = max(s for _, s in items)
        tops = [t for t, s in items if s == best]  # a tie at the top: no single best answer
        return [
            (tops[0], t)
            for t, s in items
            if len(tops) == 1 and s != best and best - s >= min_margin
        ]
    out = []
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


def votes_pairs(r, where, min_margin, top_only=True):
    """A thread, the world's preference format {"prompt", "answers": [{"text", "up", "down"},
    ...]} -> ("votes", its question as messages, [(chosen, rejected)] by net votes:
    ranked_pairs)."""
    if not isinstance(r, dict) or "answers" not in r:
        raise nanosft.UserError(
            f"{where}: expected a thread {{prompt, answers: [{{text, up, down}}, ...]}} "
            "(your own formats: extras/own_data.py)"
        )
    user = [{"role": "user", "content": field(r, "prompt", where)}]
    answers = scored_items(  # each answer's net votes, up - down (its "text" was read first)
        r,
        "answers",
        where,
        lambda a, w: number(a.get("up"), "up", w, True) - number(a.get("down"), "down", w, True),
    )
    return "votes", user, ranked_pairs(answers, min_margin, top_only)


def read_pairs(path, min_margin=1.0, top_only=True, report=None, record_pairs=votes_pairs):
    """A preference file -> (format, pairs), each pair carrying its record's "split" field
    (None when the file has none) and its record number. A malformed record is an error; a
    pair that teaches nothing is skipped and counted in `report`: chosen and rejected the same
    text (a tie), or an exact copy of an earlier pair. record_pairs(record, where, min_margin,
    top_only) -> (format, prompt, pairs): the world's votes, or every format
    (extras/own_data.py)."""
    report = report or DataReport(path, unit="pairs")
    pairs, seen, fmt = [], set(), None
    for n, (where, r) in enumerate(read_records(path), 1):
        fmt, prompt, pr = record_pairs(r, where, min_margin=min_margin, top_only=top_only)
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
                    "split": r.get("split"),
                    "record": n,
                }
            )
    report.check()
    if not pairs:
        raise nanosft.UserError(
            f"{path}: no preference pairs (no two answers differ by --min-margin {min_margin})"
        )
    return fmt, pairs


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
    split=None,
):
    """dpo.py's data: training and held-out pairs, each as (pairs, examples), and their counts
    for dpo.json. The held-out pairs come from `heldout_path` (on the world: people neither
    SFT nor DPO trains on; pairs split off the training people's threads would share people,
    and the other phrasing of the question, with the training pairs) or, when it is None, are
    a share of `path`'s records: split(path, min_margin, top_only, report) -> (format, train,
    held-out) reads your own file (extras/own_data.py load_preferences). At most `max_scored`
    held-out pairs are kept for scoring. heldout_rule: (min_margin, top_only) for
    `heldout_path`'s votes (default: the training pairs' rule), so that a fixed benchmark stays
    the same whatever pairs the training uses."""
    report = DataReport(path, strict, unit="pairs")
    if heldout_path:
        fmt, train = read_pairs(path, min_margin, top_only, report)
        held = read_pairs(heldout_path, *(heldout_rule or (min_margin, top_only)))[1]
    else:
        fmt, train, held = split(path, min_margin, top_only, report)
    train = pair_examples(tok, train, block_size, report)
    held = pair_examples(
        tok,
        held,
        block_size,
        DataReport(heldout_path, strict, unit="pairs") if heldout_path else report,
    )
    step = max(1, len(held[0]) // max_scored)  # scored at every evaluation: an evenly spaced subset
    scored = tuple(h[::step][:max_scored] for h in held)
    log(  # what was skipped or cut, then what is left
        "\n".join(
            [
                *report.lines(),
                f"{path}: {fmt} format, {len(train[1]):,} train / {len(held[1]):,} held-out "
                f"pairs ({len(scored[1])} scored)",
            ]
        )
    )
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
