"""The toy world: a small, deterministic search-QA world in the real formats, plus a warm-started tiny policy.

`python toy.py --out DIR [--seed N] [--threads N] [--force]` (or `build(out, seed)`) writes, in about 1.5 minutes on
2 idle cores (README: the measured range; several times that when another process shares the cores):

    DIR/corpus.jsonl     ~2,000 passages {"id", "contents": '"Title"\\ntext'} (docs/protocol.md §2)
    DIR/train.parquet    Search-R1 schema (docs/protocol.md §3), prompts from search_env.make_prompt
    DIR/test.parquet     200 questions: 100 "toy_1hop", 100 "toy_2hop"
    DIR/bm25/            Lucene index of the corpus (search_env.build_bm25_index)
    DIR/model/           tiny Qwen2ForCausalLM + a byte-level BPE Qwen2Tokenizer with a chat template (save_pretrained),
                         and warm_start.json, the record of its supervised training (departure 4)

The world. Made-up people, organisations, cities, countries and rivers, each named by one random-syllable word (one
token: see the warm start), so no answer can be guessed from a question. A person has a birth city, a mentor and an
employer; an organisation has a founder, a rival and a home city. Each entity has its own passage, written as
"Zorvak: birth city Vellmor. Zorvak: mentor Quill. Zorvak: employer Drommel."; distractor passages (travels,
letters, trade, rivalries, markets) mention the same names next to other cities and people. Questions end with
their subject:
  toy_1hop  "What is the birth city of Zorvak?"                  search the person, read the city
  toy_2hop  "What is the birth city of the founder of Quillari?" search the org -> founder -> search -> city
Test questions are about a held-out part of the world (their people and organisations, bridges included, never
appear in a training question), so the model must read the answer off the corpus.

The warm start. The tiny model is trained by supervised learning on scripted trajectories in the exact rollout
format: chat-wrapped prompt, `<think> I need to find X. </think>\n<search> X </search>`, the observation
search_env.format_observation(real BM25 top-3 for that query), `<think> X: birth city A. </think>\n<answer> A </answer>`
and EOS. Pieces are tokenised one by one, by the tokenizer a user loads with AutoTokenizer, and concatenated as
rollout.py does; the loss covers the model's tokens only. The think restates the passage's sentence: the subject
(copied from the search), the relation (copied from the question) and then the token that follows "X: relation" in
the passage: a copy keyed on the previous tokens (an induction head), which a 2-layer model learns in the budget
only when the copied name is a single token (departure 5).

Departures from Search-R1 (the toy exists to test the machinery quickly on CPU, not to be a benchmark):
 1. Scripted, not distilled, trajectories, with two deliberate, learnable habits that leave RL its room. Two-hop:
    in 80% of the scripts that train the choice the model stops after the first search and answers with a same-typed
    fact of the first passage (the org's home city instead of its founder's birth city). One-hop about an
    organisation: in 70% the model searches, then ignores the passage ("<think> I know it. </think>") and answers a
    guess. Greedy decoding takes both habits (two-hop and organisation EM near 0, people near 90%), while sampling at
    temperature 1 reads and searches again, and GRPO reinforces what pays. A habit is a probability that greedy
    decoding turns into all or nothing, so its share is a trade: at 70%, seed 1's greedy decoding read on for one of
    the four two-hop types (18 points more warm-start EM than seeds 0 and 2). And the skill behind the habit must be
    learnt all the same: with the reading path in only 20-30% of two-hop scripts, seed 2's warm start, made to read
    on, answered the bridge instead of searching it (0 of 60), and its demo learnt no two-hop question. So half of
    the two-hop scripts are drills: the reading path with the choice to read on ("<think> X: employer") left out of
    the loss. The choice is trained by the other half alone (80/20), the rest of the path by 60% of them.
 2. Every SFT sample is a training trajectory passed through a fresh random renaming of the world (each name within
    its kind), applied to prompt, observations and answers alike: structure and BM25 ranking are real, the facts
    are new each time, so the model cannot memorise the training world and must read.
 3. Curriculum: every other SFT step leaves the prompt's instructions out (the ~170 tokens every prompt shares), so
    that attention finds the names quickly, and the steps between carry them, so that the copy forms in the context a
    rollout sees. What failed before: the instructions on every step (the copy was not learnt in 1,500 steps); 800
    steps without them, then 400 with (the copy was learnt, but in some builds the switch broke the birth-city copy
    for good: the model wrote one constant city, final loss ~0.11 instead of ~0.04, 10 points less EM); 300 without,
    then alternating (the same break). Batches of 8: at the same tokens, twice the updates of batches of 16 reach the
    regime sooner (800 steps of 16, alternating, did not in seed 0). Two-hop questions are half of the SFT samples
    (a third of the questions), so that sampling still searches a second time often enough.
 4. Bitwise reproducibility holds for every file but the Lucene index (bm25/ stores random segment ids and
    timestamps); the index returns the same hits. SFT runs on a fixed thread count (2, or --threads) whatever the
    machine, so the reduction order, and the weights, are the same on every run (on the machine of the README's
    table, 1 and 2 threads gave the same weights too; other machines have given other weights for another count).
    model/warm_start.json records the run: seed, threads, settings, the mean loss of its last
    50 steps with instructions, the loss every 25 steps, and `reading`, the regime test (reading_check): per relation,
    how often the warm start copies the name the passage gives, on the held-out questions. The loss does not tell a
    build that lost one relation from a good one (see reading_check); `reading` does (~0 on the lost relation).
 5. The think restates the whole sentence ("X: mentor Y."), not the relation alone ("mentor Y."). With the relation
    alone, each relation's copy formed at its own moment and some never did: in SFT-only runs of 1,400 steps on
    seeds 0-2, one or two relations of one kind stayed at 0% (seed 2: employer and rival; earlier seed 1: mentor and
    founder), and 2,000 steps, batches of 4, a third layer, width 256, extra induction data or weighting the copied
    token did not remove it. Restating the subject makes the key two tokens long and every relation formed in every
    run measured (README). What is still weak: the mentor copy reads 0.6-0.8 in every build; it fails on the same
    observations in every build (a person passage whose distractors are "sold goods to X in C" or two "market of"
    passages), whatever the name, so it is the key's match against those sentences, not the names.
"""
import argparse
import contextlib
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
from utils import UserError, cli, publish_dir

