"""The toy world: formats, determinism, question design, bad --out, and the warm start's held-out EM.

The EM test runs a plain generate-and-search loop (greedy `generate` per turn on the full context, stopping at
</search> or </answer>), independent of rollout.py, so a bug there cannot hide a bad warm start here.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

import search_env
import toy

ROOT = Path(__file__).resolve().parent.parent
FILES = ["corpus.jsonl", "train.parquet", "test.parquet", "model/config.json", "model/generation_config.json",
         "model/model.safetensors", "model/tokenizer.json", "model/tokenizer_config.json", "model/warm_start.json"]


def _rows(path):
    import pandas as pd

    df = pd.read_parquet(path)
    return df.to_dict("records")


def _question(prompt: str) -> str:
    return prompt.rsplit("Question: ", 1)[1].strip()


def _norm_words(s: str) -> str:
    return " " + search_env.normalize_answer(s) + " "


def test_files_and_formats(toy_dir):
    for f in FILES:
        assert (toy_dir / f).is_file(), f
    docs = [json.loads(line) for line in open(toy_dir / "corpus.jsonl")]
    assert len(docs) == toy.N_PASSAGES
    assert len({d["id"] for d in docs}) == len(docs)
    for d in docs:
        assert set(d) == {"id", "contents"}
        assert re.fullmatch(r'"[^"\n]+"\n[^\n]+', d["contents"]), d
    table = pq.read_table(toy_dir / "test.parquet")
    assert table.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    test, train = _rows(toy_dir / "test.parquet"), _rows(toy_dir / "train.parquet")
    assert len(test) == sum(toy.N_TEST.values()) == 200 and len(train) > 2000
    assert sum(r["data_source"] == "toy_2hop" for r in test) == toy.N_TEST["toy_2hop"]
    for split, rows in (("train", train), ("test", test)):
        assert {r["data_source"] for r in rows} == {"toy_1hop", "toy_2hop"}
        for i, r in enumerate(rows):
            (msg,) = r["prompt"]
            assert msg["role"] == "user" and msg["content"] == search_env.make_prompt(_question(msg["content"]))
            assert r["reward_model"]["style"] == "rule"
            assert len(r["reward_model"]["ground_truth"]["target"]) == 1
            assert r["extra_info"]["split"] == split and r["extra_info"]["index"] == i
    qtrain = {_question(r["prompt"][0]["content"]) for r in train}
    qtest = [_question(r["prompt"][0]["content"]) for r in test]
    assert len(set(qtest)) == len(qtest) and not qtrain & set(qtest)


def test_answers_absent_from_questions(toy_dir):
    for name in ("train.parquet", "test.parquet"):
        for r in _rows(toy_dir / name):
            q = _norm_words(_question(r["prompt"][0]["content"]))
            for gold in r["reward_model"]["ground_truth"]["target"]:
                assert _norm_words(gold) not in q, (q, gold)


def test_two_hop_chains_resolve_only_through_the_corpus(toy_dir, bm25):
    """Search the subject, read the bridge off its passage, search the bridge, find the gold in its passage.
    The gold is nowhere in the question nor in the subject's passage: one search cannot answer."""
    rows = [r for r in _rows(toy_dir / "test.parquet") if r["data_source"] == "toy_2hop"]
    relations = {v: k for k, v in toy.RELATIONS.items()}
    n = 0
    for r in rows:
        q, gold = _question(r["prompt"][0]["content"]), r["reward_model"]["ground_truth"]["target"][0]
        m = re.fullmatch(r"What is the (.+) of the (.+) of (.+)\?", q)
        assert m and m.group(1) in relations and m.group(2) in relations, q
        subject, bridge_rel = m.group(3), m.group(2)
        first = {search_env.split_contents(h["contents"])[0]: h["contents"] for h in bm25.search([subject], 3)[0]}
        own = first[f'"{subject}"']  # the subject's own passage is among the top 3
        assert _norm_words(gold) not in _norm_words(own)
        bridge = re.search(rf"{subject}: {bridge_rel} ([^.]+)\.", own).group(1)
        assert _norm_words(bridge) not in _norm_words(q)
        second = {search_env.split_contents(h["contents"])[0]: h["contents"] for h in bm25.search([bridge], 3)[0]}
        assert _norm_words(gold) in _norm_words(second[f'"{bridge}"'])
        n += 1
    assert n == toy.N_TEST["toy_2hop"]


