"""Block offload of the frozen transformer: each block's frozen weights live in (pinned) host memory and stream to
the GPU one block ahead of use, on a side stream, in forward order and again in the backward's recompute order.

Why not diffusers' group offloading (`enable_group_offload`, block_level, use_stream), which we tried first: it
moves a block back by assigning `param.data = host_copy` after the block's forward. Measured on the H200 (bench.py
--rows offload, LoRA + full checkpointing, 1024^2): a training step with it ran at 2.00 s with a peak of 23.8 GiB,
against 26.8 GiB for the same stock step without offload, so the weights stay on the GPU through the backward; this
file's streamer ran train.py's step at 1.64 s and 5.3 GiB. Here a block's parameters are swapped for fresh GPU tensors during its forward and
swapped back after it; whatever autograd saved keeps the GPU copy alive exactly until that block's backward is done.
With full checkpointing nothing is saved in the first pass (each block's copy is freed when the next one runs), and
the recompute in the backward fetches it again, so about two blocks of weights sit on the GPU at once.

Trainable parameters (the LoRA) and everything outside the blocks stay on the GPU. The same streamer serves sampling.
"""

import torch
from torch import nn


def flux_blocks(transformer) -> list[nn.Module]:
    """FLUX's blocks in execution order: the double-stream blocks, then the single-stream ones."""
    return [*transformer.transformer_blocks, *transformer.single_transformer_blocks]


def _frozen_tensors(block: nn.Module) -> list[tuple[nn.Module, str, bool]]:
    """(module, name, is_parameter) for every frozen parameter and every buffer in the block."""
    out = []
    for m in block.modules():
        out += [(m, n, True) for n, p in m._parameters.items() if p is not None and not p.requires_grad]
        out += [(m, n, False) for n, b in m._buffers.items() if b is not None]
    return out


class BlockOffload:
    """Streams the frozen weights of `blocks[resident:]` to `device` around each block's forward.

    `order` records the block index of every fetch (tests read it: with full checkpointing one train step fetches
    each offloaded block twice, forward order then reverse). Create it after the LoRA is added (its parameters are
    moved to `device` and never offloaded)."""

    def __init__(self, blocks: list[nn.Module], device: torch.device, resident: int = 0, wrap: bool = False):
        self.blocks, self.device, self.resident, self.wrap = blocks, torch.device(device), resident, wrap
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.host: dict[int, list] = {}  # block -> [(module, name, is_param, host tensor)]
        self.pending: dict[int, tuple] = {}  # block -> (GPU tensors, copy-done event)
        self.order: list[int] = []
        self.active: set[int] = set()  # blocks holding their GPU copies now
        self.bytes_per_fetch = 0
        self.last = -1
        self.handles = []
        for i, block in enumerate(blocks):
            for p in block.parameters():
                if p.requires_grad:
                    p.data = p.data.to(self.device)
            if i < resident:
                block.to(self.device)
                continue
            entries = []
            for m, n, is_param in _frozen_tensors(block):
                t = (m._parameters if is_param else m._buffers)[n]
                host = t.detach().to("cpu")
                if self.cuda:
                    host = host.pin_memory()  # async copies need page-locked memory
                entries.append((m, n, is_param, host))
                self._set(m, n, is_param, host)
                self.bytes_per_fetch += host.numel() * host.element_size()
            self.host[i] = entries
            self.handles.append(block.register_forward_pre_hook(self._pre(i)))
            self.handles.append(block.register_forward_hook(self._post(i)))
        # the streamed blocks' ends in execution order: where the prefetch turns (none streamed: no hooks run)
        self.first, self.final = (min(self.host), max(self.host)) if self.host else (0, -1)

    @staticmethod
    def _set(m: nn.Module, n: str, is_param: bool, t: torch.Tensor) -> None:
        if is_param:
            m._parameters[n] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
        else:
            m._buffers[n] = t

    def _copy(self, i: int) -> None:
        """Start block i's host-to-GPU copy on the side stream (once; a fetch already under way is kept)."""
        if i not in self.host or i in self.pending:
            return
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # copies into memory freed by compute
            with torch.cuda.stream(self.stream):
                gpu = [h.to(self.device, non_blocking=True) for *_, h in self.host[i]]
                done = torch.cuda.Event()
                done.record(self.stream)
        else:
            gpu, done = [h.clone() for *_, h in self.host[i]], None
        self.pending[i] = (gpu, done)

    def _pre(self, i: int):
        def hook(block, args):
            self._copy(i)  # no-op when prefetched
            gpu, done = self.pending.pop(i)
            if self.cuda:
                main = torch.cuda.current_stream(self.device)
                main.wait_event(done)
                for t in gpu:
                    t.record_stream(main)  # allocated on the side stream, used and freed on this one
            for j in [j for j in self.active if j != i]:
                self._restore(j)  # a checkpoint recompute stops early, before the block's forward hook
            for (m, n, is_param, _), t in zip(self.host[i], gpu):
                self._set(m, n, is_param, t)
            self.active.add(i)
            self.order.append(i)
            # forward runs blocks upwards, the checkpoint recomputes in the backward downwards: prefetch the next one
            first, final = self.first, self.final
            upwards = i > self.last or i == first
            self.last = i
            if upwards and i == final:
                self._copy(first if self.wrap else final)  # sampling: the next step; training: the first recompute
            else:
                self._copy(i + 1 if upwards else i - 1)
        return hook

    def _restore(self, i: int) -> None:
        for m, n, is_param, host in self.host[i]:
            self._set(m, n, is_param, host)  # autograd keeps the GPU copy while the backward needs it
        self.active.discard(i)

    def _post(self, i: int):
        def hook(block, args, output):
            self._restore(i)
        return hook

    def remove(self) -> None:
        """Take the hooks off, leaving the offloaded blocks' weights on the host."""
        for h in self.handles:
            h.remove()
        self.handles, self.pending = [], {}


def offload_transformer(transformer, device: torch.device, resident: int = 0, wrap: bool = False) -> BlockOffload:
    """Everything but the blocks to `device`, blocks[resident:] streamed (see BlockOffload). wrap=True for sampling
    (after the last block the first comes next); training with checkpointing recomputes the last block next."""
    blocks = flux_blocks(transformer)
    in_blocks = {id(t) for blk in blocks for t in [*blk.parameters(), *blk.buffers()]}
    for m in transformer.modules():
        for n, p in m._parameters.items():
            if p is not None and id(p) not in in_blocks:
                p.data = p.data.to(device)
        for n, b in m._buffers.items():
            if b is not None and id(b) not in in_blocks:
                m._buffers[n] = b.to(device)
    return BlockOffload(blocks, device, resident, wrap=wrap)