N_PERSONS, N_ORGS, N_CITIES, N_COUNTRIES, N_RIVERS = 400, 130, 40, 10, 20  # one-word names, one token each
TEST_PERSONS, TEST_ORGS = 60, 30                  # held-out part of the world that test questions ask about
N_PASSAGES = 2000
N_TEST = {"toy_1hop": 100, "toy_2hop": 100}
SHORTCUT_FRAC = 0.8  # share of the other two-hop SFT trajectories that stop after one search and answer a wrong fact
DRILL_FRAC = 0.5     # share of two-hop SFT trajectories that read on with the choice to read on out of the loss
LAZY_FRAC = 0.7      # share of one-hop SFT trajectories about organisations that answer a guess without reading
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "th", "dr", "kr", "qu", "st", "br"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "io", "ou"]
CODAS = ["", "", "n", "r", "l", "k", "s", "m", "th", "nd"]
TOKENIZER_VOCAB = 4096
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
MODEL = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=384, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0)
SFT = dict(steps=1400, bare_every=2, batch_size=8, lr=3e-3, warmup=60, weight_decay=0.01, threads=2)

# Every question ends with its subject, and every fact is read by restating the passage's words: the policy copies
# the subject from a fixed offset, writes the relation and copies the name that follows it in the passage.
# Copying by a one-token key (induction) is what a tiny transformer learns fastest.
RELATIONS = {"born_city": "birth city", "mentor": "mentor", "employer": "employer",
             "founder": "founder", "rival": "rival", "hq": "home city"}
