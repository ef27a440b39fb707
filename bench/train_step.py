"""Tokens/s and peak memory of one training step (old log-probs + update) as train.py runs it, and the memory a
Qwen2.5-3B / 7B run needs, by arithmetic.

    python bench/train_step.py                                  # toy shape, CPU (fp32)
    python bench/train_step.py --shape qwen2.5-3b --device cuda --bf16 --grad_checkpointing   # random weights
    python bench/train_step.py --memory                         # only the memory table

One step = `rollout.score` (old log-probs and entropy, no grad) + `train.update` (mini-batches, micro-batch
accumulation, loss.compute_loss with LLDS, clipping, AdamW) on a synthetic rollout batch with the shape of a real
one (prompt, then model turns separated by observations, mask 0 on the observations). Baseline, measured in the
same run on the same micro-batches: a supervised step (Hugging Face forward with `labels`, backward, AdamW per
mini-batch). The ratio RL/SFT says what the RL machinery costs on top of plain training of the same tokens.

Memory arithmetic (what `--memory` prints; bytes, per GPU, FSDP over W GPUs, fp32 master weights, bf16 compute):
    N params, L layers, hidden h, MLP width i, KV heads kv x 128, vocab V; micro-batch of T tokens (prompt +
    response, padded), of which T_r response positions get logits; rollout of B rows up to C tokens.
    states      16 N / W          fp32 params 4 + grads 4 + AdamW m 4 + v 4, sharded
    reference    4 N / W          fp32, sharded, no grads or optimiser (only when kl_coef > 0)
    gathered     2 N              full bf16 weights during rollout and scoring (train.gathered), policy or ref
    activations  2 T L (8h + 4i)  bf16 tensors saved for backward per layer (norms, q/k/v/o, 4 MLP tensors);
                 with gradient checkpointing: 2 T L h + 2 T (8h + 4i) (layer inputs + one layer recomputed)
    logits      10 T_r V          bf16 logits 2 + fp32 copy 4 + its gradient 4 (rollout.response_logprobs)
    KV cache     4 B C L kv 128   keys + values in bf16, for the rows generated together (rollout_batch_size)
    train peak = states + reference + activations + logits;  rollout peak = states + reference + gathered + KV
"""
import argparse
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import loss as L  # noqa: E402
import rollout as R  # noqa: E402
import train  # noqa: E402
from utils import UserError, cli  # noqa: E402

SHAPES = {  # Qwen2ForCausalLM configs; "toy" is toy.py's MODEL with its 2048-token vocabulary
    "toy": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=384, vocab_size=2048, tie_word_embeddings=True),
    "qwen2.5-3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                       intermediate_size=11008, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
}
PARAMS = {"qwen2.5-3b": 3.09e9, "qwen2.5-7b": 7.62e9}  # the released models' parameter counts
ROLLOUT_ROWS = {"qwen2.5-3b": 160, "qwen2.5-7b": 80}  # --rollout_batch_size of the paper configs (README table)


def peak_rss_gb() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 2**20


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)


def peak_gb(device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_gb()


def synthetic_batch(rows, prompt_len, turn_len, obs_len, turns, vocab, group_size, seed=0):
    """Trajectories shaped like real ones: turns of model tokens, observations (mask 0) between them; lengths
    jittered per row so padding is realistic. Rewards are random 0/1 per row."""
    g = torch.Generator().manual_seed(seed)
    trajs = []
    for r in range(rows):
        n_turns = int(torch.randint(1, turns + 1, (1,), generator=g))
        ids, mask = [], []
        for t in range(n_turns):
            k = int(turn_len * (0.5 + torch.rand(1, generator=g)))
            ids += torch.randint(3, vocab, (k,), generator=g).tolist()
            mask += [1] * k
            if t < n_turns - 1:
                ids += torch.randint(3, vocab, (obs_len,), generator=g).tolist()
                mask += [0] * obs_len
        p = torch.randint(3, vocab, (int(prompt_len * (0.8 + 0.4 * torch.rand(1, generator=g))),), generator=g)
        trajs.append(R.Trajectory(group_id=r // group_size, prompt_ids=p.tolist(), response_ids=ids, loss_mask=mask,
                                  turn_spans=[], sample_logprobs=[0.0] * len(ids), num_searches=n_turns - 1,
                                  num_valid_actions=n_turns, answer=None, text=""))
    rewards = torch.randint(0, 2, (rows,), generator=g).float()
    return trajs, rewards


def sft_step(model, opt, batch, rows_per_mini, micro):
    """The baseline: HF causal-LM loss on the response tokens of the same micro-batches, AdamW per mini-batch."""
    n = batch.input_ids.shape[0]
    for s in range(0, n, rows_per_mini):
        for r in torch.arange(s, min(s + rows_per_mini, n)).split(micro):
            mb = batch.select(r)
            labels = mb.input_ids.clone()
            labels[:, :mb.prompt_len] = -100
            labels[:, mb.prompt_len:][mb.response_mask == 0] = -100
            out = model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids,
                        labels=labels, use_cache=False)
            out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def bench(args):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    device = torch.device(args.device)
    if device.type == "cpu" and args.bf16:
        raise UserError("--bf16 on CPU is ~100x slower than fp32 here; drop it or pass --device cuda")
    torch.manual_seed(0)
    shape = SHAPES[args.shape]
    model = Qwen2ForCausalLM(Qwen2Config(**shape, max_position_embeddings=8192)).to(device)
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    n_params = sum(p.numel() for p in model.parameters())
    cfg = train.Config(prompts_per_step=args.rows // args.group_size, group_size=args.group_size,
                       mini_batch_size=args.mini_batch_size, micro_batch_size=args.micro_batch_size,
                       llds_coef=0.2, bf16=args.bf16, device=args.device, lr=1e-6)
    trajs, rewards = synthetic_batch(args.rows, args.prompt_len, args.turn_len, args.obs_len, args.turns,
                                     shape["vocab_size"], args.group_size)
    batch = R.collate(trajs, pad_id=0).to(device)
    adv = L.group_advantages(rewards, torch.tensor([t.group_id for t in trajs])).to(device)
    tokens = int(batch.attention_mask.sum())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    run = train.Run(cfg, Path("."), 0, 1, device, model, None, None, opt, sched, None, [], [])
    print(f"shape {args.shape}: {n_params / 1e6:.2f}M params on {device}; batch {args.rows} rows, "
          f"{batch.input_ids.shape[1]} columns, {tokens} real tokens "
          f"({int(batch.response_mask.sum())} trained); mini-batch {args.mini_batch_size}, micro-batch "
          f"{args.micro_batch_size}; bf16 {args.bf16}, grad checkpointing {args.grad_checkpointing}")

    def rl():
        with train.autocast(run):
            model.eval()
            old, _ = R.score(model, batch, 1.0, args.micro_batch_size, with_entropy=True)
        train.update(run, 1, batch, old, adv, None, None, None, train.Meter())

    def sft():
        model.train()
        with train.autocast(run):
            sft_step(model, opt, batch, args.mini_batch_size, args.micro_batch_size)

    # Interleaved repeats, best of each: a load spike on a shared machine then hits both sides alike.
    fns = {"sft_step (baseline)": sft, "rl_step (train.py)": rl}
    best, peak = {k: float("inf") for k in fns}, {}
    for name, fn in fns.items():
        reset_peak(device)
        fn()  # warm-up, and the peak memory of one step
        peak[name] = peak_gb(device)
    for _ in range(args.repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - t)
    for name in fns:
        print(f"{name:22s} {best[name]:8.3f} s  {tokens / best[name]:10.0f} tokens/s  peak memory "
              f"{peak[name]:.2f} GiB{' (process RSS)' if device.type == 'cpu' else ''}")
    t_sft, t_rl = best.values()
    print(f"ratio rl_step / sft_step: {t_rl / t_sft:.2f}x time (the RL step adds the old-log-prob pass)")


