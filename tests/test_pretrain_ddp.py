"""The contrastive objective under torch.distributed (2 CPU processes, gloo) equals one process on the global batch."""
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from eobackbones.pretrain import info_nce

B, D, T = 6, 16, 0.07


def _global_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2 * B, D, generator=g), torch.randn(2 * B, D, generator=g), torch.randn(D, D, generator=g)


def _loss_and_grad(z1, z2, w, **kw):
    w = w.clone().requires_grad_(True)
    loss = info_nce(z1 @ w, z2 @ w, T, **kw)
    loss.backward()
    return loss.detach(), w.grad


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    dist.init_process_group('gloo', rank=rank, world_size=2)
    try:
        z1, z2, w = _global_batch()
        rows = slice(rank * B, (rank + 1) * B)
        loss, grad = _loss_and_grad(z1[rows], z2[rows], w)
        dist.all_reduce(grad)  # what DDP does: average the gradients of the ranks
        dist.all_reduce(loss)
        out[rank] = (loss / 2, grad / 2)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def test_distributed_info_nce_matches_single_process():
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
    z1, z2, w = _global_batch()
    ref_loss, ref_grad = _loss_and_grad(z1, z2, w)
    for rank in (0, 1):
        loss, grad = out[rank]
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    # and gathering is what makes it so: local-only negatives give another loss
    local_only, _ = _loss_and_grad(z1[:B], z2[:B], w, distributed=False)
    assert abs(local_only - ref_loss) > 1e-3
