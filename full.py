"""Full fine-tuning of the FLUX.1 Kontext transformer (`train.mode="full"`): which weights train, the optimizer that
steps inside the backward, FSDP2 sharding under torchrun, the diffusers `transformer/` folder the run writes, and
full-model checkpoints. train.py calls these at the few points where LoRA training does LoRA-specific work; the
objective, data, cache, schedule, logging and validation are the LoRA path's own.

- What trains (`train.full_modules`): the Linears of the 19 double and 38 single blocks, all of them (attention, MLP,
  AdaLN modulation) or the attention projections only; embedders, RMS norms, the final layer and an IP-Adapter stay
  frozen. The weights train in the dtype they were loaded in: bf16 (configs/full_bf16.py) or fp32 (tiny, the master-
  weights reference).
- Optimizer in the backward: each trained parameter has a post-accumulate-grad hook (torch's
  "optimizer step in backward" pattern) that steps that parameter alone and frees its gradient, so no full set of
  gradients is ever held. Hence no global gradient clipping (the norm is known only after every update; the config
  refuses train.grad_clip > 0 here, as torchtune does), and a non-finite loss is caught before its backward (one host
  sync per micro-batch). With grad_accum > 1 the gradients accumulate in the parameters' .grad (a buffer the size of
  the trained weights in their dtype: 22 GiB in bf16 for all 11.9B) and the hooks step on the last micro-batch only.
- `train.optimizer="torchao_adamw8bit"`: torchao's 8-bit AdamW (block-wise 8-bit moments, 2 bytes per parameter
  where bf16 AdamW needs 4 and fp32 8), bf16 weights updated with stochastic rounding (torchao's
  single_param_adam(..., BF16_STOCHASTIC_ROUND=True)); its step is compiled on CUDA as torchao compiles it, run eager
  on the CPU (inductor would compile each parameter shape for seconds). The rounding noise is a pure function of
  (train.seed, step): resume is exact. "adamw" (torch) is the fp32-master reference; "adamw8bit" bitsandbytes' 8-bit
  AdamW, which rounds bf16 weights to nearest (README's comparison).
- Multi-GPU: under torchrun the transformer is sharded with FSDP2, `fully_shard` per block, then the root, with a
  MixedPrecisionPolicy (parameters gathered in the compute dtype, gradients reduce-scattered in fp32); gradient
  checkpointing recomputes inside each sharded block. The hooks step each rank's shard. Checkpoints hold each rank's
  shards (resume needs the same number of processes); the final transformer/ folder is gathered on rank 0.
- Checkpoints `checkpoints/full-<hash>/` (the hash of the trained tensors, all ranks'): `weights-<r>-of-<n>` and
  `optimizer-<r>-of-<n>.safetensors`, `state.json`, `config.json`; written under a temp name and renamed, pruned with
  the LoRA checkpoints' rules (lora.py).
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from atomic import user_mode_tree
from cache import save_atomic, tensor_digest
from config import Config, TrainConfig, to_json
from kontext_kernels.fp8 import FP8Linear
from kontext_kernels.int4 import Linear4bit
from load import _is_local, _resolve
from lora import _prune, _write_json_atomic, new_run_id
from quant import BLOCKS, is_quantized_checkpoint

RESULT = "transformer"  # the run's result: <out_dir>/transformer/, FluxTransformer2DModel.from_pretrained reads it
ATTENTION = ".attn."  # diffusers' Attention module of each block: to_q/k/v, to_out.0, add_*_proj, to_add_out

# ---------------------------------------------------------------- what trains


def trained_linears(transformer, which: str) -> list[tuple[str, torch.nn.Linear]]:
    """The block Linears train.full_modules names, in model order: "all" every nn.Linear under the double and single
    blocks; "attention" those of the blocks' Attention modules. IP-Adapter projections (attn.processor) never."""
    if which not in ("all", "attention"):
        raise ValueError(f"train.full_modules: expected all | attention, got {which!r}")
    found = [(n, m) for n, m in transformer.named_modules() if n.startswith(BLOCKS) and isinstance(m, torch.nn.Linear)
             and ".processor." not in n and (which == "all" or ATTENTION in n)]
    quantized = [n for n, m in found if isinstance(m, (FP8Linear, Linear4bit))]
    if quantized:  # config.validate refuses model.quant; this is a pre-quantized checkpoint that got through
        raise ValueError(f"train.mode='full' trains the weights themselves: {len(quantized)} block Linears are "
                         f"quantized (e.g. {quantized[0]}); load a bf16 transformer (model.quant 'none')")
    return found


