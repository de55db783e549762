"""Run by tests/team/test_ddp.py under ``torchrun --standalone --nproc_per_node 2`` (gloo, CPU):

1. a batch-norm-free CNN through ``ddp.fit_ddp`` (rank 0 saves its weights and history): the
   DDP mechanics (sharding, gradient averaging, loss scaling, steps) must reproduce one process;
2. whether torch's SyncBatchNorm runs on CPU tensors under gloo (recorded, not assumed);
3. the user command's code path, ``pipeline.distributed.main``, on small_cnn.

usage: ddp_worker.py OUT_DIR TRAIN_NPZ NOBN_EPOCHS CNN_EPOCHS
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from pipeline import distributed
from pipeline.core import ddp
from pipeline.core.train import TrainSpec


def bn_free_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 10))


def nobn_spec(epochs: int) -> TrainSpec:
    return TrainSpec(epochs=epochs, batch_size=64, optimizer="adam", lr=0.003, schedule="onecycle", device="cpu")


def main() -> int:
    torch.set_num_threads(1)
    out, npz, nobn_epochs, cnn_epochs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    with np.load(npz) as z:
        x, y = z["images"], z["labels"]
    ddp.init_process_group(torch.device("cpu"))
    model = _Float(bn_free_cnn())
    history = ddp.fit_ddp(model, x, y, nobn_spec(nobn_epochs))
    try:
        bn = nn.SyncBatchNorm(4).train()
        bn(torch.randn(6, 4, 2, 2))
        sync_err = None
    except Exception as exc:  # noqa: BLE001 - recorded for the test
        sync_err = f"{type(exc).__name__}: {exc}"
    if dist.get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        torch.save(model.net.state_dict(), out / "nobn.pt")
        (out / "nobn.json").write_text(json.dumps({"history": history, "sync_bn_cpu_error": sync_err,
                                                   "world": dist.get_world_size(), "backend": dist.get_backend()}))
    rc = distributed.main(["--data", str(npz), "--out", str(out / "cnn"), "--epochs", str(cnn_epochs), "--device", "cpu", "--quiet"])
    dist.destroy_process_group()
    return rc


class _Float(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.float() / 255.0)


if __name__ == "__main__":
    sys.exit(main())
