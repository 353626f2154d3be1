"""
The world's files and its verifier: what every stage's evaluation of the world starts from.
Pre-training measures the knowledge probe with these; SFT and DPO ask questions in chat
(world_qa.py) and grade the answers with `grade`, so every stage's numbers are comparable.
"""

import json
import os

import nanosft

HERE = os.path.dirname(os.path.abspath(__file__))


def path(name, world_dir=HERE):
    """The world file `name` of a world directory (data/, or one `python data/world.py
    --out-dir DIR` wrote)."""
    return os.path.join(world_dir, name)


# the world's files (python data/world.py writes them)
CORPUS = path("world_corpus.txt")  # pre-training prose: biographies and filler


def is_default(file, name):
    """Is `file` the world's file `name` (so the world's own evaluation applies)?"""
    return file is not None and os.path.abspath(file) == os.path.abspath(name)


def load_world(world_dir=HERE):
    """The world's facts (world.json): its people, attributes and their values, who is held
    out. Every grading function takes them."""
    with open(path("world.json", world_dir), encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------
# the verifier: an answer is graded against the world's facts


def grade(world, person, attr, answer):
    """True when the answer names the person's true value and no other value of that
    attribute (so listing every city is not a correct answer)."""
    truth = next(
        p[attr] for p in world["people"] + world.get("other_people", []) if p["name"] == person
    )
    words = {w.strip(".,!?;:'\"").lower() for w in answer.replace("'s", " ").split()}
    return words & {v.lower() for v in world["values"][attr]} == {truth.lower()}


# the knowledge probe's prompts: the first paraphrase of each fact (data/world.py TEMPLATES),
# cut before its value
PROBE = {
    "city": "{n} was born in",
    "job": "{n} works as",
    "food": "{n}'s favourite food is",
    "pet": "{n} has a pet",
    "hobby": "{n}'s hobby is",
}
PROBE_PEOPLE = 200  # the probe asks about at most this many people: all of the default world's


def probe_people(world, n=PROBE_PEOPLE):
    """The people the knowledge probe asks about: everyone in a world of up to n people; in
    a larger one (data/world.py --people) the held-out people and the first training people,
    n in all, so that a probe, run at every evaluation, costs the same in every world."""
    heldout = set(world["heldout"])
    train = [p["name"] for p in world["people"] if p["name"] not in heldout]
    return heldout | set(train[: max(0, n - len(heldout))])


def knowledge_probe(model, tok, world, people=None, attributes=None):
    """Complete '<name> was born in' (one prompt per person and attribute) greedily and
    grade the next few words with the world's verifier. Measures what pre-training stored.
    people, attributes: whom and what to ask about (default: probe_people, every attribute)."""
    people = probe_people(world) if people is None else people
    rows = [
        (p["name"], a)
        for p in world["people"]
        if p["name"] in people
        for a in attributes or world["attributes"]
    ]
    prompts = [[tok.endoftext] + tok.encode(PROBE[a].format(n=n)) for n, a in rows]
    outs = nanosft.generate_batch(model, prompts, 4, stop={tok.endoftext})
    hits = [grade(world, n, a, tok.decode(o).split(".")[0]) for (n, a), o in zip(rows, outs)]
    return sum(hits) / len(hits)
