"""The toy world: a small, deterministic search-QA world in the real formats, plus a warm-started tiny policy.

`python toy.py --out DIR [--seed N] [--force]` (or `build(out, seed)`) writes, in about 3 minutes on 2 cores:

    DIR/corpus.jsonl     ~2,000 passages {"id", "contents": '"Title"\\ntext'} (SPEC 2)
    DIR/train.parquet    Search-R1 schema (SPEC 3), prompts from search_env.make_prompt
    DIR/test.parquet     200 questions: 140 "toy_1hop", 60 "toy_2hop"
    DIR/bm25/            Lucene index of the corpus (search_env.build_bm25_index)
    DIR/model/           tiny Qwen2ForCausalLM + byte-level BPE tokenizer with a chat template (save_pretrained)

The world. Made-up people, organisations, cities, countries and rivers; every name is built from random syllables,
so no answer can be guessed from a question. A person has a birth city, a birth year and an employer; an
organisation has a founder, a founding year and a home city. Each entity has its own passage, written as
"Zorvak Delm: birth city Vellmor. Zorvak Delm: birth year 1790. ..."; distractor passages (travels, letters, trade, rivalries, markets)
mention the same names next to other cities and years, and names share given names, family names and
organisation stems. Questions always end with their subject:
  toy_1hop  "What is the birth city of Zorvak Delm?"                   search the person, read the city
  toy_2hop  "What is the birth city of the founder of Quillari Works?" search the org -> founder -> search -> city
Test questions are about a held-out part of the world (their people and organisations, bridges included, never
appear in a training question), so the model must read the answer off the corpus.

The warm start. The tiny model is trained by supervised learning on scripted trajectories in the exact rollout
format: chat-wrapped prompt, `<think> I need to find X. </think>\n<search> X </search>`, the observation
search_env.format_observation(real BM25 top-3 for that query), `<think> birth city A. </think>\n<answer> A </answer>`
and EOS. Pieces are tokenised one by one and concatenated as rollout.py does; the loss covers the model's tokens
only. The think names the relation (copied from the question) and then the token that follows that relation in the
passage ("birth city Vellmor"): a one-token-key copy (an induction head), which a 2-layer model learns in the
budget. Restating "The birth city of X is A" (a key five tokens back) or the subject itself was not learnt.

Departures from Search-R1 (the toy exists to test the machinery quickly on CPU, not to be a benchmark):
 1. Scripted, not distilled, trajectories, with a deliberate, learnable mistake: in 60% of the two-hop trajectories
    the model stops after the first search and answers with a same-typed fact of the first passage (the org's home
    city instead of its founder's birth city). Greedy decoding then mostly takes that shortcut (low two-hop EM),
    while sampling at temperature 1 takes the second search often enough for GRPO to reinforce it.
 2. Every SFT sample is a training trajectory passed through a fresh random renaming of the world (each name part
    within its kind, years to years), applied to prompt, observations and answers alike: structure and BM25 ranking
    are real, the facts are new each time, so the model cannot memorise the training world and must read. Without
    it the model memorised training facts and scored 0-7% on held-out questions.
 3. Bitwise reproducibility holds for every file but the Lucene index (bm25/ stores random segment ids and
    timestamps); the index returns the same hits. SFT runs on 1 thread: fixed reduction order, and no slowdown
    from thread oversubscription on a shared CPU.
"""
import argparse
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import search_env

N_GIVEN, N_FAMILY, N_STEMS = 30, 40, 80          # name parts, combined into people and organisations
N_PERSONS, N_ORGS, N_CITIES, N_COUNTRIES, N_RIVERS = 400, 130, 40, 10, 20
TEST_PERSONS, TEST_ORGS = 60, 30                  # held-out part of the world that test questions ask about
N_PASSAGES = 2000
N_TEST = {"toy_1hop": 140, "toy_2hop": 60}   # two-hop greedy EM starts near 0 (the shortcut): RL's room
SHORTCUT_FRAC = 0.6                               # share of two-hop SFT trajectories that stop after one search
ORG_SUFFIXES = ["Works", "Guild", "Company", "Foundry", "Institute", "Press"]
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "dr", "kr", "qu", "st", "br"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "io", "ou"]
CODAS = ["", "", "n", "r", "l", "k", "s", "m", "th", "nd"]
TOKENIZER_VOCAB = 2048
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
MODEL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=384, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0)
SFT = dict(steps=1500, batch_size=16, lr=3e-3, warmup=30, weight_decay=0.01, threads=1)

