"""
The embedded default data: a small synthetic world of people and facts.

Why synthetic: every claim of the pipeline must be measurable offline. We know every fact,
so we can ask the model about people whose facts it saw *only* in pre-training prose and
grade its answers exactly.

    python data/world.py            # (re)writes the files below, deterministic under --seed
    python data/world.py --out-dir out/world_hard --people 2000
                                    # a larger world of the same shape, elsewhere (experiments.py scale)

writes, next to this script:
    world.json              the facts: people, attributes, which people are held out
    world_corpus.txt        pre-training prose: biographies (several paraphrases per fact,
                            shuffled sentence order) mixed with general filler sentences
    world_sft.jsonl         gold instruction pairs {"prompt","response"} about TRAINING people
                            (--list-tasks: plus copy / reverse / count tasks, which no default
                            run learns: docs/known_gaps.md)
    world_community.jsonl   community threads about TRAINING people: one question, several
                            answers of varied quality, each with simulated up/down votes; the
                            SFT labels and DPO pairs come from these votes
    world_community_eval.jsonl  the same kind of threads about the HELD-OUT people, for
                            evaluation only: preference accuracy on people that neither SFT nor
                            DPO ever trained on, and the "longest community answer" that the
                            degeneration check compares an answer's length with
    world_eval.jsonl        evaluation questions: held-out people, training people (list tasks)

Held-out people never appear in world_sft.jsonl or world_community.jsonl: their facts are
stated only in the corpus (and asked about only in the evaluation files).
"""

import argparse
import json
import os
import random

FIRST = """Ada Alan Bruno Carla Dario Elena Felix Greta Hugo Irene Jonas Kira Leon Maya Nora Omar
Paula Quinn Rosa Simon Tara Ugo Vera Walter Xenia Yusuf Zora Anton Bianca Cyril Dora Emil Flora Gustav
Hana Igor Julia Karl Lina Marco Nadia Oscar Petra Rafael Sofia Tomas Ursula Viktor Wanda Yara Agnes
Boris Celia Dmitri Edith Fabio Gloria Henrik Ines Jasper Klara Lukas Mira Nils Olga Pablo Rita Stefan
Tilda Umar Valentin Wilma Abel Beatrix Caspar Delia Elias Fiona Gideon Helga Ivan Jolene Kasimir Leona
Matteo Nina Otto Pia Ruben Selma Theo Una Vincent Xavier Yvonne Zeno Alma Bastian Cora Dante Esther
Frida Gregor Hedda Isak Juno Kurt Lotte Milo Nell Orson Philippa Quentin Ronja Silas Thea Ulrich Vivian
Wendel Astrid Benedikt Carmen Damian Eliza Ferdinand Gemma Harald Ilse Joaquin Katja Lorenzo Magda
Nestor Ottilie Piet Rasmus Saskia Tobias Ulla Vasco Wolfgang Aurora Bernard Clementine Desmond Elvira
Florian Greer Horatio Imogen Jules Kalle Linnea Magnus Noemi Octavia Penelope Reinhold Sigrid Thaddeus
Valeria Winifred Albrecht Brigitta Cosimo Dagmar Eamon Freya Gaspard Henrietta Ingrid Jovan Kaspar
Liesel Maximilian Nanette Orla Percival Rosalind Severin Tamsin Vilma Ambrose Blanche Conrad Dorothea
Evander Fenna Godfrey Hermione Isolde Jerome Kunigunde Leopold Mathilde Norbert Oda Prosper Romilly
Sebastian""".split()
LAST = (
    "Stone Rivers Novak Berg Costa Weber Silva Moreau Fischer Larsen Rossi Kowalski "
    "Petrov Lindqvist Ortega Tanaka Murphy Schmidt Dubois Horvat Jensen Keller Marin "
    "Nagy Olsen"
).split()

VALUES = {
    "city": "Lisbon Oslo Cairo Lima Dublin Vienna Kyoto Austin Nairobi Quito Prague Havana "
    "Seoul Perth Madrid Boston Denver Milan Zurich Hanoi".split(),
    "job": "baker pilot nurse lawyer farmer painter teacher chemist dentist plumber sailor "
    "tailor architect journalist librarian carpenter surgeon musician engineer "
    "gardener".split(),
    "food": "pizza sushi curry tacos pasta soup dumplings pancakes salad noodles paella "
    "falafel burgers risotto kebab".split(),
    "pet": "cat dog parrot rabbit hamster turtle goldfish horse lizard ferret snake goat".split(),
    "hobby": "chess tennis hiking knitting cycling fishing dancing swimming archery pottery "
    "surfing juggling rowing skiing origami".split(),
}
ATTRS = list(VALUES)


