"""Seconds per nearest-neighbour self-search of a decoder, per backend and size.

The task is what FeatureGeometryMonitor does every N steps: for each of n unit vectors in d
dimensions, the most similar other vector. Prints one row per (size, backend) and, per size, the
ratio to the torch backend.

    python benchmarks/nearest_neighbour.py                       # 2^14 and 2^16 at d=512 on CPU
    python benchmarks/nearest_neighbour.py --device cuda --sizes 16384 65536 1048576
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_sae.metrics.similarity import faiss_available, max_cosine_similarity


def time_search(directions: torch.Tensor, backend: str, repeats: int) -> tuple[float, torch.Tensor]:
    best, indices = float("inf"), torch.empty(0)
    for _ in range(repeats):
        if directions.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        _, indices = max_cosine_similarity(
            directions, directions, exclude_self=True, backend=backend
        )
        if directions.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, indices.cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2**14, 2**16])
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", nargs="+", default=["torch", "faiss"])
    parser.add_argument("--repeats", type=int, default=1, help="best of this many runs")
    args = parser.parse_args()
    backends = [b for b in args.backends if b != "faiss" or faiss_available()]
    print(f"device={args.device} d={args.d} torch threads={torch.get_num_threads()}")
    print(f"{'n':>9} {'backend':>8} {'seconds':>9} {'vs torch':>9} {'same neighbours':>16}")
    for n in args.sizes:
        generator = torch.Generator().manual_seed(n)
        directions = torch.randn(n, args.d, generator=generator).to(args.device)
        if directions.is_cuda:  # warm-up: CUDA context and cuBLAS handles
            max_cosine_similarity(directions[:1024], directions[:1024], exclude_self=True)
        results = {b: time_search(directions, b, args.repeats) for b in backends}
        reference_time, reference_idx = results.get("torch", next(iter(results.values())))
        for backend, (seconds, indices) in results.items():
            same = (indices == reference_idx).float().mean().item()
            print(
                f"{n:>9} {backend:>8} {seconds:>9.3f} {seconds / reference_time:>9.2f} "
                f"{same:>16.4f}"
            )


if __name__ == "__main__":
    main()
