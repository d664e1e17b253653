"""openpi PyTorch state_dict names ↔ our modules, strict loading, precision, random weights.

One explicit prefix table maps every one of our parameter names to openpi's `PI0Pytorch`
`state_dict()` name. Loading is strict: every missing, unexpected or wrongly shaped tensor is
collected and reported in one `CheckpointError`, with expected vs found shapes.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open

from pi0_policy_ros.errors import CheckpointError, ConfigError
from pi0_policy_ros.model.config import ModelConfig
from pi0_policy_ros.model.pi0 import Pi0Model

log = logging.getLogger(__name__)

_PALIGEMMA = "paligemma_with_expert.paligemma.model."
_SIGLIP = _PALIGEMMA + "vision_tower.vision_model."
# (our prefix, openpi prefix); the first matching row wins.
KEY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("vision.embeddings.", _SIGLIP + "embeddings."),
    ("vision.layers.", _SIGLIP + "encoder.layers."),
    ("vision.post_layernorm.", _SIGLIP + "post_layernorm."),
    ("vision.projector.", _PALIGEMMA + "multi_modal_projector.linear."),
    ("embed_tokens.", _PALIGEMMA + "language_model.embed_tokens."),
    ("language_model.", _PALIGEMMA + "language_model."),
    ("expert.", "paligemma_with_expert.gemma_expert.model."),
    ("", ""),  # action_in_proj, action_out_proj, time / state MLPs keep their names
)

# In openpi's state_dict but never used for actions: the PaliGemma LM head (tied to
# embed_tokens) and the expert's separate LM head. Accepted and skipped.
UNUSED_KEYS = (
    "paligemma_with_expert.paligemma.lm_head.weight",
    "paligemma_with_expert.gemma_expert.lm_head.weight",
)
EMBED_KEY = _PALIGEMMA + "language_model.embed_tokens.weight"
# PaliGemma's LM head is tied to embed_tokens. `safetensors.torch.save_model` (how openpi's JAX
# converter and train_pytorch.py save) keeps one name per shared tensor, the first in sort order:
# the lm_head. Such a file holds the token table under this name only.
TIED_EMBED_KEY = UNUSED_KEYS[0]
# A checkpoint error lists this many tensors at most: beyond it, it is a whole other geometry.
MAX_LISTED_PROBLEMS = 40
# safetensors refuses headers above 100 MB: a larger length means the file is something else.
MAX_SAFETENSORS_HEADER = 100_000_000
GIT_LFS_POINTER = b"version https://git-lfs.github.com/spec/"

# Parameters kept in fp32 in bf16 mode, as openpi's `to_bfloat16_for_selected_params` does.
_FP32_IN_BF16 = ("patch_embedding", "position_embedding", "input_layernorm", "post_attention_layernorm",
                 "language_model.norm", "expert.norm")
# The action heads are outside openpi's PaliGemmaWithExpertModel and stay fp32 too.
_HEADS = ("action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out", "state_proj",
          "action_time_mlp_in", "action_time_mlp_out")


def openpi_name(our_name: str) -> str:
    for ours, theirs in KEY_PREFIXES:
        if our_name.startswith(ours):
            return theirs + our_name[len(ours):]
    raise AssertionError("unreachable: the last prefix row matches everything")


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """openpi name → (our name, shape) for every parameter of a model of this geometry.
    Built on the meta device, so full-size geometries cost no memory."""
    with torch.device("meta"):
        model = Pi0Model(cfg)
    return {openpi_name(n): (n, tuple(p.shape)) for n, p in model.state_dict().items()}


def read_safetensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (memory-mapped by safetensors) and the metadata of one file."""
    path = Path(path)
    if path.is_dir():  # it exists: "not found" sent users looking for a typo
        raise CheckpointError(f"checkpoint file {path}: expected a safetensors file, found a directory")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        path.open("rb").close()  # safetensors says "No such file or directory" of an unreadable file
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises several unrelated types for a bad file
        why = _lfs_pointer(path) or _cut_short(path)
        raise CheckpointError(f"cannot read {path}: {why}" if why else
                              f"cannot read {path} as safetensors: {exc}") from exc