def memory_table(world=8, micro_rows=4, seq=2048, resp=1500, context=4096):
    """Per-GPU memory by arithmetic (module docstring), for the paper configs' shapes."""
    gb = 1 / 2**30
    print(f"memory per GPU in GiB, FSDP over W={world}; micro-batch {micro_rows} rows x {seq} tokens "
          f"({micro_rows * resp} response positions); rollout of rollout_batch_size rows up to {context} tokens")
    print("| model | reference | grad ckpt | states | reference | activations | logits | train peak | "
          "rollout rows | KV cache | rollout peak |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("qwen2.5-3b", "qwen2.5-7b"):
        rollout_rows = ROLLOUT_ROWS[name]
        s, n = SHAPES[name], PARAMS[name]
        h, i, lay, kv, v = (s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"],
                            s["num_key_value_heads"], s["vocab_size"])
        T, Tr = micro_rows * seq, micro_rows * resp
        states, gathered = 16 * n / world, 2 * n
        logits = 10 * Tr * v
        kv_cache = 4 * rollout_rows * context * lay * kv * 128
        for ref in (False, True):
            for gc in (False, True):
                refm = 4 * n / world if ref else 0
                act = 2 * T * lay * h + 2 * T * (8 * h + 4 * i) if gc else 2 * T * lay * (8 * h + 4 * i)
                print(f"| {name} | {'yes' if ref else 'no'} | {'on' if gc else 'off'} | {states * gb:.1f} | "
                      f"{refm * gb:.1f} | {act * gb:.1f} | {logits * gb:.1f} | "
                      f"{(states + refm + act + logits) * gb:.1f} | {rollout_rows} | {kv_cache * gb:.1f} | "
                      f"{(states + refm + gathered + kv_cache) * gb:.1f} |")
    print(f"(one GPU, no sharding: states alone are {16 * PARAMS['qwen2.5-3b'] * gb:.0f} GiB for 3B and "
          f"{16 * PARAMS['qwen2.5-7b'] * gb:.0f} GiB for 7B)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="toy")
    p.add_argument("--device", default="cpu")
    p.add_argument("--bf16", action="store_true", help="autocast bf16 (GPU only)")
    p.add_argument("--grad_checkpointing", action="store_true")
    p.add_argument("--rows", type=int, default=80, help="trajectories in the rollout batch (toy: 16 x 5)")
    p.add_argument("--group_size", type=int, default=5)
    p.add_argument("--mini_batch_size", type=int, default=40)
    p.add_argument("--micro_batch_size", type=int, default=40)
    p.add_argument("--prompt_len", type=int, default=230, help="mean prompt tokens")
    p.add_argument("--turn_len", type=int, default=30, help="mean tokens per model turn")
    p.add_argument("--obs_len", type=int, default=120, help="tokens per observation")
    p.add_argument("--turns", type=int, default=3, help="at most this many model turns")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--memory", action="store_true", help="print only the memory arithmetic")
    args = p.parse_args(argv)
    if args.memory:
        memory_table()
        return
    if args.rows % args.group_size or args.rows % args.mini_batch_size:
        raise UserError(f"--rows {args.rows} must be a multiple of --group_size and of --mini_batch_size")
    torch.set_num_threads(min(2, torch.get_num_threads()) if args.device == "cpu" else torch.get_num_threads())
    bench(args)
    memory_table()


if __name__ == "__main__":
    cli(main)
