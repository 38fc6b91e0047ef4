"""Per-run report of a STaR experiment: `results.md` (a table per iteration) and `accuracy.png` (held-out
accuracy per answer class over iterations). Both are rebuilt from `results.json` after every iteration."""
from __future__ import annotations

import json
import os
from typing import Dict, List

from tabulate import tabulate


def load_results(path: str) -> List[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def save_results(path: str, rows: List[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rows, f, indent=2)
    os.replace(tmp, path)


def pct(x) -> str:
    """A share as a percentage with one decimal; empty for None."""
    return "" if x is None else f"{100 * x:.1f}"


def class_order(classes) -> List[str]:
    """Answer classes in table order: by length then name (1, 2, ..., 10), `all` last."""
    return sorted(set(classes), key=lambda c: (c == "all", len(c), c))


def results_table(rows: List[dict]) -> str:
    """Markdown table: iteration, steps, train accuracy (overall, then per class when there are several), kept,
    rationalized share, wrong-step rationales, dev accuracy per class, time."""
    classes = class_order(c for r in rows for c in (r.get("dev_accuracy") or {}))
    train_classes = class_order(c for r in rows for c in ((r.get("train") or {}).get("accuracy_by_class") or {}))
    if len(train_classes) < 2:
        train_classes = []  # one class: the same number as train acc
    headers = ["iter", "steps", "train acc %"] + [f"train {c} %" for c in train_classes] + \
              ["kept", "rationalized %", "right answer, wrong steps"] + [f"dev {c} %" for c in classes] + ["minutes"]
    table = []
    for r in rows:
        train = r.get("train") or {}
        kept = train.get("kept")
        rat_share = (train.get("rationalized", 0) / kept) if kept else None
        wrong_steps = ""
        if train.get("correct_checked"):
            wrong_steps = f"{train['correct_wrong_steps']}/{train['correct_checked']}"
        dev = r.get("dev_accuracy") or {}
        by_class = train.get("accuracy_by_class") or {}
        table.append([r["iteration"], r.get("steps", ""), pct(train.get("accuracy")) if train else ""] +
                     [pct(by_class.get(c)) for c in train_classes] +
                     [kept if kept is not None else "", pct(rat_share), wrong_steps] +
                     [pct(dev.get(c)) for c in classes] + [f"{r.get('seconds', 0) / 60:.1f}"])
    return tabulate(table, headers=headers, tablefmt="github")


def write_report(out_dir: str, rows: List[dict], title: str, notes: Dict[str, str] = None) -> None:
    """Writes results.md and accuracy.png in out_dir."""
    lines = [f"# {title}", ""]
    for key, value in (notes or {}).items():
        lines.append(f"- {key}: {value}")
    lines += ["", "Iteration 0 is the base model (no fine-tuning). `train acc` is the first-try accuracy of the "
              "previous model on this iteration's training questions (drawn anew each iteration, so "
              "mostly questions it has not trained on; `train 2 %` etc. per class); `kept` counts the rationales trained on; "
              "`right answer, wrong steps` counts correct answers whose checkable steps are wrong, among those "
              "checked.", "", results_table(rows), ""]
    if any(r.get("dev_accuracy") for r in rows):
        plot_accuracy(os.path.join(out_dir, "accuracy.png"), rows, title)
        lines.append("![accuracy per iteration](accuracy.png)")
    tmp = os.path.join(out_dir, "results.md.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(out_dir, "results.md"))


def plot_accuracy(path: str, rows: List[dict], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("dev_accuracy")]
    classes = class_order(c for r in rows for c in r["dev_accuracy"])
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for c in classes:
        xs = [r["iteration"] for r in rows if c in r["dev_accuracy"]]
        ys = [100 * r["dev_accuracy"][c] for r in rows if c in r["dev_accuracy"]]
        ax.plot(xs, ys, marker="o", label=c, linewidth=2.5 if c == "all" else 1.2)
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("STaR iteration (0 = base model)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(title)
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)
    ax.legend(title="class", fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
