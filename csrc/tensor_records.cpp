// The manifest's usual tensor record (a tensor stored whole by one rank: every tensor of a
// single-process save) checked and built without the interpreter: 0.38 ms instead of 2.06
// for the 720 records of the bf16 benchmark state. It mirrors _whole_tensor in
// dckpt/format/manifest.py check for check, and tests/test_native_records.py holds the two
// to the same answer on every single-field edit and thousands of random ones. A record it
// does not accept comes back as None: the Python checks then take it and name what is
// wrong. Works on the parsed JSON, so it reads no bytes itself.
#include "tensor_records.h"

#include <cstdint>
#include <charconv>
#include <cmath>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

namespace dckpt {
namespace {

constexpr long long kMaxInt = INT64_MAX;
constexpr long long kMaxChunkBytes = 1LL << 30;
constexpr long long kMaxStoredBytes = kMaxChunkBytes + (1LL << 20);
constexpr long long kMaxZstdRatio = 1LL << 15;
constexpr long long kMaxDim = 1LL << 48;
constexpr Py_ssize_t kMaxDims = 64;
constexpr Py_ssize_t kMaxNameLength = 4096;
enum Codec { kRaw = 0, kShuffleZstd = 2 };

struct Types {
  PyTypeObject* chunk;
  PyTypeObject* shard;
  PyTypeObject* entry;
};

// An int (not a bool, not a subclass) in [lo, hi]; false with no error set otherwise.
bool int_in(PyObject* v, long long lo, long long hi, long long* out) {
  if (v == nullptr || !PyLong_CheckExact(v)) return false;
  int overflow = 0;
  long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
  if (overflow != 0 || x < lo || x > hi) return false;
  *out = x;
  return true;
}

// 16 lowercase hex digits, as the regex [0-9a-f]{16} fully matches them.
bool hex16(PyObject* v, unsigned long long* out) {
  if (!PyUnicode_CheckExact(v) || PyUnicode_GET_LENGTH(v) != 16) return false;
  const int kind = PyUnicode_KIND(v);
  const void* data = PyUnicode_DATA(v);
  unsigned long long x = 0;
  for (Py_ssize_t i = 0; i < 16; ++i) {
    const Py_UCS4 c = PyUnicode_READ(kind, data, i);
    unsigned d;
    if (c >= '0' && c <= '9') {
      d = c - '0';
    } else if (c >= 'a' && c <= 'f') {
      d = c - 'a' + 10;
    } else {
      return false;
    }
    x = x << 4 | d;
  }
  *out = x;
  return true;
}

// _shape_ok: a list of at most 64 ints in [0, 2^48] whose product times 16 fits in
// int64. *elements gets the product (a zero dimension makes it 0 whatever the others).
bool shape_ok(PyObject* v, long long* elements) {
  if (v == nullptr || !PyList_CheckExact(v) || PyList_GET_SIZE(v) > kMaxDims) return false;
  const Py_ssize_t n = PyList_GET_SIZE(v);
  std::vector<long long> dims(static_cast<size_t>(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!int_in(PyList_GET_ITEM(v, i), 0, kMaxDim, &dims[static_cast<size_t>(i)])) return false;
  }
  long long p = 1;
  for (long long d : dims) {
    if (d == 0) {
      *elements = 0;
      return true;
    }
  }
  for (long long d : dims) {
    if (__builtin_mul_overflow(p, d, &p) || p > kMaxInt / 16) return false;
  }
  *elements = p;
  return true;
}

// The same list of ints: equal lengths, each element an int equal to the other's.
bool same_ints(PyObject* a, PyObject* b) {
  const Py_ssize_t n = PyList_GET_SIZE(b);
  if (a == nullptr || !PyList_CheckExact(a) || PyList_GET_SIZE(a) != n) return false;
  for (Py_ssize_t i = 0; i < n; ++i) {
    long long x, y;
    if (!int_in(PyList_GET_ITEM(a, i), 0, kMaxInt, &x) ||
        !int_in(PyList_GET_ITEM(b, i), 0, kMaxInt, &y) || x != y)
      return false;
  }
  return true;
}

bool all_zero(PyObject* v, Py_ssize_t n) {
  if (v == nullptr || !PyList_CheckExact(v) || PyList_GET_SIZE(v) != n) return false;
  for (Py_ssize_t i = 0; i < n; ++i) {
    long long x;
    if (!int_in(PyList_GET_ITEM(v, i), 0, 0, &x)) return false;
  }
  return true;
}

// tuple.__new__(type, items) for a named tuple, without its Python __new__: what
// CPython's tuple_subtype_new does. Takes new references to the items.
PyObject* make(PyTypeObject* type, std::initializer_list<PyObject*> items) {
  PyObject* out = type->tp_alloc(type, static_cast<Py_ssize_t>(items.size()));
  if (out == nullptr) return nullptr;
  Py_ssize_t i = 0;
  for (PyObject* v : items) {
    Py_INCREF(v);
    PyTuple_SET_ITEM(out, i++, v);
  }
  return out;
}

// The record's keys, interned once: a lookup then hashes nothing.
struct Keys {
  PyObject *placement, *kind, *dtype, *shape, *shards, *offsets, *rank, *chunks, *torch;
};

bool intern(Keys* k) {
  const std::initializer_list<std::pair<PyObject**, const char*>> names = {
      {&k->placement, "placement"}, {&k->kind, "kind"},       {&k->dtype, "dtype"},
      {&k->shape, "shape"},         {&k->shards, "shards"},   {&k->offsets, "offsets"},
      {&k->rank, "rank"},           {&k->chunks, "chunks"},   {&k->torch, "torch"}};
  for (auto& [slot, name] : names) {
    if (*slot == nullptr && (*slot = PyUnicode_InternFromString(name)) == nullptr) return false;
  }
  return true;
}

Keys keys;  // kept for the life of the process, like any interned string

// d[key] as a borrowed reference; nullptr when absent, or with an error set when a key's
// comparison raised (never for the str keys of parsed JSON).
PyObject* get(PyObject* d, PyObject* key) { return PyDict_GetItemWithError(d, key); }

// _chunk_ok and _chunk: the Chunk of a valid record; nullptr with no error set when the
// record is not valid, nullptr with an error set when Python failed.
PyObject* chunk(PyObject* ch, const std::vector<long long>& file_sizes, const Types& t,
                long long* raw_out) {
  if (!PyList_CheckExact(ch) || PyList_GET_SIZE(ch) != 7) return nullptr;
  long long f, off, stored, raw, codec;
  unsigned long long raw_hash, stored_hash;
  const long long files = static_cast<long long>(file_sizes.size());
  if (!int_in(PyList_GET_ITEM(ch, 0), 0, files - 1, &f) ||
      !int_in(PyList_GET_ITEM(ch, 1), 0, kMaxInt, &off) ||
      !int_in(PyList_GET_ITEM(ch, 2), 0, kMaxStoredBytes, &stored) ||
      !int_in(PyList_GET_ITEM(ch, 3), 0, kMaxChunkBytes, &raw) ||
      !int_in(PyList_GET_ITEM(ch, 4), kRaw, kShuffleZstd, &codec))
    return nullptr;
  if (codec == kRaw ? stored != raw : raw > stored * kMaxZstdRatio) return nullptr;
  if (off > file_sizes[static_cast<size_t>(f)] - stored) return nullptr;  // off + stored > size
  if (!hex16(PyList_GET_ITEM(ch, 5), &raw_hash) || !hex16(PyList_GET_ITEM(ch, 6), &stored_hash))
    return nullptr;
  PyObject* h1 = PyLong_FromUnsignedLongLong(raw_hash);
  PyObject* h2 = h1 ? PyLong_FromUnsignedLongLong(stored_hash) : nullptr;
  PyObject* out = h2 ? make(t.chunk, {PyList_GET_ITEM(ch, 0), PyList_GET_ITEM(ch, 1),
                                      PyList_GET_ITEM(ch, 2), PyList_GET_ITEM(ch, 3),
                                      PyList_GET_ITEM(ch, 4), h1, h2})
                     : nullptr;
  Py_XDECREF(h1);
  Py_XDECREF(h2);
  *raw_out = raw;
  return out;
}

// _whole_tensor for one record: a new TensorEntry, Py_None (a new reference) when the
// record is not of that form or not valid, nullptr when Python failed.
PyObject* whole_tensor(PyObject* name, PyObject* rec, const std::vector<long long>& file_sizes,
                       long long world, PyObject* itemsizes, const Types& t) {
  Py_ssize_t name_len = PyUnicode_Check(name) ? PyUnicode_GET_LENGTH(name) : 0;
  if (!PyDict_CheckExact(rec) || name_len < 1 || name_len > kMaxNameLength) Py_RETURN_NONE;
  PyObject* placement = get(rec, keys.placement);
  if (PyErr_Occurred()) return nullptr;
  if (placement != nullptr && placement != Py_None) Py_RETURN_NONE;
  PyObject* kind = get(rec, keys.kind);
  PyObject* dtype = get(rec, keys.dtype);
  PyObject* shape = get(rec, keys.shape);
  PyObject* shards = get(rec, keys.shards);
  if (PyErr_Occurred()) return nullptr;
  // Only torch tensors: numpy dtype strings are left to the Python checks.
  if (kind == nullptr || !PyUnicode_CheckExact(kind) || PyUnicode_Compare(kind, keys.torch) != 0)
    Py_RETURN_NONE;
  if (dtype == nullptr || !PyUnicode_CheckExact(dtype) || shards == nullptr ||
      !PyList_CheckExact(shards) || PyList_GET_SIZE(shards) != 1)
    Py_RETURN_NONE;
  PyObject* size_obj = PyDict_GetItemWithError(itemsizes, dtype);
  if (size_obj == nullptr) {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NONE;
  }
  long long itemsize, elements;
  PyObject* s = PyList_GET_ITEM(shards, 0);
  if (!int_in(size_obj, 1, 16, &itemsize) || !shape_ok(shape, &elements) || !PyDict_CheckExact(s))
    Py_RETURN_NONE;
  PyObject* offsets = get(s, keys.offsets);
  PyObject* sshape = get(s, keys.shape);
  PyObject* rank = get(s, keys.rank);
  PyObject* chunks = get(s, keys.chunks);
  if (PyErr_Occurred()) return nullptr;
  long long r;
  if (!same_ints(sshape, shape) || !all_zero(offsets, PyList_GET_SIZE(shape)) ||
      !int_in(rank, 0, world - 1, &r) || chunks == nullptr || !PyList_CheckExact(chunks))
    Py_RETURN_NONE;
  const Py_ssize_t n = PyList_GET_SIZE(chunks);
  PyObject* built = PyList_New(n);
  if (built == nullptr) return nullptr;
  long long total = 0;
  for (Py_ssize_t i = 0; i < n; ++i) {
    long long raw = 0;
    PyObject* c = chunk(PyList_GET_ITEM(chunks, i), file_sizes, t, &raw);
    if (c == nullptr) {
      Py_DECREF(built);
      if (PyErr_Occurred()) return nullptr;
      Py_RETURN_NONE;
    }
    PyList_SET_ITEM(built, i, c);
    total += raw;  // at most 2^30 per chunk: a list cannot hold enough to overflow
  }
  if (total != elements * itemsize) {
    Py_DECREF(built);
    Py_RETURN_NONE;
  }
  PyObject* shard = make(t.shard, {offsets, sshape, rank, built});
  Py_DECREF(built);
  PyObject* shard_list = shard ? PyList_New(1) : nullptr;
  if (shard_list == nullptr) {
    Py_XDECREF(shard);
    return nullptr;
  }
  PyList_SET_ITEM(shard_list, 0, shard);
  PyObject* entry = make(t.entry, {dtype, shape, shard_list, kind, Py_None});
  Py_DECREF(shard_list);
  return entry;
}

bool named_tuple_type(PyObject* v, PyTypeObject** out) {
  if (!PyType_Check(v) || !PyType_IsSubtype(reinterpret_cast<PyTypeObject*>(v), &PyTuple_Type))
    return false;
  *out = reinterpret_cast<PyTypeObject*>(v);
  return true;
}

}  // namespace

PyObject* whole_tensors(PyObject* tensors, PyObject* file_sizes, long long world,
                        PyObject* itemsizes, PyObject* types) {
  Types t{};
  if (!intern(&keys)) return nullptr;
  if (!PyDict_Check(tensors) || !PyList_Check(file_sizes) || !PyDict_Check(itemsizes) ||
      world < 1 || !PyTuple_Check(types) || PyTuple_GET_SIZE(types) != 3 ||
      !named_tuple_type(PyTuple_GET_ITEM(types, 0), &t.chunk) ||
      !named_tuple_type(PyTuple_GET_ITEM(types, 1), &t.shard) ||
      !named_tuple_type(PyTuple_GET_ITEM(types, 2), &t.entry)) {
    PyErr_SetString(PyExc_TypeError,
                    "whole_tensors(tensors: dict, file_sizes: list[int], world >= 1, "
                    "itemsizes: dict, types: (Chunk, Shard, TensorEntry))");
    return nullptr;
  }
  std::vector<long long> sizes;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(file_sizes); ++i) {
    long long v;
    if (!int_in(PyList_GET_ITEM(file_sizes, i), 0, kMaxInt, &v)) {
      PyErr_SetString(PyExc_ValueError, "file sizes are ints in [0, 2^63)");
      return nullptr;
    }
    sizes.push_back(v);
  }
  PyObject* out = PyList_New(PyDict_GET_SIZE(tensors));
  if (out == nullptr) return nullptr;
  Py_ssize_t pos = 0, i = 0;
  PyObject *name, *rec;
  while (PyDict_Next(tensors, &pos, &name, &rec)) {
    PyObject* e = whole_tensor(name, rec, sizes, world, itemsizes, t);
    if (e == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyList_SET_ITEM(out, i++, e);
  }
  return out;
}

}  // namespace dckpt