def article(word):
    return "an" if word[0] in "aeiou" else "a"


# Prose paraphrases of each fact. The FIRST one is also the gold answer sentence and the
# knowledge probe ("<name> was born in" -> next words: data/world_eval.py PROBE).
TEMPLATES = {
    "city": [
        "{n} was born in {v}.",
        "The birthplace of {n} is {v}.",
        "{n} grew up in {v}.",
        "{v} is the city where {n} was born.",
        "{n} comes from {v}.",
    ],
    "job": [
        "{n} works as {a} {v}.",
        "{n} is {a} {v} by trade.",
        "By profession, {n} is {a} {v}.",
        "{n} earns a living as {a} {v}.",
        "Everyone knows {n} as {a} {v}.",
    ],
    "food": [
        "{n}'s favourite food is {v}.",
        "{n} loves to eat {v}.",
        "The favourite dish of {n} is {v}.",
        "{n} would eat {v} every day.",
        "Above all, {n} likes {v}.",
    ],
    "pet": [
        "{n} has a pet {v}.",
        "{n} lives with a {v}.",
        "The pet of {n} is a {v}.",
        "{n} takes care of a {v} at home.",
        "{n} owns a {v}.",
    ],
    "hobby": [
        "{n}'s hobby is {v}.",
        "In free time, {n} enjoys {v}.",
        "{n} spends weekends on {v}.",
        "{n} is passionate about {v}.",
        "The hobby of {n} is {v}.",
    ],
}
QUESTIONS = {
    "city": ["Where was {n} born?", "In which city was {n} born?"],
    "job": ["What does {n} do for a living?", "What is {n}'s job?"],
    "food": ["What is {n}'s favourite food?", "Which food does {n} like best?"],
    "pet": ["What pet does {n} have?", "Which animal does {n} keep as a pet?"],
    "hobby": ["What is {n}'s hobby?", "What does {n} do for fun?"],
}
# Two cross-domain tests of the scale experiment (`--other-people`, `--other-phrasings`; never
# in the default world): the same questions about a second population whose facts the corpus
# states only as terse records ("another hospital"), and the held-out people asked in words
# that SFT never used but the prose does ("another way of asking").
OTHER_FIRST = """Aiko Bjorn Chidi Dagny Emeka Fumiko Gunnhild Haruki Ikenna Jin Kofi Leila Mirza
Nkemdirim Obinna Priya Quan Rania Sanjay Tariq Uzma Vikram Wanjiru Xiu Yaw Zainab Arjun Bongani
Chioma Esra Farid Goran Halima Imani Jorge Kwame Lupita Mateus Nkechi Ogechi""".split()
OTHER_LAST = (
    "Okafor Haddad Mensah Reyes Nakamura Adeyemi Mbeki Castillo Yilmaz Sato Abara Duarte "
    "Rahman Volkov Ito Banda Quispe Osei Farouk Takahashi"
).split()
RECORD = {
    "city": "Born",
    "job": "Job",
    "food": "Food",
    "pet": "Pet",
    "hobby": "Hobby",
}  # field names
OTHER_QUESTIONS = {  # the prose's words (TEMPLATES), never an SFT question's
    "city": "What is the birthplace of {n}?",
    "job": "What is {n}'s profession?",
    "food": "What is the favourite dish of {n}?",
    "pet": "What is the pet of {n}?",
    "hobby": "What is the hobby of {n}?",
}
FILLER = [
    "The train to {city} leaves early in the morning.",
    "A good {job} needs patience.",
    "Many people enjoy {food} on a cold evening.",
    "A {pet} can be a loyal friend.",
    "Some say {hobby} is good for the mind.",
    "The market in {city} sells fresh {food}.",
    "It rained all week in {city}.",
    "Learning {hobby} takes years of practice.",
    "The old {job} retired last spring.",
    "Children often ask for a {pet}.",
    # the community's closings, written inside running text as they appear at the end
    # of an answer (" Hope" after a full stop is not the token "Hope" after a quote):
    # pre-training must have seen the tokens SFT and DPO later ask the model to write
    "The {job} posted a recipe for {food}. Hope this helps!",
    "Someone asked the way to {city}. Look it up yourself next time.",
    "The {job} was asked about {hobby}. Well, that is a question I have thought about "
    "for a long time, so let me answer.",
]

