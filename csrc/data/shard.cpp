// Shard validation and mapping; see shard.h and python/fmcore/data/shards.py for the format.
#include "data/shard.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>

static_assert(std::endian::native == std::endian::little,
              "fmcore shards are read on little-endian hosts");

namespace fmcore::data {
namespace {

std::array<uint32_t, 256> make_crc_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    table[i] = c;
  }
  return table;
}

template <typename T>
T load(const unsigned char* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

std::string hex(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08X", v);
  return buf;
}

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw ShardError(path + ": " + what);
}

// Reads up to n bytes at offset 0; returns how many were read.
size_t read_prefix(int fd, unsigned char* buf, size_t n, const std::string& path) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = ::pread(fd, buf + got, n - got, static_cast<off_t>(got));
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) fail(path, std::string("cannot read: ") + std::strerror(errno));
    if (r == 0) break;
    got += static_cast<size_t>(r);
  }
  return got;
}

int64_t mtime_ns(const struct stat& st) {
  return static_cast<int64_t>(st.st_mtim.tv_sec) * 1000000000 + st.st_mtim.tv_nsec;
}

void check_size(const std::string& path, uint64_t size, uint64_t expected,
                const std::string& count_field) {
  if (size < expected)
    fail(path, "truncated: file is " + std::to_string(size) + " bytes, but the header (" +
                   count_field + ") needs " + std::to_string(expected) + " bytes");
  if (size > expected)
    fail(path, "token count does not match the file size: the header (" + count_field + ") means " +
                   std::to_string(expected) + " bytes, file is " + std::to_string(size));
}

// got: header bytes actually read (min(size, 1024) unless the file changes meanwhile).
ShardInfo parse_fmcore(const std::string& path, const unsigned char* h, size_t got, uint64_t size) {
  if (got < kShardHeaderBytes)
    fail(path, "truncated: file is " + std::to_string(size) + " bytes, expected at least the " +
                   std::to_string(kShardHeaderBytes) + "-byte header");
  uint16_t version = load<uint16_t>(h + 4);
  if (version != kShardVersion)
    fail(path, "unknown format version " + std::to_string(version) + " at offset 4, expected " +
                   std::to_string(kShardVersion));
  uint32_t stored = load<uint32_t>(h + 60), computed = crc32(h, 60);
  if (stored != computed)
    fail(path, "header checksum mismatch at offset 60: stored " + hex(stored) +
                   ", crc32 of bytes 0..59 is " + hex(computed));
  ShardInfo info;
  info.path = path;
  info.token_bytes = load<uint16_t>(h + 6);
  if (info.token_bytes != 2 && info.token_bytes != 4)
    fail(path, "token width " + std::to_string(info.token_bytes) + " at offset 6, expected 2 or 4");
  info.n_tokens = load<uint64_t>(h + 8);
  info.n_docs = load<uint64_t>(h + 16);
  info.vocab_size = load<uint32_t>(h + 24);
  info.eos_id = load<uint32_t>(h + 28);
  info.tokens_offset = kShardHeaderBytes;
  info.file_bytes = size;
  std::string fields = "token count " + std::to_string(info.n_tokens) +
                       " at offset 8, document count " + std::to_string(info.n_docs) +
                       " at offset 16";
  // Overflow-safe: compare the counts with the size before multiplying them.
  if (info.n_tokens > size / info.token_bytes || info.n_docs > size / 8)
    fail(path, "truncated: file is " + std::to_string(size) +
                   " bytes, far fewer than the header (" + fields + ") needs");
  uint64_t tokens_end = kShardHeaderBytes + info.n_tokens * info.token_bytes;
  info.docs_offset = info.n_docs ? (tokens_end + 7) & ~uint64_t{7} : tokens_end;
  check_size(path, size, info.docs_offset + 8 * info.n_docs, fields);
  return info;
}

ShardInfo parse_llmc(const std::string& path, const unsigned char* h, size_t got, uint64_t size) {
  if (got < kLlmcHeaderBytes)
    fail(path, "truncated: file is " + std::to_string(size) + " bytes, expected at least the " +
                   std::to_string(kLlmcHeaderBytes) + "-byte llm.c header");
  int32_t version = load<int32_t>(h + 4), n = load<int32_t>(h + 8);
  if (version != kLlmcVersion)
    fail(path, "unknown llm.c version " + std::to_string(version) +
                   " at offset 4, expected 1 (GPT-2 uint16)");
  if (n < 0) fail(path, "negative token count " + std::to_string(n) + " at offset 8");
  ShardInfo info;
  info.path = path;
  info.llmc = true;
  info.token_bytes = 2;
  info.n_tokens = static_cast<uint64_t>(n);
  info.vocab_size = kGpt2Vocab;
  info.eos_id = kGpt2Eos;
  info.tokens_offset = kLlmcHeaderBytes;
  info.docs_offset = kLlmcHeaderBytes + 2 * info.n_tokens;
  info.file_bytes = size;
  check_size(path, size, info.docs_offset, "token count " + std::to_string(n) + " at offset 8");
  return info;
}

}  // namespace

