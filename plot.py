"""Pictures of training runs: the LLD dynamics of several runs side by side, and an ablation table.

    python eval.py --plot OUT.png RUN_DIR [RUN_DIR ...]

Reads each RUN_DIR/metrics.jsonl as train.py writes it (one JSON row per step; step 0 holds the held-out eval
before training) and draws one panel per signal, runs overlaid and labelled by their directory name: training
reward, held-out EM, the preserving (A >= 0) and negative (A < 0) sets' old log-prob per token (the reference
model's dashed, where logged), entropy, the pre-clip gradient norm and the LLDS penalty. Each raw line is faint
under its trailing moving average; the death-spiral monitor's warnings are ticks at the foot of every panel.
Then it prints one table row per run.

A run still being written is read up to its last complete line. A resumed run may hold a step twice (a copy
of the file from before the resume truncated it): the later row wins, as it is the one training went on from.
"""
import math
from pathlib import Path

from utils import UserError, read_jsonl, write_atomic

SMOOTH = 5  # steps in the trailing moving average: light, so that a collapse is dated within a few steps
REWARD = "rollout/reward"
# (metric, panel title); the held-out EM and the reference log-prob are drawn specially (see draw)
PANELS = [(REWARD, "training reward"), ("eval/em", "held-out EM"),
          ("lld/old_logp_pos", "preserving set: old log-prob / token"),
          ("lld/old_logp_neg", "negative set: old log-prob / token"), ("lld/entropy", "entropy / token"),
          ("train/grad_norm", "grad norm (pre-clip)"), ("llds/penalty", "LLDS penalty")]
HOW = "pass a run directory written by train.py (it holds config.yaml and metrics.jsonl)"


# ------------------------------------------------------------------------------------------------ reading

def read_metrics(run_dir) -> list[dict]:
    """The rows of run_dir/metrics.jsonl, one per step in step order (a repeated step: the later row). A last
    line without its newline that is not JSON is a write in progress and is skipped."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise UserError(f"{run_dir} is not a directory; {HOW}")
    if not path.is_file():
        raise UserError(f"{run_dir} has no metrics.jsonl; {HOW}")
    by_step = {}
    for i, row in read_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise UserError(f"{path} line {i} is not a train.py metrics row (no integer step); {HOW}")
        by_step[row["step"]] = row
    rows = [by_step[s] for s in sorted(by_step)]
    if not any(REWARD in r for r in rows):
        raise UserError(f"{path} has no training step with {REWARD} yet; wait for the run's first step, or {HOW}")
    return rows


def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that hold `key` with a finite value."""
    pts = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in pts], [v for _, v in pts]


def moving_average(ys: list[float], window: int = SMOOTH) -> list[float]:
    """Trailing mean over the last `window` values (fewer at the start): at each step it uses only the past."""
    # each window summed afresh: a running sum would leave rounding residue (a flat zero tail read as -4e-17)
    return [sum(ys[max(0, i + 1 - window):i + 1]) / min(i + 1, window) for i in range(len(ys))]


# ------------------------------------------------------------------------------------------------ table

def summarize(rows: list[dict], window: int = SMOOTH) -> dict:
    """One run's table row. Rewards are of the moving average. The collapse step is the first step after the
    peak at which the moving average is below half the peak (None: it never was). The LLDS share is
    mean |llds/penalty| / mean |train/pg_loss| over the steps that logged both (a ratio of means, because the
    policy loss of a single step can sit at zero)."""
    steps, reward = series(rows, REWARD)
    ma = moving_average(reward, window)
    peak_i = max(range(len(ma)), key=lambda i: ma[i])  # the first step of the peak value
    collapse = next((steps[i] for i in range(peak_i + 1, len(ma)) if ma[i] < ma[peak_i] / 2), None)
    warn = [s for s, v in zip(*series(rows, "lld/warning")) if v > 0]
    em_steps, em = series(rows, "eval/em")
    both = [r for r in rows if "llds/penalty" in r and "train/pg_loss" in r]
    share = None
    if both:
        pg = sum(abs(r["train/pg_loss"]) for r in both)
        share = sum(abs(r["llds/penalty"]) for r in both) / pg if pg > 0 else None  # no policy signal at all
    return {"steps": steps[-1], "peak_reward": ma[peak_i], "peak_step": steps[peak_i], "final_reward": ma[-1],
            "em_before": em[0] if em_steps and em_steps[0] == 0 else None,
            "em_after": em[-1] if em_steps and em_steps[-1] > 0 else None,
            "collapse_step": collapse, "first_warning": warn[0] if warn else None, "llds_share": share}


