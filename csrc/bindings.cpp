// Python face of the native core: converts arguments, buffers, results and errors.
// With tensor_records.cpp the only file that sees Python; all I/O happens with the GIL
// released.
#include <pybind11/eval.h>
#include <pybind11/pybind11.h>

#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "chunks.h"
#include "codec.h"
#include "status.h"
#include "tensor_records.h"

namespace py = pybind11;
using dckpt::ChunkRecord;
using dckpt::Kind;
using dckpt::Status;

namespace {

const char* const kChunkErrorSource = R"(
class ChunkError(Exception):
    """A chunk could not be written, read or verified.

    kind: "invalid_argument", "invalid_record", "missing_file", "out_of_bounds",
    "stored_hash", "raw_hash", "corrupt_frame" or "io". path, buffer_index,
    chunk_index and offset say where (None / -1 when unknown); expected and actual
    are the hashes of a mismatch, else None.
    """

    def __init__(self, message, kind="io", path=None, buffer_index=-1, chunk_index=-1,
                 offset=-1, expected=None, actual=None):
        super().__init__(message)
        self.kind = kind
        self.path = path
        self.buffer_index = buffer_index
        self.chunk_index = chunk_index
        self.offset = offset
        self.expected = expected
        self.actual = actual

    def __reduce__(self):
        return (type(self), (str(self), self.kind, self.path, self.buffer_index,
                             self.chunk_index, self.offset, self.expected, self.actual))
)";

py::handle chunk_error_type;  // owned by the module; a reference is kept for its lifetime

py::object fs_str(const std::string& path) {
  return py::reinterpret_steal<py::object>(
      PyUnicode_DecodeFSDefaultAndSize(path.data(), static_cast<Py_ssize_t>(path.size())));
}

[[noreturn]] void raise(const Status& s) {
  py::object none = py::none();
  py::object exc = chunk_error_type(
      s.message, dckpt::kind_name(s.kind), s.path.empty() ? none : fs_str(s.path),
      s.buffer_index, s.chunk_index, s.offset, s.has_hashes ? py::int_(s.expected) : none,
      s.has_hashes ? py::int_(s.actual) : none);
  PyErr_SetObject(chunk_error_type.ptr(), exc.ptr());
  throw py::error_already_set();
}

[[noreturn]] void invalid_argument(const std::string& message, int64_t buffer = -1,
                                   int64_t chunk = -1) {
  Status s = Status::error(Kind::InvalidArgument, message);
  s.buffer_index = buffer;
  s.chunk_index = chunk;
  raise(s);
}

// Holds a Py_buffer for the whole call: the exporter stays alive and (bytearray,
// array) cannot be resized while native threads use its memory.
class Buffer {
 public:
  Buffer(py::handle obj, bool writable, const std::string& name) {
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj.ptr(), &view_, flags) != 0) {
      std::string why = py::error_already_set().what();
      invalid_argument(name + (writable ? " is not a writable" : " is not a") +
                       " C-contiguous buffer: " + why);
    }
  }
  ~Buffer() { PyBuffer_Release(&view_); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;

  uint8_t* data() const { return static_cast<uint8_t*>(view_.buf); }
  size_t size() const { return static_cast<size_t>(view_.len); }

 private:
  Py_buffer view_;
};

// An (address, nbytes) pair: writable memory the caller owns and keeps alive for the call.
// Torch tensors have no buffer protocol, and a numpy view of each costs more than a
// small tensor's read.
std::pair<uint8_t*, size_t> to_memory(py::handle obj, const std::string& name) {
  py::tuple t = py::reinterpret_borrow<py::tuple>(obj);
  if (t.size() != 2 || !PyLong_Check(t[0].ptr()) || !PyLong_Check(t[1].ptr()))
    invalid_argument(name + " must be a buffer or an (address, nbytes) pair of ints");
  uintptr_t address = PyLong_AsUnsignedLongLong(t[0].ptr());
  long long size = PyLong_AsLongLong(t[1].ptr());
  bool overflow = PyErr_Occurred() != nullptr;
  PyErr_Clear();
  if (overflow || size < 0 || (address == 0 && size > 0))
    invalid_argument(name + " must name memory: an address and nbytes >= 0 that fit 64 bits");
  return {reinterpret_cast<uint8_t*>(address), static_cast<size_t>(size)};
}

