"""Bad input at the command-line boundary: each class of mistake gets one line, `error: <input> <what is wrong>;
<what to do>`, exit status 2, before anything heavy loads, and leaves nothing behind."""
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import eval as ev
import search_env as se
import train
import utils
from utils import UserError

ROOT = Path(__file__).resolve().parent.parent


def _cli(*argv, cwd=ROOT) -> str:
    """Run a command; it must exit 2 with exactly one stderr line `error: ...`, which is returned."""
    p = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=cwd, timeout=120,
                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (p.returncode, p.stderr[-2000:])
    return lines[0]


def _tree(d: Path) -> list:
    return sorted((str(p.relative_to(d)), p.stat().st_size if p.is_file() else -1) for p in d.rglob("*"))


def test_every_command_says_one_line_and_exits_2(tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"id": "1"}\n')
    msg = _cli("train.py", "--top_p", "0", "--run_dir", tmp_path / "run")
    assert msg.startswith("error: top_p=0.0: must be in (0, 1]")
    msg = _cli("eval.py", "--model", tmp_path / "nomodel", "--question", "q", "--index", tmp_path)
    assert msg.startswith(f"error: --model {tmp_path / 'nomodel'} is not a Hugging Face model directory")
    msg = _cli("search_env.py", "index", "--corpus", tmp_path / "corpus.jsonl", "--out", tmp_path / "idx")
    assert msg.startswith(f"error: {tmp_path / 'corpus.jsonl'} line 1: not a JSON object with 'id' and 'contents'")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "mine.txt").write_text("x")
    msg = _cli("toy.py", "--out", tmp_path / "full")
    assert msg == f"error: --out {tmp_path / 'full'} is not empty; give a fresh folder or pass --force to replace it"
    msg = _cli("toy.py", "--out", tmp_path / "world", "--threads", "0")
    assert msg == "error: --threads must be at least 1, got 0"
    assert _tree(tmp_path) == [("corpus.jsonl", 12), ("full", -1), ("full/mine.txt", 1)]


@pytest.mark.parametrize("flag,value,says", [
    ("top_p", "0", "top_p=0.0: must be in (0, 1]"), ("max_turn_tokens", "0", "max_turn_tokens=0: must be at least 1"),
    ("rollout_batch_size", "-1", "rollout_batch_size=-1: must be at least 0"),
    ("eval_batch_size", "0", "eval_batch_size=0: must be at least 1"), ("lr", "-1", "lr=-1.0: must be a finite"),
    ("topk", "0", "topk=0: must be at least 1"), ("keep_checkpoints", "0", "keep_checkpoints=0: must be at least 1"),
    ("lr", "nan", "lr=nan: must be a finite"), ("warmup_ratio", "2", "warmup_ratio=2.0: must be in [0, 1]")])
def test_flags_are_checked_with_the_config(flag, value, says):
    with pytest.raises(UserError) as e:
        train.parse_config([f"--{flag}", value])
    assert str(e.value).startswith(says)


def test_max_obs_tokens_is_refused_before_the_model_loads(toy_dir, tmp_path):
    with pytest.raises(UserError) as e:
        train.main(["--toy_dir", str(toy_dir), "--run_dir", str(tmp_path / "run"), "--max_obs_tokens", "3"])
    assert str(e.value).startswith("max_obs_tokens=3 cannot hold the closing '</information>'")
    assert not (tmp_path / "run").exists()


