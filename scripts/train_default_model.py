#!/usr/bin/env python
"""Train graphopt's bundled default model (FashionCNN) on real Fashion-MNIST, deterministically.

Writes ``graphopt/models/fashion_cnn.pt`` (the fp32 state_dict, for
``torch.load(..., weights_only=True)``) and ``graphopt/models/fashion_cnn.json`` (test accuracy,
epochs, seed, parameter count, torch version, training seconds, hyper-parameters).

Usage (from the repository root; needs ``sudo apt-get install dataset-fashion-mnist``)::

    python scripts/train_default_model.py            # about 4 minutes on a quiet CPU core

Determinism: fixed seeds, ``torch.use_deterministic_algorithms(True)``, a fixed data order
(one seeded permutation per epoch) and seeded augmentation. With the same torch version, CPU
and thread count the weights come out identical; a different thread count or CPU can change
the last bits of floating-point reductions, hence the weights (not the recipe).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from graphopt.data import load_fashion_mnist  # noqa: E402
from graphopt.models.fashion_cnn import FashionCNN, evaluate_accuracy  # noqa: E402


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random horizontal flip and random translation by up to ``pad`` pixels, per image."""
    n, _, h, w = images.shape
    flip = torch.rand(n, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(3), images)
    # Pad with the normalized value of a black pixel, then crop at a random offset per image.
    background = float(images.min())
    padded = F.pad(images, (pad, pad, pad, pad), value=background)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # n x h x 1
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # n x 1 x w
    batch = torch.arange(n)[:, None, None]
    return padded[batch, 0, rows, cols].unsqueeze(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1, help="peak learning rate (one-cycle)")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (default 1: the weights then do not depend on the core count, and "
             "one thread wastes no CPU spinning on a shared machine)",
    )
    parser.add_argument("--no-augment", action="store_true")
    parser.add_argument("--out-dir", type=Path, default=REPO / "graphopt" / "models")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)

    images, labels = load_fashion_mnist("train")
    images = images.contiguous(memory_format=torch.channels_last)  # faster convs on CPU
    model = FashionCNN().to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())

    # No weight decay on BatchNorm parameters and biases.
    decay = [p for p in model.parameters() if p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    optimizer = torch.optim.SGD(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, momentum=0.9, nesterov=True,
    )
    steps_per_epoch = math.ceil(len(images) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch,
        pct_start=0.25,
    )
    data_generator = torch.Generator().manual_seed(args.seed)

    start = time.perf_counter()
    cpu_start = time.process_time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(images), generator=data_generator)
        loss_sum = 0.0
        correct = 0
        for batch in order.split(args.batch_size):
            x, y = images[batch], labels[batch]
            if not args.no_augment:
                x = augment(x, data_generator)
            x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
        print(
            f"epoch {epoch + 1}/{args.epochs}: train loss {loss_sum / len(images):.4f}, "
            f"train acc {correct / len(images):.4f}, {time.perf_counter() - start:.0f} s",
            flush=True,
        )
    training_seconds = time.perf_counter() - start
    training_cpu_seconds = time.process_time() - cpu_start

    model = model.to(memory_format=torch.contiguous_format).eval()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    test_accuracy = evaluate_accuracy(model, "test")
    print(f"test accuracy: {test_accuracy:.4f} (10000 images)")
    print(f"training time: {training_seconds:.1f} s wall, {training_cpu_seconds:.1f} s CPU, "
          f"{args.threads} thread(s)")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    weights = args.out_dir / "fashion_cnn.pt"
    torch.save(state, weights)
    info = {
        "model": "FashionCNN",
        "test_accuracy": round(test_accuracy, 4),
        "test_images": 10000,
        "epochs": args.epochs,
        "seed": args.seed,
        "parameters": n_params,
        "torch_version": torch.__version__,
        "training_seconds": round(training_seconds, 1),
        "training_cpu_seconds": round(training_cpu_seconds, 1),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "optimizer": "SGD(momentum=0.9, nesterov=True)",
        "lr_schedule": f"OneCycleLR(max_lr={args.lr}, pct_start=0.25)",
        "weight_decay": args.weight_decay,
        "augmentation": "none" if args.no_augment else "hflip + random shift <= 2 px",
        "command": " ".join(["python scripts/train_default_model.py",
                             *(sys.argv[1:] if argv is None else argv)]),
    }
    (args.out_dir / "fashion_cnn.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {weights} ({weights.stat().st_size} bytes) and {args.out_dir / 'fashion_cnn.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
