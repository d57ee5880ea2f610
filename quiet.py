"""A quiet start: the known messages libraries print at import or load that a user of this project cannot act on,
each dropped at the logger that emits it, by its text. Called by the command-line entry points (train.py, sample.py,
convert.py, data.py, caption.py, bench.py) only: importing our functions into a notebook changes nothing.

Where each comes from (diffusers 0.42, transformers 5.25, peft 0.21, torchao 0.18, bitsandbytes 0.50):
- transformers.quantizers and peft import torchao whenever it is installed (requirements.txt has it for
  train.mode full). torchao then logs `Failed to load .../_C_mxfp8...so` / `_C_cutlass_90a` (CUDA-only extensions
  absent on a CPU or another CUDA build) and registers two enums with torch's pytree, which torch 2.13 logs as
  deprecated; diffusers' torchao quantizer logs "Unable to import `torchao` Tensor objects".
- peft imports bitsandbytes whenever it is installed; on CPUs with AVX512-BF16 bitsandbytes' CPU backend then
  asks the Hub for a kernels-community GEMM and logs the failure (no network, or an untrusted repo).
- transformers logs once that `CLIPImageProcessor` / `SiglipImageProcessor` fall back to their PIL versions
  without torchvision, which this project does not need.
Anything else, and these messages from any other logger, still shows."""

import logging

# (logger name, text the message contains)
KNOWN = (
    ("torchao", "Failed to load "),
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported by torch.compile"),
    ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects"),
    ("bitsandbytes.backends.cpu.ops", "from kernels-community"),
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back to"),
)


class _Drop(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def install() -> None:
    """Add a filter for each KNOWN message to the logger that emits it (idempotent)."""
    for name, text in KNOWN:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.text == text for f in logger.filters):
            logger.addFilter(_Drop(text))
