"""Batched multi-turn search rollouts (docs/protocol.md §1.2) with a KV cache kept across turns, and the log-probs of
finished rollouts for training. The file reads protocol first: the settings, `Trajectory`, the turn loop
(`rollout`) and the protocol step after each turn (`_act`); then sampling; then the cache engine (`_Engine`,
which `rollout` drives with three calls per turn); then the training side (`collate`, `score`).

One rollout, per trajectory: the chat-wrapped prompt, then up to `max_turns` turns that may search, then one
final turn. A turn ends at the first `</search>` or `</answer>` in the turn's text (decoded without special
tokens, as Search-R1 reads it), at EOS, at `max_turn_tokens`, or when prompt + response reaches `max_context`.
Then, all trajectories of the batch at once (Search-R1's `execute_predictions`): answer / final turn / context
full -> done; search -> the queries of the whole batch go to the retriever in ONE call and each observation
(truncated to `max_obs_tokens`, closing tag kept) is appended; no action (EOS and the turn cap included) -> the
invalid-action message is appended and the trajectory goes on; an EOS followed by the message leaves the
response (Search-R1 decodes turns without special tokens and re-tokenises them). Observation ids get loss mask
0 and log-prob 0. The action and the answer are read from the turn decoded without special tokens, so
`Par<|endoftext|>is` answers `Paris`, as in Search-R1.

Engine (what `_Engine` does for `rollout`, and why it is fast):
  * One DynamicCache for all live rows. Prompts are left-padded; `attention_mask` covers the whole cache and
    has 0s wherever a row has no token (padding, or a step in which the row was idle); `position_ids` count a
    row's real tokens, so rotary positions are exactly those of the unpadded sequence (and of `collate`).
    Its layers keep spare columns, reserved for a whole turn, so a step writes one column in place
    (DynamicLayer's torch.cat copies the whole cache every step: quadratic in length; 30% of CPU time here).
  * A turn starts with a prefill of each row's new chunk: the prompt (turn 1), or the row's last sampled
    token of the previous turn (sampled but not yet fed) + its observation. Nothing else is re-encoded.
    The prefill runs in blocks of rows of about 4096 new tokens (on CPU one forward over all rows is ~2x
    slower: its activations are too big for the allocator to reuse, so every op page-faults fresh memory),
    and in turn 1 the G rows of a group, which share their prompt, are prefilled once (prefix sharing).
  * Decoding feeds one token per live row per step. A row that hits its stop is fed pad with mask 0 until at
    least a quarter of the decode batch is idle; then idle rows are split off ("parked": their cache rows are
    copied aside, the finished ones dropped) and decoding continues on the rest. So stopped rows cost at most
    a third extra compute, never a full turn of it.
  * Between turns the parked pieces and the decode batch are merged back into one cache by a gather that
    drops finished rows and right-aligns each row's real columns (holes vanish; width = longest live row),
    written into buffers that already have the next turn's spare columns.
  * Stop detection: only rows whose sampled token can complete a tag (a table precomputed over the vocabulary),
    EOS, or that reached their cap are examined; for those, the last 16 tokens of the turn are decoded and
    searched for the tags. Per step there is one host sync and Python work only for those rows.

Departures from Search-R1 (`search_r1/llm_agent/generation.py`), numbered; what the policy sees is otherwise
the same text (prompt, turns cut at the tag, observations, invalid-action message):
 1. Search-R1 re-encodes the whole context every turn and generates up to the cap past `</search>`, then
    cuts the decoded text (`_postprocess_responses`) and re-tokenises it. We stop at the token that completes
    the tag and keep the sampled ids, so the ids of a turn (and of the observation after a glued tag) can
    differ from Search-R1's re-tokenisation of the same text. Search-R1 cuts at the first `</search>` even
    when an `</answer>` came before it; we stop at the first tag of either kind (the action is the same).
 2. Final turn (turn max_turns + 1): as in Search-R1's last `do_search=False` round, a search there is not
    executed and the trajectory ends unanswered (reward 0). Nothing is appended after the final turn: no
    observation, no invalid-action message. It counts as a valid action, not as a search.
 3. A glued closing tag: when the token that completes the tag also writes characters after it (Qwen's
    `>\\n\\n`), the token is kept whole (mask 1) and the observation or message that follows drops those
    characters from its start, so the text equals Search-R1's. Where they are not a prefix of what follows,
    they stay and the texts differ by them: `</search>.` or `</search>\\n\\n` before the invalid-action message
    (an unopened tag), and any characters after `</answer>` or after the final turn's tag (nothing follows;
    Search-R1 cuts them, we train them). An EOS that ends the final turn (or that the message would not fit
    after, 7) stays in the response with mask 1; Search-R1's responses never hold one.
 4. A search with an empty query (`<search> </search>`) is a valid action, but no query is sent: the
    observation is `<information></information>` with no documents and it does not count as a search.
 5. Sampling log-probs are `log_softmax(logits / temperature)` at the sampled token, before top-p
    filtering: exactly what `response_logprobs` recomputes for training.
 6. The invalid-action message is never truncated; `max_obs_tokens` applies to retrieved observations, and a
    truncated one keeps its closing `</information>` (Search-R1 cuts every observation at the cap, tag or not).
 7. An observation that would not leave room for one more token under `max_context` is not appended:
    the trajectory ends unanswered (the search still counts as executed).
"""
from __future__ import annotations