uint32_t crc32(const void* data, size_t n, uint32_t crc) {
  static const std::array<uint32_t, 256> table = make_crc_table();
  const unsigned char* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

std::unique_ptr<Shard> Shard::open(const std::string& path, bool verify_payload,
                                   bool random_access) {
  // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever; the
  // S_ISREG check below then refuses it. It changes nothing for a regular file's pread and mmap.
  // Retried on EINTR: a signal handled in Python (the trainer's SIGINT one; CPython installs none
  // with SA_RESTART) interrupts an open that blocks, as on FUSE and NFS mounts.
  int fd;
  do fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  while (fd < 0 && errno == EINTR);
  if (fd < 0) fail(path, std::string("cannot open: ") + std::strerror(errno));
  std::unique_ptr<Shard> shard(new Shard());
  try {
    struct stat st;
    if (::fstat(fd, &st) != 0) fail(path, std::string("cannot stat: ") + std::strerror(errno));
    if (!S_ISREG(st.st_mode)) fail(path, "not a regular file");
    uint64_t size = static_cast<uint64_t>(st.st_size);
    shard->dev_ = static_cast<uint64_t>(st.st_dev);
    shard->ino_ = static_cast<uint64_t>(st.st_ino);
    shard->mtime_ns_ = mtime_ns(st);
    unsigned char head[kLlmcHeaderBytes];
    size_t got = read_prefix(fd, head, sizeof(head), path);
    if (got < 4)
      fail(path, "truncated: file is " + std::to_string(size) + " bytes, expected at least a " +
                     std::to_string(kShardHeaderBytes) +
                     "-byte header starting with the magic at offset 0");
    uint32_t magic = load<uint32_t>(head);
    if (magic == kShardMagic) {
      shard->info_ = parse_fmcore(path, head, got, size);
    } else if (magic == static_cast<uint32_t>(kLlmcMagic)) {
      shard->info_ = parse_llmc(path, head, got, size);
    } else {
      fail(path, "bad magic at offset 0: got " + hex(magic) + ", expected " + hex(kShardMagic) +
                     " (fmcore shard) or 20240520 (llm.c shard)");
    }
    shard->map_bytes_ = static_cast<size_t>(size);
    void* map = ::mmap(nullptr, shard->map_bytes_, PROT_READ, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED) fail(path, std::string("cannot mmap: ") + std::strerror(errno));
    shard->map_ = map;
    ::close(fd);
    fd = -1;
  } catch (...) {
    if (fd >= 0) ::close(fd);
    throw;
  }
  Shard& s = *shard;
  const unsigned char* base = static_cast<const unsigned char*>(s.map_);
  s.tokens_ = base + s.info_.tokens_offset;
  if (s.info_.n_docs) {
    s.docs_ =
        reinterpret_cast<const uint64_t*>(base + s.info_.docs_offset);  // 8-aligned by the format
    for (uint64_t k = 0; k < s.info_.n_docs; ++k) {
      uint64_t v = s.docs_[k];
      bool ok = k == 0 ? v == 0 : v > s.docs_[k - 1];
      if (ok && v >= s.info_.n_tokens) ok = false;
      if (!ok) {
        std::string want = k == 0
                               ? std::string("0")
                               : "> " + std::to_string(s.docs_[k - 1]) + " and < the token count " +
                                     std::to_string(s.info_.n_tokens);
        fail(path, "document start " + std::to_string(v) + " at offset " +
                       std::to_string(s.info_.docs_offset + 8 * k) + " (entry " +
                       std::to_string(k) + "), expected " + want);
      }
    }
  }
  if (verify_payload && !s.info_.llmc) {
    uint32_t want = load<uint32_t>(base + 32);
    uint32_t got = crc32(base + kShardHeaderBytes, s.map_bytes_ - kShardHeaderBytes);
    if (got != want)
      fail(path, "payload checksum mismatch: crc32 of bytes 64.." + std::to_string(s.map_bytes_) +
                     " is " + hex(got) + ", the header at offset 32 says " + hex(want));
  }
  // Random windows touch a page or two each: kernel readahead would read ~32x more than used when
  // the shard is not in the page cache. After the checks above, which read it front to back (the
  // checksum from a cold cache took 8x as long without readahead). Only a hint.
  if (random_access) ::madvise(s.map_, s.map_bytes_, MADV_RANDOM);
  return shard;
}

Shard::~Shard() {
  if (map_) ::munmap(map_, map_bytes_);
}

void Shard::check_unchanged() const {
  struct stat st;
  if (::stat(info_.path.c_str(), &st) != 0 || static_cast<uint64_t>(st.st_dev) != dev_ ||
      static_cast<uint64_t>(st.st_ino) != ino_)
    return;  // gone or replaced by a rename: the mapped file is intact
  if (static_cast<uint64_t>(st.st_size) != info_.file_bytes || mtime_ns(st) != mtime_ns_)
    fail(info_.path, "the file changed since the loader opened it (" +
                         std::to_string(info_.file_bytes) + " bytes then, " +
                         std::to_string(st.st_size) + " now" +
                         (mtime_ns(st) != mtime_ns_ ? ", modified since" : "") +
                         "): truncated or rewritten in place; a dataset must not change while "
                         "it is read: write a new one beside it (as fmcore prepare does)");
}

void Shard::check_vocab(uint64_t start, uint64_t n, uint32_t vocab) const {
  for (uint64_t t = start; t < start + n; ++t) {
    uint32_t v = token(t);
    if (v >= vocab)
      fail(info_.path, "token id " + std::to_string(v) + " at offset " +
                           std::to_string(info_.tokens_offset + t * info_.token_bytes) +
                           " (token " + std::to_string(t) + ") is >= the vocab size " +
                           std::to_string(vocab));
  }
}

}  // namespace fmcore::data