def prepare_full(transformer, tc: TrainConfig, device: torch.device) -> list[torch.nn.Parameter]:
    """train.prepare_transformer's step for full mode, where the LoRA would be added: the chosen Linears' weights and
    biases require grad, everything else is frozen; under torchrun (world > 1) the transformer is then sharded
    (shard_transformer). Returns the trained parameters (the sharded ones under FSDP), in model order."""
    transformer.requires_grad_(False)
    for _, m in trained_linears(transformer, tc.full_modules):
        for p in m.parameters(recurse=False):
            p.requires_grad_(True)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        shard_transformer(transformer, torch.bfloat16 if tc.autocast else transformer.x_embedder.weight.dtype)
    return [p for p in transformer.parameters() if p.requires_grad]


def shard_transformer(transformer, compute_dtype: torch.dtype) -> None:
    """FSDP2: fully_shard each of the 57 blocks, then the root (embedders, final layer). Parameters are all-gathered
    in compute_dtype (bf16 under train.autocast for fp32 weights: fp32 master shards, bf16 compute), gradients
    reduce-scattered in fp32 and kept in the weights' dtype. Each block's gradient checkpoint recomputes inside its
    FSDP unit (the block is gathered again for the recompute)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        fully_shard(block, mp_policy=mp)
    fully_shard(transformer, mp_policy=mp)


def is_sharded(transformer) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(transformer.x_embedder.weight, DTensor)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (FSDP2: a dim-0 slice), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def summary(transformer, params: list, tc: TrainConfig) -> str:
    """The log line: what trains, the optimizer and the sharding."""
    n = sum(p.numel() for p in params)  # DTensor.numel() is the global size
    total = sum(p.numel() for p in transformer.parameters())
    _, world = _rank_world()
    return (f"full fine-tune: {n / 1e6:.3f}M of {total / 1e6:.3f}M parameters train (train.full_modules "
            f"{tc.full_modules}, {params[0].dtype}); optimizer {tc.optimizer}, stepped inside the backward"
            + (f"; FSDP2 over {world} processes" if is_sharded(transformer) else ""))


def check_config(cfg: Config) -> None:
    """What config.validate cannot see and must still be refused before any model loads: a local transformer folder
    that holds a quantized checkpoint (bitsandbytes or float8 weights)."""
    path, sub = _resolve(cfg.model, cfg.model.transformer, "transformer")
    if _is_local(path) and is_quantized_checkpoint(Path(path) / sub):
        raise ValueError(f"train.mode='full': model.transformer ({Path(path) / sub}) is a quantized checkpoint; full "
                         f"fine-tuning trains the weights themselves and needs a bf16 (or fp32) transformer")


# ---------------------------------------------------------------- the optimizer, stepped inside the backward


def _step_seed(seed: int, step: int) -> int:
    h = hashlib.sha256(json.dumps([seed, "full-step", step]).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


class TorchaoAdamW8bit:
    """torchao's 8-bit AdamW for one parameter: its state layout (OptimState8bit moments for tensors of >= 4096
    values that are a multiple of the block size, plain tensors otherwise, as torchao.optim.AdamW8bit makes them;
    DTensors under FSDP) and its single_param_adam math, bf16 weights stochastically rounded. Compiled on CUDA as
    torchao's own step is; eager on the CPU."""

    block_size = 256  # torchao.optim.AdamW8bit's default

    def __init__(self, p: torch.Tensor, tc: TrainConfig):
        from torchao.optim.adam import single_param_adam

        self.p, self.betas, self.eps, self.weight_decay = p, tc.betas, 1e-8, tc.weight_decay
        self.lr = torch.tensor(tc.lr, dtype=torch.float32, device=_local(p).device)
        self.fn = (torch.compile(single_param_adam, fullgraph=True, dynamic=False) if _local(p).is_cuda
                   else single_param_adam)
        self.state: dict = {}

    def _zeros(self, signed: bool) -> torch.Tensor:
        from torch.distributed.tensor import DTensor
        from torchao.optim.subclass_8bit import OptimState8bit

        local = _local(self.p)
        if local.numel() >= 4096 and local.numel() % self.block_size == 0:
            out = OptimState8bit.zeros(local.shape, signed, self.block_size, local.device, dtype=local.dtype)
        else:
            out = torch.zeros_like(local)
        if isinstance(self.p, DTensor):
            out = DTensor.from_local(out, self.p.device_mesh, self.p.placements, run_check=False,
                                     shape=self.p.shape, stride=self.p.stride()).to(local.device)
        return out

    @torch.no_grad()
    def step(self, lr: float) -> None:
        if not self.state:
            self.state = {"step": torch.tensor(0.0), "exp_avg": self._zeros(True), "exp_avg_sq": self._zeros(False)}
        s = self.state
        s["step"] += 1
        self.lr.fill_(lr)
        with torch._dynamo.utils.disable_cache_limit():  # as torchao: one compile per parameter shape, bounded
            self.fn(self.p.detach(), self.p.grad, s["step"], s["exp_avg"], s["exp_avg_sq"], None, self.lr,
                    self.betas[0], self.betas[1], self.weight_decay, self.eps, True, self.p.dtype is torch.bfloat16)