# Every question ends with its subject, and every fact is read by restating the passage's own sentence: the policy
# copies the subject from a fixed offset, writes "<subject>: <relation>" and copies the token that follows the
# relation's last word in the passage. Copying by a one-token key (induction) is what a tiny transformer learns fastest.
RELATIONS = {"born_city": "birth city", "born_year": "birth year", "employer": "employer",
             "founder": "founder", "founded_year": "founding year", "hq": "home city"}
PERSON_RELS, ORG_RELS = ["born_city", "born_year", "employer"], ["founder", "founded_year", "hq"]
# (bridge relation, final relation) -> shortcut relation: a same-typed fact of the first passage, a wrong answer
TWO_HOP = {("founder", "born_city"): "hq", ("founder", "born_year"): "founded_year",
           ("employer", "hq"): "born_city", ("employer", "founded_year"): "born_year"}


def sentence(rel: str, s: str, a: str) -> str:
    return f"{s}: {RELATIONS[rel]} {a}."


def note(rel: str, a: str) -> str:
    return f"{RELATIONS[rel]} {a}."


# ----------------------------------------------------------------------------------------------------- the world
def _make_words(rng: random.Random, n: int, used: set) -> list[str]:
    out = []
    while len(out) < n:
        w = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.choice([1, 2])))
        w = (w + rng.choice(CODAS)).capitalize()
        if len(w) >= 4 and w not in used:
            used.add(w)
            out.append(w)
    return out


def make_world(rng: random.Random) -> dict:
    """Entities and facts. Index order is the split: the last TEST_* people/orgs are held out for test questions."""
    used: set = set()
    given, family, stems = (_make_words(rng, n, used) for n in (N_GIVEN, N_FAMILY, N_STEMS))
    cities, countries, rivers = (_make_words(rng, n, used) for n in (N_CITIES, N_COUNTRIES, N_RIVERS))
    persons = rng.sample([f"{g} {f}" for g in given for f in family], N_PERSONS)
    orgs = rng.sample([f"{s} {x}" for s in stems for x in ORG_SUFFIXES], N_ORGS)
    city_facts = {c: {"country": rng.choice(countries), "river": rng.choice(rivers)} for c in cities}
    P = {p: {"born_city": rng.choice(cities), "born_year": str(rng.randint(1700, 1849))} for p in persons}
    O = {}
    for i, o in enumerate(orgs):
        test = i >= N_ORGS - TEST_ORGS  # founders and employees stay inside their own split
        pool = persons[N_PERSONS - TEST_PERSONS:] if test else persons[:N_PERSONS - TEST_PERSONS]
        f = rng.choice(pool)
        hq = rng.choice([c for c in cities if c != P[f]["born_city"]])
        O[o] = {"founder": f, "founded_year": str(int(P[f]["born_year"]) + rng.randint(25, 55)), "hq": hq}
    for i, p in enumerate(persons):
        test = i >= N_PERSONS - TEST_PERSONS
        pool = orgs[N_ORGS - TEST_ORGS:] if test else orgs[:N_ORGS - TEST_ORGS]
        P[p]["employer"] = rng.choice([o for o in pool if O[o]["hq"] != P[p]["born_city"]])
    pools = [given, family, stems, cities, countries, rivers]
    return {"persons": persons, "orgs": orgs, "cities": cities, "P": P, "O": O, "C": city_facts, "pools": pools}


