"""rollout.py: the KV-cache engine against a slow full-recompute reference, the protocol's edge cases driven by a
scripted model through the real engine, the masks, and the log-probs used for training."""
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import DynamicCache, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

import rollout as rollout_module
import search_env
import train
from rollout import Batch, RolloutConfig, Trajectory, collate, response_logprobs, rollout, score, wrap_prompt

TAGS = ("</search>", "</answer>")


def rcfg(greedy=False, **kw) -> RolloutConfig:
    """Rollout settings as train.py builds them: train.Config's defaults with the fields given changed."""
    return train.rollout_config(train.Config(**kw), greedy)


# --------------------------------------------------------------------------------------------- test world

def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


B2U = _bytes_to_unicode()


def make_tokenizer(glued=("</search>\n", "</answer>\n")) -> PreTrainedTokenizerFast:
    """Byte-level BPE: every byte is a token, so every tag spans several tokens; the only merges build the
    strings in `glued` (each becomes one token, with its prefixes), e.g. the tag and a newline in ONE token."""
    vocab = {B2U[b]: i for i, b in enumerate(sorted(B2U))}
    merges = []
    for w in glued:
        w = "".join(B2U[b] for b in w.encode())
        cur = w[0]
        for ch in w[1:]:
            merges.append((cur, ch))
            cur += ch
            vocab.setdefault(cur, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|eos|>", pad_token="<|pad|>")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def tiny_qwen(vocab_size: int, seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    return Qwen2ForCausalLM(cfg).eval()


class FakeRetriever:
    """Deterministic retriever that records its calls (query lists)."""

    def __init__(self, doc_words: int = 3):
        self.calls = []
        self.doc_words = doc_words

    def search(self, queries, k):
        self.calls.append(list(queries))
        return [[{"id": f"{q}-{i}", "contents": f'"T{i} {q}"\n' + " ".join(["w"] * self.doc_words), "score": 1.0}
                 for i in range(k)] for q in queries]


class Boom:
    def search(self, queries, k):
        raise ConnectionError("index offline")


# --------------------------------------------------------------------------------------------- slow reference

def slow_rollout(model, tokenizer, prompt: str, retriever, cfg: RolloutConfig):
    """The protocol the plain way: one sequence, no cache, no padding, full recompute for every token. Turns are
    read as Search-R1 reads them, decoded without special tokens."""
    prompt_ids = wrap_prompt(tokenizer, prompt)
    eos = {tokenizer.eos_token_id}
    resp, mask = [], []
    for turn in range(1, cfg.max_turns + 2):
        ids, why = [], None
        while why is None:
            with torch.no_grad():
                logits = model(torch.tensor([prompt_ids + resp + ids])).logits[0, -1]
            ids.append(int(logits.argmax()))
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if any(t in text for t in TAGS):
                why = "tag"
            elif ids[-1] in eos:
                why = "eos"
            elif len(ids) >= cfg.max_turn_tokens:
                why = "cap"
            elif len(prompt_ids) + len(resp) + len(ids) >= cfg.max_context:
                why = "context"
        resp += ids
        mask += [1] * len(ids)
        action, content = search_env.parse_action(text)
        if action == "answer" or why == "context" or turn == cfg.max_turns + 1:
            break
        if action == "search" and content:
            obs = search_env.format_observation(retriever.search([content], cfg.topk)[0])
        elif action == "search":
            obs = search_env.format_observation([])
        else:  # EOS or the cap without an action: the invalid-action message, and the rollout goes on
            obs = search_env.INVALID_ACTION_MSG
        glued = text[min(text.find(t) + len(t) for t in TAGS if t in text):] if why == "tag" else ""
        if glued and obs.startswith(glued):  # the glued token already wrote these characters
            obs = obs[len(glued):]
        obs_ids = tokenizer(obs, add_special_tokens=False)["input_ids"]
        if action == "search" and content and len(obs_ids) > cfg.max_obs_tokens:
            tail = tokenizer("</information>\n\n", add_special_tokens=False)["input_ids"]
            obs_ids = obs_ids[:cfg.max_obs_tokens - len(tail)] + tail
        drop = why == "eos"  # an EOS followed by the message leaves the context
        if len(prompt_ids) + len(resp) - drop + len(obs_ids) >= cfg.max_context:
            break
        if drop:
            resp, mask = resp[:-1], mask[:-1]
        resp += obs_ids
        mask += [0] * len(obs_ids)
    return resp, mask


@pytest.mark.parametrize("prefill_tokens", [4096, 16])
def test_greedy_kv_engine_equals_full_recompute_random_model(tok, monkeypatch, prefill_tokens):
    # prompts of different lengths (left padding), rows stopping at different steps (parking, holes), caps;
    # repeated prompts share one prefill; 16 tokens per prefill block splits every prefill into many blocks
    monkeypatch.setattr(rollout_module, "_PREFILL_TOKENS", prefill_tokens)
    model = tiny_qwen(len(tok))
    prompts = ["Q: where?", "Question number one about a rather long thing", "x", "what is the capital of it",
               "ab cd", "12345 678", "Q: where?", "ab cd", "Q: where?"]
    cfg = rcfg(max_turns=2, max_turn_tokens=10, max_obs_tokens=50, greedy=True, max_context=600)
    trajs = rollout(model, tok, prompts, list(range(len(prompts))), FakeRetriever(), cfg)
    lengths = set()
    for p, t in zip(prompts, trajs):
        resp, mask = slow_rollout(model, tok, p, FakeRetriever(), cfg)
        assert t.response_ids == resp, p
        assert t.loss_mask == mask
        lengths.add(len(resp))
    assert len(lengths) > 1  # the rows did not all do the same thing


def test_greedy_kv_engine_equals_full_recompute_toy(toy_dir, bm25):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pyarrow.parquet as pq

    model = AutoModelForCausalLM.from_pretrained(toy_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(toy_dir / "model")
    rows = pq.read_table(toy_dir / "test.parquet").to_pylist()[:8]
    prompts = [r["prompt"][0]["content"] for r in rows]
    cfg = rcfg(max_turns=3, max_turn_tokens=64, max_obs_tokens=120, greedy=True)
    trajs = rollout(model, tokenizer, prompts, list(range(len(prompts))), bm25, cfg)
    for p, t in zip(prompts, trajs):
        resp, mask = slow_rollout(model, tokenizer, p, bm25, cfg)
        assert t.response_ids == resp
        assert t.loss_mask == mask
    assert sum(t.num_searches for t in trajs) > 0  # the toy policy searches, so observations were exercised


# --------------------------------------------------------------------------------------------- scripted model

class ScriptedLM(torch.nn.Module):
    """Emits a chosen token stream per prompt, one token per forward in which the row's last column is real,
    i.e. each time the engine will sample for that row. Accepts the HF kwargs and keeps a real DynamicCache whose
    "keys" are the token ids, so it sees its context only through the engine's cache and attention mask; it
    records that context so the test can check the cache held exactly prompt + response."""

    def __init__(self, tokenizer, scripts: dict[str, list[int]], vocab_size: int):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.scripts = {tuple(wrap_prompt(tokenizer, p)): s for p, s in scripts.items()}
        self.count = {k: 0 for k in self.scripts}
        self.context = {}
        self.eos = tokenizer.eos_token_id
        self.V = vocab_size

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True,
                logits_to_keep=0, **kw):
        cache = past_key_values if past_key_values is not None else DynamicCache()
        x = input_ids[:, None, :, None].float()  # (b, 1, n, 1)
        keys, _ = cache.update(x, x, 0)
        ctx = keys[:, 0, :, 0].long()  # (b, L)
        logits = torch.full((input_ids.shape[0], 1, self.V), -30.0)
        for r in range(input_ids.shape[0]):
            if attention_mask[r, -1] == 0:
                continue  # an idle row: the engine discards this output
            real = ctx[r][attention_mask[r].bool()].tolist()
            key = next(k for k in self.scripts if tuple(real[:len(k)]) == k)
            assert position_ids[r, -1] == len(real) - 1  # rotary position = count of real tokens
            stream, n = self.scripts[key], self.count[key]
            logits[r, 0, stream[n] if n < len(stream) else self.eos] = 30.0
            self.count[key] += 1
            self.context[key] = real
        return type("Out", (), {"logits": logits, "past_key_values": cache})()


def ids_of(tok, *pieces):
    """Token ids: str pieces byte by byte (so tags span several tokens), int pieces as they are."""
    out = []
    for p in pieces:
        out += [tok.convert_tokens_to_ids("".join(B2U[b] for b in ch.encode())) for ch in p] if isinstance(p, str) \
            else [p]
    return out


def run_scripted(tok, scripts, cfg, retriever=None):
    model = ScriptedLM(tok, scripts, len(tok))
    prompts = list(scripts)
    trajs = rollout(model, tok, prompts, list(range(len(prompts))), retriever or FakeRetriever(), cfg)
    for p, t in zip(prompts, trajs):
        # the cache held exactly prompt + response, minus the last token (sampled, never fed)
        assert model.context[tuple(t.prompt_ids)] == t.prompt_ids + t.response_ids[:-1]
    return dict(zip(prompts, trajs)), model


def runs(t: Trajectory, value: int) -> list[tuple[int, int]]:
    """Maximal [start, end) runs of loss_mask == value."""
    out, start = [], None
    for i, m in enumerate(t.loss_mask + [1 - value]):
        if m == value and start is None:
            start = i
        elif m != value and start is not None:
            out.append((start, i))
            start = None
    return out


def test_scripted_protocol_cases(tok):
    glued = tok.convert_tokens_to_ids("".join(B2U[b] for b in "</search>\n".encode()))
    eos = tok.eos_token_id
    scripts = {
        "split": ids_of(tok, "<think>go</think><search> q1 </search>", "<answer> a1 </answer>", "NEVER"),
        "glued": ids_of(tok, "<search> q2 ", glued, "<answer> a2 </answer>"),
        "direct": ids_of(tok, "<answer> a3 </answer>", "NEVER SEEN"),
        "no tag": ids_of(tok, "abcdefghij", "<answer> a4 </answer>"),
        "eos": ids_of(tok, "<think>hm", eos, "NEVER"),
        "empty": ids_of(tok, "<search>  </search>", "<answer> a5 </answer>"),
    }
    ret = FakeRetriever()
    cfg = rcfg(max_turns=2, max_turn_tokens=8 * 5, max_obs_tokens=200, greedy=True)
    # "no tag" needs a cap that cuts it: make its first turn run into the cap of 40 tokens
    scripts["no tag"] = ids_of(tok, "x" * 45, "<answer> a4 </answer>")
    out, _ = run_scripted(tok, scripts, cfg, ret)
    inv = tok(search_env.INVALID_ACTION_MSG, add_special_tokens=False)["input_ids"]

    def obs_ids(q):
        return tok(search_env.format_observation(FakeRetriever().search([q], 3)[0]), add_special_tokens=False)[
            "input_ids"]

    # one retriever call per turn that may search, all of the turn's queries together (none in turn 2, as
    # Search-R1's batch_search sends), the empty query never; the final turn 3 makes no call
    assert ret.calls == [["q1", "q2"], []]

    t = out["split"]
    turn1, turn2 = ids_of(tok, "<think>go</think><search> q1 </search>"), ids_of(tok, "<answer> a1 </answer>")
    assert t.response_ids == turn1 + obs_ids("q1") + turn2
    assert t.turn_spans == [(0, len(turn1)), (len(turn1) + len(obs_ids("q1")), len(t.response_ids))]
    assert (t.num_searches, t.num_valid_actions, t.answer is not None, t.answer) == (1, 2, True, "a1")
    assert t.text == tok.decode(t.response_ids) and "NEVER" not in t.text

    t = out["glued"]
    turn1 = ids_of(tok, "<search> q2 ", glued)
    assert t.response_ids[:len(turn1)] == turn1  # the glued token is kept whole, the turn ends on it
    # the glued token wrote "\n" after the tag: the observation does not write it again (Search-R1's text)
    assert t.text.startswith("<search> q2 </search>\n\n<information>")
    assert t.response_ids[len(turn1):len(turn1) + len(obs_ids("q2")) - 1] == \
        tok(search_env.format_observation(FakeRetriever().search(["q2"], 3)[0])[1:], add_special_tokens=False)[
            "input_ids"]
    assert (t.num_searches, t.answer is not None, t.answer) == (1, True, "a2")

    t = out["direct"]
    assert t.response_ids == ids_of(tok, "<answer> a3 </answer>") and t.loss_mask == [1] * len(t.response_ids)
    assert (t.num_searches, t.num_valid_actions, t.answer is not None, t.answer) == (0, 1, True, "a3")

    t = out["no tag"]
    assert t.response_ids == ids_of(tok, "x" * 40) + inv + ids_of(tok, "x" * 5, "<answer> a4 </answer>")
    assert t.turn_spans == [(0, 40), (40 + len(inv), len(t.response_ids))]
    assert (t.num_valid_actions, t.answer is not None, t.answer) == (1, True, "a4")

    t = out["eos"]
    # EOS without an action is an invalid action (Search-R1): the EOS leaves the context, the message follows and
    # the policy writes on; turn 2 ("NEVER", EOS) again; the final turn 3 is a lone EOS, kept (nothing follows)
    assert t.response_ids == ids_of(tok, "<think>hm") + inv + ids_of(tok, "NEVER") + inv + [eos]
    assert t.loss_mask[-1] == 1 and eos not in t.response_ids[:-1]
    assert (t.answer is not None, t.answer, t.num_valid_actions, len(t.turn_spans)) == (False, None, 0, 3)

    t = out["empty"]
    empty = tok(search_env.format_observation([]), add_special_tokens=False)["input_ids"]
    assert tok.decode(empty) == "\n\n<information></information>\n\n"
    first = ids_of(tok, "<search>  </search>")
    assert t.response_ids == first + empty + ids_of(tok, "<answer> a5 </answer>")
    assert (t.num_searches, t.num_valid_actions, t.answer is not None) == (0, 2, True)

    # masks: the mask-1 runs are exactly the turns; each mask-0 run decodes to an observation or the message
    for t in out.values():
        assert runs(t, 1) == t.turn_spans
        assert len(t.sample_logprobs) == len(t.response_ids) == len(t.loss_mask)
        for s, e in runs(t, 0):
            turn = tok.decode(t.response_ids[next(a for a, b in t.turn_spans if b == s):s])
            tag = max(turn.rfind(x) + len(x) if x in turn else -1 for x in TAGS)
            # what the turn's tag-completing token wrote after the tag, then the run: one observation or message
            text = (turn[tag:] if tag >= 0 else "") + tok.decode(t.response_ids[s:e])
            assert text == search_env.INVALID_ACTION_MSG or (
                text.startswith("\n\n<information>") and text.endswith("</information>\n\n")), text
            assert all(lp == 0.0 for lp in t.sample_logprobs[s:e])
        assert all(lp > -1e-3 for lp, m in zip(t.sample_logprobs, t.loss_mask) if m)  # forced tokens: p ~ 1


BAD = "<answer> x<answer> y and more text, and still no closing tag"  # never closes a tag


def test_scripted_final_turn_search_not_executed(tok):
    ret = FakeRetriever()
    scripts = {"final": ids_of(tok, "<search> a </search>", "<search> b </search>", "<answer> no </answer>"),
               "bad": ids_of(tok, BAD)}
    cfg = rcfg(max_turns=1, max_turn_tokens=20, greedy=True)
    out, _ = run_scripted(tok, scripts, cfg, ret)
    assert ret.calls == [["a"]]
    t = out["final"]
    turn1, turn2 = ids_of(tok, "<search> a </search>"), ids_of(tok, "<search> b </search>")
    obs = tok(search_env.format_observation(FakeRetriever().search(["a"], 3)[0]), add_special_tokens=False)
    # the final turn's search is not executed and nothing follows it; the trajectory ends unanswered
    assert t.response_ids == turn1 + obs["input_ids"] + turn2
    assert (t.num_searches, t.num_valid_actions, t.answer is not None, t.answer, len(t.turn_spans)) == \
        (1, 2, False, None, 2)
    t = out["bad"]
    inv = tok(search_env.INVALID_ACTION_MSG, add_special_tokens=False)["input_ids"]
    # turn 1 capped at 20 tokens -> invalid message; final turn capped too, and no message after it
    assert t.response_ids == ids_of(tok, BAD[:20]) + inv + ids_of(tok, BAD[20:40])
    assert (t.num_valid_actions, t.answer is not None, t.turn_spans) == \
        (0, False, [(0, 20), (20 + len(inv), 40 + len(inv))])
    # the invalid-action message itself holds "<answer> and </answer>": the answer must come from model turns only
    assert "<answer> and </answer>" in t.text and t.answer is None


def test_scripted_observation_truncated_keeping_closing_tag(tok):
    ret = FakeRetriever(doc_words=200)
    scripts = {"long": ids_of(tok, "<search> big </search>", "<answer> z </answer>")}
    cfg = rcfg(max_turns=2, max_turn_tokens=500, max_obs_tokens=40, greedy=True)
    out, _ = run_scripted(tok, scripts, cfg, ret)
    t = out["long"]
    (s, e), = runs(t, 0)
    assert e - s == 40
    text = tok.decode(t.response_ids[s:e])
    full = search_env.format_observation(ret.search(["big"], 3)[0])
    tail = "</information>\n\n"
    assert text.endswith(tail) and full.startswith(text[:-len(tail)]) and len(full) > len(text)
    assert t.answer is not None and t.answer == "z"


def test_retriever_error_names_the_turn(tok):
    scripts = {"a": ids_of(tok, "<answer> fine </answer>"),
               "b": ids_of(tok, "<search> q </search>"), "c": ids_of(tok, "<search> r </search>")}
    model = ScriptedLM(tok, scripts, len(tok))
    with pytest.raises(RuntimeError, match=r"retriever failed in turn 1 on 2 queries: index offline"):
        rollout(model, tok, list(scripts), [0, 1, 2], Boom(), rcfg(greedy=True, max_turns=4, max_turn_tokens=30))


def test_context_cap_stops_the_row(tok):
    scripts = {"p": ids_of(tok, "y" * 100)}
    cfg = rcfg(max_turns=3, max_turn_tokens=30, greedy=True, max_context=len(wrap_prompt(tok, "p")) + 50)
    out, _ = run_scripted(tok, scripts, cfg)
    t = out["p"]
    # turn 1: 30 tokens, then the invalid message (does not fit under 50) ends the trajectory
    inv = tok(search_env.INVALID_ACTION_MSG, add_special_tokens=False)["input_ids"]
    assert len(inv) > 20 and t.response_ids == ids_of(tok, "y" * 30) and t.answer is None


def test_bad_config_is_a_clear_error(tok):
    model = tiny_qwen(len(tok))
    with pytest.raises(ValueError, match="group ids"):
        rollout(model, tok, ["a", "b"], [0], FakeRetriever(), rcfg(max_turns=4, max_turn_tokens=500))
    with pytest.raises(ValueError, match="max_context"):
        rollout(model, tok, ["a" * 50], [0], FakeRetriever(), rcfg(max_turns=4, max_turn_tokens=500, max_context=20))


# --------------------------------------------------------------------------------------------- sampling

def test_seeded_sampling_is_reproducible_and_logprobs_match_training(tok):
    model = tiny_qwen(len(tok), seed=1)
    prompts = ["alpha", "beta gamma", "delta"] * 2
    cfg = rcfg(max_turns=1, max_turn_tokens=20, temperature=0.7, top_p=0.9)
    a = rollout(model, tok, prompts, [0, 1, 2, 0, 1, 2], FakeRetriever(), cfg, torch.Generator().manual_seed(3))
    b = rollout(model, tok, prompts, [0, 1, 2, 0, 1, 2], FakeRetriever(), cfg, torch.Generator().manual_seed(3))
    c = rollout(model, tok, prompts, [0, 1, 2, 0, 1, 2], FakeRetriever(), cfg, torch.Generator().manual_seed(4))
    assert [t.response_ids for t in a] == [t.response_ids for t in b]
    assert [t.response_ids for t in a] != [t.response_ids for t in c]
    assert [t.group_id for t in a] == [0, 1, 2, 0, 1, 2]
    # the sampling log-probs are log_softmax(logits / T) before top-p, i.e. what training recomputes
    batch = collate(a, tok.pad_token_id)
    logp = score(model, batch, cfg.temperature, micro_batch_size=4)
    for i, t in enumerate(a):
        n = len(t.response_ids)
        m = torch.tensor(t.loss_mask, dtype=torch.bool)
        torch.testing.assert_close(logp[i, :n][m], torch.tensor(t.sample_logprobs)[m], atol=2e-5, rtol=0)


# --------------------------------------------------------------------------------------------- training side

def _traj(prompt, response, mask):
    return Trajectory(0, prompt, response, mask, [], [0.0] * len(response), 0, 0, None, "")


def test_collate_layout():
    trajs = [_traj([5, 6], [7, 8, 9], [1, 0, 1]), _traj([1, 2, 3], [4], [1])]
    b = collate(trajs, pad_id=0)
    assert b.prompt_len == 3
    assert b.input_ids.tolist() == [[0, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 0]]
    assert b.attention_mask.tolist() == [[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    assert b.position_ids.tolist() == [[0, 0, 1, 2, 3, 4], [0, 1, 2, 3, 3, 3]]
    assert b.response_mask.tolist() == [[1, 0, 1], [1, 0, 0]] and b.response_mask.dtype == torch.float32
    s = b.select([1])  # re-trimmed: no left pad, response width 1
    assert (s.prompt_len, s.input_ids.tolist(), s.response_mask.tolist()) == (3, [[1, 2, 3, 4]], [[1.0]])
    s = b.select([0])
    assert (s.prompt_len, s.input_ids.tolist(), s.position_ids.tolist()) == (2, [[5, 6, 7, 8, 9]], [[0, 1, 2, 3, 4]])


def test_response_logprobs_and_score_match_unpadded_forward():
    model = tiny_qwen(300, seed=3)
    g = torch.Generator().manual_seed(0)
    trajs = []
    for p, r in [(3, 5), (7, 2), (1, 9), (4, 4), (6, 1)]:
        ids = torch.randint(0, 300, (p + r,), generator=g).tolist()
        trajs.append(_traj(ids[:p], ids[p:], [1] * r))
    batch = collate(trajs, pad_id=0)
    T = 0.8
    ref_lp, ref_ent = [], []
    for t in trajs:
        with torch.no_grad():
            logits = model(torch.tensor([t.prompt_ids + t.response_ids])).logits[0].float() / T
        logits = logits[len(t.prompt_ids) - 1:-1]  # (r, V) predicting the response tokens
        lsm = torch.log_softmax(logits, -1)
        ref_lp.append(lsm.gather(1, torch.tensor(t.response_ids)[:, None])[:, 0])
        ref_ent.append(-(lsm.exp() * lsm).sum(-1))
    with torch.no_grad():
        lp, ent = response_logprobs(model, batch, T, with_entropy=True)
    slp, sent = score(model, batch, T, micro_batch_size=2, with_entropy=True)
    assert lp.shape == slp.shape == (5, 9)
    for i, t in enumerate(trajs):
        r = len(t.response_ids)
        for got_lp, got_ent in ((lp, ent), (slp, sent)):
            torch.testing.assert_close(got_lp[i, :r], ref_lp[i], atol=1e-5, rtol=0)
            torch.testing.assert_close(got_ent[i, :r], ref_ent[i], atol=1e-5, rtol=0)
            assert (got_lp[i, r:] == 0).all() and (got_ent[i, r:] == 0).all()
    # gradients flow through response_logprobs
    lp = response_logprobs(model, batch, T)
    lp.sum().backward()
    assert model.model.embed_tokens.weight.grad.abs().sum() > 0


def test_batch_to_keeps_layout():
    b = collate([_traj([1], [2, 3], [1, 1])], pad_id=0).to("cpu")
    assert isinstance(b, Batch) and b.prompt_len == 1 and b.input_ids.tolist() == [[1, 2, 3]]


# --------------------------------------------------------------------------------------------- toy policy

def test_toy_policy_searches_and_em_in_promised_range(toy_dir, bm25):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pyarrow.parquet as pq

    model = AutoModelForCausalLM.from_pretrained(toy_dir / "model").eval()
    tokenizer = AutoTokenizer.from_pretrained(toy_dir / "model")
    rows = pq.read_table(toy_dir / "test.parquet").to_pylist()
    prompts = [r["prompt"][0]["content"] for r in rows]
    golds = [list(r["reward_model"]["ground_truth"]["target"]) for r in rows]
    trajs = rollout(model, tokenizer, prompts, list(range(len(rows))), bm25,
                    rcfg(max_turns=4, max_turn_tokens=100, max_obs_tokens=300, greedy=True))
    em = sum(search_env.exact_match(t.answer, g) for t, g in zip(trajs, golds)) / len(rows)
    assert 0.10 <= em <= 0.50, em
    assert sum(t.num_searches > 0 for t in trajs) >= len(trajs) // 2
    assert all(t.turn_spans and t.turn_spans[0][0] == 0 for t in trajs)


# --------------------------------------------------------------------------------------------- Search-R1's text

def test_glued_closing_tag_writes_its_newlines_once(tok):
    """Qwen2's vocabulary has `>\\n\\n` as one token, so the token completing `</search>` also writes the blank line
    that the observation starts with. Search-R1 cuts the decoded turn at the tag, re-tokenises and appends the whole
    observation; our context must read the same, keeping the sampled ids."""
    qtok = make_tokenizer(glued=(">\n\n",))
    gl = qtok.convert_tokens_to_ids("".join(B2U[b] for b in ">\n\n".encode()))
    assert qtok.decode([gl]) == ">\n\n"
    scripts = {"s": ids_of(qtok, "<search> q </search", gl, "<answer> a </answer", gl),
               "x": ids_of(qtok, "no tag </search", gl, "<answer> b </answer>")}
    out, _ = run_scripted(qtok, scripts, rcfg(max_turns=2, max_turn_tokens=40, greedy=True),
                          FakeRetriever(doc_words=1))
    t = out["s"]
    assert t.text == ('<search> q </search>\n\n<information>Doc 1(Title: "T0 q") w\nDoc 2(Title: "T1 q") w\n'
                      'Doc 3(Title: "T2 q") w</information>\n\n<answer> a </answer>\n\n')  # after </answer>: kept
    assert t.response_ids[:len(ids_of(qtok, "<search> q </search", gl))] == ids_of(qtok, "<search> q </search", gl)
    assert (t.num_searches, t.answer) == (1, "a")
    # an unopened tag is an invalid action; the message starts with one "\n", not a prefix of "\n\n": the glued
    # characters stay (a documented departure: Search-R1's text is "no tag </search>\nMy previous ...")
    t = out["x"]
    assert t.text == "no tag </search>\n\n" + search_env.INVALID_ACTION_MSG + "<answer> b </answer>"


def test_eos_without_action_is_an_invalid_action_and_the_policy_goes_on(tok):
    eos = tok.eos_token_id
    scripts = {"p": ids_of(tok, "<think> hm </think>", eos, "<search> q </search>", "<answer> a </answer>")}
    out, model = run_scripted(tok, scripts, rcfg(max_turns=3, max_turn_tokens=40, greedy=True),
                              FakeRetriever(doc_words=1))
    t = out["p"]
    msg = ("\nMy previous action is invalid. If I want to search, I should put the query between <search> and "
           "</search>. If I want to give the final answer, I should put the answer between <answer> and </answer>. "
           "Let me try again.\n")
    assert t.text == ('<think> hm </think>' + msg + '<search> q </search>\n\n<information>Doc 1(Title: "T0 q") w\n'
                      'Doc 2(Title: "T1 q") w\nDoc 3(Title: "T2 q") w</information>\n\n<answer> a </answer>')
    assert eos not in t.response_ids  # Search-R1 decodes without special tokens and re-tokenises: no EOS stays
    assert (t.num_valid_actions, t.num_searches, t.answer, len(t.turn_spans)) == (2, 1, "a", 3)
    first = ids_of(tok, "<think> hm </think>")
    assert t.turn_spans[0] == (0, len(first)) and t.loss_mask[:len(first) + 1] == [1] * len(first) + [0]


def test_reward_is_em_of_the_answer_action(tok):
    """The reward train.py computes (train.reward): EM of the policy's answer action, SQuAD-normalised, any gold;
    never an answer found elsewhere in the text (the invalid-action message holds "<answer> and </answer>")."""
    scripts = {"first answer wins": ids_of(tok, "<answer>wrong</answer> <answer> the  Beatles! </answer>"),
               "normalised": ids_of(tok, "<answer> the  Beatles! </answer>"),
               "never answered": ids_of(tok, "Beatles"),  # EOS without an action, twice: the message follows
               "any gold": ids_of(tok, "<answer>U.S.A.</answer>"),
               "article": ids_of(tok, "<answer>An apple</answer>"),
               "plural": ids_of(tok, "<answer>apples</answer>")}
    golds = [["Beatles"], ["Beatles"], ["Beatles", "and"], ["United States", "USA"], ["apple"], ["apple"]]
    out, _ = run_scripted(tok, scripts, rcfg(max_turns=1, max_turn_tokens=60, greedy=True))
    trajs = list(out.values())
    assert train.reward(trajs, golds, train.Meter()).tolist() == [0.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    # the turn ends at the first </answer>: the second answer is never written
    assert out["first answer wins"].answer == "wrong" and "Beatles" not in out["first answer wins"].text
    assert out["never answered"].answer is None and search_env.INVALID_ACTION_MSG in out["never answered"].text


def test_special_token_inside_an_answer_is_not_part_of_it(tok):
    pad = tok.pad_token_id
    scripts = {"p": ids_of(tok, "<answer> Par", pad, "is </answer>")}
    out, _ = run_scripted(tok, scripts, rcfg(max_turns=1, max_turn_tokens=40, greedy=True))
    t = out["p"]
    assert pad in t.response_ids  # the sampled ids are kept as they are
    assert t.answer == "Paris" and search_env.exact_match(t.answer, ["Paris"]) == 1.0  # as Search-R1 scores it


class SearchR1Client:
    """A retrieval client that sends exactly what Search-R1's generation loop sends (`_batch_search`): every turn
    that may search, even when no trajectory searched, and reads `result` back the way it does."""

    def __init__(self, url):
        self.url, self.bodies = url, []

    def search(self, queries, k):
        import json
        import urllib.request

        body = {"queries": list(queries), "topk": 3, "return_scores": True}
        self.bodies.append(body)
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200
            result = json.loads(r.read())["result"]  # Search-R1: requests.post(...).json()['result']
        return [[{**h["document"], "score": h["score"]} for h in hits] for hits in result]


def test_search_r1_client_on_every_turn_against_our_server(tok, bm25):
    import threading

    server = search_env.make_server(bm25, port=0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = SearchR1Client(f"http://127.0.0.1:{server.server_address[1]}/retrieve")
        scripts = {"a": ids_of(tok, "<search> mentor </search>", "<think> ok </think>", tok.eos_token_id,
                               "<answer> x </answer>"),
                   "b": ids_of(tok, "<answer> y </answer>")}
        cfg = rcfg(max_turns=3, max_turn_tokens=40, greedy=True)
        out, _ = run_scripted(tok, scripts, cfg, client)
        # turn 1: a's query (b answers); turn 2: a thinks and stops without an action; turn 3: a answers. Turns 2
        # and 3 search nothing, and Search-R1 still sends the (empty) batch
        assert client.bodies == [{"queries": ["mentor"], "topk": 3, "return_scores": True},
                                 {"queries": [], "topk": 3, "return_scores": True},
                                 {"queries": [], "topk": 3, "return_scores": True}]
        local, _ = run_scripted(tok, scripts, cfg, bm25)
        assert [t.text for t in out.values()] == [t.text for t in local.values()]
        assert out["a"].answer == "x" and out["a"].num_searches == 1
    finally:
        server.shutdown()
        server.server_close()