// ---- the write side: canonical JSON of TensorEntry records -----------------------------
// What format/canonical.py tensors() writes (byte for byte json.dumps(..., sort_keys=True,
// separators=(",", ":"), ensure_ascii=True) of the records' to_json()), without building
// a string per number in the interpreter. Anything of another shape (a value that is not an
// exact int or str where one belongs, a hash outside 64 bits) gives None: the Python
// writer then takes the whole dict, so the bytes never differ.
namespace dckpt {
namespace {

// JSON's ensure_ascii form of an exact str: printable ASCII as is, the rest escaped as
// Python's json escapes it (\uXXXX in lowercase hex, surrogate pairs above U+FFFF).
bool put_string(std::string* out, PyObject* s) {
  if (!PyUnicode_CheckExact(s)) return false;
  static const char kHex[] = "0123456789abcdef";
  const int kind = PyUnicode_KIND(s);
  const void* data = PyUnicode_DATA(s);
  const Py_ssize_t n = PyUnicode_GET_LENGTH(s);
  auto put_u = [out](unsigned v) {
    char b[6] = {'\\', 'u', kHex[v >> 12 & 15], kHex[v >> 8 & 15], kHex[v >> 4 & 15],
                 kHex[v & 15]};
    out->append(b, 6);
  };
  out->push_back('"');
  for (Py_ssize_t i = 0; i < n; ++i) {
    const Py_UCS4 c = PyUnicode_READ(kind, data, i);
    if (c == '"' || c == '\\') {
      out->push_back('\\');
      out->push_back(static_cast<char>(c));
    } else if (c >= ' ' && c <= '~') {
      out->push_back(static_cast<char>(c));
    } else if (c == '\n') {
      out->append("\\n");
    } else if (c == '\r') {
      out->append("\\r");
    } else if (c == '\t') {
      out->append("\\t");
    } else if (c == '\b') {
      out->append("\\b");
    } else if (c == '\f') {
      out->append("\\f");
    } else if (c > 0xFFFF) {
      const Py_UCS4 v = c - 0x10000;
      put_u(0xD800 | (v >> 10));
      put_u(0xDC00 | (v & 0x3FF));
    } else {
      put_u(c);
    }
  }
  out->push_back('"');
  return true;
}

bool put_int(std::string* out, PyObject* v) {
  if (!PyLong_CheckExact(v)) return false;  // a bool or an int subclass: json's way
  int overflow = 0;
  const long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
  if (overflow != 0 || (x == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return false;
  }
  char b[24];
  const auto end = std::to_chars(b, b + sizeof b, x).ptr;
  out->append(b, static_cast<size_t>(end - b));
  return true;
}

// A list or tuple's items (borrowed) and count; false for anything else.
bool items(PyObject* v, PyObject*** out, Py_ssize_t* n) {
  if (!PyList_CheckExact(v) && !PyTuple_CheckExact(v)) return false;
  *out = PySequence_Fast_ITEMS(v);
  *n = PySequence_Fast_GET_SIZE(v);
  return true;
}

bool put_ints(std::string* out, PyObject* v) {
  PyObject** xs;
  Py_ssize_t n;
  if (!items(v, &xs, &n)) return false;
  out->push_back('[');
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (i) out->push_back(',');
    if (!put_int(out, xs[i])) return false;
  }
  out->push_back(']');
  return true;
}

// Chunk.to_json(): five ints, then the two hashes as 16 lowercase hex digits.
bool put_chunk(std::string* out, PyObject* c) {
  if (!PyTuple_Check(c) || PyTuple_GET_SIZE(c) != 7) return false;
  out->push_back('[');
  for (Py_ssize_t i = 0; i < 5; ++i) {
    if (!put_int(out, PyTuple_GET_ITEM(c, i))) return false;
    out->push_back(',');
  }
  for (Py_ssize_t i = 5; i < 7; ++i) {
    PyObject* h = PyTuple_GET_ITEM(c, i);
    if (!PyLong_CheckExact(h)) return false;
    const unsigned long long x = PyLong_AsUnsignedLongLong(h);
    if (x == static_cast<unsigned long long>(-1) && PyErr_Occurred()) {
      PyErr_Clear();  // negative or wider than 64 bits
      return false;
    }
    static const char kHex[] = "0123456789abcdef";
    char b[18];
    b[0] = b[17] = '"';
    for (int k = 0; k < 16; ++k) b[16 - k] = kHex[x >> (4 * k) & 15];
    out->append(b, 18);
    if (i == 5) out->push_back(',');
  }
  out->push_back(']');
  return true;
}

// Shard.to_json() with its keys sorted: chunks, offsets, rank, shape.
bool put_shard(std::string* out, PyObject* s) {
  PyObject** cs;
  Py_ssize_t n;
  if (!PyTuple_Check(s) || PyTuple_GET_SIZE(s) != 4 || !items(PyTuple_GET_ITEM(s, 3), &cs, &n))
    return false;
  out->append("{\"chunks\":[");
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (i) out->push_back(',');
    if (!put_chunk(out, cs[i])) return false;
  }
  out->append("],\"offsets\":");
  if (!put_ints(out, PyTuple_GET_ITEM(s, 0))) return false;
  out->append(",\"rank\":");
  if (!put_int(out, PyTuple_GET_ITEM(s, 2))) return false;
  out->append(",\"shape\":");
  if (!put_ints(out, PyTuple_GET_ITEM(s, 1))) return false;
  out->push_back('}');
  return true;
}

// TensorEntry.to_json() with its keys sorted: dtype, kind, placement (its text given, as
// the Python writer keeps it), shape, shards.
bool put_entry(std::string* out, PyObject* name, PyObject* e, PyObject* placements) {
  if (!PyTuple_Check(e) || PyTuple_GET_SIZE(e) != 5 || !put_string(out, name)) return false;
  out->append(":{\"dtype\":");
  if (!put_string(out, PyTuple_GET_ITEM(e, 0))) return false;
  out->append(",\"kind\":");
  if (!put_string(out, PyTuple_GET_ITEM(e, 3))) return false;
  if (PyTuple_GET_ITEM(e, 4) != Py_None) {
    PyObject* text = PyDict_GetItemWithError(placements, name);
    Py_ssize_t len;
    const char* p = text && PyUnicode_CheckExact(text) ? PyUnicode_AsUTF8AndSize(text, &len)
                                                       : nullptr;
    if (p == nullptr) {
      PyErr_Clear();
      return false;
    }
    out->append(",\"placement\":");
    out->append(p, static_cast<size_t>(len));
  }
  out->append(",\"shape\":");
  if (!put_ints(out, PyTuple_GET_ITEM(e, 1))) return false;
  out->append(",\"shards\":[");
  PyObject** ss;
  Py_ssize_t n;
  if (!items(PyTuple_GET_ITEM(e, 2), &ss, &n)) return false;
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (i) out->push_back(',');
    if (!put_shard(out, ss[i])) return false;
  }
  out->append("]}");
  return true;
}

