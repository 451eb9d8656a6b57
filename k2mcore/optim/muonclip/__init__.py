"""MuonClip (K2): Muon on the hidden matrices, AdamW on the rest, QK-Clip after each step.

- `newton_schulz`, `muon`: the orthogonalization and the Muon update on one process;
- `qk_clip`: QK-Clip's per-head row scales, on full tensors or ZeRO shards;
- `hparams`: the `optimizer.muon` section resolved for the optimizer;
- `sharded`: `ShardedMuonClip`, the inner optimizer of megatron's DistributedOptimizer, which
  runs each matrix's Newton-Schulz once, on one rank; `install`: putting it into megatron;
- `shard_plan`, `owner_layout`, `ns_offload`: the owner-aligned ZeRO-1 shards that put each Muon
  matrix whole on the rank that orthogonalizes it, and the few Newton-Schulz jobs moved off the
  busiest rank of a stage.

`shard_plan` and `ns_offload` import neither torch nor megatron (the planner uses them); this
package's `__init__` imports nothing for the same reason.
"""
