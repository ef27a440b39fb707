"""plot.py (eval.py --plot): the figure of two real runs, the table on hand-made metrics, partial and resumed
files, bad inputs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import eval as ev
import plot
from utils import cli

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--steps", "2", "--prompts_per_step", "4", "--group_size", "2", "--mini_batch_size", "4",
        "--micro_batch_size", "2", "--max_turns", "1", "--max_turn_tokens", "12", "--eval_batch_size", "8",
        "--eval_limit", "4", "--save_every", "0", "--seed", "3"]


def _env():
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _write_rows(run_dir: Path, rows: list[dict], tail: str = "") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return run_dir


def _labelled(ax) -> list[str]:
    return [ln.get_label() for ln in ax.get_lines() if not ln.get_label().startswith("_")]


def _line(ax, label):
    [ln] = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return ln


# ------------------------------------------------------------------------------------------------ real runs

@pytest.fixture(scope="module")
def two_runs(toy_dir, tmp_path_factory):
    """An LLDS run and its GRPO ablation (llds_coef 0), 2 steps each, with held-out eval before and after."""
    root = tmp_path_factory.mktemp("runs")
    for name, extra in (("llds", []), ("grpo", ["--llds_coef", "0"])):
        cmd = [sys.executable, "train.py", "--toy_dir", str(toy_dir), "--run_dir", str(root / name), *TINY, *extra]
        p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
    return root / "llds", root / "grpo"


def test_plot_of_two_real_runs(two_runs, tmp_path):
    llds, grpo = two_runs
    out = tmp_path / "cmp.png"
    p = subprocess.run([sys.executable, "eval.py", "--plot", str(out), str(llds), str(grpo)], cwd=ROOT, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not out.with_name("cmp.png.tmp").exists()
    table = [ln for ln in p.stdout.splitlines() if ln.startswith("| ")]
    assert [ln.split(" | ")[0] for ln in table] == ["| run", "| llds", "| grpo"]
    assert table[1].split(" | ")[1] == "2"  # steps
    assert table[2].split(" | ")[-1] == "- |"  # GRPO logs no LLDS penalty

    fig = plot.main([str(tmp_path / "again.png"), str(llds), str(grpo)])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == [t for _, t in plot.PANELS] and len(fig.axes) == 7
    by = dict(zip(titles, fig.axes))
    logged = {d.name: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in two_runs}
    for (key, t), ax in zip(plot.PANELS, fig.axes):
        # the negative set exists only in a step with a mixed group, which a 2-step toy run may not have
        assert _labelled(ax) == [n for n, rows in logged.items() if any(key in r for r in rows)], t
    for t in ("training reward", "held-out EM", "preserving set: old log-prob / token", "entropy / token",
              "grad norm (pre-clip)"):
        assert _labelled(by[t]) == ["llds", "grpo"], t
    assert _labelled(by["LLDS penalty"]) == ["llds"]
    assert [ln.get_color() for ln in by["training reward"].get_lines()] == ["C0", "C0", "C1", "C1"]
    rows = logged["llds"]
    assert list(_line(by["held-out EM"], "llds").get_xdata()) == [0, 2]
    assert list(_line(by["held-out EM"], "llds").get_ydata()) == [rows[0]["eval/em"], rows[2]["eval/em"]]
    raw = _line(by["entropy / token"], "_llds raw")
    assert list(raw.get_xdata()) == [1, 2] and list(raw.get_ydata()) == [r["lld/entropy"] for r in rows[1:]]
    gn = [r["train/grad_norm"] for r in rows[1:]]
    assert list(_line(by["grad norm (pre-clip)"], "llds").get_ydata()) == pytest.approx([gn[0], (gn[0] + gn[1]) / 2])


def test_eval_does_not_load_matplotlib_without_plot():
    code = "import sys, eval; assert 'matplotlib' not in sys.modules and 'plot' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)


# ------------------------------------------------------------------------------------------------ the table

# Rewards of steps 1-10 and their trailing 5-step moving average (by hand):
#   raw  .2  .4  .6  .8  1.  0   0   0   0   0
#   MA   .2  .3  .4  .5  .6  .56 .48 .36 .2  0
# The peak .6 is at step 5; the first later MA below .3 is step 9 (raw fell at step 6; MA .2 at step 1 is
# before the peak). Warnings on steps 7, 8 and 10. |penalty| 0.02 every step, |pg_loss| 0.2 with alternating
# sign: the share is 0.1 (the mean of the signed pg_loss is 0).
REWARDS = [0.2, 0.4, 0.6, 0.8, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def _collapsing_rows():
    rows = [{"step": 0, "eval/em": 0.3}]
    for s, r in enumerate(REWARDS, 1):
        rows.append({"step": s, "rollout/reward": r, "lld/warning": float(s in (7, 8, 10)),
                     "llds/penalty": 0.02 if s % 2 else -0.02, "train/pg_loss": 0.2 if s % 2 else -0.2})
    rows[-1]["eval/em"] = 0.1
    return rows


def test_table_collapse_and_warning_steps(tmp_path):
    s = plot.summarize(_collapsing_rows())
    assert s["collapse_step"] == 9 and s["first_warning"] == 7 and s["steps"] == 10
    assert (s["peak_step"], s["final_reward"]) == (5, 0.0) and s["peak_reward"] == pytest.approx(0.6)
    assert (s["em_before"], s["em_after"]) == (0.3, 0.1) and s["llds_share"] == pytest.approx(0.1)

    # a run that keeps improving: no collapse, no warning, no LLDS penalty, no eval after training
    rising = [{"step": k, "rollout/reward": k / 10, "train/pg_loss": 0.1} for k in range(1, 6)]
    r = plot.summarize([{"step": 0, "eval/em": 0.25}] + rising)
    assert (r["collapse_step"], r["first_warning"], r["llds_share"], r["em_after"]) == (None, None, None, None)
    assert r["peak_step"] == 5 and r["peak_reward"] == pytest.approx(0.3)  # MA of .1 .. .5

    table = plot.format_table(["spiral", "rising"], [s, r]).splitlines()
    assert table[2] == "| spiral | 10 | 0.600 (5) | 0.000 | 0.300 | 0.100 | 9 | 7 | 0.100 |"
    assert table[3] == "| rising | 5 | 0.300 (5) | 0.300 | 0.250 | - | - | - | - |"

    # the same warnings are ticks on every panel of the figure, at steps 7, 8, 10
    fig = plot.draw([("spiral", _collapsing_rows())])
    for ax in fig.axes:
        assert list(_line(ax, "_spiral warning").get_xdata()) == [7, 8, 10]


def test_partial_last_line_and_resumed_rows(tmp_path):
    """A run still writing (the last line cut off) and one resumed after a copy kept its old steps 2-3."""
    first = [{"step": k, "rollout/reward": 0.1 * k} for k in (1, 2, 3)]
    resumed = [{"step": k, "rollout/reward": 0.5} for k in (2, 3)]
    d = _write_rows(tmp_path / "r", first + resumed, tail='{"step": 4, "rollout/rew')
    rows = plot.read_metrics(d)
    assert [(r["step"], r["rollout/reward"]) for r in rows] == [(1, 0.1), (2, 0.5), (3, 0.5)]
    assert plot.summarize(rows)["steps"] == 3

    # a cut line that is followed by others is damage, not a write in progress
    (d / "metrics.jsonl").write_text('{"step": 1, "rollout/reward": 0.1}\n{"step": 2, "rollo\n'
                                     '{"step": 3, "rollout/reward": 0.1}\n')
    with pytest.raises(plot.UserError, match=r"metrics.jsonl line 2 is not JSON"):
        plot.read_metrics(d)


# ------------------------------------------------------------------------------------------------ bad inputs

def _fail(argv, capsys) -> str:
    """`python eval.py ARGV` (utils.cli around eval.main) must exit 2 with one line `error: ...` on stderr."""
    with pytest.raises(SystemExit) as e:
        cli(ev.main, argv)
    msg = capsys.readouterr().err.strip()
    assert e.value.code == 2 and msg.startswith("error: ") and "\n" not in msg, msg
    return msg


def test_bad_run_directories_and_arguments(tmp_path, capsys):
    good = _write_rows(tmp_path / "good", [{"step": 1, "rollout/reward": 0.5}])
    out = str(tmp_path / "o.png")
    missing = tmp_path / "missing"
    assert f"error: {missing} is not a directory; pass a run directory" in _fail(["--plot", out, str(good), str(missing)], capsys)
    (tmp_path / "empty").mkdir()
    assert f"{tmp_path / 'empty'} has no metrics.jsonl" in _fail(["--plot", out, str(tmp_path / "empty")], capsys)
    # only the eval before training: the training signals are missing
    evald = _write_rows(tmp_path / "evald", [{"step": 0, "eval/em": 0.2}])
    msg = _fail(["--plot", out, str(evald)], capsys)
    assert f"{evald / 'metrics.jsonl'} has no training step with rollout/reward" in msg
    notrain = _write_rows(tmp_path / "notrain", [{"n": 1}])
    assert "line 1 is not a train.py metrics row" in _fail(["--plot", out, str(notrain)], capsys)
    assert "names no run directory" in _fail(["--plot", out], capsys)
    assert "is not a .png, .pdf or .svg" in _fail(["--plot", str(good), str(good)], capsys)  # OUT forgotten
    assert "does not exist" in _fail(["--plot", str(tmp_path / "no" / "o.png"), str(good)], capsys)
    assert "--plot takes only" in _fail(["--plot", out, str(good), "--model", "m"], capsys)
    assert not Path(out).exists()  # nothing drawn when an input is bad
