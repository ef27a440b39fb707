"""Train a search agent with GRPO / GSPO + LLDS: rollout, reward, advantage, update, log (docs/protocol.md §4-§7).

    python train.py                                   # the toy demo: builds toy_world/, evaluates, trains, evaluates
    python train.py --config configs/grpo_llds_a_qwen2.5-3b.yaml --steps 20
    torchrun --nproc_per_node 8 train.py --config configs/grpo_llds_a_qwen2.5-3b.yaml
    python train.py --resume runs/X                   # continue runs/X from its latest checkpoint

The file reads in the order a run does: `Config` (every field a flag), the run's set-up (`setup`), then
`train_step` and its phases, each under its own ruler, in the order they run:
  rollout    prompts_per_step questions (seeded, epoch-shuffled; each rank its share), group_size samples each
             (rollout.py);
  reward     EM of the policy's own answer action (never text inside observations);
  advantages group advantages (loss.group_advantages);
  old / ref  log-probs (and entropy) recomputed by the training model before any update; reference log-probs
             only when kl_coef > 0 (otherwise no reference model is loaded at all);
  update     ppo_epochs passes over the batch in mini-batches, one AdamW step each; micro-batches accumulate
             gradients of `loss.compute_loss` with the mini-batch's global token count as denominator, so the
             gradient is that of one big batch;
  LLD monitor  lld/ metrics and the death-spiral warning (docs/protocol.md §6);
  log        held-out eval when due, metrics.jsonl (and wandb), the console line, sample trajectories;
  checkpoint every save_every steps and at the end.
Plumbing that is not RL (flags, the run directory, resume, wandb, FSDP/DDP, checkpoint files) is in utils.py; the
inputs (questions, model directories, retriever) are read and checked by inputs.py.

Departures from the paper / Search-R1 (veRL), numbered:
 1. Randomness is a function of (seed, step, rank): each step re-seeds python/torch and the rollout generator,
    and the data order is a seeded permutation per epoch. So the checkpoint's step number is the whole RNG and
    data-loader state, and a resumed run equals an uninterrupted one. veRL stores dataloader state instead.
 2. Warmup: the lr of training step i (1-based) is lr * min(1, i / warmup_steps); veRL's first step has lr 0.
    As in veRL, the schedule advances once per training step (its mini-batches share one lr).
 3. Exact accumulation on any number of ranks: each micro-batch's loss divides by the token count of its whole
    mini-batch summed over ranks and is multiplied by world_size, because DDP/FSDP average gradients over
    ranks; so the summed gradient equals that of the token-mean loss over the global mini-batch. veRL
    averages per-micro-batch means, which depends on the split (loss.py departure 1).
 4. A mini-batch's rows are sorted by length before micro-batching (less padding); sums are unchanged.
 5. An optimiser step whose gradient norm is not finite is skipped (gradients dropped) and counted in
    train/skipped_steps; the run goes on. veRL 0.1 (Search-R1) steps anyway.
 6. With FSDP, parameters are gathered once for all of a step's no-grad passes (rollout, scoring, eval)
    instead of at every decode step; veRL hands weights to vLLM instead.
 7. The reward is EM (no format reward, docs/protocol.md §1.3), logged once as rollout/reward.
"""
import dataclasses
import functools
import hashlib
import json
import math
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import inputs
import loss as L
import rollout as ro
import search_env
from utils import (Meter, MetricsLog, UserError, all_sum, barrier, cli, fsdp_modules, gathered, grad_sync,
                   parse_dataclass, rank_world, resume_from, run_dir_for, save_checkpoint, setup_device, wrap_model,
                   write_config)


# ================================================================================================ config

