"""The TopK family's sparse encoder backward against dense autograd, variant by variant.

``models/sparse.py`` gathers the kept pre-activations from a dense pass made without a graph and
sends the encoder's gradient through those entries alone. The reference here is dense autograd
through the same selection: the pre-activations recomputed with a graph and gathered (what the
family did before). Values must be equal bit for bit; gradients within float tolerance (the
sparse sums run in another order). The sharded twin of this check runs in tests/sharded_run.py.
"""

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_sae.models.matryoshka import MatryoshkaSAE
from lightning_sae.models.sparse import (
    ROW_TOP_K_GROUP,
    SparseCode,
    _interleaved_group_size,
    largest_of_batch,
    row_top_k,
    sparse_encoder_values,
)
from lightning_sae.models.topk import BatchTopKSAE, TopKSAE
from lightning_sae.models.transcoder import (
    BatchTopKCrossCoder,
    BatchTopKSkipTranscoder,
    BatchTopKTranscoder,
    TopKCrossCoder,
    TopKSkipTranscoder,
    TopKTranscoder,
)

sys.path.insert(0, str(Path(__file__).parent))
from sharded_run import dense_encoder_values, sparse_and_dense  # noqa: E402

D_IN, D_SAE, ROWS = 12, 48, 40
COMMON = {"d_in": D_IN, "d_sae": D_SAE, "k": 4, "aux_k": 6, "aux_coefficient": 0.5}
VARIANTS = {
    "topk": lambda: TopKSAE(**COMMON, decode_impl="sparse"),
    "topk-dense-decode": lambda: TopKSAE(**COMMON, decode_impl="dense"),
    "batchtopk": lambda: BatchTopKSAE(**COMMON),
    "matryoshka": lambda: MatryoshkaSAE(**COMMON, group_sizes=[8, 16, 24]),
    "topk-transcoder": lambda: TopKTranscoder(**COMMON, d_out=8),
    "topk-skip-transcoder": lambda: TopKSkipTranscoder(**COMMON, d_out=8),
    "batchtopk-transcoder": lambda: BatchTopKTranscoder(**COMMON, d_out=8),
    "batchtopk-skip-transcoder": lambda: BatchTopKSkipTranscoder(**COMMON, d_out=8),
    "topk-crosscoder": lambda: TopKCrossCoder(**COMMON, hooks=["a", "b"]),
    "batchtopk-crosscoder": lambda: BatchTopKCrossCoder(**COMMON, hooks=["a", "b"]),
}


