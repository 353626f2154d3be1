"""
The world's evaluation, next to its verifier (world.py): the knowledge probe, graded
question answering, the held-out halves, and the paths of the world's files.

Every stage evaluates on the world the same way, so the numbers of pretrain.py, finetune.py,
dpo.py and experiments.py are comparable: greedy answers, graded by `world.grade`,
`world.clean_style` and `world.degenerate`.
"""
import json
import os

import nanosft as ns
from data import world as W

HERE = os.path.dirname(os.path.abspath(__file__))


def path(name):
    return os.path.join(HERE, name)


# the world's files (python data/world.py writes them)
CORPUS = path("world_corpus.txt")             # pre-training prose: biographies and filler
SFT = path("world_sft.jsonl")                 # gold question-answer pairs about training people
THREADS = path("world_community.jsonl")       # community threads (voted answers), training people
# threads about the held-out people: evaluation only. DPO's held-out pairs come from here, so
# they are about people neither SFT nor DPO trained on.
EVAL_THREADS = path("world_community_eval.jsonl")


def is_default(file, name):
    """Is `file` the world's file `name` (so the world's own evaluation applies)?"""
    return file is not None and os.path.abspath(file) == os.path.abspath(name)


def load_world():
    """(the verifier module, the world's facts): what every grading function below takes."""
    with open(path("world.json"), encoding="utf-8") as f:
        return W, json.load(f)


def knowledge_probe(model, tok, world, people=None):
    """Complete '<name> was born in' (one prompt per person and attribute) greedily and
    grade the next few words with the world's verifier. Measures what pre-training stored."""
    W, facts = world
    rows = [(p["name"], a) for p in facts["people"] if people is None or p["name"] in people
            for a in facts["attributes"]]
    prompts = [[tok.endoftext] + tok.encode(W.PROBE[a].format(n=n)) for n, a in rows]
    outs = ns.generate_batch(model, prompts, 4, stop={tok.endoftext})
    hits = [W.grade(facts, n, a, tok.decode(o).split(".")[0]) for (n, a), o in zip(rows, outs)]
    return sum(hits) / len(hits)


def answer_questions(model, tok, prompts, max_new_tokens=24):
    """Greedy chat answers to a list of user questions -> (answers, ended): ended[i] is False
    when answer i reached max_new_tokens without writing <|end|> (the model did not stop)."""
    ids = [ns.chat_prompt(tok, [{"role": "user", "content": p}]) for p in prompts]
    stop = {tok.end, tok.endoftext}
    outs = ns.generate_batch(model, ids, max_new_tokens, stop=stop, keep_stop=True)
    ended = [bool(o) and o[-1] in stop for o in outs]
    return [tok.decode(o[:-1] if e else o).strip() for o, e in zip(outs, ended)], ended


def load_eval_rows(split=None):
    rows = [json.loads(line) for line in open(path("world_eval.jsonl"), encoding="utf-8")]
    return [r for r in rows if split is None or r["split"] == split]


def heldout_halves():
    """The held-out people's questions, split BY PERSON into a dev half (which chooses
    rewound checkpoints, in SFT and in DPO) and a test half (which is reported). A choice
    made on the dev half and reported on the test half is not fitted to what it reports."""
    rows = load_eval_rows("heldout")
    people = sorted({r["person"] for r in rows})
    dev_people = set(people[::2])
    return [r for r in rows if r["person"] in dev_people], [r for r in rows if r["person"] not in dev_people]


def world_longest():
    """{question: characters of the longest community answer to it}, for every thread of the
    world (training and evaluation threads): the degeneration check's length bound."""
    threads = [json.loads(line) for name in (THREADS, EVAL_THREADS) for line in open(name, encoding="utf-8")]
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
    return {"accuracy": sum(W.grade(facts, r["person"], r["attribute"], a) for r, a in zip(rows, answers)) / n,
            "clean_style_rate": sum(W.clean_style(facts, r["person"], r["attribute"], a, e, longest.get(r["prompt"]))
                                    for r, a, e in zip(rows, answers, ended)) / n,
            "style_rate": sum(W.is_polite(facts, a) for a in answers) / n,
            "degenerate_rate": sum(bool(d) for d in degen) / n,
            "answers": answers, "degenerate": degen}


def task_accuracy(model, tok, rows):
    """List tasks (copy / reverse / count): exact match."""
    answers, _ = answer_questions(model, tok, [r["prompt"] for r in rows])
    return sum(a.strip() == r["answer"] for r, a in zip(rows, answers)) / max(1, len(rows))


def chance(world):
    """Accuracy of guessing uniformly among an attribute's values, averaged over attributes."""
    W, facts = world
    return sum(1 / len(W.VALUES[a]) for a in facts["attributes"]) / len(facts["attributes"])
