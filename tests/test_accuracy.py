"""accuracy.py on the miniature dims (CPU): the quantized models stay close to bf16, and fp8 attention's comparison
runs end to end with the cuDNN kernels replaced by their torch twins."""

import torch

import accuracy
from bench import BenchConfig


def test_accuracy_mode_on_tiny():
    with torch.enable_grad():
        rows = {r["kind"]: r for r in accuracy.main(BenchConfig(tiny=True))}
    assert set(rows) == {"t5 fp8 weight-only", "fp8", "nf4", "fp4"}
    t5 = rows.pop("t5 fp8 weight-only")
    assert 0 < t5["rel_err"] < 0.1 and 0.99 < t5["cosine"] <= 1.0, t5
    for r in rows.values():
        assert r["finite"] and 0 < r["pred_rel_err"] < 0.05 and 0.95 < r["grad_cosine"] <= 1.0, r
    assert rows["fp8"]["pred_rel_err"] < rows["nf4"]["pred_rel_err"]  # 8 bits per weight vs 4


def test_attention_fp8_accuracy_on_tiny(monkeypatch):
    """accuracy.py --rows attn_fp8's comparison, on the CPU: both cuDNN kernels replaced by torch (the bf16
    one by the math reference, the fp8 graphs by their twins), so the code path runs end to end."""
    import kontext_kernels.attention_fp8 as fp8
    from kontext_kernels.attention import attention_ref

    monkeypatch.setattr("kontext_kernels.attention.cudnn_usable", lambda device, dtype: True)
    monkeypatch.setattr("kontext_kernels.attention.check_fp8_attention", lambda device, dtype: None)
    monkeypatch.setattr("kontext_kernels.attention.cudnn_attention", attention_ref)
    monkeypatch.setattr(fp8, "fp8_forward", fp8.fp8_forward_emulated)
    monkeypatch.setattr(fp8, "fp8_backward", fp8.fp8_backward_emulated)
    cfg = BenchConfig(tiny=True, res=(64,), text_tokens=16)
    row = accuracy.attention_fp8_accuracy(cfg, torch.device("cpu"))
    assert row["finite"] and 0 < row["pred_rel_err"] < 0.2 and row["grad_cosine_min"] <= row["grad_cosine"], row
    assert row["fp8_backward_calls"] == 4 and row["grad_cosine_min_at"].endswith(("lora_A.default.weight",
                                                                                  "lora_B.default.weight")), row
