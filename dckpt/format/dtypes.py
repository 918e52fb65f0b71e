"""Element types by name: the manifest's vocabulary, without importing torch or numpy."""

# name -> bytes per element. Names are torch's (str(torch.float32) without "torch.").
ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1,
    "bool": 1,
}

# numpy arrays are stored under numpy's own dtype string ("<f4", "|b1", ...); only plain
# fixed-size numeric and bool kinds, never object or structured dtypes.
NUMPY_KINDS = set("biufc")


def numpy_itemsize(dtype_str: str) -> int | None:
    """Item size of a numpy dtype string like '<f4', or None when not a plain numeric type."""
    if len(dtype_str) < 3 or dtype_str[0] not in "<>|=" or dtype_str[1] not in NUMPY_KINDS:
        return None
    digits = dtype_str[2:]
    if not digits.isdigit() or len(digits) > 2:
        return None
    size = int(digits)
    return size if size in (1, 2, 4, 8, 16) else None