def h(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class Config:
    # --- data, model, retrieval (an empty path means the toy world's file)
    toy_dir: str = h("toy_world", "toy world directory, built by toy.build when a path below is empty and it is missing")
    model: str = h("", "policy model directory (save_pretrained); empty = <toy_dir>/model")
    train_data: str = h("", "training questions: comma-separated parquet/jsonl files or dirs; empty = <toy_dir>/train.parquet")
    eval_data: str = h("", "held-out questions for eval; empty = <toy_dir>/test.parquet")
    index: str = h("", "retrieval index directory (BM25 or dense); empty = <toy_dir>/bm25 unless retriever_url is set")
    retriever_url: str = h("", "retrieval server, e.g. http://127.0.0.1:8000/retrieve (instead of index)")
    run_dir: str = h("", "output directory; empty = runs/<date-time>")
    resume: str = h("", "run directory to continue from its latest checkpoint (its config.yaml is the base)")
    seed: int = h(0, "the one seed: data order, sampling, shuffling (the built-in toy world is always seed 0)")
    # --- rollout
    steps: int = h(60, "training steps (rollout + update each)")
    prompts_per_step: int = h(16, "questions per step, over all ranks")
    group_size: int = h(5, "samples per question (G)")
    max_turns: int = h(3, "turns that may search, then one final answer turn")
    max_turn_tokens: int = h(48, "tokens the policy may write per turn")
    max_obs_tokens: int = h(500, "tokens per retrieved observation (truncated, closing tag kept)")
    max_context: int = h(4096, "cap on prompt + response tokens")
    topk: int = h(3, "passages per search")
    temperature: float = h(1.0, "sampling temperature (log-probs use logits / temperature)")
    top_p: float = h(1.0, "nucleus sampling mass in training rollouts")
    rollout_batch_size: int = h(0, "trajectories generated together on one rank (KV-cache memory knob); 0 = all")
    # --- update
    ppo_epochs: int = h(1, "passes over each rollout batch")
    mini_batch_size: int = h(40, "trajectories per optimiser step, over all ranks")
    micro_batch_size: int = h(40, "trajectories per forward/backward on one rank (memory knob, not math)")
    lr: float = h(2e-4, "AdamW peak learning rate")
    weight_decay: float = h(0.01, "AdamW weight decay")
    warmup_ratio: float = h(0.0, "share of the steps with a linear lr warmup, then constant")
    grad_clip: float = h(1.0, "max gradient norm")
    ratio_level: str = h("token", "importance ratio: token (GRPO) or sequence (GSPO)")
    clip_low: float = h(0.2, "PPO clip epsilon below 1")
    clip_high: float = h(0.2, "PPO clip epsilon above 1")
    dual_clip: float = h(0.0, "dual-clip constant c > 1 for negative advantages; 0 = off")
    agg: str = h("token-mean", "loss aggregation: token-mean, seq-mean-token-mean, seq-mean-token-sum-norm")
    adv_std: bool = h(True, "divide group advantages by the group std (false = Dr. GRPO)")
    kl_coef: float = h(0.0, "KL-to-reference coefficient; 0 = no reference model is loaded")
    kl_kind: str = h("k3", "KL estimator: k1, k2, k3")
    ent_coef: float = h(0.0, "entropy bonus coefficient")
    llds_coef: float = h(0.2, "LLDS lambda; 0 = vanilla GRPO/GSPO")
    llds_gate: str = h("action", "LLDS gate: action (LLDS-A) or response (LLDS-R)")
    llds_answer_coef: float = h(-1.0, "LLDS answer-span coefficient w (span gets min(w, lambda)); < 0 = off")
    llds_answer_adaptive: bool = h(False, "answer-span w scaled by max(mean searches per trajectory - 1, 0)")
    bf16: bool = h(False, "bf16 compute on GPU (autocast; FSDP: bf16 params, fp32 reduce); never on CPU")
    grad_checkpointing: bool = h(False, "recompute activations in backward (GPU memory knob)")
    dist: str = h("fsdp", "multi-process wrapping under torchrun: fsdp (FSDP2 fully_shard) or ddp")
    device: str = h("", "cpu, cuda, cuda:1 ...; empty = cuda if available else cpu")
    # --- logging, checkpoints, eval
    save_every: int = h(20, "checkpoint every N steps (and at the end); 0 = only at the end")
    keep_checkpoints: int = h(1, "checkpoints kept in run_dir/checkpoints")
    sample_every: int = h(10, "write sample trajectories to trajectories.jsonl every N steps; 0 = never")
    sample_groups: int = h(2, "groups written per sample")
    eval_every: int = h(0, "held-out eval every N steps; 0 = only before and after training")
    eval_start_end: bool = h(True, "held-out eval before training and after it")
    eval_limit: int = h(0, "held-out questions used, evenly spaced; 0 = all")
    eval_batch_size: int = h(128, "questions rolled out together in eval")
    wandb_project: str = h("", "log to this wandb project (rank 0); empty = no wandb")
    wandb_mode: str = h("offline", "wandb mode: online, offline, disabled")
    lld_monitor: bool = h(True, "re-score the preserving responses after the step's updates (one no-grad pass)")
    lld_window: int = h(8, "steps the death-spiral warning looks back over")
    debug_nan_step: int = h(-1, "test hook: multiply the loss by NaN on this step")
    debug_rollouts: str = h("", "test hook: JSON file of trajectories used instead of sampling")



def parse_config(argv=None) -> Config:
    """Defaults < the resumed run's config.yaml < --config FILE < flags (utils.parse_dataclass), checked."""
    cfg = parse_dataclass(Config, argv, __doc__.split("\n")[0])
    check_config(cfg)
    return cfg


def check_config(cfg: Config) -> None:
    """Every value that cannot work, refused before anything loads (a flag of the same name fixes each)."""
    def need(ok, msg):
        if not ok:
            raise UserError(msg)
    choices = {"ratio_level": ("token", "sequence"), "agg": L.AGGS, "kl_kind": ("k1", "k2", "k3"),
               "llds_gate": ("action", "response"), "dist": ("fsdp", "ddp"),
               "wandb_mode": ("online", "offline", "disabled")}
    for k, opts in choices.items():
        need(getattr(cfg, k) in opts, f"{k}={getattr(cfg, k)!r} is not a choice; pass one of {', '.join(opts)}")
    need(cfg.group_size >= 2, f"group_size={cfg.group_size}: GRPO needs at least 2 samples per question")
    # (key, smallest allowed value): a 0 in topk would train on empty observations; 0 or a negative in the
    # others fails in the first step, after the model and the index have loaded
    for k, low in (("steps", 1), ("prompts_per_step", 1), ("mini_batch_size", 1), ("micro_batch_size", 1),
                   ("ppo_epochs", 1), ("max_turns", 0), ("max_turn_tokens", 1), ("max_obs_tokens", 1),
                   ("max_context", 1), ("topk", 1), ("rollout_batch_size", 0), ("eval_batch_size", 1),
                   ("save_every", 0), ("keep_checkpoints", 1), ("sample_every", 0), ("sample_groups", 0),
                   ("eval_every", 0), ("eval_limit", 0), ("lld_window", 1)):
        need(getattr(cfg, k) >= low, f"{k}={getattr(cfg, k)}: must be at least {low}")
    for k in ("lr", "weight_decay", "kl_coef", "llds_coef", "clip_low", "clip_high"):
        v = getattr(cfg, k)
        need(math.isfinite(v) and v >= 0, f"{k}={v}: must be a finite number >= 0")
    n = cfg.prompts_per_step * cfg.group_size
    need(n % cfg.mini_batch_size == 0, f"mini_batch_size={cfg.mini_batch_size} must divide prompts_per_step x "
                                       f"group_size = {n}")
    need(0 < cfg.temperature < math.inf, f"temperature={cfg.temperature}: must be > 0")
    need(0 < cfg.top_p <= 1, f"top_p={cfg.top_p}: must be in (0, 1]; 1 samples from the whole distribution")
    need(0 <= cfg.warmup_ratio <= 1, f"warmup_ratio={cfg.warmup_ratio}: must be in [0, 1]")
    need(cfg.grad_clip > 0, f"grad_clip={cfg.grad_clip}: must be > 0")
    need(cfg.clip_low < 1, f"clip_low={cfg.clip_low}: must be below 1 (the ratio is clipped at 1 - clip_low)")
    need(cfg.dual_clip == 0 or cfg.dual_clip > 1, f"dual_clip={cfg.dual_clip}: 0 (off) or > 1")
    need(cfg.device in ("", "cpu") or cfg.device.split(":")[0] == "cuda",
         f"device={cfg.device!r}: pass cpu, cuda or cuda:N (or nothing: cuda when present)")


def check_obs_budget(cfg: Config, tokenizer) -> None:
    """max_obs_tokens must hold the closing tag an observation keeps; its length depends on the tokenizer."""
    tail = len(tokenizer(ro.OBS_TAIL, add_special_tokens=False)["input_ids"])
    if cfg.max_obs_tokens <= tail:
        raise UserError(f"max_obs_tokens={cfg.max_obs_tokens} cannot hold the closing '</information>' ({tail} "
                        f"tokens with this tokenizer) and any passage; raise it (default 500)")


def rollout_config(cfg: Config, greedy: bool = False) -> ro.RolloutConfig:
    """The rollout settings of `cfg`: Config is their one definition (help and defaults); rollout.RolloutConfig
    has no defaults of its own. greedy: evaluation (temperature and top_p then play no part)."""
    return ro.RolloutConfig(max_turns=cfg.max_turns, max_turn_tokens=cfg.max_turn_tokens,
                            max_obs_tokens=cfg.max_obs_tokens, max_context=cfg.max_context, topk=cfg.topk,
                            temperature=cfg.temperature, top_p=cfg.top_p, greedy=greedy)


def fill_toy_paths(cfg: Config, rank: int) -> Config:
    """Empty paths point into the toy world, which is built (rank 0) when it is missing."""
    toy = Path(cfg.toy_dir)
    uses_toy = not cfg.model or not cfg.train_data or not cfg.eval_data or not (cfg.index or cfg.retriever_url)
    if uses_toy and not (toy / "model" / "config.json").exists():
        if rank == 0:
            import toy as toy_world

            print(f"building the toy world in {toy} (once, about 1.5 minutes on 2 idle cores)", flush=True)
            # seed 0, not cfg.seed: toy_dir is one cached folder, and a world built under --seed 1 would be
            # reused, unnoticed, by every later run. Other worlds: `python toy.py --seed N --out DIR`, --toy_dir DIR.
            toy_world.build(toy)
        barrier()
    return dataclasses.replace(
        cfg, model=cfg.model or str(toy / "model"), train_data=cfg.train_data or str(toy / "train.parquet"),
        eval_data=cfg.eval_data or str(toy / "test.parquet"),
        index=cfg.index or ("" if cfg.retriever_url else str(toy / "bm25")))


# ================================================================================================ the run set-up

@dataclass
class Run:
    """Everything a step needs. `state` is the one run state: what the checkpoint stores besides weights and
    optimiser, and what resuming restores."""
    cfg: Config
    dir: Path
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module
    ref: torch.nn.Module | None
    tokenizer: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    retriever: object
    train_examples: list
    eval_examples: list
    log: MetricsLog | None = None  # metrics.jsonl and wandb
    start: int = 0  # the last step done (0, or the resumed checkpoint's)
    state: dict = field(default_factory=lambda: {
        "skipped_total": 0,  # optimiser steps skipped for a non-finite gradient norm, over the whole run
        "eval_before": -1.0,  # held-out EM before training
        "history": [],  # the last lld_window rows' HISTORY_KEYS, for the death-spiral rule
        "warned_at": -10**9,  # the step of the last printed death-spiral warning
    })


def setup(cfg: Config) -> Run:
    """Processes, the run directory, every input checked, models, optimiser and schedule, resume, the log."""
    device = setup_device(cfg.device)
    rank, world = rank_world()
    if cfg.prompts_per_step % world or cfg.mini_batch_size % world:
        raise UserError(f"prompts_per_step={cfg.prompts_per_step} and mini_batch_size={cfg.mini_batch_size} "
                        f"must be multiples of the {world} processes")
    cfg = fill_toy_paths(cfg, rank)
    run_dir, ckpt = run_dir_for(cfg)
    cfg = dataclasses.replace(cfg, run_dir=cfg.run_dir or str(run_dir))

    # Every input is read before anything is written, so a refused start leaves no config.yaml behind (one
    # would make the corrected command refuse the run_dir as "already holds a run").
    train_examples = inputs.load_qa(cfg.train_data.split(","), flag="--train_data")
    eval_examples = inputs.spread(inputs.load_qa(cfg.eval_data.split(","), flag="--eval_data"), cfg.eval_limit or None)
    weights = str(ckpt or cfg.model)
    for path in dict.fromkeys([cfg.model, weights]):
        inputs.check_model_dir(path)
    # the debug_rollouts test hook never searches: no JVM to start. A server answers a probe in milliseconds; a
    # local index is opened (the JVM started) after the other checks.
    retriever = None
    if cfg.retriever_url and not cfg.debug_rollouts:
        retriever = inputs.open_retriever(None, cfg.retriever_url)
    elif not cfg.debug_rollouts:
        inputs.check_index_path(cfg.index or None)
    for path in dict.fromkeys([cfg.model, weights]):
        inputs.check_model_files(path)
    tokenizer = inputs.load_tokenizer(weights, padding_side=None)
    check_obs_budget(cfg, tokenizer)
    if retriever is None and not cfg.debug_rollouts:
        retriever = inputs.open_retriever(cfg.index or None, None)
    model = inputs.load_causal_lm(weights, torch.float32, tokenizer).to(device)
    ref = None
    if cfg.kl_coef > 0:  # otherwise no reference model exists at all
        ref = inputs.load_causal_lm(cfg.model, torch.float32, tokenizer).to(device).eval()
        ref.requires_grad_(False)
    barrier()  # every rank has checked its inputs before rank 0 writes into run_dir
    write_config(run_dir, cfg)

    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = wrap_model(model, cfg.dist, device, cfg.bf16)
    if ref is not None and cfg.dist != "ddp":
        ref = wrap_model(ref, cfg.dist, device, cfg.bf16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = round(cfg.warmup_ratio * cfg.steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warmup) if warmup else 1.0)
    run = Run(cfg, run_dir, rank, world, device, model, ref, tokenizer, optimizer, scheduler, retriever,
              train_examples, eval_examples)
    if ckpt is not None:
        run.start = resume_from(ckpt, run_dir, model, optimizer, scheduler, run.state)
    run.log = MetricsLog(run_dir, cfg)
    return run


def autocast(run: Run):
    on = run.cfg.bf16 and run.device.type == "cuda" and not fsdp_modules(run.model)  # FSDP: mp_policy instead
    return torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=on)


