// fmcore._C's communicator section: registers the NCCL communicator (fmcore._C.NcclCommunicator,
// fmcore._C.NcclError, fmcore._C.nccl_unique_id) when the build found NCCL, and always sets
// fmcore._C.has_nccl so Python can pick its torch.distributed fallback.
#pragma once

#include <pybind11/pybind11.h>

namespace fmcore::dist {

void register_dist(pybind11::module_& m);

}  // namespace fmcore::dist
