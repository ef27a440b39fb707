"""eval.py: data loading, EM/F1, tables, --compare, bad inputs, and the toy test split end to end."""
import contextlib
import io
import json
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import eval as ev
import search_env
import train
from search_env import exact_match, f1_score
from utils import UserError


def cli_settings(greedy=False, **kw):
    """The rollout settings eval.py's command line uses (4 searching turns of up to 500 tokens), as train builds
    them from train.Config."""
    return train.rollout_config(train.Config(max_turns=4, max_turn_tokens=ev.PAPER_TURN_TOKENS, **kw), greedy)


def _fail(argv) -> str:
    """main(argv) must stop with a one-line `error: ...` message; returns it."""
    with pytest.raises(UserError) as e:  # utils.cli prints it as `error: <message>` and exits 2
        ev.main(argv)
    msg = f"error: {e.value}"
    assert "\n" not in msg, msg
    return msg


def _search_r1_row(source, question, golds, index, with_question=True, prompt=None):
    row = {"data_source": source,
           "prompt": [{"role": "user", "content": prompt or search_env.make_prompt(question)}],
           "ability": "fact-reasoning",
           "reward_model": {"style": "rule", "ground_truth": {"target": golds}},
           "extra_info": {"split": "test", "index": index}}
    if with_question:
        row["question"] = question
    return row


def _write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ EM / F1

@pytest.mark.parametrize("pred, golds, em, f1", [
    ("The Eiffel Tower!", ["eiffel tower"], 1.0, 1.0),              # article, case, punctuation
    ("a  cat.", ["The cat"], 1.0, 1.0),                             # whitespace collapses
    ("Paris, France", ["Paris"], 0.0, 2 / 3),                       # P = 1/2, R = 1
    ("new new york", ["New York"], 0.0, 0.8),                       # repeated token counted once: P = 2/3
    ("Zürich", ["ZÜRICH"], 1.0, 1.0),                               # unicode lowercases
    ("café", ["cafe"], 0.0, 0.0),                                   # accents are kept (SQuAD)
    ("“Hello”", ["hello"], 0.0, 0.0),                               # only ASCII punctuation is removed
    ("Obama", ["Barack Hussein Obama", "President Obama"], 0.0, 2 / 3),  # max over golds: 1/2 vs 2/3
    ("barack obama", ["Obama", "Barack Obama"], 1.0, 1.0),          # any gold matches
    (None, ["x"], 0.0, 0.0),                                        # never answered
])
def test_em_f1_hand_cases(pred, golds, em, f1):
    assert exact_match(pred, golds) == em
    assert f1_score(pred, golds) == pytest.approx(f1)


# ------------------------------------------------------------------------------------------------ data

def test_load_search_r1_parquet(tmp_path):
    odd_prompt = "Custom prompt kept byte for byte.  Question: who is x\n"
    f = _write_parquet(tmp_path / "test.parquet", [
        _search_r1_row("nq", "who wrote hamlet", ["Shakespeare", "William Shakespeare"], 0),
        _search_r1_row("hotpotqa", "who is x", ["y"], 0, with_question=False, prompt=odd_prompt),
    ])
    a, b = ev.load_qa([str(f)])
    assert a == ev.QAExample("nq_0", "who wrote hamlet", search_env.make_prompt("who wrote hamlet"),
                             ["Shakespeare", "William Shakespeare"], "nq")
    assert b.prompt == odd_prompt                 # the file's prompt, not make_prompt's
    assert b.question == "who is x"               # recovered after "Question: "
    assert (b.id, b.data_source, b.golds) == ("hotpotqa_0", "hotpotqa", ["y"])


