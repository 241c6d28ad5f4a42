"""``zo-replay``: rebuild ZO fine-tuned weights from the base model and a ``zo_trajectory.json``.

    zo-replay --base <model> --trajectory out/zo_trajectory.json --output_dir replayed

A LoRA run of ``zo-train --use_peft`` is replayed on the same adapter (config and init seed from the trajectory) and
saved as the adapter. The trajectory format and the replay itself are library code (``zo_trainer.trajectory``); this module is the
command line around them.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from ..models import PEFT_INSTALL_HINT, ModelArguments, add_lora_adapter, load_model
from ..quant import get_backend, save_quantized
from ..trajectory import TRAJECTORY_NAME, TrajectoryError, load_trajectory, replay
from .errors import run_console_script, usage_errors_in_one_line

logger = logging.getLogger(__name__)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="zo-replay",
        description="Rebuild ZO fine-tuned weights from the base model and a zo_trajectory.json.",
    )
    parser.add_argument("--trajectory", required=True, help=f"A {TRAJECTORY_NAME} file, or a folder holding one.")
    parser.add_argument("--base", default=None, help="The base model (Hub id or folder). Default: the one recorded.")
    parser.add_argument("--output_dir", required=True, help="Where to save_pretrained the replayed model.")
    parser.add_argument("--steps", type=int, default=None, help="Replay only up to this global step.")
    parser.add_argument("--device", default=None, help="Default: the device type that trained, if available.")
    parser.add_argument(
        "--quantization",
        default=None,
        choices=["nf4"],
        help="qzo: load the base in 4 bit. Default: as recorded in the trajectory (GPTQ bases are recognised "
        "by their config).",
    )
    parser.add_argument("--recompute_thresholds", action="store_true", help="Sparse: recompute from the base weights.")
    parser.add_argument("--no_verify", action="store_true", help="Skip the base/final weight fingerprint checks.")
    usage_errors_in_one_line(parser, "zo-replay")
    return parser.parse_args(argv)


def lora_settings(payload: dict) -> tuple[Any, int] | None:
    """(LoraConfig, init seed) of a trajectory that trained LoRA adapters; None for one that trained the model."""
    record = payload.get("peft")
    if not record:
        return None
    adapters = record.get("adapters") or {}
    if list(adapters) != ["default"] or record.get("init_seed") is None:
        raise TrajectoryError(
            "The trajectory trained PEFT adapters that zo-train did not create (adapters "
            f"{sorted(adapters)}, init seed {record.get('init_seed')}): their initial weights are not recorded, so "
            "zo-replay cannot rebuild them. Train with zo-train --use_peft to get a replayable run."
        )
    try:
        from peft import PeftConfig
    except ImportError:
        raise TrajectoryError(
            f"The trajectory trained LoRA adapters: replaying it needs peft ({PEFT_INSTALL_HINT})."
        ) from None
    return PeftConfig.from_peft_type(**adapters["default"]), record["init_seed"]


def run(argv: Sequence[str] | None = None) -> str:
    """The whole zo-replay program from Python: returns the output folder; raises on bad input."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    args = parse_args(argv)
    payload = load_trajectory(args.trajectory)
    base = args.base or payload.get("base_model")
    if not base:
        raise TrajectoryError("The trajectory records no base model: pass --base.")
    recorded = payload.get("quantization")
    quantization = args.quantization
    if recorded == "nf4" and quantization is None:
        quantization = "nf4"  # Trained on a base quantized to NF4 on load: replay on the same.
    elif quantization is not None and recorded != quantization:
        raise TrajectoryError(
            f"--quantization {quantization}, but the trajectory was trained with quantization {recorded!r}: "
            "drop the flag (the recorded setting is used)."
        )

    lora = lora_settings(payload)  # Checked before the (slow) model load.
    model, tokenizer = load_model(
        ModelArguments(model_name_or_path=base, dtype=payload.get("dtype", "float32"), quantization=quantization)
    )
    if lora is not None:
        model = add_lora_adapter(model, *lora)
    if recorded == "gptq":
        found = get_backend(model)
        if found is None or found.name != "gptq":
            raise TrajectoryError(f"The trajectory trained a GPTQ model, but --base {base} is not a GPTQ checkpoint.")
    device = args.device or payload.get("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        logger.warning("Trained on cuda, replaying on cpu: the weights will differ (different noise generator).")
        device = "cpu"
    if not getattr(model, "hf_device_map", None):
        model.to(device)
    replay(model, payload, steps=args.steps, verify=not args.no_verify, recompute_thresholds=args.recompute_thresholds)

    os.makedirs(args.output_dir, exist_ok=True)
    if lora is not None:
        model.save_pretrained(args.output_dir)  # The adapter, as zo-train saved it (the base is unchanged).
    elif get_backend(model) is not None:
        save_quantized(model, args.output_dir)
    else:
        model.save_pretrained(args.output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.output_dir)
    logger.info("Saved the replayed model to %s.", args.output_dir)
    return args.output_dir


def main(argv: Sequence[str] | None = None) -> int:
    """The ``zo-replay`` console script: exit status 0 on success, 2 for bad input, 1 for a failed write."""
    return run_console_script("zo-replay", run, argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
