"""2-rank worker: each DP rank sees other tokens; the clip MAX-reduces logits over DP x CP."""
import json
import os

import torch
import torch.distributed as dist

from k2mcore.config.loader import load_config
from k2mcore.model.build import build_model
from k2mcore.optim.muonclip.qk_clip import clip_qk_in_model, mla_attentions
from k2mcore.parallel.groups import init_distributed
from k2mcore.parallel.layout import resolve_layout

cfg = load_config("k2-tiny", ["model.measure_max_attn_logit=true"])
groups = init_distributed(resolve_layout(cfg, int(os.environ.get("WORLD_SIZE", "1"))), seed=1)
chunks = build_model(cfg, groups)
rank = dist.get_rank()
attns = mla_attentions(chunks)
with torch.no_grad():
    for a in attns:
        a.linear_q_up_proj.weight.mul_(25.0)
        a.linear_kv_up_proj.weight.mul_(25.0)
    g = torch.Generator().manual_seed(100 + rank)
    chunks[0](torch.randint(0, 1024, (1, 32), generator=g), torch.arange(32)[None], None)
local = torch.stack([a.core_attention.current_max_attn_logits for a in attns])
gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, local)
global_max = torch.stack(gathered).amax(0)
tau = float(global_max.median())
stats = clip_qk_in_model(chunks, tau, group=groups.dp_cp_group)
w = torch.cat([torch.cat([a.linear_q_up_proj.weight.view(-1), a.linear_kv_up_proj.weight.view(-1)]) for a in attns])
ws = [torch.zeros_like(w) for _ in range(dist.get_world_size())]
dist.all_gather(ws, w)
result = {
    "rank": rank,
    "local_differs": bool((local != global_max).any()),
    "stats": {str(k): v for k, v in stats.layer_max_logits.items()},
    "want": {str(a.layer_number): float(global_max[i].max()) for i, a in enumerate(attns)},
    "clipped": stats.clipped_heads,
    "want_clipped": int((global_max > tau).sum()),
    "weights_equal": bool(torch.equal(ws[0], ws[1])),
}
results = [None] * dist.get_world_size()
dist.all_gather_object(results, result)
if rank == 0:  # one writer: the ranks' stdout lines would interleave
    print("RESULTS " + json.dumps(results), flush=True)
# gloo's threads end with their groups: a process that exits with live groups can abort
# ("terminate called without an active exception") after its results are out
dist.destroy_process_group()
