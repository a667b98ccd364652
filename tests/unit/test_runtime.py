"""A one-stage layout runs LocalStep; it must compute what the pipeline schedule computes."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

from pipetransformer.runtime import LocalStep, _loss


@pytest.fixture(scope="module")
def one_process_group(tmp_path_factory):
    store = dist.FileStore(str(tmp_path_factory.mktemp("pg") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, 3))


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_local_step_equals_the_one_stage_gpipe_schedule(one_process_group, micro_batches):
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    ref_net, net = _net(0), _net(0)
    stage = PipelineStage(ref_net, 0, 1, torch.device("cpu"), group=one_process_group)
    sched = ScheduleGPipe(stage, n_microbatches=micro_batches, loss_fn=_loss)
    ref_losses, losses = [], []
    torch.manual_seed(7)  # dropout draws the same masks in both
    sched.step(x, target=y, losses=ref_losses)
    torch.manual_seed(7)
    LocalStep(net, micro_batches, _loss).step(x, target=y, losses=losses)
    assert len(losses) == len(ref_losses) == micro_batches
    assert torch.equal(torch.stack(losses), torch.stack([t.detach() for t in ref_losses]))
    for (name, a), b in zip(ref_net.named_parameters(), net.parameters()):
        assert torch.equal(a.grad, b.grad), name

    ref_net.eval(), net.eval()
    with torch.no_grad():
        ref_out = sched.eval(x, target=y, losses=[])  # the schedule needs a target on its last stage
        assert torch.equal(ref_out, LocalStep(net, micro_batches, _loss).eval(x, target=y, losses=[]))
