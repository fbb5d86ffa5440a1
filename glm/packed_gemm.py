"""The LM head of a decoding step through MKL's packed GEMM, on CPU.

MKL's sgemm copies its B matrix into an internal blocked layout ("packs" it) on every call. For the LM
head, h [rows, hidden] . E^T with E the [vocab, hidden] word embeddings, that copy is the whole matrix
(200 MB in glm-large-chinese), and at a decoding step's few rows it costs more than the product: 4 rows
took 24 ms of CPU time on one core here, 7-9 ms (about the time to read E once) with E^T packed by
cblas_sgemm_pack and each step's product done by cblas_sgemm_compute. Packing takes ~45 ms and a copy of
E's size (227 MB for glm-large-chinese), so GLMGenerator packs once per generate call and drops it after.

The functions are those of the MKL Paddle's CPU wheel bundles (paddle/libs/libmklml_intel.so); where it
is not there (another build, another platform, a GPU tensor), nothing is packed and paddle.matmul runs.
"""

import ctypes
import functools
import os
from typing import Optional

import numpy as np
import paddle

__all__ = ["PackedTransposed", "packed_transposed", "PackedLinears"]

# CBLAS enumerations (mkl_cblas.h)
_ROW_MAJOR, _NO_TRANS, _TRANS, _B_MATRIX, _PACKED = 101, 111, 112, 162, 151


@functools.lru_cache(maxsize=None)
def _mkl():
    """Paddle's bundled MKL with its packed-GEMM functions, or None."""
    path = os.path.join(os.path.dirname(paddle.__file__), "libs", "libmklml_intel.so")
    try:
        library = ctypes.CDLL(path)  # already loaded by Paddle: the same library, not a second copy
        pack_size, pack, compute = library.cblas_sgemm_pack_get_size, library.cblas_sgemm_pack, library.cblas_sgemm_compute
    except (OSError, AttributeError):
        return None
    pack_size.restype = ctypes.c_size_t
    pack_size.argtypes = [ctypes.c_int] * 4
    pack.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    compute.argtypes = [ctypes.c_int] * 6 + [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                             ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
    return library


class PackedTransposed:
    """x . W^T for a float32 CPU matrix W [n, k] (or x . W for W [k, n] with `transposed=False`), with the
    right-hand matrix packed once in MKL's layout: the products use that copy, so W must not change while
    this is in use. `rows`: the most rows a product will have. MKL lays the pack out for that many (any
    fewer work as fast; packed for 1 row, a 4-row product took 2.4x as long, and packed for 4, a 20-row one
    1.6x)."""

    def __init__(self, weight: paddle.Tensor, rows: int, library, transposed: bool = True):
        self.n, self.k = weight.shape if transposed else weight.shape[::-1]
        self.library = library
        size = library.cblas_sgemm_pack_get_size(_B_MATRIX, rows, self.n, self.k)
        self.buffer = np.empty(size, dtype=np.uint8)
        weight = weight if weight.is_contiguous() else weight.contiguous()
        library.cblas_sgemm_pack(_ROW_MAJOR, _B_MATRIX, _TRANS if transposed else _NO_TRANS, rows, self.n, self.k,
                                 1.0, weight.data_ptr(), self.k if transposed else self.n, self.buffer.ctypes.data)

    def matmul(self, x: paddle.Tensor) -> paddle.Tensor:
        """x [..., k] float32 on CPU -> x . W^T [..., n]."""
        rows = x.reshape([-1, self.k])
        rows = rows if rows.is_contiguous() else rows.contiguous()
        out = paddle.empty([rows.shape[0], self.n], dtype="float32")
        self.library.cblas_sgemm_compute(_ROW_MAJOR, _NO_TRANS, _PACKED, rows.shape[0], self.n, self.k,
                                         rows.data_ptr(), self.k, self.buffer.ctypes.data, self.k, 0.0,
                                         out.data_ptr(), self.n)
        return out.reshape(list(x.shape[:-1]) + [self.n])


def packed_transposed(weight: paddle.Tensor, rows: int, transposed: bool = True) -> Optional[PackedTransposed]:
    """`weight` packed for x . weight^T (x . weight with `transposed=False`) with up to `rows` rows, or None
    where MKL's packed GEMM cannot run it (not a float32 CPU matrix, or no such MKL)."""
    if weight.ndim != 2 or weight.dtype != paddle.float32 or not weight.place.is_cpu_place():
        return None
    library = _mkl()
    return PackedTransposed(weight, rows, library, transposed) if library is not None else None


class PackedLinears:
    """The weights of a model's plain `nn.Linear` layers packed for decoding steps of up to `rows` rows
    (x . W + b, W [in, out]). At a step's few rows MKL's sgemm re-packs the whole weight at every call and
    that costs more than the product: one glm-large layer's four matmuls took 4.5 ms at 5 rows (a beam
    search's) and 2.0 ms packed, 6.3 and 3.7 ms at 16. A subclass of nn.Linear (a LoRA
    layer: its forward adds the adapter) is not packed, nor is anything MKL cannot run."""

    def __init__(self, model: paddle.nn.Layer, rows: int):
        self.rows = rows
        self._packs = {}
        for layer in model.sublayers():
            if type(layer) is paddle.nn.Linear:
                pack = packed_transposed(layer.weight, rows, transposed=False)
                if pack is not None:
                    self._packs[id(layer)] = pack

    def __len__(self):
        return len(self._packs)

    def linear(self, layer: paddle.nn.Layer, x: paddle.Tensor) -> paddle.Tensor:
        """layer(x), through the layer's pack when it has one and x has 2 to `rows` rows. An encode's many
        rows go through the layer itself (MKL's own packing pays off there), and so does one row: a greedy
        step of glm-large's 24 layers took 8 % longer packed than through sgemm's one-row path."""
        pack = self._packs.get(id(layer))
        if pack is None or not 1 < x.size // x.shape[-1] <= self.rows:
            return layer(x)
        out = pack.matmul(x)
        return out + layer.bias if layer.bias is not None else out