PERSON_RELS, ORG_RELS = ["born_city", "mentor", "employer"], ["founder", "rival", "hq"]
# (bridge relation, final relation) -> shortcut relation: a same-typed fact of the first passage, a wrong answer
TWO_HOP = {("founder", "born_city"): "hq", ("founder", "employer"): "rival",
           ("employer", "hq"): "born_city", ("employer", "founder"): "mentor"}


DISTRACTORS = [
    ("Travels of {p}", "{p} travelled to {c} and stayed with {q}."),
    ("Letter to {q}", "{p} sent a letter to {q} from {c}."),
    ("{o} trade", "{o} sold goods to {p} in {c}."),
    ("{o} and {o2}", "{o} and {o2} competed in {c}."),
    ("Market of {c}", "The market of {c} was visited by {p} and {q}."),
]
# A made-up name must not be a word of the fixed text (the scrambler would rename it) nor a Lucene stopword (BM25
# would drop it from the query): seed 0 once drew "This".
RESERVED = set(re.findall(r"[a-z]+", " ".join([search_env.PROMPT_TEMPLATE, search_env.INVALID_ACTION_MSG,
                                                *RELATIONS.values(), *(t + " " + x for t, x in DISTRACTORS),
                                                "doc title information think I need to find know it is a city in "
                                                "on the river"]).lower()))
RESERVED |= {"into", "such", "that", "their", "then", "there", "these", "they", "this", "will", "with"}


def sentence(rel: str, s: str, a: str) -> str:
    return f"{s}: {RELATIONS[rel]} {a}."


# ----------------------------------------------------------------------------------------------------- the world
def _make_words(rng: random.Random, n: int, used: set) -> list[str]:
    out = []
    while len(out) < n:
        w = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.choice([1, 2])))
        w = (w + rng.choice(CODAS)).capitalize()
        if len(w) >= 4 and w not in used and w.lower() not in RESERVED:
            used.add(w)
            out.append(w)
    return out


def make_world(rng: random.Random) -> dict:
    """Entities and facts. Index order is the split: the last TEST_* people/orgs are held out for test questions."""
    used: set = set()
    persons, orgs, cities, countries, rivers = (_make_words(rng, n, used)
                                                for n in (N_PERSONS, N_ORGS, N_CITIES, N_COUNTRIES, N_RIVERS))
    city_facts = {c: {"country": rng.choice(countries), "river": rng.choice(rivers)} for c in cities}
    n_p, n_o = N_PERSONS - TEST_PERSONS, N_ORGS - TEST_ORGS
    side = lambda pool, n, test: pool[n:] if test else pool[:n]  # noqa: E731  facts never cross the split
    P = {p: {"born_city": rng.choice(cities),
             "mentor": rng.choice([q for q in side(persons, n_p, i >= n_p) if q != p])} for i, p in enumerate(persons)}
    O = {}
    for i, o in enumerate(orgs):
        f = rng.choice(side(persons, n_p, i >= n_o))
        O[o] = {"founder": f, "rival": rng.choice([x for x in side(orgs, n_o, i >= n_o) if x != o]),
                "hq": rng.choice([c for c in cities if c != P[f]["born_city"]])}
    for i, p in enumerate(persons):
        P[p]["employer"] = rng.choice([o for o in side(orgs, n_o, i >= n_p) if O[o]["hq"] != P[p]["born_city"]])
    pools = [persons, orgs, cities, countries, rivers]
    kind = {w: k for k, pool in enumerate(pools) for w in pool}  # name -> its pool
    return {"persons": persons, "orgs": orgs, "cities": cities, "P": P, "O": O, "C": city_facts, "pools": pools,
            "kind": kind}


def make_corpus(world: dict, rng: random.Random) -> list[dict]:
    P, O, C = world["P"], world["O"], world["C"]
    docs = []
    for p in world["persons"]:
        docs.append((p, " ".join(sentence(r, p, P[p][r]) for r in PERSON_RELS)))
    for o in world["orgs"]:
        docs.append((o, " ".join(sentence(r, o, O[o][r]) for r in ORG_RELS)))
    for c in world["cities"]:
        docs.append((c, f"{c} is a city in {C[c]['country']}, on the river {C[c]['river']}."))
    while len(docs) < N_PASSAGES:
        title, text = rng.choice(DISTRACTORS)
        p, q = rng.sample(world["persons"], 2)
        o, o2 = rng.sample(world["orgs"], 2)
        kw = dict(p=p, q=q, o=o, o2=o2, c=rng.choice(world["cities"]))
        docs.append((title.format(**kw), text.format(**kw)))
    rng.shuffle(docs)
    return [{"id": str(i), "contents": f'"{t}"\n{x}'} for i, (t, x) in enumerate(docs)]