def test_load_flashrag_jsonl_sources_dirs_and_several_files(tmp_path):
    nq = _write_jsonl(tmp_path / "flash" / "nq" / "test.jsonl", [
        {"id": "test_0", "question": "who wrote hamlet", "golden_answers": ["Shakespeare"]},
        {"id": "test_1", "question": "capital of france?", "golden_answers": ["Paris", ""]}])
    bam = _write_jsonl(tmp_path / "bamboogle.jsonl", [
        {"id": "b0", "question": "q", "golden_answers": ["a"]},
        {"question": "own source", "golden_answers": "single", "data_source": "musique"}])
    exs = ev.load_qa([str(nq), str(bam)])
    assert [e.data_source for e in exs] == ["nq", "nq", "bamboogle", "musique"]
    assert [e.id for e in exs] == ["test_0", "test_1", "b0", "musique_1"]
    assert exs[0].prompt == search_env.make_prompt("who wrote hamlet")
    assert exs[0].prompt.endswith("Question: who wrote hamlet?\n")
    assert exs[1].golds == ["Paris"]              # the empty gold is dropped
    assert exs[3].golds == ["single"]
    # a directory is the data files directly inside it (others ignored), in name order
    d = tmp_path / "mixed"
    d.mkdir()
    _write_parquet(d / "b.parquet", [_search_r1_row("triviaqa", "t", ["u"], 5)])
    _write_jsonl(d / "a.jsonl", [{"id": "1", "question": "q", "golden_answers": ["g"]}])
    (d / "notes.txt").write_text("not data")
    assert [(e.id, e.data_source) for e in ev.load_qa(str(d))] == [("1", "a"), ("triviaqa_5", "triviaqa")]


def test_spread_keeps_every_part_of_the_data():
    assert ev.spread(list(range(10)), 3) == [0, 3, 6]
    assert ev.spread(list(range(4)), 10) == [0, 1, 2, 3]
    assert ev.spread(list(range(4)), None) == [0, 1, 2, 3]


# ------------------------------------------------------------------------------------------------ tables

def _rec(src, em, f1):
    return {"data_source": src, "em": em, "f1": f1}


def test_summary_order_average_and_table():
    recs = [_rec("zeta", 1, 1), _rec("Bamboogle", 0, 0.5), _rec("nq", 1, 1), _rec("nq", 0, 0.25),
            _rec("hotpotqa", 0, 0), _rec("alpha", 1, 1), _rec("nq", 1, 1), _rec("nq", 1, 0.75)]
    res = ev.summarize(recs)
    assert list(res["per_source"]) == ["nq", "hotpotqa", "Bamboogle", "alpha", "zeta"]
    assert res["per_source"]["nq"] == {"em": 0.75, "f1": 0.75, "n": 4}
    assert res["average"] == pytest.approx({"em": (0.75 + 0 + 0 + 1 + 1) / 5,
                                            "f1": (0.75 + 0 + 0.5 + 1 + 1) / 5, "n": 8})
    assert res["micro"] == pytest.approx({"em": 5 / 8, "f1": 5.5 / 8, "n": 8})
    assert ev.format_table(res) == "\n".join([
        "| source | n | EM | F1 |", "|---|---:|---:|---:|",
        "| nq | 4 | 0.750 | 0.750 |", "| hotpotqa | 1 | 0.000 | 0.000 |", "| Bamboogle | 1 | 0.000 | 0.500 |",
        "| alpha | 1 | 1.000 | 1.000 |", "| zeta | 1 | 1.000 | 1.000 |", "| average | 8 | 0.550 | 0.650 |"])
    assert ev.flat_metrics(res)["eval/em"] == pytest.approx(0.55)
    assert ev.flat_metrics(res)["eval/nq/f1"] == 0.75


def test_compare_prints_side_by_side_with_differences(tmp_path, capsys):
    a = {"per_source": {"nq": {"em": 0.4, "f1": 0.5, "n": 10}, "popqa": {"em": 0.2, "f1": 0.3, "n": 5}},
         "average": {"em": 0.3, "f1": 0.4, "n": 15}}
    b = {"per_source": {"nq": {"em": 0.45, "f1": 0.5, "n": 10}, "musique": {"em": 0.1, "f1": 0.2, "n": 4},
                        "popqa": {"em": 0.1, "f1": 0.35, "n": 6}},
         "average": {"em": 0.2166667, "f1": 0.35, "n": 20}}
    for name, res in (("base", a), ("llds", b)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(res))
    ev.main(["--compare", str(tmp_path / "base" / "results.json"), str(tmp_path / "llds" / "results.json")])
    assert capsys.readouterr().out.strip().split("\n") == [
        "EM", "",
        "| source | base | llds | Δ llds |", "|---|---:|---:|---:|",
        "| nq | 0.400 | 0.450 | +0.050 |", "| popqa | 0.200 | 0.100 | -0.100 |", "| musique | - | 0.100 | - |",
        "| average | 0.300 | 0.217 | -0.083 |", "",
        "F1", "",
        "| source | base | llds | Δ llds |", "|---|---:|---:|---:|",
        "| nq | 0.500 | 0.500 | +0.000 |", "| popqa | 0.300 | 0.350 | +0.050 |", "| musique | - | 0.200 | - |",
        "| average | 0.400 | 0.350 | -0.050 |", "",
        "note: popqa has different question counts across runs (5 vs 6)",
        "note: musique is not in base: the averages cover different sources"]
    (tmp_path / "junk.json").write_text("[1, 2]")
    assert "is not a results.json written by eval.py" in _fail(["--compare", str(tmp_path / "junk.json")])