// to_memory for the usual pair of exact ints that name memory, without building its name;
// false for anything else (to_memory then says what is wrong).
bool memory_fast(PyObject* t, uint8_t** data, size_t* size) {
  if (PyTuple_GET_SIZE(t) != 2) return false;
  PyObject* a = PyTuple_GET_ITEM(t, 0);
  PyObject* n = PyTuple_GET_ITEM(t, 1);
  if (!PyLong_CheckExact(a) || !PyLong_CheckExact(n)) return false;
  int overflow = 0;
  unsigned long long address = PyLong_AsUnsignedLongLong(a);
  if (address == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  long long nbytes = PyLong_AsLongLongAndOverflow(n, &overflow);
  if (overflow != 0 || nbytes < 0 || (address == 0 && nbytes > 0)) return false;
  *data = reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(address));
  *size = static_cast<size_t>(nbytes);
  return true;
}

// A list of exact ints in [0, 2^64) into *out; false (out partly filled) for anything else.
bool prev_fast(PyObject* list, std::vector<uint64_t>* out) {
  if (!PyList_CheckExact(list)) return false;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); ++i) {
    PyObject* h = PyList_GET_ITEM(list, i);
    if (!PyLong_CheckExact(h)) return false;
    unsigned long long v = PyLong_AsUnsignedLongLong(h);
    if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
    out->push_back(v);
  }
  return true;
}

py::sequence to_sequence(py::handle obj, const std::string& name) {
  if (!PyList_Check(obj.ptr()) && !PyTuple_Check(obj.ptr()))
    invalid_argument(name + " must be a list or tuple");
  return py::reinterpret_borrow<py::sequence>(obj);
}

std::string to_path(py::handle obj, const std::string& name) {
  py::object fs = py::reinterpret_steal<py::object>(PyOS_FSPath(obj.ptr()));
  if (!fs) {
    PyErr_Clear();
    invalid_argument(name + " must be a str or os.PathLike");
  }
  if (PyUnicode_Check(fs.ptr()))
    fs = py::reinterpret_steal<py::object>(PyUnicode_EncodeFSDefault(fs.ptr()));
  if (!fs) throw py::error_already_set();
  std::string path = py::bytes(fs);
  if (path.find('\0') != std::string::npos) invalid_argument(name + " contains a NUL byte");
  return path;
}

std::vector<std::string> to_paths(py::handle obj) {
  std::vector<std::string> paths;
  for (py::handle p : to_sequence(obj, "paths"))
    paths.push_back(to_path(p, "paths[" + std::to_string(paths.size()) + "]"));
  return paths;
}

// An int field that may not fit: *fits turns false instead of raising, since a
// hostile record is bad data, not a bad argument.
int64_t to_int64(py::handle obj, bool* fits, const std::string& name) {
  int overflow = 0;
  long long v = PyLong_AsLongLongAndOverflow(obj.ptr(), &overflow);
  if (v == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    invalid_argument(name + " must be an int");
  }
  if (overflow != 0) {
    *fits = false;
    return -1;
  }
  return v;
}

uint64_t to_uint64(py::handle obj, bool* fits, const std::string& name) {
  py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(obj.ptr()));
  if (!index) {
    PyErr_Clear();
    invalid_argument(name + " must be an int");
  }
  unsigned long long v = PyLong_AsUnsignedLongLong(index.ptr());
  if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
    PyErr_Clear();
    *fits = false;
    return 0;
  }
  return v;
}

ChunkRecord to_record(py::handle obj, const std::string& name) {
  py::sequence fields = to_sequence(obj, name);
  if (py::len(fields) != 7) invalid_argument(name + " must have 7 fields");
  ChunkRecord r;
  bool& fits = r.representable;
  r.file_index = to_int64(fields[0], &fits, name);
  r.offset = to_int64(fields[1], &fits, name);
  r.stored_len = to_int64(fields[2], &fits, name);
  r.raw_len = to_int64(fields[3], &fits, name);
  r.codec = to_int64(fields[4], &fits, name);
  r.raw_hash = to_uint64(fields[5], &fits, name);
  r.stored_hash = to_uint64(fields[6], &fits, name);
  return r;
}

