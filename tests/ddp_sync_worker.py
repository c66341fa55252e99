"""Run under torchrun by test_pretrain: DDP must keep the energy model identical on every
rank although each rank restores different images (double backward inside DDP's forward)."""

import torch
import torch.distributed as dist
from torch import nn

from conftest import tiny_vit
from energyssl.methods.base import freeze_unreached_parameters
from energyssl.methods.energy import EnergyMethod

dist.init_process_group("gloo")
rank = dist.get_rank()
for grad_mode in ("exact", "fast"):
    model = tiny_vit()
    model.grad_mode = grad_mode
    objective = EnergyMethod.around(model, "grid_mask")
    freeze_unreached_parameters(objective, [torch.randn(2, 1, 14, 14)])
    ddp = nn.parallel.DistributedDataParallel(objective)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(100 + rank)  # different data per rank
    for _ in range(3):
        loss = ddp([torch.randn(4, 1, 14, 14)], torch.Generator().manual_seed(rank)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), f"ranks diverged ({grad_mode})"
    untrained = torch.cat([p.detach().flatten() for p in tiny_vit().parameters()])
    assert not torch.equal(flat, untrained), f"nothing trained ({grad_mode})"
    print(f"rank {rank} in sync ({grad_mode})")
dist.destroy_process_group()
