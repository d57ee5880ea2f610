"""bench.py on the miniature dims (CPU): every row kind's code path runs and returns a timing, and the profile's kernel
kinds are assigned as intended."""

import pytest
import torch

import bench
import bench_tables
import fixtures


@pytest.mark.parametrize("kw", [dict(who="stock"), dict(who="stock", ckpt=True), dict(who="stock", denoise=True),
                                dict(who="ours"), dict(who="ours", kind="fp8", ckpt=True),
                                dict(who="ours", kind="fp8", fp8_backward=True), dict(who="ours", kind="nf4", ckpt=True),
                                dict(who="ours", kind="fp8", denoise=True), dict(who="ours", denoise=True, compile_=True),
                                dict(who="ours", kind="full", ckpt=True), dict(who="ours", ckpt=True, budget=0.5),
                                *[dict(who="ours", ckpt=True, adapter=a) for a in ("lokr", "loha", "dora")]],
                         ids=["stock", "stock-ckpt", "stock-denoise", "bf16", "fp8-ckpt", "fp8-backward", "nf4-ckpt",
                              "fp8-denoise", "bf16-denoise-compile-flag", "full-ckpt", "bf16-budget", "lokr-ckpt",
                              "loha-ckpt", "dora-ckpt"])
def test_rows_run_on_tiny(kw):
    cfg = bench.BenchConfig(tiny=True, text_tokens=16, iters=1, warmup=1)
    with torch.enable_grad():
        row = bench.run_row("row", cfg, torch.device("cpu"), 32, **kw)
    assert row["seconds"] is not None and row["seconds"] > 0, row
    assert kw["who"] == "stock" or row["attention"] == "default", row  # CPU: PyTorch's default SDPA
    assert row.get("budget") == kw.get("budget"), row


def test_stepcache_row_runs_on_tiny():
    cfg = bench.BenchConfig(tiny=True, text_tokens=16, iters=1, warmup=0)
    row = bench.run_row("row", cfg, torch.device("cpu"), 32, who="ours", cache="tea:0.6")
    assert row["seconds"] > 0 and row["denoise_s"] > 0 and 0 < row["latent_rel_err"] < 0.5, row
    assert "| tea:0.6 | 32 |" in bench_tables.format_stepcache([dict(row, cache=""), row])
    assert "stepcache" not in bench.BenchConfig().rows and len(bench.plan(bench.BenchConfig(rows=("stepcache",)))) \
        == len(bench.STEPCACHE_SPECS)


def test_plan_labels_the_shipped_configs():
    rows = [(label, res) for label, res, _ in bench.plan(bench.BenchConfig())]
    assert len(rows) == len(set(rows))
    labels = [label for label, _ in rows]
    assert "bf16 train, full ckpt: ours" in labels
    assert "bf16 train, memory budget 0.34: ours (configs/bf16.py)" in labels  # the shipped budget, read from the file
    budget = [kw["budget"] for _, _, kw in bench.plan(bench.BenchConfig(rows=("budget", "budget_fp8")))
              if "budget" in kw]
    assert budget == list(bench.BUDGETS) * 2 and len(set(budget)) >= 5
    assert "fp8 train, no recompute: ours (configs/fp8.py)" in labels
    assert bench.ours_config("fp8", bench.BenchConfig()).fp8_backward  # the row runs configs/fp8.py's choice
    full = [label for label, _, kw in bench.plan(bench.BenchConfig(rows=("full",))) if kw.get("kind") == "full"]
    assert full == ["bf16 full fine-tune, full ckpt: ours (configs/full_bf16.py)"]
    assert bench.ours_config("full", bench.BenchConfig()).mode == "full"
    adapters = [(label, kw.get("adapter", "lora")) for label, _, kw in bench.plan(bench.BenchConfig(
        rows=("lokr", "loha", "dora")))]
    assert adapters == [("bf16 train, full ckpt: ours (configs/bf16.py)", "lora"),
                        *[(f"bf16 train, full ckpt: ours, train.adapter {a} (configs/bf16.py)", a)
                          for a in ("lokr", "loha", "dora")]]


def test_kernel_kinds():
    kinds = {
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x64_1x4x1": "attention",
        "flash_fwd_kernel": "attention",
        "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT": "gemm",
        "sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128": "gemm",
        "triton_tem_fused_mm_0": "gemm",
        "triton_poi_fused__scaled_dot_product_flash_attention_clone_3": "fused elementwise (triton)",
        "_quantize_rows_kernel": "quant",
        "_dequant_4bit_kernel": "quant",
        "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>": "other (aten)",
    }
    assert {name: bench.kernel_kind(name) for name in kinds} == kinds


def test_compile_cache_rows_pair_up(monkeypatch, tmp_path):
    """--rows compile_cache: each cold row and its warm row share one file; the row runs (on the CPU nothing
    compiles, so nothing is saved or loaded)."""
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # run_row points them at fresh folders
        monkeypatch.setenv(var, str(tmp_path))
    rows = bench.plan(bench.BenchConfig(rows=("compile_cache",)))
    assert [kw["compile_cache"] for _, _, kw in rows] == ["cold", "warm"] * 3
    files = [bench.cache_rows_file(None, label) for label, _, _ in rows]
    assert files[0::2] == files[1::2] and len(set(files)) == 3
    cfg = bench.BenchConfig(tiny=True, text_tokens=16, iters=1, warmup=0)
    row = bench.run_row(rows[0][0], cfg, torch.device("cpu"), 32, **rows[0][2])
    assert row["seconds"] > 0 and row["cache_loaded"] is False, row


def test_step_tflop_matches_the_hand_count():
    """DESIGN.md §4's count at 1024^2 (8704 tokens): Linears 112 forward + 112 input-gradient, attention 53 + 133;
    410 a LoRA step, 575 with full recompute, 165 a denoising call."""
    d = fixtures.FLUX_KONTEXT_DIMS
    assert round(bench.step_tflop(d, 1024, 512, denoise=True)) == 165
    assert round(bench.step_tflop(d, 1024, 512)) == 410 and round(bench.step_tflop(d, 1024, 512, ckpt=True)) == 576
    assert bench.step_tflop(d, 1024, 512, controls=2) > 1.5 * bench.step_tflop(d, 1024, 512)  # attention grows as S^2