// The usual record, a tuple (a Chunk) of exact ints that fit, read without pybind's
// conversions or a name built per record (thousands per load); false for anything else,
// which to_record then takes field by field, naming what is wrong.
bool plain_record(PyObject* obj, ChunkRecord* r) {
  if (!PyTuple_Check(obj) || PyTuple_GET_SIZE(obj) != 7) return false;
  int64_t* ints[5] = {&r->file_index, &r->offset, &r->stored_len, &r->raw_len, &r->codec};
  for (int i = 0; i < 5; ++i) {
    PyObject* v = PyTuple_GET_ITEM(obj, i);
    int overflow = 0;
    if (!PyLong_CheckExact(v)) return false;
    *ints[i] = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow != 0) return false;
  }
  uint64_t* hashes[2] = {&r->raw_hash, &r->stored_hash};
  for (int i = 0; i < 2; ++i) {
    PyObject* v = PyTuple_GET_ITEM(obj, 5 + i);
    if (!PyLong_CheckExact(v)) return false;
    *hashes[i] = PyLong_AsUnsignedLongLong(v);
    if (*hashes[i] == static_cast<uint64_t>(-1) && PyErr_Occurred()) {
      PyErr_Clear();
      return false;
    }
  }
  r->representable = true;
  return true;
}

// A list of plain records (see plain_record) into *out; false (out cleared) otherwise.
bool records_fast(PyObject* list, std::vector<ChunkRecord>* out) {
  if (!PyList_CheckExact(list)) return false;
  out->resize(static_cast<size_t>(PyList_GET_SIZE(list)));
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); ++i) {
    if (!plain_record(PyList_GET_ITEM(list, i), &(*out)[static_cast<size_t>(i)])) {
      out->clear();
      return false;
    }
  }
  return true;
}

std::vector<ChunkRecord> to_records(py::handle obj, const std::string& name) {
  std::vector<ChunkRecord> records;
  for (py::handle r : to_sequence(obj, name)) {
    ChunkRecord rec;
    if (!plain_record(r.ptr(), &rec))
      rec = to_record(r, name + "[" + std::to_string(records.size()) + "]");
    records.push_back(rec);
  }
  return records;
}

std::vector<size_t> to_elem_sizes(py::handle obj, size_t expected) {
  py::sequence seq = to_sequence(obj, "elem_sizes");
  if (py::len(seq) != expected)
    invalid_argument("elem_sizes has " + std::to_string(py::len(seq)) + " entries, expected " +
                     std::to_string(expected));
  std::vector<size_t> sizes;
  for (py::handle h : seq) {
    int overflow = 0;  // the usual exact int first: no name is built for it
    long long x = PyLong_CheckExact(h.ptr()) ? PyLong_AsLongLongAndOverflow(h.ptr(), &overflow) : 0;
    if (PyLong_CheckExact(h.ptr()) && overflow == 0 && x >= 1 && x <= dckpt::kMaxChunkSize) {
      sizes.push_back(static_cast<size_t>(x));
      continue;
    }
    bool fits = true;
    int64_t v = to_int64(h, &fits, "elem_sizes[" + std::to_string(sizes.size()) + "]");
    if (!fits || v < 1 || v > dckpt::kMaxChunkSize)
      invalid_argument("elem_sizes[" + std::to_string(sizes.size()) + "] must be in [1, " +
                       std::to_string(dckpt::kMaxChunkSize) + "]");
    sizes.push_back(static_cast<size_t>(v));
  }
  return sizes;
}

void check_threads(int threads) {
  if (threads < 0) invalid_argument("threads must be >= 0");
}

py::tuple to_tuple(const ChunkRecord& r) {
  return py::make_tuple(r.file_index, r.offset, r.stored_len, r.raw_len, r.codec, r.raw_hash,
                        r.stored_hash);
}