import copy
import re
import weakref
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from search_env import INVALID_ACTION_MSG, format_observation, parse_action

TAGS = ("</search>", "</answer>")
OBS_TAIL = "</information>\n\n"
_TAG_RE = re.compile("|".join(map(re.escape, TAGS)))


@dataclass
class RolloutConfig:
    """The rollout settings. train.Config is their one definition, with the help and the defaults
    (train.rollout_config builds this from it); here every field is required."""
    max_turns: int  # turns that may search; one final turn (no search executed) follows
    max_turn_tokens: int  # tokens the policy may write per turn
    max_obs_tokens: int  # tokens per retrieved observation (truncated, closing tag kept)
    max_context: int  # cap on prompt + response tokens
    topk: int  # passages per search
    temperature: float  # sampling temperature (log-probs use logits / temperature)
    top_p: float  # nucleus sampling mass; 1 = off
    greedy: bool  # argmax decoding (evaluation); temperature and top_p then choose nothing


@dataclass
class Trajectory:
    group_id: int
    prompt_ids: list[int]
    response_ids: list[int]
    loss_mask: list[int]  # 1 on tokens the policy sampled, 0 on observations and invalid-action messages
    turn_spans: list[tuple[int, int]]  # [start, end) of each turn's sampled tokens in response_ids
    sample_logprobs: list[float]  # log_softmax(logits / temperature) of each sampled token; 0 elsewhere
    num_searches: int
    num_valid_actions: int
    answer: str | None  # content of the answer action (model tokens only); None when it never answered
    text: str


def wrap_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt ids: one user message + generation prompt when the tokenizer has a chat template, else raw."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


# ------------------------------------------------------------------------------------------------- the protocol

@torch.inference_mode()
def rollout(model, tokenizer, prompts: list[str], group_ids: list[int], retriever, cfg: RolloutConfig,
            generator: torch.Generator | None = None) -> list[Trajectory]:
    """One trajectory per prompt (already repeated G times by the caller), in the same order."""
    _check(cfg, tokenizer, len(prompts), len(group_ids))
    device = next(model.parameters()).device
    if getattr(getattr(model, "config", None), "use_sliding_window", False):
        raise ValueError("rollout's KV cache does not support sliding-window attention: load the model with "
                         "use_sliding_window=False")
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"the generator is on {generator.device} but the model on {device}: "
                         "create it with torch.Generator(device=<model device>)")
    obs_ids = {k: tokenizer(v, add_special_tokens=False)["input_ids"] for k, v in
               (("invalid", INVALID_ACTION_MSG), ("tail", OBS_TAIL), ("empty", format_observation([])))}

    wrapped = {p: wrap_prompt(tokenizer, p) for p in dict.fromkeys(prompts)}  # G samples share a prompt
    trajs = [_Traj(list(wrapped[p])) for p in prompts]
    for i, t in enumerate(trajs):
        t.pending = list(t.prompt_ids)
        if len(t.prompt_ids) >= cfg.max_context:
            raise ValueError(f"prompt {i} has {len(t.prompt_ids)} tokens >= max_context={cfg.max_context}: "
                             "raise RolloutConfig.max_context or shorten the prompt")
    engine = _Engine(model, tokenizer, cfg, generator, trajs)  # the KV cache of the live rows (below)
    for turn in range(1, cfg.max_turns + 2):
        live = engine.live_rows()  # the trajectories not done, in the engine's row order
        engine.generate_turn(live, final=turn == cfg.max_turns + 1)  # each gets its turn (add_turn, stop)
        _act(trajs, live, tokenizer, retriever, cfg, turn, obs_ids)  # done, or an observation appended
        if not engine.drop_done():
            break

    result = []
    for t, g in zip(trajs, group_ids):
        text = tokenizer.decode(t.response_ids, skip_special_tokens=False)
        result.append(Trajectory(
            group_id=int(g), prompt_ids=t.prompt_ids, response_ids=t.response_ids, loss_mask=t.loss_mask,
            turn_spans=t.spans, sample_logprobs=t.logprobs, num_searches=t.searches, num_valid_actions=t.valid,
            answer=t.answer, text=text))
    return result


