"""
The world's evaluation, next to its verifier (world.py): the knowledge probe, graded
question answering, the held-out halves, and the paths of the world's files.

Every stage evaluates on the world the same way, so the numbers of pretrain.py, finetune.py,
dpo.py and experiments.py are comparable: greedy answers, graded by `world.grade`,
`world.clean_style` and `world.degenerate`.
"""

import json
import os
import random

import nanosft
from data import formats
from data import world as W

HERE = os.path.dirname(os.path.abspath(__file__))


def path(name, world_dir=HERE):
    """The world file `name` of a world directory (data/, or one `python data/world.py
    --out-dir DIR` wrote)."""
    return os.path.join(world_dir, name)


# the world's files (python data/world.py writes them)
CORPUS = path("world_corpus.txt")  # pre-training prose: biographies and filler
SFT = path("world_sft.jsonl")  # gold question-answer pairs about training people
THREADS = path("world_community.jsonl")  # community threads (voted answers), training people
# threads about the held-out people: evaluation only. DPO's held-out pairs come from here, so
# they are about people neither SFT nor DPO trained on.
EVAL_THREADS = path("world_community_eval.jsonl")


def is_default(file, name):
    """Is `file` the world's file `name` (so the world's own evaluation applies)?"""
    return file is not None and os.path.abspath(file) == os.path.abspath(name)


def check_world_dir(world_dir):
    """One clear error for a directory that holds no world, before anything is written."""
    if not os.path.isfile(path("world.json", world_dir)):
        raise nanosft.UserError(
            f"--world {world_dir}: no world.json there; write a world with "
            f"python data/world.py --out-dir {world_dir}"
        )
    return world_dir


def load_world(world_dir=HERE):
    """(the verifier module, the world's facts): what every grading function below takes."""
    with open(path("world.json", world_dir), encoding="utf-8") as f:
        return W, json.load(f)


PROBE_PEOPLE = 200  # the probe asks about at most this many people: all of the default world's


def probe_people(facts, n=PROBE_PEOPLE):
    """The people the knowledge probe asks about: everyone in a world of up to n people; in
    a larger one (data/world.py --people) the held-out people and the first training people,
    n in all, so that a probe, run at every evaluation, costs the same in every world."""
    heldout = set(facts["heldout"])
    train = [p["name"] for p in facts["people"] if p["name"] not in heldout]
    return heldout | set(train[: max(0, n - len(heldout))])


def knowledge_probe(model, tok, world, people=None, attributes=None):
    """Complete '<name> was born in' (one prompt per person and attribute) greedily and
    grade the next few words with the world's verifier. Measures what pre-training stored.
    people, attributes: whom and what to ask about (default: probe_people, every attribute)."""
    W, facts = world
    people = probe_people(facts) if people is None else people
    rows = [
        (p["name"], a)
        for p in facts["people"]
        if p["name"] in people
        for a in attributes or facts["attributes"]
    ]
    prompts = [[tok.endoftext] + tok.encode(W.PROBE[a].format(n=n)) for n, a in rows]
    outs = nanosft.generate_batch(model, prompts, 4, stop={tok.endoftext})
    hits = [W.grade(facts, n, a, tok.decode(o).split(".")[0]) for (n, a), o in zip(rows, outs)]
    return sum(hits) / len(hits)


def answer_questions(model, tok, prompts, max_new_tokens=24):
    """Greedy chat answers to a list of user questions -> (answers, ended): ended[i] is False
    when answer i reached max_new_tokens without writing <|end|> (the model did not stop)."""
    ids = [nanosft.chat_prompt(tok, [{"role": "user", "content": p}]) for p in prompts]
    stop = {tok.end, tok.endoftext}
    outs = nanosft.generate_batch(model, ids, max_new_tokens, stop=stop, keep_stop=True)
    ended = [bool(o) and o[-1] in stop for o in outs]
    return [tok.decode(o[:-1] if e else o).strip() for o, e in zip(outs, ended)], ended


def load_eval_rows(split=None, world_dir=HERE):
    rows = [
        json.loads(line) for line in open(path("world_eval.jsonl", world_dir), encoding="utf-8")
    ]
    return [r for r in rows if split is None or r["split"] == split]


def heldout_halves(world_dir=HERE):
    """The held-out people's questions, split BY PERSON into a dev half (which chooses
    rewound checkpoints, in SFT and in DPO) and a test half (which is reported). A choice
    made on the dev half and reported on the test half is not fitted to what it reports."""
    rows = load_eval_rows("heldout", world_dir)
    people = sorted({r["person"] for r in rows})
    dev_people = set(people[::2])
    return [r for r in rows if r["person"] in dev_people], [
        r for r in rows if r["person"] not in dev_people
    ]


def world_longest(world_dir=HERE):
    """{question: characters of the longest community answer to it}, for every thread of the
    world (training and evaluation threads): the degeneration check's length bound."""
    names = [path(n, world_dir) for n in ("world_community.jsonl", "world_community_eval.jsonl")]
    threads = [json.loads(line) for name in names for line in open(name, encoding="utf-8")]
    return W.longest_answers(threads)