// A record as an instance of `type`, a tuple subclass of seven fields (the manifest's Chunk
// named tuple): what Chunk(*to_tuple(r)) gives, without a Python call per chunk.
py::object to_record_of(PyTypeObject* type, const ChunkRecord& r) {
  PyObject* out = type->tp_alloc(type, 7);
  if (out == nullptr) throw py::error_already_set();
  py::object result = py::reinterpret_steal<py::object>(out);
  PyObject* items[7] = {PyLong_FromLongLong(r.file_index), PyLong_FromLongLong(r.offset),
                        PyLong_FromLongLong(r.stored_len), PyLong_FromLongLong(r.raw_len),
                        PyLong_FromLongLong(r.codec), PyLong_FromUnsignedLongLong(r.raw_hash),
                        PyLong_FromUnsignedLongLong(r.stored_hash)};
  for (int i = 0; i < 7; ++i) {
    if (items[i] == nullptr) {
      for (int j = i + 1; j < 7; ++j) Py_XDECREF(items[j]);
      throw py::error_already_set();
    }
    PyTuple_SET_ITEM(out, i, items[i]);
  }
  return result;
}

py::int_ hash64(py::handle obj) {
  Buffer buf(obj, false, "buf");
  // Small buffers (the eager digests of a save's small tensors, a hundred per save) are
  // hashed holding the GIL: releasing and taking it back costs more than their hash.
  if (buf.size() < (size_t{64} << 10)) return py::int_(dckpt::hash64(buf.data(), buf.size()));
  uint64_t h;
  {
    py::gil_scoped_release release;
    h = dckpt::hash64(buf.data(), buf.size());
  }
  return py::int_(h);
}

py::list write_chunks(py::handle path_obj, py::handle buffers_obj, py::handle elem_sizes_obj,
                      int64_t chunk_size, int64_t codec, int level, int threads, bool fsync,
                      int64_t file_index, py::handle prev_obj, bool direct, double duty,
                      bool writeback, py::handle record_type, py::handle reuse_obj) {
  PyTypeObject* record_of = nullptr;  // records as plain tuples
  if (!record_type.is_none()) {
    if (!PyType_Check(record_type.ptr()) ||
        !PyType_IsSubtype(reinterpret_cast<PyTypeObject*>(record_type.ptr()), &PyTuple_Type))
      invalid_argument("record_type must be a tuple subclass (a named tuple of 7 fields)");
    record_of = reinterpret_cast<PyTypeObject*>(record_type.ptr());
  }
  // One path, or a list of files that the writer threads share the chunks between.
  bool several = py::isinstance<py::list>(path_obj) || py::isinstance<py::tuple>(path_obj);
  std::vector<std::string> paths =
      several ? to_paths(path_obj) : std::vector<std::string>{to_path(path_obj, "path")};
  py::sequence buffers = to_sequence(buffers_obj, "buffers");
  size_t n = py::len(buffers);
  std::vector<size_t> elem_sizes = to_elem_sizes(elem_sizes_obj, n);
  check_threads(threads);

  std::vector<std::vector<uint64_t>> prev(n);
  std::vector<bool> has_prev(n, false);
  if (!prev_obj.is_none()) {
    py::sequence lists = to_sequence(prev_obj, "prev_hashes");
    if (py::len(lists) != n) invalid_argument("prev_hashes must have one entry per buffer");
    for (size_t b = 0; b < n; ++b) {
      py::handle list = lists[b];
      if (list.is_none()) continue;
      has_prev[b] = true;
      if (prev_fast(list.ptr(), &prev[b])) continue;
      prev[b].clear();
      std::string name = "prev_hashes[" + std::to_string(b) + "]";
      for (py::handle h : to_sequence(list, name)) {
        bool fits = true;
        prev[b].push_back(to_uint64(h, &fits, name));
        if (!fits) invalid_argument(name + " holds a value outside [0, 2**64)", b);
      }
    }
  }

  std::vector<std::unique_ptr<Buffer>> held;
  std::vector<dckpt::WriteSource> sources;
  for (size_t b = 0; b < n; ++b) {
    py::handle obj = buffers[b];
    auto name = [b] { return "buffers[" + std::to_string(b) + "]"; };
    uint8_t* data;
    size_t size;
    if (PyTuple_Check(obj.ptr())) {  // a tensor's (address, nbytes): the caller holds it
      if (!memory_fast(obj.ptr(), &data, &size)) std::tie(data, size) = to_memory(obj, name());
    } else {
      held.push_back(std::make_unique<Buffer>(obj, false, name()));
      data = held.back()->data();
      size = held.back()->size();
    }
    sources.push_back({data, size, elem_sizes[b], has_prev[b] ? &prev[b] : nullptr});
  }
  dckpt::WriteOptions options{chunk_size, codec,  level, threads,
                              fsync,      file_index, direct, duty, fsync || writeback, {}};
  if (!reuse_obj.is_none()) {
    py::sequence flags = to_sequence(reuse_obj, "reuse");
    if (py::len(flags) != paths.size()) invalid_argument("reuse must have one entry per path");
    for (py::handle f : flags) options.reuse.push_back(PyObject_IsTrue(f.ptr()) == 1);
  }
  std::vector<std::vector<ChunkRecord>> records;
  Status st;
  {
    py::gil_scoped_release release;
    st = several ? dckpt::write_chunks(paths, sources, options, &records)
                 : dckpt::write_chunks(paths[0], sources, options, &records);
  }
  if (!st.ok()) raise(st);

  py::list result;
  for (const auto& per_buffer : records) {
    py::list items;
    for (const ChunkRecord& r : per_buffer)
      items.append(record_of ? to_record_of(record_of, r) : to_tuple(r));
    result.append(items);
  }
  return result;
}

