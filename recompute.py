"""train.memory_budget: how much of the no-recompute activation memory a LoRA step keeps, chosen block by block.

Gradient checkpointing used to be all or nothing: every block recomputed whole (26.5 GiB, 1.198 s on the H100 at
1024^2) or none (62.9 GiB, 0.861 s). Between them sit selective checkpointing policies (PyTorch's own
`torch.utils.checkpoint.create_selective_checkpoint_contexts`): a block keeps some op outputs and recomputes the rest
in the backward. Each block gets one of four LEVELS, from most memory to least:

    "keep"       no recompute (compiled: inductor's min-cut already recomputes cheap fusible pointwise work)
    "narrow"     keeps attention outputs and GEMM outputs no wider than the GEMM's input; recomputes the
                 up-projections (the MLP's 4x-wide hidden, LoRA B) and pointwise work: one GEMM per block
    "attention"  keeps attention outputs only; recomputes every GEMM and pointwise work (not the attention, the
                 costliest op to recompute per byte: ~0.93 TFLOP for 53 MB of output at 8704 tokens)
    "full"       keeps the block's inputs only (diffusers' own per-block checkpoint): the whole forward again

SHARE is each level's activation memory per block as a share of "keep"'s, from the tensors the LoRA backward needs
at FLUX's widths, in units of [tokens, inner] (mlp_ratio 4): keep ~10 (block input, normed input, q, k, v, attention
output, 4 for the MLP hidden), narrow ~6, attention ~3, full 1 (the input), each less full's 1 over keep's 9.
plan() gives the blocks a mix of two neighbouring levels whose mean share is the budget, spread evenly over the
double and single blocks (a double block holds more than a single one): the cheapest recompute for that memory when
each level costs more time per byte freed than the one before (one GEMM frees 4 units; three narrower ones 3; the
whole forward with its attention the last 2). Budget 0 is today's full checkpointing, 1 no recompute.

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
LEVELS = ("keep", "narrow", "attention", "full")
SHARE = {"keep": 1.0, "narrow": 5 / 9, "attention": 2 / 9, "full": 0.0}  # the docstring's estimate per block

# mm / addmm: bf16 and 4-bit Linears (the 4-bit ones after dequantising); _scaled_mm: the fp8 Linears (kontext_kernels/
# fp8.py); bmm: the math attention's products
GEMMS = {aten.mm.default, aten.addmm.default, aten._scaled_mm.default, aten.bmm.default}
# every SDPA kernel an attention backend can reach: ours (cuDNN), diffusers' native / flash / efficient, the CPU's
ATTENTION = {aten._scaled_dot_product_cudnn_attention.default, aten._scaled_dot_product_flash_attention.default,
             aten._scaled_dot_product_efficient_attention.default,
             aten._scaled_dot_product_flash_attention_for_cpu.default}


def _widens(op, args) -> bool:
    """Is a GEMM's output wider than its input (an up-projection: cheap to recompute per byte it holds)?
    mm(a [M, K], b [K, N]), addmm(bias, a, b), _scaled_mm(a, b, ...), bmm over a leading batch dim: N > K."""
    a, b = (args[1], args[2]) if op is aten.addmm.default else (args[0], args[1])
    return b.shape[-1] > a.shape[-1]


def save_narrow(ctx, op, *args, **kwargs):
    """The "narrow" level's policy (signature of create_selective_checkpoint_contexts' policy_fn)."""
    if op in ATTENTION or (op in GEMMS and not _widens(op, args)):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def save_attention(ctx, op, *args, **kwargs):
    """The "attention" level's policy."""
    return CheckpointPolicy.MUST_SAVE if op in ATTENTION else CheckpointPolicy.PREFER_RECOMPUTE


POLICIES = {"narrow": save_narrow, "attention": save_attention}


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


def apply_budget(transformer, budget: float) -> Counter:
    """Give each of the transformer's blocks (double, then single) its level from plan(): selective levels wrap the
    block's forward, "full" blocks checkpoint through diffusers' enable_gradient_checkpointing, "keep" blocks run
    plain. Call before the LoRA is added and before regional compile (train.prepare_transformer). Returns the count
    of blocks per level (the log line)."""
    blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
    levels = plan(len(blocks), budget)
    for block, level in zip(blocks, levels):
        if level in POLICIES:
            _selective(block, POLICIES[level])
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