# ================================================================================================ one training step

def train_step(run: Run, step: int) -> dict:
    """One step, its eight phases in the order they run; the functions they call follow, under the same rulers
    and in the same order. Returns the row written to metrics.jsonl."""
    cfg, dev = run.cfg, run.device
    random.seed(seed_for(cfg.seed, step, run.rank, 2))
    torch.manual_seed(seed_for(cfg.seed, step, run.rank, 3))
    meter, t0 = Meter(), time.time()

    # -- 1. rollout: this rank's share of the step's prompts, group_size samples each
    trajs, golds = collect(run, step)
    t_rollout = time.time() - t0
    # -- 2. reward: EM of each answer action
    rewards = reward(trajs, golds, meter)  # (N,)
    # -- 3. advantages
    adv = L.group_advantages(rewards, torch.tensor([t.group_id for t in trajs]), scale_by_std=cfg.adv_std).to(dev)
    # -- 4. old / ref log-probs, before any update (and the LLDS answer span, when on)
    batch, old, ent, ref = old_and_ref_logprobs(run, trajs, meter)  # (N, T) each; ref None without a ref model
    if cfg.lld_monitor:
        lld_metrics(meter, old, batch.response_mask, adv, ent, ref)
    answer_mask, answer_coef = llds_answer_span(run, trajs, batch.response_mask.shape[1])
    # -- 5. update: mini-batches of compute_loss, one AdamW step each
    t1 = time.time()
    lr = run.scheduler.get_last_lr()[0]
    skipped, grad_norms, tokens = update(run, step, batch, old, adv, ref, answer_mask, answer_coef, meter)
    t_update = time.time() - t1
    # -- 6. LLD monitor: the preserving set re-scored after the step's last update; the death-spiral rule
    if cfg.lld_monitor:
        with gathered(run.model) as policy, autocast(run):
            policy.eval()
            lld_displacement(meter, policy, batch, old, adv, cfg)
    row = {"step": step, **meter.reduce(dev)}
    run.state["skipped_total"] += skipped
    row.update({"train/lr": lr, "train/skipped_steps": skipped, "train/skipped_total": run.state["skipped_total"]})
    if grad_norms:
        row["train/grad_norm"] = sum(grad_norms) / len(grad_norms)
        row["train/grad_norm_max"] = max(grad_norms)
    warn = lld_warning(run, step, row)
    # -- 7. log: held-out eval when due, metrics.jsonl / wandb, console, samples
    tok_s = all_sum(torch.tensor(float(tokens), dtype=torch.float64, device=dev)).item() / max(t_update, 1e-9)
    row.update({"perf/step_s": time.time() - t0, "perf/rollout_s": t_rollout, "perf/update_s": t_update,
                "perf/update_tokens_per_s": tok_s})
    if dev.type == "cuda":
        row["perf/peak_mem_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
    log_step(run, step, row, warn, (trajs, golds, rewards.tolist(), adv.tolist()))
    # -- 8. checkpoint: weights, optimiser, scheduler and run.state (utils.save_checkpoint)
    if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
        path = save_checkpoint(run.dir, step, run.model, run.tokenizer, run.optimizer, run.scheduler, run.state,
                               cfg.keep_checkpoints)
        barrier()
        if path is not None:
            tqdm.write(f"saved {path}")
    return row


# ------------------------------------------------------------------------------------------------ 1. rollout

def seed_for(*parts: int) -> int:
    """One integer seed per random stream, e.g. (seed, step, rank, stream): the same on every machine."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:6], "little")


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed_for(seed, epoch, 17))).tolist()


def step_prompts(n: int, step: int, per_step: int, seed: int) -> list[int]:
    """Indices of step `step`'s (1-based) prompts: consecutive epochs of seeded permutations."""
    out = []
    for i in range((step - 1) * per_step, step * per_step):
        epoch, j = divmod(i, n)
        out.append(epoch_order(n, seed, epoch)[j])
    return out


def collect(run: Run, step: int) -> tuple[list[ro.Trajectory], list[list[str]]]:
    """This rank's rollouts for step `step`: its share of the step's prompts, group_size samples each."""
    cfg = run.cfg
    if cfg.debug_rollouts:
        return load_debug_rollouts(cfg.debug_rollouts, run.rank, run.world)
    share = cfg.prompts_per_step // run.world
    order = step_prompts(len(run.train_examples), step, cfg.prompts_per_step, cfg.seed)
    mine = range(run.rank * share, (run.rank + 1) * share)
    examples = [run.train_examples[order[i]] for i in mine for _ in range(cfg.group_size)]
    group_ids = [(step - 1) * cfg.prompts_per_step + i for i in mine for _ in range(cfg.group_size)]
    gen = torch.Generator(device=run.device).manual_seed(seed_for(cfg.seed, step, run.rank, 1))
    chunk = cfg.rollout_batch_size or len(examples)
    trajs = []
    with gathered(run.model) as policy, autocast(run):
        policy.eval()
        for s in range(0, len(examples), chunk):
            trajs += ro.rollout(policy, run.tokenizer, [e.prompt for e in examples[s:s + chunk]],
                                group_ids[s:s + chunk], run.retriever, rollout_config(cfg), gen)
    return trajs, [e.golds for e in examples]


def load_debug_rollouts(path: str, rank: int, world: int) -> tuple[list[ro.Trajectory], list[list[str]]]:
    """Test hook: a fixed batch [{"traj": Trajectory fields, "golds": [...]}, ...] in group order; each rank
    takes its contiguous share, as it would of sampled prompts."""
    rows = json.loads(Path(path).read_text())
    share = len(rows) // world
    rows = rows[rank * share:(rank + 1) * share]
    trajs = [ro.Trajectory(**{**r["traj"], "turn_spans": [tuple(s) for s in r["traj"]["turn_spans"]]})
             for r in rows]
    return trajs, [r["golds"] for r in rows]


# ------------------------------------------------------------------------------------------------ 2. reward

def reward(trajs: list[ro.Trajectory], golds: list[list[str]], meter: Meter) -> torch.Tensor:
    """Rewards (N,): EM of each trajectory's answer action against its golds (docs/protocol.md §1.3), and the
    rollout/ metrics. t.answer is the content of the policy's answer action, never text found in the response:
    the response also holds observations, and the invalid-action message itself contains "<answer> and </answer>"."""
    rewards = torch.tensor([search_env.exact_match(t.answer, g) for t, g in zip(trajs, golds)])
    n = len(trajs)
    meter.add("rollout/reward", rewards.sum(), n)
    meter.add("rollout/searches", sum(t.num_searches for t in trajs), n)
    meter.add("rollout/response_len", sum(len(t.response_ids) for t in trajs), n)
    meter.add("rollout/answered", sum(t.answer is not None for t in trajs), n)
    meter.add("rollout/valid_action_rate", sum(t.num_valid_actions for t in trajs),
              sum(len(t.turn_spans) for t in trajs))
    by_group = {}
    for t, r in zip(trajs, rewards.tolist()):
        by_group.setdefault(t.group_id, []).append(r)
    meter.add("rollout/solve_none", sum(max(v) == 0 for v in by_group.values()), len(by_group))
    meter.add("rollout/solve_all", sum(min(v) == 1 for v in by_group.values()), len(by_group))
    return rewards


# ------------------------------------------------------- 3. advantages (loss.group_advantages), 4. old / ref log-probs

def old_and_ref_logprobs(run: Run, trajs: list[ro.Trajectory], meter: Meter):
    """The padded batch and its step-start log-probs (N, T) under the training model (old, with entropy) and the
    reference model (ref; None without one), before any update; T = the longest response."""
    cfg = run.cfg
    pad_id = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else run.tokenizer.eos_token_id
    batch = ro.collate(trajs, pad_id).to(run.device)
    mask = batch.response_mask  # (N, T)
    with gathered(run.model) as policy, autocast(run):
        policy.eval()
        old, ent = ro.score(policy, batch, cfg.temperature, cfg.micro_batch_size, with_entropy=True)  # (N, T) x2
    ref = None
    if run.ref is not None:
        with gathered(run.ref) as ref_model, autocast(run):
            ref = ro.score(ref_model, batch, cfg.temperature, cfg.micro_batch_size)  # (N, T)
    sample_lp = torch.zeros_like(old)
    for i, t in enumerate(trajs):
        sample_lp[i, :len(t.sample_logprobs)] = torch.tensor(t.sample_logprobs)
    meter.add("rollout/logp_mismatch", ((sample_lp - old).abs() * mask).sum(), mask.sum())
    return batch, old, ent, ref


def llds_answer_span(run: Run, trajs: list[ro.Trajectory], width: int):
    """LLDS answer-span variant (docs/protocol.md §5): (answer mask (N, width), its coefficient w), or (None,
    None) when it is off. Adaptive: w * max(mean searches per trajectory over all ranks - 1, 0)."""
    cfg = run.cfg
    if not (cfg.llds_coef and cfg.llds_answer_coef >= 0):
        return None, None
    coef = cfg.llds_answer_coef
    if cfg.llds_answer_adaptive:
        searches = all_sum(torch.tensor([sum(t.num_searches for t in trajs), len(trajs)], dtype=torch.float64))
        coef *= max(float(searches[0] / searches[1]) - 1, 0.0)
    return answer_span_mask(trajs, run.tokenizer, width, run.device), coef


def answer_span_mask(trajs: list[ro.Trajectory], tokenizer, width: int, device) -> torch.Tensor:
    """(B, width) 1 on the tokens of the final <answer>..</answer> (the last turn of an answered response):
    from the last token of the turn whose text starts with '<answer>' when decoded to the turn's end."""
    mask = torch.zeros(len(trajs), width)
    for i, t in enumerate(trajs):
        if t.answer is None:
            continue
        s, e = t.turn_spans[-1]
        k = e - 1
        while k > s and "<answer>" not in tokenizer.decode(t.response_ids[k:e]):
            k -= 1
        mask[i, k:e] = 1.0
    return mask.to(device)


# ------------------------------------------------------------------------------------------------ 5. update

def update(run: Run, step: int, batch: ro.Batch, old, adv, ref, answer_mask, answer_coef, meter: Meter):
    """ppo_epochs passes over this rank's rows in mini-batches (one AdamW step each; a mini-batch spans all
    ranks), micro-batches accumulating gradients. compute_loss's metrics combine as loss.REDUCE says. Returns
    (skipped optimiser steps, grad norms, tokens seen)."""
    cfg, dev = run.cfg, run.device
    run.model.train()
    n, mask = len(adv), batch.response_mask
    rows_per_mini = cfg.mini_batch_size // run.world
    skipped, grad_norms, tokens = 0, [], 0
    lengths = batch.attention_mask.sum(1).cpu()  # (N,)
    for epoch in range(cfg.ppo_epochs):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_for(cfg.seed, step, run.rank, 4, epoch)))
        for start in range(0, n, rows_per_mini):
            rows = perm[start:start + rows_per_mini]
            rows = rows[torch.argsort(lengths[rows], descending=True, stable=True)]
            num_tokens = all_sum(mask[rows.to(dev)].sum().double()).item()  # global, all ranks
            micros = rows.split(cfg.micro_batch_size)
            sums = {}  # the "sum" metrics of this mini-batch
            for j, r in enumerate(micros):
                r = r.to(dev)
                micro = batch.select(r)
                w = micro.response_mask.shape[1]
                with grad_sync(run.model, j == len(micros) - 1), autocast(run):
                    out = ro.response_logprobs(run.model, micro, cfg.temperature, with_entropy=cfg.ent_coef > 0)
                    logp, entropy = out if isinstance(out, tuple) else (out, None)
                    loss, m = L.compute_loss(
                        logp, old[r, :w], adv[r], micro.response_mask, ref_logp=None if ref is None else ref[r, :w],
                        entropy=entropy, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
                        dual_clip=cfg.dual_clip or None, ratio_level=cfg.ratio_level, agg=cfg.agg,
                        kl_coef=cfg.kl_coef, kl_kind=cfg.kl_kind, ent_coef=cfg.ent_coef, llds_coef=cfg.llds_coef,
                        llds_gate=cfg.llds_gate, answer_mask=None if answer_mask is None else answer_mask[r, :w],
                        answer_coef=answer_coef, num_tokens=num_tokens, num_seqs=cfg.mini_batch_size,
                        norm_len=(cfg.max_turns + 1) * cfg.max_turn_tokens)
                    if step == cfg.debug_nan_step:
                        loss = loss * float("nan")
                    (loss * run.world).backward()  # DDP/FSDP average over ranks; the loss is a global sum
                for k, v in m.items():
                    how = L.REDUCE[k]
                    if how == "sum":
                        sums[k] = sums.get(k, 0.0) + v
                    elif how == "max":  # -inf / inf: this micro-batch has no tokens
                        meter.add_max(k, v if m["train/tokens"] else -math.inf)
                    elif how == "min":
                        meter.add_min(k, v if m["train/tokens"] else math.inf)
                    else:
                        meter.add(k, v * m[how], m[how])
                tokens += int(micro.attention_mask.sum())
            for k, v in sums.items():
                meter.add(k, v, 1.0 / run.world)  # sum over micro-batches and ranks, mean over optimiser steps
            gn = torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.grad_clip)
            gn = float(gn.full_tensor() if hasattr(gn, "full_tensor") else gn)  # global: same on every rank
            if math.isfinite(gn):  # a NaN/inf loss anywhere makes it non-finite too
                run.optimizer.step()
                grad_norms.append(gn)
            else:
                skipped += 1
            run.optimizer.zero_grad(set_to_none=True)
    run.scheduler.step()
    return skipped, grad_norms, tokens


