"""One-off GPU check (not collected by pytest): step time and peak memory of the published
presets, bf16 autocast, with and without gradient checkpointing.

    python bench/gpu_train_step.py
"""
import sys
import time

import torch

from relaydiff.config import RelayConfig
from relaydiff.diffusion import EDMLoss, RelayLoss
from relaydiff.models import build_model, network_kwargs


def run(name, batch, loss_fn, ckpt, steps=6):
    torch.manual_seed(0)
    model = build_model(network_kwargs(name, label_dim=1000)).cuda().train()
    model.amp = "bfloat16"
    model.model.gradient_checkpointing = ckpt
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    res = model.img_resolution
    x = torch.rand(batch, 3, res, res, device="cuda") * 2 - 1
    labels = torch.nn.functional.one_hot(torch.arange(batch, device="cuda") % 1000, 1000).float()
    torch.cuda.reset_peak_memory_stats()
    for i in range(steps):
        if i == 2:
            torch.cuda.synchronize()
            t = time.perf_counter()
        loss = loss_fn(model, x, labels)
        (loss.sum() / batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / (steps - 2)
    print(f"{name:18s} batch {batch:3d} ckpt={ckpt!s:5s} {dt * 1000:8.1f} ms/step {batch / dt:8.1f} img/s "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:6.1f} GiB", flush=True)
    del model, opt


if __name__ == "__main__":
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    print(torch.__version__, torch.cuda.get_device_name(), file=sys.stderr)
    base, relay = EDMLoss(label_dropout=0.1), RelayLoss(RelayConfig.imagenet256(), label_dropout=0.1)
    for args in [("imagenet64-base", 32, base, False), ("imagenet64-base", 32, base, True),
                 ("imagenet256-relay", 4, relay, False), ("imagenet256-relay", 4, relay, True),
                 ("imagenet256-relay", 16, relay, True)]:
        try:
            run(*args)
        except torch.OutOfMemoryError:
            print(f"{args[0]} batch {args[1]} ckpt={args[3]}: out of memory", flush=True)
        torch.cuda.empty_cache()
