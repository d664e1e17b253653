"""openpi reference vectors: load a fixture file, run our model on its inputs, report errors.

The fixture format is documented in `shared/fixtures/openpi_reference/README.md`: one
safetensors file holding openpi-named weights, `inputs/*`, `intermediate/*`, `outputs/actions`
and a JSON `config` in its metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from pi0_policy_ros.errors import CheckpointError
from pi0_policy_ros.model.checkpoint import apply_precision, load_state, read_safetensors
from pi0_policy_ros.model.config import IMAGE_SLOTS, ModelConfig, config_from_fixture_metadata
from pi0_policy_ros.model.pi0 import ModelInputs, Pi0Model, Trace

# Max abs error of the actions allowed per dtype. float32 on the CPU is the spec (≤ 1e-4). On a
# GPU openpi itself lands at 2.5e-3 (TF32 matmuls) and 3e-2 (bf16) on these fixtures.
ACTION_TOLERANCE = {("cpu", "float32"): 1e-4, ("cuda", "float32"): 5e-3, ("cpu", "bfloat16"): 5e-2,
                    ("cuda", "bfloat16"): 5e-2}


@dataclass
class Reference:
    path: Path
    config: ModelConfig
    weights: dict[str, torch.Tensor]
    inputs: ModelInputs
    noise: torch.Tensor
    expected: dict[str, torch.Tensor]  # intermediate/* and outputs/* by name


def load_reference(path: str | Path) -> Reference:
    path = Path(path)
    tensors, metadata = read_safetensors(path)
    if "config" not in metadata:
        raise CheckpointError(f"{path} has no 'config' metadata: not an openpi reference fixture")
    try:
        meta = json.loads(metadata["config"])
        cfg = config_from_fixture_metadata(meta, name=path.stem)
        inputs = ModelInputs(
            images=[tensors[f"inputs/image.{s}"] for s in IMAGE_SLOTS],
            image_masks=[tensors[f"inputs/image_mask.{s}"] for s in IMAGE_SLOTS],
            tokens=tensors["inputs/tokenized_prompt"],
            token_mask=tensors["inputs/tokenized_prompt_mask"],
            state=tensors["inputs/state"],
        )
        noise = tensors["inputs/noise"]
    except KeyError as exc:  # a safetensors file with some other 'config' metadata
        raise CheckpointError(f"{path}: not an openpi reference fixture: expected {exc.args[0]!r} in its "
                              "'config' metadata or tensors, found none") from None
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: not an openpi reference fixture: its 'config' metadata is not the "
                              f"fixture's JSON ({exc})") from None
    weights = {k: v for k, v in tensors.items() if "/" not in k}
    expected = {k: v for k, v in tensors.items() if k.startswith(("intermediate/", "outputs/"))}
    return Reference(path, cfg, weights, inputs, noise, expected)


def reference_model(ref: Reference, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Pi0Model:
    with torch.device("meta"):
        model = Pi0Model(ref.config)
    load_state(model, ref.weights, allow_truncated_vocab=True, source=str(ref.path))
    return apply_precision(model, dtype).to(device).eval()


def _inputs_to(inputs: ModelInputs, device: str) -> ModelInputs:
    return ModelInputs(images=[i.to(device) for i in inputs.images],
                       image_masks=[m.to(device) for m in inputs.image_masks],
                       tokens=inputs.tokens.to(device), token_mask=inputs.token_mask.to(device),
                       state=inputs.state.to(device))


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float().cpu() - b.float().cpu()).abs().max())


def expected_keys() -> list[str]:
    """The stored openpi values `compare_with_reference` reads (the fixture README's names)."""
    return ["outputs/actions", *(f"intermediate/image_emb.{s}" for s in IMAGE_SLOTS), "intermediate/prefix_embs",
            "intermediate/prefix_kv.layer0.key", "intermediate/prefix_kv.layer0.value",
            "intermediate/prefix_last_hidden", "intermediate/denoise_v_t", "intermediate/denoise_time"]


def compare_with_reference(ref: Reference, model: Pi0Model, device: str = "cpu") -> dict[str, float]:
    """Run `sample_actions` with a trace and return the max abs error of the actions and the
    main intermediates against the stored openpi values."""
    # Checked before the model runs: a fixture that lacks one was a KeyError traceback after it.
    missing = [key for key in expected_keys() if key not in ref.expected]
    if missing:
        raise CheckpointError(f"{ref.path}: expected openpi's reference values beside the weights and inputs, "
                              f"found {len(missing)} of them missing: {missing}")
    trace = Trace()
    actions = model.sample_actions(_inputs_to(ref.inputs, device), ref.noise.to(device), trace=trace)
    exp = ref.expected
    assert trace.prefix is not None and trace.prefix_embs is not None
    errors = {
        "actions": max_abs(actions, exp["outputs/actions"]),
        "image_emb": max(max_abs(e, exp[f"intermediate/image_emb.{s}"]) for e, s in zip(trace.image_embs, IMAGE_SLOTS)),
        "prefix_embs": max_abs(trace.prefix_embs, exp["intermediate/prefix_embs"]),
        "layer0_key": max_abs(trace.prefix.kv[0][0], exp["intermediate/prefix_kv.layer0.key"]),
        "layer0_value": max_abs(trace.prefix.kv[0][1], exp["intermediate/prefix_kv.layer0.value"]),
        "prefix_last_hidden": max_abs(trace.prefix.last_hidden, exp["intermediate/prefix_last_hidden"]),
        "first_velocity": max_abs(trace.v_t[0], exp["intermediate/denoise_v_t"][0]),
        "denoise_times": max_abs(torch.stack(trace.times), exp["intermediate/denoise_time"]),
    }
    return errors
