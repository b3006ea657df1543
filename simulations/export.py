"""Export a run's model for use outside this code base, and check it against the PyTorch model.

    python -m simulations.export runs/<folder>                      # runs/<folder>/model.pt2
    python -m simulations.export runs/<folder> --format torchscript --out model.ts

The exported program takes uint8 clips B x T x 3 x size x size (T and size from the checkpoint,
printed here and stored in the file's ``metadata.json``) and returns logits B x 7 in
`hdf.classes.EMOTIONS` order. After writing, the file is loaded back and its logits compared with
the PyTorch model's; the last line printed is one JSON object {"path", "format", "max_abs_diff"}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hdf.checkpoint import load_model, resolve_checkpoint
from hdf.export import FORMATS, SUFFIX, export_model, load_exported, max_logit_difference
from simulations import cli

TOLERANCE = 1e-5  # largest |logit difference| accepted between the export and the eager model


@cli.command
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.export",
        description="Export a run's model (torch.export .pt2 or TorchScript .ts).",
    )
    parser.add_argument("checkpoint", help="run folder (runs/<folder>) or checkpoint file")
    parser.add_argument("--format", default="export", choices=FORMATS)
    parser.add_argument("--out", type=Path, default=None, help="file (default: next to the ckpt)")
    args = parser.parse_args(argv)
    console = cli.console()
    ckpt_file = resolve_checkpoint(args.checkpoint)
    model, cfg = load_model(ckpt_file)
    out = args.out or ckpt_file.parent / f"model{SUFFIX[args.format]}"
    meta = {"checkpoint": str(ckpt_file), "run_name": cfg.get("name")}
    with console.status(f"exporting ({args.format})"):
        path = export_model(model, out, args.format, meta)
        exported, stored = load_exported(path)
        diff = max_logit_difference(model, exported)
    console.print(
        f"wrote {path}: input uint8 B x {stored['num_frames']} x 3 x {stored['size']} x "
        f"{stored['size']}, output logits over {', '.join(stored['classes'])}"
    )
    ok = diff <= TOLERANCE
    if not ok:
        cli.print_error(f"exported logits differ from PyTorch's by {diff:.2e} (> {TOLERANCE})")
    print(json.dumps({"path": str(path), "format": args.format, "max_abs_diff": diff}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