def _check(cfg: RolloutConfig, tokenizer, n_prompts: int, n_groups: int):
    if n_prompts != n_groups:
        raise ValueError(f"rollout got {n_prompts} prompts but {n_groups} group ids: pass one group id per prompt")
    if cfg.temperature <= 0:
        raise ValueError(f"RolloutConfig.temperature={cfg.temperature}: must be > 0 (use greedy=True)")
    if not 0 < cfg.top_p <= 1 or cfg.max_turns < 0 or cfg.max_turn_tokens < 1:
        raise ValueError(f"bad RolloutConfig {cfg}: need 0 < top_p <= 1, max_turns >= 0, max_turn_tokens >= 1")
    tail = len(tokenizer(OBS_TAIL, add_special_tokens=False)["input_ids"])
    if cfg.max_obs_tokens <= tail:
        raise ValueError(f"RolloutConfig.max_obs_tokens={cfg.max_obs_tokens} cannot hold the closing "
                         f"'</information>' ({tail} tokens) and any document: raise it")


def _act(trajs: list[_Traj], live: list[int], tokenizer, retriever, cfg: RolloutConfig, turn: int, obs_ids: dict):
    """The protocol step after turn `turn` for rows `live`, as Search-R1's `execute_predictions`: done, or an
    observation appended (loss mask 0). The turn is read as Search-R1 reads it, decoded without special tokens.
    Every turn that may search makes one retriever call with all of its queries, none included, as Search-R1's
    `batch_search` does."""
    final = turn == cfg.max_turns + 1
    queries, asking = [], []
    for i in live:
        t = trajs[i]
        text = tokenizer.decode(t.response_ids[t.spans[-1][0]:], skip_special_tokens=True)
        action, content = parse_action(text)
        t.valid += action is not None
        if action == "answer":
            t.done = True
            t.answer = content
            continue
        if final or t.stop == "context":  # the final turn executes nothing
            t.done = True
            continue
        tag = _TAG_RE.search(text)
        glued = text[tag.end():] if tag else ""  # what the tag-completing token wrote after the tag
        if action == "search" and content:
            queries.append(content)
            asking.append((i, glued))
        else:  # an empty query retrieves nothing; no action (EOS and the turn cap included): the message
            key, obs = ("empty", format_observation([])) if action == "search" else ("invalid", INVALID_ACTION_MSG)
            ids = tokenizer(_unglued(obs, glued), add_special_tokens=False)["input_ids"] if glued else obs_ids[key]
            t.add_observation(ids, cfg)
    if final:
        return
    try:
        hits = retriever.search(queries, cfg.topk)
        if len(hits) != len(queries):
            raise ValueError(f"it returned {len(hits)} result lists")
    except Exception as e:
        raise RuntimeError(f"retriever failed in turn {turn} on {len(queries)} queries: {e}") from e
    tail = obs_ids["tail"]
    texts = [_unglued(format_observation(h), glued) for (_, glued), h in zip(asking, hits)]
    for (i, _), ids in zip(asking, tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []):
        trajs[i].searches += 1
        if len(ids) > cfg.max_obs_tokens:
            ids = ids[:cfg.max_obs_tokens - len(tail)] + tail  # truncated, closing tag kept
        trajs[i].add_observation(ids, cfg)


def _unglued(obs: str, glued: str) -> str:
    """An observation that follows a turn whose tag-completing token also wrote `glued` (e.g. Qwen's `>\\n\\n`): the
    characters that token already wrote are not written again, so the text equals Search-R1's, which cuts the turn
    at the tag (`_postprocess_responses`) and then appends the whole observation. Otherwise both texts hold
    `glued` (docstring, 3)."""
    return obs[len(glued):] if glued and obs.startswith(glued) else obs


@dataclass
class _Traj:  # mutable record while rolling out
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)
    searches: int = 0
    valid: int = 0
    answer: str | None = None  # from the model's answer action, never from observation text (which can hold tags)
    done: bool = False
    pending: list[int] = field(default_factory=list)  # ids appended but not yet fed to the model
    stop: str = ""  # why the last turn ended: tag / eos / turn_cap / context

    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def add_turn(self, ids: list[int], logprobs: list[float]):
        self.spans.append((len(self.response_ids), len(self.response_ids) + len(ids)))
        self.response_ids += ids
        self.loss_mask += [1] * len(ids)
        self.logprobs += logprobs
        self.pending = ids[-1:]  # the other tokens were fed while decoding

    def add_observation(self, ids: list[int], cfg: RolloutConfig):
        # An EOS that ended the turn leaves the context when something follows it: Search-R1 decodes the turn
        # without special tokens and re-tokenises it. It was sampled last, so it was never fed to the model.
        eos = self.stop == "eos"
        if self.length() - eos + len(ids) >= cfg.max_context:  # no room left to answer after it (docstring, 7)
            self.done = True
            return
        if eos:
            s, e = self.spans[-1]
            self.spans[-1] = (s, e - 1)
            del self.response_ids[-1], self.loss_mask[-1], self.logprobs[-1]
            self.pending = []
        self.response_ids += ids
        self.loss_mask += [0] * len(ids)
        self.logprobs += [0.0] * len(ids)
        self.pending += ids


