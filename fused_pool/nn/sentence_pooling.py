"""`Pooling`: a drop-in for sentence-transformers' Pooling module, on the fused kernels.

Same constructor forms (v6: embedding_dimension + pooling_mode as a string or tuple; v5:
word_embedding_dimension + pooling_mode_* booleans), same config keys, same forward(features)
contract on the padded path (token_embeddings + attention_mask) and the flattened path
(token_embeddings (1, T, H) + cu_seq_lens_q), all six modes concatenated in the configured order,
include_prompt, token_weights_sum, save / load. It never modifies the caller's tensors (it adds
"sentence_embedding" to the features dict, as sentence-transformers does).

Deviations from sentence-transformers (every other result matches: float32 within 1e-5):
- a sequence with no kept token pools to 0 in every mode, where sentence-transformers gives -inf
  (max), the embedding at position 0 (cls), or the next sequence's first token (cls, flattened);
- an integer attention mask keeps tokens where it is nonzero; sentence-transformers multiplies
  by its value (the same for the usual 0 / 1 masks).

sentence-transformers is not a dependency. Where it is installed, every Pooling is also an instance
of its Pooling (the first construction imports it), so the library's isinstance-based features
(set_pooling_include_prompt, on_model_ready, the SparseEncoder / MultiVectorEncoder handling) find
it: `Pooling(...)` builds an object of `with_sentence_transformers_base(type)`, the class with
sentence-transformers' Pooling added as a second base. Saved models record sentence-transformers'
own class (`sentence_transformers.models.Pooling`) and config schema, so they load with or without
fused_pool (as sentence-transformers' Pooling without it). Nothing here imports
fused_pool.integrations: the swap of a loaded model's modules lives there.
"""

from __future__ import annotations

import importlib.util
import json
import os
import types
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as F
from ..padding import segment_bounds
from ..tokens import first_token, last_token
from .pools import position_weights

__all__ = ["POOLING_MODES", "Pooling", "sentence_transformers_pooling", "with_sentence_transformers_base"]

POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
# The v5 keyword arguments, in the order v5 concatenated them.
_LEGACY_MODE_KWARGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}


def _legacy_modes(legacy: dict[str, bool]) -> str | tuple[str, ...]:
    """The pooling_mode that the v5 `pooling_mode_*` booleans select (in v5's concatenation order)."""
    unknown = sorted(set(legacy) - set(_LEGACY_MODE_KWARGS))
    if unknown:
        raise TypeError(f"Pooling got unexpected keyword arguments {unknown}")
    active = tuple(mode for key, mode in _LEGACY_MODE_KWARGS.items() if legacy.get(key, False))
    return (active[0] if len(active) == 1 else active) or "mean"


def _checked_modes(pooling_mode) -> str | tuple[str, ...]:
    if isinstance(pooling_mode, (list, tuple)):
        pooling_mode = pooling_mode[0] if len(pooling_mode) == 1 else tuple(pooling_mode)
    modes = (pooling_mode,) if isinstance(pooling_mode, str) else pooling_mode
    if not modes:
        raise ValueError("pooling_mode must name at least one mode")
    for mode in modes:
        if mode not in POOLING_MODES:
            raise ValueError(f"Invalid pooling mode: {mode!r}. Valid pooling modes are: {POOLING_MODES}.")
    return pooling_mode


def _convert_legacy_config(config: dict[str, Any]) -> dict[str, Any]:
    """A saved config in the v6 schema, converted silently (as sentence-transformers' loader does)."""
    config = dict(config)
    renamed = config.pop("word_embedding_dimension", None)
    if renamed is not None:
        config.setdefault("embedding_dimension", renamed)
    legacy = {key: config.pop(key) for key in list(config) if key in _LEGACY_MODE_KWARGS}
    if legacy and "pooling_mode" not in config:
        config["pooling_mode"] = _legacy_modes(legacy)
    return config


