"""Tabulate the final-metrics tables that fit.sh kept: copies /tmp/minilm-cfg/results/*.txt
beside this file, then writes results.json and table.md from every table here. A group config's
table has one column per member: one row per member, named CONFIG/MEMBER.

    python docs/experiments/defaults/config_warmup/tabulate.py
"""

import json
import re
import shutil
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = Path("/tmp/minilm-cfg/results")
LABELS = {
    "FVU": "fvu",
    "L0": "l0",
    "dead fraction": "dead_fraction",
    "final hidden cosine": "final_hidden_cosine",
    "final hidden rel MSE": "final_hidden_rel_mse",
}


def parse(text: str) -> dict[str, dict[str, float]]:
    """{member ('' for a single SAE): {metric: value}} from one final-metrics table."""
    lines = text.splitlines()
    members = [""]
    for line in lines[2:3]:  # a group's member names sit under the rule, before the metrics
        if line.startswith(" " * 20):
            members = line.split()
    values: dict[str, dict[str, float]] = {member: {} for member in members}
    for line in lines:
        if line.startswith("seconds "):  # fit.sh's wall time of the whole run
            for member in members:
                values[member]["seconds"] = float(line.split()[1])
            continue
        label, cells = line[:20].strip(), line[20:].split("(")[0].split()
        if label in LABELS:
            for member, cell in zip(members, cells, strict=False):
                if cell != "-":
                    values[member][LABELS[label]] = float(cell)
    return values


def main() -> None:
    for source in RESULTS.glob("*.txt"):
        shutil.copy(source, HERE / source.name)
    rows = {}
    for path in sorted(HERE.glob("*.txt")):
        match = re.fullmatch(r"(.+)_wu(\d+)_s(\d+)", path.stem)
        assert match, path
        for member, values in parse(path.read_text()).items():
            config = f"{match[1]}/{member}" if member else match[1]
            key = f"{path.stem}/{member}" if member else path.stem
            rows[key] = {"config": config, "warmup": int(match[2]), "seed": int(match[3])} | values
    (HERE / "results.json").write_text(json.dumps(rows, indent=1, sort_keys=True) + "\n")
    lines = [
        "| config | lr_warmup_steps | seed | FVU | L0 | dead fraction | final hidden cosine |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows.values(), key=lambda r: (r["config"], -r["warmup"], r["seed"])):
        cosine = f"{row['final_hidden_cosine']:.4f}" if "final_hidden_cosine" in row else "-"
        lines.append(
            f"| {row['config']} | {row['warmup']} | {row['seed']} | {row['fvu']:.4f} | "
            f"{row['l0']:.2f} | {row['dead_fraction']:.4f} | {cosine} |"
        )
    (HERE / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