# ------------------------------------------------------------------------------------------------ 6. LLD monitor

def lld_metrics(meter: Meter, old: torch.Tensor, mask: torch.Tensor, adv: torch.Tensor, ent: torch.Tensor,
                ref: torch.Tensor | None):
    """Step-start log-probs per token of the preserving (A >= 0) and negative sets, each over its own tokens."""
    pos = mask * (adv >= 0)[:, None]  # (B, T)
    neg = mask * (adv < 0)[:, None]  # (B, T)
    meter.add("lld/old_logp_pos", (old * pos).sum(), pos.sum())
    meter.add("lld/old_logp_neg", (old * neg).sum(), neg.sum())
    meter.add("lld/entropy", (ent * mask).sum(), mask.sum())
    if ref is not None:
        meter.add("lld/ref_logp_pos", (ref * pos).sum(), pos.sum())


def lld_displacement(meter: Meter, policy, batch: ro.Batch, old: torch.Tensor, adv: torch.Tensor, cfg: Config):
    """After the step's last update: mean change of log-prob per preserving token, and the share of preserving
    actions (loss.actions, the ones LLDS gates) whose summed log-prob fell (one extra no-grad forward over the
    preserving rows)."""
    rows = (adv >= 0).nonzero().squeeze(1)
    if len(rows) == 0:
        meter.add("lld/delta_pos", 0.0, 0.0)
        meter.add("lld/fell_action_share", 0.0, 0.0)
        return
    sub = batch.select(rows)
    new = ro.score(policy, sub, cfg.temperature, cfg.micro_batch_size)  # (b, t)
    mask = sub.response_mask
    diff = (new - old[rows, :mask.shape[1]]) * mask  # (b, t)
    ids, starts = L.actions(mask)  # (b, t) x2
    sums = L.action_sums(diff, ids)  # (b, t+1): column k = the k-th action
    col = torch.arange(sums.shape[1], device=sums.device)[None]  # (1, t+1)
    is_action = (col >= 1) & (col <= starts.sum(-1, keepdim=True))  # (b, t+1)
    meter.add("lld/delta_pos", diff.sum(), mask.sum())
    meter.add("lld/fell_action_share", ((sums < 0) & is_action).sum(), is_action.sum())


