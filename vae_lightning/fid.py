"""FID between two splits of CIFAR-10: ``python -m vae_lightning.fid --data-dir ../shared/data``.

The field's reference check of an FID implementation: the 50,000 training images against the
10,000 test images (about 3.1 with TF-Inception). FID depends strongly on the number of images,
so both counts are printed with it.
"""

import json
import logging
import time
from pathlib import Path

import torch

from vae_lightning.cli import argument_parser, one_line_errors
from vae_lightning.data.cifar10 import ensure_cifar10
from vae_lightning.evaluation.feature_networks import NETWORKS, build_extractor, network_batch_size
from vae_lightning.evaluation.fid import DEFAULT_CACHE, frechet_distance, real_statistics
from vae_lightning.files import write_text_atomically

OPTIONS = {"feature_extractor": "--feature-extractor", "inception_weights": "--inception-weights"}
"""How this command names the files of the feature network."""


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser("vae_lightning.fid", __doc__)
    parser.add_argument(
        "--data-dir",
        default="data",
        help="the folder of cifar-10-batches-py/ (downloaded if missing)",
    )
    parser.add_argument("--num-train", type=int, default=50_000, help="training images used")
    parser.add_argument("--num-test", type=int, default=10_000, help="test images used")
    parser.add_argument(
        "--network", default="tf_inception", choices=NETWORKS, help="the feature network"
    )
    parser.add_argument("--feature-extractor", help="a TorchScript file instead of --network")
    parser.add_argument("--inception-weights", help="a local weights file for --network")
    parser.add_argument(
        "--batch-size", type=int, help="images per network call (default: 200 on a GPU, 8 on a CPU)"
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=DEFAULT_CACHE, help="statistics, kept between calls"
    )
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu"
    )
    parser.add_argument("--output", type=Path, help="also write the result here, as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("num_train", "num_test", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 2:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: it must be at least 2")
    with one_line_errors():
        ensure_cifar10(args.data_dir, download=True)
        device = torch.device(args.device)
        extractor = build_extractor(
            args.network, args.feature_extractor, args.inception_weights, OPTIONS
        )
        extractor = extractor.to(device)
        batch_size = args.batch_size or network_batch_size(device)
        started = time.perf_counter()
        stats = {
            split: real_statistics(
                extractor, args.data_dir, split, n, args.cache_dir, device, batch_size
            )
            for split, n in (("train", args.num_train), ("test", args.num_test))
        }
        fid = frechet_distance(stats["train"], stats["test"])
        result = {
            "fid": fid,
            "num_train": stats["train"].count,
            "num_test": stats["test"].count,
            "network": extractor.name,
            "device": str(device),
            "seconds": round(time.perf_counter() - started, 1),
        }
    counts = f"train {result['num_train']}, test {result['num_test']}"
    print(f"FID({counts}) = {fid:.4f}  ({extractor.name}, {result['seconds']} s)")
    if args.output:
        write_text_atomically(args.output, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
