"""Evaluate a search agent: EM/F1 per benchmark, markdown tables, single-question inference, run comparison.

    python eval.py --model CKPT --data test.parquet --index wiki-bm25/ --out runs/eval1
    python eval.py --model CKPT --index wiki-bm25/ --question "who wrote the iliad"
    python eval.py --compare runs/a/results.json runs/b/results.json
    python eval.py --plot runs/cmp.png runs/grpo runs/llds    # training curves side by side + table (plot.py)

Every question is rolled out greedily by rollout.py (the code that trains), and the answer (the model's
<answer> action) is scored with SQuAD-normalised exact match and token F1, max over the golds
(docs/protocol.md §1.3), per `data_source`. "average" is the unweighted mean over sources, as the Search-R1 and
LLDS papers report it; results.json also has "micro", the mean over questions. Sources are listed in the papers' order
(nq, triviaqa, popqa, hotpotqa, 2wikimultihopqa, musique, bamboogle; case-insensitive), others after them.

Data: Search-R1 parquet or FlashRAG JSONL files, or folders of them (docs/protocol.md §3), read by inputs.py.

Where this departs from Search-R1's evaluation, and why:
1. FlashRAG JSONL is read directly (its prompt built by search_env.make_prompt, docs/protocol.md §1.1); Search-R1 first
   converts it to parquet. A parquet row's prompt is used byte for byte, as Search-R1 does.
2. Questions are batched by prompt length, longest first, not in file order: less padding, and a batch size
   too large for memory fails in the first minute. Greedy answers can still differ from batch-of-one decoding
   in the last bits (padding changes bf16 sums), as in any batched evaluator.
3. `--limit N` takes N questions evenly spaced over the data, so every source of a merged file keeps its
   share (the first N of Search-R1's merged test file would all be NQ).
4. Gold answers that are empty strings are dropped (an empty answer would match them); a row left with none
   is an error, not a row that nobody can answer.
5. A trajectory that never took an answer action has no answer (EM = F1 = 0). Search-R1 takes the last
   `<answer>` anywhere in the text, which for such a trajectory can be the "<answer> and </answer>" of the
   invalid-action message: an F1 of 0.5 against a gold like "Tom and Jerry".
"""
import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path

import search_env
from inputs import (BadInput, QAExample, check_index_path, check_model_dir, check_model_files, check_text,
                    load_causal_lm, load_qa, load_tokenizer, open_retriever, spread)
from utils import cli, write_atomic

PAPER_SOURCES = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
PAPER_TURN_TOKENS = 500  # tokens per turn in the papers' runs and released checkpoints (docs/protocol.md §1.2)

# ---------------------------------------------------------------------------------------------------------
# Scores and tables

def order_sources(names) -> list[str]:
    """The papers' seven benchmarks first in the papers' order (case-insensitive), the rest alphabetically."""
    def key(s):
        low = s.lower()
        return (PAPER_SOURCES.index(low), "") if low in PAPER_SOURCES else (len(PAPER_SOURCES), low)
    return sorted(names, key=key)


def _mean(records) -> dict:
    n = len(records)
    return {"em": sum(r["em"] for r in records) / n, "f1": sum(r["f1"] for r in records) / n, "n": n}


def summarize(records: list[dict]) -> dict:
    """{"per_source": {src: {em, f1, n}}, "average": unweighted mean over sources, "micro": mean over questions}."""
    by = {}
    for r in records:
        by.setdefault(r["data_source"], []).append(r)
    per = {s: _mean(by[s]) for s in order_sources(by)}
    avg = {"em": sum(m["em"] for m in per.values()) / len(per), "f1": sum(m["f1"] for m in per.values()) / len(per),
           "n": len(records)}
    return {"per_source": per, "average": avg, "micro": _mean(records)}


def flat_metrics(res: dict, prefix: str = "eval/") -> dict[str, float]:
    """For a logger: eval/em, eval/f1 (averages over sources) and eval/<source>/em, eval/<source>/f1."""
    out = {f"{prefix}em": res["average"]["em"], f"{prefix}f1": res["average"]["f1"]}
    for s, m in res["per_source"].items():
        out[f"{prefix}{s}/em"], out[f"{prefix}{s}/f1"] = m["em"], m["f1"]
    return out


