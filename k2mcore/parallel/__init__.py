"""The parallel layout and what is built from it.

- `layout`: the `Layout` and `resolve_layout` (validated once per run, then carried);
- `pipeline`: the pipeline split (layers per rank and virtual stage);
- `param_counts`: analytic parameter counts per model and per rank;
- `groups`: megatron's process groups from a Layout (`init_distributed` -> `ProcessGroups`);
- `ddp`: megatron DDP around the model chunks and the layout of its buffers;
- `reshard`: in-memory resharding of full tensors, for the parity tests.

This `__init__` imports nothing: `layout`, `pipeline` and `param_counts` are torch-free.
"""
