// Python bindings of mlaserve.worker.kernels._C — bindings only; the kernels live in their own files.
// Everything crosses as integers (data pointers, sizes, strides, the CUDA stream handle), so the
// extension links no torch. Errors come back as RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "api.h"
#include "config.h"

namespace py = pybind11;

namespace {

void set_device(int device) { mla::check_cuda(cudaSetDevice(device), "cudaSetDevice"); }

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void get_mla_metadata(int device, uintptr_t seqlens, int b, int num_parts, int split_cost, int mode,
                      uintptr_t metadata, uintptr_t num_splits, uintptr_t stream) {
  set_device(device);
  mla::launch_mla_metadata(reinterpret_cast<const int*>(seqlens), b, num_parts, split_cost, mode,
                           reinterpret_cast<int*>(metadata), reinterpret_cast<int*>(num_splits), as_stream(stream));
}

void check_schedule(int schedule) {
  if (schedule < mla::kSchedAuto || schedule > mla::kSchedTrio) {
    throw std::invalid_argument("mlaserve._C: schedule must be 0 (auto), 1 (solo) or 2 (trio), got " +
                                std::to_string(schedule));
  }
}

int resolve_schedule(int schedule, int rows) {
  check_schedule(schedule);
  if (rows < 1) throw std::invalid_argument("mlaserve._C: rows must be >= 1, got " + std::to_string(rows));
  return mla::resolve_schedule(schedule, rows);
}

void mla_decode(int device, uintptr_t q, int64_t q_stride_b, int64_t q_stride_s, int64_t q_stride_h,
                uintptr_t k_cache, int64_t k_stride_page, int64_t k_stride_token, int64_t k_stride_head,
                int64_t num_pages, uintptr_t block_table, int64_t bt_stride_b, uintptr_t seqlens,
                uintptr_t tile_metadata, uintptr_t num_splits, int num_parts, uintptr_t out, int64_t o_stride_b,
                int64_t o_stride_s, int64_t o_stride_h, uintptr_t lse, uintptr_t o_accum, uintptr_t lse_accum, int b,
                int s_q, int h_q, int h_kv, float scale, bool causal, bool pdl, int schedule, uintptr_t stream) {
  set_device(device);
  mla::DecodeArgs a;
  a.q = reinterpret_cast<const void*>(q);
  a.q_stride_b = q_stride_b;
  a.q_stride_s = q_stride_s;
  a.q_stride_h = q_stride_h;
  a.k_cache = reinterpret_cast<const void*>(k_cache);
  a.k_stride_page = k_stride_page;
  a.k_stride_token = k_stride_token;
  a.k_stride_head = k_stride_head;
  a.num_pages = num_pages;
  a.block_table = reinterpret_cast<const int*>(block_table);
  a.bt_stride_b = bt_stride_b;
  a.seqlens = reinterpret_cast<const int*>(seqlens);
  a.tile_metadata = reinterpret_cast<const int*>(tile_metadata);
  a.num_splits = reinterpret_cast<const int*>(num_splits);
  a.num_parts = num_parts;
  a.out = reinterpret_cast<void*>(out);
  a.o_stride_b = o_stride_b;
  a.o_stride_s = o_stride_s;
  a.o_stride_h = o_stride_h;
  a.lse = reinterpret_cast<float*>(lse);
  a.o_accum = reinterpret_cast<float*>(o_accum);
  a.lse_accum = reinterpret_cast<float*>(lse_accum);
  a.b = b;
  a.s_q = s_q;
  a.h_q = h_q;
  a.h_kv = h_kv;
  a.scale = scale;
  a.causal = causal;
  a.pdl = pdl;
  check_schedule(schedule);
  a.schedule = schedule;
  mla::launch_mla_decode(a, as_stream(stream));
}

int num_sms(int device) { return mla::num_sms(device); }

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mlaserve paged MLA decode kernels for Hopper (sm_90a); takes raw pointers, links no torch";
  m.attr("ARCH") = "sm_90a";
  m.attr("PAGE_SIZE") = mla::kPageSize;
  m.attr("BLOCK_M") = mla::kBlockM;
  m.attr("METADATA_FIELDS") = mla::kMetadataFields;
  m.attr("MAX_BATCH") = mla::kMaxBatchMetadata;
  m.def("get_mla_metadata", &get_mla_metadata, "GPU split-KV plan from cache_seqlens", py::arg("device"),
        py::arg("seqlens"), py::arg("b"), py::arg("num_parts"), py::arg("split_cost"), py::arg("mode"),
        py::arg("metadata"), py::arg("num_splits"),
        py::arg("stream"));
  m.def("mla_decode", &mla_decode, "split-KV paged MLA decode + combine", py::arg("device"), py::arg("q"),
        py::arg("q_stride_b"), py::arg("q_stride_s"), py::arg("q_stride_h"), py::arg("k_cache"),
        py::arg("k_stride_page"), py::arg("k_stride_token"), py::arg("k_stride_head"), py::arg("num_pages"),
        py::arg("block_table"), py::arg("bt_stride_b"), py::arg("seqlens"), py::arg("tile_metadata"),
        py::arg("num_splits"), py::arg("num_parts"), py::arg("out"), py::arg("o_stride_b"), py::arg("o_stride_s"),
        py::arg("o_stride_h"), py::arg("lse"), py::arg("o_accum"), py::arg("lse_accum"), py::arg("b"),
        py::arg("s_q"), py::arg("h_q"), py::arg("h_kv"), py::arg("scale"), py::arg("causal"), py::arg("pdl"),
        py::arg("schedule"), py::arg("stream"));
  m.def("resolve_schedule", &resolve_schedule,
        "the consumer schedule a launch runs: (requested schedule, query rows per KV head) -> 1 (solo) or 2 (trio)",
        py::arg("schedule"), py::arg("rows"));
  m.def("num_sms", &num_sms, "multiprocessor count of a device", py::arg("device"));
}
