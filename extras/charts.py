"""The line charts the stages write (out/pretrain_loss.png, out/sft_path.png, out/dpo_margin.png)."""
import os


def plot(path, title, xlabel, ylabel, series, marks=()):
    """One PNG: series is {label: (xs, ys)}; marks is [(x, y, label)] points."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot
    fig, ax = pyplot.subplots(figsize=(6.4, 4.2))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="." if len(xs) < 40 else None, label=label)
    for i, (x, y, label) in enumerate(marks):  # labels alternate above / below their point
        ax.scatter([x], [y], s=70, zorder=5)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 6 if i % 2 == 0 else -14))
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    pyplot.close(fig)
    os.replace(tmp, path)


def plot_pretrain(path, history, world):
    """pretrain.py --plot: validation loss (and on a world the knowledge probe) against the step."""
    series = {"val loss": (history["step"], history["val_loss"])}
    if world:
        series["knowledge probe accuracy"] = (history["step"], history["probe"])
    plot(path, "pre-training", xlabel="step", ylabel="value", series=series)
