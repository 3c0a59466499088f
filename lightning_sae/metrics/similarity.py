"""Nearest-neighbour cosine similarity between sets of directions, MMCS, and SAE comparison.

Every nearest-neighbour search goes through :func:`nearest_neighbours`, which has two exact
backends: a blocked torch matmul (CPU or GPU) and faiss (``IndexFlatIP``, queries in batches of
8192 as the faiss docs advise). faiss is an optional extra (``pip install lightning-sae[faiss]``)
and is imported only when used.

:func:`compare_saes` matches the features of two SAEs: max cosine similarity in both directions
(they differ when several features of one SAE sit near a single feature of the other) and a
one-to-one matching, by ``scipy.optimize.linear_sum_assignment`` up to ``hungarian_limit``
directions and by greedy matching beyond (see :func:`match_directions`).
``lightning-sae compare CKPT_A CKPT_B`` is :func:`compare_main`.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from lightning_sae import hub
from lightning_sae.commands import (
    EXPORT_WEIGHTS_FILENAMES,
    HUNGARIAN_LIMIT,
    NEAREST_NEIGHBOUR_BACKENDS,
    compare_parser,
)
from lightning_sae.files import load_safetensors_file, load_torch_file

Backend = Literal["auto", "torch", "faiss"]
BACKENDS = NEAREST_NEIGHBOUR_BACKENDS
QUERY_BATCH = 8192
# Upper bound on one block of the similarity matrix (queries x keys), in elements: 2^27 float32
# is 512 MiB, so a query batch of 8192 meets keys in chunks of 16384 whatever the dictionary size.
MAX_BLOCK_ELEMENTS = 2**27
# HUNGARIAN_LIMIT: above this many directions per side, linear_sum_assignment's dense cost
# matrix (n^2 float64, 2 GiB at 16384) and cubic time stop being practical; match_directions
# switches to greedy mutual-nearest-neighbour rounds until the unmatched rest fits under it.


# ---------------------------------------------------------------------------- backends
def import_faiss() -> ModuleType:
    """faiss, or an error that says how to install it."""
    try:
        import faiss
    except ImportError as error:
        raise ImportError(
            "backend='faiss' needs the optional faiss package: pip install 'lightning-sae[faiss]' "
            "(CPU) or 'lightning-sae[faiss-gpu]', or choose backend='torch'."
        ) from error
    return faiss


def faiss_available() -> bool:
    return importlib.util.find_spec("faiss") is not None


def resolve_backend(backend: str) -> str:
    """The backend ``auto`` stands for, by measurement (benchmarks/nearest_neighbour.py).

    Self-search of n unit vectors at d=512, k=1, seconds (benchmarks/nearest_neighbour.py,
    docs/benchmarks.md):

    ==========================  =======  ========  =======  ========
    machine                     2^14     (faiss)   2^16     (faiss)
    ==========================  =======  ========  =======  ========
    2 CPU cores (shared, busy)  4.63     4.95      98.1     162.7
    16 CPU cores                0.26     1.02      4.28     15.9
    H200 GPU (torch fp32)       0.010    1.16      0.148    19.7
    ==========================  =======  ========  =======  ========

    (faiss is faiss-cpu 1.15; on the GPU row it copies the vectors to the host.) torch was never
    slower, so ``auto`` is torch everywhere; faiss stays selectable for faiss-gpu builds.
    On the H200, 2^18 took 2.35 s and 2^20 took 37.7 s with torch.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
    if backend == "auto":
        return "torch"
    return backend