def test_failed_start_leaves_no_run_and_checkpoints_are_kept_durably(toy_dir, tmp_path, monkeypatch):
    run = tmp_path / "run"
    bad = tmp_path / "model"
    shutil.copytree(toy_dir / "model", bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    argv = ["--toy_dir", str(toy_dir), "--run_dir", str(run), "--model", str(bad)]
    with pytest.raises(UserError) as e:
        train.main(argv)
    assert str(e.value).startswith(f"--model {bad / 'model.safetensors'} is not a whole safetensors file")
    assert not run.exists()  # so the corrected command is not refused as "already holds a run"

    # keep < 1 from a caller of save_checkpoint still keeps the checkpoint `latest` names
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(toy_dir / "model")
    tok = AutoTokenizer.from_pretrained(toy_dir / "model")
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    for step in (1, 2):
        utils.save_checkpoint(run, step, model, tok, opt, sched, {}, keep=0)
    assert utils.latest_checkpoint(run) == run / "checkpoints" / "step_000002"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002"]

    # a full disk: the kernel refuses writes past 1 MB (the 3 MB weights fail); one line, no partial folder, and
    # the previous checkpoint is still the one `latest` names
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, hard))
    try:
        with pytest.raises(UserError) as e:
            utils.save_checkpoint(run, 3, model, tok, opt, sched, {}, keep=1)
        with pytest.raises(UserError) as e2:
            utils.write_atomic(tmp_path / "big.bin", b"x" * 2_000_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert str(e.value).startswith(f"checkpoint {run / 'checkpoints' / 'step_000003'} could not be written (")
    assert str(e.value).endswith(f"free disk space, then continue with --resume {run}") and "\n" not in str(e.value)
    assert str(e2.value) == f"{tmp_path / 'big.bin'} could not be written (File too large); free disk space and run again"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002"]
    assert not (tmp_path / "big.bin").exists() and not (tmp_path / "big.bin.tmp").exists()
    assert utils.latest_checkpoint(run) == run / "checkpoints" / "step_000002"

    # write, fsync the file, rename, fsync the folder: the order that survives a power loss
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd)))
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b)))
    utils.write_atomic(tmp_path / "x.json", "{}")
    assert events == [("fsync", str(tmp_path / "x.json.tmp")), ("replace", str(tmp_path / "x.json")),
                      ("fsync", str(tmp_path))]
    # and it is the project's only way to put a file in place
    own = [f.name for f in ROOT.glob("*.py") if f.name != "utils.py" and "os.replace(" in f.read_text()]
    assert own == []


def _parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _jsonl_bytes(path, lines: list[bytes]):
    path.write_bytes(b"".join(x + b"\n" for x in lines))
    return path


def test_question_files_refuse_what_cannot_be_right(tmp_path):
    gt = {"ground_truth": {"target": ["paris"]}}
    f = _parquet(tmp_path / "plain.parquet", [{"data_source": "nq", "prompt": "Question: x?", "reward_model": gt}])
    with pytest.raises(UserError, match=r"plain.parquet row 0: prompt must be a list of chat messages"):
        ev.load_qa(f)
    f = _parquet(tmp_path / "nocontent.parquet",
                 [{"data_source": "nq", "prompt": [{"role": "user"}], "reward_model": gt}])
    with pytest.raises(UserError, match=r"nocontent.parquet row 0: prompt must be a list of chat messages"):
        ev.load_qa(f)
    good = b'{"id": "a", "question": "q?", "golden_answers": ["x"]}'
    for name, bad, says in [
        ("latin1", b'{"id": "b", "question": "caf\xe9?", "golden_answers": ["x"]}', "line 2 is not UTF-8"),
        ("null", b'{"id": "b", "question": null, "golden_answers": ["x"]}', "line 2: question must be a string, "
                                                                             "got NoneType"),
        ("list", b'{"id": "b", "question": ["q"], "golden_answers": ["x"]}', "line 2: question must be a string"),
        ("object", b'{"id": "b", "question": "q", "golden_answers": [{"a": 1}]}', "line 2 (golden_answers) holds "
                                                                                  "a dict"),
        ("dup", b'{"id": "a", "question": "q", "golden_answers": ["x"]}', "line 2: id 'a' is also the id of line 1"),
        ("surrogate", b'{"id": "b", "question": "q\\ud800", "golden_answers": ["x"]}', "line 2: question holds a "
                                                                                      "lone surrogate")]:
        f = _jsonl_bytes(tmp_path / f"{name}.jsonl", [good, bad])
        with pytest.raises(UserError) as e:
            ev.load_qa(f, flag="--train_data")
        assert str(e.value).startswith(f"{f} {says}"), e.value
        assert "\n" not in str(e.value)