def test_model_and_tokenizer_load(toy_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(toy_dir / "model")
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.tie_word_embeddings
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.eos_token_id != tok.pad_token_id
    assert model.config.eos_token_id == tok.eos_token_id and model.config.vocab_size == len(tok)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # tags are plain text (several ordinary tokens), and byte-level round trips are exact
    obs = search_env.format_observation([{"id": "1", "contents": '"Ab Cd"\nAb Cd was born in  Ef.\n', "score": 1.0}])
    for s in (obs, "<search> Ab </search>", search_env.INVALID_ACTION_MSG):
        ids = tok.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == s and not set(ids) & set(tok.all_special_ids)
    # the loss mask of a scripted trajectory covers the model's turns and EOS, never prompt or observation
    ids, mask = toy.encode_trajectory(tok, "Q?", [("<search> Ab </search>", True), (obs, False), ("<answer> Ef </answer>", True)])
    mine = tok.decode([i for i, m in zip(ids, mask) if m])
    assert mine == "<search> Ab </search><answer> Ef </answer><|im_end|>"
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok)) and torch.isfinite(logits).all()


def test_same_seed_same_bytes(toy_dir, tmp_path, bm25):
    again = toy.build(tmp_path / "again", seed=0)
    files = sorted(p.relative_to(toy_dir) for p in toy_dir.rglob("*") if p.is_file() and "bm25" not in p.parts)
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file() and "bm25" not in p.parts)
    for f in files:
        assert (toy_dir / f).read_bytes() == (again / f).read_bytes(), f
    # Lucene stores random segment ids, so bm25/ is compared by what it returns
    queries = [json.loads(line)["contents"].split("\n")[0].strip('"') for line in open(toy_dir / "corpus.jsonl")][:200]
    again_bm25 = search_env.BM25Retriever(again / "bm25")
    assert again_bm25.search(queries, 3) == bm25.search(queries, 3)
    # another seed gives another world
    assert toy.make_corpus(toy.make_world(toy.random.Random(1)), toy.random.Random(1)) != \
        [json.loads(line) for line in open(toy_dir / "corpus.jsonl")]


@pytest.mark.parametrize("case", ["non-empty", "parent-is-a-file"])
def test_bad_out_is_one_line_and_changes_nothing(tmp_path, case):
    if case == "non-empty":
        out = tmp_path / "full"
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    else:
        (tmp_path / "afile").write_text("x")
        out = tmp_path / "afile" / "world"
    before = sorted((p.name, p.stat().st_size) for p in tmp_path.rglob("*"))
    res = subprocess.run([sys.executable, str(ROOT / "toy.py"), "--out", str(out)], capture_output=True,
                         text=True, cwd=ROOT)
    assert res.returncode != 0
    assert len(res.stderr.strip().splitlines()) == 1 and str(out) in res.stderr, res.stderr
    assert sorted((p.name, p.stat().st_size) for p in tmp_path.rglob("*")) == before


# ----------------------------------------------------------------------------------------- warm-start evaluation
STOPS = ("</search>", "</answer>")


def _cut_at_stop(tok, new_ids: list[int]) -> list[int]:
    """The turn's tokens up to the first closing tag (or EOS); later tokens are discarded (docs/protocol.md §1.2)."""
    out = []
    for t in new_ids:
        if t == tok.pad_token_id:
            break
        out.append(t)
        if t == tok.eos_token_id or any(s in tok.decode(out[-12:]) for s in STOPS):
            break
    return out