void read_chunks(py::handle paths_obj, py::handle dests_obj, py::handle elem_sizes_obj,
                 py::handle chunks_obj, bool verify, int threads) {
  std::vector<std::string> paths = to_paths(paths_obj);
  py::sequence dests = to_sequence(dests_obj, "dests");
  py::sequence chunk_lists = to_sequence(chunks_obj, "chunks");
  size_t n = py::len(dests);
  if (py::len(chunk_lists) != n) invalid_argument("chunks must have one list per destination");
  std::vector<size_t> elem_sizes = to_elem_sizes(elem_sizes_obj, n);
  check_threads(threads);

  std::vector<std::vector<ChunkRecord>> records(n);
  for (size_t i = 0; i < n; ++i) {
    py::handle list = chunk_lists[i];
    if (!records_fast(list.ptr(), &records[i]))
      records[i] = to_records(list, "chunks[" + std::to_string(i) + "]");
  }
  std::vector<std::unique_ptr<Buffer>> held;
  std::vector<dckpt::ReadTarget> targets;
  for (size_t i = 0; i < n; ++i) {
    auto name = [i] { return "dests[" + std::to_string(i) + "]"; };
    py::handle dest = dests[i];
    if (PyTuple_Check(dest.ptr())) {
      uint8_t* address;
      size_t size;
      if (!memory_fast(dest.ptr(), &address, &size))
        std::tie(address, size) = to_memory(dest, name());
      targets.push_back({address, size, elem_sizes[i], &records[i]});
      continue;
    }
    held.push_back(std::make_unique<Buffer>(dest, true, name()));
    targets.push_back({held.back()->data(), held.back()->size(), elem_sizes[i], &records[i]});
  }
  Status st;
  {
    py::gil_scoped_release release;
    st = dckpt::read_chunks(paths, targets, verify, threads);
  }
  if (!st.ok()) raise(st);
}

