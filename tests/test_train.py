"""train.py: a 2-step run end to end, exact resume, config errors, the toy spiral configs, the NaN skip, the 2-process
loss, the LLD monitor (its rule also on recorded runs)."""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

import plot
import rollout as ro
import search_env
import train
from utils import UserError

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--steps", "2", "--prompts_per_step", "4", "--group_size", "2", "--mini_batch_size", "4",
        "--micro_batch_size", "2", "--max_turns", "1", "--max_turn_tokens", "12", "--eval_batch_size", "8",
        "--seed", "3"]


def _env():
    env = dict(os.environ, WANDB_MODE="offline", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _weights(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


# ------------------------------------------------------------------------------------------------ end to end

def test_two_step_run_writes_metrics_checkpoint_trajectories(toy_dir, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--toy_dir", str(toy_dir), "--run_dir", str(run_dir), *TINY,
           "--sample_every", "1", "--eval_limit", "6", "--wandb_project", "test"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    last = p.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"held-out EM: before \d+\.\d after \d+\.\d", last), last

    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "eval/em" in rows[0] and "eval/em" in rows[2]
    for r in rows[1:]:
        for k in ("rollout/reward", "rollout/answered", "rollout/searches", "rollout/response_len", "train/loss",
                  "train/grad_norm", "train/clipfrac_high", "lld/old_logp_pos", "lld/entropy", "lld/delta_pos",
                  "lld/fell_action_share", "lld/warning", "train/skipped_steps", "perf/step_s"):
            assert k in r, k
        assert 0.0 <= r["rollout/reward"] <= 1.0 and r["lld/old_logp_pos"] < 0
        assert 0.0 <= r["lld/fell_action_share"] <= 1.0 and r["train/skipped_steps"] == 0
    # the resolved config round-trips
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["steps"] == 2 and saved["group_size"] == 2 and saved["model"] == str(toy_dir / "model")
    # one checkpoint (keep_checkpoints=1), loadable by HF and with weights_only state
    assert (run_dir / "latest").read_text().strip() == "step_000002"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002"]
    ckpt = run_dir / "checkpoints" / "step_000002"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["step"] == 2 and state["optimizer"]["state"] and state["skipped_total"] == 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(ckpt)
    assert AutoTokenizer.from_pretrained(ckpt).decode([1, 2]) == AutoTokenizer.from_pretrained(toy_dir / "model").decode([1, 2])
    trained, init = _weights(ckpt), _weights(toy_dir / "model")
    assert trained.keys() == init.keys() and any(not torch.equal(trained[k], init[k]) for k in init)
    # sample trajectories: sample_groups=2 groups of 2, every step
    traj = [json.loads(x) for x in (run_dir / "trajectories.jsonl").read_text().splitlines()]
    assert [t["step"] for t in traj] == [1] * 4 + [2] * 4
    assert len({t["group_id"] for t in traj}) == 4 and all("text" in t and "golds" in t for t in traj)
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb offline run folder missing"


def test_resume_equals_uninterrupted_run(toy_dir, tmp_path):
    """Run 4 steps straight; then pretend the run died after its step-2 checkpoint (its later checkpoint gone,
    metrics of steps 3-4 still in the file) and resume: steps 3-4 must come out identical."""
    a = tmp_path / "a"
    args = ["--toy_dir", str(toy_dir), *TINY, "--steps", "4", "--save_every", "2", "--keep_checkpoints", "2",
            "--eval_start_end", "false", "--warmup_ratio", "0.5"]
    train.main(args + ["--run_dir", str(a)])
    b = tmp_path / "b"
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step_000004")
    (b / "latest").write_text("step_000002\n")
    (b / "config.yaml").write_text((b / "config.yaml").read_text().replace(str(a), str(b)))
    with open(b / "metrics.jsonl", "a") as f:  # the kill came while a row was being written
        f.write('{"step": 5, "train/lo')
    train.main(["--resume", str(b)])

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]
    ra, rb = strip(_rows(a)), strip(_rows(b))
    assert [r["step"] for r in rb] == [1, 2, 3, 4]  # the stale rows 3-4 were replaced, not appended to
    assert rb[2:] == ra[2:]
    assert ra[2]["train/lr"] != ra[0]["train/lr"]  # the warmup is part of what resumed
    wa, wb = _weights(a / "checkpoints" / "step_000004"), _weights(b / "checkpoints" / "step_000004")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_truncate_jsonl_drops_a_cut_last_line_and_refuses_a_broken_one(tmp_path):
    from utils import truncate_jsonl
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "x')
    truncate_jsonl(p, 2)
    assert p.read_text() == '{"step": 1}\n{"step": 2}\n'
    p.write_text('{"step": 1}\n{"st\n{"step": 2}\n')
    with pytest.raises(UserError) as e:
        truncate_jsonl(p, 2)
    assert f"{p} line 2 is not JSON" in str(e.value)
    assert p.read_text() == '{"step": 1}\n{"st\n{"step": 2}\n'  # refused: nothing rewritten


# ------------------------------------------------------------------------------------------------ config

def test_config_file_unknown_key_wrong_type_and_flag_precedence(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: 3\nstepz: 4\n")
    with pytest.raises(UserError) as e:
        train.parse_config(["--config", str(bad)])
    assert "unknown config key 'stepz'" in str(e.value) and str(bad) in str(e.value)

    bad.write_text("steps: many\n")
    with pytest.raises(UserError) as e:
        train.parse_config(["--config", str(bad)])
    assert "'steps' must be int" in str(e.value)

    with pytest.raises(SystemExit):
        train.parse_config(["--stepz", "3"])
    assert "--stepz" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_config(["--adv_std", "maybe"])
    assert "adv_std" in capsys.readouterr().err

    good = tmp_path / "good.yaml"
    good.write_text("steps: 3\nlr: 1e-6\nadv_std: false\nmini_batch_size: 8\n")
    cfg = train.parse_config(["--config", str(good), "--steps", "7", "--adv_std", "true"])
    assert (cfg.steps, cfg.lr, cfg.adv_std, cfg.mini_batch_size) == (7, 1e-6, True, 8)  # flags beat the file

    good.write_text("mini_batch_size: 7\n")  # 16 x 5 = 80 rows are not a multiple of 7
    with pytest.raises(UserError) as e:
        train.parse_config(["--config", str(good)])
    assert "mini_batch_size=7" in str(e.value)


def test_toy_yaml_is_the_defaults():
    cfg = train.parse_config(["--config", str(ROOT / "configs" / "toy.yaml")])
    assert cfg == train.Config()


def test_paper_configs_parse():
    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(files) >= 9
    for f in files:
        cfg = train.parse_config(["--config", str(f)])
        if not f.name.startswith("toy"):  # toy*.yaml: the toy world's runs (test_toy_spiral_configs_*)
            paper = dict(lr=1e-6, warmup_ratio=0.285, steps=1005, prompts_per_step=512, group_size=5,
                         mini_batch_size=256, temperature=1.0, top_p=0.95, max_turn_tokens=500, max_obs_tokens=500,
                         max_context=4096, topk=3, clip_low=0.2, clip_high=0.2, kl_coef=0.001, kl_kind="k3",
                         ent_coef=0.001, weight_decay=0.01, grad_clip=1.0)
            assert {k: getattr(cfg, k) for k in paper} == paper, f
            assert cfg.llds_coef == (0.0 if f.name.startswith("searchr1") else 0.2), f
            assert cfg.ratio_level == ("sequence" if f.name.startswith("gspo") else "token"), f
            assert f.read_text().startswith("#") and "torchrun" in f.read_text(), f


def test_toy_spiral_configs_differ_only_in_llds():
    grpo, llds = (train.parse_config(["--config", str(ROOT / "configs" / f"toy_spiral_{k}.yaml")])
                  for k in ("grpo", "llds"))
    assert grpo.llds_coef == 0 and llds.llds_coef > 0 and llds.llds_gate == "action"
    assert dataclasses.replace(llds, llds_coef=0.0) == grpo
    # the paper's shape of an update: no KL, several optimiser steps per rollout batch (LLDS is inert in the first)
    assert grpo.kl_coef == 0 and grpo.prompts_per_step * grpo.group_size // grpo.mini_batch_size >= 5


@pytest.mark.parametrize("name", ["grpo", "llds"])
def test_toy_spiral_configs_run_two_steps(toy_dir, tmp_path, name):
    run_dir = tmp_path / name
    cmd = [sys.executable, "train.py", "--config", f"configs/toy_spiral_{name}.yaml", "--toy_dir", str(toy_dir),
           "--run_dir", str(run_dir), "--steps", "2", "--eval_limit", "8"]
    p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2] and "eval/em" in rows[2]
    assert all("lld/warning" in r and "lld/delta_pos" in r for r in rows[1:])
    # LLDS is logged, and acts (a penalty > 0), only in the LLDS run
    assert all(("llds/penalty" in r) == (name == "llds") for r in rows[1:])
    if name == "llds":
        assert sum(r["llds/penalty"] for r in rows[1:]) > 0


# ------------------------------------------------------------------------------------------------ NaN skip

def test_non_finite_loss_is_skipped_counted_and_the_run_goes_on(toy_dir, tmp_path):
    run_dir = tmp_path / "nan"
    # turns long enough to answer, so that step 2's groups are not all-wrong (zero advantages give a zero gradient)
    train.main(["--toy_dir", str(toy_dir), "--run_dir", str(run_dir), *TINY, "--eval_start_end", "false",
                "--max_turns", "2", "--max_turn_tokens", "48",
                "--save_every", "1", "--keep_checkpoints", "2", "--debug_nan_step", "1"])
    r1, r2 = _rows(run_dir)
    assert r1["train/skipped_steps"] == 2 and r1["train/skipped_total"] == 2  # 8 rows / 4 per mini-batch
    assert "train/grad_norm" not in r1  # no finite norm that step
    assert r2["train/skipped_steps"] == 0 and r2["train/skipped_total"] == 2 and r2["train/grad_norm"] > 0
    init, s1, s2 = (_weights(p) for p in (toy_dir / "model", run_dir / "checkpoints" / "step_000001",
                                          run_dir / "checkpoints" / "step_000002"))
    assert all(torch.equal(init[k], s1[k]) for k in init)  # the skipped step changed nothing
    assert any(not torch.equal(init[k], s2[k]) for k in init)  # the next one trained
    adam = torch.load(run_dir / "checkpoints" / "step_000001" / "state.pt", weights_only=True)["optimizer"]["state"]
    assert all(not s["exp_avg"].any() for s in adam.values())  # no gradient reached AdamW (saving fills zeros)


# ------------------------------------------------------------------------------------------------ 2 processes

def _fixed_batch(toy_dir, path):
    """4 questions x 2 responses written by hand: two model turns around an observation (mask 0), different
    lengths; groups 0-2 hold a right and a wrong answer (advantages +-0.707), group 3 two right ones (A = 0: no
    policy gradient, but preserved by LLDS when the others' updates lower them)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_dir / "model")
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = []
    for g, (q, gold, wrong) in enumerate([("who is a", "ann", "bob"), ("where is b", "paris", "rome"),
                                          ("what is c", "red", "blue"), ("when was d", "1999", "2001 or 2002")]):
        prompt = ro.wrap_prompt(tok, search_env.make_prompt(q))
        for k, ans in enumerate([gold, gold] if g == 3 else [gold, wrong] if g % 2 == 0 else [wrong, gold]):
            t1 = enc(f"<think> look up {q} </think><search> {q} </search>")
            obs = enc(search_env.format_observation([{"contents": f'"{q}"\n{gold} ' * (k + 1)}]))
            t2 = enc(f"<think> found it </think><answer> {ans} </answer>")
            ids = t1 + obs + t2
            traj = ro.Trajectory(group_id=g, prompt_ids=prompt, response_ids=ids,
                                loss_mask=[1] * len(t1) + [0] * len(obs) + [1] * len(t2),
                                turn_spans=[(0, len(t1)), (len(t1) + len(obs), len(ids))],
                                sample_logprobs=[0.0] * len(ids), num_searches=1, num_valid_actions=2,
                                answer=ans, text=tok.decode(ids))
            rows.append({"traj": traj.__dict__, "golds": [gold]})
    path.write_text(json.dumps(rows))


@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_two_processes_give_the_one_process_loss(toy_dir, tmp_path, mode):
    batch = tmp_path / "batch.json"
    _fixed_batch(toy_dir, batch)
    common = ["train.py", "--toy_dir", str(toy_dir), "--debug_rollouts", str(batch), "--steps", "2",
              "--prompts_per_step", "4", "--group_size", "2", "--mini_batch_size", "8", "--micro_batch_size", "1",
              "--ppo_epochs", "2", "--llds_coef", "0.2", "--kl_coef", "0.01", "--eval_start_end", "false",
              "--dist", mode]
    one = subprocess.run([sys.executable, *common, "--run_dir", str(tmp_path / "one")], cwd=ROOT, env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", *common,
                          "--run_dir", str(tmp_path / "two")], cwd=ROOT, env=_env(), capture_output=True,
                         text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert len(r1) == len(r2) == 2
    assert sum(r["llds/penalty"] for r in r1) > 0  # LLDS bites in a second epoch
    # the update moved the policy towards the right answers more than towards the wrong ones
    up = {k: r1[1][k] - r1[0][k] for k in ("lld/old_logp_pos", "lld/old_logp_neg")}
    assert up["lld/old_logp_pos"] > up["lld/old_logp_neg"], up
    for a, b in zip(r1, r2):
        assert a["rollout/reward"] == b["rollout/reward"] == 5 / 8
        for k in ("train/loss", "train/pg_loss", "llds/penalty", "train/kl_ref", "train/grad_norm",
                  "lld/old_logp_pos", "lld/old_logp_neg", "train/clipfrac_high"):
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k
        # a difference of two fp32 log-probs after two AdamW steps: compare at log-prob precision, not relatively
        assert b["lld/delta_pos"] == pytest.approx(a["lld/delta_pos"], abs=1e-5)


# ------------------------------------------------------------------------------------------------ LLD monitor

def test_death_spiral_rule():
    def hist(pos, ent, fell=0.1, gn=None):
        gn = gn or [1.0] * len(pos)
        return [{"lld/old_logp_pos": p, "lld/entropy": e, "lld/fell_action_share": fell, "train/grad_norm": g}
                for p, e, g in zip(pos, ent, gn)]
    down = [-0.50 - 0.01 * i for i in range(5)]
    up = [1.0 + 0.02 * i for i in range(5)]
    assert train.death_spiral(hist(down, up), 5).startswith("preserving log-prob falls")
    assert train.death_spiral(hist(down, up[::-1]), 5) == ""  # entropy falling: sharpening, not a spiral
    assert train.death_spiral(hist(down[::-1], up), 5) == ""
    assert train.death_spiral(hist(down, up)[:4], 5) == ""  # not enough history
    flat = [-0.5] * 5
    assert train.death_spiral(hist(flat, flat, fell=0.7, gn=[1, 1, 1, 1, 4.0]), 5).startswith("70%")
    assert train.death_spiral(hist(flat, flat, fell=0.7, gn=[1, 1, 1, 1, 2.0]), 5) == ""
    h = hist(flat, flat)
    h[-1]["lld/ref_logp_pos"] = 0.1
    assert "below the reference" in train.death_spiral(h, 5)


def _replay_warnings(rows: list[dict], window: int) -> list[int]:
    """The steps at which train.lld_warning raises the warning, fed recorded metrics rows one by one as train_step
    feeds it (a fresh run state, the window's history kept in it)."""
    run = types.SimpleNamespace(cfg=train.Config(lld_window=window),
                                state=train.Run.__dataclass_fields__["state"].default_factory())
    steps = []
    for row in rows:
        row = dict(row)
        train.lld_warning(run, row["step"], row)
        if row["lld/warning"]:
            steps.append(row["step"])
    return steps


def test_death_spiral_rule_on_recorded_runs():
    """tests/data/lld_histories.json holds the monitor's inputs and the reward, step by step (4 decimals), of real runs
    (README, "The death spiral on the toy"): spirals, runs of configs/toy_spiral_*.yaml whose reward falls below half
    its peak, and healthy runs of the demo, which never do. The rule must warn in every spiral before the fall, and
    never in a healthy run."""
    runs = json.loads((ROOT / "tests" / "data" / "lld_histories.json").read_text())
    kinds = {r["kind"] for r in runs.values()}
    assert kinds == {"spiral", "healthy"}, kinds
    for name, rec in runs.items():
        rows = rec["rows"]
        collapse = plot.summarize(rows)["collapse_step"]  # the recorded reward's own verdict, not the label's
        warns = _replay_warnings(rows, train.Config.lld_window)
        if rec["kind"] == "spiral":
            assert collapse is not None, name
            assert warns and warns[0] < collapse, (name, warns[:3], collapse)
        else:
            assert collapse is None, name
            assert warns == [], (name, warns)


def test_refuses_to_overwrite_a_run_and_to_resume_without_checkpoint(toy_dir, tmp_path):
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"steps": 2}))
    with pytest.raises(UserError) as e:
        train.main(["--toy_dir", str(toy_dir), "--run_dir", str(run_dir)])
    assert "already holds a run" in str(e.value) and "no checkpoint" in str(e.value)
    with pytest.raises(UserError) as e:
        train.main(["--resume", str(run_dir)])
    assert "no checkpoint yet" in str(e.value)