# The death-spiral warning rule (docs/protocol.md §6 lists the signals, earliest first). Over the last
# `lld_window` steps:
#   (a) the preserving set's old log-prob per token trends down (least-squares slope below -LLD_SLOPE
#       nats/token/step) while the policy's entropy trends up (slope above LLD_ENT_SLOPE nats/token/step); or
#   (b) it has sunk more than LLD_BELOW_REF nats/token below the reference model's on the same tokens
#       (only with a reference model): the policy now likes its own good answers less than it did at start; or
#   (c) on average more than half of the preserving actions lost likelihood within their step, and the
#       latest pre-clip gradient norm exceeds LLD_GRAD_SPIKE x the window's median.
# Reward is deliberately not used: it falls last. Logged every step as lld/warning, printed once per window.
# The window (8) and the two slopes were chosen on recorded runs, seeds 0-2 of configs/toy_spiral_grpo.yaml and
# toy_spiral_llds.yaml and of the demo, from windows 5/8/10/15 x slopes 0.003-0.02 x entropy slopes 0/0.005: the
# setting that warned before every fall below half the peak reward (5 runs) with the longest shortest lead time
# (4 steps) and never in the demos. Held out, seeds 3-4 (README, "The death spiral on the toy"): it warned 7-15 steps
# before each of the 3 falls and never in the demos. It also warns in LLDS runs that end a third below their peak
# without falling to half (seeds 2 and 3). tests/data/lld_histories.json holds six of these runs for the tests.
LLD_SLOPE, LLD_ENT_SLOPE, LLD_BELOW_REF, LLD_GRAD_SPIKE = 0.003, 0.005, 0.5, 3.0
HISTORY_KEYS = {"lld/old_logp_pos", "lld/entropy", "lld/ref_logp_pos", "lld/fell_action_share", "train/grad_norm"}