def greedy_search_eval(model, tok, retriever, rows, max_turns=4, max_new_tokens=64, topk=3):
    """Greedy generate-and-search loop over Search-R1 rows; returns per-row (em, searches, answered)."""
    ctx = [tok.encode(tok.apply_chat_template([r["prompt"][0]], tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False) for r in rows]
    resp = [[] for _ in rows]
    searches, done = [0] * len(rows), [False] * len(rows)
    answers = [None] * len(rows)  # from the answer action only: the invalid-action message holds an answer tag
    for turn in range(max_turns + 1):
        live = [i for i in range(len(rows)) if not done[i]]
        if not live:
            break
        T = max(len(ctx[i]) + len(resp[i]) for i in live)
        ids = torch.full((len(live), T), tok.pad_token_id)
        att = torch.zeros((len(live), T), dtype=torch.long)
        for r, i in enumerate(live):  # left padding
            seq = ctx[i] + resp[i]
            ids[r, T - len(seq):], att[r, T - len(seq):] = torch.tensor(seq), 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=att, max_new_tokens=max_new_tokens, do_sample=False,
                                 stop_strings=list(STOPS), tokenizer=tok, pad_token_id=tok.pad_token_id)
        queries, waiting = [], []
        for r, i in enumerate(live):
            new = _cut_at_stop(tok, gen[r, T:].tolist())
            resp[i] += new
            kind, content = search_env.parse_action(tok.decode(new, skip_special_tokens=True))
            if kind == "search" and turn < max_turns:
                queries.append(content)
                waiting.append(i)
            elif kind is None and turn < max_turns:  # no action, EOS or the cap: Search-R1's invalid action
                if new and new[-1] == tok.eos_token_id:
                    resp[i].pop()  # Search-R1 re-tokenises the turn's text: the EOS does not stay
                resp[i] += tok.encode(search_env.INVALID_ACTION_MSG, add_special_tokens=False)
            else:
                done[i] = True
                answers[i] = content if kind == "answer" else None
        for i, hits in zip(waiting, retriever.search(queries, topk) if queries else []):
            searches[i] += 1
            resp[i] += tok.encode(search_env.format_observation(hits), add_special_tokens=False)
    out = []
    for r, i in zip(rows, range(len(rows))):
        golds = list(r["reward_model"]["ground_truth"]["target"])
        out.append((search_env.exact_match(answers[i], golds), searches[i], answers[i] is not None))
    return out


