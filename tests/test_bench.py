"""bench.py on the miniature dims (CPU): every row kind's code path runs and returns a timing, the profile's kernel
kinds are assigned as intended, and the accuracy mode's quantized models stay close to bf16."""

import pytest
import torch

import bench
import fixtures


@pytest.mark.parametrize("kw", [dict(who="stock"), dict(who="stock", ckpt=True), dict(who="stock", denoise=True),
                                dict(who="ours"), dict(who="ours", kind="fp8", ckpt=True),
                                dict(who="ours", kind="fp8", fp8_backward=True), dict(who="ours", kind="nf4", ckpt=True),
                                dict(who="ours", kind="fp8", denoise=True), dict(who="ours", denoise=True, compile_=True),
                                dict(who="ours", kind="full", ckpt=True),
                                *[dict(who="ours", ckpt=True, adapter=a) for a in ("lokr", "loha", "dora")]],
                         ids=["stock", "stock-ckpt", "stock-denoise", "bf16", "fp8-ckpt", "fp8-backward", "nf4-ckpt",
                              "fp8-denoise", "bf16-denoise-compile-flag", "full-ckpt", "lokr-ckpt", "loha-ckpt",
                              "dora-ckpt"])
def test_rows_run_on_tiny(kw):
    cfg = bench.BenchConfig(tiny=True, text_tokens=16, iters=1, warmup=1)
    with torch.enable_grad():
        row = bench.run_row("row", cfg, torch.device("cpu"), 32, **kw)
    assert row["seconds"] is not None and row["seconds"] > 0, row
    assert kw["who"] == "stock" or row["attention"] == "default", row  # CPU: PyTorch's default SDPA


def test_stepcache_row_runs_on_tiny():
    cfg = bench.BenchConfig(tiny=True, text_tokens=16, iters=1, warmup=0)
    row = bench.run_row("row", cfg, torch.device("cpu"), 32, who="ours", cache="tea:0.6")
    assert row["seconds"] > 0 and row["denoise_s"] > 0 and 0 < row["latent_rel_err"] < 0.5, row
    assert "| tea:0.6 | 32 |" in bench.format_stepcache([dict(row, cache=""), row])
    assert "stepcache" not in bench.BenchConfig().rows and len(bench.plan(bench.BenchConfig(rows=("stepcache",)))) \
        == len(bench.STEPCACHE_SPECS)


def test_plan_labels_the_shipped_configs():
    rows = [(label, res) for label, res, _ in bench.plan(bench.BenchConfig())]
    assert len(rows) == len(set(rows))
    labels = [label for label, _ in rows]
    assert "bf16 train, full ckpt: ours (configs/bf16.py)" in labels
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


def test_accuracy_mode_on_tiny():
    with torch.enable_grad():
        rows = {r["kind"]: r for r in bench.main(bench.BenchConfig(tiny=True, accuracy=True))}
    assert set(rows) == {"t5 fp8 weight-only", "fp8", "nf4", "fp4"}
    t5 = rows.pop("t5 fp8 weight-only")
    assert 0 < t5["rel_err"] < 0.1 and 0.99 < t5["cosine"] <= 1.0, t5
    for r in rows.values():
        assert r["finite"] and 0 < r["pred_rel_err"] < 0.05 and 0.95 < r["grad_cosine"] <= 1.0, r
    assert rows["fp8"]["pred_rel_err"] < rows["nf4"]["pred_rel_err"]  # 8 bits per weight vs 4


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


def test_attention_fp8_accuracy_on_tiny(monkeypatch):
    """bench.py --accuracy --rows attn_fp8's comparison, on the CPU: both cuDNN kernels replaced by torch (the bf16
    one by the math reference, the fp8 graphs by their twins), so the code path runs end to end."""
    import kontext_kernels.attention_fp8 as fp8
    from kontext_kernels.attention import attention_ref

    monkeypatch.setattr("kontext_kernels.attention.cudnn_usable", lambda device, dtype: True)
    monkeypatch.setattr("kontext_kernels.attention.check_fp8_attention", lambda device, dtype: None)
    monkeypatch.setattr("kontext_kernels.attention.cudnn_attention", attention_ref)
    monkeypatch.setattr(fp8, "fp8_forward", fp8.fp8_forward_emulated)
    monkeypatch.setattr(fp8, "fp8_backward", fp8.fp8_backward_emulated)
    cfg = bench.BenchConfig(tiny=True, res=(64,), text_tokens=16)
    row = bench.attention_fp8_accuracy(cfg, torch.device("cpu"))
    assert row["finite"] and 0 < row["pred_rel_err"] < 0.2 and row["grad_cosine_min"] <= row["grad_cosine"], row
    assert row["fp8_backward_calls"] == 4 and row["grad_cosine_min_at"].endswith(("lora_A.default.weight",
                                                                                  "lora_B.default.weight")), row