def make_corpus(world: dict, rng: random.Random) -> list[dict]:
    P, O, C = world["P"], world["O"], world["C"]
    docs = []
    for p in world["persons"]:
        docs.append((p, " ".join(sentence(r, p, P[p][r]) for r in PERSON_RELS)))
    for o in world["orgs"]:
        docs.append((o, " ".join(sentence(r, o, O[o][r]) for r in ORG_RELS)))
    for c in world["cities"]:
        docs.append((c, f"{c} is a city in {C[c]['country']}, on the river {C[c]['river']}."))
    distractors = [
        ("Travels of {p}", "{p} travelled to {c} in {y} and stayed with {q}."),
        ("Letter to {q}", "In {y} {p} sent a letter to {q} from {c}."),
        ("{o} trade", "{o} sold goods to {p} in {c} in {y}."),
        ("{o} and {o2}", "{o} and {o2} competed in {c} after {y}."),
        ("Market of {c}", "The market of {c} was visited by {p} and {q} in {y}."),
    ]
    while len(docs) < N_PASSAGES:
        title, text = rng.choice(distractors)
        p, q = rng.sample(world["persons"], 2)
        o, o2 = rng.sample(world["orgs"], 2)
        kw = dict(p=p, q=q, o=o, o2=o2, c=rng.choice(world["cities"]), y=str(rng.randint(1700, 1900)))
        docs.append((title.format(**kw), text.format(**kw)))
    rng.shuffle(docs)
    return [{"id": str(i), "contents": f'"{t}"\n{x}'} for i, (t, x) in enumerate(docs)]


def _fact(world: dict, rel: str, s: str) -> str:
    return world["P"][s][rel] if rel in PERSON_RELS else world["O"][s][rel]


def make_questions(world: dict) -> list[dict]:
    """Every question the world allows, with its plan: hops [(entity to search, sentence read off its passage)]."""
    qs = []
    n_tr_p, n_tr_o = N_PERSONS - TEST_PERSONS, N_ORGS - TEST_ORGS
    for subjects, rels, n_train in ((world["persons"], PERSON_RELS, n_tr_p), (world["orgs"], ORG_RELS, n_tr_o)):
        for i, s in enumerate(subjects):
            split = "train" if i < n_train else "test"
            for rel in rels:
                a = _fact(world, rel, s)
                qs.append({"question": f"What is the {RELATIONS[rel]} of {s}?", "answer": a, "source": "toy_1hop",
                           "split": split, "hops": [(s, note(rel, a))], "shortcut": None})
            for (r1, r2), cut in TWO_HOP.items():
                if r1 not in rels:
                    continue
                b = _fact(world, r1, s)
                a, wrong = _fact(world, r2, b), _fact(world, cut, s)
                if a == wrong:
                    continue
                qs.append({"question": f"What is the {RELATIONS[r2]} of the {RELATIONS[r1]} of {s}?", "answer": a,
                           "source": "toy_2hop", "split": split,
                           "hops": [(s, note(r1, b)), (b, note(r2, a))],
                           "shortcut": (note(cut, wrong), wrong)})
    return qs