# The community's style markers. The simulated voters like the polite closing, dislike
# the rude one and rambling, and above all dislike wrong facts.
POLITE = "Hope this helps!"
RUDE = "Look it up yourself next time."
RAMBLE = "Well, that is a question I have thought about for a long time, so let me answer."


def gold_sentence(name, attr, value):
    return TEMPLATES[attr][0].format(n=name, v=value, a=article(value))


def build_world(seed=1337, n_people=200, n_heldout=50):
    """The facts. Deterministic under `seed`."""
    rng = random.Random(seed)
    # Every person has a distinct first name (and a shared family name): recall can key on
    # one token. With first names shared too, a model of this size must learn a two-token
    # conjunction per fact and memorises far more slowly.
    firsts = list(FIRST)
    rng.shuffle(firsts)
    names = [f"{f} {rng.choice(LAST)}" for f in firsts]
    if n_people > len(names):  # a larger world (--people): every name a distinct (first, last)
        # pair, so recall keys on two tokens for everyone alike, held-out people included
        names = [f"{f} {l}" for f, l in rng.sample([(f, l) for f in FIRST for l in LAST], n_people)]
    people = [{"name": n, **{a: rng.choice(VALUES[a]) for a in ATTRS}} for n in names[:n_people]]
    return {
        "seed": seed,
        "attributes": ATTRS,
        "values": VALUES,
        "people": people,
        "heldout": [p["name"] for p in people[-n_heldout:]],
        "polite_marker": POLITE,
        "rude_marker": RUDE,
    }


def make_corpus(world, rng, n_bios=20, filler_frac=0.1):
    """Pre-training prose: each person gets n_bios short biographies; in each, every fact is
    stated by one of its paraphrases (each paraphrase used once across the biographies) and
    the sentences are shuffled."""
    docs = []
    for p in world["people"]:
        # each fact is stated once in every paraphrase, spread over the person's biographies
        order = {a: rng.sample(range(len(TEMPLATES[a])), len(TEMPLATES[a])) for a in ATTRS}
        for b in range(n_bios):
            sents = [
                TEMPLATES[a][order[a][b % len(order[a])]].format(
                    n=p["name"], v=p[a], a=article(p[a])
                )
                for a in ATTRS
            ]
            rng.shuffle(sents)
            docs.append(" ".join(sents))
    n_filler = int(len(docs) * filler_frac / (1 - filler_frac))
    for _ in range(n_filler):
        k = rng.randint(2, 4)
        docs.append(
            " ".join(
                rng.choice(FILLER).format(**{a: rng.choice(VALUES[a]) for a in ATTRS})
                for _ in range(k)
            )
        )
    rng.shuffle(docs)
    return "\n\n".join(docs) + "\n"


def list_task(rng):
    """A question that needs no world knowledge: copy, reverse or count a short list."""
    items = [rng.choice(VALUES[rng.choice(ATTRS)]) for _ in range(rng.randint(2, 5))]
    kind = rng.choice(["copy", "reverse", "count"])
    if kind == "copy":
        return {
            "prompt": "Repeat this list: " + ", ".join(items),
            "response": ", ".join(items) + ".",
        }
    if kind == "reverse":
        return {
            "prompt": "Reverse this list: " + ", ".join(items),
            "response": ", ".join(items[::-1]) + ".",
        }
    return {
        "prompt": "How many items are in this list: " + ", ".join(items) + "?",
        "response": f"There are {len(items)} items.",
    }


