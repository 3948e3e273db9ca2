"""Training curves as one picture: loss, held-out loss, image-use gap, learning rate and throughput
of one or several runs against the optimizer step, read from their `train_log.jsonl`.

    python -m eval.plot_run RUN_DIR_OR_LOG [RUN_DIR_OR_LOG ...] --out curves.png [--names a b]

A run directory means `<dir>/train_log.jsonl` (the trainer's run log, written to --log-dir, by default
--output-dir). Panels (a 2 x 3 grid): training loss per task, held-out loss per task, the image-use gap
(`image_gap` of the val records, nats/token of true vs shuffled latents, with its CI as a band, and
`image_gap_<task>`; "not logged" when the log has none), the learning rate per LR group, tokens/s, and
a short table of each run's numbers. With one run every task has its own colour; with several, every
run has its own colour (legend at the top) and the tasks are told apart by line style.

A resumed run's log holds the steps after its last checkpoint twice; the records written after a
restart replace the earlier ones from the same step on.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Optional, Sequence

from common.cli import cli_main
from common.io import atomic_path, read_jsonl
from models.tasks import TASKS
from trainer.metrics import TRAIN_LOG_FILE

OVERALL = "all"
# line style and marker per task (several runs: the colour is the run's)
TASK_STYLES = {OVERALL: ("-", None), "caption": ("--", "o"), "summary": ("-.", "s"), "cot": (":", "^"),
               "text_summary": ((0, (5, 1, 1, 1, 1, 1)), "D")}
FIGSIZE = (16.0, 9.0)  # inches
DPI = 100


# ------------------------------------------------------------------------------------- reading
def resolve_log(path: str | Path) -> Path:
    """A run directory or a log file -> the log file (which must exist)."""
    p = Path(path)
    log_file = p / TRAIN_LOG_FILE if p.is_dir() else p
    if not log_file.is_file():
        where = f" (run directory {p} has no {TRAIN_LOG_FILE})" if p.is_dir() else ""
        raise FileNotFoundError(f"{log_file}: training log not found{where}")
    return log_file


def load_run_log(path: str | Path) -> list[dict]:
    """The records of one run's log, a resumed run's repeated steps replaced by their later records."""
    log_file = resolve_log(path)
    records = [r for r in read_jsonl(log_file) if isinstance(r, dict) and "kind" in r and "step" in r]
    if not any(r["kind"] in ("train", "val") for r in records):
        raise ValueError(f"{log_file}: no train or val records (an empty log, or a run stopped before its first "
                         "log step): nothing to plot")
    kept: list[dict] = []
    for r in records:
        if r["kind"] == "start":  # a (re)start at step s: what was logged after s is written again
            kept = [k for k in kept if k["step"] <= r["step"]]
        kept.append(r)
    by_key: dict[tuple, dict] = {}
    for r in kept:
        if r["kind"] in ("train", "val"):
            by_key[(r["kind"], r["step"])] = r  # the later record of a step wins
    return sorted(by_key.values(), key=lambda r: (r["step"], r["kind"]))


def run_name(path: str | Path) -> str:
    p = Path(path)
    return (p if p.is_dir() else p.parent).resolve().name or str(p)


def _series(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if r["kind"] == kind and isinstance(v, (int, float)) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


def curves(records: list[dict]) -> dict:
    """What one run's log has to draw: {panel: {line: (steps, values)}} (+ the gap's CI band)."""
    out: dict = {"train_loss": {}, "val_loss": {}, "image_gap": {}, "image_gap_ci": None, "lr": {},
                 "tokens_per_s": {}}
    for panel, kind, prefix in (("train_loss", "train", "loss"), ("val_loss", "val", "val_loss"),
                                ("image_gap", "val", "image_gap")):
        for task in (OVERALL, *TASKS):
            xs, ys = _series(records, kind, prefix if task == OVERALL else f"{prefix}_{task}")
            if xs:
                out[panel][task] = (xs, ys)
    band = [(r["step"], r["image_gap_ci_low"], r["image_gap_ci_high"]) for r in records
            if r["kind"] == "val" and all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k])
                                          for k in ("image_gap_ci_low", "image_gap_ci_high"))]
    if band:
        out["image_gap_ci"] = tuple(list(c) for c in zip(*band))
    groups = []
    for r in records:
        if r["kind"] == "train" and isinstance(r.get("lr"), dict):
            groups += [g for g in r["lr"] if g not in groups]
    for g in groups:
        pts = [(r["step"], float(r["lr"][g])) for r in records
               if r["kind"] == "train" and isinstance(r.get("lr"), dict) and isinstance(r["lr"].get(g), (int, float))]
        out["lr"][g] = ([s for s, _ in pts], [v for _, v in pts])
    xs, ys = _series(records, "train", "tokens_per_s")
    if xs:
        out["tokens_per_s"]["tokens/s"] = (xs, ys)
    return out


# ------------------------------------------------------------------------------------- drawing
def plot_runs(runs: dict[str, list[dict]], out: str | Path) -> dict:
    """Draw the runs' curves into one PNG at `out`; returns what was drawn:
    {"path", "size": (w, h) pixels, "runs": [names], "panels": {panel: {run: [lines]}}, "image_gap": bool}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    if not runs:
        raise ValueError("no runs to plot")
    names = list(runs)
    data = {n: curves(recs) for n, recs in runs.items()}
    multi = len(names) > 1
    run_colours = {n: f"C{i % 10}" for i, n in enumerate(names)}
    task_colours = {t: f"C{i % 10}" for i, t in enumerate((OVERALL, *TASKS))}

    fig, axes = plt.subplots(2, 3, figsize=FIGSIZE, dpi=DPI)
    drawn: dict[str, dict[str, list[str]]] = {}

    def order(panel: str) -> list[str]:  # the panel's lines over all runs, in a fixed order
        return list(dict.fromkeys(line for n in names for line in data[n][panel]))

    def style(panel: str, line: str) -> tuple:
        """(line style, marker) of a line: per task in the loss panels, per LR group in the others."""
        if panel in ("lr", "tokens_per_s"):
            return ["-", "--", ":", "-."][order(panel).index(line) % 4], None
        return TASK_STYLES.get(line, ("-", None))

    def draw(ax, panel: str, markers: bool = False) -> None:
        drawn[panel] = {}
        for n in names:
            lines = data[n][panel]
            drawn[panel][n] = list(lines)
            for line, (xs, ys) in lines.items():
                ls, marker = style(panel, line)
                if multi:  # colour = run, style = task
                    colour, label = run_colours[n], f"{n}: {line}"
                else:  # colour = task (or group)
                    i = order(panel).index(line)
                    colour = task_colours.get(line, f"C{i % 10}") if panel not in ("lr", "tokens_per_s") \
                        else f"C{i % 10}"
                    ls, label = "-", line
                ax.plot(xs, ys, color=colour, ls=ls, lw=2.2 if line == OVERALL else 1.4,
                        marker=marker if (markers or len(xs) <= 12) else None, ms=4, label=label,
                        alpha=0.95 if line == OVERALL else 0.85)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)

    def task_legend(ax, panel: str) -> None:
        lines = order(panel)
        if not lines:
            return
        if not multi:
            ax.legend(fontsize=8, loc="best")
            return
        handles = [Line2D([], [], color="0.3", ls=style(panel, line)[0], marker=style(panel, line)[1],
                          lw=2.2 if line == OVERALL else 1.4, label=line) for line in lines]
        ax.legend(handles=handles, fontsize=8, loc="best")

    def loss_scale(ax, panel: str) -> None:
        vals = [v for n in names for _, ys in data[n][panel].values() for v in ys]
        if vals and min(vals) > 0 and max(vals) / min(vals) > 4:
            ax.set_yscale("log")
            decades = math.log10(max(vals) / min(vals))
            shown = (1, 2, 3, 4, 6) if decades <= 1 else (1, 2, 5) if decades <= 2 else (1,)

            def label(v: float, _pos) -> str:  # plain numbers (0.6, 2, 3) rather than 6x10^-1
                if v <= 0:
                    return ""
                mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6)
                return f"{v:g}" if mantissa in shown else ""

            ax.yaxis.set_major_formatter(FuncFormatter(label))
            ax.yaxis.set_minor_formatter(FuncFormatter(label))
            ax.set_ylabel(ax.get_ylabel() + " [log scale]")

    def empty(ax, text: str) -> None:
        ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=13, color="0.45", transform=ax.transAxes)

    # training loss
    ax = axes[0][0]
    draw(ax, "train_loss")
    ax.set_title("training loss per task (per log window)")
    ax.set_ylabel("loss (nats/token)")
    loss_scale(ax, "train_loss")
    task_legend(ax, "train_loss")

    # held-out loss
    ax = axes[0][1]
    draw(ax, "val_loss", markers=True)
    ax.set_title("held-out loss per task")
    ax.set_ylabel("val loss (nats/token)")
    loss_scale(ax, "val_loss")
    task_legend(ax, "val_loss")
    if not any(drawn["val_loss"][n] for n in names):
        empty(ax, "not logged")

    # image-use gap
    ax = axes[0][2]
    gap = any(data[n]["image_gap"] for n in names)
    ax.set_title("image-use gap: loss(shuffled) \u2212 loss(true latents)")
    if gap:
        for n in names:
            band = data[n]["image_gap_ci"]
            if band:
                colour = run_colours[n] if multi else task_colours[OVERALL]
                ax.fill_between(band[0], band[1], band[2], color=colour, alpha=0.18, lw=0,
                                label=None if multi else "95% CI")
        draw(ax, "image_gap", markers=True)
        ax.axhline(0.0, color="0.4", lw=0.8, ls="--")
        ax.set_ylabel("loss gap (nats/token)")
        task_legend(ax, "image_gap")
    else:
        drawn["image_gap"] = {n: [] for n in names}
        ax.set_xticks([])
        ax.set_yticks([])
        empty(ax, "not logged\n(no image_gap in the val records)")

    # learning rate
    ax = axes[1][0]
    draw(ax, "lr")
    ax.set_title("learning rate per LR group")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    task_legend(ax, "lr")

    # throughput
    ax = axes[1][1]
    draw(ax, "tokens_per_s")
    ax.set_title("throughput (real tokens/s, all ranks)")
    ax.set_ylabel("tokens / s")
    ax.set_ylim(bottom=0)

    # the numbers
    ax = axes[1][2]
    ax.axis("off")
    ax.set_title("runs at a glance")
    rows = []
    for n in names:
        d = data[n]
        steps = max((xs[-1] for panel in ("train_loss", "val_loss") for xs, _ in d[panel].values()), default=0)
        row = [n, str(steps)]
        tr = d["train_loss"].get(OVERALL)
        row.append(f"{tr[1][-1]:.3f}" if tr else "-")
        va = d["val_loss"].get(OVERALL)
        if va:
            i = min(range(len(va[1])), key=va[1].__getitem__)
            row.append(f"{va[1][-1]:.3f} (best {va[1][i]:.3f} @ {va[0][i]})")
        else:
            row.append("-")
        g = d["image_gap"].get(OVERALL)
        row.append(f"{g[1][-1]:+.4f}" if g else "not logged")
        rows.append(row)
    table = ax.table(cellText=rows, colLabels=["run", "steps", "last loss", "val loss: last (best @ step)",
                                               "image gap"],
                     loc="upper center", cellLoc="left", colLoc="left")
    table.auto_set_font_size(False)
    table.set_fontsize(8.5)
    table.auto_set_column_width(list(range(5)))
    table.scale(1.0, 1.5)
    if multi:
        for i, n in enumerate(names):
            table[(i + 1, 0)].get_text().set_color(run_colours[n])

    title = "training curves: " + ", ".join(names)
    fig.suptitle(title if len(title) <= 140 else title[:137] + "...", fontsize=14, fontweight="bold")
    if multi:
        handles = [Line2D([], [], color=run_colours[n], lw=3, label=n) for n in names]
        fig.legend(handles=handles, loc="upper center", ncol=min(len(names), 6), bbox_to_anchor=(0.5, 0.955),
                   fontsize=10, frameon=False)
        fig.tight_layout(rect=(0, 0, 1, 0.92))
    else:
        fig.tight_layout(rect=(0, 0, 1, 0.96))
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)
    plt.close(fig)
    size = (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
    return {"path": Path(out), "size": size, "runs": names, "panels": drawn, "image_gap": gap}


def plot_run_logs(paths: Sequence[str | Path], out: str | Path, names: Optional[Sequence[str]] = None) -> dict:
    """Read each run's log (a run directory or a train_log.jsonl) and draw them into `out`."""
    if not paths:
        raise ValueError("give at least one run directory or train_log.jsonl")
    if names and len(names) != len(paths):
        raise ValueError(f"--names: {len(names)} name(s) for {len(paths)} run(s)")
    names = list(names) if names else [run_name(p) for p in paths]
    seen: dict[str, int] = {}
    unique = []
    for n in names:  # two runs named alike (e.g. two `final` dirs) stay apart in the legend
        seen[n] = seen.get(n, 0) + 1
        unique.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    runs = {n: load_run_log(p) for n, p in zip(unique, paths)}
    return plot_runs(runs, out)


@cli_main
def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.plot_run",
                                     description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR_OR_LOG",
                        help=f"run directory (its {TRAIN_LOG_FILE}) or the log file itself")
    parser.add_argument("--out", default="curves.png", help="PNG to write")
    parser.add_argument("--names", nargs="+", default=None, help="legend names, one per run (default: run dir names)")
    args = parser.parse_args(argv)
    drawn = plot_run_logs(args.runs, args.out, args.names)
    gap = "with" if drawn["image_gap"] else "without"
    print(f"[plot_run] {len(drawn['runs'])} run(s) ({', '.join(drawn['runs'])}) {gap} image gap -> {drawn['path']}")


if __name__ == "__main__":
    main()
