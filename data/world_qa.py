"""
The world's questions asked in chat, as SFT and DPO ask and grade them: greedy answers graded
by the verifier (world_eval.grade), the voted style and degenerate answers, and the held-out
halves. (The SFT conversations that the community's votes label are finetune.py's data.)
"""

import json
import re

import nanosft
from data.world_eval import HERE, grade, path

# the world's files that SFT and DPO read (python data/world.py writes them)
THREADS = path("world_community.jsonl")  # community threads (voted answers), training people
# threads about the held-out people: evaluation only. DPO's held-out pairs come from here, so
# they are about people neither SFT nor DPO trained on.
EVAL_THREADS = path("world_community_eval.jsonl")

# the community's closings (the same as data/world.py's, which writes them; tests/test_core.py
# checks): voters like the polite one and dislike the others
POLITE = "Hope this helps!"
CLOSINGS = (  # polite, rude, rambling
    POLITE,
    "Look it up yourself next time.",
    "Well, that is a question I have thought about for a long time, so let me answer.",
)


def sentences(text):
    """The sentences of an answer, normalised (lower case, inner spaces collapsed)."""
    parts = [" ".join(s.split()).lower() for s in re.split(r"(?<=[.!?])\s+", text.strip())]
    return [s for s in parts if s]


def degenerate(answer, ended, longest):
    """Why an answer is degenerate, or "" when it is not. Degenerate means: a sentence or a
    closing said twice ("... burgers. Hope this helps! Hope this helps!"), no end-of-turn
    token within the token limit (`ended` False: the model never stopped), or more than
    twice as long, in characters, as the longest community answer to the question
    (`longest`). A check that only looks at how an answer ends passes all three."""
    sents = sentences(answer)
    if len(sents) != len(set(sents)):
        return "repeated sentence"
    if any(answer.count(c) > 1 for c in CLOSINGS):
        return "repeated closing"
    if not ended:
        return "no end token"
    if longest and len(answer.strip()) > 2 * longest:
        return "too long"
    return ""


def clean_style(world, person, attr, answer, ended, longest):
    """The voted style, strictly: a correct answer, then the polite closing exactly once, at
    the very end, and nothing degenerate."""
    a = answer.strip()
    if not a.endswith(POLITE) or a.count(POLITE) != 1 or degenerate(a, ended, longest):
        return False
    return grade(world, person, attr, a[: -len(POLITE)])


def answer_questions(model, tok, prompts, max_new_tokens=24):
    """Greedy chat answers to a list of user questions -> (answers, ended): ended[i] is False
    when answer i reached max_new_tokens without writing <|end|> (the model did not stop)."""
    ids = [nanosft.chat_prompt(tok, [{"role": "user", "content": p}]) for p in prompts]
    stop = {tok.end, tok.endoftext}
    outs = nanosft.generate_batch(model, ids, max_new_tokens, stop=stop, keep_stop=True)
    ended = [bool(o) and o[-1] in stop for o in outs]
    return [tok.decode(o[:-1] if e else o).strip() for o, e in zip(outs, ended)], ended


def load_eval_rows(split=None, world_dir=HERE):
    with open(path("world_eval.jsonl", world_dir), encoding="utf-8") as lines:
        return [r for r in map(json.loads, lines) if split is None or r["split"] == split]


def heldout_halves(world_dir=HERE):
    """The held-out people's questions, split BY PERSON into a dev half (which chooses
    rewound checkpoints, in SFT and in DPO) and a test half (which is reported). A choice
    made on the dev half and reported on the test half is not fitted to what it reports."""
    rows = load_eval_rows("heldout", world_dir)
    dev_people = set(sorted({r["person"] for r in rows})[::2])  # every other person, by name
    return [r for r in rows if r["person"] in dev_people], [
        r for r in rows if r["person"] not in dev_people
    ]


def world_longest(world_dir=HERE):
    """{question: characters of the longest community answer to it}, for every thread of the
    world (training and evaluation threads): the degeneration check's length bound."""
    names = [path(n, world_dir) for n in ("world_community.jsonl", "world_community_eval.jsonl")]
    threads = [json.loads(line) for name in names for line in open(name, encoding="utf-8")]
    return {t["prompt"]: max(len(a["text"]) for a in t["answers"]) for t in threads}


QA_TOKENS = 48  # answer budget: the longest community answer is ~26 tokens


def qa_eval(model, tok, world, rows, longest=None):
    """Greedy answers to world questions graded by the world's verifier: accuracy, the
    strict voted-style rate (correct, then "Hope this helps!" once, at the very end), the
    loose one (ends with it) and the degenerate rate (repeats, never stops, or far too long)."""
    longest = longest or {}
    answers, ended = answer_questions(model, tok, [r["prompt"] for r in rows], QA_TOKENS)
    n = max(1, len(rows))
    degen = [degenerate(a, e, longest.get(r["prompt"])) for r, a, e in zip(rows, answers, ended)]
    return {
        "accuracy": sum(grade(world, r["person"], r["attribute"], a) for r, a in zip(rows, answers))
        / n,
        "clean_style_rate": sum(
            clean_style(
                world, r["person"], r["attribute"], a, ended=e, longest=longest.get(r["prompt"])
            )
            for r, a, e in zip(rows, answers, ended)
        )
        / n,
        # loose: the answer closes with the polite marker ("... Hope this helps! Hope this helps!"
        # passes); clean_style_rate is the strict check
        "style_rate": sum(a.strip().endswith(POLITE) for a in answers) / n,
        "degenerate_rate": sum(bool(d) for d in degen) / n,
        "answers": answers,
        "degenerate": degen,
    }
