// The fedkseed operator library: each op is declared once here; csrc/cpu and csrc/cuda register
// one implementation per device. Python wrappers live in fedkseed/ops.py.
#include <torch/library.h>
#include <Python.h>

// Importing fedkseed._C from Python loads this library and so runs the registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fedkseed, m) {
  // x <- cast(float32(x) * decay[t] + sum_k alphas[k] * z(seeds[k], offsets[t] + j)) for every
  // element j of every params[t] (docs/stream-spec.md#accumulation), K = seeds.numel() seeds in one pass.
  //   offsets: global offset of each tensor (int64, two's complement of uint64)
  //   decay:   one factor per tensor, or empty for no decay
  //   seeds:   int64 [K] (two's complement of uint64); alphas: float32 [K]; both on the
  //            params' device, so a step needs no host synchronisation
  //   dist:    the stream tag (0 gaussian, 1 rademacher)
  //   rounding_seed: int64 [1] selects stochastic rounding for bfloat16/float16 (tag 2);
  //            None rounds to nearest even
  //   mask:    uint8 magnitude mask (magnitude_mask's layout, on the params' device): only elements
  //            whose bit is 1 are written (docs/stream-spec.md#magnitude-mask); None updates all
  m.def(
      "replay_(Tensor(a!)[] params, int[] offsets, float[] decay, Tensor seeds, Tensor alphas, "
      "int dist, Tensor? rounding_seed, Tensor? mask=None) -> ()");
  // out[j] = z(seed, offset + j) as float32 for j < out.numel(); seed is int64 [1].
  m.def("noise_(Tensor(a!) out, Tensor seed, int offset, int dist) -> ()");
  // p_k = sum_i x_i z(seeds[k], i) over every element of params (docs/stream-spec.md#projection),
  // K = seeds.numel() seeds in one pass, returned as the exact accumulator of the chunk partials:
  // int64 [K, 19] (fedkseed/reference.py finish_projection rounds it to float64; a sharded set
  // all-reduces it first).
  m.def("project(Tensor[] params, int[] offsets, Tensor seeds, int dist) -> Tensor");
  // The magnitude mask (docs/stream-spec.md#magnitude-mask): uint8 [sum_t ceil(numel_t / 8)] on the
  // params' device, bit j & 7 of byte B_t + (j >> 3) set iff |float32(params[t][j])| <=
  // float32(thresholds[t]) (NaN never); each tensor's bits start on a byte boundary.
  m.def("magnitude_mask(Tensor[] params, float[] thresholds) -> Tensor");
}
