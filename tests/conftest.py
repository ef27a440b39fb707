"""Shared fixtures: the toy world (built once, cached by the hash of toy.py) and its BM25 retriever."""
import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _toy_cache() -> Path:
    # Keyed by the builder's source, so an edit to toy.py or search_env.py rebuilds instead of testing stale files.
    h = hashlib.sha256()
    for f in ("toy.py", "search_env.py"):
        h.update((ROOT / f).read_bytes())
    return ROOT / ".cache" / f"toy-{h.hexdigest()[:12]}"


@pytest.fixture(scope="session")
def toy_dir() -> Path:
    import toy

    if os.environ.get("SEARCH_RL_TOY"):  # development only: reuse a world built elsewhere instead of rebuilding
        return Path(os.environ["SEARCH_RL_TOY"])
    out = _toy_cache()
    if not (out / "model" / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".building-"))
        shutil.rmtree(tmp)
        toy.build(tmp, seed=0)
        try:
            os.replace(tmp, out)  # atomic: a concurrent or interrupted build never leaves a half world
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another process won the race; its copy is identical
        for old in out.parent.glob("toy-*"):  # worlds built by earlier versions of the code (~20 MB each)
            if old != out:
                shutil.rmtree(old, ignore_errors=True)
    return out


@pytest.fixture(scope="session")
def bm25(toy_dir):
    import search_env

    return search_env.BM25Retriever(toy_dir / "bm25")
