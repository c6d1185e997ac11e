"""fused_pool.nn.MAPHead against the Hugging Face heads it replaces (SigLIP, SigLIP2 with its mask,
AIMv2), built offline from small configs with every parameter perturbed, and against an unfused
nn.MultiheadAttention head for several probes: outputs, gradients of the input and of every
parameter, state_dict names, masks, varlen, empty sequences, argument checks."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    assert_close,
    assert_within_reference_error,
    cpu_kernel_backends,
    make_generator,
    poison_padding,
)
from torch import nn

from fused_pool.nn import MAPHead

pytest.importorskip("transformers")
from transformers import Aimv2VisionConfig, Siglip2VisionConfig, SiglipVisionConfig  # noqa: E402
from transformers.models.aimv2.modeling_aimv2 import Aimv2AttentionPoolingHead  # noqa: E402
from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead  # noqa: E402
from transformers.models.siglip2.modeling_siglip2 import Siglip2MultiheadAttentionPoolingHead  # noqa: E402

HIDDEN, HEADS, INTERMEDIATE = 48, 4, 40  # head_dim 12, an MLP width that is not 4 H


BACKENDS = cpu_kernel_backends("probe_attention")  # torch, and the fused backends with its kernels here
DTYPES = [torch.float32, torch.bfloat16]


def _perturbed(head: nn.Module, seed: int) -> nn.Module:
    """Every parameter moved off its initial value (LayerNorm weight 1 and zero biases included)."""
    gen = make_generator(seed)
    with torch.no_grad():
        for param in head.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return head


def hf_head(kind: str, seed: int = 0, qkv_bias: bool = True) -> nn.Module:
    """A randomly initialized Hugging Face head: "siglip", "siglip2" or "aimv2"."""
    torch.manual_seed(seed)
    sizes = dict(hidden_size=HIDDEN, num_attention_heads=HEADS, intermediate_size=INTERMEDIATE)
    if kind == "aimv2":
        return _perturbed(Aimv2AttentionPoolingHead(Aimv2VisionConfig(qkv_bias=qkv_bias, **sizes)), seed)
    if kind == "siglip":
        return _perturbed(SiglipMultiheadAttentionPoolingHead(SiglipVisionConfig(**sizes)), seed)
    # Siglip2 ignores its mask when the config names no attention implementation (a bare config).
    config = Siglip2VisionConfig(attn_implementation="sdpa", **sizes)
    return _perturbed(Siglip2MultiheadAttentionPoolingHead(config), seed)


def map_head_of(head: nn.Module, backend: str) -> MAPHead:
    """MAPHead over a copy of head (from_* shares the parameters; the tests compare two sets)."""
    head = copy.deepcopy(head)
    if isinstance(head, Aimv2AttentionPoolingHead):
        return MAPHead.from_aimv2(head, backend=backend)
    return MAPHead.from_siglip(head, backend=backend)


def holes_mask(batch: int, length: int, seed: int) -> torch.Tensor:
    """(B, L) int mask with random holes, a single kept token in row 1, every row nonempty."""
    keep = torch.rand(batch, length, generator=make_generator(seed)) > 0.4
    keep[:, 0] = True
    keep[1] = False
    keep[1, length // 2] = True
    return keep.long()


def outputs_and_grads(module: nn.Module, x: torch.Tensor, grad: torch.Tensor, *args, **kwargs):
    """module(x, ...) and the gradients of <out, grad> to x and to every named parameter (zeros for
    a parameter the output does not depend on)."""
    x = x.detach().requires_grad_()
    names, params = zip(*module.named_parameters(), strict=True)
    out = module(x, *args, **kwargs)
    grads = torch.autograd.grad(out, (x, *params), grad, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, (x, *params), strict=True)]
    return out.detach(), dict(zip(("input", *names), grads, strict=True))


def assert_parity(candidate, source, x, grad, *args, **kwargs):
    """candidate (at x's dtype) against source at x's dtype and in float64: outputs and every
    gradient within twice the source's own error (flash-attention's rule)."""
    dtype = x.dtype
    out, grads = outputs_and_grads(candidate.to(dtype), x, grad, *args, **kwargs)
    ref_out, ref_grads = outputs_and_grads(source.to(dtype), x, grad, *args, **kwargs)
    exact_out, exact_grads = outputs_and_grads(source.double(), x.double(), grad.double(), *args, **kwargs)
    assert out.dtype == dtype and out.shape == exact_out.shape
    assert_within_reference_error(out, ref_out, exact_out, dtype)
    assert grads.keys() == exact_grads.keys()
    for name, exact in exact_grads.items():
        try:
            assert_within_reference_error(grads[name], ref_grads[name], exact, dtype)
        except AssertionError as error:
            raise AssertionError(f"gradient of {name}: {error}") from None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["siglip", "siglip2", "aimv2"])
def test_matches_hugging_face_head(kind, backend, dtype):
    head = hf_head(kind, seed=1)
    gen = make_generator(2)
    x = torch.randn(3, 13, HIDDEN, generator=gen).to(dtype)
    grad = torch.randn(3, HIDDEN, generator=gen).to(dtype)
    assert_parity(map_head_of(head, backend), head, x, grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_siglip2_mask_with_holes(backend, dtype):
    head = hf_head("siglip2", seed=3)
    gen = make_generator(4)
    x = torch.randn(4, 11, HIDDEN, generator=gen).to(dtype)
    grad = torch.randn(4, HIDDEN, generator=gen).to(dtype)
    for mask in (holes_mask(4, 11, seed=5), holes_mask(4, 11, seed=5).bool()):
        assert_parity(map_head_of(head, backend), head, x, grad, mask)


@pytest.mark.parametrize("backend", BACKENDS)
def test_aimv2_without_qkv_bias(backend):
    head = hf_head("aimv2", seed=6, qkv_bias=False)
    gen = make_generator(7)
    x, grad = torch.randn(2, 9, HIDDEN, generator=gen), torch.randn(2, HIDDEN, generator=gen)
    assert_parity(map_head_of(head, backend), head, x, grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["siglip2", "aimv2"])
def test_padding_is_never_read(kind, backend):
    module = map_head_of(hf_head(kind, seed=8), backend)
    mask = holes_mask(3, 10, seed=9)
    x = torch.randn(3, 10, HIDDEN, generator=make_generator(10))
    grad = torch.randn(3, HIDDEN, generator=make_generator(11))
    clean_out, clean_grads = outputs_and_grads(module, x, grad, mask)
    out, grads = outputs_and_grads(module, poison_padding(x.clone(), mask), grad, mask)
    assert_close(out, clean_out, exact=True)
    for name, clean in clean_grads.items():
        assert_close(grads[name], clean, exact=True, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["siglip2", "aimv2"])
def test_empty_sequence_attends_to_one_zero_token(kind, backend):
    """No kept token: the tokens pool to 0, so the row equals the source head on one zero token."""
    head = hf_head(kind, seed=12).double()
    module = map_head_of(head, backend)
    mask = holes_mask(3, 8, seed=13)
    mask[2] = 0
    x = torch.randn(3, 8, HIDDEN, generator=make_generator(14), dtype=torch.float64)
    grad = torch.zeros(3, HIDDEN, dtype=torch.float64)
    grad[2] = torch.randn(HIDDEN, generator=make_generator(15), dtype=torch.float64)
    out, grads = outputs_and_grads(module, x, grad, mask)
    assert_close(out[2], head(torch.zeros(1, 1, HIDDEN, dtype=torch.float64))[0], dtype=torch.float32)
    assert torch.all(grads["input"] == 0)  # nothing flows into the tokens or the probe side
    for name in ("probe", "cls_token"):
        if name in grads:
            assert torch.all(grads[name] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["siglip", "aimv2", "native"])
def test_varlen_equals_padded(kind, backend):
    if kind == "native":
        module = native_head(num_probes=3, backend=backend)
    else:
        module = map_head_of(hf_head(kind, seed=16), backend)
    module.double()  # the same numbers both ways, whatever the summation order
    lengths = [5, 1, 9, 3]
    gen = make_generator(17)
    x = torch.randn(len(lengths), max(lengths), HIDDEN, generator=gen, dtype=torch.float64)
    mask = (torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]).long()
    grad = torch.randn(module(x, mask).shape, generator=gen, dtype=torch.float64)
    padded_out, padded_grads = outputs_and_grads(module, x, grad, mask)
    packed = x[mask.bool()]
    cu_seqlens = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    for tokens in (packed, packed[None]):  # (T, H) and a flattening collator's (1, T, H)
        out, grads = outputs_and_grads(module, tokens, grad, cu_seqlens=cu_seqlens)
        assert_close(out, padded_out)
        assert_close(grads["input"].reshape(packed.shape), padded_grads["input"][mask.bool()])
        for name in padded_grads.keys() - {"input"}:
            assert_close(grads[name], padded_grads[name], msg=name)


@pytest.mark.parametrize("kind", ["siglip", "siglip2", "aimv2"])
def test_state_dict_names_and_round_trip(kind):
    head = hf_head(kind, seed=18)
    module = map_head_of(head, "torch")
    assert list(module.state_dict()) == list(head.state_dict())
    # A checkpoint of the source head loads unchanged into a head taken over from another one.
    other = map_head_of(hf_head(kind, seed=19), "torch")
    other.load_state_dict(head.state_dict())
    x = torch.randn(2, 6, HIDDEN, generator=make_generator(20))
    assert_close(other(x), head(x), dtype=torch.float32)
    if kind != "aimv2":  # a new MAPHead has SigLIP's names: checkpoints load both ways
        native = MAPHead(HIDDEN, HEADS, intermediate_size=INTERMEDIATE, backend="torch")
        assert list(native.state_dict()) == list(head.state_dict())
        native.load_state_dict(head.state_dict())
        assert_close(native(x), head(x), dtype=torch.float32)
        fresh = hf_head(kind, seed=21)
        fresh.load_state_dict(native.state_dict())
        assert_close(fresh(x), head(x), dtype=torch.float32)


@pytest.mark.parametrize("kind", ["siglip", "aimv2"])
def test_shares_the_source_parameters_and_trains_them(kind):
    head = hf_head(kind, seed=22).double()
    module = MAPHead.from_aimv2(head) if kind == "aimv2" else MAPHead.from_siglip(head)
    module.backend = "torch"
    assert all(a is b for a, b in zip(module.parameters(), head.parameters(), strict=True))
    x = torch.randn(2, 7, HIDDEN, generator=make_generator(23), dtype=torch.float64)
    before = head(x).detach()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01)
    module(x).square().sum().backward()
    optimizer.step()
    after = head(x).detach()
    assert (after - before).abs().max() > 1e-3
    assert_close(module(x).detach(), after, dtype=torch.float32)  # float64 up to the fold's rounding


# --- new heads: several probes, against nn.MultiheadAttention unfused -------------------------------


def native_head(num_probes: int, backend: str = "torch", seed: int = 24) -> MAPHead:
    torch.manual_seed(seed)
    return _perturbed(MAPHead(HIDDEN, HEADS, num_probes, mlp_ratio=1.5, backend=backend), seed)


def unfused_head(module: MAPHead) -> nn.Module:
    """The same head computed the plain way: nn.MultiheadAttention's own forward over the tokens."""

    class Unfused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.probe, self.attention = module.probe, module.attention
            self.layernorm, self.mlp = module.layernorm, module.mlp

        def forward(self, x, mask=None):
            probes = self.probe.expand(x.shape[0], -1, -1)
            padding = None if mask is None else mask == 0
            out = self.attention(probes, x, x, key_padding_mask=padding, need_weights=False)[0]
            out = out + self.mlp(self.layernorm(out))
            return out[:, 0] if out.shape[1] == 1 else out

    return Unfused()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_probes", [1, 4])
