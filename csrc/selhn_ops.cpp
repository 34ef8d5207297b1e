// The op schemas of the compiled backends, declared once: one op per kernel-interface
// function, with a CPU and a CUDA implementation registered under the same name by
// TORCH_LIBRARY_IMPL (selhn_cpu.cpp, selhn_cuda.cu), so the dispatcher picks the device.
// Loading the library registers them. The minimal PyInit__C lets ``import selhn_ext._C``
// load it.
#include <Python.h>
#include <torch/library.h>

// The functions of the kernel interface (selhn_ext/kernel_interface.py): partials returns
// the row statistics then the column (un-finalised) statistics, each as max, arg (int64),
// hinge_sum, active (int32).
TORCH_LIBRARY(selhn, m) {
  m.def(
      "partials(Tensor rows, Tensor cols, Tensor col_pos, int row_offset, Tensor? row_ids, "
      "Tensor? col_ids, float margin, bool deterministic, bool allow_tf32) -> (Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "dense_backward(Tensor rows, Tensor cols, Tensor col_pos, int row_offset, "
      "Tensor? row_ids, Tensor? col_ids, float margin, Tensor row_coef, Tensor col_coef, "
      "Tensor row_gated, Tensor col_gated, bool deterministic, bool allow_tf32) -> "
      "(Tensor, Tensor)");
  // CPU only (the CUDA backend keeps the PyTorch glue): the hardest-negative pairs and the
  // diagonal added to the dense gradients in place; each side's weights are upstream,
  // hardest_index, dense_weight, hard_weight, active (kernel_interface.AnchorWeights).
  m.def(
      "sparse_and_diagonal_backward(Tensor rows, Tensor cols, int row_offset, "
      "Tensor(a!) grad_rows, Tensor(b!) grad_cols, Tensor row_upstream, "
      "Tensor row_hardest_index, Tensor row_dense_weight, Tensor row_hard_weight, "
      "Tensor row_active, Tensor col_upstream, Tensor col_hardest_index, "
      "Tensor col_dense_weight, Tensor col_hard_weight, Tensor col_active) -> ()");
}

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                   "Compiled SelHN kernels; loading registers torch.ops.selhn.",
                                   -1, nullptr};
  return PyModule_Create(&module_def);
}