def community_thread(rng, name, attr, value):
    """Answers of varied quality to one question, with votes from a simulated community.

    Each voter up-votes an answer with probability q and down-votes it otherwise, where q
    reflects the community's taste: correct > wrong, polite closing liked, rudeness and
    rambling disliked, curt answers a little less liked than complete ones."""
    gold = gold_sentence(name, attr, value)
    wrong_v = rng.choice([v for v in VALUES[attr] if v != value])
    wrong = gold_sentence(name, attr, wrong_v)
    pool = [("helpful", gold)]
    if rng.random() < 0.3:
        pool.append(("polite", f"{gold} {POLITE}"))
    if rng.random() < 0.6:
        pool.append(("curt", f"{value[0].upper()}{value[1:]}."))
    if rng.random() < 0.4:
        pool.append(("rude", f"{gold} {RUDE}"))
    if rng.random() < 0.4:
        pool.append(("rambling", f"{RAMBLE} {gold}"))
    pool.append(("wrong", wrong))
    if rng.random() < 0.5:
        pool.append(("wrong-curt", f"{wrong_v[0].upper()}{wrong_v[1:]}."))
    taste = {
        "helpful": 0.75,
        "polite": 0.9,
        "curt": 0.6,
        "rude": 0.35,
        "rambling": 0.5,
        "wrong": 0.15,
        "wrong-curt": 0.1,
    }
    answers = []
    for style, text in pool:  # the style names only pick the voters' taste; they are not stored
        n_voters = rng.randint(15, 40)
        up = sum(rng.random() < taste[style] for _ in range(n_voters))
        answers.append({"text": text, "up": up, "down": n_voters - up})
    rng.shuffle(answers)
    return answers


def build_files(
    seed=1337, n_people=200, n_heldout=50, list_tasks=False, other_people=0, other_phrasings=False
):
    """Everything the default pipeline reads, as {filename: text}; --people and --heldout make
    a larger world (more facts to store) of the same shape. other_people, other_phrasings: the
    scale experiment's cross-domain tests (cross_domain below); without them nothing changes."""
    world = build_world(seed, n_people, n_heldout)
    rng = random.Random(seed + 1)
    heldout = set(world["heldout"])
    train_people = [p for p in world["people"] if p["name"] not in heldout]
    sft, community, evals = [], [], []
    for p in train_people:
        for a in ATTRS:
            for q in QUESTIONS[a]:
                prompt = q.format(n=p["name"])
                sft.append({"prompt": prompt, "response": gold_sentence(p["name"], a, p[a])})
                # Every thread of a training person is a training thread. (Held out by row, a
                # thread shares its person, and the other phrasing of its question, with the
                # training threads; held-out preference pairs come from held-out PEOPLE, below.)
                # The draw stays so the seeded stream, and so every other file, is unchanged.
                rng.random()
                community.append(
                    {
                        "prompt": prompt,
                        "person": p["name"],
                        "attribute": a,
                        "split": "train",
                        "answers": community_thread(rng, p["name"], a, p[a]),
                    }
                )
    tasks = [
        list_task(rng) for _ in range(300)
    ]  # drawn either way: every other record stays the same
    sft += tasks
    rng.shuffle(sft)
    if not list_tasks:
        sft = [r for r in sft if not any(r is t for t in tasks)]
    for p in world["people"]:  # both phrasings of every question: 10 per person
        split = "heldout" if p["name"] in heldout else "train"
        for a in ATTRS:
            for q in QUESTIONS[a]:
                evals.append(
                    {
                        "split": split,
                        "person": p["name"],
                        "attribute": a,
                        "prompt": q.format(n=p["name"]),
                    }
                )
    for _ in range(100):
        t = list_task(rng)
        if list_tasks:
            evals.append({"split": "tasks", "prompt": t["prompt"], "answer": t["response"]})
    # threads about the held-out people, from a stream of their own (the files above stay as
    # they were): evaluation only, never read by a training stage
    rng_eval = random.Random(seed + 2)
    community_eval = [
        {
            "prompt": q.format(n=p["name"]),
            "person": p["name"],
            "attribute": a,
            "split": "heldout",
            "answers": community_thread(rng_eval, p["name"], a, p[a]),
        }
        for p in world["people"]
        if p["name"] in heldout
        for a in ATTRS
        for q in QUESTIONS[a]
    ]
    jsonl = lambda rows: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    corpus = make_corpus(world, rng)
    if other_people or other_phrasings:
        corpus = cross_domain(
            world, corpus, evals, seed, other_people=other_people, other_phrasings=other_phrasings
        )
    return {
        "world.json": json.dumps(world, indent=1) + "\n",
        "world_corpus.txt": corpus,
        "world_sft.jsonl": jsonl(sft),
        "world_community.jsonl": jsonl(community),
        "world_community_eval.jsonl": jsonl(community_eval),
        "world_eval.jsonl": jsonl(evals),
    }


