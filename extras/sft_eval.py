"""
finetune.py's evaluation on the world's data: what SFT makes usable (held-out accuracy),
what it costs (retention), and the report of sft.json. The rewinding rule that reads these
numbers is in extras/rewind.py.
"""
import nanosft
from data import formats
from data import world_eval


def dev_answer_batches(tok, prompts, world_dir=world_eval.HERE, batch=64):
    """The community's top-voted answers to the dev half's questions `prompts`
    (world_community_eval.jsonl: threads no stage trains on), as fixed (x, y) batches:
    their loss says how closely the model writes the answers SFT teaches -- the voted
    style included -- for people it was never trained on."""
    threads = formats.read_records(world_eval.path("world_community_eval.jsonl", world_dir))
    convs = [[{"role": "user", "content": t["prompt"]},
              {"role": "assistant", "content": world_eval.top_voted(t["answers"])}]
             for _, t in threads if t["prompt"] in prompts]
    examples = [nanosft.example_tensors(*nanosft.render_chat(tok, c)) for c in convs]
    return [nanosft.collate(examples[i:i + batch], tok.pad) for i in range(0, len(examples), batch)]


class SFTEvaluator:
    """Held-out accuracy (dev half used for rewinding, test half reported, also split into
    in-domain and cross-domain: the attributes SFT asked about and the others), training-people
    accuracy, list-task accuracy and retention measured two ways: the pre-training
    validation loss, and the knowledge probe (the biographies' facts completed as plain
    text, as after pre-training; a stand-in for PEFT-Arena's general-ability benchmarks).

    evaluator(model) measures what the path and rewinding read at every evaluation point
    (the probe is None there); evaluator(model, full=True) adds the training people, the
    list tasks and the knowledge probe (before SFT, final, rewound: what sft.json reports).

    pretrain_stream: the pre-training text's tokens (None: no retention loss).
    attributes: those SFT trains on (--sft-attributes). Rewinding sees the dev half's
    questions about these only, so nothing about a cross-domain attribute informs the choice."""

    def __init__(self, process, tok, pretrain_stream, block_size, world_dir=world_eval.HERE, attributes=None):
        self.process, self.tok = process, tok
        self.world = world_eval.load_world(world_dir)
        self.attributes = attributes or self.world[1]["attributes"]
        self.longest = world_eval.world_longest(world_dir)
        dev, self.test = world_eval.heldout_halves(world_dir)
        self.dev = world_eval.by_domain(dev, self.attributes)[0]
        self.dev_answers = dev_answer_batches(tok, {r["prompt"] for r in self.dev}, world_dir)
        self.train = world_eval.load_eval_rows("train", world_dir)[:250]  # as many as a held-out half
        self.tasks = world_eval.load_eval_rows("tasks", world_dir)
        self.retention = None
        if pretrain_stream is not None:  # the same split pre-training used: retention = its validation loss
            self.retention = formats.fixed_windows(formats.split_corpus(pretrain_stream, block_size)[1], block_size)

    def __call__(self, model, full=False):
        qa = lambda rows: world_eval.qa_eval(model, self.tok, self.world, rows, self.longest)
        test = qa(self.test)
        inside, cross = world_eval.domain_accuracy(self.world, self.test, test["answers"], self.attributes)
        result = {"dev": qa(self.dev)["accuracy"], "heldout": test["accuracy"], "heldout_in": inside,
                  "heldout_cross": cross, "dev_loss": nanosft.mean_loss(model, self.dev_answers, self.process),
                  "degenerate": test["degenerate_rate"],
                  "retention": nanosft.mean_loss(model, self.retention, self.process) if self.retention else None,
                  "probe": None}
        return self.complete(result, model) if full else result

    def complete(self, point, model):
        """A point measured already (evaluator(model) at the same weights), completed with what
        the report adds: the training people, the list tasks and the knowledge probe."""
        full = {**point, "train": world_eval.qa_eval(model, self.tok, self.world, self.train, self.longest)["accuracy"],
                "tasks": world_eval.task_accuracy(model, self.tok, self.tasks) if self.tasks else None}
        return {**full, "probe": self.probe(model) if point["probe"] is None else point["probe"]}

    def probe(self, model):
        return world_eval.knowledge_probe(model, self.tok, self.world)

    def start(self, model):
        """The path's first point: the model before SFT, with its knowledge probe."""
        return [{"step": 0, **self(model), "probe": self.probe(model)}]


def log_eval(log, result):
    cross = "" if result["heldout_cross"] is None else \
        f", in-domain {result['heldout_in']:.3f}, cross-domain {result['heldout_cross']:.3f}"
    probe = "" if result["probe"] is None else f" | knowledge probe {result['probe']:.3f}"
    log(f"eval step {result['step']}: held-out {result['heldout']:.3f} (dev {result['dev']:.3f}, dev answer loss "
        f"{result['dev_loss']:.4f}{cross}) | retention loss {result['retention']:.4f}{probe}")


def world_report(log, path, final, rewound, choice, chance, attributes):
    """sft.json's world numbers: before SFT (the path's step 0), at the final step and at the
    rewound point (`final`, `rewound`: their full evaluations); the headline is logged.
    attributes: those SFT asked about; held-out accuracy is split into these (in-domain) and
    the others (cross-domain; None when SFT asked about every attribute)."""
    start = path[0]
    log(f"held-out accuracy: before {start['heldout']:.3f} | final {final['heldout']:.3f} | "
        f"rewound ({choice['rewound']}) {rewound['heldout']:.3f}")
    if rewound["heldout_cross"] is not None:
        log(f"  of it, rewound: in-domain ({','.join(attributes)}) {rewound['heldout_in']:.3f} | "
            f"cross-domain (the other attributes) {rewound['heldout_cross']:.3f}, "
            f"before SFT {start['heldout_cross']:.3f}")
    log(f"retention loss:    before {start['retention']:.4f} | final {final['retention']:.4f} | "
        f"rewound {rewound['retention']:.4f}")
    log(f"knowledge probe:   before {start['probe']:.3f} | final {final['probe']:.3f} | "
        f"rewound {rewound['probe']:.3f}")
    tasks = f" | list tasks {rewound['tasks']:.3f}" if rewound["tasks"] is not None else ""  # (world.py --list-tasks)
    log(f"training people {rewound['train']:.3f}{tasks} | degenerate answers {rewound['degenerate']:.3f}")
    return {
        "heldout_accuracy": rewound["heldout"], "train_accuracy": rewound["train"], "task_accuracy": rewound["tasks"],
        "heldout_accuracy_before": start["heldout"], "heldout_accuracy_final": final["heldout"],
        "heldout_accuracy_rewound": rewound["heldout"], "heldout_accuracy_peak": max(p["heldout"] for p in path),
        "train_accuracy_final": final["train"], "task_accuracy_final": final["tasks"],
        "degenerate_rate": rewound["degenerate"], "degenerate_rate_final": final["degenerate"],
        "retention_val_loss_before": start["retention"], "retention_val_loss_final": final["retention"],
        "retention_val_loss_rewound": rewound["retention"], "knowledge_probe_before": start["probe"],
        "knowledge_probe_final": final["probe"], "knowledge_probe_rewound": rewound["probe"], **choice,
        "chance_accuracy": chance, "sft_attributes": attributes, "heldout_accuracy_in_domain": rewound["heldout_in"],
        "heldout_accuracy_cross_domain": rewound["heldout_cross"],
        "heldout_accuracy_in_domain_final": final["heldout_in"],
        "heldout_accuracy_cross_domain_final": final["heldout_cross"],
        "heldout_accuracy_cross_domain_before": start["heldout_cross"], "path": path}
