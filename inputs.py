"""Everything a run reads, checked at the door: the questions (docs/protocol.md §3), a model directory, the retriever.

train.py and eval.py both load their inputs here, so a bad one is refused with the same one-line message
(`BadInput`, a `utils.UserError`) before anything slow starts.

Questions. A Search-R1 parquet row gives data_source, prompt, reward_model.ground_truth.target; the question is its
`question` column when present, else the prompt text after the last "Question: ". A FlashRAG JSONL row gives id,
question, golden_answers (its prompt is built by search_env.make_prompt, docs/protocol.md §1.1); its data_source is
the row's own `data_source` field if any, else the file's stem, or the folder's name when the stem is a split name
(nq/test.jsonl -> "nq", bamboogle.jsonl -> "bamboogle"). A directory stands for the .parquet and .jsonl files
directly inside it. Gold answers that are empty strings are dropped (an empty answer would match them); a row left
with none is an error.

Model directories: the cheap checks (files present, config.json names a causal LM, safetensors headers whole)
come before loading; loading refuses weights that do not fit the config or the tokenizer.
"""
import json
import os
from dataclasses import dataclass
from pathlib import Path

import search_env
from utils import UserError

SPLIT_NAMES = {"train", "dev", "test", "val", "valid", "validation"}
DATA_SUFFIXES = (".parquet", ".jsonl")


class BadInput(UserError, ValueError):
    """An input the user must fix (utils.cli prints it as one line and exits 2)."""


@dataclass
class QAExample:
    id: str
    question: str
    prompt: str          # the parquet's prompt[0]["content"] when present, else make_prompt(question)
    golds: list[str]
    data_source: str


# ---------------------------------------------------------------------------------------------------------
# Data

def _data_files(paths, flag: str) -> list[Path]:
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix in DATA_SUFFIXES and f.is_file())
            if not found:
                raise BadInput(f"{flag} {p} is a directory with no .parquet or .jsonl file in it")
            files += found
        elif not p.exists():
            raise BadInput(f"{flag} {p} does not exist")
        elif p.suffix not in DATA_SUFFIXES:
            raise BadInput(f"{flag} {p} is neither Search-R1 .parquet nor FlashRAG .jsonl")
        else:
            files.append(p)
    return files


def check_text(value, where: str, what: str) -> str:
    """`value` if it is a non-empty string that UTF-8 can encode; a null, a number or a list is refused, not
    turned into the string 'None' or '[...]'."""
    if not isinstance(value, str):
        raise BadInput(f"{where}: {what} must be a string, got {type(value).__name__} {str(value)[:80]!r}; fix "
                       "or drop that row")
    if not value.strip():
        raise BadInput(f"{where}: {what} is empty; fix or drop that row")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, e.g. JSON "\ud800": no tokenizer can encode it
        raise BadInput(f"{where}: {what} holds a lone surrogate (not Unicode text); fix that row") from None
    return value


def _golds(value, where: str) -> list[str]:
    """A list of answer strings (a bare string is one answer). Empty strings are dropped (departure 4)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise BadInput(f"{where} must be a list of answer strings, got {type(value).__name__}; fix that row")
    for g in value:
        if not isinstance(g, str):
            raise BadInput(f"{where} holds a {type(g).__name__} {str(g)[:80]!r} where an answer string belongs; "
                           "fix that row")
    golds = [g for g in value if g.strip()]
    if not golds:
        raise BadInput(f"{where} has an empty gold answer list; fix or drop that row")
    return golds


def _struct_has(t, path) -> bool:
    import pyarrow as pa

    for name in path:
        if not pa.types.is_struct(t) or t.get_field_index(name) < 0:
            return False
        t = t.field(name).type
    return True


def _prompt_text(prompt, where: str) -> str | None:
    """A Search-R1 prompt is a list of chat messages; the first one's content is the prompt text."""
    if prompt is None:
        return None
    if not isinstance(prompt, list) or not prompt or not isinstance(prompt[0], dict) or "content" not in prompt[0]:
        raise BadInput(f"{where}: prompt must be a list of chat messages [{{'role': 'user', 'content': ...}}], got "
                       f"{str(prompt)[:80]!r}; write it as Search-R1's data scripts do")
    return check_text(prompt[0]["content"], where, "prompt[0].content")