def test_several_probes_match_unfused_attention(num_probes, backend, dtype):
    module = native_head(num_probes, backend)
    reference = unfused_head(copy.deepcopy(module))
    gen = make_generator(25)
    x = torch.randn(3, 12, HIDDEN, generator=gen).to(dtype)
    mask = holes_mask(3, 12, seed=26)
    shape = (3, num_probes, HIDDEN)
    grad = torch.randn(shape, generator=gen).to(dtype)
    if num_probes == 1:  # one probe gives (B, H), as the Hugging Face heads
        grad = grad[:, 0]
    assert_parity(module, reference, x, grad, mask)


def test_compiles_fullgraph():
    module = native_head(num_probes=2)
    x = torch.randn(2, 5, HIDDEN, generator=make_generator(27))
    mask = holes_mask(2, 5, seed=28)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, mask), module(x, mask))


# --- argument checks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        (dict(hidden_size=0, num_heads=1), ValueError, "hidden_size"),
        (dict(hidden_size=48.0, num_heads=4), TypeError, "hidden_size"),
        (dict(hidden_size=48, num_heads=5), ValueError, "num_heads"),
        (dict(hidden_size=48, num_heads=True), TypeError, "num_heads"),
        (dict(hidden_size=48, num_heads=4, num_probes=0), ValueError, "num_probes"),
        (dict(hidden_size=48, num_heads=4, num_probes=65), ValueError, "num_probes"),
        (dict(hidden_size=48, num_heads=4, num_probes=1.5), TypeError, "num_probes"),
        (dict(hidden_size=48, num_heads=4, mlp_ratio="4"), TypeError, "mlp_ratio"),
        (dict(hidden_size=48, num_heads=4, mlp_ratio=0.0), ValueError, "mlp_ratio"),
        (dict(hidden_size=48, num_heads=4, intermediate_size=0), ValueError, "intermediate_size"),
        (dict(hidden_size=48, num_heads=4, backend="gpu"), ValueError, "backend"),
    ],
)
def test_constructor_checks(kwargs, error, name):
    with pytest.raises(error, match=name):
        MAPHead(**kwargs)