class Pooling(nn.Module):
    """sentence-transformers' Pooling on fused kernels (see the module docstring).

    Pooling(embedding_dimension, pooling_mode="mean", include_prompt=True, *, backend=None)
    Pooling(word_embedding_dimension=..., pooling_mode_mean_tokens=True, ...)  # v5 form: FutureWarning
    """

    POOLING_MODES = POOLING_MODES
    config_keys = ["embedding_dimension", "pooling_mode", "include_prompt"]
    config_key_renames = {"word_embedding_dimension": "embedding_dimension"}
    config_file_name = "config.json"
    save_in_root = False
    forward_kwargs: set[str] = set()

    def __new__(cls, *args, **kwargs):
        # Where sentence-transformers is installed, an instance of its Pooling too (module docstring).
        return super().__new__(with_sentence_transformers_base(cls))

    def __init__(
        self,
        embedding_dimension: int | None = None,
        pooling_mode: str | tuple[str, ...] | list[str] | None = None,
        include_prompt: bool = True,
        *,
        word_embedding_dimension: int | None = None,
        backend: str | None = None,
        **legacy_modes: bool,
    ) -> None:
        nn.Module.__init__(self)  # not super(): sentence-transformers' Pooling may follow in the MRO
        if word_embedding_dimension is not None:
            warnings.warn(
                "The `word_embedding_dimension` argument was renamed and is now deprecated. "
                "Please use `embedding_dimension` instead.",
                FutureWarning,
                stacklevel=2,
            )
            if embedding_dimension not in (None, word_embedding_dimension):
                raise ValueError("embedding_dimension and word_embedding_dimension disagree")
            embedding_dimension = word_embedding_dimension
        if embedding_dimension is None:
            raise TypeError("Pooling needs embedding_dimension (or word_embedding_dimension)")
        if legacy_modes:
            legacy = _legacy_modes(legacy_modes)  # checks the names (TypeError) even where pooling_mode wins
            warnings.warn(
                f"The {', '.join(f'`{key}`' for key in legacy_modes)} argument(s) are deprecated. "
                "Please use `pooling_mode` instead.",
                FutureWarning,
                stacklevel=2,
            )
            pooling_mode = legacy if pooling_mode is None else pooling_mode
        self.embedding_dimension = int(embedding_dimension)
        self.pooling_mode = _checked_modes("mean" if pooling_mode is None else pooling_mode)
        self.include_prompt = include_prompt
        self.backend = backend
        self.pooling_output_dimension = len(self.modes) * self.embedding_dimension

    @property
    def modes(self) -> tuple[str, ...]:
        return (self.pooling_mode,) if isinstance(self.pooling_mode, str) else tuple(self.pooling_mode)

    # --- the sentence-transformers module interface --------------------------------------------

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        token_embeddings = features["token_embeddings"]
        prompt_length = None
        if not self.include_prompt and "prompt_length" in features:
            length = features["prompt_length"]
            prompt_length = int(length[0].item()) if isinstance(length, Tensor) else int(length)
        if "cu_seq_lens_q" in features:
            vectors = self._flattened(token_embeddings, features, prompt_length)
        else:
            mask = features.get("attention_mask")
            if mask is not None and mask.size(-1) != token_embeddings.size(1):
                mask = None  # keep every token, as sentence-transformers does
            vectors = self._padded(token_embeddings, mask, features, prompt_length)
        features["sentence_embedding"] = torch.cat(vectors, dim=-1)
        return features

    def get_embedding_dimension(self) -> int:
        return self.pooling_output_dimension

    def get_sentence_embedding_dimension(self) -> int:  # the v5 name
        return self.pooling_output_dimension

    def get_config_dict(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.config_keys}

    def get_pooling_mode_str(self) -> str:
        return "+".join(self.modes)

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        config = self.get_config_dict()
        if isinstance(config["pooling_mode"], tuple):
            config["pooling_mode"] = list(config["pooling_mode"])
        with open(os.path.join(output_path, self.config_file_name), "w") as handle:
            json.dump(config, handle, indent=2)

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        init_defaults: dict[str, Any] | None = None,
        **kwargs,
    ) -> Pooling:
        """From a saved module folder or a Hub model (either config schema; the Hub needs
        sentence-transformers), with sentence-transformers' `Module.load` arguments. The saved config
        wins over init_defaults. The other keyword arguments of sentence-transformers' loader
        (trust_remote_code, model_kwargs, processor_kwargs, config_kwargs, and backend, which there
        names the model's runtime: torch, onnx or openvino) do not apply to pooling and are ignored,
        as sentence-transformers' Pooling ignores them; the loaded module's kernel backend is
        chosen automatically."""
        local = os.path.join(model_name_or_path, subfolder, cls.config_file_name)
        if os.path.exists(local):
            path = local
        else:
            try:
                from sentence_transformers.util import load_file_path
            except ImportError as error:
                raise ImportError(
                    f"{local} does not exist, and loading Pooling from the Hugging Face Hub needs "
                    "sentence-transformers (pip install sentence-transformers)"
                ) from error
            path = load_file_path(
                model_name_or_path,
                cls.config_file_name,
                subfolder=subfolder,
                token=token,
                cache_folder=cache_folder,
                revision=revision,
                local_files_only=local_files_only,
            )
        config = {}
        if path is not None:
            with open(path, encoding="utf-8") as handle:
                config = _convert_legacy_config(json.load(handle))
        for key, value in (init_defaults or {}).items():
            config.setdefault(key, value)
        return cls(**config)

    def __repr__(self) -> str:
        return f"Pooling({self.get_config_dict()})"

    def __reduce__(self):
        # Pooling presents sentence-transformers' module path (below), so it pickles through _restore;
        # a subclass defined elsewhere is pickled by reference to its own class. The classes made by
        # with_sentence_transformers_base are made again on loading: by reference to the class they extend.
        cls = _EXTENDED.get(type(self), type(self))
        return _restore, (
            None if cls is Pooling else cls,
            self.get_config_dict(),
            self.backend,
            self.training,
        )

    # The v5 attribute names, read-only.
    word_embedding_dimension = property(lambda self: self.embedding_dimension)
    pooling_mode_cls_token = property(lambda self: "cls" in self.modes)
    pooling_mode_max_tokens = property(lambda self: "max" in self.modes)
    pooling_mode_mean_tokens = property(lambda self: "mean" in self.modes)
    pooling_mode_mean_sqrt_len_tokens = property(lambda self: "mean_sqrt_len_tokens" in self.modes)
    pooling_mode_weightedmean_tokens = property(lambda self: "weightedmean" in self.modes)
    pooling_mode_lasttoken = property(lambda self: "lasttoken" in self.modes)

    # --- pooling ----------------------------------------------------------------------------------

    def _padded(
        self, x: Tensor, mask: Tensor | None, features: dict, prompt_length: int | None
    ) -> list[Tensor]:
        if prompt_length or "weightedmean" in self.modes:  # they need the left-padding length
            if mask is None:
                mask = torch.ones(x.shape[:2], dtype=torch.int64, device=x.device)
            first_kept = (mask != 0).int().argmax(dim=1)  # left-padding length (0 for right padding)
            if prompt_length:
                mask = _exclude_prompt(mask, first_kept, prompt_length)
        token_weights = features.get("token_weights_sum")
        mean = None
        vectors = []
        for mode in self.modes:
            if mode == "cls":
                cls = features.get("cls_token_embeddings")
                vectors.append(cls if cls is not None else first_token(x, mask))
            elif mode == "lasttoken":
                vectors.append(last_token(x, mask))
            elif mode == "max":
                vectors.append(F.masked_max(x, mask, backend=self.backend))
            elif mode in ("mean", "mean_sqrt_len_tokens"):
                if mean is None:  # one fused pass serves both mean modes
                    mean = F.masked_mean(x, mask, backend=self.backend)
                if mode == "mean" and token_weights is None:
                    vectors.append(mean)
                else:
                    vectors.append(_rescale_mean(mode, mean, _weight_sum(x, mask), token_weights, x.dtype))
            elif mode == "weightedmean":
                positions = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=torch.float32)
                weights = (mask != 0).float() * (positions - first_kept.unsqueeze(1))
                weighted = F.masked_mean(x, weights, backend=self.backend)
                if token_weights is not None:
                    weighted = _rescale_mean(
                        "mean", weighted, weights.sum(1, keepdim=True), token_weights, x.dtype
                    )
                vectors.append(weighted)
        return vectors

    def _flattened(self, x: Tensor, features: dict, prompt_length: int | None) -> list[Tensor]:
        tokens = x.reshape(-1, x.shape[-1])  # (1, T, H) -> (T, H)
        cu_seqlens = features["cu_seq_lens_q"]
        if prompt_length:
            tokens, cu_seqlens = _drop_prompt_tokens(tokens, cu_seqlens, prompt_length)
        varlen = dict(cu_seqlens=cu_seqlens, backend=self.backend)
        if "mean_sqrt_len_tokens" in self.modes:  # it needs the lengths
            starts, ends = segment_bounds(cu_seqlens, tokens.shape[0])
            lengths = (ends - starts).unsqueeze(1).to(torch.float32)
        mean = None
        vectors = []
        for mode in self.modes:
            if mode == "cls":
                cls = features.get("cls_token_embeddings")
                vectors.append(cls if cls is not None else first_token(tokens, cu_seqlens=cu_seqlens))
            elif mode == "lasttoken":
                vectors.append(last_token(tokens, cu_seqlens=cu_seqlens))
            elif mode == "max":
                vectors.append(F.masked_max(tokens, **varlen))
            elif mode in ("mean", "mean_sqrt_len_tokens"):
                if mean is None:  # one fused pass serves both mean modes
                    mean = F.masked_mean(tokens, **varlen)
                vectors.append(
                    mean if mode == "mean" else _rescale_mean(mode, mean, lengths, None, tokens.dtype)
                )
            elif mode == "weightedmean":
                # Weights 1..n within each sequence (the dropped prompt's tokens keep their positions),
                # (T,) per-token weights to the fused mean: sum(w x) / sum(w), no (T, H) temporary.
                weights = position_weights(tokens, None, cu_seqlens, offset=prompt_length or 0)
                vectors.append(F.masked_mean(tokens, weights, **varlen))
        return vectors