def format_table(names: list[str], summaries: list[dict]) -> str:
    def f(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)
    lines = ["| run | steps | peak reward (step) | final reward | EM before | EM after | collapse step | "
             "first warning | mean abs LLDS / PG loss |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, s in zip(names, summaries):
        lines.append(f"| {n} | {s['steps']} | {s['peak_reward']:.3f} ({s['peak_step']}) | {s['final_reward']:.3f} | "
                     f"{f(s['em_before'])} | {f(s['em_after'])} | {f(s['collapse_step'], '{}')} | "
                     f"{f(s['first_warning'], '{}')} | {f(s['llds_share'])} |")
    return "\n".join(lines + [f"(rewards: trailing {SMOOTH}-step moving average of {REWARD}; collapse: first "
                              "step after the peak below half of it; '-': not logged or never)"])


# ------------------------------------------------------------------------------------------------ figure

def draw(runs: list[tuple[str, list[dict]]], window: int = SMOOTH):
    """A matplotlib Figure (Agg canvas, no display) with one panel per PANELS entry. In each panel a run that
    logged the signal has one labelled line (its moving average; held-out EM: the eval points joined) and
    unlabelled ('_'-prefixed) companions: the faint raw line, the dashed reference, the warning ticks."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = 4
    nrows = math.ceil(len(PANELS) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for k, (key, title) in enumerate(PANELS):
        ax = fig.add_subplot(nrows, ncols, k + 1)
        has_ref = False
        for (name, rows), c in zip(runs, colours):
            xs, ys = series(rows, key)
            if key == "eval/em":
                if xs:
                    ax.plot(xs, ys, "o-", color=c, ms=4, label=name)
            elif xs:
                ax.plot(xs, ys, color=c, alpha=0.3, lw=0.8, label=f"_{name} raw")
                ax.plot(xs, moving_average(ys, window), color=c, lw=1.8, label=name)
            if key == "lld/old_logp_pos":
                rx, ry = series(rows, "lld/ref_logp_pos")
                if rx:
                    has_ref = True
                    ax.plot(rx, moving_average(ry, window), color=c, lw=1.2, ls="--", label=f"_{name} reference")
            warn = [s for s, v in zip(*series(rows, "lld/warning")) if v > 0]
            if warn:  # x in data, y in axes coordinates: a tick at the foot of the panel whatever its scale
                ax.plot(warn, [0.0] * len(warn), "|", color=c, ms=12, mew=2, transform=ax.get_xaxis_transform(),
                        clip_on=False, label=f"_{name} warning")
        ax.set_title(title + (" (dashed: reference)" if has_ref else ""), fontsize=10)
        ax.grid(alpha=0.3)
        if k >= len(PANELS) - ncols:
            ax.set_xlabel("step")
        if k == 0:
            ax.legend(fontsize=8, title="| at the foot: LLD warning", title_fontsize=7)
    return fig


def run_names(run_dirs: list[str]) -> list[str]:
    """Directory names; the full paths when two runs share a name."""
    names = [Path(d).resolve().name for d in run_dirs]
    return names if len(set(names)) == len(names) else [str(d) for d in run_dirs]


def main(argv: list[str]):
    """argv = [OUT, RUN_DIR, ...]: read every run (all errors before any drawing), print the table, write the
    figure atomically to OUT. Returns the figure."""
    if len(argv) < 2:
        raise UserError(f"--plot {' '.join(argv)} names no run directory; give OUT.png then one or more RUN_DIRs")
    out, run_dirs = Path(argv[0]), argv[1:]
    fmt = out.suffix.lstrip(".").lower()
    if fmt not in ("png", "pdf", "svg"):
        raise UserError(f"--plot {out} is not a .png, .pdf or .svg file name; give the picture's path first, "
                        "then the run directories")
    if not out.parent.is_dir():
        raise UserError(f"--plot {out}: the folder {out.parent} does not exist; create it or write elsewhere")
    runs = [(n, read_metrics(d)) for n, d in zip(run_names(run_dirs), run_dirs)]
    print(format_table([n for n, _ in runs], [summarize(rows) for _, rows in runs]))
    fig = draw(runs)
    write_atomic(out, lambda f: fig.savefig(f, format=fmt, dpi=90))
    print(f"\nsaved {out}")
    return fig