py::list verify_chunks(py::handle paths_obj, py::handle chunks_obj, py::handle elem_sizes_obj,
                       bool deep, int threads) {
  std::vector<std::string> paths = to_paths(paths_obj);
  std::vector<ChunkRecord> records = to_records(chunks_obj, "chunks");
  std::vector<size_t> elem_sizes = to_elem_sizes(elem_sizes_obj, records.size());
  check_threads(threads);

  std::vector<dckpt::VerifyFailure> failures;
  Status st;
  {
    py::gil_scoped_release release;
    st = dckpt::verify_chunks(paths, records, elem_sizes, deep, threads, &failures);
  }
  if (!st.ok()) raise(st);

  py::list result;
  for (const auto& f : failures)
    result.append(py::make_tuple(f.chunk_index, dckpt::kind_name(f.kind), f.expected, f.actual,
                                 f.message));
  return result;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "dckpt native I/O core: chunked, hashed, optionally compressed file I/O.";

  py::dict ns;
  ns["__name__"] = "dckpt._native";
  py::exec(kChunkErrorSource, ns);
  py::object error = ns["ChunkError"];
  m.attr("ChunkError") = error;
  chunk_error_type = error.release();

  m.attr("MAX_CHUNK_SIZE") = dckpt::kMaxChunkSize;

  m.def("version", [] { return std::string(dckpt::kNativeVersion); });
  m.def("zstd_version", [] { return std::string(ZSTD_versionString()); });
  m.def("hash_isa", [] { return std::string(dckpt::xxh3().isa); },
        "The instruction set XXH3 runs with here: sse2, avx2 or avx512.");
  m.def("hash64", &hash64, py::arg("buf"), "XXH3-64 (seed 0) of any contiguous buffer.");
  m.def("write_chunks", &write_chunks, py::arg("path"), py::arg("buffers"),
        py::arg("elem_sizes"), py::arg("chunk_size") = int64_t{4} << 20, py::arg("codec") = 0,
        py::arg("level") = 1, py::arg("threads") = 0, py::arg("fsync") = true,
        py::arg("file_index") = 0, py::arg("prev_hashes") = py::none(),
        py::arg("direct") = false, py::arg("duty") = 1.0, py::arg("writeback") = false,
        py::arg("record_type") = py::none(), py::arg("reuse") = py::none(),
        "Cut each buffer into chunks, store them in `path`; returns chunk records per buffer\n"
        "(tuples, or instances of record_type: a tuple subclass of seven fields).\n"
        "A buffer is a C-contiguous buffer or an (address, nbytes) pair of memory the caller\n"
        "keeps alive and unchanged for the call (a torch tensor's).\n"
        "path may be a list of files: writer thread w appends the chunks it takes to file\n"
        "w % len(path) (record file_index = file_index + that position); not with direct.\n"
        "direct: raw chunks bypass the page cache where the filesystem allows it; duty: the\n"
        "share of time each writer thread spends writing, in (0, 1] (it sleeps the rest);\n"
        "writeback: start the kernel's writeback of each MiB as it is written (always with\n"
        "fsync; set it when the caller fsyncs the file itself).\n"
        "reuse: one flag per path (buffered only): that file exists and is written over in\n"
        "place, then cut to the bytes written; left as it was when it got none.");
  m.def("read_chunks", &read_chunks, py::arg("paths"), py::arg("dests"), py::arg("elem_sizes"),
        py::arg("chunks"), py::arg("verify") = true, py::arg("threads") = 0,
        "Fill each destination from its chunk records: a writable C-contiguous buffer, or an\n"
        "(address, nbytes) pair of memory the caller keeps alive (a torch tensor's).");
  m.def("verify_chunks", &verify_chunks, py::arg("paths"), py::arg("chunks"),
        py::arg("elem_sizes"), py::arg("deep") = false, py::arg("threads") = 0,
        "Check stored (and with deep, raw) hashes; returns one failure tuple per bad chunk.");
  m.def(
      "whole_tensors",
      [](py::handle tensors, py::handle file_sizes, long long world, py::handle itemsizes,
         py::handle types) {
        PyObject* out = dckpt::whole_tensors(tensors.ptr(), file_sizes.ptr(), world,
                                             itemsizes.ptr(), types.ptr());
        if (out == nullptr) throw py::error_already_set();
        return py::reinterpret_steal<py::list>(out);
      },
      py::arg("tensors"), py::arg("file_sizes"), py::arg("world"), py::arg("itemsizes"),
      py::arg("types"),
      "Manifest tensor records stored whole by one rank, checked and built as\n"
      "types = (Chunk, Shard, TensorEntry); None for any other record (see manifest.py).");
  m.def(
      "records_json",
      [](py::handle entries, py::handle placements) {
        PyObject* out = dckpt::records_json(entries.ptr(), placements.ptr());
        if (out == nullptr) throw py::error_already_set();
        return py::reinterpret_steal<py::object>(out);
      },
      py::arg("entries"), py::arg("placements"),
      "The canonical JSON of TensorEntry records (name -> entry) as bytes, placements given\n"
      "as their JSON text per name; None when a record needs json's own writer.");
  m.def(
      "value_json",
      [](py::handle value) {
        PyObject* out = dckpt::value_json(value.ptr());
        if (out == nullptr) throw py::error_already_set();
        return py::reinterpret_steal<py::object>(out);
      },
      py::arg("value"),
      "The canonical JSON of a plain JSON value as bytes (json.dumps with sorted keys,\n"
      "compact, ASCII, no NaN); None for a value json must write (or refuse) itself.");
}