// Any JSON value as json.dumps(..., sort_keys=True, separators=(",", ":"),
// allow_nan=False, ensure_ascii=True) writes it: dicts with exact str keys, lists and
// tuples, exact strs, ints within 64 bits, finite floats (by float.__repr__, as json
// writes them), True, False, None. False for anything else (or nesting past kMaxNesting):
// json then writes it, or raises.
constexpr int kMaxNesting = 256;

bool put_value(std::string* out, PyObject* v, int depth) {
  if (depth > kMaxNesting) return false;
  if (v == Py_None) {
    out->append("null");
  } else if (v == Py_True) {
    out->append("true");
  } else if (v == Py_False) {
    out->append("false");
  } else if (PyUnicode_CheckExact(v)) {
    return put_string(out, v);
  } else if (PyLong_CheckExact(v)) {
    return put_int(out, v);
  } else if (PyFloat_CheckExact(v)) {
    const double x = PyFloat_AS_DOUBLE(v);
    if (!std::isfinite(x)) return false;
    PyObject* text = PyFloat_Type.tp_repr(v);
    if (text == nullptr) {
      PyErr_Clear();
      return false;
    }
    Py_ssize_t n;
    const char* p = PyUnicode_AsUTF8AndSize(text, &n);
    if (p != nullptr) out->append(p, static_cast<size_t>(n));
    Py_DECREF(text);
    if (p == nullptr) PyErr_Clear();
    return p != nullptr;
  } else if (PyList_CheckExact(v) || PyTuple_CheckExact(v)) {
    PyObject** xs = PySequence_Fast_ITEMS(v);
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(v);
    out->push_back('[');
    for (Py_ssize_t i = 0; i < n; ++i) {
      if (i) out->push_back(',');
      if (!put_value(out, xs[i], depth + 1)) return false;
    }
    out->push_back(']');
  } else if (PyDict_CheckExact(v)) {
    PyObject* keys = PyDict_Keys(v);
    if (keys == nullptr) {
      PyErr_Clear();
      return false;
    }
    bool ok = true;
    const Py_ssize_t n = PyList_GET_SIZE(keys);
    for (Py_ssize_t i = 0; ok && i < n; ++i) ok = PyUnicode_CheckExact(PyList_GET_ITEM(keys, i));
    if (ok && PyList_Sort(keys) != 0) {
      PyErr_Clear();
      ok = false;
    }
    out->push_back('{');
    for (Py_ssize_t i = 0; ok && i < n; ++i) {
      PyObject* k = PyList_GET_ITEM(keys, i);
      PyObject* x = PyDict_GetItemWithError(v, k);
      if (i) out->push_back(',');
      ok = x != nullptr && put_string(out, k);
      if (ok) {
        out->push_back(':');
        ok = put_value(out, x, depth + 1);
      }
    }
    Py_DECREF(keys);
    if (!ok) {
      PyErr_Clear();
      return false;
    }
    out->push_back('}');
  } else {
    return false;
  }
  return true;
}

}  // namespace

