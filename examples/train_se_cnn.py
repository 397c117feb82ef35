"""Train a small squeeze-excitation CNN with a learnable mixed or GeM pooling head, twice: with
torch's pooling, and with gapkernels (convert_model for the SE blocks' nn.AdaptiveAvgPool2d(1),
GlobalPool for the head). Same initial weights, same synthetic data: the losses should agree,
and the head's learnable alpha / p should move away from their initial value.

    python examples/train_se_cnn.py --head gem --steps 30 --device auto
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
from torch import nn

import gapkernels
from gapkernels.nn import P_MIN, GlobalPool


class TorchMixedPool(nn.Module):
    """alpha * max + (1 - alpha) * avg in plain torch, alpha = sigmoid(alpha_raw) (GlobalPool's
    parametrization and parameter name, so the state_dicts are interchangeable)."""

    def __init__(self, alpha: float = 0.5):
        super().__init__()
        self.alpha_raw = nn.Parameter(torch.logit(torch.tensor(alpha)))

    def forward(self, x):
        alpha = torch.sigmoid(self.alpha_raw)
        return alpha * x.amax((2, 3)) + (1 - alpha) * x.mean((2, 3))


class TorchGeMPool(nn.Module):
    """mean(clamp(x, eps) ** p) ** (1 / p) in plain torch, p = softplus(p_raw) + P_MIN."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.p_raw = nn.Parameter(torch.tensor(p - P_MIN).expm1().log())

    def forward(self, x):
        p = F.softplus(self.p_raw) + P_MIN
        return x.clamp(min=self.eps).pow(p).mean((2, 3)).pow(1.0 / p)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, channels // reduction, 1)
        self.expand = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x):
        scale = self.expand(F.relu(self.reduce(self.pool(x))))
        return x * torch.sigmoid(scale)


def block(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        SqueezeExcite(c_out),
    )


class SECNN(nn.Module):
    def __init__(self, head: str, num_classes: int = 10, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            block(3, width), block(width, 2 * width), block(2 * width, 4 * width)
        )
        self.pool = TorchMixedPool() if head == "mixed" else TorchGeMPool()
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)))


def to_gapkernels(model: SECNN, head: str, device: torch.device) -> SECNN:
    """A copy of `model` on gapkernels: convert_model for the SE pools, GlobalPool for the head,
    which takes the torch head's parameter as is."""
    model, replaced = gapkernels.convert_model(copy.deepcopy(model))
    torch_head = model.pool
    model.pool = GlobalPool(head).to(device)
    model.pool.load_state_dict(torch_head.state_dict())
    print(f"gapkernels: convert_model replaced {replaced} pools; head is {model.pool}")
    return model


def head_value(model: SECNN, head: str) -> float:
    pool = model.pool
    with torch.no_grad():
        if isinstance(pool, GlobalPool):
            return (pool.alpha if head == "mixed" else pool.p).item()
        if head == "mixed":
            return torch.sigmoid(pool.alpha_raw).item()
        return (F.softplus(pool.p_raw) + P_MIN).item()


def train(name: str, model: SECNN, head: str, data, steps: int, device: torch.device):
    images, labels = data
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
    start_value = head_value(model, head)
    times, losses = [], []
    for step in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"  [{name}] step {step:3d}  loss {losses[-1]:.4f}")
    timed = times[2:] if len(times) > 4 else times  # the first steps warm up the allocator
    ms = 1e3 * sum(timed) / len(timed)
    symbol = "alpha" if head == "mixed" else "p"
    end_value = head_value(model, head)
    print(f"  [{name}] {ms:.2f} ms/step; {symbol}: {start_value:.4f} -> {end_value:.4f}")
    return losses, ms, start_value, end_value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", choices=("mixed", "gem"), default="gem")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    args = parser.parse_args()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    print(
        f"device {device}, head {args.head}, {args.steps} steps, "
        f"gapkernels backends: {gapkernels.available_backends()}"
    )

    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, 10, (args.batch_size,), device=device)
    torch_model = SECNN(args.head).to(device)
    gk_model = to_gapkernels(torch_model, args.head, device)

    print("torch pooling:")
    torch_losses, torch_ms, _, _ = train(
        "torch", torch_model, args.head, (images, labels), args.steps, device
    )
    print("gapkernels pooling:")
    gk_losses, gk_ms, start, end = train(
        "gapkernels", gk_model, args.head, (images, labels), args.steps, device
    )

    drift = max(abs(a - b) for a, b in zip(torch_losses, gk_losses, strict=True))
    print(
        f"step time: torch {torch_ms:.2f} ms, gapkernels {gk_ms:.2f} ms "
        f"({torch_ms / gk_ms:.2f}x); largest loss difference {drift:.2e}"
    )
    symbol = "alpha" if args.head == "mixed" else "p"
    moved = "moved" if end != start else "did NOT move"
    print(f"learnable {symbol} {moved}: {start:.4f} -> {end:.4f}")


if __name__ == "__main__":
    main()
