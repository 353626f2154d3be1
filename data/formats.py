"""
Data formats: the records the stages read (JSON arrays or JSON lines) and what happens to
records that are valid but unusable. Your own data's formats (Alpaca, ShareGPT, chat
messages, HH, TRL's pairs, scores) are read by extras/own_data.py with the same machinery;
preference pairs by data/preferences.py.

    DataReport                       skipped and truncated records, counted per reason
    read_records(path), field(...)   JSON array or JSON lines; a record's string field

A MALFORMED record (bad JSON, a missing field, a wrong type) is one clear error naming the
file and the record. A VALID record that teaches nothing (no answer, a tie, an exact copy)
is skipped and counted; the stages cut records that are too long for the block size and
count those too (finetune.render_all, preferences.pair_examples).
"""

import json


import nanosft
from data import corpus

# ----------------------------------------------------------------------------------------
# JSON records, read with one clear error per malformed file


def read_records(path):
    """JSON records from a .json array or a JSON-lines file. Returns [(where, record)],
    `where` naming the line (JSONL) or the element (JSON array) for error messages."""
    text = corpus.read_text(path)
    stripped = text.lstrip()
    if not stripped:
        raise nanosft.UserError(f"{path}: empty file, expected JSON records")
    if stripped[0] == "[":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise nanosft.UserError(
                f"{path}:{e.lineno}: invalid JSON ({e.msg}); expected a JSON array of objects"
            )
        except RecursionError:  # json's parser recurses once per nesting level
            raise nanosft.UserError(
                f"{path}: JSON nested too deeply; expected a JSON array of objects"
            )
        if not rows:
            raise nanosft.UserError(f"{path}: empty JSON array, expected records")
        return [(f"{path}: record {i + 1}", r) for i, r in enumerate(rows)]
    out = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{n}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise nanosft.UserError(
                f"{path}:{n}: invalid JSON ({e.msg}); expected one JSON object per line"
            )
        except RecursionError:
            raise nanosft.UserError(
                f"{path}:{n}: JSON nested too deeply; expected one JSON object per line"
            )
    if not out:
        raise nanosft.UserError(f"{path}: no records found")
    return out


def field(rec, key, where, optional=False):
    """A string field of a record, or a clear error naming the record."""
    if not isinstance(rec, dict):
        raise nanosft.UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if key not in rec:
        if optional:
            return ""
        raise nanosft.UserError(f"{where}: missing field '{key}'")
    if not isinstance(rec[key], str):
        raise nanosft.UserError(
            f"{where}: field '{key}' must be a string, got {type(rec[key]).__name__}"
        )
    return rec[key]


# ----------------------------------------------------------------------------------------
# what loading did to unusable records


class DataReport:
    """What loading did to records that are VALID but UNUSABLE as they are: too long for the
    block size, a tie, a duplicate. Real datasets always hold a few; they are skipped or
    truncated, counted per reason and reported, and the run goes on. (A MALFORMED record --
    bad JSON, a missing field, a wrong type -- is still one clear error: the file is wrong.)

        report.skip(n, reason, message)      record n (1-based) left out, for `reason`
        report.truncate(n, reason, message)  record n shortened to fit
        report.lines()                       "skipped 3 of 1,100 records longer than ..."
        report.state()                       the same counts for the stage's JSON

    strict: every skip or truncation is the clear error `message` instead (--strict)."""

    SHOW = 5  # record numbers quoted per reason

    def __init__(self, path, strict=False, unit="records"):
        self.path, self.strict, self.unit = path, strict, unit
        self.total = 0
        self.skipped, self.truncated = {}, {}  # reason -> [record numbers]
        self.needs = []  # per record: the fewest tokens it needs to be kept (for the advice below)

    def skip(self, n, reason, message):
        self._note(self.skipped, n, reason, message)

    def truncate(self, n, reason, message):
        self._note(self.truncated, n, reason, message)

    def _note(self, book, n, reason, message):
        if self.strict:
            raise nanosft.UserError(
                f"{self.path}: record {n}: {message} (without --strict it would be "
                f"{'skipped' if book is self.skipped else 'truncated'} and counted)"
            )
        book.setdefault(reason, []).append(n)

    def n_skipped(self):
        return sum(len(v) for v in self.skipped.values())

    def lines(self):
        def numbers(ns_):
            shown = ", ".join(map(str, ns_[: self.SHOW]))
            return (
                f"({'record' if len(ns_) == 1 else 'records'} {shown}"
                f"{', ...' if len(ns_) > self.SHOW else ''})"
            )

        out = [
            f"skipped {len(v):,} of {self.total:,} {self.unit} {r} {numbers(v)}"
            for r, v in self.skipped.items()
        ]
        out += [
            f"truncated {len(v):,} of {self.total:,} {self.unit}: {r} {numbers(v)}"
            for r, v in self.truncated.items()
        ]
        return out

    def state(self):
        return {
            "file": self.path,
            "unit": self.unit,
            "total": self.total,
            "kept": self.total - self.n_skipped(),
            "skipped": {r: {"count": len(v), "records": v[:100]} for r, v in self.skipped.items()},
            "truncated": {
                r: {"count": len(v), "records": v[:100]} for r, v in self.truncated.items()
            },
        }

    def check(self, block_size=None):
        """More than half the records unusable: not a few bad records but the wrong set-up
        (or the wrong file). Stop and say why instead of training on the remains."""
        if self.total and self.n_skipped() * 2 > self.total:
            worst = max(self.skipped, key=lambda r: len(self.skipped[r]))
            if "longer than" in worst and block_size:
                # the power of two that 90% of the records fit in
                need = (
                    sorted(self.needs)[int(0.9 * (len(self.needs) - 1))]
                    if self.needs
                    else 4 * block_size
                )
                why = (
                    f"the block size is too small for this data: pre-train with --block-size "
                    f"{max(2 * block_size, 1 << (need - 1).bit_length())} "
                    "(90% of the records fit in it) "
                    "and a vocabulary learned from text like it"
                )
            else:
                why = "is it the right file for this stage?"
            raise nanosft.UserError(
                f"{self.path}: {self.n_skipped():,} of {self.total:,} {self.unit} would be "
                f"skipped (most: {worst}); {why}"
            )
