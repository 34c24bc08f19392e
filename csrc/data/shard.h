// Token shards on disk: validation and read-only memory maps. No torch.
//
// The byte layout (fmcore shard v1 and llm.c GPT-2 shards) is documented in
// python/fmcore/data/shards.py; both readers validate the same things. Every check runs on the
// header read with pread() before the file is mapped, so a malformed file raises ShardError (which
// names the file, the byte offset and what was expected) and never leads to an out-of-bounds read.
// Files must not be truncated while mapped: reading a page past the new end raises SIGBUS, as with
// any mmap reader (numpy.memmap too). check_unchanged() sees a file changed since open()
// (truncated, or rewritten in place: cp over it, rsync --inplace) before the loader reads it, at a
// restart and when a worker moves to another shard; a change while a shard is being read still
// crashes. Reading with pread() would make that an error too, but cost 25% (sequential) to 110%
// (random windows with document boundaries) more CPU per batch, a syscall per window, and hold a
// file descriptor per shard (measured on the CPU, 2026-12, beside `python -m fmcore.bench loader`).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

namespace fmcore::data {

constexpr uint32_t kShardMagic = 0x53434D46;  // "FMCS" little-endian
constexpr uint16_t kShardVersion = 1;
constexpr size_t kShardHeaderBytes = 64;
constexpr uint32_t kNoEos = 0xFFFFFFFFu;
constexpr int32_t kLlmcMagic = 20240520;
constexpr int32_t kLlmcVersion = 1;
constexpr size_t kLlmcHeaderBytes = 256 * 4;
constexpr uint32_t kGpt2Vocab = 50257, kGpt2Eos = 50256;

// A shard or dataset that cannot be used. The Python binding raises fmcore.data.ShardError (a
// ValueError).
class ShardError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// zlib-compatible CRC-32 (polynomial 0xEDB88320), continuing from crc.
uint32_t crc32(const void* data, size_t n, uint32_t crc = 0);

struct ShardInfo {
  std::string path;
  bool llmc = false;
  uint32_t token_bytes = 2;  // 2 or 4
  uint64_t n_tokens = 0;
  uint64_t n_docs = 0;
  uint32_t vocab_size = 0;  // 0: unknown
  uint32_t eos_id = kNoEos;
  uint64_t tokens_offset = 0;
  uint64_t docs_offset = 0;
  uint64_t file_bytes = 0;
};

class Shard {
 public:
  // Validates the header against the file size, maps the file, checks the document offsets and,
  // when verify_payload, the payload CRC. random_access: advise the kernel against readahead.
  // Throws ShardError.
  static std::unique_ptr<Shard> open(const std::string& path, bool verify_payload,
                                     bool random_access = false);
  ~Shard();
  Shard(const Shard&) = delete;
  Shard& operator=(const Shard&) = delete;

  const ShardInfo& info() const { return info_; }
  uint64_t size() const { return info_.n_tokens; }
  uint32_t token(uint64_t i) const {
    return info_.token_bytes == 2 ? reinterpret_cast<const uint16_t*>(tokens_)[i]
                                  : reinterpret_cast<const uint32_t*>(tokens_)[i];
  }
  // Copies n tokens starting at token `start` into dst, widened; the caller checks start + n <=
  // size().
  template <typename Out>
  void copy(uint64_t start, uint64_t n, Out* dst) const {
    if (info_.token_bytes == 2) {
      const uint16_t* src = reinterpret_cast<const uint16_t*>(tokens_) + start;
      for (uint64_t t = 0; t < n; ++t) dst[t] = static_cast<Out>(src[t]);
    } else {
      const uint32_t* src = reinterpret_cast<const uint32_t*>(tokens_) + start;
      for (uint64_t t = 0; t < n; ++t) dst[t] = static_cast<Out>(src[t]);
    }
  }
  // Document start offsets (n_docs of them: 0, then strictly increasing, < n_tokens), or nullptr.
  const uint64_t* doc_starts() const { return docs_; }
  // Throws ShardError naming the first token in [start, start + n) that is >= vocab.
  void check_vocab(uint64_t start, uint64_t n, uint32_t vocab) const;
  // Throws ShardError when the file at the path is the one mapped and its size or modification time
  // is not what open() validated. (A file renamed over the path leaves the mapped one intact.)
  void check_unchanged() const;

 private:
  Shard() = default;
  ShardInfo info_;
  uint64_t dev_ = 0, ino_ = 0;
  int64_t mtime_ns_ = 0;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  const unsigned char* tokens_ = nullptr;
  const uint64_t* docs_ = nullptr;
};

}  // namespace fmcore::data
