#!/usr/bin/env python
"""One-off converter: lpips 0.1.4's lin weights (legacy torch pickles) -> packaged safetensors.

Run once; its output (lpips_fast/weights/data/lin_*.safetensors and the "lin" section of
lpips_fast/weights/data/manifest.json) is committed. The package never reads the .pth files.

    python -m pip download --no-deps lpips==0.1.4 -d /tmp/dl
    python tools/convert_lin_weights.py --wheel /tmp/dl/lpips-0.1.4-py3-none-any.whl

Each .pth is read with ``torch.load(weights_only=True)`` straight from the wheel (a zip file;
nothing is extracted). The written files are deterministic (contiguous float32, fixed header),
so re-running the converter reproduces the committed hashes.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import zipfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lpips_fast.nets import TRUNK_CHANNELS  # noqa: E402
from lpips_fast.weights._files import (  # noqa: E402
    DATA_DIR,
    MANIFEST_PATH,
    sha256_bytes,
    tensors_to_bytes,
    write_bytes_atomic,
)

NETS = ("alex", "vgg", "squeeze")
VERSIONS = ("0.0", "0.1")
WHEEL_NAME = "lpips-0.1.4-py3-none-any.whl"


def convert(wheel: Path) -> dict:
    wheel_sha = sha256_bytes(wheel.read_bytes())
    entries = {}
    with zipfile.ZipFile(wheel) as zf:
        for version in VERSIONS:
            for net in NETS:
                member = f"lpips/weights/v{version}/{net}.pth"
                raw = zf.read(member)
                sd = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
                chans = TRUNK_CHANNELS[net]
                expected_keys = [f"lin{k}.model.1.weight" for k in range(len(chans))]
                if sorted(sd) != sorted(expected_keys):
                    raise SystemExit(f"{member}: unexpected keys {sorted(sd)}")
                for k, c in enumerate(chans):
                    t = sd[f"lin{k}.model.1.weight"]
                    if tuple(t.shape) != (1, c, 1, 1) or t.dtype != torch.float32:
                        raise SystemExit(f"{member}: lin{k} has shape {tuple(t.shape)} {t.dtype}")
                data = tensors_to_bytes(sd)
                name = f"lin_{net}_v{version}.safetensors"
                write_bytes_atomic(DATA_DIR / name, data)
                entries[f"{net}/v{version}"] = {
                    "file": name,
                    "sha256": sha256_bytes(data),
                    "source": f"{WHEEL_NAME}:{member}",
                    "source_sha256": sha256_bytes(raw),
                }
                print(f"{name}  {entries[f'{net}/v{version}']['sha256']}")
    return {"wheel": WHEEL_NAME, "wheel_sha256": wheel_sha, "license": "LICENSES/lpips-BSD-2-Clause.txt",
            "files": entries}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", type=Path, required=True, help=f"path to {WHEEL_NAME}")
    args = ap.parse_args(argv)
    lin = convert(args.wheel)
    manifest = {}
    if MANIFEST_PATH.exists():
        manifest = json.loads(MANIFEST_PATH.read_text(encoding="utf-8"))
    manifest["schema"] = 1
    manifest["lin"] = lin
    write_bytes_atomic(MANIFEST_PATH, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    print(f"updated {MANIFEST_PATH.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
