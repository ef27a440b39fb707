"""Rollout speed: rollout.rollout (KV cache kept across turns, per-row stops, compaction) against Search-R1's loop
shape measured in the same run, on identical prompts, greedy, with identical outputs.

    python bench/rollout.py [--toy-dir DIR] [--prompts 64] [--samples 5] [--max-turns 3]
                            [--max-turn-tokens 100] [--device cpu] [--model-shape toy|qwen2.5-3b] [--threads 2]

Baseline ("generate"): every turn, `model.generate` on the full current context (prompt + response so far,
left-padded) of the still-active rows, with `stop_strings` for the closing tags; each row's new ids are cut after
the token that completes its first tag (or EOS, or its cap), then the same protocol step as ours. This is the shape
of Search-R1's HF loop, made kinder: it stops at the tags instead of decoding to the cap, and keeps ids instead of
re-encoding text, so that both engines produce the same tokens. Same retriever (BM25 over the toy corpus), same
configuration, greedy.

64 prompts x 5 samples (greedy: the samples repeat; the batch has 320 rows) x up to max_turns + 1 turns. Ours prefills
each distinct prompt once (prefix sharing, as vLLM does; a GRPO batch always repeats each prompt G times), the
baseline all 320 rows, as HF generate in Search-R1's loop does. Each engine runs in its own child process (so that
peak memory is its own) after a warm-up on 4 prompts. Reported: wall time, trajectories/s, generated (loss-mask)
tokens/s, peak memory of the rollout (CPU: growth of the process's peak RSS during the timed run; GPU:
torch.cuda.max_memory_allocated). `--model-shape qwen2.5-3b` swaps in a randomly initialised Qwen2 with Qwen2.5-3B's
shape (bf16, vocabulary cut to the toy tokenizer's size) for a GPU.
The last line is `ratio: X.XX` = our trajectories/s over the baseline's (target >= 2 on CPU).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import rollout as ro  # noqa: E402
import train  # noqa: E402
from search_env import INVALID_ACTION_MSG, format_observation  # noqa: E402
from utils import UserError, cli  # noqa: E402


def baseline_rollout(model, tok, prompts, retriever, cfg: ro.RolloutConfig):
    """Search-R1's loop shape: one model.generate per turn on the whole context; same protocol as rollout()."""
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = sorted(ro._eos_ids(model, tok))
    ends_tag = ro._tag_ending_tokens(tok, model.get_output_embeddings().weight.shape[0], "cpu").tolist()
    obs_ids = {k: tok(v, add_special_tokens=False)["input_ids"] for k, v in
               (("invalid", INVALID_ACTION_MSG), ("tail", ro.OBS_TAIL), ("empty", format_observation([])))}
    T = [ro._Traj(ro.wrap_prompt(tok, p)) for p in prompts]
    for turn in range(1, cfg.max_turns + 2):
        rows = [i for i, t in enumerate(T) if not t.done]
        if not rows:
            break
        ctx = [T[i].prompt_ids + T[i].response_ids for i in rows]
        L = max(len(c) for c in ctx)
        ids = torch.tensor([[pad] * (L - len(c)) + c for c in ctx], device=device)
        am = torch.tensor([[0] * (L - len(c)) + [1] * len(c) for c in ctx], device=device)
        budgets = [min(cfg.max_turn_tokens, cfg.max_context - len(c)) for c in ctx]
        out = model.generate(input_ids=ids, attention_mask=am, max_new_tokens=max(budgets), do_sample=False,
                             temperature=None, top_p=None, top_k=None, stop_strings=list(ro.TAGS), tokenizer=tok,
                             pad_token_id=pad, eos_token_id=eos)
        gen = out[:, L:].tolist()
        for i, g, bud in zip(rows, gen, budgets):
            t = T[i]
            for j, x in enumerate(g):  # cut after the first tag / EOS / cap, as rollout() does
                text_has_tag = ends_tag[x] and any(s in tok.decode(g[max(0, j - 15):j + 1], skip_special_tokens=True)
                                                   for s in ro.TAGS)
                if text_has_tag or x in eos or j + 1 >= bud:
                    t.stop = "tag" if text_has_tag else "eos" if x in eos else (
                        "turn_cap" if bud == cfg.max_turn_tokens else "context")
                    t.add_turn(g[:j + 1], [0.0] * (j + 1))
                    break
        ro._act(T, rows, tok, retriever, cfg, turn, obs_ids)  # the protocol step is rollout()'s own
    return [ro.Trajectory(0, t.prompt_ids, t.response_ids, t.loss_mask, t.spans, t.logprobs, t.searches, t.valid,
                          t.answer, tok.decode(t.response_ids))
            for t in T]