def _load_parquet(f: Path) -> list[QAExample]:
    import pyarrow.parquet as pq

    need = "(a Search-R1 parquet needs data_source, prompt, reward_model.ground_truth.target)"
    try:
        schema = pq.read_schema(f)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise BadInput(f"{f} is not a readable parquet file ({str(e).splitlines()[0]})") from None
    names = set(schema.names)
    for col in ["data_source", "reward_model"] + ([] if "question" in names else ["prompt"]):
        if col not in names:
            raise BadInput(f"{f} has no column '{col}' {need}")
    if not _struct_has(schema.field("reward_model").type, ("ground_truth", "target")):
        raise BadInput(f"{f} has no column 'reward_model.ground_truth.target' {need}")
    cols = [c for c in ("id", "data_source", "question", "prompt", "reward_model", "extra_info") if c in names]
    out = []
    for i, r in enumerate(pq.read_table(f, columns=cols).to_pylist()):
        where = f"{f} row {i}"
        golds = _golds(((r["reward_model"] or {}).get("ground_truth") or {}).get("target"),
                       f"{where} (reward_model.ground_truth.target)")
        source = check_text(r["data_source"], where, "data_source")
        prompt = _prompt_text(r.get("prompt"), where)
        question = r.get("question")
        if question is None and prompt and "Question: " in prompt:
            question = prompt.rsplit("Question: ", 1)[1].strip()
        if question is None:
            raise BadInput(f"{where} has no question: no 'question' column and no 'Question: ' in its prompt")
        question = check_text(question, where, "question")
        index = (r.get("extra_info") or {}).get("index")
        qid = r.get("id") or f"{source}_{i if index is None else index}"
        out.append(QAExample(str(qid), question, prompt or search_env.make_prompt(question), golds, source))
    return out


def _source_of(f: Path) -> str:
    return f.parent.name if f.stem.lower() in SPLIT_NAMES and f.parent.name else f.stem


def _load_jsonl(f: Path) -> list[QAExample]:
    out, source, seen = [], _source_of(f), {}
    with open(f, "rb") as fh:
        for n, raw in enumerate(fh, 1):
            where = f"{f} line {n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadInput(f"{where} is not UTF-8 (byte {e.start}); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except ValueError as e:
                raise BadInput(f"{where} is not valid JSON ({e})") from None
            for col in ("question", "golden_answers"):
                if not isinstance(r, dict) or col not in r:
                    raise BadInput(f"{where} has no field '{col}' (a FlashRAG JSONL row needs id, question, "
                                   "golden_answers)")
            question = check_text(r["question"], where, "question").strip()
            golds = _golds(r["golden_answers"], f"{where} (golden_answers)")
            src = check_text(r["data_source"], where, "data_source") if r.get("data_source") is not None else source
            if "id" in r:
                if not isinstance(r["id"], (str, int)) or isinstance(r["id"], bool):
                    raise BadInput(f"{where}: id must be a string or an integer, got {r['id']!r}; fix that row")
                qid = str(r["id"])
                if qid in seen:
                    raise BadInput(f"{where}: id {qid!r} is also the id of line {seen[qid]}; give each row its "
                                   "own id")
                seen[qid] = n
            else:
                qid = f"{src}_{len(out)}"
            out.append(QAExample(qid, question, search_env.make_prompt(question), golds, src))
    return out


def load_qa(paths, flag: str = "--data") -> list[QAExample]:
    """Questions from Search-R1 parquet / FlashRAG JSONL files or directories of them, in file order. `flag`
    names the input in error messages."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    examples = []
    for f in _data_files(paths, flag):
        examples += _load_parquet(f) if f.suffix == ".parquet" else _load_jsonl(f)
    if not examples:
        raise BadInput(f"{flag} {' '.join(map(str, paths))} holds no questions")
    return examples


def spread(examples: list, limit: int | None) -> list:
    """`limit` examples evenly spaced over the list (all of them when limit is None or larger)."""
    if limit is None or limit >= len(examples):
        return examples
    return [examples[i * len(examples) // limit] for i in range(limit)]


# ---------------------------------------------------------------------------------------------------------
# Model and retriever

def check_model_dir(path: str) -> None:
    """The files a model directory needs (config.json, a tokenizer, weights) are there; check_model_files reads
    them."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise BadInput(f"--model {path} is not a Hugging Face model directory (no config.json); pass a local "
                       "folder written by save_pretrained (our checkpoint, Qwen2.5, a released LLDS/Search-R1 model)")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise BadInput(f"--model {path} has no tokenizer (tokenizer.json / tokenizer_config.json); copy the base "
                       "model's tokenizer files into it")
    if not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")):
        raise BadInput(f"--model {path} has no weights (*.safetensors or *.bin)")