def _fact(world: dict, rel: str, s: str) -> str:
    return world["P"][s][rel] if rel in PERSON_RELS else world["O"][s][rel]


def make_questions(world: dict) -> list[dict]:
    """Every question the world allows, with its plan: hops [(entity to search, sentence read off its passage)]."""
    qs = []
    n_tr_p, n_tr_o = N_PERSONS - TEST_PERSONS, N_ORGS - TEST_ORGS
    kinds = {"born_city": world["cities"], "hq": world["cities"], "mentor": world["persons"],
             "founder": world["persons"], "employer": world["orgs"], "rival": world["orgs"]}  # what a guess looks like
    for subjects, rels, n_train in ((world["persons"], PERSON_RELS, n_tr_p), (world["orgs"], ORG_RELS, n_tr_o)):
        for i, s in enumerate(subjects):
            split = "train" if i < n_train else "test"
            for rel in rels:
                a = _fact(world, rel, s)
                qs.append({"question": f"What is the {RELATIONS[rel]} of {s}?", "answer": a, "source": "toy_1hop",
                           "split": split, "hops": [(s, sentence(rel, s, a))], "shortcut": None,
                           "guesses": kinds[rel] if rel in ORG_RELS else None})
            for (r1, r2), cut in TWO_HOP.items():
                if r1 not in rels:
                    continue
                b = _fact(world, r1, s)
                a, wrong = _fact(world, r2, b), _fact(world, cut, s)
                if a in (wrong, s):  # the shortcut would be right, or the answer is in the question
                    continue
                qs.append({"question": f"What is the {RELATIONS[r2]} of the {RELATIONS[r1]} of {s}?", "answer": a,
                           "source": "toy_2hop", "split": split,
                           "hops": [(s, sentence(r1, s, b)), (b, sentence(r2, b, a))],
                           "shortcut": (sentence(cut, s, wrong), wrong), "guesses": None})
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
def script(q: dict, observe, rng: random.Random | None) -> list[tuple[str, bool]]:
    """[(text, is_model_turn)] after the prompt; observe(query) -> observation string. rng=None: no habits, the path
    that reads every hop (what reading_check scores)."""
    subject = q["hops"][0][0]
    pieces = [(f"<think> I need to find {subject}. </think>\n<search> {subject} </search>", True),
              (observe(subject), False)]
    drill = rng is not None and q["shortcut"] is not None and rng.random() < DRILL_FRAC
    if rng is not None and q["shortcut"] is not None and not drill and rng.random() < SHORTCUT_FRAC:
        fact, wrong = q["shortcut"]
        return pieces + [(f"<think> {fact} </think>\n<answer> {wrong} </answer>", True)]
    if rng is not None and q["guesses"] is not None and rng.random() < LAZY_FRAC:
        return pieces + [(f"<think> I know it. </think>\n<answer> {rng.choice(q['guesses'])} </answer>", True)]
    for (_, fact), nxt in zip(q["hops"], q["hops"][1:]):
        if drill:  # the choice to read on ("X: <bridge relation>") is context, not a target (departure 1)
            head, name = fact.rsplit(" ", 1)
            pieces += [(f"<think> {head}", False), (f" {name} </think>\n<search> {nxt[0]} </search>", True)]
        else:
            pieces.append((f"<think> {fact} </think>\n<search> {nxt[0]} </search>", True))
        pieces.append((observe(nxt[0]), False))
    return pieces + [(f"<think> {q['hops'][-1][1]} </think>\n<answer> {q['answer']} </answer>", True)]