def load(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    import pyarrow.parquet as pq

    import search_env

    tok = AutoTokenizer.from_pretrained(args.toy_dir / "model")
    if args.model_shape == "toy":
        model = AutoModelForCausalLM.from_pretrained(args.toy_dir / "model")
    else:  # Qwen2.5-3B's shape, random weights; vocabulary = the toy tokenizer's, so every id decodes
        torch.manual_seed(0)
        cfg = Qwen2Config(vocab_size=len(tok), hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                          num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
                          rope_theta=1e6, tie_word_embeddings=True, eos_token_id=tok.eos_token_id)
        model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model = model.to(args.device).eval()
    rows = pq.read_table(args.toy_dir / "test.parquet").to_pylist()[:args.prompts]
    prompts = [r["prompt"][0]["content"] for r in rows for _ in range(args.samples)]
    return model, tok, prompts, search_env.BM25Retriever(args.toy_dir / "bm25")


def child(args):
    """One engine in this process: warm-up, then the timed run; results as JSON on stdout's last line."""
    torch.set_num_threads(args.threads)
    model, tok, prompts, retriever = load(args)
    cfg = train.rollout_config(train.Config(max_turns=args.max_turns, max_turn_tokens=args.max_turn_tokens,
                                            max_obs_tokens=args.max_obs_tokens), greedy=True)
    run = (lambda p: ro.rollout(model, tok, p, list(range(len(p))), retriever, cfg)) if args.engine == "ours" \
        else (lambda p: baseline_rollout(model, tok, p, retriever, cfg))
    run(prompts[::args.samples][:4])  # warm-up: allocator, JVM, kernels
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    trajs = run(prompts)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else \
        (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    gen = sum(sum(t.loss_mask) for t in trajs)
    print(json.dumps({"seconds": dt, "trajectories": len(trajs), "generated_tokens": gen, "peak_mib": peak,
                      "searches": sum(t.num_searches for t in trajs),
                      "answered": sum(t.answer is not None for t in trajs),
                      "responses": [t.response_ids for t in trajs], "masks": [t.loss_mask for t in trajs]}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--toy-dir", type=Path, default=None, help="a built toy world (default: build one, cached)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--max-turns", type=int, default=3, help="turns that may search; one final turn follows")
    p.add_argument("--max-turn-tokens", type=int, default=100)
    p.add_argument("--max-obs-tokens", type=int, default=300)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model-shape", choices=["toy", "qwen2.5-3b"], default="toy")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--engine", choices=["ours", "generate"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.toy_dir is None:
        import toy

        args.toy_dir = ROOT / ".cache" / "bench-toy"
        if not (args.toy_dir / "model" / "config.json").exists():
            args.toy_dir.parent.mkdir(exist_ok=True)  # a fresh clone has no .cache/ yet
            toy.build(args.toy_dir, seed=0, force=True)
    elif not (args.toy_dir / "model" / "config.json").is_file():
        raise UserError(f"--toy-dir {args.toy_dir} is not a built toy world (no model/config.json); build one with "
                        f"`python toy.py --out {args.toy_dir}` or leave --toy-dir out")
    if args.engine:
        return child(args)

    res = {}
    for engine in ("generate", "ours"):
        cmd = [sys.executable, __file__, "--engine", engine, "--toy-dir", str(args.toy_dir)] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("engine", "toy_dir")]
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.exit(f"{engine} run failed:\n{proc.stderr[-3000:]}")
        res[engine] = json.loads(proc.stdout.strip().splitlines()[-1])
    n = res["ours"]["trajectories"]
    print(f"rollout bench: {n // args.samples} prompts x {args.samples} samples, max_turns={args.max_turns} "
          f"(+1 final), max_turn_tokens={args.max_turn_tokens}, greedy, model={args.model_shape}, "
          f"device={args.device}, threads={args.threads}")
    for name, label in (("generate", "baseline (generate per turn)"), ("ours", "ours (rollout.rollout)")):
        r = res[name]
        print(f"{label:30s} {r['seconds']:8.2f} s  {r['trajectories'] / r['seconds']:8.2f} traj/s  "
              f"{r['generated_tokens'] / r['seconds']:9.1f} gen tok/s  peak {r['peak_mib']:8.1f} MiB  "
              f"({r['generated_tokens']} tokens, {r['searches']} searches, {r['answered']} answered)")
    same = res["ours"]["responses"] == res["generate"]["responses"] and res["ours"]["masks"] == res["generate"]["masks"]
    print(f"same outputs: {same}")
    if not same:
        diff = sum(a != b for a, b in zip(res["ours"]["responses"], res["generate"]["responses"]))
        sys.exit(f"the engines disagree on {diff} of {len(res['ours']['responses'])} trajectories")
    ratio = (res["ours"]["trajectories"] / res["ours"]["seconds"]) / (
        res["generate"]["trajectories"] / res["generate"]["seconds"])
    print(f"ratio: {ratio:.2f}")


if __name__ == "__main__":
    cli(main)
