"""Does `compile=true` pay on this machine? Training steps of a network as conf/model/NAME.yaml builds it,
eager against `torch.compile` (what ClassifierModule does with compile=true: `net.compile()`), in one process:

    python -m benchmarks.compile_speed [--steps 20]

For each case: the first step's time (for the compiled network: tracing and code generation) and the
median steady-state images/second after it, plus how many steps a run needs before compiling has paid for
itself (never, if the compiled steps are not faster). SGD with Nesterov momentum, channels-last, random data
(a step's cost does not depend on the pixels).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parent.parent / "conf"
CASES = [  # model, input shape, batch size, bf16 autocast: the fast recipes' settings and the default model's
    ("airbench", (3, 32, 32), 1024, True),
    ("bn_convnet", (1, 28, 28), 256, True),
    ("cnn3", (1, 28, 28), 128, False),
]


def measure(name: str, shape: tuple[int, int, int], batch: int, bf16: bool, compiled: bool, steps: int):
    """(first step seconds, steady images/second)."""
    torch.manual_seed(0)
    net = instantiate(OmegaConf.load(CONF / "model" / f"{name}.yaml"), input_shape=shape, num_classes=10)
    net = net.to(memory_format=torch.channels_last)
    if compiled:
        net.compile()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    x = torch.randn(batch, *shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
            loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times[0], batch / statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps after the first")
    args = parser.parse_args()
    # A first compile, as a user's run pays it: Inductor's on-disk cache would otherwise serve an earlier run's code.
    with tempfile.TemporaryDirectory(prefix="compile_speed-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        measure_all(args.steps)


def measure_all(steps: int) -> None:
    print(f"{'case':40}{'eager first':>12}{'eager img/s':>12}{'compiled first':>15}{'compiled img/s':>15}  pays after")
    for name, shape, batch, bf16 in CASES:
        eager_first, eager = measure(name, shape, batch, bf16, False, steps)
        compiled_first, compiled = measure(name, shape, batch, bf16, True, steps)
        saved = batch / eager - batch / compiled  # seconds saved per step
        pays = f"{(compiled_first - eager_first) / saved:,.0f} steps" if saved > 0 else "never"
        case = f"{name} {'x'.join(map(str, shape))} batch {batch}{' bf16' if bf16 else ''}"
        print(f"{case:40}{eager_first:11.1f}s{eager:12.0f}{compiled_first:14.1f}s{compiled:15.0f}  {pays}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
