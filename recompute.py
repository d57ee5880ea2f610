"""train.memory_budget: how much of the no-recompute activation memory a LoRA step keeps, chosen block by block.

Gradient checkpointing used to be all or nothing: every block recomputed whole (26.5 GiB, 1.209 s on the H100 at
1024^2) or none (62.9 GiB, 0.890 s). Between them sit selective checkpointing policies (PyTorch's own
`torch.utils.checkpoint.create_selective_checkpoint_contexts`): a block keeps some op outputs and recomputes the rest
in the backward. Each block gets one of these LEVELS, from most memory to least:

    "keep"       no recompute (compiled: inductor's min-cut partitioner picks what to save)
    "gemms"      keeps attention outputs and GEMM outputs; recomputes pointwise work and the LoRA's cheap GEMMs
    "narrow"     keeps attention outputs and GEMM outputs no wider than the GEMM's input (q, k, v); recomputes the
                 up-projections (one GEMM of 4 inner^2), pointwise work and the LoRA's GEMMs
    "attention"  keeps attention outputs only; recomputes every GEMM and pointwise work, not the attention (the
                 costliest op to recompute per byte: ~0.93 TFLOP for 53 MB of output at 8704 tokens)
    "full"       keeps the block's inputs only (diffusers' own per-block checkpoint): the whole forward again

A GEMM whose reduction is no longer than the LoRA rank (the LoRA's B) is never kept by a selective level: its output
costs 2 x rank FLOP per element to redo, nothing next to a 3072-deep projection.

SHARE is each level's activation memory per block, above "full"'s, as a share of "keep"'s, measured on the H100
(bench.py --rows budget, 1024^2, 8704 tokens, bf16, every block at one level; BENCHMARKS.md): keep holds 36.4 GiB
over full checkpointing's 26.5 (0.890 s against 1.209 s), gemms 23.6 (0.65, 0.912 s: the min-cut's own choice
keeps ~4.5 [tokens, 3072] tensors a block of pointwise results), narrow 12.3 (0.34, 0.983 s: q, k, v and the
attention output), attention 2.7 (0.075, 1.048 s: the attention output). Each level costs more time per GiB freed
than the one before (0.06, 0.23, 0.25, 2.1 s per unit of share), so plan() mixes two neighbouring levels, the mean
share being the budget, spread evenly over the double and single blocks (a double block holds more than a single
one). Budget 0 is today's full checkpointing, 1 no recompute. A fifth level, keeping the up-projections' outputs and
recomputing q/k/v ("wide"), measured 0.994 s at 40.5 GiB: worse than narrow on both counts, so it is not offered.

The selective levels wrap the block's forward in `torch.utils.checkpoint.checkpoint(..., context_fn=...)` before
regional compile, so the checkpoint is inside the compiled region (dynamo traces it; the partitioner applies the
policy) as torchtitan does per transformer block; "full" blocks go through diffusers' gradient_checkpointing_func,
outside the compiled block, as before. Eager runs (the CPU) use the same policies in torch's dispatch mode.
"""

import functools
from collections import Counter

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

aten = torch.ops.aten
LEVELS = ("keep", "gemms", "narrow", "attention", "full")
SHARE = {"keep": 1.0, "gemms": 0.65, "narrow": 0.34, "attention": 0.075, "full": 0.0}  # see above

# mm / addmm: bf16 and 4-bit Linears (the 4-bit ones after dequantising); _scaled_mm: the fp8 Linears (kontext_kernels/
# fp8.py); bmm: the math attention's products
GEMMS = {aten.mm.default, aten.addmm.default, aten._scaled_mm.default, aten.bmm.default}
# every SDPA kernel an attention backend can reach: ours (cuDNN), diffusers' native / flash / efficient, the CPU's
ATTENTION = {aten._scaled_dot_product_cudnn_attention.default, aten._scaled_dot_product_flash_attention.default,
             aten._scaled_dot_product_efficient_attention.default,
             aten._scaled_dot_product_flash_attention_for_cpu.default}


def gemm_kn(op, args) -> tuple[int, int]:
    """A GEMM's reduction length K and output width N: mm(a [M, K], b [K, N]), addmm(bias, a, b),
    _scaled_mm(a, b, ...), bmm over a leading batch dim."""
    a, b = (args[1], args[2]) if op is aten.addmm.default else (args[0], args[1])
    return a.shape[-1], b.shape[-1]


# which GEMM outputs (reduction K, width N) each selective level keeps, beside attention outputs
KEEPS = {"gemms": lambda k, n: True, "narrow": lambda k, n: n <= k, "attention": lambda k, n: False}


def policy(level: str, lora_rank: int):
    """The level's policy_fn for create_selective_checkpoint_contexts: keep attention outputs, and the outputs of the
    GEMMs with K > lora_rank for which KEEPS[level](K, N) holds; recompute everything else."""
    keep_gemm = KEEPS[level]

    def choose(ctx, op, *args, **kwargs):
        if op in ATTENTION:
            return CheckpointPolicy.MUST_SAVE
        if op in GEMMS:
            k, n = gemm_kn(op, args)
            if k > lora_rank and keep_gemm(k, n):
                return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
    return choose


def plan(n_blocks: int, budget: float) -> list[str]:
    """Each block's level for a budget in [0, 1]: the two neighbouring LEVELS whose SHARE brackets it, mixed so the
    mean share is the budget (rounded to whole blocks), the upper level spread evenly (Bresenham) over the blocks."""
    if not 0 <= budget <= 1:
        raise ValueError(f"train.memory_budget: expected a share in [0, 1], got {budget}")
    for hi, lo in zip(LEVELS, LEVELS[1:]):
        if SHARE[lo] <= budget <= SHARE[hi]:
            break
    p = (budget - SHARE[lo]) / (SHARE[hi] - SHARE[lo])
    n_hi = round(p * n_blocks)
    return [hi if (i + 1) * n_hi // n_blocks > i * n_hi // n_blocks else lo for i in range(n_blocks)]


def _selective(block: torch.nn.Module, policy) -> None:
    """Wrap the block's forward in a selective checkpoint with `policy` (before compile, so the compiled region
    traces the checkpoint). Under no_grad (validation, sampling) the forward runs as it was."""
    forward = block.forward
    context_fn = functools.partial(create_selective_checkpoint_contexts, policy)

    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

    block.forward = checkpointed


def apply_budget(transformer, budget: float, lora_rank: int) -> Counter:
    """Give each of the transformer's blocks (double, then single) its level from plan(): selective levels wrap the
    block's forward, "full" blocks checkpoint through diffusers' enable_gradient_checkpointing, "keep" blocks run
    plain. Call before the LoRA is added and before regional compile (train.prepare_transformer). Returns the count
    of blocks per level (the log line)."""
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    levels = plan(len(blocks), budget)
    for block, level in zip(blocks, levels):
        if level in KEEPS:
            _selective(block, policy(level, lora_rank))
    full = {id(b) for b, level in zip(blocks, levels) if level == "full"}

    def checkpoint_full(module, *args):  # diffusers calls this for every block when grad is on
        if id(module) in full:
            return checkpoint(module.__call__, *args, use_reentrant=False)
        return module(*args)

    transformer.enable_gradient_checkpointing(checkpoint_full)
    return Counter(levels)


def describe(levels: Counter) -> str:
    """'12 keep, 45 narrow' in LEVELS order."""
    return ", ".join(f"{levels[k]} {k}" for k in LEVELS if levels[k])