def lld_warning(run: Run, step: int, row: dict) -> str:
    """Apply the rule to the history and this step's row: sets row["lld/warning"], keeps the row's HISTORY_KEYS in
    run.state["history"], and returns the reason to print ('' when there is none, or when one was printed less
    than lld_window steps ago)."""
    cfg, state = run.cfg, run.state
    warn = death_spiral(state["history"] + [row], cfg.lld_window) if cfg.lld_monitor else ""
    row["lld/warning"] = float(bool(warn))
    state["history"] = (state["history"] + [{k: v for k, v in row.items() if k in HISTORY_KEYS}])[-cfg.lld_window:]
    if not warn or step - state["warned_at"] < cfg.lld_window:
        return ""
    state["warned_at"] = step
    return warn


def _slope(ys: list[float]) -> float:
    xm, ym = (len(ys) - 1) / 2, sum(ys) / len(ys)
    return sum((i - xm) * (y - ym) for i, y in enumerate(ys)) / sum((i - xm) ** 2 for i in range(len(ys)))


def death_spiral(history: list[dict], window: int) -> str:
    """'' or the reason the LLD signals of the last `window` steps say the death spiral has begun."""
    h = [r for r in history[-window:] if "lld/old_logp_pos" in r]
    if len(h) < max(window, 3):
        return ""
    pos = [r["lld/old_logp_pos"] for r in h]
    ent = [r["lld/entropy"] for r in h]
    if _slope(pos) < -LLD_SLOPE and _slope(ent) > LLD_ENT_SLOPE:
        return (f"preserving log-prob falls {_slope(pos):+.4f}/step while entropy rises {_slope(ent):+.4f}/step "
                f"over {len(h)} steps")
    if "lld/ref_logp_pos" in h[-1] and h[-1]["lld/ref_logp_pos"] - pos[-1] > LLD_BELOW_REF:
        return f"preserving log-prob {pos[-1]:.3f} is below the reference's {h[-1]['lld/ref_logp_pos']:.3f}"
    fell = [r["lld/fell_action_share"] for r in h if "lld/fell_action_share" in r]
    gn = [r["train/grad_norm"] for r in h if "train/grad_norm" in r]
    if fell and gn and sum(fell) / len(fell) > 0.5 and gn[-1] > LLD_GRAD_SPIKE * statistics.median(gn):
        return (f"{sum(fell) / len(fell):.0%} of preserving actions lost likelihood per step and the grad norm "
                f"{gn[-1]:.2f} is {gn[-1] / statistics.median(gn):.1f}x the window median")
    return ""