# ------------------------------------------------------------------------------------------------- sampling

def sample(logits: torch.Tensor, cfg: RolloutConfig, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, V) logits -> sampled ids (b,) and their log-probs under log_softmax(logits / T) (b,)."""
    scaled = logits.float() if cfg.temperature == 1.0 else logits.float() / cfg.temperature  # (b, V)
    logp = torch.log_softmax(scaled, dim=-1)  # (b, V)
    if cfg.greedy:
        tok = scaled.max(dim=-1).indices  # (b,) first maximum, as argmax; one pass, ~2x faster on CPU
    else:
        if cfg.top_p < 1.0:
            srt, order = torch.sort(scaled, dim=-1, descending=True)  # (b, V)
            p = torch.softmax(srt, dim=-1)
            drop = (torch.cumsum(p, dim=-1) - p) > cfg.top_p  # mass before this token already covers top_p
            scaled = scaled.scatter(-1, order, srt.masked_fill(drop, float("-inf")))
        tok = torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator).squeeze(1)  # (b,)
    return tok, logp.gather(1, tok[:, None]).squeeze(1)


# ------------------------------------------------------------------------------------------------- the engine

_PREFILL_TOKENS = 4096  # new tokens per prefill forward (see _prefill)
_TAIL_TOKENS = 16  # decode window for stop detection; a tag is 9 ASCII chars, so at most 9 tokens


class _Engine:
    """The KV cache of a rollout's live rows across its turns (module docstring, "Engine"). `generate_turn`
    prefills each row's new chunk and decodes until every row has stopped, parking stopped rows; `drop_done`
    then keeps the rows that go on, and the next turn merges them back into one cache."""

    def __init__(self, model, tokenizer, cfg: RolloutConfig, generator, trajs: list[_Traj]):
        self.model, self.tokenizer, self.cfg, self.generator, self.trajs = model, tokenizer, cfg, generator, trajs
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.eos_set = _eos_ids(model, tokenizer)
        self.eos = torch.tensor(sorted(self.eos_set), dtype=torch.long, device=self.device)
        self.ends_tag = None  # (V,) bool, tokens that can complete a tag: built once the vocabulary size is known
        self.pieces, self.keeps = [], []  # the previous turn's cache pieces, and the rows of each that continue

    def live_rows(self) -> list[int]:
        if not self.pieces:
            return list(range(len(self.trajs)))
        return [p.rows[r] for p, k in zip(self.pieces, self.keeps) for r in k]

    def generate_turn(self, live: list[int], final: bool) -> None:
        """One turn of every row in `live` (the order of live_rows): each row's sampled ids and log-probs are
        appended (_Traj.add_turn) and its .stop says why the turn ended (tag / eos / turn_cap / context)."""
        trajs, cfg, device = self.trajs, self.cfg, self.device
        chunks = [trajs[i].pending for i in live]
        for i in live:
            trajs[i].pending = []
        budget = torch.tensor([min(cfg.max_turn_tokens, cfg.max_context - trajs[i].length()) for i in live],
                              device=device)  # (b,) tokens this row may sample in this turn
        T = int(budget.max())
        C = max(len(c) for c in chunks)
        if not self.pieces:  # turn 1: the cache starts empty
            piece = _Rows(live, _new_cache(room=T), torch.zeros(len(live), 0, dtype=torch.long, device=device),
                          torch.zeros(len(live), dtype=torch.long, device=device))
        else:  # one piece (rows in `live` order) with room for the whole turn: no reallocation while decoding
            piece = _merge(self.pieces, self.keeps, room=C + T)
        # prefill the new chunks, left-padded so every row's last column is real
        inp = torch.tensor([[self.pad_id] * (C - len(c)) + c for c in chunks], device=device)  # (b, C)
        new_mask = torch.tensor([[0] * (C - len(c)) + [1] * len(c) for c in chunks], device=device)  # (b, C)
        pos_ids = piece.pos[:, None] + (new_mask.cumsum(1) - 1).clamp(min=0)  # (b, C)
        piece.pos = piece.pos + new_mask.sum(1)
        piece.mask = torch.cat([piece.mask, new_mask], dim=1)
        logits = _prefill(self.model, piece, inp, pos_ids, room=T)  # (b, V)
        if self.ends_tag is None:
            self.ends_tag = _tag_ending_tokens(self.tokenizer, logits.shape[-1], device)
        self.pieces = self._decode(piece, logits, budget, final)

    def drop_done(self) -> bool:
        """Keep the rows whose trajectory goes on (the next turn's merge closes the holes); False when none does."""
        keeps = [[r for r, i in enumerate(p.rows) if not self.trajs[i].done] for p in self.pieces]
        if not any(keeps):
            return False
        self.pieces, self.keeps = map(list, zip(*[(p, k) for p, k in zip(self.pieces, keeps) if k]))
        return True

    def _decode(self, piece: _Rows, logits: torch.Tensor, budget: torch.Tensor, final: bool) -> list[_Rows]:
        """Sample one token per running row per step until every row of `piece` has stopped. Returns the turn's
        pieces: those parked along the way (rows that stopped and may continue), then the last decode batch."""
        trajs, cfg, device = self.trajs, self.cfg, self.device
        parked = []
        b, T = len(piece.rows), int(budget.max())
        buf_tok = torch.full((b, T), self.pad_id, dtype=torch.long, device=device)  # (b, T) this turn's tokens
        buf_lp = torch.zeros(b, T, device=device)  # (b, T)
        running = torch.ones(b, dtype=torch.bool, device=device)  # (b,)
        n_idle = 0
        for step in range(T):
            tok, lp = sample(logits, cfg, self.generator)  # (b,), (b,)
            buf_tok[:, step], buf_lp[:, step] = tok, lp
            cand = running & (self.ends_tag[tok] | torch.isin(tok, self.eos) | (budget <= step + 1))  # (b,)
            cand_rows = cand.nonzero().squeeze(1).tolist()  # the one host sync per step
            if cand_rows:
                stopped = self._stopped(piece, cand_rows, step, buf_tok, buf_lp, budget)
                if stopped:
                    running[stopped] = False
                    n_idle += len(stopped)
            if n_idle == b:
                break
            if n_idle * 4 >= b:  # park the idle rows: from now on they cost nothing
                flags = running.tolist()
                run_rows = [r for r in range(b) if flags[r]]
                # rows that may continue next turn keep their cache (an EOS without an action is an invalid
                # action and goes on); full context / final turn: dropped
                cont = [r for r in range(b) if not flags[r] and not final and trajs[piece.rows[r]].stop != "context"]
                if cont:
                    parked.append(_select(_Rows(piece.rows, _shallow_copy(piece.cache), piece.mask, piece.pos),
                                          cont, room=False))
                keep = torch.tensor(run_rows, device=device)
                piece = _select(piece, run_rows)
                tok, buf_tok, buf_lp, budget = tok[keep], buf_tok[keep], buf_lp[keep], budget[keep]
                running = running[keep]
                b, n_idle = len(run_rows), 0
            # feed the sampled tokens; idle rows get pad with mask 0 (a hole in their cache row)
            col = running.long()[:, None]  # (b, 1)
            piece.mask = torch.cat([piece.mask, col], dim=1)
            inp = torch.where(running, tok, torch.full_like(tok, self.pad_id))[:, None]  # (b, 1)
            out = self.model(input_ids=inp, attention_mask=piece.mask, position_ids=piece.pos[:, None],
                             past_key_values=piece.cache, use_cache=True, logits_to_keep=1)
            piece.cache, logits = out.past_key_values, out.logits[:, -1]
            piece.pos = piece.pos + col[:, 0]
        return parked + [piece]

    def _stopped(self, piece: _Rows, cand_rows: list[int], step: int, buf_tok, buf_lp, budget) -> list[int]:
        """Which candidate rows stop at `step` (a tag in the turn's text decoded without special tokens, EOS, or
        the row's budget); their turns are recorded (add_turn, .stop)."""
        lo = max(0, step + 1 - _TAIL_TOKENS)
        tails = buf_tok[cand_rows, lo:step + 1].tolist()
        budgets = budget[cand_rows].tolist()
        stopped = []
        for r, tail, bud in zip(cand_rows, tails, budgets):
            text = self.tokenizer.decode(tail, skip_special_tokens=True)  # the text Search-R1 cuts at the tag
            if any(tag in text for tag in TAGS):
                why = "tag"
            elif tail[-1] in self.eos_set:
                why = "eos"
            elif step + 1 >= bud:
                why = "turn_cap" if bud == self.cfg.max_turn_tokens else "context"
            else:
                continue  # a '>' that closes no tag
            stopped.append(r)
            self.trajs[piece.rows[r]].stop = why
        if stopped:
            ids = buf_tok[stopped, :step + 1].tolist()
            lps = buf_lp[stopped, :step + 1].tolist()
            for r, tid, tlp in zip(stopped, ids, lps):
                self.trajs[piece.rows[r]].add_turn(tid, tlp)
        return stopped


@dataclass
class _Rows:
    """A piece of the batch that shares one KV cache: `rows` are trajectory indices."""
    rows: list[int]
    cache: object  # DynamicCache (or anything with .layers[i].keys/.values, batch first)
    mask: torch.Tensor  # (b, L) 1 where the cache column holds a real token of that row
    pos: torch.Tensor  # (b,) real tokens so far = position id of the next token


class _Layer(DynamicLayer):
    """A DynamicLayer whose keys/values are views into buffers with spare columns, so that a decoding step writes
    one column in place; DynamicLayer's torch.cat copies the whole cache at every step (quadratic in length)."""

    def __init__(self, room: int = 0):
        super().__init__()
        self.room = room  # spare columns to allocate on first use

    def _own(self, kbuf: torch.Tensor, vbuf: torch.Tensor, length: int):
        self.kbuf, self.vbuf = kbuf, vbuf  # (b, H, capacity, D)
        self.keys, self.values = kbuf[:, :, :length], vbuf[:, :, :length]  # (b, H, L, D) views

    def reserve(self, n: int):
        """Make room for `n` more columns (one copy if the buffers are too small)."""
        L = self.keys.shape[-2]
        if self.kbuf.shape[-2] < L + n:
            self._own(F.pad(self.keys, (0, 0, 0, n)), F.pad(self.values, (0, 0, 0, n)), L)

    def select(self, idx: torch.Tensor, room: bool):
        """Keep rows `idx` (a copy), with the spare columns or without them (rows parked until the turn ends)."""
        k, v = (self.kbuf, self.vbuf) if room else (self.keys, self.values)
        self._own(k[idx], v[idx], self.keys.shape[-2])

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        if not self.is_initialized:
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
            self._own(F.pad(key_states, (0, 0, 0, self.room)), F.pad(value_states, (0, 0, 0, self.room)), n)
            return self.keys, self.values
        L = self.keys.shape[-2]
        if self.kbuf.shape[-2] < L + n:  # out of room (rollout reserves a whole turn, so only outside it)
            self.reserve(max(n, L))
        self.kbuf[:, :, L:L + n] = key_states
        self.vbuf[:, :, L:L + n] = value_states
        self.keys, self.values = self.kbuf[:, :, :L + n], self.vbuf[:, :, :L + n]
        return self.keys, self.values


def _new_cache(room: int) -> DynamicCache:
    cache = DynamicCache()
    cache.layer_class_to_replicate = lambda: _Layer(room)  # layers are created on first use, one per model layer
    return cache


def _select(piece: _Rows, keep: list[int], room: bool = True) -> _Rows:
    """Rows `keep` (local indices) of a piece, with their cache rows copied (in place on piece.cache's layers)."""
    idx = torch.tensor(keep, dtype=torch.long, device=piece.mask.device)
    for layer in piece.cache.layers:
        layer.select(idx, room)
    return _Rows([piece.rows[i] for i in keep], piece.cache, piece.mask[idx], piece.pos[idx])


def _merge(pieces: list[_Rows], keeps: list[list[int]], room: int) -> _Rows:
    """One piece from rows `keeps[j]` of `pieces[j]`: each row's real cache columns right-aligned into the
    longest row's width, in one gather per tensor (holes and finished rows vanish), written straight into new
    buffers with `room` spare columns."""
    masks = [p.mask[k] for p, k in zip(pieces, keeps)]
    width = max(int(m.sum(1).max()) for m in masks)
    n = sum(len(k) for k in keeps)
    # spare columns are written before they become visible, so they may start uninitialised
    bufs = [[t.new_empty((n, t.shape[1], width + room, t.shape[3])) for t in (layer.keys, layer.values)]
            for layer in pieces[0].cache.layers]  # per layer: keys, values (n, H, W + room, D)
    start = 0
    for j, (p, keep) in enumerate(zip(pieces, keeps)):
        L = masks[j].shape[1]
        pad = max(0, width - L)  # a piece too narrow to hold `width` columns is widened with holes on the left
        mask = F.pad(masks[j], (pad, 0))  # (b, L + pad)
        # stable sort puts a row's holes first and its real columns after, in their order
        cols = torch.sort(mask, dim=1, stable=True).indices[:, -width:]  # (b, W)
        rows = torch.tensor(keep, device=mask.device)[:, None]  # (b, 1)
        for i, layer in enumerate(p.cache.layers):
            for src, dst in zip((layer.keys, layer.values), bufs[i]):
                src = F.pad(src, (0, 0, pad, 0)) if pad else src  # (B, H, L + pad, D)
                # (b, W, H, D) gathered, written as (b, H, W, D)
                dst[start:start + len(keep), :, :width] = src[rows, :, cols].transpose(1, 2)
        real = mask.sum(1, keepdim=True)  # (b, 1)
        masks[j] = (torch.arange(width, device=mask.device)[None] >= width - real).long()  # (b, W)
        start += len(keep)
    cache = pieces[0].cache
    for layer, (k, v) in zip(cache.layers, bufs):
        layer._own(k, v, width)
    return _Rows([p.rows[r] for p, k in zip(pieces, keeps) for r in k], cache, torch.cat(masks),
                 torch.cat([p.pos[k] for p, k in zip(pieces, keeps)]))


def _prefill(model, piece: _Rows, inp: torch.Tensor, pos_ids: torch.Tensor, room: int) -> torch.Tensor:
    """Forward the new columns `inp` (b, C) of every row of `piece` (whose mask already covers them), writing their
    keys and values into its cache; returns the logits at each row's last column (b, V).

    Rows go through the model in blocks of about _PREFILL_TOKENS new tokens, each block writing into a view of its
    rows of the shared buffers. One forward over all rows is slower on CPU: the toy model's (320 x 154)-token prompt
    prefill makes activations of ~75 MB each, above glibc's mmap threshold, so every op page-faults fresh memory
    (half the prefill's time); a block's activations are reused from the heap. In turn 1 (empty cache) rows with the
    same prompt (the G samples of a group) are prefilled once and their cache rows copied: prefix sharing, as vLLM
    does. A row's prefill does not depend on the other rows, so this changes no output (beyond the last-bit float
    differences any change of batch shape can make)."""
    mask, C = piece.mask, inp.shape[1]  # (b, L + C)
    first = not piece.cache.layers  # turn 1: layers are created by the first forward
    if first:
        distinct, reps, inverse = {}, [], []  # (ids, mask) -> its index; first row of each; index of each row
        for r, key in enumerate(map(tuple, torch.cat([inp, mask], 1).tolist())):
            if key not in distinct:
                distinct[key] = len(reps)
                reps.append(r)
            inverse.append(distinct[key])
        inp, mask, pos_ids = inp[reps], mask[reps], pos_ids[reps]
    n = max(1, _PREFILL_TOKENS // C)  # rows per block
    logits, blocks = [], []
    for r in [slice(s, s + n) for s in range(0, len(inp), n)]:
        cache = _new_cache(room) if first else _row_view(piece.cache, r, C)
        out = model(input_ids=inp[r], attention_mask=mask[r], position_ids=pos_ids[r], past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        logits.append(out.logits[:, -1])  # (n, V)
        blocks.append(out.past_key_values)
    if not first:  # the blocks wrote into views of the buffers: extend the visible columns
        for layer in piece.cache.layers:
            layer.keys, layer.values = layer.kbuf[:, :, :mask.shape[1]], layer.vbuf[:, :, :mask.shape[1]]
        return torch.cat(logits)
    expand = torch.tensor(inverse, device=inp.device)  # (b,) distinct prompt of each row
    piece.cache = blocks[0]
    for i, layer in enumerate(piece.cache.layers):
        layer._own(torch.cat([blk.layers[i].kbuf for blk in blocks])[expand],
                   torch.cat([blk.layers[i].vbuf for blk in blocks])[expand], C)
    return torch.cat(logits)[expand]


def _row_view(cache, rows: slice, n_new: int):
    """A cache over rows `rows` of `cache` whose buffers are views into cache's: what a forward of `n_new` columns
    writes lands there (the buffers must have room for them, or the view would reallocate a private copy)."""
    twin = _shallow_copy(cache)
    for layer in twin.layers:
        assert layer.kbuf.shape[-2] >= layer.keys.shape[-2] + n_new, "no room for the prefill"
        layer._own(layer.kbuf[rows], layer.vbuf[rows], layer.keys.shape[-2])
    return twin


_TAG_ENDING = weakref.WeakKeyDictionary()  # tokenizer -> {(V, device, len): flags}; a 150k vocabulary takes a while


def _can_complete_tag(text: str) -> bool:
    """Whether a token with this text can be the one that completes a tag: a tag ends at one of its '>' and starts
    either inside it (the text up to that '>' ends with the tag) or in earlier tokens (that text is a suffix of
    the tag). Tags are ASCII, so a token's own decoding shows their characters exactly."""
    return any(text[:j + 1].endswith(tag) or tag.endswith(text[:j + 1])
               for j, ch in enumerate(text) if ch == ">" for tag in TAGS)


def _tag_ending_tokens(tokenizer, vocab_size: int, device) -> torch.Tensor:
    """(V,) bool: tokens that can complete a closing tag (`_can_complete_tag`). Only rows that sample one are
    decoded for the stop check; a token such as '</think>' or '<search>' is not one and costs no decode."""
    cached = _TAG_ENDING.setdefault(tokenizer, {})
    key = (vocab_size, str(device), len(tokenizer))
    if key not in cached:
        n = min(len(tokenizer), vocab_size)
        texts = tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False)
        flags = torch.zeros(vocab_size, dtype=torch.bool)
        flags[:n] = torch.tensor([_can_complete_tag(t) for t in texts])
        cached[key] = flags.to(device)
    return cached[key]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for e in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(e, int):
            ids.add(e)
        elif e is not None:
            ids.update(int(x) for x in e)
    return ids


def _shallow_copy(cache):
    """A copy of the cache object and its layers sharing the tensors: `_select` on it (which replaces the
    layers' tensors) leaves the original untouched."""
    twin = copy.copy(cache)
    twin.layers = [copy.copy(layer) for layer in cache.layers]
    return twin


# ------------------------------------------------------------------------------------------------- training

@dataclass
class Batch:
    """Prompts LEFT-padded to `prompt_len` (P), responses RIGHT-padded to R; columns = P + R."""
    input_ids: torch.Tensor  # (B, P+R) long
    attention_mask: torch.Tensor  # (B, P+R) long
    position_ids: torch.Tensor  # (B, P+R) long, cumsum(mask) - 1 clipped at 0
    response_mask: torch.Tensor  # (B, R) float, the loss mask
    prompt_len: int

    def to(self, device) -> "Batch":
        return replace(self, input_ids=self.input_ids.to(device), attention_mask=self.attention_mask.to(device),
                       position_ids=self.position_ids.to(device), response_mask=self.response_mask.to(device))

    def select(self, indices) -> "Batch":
        """Rows `indices`, with columns that are padding in all of them trimmed away."""
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.input_ids.device)
        am = self.attention_mask[idx]  # (b, P+R)
        P = self.prompt_len
        p_real = int(am[:, :P].sum(1).max()) if len(idx) else 0
        r_real = int(am[:, P:].sum(1).max()) if len(idx) else 0
        cols = slice(P - p_real, P + r_real)
        return Batch(self.input_ids[idx, cols], am[:, cols], self.position_ids[idx, cols],
                     self.response_mask[idx, :r_real], p_real)


def collate(trajs: list[Trajectory], pad_id: int) -> Batch:
    P = max(len(t.prompt_ids) for t in trajs)
    R = max(len(t.response_ids) for t in trajs)
    ids, am, rm = [], [], []
    for t in trajs:
        lp, lr = P - len(t.prompt_ids), R - len(t.response_ids)
        ids.append([pad_id] * lp + t.prompt_ids + t.response_ids + [pad_id] * lr)
        am.append([0] * lp + [1] * (len(t.prompt_ids) + len(t.response_ids)) + [0] * lr)
        rm.append(list(t.loss_mask) + [0] * lr)
    attention_mask = torch.tensor(am, dtype=torch.long)  # (B, P+R)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # (B, P+R)
    return Batch(torch.tensor(ids, dtype=torch.long), attention_mask, position_ids,
                 torch.tensor(rm, dtype=torch.float), P)


def response_logprobs(model, batch: Batch, temperature: float, with_entropy: bool = False):
    """Per-token log-probs (B, R) of the response tokens [and entropies (B, R)] under logits / temperature;
    0 at padding. Gradients flow if enabled by the caller."""
    R = batch.input_ids.shape[1] - batch.prompt_len
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                position_ids=batch.position_ids, use_cache=False, logits_to_keep=R + 1)
    logits = out.logits[:, :-1].float() / temperature  # (B, R, V): position P-1+j predicts response token j
    target = batch.input_ids[:, batch.prompt_len:]  # (B, R)
    logp = logits.gather(-1, target[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, R)
    real = batch.attention_mask[:, batch.prompt_len:].to(logp.dtype)  # (B, R)
    logp = logp * real
    if not with_entropy:
        return logp
    from loss import entropy_from_logits

    return logp, entropy_from_logits(logits) * real


@torch.no_grad()
def score(model, batch: Batch, temperature: float, micro_batch_size: int, with_entropy: bool = False):
    """`response_logprobs` without grad, in micro-batches of rows sorted by length (each trimmed of its own
    padding); results in the original row order and width, 0 at padding."""
    B, R = batch.response_mask.shape
    lengths = batch.attention_mask.sum(1)  # (B,)
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    logp = torch.zeros(B, R, device=batch.input_ids.device)
    ent = torch.zeros(B, R, device=batch.input_ids.device) if with_entropy else None
    for s in range(0, B, micro_batch_size):
        rows = order[s:s + micro_batch_size]
        mb = batch.select(rows)
        res = response_logprobs(model, mb, temperature, with_entropy)
        r = mb.response_mask.shape[1]
        idx = torch.tensor(rows, device=logp.device)
        if with_entropy:
            logp[idx, :r], ent[idx, :r] = res[0].float(), res[1].float()
        else:
            logp[idx, :r] = res.float()
    return (logp, ent) if with_entropy else logp