def test_from_checks_name_the_head():
    siglip, aimv2 = hf_head("siglip"), hf_head("aimv2")
    with pytest.raises(TypeError, match="head must be a SiglipMultiheadAttentionPoolingHead"):
        MAPHead.from_siglip(aimv2)
    with pytest.raises(TypeError, match="head must be an Aimv2AttentionPoolingHead"):
        MAPHead.from_aimv2(siglip)
    with pytest.raises(TypeError, match="head must be"):
        MAPHead.from_siglip(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="backend"):
        MAPHead.from_siglip(siglip, backend="gpu")
    siglip.attention.dropout = 0.1
    with pytest.raises(ValueError, match="head.attention"):
        MAPHead.from_siglip(siglip)
    aimv2.cls_token = nn.Parameter(torch.zeros(1, 2, HIDDEN))
    with pytest.raises(ValueError, match="head.cls_token"):
        MAPHead.from_aimv2(aimv2)


def test_forward_checks():
    module = native_head(num_probes=1)
    x = torch.randn(2, 5, HIDDEN)
    with pytest.raises(TypeError, match="hidden_states"):
        module(x.numpy())
    with pytest.raises(ValueError, match="mask"):
        module(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match="hidden_states"):
        module(torch.randn(2, 5, HIDDEN + 1))
