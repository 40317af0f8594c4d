"""Build benchmarks/data/cifar10-mini.zip: the first N train and M test CIFAR-10 JPEGs per class (by sorted file
name) from ../shared/data/cifar10-jpeg.zip, bytes copied unchanged (no re-encoding), in the same image-folder
layout. Deterministic: the same source gives a byte-identical zip.

    python benchmarks/data/make_cifar10_mini.py [--source PATH] [--train 300] [--test 100]
"""
from __future__ import annotations

import argparse
import zipfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_SOURCE = HERE.parents[1].parent / "shared" / "data" / "cifar10-jpeg.zip"
FIXED_TIME = (1980, 1, 1, 0, 0, 0)      # constant timestamps keep the archive reproducible


def build(source: Path, dest: Path, per_class: dict[str, int]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    with zipfile.ZipFile(source) as src:
        groups: dict[tuple[str, str], list[str]] = defaultdict(list)
        for name in src.namelist():
            parts = name.split("/")
            if len(parts) == 3 and parts[0] in per_class and parts[2].lower().endswith((".jpg", ".jpeg")):
                groups[(parts[0], parts[1])].append(name)
        tmp = dest.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as out:   # JPEGs do not compress
            for (split, cls) in sorted(groups):
                for name in sorted(groups[(split, cls)])[: per_class[split]]:
                    info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
                    info.external_attr = 0o644 << 16
                    out.writestr(info, src.read(name))
                    counts[split] += 1
        tmp.replace(dest)
    return dict(counts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE)
    p.add_argument("--dest", type=Path, default=HERE / "cifar10-mini.zip")
    p.add_argument("--train", type=int, default=300, help="train images per class")
    p.add_argument("--test", type=int, default=100, help="test images per class")
    args = p.parse_args()
    if not args.source.is_file():
        raise SystemExit(f"error: {args.source} not found; pass --source PATH/cifar10-jpeg.zip")
    counts = build(args.source, args.dest, {"train": args.train, "test": args.test})
    print(f"wrote {args.dest} ({args.dest.stat().st_size / 1e6:.2f} MB): {counts}")


if __name__ == "__main__":
    main()
