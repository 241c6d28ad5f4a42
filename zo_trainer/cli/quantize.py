"""``zo-quantize``: GPTQ-quantize a causal LM (default: the embedded SmolLM2) for QZO.

    zo-quantize --bits 4 --group_size 64 --output_dir smol-gptq4 \
        --task rte --data_dir ../shared/data/superglue/rte --num_calibration 32 --max_length 128

Calibration prompts come from the task's train split (``<data_dir>/train.jsonl`` formatted with the
task template) or from ``--calibration_file`` (one prompt per line; ``\\n`` escapes are expanded).
Quantization uses gptqmodel's own API (faster on CPU than transformers' GPTQConfig path) and saves a
``format: gptq`` checkpoint that ``from_pretrained`` / ``zo_trainer.quant.load_quantized`` load.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

from ..quant.gptq import set_cpu_workers
from ..tasks import get_task


def _log(msg: str) -> None:
    print(f"[zo-quantize] {msg}", file=sys.stderr, flush=True)


def calibration_texts(args) -> list[str]:
    from .errors import UsageError

    if args.calibration_file:
        lines = pathlib.Path(args.calibration_file).read_text(encoding="utf-8").splitlines()
        texts = [ln.replace("\\n", "\n") for ln in lines if ln.strip()]
    else:
        if not args.data_dir:
            raise UsageError("no calibration data: pass --data_dir (with --task) or --calibration_file")
        fmt = get_task(args.task).format_prompt
        path = pathlib.Path(args.data_dir)
        if path.is_dir():
            path = path / "train.jsonl"
        if not path.is_file():
            raise UsageError(f"calibration data {path} does not exist (--data_dir: a folder with train.jsonl)")
        texts = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        texts.append(fmt(json.loads(line)))
                    except (ValueError, KeyError) as e:
                        raise UsageError(f"{path}: line {lineno} is not a {args.task} example ({e})") from None
                if len(texts) >= args.num_calibration:
                    break
    texts = texts[: args.num_calibration]
    if not texts:
        raise UsageError("no calibration text (the file or split is empty)")
    return texts


def quantize(
    model_name_or_path=None,
    output_dir="smol-gptq4",
    texts=(),
    bits=4,
    group_size=64,
    max_length=128,
    batch_size=4,
    desc_act=False,
    sym=True,
    damp_percent=0.05,
):
    """GPTQ-quantize with gptqmodel and save to ``output_dir``; returns the output path."""
    set_cpu_workers()
    import torch
    from transformers import AutoTokenizer

    from ..models import resolve_model_path

    src = resolve_model_path(model_name_or_path)
    from gptqmodel import GPTQModel, QuantizeConfig

    tok = AutoTokenizer.from_pretrained(src)
    calib = []
    for t in texts:
        ids = tok(t, truncation=True, max_length=max_length)["input_ids"]
        calib.append({"input_ids": ids, "attention_mask": [1] * len(ids)})
    _log(f"model {src}: {bits}-bit, group {group_size}, {len(calib)} calibration samples (<= {max_length} tokens)")
    t0 = time.time()
    qc = QuantizeConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, damp_percent=damp_percent)
    model = GPTQModel.load(src, qc, dtype=torch.float32)
    _log(f"loaded in {time.time() - t0:.1f}s; quantizing (first run JIT-compiles a packing extension)")
    t1 = time.time()
    model.quantize(calib, batch_size=batch_size, tokenizer=tok, calibration_data_min_length=1)
    _log(f"quantized in {time.time() - t1:.1f}s")
    os.makedirs(output_dir, exist_ok=True)
    model.save(output_dir)
    tok.save_pretrained(output_dir)
    _log(f"saved {output_dir} (total {time.time() - t0:.1f}s)")
    return output_dir


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zo-quantize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model_name_or_path",
        default=None,
        help="local dir or hub id (default: the embedded SmolLM2-135M-Instruct, fp32)",
    )
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group_size", type=int, default=64)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--task", default="rte")
    p.add_argument("--data_dir", default=None, help="task dir with train.jsonl (or a .jsonl file)")
    p.add_argument("--calibration_file", default=None, help="text file, one prompt per line")
    p.add_argument("--num_calibration", type=int, default=32)
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--desc_act", action="store_true")
    p.add_argument("--damp_percent", type=float, default=0.05)
    return p


def run(argv=None) -> str:
    """The whole zo-quantize program from Python: returns the output folder; raises on bad input."""
    from .errors import usage_errors_in_one_line

    parser = build_parser()
    usage_errors_in_one_line(parser, "zo-quantize")
    args = parser.parse_args(argv)
    texts = calibration_texts(args)
    return quantize(
        args.model_name_or_path,
        args.output_dir,
        texts,
        bits=args.bits,
        group_size=args.group_size,
        max_length=args.max_length,
        batch_size=args.batch_size,
        desc_act=args.desc_act,
        damp_percent=args.damp_percent,
    )


def main(argv=None) -> int:
    """The ``zo-quantize`` console script: exit status 0 on success, 2 for bad input, 1 for a failed run."""
    from .errors import run_console_script

    return run_console_script("zo-quantize", run, argv)


if __name__ == "__main__":
    sys.exit(main())