def _unit_rows(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# ---------------------------------------------------------------------------- search
@torch.no_grad()
def nearest_neighbours(
    queries: Tensor,
    keys: Tensor,
    k: int = 1,
    exclude_self: bool = False,
    backend: Backend = "auto",
    block_size: int = QUERY_BATCH,
) -> tuple[Tensor, Tensor]:
    """The ``k`` keys with the highest cosine similarity to each query, best first.

    Args:
        queries: [n_queries, d] directions (any norm).
        keys: [n_keys, d] directions.
        k: neighbours per query.
        exclude_self: queries and keys are the same set; skip each query's own row.
        backend: ``torch`` (blocked matmul), ``faiss`` (IndexFlatIP) or ``auto``.
        block_size: queries per batch.

    Returns:
        (similarities, indices), each [n_queries, k], on the queries' device.
    """
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"queries and keys must be [n, d] with the same d, got {tuple(queries.shape)} "
            f"and {tuple(keys.shape)}."
        )
    if exclude_self and queries.shape[0] != keys.shape[0]:
        raise ValueError("exclude_self needs queries and keys to be the same set of rows.")
    n_keys = keys.shape[0] - int(exclude_self)
    if not 1 <= k <= n_keys:
        raise ValueError(f"k must be between 1 and the number of keys ({n_keys}), got {k}.")
    q, kk = _unit_rows(queries.float()), _unit_rows(keys.float().to(queries.device))
    if resolve_backend(backend) == "faiss":
        return _search_faiss(q, kk, k, exclude_self, block_size)
    return _search_torch(q, kk, k, exclude_self, block_size)