# ---------------------------------------------------------------------- 7. log (8. checkpoint: utils.save_checkpoint)

def log_step(run: Run, step: int, row: dict, warn: str, samples: tuple) -> None:
    """Held-out eval when due, then the row to metrics.jsonl / wandb, the console lines, sample trajectories."""
    cfg = run.cfg
    if (cfg.eval_every and step % cfg.eval_every == 0) or (step == cfg.steps and cfg.eval_start_end):
        row.update(held_out_eval(run))
    run.log.log(row)
    if run.rank != 0:
        return
    tqdm.write(fmt_line(row, cfg.steps))
    if warn:
        tqdm.write(f"LLD death spiral warning at step {step}: {warn}")
    if row["train/skipped_steps"]:
        tqdm.write(f"step {step}: skipped {row['train/skipped_steps']} optimiser step(s) with a "
                   f"non-finite loss or gradient norm ({run.state['skipped_total']} so far)")
    if cfg.sample_every and step % cfg.sample_every == 0:
        log_samples(run, step, *samples)


def held_out_eval(run: Run) -> dict:
    """Greedy EM/F1 with eval.py's code; each rank takes every world-th question, records are gathered."""
    import eval as ev

    mine = run.eval_examples[run.rank::run.world]
    with gathered(run.model) as policy, autocast(run):
        res = ev.evaluate(policy, run.tokenizer, mine, run.retriever, rollout_config(run.cfg, greedy=True),
                          run.cfg.eval_batch_size, progress=run.rank == 0, desc="held-out eval")
    records = [{k: r[k] for k in ("data_source", "em", "f1")} for r in res["trajectories"]]
    searches = sum(r["num_searches"] for r in res["trajectories"])
    if dist.is_initialized():
        parts = [None] * run.world
        dist.all_gather_object(parts, (records, searches))
        records, searches = [x for p, _ in parts for x in p], sum(s for _, s in parts)
    out = ev.summarize(records)
    return {**ev.flat_metrics(out), "eval/searches": searches / len(records)}