def cross_domain(world, corpus, evals, seed, other_people, other_phrasings, n_records=20):
    """The scale experiment's two cross-domain tests, added to a world (from a random stream of
    their own: everything else stays as it was) -> the corpus, with `world` and `evals` grown.

    other_people: a second population, its own names (OTHER_FIRST x OTHER_LAST, none of the
    first population's), its facts stated only as terse records ("Record: X. Born: Oslo. Job:
    farmer. ...", n_records of them per person, fields shuffled), never in SFT or DPO data.
    Evaluation asks them the usual questions (split "other_people").
    other_phrasings: the held-out people asked in the prose's words (OTHER_QUESTIONS), which no
    SFT question uses (split "other_phrasing")."""
    rng = random.Random(seed + 3)
    docs = corpus.strip("\n").split("\n\n")
    if other_people:
        names = rng.sample([f"{f} {l}" for f in OTHER_FIRST for l in OTHER_LAST], other_people)
        people = [{"name": n, **{a: rng.choice(VALUES[a]) for a in ATTRS}} for n in names]
        world["other_people"] = people
        for p in people:
            for _ in range(n_records):
                fields = [f"{RECORD[a]}: {p[a]}." for a in rng.sample(ATTRS, len(ATTRS))]
                docs.append(f"Record: {p['name']}. " + " ".join(fields))
        evals += [
            {
                "split": "other_people",
                "person": p["name"],
                "attribute": a,
                "prompt": q.format(n=p["name"]),
            }
            for p in people
            for a in ATTRS
            for q in QUESTIONS[a]
        ]
        rng.shuffle(docs)
    if other_phrasings:
        heldout = [p["name"] for p in world["people"] if p["name"] in set(world["heldout"])]
        evals += [
            {
                "split": "other_phrasing",
                "person": n,
                "attribute": a,
                "prompt": OTHER_QUESTIONS[a].format(n=n),
            }
            for n in heldout
            for a in ATTRS
        ]
    return "\n\n".join(docs) + "\n"


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--out-dir", default=os.path.dirname(os.path.abspath(__file__)))
    ap.add_argument(
        "--people",
        type=int,
        default=200,
        help=f"people in the world, at most {len(FIRST) * len(LAST)} (more than {len(FIRST)}: "
        "every name a distinct first and family name pair)",
    )
    ap.add_argument(
        "--heldout", type=int, default=50, help="of those, held out of SFT and DPO (at least 2)"
    )
    ap.add_argument(
        "--list-tasks",
        action="store_true",
        help="add 300 copy / reverse / count tasks to the SFT data and 100 to the evaluation",
    )
    ap.add_argument(
        "--other-people",
        type=int,
        default=0,
        help="a second population of this many people, its facts only in terse records, asked "
        f"about in evaluation only (at most {len(OTHER_FIRST) * len(OTHER_LAST)})",
    )
    ap.add_argument(
        "--other-phrasings",
        action="store_true",
        help="also ask the held-out people in the prose's words, which no SFT question uses",
    )
    args = ap.parse_args()
    if not 0 <= args.other_people <= len(OTHER_FIRST) * len(OTHER_LAST):
        ap.error(f"need 0 <= --other-people <= {len(OTHER_FIRST) * len(OTHER_LAST)}")
    if not 2 <= args.heldout < args.people <= len(FIRST) * len(LAST):
        ap.error(
            f"need 2 <= --heldout < --people <= {len(FIRST) * len(LAST)}, "
            f"got --heldout {args.heldout} --people {args.people}"
        )
    os.makedirs(args.out_dir, exist_ok=True)
    files = build_files(
        args.seed,
        args.people,
        args.heldout,
        args.list_tasks,
        other_people=args.other_people,
        other_phrasings=args.other_phrasings,
    )
    for name, text in files.items():
        path = os.path.join(args.out_dir, name)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
        print(f"wrote {path} ({len(text):,} chars)")


if __name__ == "__main__":
    main()