def _search_torch(
    q: Tensor, keys: Tensor, k: int, exclude_self: bool, block_size: int
) -> tuple[Tensor, Tensor]:
    key_block = max(1024, MAX_BLOCK_ELEMENTS // block_size)
    values, indices = [], []
    for q_start in range(0, q.shape[0], block_size):
        q_block = q[q_start : q_start + block_size]
        rows = torch.arange(q_block.shape[0], device=q.device)
        best_v = torch.full((q_block.shape[0], k), float("-inf"), device=q.device)
        best_i = torch.zeros((q_block.shape[0], k), dtype=torch.long, device=q.device)
        for k_start in range(0, keys.shape[0], key_block):
            sims = q_block @ keys[k_start : k_start + key_block].T
            if exclude_self:
                own = rows + q_start - k_start  # column of each query's own row in this chunk
                inside = (own >= 0) & (own < sims.shape[1])
                sims[rows[inside], own[inside]] = float("-inf")
            top = sims.topk(min(k, sims.shape[1]), dim=1)
            merged_v = torch.cat([best_v, top.values], dim=1)
            merged_i = torch.cat([best_i, top.indices + k_start], dim=1)
            order = merged_v.topk(k, dim=1).indices
            best_v, best_i = merged_v.gather(1, order), merged_i.gather(1, order)
        values.append(best_v)
        indices.append(best_i)
    return torch.cat(values), torch.cat(indices)


def _search_faiss(
    q: Tensor, keys: Tensor, k: int, exclude_self: bool, block_size: int
) -> tuple[Tensor, Tensor]:
    faiss = import_faiss()
    index = faiss.IndexFlatIP(keys.shape[1])
    if q.is_cuda and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        resources = faiss.StandardGpuResources()
        index = faiss.index_cpu_to_gpu(resources, q.device.index or 0, index)
    index.add(np.ascontiguousarray(keys.cpu().numpy()))
    q_np = np.ascontiguousarray(q.cpu().numpy())
    extra = int(exclude_self)
    values, indices = [], []
    for start in range(0, q_np.shape[0], block_size):
        sims, ids = index.search(q_np[start : start + block_size], k + extra)
        if exclude_self:
            # Drop each query's own row; where ties pushed it out of the top k+1, drop the last.
            drop = ids == np.arange(start, start + ids.shape[0])[:, None]
            drop[~drop.any(1), -1] = True
            sims, ids = sims[~drop].reshape(-1, k), ids[~drop].reshape(-1, k)
        values.append(torch.from_numpy(sims))
        indices.append(torch.from_numpy(ids.astype(np.int64)))
    return torch.cat(values).to(q.device), torch.cat(indices).to(q.device)


def max_cosine_similarity(
    queries: Tensor,
    keys: Tensor,
    exclude_self: bool = False,
    block_size: int = QUERY_BATCH,
    backend: Backend = "auto",
) -> tuple[Tensor, Tensor]:
    """For each query row, the max cosine similarity with any key row, and that key's index."""
    values, indices = nearest_neighbours(queries, keys, 1, exclude_self, backend, block_size)
    return values[:, 0], indices[:, 0]


def mean_max_cosine_similarity(
    reference: Tensor, learned: Tensor, backend: Backend = "auto"
) -> Tensor:
    """MMCS: mean over reference rows of the max cosine similarity with any learned row."""
    return max_cosine_similarity(reference, learned, backend=backend)[0].mean()


def self_max_cosine_similarity(directions: Tensor, backend: Backend = "auto") -> Tensor:
    """Each row's max cosine similarity with any *other* row (non-unique nearest neighbour)."""
    return max_cosine_similarity(directions, directions, exclude_self=True, backend=backend)[0]


def random_directions_mmcs(
    n: int, d: int, seed: int = 0, backend: Backend = "auto", device: str | torch.device = "cpu"
) -> float:
    """MMCS among ``n`` random unit vectors in ``d`` dimensions: the no-structure baseline."""
    # Offset: toy data draws its ground-truth features from small seeds with the same call.
    generator = torch.Generator().manual_seed(seed + 0xBA5E_11E)
    directions = torch.randn(n, d, generator=generator).to(device)
    return float(self_max_cosine_similarity(directions, backend).mean())


# ---------------------------------------------------------------------------- matching
@dataclass
class Matching:
    """A one-to-one matching: pair p joins row ``index_a[p]`` of A with ``index_b[p]`` of B."""

    index_a: Tensor
    index_b: Tensor
    similarity: Tensor
    method: str


def _hungarian(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    similarity = (a @ b.T).double().cpu().numpy()
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    return torch.from_numpy(rows).to(a.device), torch.from_numpy(cols).to(a.device)


@torch.no_grad()
def match_directions(
    a: Tensor, b: Tensor, hungarian_limit: int = HUNGARIAN_LIMIT, backend: Backend = "auto"
) -> Matching:
    """One-to-one matching of the rows of ``a`` and ``b`` maximising total cosine similarity.

    Up to ``hungarian_limit`` rows per side this is exact (``linear_sum_assignment``). Beyond
    it, rounds of greedy matching run first: each round pairs every row of A with its nearest
    unmatched row of B when that row's nearest unmatched row of A is the same one (mutual nearest
    neighbours, found with :func:`nearest_neighbours`). Mutual nearest pairs are exactly the pairs
    that greedy matching (repeatedly take the most similar remaining pair) takes, so these rounds
    compute the greedy matching: at least half the optimal total for non-negative similarities,
    and exact whenever the optimum pairs mutual nearest neighbours (a permuted copy, say). As soon
    as the unmatched rest fits under ``hungarian_limit``, it is matched exactly.
    """
    a_unit, b_unit = _unit_rows(a.float()), _unit_rows(b.float().to(a.device))
    rest_a = torch.arange(a.shape[0], device=a.device)
    rest_b = torch.arange(b.shape[0], device=a.device)
    pairs_a, pairs_b = [], []
    greedy_rounds = 0
    while len(rest_a) and len(rest_b):
        if max(len(rest_a), len(rest_b)) <= hungarian_limit:
            rows, cols = _hungarian(a_unit[rest_a], b_unit[rest_b])
            pairs_a.append(rest_a[rows])
            pairs_b.append(rest_b[cols])
            break
        greedy_rounds += 1
        sim_ab, best_b = max_cosine_similarity(a_unit[rest_a], b_unit[rest_b], backend=backend)
        _, best_a = max_cosine_similarity(b_unit[rest_b], a_unit[rest_a], backend=backend)
        mutual = best_a[best_b] == torch.arange(len(rest_a), device=a.device)
        if not mutual.any():  # only possible through exact ties; the best pair is still greedy's
            mutual = torch.zeros_like(mutual)
            mutual[sim_ab.argmax()] = True
        taken_a, taken_b = mutual.nonzero().squeeze(1), best_b[mutual]
        pairs_a.append(rest_a[taken_a])
        pairs_b.append(rest_b[taken_b])
        keep_a = torch.ones(len(rest_a), dtype=torch.bool, device=a.device)
        keep_b = torch.ones(len(rest_b), dtype=torch.bool, device=a.device)
        keep_a[taken_a], keep_b[taken_b] = False, False
        rest_a, rest_b = rest_a[keep_a], rest_b[keep_b]
    index_a, index_b = torch.cat(pairs_a), torch.cat(pairs_b)
    similarity = (a_unit[index_a] * b_unit[index_b]).sum(1)
    method = "hungarian" if greedy_rounds == 0 else f"greedy ({greedy_rounds} rounds) + hungarian"
    return Matching(index_a, index_b, similarity, method)


# ---------------------------------------------------------------------------- comparison
def summarize(similarities: Tensor) -> dict[str, float]:
    s = similarities.float()
    return {
        "mean": float(s.mean()),
        "median": float(s.median()),
        "frac_above_0.9": float((s > 0.9).float().mean()),
        "frac_above_0.8": float((s > 0.8).float().mean()),
    }


@dataclass
class DirectionComparison:
    """How the directions (decoder rows or encoder columns) of two SAEs correspond."""

    max_a_to_b: Tensor  # [n_a]: each A direction's max cosine with any B direction
    max_b_to_a: Tensor  # [n_b]
    matching: Matching

    def summary(self) -> dict[str, dict[str, float]]:
        return {
            "max a->b": summarize(self.max_a_to_b),
            "max b->a": summarize(self.max_b_to_a),
            "one-to-one": summarize(self.matching.similarity),
        }


@dataclass
class SAEComparison:
    decoder: DirectionComparison
    encoder: DirectionComparison | None

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        parts = {"decoder": self.decoder, "encoder": self.encoder}
        return {name: part.summary() for name, part in parts.items() if part is not None}

    def table(self) -> str:
        lines = [f"{'':<9}{'measure':<12}{'mean':>8}{'median':>8}{'>0.9':>8}{'>0.8':>8}"]
        for name, measures in self.summary().items():
            for measure, stats in measures.items():
                lines.append(
                    f"{name:<9}{measure:<12}{stats['mean']:>8.4f}{stats['median']:>8.4f}"
                    f"{stats['frac_above_0.9']:>8.4f}{stats['frac_above_0.8']:>8.4f}"
                )
        lines.append(f"one-to-one matching: {self.decoder.matching.method}")
        return "\n".join(lines)


def _weights(sae: Any, name: str) -> Tensor | None:
    if isinstance(sae, Mapping):
        return sae.get(name)
    return getattr(sae, name, None)


def _compare(a: Tensor, b: Tensor, hungarian_limit: int, backend: Backend) -> DirectionComparison:
    return DirectionComparison(
        max_a_to_b=max_cosine_similarity(a, b, backend=backend)[0],
        max_b_to_a=max_cosine_similarity(b, a, backend=backend)[0],
        matching=match_directions(a, b, hungarian_limit, backend),
    )


@torch.no_grad()
def compare_saes(
    a: Any, b: Any, hungarian_limit: int = HUNGARIAN_LIMIT, backend: Backend = "auto"
) -> SAEComparison:
    """Compare the features of two SAEs by their decoder rows and encoder columns.

    ``a`` and ``b`` are anything with ``W_dec`` [d_sae, d_in] (and optionally ``W_enc``
    [d_in, d_sae]) as attributes or mapping keys: an SAE module, a state dict, a loaded
    safetensors file. The two SAEs may differ in d_sae but not in d_in. Encoder directions are
    compared when both have ``W_enc``.
    """
    dec_a, dec_b = _weights(a, "W_dec"), _weights(b, "W_dec")
    if dec_a is None or dec_b is None:
        raise ValueError("compare_saes needs W_dec in both SAEs (as attribute or mapping key).")
    if dec_a.shape[1] != dec_b.shape[1]:
        raise ValueError(
            f"the SAEs read activations of different widths (d_in {dec_a.shape[1]} vs "
            f"{dec_b.shape[1]}): only SAEs trained on the same activations can be compared."
        )
    decoder = _compare(dec_a.detach(), dec_b.detach(), hungarian_limit, backend)
    enc_a, enc_b = _weights(a, "W_enc"), _weights(b, "W_enc")
    encoder = None
    if enc_a is not None and enc_b is not None:
        encoder = _compare(enc_a.detach().T, enc_b.detach().T, hungarian_limit, backend)
    return SAEComparison(decoder, encoder)


# ---------------------------------------------------------------------------- CLI
def _find_key(state: Mapping[str, Tensor], name: str) -> Tensor | None:
    if name in state:
        return state[name]
    found = [key for key in state if key.endswith("." + name)]
    return state[found[0]] if len(found) == 1 else None


def load_sae_weights(path: str | Path) -> dict[str, Tensor]:
    """W_dec and W_enc from a Lightning .ckpt, an export folder (ours, SAELens's or
    sparsify's), a ``hf://org/repo[/subfolder]`` path, or a .safetensors file.

    Checkpoints are read with ``torch.load(weights_only=True)``: only tensors and plain
    containers are unpickled, and no model class is needed.
    """
    path = hub.local_folder(path)
    if path.is_dir():
        found = [path / name for name in EXPORT_WEIGHTS_FILENAMES if (path / name).exists()]
        if not found:
            raise FileNotFoundError(
                f"{path} is a folder without {' or '.join(EXPORT_WEIGHTS_FILENAMES)}: pass an "
                "export folder (lightning-sae export), a SAELens folder or a Lightning .ckpt file."
            )
        path = found[0]
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a .ckpt file or an export folder.")
    if path.suffix == ".safetensors":
        state: Mapping[str, Tensor] = load_safetensors_file(path)
    else:
        checkpoint = load_torch_file(path)
        if not isinstance(checkpoint, Mapping):
            raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint.")
        state = checkpoint.get("state_dict", checkpoint)
    weights = {name: _find_key(state, name) for name in ("W_dec", "W_enc")}
    if weights["W_enc"] is None and "encoder.weight" in state:  # sparsify's nn.Linear encoder
        weights["W_enc"] = state["encoder.weight"].T
    if weights["W_dec"] is None:
        raise ValueError(
            f"{path} holds no W_dec: expected a lightning-sae checkpoint or export "
            f"(keys seen: {sorted(state)[:8]}...)."
        )
    return {name: w.float() for name, w in weights.items() if w is not None}


def compare_main(argv: Sequence[str] | None = None) -> None:
    """``lightning-sae compare CKPT_A CKPT_B``: print how the features of two SAEs match."""
    parser = compare_parser()
    args = parser.parse_args(argv)
    a, b = load_sae_weights(args.sae_a), load_sae_weights(args.sae_b)
    result = compare_saes(a, b, args.hungarian_limit, args.backend)
    print(f"A: {args.sae_a}  (d_sae={a['W_dec'].shape[0]}, d_in={a['W_dec'].shape[1]})")
    print(f"B: {args.sae_b}  (d_sae={b['W_dec'].shape[0]}, d_in={b['W_dec'].shape[1]})")
    print(result.table())
    if args.json is not None:
        args.json.write_text(json.dumps(result.summary(), indent=2))
