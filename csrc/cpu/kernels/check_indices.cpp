#include <sstream>

#include "bsr_linear.h"

namespace pysparse {

std::string check_bsr_indices(const int32_t* crow, const int32_t* col, const BsrProblem& p) {
  std::ostringstream err;
  if (crow[0] != 0) {
    err << "crow_indices[0] must be 0, got " << crow[0];
    return err.str();
  }
  for (int64_t r = 0; r < p.n_block_rows; ++r) {
    const int64_t begin = crow[r], end = crow[r + 1];
    if (end < begin) {
      err << "crow_indices must be non-decreasing, got crow_indices[" << r << "]=" << begin << " > crow_indices["
          << r + 1 << "]=" << end;
      return err.str();
    }
    if (end > p.nnz) {
      err << "crow_indices[" << r + 1 << "]=" << end << " exceeds the number of blocks " << p.nnz;
      return err.str();
    }
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c = col[b];
      if (c < 0 || c >= p.n_block_cols) {
        err << "col_indices[" << b << "]=" << c << " is out of range [0, " << p.n_block_cols << ")";
        return err.str();
      }
      if (b > begin && c <= col[b - 1]) {
        err << "col_indices must be strictly increasing within a block row, got " << col[b - 1] << " then " << c
            << " in block row " << r;
        return err.str();
      }
    }
  }
  if (crow[p.n_block_rows] != p.nnz) {
    err << "crow_indices[-1] must equal the number of blocks " << p.nnz << ", got " << crow[p.n_block_rows];
    return err.str();
  }
  return "";
}

}  // namespace pysparse
