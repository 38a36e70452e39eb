"""Quantized base layers: bitsandbytes' 4-bit (NF4 / FP4) and 8-bit (LLM.int8) Linear.

A model loaded with `BitsAndBytesConfig` (or quantized in place with bitsandbytes) holds
`bnb.nn.Linear4bit` / `bnb.nn.Linear8bitLt` modules, subclasses of nn.Linear whose weight is
codes plus scales, not a float matrix. Deltas that only add to a layer's output (LoRA) work on
them unchanged; what reads or writes the weight goes through the helpers here, the one place
that knows the storage:

- `is_quantized(module)`: whether the module stores codes;
- `dequantized_weight(module)`: its weight as a float (out, in) matrix, as its forward uses it;
- `merge_into_codes(module, change)` / `restore_codes(module, kept)`: replace the codes by those
  of (weight + change), keeping the old codes so that unmerging puts them back bit for bit;
- `dequantize(model)`: every quantized Linear replaced by a float nn.Linear (a float merge).

bitsandbytes is never imported here: a model with such layers has imported it already, so it
is read from sys.modules, and without the library nothing changes.
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from .layer import DeltaLayer


def _bnb():
    return sys.modules.get("bitsandbytes")


def quantized_types() -> tuple[type, ...]:
    """The quantized Linear classes of the loaded library ((), when bitsandbytes is not imported)."""
    bnb = _bnb()
    return (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt) if bnb is not None else ()


def is_quantized(module: nn.Module) -> bool:
    types = quantized_types()
    return bool(types) and isinstance(module, types)


def quant_kind(module: nn.Module) -> str:
    """"nf4", "fp4" or "int8" for a quantized layer."""
    weight = module.weight
    return weight.quant_type if hasattr(weight, "quant_state") else "int8"


def _unpack_for_cpu(module: nn.Module) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes re-lays a 4-bit weight out for its inference kernel
    at the first no-grad eval forward: codes in another order, block scales (double-quantized ones
    expanded) rounded to bfloat16 and stored transposed. Back to the standard layout, which
    dequantization and quantization read, keeping the scales the layer has computed with since:
    bitsandbytes' own inverse (what its state_dict() uses) restores the codes but leaves the scales
    transposed, or rounds them to 8 bits again; both would change the layer's outputs."""
    state = module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse  # no public form
        state.original_nested = False  # the scales stay plain (bfloat16 values): no second rounding
        module.weight.data, state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
        state.absmax = state.absmax.T.reshape(-1).to(state.dtype).contiguous()
        module.weight.quant_state = state


def _int8_scales(module: nn.Module) -> torch.Tensor:
    # the forward moves the row scales from the weight to the layer's matmul state
    scales = module.weight.SCB
    return scales if scales is not None else module.state.SCB


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight as a float (out, in) matrix: 4-bit codes times their block scales in the layer's
    stored dtype; 8-bit codes times row scale / 127 in float32."""
    bnb = _bnb()
    if quant_kind(module) != "int8":
        _unpack_for_cpu(module)
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    return bnb.functional.int8_vectorwise_dequant(module.weight.data, _int8_scales(module).to(module.weight.device))


def _quantized_like(module: nn.Module, weight: torch.Tensor) -> nn.Parameter:
    """A parameter holding `weight` quantized with the same settings as the module's current one."""
    bnb, old = _bnb(), module.weight
    if quant_kind(module) != "int8":
        new = bnb.nn.Params4bit(weight.to("cpu"), requires_grad=False, quant_type=old.quant_type,
                                blocksize=old.blocksize, compress_statistics=old.compress_statistics,
                                quant_storage=old.quant_storage, module=module)
        return new.to(old.device)
    return bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False).to(old.device)


def _install(module: nn.Module, param: nn.Parameter, int8_scales: torch.Tensor | None = None) -> None:
    module.weight = param
    if quant_kind(module) == "int8":
        module.state.reset_grads()  # drops the codes and scales the forward cached from the old weight
        if param.SCB is None:  # codes put back: their scales go with them
            param.CB, param.SCB = param.data, int8_scales
    else:
        module.quant_state = param.quant_state


def merge_into_codes(module: nn.Module, change: torch.Tensor) -> tuple:
    """Quantize (dequantized weight + change) into the module's weight, with its settings (quant
    type, block size, double quantization); returns what restore_codes needs to undo it exactly."""
    int8 = quant_kind(module) == "int8"
    kept = (module.weight, _int8_scales(module) if int8 else None)
    weight = dequantized_weight(module)  # 4-bit: in the dtype the layer was quantized from
    merged = (weight.float() + change.float()).to(torch.float16 if int8 else weight.dtype)  # LLM.int8 quantizes fp16
    _install(module, _quantized_like(module, merged))
    return kept


def restore_codes(module: nn.Module, kept: tuple) -> None:
    """Put back the codes (and scales) merge_into_codes replaced: bit for bit."""
    _install(module, *kept)


def float_linear(module: nn.Module) -> nn.Linear:
    """A float nn.Linear computing what the quantized `module` computes, up to its matmul's rounding
    (the dequantized weight, in the layer's compute dtype, and its bias)."""
    weight = dequantized_weight(module)
    dtype = getattr(module, "compute_dtype", None) or weight.dtype
    linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                       device=weight.device, dtype=dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    linear.requires_grad_(False)
    return linear


def dequantize(model: nn.Module) -> nn.Module:
    """Replace every quantized Linear of `model` (a DeltaModel or a plain model; wrapped layers keep
    their deltas) by a float nn.Linear with the dequantized weight, in place; returns the model.
    Then merge_and_unload() adds the deltas in float, with no second rounding to codes."""
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if is_quantized(child):
                if isinstance(module, DeltaLayer) and name == "base_layer":
                    module.base_layer = float_linear(child)
                else:
                    setattr(module, name, float_linear(child))
    return model
