"""experiments.py plane: the Pareto frontier and the points' arithmetic (forgetting is the
retention loss minus the pre-trained one; the probe drop is pre-trained minus after)."""
import random

from extras import experiments


def dominated(p, points):
    return any(q[0] <= p[0] and q[1] >= p[1] and (q[0], q[1]) != (p[0], p[1]) for q in points)


def test_pareto_is_exactly_the_undominated_points():
    rng = random.Random(0)
    for _ in range(200):
        pts = [(round(rng.random(), 1), round(rng.random(), 1), f"p{i}") for i in range(rng.randint(1, 12))]
        front = experiments.pareto(pts)
        want = {p for p in pts if not dominated(p, pts)}
        # ties (same x and y) keep one representative
        assert {(x, y) for x, y, _ in front} == {(x, y) for x, y, _ in want}
        assert [x for x, _, _ in front] == sorted(x for x, _, _ in front)   # drawn left to right
    assert [n for *_, n in experiments.pareto([(0.1, 0.5, "a"), (0.2, 0.4, "b"), (0.3, 0.9, "c"),
                                                (0.05, 0.3, "d"), (0.3, 0.8, "e")])] == ["d", "a", "c"]


def sft_json(heldout, retention, probe, params=100, path=None, interp=None, prompt_tokens=0, before=(0.6, 0.9)):
    return {"trainable_params": params, "frozen_bytes": None, "heldout_accuracy_final": heldout,
            "retention_val_loss_before": before[0], "retention_val_loss_final": retention,
            "knowledge_probe_before": before[1], "knowledge_probe_final": probe, "prompt_tokens": prompt_tokens,
            "quantize_base": "none", "rewind_path": path, "rewind_interpolate": interp}


def test_plane_points_measure_forgetting_from_the_pretrained_model():
    # a prompt run's step 0 has a random prefix in front (retention 1.9, probe 0.2): its
    # forgetting still counts from the pre-trained model (0.6, 0.9), as every other run's
    res = {"prompt": [sft_json(0.7, 0.65, 0.88, prompt_tokens=16, before=(1.9, 0.2))],
           "LoRA": [sft_json(0.8, 0.7, 0.85), sft_json(0.9, 0.8, 0.8)],
           "full SFT": [sft_json(0.98, 1.1, 0.7, params=1000, path={"heldout": 0.97, "retention": 0.9, "probe": 0.75},
                                 interp={"heldout": 0.96, "retention": 0.8, "probe": 0.8})]}
    pts = experiments.plane_points(res)
    lora = pts["LoRA"]
    assert lora["acc"] == [0.8, 0.9] and lora["params"] == 100
    assert [round(v, 6) for v in lora["forget"]] == [0.1, 0.2]          # after minus before, not before minus after
    assert [round(v, 6) for v in lora["probe_drop"]] == [0.05, 0.1]     # before minus after: a drop is positive
    path, line = pts["full SFT: rewound by path"], pts["full SFT: rewound by interpolation"]
    assert path["acc"] == [0.97] and round(path["forget"][0], 6) == 0.3 and round(path["probe_drop"][0], 6) == 0.15
    assert line["acc"] == [0.96] and round(line["forget"][0], 6) == 0.2
    assert round(pts["prompt"]["forget"][0], 6) == 0.05 and round(pts["prompt"]["probe_drop"][0], 6) == 0.02
    assert set(pts) == {"prompt", "LoRA", "full SFT", "full SFT: rewound by path", "full SFT: rewound by interpolation"}


def test_plot_plane_draws_paths_lines_and_points(tmp_path):
    step = lambda s, acc, ret, probe: {"step": s, "heldout": acc, "retention": ret, "probe": probe}
    line = [{"alpha": a, "heldout": a, "retention": 0.6 + a / 2, "probe": 0.9 - a / 10} for a in (0.0, 0.5, 1.0)]
    full = sft_json(0.98, 1.1, 0.7, params=1000, path={"heldout": 0.97, "retention": 0.9, "probe": 0.75},
                    interp={"heldout": 0.96, "retention": 0.8, "probe": 0.8})
    full.update(path=[step(0, 0.0, 0.6, 0.9), step(300, 0.98, 1.1, 0.7)], interpolation=line)
    res = {"full SFT": [full], "LoRA": [sft_json(0.8, 0.7, 0.85)]}
    png = str(tmp_path / "plane.png")
    experiments.plot_plane(png, experiments.plane_points(res), res)
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