# sentence-transformers records a module's class in modules.json as `type(module).__module__` (v5)
# or f"{__module__}.{__name__}" (v6), and v6 imports classes outside its namespace only with
# trust_remote_code. Presenting its own classic path keeps saved models loadable anywhere, with or
# without fused_pool; __reduce__ above keeps pickling by this module.
Pooling.__module__ = "sentence_transformers.models.Pooling"


def _restore(cls: type[Pooling] | None, config: dict, backend: str | None, training: bool) -> Pooling:
    module = (cls or Pooling)(**config, backend=backend)
    module.train(training)
    return module


# --- sentence-transformers' Pooling as a second base class ------------------------------------------

_UNRESOLVED = object()
_stock_pooling: Any = _UNRESOLVED
_WITH_STOCK_BASE: dict[type, type] = {}  # fused_pool's class -> the same with the stock base added
_EXTENDED: dict[type, type] = {}  # the other way round


def sentence_transformers_pooling() -> type | None:
    """sentence-transformers' own Pooling class, imported on the first call; None where
    sentence-transformers is not installed (a RuntimeWarning where it is installed but fails to import)."""
    global _stock_pooling
    if _stock_pooling is _UNRESOLVED:
        _stock_pooling = _import_sentence_transformers_pooling()
    return _stock_pooling


