"""bench/gpu.py: the roofline, FLOPs and memory arithmetic on hand-computed cases, and the whole script end to end
at toy shapes on CPU (--tiny), as it will run on a GPU: every section, every figure, the JSON, the time guard."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import gpu  # noqa: E402

GiB = 2**30


def test_kv_bytes_qwen25_3b():
    # 2 (k, v) x 36 layers x 2 KV heads x 128 dims x 2 bytes (bf16) = 36,864 bytes per token per row
    assert gpu.kv_bytes(36, 2, 128, 2, 1, 1) == 36_864
    assert gpu.kv_bytes(36, 2, 128, 2, 1000, 64) == 36_864 * 1000 * 64 == 2_359_296_000
    assert gpu.kv_bytes(36, 2, 128, 4, 3, 5) == 2 * 36 * 2 * 128 * 4 * 15


def test_decode_bytes_and_roofline_hand_values():
    # weights 100 B, 2 B per token per row, 3 rows: step 1 reads the cache at 11 positions, step 2 at 12
    assert gpu.decode_step_bytes(100, 2, 3, 11) == 166
    assert gpu.decode_step_bytes(100, 2, 3, 12) == 172
    # 6 tokens over (166 + 172) bytes at 1000 B/s
    assert gpu.decode_roofline_tokens_per_s(100, 2, 3, 10, 2, 1000.0) == pytest.approx(6 / 0.338)
    # Qwen2.5-3B, 256 rows at 1,000 tokens: 6.17 GB of bf16 weights + 9.44 GB of cache, at 4 TB/s
    w = 2 * 3_085_938_688
    step = gpu.decode_step_bytes(w, 36_864, 256, 1000)
    assert step == w + 36_864 * 256 * 1000
    assert gpu.decode_roofline_tokens_per_s(w, 36_864, 256, 999, 1, 4e12) == pytest.approx(256 * 4e12 / step)


def test_train_flops_hand_values():
    # 6 x 10 x 5 tokens + 6 x 4 x 4 logit tokens + 6 x 2 layers x 3 x (2^2 + 3^2)
    assert gpu.train_flops(10, 4, 2, 3, [2, 3], 4) == 300 + 96 + 468
    # Qwen2.5-3B, 8 rows x 2,048 tokens, 1,500 with logits per row: 6N-ish plus 6 * 36 * 2048 * 8 * 2048^2
    body, head = 3_085_938_688 - 151_936 * 2048, 151_936 * 2048
    f = gpu.train_flops(body, head, 36, 2048, [2048] * 8, 8 * 1500)
    assert f == 6 * body * 16_384 + 6 * head * 12_000 + 6 * 36 * 2048 * 8 * 2048**2
    assert gpu.mfu(f, 1.0, 989e12) == pytest.approx(f / 989e12)
    assert gpu.mfu(f, 1.0, None) is None


def test_memory_formula_reproduces_the_readme_table():
    # README: per GPU, FSDP over 8, micro-batch 4 x 2,048 (6,000 response positions), Qwen2.5-3B (N = 3.09e9)
    kw = dict(n_params=3.09e9, layers=36, hidden=2048, inter=11008, vocab=151936, tokens=8192,
              response_tokens=6000, world=8)
    off = gpu.train_memory_bytes(**kw)
    assert off["states"] == 16 * 3.09e9 / 8
    assert off["activations"] == 2 * 8192 * 36 * (8 * 2048 + 4 * 11008) == 35_634_806_784
    assert off["logits"] == 10 * 6000 * 151936 == 9_116_160_000
    on = gpu.train_memory_bytes(**kw, gc=True)
    assert on["activations"] == 2 * 8192 * 36 * 2048 + 2 * 8192 * (8 * 2048 + 4 * 11008) == 2_197_815_296
    table = [(off, 47.4), (on, 16.3), (gpu.train_memory_bytes(**kw, ref=True), 48.9),
             (gpu.train_memory_bytes(**kw, ref=True, gc=True), 17.7)]
    assert [round(m["peak"] / GiB, 1) for m, _ in table] == [v for _, v in table]
    assert gpu.train_memory_bytes(**{**kw, "world": 1})["states"] == 16 * 3.09e9


def test_device_peaks_match_names_in_order():
    assert gpu.device_peaks("NVIDIA H200") == (989e12, 4.8e12)
    assert gpu.device_peaks("NVIDIA H100 PCIe") == (756e12, 2.0e12)  # before the SXM entry
    assert gpu.device_peaks("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12)
    assert gpu.device_peaks("cpu") == (None, None)


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


FIGURE = re.compile(r"^(device|smoke|rollout|train|search)\.[\w.]+: ", re.M)


def test_tiny_run_end_to_end(toy_dir, tmp_path):
    """Every section at toy shapes on CPU; the smoke's FSDP2 chain under torchrun with gloo. The dense retriever
    for the smoke is what a GPU machine without Java will use."""
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, "bench/gpu.py", "--tiny", "--json", str(out), "--toy-dir", str(toy_dir),
                        "--smoke-retriever", "dense"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    assert {k: v["status"] for k, v in res["sections"].items()} == {s: "ok" for s in gpu.SECTIONS}
    figs = res["figures"]
    # one printed line per figure, the same names as in the JSON
    assert sorted(m.group(0)[:-2] for m in FIGURE.finditer(p.stdout)) == sorted(figs)
    assert figs["smoke.single_ok"] is True and figs["smoke.fsdp_ok"] is True
    assert figs["smoke.retriever"] == "dense"
    assert "FSDP2 modules" in p.stdout
    for rows in (4, 8):
        for k in ("ours_tok_s", "hf_tok_s", "roofline_tok_s", "ours_over_hf", "ours_over_roofline"):
            assert figs[f"rollout.r{rows}.{k}"] > 0, k
        assert figs[f"rollout.r{rows}.ours_over_hf"] == pytest.approx(
            figs[f"rollout.r{rows}.ours_tok_s"] / figs[f"rollout.r{rows}.hf_tok_s"])
    for tag in ("noref_gc", "noref_nogc", "ref_gc", "ref_nogc"):
        assert figs[f"train.{tag}.tokens_s"] > 0 and figs[f"train.{tag}.mfu"] is None  # no spec peak for a CPU
        assert 0 < figs[f"train.{tag}.mfu_vs_matmul"] < 10
        assert figs[f"train.{tag}.peak_gib"] > 0 and figs[f"train.{tag}.formula_gib"] > 0
    assert figs["search.identical_ids"] is True and figs["search.qps"] > 0
    assert figs["device.copy_bandwidth_gb_s"] > 0


def test_a_section_past_its_guard_is_killed_recorded_and_the_run_goes_on(toy_dir, tmp_path):
    """The device section hangs after its first figure (a test hook): the parent kills it at its guard, keeps the
    figure it had saved, and runs the next section."""
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, "bench/gpu.py", "--tiny", "--json", str(out), "--toy-dir", str(toy_dir),
                        "--only", "device,search", "--budgets", "device=4", "--debug-hang", "device"], cwd=ROOT,
                       env=_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stdout + p.stderr
    res = json.loads(out.read_text())
    assert res["sections"]["device"]["status"] == "timeout after 4 s", res["sections"]["device"]
    assert res["figures"]["device.name"] == "cpu" and "device.torch" not in res["figures"]
    assert res["sections"]["search"]["status"] == "ok" and res["figures"]["search.identical_ids"] is True
    assert "device: timeout after 4 s" in p.stdout


def test_bad_arguments_get_one_line_errors(tmp_path):
    for args, word in ((["--only", "rollout,gpu"], "unknown section"), (["--budgets", "train"], "NAME=SECONDS")):
        p = subprocess.run([sys.executable, "bench/gpu.py", "--tiny", "--json", str(tmp_path / "x.json"), *args],
                           cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
        assert p.returncode != 0 and word in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