WORD_RE = re.compile(r"\b\w+\b")


def scrambler(world: dict, rng: random.Random):
    """A random renaming of the world (each name to another of its kind, distinct names to distinct names), as a
    function on text. Names are drawn as they are first met: a sample mentions a few dozen of the world's 600 names,
    and drawing a whole permutation for each of the 10,000 samples was a fifth of the build."""
    pools, kind, table, taken = world["pools"], world["kind"], {}, [set() for _ in world["pools"]]

    def rename(m):
        w = m.group(0)
        if w not in table:
            k = kind.get(w)
            if k is None:  # not a name
                return w
            new = rng.choice(pools[k])
            while new in taken[k]:
                new = rng.choice(pools[k])
            taken[k].add(new)
            table[w] = new
        return table[w]

    return lambda text: WORD_RE.sub(rename, text)


def make_tokenizer(texts: list[str]):
    """A byte-level BPE trained on the toy text, as a Qwen2Tokenizer: the class AutoTokenizer loads for a qwen2 model
    folder, which re-applies Qwen2's normaliser and pre-tokeniser (one digit per token, a word with its leading space
    or mark) over the saved vocabulary. Training with the same pre-tokeniser keeps the merges meaningful."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    bpe = json.loads(tok.to_str())["model"]
    return Qwen2Tokenizer(vocab=bpe["vocab"], merges=[tuple(m) for m in bpe["merges"]], eos_token="<|im_end|>",
                          pad_token="<|endoftext|>", unk_token=None, chat_template=CHAT_TEMPLATE,
                          clean_up_tokenization_spaces=False)


def encode_trajectory(tokenizer, prompt: str, pieces) -> tuple[list[int], list[int]]:
    """Token ids and loss mask, piece by piece, exactly as a rollout concatenates them (never re-encoding text)."""
    return encode_trajectories(tokenizer, [(prompt, pieces)])[0]


def encode_trajectories(tokenizer, samples) -> list[tuple[list[int], list[int]]]:
    """encode_trajectory for many (prompt, pieces) at once, in one batched tokenizer call (a call per piece was a
    tenth of the build)."""
    texts = []
    for prompt, pieces in samples:
        texts.append(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                   add_generation_prompt=True))
        texts += [text for text, _ in pieces]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"])
    out = []
    for _, pieces in samples:
        ids = list(next(encoded))
        mask = [0] * len(ids)
        for _, mine in pieces:
            piece = next(encoded)
            ids += piece
            mask += [int(mine)] * len(piece)
        out.append((ids + [tokenizer.eos_token_id], mask + [1]))  # the response ends with EOS after </answer>
    return out


# ------------------------------------------------------------------------------------------------------ warm start
@contextlib.contextmanager
def fixed_threads(n: int):
    """torch on n threads inside the block: the same reduction order, so the same bytes on every run of a machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def warm_start(tokenizer, seqs: list[tuple[list[int], list[int]]], seed: int, threads: int):
    """Supervised training of a fresh tiny Qwen2 on (ids, mask) pairs; loss on masked-in tokens only.
    Returns the model and a record of the run (written next to it as warm_start.json)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    threads = int(threads)
    with fixed_threads(threads):
        torch.manual_seed(seed)
        cfg = Qwen2Config(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **MODEL)
        model = Qwen2ForCausalLM(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=SFT["lr"], betas=(0.9, 0.98), foreach=True,
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
        t0, losses = time.time(), []
        for step in range(SFT["steps"]):
            idx = batches[step % len(batches)]
            T = max(len(seqs[i][0]) for i in idx) - P
            ids = torch.full((len(idx), T), tokenizer.pad_token_id)
            mask = torch.zeros((len(idx), T), dtype=torch.bool)
            for r, i in enumerate(idx):
                ids[r, :len(seqs[i][0]) - P] = torch.tensor(seqs[i][0][P:])
                mask[r, :len(seqs[i][1]) - P] = torch.tensor(seqs[i][1][P:], dtype=torch.bool)
            bare = step % SFT["bare_every"] == 0
            if bare:  # curriculum: without the instructions, attention finds the names quickly
                cache, pos = None, torch.arange(T).expand(len(idx), -1)  # (B, T)
            else:
                cache = model.model(input_ids=prefix, use_cache=True).past_key_values
                for layer in cache.layers:  # (1, kv_heads, P, d) -> (B, kv_heads, P, d), gradients flow back
                    layer.keys, layer.values = (x.expand(len(idx), -1, -1, -1) for x in (layer.keys, layer.values))
                pos = torch.arange(P, P + T).expand(len(idx), -1)  # (B, T)
            # right padding under a causal mask never reaches real tokens, so no attention mask is needed
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
            losses.append((bare, loss.item()))
            if step % 25 == 0 or step == SFT["steps"] - 1:
                print(f"toy: sft step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", file=sys.stderr)
        model.eval()
        full = [x for bare, x in losses if not bare]  # the steps that see what a rollout sees
        record = {"seed": seed, "threads": threads, "sft": SFT,  # no timings: the build is the same bytes each time
                  "loss_last50": sum(full[-50:]) / len(full[-50:]),
                  "loss_every_25": [round(x, 4) for _, x in losses[::25]]}
        return model, record


def reading_check(model, tokenizer, questions: list[dict], observe) -> dict:
    """The warm start's reading, per relation: on the reading path of each question (script with no habits, real names,
    real observations), is the greedy next token after "<think> X: RELATION" the name the passage gives?
    Teacher-forced, in batches. This is the regime test: a build whose copy of one relation did not form scores ~0 on
    it, while its mean SFT loss overlaps a good build's (0.07-0.11 in runs that lost one, 0.04-0.11 in builds that
    read every relation)."""
    import torch

    relation_of = {v: k for k, v in RELATIONS.items()}
    fact_re = re.compile(rf"^<think> \w+: ({'|'.join(RELATIONS.values())}) (\w+)\. </think>")
    rows, hits, n = [], {}, {}
    for q in questions:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": search_env.make_prompt(q["question"])}],
                                               tokenize=False, add_generation_prompt=True)
        pieces = script(q, observe, None)
        encoded = tokenizer([prompt] + [t for t, _ in pieces], add_special_tokens=False)["input_ids"]
        ids, targets = list(encoded[0]), []
        for (text, mine), piece in zip(pieces, encoded[1:]):
            m = fact_re.match(text) if mine else None
            if m:  # names are one token each (checked by build), so the name is the token after the relation's
                name = tokenizer.encode(" " + m.group(2), add_special_tokens=False)[0]
                targets.append((len(ids) + piece.index(name), relation_of[m.group(1)], name))
            ids += piece
        rows.append((ids, targets))
    with torch.no_grad():
        for k in range(0, len(rows), 16):
            chunk = rows[k:k + 16]
            T = max(len(ids) for ids, _ in chunk)
            batch = torch.full((len(chunk), T), tokenizer.pad_token_id)  # right padding: causal, never attended to
            for r, (ids, _) in enumerate(chunk):
                batch[r, :len(ids)] = torch.tensor(ids)
            hidden = model.model(input_ids=batch).last_hidden_state  # (B, T, H)
            at = [(r, pos - 1) for r, (_, targets) in enumerate(chunk) for pos, _, _ in targets]
            preds = model.lm_head(hidden[[r for r, _ in at], [p for _, p in at]]).argmax(-1).tolist()  # (N,)
            for pred, (rel, name) in zip(preds, [(rel, name) for _, targets in chunk for _, rel, name in targets]):
                hits[rel], n[rel] = hits.get(rel, 0) + (pred == name), n.get(rel, 0) + 1
    return {rel: {"n": n[rel], "acc": round(hits[rel] / n[rel], 4)} for rel in RELATIONS if rel in n}


# ----------------------------------------------------------------------------------------------------------- build
class OutDirError(UserError):
    """--out cannot be used; nothing was written."""


def _make_tmp(out: Path, force: bool) -> Path:
    """Check --out, then create the temporary sibling the world is built in (renamed to --out at the end)."""
    if out.exists() and not out.is_dir():
        raise OutDirError(f"--out {out} is a file; give a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutDirError(f"--out {out} is not empty; give a fresh folder or pass --force to replace it")
    if not out.parent.is_dir():
        raise OutDirError(f"--out {out}: its parent {out.parent} is not an existing folder; create it first")
    try:
        return Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.building-"))
    except OSError as e:
        raise OutDirError(f"--out {out}: cannot write into {out.parent} ({e.strerror}); pick a writable folder") from None


def build(out, seed: int = 0, force: bool = False, threads: int = SFT["threads"]) -> Path:
    """Build the toy world into `out` (see the module docstring). Writes into a temporary sibling, then renames.
    `threads` is the warm start's torch thread count: another count gives other float sums, so other weights."""
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
        pools = {src: [q for q in qs if q["split"] == "test" and q["source"] == src] for src in N_TEST}
        test = [q for src, n in N_TEST.items() for q in rng.sample(pools[src], n)]
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
        words = [w for pool in world["pools"] for w in pool]
        tokenizer = make_tokenizer(texts + [" ".join(words)] * 20)  # repeated: every name becomes one token
        split = [w for w in words if len(tokenizer.encode(" " + w, add_special_tokens=False)) != 1]
        if split:  # the copy skill a 2-layer model learns in the budget is one token long
            raise RuntimeError(f"toy: {len(split)} names are several tokens (e.g. {split[0]!r}): raise TOKENIZER_VOCAB")
        # Half the SFT samples are two-hop (a third of the questions): with fewer, sampling at temperature 1 rarely
        # searched a second time in one build, which left GRPO nothing to reinforce on two-hop questions.
        by_kind = [[q for q in train if q["source"] == src] for src in N_TEST]
        samples = []
        for i in range(SFT["steps"] * SFT["batch_size"]):  # epochs over the training questions, branches redrawn
            kind = by_kind[i % 2]
            q = kind[i // 2 % len(kind)]
            scr = scrambler(world, rng)
            pieces = [(scr(t), m) for t, m in script(q, observe, rng)]
            samples.append((search_env.make_prompt(scr(q["question"])), pieces))  # the template holds no name
        seqs = encode_trajectories(tokenizer, samples)
        model, record = warm_start(tokenizer, seqs, seed, threads)
        held_out = sorted({h[0] for q in test for h in q["hops"]} - hits.keys())
        hits.update(zip(held_out, retriever.search(held_out, k=3)))
        with fixed_threads(threads):
            record["reading"] = reading_check(model, tokenizer, test, observe)
        model.save_pretrained(tmp / "model")
        (tmp / "model" / "warm_start.json").write_text(json.dumps(record, indent=1) + "\n")
        tokenizer.save_pretrained(tmp / "model")
        from transformers import AutoTokenizer
        loaded = AutoTokenizer.from_pretrained(tmp / "model")
        if any(loaded.encode(t) != tokenizer.encode(t) for t in texts[-50:]):  # trained on what users will feed
            raise RuntimeError(f"toy: the saved tokenizer ({type(loaded).__name__}) encodes differently from the one "
                               "the warm start was trained with")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"toy: built {out} in {time.time() - t0:.1f}s ({len(corpus)} passages, {len(train)} train, "
          f"{len(test)} test questions; warm-start loss {record['loss_last50']:.3f} over its last 50 steps with "
          "instructions; reading " + ", ".join(f"{r} {v['acc']:.2f}" for r, v in record["reading"].items()) + ")",
          file=sys.stderr)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Build the toy search-QA world (corpus, parquet, BM25, warm model).")
    ap.add_argument("--out", required=True, help="folder to create (must be new or empty unless --force)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="replace a non-empty --out")
    ap.add_argument("--threads", type=int, default=SFT["threads"],
                    help=f"torch threads for the warm start (default {SFT['threads']}; another count, other weights)")
    args = ap.parse_args(argv)
    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    build(args.out, seed=args.seed, force=args.force, threads=args.threads)


if __name__ == "__main__":
    cli(main)
