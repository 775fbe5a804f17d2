// check_bsr_indices accepts well-formed BSR indices and rejects each kind of malformed ones with a message naming
// the array. Index arrays are std::vectors of their exact size, so an out-of-bounds read shows up under ASan.
#include <cstdint>
#include <limits>
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

// The definition, with no shortcut: crow starts at 0, never decreases, ends at nnz; cols in range, increasing per row.
bool valid_by_definition(const std::vector<int32_t>& crow, const std::vector<int32_t>& col, const BsrProblem& p) {
  const int64_t nnz = int64_t(col.size());
  if (crow[0] != 0 || crow.back() != nnz) return false;
  for (size_t r = 0; r + 1 < crow.size(); ++r) {
    if (crow[r + 1] < crow[r] || crow[r + 1] > nnz) return false;
    for (int64_t b = crow[r]; b < crow[r + 1]; ++b) {
      if (col[b] < 0 || col[b] >= p.n_block_cols || (b > crow[r] && col[b] <= col[b - 1])) return false;
    }
  }
  return true;
}

// What tests/test_fuzz.py does to the op's index arguments, replayed on the kernel's own check: every entry of a
// valid crow / col set in turn to each extreme value (int32 limits, -1, the bounds, what an int64 2**32 + i wraps to).
// The check must agree with the definition, and, the arrays being exactly their size, ASan catches any read past them.
void replay_fuzz_mutations() {
  constexpr int32_t kMin = std::numeric_limits<int32_t>::min(), kMax = std::numeric_limits<int32_t>::max();
  const std::vector<int32_t> crow = {0, 2, 2, 3}, col = {0, 2, 1};
  const BsrProblem p = problem(3);
  const std::vector<int32_t> extremes = {kMin, kMin + 1, -2, -1, 0, 1, 2, 3, 4, kMax - 1, kMax};
  int checked = 0;
  for (int which = 0; which < 2; ++which) {
    const size_t n = which == 0 ? crow.size() : col.size();
    for (size_t i = 0; i < n; ++i) {
      for (int32_t v : extremes) {
        std::vector<int32_t> c = crow, k = col;
        (which == 0 ? c : k)[i] = v;
        const bool accepted = run_check(c, k, p).empty();
        CHECK(accepted == valid_by_definition(c, k, p),
              (which == 0 ? "crow_indices[" : "col_indices[") << i << "] = " << v << ": the check "
                                                               << (accepted ? "accepted" : "rejected") << " it");
        ++checked;
      }
    }
  }
  // Length changes: one block fewer in col than crow counts (the last row would read past col), one more.
  CHECK(!run_check(crow, {0, 2}, p).empty(), "crow counting 3 blocks with 2 in col must be rejected");
  CHECK(!run_check(crow, {0, 2, 1, 0}, p).empty(), "crow counting 3 blocks with 4 in col must be rejected");
  CHECK(checked == int((crow.size() + col.size()) * extremes.size()), "every mutation replayed");
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
  // Found by tests/test_fuzz.py's mutations: int32 extremes where a sum or difference of indices would overflow.
  constexpr int32_t kMin = std::numeric_limits<int32_t>::min(), kMax = std::numeric_limits<int32_t>::max();
  expect_invalid("crow[0] = INT32_MIN", {kMin, 2, 2, 3}, {0, 2, 1}, "crow_indices[0]");
  expect_invalid("crow[-1] = INT32_MAX", {0, 2, 2, kMax}, {0, 2, 1}, "crow_indices[3]");
  expect_invalid("middle crow INT32_MAX", {0, kMax, kMax, 3}, {0, 2, 1}, "crow_indices[1]");
  expect_invalid("middle crow INT32_MIN", {0, 2, kMin, 3}, {0, 2, 1}, "non-decreasing");
  expect_invalid("col INT32_MAX", {0, 2, 2, 3}, {0, kMax, 1}, "col_indices[1]");
  expect_invalid("col INT32_MIN", {0, 2, 2, 3}, {kMin, 2, 1}, "col_indices[0]");
  expect_invalid("col INT32_MAX - 1 then INT32_MAX", {0, 2, 2, 3}, {kMax - 1, kMax, 1}, "col_indices[0]");
  replay_fuzz_mutations();
  return check::report("test_check_indices");
}