def log_samples(run: Run, step: int, trajs, golds, rewards, adv) -> None:
    """The first sample_groups groups of this step, for reading."""
    keep = {t.group_id for t in trajs[: run.cfg.sample_groups * run.cfg.group_size]}
    with open(run.dir / "trajectories.jsonl", "a") as f:
        for t, g, r, a in zip(trajs, golds, rewards, adv):
            if t.group_id in keep:
                f.write(json.dumps({"step": step, "group_id": t.group_id, "golds": g, "reward": r, "advantage": a,
                                    "searches": t.num_searches, "answer": t.answer, "text": t.text}) + "\n")


def fmt_line(row: dict, steps: int) -> str:
    def g(k, f="{:.3f}"):
        return f.format(row[k]) if k in row else "-"
    return (f"step {row['step']}/{steps} | reward {g('rollout/reward')} "
            f"searches {g('rollout/searches', '{:.2f}')} len {g('rollout/response_len', '{:.0f}')} | "
            f"loss {g('train/loss', '{:+.4f}')} gn {g('train/grad_norm')} ent {g('lld/entropy')} "
            f"kl {g('train/kl_ref', '{:.4f}')} clip {g('train/clipfrac_high', '{:.3f}')} | "
            f"lld pos {g('lld/old_logp_pos')} neg {g('lld/old_logp_neg')} d {g('lld/delta_pos', '{:+.4f}')} "
            f"fell {g('lld/fell_action_share', '{:.2f}')} | {row['perf/step_s']:.1f}s")


# ================================================================================================ main

def main(argv=None):
    run = setup(parse_config(argv))
    cfg = run.cfg
    if cfg.eval_start_end and run.start == 0:
        res = held_out_eval(run)
        run.state["eval_before"] = res["eval/em"]
        run.log.log({"step": 0, **res})
        if run.rank == 0:
            tqdm.write(f"held-out eval before training: EM {100 * res['eval/em']:.1f}  "
                       f"searches {res['eval/searches']:.2f}")

    row = {}
    bar = tqdm(range(run.start + 1, cfg.steps + 1), initial=run.start, total=cfg.steps, disable=run.rank != 0,
               desc="train", dynamic_ncols=True, file=sys.stderr)
    for step in bar:
        row = train_step(run, step)
        if run.rank == 0:
            bar.set_postfix(reward=f"{row['rollout/reward']:.3f}")
    bar.close()
    if run.rank == 0 and "eval/em" in row and cfg.eval_start_end:
        print(f"held-out eval after training: EM {100 * row['eval/em']:.1f}  searches {row['eval/searches']:.2f}")
        print(f"held-out EM: before {100 * run.state['eval_before']:.1f} after {100 * row['eval/em']:.1f}", flush=True)
    run.log.finish()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    cli(main)
