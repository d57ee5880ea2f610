"""bench.py and accuracy_gpu.py on the miniature dims (CPU): every row's code path runs and returns a timing, the
profile's kernel kinds are assigned as intended, and the quantized models stay close to bf16."""

import pytest
import torch

import bench


@pytest.mark.parametrize("kw", [dict(), dict(kind="fp8", ckpt=True), dict(kind="nf4", ckpt=True),
                                dict(kind="fp8", denoise=True), dict(denoise=True, fuse=True)],
                         ids=["bf16", "fp8-ckpt", "nf4-ckpt", "fp8-denoise", "bf16-denoise-fused"])
def test_rows_run_on_tiny(kw):
    cfg = bench.BenchConfig(tiny=True, text_tokens=16, iters=1, warmup=1)
    with torch.enable_grad():
        row = bench.run_row("row", cfg, torch.device("cpu"), 32, **kw)
    assert row["seconds"] is not None and row["seconds"] > 0, row


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


def test_accuracy_script_on_tiny():
    import accuracy_gpu

    rows = {r["kind"]: r for r in accuracy_gpu.main(tiny=True)}
    assert set(rows) == {"fp8", "nf4", "fp4"}
    for r in rows.values():
        assert r["finite"] and 0 < r["pred_rel_err"] < 0.05 and r["grad_cosine"] > 0.95, r
    assert rows["fp8"]["pred_rel_err"] < rows["nf4"]["pred_rel_err"]  # 8 bits per weight vs 4