def write_parquet(rows: list[dict], split: str, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([{
        "data_source": r["source"],
        "prompt": [{"role": "user", "content": search_env.make_prompt(r["question"])}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": [r["answer"]]}},
        "extra_info": {"split": split, "index": i},
    } for i, r in enumerate(rows)])
    pq.write_table(table, path)


# ------------------------------------------------------------------------------------------- scripted trajectories
def script(q: dict, observe, rng: random.Random) -> list[tuple[str, bool]]:
    """[(text, is_model_turn)] after the prompt; observe(query) -> observation string."""
    subject = q["hops"][0][0]
    pieces = [(f"<think> I need to find {subject}. </think>\n<search> {subject} </search>", True),
              (observe(subject), False)]
    if q["shortcut"] is not None and rng.random() < SHORTCUT_FRAC:
        fact, wrong = q["shortcut"]
        return pieces + [(f"<think> {fact} </think>\n<answer> {wrong} </answer>", True)]
    for (_, fact), nxt in zip(q["hops"], q["hops"][1:]):
        pieces += [(f"<think> {fact} </think>\n<search> {nxt[0]} </search>", True), (observe(nxt[0]), False)]
    return pieces + [(f"<think> {q['hops'][-1][1]} </think>\n<answer> {q['answer']} </answer>", True)]


WORD_RE = re.compile(r"\b\w+\b")


def scrambler(world: dict, rng: random.Random):
    """A random renaming of the world (each name part within its kind, each year to another), as a function on text."""
    table = {}
    for pool in world["pools"]:
        table.update(zip(pool, rng.sample(pool, len(pool))))
    years = [str(y) for y in range(1700, 1910)]
    table.update(zip(years, rng.sample(years, len(years))))
    return lambda text: WORD_RE.sub(lambda m: table.get(m.group(0), m.group(0)), text)


def make_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False)


def encode_trajectory(tokenizer, prompt: str, pieces) -> tuple[list[int], list[int]]:
    """Token ids and loss mask, piece by piece, exactly as a rollout concatenates them (never re-encoding text)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer.encode(text, add_special_tokens=False)
    mask = [0] * len(ids)
    for text, mine in pieces:
        piece = tokenizer.encode(text, add_special_tokens=False)
        ids += piece
        mask += [int(mine)] * len(piece)
    ids.append(tokenizer.eos_token_id)  # the response ends with EOS after </answer>
    mask.append(1)
    return ids, mask


# ------------------------------------------------------------------------------------------------------ warm start
def warm_start(tokenizer, seqs: list[tuple[list[int], list[int]]], seed: int):
    """Supervised training of a fresh tiny Qwen2 on (ids, mask) pairs; loss on masked-in tokens only."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(SFT["threads"])  # fixed thread count: same reduction order, same bytes
    try:
        torch.manual_seed(seed)
        cfg = Qwen2Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **MODEL)
        model = Qwen2ForCausalLM(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=SFT["lr"], betas=(0.9, 0.98),
                                weight_decay=SFT["weight_decay"])
        rng = random.Random(seed)
        # Every prompt starts with the same template tokens: run that prefix once per batch and share its cache.
        P = min(len(ids) for ids, _ in seqs)
        while any(ids[:P] != seqs[0][0][:P] for ids, _ in seqs):
            P -= 1
        prefix = torch.tensor([seqs[0][0][:P]])  # (1, P)
        # Fresh samples each step; within blocks of 16 batches, similar lengths share a batch (less padding).
        B, block = SFT["batch_size"], 16 * SFT["batch_size"]
        batches = []
        for k in range(0, len(seqs), block):
            order = sorted(range(k, min(k + block, len(seqs))), key=lambda i: len(seqs[i][0]))
            chunk = [order[i:i + B] for i in range(0, len(order), B)]
            rng.shuffle(chunk)
            batches += chunk
        model.train()
        t0 = time.time()
        for step in range(SFT["steps"]):
            idx = batches[step % len(batches)]
            T = max(len(seqs[i][0]) for i in idx) - P
            ids = torch.full((len(idx), T), tokenizer.pad_token_id)
            mask = torch.zeros((len(idx), T), dtype=torch.bool)
            for r, i in enumerate(idx):
                ids[r, :len(seqs[i][0]) - P] = torch.tensor(seqs[i][0][P:])
                mask[r, :len(seqs[i][1]) - P] = torch.tensor(seqs[i][1][P:], dtype=torch.bool)
            cache = model.model(input_ids=prefix, use_cache=True).past_key_values
            for layer in cache.layers:  # (1, kv_heads, P, d) -> (B, kv_heads, P, d), gradients flow back
                layer.keys, layer.values = (x.expand(len(idx), -1, -1, -1) for x in (layer.keys, layer.values))
            # right padding under a causal mask never reaches real tokens, so no attention mask is needed
            pos = torch.arange(P, P + T).expand(len(idx), -1)  # (B, T)
            hidden = model.model(input_ids=ids, past_key_values=cache, position_ids=pos).last_hidden_state  # (B, T, H)
            target = mask[:, 1:]  # (B, T-1): predict token t+1 only where it is the model's own
            logits = model.lm_head(hidden[:, :-1][target])  # (N, V): logits only where the loss needs them
            loss = torch.nn.functional.cross_entropy(logits, ids[:, 1:][target])
            lr = SFT["lr"] * min(1.0, (step + 1) / SFT["warmup"]) * (1 - 0.9 * step / SFT["steps"])
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 25 == 0 or step == SFT["steps"] - 1:
                print(f"toy: sft step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", file=sys.stderr)
        model.eval()
        return model
    finally:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------- build
