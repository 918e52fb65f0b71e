// Manifest tensor records checked and built natively (see tensor_records.cpp).
#pragma once
#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace dckpt {

// For each record of `tensors` (name -> parsed JSON), in order: the TensorEntry of a
// torch tensor stored whole by one rank, or None when the record is anything else or
// breaks a rule. A new list; nullptr with a Python error set on bad arguments.
PyObject* whole_tensors(PyObject* tensors, PyObject* file_sizes, long long world,
                        PyObject* itemsizes, PyObject* types);

// The canonical JSON text (sorted keys, compact, ASCII) of `entries` (name -> TensorEntry)
// as bytes; placements: name -> the JSON text of each entry's placement. None when a
// record holds anything but exact ints and strs where those belong (the caller then
// writes it with json); nullptr with a Python error set on bad arguments.
PyObject* records_json(PyObject* entries, PyObject* placements);

// The canonical JSON text of a plain JSON value (dicts with str keys, lists, tuples, strs,
// ints, finite floats, bools, None) as bytes; None for anything else (the caller then
// writes it with json, which writes it or raises).
PyObject* value_json(PyObject* value);

}  // namespace dckpt