def prepared(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """A variant with non-trivial biases, a third of its latents dead, and a batch."""
    torch.manual_seed(0)
    sae = VARIANTS[name]()
    with torch.no_grad():
        for param in sae.parameters():
            param.add_(0.1 * torch.randn_like(param))
    sae.tokens_since_fired[::3] = sae.dead_window()
    x = torch.randn(ROWS, D_IN)
    y = torch.randn(ROWS, sae.d_out) if sae.d_out != D_IN else x
    return sae, x, y


@pytest.mark.parametrize("name", list(VARIANTS))
def test_sparse_backward_equals_dense_autograd(name: str) -> None:
    sae, x, y = prepared(name)
    sparse_run, dense_run = sparse_and_dense(sae, x, y)
    assert sparse_run["terms"].keys() == dense_run["terms"].keys() >= {"auxk"}
    for key in ("x_hat", "acts", "pre_acts"):
        assert torch.equal(sparse_run[key], dense_run[key]), key
    # AuxK and the main pass decode the same entries; only AuxK's candidate order may differ.
    for term, value in dense_run["terms"].items():
        torch.testing.assert_close(sparse_run["terms"][term], value, rtol=1e-6, atol=0)
    assert set(sparse_run["grads"]) >= {"W_enc", "b_enc", "W_dec", "b_dec"}
    for param, grad in dense_run["grads"].items():
        torch.testing.assert_close(sparse_run["grads"][param], grad, rtol=1e-5, atol=1e-6)
        assert grad.abs().max() > 0, param


def test_sparse_backward_under_bf16_autocast_matches_dense_within_bf16() -> None:
    sae, x, _ = prepared("topk")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sparse_run, dense_run = sparse_and_dense(sae, x, x)
    assert torch.equal(sparse_run["x_hat"], dense_run["x_hat"])
    for param, grad in dense_run["grads"].items():
        assert sparse_run["grads"][param].dtype == torch.float32
        # The dense reference rounds its weight-gradient product to bf16; the sparse sums don't.
        torch.testing.assert_close(sparse_run["grads"][param], grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("source", [False, True], ids=["bias", "bias and input offset"])
@pytest.mark.parametrize("flat", [False, True], ids=["per-row", "flat"])
def test_encoder_values_give_the_input_its_gradient_too(flat: bool, source: bool) -> None:
    """A caller whose input needs a gradient (an SAE on a trained layer) gets it sparsely; so
    does the input offset's source (``b_dec``, folded into the bias as ``-b_dec @ W_enc``),
    whose share of W_enc's gradient is added in place."""
    torch.manual_seed(1)
    x = torch.randn(7, 5, requires_grad=True)
    W_enc = torch.randn(5, 11, requires_grad=True)
    bias = torch.randn(11, requires_grad=True)
    b_dec = torch.randn(5, requires_grad=True) if source else None
    with torch.no_grad():
        folded = bias if b_dec is None else bias + -(b_dec @ W_enc)
        pre_acts = torch.nn.functional.linear(x, W_enc.T, folded)
    values, indices = pre_acts.topk(3, dim=-1)
    code = SparseCode(indices, values, 7)
    if flat:
        code = SparseCode.from_mask(torch.zeros_like(pre_acts, dtype=torch.bool).scatter(
            1, indices, True), pre_acts)  # fmt: skip
    weights = torch.randn(code.values.shape)
    inputs = (x, W_enc, bias) if b_dec is None else (x, W_enc, bias, b_dec)
    ours = (sparse_encoder_values(code, pre_acts, x, W_enc, bias, b_dec) * weights).sum()
    ours_grads = torch.autograd.grad(ours, inputs)
    theirs = (dense_encoder_values(code, pre_acts, x, W_enc, bias, b_dec) * weights).sum()
    theirs_grads = torch.autograd.grad(theirs, inputs)
    assert torch.equal(ours.detach(), theirs.detach())
    for mine, reference in zip(ours_grads, theirs_grads, strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)


class Shapes(TorchDispatchMode):
    """Records the shape of every tensor an aten op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(value, torch.Tensor):
                self.shapes.append(tuple(value.shape))
        return result


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "topk-dense-decode"])
def test_backward_makes_no_dense_batch_by_latents_tensor(name: str) -> None:
    """The backward of a step (main pass and AuxK) creates no [rows, d_sae] tensor: the encoder's
    gradient flows through the kept entries alone. (The dense path makes [rows, d_sae]
    gradients of the pre-activations, and of the activations in the top-k backward.)"""
    sae, x, y = prepared(name)
    sae.hparams.decode_impl = "sparse"  # a dense decode has its [rows, d_sae] gradient by design
    out = sae.forward_normalized(x)
    loss = sum(sae.loss_terms(y, out).values())
    assert not out.pre_acts.requires_grad
    with Shapes() as seen:
        loss.backward()
    assert seen.shapes and (ROWS, D_SAE) not in seen.shapes
    assert sae.W_enc.grad is not None and sae.W_enc.grad.abs().max() > 0


def _group_columns(layout: str, d: int, k: int) -> list[list[int]]:
    """The columns of each group :func:`row_top_k` makes of rows of ``d`` at ``k``, in order."""
    if layout == "runs":
        return [list(range(j, j + ROW_TOP_K_GROUP)) for j in range(0, d, ROW_TOP_K_GROUP)]
    group = _interleaved_group_size(d, k)
    assert group is not None  # the grouped path runs at this shape
    return [list(range(j, d, d // group)) for j in range(d // group)]


@pytest.mark.parametrize(
    ("layout", "d", "k"),
    [("runs", 1024, 8), ("interleaved", 1536, 16), ("interleaved", 1536, 64)],
)
@pytest.mark.parametrize("case", ["spread", "few groups hold all", "ties", "narrow"])
def test_row_top_k_keeps_what_torch_topk_keeps(layout: str, d: int, k: int, case: str) -> None:
    """The grouped selection (on CPU: group maxima first; runs of consecutive columns on wide
    rows, interleaved groups on narrower ones) keeps each row's k largest values, including when
    the fewest groups that can hold them hold all of them, and with ties, where any of the tied
    entries may be kept but the values are the k largest all the same."""
    torch.manual_seed(0)
    scores = torch.randn(24, d)
    if case == "few groups hold all":
        groups = _group_columns(layout, d, k)
        columns = [c for group in groups[5:] for c in group][:k]  # whole groups, from the 6th
        scores[3, columns] += 10.0  # row 3's k largest in as few groups as hold k entries
    if case == "ties":
        scores = (scores * 2).round()
    if case == "narrow":
        scores = scores[:, : 3 * k]  # too few groups to gain: torch's top-k itself
    values, columns = row_top_k(scores, k)
    expected_values, expected_columns = scores.topk(k, dim=1)
    assert torch.equal(values, scores.gather(1, columns))
    assert torch.equal(values.sort(1).values, expected_values.sort(1).values)
    if case != "ties":
        assert torch.equal(columns.sort(1).values, expected_columns.sort(1).values)


def test_row_top_k_groups_where_the_two_top_ks_see_at_most_half_the_row() -> None:
    """The interleaved groups' size: the divisor of d that the two top-k's see fewest entries
    at, and none (torch's top-k) where they would see more than half of the row."""
    assert _interleaved_group_size(1536, 16) == 8  # 192 maxima + 16 * 8 entries
    assert _interleaved_group_size(1536, 32) == 6  # 256 + 192
    assert _interleaved_group_size(1536, 64) == 4  # 384 + 256
    assert _interleaved_group_size(1536, 128) is None  # 512 + 384 > 768
    assert _interleaved_group_size(1531, 8) is None  # a prime: no groups
    values, columns = row_top_k(torch.randn(0, 1536), 32)  # no rows
    assert values.shape == columns.shape == (0, 32)


@pytest.mark.parametrize(
    "case",
    [
        "spread",
        "one row holds most",
        "groups span rows",
        "all of a row",
        "nothing",
        "ties at the cut",
        "wide rows",
        "odd size",
    ],
)
def test_largest_of_batch_equals_one_flat_top_k(case: str) -> None:
    """The selection through group maxima (the floor, then the cut among the entries of the
    groups that reach it) keeps exactly the entries one top-k over the flattened batch keeps:
    when one row holds half of them, when groups span two rows, with ties at the floor and at
    the cut, and on the flat top-k's own path (everything kept, a size no group divides)."""
    torch.manual_seed(0)
    scores = torch.randn(64, 96)
    count = 64 * 3  # groups of 16 flat entries
    if case == "one row holds most":
        scores[5] += 10.0  # row 5 holds 96 of the 192 largest: six whole groups
    if case == "groups span rows":
        scores = torch.randn(64, 100)  # 100 columns, groups of 16
    if case == "all of a row":
        scores, count = scores[:2], 2 * 96
    if case == "nothing":
        count = 0
    if case == "ties at the cut":
        scores = scores.round()  # many equal values; floor and cut fall inside runs of ties
    if case == "wide rows":  # groups of 32
        scores = torch.randn(16, 1024)
        scores[2] += 3.0
        count = 16 * 3
    if case == "odd size":  # 63 x 97 entries: no group size divides them
        scores = torch.randn(63, 97)
    values, flat = largest_of_batch(scores, count)
    expected_values, expected_flat = scores.flatten().topk(count, sorted=False)
    assert torch.equal(flat, flat.sort().values)  # positions ascending, grouped by row
    assert torch.equal(values, scores.flatten()[flat])
    if case == "ties at the cut":  # of the tied entries, the first in flat order are kept
        cutoff = expected_values.min()
        above = (scores.flatten() > cutoff).nonzero().squeeze(1)
        ties = (scores.flatten() == cutoff).nonzero().squeeze(1)[: count - above.numel()]
        assert torch.equal(flat, torch.cat([above, ties]).sort().values)
    else:
        assert torch.equal(flat, expected_flat.sort().values)


@pytest.mark.parametrize("name", ["topk", "matryoshka", "batchtopk-skip-transcoder"])
def test_training_steps_reuse_the_last_steps_pre_activations(name: str) -> None:
    """On CPU a training step writes its pre-activations into the last step's tensor (no fresh
    [rows, d_sae] allocation), and Matryoshka its groups' decodes into the last step's [groups,
    rows, d] table: the steps equal, bit for bit, those of a twin that allocates every time,
    and an output taken outside a step is never overwritten."""
    sae, x, y = prepared(name)
    if name == "matryoshka":
        sae.hparams.decode_impl = "sparse"  # the table is decoded group by group
    batch = x if y is x else (x, y)
    twin = copy.deepcopy(sae)
    outside = sae.forward_normalized(x)
    outside_pre_acts = outside.pre_acts.clone()
    outside_extras = {key: value.clone() for key, value in outside.extras.items()}
    storage, tables = [], []
    for _ in range(3):
        for model in (sae, twin):
            loss, _, _ = model.step_and_statistics(batch)
            loss.backward()
            with torch.no_grad():
                for param in model.parameters():
                    param -= 0.1 * param.grad
                    param.grad = None
        twin.train(False)  # drops what it kept: the twin's next step allocates afresh
        twin.train(True)
        storage.append(sae._recycled.data_ptr())
        if name == "matryoshka":
            tables.append(sae._spare_groups.data_ptr())
        for (param_name, ours), theirs in zip(
            sae.named_parameters(), twin.parameters(), strict=True
        ):
            assert torch.equal(ours, theirs), param_name
    assert storage[0] == storage[1] == storage[2]
    assert len(set(tables)) == (1 if name == "matryoshka" else 0)
    assert torch.equal(outside.pre_acts, outside_pre_acts)
    for key, value in outside_extras.items():
        assert torch.equal(outside.extras[key], value), key


class Calls(TorchDispatchMode):
    """Counts the calls of each aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.overloadpacket.__name__
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["topk", "batchtopk", "matryoshka", "topk-skip-transcoder"])
def test_a_step_sorts_each_code_by_latent_once(name: str) -> None:
    """The encoder's and the decoder's weight gradients sum over the same entries per latent:
    one sort of the kept entries serves both, so a step with AuxK sorts twice (main pass and
    AuxK), not four times."""
    sae, x, y = prepared(name)
    sae.hparams.decode_impl = "sparse"
    with Calls() as calls:
        out = sae.forward_normalized(x)
        sum(sae.loss_terms(y, out).values()).backward()
    assert calls.counts.get("sort", 0) == 2, calls.counts.get("sort")