def format_table(res: dict) -> str:
    lines = ["| source | n | EM | F1 |", "|---|---:|---:|---:|"]
    rows = list(res["per_source"].items()) + [("average", res["average"])]
    lines += [f"| {s} | {m['n']} | {m['em']:.3f} | {m['f1']:.3f} |" for s, m in rows]
    return "\n".join(lines)


def load_results(path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
    except FileNotFoundError:
        raise BadInput(f"--compare {path} does not exist") from None
    except ValueError as e:
        raise BadInput(f"--compare {path} is not JSON ({e})") from None
    if not isinstance(res, dict) or "per_source" not in res or "average" not in res:
        raise BadInput(f"--compare {path} is not a results.json written by eval.py (no per_source/average)")
    return res


def format_compare(runs: list[tuple[str, dict]]) -> str:
    """One table per metric: a column per run, and each later run's difference to the first."""
    names = [n for n, _ in runs]
    sources = order_sources({s for _, r in runs for s in r["per_source"]})
    cell = lambda m, k: "-" if m is None else f"{m[k]:.3f}"  # noqa: E731
    out = []
    for key, title in (("em", "EM"), ("f1", "F1")):
        head = [names[0]] + [c for n in names[1:] for c in (n, f"Δ {n}")]
        lines = [f"{title}\n", "| source | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
        for s in sources + ["average"]:
            ms = [r["average"] if s == "average" else r["per_source"].get(s) for _, r in runs]
            row = [cell(ms[0], key)]
            for m in ms[1:]:
                delta = "-" if m is None or ms[0] is None else f"{m[key] - ms[0][key]:+.3f}"
                row += [cell(m, key), delta]
            lines.append(f"| {s} | " + " | ".join(row) + " |")
        out.append("\n".join(lines))
    notes = []
    for s in sources:
        missing = [n for n, r in runs if s not in r["per_source"]]
        ns = [str(r["per_source"][s]["n"]) for _, r in runs if s in r["per_source"]]
        if missing:
            notes.append(f"note: {s} is not in {', '.join(missing)}: the averages cover different sources")
        elif len(set(ns)) > 1:
            notes.append(f"note: {s} has different question counts across runs ({' vs '.join(ns)})")
    return "\n\n".join(out + (["\n".join(notes)] if notes else []))


# ---------------------------------------------------------------------------------------------------------
# Rollouts

def evaluate(model, tokenizer, examples: list[QAExample], retriever, cfg, batch_size: int = 64, *,
             progress: bool = True, desc: str = "eval") -> dict:
    """Greedy rollouts of every example; returns summarize()'s dict plus "trajectories" (one record per example,
    in the examples' order). cfg is a rollout.RolloutConfig; greedy is forced on, every other field is used.
    The model is put in eval mode and given back in the mode it came in."""
    import torch
    from tqdm import tqdm

    import rollout

    if not examples:
        raise ValueError("evaluate() got no examples")
    cfg = dataclasses.replace(cfg, greedy=True)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].prompt))
    records = [None] * len(examples)
    was_training, em_sum, done = model.training, 0.0, 0
    model.eval()
    bar = tqdm(total=len(examples), desc=desc, disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        with torch.no_grad():
            for b in range(0, len(order), batch_size):
                idx = order[b:b + batch_size]
                trajs = rollout.rollout(model, tokenizer, [examples[i].prompt for i in idx], idx, retriever, cfg)
                for i, t in zip(idx, trajs):
                    records[i] = _record(examples[i], t)
                    em_sum += records[i]["em"]
                done += len(idx)
                bar.update(len(idx))
                bar.set_postfix(em=f"{em_sum / done:.3f}")
    finally:
        bar.close()
        model.train(was_training)
    return {**summarize(records), "trajectories": records}


def _record(ex: QAExample, t) -> dict:
    # Only an answer action of the model counts: the text of an unanswered trajectory can still hold
    # "<answer> and </answer>" from the invalid-action message, which would score F1 against golds with "and".
    answer = t.answer  # None unless the model took an answer action (rollout.py)
    return {"id": ex.id, "data_source": ex.data_source, "question": ex.question, "golds": ex.golds,
            "answer": answer, "em": search_env.exact_match(answer, ex.golds),
            "f1": search_env.f1_score(answer, ex.golds), "num_searches": t.num_searches,
            "num_turns": len(t.turn_spans), "answered": t.answer is not None, "response_tokens": len(t.response_ids),
            "text": t.text}


# A title is the passage's first line, quoted in wiki-18 ('"Title"'), and may itself hold ") ".
_DOC_TITLE = re.compile(r'(?:^|<information>)Doc \d+\(Title: (".*?"|.*?)\) ', re.M)


def format_trajectory(question: str, traj, tokenizer) -> str:
    """A trajectory for a human: each turn's text, the query it sent, the titles that came back, the answer."""
    ids, spans = traj.response_ids, traj.turn_spans
    lines = [f"Question: {question}"]
    for k, (s, e) in enumerate(spans):
        said = tokenizer.decode(ids[s:e])
        obs = tokenizer.decode(ids[e:spans[k + 1][0] if k + 1 < len(spans) else len(ids)])
        lines += ["", f"--- turn {k + 1} ---", said.strip()]
        action, content = search_env.parse_action(said)
        if action == "search" and "<information>" in obs:
            lines.append(f">>> search: {content}")
            lines += [f"    {j}. {title}" for j, title in enumerate(_DOC_TITLE.findall(obs), 1)]
        elif action == "search":
            lines.append(f">>> search: {content}  (not run: the turn budget is spent)")
        elif action is None:
            lines.append(">>> invalid action (no <search> or <answer>)")
    lines += ["", f"Answer: {traj.answer}" if traj.answer is not None else "Answer: none (the model never answered)",
              f"({traj.num_searches} searches, {len(spans)} turns)"]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# CLI: validate every input (cheap checks first), then load the model



def load_model(path: str):
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32  # bf16 on CPU is ~100x slower
    tokenizer = load_tokenizer(path)
    return load_causal_lm(path, dtype, tokenizer).to(device).eval(), tokenizer


def write_outputs(out: Path, records: list[dict], res: dict) -> None:
    """trajectories.jsonl, then results.json naming it (with its row count). The old results.json goes first:
    at every instant a results.json present describes the trajectories.jsonl beside it, and a kill mid-way
    leaves trajectories without a summary (an unfinished eval), never a summary of other trajectories."""
    (out / "results.json").unlink(missing_ok=True)
    write_atomic(out / "trajectories.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    res["trajectories"] = {"file": "trajectories.jsonl", "rows": len(records)}
    write_atomic(out / "results.json", json.dumps(res, indent=2, ensure_ascii=False) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="\n\n".join(__doc__.split("\n\n")[:2]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hugging Face causal LM directory (ours, Qwen2.5, released LLDS/Search-R1)")
    p.add_argument("--data", nargs="+", help="Search-R1 .parquet / FlashRAG .jsonl files, or directories of them")
    p.add_argument("--question", help="answer this one question and print the trajectory")
    p.add_argument("--index", help="retrieval index directory (BM25 or dense)")
    p.add_argument("--retriever_url", help="retrieval server endpoint, e.g. http://127.0.0.1:8000/retrieve")
    p.add_argument("--compare", nargs="+", metavar="RESULTS_JSON", help="print these runs' tables side by side")
    p.add_argument("--plot", nargs="+", metavar="PATH", help="OUT.png RUN_DIR [RUN_DIR ...]: draw these training "
                   "runs' reward and LLD curves side by side into OUT.png and print their ablation table (plot.py)")
    p.add_argument("--max_turns", type=int, default=4, help="turns that may search, then one final turn (default 4)")
    p.add_argument("--topk", type=int, default=3, help="passages per search (default 3)")
    p.add_argument("--batch_size", type=int, default=64, help="questions rolled out together (default 64)")
    p.add_argument("--limit", type=int, help="evaluate this many questions, evenly spaced over the data")
    p.add_argument("--out", help="where results.json and trajectories.jsonl go (default: runs/eval/<model dir name>)")
    return p.parse_args(argv)


def run(args) -> dict | None:
    if args.plot:
        if args.model or args.data or args.question or args.compare:
            raise BadInput("--plot takes only OUT.png and run directories (no --model/--data/--question/--compare)")
        import plot  # matplotlib is loaded only for pictures

        plot.main(args.plot)
        return None
    if args.compare:
        if args.model or args.data or args.question:
            raise BadInput("--compare takes only results.json files (no --model/--data/--question)")
        names = [Path(p).parent.name or str(p) for p in args.compare]
        if len(set(names)) < len(names):
            names = [str(Path(p).parent) for p in args.compare]
        print(format_compare([(n, load_results(p)) for n, p in zip(names, args.compare)]))
        return None
    if not args.model:
        raise BadInput("--model is required (or --compare RESULTS_JSON ...)")
    if (args.data is None) == (args.question is None):
        raise BadInput("give --data FILE ... to evaluate, or --question TEXT to ask one question (not both)")
    if (args.index is None) == (args.retriever_url is None):
        raise BadInput("give exactly one of --index DIR or --retriever_url URL")
    for flag, value, low in (("--max_turns", args.max_turns, 0), ("--topk", args.topk, 1),
                             ("--batch_size", args.batch_size, 1), ("--limit", args.limit, 1)):
        if value is not None and value < low:
            raise BadInput(f"{flag} must be at least {low}, got {value}")
    if args.question is not None:
        check_text(args.question, "--question", "the question")

    examples = spread(load_qa(args.data), args.limit) if args.data else None
    check_model_dir(args.model)
    # a server answers a probe in milliseconds; a local index is opened (the JVM started) after the other checks
    retriever = open_retriever(None, args.retriever_url) if args.retriever_url else check_index_path(args.index)
    check_model_files(args.model)
    out = None
    if examples is not None:
        out = Path(args.out or Path("runs") / "eval" / Path(args.model).resolve().name)
        # checked now, created only once there is something to write (a refused run leaves no empty folder)
        have = next(p for p in [out, *out.absolute().parents] if p.exists())
        if not have.is_dir() or not os.access(have, os.W_OK | os.X_OK):
            raise BadInput(f"--out {out} cannot be created: {have} is not a writable folder; pick another --out")
    import rollout
    import train

    # train.Config's rollout settings, with this command's flags and the paper's 500 tokens per turn (docs/protocol.md
    # §1.2; train.py's default of 48 is the toy world's)
    settings = train.Config(max_turns=args.max_turns, topk=args.topk, max_turn_tokens=PAPER_TURN_TOKENS)
    cfg = train.rollout_config(settings, greedy=True)
    tokenizer = load_tokenizer(args.model)
    prompts = [search_env.make_prompt(args.question)] if args.question is not None else [e.prompt for e in examples]
    longest = max(dict.fromkeys(prompts), key=len)  # by characters: tokenising every prompt would cost minutes
    n = len(rollout.wrap_prompt(tokenizer, longest))
    if n >= cfg.max_context:
        what = "--question" if args.question is not None else f"--data question {examples[prompts.index(longest)].id}"
        raise BadInput(f"{what} is {n} tokens as a prompt, beyond the model's context of {cfg.max_context} tokens; "
                       "shorten it")
    retriever = retriever or open_retriever(args.index, None)
    model, tokenizer = load_model(args.model)

    if args.question is not None:
        prompt = search_env.make_prompt(args.question)
        [traj] = rollout.rollout(model, tokenizer, [prompt], [0], retriever, cfg)
        print(format_trajectory(args.question.strip(), traj, tokenizer))
        return None

    res = evaluate(model, tokenizer, examples, retriever, cfg, args.batch_size)
    records = res.pop("trajectories")
    res["config"] = {"model": str(Path(args.model).resolve()), "data": [str(d) for d in args.data],
                     "index": args.index, "retriever_url": args.retriever_url, "max_turns": args.max_turns,
                     "topk": args.topk, "batch_size": args.batch_size, "limit": args.limit}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BadInput(f"--out {out} cannot be created ({e.strerror}); pick another --out") from None
    write_outputs(out, records, res)
    print(format_table(res))
    print(f"\nsaved {out / 'results.json'} and {out / 'trajectories.jsonl'}")
    return res


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    cli(main)