def check_index_path(index: str | None) -> None:
    """open_retriever's refusals that need no JVM: the directory is missing or holds no index."""
    if index is None or str(index).startswith(("http://", "https://")):
        return
    d = Path(index)
    if not d.is_dir() or not (any(d.glob("segments_*")) or (d / "meta.json").is_file()):
        open_retriever(index, None)  # load_retriever refuses these before it starts anything


def check_model_files(path: str) -> None:
    """What can be known of a model directory without loading it: a config naming a causal LM, and weight
    files whose safetensors headers are whole (a truncated copy fails here, not after a minute of loading)."""
    p = Path(path)
    try:
        config = json.loads((p / "config.json").read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInput(f"--model {path}/config.json is not JSON ({e}); copy it again from the model") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise BadInput(f"--model {path}/config.json has no model_type; copy it again from the model")
    archs = config.get("architectures") or []
    if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise BadInput(f"--model {path} is a {', '.join(archs)}, not a causal language model; pass a decoder "
                       "that generates text (e.g. Qwen2ForCausalLM)")
    shards = sorted(p.glob("*.safetensors"))
    from safetensors import safe_open

    for f in shards:
        try:
            with safe_open(str(f), "pt") as st:
                st.keys()
        except Exception as e:  # SafetensorError: a truncated or corrupt file
            raise BadInput(f"--model {f} is not a whole safetensors file ({str(e).strip().splitlines()[0]}); "
                           "copy it again") from None


def load_tokenizer(path: str, padding_side: str | None = "left"):
    from transformers import AutoTokenizer

    try:
        kw = {"padding_side": padding_side} if padding_side else {}
        return AutoTokenizer.from_pretrained(path, **kw)
    except Exception as e:  # OSError, ValueError, and tokenizers' own Exception for a corrupt tokenizer.json
        raise BadInput(f"--model {path}: its tokenizer could not be loaded ({str(e).strip().splitlines()[0]}); "
                       "copy the base model's tokenizer files into it") from None


def load_causal_lm(path: str, dtype, tokenizer):
    """from_pretrained, refusing what would otherwise run on silently wrong weights: tensors missing or of the
    wrong shape (transformers initialises those at random), or a vocabulary smaller than the tokenizer's."""
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    except Exception as e:  # OSError, ValueError, KeyError, RuntimeError (size mismatch), SafetensorError
        if "mismatch" in str(e):  # transformers' message points at a report it logged above
            raise BadInput(f"--model {path}: weight tensors are of the wrong shape for its config.json (the weights "
                           "belong to another model); copy the matching files") from None
        raise BadInput(f"--model {path} could not be loaded as a causal LM ({str(e).strip().splitlines()[0]}); "
                       "pass a folder written by save_pretrained") from None
    bad = sorted(info["missing_keys"]) + sorted(k if isinstance(k, str) else k[0] for k in info["mismatched_keys"])
    if bad:
        raise BadInput(f"--model {path}: {len(bad)} weight tensors are missing or of the wrong shape for its "
                       f"config (e.g. {bad[0]}); the weights belong to another model: copy the matching files")
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise BadInput(f"--model {path}: its tokenizer has {len(tokenizer)} tokens but the model only {rows} "
                       "embeddings; use the tokenizer the model was trained with")
    return model


def open_retriever(index: str | None, url: str | None):
    """search_env.load_retriever, with its errors as one line; a server must answer one search first, so that
    a dead or wrong URL is reported before the model is loaded."""
    if url is not None:
        try:
            search_env.load_retriever(url=url, timeout=10, retries=0).search(["probe"], 1)
        except OSError as e:  # refused, timed out (ConnectionError is an OSError)
            raise BadInput(f"--retriever_url {url} does not answer a search: {e}") from None
        except ValueError as e:  # not a URL, or not a retrieval server's answer
            raise BadInput(f"--retriever_url {url}: {e}") from None
        return search_env.load_retriever(url=url)
    try:
        return search_env.load_retriever(index=index)
    except (OSError, ValueError, RuntimeError) as e:
        raise BadInput(f"--index {index}: {str(e).strip().splitlines()[0]}") from None