def _lfs_pointer(path: Path) -> str | None:
    """What a Git LFS pointer file (a Hugging Face repo cloned without git-lfs) stands for, or None."""
    with path.open("rb") as f:
        head = f.read(1024)
    if not head.startswith(GIT_LFS_POINTER):
        return None
    size = re.search(rb"^size (\d+)$", head, re.MULTILINE)
    return (f"expected the weights, found a Git LFS pointer to them ({size[1].decode() if size else '?'} bytes); "
            "fetch them with `git lfs pull` in the clone (or download the repository with huggingface-cli)")


def _cut_short(path: Path) -> str | None:
    """Why a safetensors file is shorter than its own header says (an interrupted copy or download),
    or None. The format: an 8-byte little-endian header length, the JSON header, then the data,
    each tensor at its header's `data_offsets` from the data's start."""
    size = path.stat().st_size
    if size < 8:
        return f"expected at least 8 bytes (the header's length), found {size}: the file is cut short (an interrupted copy?)"
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        header = f.read(header_len) if header_len <= MAX_SAFETENSORS_HEADER else b""
    if not header.startswith(b"{"):
        return None  # not a safetensors file at all: safetensors' own message says so
    expected = 8 + header_len
    if len(header) == header_len:
        try:
            entries = json.loads(header)
            expected += max((entry["data_offsets"][1] for key, entry in entries.items() if key != "__metadata__"),
                            default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return None
    if size >= expected:
        return None
    return f"expected at least {expected} bytes (its header's), found {size}: the file is cut short (an interrupted copy?)"


def with_tied_embedding(tensors: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """`tensors`, with the token table taken from the tied PaliGemma lm_head where the file stores
    it only under that name (see TIED_EMBED_KEY)."""
    if EMBED_KEY in tensors or TIED_EMBED_KEY not in tensors:
        return tensors
    return {**tensors, EMBED_KEY: tensors[TIED_EMBED_KEY]}


def check_dtypes(tensors: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Raise one CheckpointError naming the tensors that are not floating point (quantized int8,
    int64 or bool weights): torch cannot load them into the model's float parameters, and a cast
    would silently turn quantized values into wrong weights."""
    other = sorted((name, str(t.dtype).removeprefix("torch.")) for name, t in tensors.items()
                   if not t.is_floating_point())
    if other:
        listed = ", ".join(f"{name} {dtype}" for name, dtype in other[:5])
        more = f" and {len(other) - 5} more" if len(other) > 5 else ""
        raise CheckpointError(f"{source}: expected floating-point weights (float32, bfloat16 or float16), found "
                              f"{len(other)} tensor(s) of another dtype: {listed}{more}; quantized checkpoints are "
                              "not supported")


def check_tensors(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], allow_truncated_vocab: bool = False,
                  source: str = "checkpoint") -> None:
    """Raise one CheckpointError naming the tensors of a non-float dtype (`check_dtypes`), else one
    listing every missing, unexpected and wrongly shaped tensor (the first MAX_LISTED_PROBLEMS of
    them, and how many more)."""
    check_dtypes(tensors, source)
    tensors = with_tied_embedding(tensors)
    expected = expected_tensors(cfg)
    missing = [f"missing {name}: expected shape {list(expected[name][1])}"
               for name in sorted(set(expected) - set(tensors))]
    unexpected = [f"unexpected {name}: shape {list(tensors[name].shape)}"
                  for name in sorted(set(tensors) - set(expected) - set(UNUSED_KEYS))]
    wrong = []
    for name in sorted(set(expected) & set(tensors)):
        want, found = expected[name][1], tuple(tensors[name].shape)
        truncated_vocab = (allow_truncated_vocab and name == EMBED_KEY and len(found) == 2
                           and found[1] == want[1] and 0 < found[0] <= want[0])
        if found != want and not truncated_vocab:
            wrong.append(f"wrong shape {name}: expected {list(want)}, found {list(found)}")
    problems = missing + unexpected + wrong
    if problems:
        listed = problems[:MAX_LISTED_PROBLEMS]
        if len(problems) > len(listed):
            listed.append(f"... and {len(problems) - len(listed)} more (a checkpoint of another geometry?)")
        raise CheckpointError(
            f"{source} does not match model geometry {cfg.name!r} ({len(problems)} problem(s): "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrong shape):\n  "
            + "\n  ".join(listed))


def apply_precision(model: Pi0Model, dtype: torch.dtype) -> Pi0Model:
    """fp32: everything fp32. bf16: the networks in bf16, norms, patch/position embeddings and the
    action heads in fp32 (openpi's inference precision)."""
    if dtype == torch.float32:
        return model.float()
    if dtype != torch.bfloat16:
        raise ConfigError(f"load dtype must be float32 or bfloat16, found {dtype}")
    for name, param in model.named_parameters():
        keep = any(s in name for s in _FP32_IN_BF16) or name.split(".")[0] in _HEADS
        param.data = param.data.to(torch.float32 if keep else torch.bfloat16)
    return model


def load_state(model: Pi0Model, tensors: Mapping[str, torch.Tensor], allow_truncated_vocab: bool = False,
               source: str = "checkpoint") -> Pi0Model:
    """Copy openpi-named tensors into `model` (checked first). A truncated embedding table (the
    fixtures store only the first rows) is zero-padded: those rows are never read."""
    tensors = with_tied_embedding(tensors)
    check_tensors(model.cfg, tensors, allow_truncated_vocab, source)
    state = {}
    for openpi, (ours, shape) in expected_tensors(model.cfg).items():
        tensor = tensors[openpi]
        if tuple(tensor.shape) != shape:
            padded = torch.zeros(shape, dtype=tensor.dtype)
            padded[: tensor.shape[0]] = tensor
            log.info("embedding table has %d of %d rows; the rest are zero", tensor.shape[0], shape[0])
            tensor = padded
        state[ours] = tensor
    device = next(model.parameters()).device
    if device.type == "meta":
        model.load_state_dict(state, strict=True, assign=True)
    else:
        model.load_state_dict(state, strict=True)
    return model


def load_checkpoint(cfg: ModelConfig, path: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32, allow_truncated_vocab: bool = False) -> Pi0Model:
    """A model of geometry `cfg` with weights from an openpi-named safetensors file."""
    tensors, _ = read_safetensors(path)
    check_dtypes(tensors, str(path))  # before the cast to float32 below
    return model_from_tensors(cfg, tensors, device, dtype, allow_truncated_vocab, source=str(path))


def model_from_tensors(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], device: str | torch.device = "cpu",
                       dtype: torch.dtype = torch.float32, allow_truncated_vocab: bool = False,
                       source: str = "checkpoint") -> Pi0Model:
    """A model of geometry `cfg` with openpi-named weights already read (and checked) from `source`."""
    with torch.device("meta"):
        model = Pi0Model(cfg)
    load_state(model, {k: v.float() for k, v in tensors.items()}, allow_truncated_vocab, source=source)
    return apply_precision(model, dtype).to(device).eval()


def random_model(cfg: ModelConfig, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 seed: int = 0) -> Pi0Model:
    """Random weights at the given geometry, initialised on the target device (for demos and
    benchmarks). Norm gains get small random values so that no weight is trivially zero."""
    generator_device = torch.device(device)
    with torch.device("meta"):
        model = Pi0Model(cfg)
    model = model.to_empty(device=generator_device)
    gen = torch.Generator(device=generator_device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                std = 0.1
            else:
                fan_in = param[0].numel()
                std = fan_in**-0.5
            param.normal_(0.0, std, generator=gen)
            if "layer_norm" in name and name.endswith("weight") or "post_layernorm.weight" in name:
                param.add_(1.0)  # LayerNorm gains around 1
    return apply_precision(model, dtype).eval()