class TorchStep:
    """A torch.optim optimizer over one parameter (torch's AdamW, bitsandbytes' AdamW8bit), same interface."""

    def __init__(self, p: torch.Tensor, tc: TrainConfig):
        if tc.optimizer == "adamw":
            self.opt = torch.optim.AdamW([p], lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay, foreach=False)
        else:
            import bitsandbytes as bnb
            from torch.distributed.tensor import DTensor

            if isinstance(p, DTensor):
                raise ValueError("train.optimizer='adamw8bit' steps plain tensors: not under FSDP (torchrun); use "
                                 "torchao_adamw8bit")
            self.opt = bnb.optim.AdamW8bit([p], lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
        self.p = p

    @property
    def state(self) -> dict:
        return self.opt.state[self.p]

    @state.setter
    def state(self, value: dict) -> None:
        self.opt.state[self.p] = value

    def step(self, lr: float) -> None:
        self.opt.param_groups[0]["lr"] = lr
        self.opt.step()


STEPPERS = {"adamw": TorchStep, "adamw8bit": TorchStep, "torchao_adamw8bit": TorchaoAdamW8bit}


class InBackwardOptimizer:
    """One stepper per trained parameter, run by that parameter's post-accumulate-grad hook (under FSDP2: after its
    gradient is reduce-scattered, on the shard). train.py sets `param_groups[0]["lr"]` before each step as for torch
    optimizers and `stepping` before each micro-batch's backward (True on the last); grad_norm() is the norm of the
    gradients the hooks saw (all ranks), for the log."""

    def __init__(self, params: list, tc: TrainConfig):
        if tc.optimizer not in STEPPERS:
            raise ValueError(f"train.optimizer: expected one of {' | '.join(STEPPERS)} in full mode, got "
                             f"{tc.optimizer!r}")
        self.tc, self.param_groups = tc, [{"lr": tc.lr}]
        self.seed, self.steps, self.stepping = tc.seed, 0, True
        self.steppers = {p: STEPPERS[tc.optimizer](p, tc) for p in params}
        self._sq = torch.zeros((), device=_local(params[0]).device)
        self._armed = False
        for p in params:
            p.register_post_accumulate_grad_hook(self._hook)

    def _hook(self, p: torch.Tensor) -> None:
        if not self.stepping:  # grad_accum: keep accumulating in p.grad
            return
        if not self._armed:  # the step's first update: its stochastic rounding draws from (seed, step)
            torch.manual_seed(_step_seed(self.seed, self.steps))
            self._armed = True
        self._sq += _local(p.grad).detach().float().pow(2).sum()
        self.steppers[p].step(self.param_groups[0]["lr"])
        p.grad = None

    def grad_norm(self) -> float:
        """Ends the step: the gradient norm over every trained parameter (and rank), one host sync."""
        sq = self._sq
        if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            torch.distributed.all_reduce(sq)
        norm = float(sq.sqrt())
        self._sq = torch.zeros_like(sq)
        self.steps, self._armed = self.steps + 1, False
        return norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.steppers:
            p.grad = None


def make_optimizer(params: list, tc: TrainConfig) -> InBackwardOptimizer:
    return InBackwardOptimizer(params, tc)


# ---------------------------------------------------------------- checkpoints


def _flat_state(state: dict, prefix: str) -> tuple[dict, dict]:
    """An optimizer state dict of one parameter as (tensors for safetensors, JSON scalars): DTensors by their local
    shard, tensor subclasses (torchao's OptimState8bit) by their inner tensors plus the class's flatten context."""
    tensors, meta = {}, {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            meta[k] = v
            continue
        v = _local(v)
        if type(v) is torch.Tensor:
            tensors[f"{prefix}.{k}"] = v
            continue
        inner, ctx = v.__tensor_flatten__()
        for name in inner:
            tensors[f"{prefix}.{k}.{name}"] = getattr(v, name)
        meta[k] = {"subclass": f"{type(v).__module__}.{type(v).__qualname__}", "inner": inner,
                   "ctx": [str(c).removeprefix("torch.") if isinstance(c, torch.dtype) else c for c in ctx]}
    return tensors, meta


def _unflat_state(tensors: dict, meta: dict, prefix: str, like: torch.Tensor) -> dict:
    """_flat_state inverted; DTensors rebuilt on `like`'s mesh and placements."""
    import importlib

    from torch.distributed.tensor import DTensor

    def wrap(t):
        if isinstance(like, DTensor) and t.shape == _local(like).shape:
            return DTensor.from_local(t, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                                      stride=like.stride())
        return t

    device = _local(like).device
    state = {k: v for k, v in meta.items() if not isinstance(v, dict)}
    for k, v in meta.items():
        if isinstance(v, dict):
            mod, _, cls = v["subclass"].rpartition(".")
            ctx = [getattr(torch, c) if isinstance(c, str) and isinstance(getattr(torch, c, None), torch.dtype)
                   else c for c in v["ctx"]]
            inner = {n: tensors[f"{prefix}.{k}.{n}"].to(device) for n in v["inner"]}
            state[k] = wrap(getattr(importlib.import_module(mod), cls).__tensor_unflatten__(inner, ctx, None, None))
    for key, t in tensors.items():
        k = key[len(prefix) + 1:]
        if key.startswith(prefix + ".") and "." not in k:
            state[k] = t if k == "step" and t.device.type == "cpu" and t.ndim == 0 else wrap(t.to(device))
    return state


def _shard_files(rank: int, world: int) -> tuple[str, str]:
    return f"weights-{rank}-of-{world}.safetensors", f"optimizer-{rank}-of-{world}.safetensors"


def save_checkpoint(out_dir: Path, transformer, optimizer: InBackwardOptimizer, step: int, cfg: Config, keep: int,
                    run: str, region=None) -> Path:
    """lora.save_checkpoint's contract for full mode, called on every rank: this rank's trained tensors and optimizer
    state go into a temp folder, the folder is named by the hash of all ranks' trained tensors and renamed by rank 0,
    then latest.json is updated (atomically) and this run's old checkpoints are pruned to `keep`."""
    rank, world = _rank_world()
    names = {id(p): n for n, p in transformer.named_parameters()}
    weights, opt, scalars = {}, {}, {}
    for p, stepper in optimizer.steppers.items():
        weights[names[id(p)]] = _local(p.detach())
        t, meta = _flat_state(stepper.state, names[id(p)])
        opt.update(t)
        scalars[names[id(p)]] = meta
    mine, digests = tensor_digest(weights), [None] * world
    if world > 1:
        torch.distributed.all_gather_object(digests, mine)
    else:
        digests = [mine]
    digest = hashlib.sha256("".join(digests).encode()).hexdigest()[:16]
    ckpts = Path(out_dir) / "checkpoints"
    final, tmp = ckpts / f"full-{digest}", ckpts / f".tmp-full-{digest}"
    exists = final.exists()
    if rank == 0 and not exists:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if world > 1:
        torch.distributed.barrier()
    if not exists:
        wf, of = _shard_files(rank, world)
        save_atomic(weights, tmp / wf)
        save_atomic(opt, tmp / of)
        (tmp / f"optimizer-{rank}-of-{world}.json").write_text(json.dumps(scalars, default=float))
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        if not exists:
            files = [f for r in range(world) for f in _shard_files(r, world)]
            (tmp / "state.json").write_text(json.dumps({
                "step": step, "run": run, "mode": "full", "world": world, "files": files,
                "optimizer": cfg.train.optimizer, "full_modules": cfg.train.full_modules,
                "optimizer_steps": optimizer.steps}))
            (tmp / "config.json").write_text(to_json(cfg))
            os.replace(tmp, final)
        _write_json_atomic(ckpts / "latest.json", {"step": step, "path": final.name, "run": run})
        _prune(ckpts, keep, run)
    if world > 1:
        torch.distributed.barrier()
    return final


def load_checkpoint(path: Path, transformer, optimizer: InBackwardOptimizer, region=None) -> tuple[int, str]:
    """Restore this rank's trained tensors and optimizer state from a full checkpoint; (step, run id)."""
    from safetensors.torch import load_file

    path = Path(path)
    state = json.loads((path / "state.json").read_text())
    if state.get("mode") != "full":
        raise ValueError(f"{path}: a LoRA checkpoint; train.mode='full' resumes only full checkpoints (full-*)")
    rank, world = _rank_world()
    if state["world"] != world:
        raise ValueError(f"{path}: saved by {state['world']} process(es), resumed by {world}: full checkpoints hold "
                         f"each rank's FSDP shards, so resume with --nproc_per_node {state['world']}")
    for k in ("optimizer", "full_modules"):
        if state[k] != getattr(optimizer.tc, k):
            raise ValueError(f"{path}: trained with train.{k}={state[k]!r}, this run has {getattr(optimizer.tc, k)!r}: "
                             f"its optimizer state and weights would not fit")
    wf, of = _shard_files(rank, world)
    weights, opt = load_file(str(path / wf)), load_file(str(path / of))
    scalars = json.loads((path / f"optimizer-{rank}-of-{world}.json").read_text())
    names = {id(p): n for n, p in transformer.named_parameters()}
    own = {names[id(p)]: p for p in optimizer.steppers}
    if set(own) != set(weights):
        diff = sorted(set(own) ^ set(weights))
        raise ValueError(f"{path}: its trained tensors differ from this run's ({len(diff)}, e.g. {diff[:3]}): "
                         f"another train.full_modules or model?")
    with torch.no_grad():
        for n, p in own.items():
            _local(p).copy_(weights[n])
            optimizer.steppers[p].state = _unflat_state(opt, scalars[n], n, p)
    optimizer.steps = int(state["optimizer_steps"])
    return int(state["step"]), state.get("run") or new_run_id()


# ---------------------------------------------------------------- the result: a diffusers transformer/ folder


def full_state_dict(transformer) -> dict | None:
    """Every tensor of the transformer, gathered (FSDP: DTensor.full_tensor, one at a time, a collective on every
    rank) to the CPU of rank 0; None on the other ranks."""
    rank, _ = _rank_world()
    out = {}
    for k, v in transformer.state_dict().items():
        full = v.full_tensor() if hasattr(v, "full_tensor") else v
        if rank == 0:
            out[k] = full.detach().cpu()
    return out if rank == 0 else None


def save_transformer(transformer, folder: Path) -> None:
    """The trained transformer as a diffusers folder: FluxTransformer2DModel.save_pretrained (config.json, sharded
    safetensors + index past 5 GB), written beside `folder` under a temp name and swapped in. Sharded: gathered to
    rank 0, loaded into a transformer built on the meta device (no second copy), saved from there."""
    from diffusers import FluxTransformer2DModel

    rank, world = _rank_world()
    sd = full_state_dict(transformer) if is_sharded(transformer) else None
    if rank == 0:
        folder = Path(folder)
        tmp = folder.with_name(f".tmp-{folder.name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model = getattr(transformer, "_orig_mod", transformer)
        if sd is not None:
            with torch.device("meta"):
                model = FluxTransformer2DModel.from_config(transformer.config)
            model.load_state_dict(sd, assign=True)
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size="5GB")
        user_mode_tree(tmp)  # safetensors writes 0600; the user's umask decides who reads the result
        old = folder.with_name(f".old-{folder.name}-{os.getpid()}")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    if world > 1:
        torch.distributed.barrier()


def save_result(transformer, region, out_dir: Path, tc: TrainConfig) -> None:
    """train.save_result for full mode (every rank calls it): <out_dir>/transformer/."""
    save_transformer(transformer, Path(out_dir) / RESULT)