PyObject* records_json(PyObject* entries, PyObject* placements) {
  if (!PyDict_Check(entries) || !PyDict_Check(placements)) {
    PyErr_SetString(PyExc_TypeError, "records_json(entries: dict, placements: dict)");
    return nullptr;
  }
  PyObject* names = PyDict_Keys(entries);
  if (names == nullptr) return nullptr;
  const Py_ssize_t n = PyList_GET_SIZE(names);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!PyUnicode_CheckExact(PyList_GET_ITEM(names, i))) {  // sorted() of mixed keys raises
      Py_DECREF(names);
      Py_RETURN_NONE;
    }
  }
  if (PyList_Sort(names) != 0) {
    Py_DECREF(names);
    return nullptr;
  }
  std::string out;
  out.reserve(static_cast<size_t>(n) * 160 + 2);
  out.push_back('{');
  bool ok = true;
  for (Py_ssize_t i = 0; ok && i < n; ++i) {
    PyObject* name = PyList_GET_ITEM(names, i);
    PyObject* e = PyDict_GetItemWithError(entries, name);
    if (i) out.push_back(',');
    ok = e != nullptr && put_entry(&out, name, e, placements);
  }
  Py_DECREF(names);
  if (PyErr_Occurred()) return nullptr;
  if (!ok) Py_RETURN_NONE;
  out.push_back('}');
  return PyBytes_FromStringAndSize(out.data(), static_cast<Py_ssize_t>(out.size()));
}

PyObject* value_json(PyObject* value) {
  std::string out;
  if (!put_value(&out, value, 0)) Py_RETURN_NONE;
  return PyBytes_FromStringAndSize(out.data(), static_cast<Py_ssize_t>(out.size()));
}

}  // namespace dckpt
