"""Adam and AdamW whose fused step skips torch's unused copy of a transposed gradient.

An SAE's encoder ``W_enc`` [d_in, d_sae] lies in memory latent by latent (strides (1, d_in),
the transpose of the decoder it starts from), the layout its sparse gradient is computed in (one
row per latent, ``models/sparse.py``); autograd gives the gradient the parameter's strides and
Adam makes its moments like the parameter, so all four share that layout. torch's fused CPU
Adam (2.13) calls ``grad.contiguous()`` for every parameter and then steps over the storage of
the parameter, the gradient and the moments as they lie, never reading that copy: for
``W_enc`` a transposing copy of d_in x d_sae floats every step for nothing (at 768 x 24,576, 233
ms against the 60 ms of the update itself, on a shared CPU; docs/benchmarks.md).

Here such a parameter goes to the fused kernel as its transpose, which is contiguous, with its
gradient and moments transposed alike: the same elementwise update of the same memory, bit for
bit, without the copy. Anything else (other layouts, the unfused paths) is left as torch has it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor

# The private hook this relies on, as torch 2.13 calls it. A torch whose Adam or AdamW collects a
# group's tensors otherwise gets its own step unchanged (the copy stays; nothing breaks).
_COLLECTS = ("self", "group", "params_with_grad", "grads", "exp_avgs", "exp_avg_sqs")
_KNOWN_HOOK = all(
    tuple(inspect.signature(cls._init_group).parameters)[: len(_COLLECTS)] == _COLLECTS
    for cls in (torch.optim.Adam, torch.optim.AdamW)
)


def _transposed_alike(tensors: list[Tensor]) -> bool:
    """Whether every tensor is 2-D and non-contiguous with the strides of the first, whose
    transpose is contiguous: the layout the fused kernel copies for nothing."""
    first = tensors[0]
    return (
        first.ndim == 2
        and not first.is_contiguous()
        and first.T.is_contiguous()
        and all(t.shape == first.shape and t.stride() == first.stride() for t in tensors)
    )


class _FusedWithoutTransposedCopies:
    """Mixin for torch's Adam and AdamW (both collect a group's tensors in ``_init_group``)."""

    def _init_group(  # type: ignore[no-untyped-def]
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        max_exp_avg_sqs: list[Tensor],
        *args: Any,
    ):
        start = len(params)
        result = super()._init_group(  # type: ignore[misc]
            group, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, *args
        )
        if not (_KNOWN_HOOK and group.get("fused")):
            return result
        lists = [params, grads, exp_avgs, exp_avg_sqs]
        if group["amsgrad"]:
            lists.append(max_exp_avg_sqs)
        for index in range(start, len(params)):
            tensors = [tensor_list[index] for tensor_list in lists]
            if tensors[0].device.type == "cpu" and _transposed_alike(tensors):
                for tensor_list, tensor in zip(lists, tensors, strict=True):
                    tensor_list[index] = tensor.T
        return result


class Adam(_FusedWithoutTransposedCopies, torch.optim.Adam):
    """``torch.optim.Adam``; fused on CPU, without the unused copy (module docstring)."""


class AdamW(_FusedWithoutTransposedCopies, torch.optim.AdamW):
    """``torch.optim.AdamW``; fused on CPU, without the unused copy (module docstring)."""
