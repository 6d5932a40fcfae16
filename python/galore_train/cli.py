"""``galore-train``: the command line.

    galore-train --config FILE [--optimizer galore|galore_layerwise|adamw|adamw8bit]
                 [--resume [auto|PATH]] [--prepare-data] [--set key=value ...]
    galore-train download MODEL_ID --to DIR

User errors (configuration, preflight, data, model loading, checkpoints) print one message that says
what to change and exit with status 2; no traceback. ``--prepare-data`` writes the embedded default
dataset and tokenizer (idempotent) and exits.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .config import OPTIMIZER_TYPES, ConfigError, load_config

USER_ERROR = 2
STOPPED_BY_SIGTERM = 128 + 15  # a shell's status for SIGTERM: the run is not finished


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if argv[:1] == ["download"]:
            return download_main(argv[1:])
        return train_main(argv)
    except KeyboardInterrupt:
        print("galore-train: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # user errors get a message, bugs keep their traceback
        from .checkpoint import TrainingStopped

        if isinstance(err, TrainingStopped):
            print(f"galore-train: {err}", file=sys.stderr)
            return STOPPED_BY_SIGTERM
        if isinstance(err, user_errors()):
            print(f"galore-train: error: {err}", file=sys.stderr)
            return USER_ERROR
        raise


def user_errors() -> tuple[type, ...]:
    from .checkpoint import CheckpointError
    from .data import DataError
    from .modeling import ModelLoadError
    from .preflight import PreflightError
    from .routing import RoutingError

    return ConfigError, PreflightError, DataError, ModelLoadError, CheckpointError, RoutingError, DownloadError


def train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="galore-train",
        description="Memory-lean fine-tuning of Hugging Face causal LMs with GaLore. "
                    "Also: `galore-train download MODEL_ID --to DIR`.",
    )
    parser.add_argument("--config", type=Path, help="YAML config (see python/configs/); defaults when omitted")
    parser.add_argument("--optimizer", choices=OPTIMIZER_TYPES, help="overrides optimizer.type")
    parser.add_argument("--resume", nargs="?", const="auto", metavar="auto|PATH",
                        help="continue from the newest complete checkpoint in output_dir (auto) or from PATH")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output_dir that holds an earlier run's checkpoints (deletes them)")
    parser.add_argument("--prepare-data", action="store_true",
                        help="write the embedded default dataset and tokenizer under <output_dir>/data, then exit")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set training.lr=1e-3 (repeatable)")
    return parser


def train_main(argv: list[str]) -> int:
    args = train_parser().parse_args(argv)
    config = load_config(args.config, tuple(args.overrides), optimizer=args.optimizer)
    if args.prepare_data:
        return prepare_data(config)
    from .trainer import train

    train(config, resume=args.resume, overwrite=args.overwrite)
    return 0


def prepare_data(config) -> int:
    from .data import prepare_default_data
    from .preflight import check_output_dir

    d, out = config.data, Path(config.output_dir)
    if d.train_file is not None:
        print(f"data.train_file is set ({d.train_file}): the embedded default dataset is not used; nothing to prepare.")
        return 0
    check_output_dir(out)
    prepared = prepare_default_data(out / "data", seed=config.training.seed, n_train=d.default_train_examples,
                                    n_eval=d.default_eval_examples, vocab_size=d.default_vocab_size)
    print(f"default dataset ready: {prepared.train_path}, {prepared.eval_path}; tokenizer {prepared.tokenizer_dir}")
    return 0


# ---------------------------------------------------------------------------------- download
class DownloadError(RuntimeError):
    pass


def download_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="galore-train download",
                                     description="Fetch a model folder from the Hugging Face Hub (or ModelScope).")
    parser.add_argument("model_id", help="e.g. Qwen/Qwen2-0.5B")
    parser.add_argument("--to", required=True, type=Path, help="destination folder (use it as model.name_or_path)")
    args = parser.parse_args(argv)
    path = download(args.model_id, args.to)
    print(f"downloaded {args.model_id} to {path}; set model.name_or_path: {path}")
    return 0


def download(model_id: str, dest: Path) -> Path:
    """Hugging Face Hub first, ModelScope when it is installed and the Hub fails."""
    failures = []
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=model_id, local_dir=str(dest)))
    except Exception as err:  # offline mode, DNS, refused connection, missing repo...
        failures.append(f"Hugging Face Hub: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    try:
        from modelscope import snapshot_download as ms_download
    except ImportError:
        pass
    else:
        try:
            return Path(ms_download(model_id, local_dir=str(dest)))
        except Exception as err:
            failures.append(f"ModelScope: {type(err).__name__}: {err}")
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    reason = "offline mode is on (HF_HUB_OFFLINE)" if offline else "there is no network or the model id is wrong"
    raise DownloadError(
        f"could not download {model_id!r}: {reason}. Tried: " + "; ".join(failures) + ". On a machine with "
        "network run `galore-train download MODEL_ID --to DIR`, copy DIR here, and set model.name_or_path to it."
    )


if __name__ == "__main__":
    sys.exit(main())
