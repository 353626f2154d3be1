"""
finetune.py --sft-attributes city,job,food: SFT on the questions about some of the world's
attributes only; the others stay question types SFT never showed. Held-out accuracy is then
split in two: in-domain (the attributes SFT asked about) and cross-domain (the rest), at
every evaluation and in sft.json. The scale experiment reads them (extras/experiments.py).
"""

import nanosft
from data import world_eval

# the world's attributes (data/world.py writes them; tests/test_core.py checks)
ATTRS = ["city", "job", "food", "pet", "hobby"]


def attributes(spec):
    """--sft-attributes "city,job,food" -> ["city", "job", "food"] (the world's order)."""
    names = [a.strip() for a in spec.split(",") if a.strip()]
    unknown = [a for a in names if a not in ATTRS]
    if unknown or not names:
        raise nanosft.UserError(
            f"--sft-attributes {spec}: unknown attribute {', '.join(unknown) or '(none named)'}; "
            f"the world's attributes are {','.join(ATTRS)}"
        )
    return [a for a in ATTRS if a in names]


def by_domain(rows, attributes):
    """(in-domain rows, cross-domain rows) of world questions: those about an attribute SFT
    asked about (`attributes`), and the rest. Together they are `rows`."""
    inside = [r for r in rows if r["attribute"] in attributes]
    return inside, [r for r in rows if r["attribute"] not in attributes]


def domain_accuracy(world, rows, answers, attributes):
    """(in-domain, cross-domain) accuracy of the answers to `rows` (split by by_domain), graded
    by the world's verifier; None for a side without rows."""
    said = {id(r): a for r, a in zip(rows, answers)}
    return tuple(
        sum(world_eval.grade(world, r["person"], r["attribute"], said[id(r)]) for r in part)
        / len(part)
        if part
        else None
        for part in by_domain(rows, attributes)
    )


class Domains:
    """The in- and cross-domain split of every evaluation point's test-half answers
    (finetune.SFTEvaluator's `more`)."""

    def __init__(self, evaluator, attributes):
        self.evaluator, self.attributes = evaluator, attributes

    def __call__(self, model, test_answers):
        e = self.evaluator
        inside, cross = domain_accuracy(e.world, e.test, test_answers, self.attributes)
        return {"heldout_in": inside, "heldout_cross": cross}


def report(log, path, final, rewound, attributes):
    """sft.json's in- and cross-domain fields (before, final, out/sft.pt's), the latter logged."""
    start = path[0]
    if rewound["heldout_cross"] is not None:  # (None: every attribute named)
        log(
            f"  of it, out/sft.pt: in-domain ({','.join(attributes)}) {rewound['heldout_in']:.3f}"
            f" | cross-domain (the other attributes) {rewound['heldout_cross']:.3f}, "
            f"before SFT {start['heldout_cross']:.3f}"
        )
    return {
        "sft_attributes": attributes,
        "heldout_accuracy_in_domain": rewound["heldout_in"],
        "heldout_accuracy_cross_domain": rewound["heldout_cross"],
        "heldout_accuracy_in_domain_final": final["heldout_in"],
        "heldout_accuracy_cross_domain_final": final["heldout_cross"],
        "heldout_accuracy_cross_domain_before": start["heldout_cross"],
    }
