"""One markdown table comparing finished STaR runs (the rows of docs/RESULTS.md): per run, the held-out accuracy per
answer class of its base (iteration 0), of its last iteration and of its best iteration, with the kept and
rationalized counts summed over iterations and the wrong-step rationales among the checked ones.

  python scripts/compare_runs.py "STaR=runs/results/star" "direct=runs/results/direct" > table.md
"""
import argparse
import os
import sys

from tabulate import tabulate

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from star.report import class_order, load_results, pct  # noqa: E402


def load_rows(run_dir: str) -> list:
    path = os.path.join(run_dir, "results.json")
    if not os.path.exists(path):
        sys.exit(f"error: {path} does not exist; run iteration_train.py with --out-dir {run_dir} first")
    return load_results(path)


def summary(label: str, rows: list, classes: list) -> list:
    iters = [r for r in rows if r.get("dev_accuracy") and r["iteration"] > 0]
    last = iters[-1] if iters else None
    trains = [r.get("train") or {} for r in iters]
    kept = sum(t.get("kept", 0) for t in trains)
    rationalized = sum(t.get("rationalized", 0) for t in trains)
    checked = sum(t.get("correct_checked", 0) for t in trains)
    wrong = sum(t.get("correct_wrong_steps", 0) for t in trains)
    dev = last["dev_accuracy"] if last else {}
    steps = sum(r.get("steps", 0) for r in iters)
    best = max(iters, key=lambda r: r["dev_accuracy"].get("all", 0)) if iters else None
    return [label, len(iters), steps] + [pct(dev.get(c)) for c in classes] + \
           [f"{pct(best['dev_accuracy'].get('all'))} (it {best['iteration']})" if best else "",
            kept, rationalized, f"{wrong}/{checked}" if checked else ""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="LABEL=RUN_DIR, one per run, in table order")
    p.add_argument("--base", default=None, help="RUN_DIR whose iteration 0 gives the base row (default: the first)")
    args = p.parse_args(argv)
    runs = []
    for item in args.runs:
        if "=" not in item:
            p.error(f"{item!r}: give LABEL=RUN_DIR")
        label, run_dir = item.split("=", 1)
        runs.append((label, load_rows(run_dir)))
    classes = class_order(c for _, rows in runs for r in rows for c in (r.get("dev_accuracy") or {}))
    base_rows = load_rows(args.base) if args.base else runs[0][1]
    base = next((r for r in base_rows if r["iteration"] == 0 and r.get("dev_accuracy")), None)
    table = []
    if base:
        table.append(["base model", 0, 0] + [pct(base["dev_accuracy"].get(c)) for c in classes] + ["", "", "", ""])
    table += [summary(label, rows, classes) for label, rows in runs]
    headers = ["run", "iters", "steps"] + [f"dev {c} % (last)" for c in classes] + \
              ["best dev all %", "kept", "rationalized", "right answer, wrong steps"]
    print(tabulate(table, headers=headers, tablefmt="github", disable_numparse=True))


if __name__ == "__main__":
    main()
