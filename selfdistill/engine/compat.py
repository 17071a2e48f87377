"""Every private or version-fragile transformers / torch API the engine uses, checked once, with fallbacks.

The engine relies on three things that are not stable public API:

- transformers' attention registry (`AttentionInterface`, `AttentionMaskInterface`, `sdpa_attention_forward`),
  and a config's `_attn_implementation`, switched for each packed decode step to the engine's own attention;
- transformers' cache layers: a `DynamicLayer` subclass whose KV lives in the engine's slot buffers, gathered
  in a `Cache(layers=[...])`;
- oneDNN's linear ops (`torch.ops.mkldnn._reorder_linear_weight`, `_linear_pointwise`), put in place of an
  `nn.Linear`'s `forward` on the instance.

`capabilities()` checks once whether each is there as the engine expects. Where one is missing the engine
takes the plain path and warns once (`usable`): without the attention registry or the switch, one [slots, 1]
batch step on the model's own attention and no drafts; without the cache layers, also a standard
`DynamicCache` holding a copy of the window each step; without the oneDNN ops, plain `F.linear`.
No other module of the package touches these APIs (evaluate/shared.py and profile.py read the attention
implementation through `attention_implementation` too).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@dataclasses.dataclass(frozen=True)
class Capabilities:
    attention_registry: bool  # an attention function can be registered by name, with sdpa's mask
    attention_switch: bool  # a config's `_attn_implementation` can be read and set
    slot_cache: bool  # `Cache(layers=[...])` of `DynamicLayer` subclasses
    onednn_linear: bool  # oneDNN's weight reorder and packed linear ops

    def __str__(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(self).items())


FALLBACKS = {
    "attention_registry": "ragged decode attention and drafts are off (one batch step on the model's own attention)",
    "attention_switch": "ragged decode attention and drafts are off (one batch step on the model's own attention)",
    "slot_cache": "a standard DynamicCache holds a copy of the KV window each decode step (slower)",
    "onednn_linear": "16-bit CPU linears run on plain F.linear (no weights packed for oneDNN)",
}

_caps: Capabilities | None = None
_warned: set[str] = set()


def capabilities() -> Capabilities:
    """What the installed transformers and torch offer the engine; checked on first use."""
    global _caps
    if _caps is None:
        _caps = Capabilities(_check(_has_attention_registry), _check(_has_attention_switch),
                             _check(_has_slot_cache), _check(_has_onednn_linear))
    return _caps


def usable(feature: str) -> bool:
    """Whether `feature` (a `Capabilities` field) is there; if not, warn once that the engine falls back."""
    if getattr(capabilities(), feature):
        return True
    if feature not in _warned:
        _warned.add(feature)
        warnings.warn(f"selfdistill engine: {feature} is not available in this transformers/torch "
                      f"({_versions()}); {FALLBACKS[feature]}", RuntimeWarning, stacklevel=3)
    return False


def _check(probe: Callable[[], bool]) -> bool:
    try:
        return bool(probe())
    except Exception:  # an import or signature that moved: the capability is missing
        return False


def _versions() -> str:
    import torch
    import transformers

    return f"transformers {transformers.__version__}, torch {torch.__version__}"


def _has_attention_registry() -> bool:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: F401
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: F401

    return isinstance(AttentionInterface._global_mapping, dict) and callable(AttentionMaskInterface.register)


def _has_attention_switch() -> bool:
    from transformers import PretrainedConfig

    config = PretrainedConfig()
    config._attn_implementation = "sdpa"
    return config._attn_implementation == "sdpa"


def _has_slot_cache() -> bool:
    from transformers.cache_utils import Cache, DynamicLayer

    layer = DynamicLayer()
    return ("layers" in inspect.signature(Cache.__init__).parameters and hasattr(layer, "is_initialized")
            and callable(getattr(layer, "get_seq_length", None)))


def _has_onednn_linear() -> bool:
    import torch

    mkldnn = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and mkldnn is not None
            and hasattr(mkldnn, "_reorder_linear_weight") and hasattr(mkldnn, "_linear_pointwise")
            and hasattr(mkldnn, "_is_mkldnn_bf16_supported"))


# --- attention ---------------------------------------------------------------------------------------------

def attention_implementation(config: Any, default: str | None = None) -> str | None:
    """The attention a transformers config asks for ("sdpa", "eager", ...); `default` if it has no such field."""
    return getattr(config, "_attn_implementation", default)


def register_attention(name: str, fn: Callable[..., Any]) -> None:
    """Register `fn` as attention `name` (once), with sdpa's mask; only after `usable("attention_registry")`."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, sdpa_mask)


@functools.lru_cache(maxsize=1)
def sdpa_attention() -> Callable[..., Any]:
    """transformers' own sdpa attention function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


@contextmanager
def switched_attention(config: Any, name: str) -> Iterator[None]:
    """Within the block the model attends with the registered function `name`; restored afterwards."""
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        if config._attn_implementation != name:
            raise RuntimeError(f"transformers did not take attention '{name}'; set GenParams(ragged=False)")
        yield
    finally:
        config._attn_implementation = before


# --- caches ------------------------------------------------------------------------------------------------

def slot_layer_cache(update: Callable[[int, Any, Any], tuple[Any, Any]], seq_length: Callable[[], int],
                     n_layers: int) -> Any:
    """A transformers `Cache` whose layer `i` calls `update(i, keys, values)` and reports `seq_length()`;
    only after `usable("slot_cache")`."""
    from transformers.cache_utils import Cache, DynamicLayer

    class SlotLayer(DynamicLayer):
        def __init__(self, idx: int) -> None:
            super().__init__()
            self.idx, self.is_initialized = idx, True

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            return update(self.idx, key_states, value_states)

        def get_seq_length(self) -> int:
            return seq_length()

    return Cache(layers=[SlotLayer(i) for i in range(n_layers)])


def plain_cache(kv: list[tuple[Any, Any]]) -> Any:
    """A standard `DynamicCache` holding a copy of each layer's `(keys, values)`."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


def cache_kv(cache: Any) -> list[tuple[Any, Any]]:
    """Each layer's `(keys, values)` of a `DynamicCache` (`layers` since transformers 4.56, else `key_cache`)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


# --- oneDNN linears ----------------------------------------------------------------------------------------

def onednn_can_pack(model: Any) -> bool:
    """Whether `model`'s 16-bit CPU linears can run on weights packed for oneDNN (warns if the ops are gone)."""
    import torch

    if model.device.type != "cpu" or model.dtype not in (torch.bfloat16, torch.float16):
        return False
    if not usable("onednn_linear"):
        return False
    return model.dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def onednn_pack(weight: Any, rows: int) -> Any:
    """`weight` reordered once into oneDNN's blocked layout, for about `rows` input rows per call."""
    import torch

    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


def onednn_linear(weight: Any, bias: Any, x: Any) -> Any:
    """`F.linear(x, W, bias)` on a weight packed by `onednn_pack`."""
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def replace_forward(module: Any, forward: Callable[..., Any]) -> None:
    """Run `forward` in place of this one module's own (the class and other instances keep theirs)."""
    module.forward = forward


def restore_forward(module: Any) -> None:
    """Undo `replace_forward`: the instance attribute goes and the class's forward is back."""
    del module.forward