def _import_sentence_transformers_pooling() -> type | None:
    try:
        installed = importlib.util.find_spec("sentence_transformers") is not None
    except (ImportError, ValueError):  # blocked (sys.modules entry None) or a broken parent
        installed = False
    if not installed:
        return None
    try:
        try:  # sentence-transformers >= 5.4 moved the module; older versions keep the classic path
            from sentence_transformers.sentence_transformer.modules.pooling import Pooling as stock
        except ImportError:
            from sentence_transformers.models import Pooling as stock
    except Exception as error:  # any failure inside its import: fused_pool's Pooling still works alone
        warnings.warn(
            f"sentence-transformers is installed but its Pooling does not import ({error!r}): "
            "fused_pool.nn.Pooling is not an instance of it, and sentence-transformers cannot use it",
            RuntimeWarning,
            stacklevel=5,
        )
        return None
    if issubclass(stock, Pooling):
        raise RuntimeError(
            "sentence-transformers' Pooling was replaced by fused_pool's before fused_pool found the "
            "original: import fused_pool.integrations.sentence_transformers before replacing it"
        )
    return stock


def with_sentence_transformers_base(cls: type[Pooling]) -> type[Pooling]:
    """cls, or where sentence-transformers is installed, a subclass of cls and of sentence-transformers'
    Pooling (made once per class, with cls's name and module, so it saves as cls does)."""
    stock = sentence_transformers_pooling()
    if stock is None or issubclass(cls, stock):
        return cls
    combined = _WITH_STOCK_BASE.get(cls)
    if combined is None:
        names = dict(__module__=cls.__module__, __qualname__=cls.__qualname__, __doc__=cls.__doc__)
        combined = types.new_class(
            cls.__name__, (cls, stock), exec_body=lambda namespace: namespace.update(names)
        )
        _WITH_STOCK_BASE[cls] = combined
        _EXTENDED[combined] = cls
    return combined