def test_index_refuses_bad_corpora_before_the_jvm_and_leaves_nothing(tmp_path):
    c = tmp_path / "c.jsonl"
    c.write_text('{"id": "1", "contents": "ok"}\n{"id": "2", "contents": null}\n')
    out = tmp_path / "idx"
    msg = _cli("search_env.py", "index", "--corpus", c, "--out", out)
    assert msg.startswith(f"error: {c} line 2: contents must be a string, got NoneType")
    assert _tree(tmp_path) == [("c.jsonl", c.stat().st_size)]  # no idx, no idx.tmp
    for lines, says in [([b'{"id": "1", "contents": "a"}', b'{"id": 1, "contents": "b"}'],
                         "line 2: id '1' is also the id of line 1"),
                        ([b'{"id": "1", "contents": 7}'], "line 1: contents must be a string, got int"),
                        ([b'{"id": "1", "contents": "caf\xe9"}'], "line 1 is not UTF-8"),
                        ([b'{"id": null, "contents": "a"}'], "line 1: id must be a string or an integer"),
                        ([b"", b"  "], "has no passages")]:
        _jsonl_bytes(c, lines)
        with pytest.raises(UserError) as e:
            se.build_bm25_index(c, out, progress=False)
        assert says in str(e.value)
        assert not out.exists() and not (tmp_path / "idx.tmp").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert _cli("search_env.py", "index", "--corpus", c, "--out", tmp_path / "full").startswith(
        f"error: --out {tmp_path / 'full'} is not empty")


def test_eval_outputs_are_one_set_and_question_is_checked(toy_dir, tmp_path):
    out = tmp_path / "ev"
    out.mkdir()
    ev.write_outputs(out, [{"id": "a"}] * 20, {"per_source": {}, "average": {}})
    with pytest.raises(TypeError):  # killed between the two files: here, a summary that cannot be written
        ev.write_outputs(out, [{"id": "b"}] * 10, {"per_source": {}, "average": {}, "bad": object()})
    rows = (out / "trajectories.jsonl").read_text().splitlines()
    assert len(rows) == 10 and not (out / "results.json").exists()  # no summary of 20 beside 10 trajectories
    assert sorted(p.name for p in out.iterdir()) == ["trajectories.jsonl"]
    ev.write_outputs(out, [{"id": "c"}] * 10, {"per_source": {}, "average": {}})
    assert json.loads((out / "results.json").read_text())["trajectories"] == {"file": "trajectories.jsonl",
                                                                             "rows": 10}

    base = ["--model", str(toy_dir / "model"), "--index", str(toy_dir / "bm25")]
    with pytest.raises(UserError) as e:
        ev.main(base + ["--question", "who\ud800"])
    assert str(e.value).startswith("--question: the question holds a lone surrogate")
    with pytest.raises(UserError) as e:
        ev.main(base + ["--question", "who wrote " * 3000])
    assert str(e.value).startswith("--question is ") and "beyond the model's context of 4096 tokens" in str(e.value)


def test_model_directories_that_are_not_a_causal_lm(toy_dir, tmp_path):
    m = tmp_path / "m"
    shutil.copytree(toy_dir / "model", m)
    cfg = json.loads((m / "config.json").read_text())
    (m / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertModel"]}))
    with pytest.raises(UserError, match=r"is a BertModel, not a causal language model"):
        ev.check_model_files(str(m))
    (m / "config.json").write_text(json.dumps({**cfg, "intermediate_size": cfg["intermediate_size"] * 2}))
    ev.check_model_files(str(m))  # the headers are whole: only loading sees the shapes
    tok = ev.load_tokenizer(str(m))
    with pytest.raises(UserError) as e:
        ev.load_causal_lm(str(m), torch.float32, tok)
    assert str(e.value).startswith(f"--model {m}: weight tensors are of the wrong shape for its config.json"), e.value
    (m / "config.json").write_text(json.dumps(cfg))
    with open(m / "model.safetensors", "r+b") as f:
        f.truncate(os.path.getsize(m / "model.safetensors") // 2)
    msg = _cli("eval.py", "--model", m, "--question", "who?", "--index", toy_dir / "bm25")
    assert msg.startswith(f"error: --model {m / 'model.safetensors'} is not a whole safetensors file")


def test_bench_names_a_missing_toy_world(tmp_path):
    msg = _cli("bench/rollout.py", "--toy-dir", tmp_path / "nowhere")
    assert msg.startswith(f"error: --toy-dir {tmp_path / 'nowhere'} is not a built toy world")
    assert list(tmp_path.iterdir()) == []
