// The extension's op schemas (kernels: csrc/cpu, csrc/cuda; fake kernels and autograd are registered
// from Python in fused_pool/ops.py) and the Python module fused_pool._C.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fused_pool, m) {
  // Where the fake kernels live, so that torch.compile finds them without importing by hand.
  m.impl_abstract_pystub("fused_pool.ops");
  m.def(
      "ext_pool_fwd(Tensor x, Tensor? mask, Tensor? cu_seqlens, int? max_seqlen, int mode)"
      " -> (Tensor, Tensor, Tensor)");
  m.def(
      "ext_pool_bwd(Tensor grad_out, Tensor? mask, Tensor? cu_seqlens, Tensor den, Tensor argmax,"
      " SymInt[] x_shape, ScalarType x_dtype, int mode) -> Tensor");
  m.def(
      "ext_attention_fwd(Tensor x, Tensor scores, Tensor? mask, Tensor? cu_seqlens, int? max_seqlen)"
      " -> (Tensor, Tensor)");
  m.def(
      "ext_attention_bwd(Tensor grad_out, Tensor x, Tensor scores, Tensor? mask, Tensor? cu_seqlens,"
      " Tensor out, Tensor stats) -> (Tensor, Tensor)");
  m.def(
      "ext_query_attention_fwd(Tensor x, Tensor query, Tensor? mask, Tensor? cu_seqlens, int? max_seqlen,"
      " float scale) -> (Tensor, Tensor)");
  m.def(
      "ext_query_attention_bwd(Tensor grad_out, Tensor x, Tensor query, Tensor? mask, Tensor? cu_seqlens,"
      " Tensor out, Tensor stats, float scale) -> (Tensor, Tensor)");
  m.def("ext_span_fwd(Tensor x, Tensor spans, Tensor? mask, int mode) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ext_span_bwd(Tensor grad_out, Tensor spans, Tensor? mask, Tensor den, Tensor argmax, SymInt[] x_shape,"
      " ScalarType x_dtype, int mode) -> Tensor");
  // probe_attention, linear
  m.def(
      "ext_probe_attention_fwd(Tensor x, Tensor probes, Tensor? mask, Tensor? cu_seqlens, int? max_seqlen,"
      " float scale) -> (Tensor, Tensor)");
  m.def(
      "ext_probe_attention_bwd(Tensor grad_out, Tensor x, Tensor probes, Tensor? mask, Tensor? cu_seqlens,"
      " Tensor out, Tensor stats, float scale) -> (Tensor, Tensor)");
  m.def(
      "ext_linear_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? mask, Tensor? cu_seqlens, int? max_seqlen,"
      " int mode, int activation) -> (Tensor, Tensor, Tensor)");
  m.def(
      "ext_linear_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor? mask, Tensor? cu_seqlens,"
      " Tensor den, Tensor argmax, int mode, int activation) -> (Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "fused_pool C++/CUDA kernels; the ops are torch.ops.fused_pool.ext_*";
  module.def("has_cuda", [] {
#ifdef FUSED_POOL_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