QA_TOKENS = 48  # answer budget: the longest community answer is ~26 tokens


def qa_eval(model, tok, world, rows, longest=None):
    """Greedy answers to world questions graded by the world's verifier: accuracy, the
    strict voted-style rate (correct, then "Hope this helps!" once, at the very end), the
    loose one (ends with it) and the degenerate rate (repeats, never stops, or far too long)."""
    W, facts = world
    longest = longest or {}
    answers, ended = answer_questions(model, tok, [r["prompt"] for r in rows], QA_TOKENS)
    n = max(1, len(rows))
    degen = [W.degenerate(a, e, longest.get(r["prompt"])) for r, a, e in zip(rows, answers, ended)]
    return {
        "accuracy": sum(
            W.grade(facts, r["person"], r["attribute"], a) for r, a in zip(rows, answers)
        )
        / n,
        "clean_style_rate": sum(
            W.clean_style(
                facts, r["person"], r["attribute"], a, ended=e, longest=longest.get(r["prompt"])
            )
            for r, a, e in zip(rows, answers, ended)
        )
        / n,
        "style_rate": sum(W.is_polite(facts, a) for a in answers) / n,
        "degenerate_rate": sum(bool(d) for d in degen) / n,
        "answers": answers,
        "degenerate": degen,
    }


def sft_attributes(spec):
    """--sft-attributes "city,job,food" -> ["city", "job", "food"] (the world's order): the
    attributes whose questions SFT trains on; the others are asked only in evaluation, a
    question type SFT never showed (cross-domain). None: every attribute."""
    names = W.ATTRS if spec is None else [a.strip() for a in spec.split(",") if a.strip()]
    unknown = [a for a in names if a not in W.ATTRS]
    if unknown or not names:
        raise nanosft.UserError(
            f"--sft-attributes {spec}: unknown attribute {', '.join(unknown) or '(none named)'}; "
            f"the world's attributes are {','.join(W.ATTRS)}"
        )
    return [a for a in W.ATTRS if a in names]


def by_domain(rows, attributes):
    """(in-domain rows, cross-domain rows) of world questions: those about an attribute SFT
    asked about (`attributes`), and the rest. Together they are `rows`."""
    return [r for r in rows if r["attribute"] in attributes], [
        r for r in rows if r["attribute"] not in attributes
    ]


def domain_accuracy(world, rows, answers, attributes):
    """(in-domain, cross-domain) accuracy of the answers to `rows` (split by by_domain), graded
    by the world's verifier; None for a side without rows."""
    W, facts = world
    said = {id(r): a for r, a in zip(rows, answers)}
    return tuple(
        sum(W.grade(facts, r["person"], r["attribute"], said[id(r)]) for r in part) / len(part)
        if part
        else None
        for part in by_domain(rows, attributes)
    )


def task_accuracy(model, tok, rows):
    """List tasks (copy / reverse / count): exact match."""
    answers, _ = answer_questions(model, tok, [r["prompt"] for r in rows])
    return sum(a.strip() == r["answer"] for r, a in zip(rows, answers)) / max(1, len(rows))


def chance(world, attributes=None):
    """Accuracy of guessing uniformly among an attribute's values, averaged over `attributes`
    (all)."""
    W, facts = world
    attributes = attributes or facts["attributes"]
    return sum(1 / len(facts["values"][a]) for a in attributes) / len(attributes)


def top_voted(answers):
    """A community thread's best answer by net votes (up - down), the first of a tie."""
    return max(answers, key=lambda a: a["up"] - a["down"])["text"]


def world_conversations(labels, seed, world_dir=HERE, attributes=None):
    """The world's instruction set. Questions about training people come from the community
    threads, answered by the gold fact sentence, the best net-voted answer (up - down), or a
    random community answer; the list tasks (copy/reverse/count) always use their gold answer.
    attributes (--sft-attributes; None: all): only the questions about these are kept, so
    the other attributes' questions stay unseen question types (cross-domain evaluation)."""
    gold = formats.read_records(path("world_sft.jsonl", world_dir))
    threads = {
        r["prompt"]: r for _, r in formats.read_records(path("world_community.jsonl", world_dir))
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


def load_records(data, labels, seed, strict, world_dir=HERE, attributes=None):
    """finetune.py's records: ([(record number, conversation)], its DataReport) of the file
    `data` (any format extras/own_data.py reads) or, without one, the world's questions."""
    report = formats.DataReport(data or path("world_sft.jsonl", world_dir), strict)
    if data:  # your own file: its formats are extras/own_data.py's
        from extras import own_data

        return own_data.load_instructions(data, report), report
    records = list(
        enumerate(world_conversations(labels, seed, world_dir=world_dir, attributes=attributes), 1)
    )
    report.total = len(records)
    return records, report