def test_warm_start_record(toy_dir):
    """warm_start.json says how the model was trained and that the SFT reached the regime: every relation's copy
    formed. The builds measured for the README (seeds 0-2) read every relation but mentor at 0.97-1.0 and mentor at
    0.60-0.75; a run that lost a relation reads it at ~0 while its loss (0.07-0.11) overlaps a good build's
    (0.04-0.11), which is why the record carries `reading` and the loss bound is loose."""
    rec = json.loads((toy_dir / "model" / "warm_start.json").read_text())
    assert rec["seed"] == 0 and rec["threads"] == toy.SFT["threads"] == 2 and rec["sft"] == toy.SFT
    assert len(rec["loss_every_25"]) == -(-toy.SFT["steps"] // 25) and rec["loss_every_25"][0] > 5  # ~ln(4096)
    assert rec["loss_last50"] < 0.15
    reading = rec["reading"]
    assert set(reading) == set(toy.RELATIONS) and all(r["n"] > 0 for r in reading.values())
    assert all(r["acc"] >= 0.9 for rel, r in reading.items() if rel != "mentor"), reading
    assert reading["mentor"]["acc"] >= 0.3, reading  # the weak copy; a lost one reads ~0


def test_warm_start_leaves_room_for_rl(toy_dir, bm25):
    """Held-out greedy EM between 10% and 50%, at least one search per question, nearly always a valid answer; the
    copies formed: one-hop questions about people (read off the passage in every script) are mostly right."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(toy_dir / "model").eval()
    rows = _rows(toy_dir / "test.parquet")[:100]
    res = greedy_search_eval(model, tok, bm25, rows)
    for src in ("toy_1hop", "toy_2hop"):
        sub = [x for r, x in zip(rows, res) if r["data_source"] == src]
        print(f"{src}: n={len(sub)} EM={sum(x[0] for x in sub) / len(sub):.3f} "
              f"searches/q={sum(x[1] for x in sub) / len(sub):.2f}")
    em = sum(x[0] for x in res) / len(res)
    print(f"all: EM={em:.3f} searches/q={sum(x[1] for x in res) / len(res):.2f}")
    assert 0.10 <= em <= 0.50
    people = [x[0] for r, x in zip(rows, res) if r["data_source"] == "toy_1hop"
              and re.match(r"What is the (birth city|mentor|employer) of \w+\?$", _question(r["prompt"][0]["content"]))]
    print(f"one-hop about people: n={len(people)} EM={sum(people) / len(people):.3f}")
    assert len(people) >= 20 and sum(people) / len(people) >= 0.75  # a build that lost one copy: 0.49-0.53
    assert sum(x[1] for x in res) / len(res) >= 1.0
    assert sum(x[2] for x in res) / len(res) >= 0.9


def test_reading_check_scores_what_the_passage_says(toy_dir, bm25):
    """toy.reading_check scores the token the passage gives: on the seed-0 warm start birth cities read at >= 0.9, and
    when every observed passage names another birth city than the script's, the same check falls to <= 0.1 (a check
    that scored memory, or the wrong position, would not move)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(toy_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(toy_dir / "model").eval()
    world = toy.make_world(toy.random.Random(0))  # build's first draws: the world of the seed-0 build
    qs = [q for q in toy.make_questions(world) if q["split"] == "test" and q["question"].startswith(
        "What is the birth city of")][:40]
    subjects = [q["hops"][0][0] for q in qs]
    hits = dict(zip(subjects, bm25.search(subjects, 3)))
    cities = world["cities"]
    other = {c: cities[(i + 1) % len(cities)] for i, c in enumerate(cities)}
    real = toy.reading_check(model, tok, qs, lambda s: search_env.format_observation(hits[s]))
    moved = toy.reading_check(model, tok, qs, lambda s: re.sub(
        r"(: birth city )(\w+)", lambda m: m.group(1) + other[m.group(2)], search_env.format_observation(hits[s])))
    assert set(real) == set(moved) == {"born_city"} and real["born_city"]["n"] == len(qs) == 40
    assert real["born_city"]["acc"] >= 0.9, real
    assert moved["born_city"]["acc"] <= 0.1, moved


def test_drill_leaves_the_choice_to_read_on_out_of_the_loss(toy_dir):
    """A drill is the reading path of a two-hop question with the tokens that choose to read on ("<think> X: employer")
    out of the loss: the same token ids as the plain reading path, and a mask that differs exactly there. So the
    greedy habit's share is set by the other scripts alone, while every drill trains the rest of the path."""
    from transformers import AutoTokenizer

    class Draw:  # rng stand-in: the first draw decides the drill, then the fixed choices
        def __init__(self, u):
            self.u = u

        def random(self):
            return self.u

    tok = AutoTokenizer.from_pretrained(toy_dir / "model")
    world = toy.make_world(toy.random.Random(0))
    q = next(q for q in toy.make_questions(world) if q["source"] == "toy_2hop")
    observe = lambda s: search_env.format_observation([{"id": "1", "contents": f'"{s}"\n{s} is here.'}])  # noqa: E731
    drill = toy.script(q, observe, Draw(0.0))  # 0.0 < DRILL_FRAC: a drill
    plain = toy.script(q, observe, None)  # the reading path, every model token a target
    read_on = toy.script(q, observe, Draw(0.99))  # not a drill, and 0.99 >= SHORTCUT_FRAC: reads on, all targets
    assert "".join(t for t, _ in drill) == "".join(t for t, _ in plain) == "".join(t for t, _ in read_on)
    (ids_d, mask_d), (ids_p, mask_p) = toy.encode_trajectory(tok, "Q?", drill), toy.encode_trajectory(tok, "Q?", plain)
    assert ids_d == ids_p
    off = [i for i, (a, b) in enumerate(zip(mask_d, mask_p)) if a != b]
    bridge_rel = q["hops"][0][1].split(": ", 1)[1].rsplit(" ", 1)[0]  # e.g. "employer"
    assert tok.decode([ids_p[i] for i in off]) == f"<think> {q['hops'][0][0]}: {bridge_rel}"
    assert all(mask_p[i] == 1 and mask_d[i] == 0 for i in off)
    assert toy.encode_trajectory(tok, "Q?", read_on) == (ids_p, mask_p)
