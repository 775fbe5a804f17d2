// check_bsr_indices accepts well-formed BSR indices and rejects each kind of malformed ones with a message naming
// the array. Index arrays are std::vectors of their exact size, so an out-of-bounds read shows up under ASan.
#include <string>
#include <vector>

#include "bsr_linear.h"
#include "check.h"

using pysparse::BsrProblem;
using pysparse::check_bsr_indices;

namespace {

// N=10, K=13 with 4x5 blocks: 3 block rows (the last overhangs N) and 3 block columns (the last overhangs K).
BsrProblem problem(int64_t nnz) {
  BsrProblem p;
  p.M = 2;
  p.N = 10;
  p.K = 13;
  p.bh = 4;
  p.bw = 5;
  p.n_block_rows = 3;
  p.n_block_cols = 3;
  p.nnz = nnz;
  p.ldx = p.K;
  return p;
}

std::string run_check(const std::vector<int32_t>& crow, const std::vector<int32_t>& col, BsrProblem p) {
  p.nnz = int64_t(col.size());
  return check_bsr_indices(crow.data(), col.data(), p);
}

void expect_valid(const char* what, const std::vector<int32_t>& crow, const std::vector<int32_t>& col,
                  const BsrProblem& p) {
  const std::string msg = run_check(crow, col, p);
  CHECK(msg.empty(), what << ": rejected valid indices: " << msg);
}

void expect_invalid(const char* what, const std::vector<int32_t>& crow, const std::vector<int32_t>& col,
                    const std::string& must_mention) {
  const std::string msg = run_check(crow, col, problem(0));
  CHECK(!msg.empty(), what << ": accepted malformed indices");
  CHECK(msg.find(must_mention) != std::string::npos,
        what << ": message should mention '" << must_mention << "', got: " << msg);
}

}  // namespace

int main() {
  expect_valid("typical", {0, 2, 2, 3}, {0, 2, 1}, problem(3));
  expect_valid("empty pattern", {0, 0, 0, 0}, {}, problem(0));
  expect_valid("full pattern", {0, 3, 6, 9}, {0, 1, 2, 0, 1, 2, 0, 1, 2}, problem(9));
  expect_valid("only the ragged corner block", {0, 0, 0, 1}, {2}, problem(1));
  {
    BsrProblem p = problem(0);
    p.N = 0;
    p.n_block_rows = 0;
    expect_valid("no block rows (N=0)", {0}, {}, p);
    CHECK(!run_check({1}, {}, p).empty(), "N=0 with crow_indices={1} must be rejected");
  }
  {
    BsrProblem p = problem(0);
    p.K = 0;
    p.n_block_cols = 0;
    expect_valid("no block columns (K=0), no blocks", {0, 0, 0, 0}, {}, p);
    CHECK(!run_check({0, 1, 1, 1}, {0}, p).empty(), "K=0 with a stored block must be rejected");
  }

  expect_invalid("crow[0] != 0", {1, 2, 2, 3}, {0, 2, 1}, "crow_indices[0]");
  expect_invalid("negative crow[0]", {-1, 2, 2, 3}, {0, 2, 1}, "crow_indices[0]");
  expect_invalid("non-monotone crow", {0, 2, 1, 3}, {0, 2, 1}, "non-decreasing");
  expect_invalid("negative crow entry", {0, -2, 1, 3}, {0, 2, 1}, "non-decreasing");
  expect_invalid("crow[-1] < nnz", {0, 1, 2, 2}, {0, 2, 1}, "crow_indices[-1]");
  // Past the end of col: must be caught before any col entry beyond nnz is read.
  expect_invalid("crow[-1] > nnz", {0, 2, 2, 4}, {0, 2, 1}, "crow_indices[3]");
  expect_invalid("middle crow past nnz", {0, 5, 5, 3}, {0, 2, 1}, "crow_indices[1]");
  expect_invalid("col == n_block_cols", {0, 2, 2, 3}, {0, 3, 1}, "col_indices[1]");
  expect_invalid("col far out of range", {0, 2, 2, 3}, {0, 2, 1 << 30}, "col_indices[2]");
  expect_invalid("negative col", {0, 2, 2, 3}, {-1, 2, 1}, "col_indices[0]");
  expect_invalid("unsorted cols in a row", {0, 2, 2, 3}, {2, 0, 1}, "strictly increasing");
  expect_invalid("duplicate cols in a row", {0, 2, 2, 3}, {1, 1, 1}, "strictly increasing");
  // Equal columns in different block rows are fine; only within a row they must increase.
  expect_valid("same col in consecutive rows", {0, 1, 2, 3}, {1, 1, 1}, problem(3));
  return check::report("test_check_indices");
}
