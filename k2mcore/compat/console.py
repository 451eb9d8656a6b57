"""megatron-core's and torch's known console noise, filtered by what it says and why it is noise.

`make run` on megatron-core 0.19.2 printed dozens of lines per launch, most of them once per rank
and some once per step; none of them asks the user to do anything. Each filter below names the
message and why it is not a problem here. Anything else still prints.
"""
from __future__ import annotations

import logging
import warnings

# (logger, message start, why it is noise)
_LOG_NOISE = (
    ("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED",
     "k2mcore stays on GPTModel on purpose (docs/architecture.md, 'GPTModel, not HybridModel')"),
    ("torch.utils.cpp_extension", "No CUDA runtime is found",
     "PyPI's CUDA build of torch says so at import on a machine without a GPU"),
)
# (category, message regex, module regex, why); applied with warnings.filterwarnings
_WARNING_NOISE = (
    (UserWarning, r".*(Transformer Engine|Apex) (is|are) not installed", r"megatron\.",
     "without TE/Apex megatron uses its local layers and torch's optimizers, as k2mcore "
     "plans for (its TE spec is chosen only when TE imports)"),
    (FutureWarning, r".*", r"torch\.distributed",
     "torch's deprecation notices for APIs that megatron's dist-checkpointing still calls"),
    (DeprecationWarning, r".*", r"megatron\.", "megatron's notices about its own internals"),
    (UserWarning, r".*cuda_graph_scope", r"megatron\.", "k2mcore uses no CUDA graphs"),
    (UserWarning, r"MimoModelConfig is experimental", r"megatron\.",
     "printed when megatron imports its multimodal package; k2mcore does not use it"),
    (UserWarning, r"`sequence_parallel` is set to `True`, but tensor model parallel size is 1",
     r"megatron\.", "experts at parallel.etp=1 run without SP while the dense layers use it"),
    (UserWarning, r"The \.grad attribute of a Tensor that is not a leaf Tensor", r"",
     "megatron's distributed optimizer looks at `.grad` of its shard views in zero_grad"),
    (UserWarning, r"The next bucket's parameter all-gather operation has already been dispatched",
     r"megatron\.",
     "overlap_param_gather: megatron's MoE layer registers its shared experts after the routed "
     "ones but runs them first, so where a bucket boundary falls between the two (the routed "
     "experts share the dense buffer at EP 1) one gather is dispatched late: a note on overlap, "
     "not a fault"),
)
# only without CUDA: advice about GPU streams
_CPU_WARNING_NOISE = (
    (UserWarning, r"When using sequence parallelism it is recommended to set the environment "
     r"variable CUDA_DEVICE_MAX_CONNECTIONS", r"megatron\.", "advice for GPU streams"),
)


class _Drop(logging.Filter):
    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(self.prefix)


_installed = False


def install() -> None:
    """Install the filters (idempotent); call before megatron is imported where possible."""
    global _installed
    if _installed:
        return
    for name, prefix, _why in _LOG_NOISE:
        logging.getLogger(name).addFilter(_Drop(prefix))
    from k2mcore import platform

    cpu = () if platform.has_cuda() else _CPU_WARNING_NOISE
    for category, message, module, _why in (*_WARNING_NOISE, *cpu):
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    _installed = True