class OutDirError(Exception):
    """--out cannot be used; nothing was written."""


def _make_tmp(out: Path, force: bool) -> Path:
    """Check --out, then create the temporary sibling the world is built in (renamed to --out at the end)."""
    if out.exists() and not out.is_dir():
        raise OutDirError(f"--out {out} is a file: give a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutDirError(f"--out {out} is not empty: give a fresh folder or pass --force to replace it")
    if not out.parent.is_dir():
        raise OutDirError(f"--out {out}: its parent {out.parent} is not an existing folder: create it first")
    try:
        return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
    except OSError as e:
        raise OutDirError(f"--out {out}: cannot write into {out.parent} ({e.strerror}): pick a writable folder")


def build(out, seed: int = 0, force: bool = False) -> Path:
    """Build the toy world into `out` (see the module docstring). Writes into a temporary sibling, then renames."""
    out = Path(out).absolute()
    tmp = _make_tmp(out, force)
    t0 = time.time()
    try:
        rng = random.Random(seed)
        world = make_world(rng)
        corpus = make_corpus(world, rng)
        with open(tmp / "corpus.jsonl", "w") as f:
            for d in corpus:
                f.write(json.dumps(d) + "\n")
        qs = make_questions(world)
        train = [q for q in qs if q["split"] == "train"]
        rng.shuffle(train)
        # Draw 100 + 100 from the main stream, then rebalance to N_TEST with a side stream: the SFT below consumes the
        # same stream, and whether a 2-layer model learns to copy within the step budget depends on it (seed 0's
        # stream does; a different stream plateaued at loss 0.4 in a trial).
        pools = {src: [q for q in qs if q["split"] == "test" and q["source"] == src] for src in N_TEST}
        drawn = {src: rng.sample(pools[src], 100) for src in N_TEST}
        side = random.Random(seed + 1)
        more = side.sample([q for q in pools["toy_1hop"] if q not in drawn["toy_1hop"]], N_TEST["toy_1hop"] - 100)
        test = drawn["toy_1hop"] + more + drawn["toy_2hop"][:N_TEST["toy_2hop"]]
        rng.shuffle(test)
        write_parquet(train, "train", tmp / "train.parquet")
        write_parquet(test, "test", tmp / "test.parquet")

        search_env.build_bm25_index(tmp / "corpus.jsonl", tmp / "bm25", threads=1)  # 1 thread: fixed doc order
        retriever = search_env.BM25Retriever(tmp / "bm25")
        queries = sorted({h[0] for q in train for h in q["hops"]})
        hits = dict(zip(queries, retriever.search(queries, k=3)))
        observe = lambda s: search_env.format_observation(hits[s])  # noqa: E731
        prompts = lambda qs: [search_env.make_prompt(q["question"]) for q in qs]  # noqa: E731
        texts = [d["contents"] for d in corpus] + prompts(qs)
        texts += [t for q in train[:500] for t, _ in script(q, observe, rng)]
        tokenizer = make_tokenizer(texts)
        seqs = []
        for i in range(SFT["steps"] * SFT["batch_size"]):  # epochs over the training questions, branches redrawn
            q = train[i % len(train)]
            scr = scrambler(world, rng)
            pieces = [(scr(t), m) for t, m in script(q, observe, rng)]
            seqs.append(encode_trajectory(tokenizer, scr(search_env.make_prompt(q["question"])), pieces))
        model = warm_start(tokenizer, seqs, seed)
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"toy: built {out} in {time.time() - t0:.1f}s ({len(corpus)} passages, {len(train)} train, "
          f"{len(test)} test questions)", file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description="Build the toy search-QA world (corpus, parquet, BM25, warm model).")
    ap.add_argument("--out", required=True, help="folder to create (must be new or empty unless --force)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace a non-empty --out")
    args = ap.parse_args()
    try:
        build(args.out, seed=args.seed, force=args.force)
    except OutDirError as e:
        sys.exit(f"toy.py: error: {e}")


if __name__ == "__main__":
    main()