# ------------------------------------------------------------------------------------------------ bad input

@pytest.fixture
def good_parquet(tmp_path):
    return str(_write_parquet(tmp_path / "good.parquet", [_search_r1_row("nq", "q", ["a"], 0)]))


@pytest.fixture
def fake_model(tmp_path):
    """Looks like a model directory but cannot be loaded: a check that passes it ran before any loading."""
    d = tmp_path / "fake_model"
    d.mkdir()
    for f in ("config.json", "tokenizer.json", "model.safetensors"):
        (d / f).write_text("not loadable")
    return str(d)


def test_bad_data_files_are_named_before_the_model(tmp_path):
    nomodel = ["--model", str(tmp_path / "nowhere"), "--index", str(tmp_path)]
    rows = [_search_r1_row("nq", "q", ["a"], 0)]
    del rows[0]["reward_model"]
    f = _write_parquet(tmp_path / "nogold.parquet", rows)
    msg = _fail(nomodel + ["--data", str(f)])
    assert f"{f} has no column 'reward_model'" in msg
    rows = [_search_r1_row("nq", "q", ["a"], 0)]
    rows[0]["reward_model"] = {"style": "rule", "ground_truth": {"answer": ["a"]}}
    f = _write_parquet(tmp_path / "notarget.parquet", rows)
    assert "has no column 'reward_model.ground_truth.target'" in _fail(nomodel + ["--data", str(f)])
    f = _write_parquet(tmp_path / "emptygold.parquet", [_search_r1_row("nq", "q", ["a"], 0),
                                                         _search_r1_row("nq", "r", [], 1)])
    assert f"{f} row 1 (reward_model.ground_truth.target) has an empty gold answer list" in \
        _fail(nomodel + ["--data", str(f)])
    f = _write_jsonl(tmp_path / "nq.jsonl", [{"id": "0", "question": "q", "golden_answers": ["a"]},
                                             {"id": "1", "question": "q"}])
    assert f"{f} line 2 has no field 'golden_answers'" in _fail(nomodel + ["--data", str(f)])
    f = _write_jsonl(tmp_path / "empty.jsonl", [{"id": "0", "question": "q", "golden_answers": [""]}])
    assert f"{f} line 1 (golden_answers) has an empty gold answer list" in _fail(nomodel + ["--data", str(f)])
    assert f"--data {tmp_path / 'missing.jsonl'} does not exist" in \
        _fail(nomodel + ["--data", str(tmp_path / "missing.jsonl")])


def test_model_that_is_not_a_model(tmp_path, good_parquet):
    (tmp_path / "ckpt").mkdir()
    msg = _fail(["--model", str(tmp_path / "ckpt"), "--data", good_parquet, "--index", str(tmp_path)])
    assert msg.startswith(f"error: --model {tmp_path / 'ckpt'} is not a Hugging Face model directory "
                          "(no config.json)")


def test_index_that_does_not_exist(tmp_path, good_parquet, fake_model):
    msg = _fail(["--model", fake_model, "--data", good_parquet, "--index", str(tmp_path / "no_index")])
    assert msg.startswith(f"error: --index {tmp_path / 'no_index'}: retrieval index {tmp_path / 'no_index'} "
                          "not found")
    (tmp_path / "empty").mkdir()
    msg = _fail(["--model", fake_model, "--data", good_parquet, "--index", str(tmp_path / "empty")])
    assert msg.startswith(f"error: --index {tmp_path / 'empty'}: {tmp_path / 'empty'} is neither a Lucene index")


