"""Fit y = w*x by gradient descent; print the loss, and log it when mlflow is installed."""

import argparse
import os
import random

parser = argparse.ArgumentParser()
parser.add_argument("--alpha", type=float, required=True)
parser.add_argument("--steps", type=int, required=True)
parser.add_argument("--seed", type=int, required=True)
args = parser.parse_args()

rng = random.Random(args.seed)
xs = [rng.uniform(-1, 1) for _ in range(200)]
ys = [3.0 * x + rng.gauss(0, 0.1) for x in xs]

try:
    import mlflow
except ImportError:
    mlflow = None

print(f"run {os.environ.get('MLFLOW_RUN_ID')}: alpha={args.alpha} steps={args.steps}")
w = 0.0
for step in range(args.steps):
    grad = sum(2 * (w * x - y) * x for x, y in zip(xs, ys, strict=True)) / len(xs)
    w -= args.alpha * grad
    loss = sum((w * x - y) ** 2 for x, y in zip(xs, ys, strict=True)) / len(xs)
    print(f"step {step:3d}  w={w:.4f}  loss={loss:.5f}")
    if mlflow is not None:
        mlflow.log_metric("loss", loss, step=step)
if mlflow is not None:
    mlflow.log_metric("w", w)
print(f"final w={w:.4f} loss={loss:.5f}")