def _rescale_mean(
    mode: str, mean: Tensor, count: Tensor, token_weights_sum: Tensor | None, dtype: torch.dtype
) -> Tensor:
    """mean = sum / count -> sum / sqrt(count) (mean_sqrt_len_tokens), or sum / token_weights_sum
    (sentence-transformers' WordWeights feature) in either mode."""
    total = mean.float() * count
    if token_weights_sum is not None:
        denominator = token_weights_sum.unsqueeze(-1).to(
            torch.promote_types(torch.float32, token_weights_sum.dtype)
        )
        dtype = torch.promote_types(dtype, token_weights_sum.dtype)
    else:
        denominator = count
    denominator = torch.clamp(denominator, min=1e-9)
    out = total / (denominator if mode == "mean" else denominator.sqrt())
    return out.to(dtype)


def _weight_sum(x: Tensor, mask: Tensor | None) -> Tensor:
    """(B, 1) float32 sum of the mean's weights: the kept-token count, or the floating mask's sum."""
    if mask is None:
        return torch.full((x.shape[0], 1), float(x.shape[1]), device=x.device)
    if mask.is_floating_point():
        return mask.sum(1, keepdim=True, dtype=torch.float32)
    return (mask != 0).sum(1, keepdim=True).float()


def _exclude_prompt(mask: Tensor, first_kept: Tensor, prompt_length: int) -> Tensor:
    """A copy of the mask without each sequence's first prompt_length tokens (after left padding)."""
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    return mask.masked_fill(positions < (first_kept + prompt_length).unsqueeze(1), 0)


def _drop_prompt_tokens(tokens: Tensor, cu_seqlens: Tensor, prompt_length: int) -> tuple[Tensor, Tensor]:
    """Packed tokens without each sequence's first prompt_length tokens, and their cu_seqlens."""
    starts, ends = segment_bounds(cu_seqlens, tokens.shape[0])
    kept_lengths = (ends - starts - prompt_length).clamp(min=0)
    token_ids = torch.arange(tokens.shape[0], device=tokens.device)
    sequence = torch.searchsorted(ends, token_ids, right=True).clamp(max=max(len(ends) - 1, 0))
    inside = (token_ids >= starts[sequence] + prompt_length) & (token_ids < ends[sequence])
    new_cu = torch.nn.functional.pad(kept_lengths.cumsum(0), (1, 0)).to(cu_seqlens.dtype)
    return tokens[inside], new_cu