def test_retriever_url_that_does_not_answer(good_parquet, fake_model):
    with socket.socket() as s:  # a free loopback port, closed again: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/retrieve"
    for argv in (["--data", good_parquet], ["--question", "who wrote hamlet"]):
        msg = _fail(["--model", fake_model, "--retriever_url", url] + argv)
        assert msg.startswith(f"error: --retriever_url {url} does not answer")


def test_flag_combinations(tmp_path, good_parquet, fake_model):
    assert "exactly one of --index" in _fail(["--model", fake_model, "--data", good_parquet])
    assert "--data FILE ... to evaluate, or --question" in _fail(["--model", fake_model, "--index", "x"])
    assert "--limit must be at least 1" in _fail(["--model", fake_model, "--data", good_parquet,
                                                  "--index", str(tmp_path), "--limit", "0"])


# ------------------------------------------------------------------------------------------------ the toy world

def _main_stdout(argv) -> tuple[object, str]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        res = ev.main(argv)
    return res, buf.getvalue()


@pytest.fixture(scope="module")
def toy_run(toy_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_eval")
    res, printed = _main_stdout(["--model", str(toy_dir / "model"), "--data", str(toy_dir / "test.parquet"),
                                 "--index", str(toy_dir / "bm25"), "--limit", "60", "--batch_size", "32",
                                 "--out", str(out)])
    return out, res, printed


def test_toy_test_split_end_to_end(toy_dir, toy_run):
    out, res, printed = toy_run
    saved = json.loads((out / "results.json").read_text())
    lines = [json.loads(x) for x in (out / "trajectories.jsonl").read_text().splitlines()]
    assert saved == json.loads(json.dumps(res))
    assert saved["config"]["limit"] == 60 and saved["config"]["max_turns"] == 4 and saved["config"]["topk"] == 3
    # one line per question, the --limit spread over the file, golds as in the data
    wanted = ev.spread(ev.load_qa([str(toy_dir / "test.parquet")]), 60)
    assert [x["id"] for x in lines] == [e.id for e in wanted]
    assert [x["golds"] for x in lines] == [e.golds for e in wanted]
    assert list(saved["per_source"]) == ["toy_1hop", "toy_2hop"]
    assert sum(m["n"] for m in saved["per_source"].values()) == 60
    # every score recomputable from its line; the tables are the means of the lines
    for x in lines:
        assert x["answer"] == (search_env.extract_answer(x["text"]) if x["answered"] else None)
        assert x["em"] == exact_match(x["answer"], x["golds"]) and x["f1"] == f1_score(x["answer"], x["golds"])
    for src, m in saved["per_source"].items():
        mine = [x for x in lines if x["data_source"] == src]
        assert m["n"] == len(mine)
        assert m["em"] == pytest.approx(sum(x["em"] for x in mine) / len(mine))
        assert m["f1"] == pytest.approx(sum(x["f1"] for x in mine) / len(mine))
    ems = [m["em"] for m in saved["per_source"].values()]
    assert saved["average"]["em"] == pytest.approx(sum(ems) / len(ems))
    assert saved["micro"]["em"] == pytest.approx(sum(x["em"] for x in lines) / 60)
    assert ev.format_table(saved) in printed
    # the warm-started model searches and answers: a broken prompt, template or scorer gives zeros here
    assert saved["per_source"]["toy_1hop"]["em"] > 0.1
    assert sum(x["num_searches"] > 0 for x in lines) > 30


def test_evaluate_api_is_greedy_quiet_and_restores_train_mode(toy_dir, bm25, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(toy_dir / "model")
    tok = AutoTokenizer.from_pretrained(toy_dir / "model", padding_side="left")
    exs = ev.spread(ev.load_qa(str(toy_dir / "test.parquet")), 8)
    cfg = cli_settings(temperature=1.5)  # evaluate must decode greedily anyway
    capsys.readouterr()  # drop the loading messages
    model.train()
    a = ev.evaluate(model, tok, exs, bm25, cfg, batch_size=8, progress=False)
    assert model.training
    b = ev.evaluate(model, tok, exs, bm25, cfg, batch_size=8, progress=False)
    assert capsys.readouterr().err == ""
    assert [x["id"] for x in a["trajectories"]] == [e.id for e in exs]
    assert a["trajectories"] == b["trajectories"]  # sampling at T=1.5 would differ between two calls
    assert a["per_source"]["toy_1hop"]["n"] == sum(e.data_source == "toy_1hop" for e in exs) and a["average"]["n"] == 8


def test_single_question_prints_the_trajectory(toy_dir, bm25):
    import rollout
    from transformers import AutoModelForCausalLM, AutoTokenizer

    q = ev.load_qa(str(toy_dir / "test.parquet"))[0].question
    _, printed = _main_stdout(["--model", str(toy_dir / "model"), "--index", str(toy_dir / "bm25"),
                               "--question", q])
    model = AutoModelForCausalLM.from_pretrained(toy_dir / "model")
    tok = AutoTokenizer.from_pretrained(toy_dir / "model", padding_side="left")
    [traj] = rollout.rollout(model, tok, [search_env.make_prompt(q)], [0], bm25,
                             cli_settings(greedy=True))
    assert printed == ev.format_trajectory(q, traj, tok) + "\n"
    lines = printed.splitlines()
    assert lines[0] == f"Question: {q}"
    queries = [x[len(">>> search: "):] for x in lines if x.startswith(">>> search: ")]
    assert len(queries) == traj.num_searches >= 1
    for query in queries:  # the titles printed under a search are the retriever's top 3 for that query
        titles = [h["contents"].split("\n")[0] for h in bm25.search([query], 3)[0]]
        i = lines.index(f">>> search: {query}")
        assert lines[i + 1:i + 4] == [f"    {j}. {t}" for j, t in enumerate(titles, 1)]
    assert lines[-2] == (f"Answer: {traj.answer}" if traj.answer is not None
                         else "Answer: none (the model never answered)")


def test_format_trajectory_by_hand(toy_dir):
    """Turns built piece by piece: a search with its documents, an invalid turn, and the answer."""
    import rollout
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_dir / "model")
    hits = [{"id": "1", "contents": '"Paris"\nParis is the capital.', "score": 1.0},
            {"id": "2", "contents": '"Lyon (Rhône) city"\nLyon is a city (a big one) in France.', "score": 0.5}]
    pieces = [("<think> look it up </think>\n<search> capital of france </search>", 1),
              (search_env.format_observation(hits), 0), ("hmm", 1), (search_env.INVALID_ACTION_MSG, 0),
              ("<answer> Paris </answer>", 1)]
    ids, spans = [], []
    for text, mine in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        if mine:
            spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
    text = tok.decode(ids)
    traj = rollout.Trajectory(0, [], ids, [0] * len(ids), spans, [0.0] * len(ids), 1, 2,
                              search_env.extract_answer(text), text)
    assert ev.format_trajectory("capital of france?", traj, tok).splitlines() == [
        "Question: capital of france?", "",
        "--- turn 1 ---", "<think> look it up </think>",
        "<search> capital of france </search>", ">>> search: capital of france",
        '    1. "Paris"', '    2. "Lyon (Rhône) city"', "",
        "--- turn 2 ---", "hmm", ">>> invalid action (no <search> or <answer>)", "",
        "--- turn 3 ---", "<answer> Paris </answer>", "",
        "Answer: Paris", "(1 searches, 3 turns)"]


def test_retriever_url_run_equals_index_run(toy_dir, bm25, tmp_path):
    """The same questions through a real /retrieve server on 127.0.0.1 and through the in-process index."""
    import threading

    from transformers import AutoModelForCausalLM, AutoTokenizer


    server = search_env.make_server(bm25, port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/retrieve"
        res, _ = _main_stdout(["--model", str(toy_dir / "model"), "--data", str(toy_dir / "test.parquet"),
                               "--retriever_url", url, "--limit", "10", "--batch_size", "10",
                               "--out", str(tmp_path)])
    finally:
        server.shutdown()
        server.server_close()
    via_url = [json.loads(x) for x in (tmp_path / "trajectories.jsonl").read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(toy_dir / "model")
    tok = AutoTokenizer.from_pretrained(toy_dir / "model", padding_side="left")
    exs = ev.spread(ev.load_qa(str(toy_dir / "test.parquet")), 10)
    direct = ev.evaluate(model, tok, exs, bm25, cli_settings(), batch_size=10, progress=False)
    assert via_url == direct["trajectories"]
    assert res["per_source"] == direct["per_source"] and res["config"]["retriever_url"] == url
    assert sum(x["num_searches"] for x in via_url) > 0  # the server was used
