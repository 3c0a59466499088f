"""The SAELens half of tests/test_io.py, run by the python of a separate SAELens virtualenv.

Usage: python saelens_side.py WORK_DIR

WORK_DIR/x.safetensors holds inputs ``x``. For each folder WORK_DIR/ours/<name> (exported by
lightning-sae) it writes <name>/saelens_out.safetensors with SAELens's ``acts`` and ``recon``.
It also writes SAELens-native SAEs with random weights to WORK_DIR/theirs/<name> (via
``save_model``) with their outputs on ``x``, for the reverse direction. Transcoders also get
``forward``, their prediction (``decode`` alone leaves out a skip transcoder's ``W_skip x``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from sae_lens import (
    SAE,
    GatedSAE,
    GatedSAEConfig,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    JumpReLUSkipTranscoder,
    JumpReLUSkipTranscoderConfig,
    SkipTranscoder,
    SkipTranscoderConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
    Transcoder,
    TranscoderConfig,
)
from safetensors.torch import load_file, save_file


def outputs(sae: SAE, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        acts = sae.encode(x)
        out = {"acts": acts.contiguous(), "recon": sae.decode(acts).contiguous()}
        if isinstance(sae, Transcoder):
            out["forward"] = sae(x).contiguous()
        return out


def native_saes(d_in: int) -> dict[str, SAE]:
    d_sae = 2 * d_in
    saes = {
        "standard": StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae)),
        "standard_no_b_dec_in": StandardSAE(
            StandardSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False)
        ),
        "topk": TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=5)),
        "topk_rescaled": TopKSAE(
            TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=5, rescale_acts_by_decoder_norm=True)
        ),
        "jumprelu": JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae)),
        "gated": GatedSAE(GatedSAEConfig(d_in=d_in, d_sae=d_sae)),
    }
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for sae in saes.values():
            for name, param in sae.named_parameters():
                noise = torch.randn(param.shape, generator=generator)
                if name == "threshold":
                    param.copy_(noise.abs() * 0.5)
                elif name == "W_dec":
                    param.copy_(noise * (1 + torch.rand(param.shape[0], 1, generator=generator)))
                else:
                    param.copy_(noise * 0.2 if param.ndim == 1 else noise / d_in**0.5)
    return saes


def native_transcoders(d_in: int) -> dict[str, SAE]:
    """SAELens's own transcoders (output width d_in - 2), random weights as native_saes."""
    shape = {"d_in": d_in, "d_sae": 2 * d_in, "d_out": d_in - 2, "apply_b_dec_to_input": False}
    saes = {
        "transcoder": Transcoder(TranscoderConfig(**shape)),
        "skip_transcoder": SkipTranscoder(SkipTranscoderConfig(**shape)),
        "jumprelu_skip_transcoder": JumpReLUSkipTranscoder(JumpReLUSkipTranscoderConfig(**shape)),
    }
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for sae in saes.values():
            for name, param in sae.named_parameters():
                noise = torch.randn(param.shape, generator=generator)
                scale = 0.5 if name == "threshold" else 0.2 if param.ndim == 1 else d_in**-0.5
                param.copy_(noise.abs() * scale if name == "threshold" else noise * scale)
    return saes


def main(work: Path) -> None:
    x = load_file(str(work / "x.safetensors"))["x"]
    for folder in sorted((work / "ours").iterdir()):
        sae = SAE.load_from_disk(str(folder))
        save_file(outputs(sae, x), str(folder / "saelens_out.safetensors"))
        print(f"loaded {folder.name} as {type(sae).__name__}")
    natives = native_saes(x.shape[-1]) | native_transcoders(x.shape[-1])
    for name, sae in natives.items():
        folder = work / "theirs" / name
        sae.save_model(folder)
        save_file(outputs(sae, x), str(folder / "saelens_out.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
